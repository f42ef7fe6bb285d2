"""intforge's thread pool (pool.c) in place of TVM's for the parallel loops of the models it loads.

Every parallel loop of a model.so is a call through the library's `__TVMBackendParallelLaunch` pointer,
which TVM's loader points at its own pool; TVM's pool waits with `sched_yield` on both sides, 1.25-1.45 us
a launch on the Zen 3 of 2026-12-05, and this one on `pause`, 0.3 us (`benchmarks/bench_launch.py`).
`install` points a loaded library's pointer at this pool instead: MobileNetV2, 73 launches a call, ran
0.981-0.992x the time, ResNet18 0.991-0.998x (`benchmarks/ab_calls.py --pools`). The library file is
not changed: loaded by TVM alone (a C++ host), it runs on TVM's pool as before.

The pool's C source is compiled once per source and machine with the system C compiler (`CC`, else `cc`)
into intforge's cache. Without a compiler, or with INTFORGE_POOL=tvm, models run on TVM's pool, as they
do where the library has a parallel barrier this pool does not provide. Its size and placement follow
threads.py: the thread count TVM's would have (`configured_threads`) and the same pinning (`place`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("pool.c")
_LAUNCH = "__TVMBackendParallelLaunch"
_BARRIER = "__TVMBackendParallelBarrier"  # not provided: a library that has one keeps TVM's pool
_RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)


def enabled() -> bool:
    """Whether models load onto intforge's pool: Linux (futexes), unless INTFORGE_POOL=tvm, or the user
    asked TVM to pin its own workers (TVM_BIND_THREADS=1 before `import intforge`)."""
    from .threads import _USER_BIND

    return (os.environ.get("INTFORGE_POOL", "intforge") != "tvm" and platform.system() == "Linux"
            and _USER_BIND != "1")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "intforge" / "pool"


def c_compiler() -> str | None:
    """The C compiler the pool is built with: `CC`, else `cc`, else `gcc`; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(out_dir: Path | None = None) -> Path:
    """Compile pool.c into a shared library (once: the file is named by the source's hash and the machine)
    and return its path. Raises RuntimeError with the compiler's message where it cannot."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    out_dir = out_dir or _cache_dir()
    target = out_dir / f"libintforge_pool-{key}.so"
    if target.exists():
        return target
    cc = c_compiler()
    if not cc:
        raise RuntimeError("no C compiler (set CC, or install cc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(_SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same source writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _pool() -> ctypes.CDLL | None:
    """The compiled pool, sized to TVM's pool; None (with one warning) where it cannot be built."""
    from .threads import configured_threads

    try:
        lib = ctypes.CDLL(str(build_library()))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"intforge's thread pool could not be built ({exc}); models run on TVM's pool, about "
                      f"1 us slower a parallel loop", RuntimeWarning, stacklevel=3)
        return None
    lib.intforge_pool_set_threads.argtypes = [ctypes.c_int]
    lib.intforge_pool_place.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
    lib.intforge_pool_set_threads(configured_threads())
    return lib


def _active_pool() -> ctypes.CDLL | None:
    return _pool() if enabled() else None


def active() -> bool:
    """Whether intforge's pool is in use in this process (enabled and built)."""
    return _active_pool() is not None


def threads() -> int:
    """The threads a launch on intforge's pool uses, the caller included (1 where the pool is not used)."""
    lib = _active_pool()
    return int(lib.intforge_pool_threads()) if lib is not None else 1


def place(cpus: list[int], one_each: bool) -> None:
    """Where the pool's workers run: worker i on cpus[i] alone (cpus[0] is the caller's core), or every
    worker on all of `cpus`. threads.py calls this where it places TVM's workers."""
    lib = _active_pool()
    if lib is not None:
        arr = (ctypes.c_int * len(cpus))(*cpus)
        lib.intforge_pool_place(arr, len(cpus), int(one_each))


def worker_clocks() -> list[int]:
    """The CPU-time clocks (for `time.clock_gettime`) of the pool's running workers; empty before its
    first launch. A process's CPU clock adds a thread's time only when it enters the kernel or at a
    scheduler tick, so for workers that spin without system calls it lags by up to a tick; a thread's
    own clock is exact (threads.py measures what share of a call they ran with these)."""
    lib = _active_pool()
    if lib is None:
        return []
    tids = (ctypes.c_int * 256)()
    n = lib.intforge_pool_worker_tids(tids, 256)
    return [((~tid) << 3) | 6 for tid in tids[:n]]  # Linux's CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED of a tid


def install(loaded_path: str | Path) -> bool:
    """Point the parallel launches of the library loaded (by TVM) from `loaded_path` at intforge's pool;
    whether it did. Left on TVM's pool: disabled, not built, one thread, no parallel loop, or a library
    that uses TVM's parallel barrier."""
    pool = _active_pool()
    if pool is None or threads() < 2:
        return False
    try:
        lib = ctypes.CDLL(str(loaded_path), mode=_RTLD_NOLOAD)
    except OSError:
        return False  # not loaded by that name (or not by dlopen): nothing to point
    try:
        if _has(lib, _BARRIER):
            return False
        if not _has(lib, _LAUNCH):
            return False
        slot = ctypes.c_void_p.in_dll(lib, _LAUNCH)
        slot.value = ctypes.cast(pool.intforge_parallel_launch, ctypes.c_void_p).value
        return True
    finally:
        _dlclose(lib)  # the NOLOAD open took a reference: give it back, TVM's module owns the library


def _has(lib: ctypes.CDLL, symbol: str) -> bool:
    try:
        ctypes.c_void_p.in_dll(lib, symbol)
        return True
    except ValueError:
        return False


def _dlclose(lib: ctypes.CDLL) -> None:
    close = ctypes.CDLL(None).dlclose
    close.argtypes = [ctypes.c_void_p]
    close(lib._handle)
