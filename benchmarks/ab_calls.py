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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="model.so of build A (the baseline)")
    p.add_argument("b", type=Path, help="model.so of build B")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=10, help="timed calls a round")
    p.add_argument("--out", type=Path, help="JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from intforge.runtime import load, random_inputs
    from intforge.threads import pool_threads

    args = parse_args(argv)
    libs = [load(args.a), load(args.b)]
    for seed in range(2):
        x = random_inputs(libs[0].inputs, seed=seed)
        if not np.array_equal(libs[0](*x), libs[1](*x)):
            print(f"{args.a} and {args.b} give different outputs: not two builds of one model's integers")
            return 1
    rounds: list[list[float]] = [[], []]
    for _ in range(args.rounds):
        for k, lib in enumerate(libs):
            rounds[k].append(lib.time(repeat=args.calls, warmup=2, resident=True)["median_ms"])
    a, b = np.array(rounds[0]), np.array(rounds[1])
    result = {**result_header("ab_calls", pool_threads()), "a": str(args.a), "b": str(args.b),
              "a_ms": float(np.median(a)), "b_ms": float(np.median(b)),
              "b_over_a_round_by_round": float(np.median(b / a)),
              "rounds_ms": {"a": a.tolist(), "b": b.tolist()}}
    print(f"A {result['a_ms']:.3f} ms, B {result['b_ms']:.3f} ms, B/A {result['b_over_a_round_by_round']:.3f} "
          f"round by round ({args.rounds} rounds of {args.calls} calls)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
