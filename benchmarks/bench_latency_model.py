"""How well the per-layer latency table predicts a model's latency: the planner's latency budget on trial.

`intforge plan --latency` sums per-layer times (`intforge.latency.measure_layer_latency`: each conv and
linear layer compiled alone, at its real shape, and timed) and solves the bit allocation against that
sum. This script measures, for each model at batch 1 on `--threads` threads:
    * the table's sum at 8 bits (the layers a model repeats are timed once, as the planner does);
    * the model compiled all-INT8 and timed whole (resident input, the library's function alone);
and writes their ratio, with each layer's time alone (`layers_ms`). `--legacy-requantize` times the
layers with the fixed multiplier 2^30 and shift 40 that layers were timed with before TIMING_VERSION 6
(the 64-bit epilogue form, which calibrated convs no longer take), to show what that cost the
prediction.

What the sum leaves out, on purpose: the ops that are not conv/linear (pooling, residual adds that do not
fuse, the input's quantize and transpose), and the caches: a layer alone finds its weights in cache,
inside a model they come from memory. So the ratio is below 1 by the share of those.

Writes JSON (`--out`) and a bar chart beside it. About two minutes for the three models on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header, set_thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=30, help="timed calls per layer")
    p.add_argument("--legacy-requantize", action="store_true",
                   help="time layers with the fixed (2^30, 40) requantize used before TIMING_VERSION 6")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "latency_model.json")
    return p.parse_args(argv)


def _legacy_multipliers(kind: str, reals, short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(2^30, 40) for every channel: what `latency.layer_program` gave every layer before TIMING_VERSION 6."""
    n = len(np.asarray(reals))
    return np.full(n, 1 << 30, np.int64), np.full(n, 40, np.int64)


def run_model(name: str, repeat: int, work: Path) -> dict[str, Any]:
    import torch

    import intforge
    from intforge import zoo
    from intforge.capture import capture
    from intforge.compiler import build
    from intforge.latency import measure_layer_latency
    from intforge.quantize import QuantConfig
    from intforge.runtime import load

    torch.manual_seed(0)
    model = getattr(zoo, name)(seed=0).eval()
    images = zoo.random_images(17, seed=0)
    x = np.ascontiguousarray(images[:1])
    graph = capture(model, (torch.from_numpy(x),))
    table = measure_layer_latency(graph, bits=(8,), repeat=repeat, progress=False)
    program, _ = intforge.quantize_model(model, (torch.from_numpy(x),), np.ascontiguousarray(images[1:17]),
                                         quant=QuantConfig(layer_bits={}))
    lib = load(build(program, work / name, tuned=False).library)
    runs = [lib.time(repeat=100, warmup=10, resident=True)["median_ms"] for _ in range(3)]
    predicted = float(sum(t[8] for t in table.values()))
    measured = float(min(runs))
    print(f"{name}: layers alone sum to {predicted:.3f} ms, the model takes {measured:.3f} ms "
          f"(ratio {predicted / measured:.3f})")
    return {"predicted_ms": predicted, "measured_ms": measured, "measured_runs_ms": runs,
            "ratio": predicted / measured, "layers_ms": {k: v[8] for k, v in table.items()}}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    pred = [result["models"][n]["predicted_ms"] for n in names]
    meas = [result["models"][n]["measured_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, meas, 0.4, label="model, measured", color="tab:red")
    ax.bar(xs + 0.2, pred, 0.4, label="sum of layers alone (latency table)", color="tab:gray")
    for i, n in enumerate(names):
        ax.annotate(f"{result['models'][n]['ratio']:.2f}x", (xs[i] + 0.2, pred[i]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=9)
    ax.set_xticks(xs, names)
    ax.set_ylabel("ms, batch 1")
    form = "fixed (2^30, 40) requantize" if result["legacy_requantize"] else "calibrated requantize form"
    ax.set_title(f"INT8 latency table vs model ({form}), {result['threads']} threads", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_thread_env(args.threads)
    result = result_header("latency_model", args.threads)
    result["legacy_requantize"] = args.legacy_requantize
    result["models"] = {}
    with tempfile.TemporaryDirectory(prefix="intforge-latmodel-") as tmp:
        os.environ["INTFORGE_CACHE"] = str(Path(tmp) / "cache")  # measured now, not read from an old table
        if args.legacy_requantize:
            import intforge.latency

            intforge.latency.layer_multipliers = _legacy_multipliers
        for name in args.models.split(","):
            result["models"][name] = run_model(name, args.repeat, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
