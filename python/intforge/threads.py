"""The thread pool as intforge sets it up: one worker per physical core this process may use, each
pinned to its own core, and the calling thread kept off those cores while a model runs. The pool is
intforge's own (pool.py: TVM's calling convention, waits spinning on `pause` instead of `sched_yield`)
where it can be, else TVM's; the placement below is the same for both.

How many: TVM's own default is `std::thread::hardware_concurrency() / 2` on x86 ("ignore hyper-threading"), which
assumes two hardware threads per core and ignores the process's CPU affinity. On a machine without SMT,
such as a cloud VM whose vCPUs are whole cores, that is half the cores: on 2 cores TVM ran one thread and
MobileNetV2 took 4.2 ms instead of 2.0. Under `taskset` or a cgroup cpuset it is the opposite, more threads
than the process may run on. We count the cores from the CPU topology instead (TVM has no such count).

Where: a kernel's tasks are split evenly and statically, so the calling thread (which runs task 0) and
the workers must each have a core of their own. TVM pins each worker to a core and leaves the caller
free, and the scheduler put the caller on a worker's core: the two shared it, at half speed, until the
load balancer moved one (15-50 ms after each library load on 2 cores). Unpinned workers share the same
fate, for longer: a worker that spins between kernels is always "cache hot", so the balancer leaves it
where it is. MobileNetV2 with ONNX Runtime in the same process ran 2x slow (1.35-1.45 ms against
0.66-0.8) for seconds at a time, caller and worker on one vCPU, the other idle. So intforge pins the
workers itself, one per physical core after the first (`pin_workers`), and a call that finds its thread
on a worker's core moves it off for the call (`off_worker_cores`). TVM has no such placement: it only
pins workers, and sets the caller free on all cores.

When something else runs on a pinned worker's core: that worker can go nowhere else, and every kernel
waits for its half until the scheduler gives it a turn. With a busy process on the second of 2 cores,
ResNet18 took 94-108 ms a call instead of 1.65 (2026-12-05; unpinned 3.1 ms, ORT INT8 8.2-8.6), and
the worker had 1-2% of the call's time on its core. So calls long enough to tell (`MEASURE_AFTER_S`)
also read the workers' CPU time, one in `CHECK_EVERY` and every one after a slow call (`SLOW_CALL`)
(intforge's pool: each worker's own clock; TVM's: the process's clock less the caller's share, which
keeps up with workers that yield but lags by up to a scheduler tick behind ones that spin without
system calls): a call whose workers ran for less than
`MIN_WORKER_SHARE` of it (CPU time over workers x wall time; 1.0 on a quiet machine, 0.63 the lowest of
400 quiet calls on TVM's pool), `TAKEN_CALLS` times in a row (the first call after an idle
while finds the workers asleep, and may read low alone), sets them free on every allowed core, and they
are pinned again after `FREE_HOLD_S`, doubling while the next try finds them taken again.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")
# What the user set TVM_BIND_THREADS to before `configure_thread_pool` (None: left to intforge)
_USER_BIND: str | None = os.environ.get("TVM_BIND_THREADS")
# TVM's pool is per calling thread (a thread_local in its runtime): so is what `pin_workers` did to it
_PINNED = threading.local()
# TVM's AffinityModes (threading_backend.h): one listed CPU per thread (kSpecifyOneCorePerThread), or every
# thread on all the listed CPUs (kSpecifyThreadShareAllCore)
_ONE_CORE_PER_THREAD = -2
_SHARE_ALL_CORES = -3
_TVM_POOL_USED = False  # a model in this process runs on TVM's pool (`note_tvm_pool`)
MIN_WORKER_SHARE = 0.5  # a pinned call whose workers ran less of it than this shared their cores
MEASURE_AFTER_S = 200e-6  # a call is checked when the model's previous one took this long (two CPU-clock
# reads, about 1 us: 5% of the MNIST demo's call, which is not checked while it stays that short)
TAKEN_CALLS = 2  # checked calls in a row below MIN_WORKER_SHARE that set the workers free
# Of the calls long enough to tell, one in CHECK_EVERY is checked, and every one after a call that took
# SLOW_CALL times the model's fastest (a taken core slows a call 2x or far more) or after a strike. Each
# check costs more than its microsecond: the model's call has just evicted the interpreter's own data from
# the caches, and on the Zen 4 (2026-12-06) reading the workers' clocks after a ResNet50 call took 15-90 us
# (with the list of their clocks fetched from the pool each time), 1-1.5% of the call.
CHECK_EVERY = 16
SLOW_CALL = 1.5
FASTEST_DRIFT = 1.02  # the fastest call a model is measured against rises 2% a call: a slower phase of the
# machine stops setting off checks after some 20 calls (a taken core is found within the first two)
RESTED_S = 1e-3  # a call this long after the model's last one reads the CPU its thread is on (it may have slept)
FREE_HOLD_S = (1.0, 64.0)  # the workers stay free this long before pinning is tried again; doubles up to
# the second value each time the try finds them taken again


def physical_cores(cpus: Iterable[int] | None = None, sys_cpu: Path = _SYS_CPU) -> int | None:
    """The number of physical cores among `cpus` (default: the CPUs this process may run on), from the
    kernel's topology: hardware threads that list the same siblings share one core. None where the
    topology cannot be read (not Linux, or hidden from a container)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    cores = core_cpus(cpus, sys_cpu)
    return len(cores) if cores else None


def _siblings(cpu: int, sys_cpu: Path) -> frozenset[int] | None:
    """The hardware threads of `cpu`'s core ("0,2" or "0-1" in sysfs), None where hidden."""
    try:
        text = (sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
    except OSError:
        return None
    ids: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(ids)


def core_cpus(cpus: Iterable[int], sys_cpu: Path = _SYS_CPU) -> list[frozenset[int]] | None:
    """`cpus` grouped by physical core (each group: the given CPUs of one core), in the order of each
    core's lowest CPU; None where the topology cannot be read."""
    cores: dict[frozenset[int], set[int]] = {}
    for cpu in sorted(cpus):
        sib = _siblings(cpu, sys_cpu)
        if sib is None:
            return None
        cores.setdefault(sib, set()).add(cpu)
    return [frozenset(group) for group in cores.values()]


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


def configured_threads() -> int:
    """The thread count the pools are set to: TVM_NUM_THREADS, else OMP_NUM_THREADS (TVM reads both; one
    of them is set by `configure_thread_pool` unless off Linux), else `default_threads()`; at most one per
    CPU this process may run on, with a warning where more were asked for. A parallel loop waits for its
    last task, and threads past the CPUs take turns on them (on 2 CPUs, MobileNetV2 took 12-14 ms a call
    on 3 or 4 threads of intforge's pool, 3.0 on 2); TVM's pool caps its own count alike."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.strip().isdigit() and int(value) > 0:
            n = int(value)
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            if cpus and n > cpus:
                warnings.warn(f"{n} threads asked for (TVM_NUM_THREADS or OMP_NUM_THREADS) and this process may "
                              f"run on {cpus} CPU{'s' if cpus > 1 else ''}: intforge's pool runs {cpus} (more would "
                              "take turns on them, several times slower)", RuntimeWarning, stacklevel=2)
                return cpus
            return n
    return default_threads() or 1


def pool_threads() -> int:
    """The number of threads the models of this process run on: intforge's pool's (pool.py), or TVM's
    where that one is not used (this starts TVM's pool if it has not)."""
    import tvm

    from . import pool

    if pool.active():
        return pool.threads()
    return int(tvm.get_global_func("runtime.NumThreads")())


def note_tvm_pool() -> None:
    """A model of this process runs on TVM's pool (pool.py could not take it): place TVM's workers too.
    (Otherwise they are left alone: configuring TVM's pool restarts its workers, which then spin for
    about 0.3 s with nothing to do, on the cores intforge's workers run on.)"""
    global _TVM_POOL_USED
    _TVM_POOL_USED = True


def pin_workers() -> frozenset[int]:
    """Pin the pool's workers (intforge's, and the calling thread's TVM pool where a model runs on it),
    one to each physical core after the first of those this thread may run on, and return the CPUs of
    those cores (empty where nothing was pinned: one thread, more threads than cores, topology hidden,
    or TVM_BIND_THREADS set by the user, whose choice stands).
    Done once per calling thread; TVM also confines the caller to the listed CPUs, which is undone here.
    (The workers may since have been set free for a while: `workers_free`.)"""
    done = getattr(_PINNED, "cores", None)
    if done is not None:
        return done
    busy: frozenset[int] = frozenset()
    if _USER_BIND is None and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        cores = core_cpus(allowed)
        n = pool_threads()
        if cores and 2 <= n <= len(cores):
            cpus = [min(group) for group in cores[:n]]  # the caller's core first, then one a worker
            if _configure_pool(_ONE_CORE_PER_THREAD, n, cpus, allowed):
                busy = frozenset().union(*cores[1:n])
                _PINNED.pool = (n, cpus, sorted(allowed))
    _PINNED.cores = busy
    _PINNED.free_until = None  # pinned (else the monotonic time until which the workers run free)
    _PINNED.hold = FREE_HOLD_S[0]
    _PINNED.strikes = 0  # checked calls in a row whose workers ran less than MIN_WORKER_SHARE of them
    _PINNED.calls = 0  # calls placed (a check every CHECK_EVERY of them)
    _PINNED.clocks = None  # the pool's workers' CPU clocks (`_pool_clocks`)
    return busy


def _configure_pool(mode: int, n: int, cpus: list[int], allowed: set[int]) -> bool:
    """Set the affinity of intforge's pool's workers (pool.py), and of the calling thread's TVM pool
    workers where a model runs on TVM's pool (`config_threadpool`, which only reads TVM_BIND_THREADS
    while it runs, and also confines the caller, undone here); whether it took."""
    import tvm

    from . import pool

    if pool.active():
        pool.place(cpus, one_each=mode == _ONE_CORE_PER_THREAD)
        if not _TVM_POOL_USED:
            return True
    os.environ["TVM_BIND_THREADS"] = "1"
    try:
        tvm.get_global_func("runtime.config_threadpool")(mode, n, [str(c) for c in cpus])
        return True
    except Exception:  # noqa: BLE001 - placement only speeds calls up: unpinned, they still run right
        return False
    finally:
        os.environ["TVM_BIND_THREADS"] = "0"
        os.sched_setaffinity(0, allowed)


def workers_free() -> bool:
    """Whether the calling thread's pinned workers are free of their cores now (`off_worker_cores`)."""
    return getattr(_PINNED, "free_until", None) is not None


def _set_free(free: bool) -> None:
    """Pin the workers to their cores again, or let each run on every allowed core."""
    n, cpus, allowed = _PINNED.pool
    _PINNED.strikes = 0
    if free:
        _configure_pool(_SHARE_ALL_CORES, n, allowed, set(allowed))
        _PINNED.free_until = time.monotonic() + _PINNED.hold
        _PINNED.hold = min(2 * _PINNED.hold, FREE_HOLD_S[1])
    else:
        _configure_pool(_ONE_CORE_PER_THREAD, n, cpus, set(allowed))
        _PINNED.free_until = None


def _pool_clocks() -> list[int]:
    """The CPU clocks of intforge's pool's workers, fetched from the pool once (its workers stay the same
    threads; `Placement.exit` has them fetched again where one cannot be read)."""
    clocks = _PINNED.clocks
    if not clocks:
        from . import pool

        clocks = _PINNED.clocks = pool.worker_clocks()
    return clocks


def _workers_time(clocks: list[int]) -> float:
    """CPU seconds of the threads whose clocks are given (intforge's pool's workers: their own clocks
    are exact while they spin, the process's lags them by up to a scheduler tick), else the process's
    (TVM's workers yield, a system call each time round, so its clock keeps up with them)."""
    if not clocks:
        return time.process_time()
    try:
        return sum(time.clock_gettime(c) for c in clocks)
    except OSError:  # a worker gone (in a forked child): no measure, no verdict (comparisons with nan fail)
        return float("nan")


@functools.cache
def _sched_getcpu():
    fn = ctypes.CDLL(None).sched_getcpu
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


def _current_cpu() -> int:
    """The CPU this thread runs on now (glibc's sched_getcpu: a fraction of a microsecond)."""
    return int(_sched_getcpu()())


class Placement:
    """One model's calls kept off the pinned workers' cores (`enter` before a call, `exit` after it, or
    `off_worker_cores` around it): this thread moved off a worker's core for the call where it is on one
    now, its CPU affinity as before afterwards. A thread already elsewhere is left alone: while a call
    runs it never sleeps, so the scheduler has no reason to move it onto a busy core. A call that finds
    the pinned workers sharing their cores with something else sets them free for a while (the module's
    docstring); one after that while pins them again. `own_pool`: the calls' parallel loops run on
    intforge's pool (pool.py), whose workers' time is read from their own clocks.

    Plain methods, not a generator: right after a model's call the interpreter's own data is out of the
    caches, and each object a call's wrapper touches costs microseconds (a context manager's generator
    20 us, a WeakKeyDictionary lookup 12, a ctypes call 17, after a ResNet50 call on the Zen 4). So the
    CPU the thread is on is read only where the thread may have moved since the model's last call
    (`RESTED_S` between them, or a check due)."""

    __slots__ = ("own_pool", "last", "fastest", "ended", "__weakref__")

    def __init__(self, own_pool: bool = False) -> None:
        self.own_pool = own_pool
        self.last = 0.0  # the previous call's wall time (s)
        self.fastest = float("inf")  # the fastest call's, drifting up (FASTEST_DRIFT)
        self.ended = float("-inf")  # when the previous call ended (perf_counter)

    def enter(self) -> tuple | None:
        """Before a call: returns what `exit` takes after it."""
        busy = pin_workers()
        if not busy:
            return None
        free_until = _PINNED.free_until
        if free_until is not None:
            if time.monotonic() < free_until:
                return None  # free: nothing to move, nothing to check
            _set_free(False)
        _PINNED.calls += 1
        due = bool(_PINNED.strikes or self.last > SLOW_CALL * self.fastest or _PINNED.calls % CHECK_EVERY == 0)
        check = due and self.last >= MEASURE_AFTER_S
        before = None  # this thread's affinity, where the call moves it off a worker's core
        if (due or time.perf_counter() - self.ended > RESTED_S) and _current_cpu() in busy:
            allowed = os.sched_getaffinity(0)
            if allowed - busy:
                before = allowed
                os.sched_setaffinity(0, allowed - busy)
        clocks = _pool_clocks() if check and self.own_pool else []
        cpu0 = _workers_time(clocks) if check else 0.0
        return before, check, clocks, cpu0, time.perf_counter()

    def exit(self, entered: tuple | None) -> None:
        """After the call `enter` returned `entered` for."""
        if entered is None:
            return
        before, check, clocks, cpu0, t0 = entered
        self.ended = time.perf_counter()
        wall = self.ended - t0
        if before is not None:
            os.sched_setaffinity(0, before)
        self.last, self.fastest = wall, min(wall, self.fastest * FASTEST_DRIFT)
        if not check:
            return
        # the workers' CPU time in the call; the process's clock also counts the caller's (about wall)
        cpu = _workers_time(clocks) - cpu0 + (0.0 if clocks else -wall)
        if cpu != cpu:  # (nan: a worker's clock could not be read) fetch the workers' clocks afresh next time
            _PINNED.clocks = None
        workers = _PINNED.pool[0] - 1
        if cpu < MIN_WORKER_SHARE * workers * wall:
            _PINNED.strikes += 1  # (one alone may be a worker waking from sleep after an idle while)
            if _PINNED.strikes >= TAKEN_CALLS:
                _set_free(True)  # a worker's core was taken: free them for a while
        else:
            _PINNED.strikes = 0
            _PINNED.hold = FREE_HOLD_S[0]  # pinned and unhindered: the next taken core starts the wait over


_PLACEMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def placed(placement: Placement | None) -> Iterator[None]:
    """`placement` entered around the body (None: nothing to place, a GPU model's call)."""
    entered = placement.enter() if placement is not None else None
    try:
        yield
    finally:
        if placement is not None:
            placement.exit(entered)


def off_worker_cores(key: object = _PINNED, own_pool: bool = False) -> contextlib.AbstractContextManager:
    """`Placement` around the body (a call of model `key`), one Placement a key."""
    placement = _PLACEMENTS.get(key)
    if placement is None:
        placement = _PLACEMENTS[key] = Placement(own_pool)
    return placed(placement)
