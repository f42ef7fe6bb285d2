"""MetaSchedule tuning of an integer program's kernels, kept in a per-target database that builds reuse.

TVM's machinery does the search (`tune_relax`, JSONDatabase, `MetaScheduleApplyDatabase`); what is ours:
the kernels are extracted after intforge's own legalization (so database keys match what `build` sees),
the database lives in one directory per target, and a corrupt or unreadable database is set aside with a
warning instead of failing the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import tvm

from intforge.cache import cache_root
from intforge.errors import IntforgeError
from intforge.program import IntegerProgram

from .targets import TargetPreset, resolve_target

#: Builder workers import tvm.s_tir.tensor_intrin (it parses hundreds of TVMScript intrinsics: ~25 s
#: on 2 cores) before their first build; MetaSchedule's 30 s default timeout kills every build.
BUILD_TIMEOUT_S = 180.0


def tuning_root() -> Path:
    """Where tuning databases live (INTFORGE_CACHE overrides ~/.cache/intforge)."""
    return cache_root() / "tuning"


def database_dir(target: str | TargetPreset) -> Path:
    """One database per target: the preset's full description, hashed."""
    desc = json.dumps(resolve_target(target).describe(), sort_keys=True)
    return tuning_root() / hashlib.sha256(desc.encode()).hexdigest()[:16]


def _tuning_target(preset: TargetPreset) -> tvm.target.Target:
    spec = dict(preset.tvm_target().export())
    spec["num-cores"] = os.cpu_count() or 1  # MetaSchedule requires it for CPU targets
    return tvm.target.Target({k: v for k, v in spec.items() if k in ("kind", "mcpu", "mtriple", "mattr",
                                                                        "num-cores")})


def _warm_worker() -> None:
    import tvm.s_tir.tensor_intrin  # noqa: F401 - pay the intrinsic parsing once per worker


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
    """Whether a task's function contains one of our hand-scheduled blocks (VNNI conv/dense, NHWC
    depthwise): kernels/ schedules those, tuning does not."""
    from tvm import s_tir

    from intforge.kernels.depthwise import DW_BLOCK
    from intforge.kernels.x86_vnni import CONV_BLOCK, DENSE_BLOCK

    sch = s_tir.Schedule(mod)
    for name in (CONV_BLOCK, DENSE_BLOCK, DW_BLOCK):
        try:
            sch.get_sblock(name)
            return True
        except Exception:  # noqa: BLE001 - get_sblock raises when the function has no such block
            continue
    return False


def tune(program: IntegerProgram, target: str | TargetPreset = "x86", trials: int = 64,
         boundary: str = "float", progress: bool = True) -> Path:
    """Tune the program's kernels for `target` with MetaSchedule; records go to the target's database."""
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
    if preset.is_cross:
        raise IntforgeError(f"target '{preset.name}' is {preset.arch}: tuning measures candidates on the target, "
                            "and tuning on a board over RPC is not implemented yet. Compile untuned (the "
                            "dot-product kernels need no tuning) or tune on the board itself.")
    tgt = _tuning_target(preset)
    mod = emit_program(program, boundary=boundary)
    with tgt:
        mod = tvm.transform.Sequential(_legalize_passes(preset))(mod)
    out = database_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    builder = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, initializer=_warm_worker)
    with tempfile.TemporaryDirectory(prefix="intforge-tune-") as work:
        if progress:
            print(f"tuning {trials} trials for target {preset.name} (logs in {work}; first builds wait for "
                  "workers to start)...", flush=True)
        # Our tensorized kernels bring their own schedule (kernels/x86_vnni.py): tuning them with generic
        # rules could only replace vpdpbusd with something slower, so they are not tasks. The search space
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
            num_trials_per_iter=min(16, trials), builder=builder, cost_model="random",
            database=ms.database.JSONDatabase(str(out / "database_workload.json"),
                                              str(out / "database_tuning_record.json"), allow_missing=True))
    del db
    return out
