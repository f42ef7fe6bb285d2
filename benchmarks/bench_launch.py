"""What one parallel kernel launch costs on TVM's thread pool and on intforge's: the fixed price every
layer pays.

Each of a model's parallel loops is one `TVMBackendParallelLaunch`: the calling thread hands a task to
each worker, runs task 0 itself and waits for the others. TVM's pool (src/runtime/thread_pool.cc) waits
on both sides with `sched_yield`, so a launch costs about two system calls however little it does;
intforge's (python/intforge/pool.c) spins on `pause`. This script builds functions of `--stages` trivial
parallel loops (2 x 16 int32 adds each, nothing to compute) into libraries, and times them against the
same loops serial, so the difference over the stages is the cost of one launch: on TVM's pool with
intforge's settings (`import intforge`: TVM_NUM_THREADS set, the workers pinned), and on intforge's.

`--tvm-default` also runs the measurement in a child process without intforge's settings (no
TVM_NUM_THREADS or OMP_NUM_THREADS): TVM then calls `std::thread::hardware_concurrency()` on every launch,
which reads /sys/devices/system/cpu/online, and halves it on x86 (so one thread on 2 vCPUs).

On the Zen 3 VM of 2026-12-05: TVM's pool 1.25-1.34 us a launch on 2 threads (a C ping-pong of two
threads with `sched_yield`: 1.2 us a round trip, with `pause`: 0.26), against about 73 launches in a
MobileNetV2 call (one per parallel loop of its 56 kernel calls): about 3% of the call. TVM's default:
8.3 us a launch. That night, in one run: TVM's pool 1.28 us, intforge's 0.28, TVM's defaults 9.6
(`results/launch_cost_zen3.json`). Writes JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=21, help="parallel loops in the longer function")
    p.add_argument("--number", type=int, default=2000, help="calls a timing")
    p.add_argument("--repeat", type=int, default=7, help="timings (the median is kept)")
    p.add_argument("--tvm-default", action="store_true", help="also time TVM's pool without intforge's settings")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="JSON")
    return p.parse_args(argv)


def _function(stages: int, parallel: bool, workdir: Path, own_pool: bool):
    """A function of `stages` loops over [2, 16] int32, each adding 1 to the previous one's output, built
    into a .so and loaded, its parallel loops on intforge's pool (`own_pool`) or TVM's."""
    import tvm
    from tvm import s_tir, te

    src = te.placeholder((2, 16), "int32", name="src")
    out = src
    for k in range(stages):
        out = (lambda prev, k=k: te.compute((2, 16), lambda i, j: prev[i, j] + 1, name=f"stage{k}"))(out)
    sch = s_tir.Schedule(te.create_prim_func([src, out]))
    if parallel:
        for k in range(stages):
            sch.parallel(sch.get_loops(sch.get_sblock(f"stage{k}"))[0])
    so = workdir / f"f{stages}_{int(parallel)}_{int(own_pool)}.so"
    tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"})).export_library(str(so))
    mod = tvm.runtime.load_module(str(so))
    if own_pool and parallel and not _install(so):
        raise SystemExit("intforge's pool could not be installed (INTFORGE_POOL=tvm, or no C compiler)")
    return mod


def _install(so: Path) -> bool:
    from intforge import pool  # (not at the top: the --tvm-default child must not import intforge)

    return pool.install(so)


def measure(stages: int, number: int, repeat: int, own_pool: bool = False) -> dict[str, Any]:
    """Median microseconds a call of 1 and of `stages` loops, parallel and serial, and a launch's cost."""
    import tempfile

    import tvm

    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.zeros((2, 16), "int32"), dev)
    b = tvm.runtime.tensor(np.zeros((2, 16), "int32"), dev)
    us: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in (False, True):
            for n in (1, stages):
                mod = _function(n, parallel, Path(tmp), own_pool)
                timer = mod.time_evaluator("main", dev, number=number, repeat=repeat)
                us[f"{'parallel' if parallel else 'serial'}_{n}"] = float(np.median(timer(a, b).results) * 1e6)
    launch = ((us[f"parallel_{stages}"] - us[f"serial_{stages}"]) - (us["parallel_1"] - us["serial_1"])) / (stages - 1)
    return {"call_us": {k: round(v, 3) for k, v in us.items()}, "launch_us": round(launch, 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # TVM's own defaults: no intforge import
        print(json.dumps(measure(args.stages, args.number, args.repeat)))
        return 0
    import intforge  # noqa: F401 - sets TVM_NUM_THREADS before TVM's pool starts
    from intforge.threads import pin_workers, pool_threads

    threads = pool_threads()
    pinned = sorted(pin_workers())
    result = {**result_header("launch_cost", threads), "pinned_worker_cpus": pinned,
              "tvm_pool": measure(args.stages, args.number, args.repeat),
              "intforge_pool": measure(args.stages, args.number, args.repeat, own_pool=True)}
    for key, name in (("tvm_pool", "TVM's pool, intforge's settings"), ("intforge_pool", "intforge's pool")):
        print(f"{name}, {threads} threads: {result[key]['launch_us']} us a launch ({result[key]['call_us']})")
    if args.tvm_default:
        env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
        child = subprocess.run([sys.executable, __file__, "--child", "--stages", str(args.stages), "--number",
                                str(args.number), "--repeat", str(args.repeat)],
                               env=env, capture_output=True, text=True, check=True)
        result["tvm_default_pool"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"TVM's defaults: {result['tvm_default_pool']['launch_us']} us a launch")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
