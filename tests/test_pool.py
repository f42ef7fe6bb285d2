"""intforge's thread pool (python/intforge/pool.c): TVM's launch contract kept (every task once, the
task count each task sees, failures reported), the models that run on it give the integers they give on
TVM's pool, and its workers survive a fork and sleep when idle."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import extreme_int_inputs, quantize_module, run_fresh_python
from intforge import pool
from intforge.compiler import build

pytestmark = [pytest.mark.skipif(not pool.enabled(), reason="intforge's pool is Linux only"),
              pytest.mark.skipif(pool.c_compiler() is None,
                                 reason="no C compiler to build intforge's pool (models then run on TVM's)")]

# A private copy of the pool (its own globals) with 3 threads, driven through ctypes: which thread ran
# which task, what each saw as the task count, what launches return. Runs in a fresh process, so no
# other pool's workers spin while it measures the idle workers' CPU time.
LAUNCH = r"""
import ctypes, json, sys, threading, time
lib = ctypes.CDLL(sys.argv[1])

class Env(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]

LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)
lib.intforge_parallel_launch.argtypes = [LAMBDA, ctypes.c_void_p, ctypes.c_int]
lib.intforge_pool_set_threads(3)
seen = []
lock = threading.Lock()

def record(task, env, _):
    with lock:
        seen.append((task, env.contents.num_task, threading.get_ident()))
    return 0

def fail_two(task, env, _):
    return 1 if task == 2 else 0

inner = []
def nested(task, env, _):
    rc = lib.intforge_parallel_launch(LAMBDA(lambda t, e, c: inner.append((task, t)) or 0), None, 2)
    return rc

out = {}
for name, fn, n in (("default", record, 0), ("seven", record, 7), ("one", record, 1)):
    seen.clear()
    out[name] = {"rc": lib.intforge_parallel_launch(LAMBDA(fn), None, n),
                 "tasks": sorted(t for t, _, _ in seen), "counts": sorted({c for _, c, _ in seen}),
                 "threads": len({i for _, _, i in seen})}
out["failed"] = lib.intforge_parallel_launch(LAMBDA(fail_two), None, 0)
seen.clear()
out["after_failure"] = [lib.intforge_parallel_launch(LAMBDA(record), None, 0), len(seen)]
out["nested_rc"] = lib.intforge_parallel_launch(LAMBDA(nested), None, 0)
out["nested"] = sorted(inner)
out["threads"] = lib.intforge_pool_threads()
time.sleep(0.1)  # past the workers' spin: asleep on the futex
cpu0, t0 = time.process_time(), time.perf_counter()
time.sleep(0.3)
out["idle_cpu_share"] = (time.process_time() - cpu0) / (time.perf_counter() - t0)
seen.clear()
out["woken"] = [lib.intforge_parallel_launch(LAMBDA(record), None, 0), sorted(t for t, _, _ in seen)]
print(json.dumps(out))
"""


def test_a_launch_runs_every_task_once_and_reports_a_failed_one(tmp_path):
    r = run_fresh_python(LAUNCH, str(pool.build_library(tmp_path)))
    assert r["threads"] == 3
    assert r["default"] == {"rc": 0, "tasks": [0, 1, 2], "counts": [3], "threads": 3}  # a task a thread
    assert r["seven"] == {"rc": 0, "tasks": list(range(7)), "counts": [7], "threads": 3}  # more tasks: shared
    assert r["one"] == {"rc": 0, "tasks": [0], "counts": [1], "threads": 1}
    assert r["failed"] == -1  # TVM's contract: a task's nonzero return fails the launch
    assert r["after_failure"] == [0, 3]
    assert r["nested_rc"] == 0  # a launch inside a task runs its tasks in that task's thread
    assert r["nested"] == [[outer, inner] for outer in range(3) for inner in range(2)]
    assert r["idle_cpu_share"] < 0.2  # idle workers sleep instead of spinning (spinning: 2.0)
    assert r["woken"] == [0, [0, 1, 2]]


def test_the_pool_runs_every_task_once_without_a_data_race_under_thread_sanitizer(tmp_path):
    """tests/pool_stress.c with pool.c, built with ThreadSanitizer: 50,000 launches of every task count,
    sleeping workers woken, launches inside tasks, two callers at once."""
    cc = pool.c_compiler()
    exe = tmp_path / "stress"
    source = Path(pool.__file__).with_name("pool.c")
    built = cc and subprocess.run([cc, "-O1", "-g", "-fsanitize=thread", "-pthread", "-o", str(exe),
                                   str(Path(__file__).with_name("pool_stress.c")), str(source)],
                                  capture_output=True, text=True, check=False)
    if not built or built.returncode != 0:
        pytest.skip("no C compiler with ThreadSanitizer")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.startswith("ok ")


def _mapped_libraries() -> set[str]:
    """The model libraries (runtime.py's private copies) mapped in this process."""
    fields = [line.split() for line in open("/proc/self/maps")]
    return {f[5] for f in fields if len(f) > 5 and "/intforge-" in f[5] and f[5].endswith(".so")}


def _launch_pointer(loaded: str) -> tuple[int, int]:
    """The `__TVMBackendParallelLaunch` of the library loaded as `loaded`, and intforge's launch function."""
    so = ctypes.CDLL(loaded, mode=os.RTLD_NOLOAD)
    ours = ctypes.CDLL(str(pool.build_library())).intforge_parallel_launch
    return (ctypes.c_void_p.in_dll(so, "__TVMBackendParallelLaunch").value,
            ctypes.cast(ours, ctypes.c_void_p).value)


def _load(so_of, program) -> tuple:
    before = _mapped_libraries()
    lib = so_of(program, "int")
    (loaded,) = _mapped_libraries() - before
    return lib, _launch_pointer(loaded)


def test_models_on_intforges_pool_give_the_integers_they_give_on_tvms(so_of, monkeypatch):
    torch.manual_seed(0)
    program = quantize_module(nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1)),
                              (1, 8, 20, 20))
    ours, (pointer, launch) = _load(so_of, program)
    assert ours.thread_pool == "intforge"
    assert pointer == launch  # its parallel loops really call intforge's pool
    monkeypatch.setenv("INTFORGE_POOL", "tvm")
    theirs, (pointer, launch) = _load(so_of, program)
    assert theirs.thread_pool == "tvm"
    assert pointer != launch
    rng = np.random.default_rng(0)
    for inputs in extreme_int_inputs(program, rng):
        assert np.array_equal(ours(*inputs), theirs(*inputs))


# A model called in a forked child: the child has none of the parent's workers and makes its own.
FORK = """
import json, os, signal, sys
import numpy as np
import intforge
lib = intforge.load(sys.argv[1])
x = np.arange(np.prod(lib.inputs[0]["shape"])).reshape(lib.inputs[0]["shape"]).astype(lib.inputs[0]["dtype"])
want = lib(x)
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a child waiting for workers it does not have would hang: fail instead
    os._exit(0 if np.array_equal(lib(x), want) and np.array_equal(lib(x), want) else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps({"pool": lib.thread_pool, "child": status, "parent": bool(np.array_equal(lib(x), want))}))
"""


def test_a_forked_child_runs_models_on_a_pool_of_its_own(tmp_path):
    torch.manual_seed(0)
    program = quantize_module(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()), (1, 16, 28, 28))
    library = build(program, tmp_path / "conv", boundary="int").library
    r = run_fresh_python(FORK, str(library), TVM_NUM_THREADS="2")
    assert r == {"pool": "intforge", "child": 0, "parent": True}


CAPPED = r"""
import json, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from intforge import pool
    n = pool.threads()
print(json.dumps({"threads": n, "cpus": len(os.sched_getaffinity(0)),
                  "warned": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


def test_pool_runs_at_most_one_thread_a_cpu_and_says_so():
    """More threads than the process's CPUs only take turns (on 2 CPUs, 4 threads ran MobileNetV2 4x slower):
    the pool runs one a CPU and warns, naming both counts."""
    r = run_fresh_python(CAPPED, affinity={min(os.sched_getaffinity(0))}, TVM_NUM_THREADS="3")
    assert r["cpus"] == 1 and r["threads"] == 1
    assert any("3 threads asked for" in w and "may run on 1 CPU:" in w and "pool runs 1" in w for w in r["warned"])
