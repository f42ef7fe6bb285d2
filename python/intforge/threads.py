"""TVM's thread pool as intforge sets it up: one unpinned worker per physical core this process may use.

How many: TVM's own default is `std::thread::hardware_concurrency() / 2` on x86 ("ignore hyper-threading"), which
assumes two hardware threads per core and ignores the process's CPU affinity. On a machine without SMT,
such as a cloud VM whose vCPUs are whole cores, that is half the cores: on 2 cores TVM ran one thread and
MobileNetV2 took 4.2 ms instead of 2.0. Under `taskset` or a cgroup cpuset it is the opposite, more threads
than the process may run on. We count the cores from the CPU topology instead (TVM has no such count).

Pinned or not: TVM pins each worker to a core and leaves the calling thread free. When the scheduler put
the caller on a worker's core, the two shared it until the kernel's load balancer moved one: after each
library load we measured 15-50 ms at half speed on 2 cores (a layer timed alone came out 2x slow, which
skewed latency budgets). Unpinned threads never showed it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(cpus: Iterable[int] | None = None, sys_cpu: Path = _SYS_CPU) -> int | None:
    """The number of physical cores among `cpus` (default: the CPUs this process may run on), from the
    kernel's topology: hardware threads that list the same siblings share one core. None where the
    topology cannot be read (not Linux, or hidden from a container)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(cores) or None


def default_threads() -> int | None:
    """The thread count intforge gives TVM's pool when the user set none: the physical cores this process
    may run on, or the CPUs it may run on where the topology is hidden. None off Linux (TVM's default)."""
    cores = physical_cores()
    if cores is None and hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    return cores


def configure_thread_pool() -> None:
    """intforge's defaults for TVM's pool, each unless the user set its variable: TVM_BIND_THREADS=0, and
    TVM_NUM_THREADS=`default_threads()` (unless OMP_NUM_THREADS, which TVM also reads, is set). TVM reads
    them when its pool starts, on the first parallel kernel, so this runs at `import intforge`."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    if "TVM_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    n = default_threads()
    if n:
        os.environ["TVM_NUM_THREADS"] = str(n)


def pool_threads() -> int:
    """The number of threads TVM's pool in this process runs (it starts the pool if it has not)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
