"""MetaSchedule tuning of an integer program's kernels, kept in a per-target database that builds reuse.

TVM's machinery does the search (`tune_relax`, JSONDatabase, `MetaScheduleApplyDatabase`); what is ours:
the kernels are extracted after intforge's own legalization (so database keys match what `build` sees),
the database lives in one directory per target, and a corrupt or unreadable database is set aside with a
warning instead of failing the build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import tvm

from intforge.cache import cache_root
from intforge.errors import IntforgeError
from intforge.program import IntegerProgram

from .targets import TargetPreset, resolve_target

#: Seconds per candidate build. MetaSchedule's 30 s default once killed every first build, when each worker
#: parsed TVM's intrinsic catalogue before it (see `_skip_intrinsic_catalogue`); a cross build is slow too.
BUILD_TIMEOUT_S = 180.0
INTRINSIC_CATALOGUE = "tvm.s_tir.tensor_intrin"


def tuning_root() -> Path:
    """Where tuning databases live (INTFORGE_CACHE overrides ~/.cache/intforge)."""
    return cache_root() / "tuning"


def database_dir(target: str | TargetPreset) -> Path:
    """One database per target: the preset's full description, hashed."""
    desc = json.dumps(resolve_target(target).describe(), sort_keys=True)
    return tuning_root() / hashlib.sha256(desc.encode()).hexdigest()[:16]


#: Cores assumed for a board (a cross target) in the tuning target: MetaSchedule requires a core count for
#: CPU targets, and the database key must be the same when `tune` writes and `compile` reads. Raspberry Pi 4
#: and 5 have four.
BOARD_CORES = 4

#: Per candidate on a board over RPC: measurements, and seconds before the run counts as failed (qemu
#: boards are slow to start a session).
RPC_NUMBER = 3
RPC_SESSION_TIMEOUT_S = 120


def _tuning_target(preset: TargetPreset) -> tvm.target.Target:
    spec = dict(preset.tvm_target().export())
    spec["num-cores"] = BOARD_CORES if preset.is_cross else (os.cpu_count() or 1)  # MetaSchedule requires it
    return tvm.target.Target({k: v for k, v in spec.items() if k in ("kind", "mcpu", "mtriple", "mattr",
                                                                        "num-cores")})


def _skip_intrinsic_catalogue() -> None:
    """Stand in for tvm.s_tir.tensor_intrin, which MetaSchedule imports in every TuneContext and in every
    builder worker: it parses TVM's whole catalogue of TVMScript tensor intrinsics, 30-40 s on 2 cores
    (19 s of it CUDA's), and tuning uses none of them: the search space is MetaSchedule's plain LLVM one,
    and our tensorized kernels bring their own intrinsics and are not tasks. The stand-in is an empty
    package over the same directory, so a submodule (tensor_intrin.x86, say) still imports by name.
    Ours, not TVM's: TVM has no switch for this."""
    if INTRINSIC_CATALOGUE in sys.modules:
        return
    import tvm.s_tir

    spec = importlib.util.find_spec(INTRINSIC_CATALOGUE)
    stand_in = types.ModuleType(INTRINSIC_CATALOGUE, "TVM's tensor intrinsics, not loaded (intforge tuning)")
    stand_in.__path__ = list(spec.submodule_search_locations or [])
    stand_in.__package__ = INTRINSIC_CATALOGUE
    sys.modules[INTRINSIC_CATALOGUE] = stand_in
    tvm.s_tir.tensor_intrin = stand_in


def open_database(target: str | TargetPreset):
    """The target's JSONDatabase, or None if there is none; a corrupt one is moved aside with a warning."""
    from tvm.s_tir import meta_schedule as ms

    d = database_dir(target)
    wl, rec = d / "database_workload.json", d / "database_tuning_record.json"
    if not (wl.exists() and rec.exists()):
        return None
    try:
        return ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the database is unusable
        aside = d.with_name(d.name + f".corrupt-{int(time.time())}")
        d.rename(aside)
        warnings.warn(f"tuning database {d} could not be read ({str(exc).strip().splitlines()[-1][:200]}); "
                      f"moved it to {aside} and built without it. Run `intforge tune` again.", stacklevel=2)
        return None


def apply_database_pass(database, target: tvm.target.Target) -> tvm.transform.Pass:
    """Replace each fused PrimFunc that `database` has a schedule for with the tuned one.

    Our own version of relax.transform.MetaScheduleApplyDatabase: in TVM 0.27 that pass found no
    records for our kernels although `Database.query_schedule` on the same normalized function does.
    """
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    @tvm.transform.module_pass(opt_level=0, name="intforge.ApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tir.is_scheduled", False):
                continue
            sch = database.query_schedule(_normalize_mod(func), target, gv.name_hint)
            if sch is None:
                continue
            new = sch.mod["main"]
            for key, value in func.attrs.items():  # keep the original attributes (global symbol, op pattern)
                new = new.with_attr(key, value)
            updates[gv] = new.with_attr("tir.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply


def _has_own_schedule(mod: tvm.IRModule) -> bool:
    """Whether a task's function contains one of our hand-scheduled blocks (tensorized conv/dense, NHWC
    depthwise): kernels/ schedules those, tuning does not."""
    from tvm import s_tir

    from intforge.kernels import cpu_default  # noqa: F401 - registers every instruction's blocks
    from intforge.kernels.blocked_dot import kernel_block_names
    from intforge.kernels.depthwise import DW_BLOCK
    from intforge.kernels.depthwise_dot import DWDOT_BLOCK

    sch = s_tir.Schedule(mod)
    from intforge.kernels.winograd import BLOCK as WINOGRAD_BLOCK
    from intforge.kernels.x86_amx import BLOCK as AMX_BLOCK
    from intforge.kernels.x86_amx import CONV_BLOCK as AMX_CONV_BLOCK

    for name in sorted(kernel_block_names()) + [DW_BLOCK, DWDOT_BLOCK, WINOGRAD_BLOCK, AMX_BLOCK, AMX_CONV_BLOCK]:
        try:
            sch.get_sblock(name)
            return True
        except Exception:  # noqa: BLE001 - get_sblock raises when the function has no such block
            continue
    return False


def _rpc_session(rpc: str | None, tracker: str | None, key: str | None, _config):
    """MetaSchedule's session factory, in its runner worker: straight to a board's server, or through a
    tracker (TVM's own RPCConfig knows trackers only)."""
    from intforge.remote import connect

    return connect(rpc=rpc, tracker=tracker, key=key, timeout=RPC_SESSION_TIMEOUT_S // 10)


def _rpc_upload(session, local_path: str, remote_path: str):
    """Upload a candidate under a name of its own: a board process that dlopens two candidates at one
    path would run the first again."""
    import uuid

    name = f"{uuid.uuid4().hex}_{remote_path}"
    session.upload(local_path, name)
    return session.load_module(name)


def _rpc_alloc(session, device, args_info, alloc_repeat: int):
    """Random arguments made here and copied to the board: boards' runtimes need not have TVM's
    random-fill function, which MetaSchedule's default asks the board for."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor) -> None:
        dtype = str(tensor.dtype)
        if dtype.startswith(("int", "uint")):
            info = np.iinfo(dtype)
            value = rng.integers(max(info.min, -128), min(info.max, 127) + 1, tensor.shape).astype(dtype)
        else:
            value = rng.standard_normal(tensor.shape).astype(dtype)
        tensor.copyfrom(value)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _export_for(preset_name: str, mod) -> str:
    """MetaSchedule's export step, in its builder worker: a shared library linked by the target's own
    (cross) compiler, which a board loads without a compiler of its own (the default, a .tar of objects,
    needs one on the board)."""
    path = os.path.join(tempfile.mkdtemp(prefix="intforge-cand-"), "candidate.so")
    mod.export_library(path, fcompile=resolve_target(preset_name).fcompile())
    return path


def _remote_runner(preset: TargetPreset, rpc: str | None, tracker: str | None, key: str | None):
    """A MetaSchedule RPCRunner measuring candidates on the board, after checking here that the board can
    be reached (a clear error now rather than every trial failing later)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from intforge.remote import connect, parse_hostport

    connect(rpc=rpc, tracker=tracker, key=key)  # raises IntforgeError naming the address and what to check
    host, port = parse_hostport(tracker or rpc, "--tracker" if tracker else "--rpc")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key or "server",
                                 session_timeout_sec=RPC_SESSION_TIMEOUT_S)
    evaluator = ms.runner.EvaluatorConfig(number=RPC_NUMBER, repeat=1, min_repeat_ms=0,
                                          enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(config, evaluator, max_workers=1,
                               f_create_session=functools.partial(_rpc_session, rpc, tracker, key),
                               f_upload_module=_rpc_upload, f_alloc_argument=_rpc_alloc)


def tune(program: IntegerProgram, target: str | TargetPreset = "x86", trials: int = 64,
         boundary: str = "float", progress: bool = True, rpc: str | None = None, tracker: str | None = None,
         key: str | None = None) -> Path:
    """Tune the program's kernels for `target` with MetaSchedule; records go to the target's database.
    Candidates run on this machine, or with `rpc` (a board's TVM RPC server, HOST:PORT) or `tracker` and
    `key` (TVM's RPC tracker and the key its boards registered with) on a remote board; a cross target
    (an ARM board) needs one of those."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from intforge.relay_passes import emit_program

    from .build import _legalize_passes

    if trials < 1:
        raise IntforgeError(f"trials must be at least 1, got {trials}")
    preset = resolve_target(target)
    if preset.is_cuda:
        raise IntforgeError(f"target '{preset.name}' is a GPU: its conv and dense layers run in intforge's "
                            "Tensor Core kernels, whose tile sizes are fixed, and `tune` searches CPU schedules "
                            "only. Compile for it without tuning.")
    remote = bool(rpc or tracker)
    if preset.is_cross and not remote:
        raise IntforgeError(f"target '{preset.name}' is {preset.arch}: tuning measures candidates on the target. "
                            "Give the board's TVM RPC server (--rpc HOST:PORT; on the board: `python3 -m "
                            "tvm.exec.rpc_server --host 0.0.0.0 --port 9090`) or a tracker (--tracker HOST:PORT "
                            "--key KEY), or compile untuned: the dot-product kernels need no tuning.")
    if remote:
        preset.fcompile()  # a missing cross compiler is an instruction now, not a failure in every build
    runner = _remote_runner(preset, rpc, tracker, key) if remote else "local"
    _skip_intrinsic_catalogue()
    tgt = _tuning_target(preset)
    mod = emit_program(program, boundary=boundary)
    with tgt:
        mod = tvm.transform.Sequential(_legalize_passes(preset))(mod)
    out = database_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    # TVM's MetaSchedule logging setup lists its logger's handlers by name, and a handler without a name
    # makes it fail (pytest's log capture leaves one after a first tune in the same process): drop those.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)
    builder = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, initializer=_skip_intrinsic_catalogue,
                                      f_export=functools.partial(_export_for, preset.name) if remote else None)
    with tempfile.TemporaryDirectory(prefix="intforge-tune-") as work:
        if progress:
            where = f" on the board at {tracker or rpc}" + (f" (key {key})" if key else "") if remote else ""
            print(f"tuning {trials} trials for target {preset.name}{where} (logs in {work}; first builds wait "
                  "for workers to start)...", flush=True)
        # Our tensorized kernels bring their own schedule (kernels/blocked_dot.py): tuning them with generic
        # rules could only replace the instruction with something slower, so they are not tasks. The search space
        # is MetaSchedule's plain LLVM one: its x86 VNNI rules use TVM's dot_16x4_vnni intrinsic, which
        # LLVM 22 rejects, and records naming it make the database unreadable without that registry.
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, tgt) if not _has_own_schedule(t.dispatched[0])]
        if not tasks:
            if progress:
                print("every kernel of this model is a tensorized intforge kernel: nothing to tune", flush=True)
            return out
        space = ms.space_generator.PostOrderApply(sch_rules=ms.schedule_rule.ScheduleRule.create("llvm"),
                                                  postprocs=ms.postproc.Postproc.create("llvm"),
                                                  mutator_probs=ms.mutator.Mutator.create("llvm"))
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work, space=space, seed=0)
        db = ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work, max_trials_global=trials,
            num_trials_per_iter=min(16, trials), builder=builder, runner=runner, cost_model="random",
            database=ms.database.JSONDatabase(str(out / "database_workload.json"),
                                              str(out / "database_tuning_record.json"), allow_missing=True))
    del db
    return out
