"""Each kernel's time inside the running model: where an intforge build spends a call, layer by layer.

`bench_layers_vs_ort.py` times each layer compiled alone, with its weights and input hot in cache.
Inside a model a layer can take much longer: its weights were last read a whole call ago, and a layer
whose weights stream from memory (Winograd's int16 weights at 14x14x256: 4.7 MB) costs whatever memory
bandwidth the machine has at that moment. On 2026-12-03 this script showed those convs at 0.45-0.63 ms
each inside ResNet18 against 0.19 alone and 0.30 on the direct kernel, which set Winograd's weight limit.

How: the model's own library is run through TVM's Relax VM with an instrument callback (TVM's
`VirtualMachine.set_instrument`) that reads the clock before and after each call instruction; a
kernel's time is its median per model call over `--runs` calls. The callback adds a few microseconds
between kernels (the sum of kernels exceeds the uninstrumented call by that), not inside them. Each
kernel is listed with its argument shapes and, for the blocked and Winograd conv kernels, its
multiply-accumulates per model call and rate, so the rows can be compared with the CPU's INT8 peak
(`vnni_peak.c`): direct-conv MACs for Winograd, and the MACs the blocked kernel issues, input channels
padded to its 4-byte groups (a folded RGB stem counts 168 where the layer has 147).

Usage: python benchmarks/profile_in_model.py resnet50 [--batch 1] [--runs 30] [--scaling] [--out JSON]
Builds the zoo model (random seeded weights, 16 random calibration images) at INT8, untuned; or
`--library model.so` profiles an existing build (its input shape from the manifest). About a minute.

`--library A.so --against B.so` compares two builds of one model kernel by kernel: their calls
alternate, A then B, so a slow phase of this shared VM (seconds long, up to 2x) lands on both alike, and
each kernel's row gives A's median, B's and the median over calls of B's time over A's. Two profiles run
one after the other cannot show a 5% change on this machine; this can (2026-12-04: how the conv weight
prefetch was measured, and how a Winograd change that one run showed 6% faster was found 1-7% slower).

`--scaling` profiles the library twice, in a process whose TVM pool runs one thread and in one with the
default pool, and gives each kernel's speedup and the time it loses against a perfect one: the fixed
cost of starting a kernel's threads, the bytes they pass between their caches, an uneven split of the
tasks (ResNet's 28x28 x 128 Winograd convs run a task per row of tiles, 7 rows on 2 threads, x1.7).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header  # noqa: E402

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="resnet18", help="an intforge.zoo model name")
    p.add_argument("--library", type=Path, help="profile this model.so instead of building the zoo model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--top", type=int, default=30, help="rows printed")
    p.add_argument("--against", type=Path, help="a second build of the same model: an interleaved A/B")
    p.add_argument("--scaling", action="store_true",
                   help="each kernel on one thread against the pool's threads (two processes)")
    p.add_argument("--out", type=Path, help="JSON (default results/profile_<model>_b<batch>.json)")
    return p.parse_args(argv)


def build_zoo(name: str, batch: int, workdir: Path) -> Path:
    import torch

    import intforge
    from intforge import zoo
    from intforge.compiler import build
    from intforge.quantize import QuantConfig

    torch.manual_seed(0)
    model = getattr(zoo, name)(seed=0).eval()
    images = zoo.random_images(16 + batch, seed=0)
    x, calib = np.ascontiguousarray(images[:batch]), np.ascontiguousarray(images[batch:batch + 16])
    program, _ = intforge.quantize_model(model, (torch.from_numpy(x),), calib, quant=QuantConfig())
    return build(program, workdir / name, tuned=False).library


def conv_macs(shapes: list[tuple[int, ...]]) -> int | None:
    """MACs of one call of a blocked conv kernel (x [N, H, W, C], weights [O/16, KH, KW, C/4, 16, 4], ...,
    out) or a Winograd one (weights [36, O/32, C/2, 2, 16, 2]), from its argument shapes; None for other
    kernels. (A blocked 1x1 conv to 576 channels has 36 blocks too: the group of 4 or 2 tells them apart.)"""
    if len(shapes) < 3 or len(shapes[0]) != 4 or len(shapes[-1]) != 4:
        return None
    w, out = shapes[1], shapes[-1]
    n, oh, ow, o = out
    if len(w) == 6 and w[0] == 36 and w[5] == 2:  # Winograd: a 3x3 conv's multiplies, as the direct kernel does them
        return n * oh * ow * o * 9 * w[2] * w[3]
    if len(w) == 6 and w[3] * w[4] != shapes[0][3]:  # (not AVX2's depthwise weights [2, Q, KW, C/8, 8, 2])
        return n * oh * ow * o * w[1] * w[2] * w[3] * w[5]
    return None


def profile(library: Path, runs: int) -> tuple[list[dict[str, Any]], float]:
    """Per-kernel rows (median ms per model call, calls per model call, argument shapes) and the median
    uninstrumented call in ms."""
    from intforge import pool
    from intforge.threads import off_worker_cores

    model, arg = _model_input(library)
    plain = model.time(repeat=runs, warmup=5, resident=True)["median_ms"]
    shapes: dict[str, list[tuple[int, ...]]] = {}
    vm, times = _instrumented(library, arg, shapes)
    with off_worker_cores(own_pool=pool.active()):  # where a model call runs (`CompiledModel`)
        for _ in range(runs):
            vm["main"](*arg)
    rows = []
    for symbol, ts in times.items():
        if symbol.startswith("vm.builtin"):
            continue
        sums, per = _per_call(ts, runs)
        ms = float(np.median(sums)) * 1e3
        macs = conv_macs(shapes.get(symbol, []))
        macs = macs * per if macs else None
        rows.append({"kernel": symbol, "calls": per, "ms": round(ms, 4), "shapes": shapes.get(symbol, []),
                     "macs": macs, "gmacs_per_s": round(macs / ms / 1e6, 1) if macs else None})
    rows.sort(key=lambda r: -r["ms"])
    return rows, plain


def _model_input(library: Path) -> tuple[Any, list[Any]]:
    """The loaded model and seeded random inputs for it (an image; token ids and a mask), as TVM tensors
    (what the VM calls take)."""
    import tvm

    import intforge
    from intforge.runtime import random_inputs

    model = intforge.load(library)
    return model, [tvm.runtime.tensor(x, tvm.cpu()) for x in random_inputs(model.inputs)]


def _per_call(ts: list[float], runs: int) -> tuple[np.ndarray, int]:
    """One kernel's recorded times summed per model call (it may run several times a call), and how many
    times a call it runs."""
    per = len(ts) // runs
    return np.asarray(ts[:per * runs]).reshape(runs, per).sum(axis=1), per


def _instrumented(library: Path, arg, shapes: dict) -> tuple[Any, dict[str, list[float]]]:
    """A Relax VM of `library` whose calls record each kernel's time (and first-seen argument shapes)."""
    import tvm
    from tvm import relax

    from intforge import pool
    from intforge.threads import note_tvm_pool, off_worker_cores

    module = tvm.runtime.load_module(str(library))
    if not pool.install(library):  # on intforge's pool where the runtime would run it there (runtime.py)
        note_tvm_pool()
    vm = relax.VirtualMachine(module, tvm.cpu())
    with off_worker_cores(own_pool=pool.active()):
        for _ in range(5):
            vm["main"](*arg)
    times: dict[str, list[float]] = collections.defaultdict(list)
    start = [0.0]

    def instrument(_func, symbol, before, _ret, *args) -> int:
        if before:
            if symbol not in shapes:
                shapes[symbol] = [tuple(int(d) for d in a.shape) for a in args if hasattr(a, "shape")]
            start[0] = time.perf_counter()
        else:
            times[symbol].append(time.perf_counter() - start[0])
        return 0  # VMInstrumentReturnKind.kNoOp: run the call as usual

    vm.set_instrument(instrument)
    return vm, times


def compare(a: Path, b: Path, runs: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-kernel rows of an interleaved A/B of two builds of one model (see the module docstring), and
    the instrumented calls' medians and paired ratio."""
    from intforge import pool
    from intforge.threads import off_worker_cores

    _, arg = _model_input(a)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    (vm_a, ta), (vm_b, tb) = _instrumented(a, arg, shapes), _instrumented(b, arg, shapes)
    calls: list[list[float]] = [[], []]
    for _ in range(runs):
        for k, vm in enumerate((vm_a, vm_b)):
            with off_worker_cores(own_pool=pool.active()):
                t0 = time.perf_counter()
                vm["main"](*arg)
                calls[k].append(time.perf_counter() - t0)

    rows = []
    for symbol in ta:
        if symbol.startswith("vm.builtin") or symbol not in tb:
            continue
        (sa, per), (sb, _) = _per_call(ta[symbol], runs), _per_call(tb[symbol], runs)
        rows.append({"kernel": symbol, "calls": per, "a_ms": round(float(np.median(sa)) * 1e3, 4),
                     "b_ms": round(float(np.median(sb)) * 1e3, 4), "b_over_a": round(float(np.median(sb / sa)), 3),
                     "shapes": shapes.get(symbol, [])})
    rows.sort(key=lambda r: -r["a_ms"])
    ca, cb = np.asarray(calls[0]), np.asarray(calls[1])
    summary = {"a_call_ms": round(float(np.median(ca)) * 1e3, 4), "b_call_ms": round(float(np.median(cb)) * 1e3, 4),
               "b_over_a": round(float(np.median(cb / ca)), 3)}
    return rows, summary


def main_against(args: argparse.Namespace) -> int:
    from intforge.threads import pool_threads

    rows, summary = compare(args.library, args.against, args.runs)
    out = args.out or ROOT / "results" / f"profile_ab_{args.library.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result_header("profile_in_model A/B", pool_threads()), "a": str(args.library),
                               "b": str(args.against), "runs": args.runs, **summary, "kernels": rows}, indent=1))
    print(f"calls (instrumented): A {summary['a_call_ms']:.3f} ms, B {summary['b_call_ms']:.3f} ms, "
          f"B/A {summary['b_over_a']:.3f}; kernels sum A {sum(r['a_ms'] for r in rows):.3f}, "
          f"B {sum(r['b_ms'] for r in rows):.3f}")
    for r in rows[:args.top]:
        print(f"{r['a_ms']:8.4f} -> {r['b_ms']:8.4f} ms ({r['b_over_a']:.2f}) x{r['calls']:<2d} {r['kernel'][:56]}")
    print(f"wrote {out}")
    return 0


def scaling(one: list[dict[str, Any]], many: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Per-kernel rows of two profiles of one library, on 1 thread and on `threads`: the speedup, and the
    time lost against a perfect one (the many-thread time less the 1-thread time / threads), most first."""
    alone = {r["kernel"]: r for r in one}
    rows = []
    for r in many:
        a = alone.get(r["kernel"])
        if a is None or not r["ms"]:
            continue
        rows.append({"kernel": r["kernel"], "calls": r["calls"], "one_thread_ms": a["ms"], "ms": r["ms"],
                     "speedup": round(a["ms"] / r["ms"], 3), "lost_ms": round(r["ms"] - a["ms"] / threads, 4),
                     "shapes": r["shapes"]})
    rows.sort(key=lambda r: -r["lost_ms"])
    return rows


def main_scaling(args: argparse.Namespace) -> int:
    """How far each kernel is from using every thread: the library profiled (`profile`) in a process whose
    pool runs one thread and in one with the default pool, each kernel's speedup and the time it loses
    against a perfect one. What it finds: a kernel's fixed cost of starting its threads (about 1 us on
    the Zen 5, 2026-12-04), the bytes its threads pass between their caches, an uneven split of its
    tasks. At batch 1 on 2 threads (2026-12-04) ResNet50 lost 0.25-0.47 ms of 4.5-5.0 that way, ResNet18
    0.14-0.18 of 1.8-1.9."""
    import subprocess

    def run(threads: int | None) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
        if threads:
            env["TVM_NUM_THREADS"] = str(threads)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "profile.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--library", str(library), "--runs",
                            str(args.runs), "--out", str(out)], env=env, check=True, capture_output=True)
            return json.loads(out.read_text())

    with tempfile.TemporaryDirectory() as tmp:
        library = args.library or build_zoo(args.model, args.batch, Path(tmp))
        one, many = run(1), run(None)
    threads = many["threads"]
    rows = scaling(one["kernels"], many["kernels"], threads)
    lost = sum(max(0.0, r["lost_ms"]) for r in rows)
    name = args.library.stem if args.library else f"{args.model}_b{args.batch}"
    out = args.out or ROOT / "results" / f"profile_scaling_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**{k: many[k] for k in ("date_utc", "machine", "versions")},
                               "benchmark": "profile_in_model scaling", "threads": threads, "model": name,
                               "runs": args.runs, "one_thread_call_ms": one["call_ms_uninstrumented"],
                               "call_ms": many["call_ms_uninstrumented"], "lost_ms": round(lost, 4),
                               "kernels": rows}, indent=1))
    print(f"{name}: {one['call_ms_uninstrumented']:.3f} ms a call on 1 thread, {many['call_ms_uninstrumented']:.3f} "
          f"on {threads}; kernels lose {lost:.3f} ms against a perfect {threads}x")
    for r in rows[:args.top]:
        print(f"{r['one_thread_ms']:8.4f} -> {r['ms']:8.4f} ms  x{r['speedup']:.2f}  lost {r['lost_ms']:+.4f}  "
              f"x{r['calls']:<2d} {r['kernel'][:50]}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scaling:
        return main_scaling(args)
    if args.against is not None and args.library is None:
        raise SystemExit("--against compares two builds: give the first with --library")
    import intforge  # noqa: F401 - sets TVM's thread pool (TVM_NUM_THREADS) before anything runs

    if args.against is not None:
        return main_against(args)
    from intforge.threads import pool_threads

    with tempfile.TemporaryDirectory() as tmp:
        library = args.library or build_zoo(args.model, args.batch, Path(tmp))
        rows, plain = profile(library, args.runs)
    total = sum(r["ms"] for r in rows)
    name = args.library.stem if args.library else f"{args.model}_b{args.batch}"
    out = args.out or ROOT / "results" / f"profile_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result_header("profile_in_model", pool_threads()), "model": name, "runs": args.runs,
              "call_ms_uninstrumented": round(plain, 4), "sum_of_kernels_ms": round(total, 4), "kernels": rows}
    out.write_text(json.dumps(result, indent=1))
    print(f"{name}: {plain:.3f} ms a call (resident, uninstrumented); kernels sum to {total:.3f} ms")
    for r in rows[:args.top]:
        rate = f"{r['gmacs_per_s']:7.1f} GMAC/s" if r["gmacs_per_s"] else " " * 14
        print(f"{r['ms']:8.3f} ms {100 * r['ms'] / total:5.1f}%  x{r['calls']:<2d} {rate}  {r['kernel'][:56]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
