"""What a model call costs on top of the compiled code: `CompiledModel.__call__` against the bare VM call.

A call of a loaded model (`intforge.load(...)(x)`) checks its input (shape, dtype, no NaN), copies it
into the library's resident input tensor, keeps the calling thread off the pool's workers' cores
(`threads.Placement`), runs the VM's function and copies the result out. Each of those steps runs
right after the call before it, which has evicted the interpreter's own data and the input from the
caches: a step that takes a microsecond in a tight loop takes tens here (on the Zen 4, 2026-12-06,
after a ResNet50 call: fetching the pool's worker clocks 78 us, a ctypes call 17, a context manager's
generator 20). So this script times, interleaved in rounds (a slow phase of a shared machine lands on
all alike), blocks of `--calls` calls of
    bare      the VM function on the resident input tensor (what `ab_calls.py` times)
    full      the model's `__call__` on a numpy input
and, in the same loop, each step of a full call right after a bare one (`--steps`): the input check,
the copy, the placement's enter and exit, the result's copy. Writes JSON (`--out`).

Usage: python benchmarks/call_overhead.py resnet50 [--rounds 150] [--calls 5] [--out JSON]
(`--library model.so` times an existing build; else the zoo model is built at INT8, as
`profile_in_model.py` builds it, about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="resnet50", help="an intforge.zoo model name")
    p.add_argument("--library", type=Path, help="time this model.so instead of building the zoo model")
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--calls", type=int, default=5, help="calls a block")
    p.add_argument("--steps", type=int, default=200, help="full calls timed step by step")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def time_calls(model, x: np.ndarray, rounds: int, calls: int) -> dict[str, list[float]]:
    """Per-call ms of each block, bare and full, in rounds whose order alternates."""
    fn, inputs = model._fn, model._inputs
    cases = {"bare": lambda: fn(*inputs), "full": lambda: model(x)}
    out: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            f = cases[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            out[name].append((time.perf_counter() - t0) / calls * 1e3)
    return out


def time_steps(model, x: np.ndarray, n: int) -> dict[str, float]:
    """Median microseconds of each step of a call, each call right after a bare VM call."""
    fn, inputs, placement = model._fn, model._inputs, model._placement
    view = model._input_views[0] if model._input_views else None
    steps: dict[str, list[float]] = {k: [] for k in ("check", "copy_in", "enter", "exit", "copy_out")}
    for _ in range(n):
        fn(*inputs)  # the caches as a call leaves them
        t0 = time.perf_counter()
        model._check((x,))
        t1 = time.perf_counter()
        if view is not None:
            np.copyto(view, x)
        t2 = time.perf_counter()
        entered = placement.enter() if placement is not None else None
        t3 = time.perf_counter()
        res = fn(*inputs)
        t4 = time.perf_counter()
        if placement is not None:
            placement.exit(entered)
        t5 = time.perf_counter()
        model._numpy(res)
        t6 = time.perf_counter()
        for k, a, b in (("check", t0, t1), ("copy_in", t1, t2), ("enter", t2, t3), ("exit", t4, t5),
                        ("copy_out", t5, t6)):
            steps[k].append((b - a) * 1e6)
    return {k: round(statistics.median(v), 1) for k, v in steps.items()}


def main(argv: list[str] | None = None) -> int:
    import intforge
    from intforge.runtime import random_inputs
    from intforge.threads import pool_threads

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.library is None:
            from profile_in_model import build_zoo

            args.library = build_zoo(args.model, 1, Path(tmp))
        model = intforge.load(args.library)
        if len(model.inputs) != 1:
            raise SystemExit("a model of one input, please")
        (x,) = random_inputs(model.inputs, seed=0)
        model(x)
        blocks = time_calls(model, x, args.rounds, args.calls)
        steps = time_steps(model, x, args.steps)
    bare, full = np.array(blocks["bare"]), np.array(blocks["full"])
    result = {**result_header("call_overhead", pool_threads()), "library": str(args.library),
              "thread_pool": model.thread_pool, "rounds": args.rounds, "calls": args.calls,
              "bare_ms": float(np.median(bare)), "full_ms": float(np.median(full)),
              "full_over_bare_round_by_round": float(np.median(full / bare)),
              "steps_us": steps, "blocks_ms": {k: list(v) for k, v in blocks.items()}}
    print(f"bare VM call {result['bare_ms']:.3f} ms, full call {result['full_ms']:.3f} ms, "
          f"full / bare {result['full_over_bare_round_by_round']:.4f} round by round")
    print("steps of a full call (us, median, each right after a call):", steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
