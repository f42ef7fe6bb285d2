"""The default CPU schedule: parallelize every loop nest over its outer data-parallel loops.

TVM's CPU pipeline leaves legalized PrimFuncs unscheduled (one thread, no parallel loops). Until
tuned and tensorized kernels arrive, this rule fuses the leading spatial loops of each block and runs
them in parallel. It only reorders work across threads, so results stay bit-identical.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from . import arm_dot, x86_vnni  # noqa: F401 - registers their instructions with blocked_dot
from .blocked_dot import schedule_blocked_func
from .depthwise import schedule_depthwise_func
from .depthwise_dot import schedule_depthwise_dot_func
from .stages import vectorize_inner
from .winograd import schedule_winograd_func

MIN_PARALLEL_EXTENT = 4


def _inline_elementwise(sch: s_tir.Schedule, root) -> None:
    """Fold every elementwise stage into its consumer, so that a fused chain (a standalone requantize,
    a residual add's rescale-add-clamp) is one loop nest computing each output from its inputs, not a
    loop per stage writing a full-size int64 intermediate. At batch 8 the intermediates of one INT4
    input requantize in ResNet50 were 51 MB a stage and the function took 8 ms instead of well under 1.
    Stages that cannot be inlined (reductions, the output block) stay as they are."""
    for block in sch.get_child_blocks(root)[:-1]:
        try:
            sch.compute_inline(block)
        except s_tir.ScheduleError:
            continue


def _schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - functions without a root block are left as they are
        return func
    left = schedule_winograd_func(sch)  # our tensorized kernels bring their own schedule
    if left is None:
        left = schedule_blocked_func(sch)
    if left is None:
        left = schedule_depthwise_func(sch)
    if left is None:
        left = schedule_depthwise_dot_func(sch)
    if left is None:
        _inline_elementwise(sch, root)
    for block in sch.get_child_blocks(root):
        if left is not None and sch.get(block).name_hint not in left:
            continue
        loops = sch.get_loops(block)
        if not loops:
            continue
        block_stmt = sch.get(block)
        spatial = []
        for loop, iv in zip(loops, block_stmt.iter_vars, strict=False):
            if iv.iter_type != tirx.IterVar.DataPar:
                break
            spatial.append(loop)
        if not spatial or len(loops) != len(block_stmt.iter_vars):
            continue
        extent = 1
        take = []
        for loop in spatial:
            take.append(loop)
            ext = sch.get(loop).extent
            extent *= int(ext) if isinstance(ext, tirx.IntImm) else 1 << 16  # symbolic: assume large
            if extent >= 64:
                break
        if extent < MIN_PARALLEL_EXTENT:
            continue
        fused = sch.fuse(*take) if len(take) > 1 else take[0]
        sch.parallel(fused)
        if len(take) < len(spatial) == len(loops):
            vectorize_inner(sch, spatial[-1])
    return sch.mod["main"]


def default_schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """A module pass applying the default CPU schedule to every unscheduled PrimFunc."""

    @tvm.transform.module_pass(opt_level=0, name="intforge.DefaultCPUSchedule")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tir.is_scheduled", False):
                updates[gv] = _schedule_func(func).with_attr("tir.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply
