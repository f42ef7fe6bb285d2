"""One kernel of a built model, timed alone on the arguments the model gives it: hot, with every operand
evicted from the caches, and evicted but for one operand. What a kernel loses inside the model, and to
which operand's memory.

`profile_in_model.py` times each kernel inside the running model. This script catches the kernels named
on the command line in one model call (TVM's VM instrument callback hands over the kernel's packed
function and its arguments), copies the arguments, and calls the kernel alone, `--runs` times a case:
    hot           back to back: everything in cache from the call before
    cold          a 64 MB buffer touched before each call: every operand from memory
    cold+<arg>    the same, then one operand read (a load a cache line) before the call: what that
                  operand's misses cost (inputs: their reads; the output: its lines' write-allocate)
Inside ResNet50 on the Zen 4 (2026-12-06) the 56x56 residual-add conv took 0.19 ms against 0.14 hot;
alone, cold 0.203, cold but its output 0.160, cold but its residual 0.185: the output's write-allocate.

Usage: python benchmarks/kernel_alone.py model.so KERNEL[,KERNEL...] [--runs 60]
(kernel names as `profile_in_model.py` prints them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_in_model  # noqa: E402

EVICT_BYTES = 64 << 20  # past any L3 of the machines here


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("library", type=Path)
    p.add_argument("kernels", help="kernel names, comma-separated")
    p.add_argument("--runs", type=int, default=60)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import tvm

    from intforge import pool
    from intforge.threads import off_worker_cores

    want = args.kernels.split(",")
    _, inputs = profile_in_model._model_input(args.library)
    vm, _ = profile_in_model._instrumented(args.library, inputs, {})
    caught: dict[str, tuple[Any, list[Any]]] = {}

    def catch(func, symbol, before, _ret, *call_args) -> int:
        if before and symbol in want and symbol not in caught:
            caught[symbol] = (func, [tvm.runtime.tensor(a.numpy(), tvm.cpu()) if hasattr(a, "shape") else a
                                     for a in call_args])
        return 0

    vm.set_instrument(catch)
    junk = np.ones(EVICT_BYTES, np.uint8)
    with off_worker_cores(own_pool=pool.active()):
        vm["main"](*inputs)
        missing = sorted(set(want) - set(caught))
        if missing:
            raise SystemExit(f"no kernel named {missing} ran in {args.library}; profile_in_model.py lists them")
        for name, (func, call_args) in caught.items():
            tensors = [a for a in call_args if hasattr(a, "shape")]
            views = [np.from_dlpack(t).view(np.uint8).reshape(-1) for t in tensors]
            cases: dict[str, list[int] | None] = {"hot": None, "cold": []}
            for k, t in enumerate(tensors):
                label = "output" if k == len(tensors) - 1 else f"arg{k}"
                cases[f"cold+{label} {tuple(int(d) for d in t.shape)}"] = [k]
            for _ in range(10):
                func(*call_args)
            print(name)
            for case, warm in cases.items():
                ts = []
                for _ in range(args.runs):
                    if warm is not None:
                        junk[::64] += 1
                        for k in warm:
                            int(views[k][::64].sum())  # a load a cache line
                    t0 = time.perf_counter()
                    func(*call_args)
                    ts.append(time.perf_counter() - t0)
                print(f"  {case:44s} {np.median(ts) * 1e3:8.4f} ms")


if __name__ == "__main__":
    main()
