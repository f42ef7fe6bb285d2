"""Winograd F(4x4, 3x3) against the direct VNNI kernel on ResNet's 3x3 stride-1 conv shapes.

Each shape is one conv layer (`intforge.latency.layer_program`: random int8 weights, the requantize
epilogue included, NHWC in and out) built twice, with `INTFORGE_WINOGRAD=0` (the direct `vpdpbusd`
kernel) and on Winograd, its shape limits lifted (`MAX_WEIGHT_BYTES_PER_TILE`, `MIN_TILE_ROW`) so that
the shapes it declines by default are timed on it too, and timed two ways:
    * hot: the same call again and again with the input in the library's memory (TVM's time evaluator),
      so the weights stay in cache, as in a per-layer table;
    * cold: a 96 MB buffer written between calls, so weights and input come from memory, as a layer's
      weights do inside a model (the model's weights do not stay in cache from one call to the next).
The two builds' outputs must be identical (bit for bit) on the same input. `winograd_takes_it` says
whether a default build uses Winograd for the shape (ResNet's 14x14 layers at batch 1 have too few tiles
for their int16 weights; 7x7 x 512 random weights also fail its exactness bound, so it has no Winograd
build). Writes JSON (`--out`) and a bar chart beside it. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header, set_thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parent
SHAPES = [(1, 56, 64), (1, 28, 128), (1, 14, 256), (1, 7, 512), (8, 14, 256)]  # batch, side, channels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "results" / "winograd.json"))
    return p.parse_args(argv)


def _cold_ms(fn, x, repeat: int, own_pool: bool) -> float:
    from intforge.threads import off_worker_cores

    junk = np.ones(96 << 20, np.uint8)
    ts = []
    for _ in range(repeat):
        junk += 1  # evicts the weights and the input from every cache level
        with off_worker_cores(own_pool=own_pool):  # where a model call runs (`CompiledModel`)
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def run_shape(batch: int, side: int, channels: int, repeat: int, work: Path) -> dict[str, Any]:
    import tvm

    from intforge.capture import FloatOp
    from intforge.compiler import build
    from intforge.kernels import winograd
    from intforge.latency import layer_program
    from intforge.runtime import load

    op = FloatOp("conv2d", f"conv{side}x{side}x{channels}", ["x"], "y",
                 {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1},
                 {"weight": np.zeros((channels, channels, 3, 3), np.float32)})
    shape = (batch, channels, side, side)
    prog = layer_program(op, shape, shape, 8)
    exact = winograd.exact(prog.ops[0].params["weight"])
    takes = exact and winograd.supported(batch, side, side, channels, channels, (3, 3), (1, 1), (1, 1), (1, 1))
    x = np.random.default_rng(0).integers(0, 256, (batch, side, side, channels)).astype(np.uint8)
    row: dict[str, Any] = {"batch": batch, "side": side, "channels": channels, "winograd_takes_it": bool(takes),
                           "macs": batch * side * side * channels * channels * 9}
    outs = {}
    limits = (winograd.MAX_WEIGHT_BYTES_PER_TILE, winograd.MIN_TILE_ROW)
    for kind, flag in (("direct", "0"), ("winograd", "1")):
        if kind == "winograd" and not exact:
            row[kind] = None
            continue
        os.environ["INTFORGE_WINOGRAD"] = flag
        winograd.MAX_WEIGHT_BYTES_PER_TILE, winograd.MIN_TILE_ROW = 1 << 40, 1  # every shape it can take
        try:
            art = build(prog, work / f"{kind}_{batch}_{side}_{channels}", boundary="int", tuned=False,
                        io_layout="NHWC")
        finally:
            os.environ.pop("INTFORGE_WINOGRAD", None)
            winograd.MAX_WEIGHT_BYTES_PER_TILE, winograd.MIN_TILE_ROW = limits
        lib = load(art.library)
        xt = tvm.runtime.tensor(x)
        outs[kind] = lib._fn(xt).numpy()
        hot = min(lib.time(repeat=repeat, warmup=5, resident=True)["median_ms"] for _ in range(3))
        cold = _cold_ms(lib._fn, xt, repeat, lib.thread_pool == "intforge")
        row[kind] = {"hot_ms": round(hot, 4), "cold_ms": round(cold, 4)}
    row["bit_exact"] = bool(np.array_equal(outs["direct"], outs["winograd"])) if "winograd" in outs else None
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b{r['batch']} {r['side']}x{r['side']}x{r['channels']}"
              + ("" if r["winograd_takes_it"] else "\n(declined)") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = np.arange(len(rows))
    for i, (kind, how) in enumerate((("direct", "hot"), ("winograd", "hot"), ("direct", "cold"),
                                     ("winograd", "cold"))):
        ax.bar(xs + (i - 1.5) * 0.2, [r[kind][f"{how}_ms"] if r[kind] else 0 for r in rows], 0.2,
               label=f"{kind} {how}")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("3x3 stride-1 conv: Winograd F(4x4,3x3) on vpdpwssd vs direct vpdpbusd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, side, channels in SHAPES:
            row = run_shape(batch, side, channels, args.repeat, Path(tmp))
            rows.append(row)
            wg = row["winograd"]
            print(f"  b{batch} {side:3d}x{side:<3d}x{channels:<4d} takes={row['winograd_takes_it']!s:5s} "
                  f"direct hot {row['direct']['hot_ms']:.3f} cold {row['direct']['cold_ms']:.3f} | winograd "
                  + (f"hot {wg['hot_ms']:.3f} cold {wg['cold_ms']:.3f}" if wg else "none (not exact)")
                  + f" | bit-exact {row['bit_exact']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result_header("winograd_vs_direct", args.threads), "shapes": rows,
              "total_seconds": round(time.time() - t0, 1)}
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(r["bit_exact"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
