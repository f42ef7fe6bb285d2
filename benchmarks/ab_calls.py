"""Two builds of one model, whole calls, uninstrumented, interleaved: is B faster than A?

`profile_in_model.py --against` times every kernel of two builds with TVM's instrument callback around
each call, which is what a per-kernel A/B needs, and gives the instrumented call's ratio too. That ratio
can mislead: on the Zen 3 (2026-12-05) AVX2's two-row register tiles came out 1.022-1.026x slower in it
(its 14x14 convs 1.06-1.11x), and 0.979-0.985x, faster, in whole calls without the callback (eight
runs, both orders); the build with them is the one that landed. So a change is judged here: rounds
of `--calls` resident calls of A, then of B (TVM's time evaluator, each engine's input already in its
memory), `--rounds` times, and the median of B's round medians over A's, round by round, so that a slow
phase of a shared machine lands on both. The outputs of the two builds are compared first (the same
integers, or the script stops). Writes JSON with `--out`.

`--pools A.so` compares thread pools instead of builds: A is the library on TVM's pool, B the same
library on intforge's (python/intforge/pool.py). Both pools live in the process, and an idle worker
spins before it sleeps (intforge's 5 ms, TVM's about 0.3 s, pinned to the same cores), so with `--pools`
each round starts `--gap` seconds after the one before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="model.so of build A (the baseline)")
    p.add_argument("b", type=Path, nargs="?", help="model.so of build B")
    p.add_argument("--pools", action="store_true", help="A on TVM's thread pool, B the same on intforge's")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=10, help="timed calls a round")
    p.add_argument("--gap", type=float, default=None,
                   help="seconds between rounds (default 0, and 0.5 with --pools: the other pool's workers asleep)")
    p.add_argument("--out", type=Path, help="JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from intforge.runtime import load, random_inputs
    from intforge.threads import pool_threads

    args = parse_args(argv)
    if args.pools:
        args.b = args.a
        with _on_pool("tvm"):
            first = load(args.a)
        libs = [first, load(args.a)]
    elif args.b is None:
        raise SystemExit("give two libraries, or one with --pools")
    else:
        libs = [load(args.a), load(args.b)]
    for seed in range(2):
        x = random_inputs(libs[0].inputs, seed=seed)
        if not np.array_equal(libs[0](*x), libs[1](*x)):
            print(f"{args.a} and {args.b} give different outputs: not two builds of one model's integers")
            return 1
    rounds: list[list[float]] = [[], []]
    gap = args.gap if args.gap is not None else (0.5 if args.pools else 0.0)
    for _ in range(args.rounds):
        for k, lib in enumerate(libs):
            time.sleep(gap)
            rounds[k].append(lib.time(repeat=args.calls, warmup=2, resident=True)["median_ms"])
    a, b = np.array(rounds[0]), np.array(rounds[1])
    result = {**result_header("ab_calls", pool_threads()), "a": str(args.a), "b": str(args.b),
              "compared": "thread pools: A TVM's, B intforge's" if args.pools else "builds",
              "a_ms": float(np.median(a)), "b_ms": float(np.median(b)),
              "b_over_a_round_by_round": float(np.median(b / a)),
              "rounds_ms": {"a": a.tolist(), "b": b.tolist()}}
    print(f"A {result['a_ms']:.3f} ms, B {result['b_ms']:.3f} ms, B/A {result['b_over_a_round_by_round']:.3f} "
          f"round by round ({args.rounds} rounds of {args.calls} calls)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


@contextmanager
def _on_pool(name: str) -> Iterator[None]:
    """Libraries loaded in the body run on that pool (INTFORGE_POOL, read at each load)."""
    before = os.environ.get("INTFORGE_POOL")
    os.environ["INTFORGE_POOL"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["INTFORGE_POOL"]
        else:
            os.environ["INTFORGE_POOL"] = before


if __name__ == "__main__":
    raise SystemExit(main())
