"""The default CPU schedule: parallelize every loop nest over its outer data-parallel loops.

TVM's CPU pipeline leaves legalized PrimFuncs unscheduled (one thread, no parallel loops). Until
tuned and tensorized kernels arrive, this rule fuses the leading spatial loops of each block and runs
them in parallel. It only reorders work across threads, so results stay bit-identical.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from . import arm_dot, x86_avx2, x86_vnni  # noqa: F401 - registers their instructions with blocked_dot
from .blocked_dot import schedule_blocked_func
from .depthwise import schedule_depthwise_func
from .depthwise_avx2 import schedule_depthwise_pairs_func
from .depthwise_dot import schedule_depthwise_dot_func
from .epilogue_pipeline import pipeline_epilogues
from .stages import split_vector, vectorize_inner
from .winograd import balance_odd_tasks, schedule_winograd_func
from .x86_amx import request_tiles, schedule_amx_func

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
    tiles = False
    if left is None:
        left = schedule_amx_func(sch)
        tiles = left is not None
    if left is None:
        left = schedule_blocked_func(sch)
    if left is None:
        left = schedule_depthwise_func(sch)
    if left is None:
        left = schedule_depthwise_dot_func(sch)
    if left is None:
        left = schedule_depthwise_pairs_func(sch)
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
        lanes = None
        if len(spatial) < len(loops) and _contiguous_channels(block_stmt):
            spatial, lanes = _channels_inside_reduction(sch, spatial, loops[len(spatial):])
        extent = 1
        take = []
        for loop in spatial:
            take.append(loop)
            ext = sch.get(loop).extent
            extent *= int(ext) if isinstance(ext, tirx.IntImm) else 1 << 16  # symbolic: assume large
            if extent >= 64:
                break
        if extent >= MIN_PARALLEL_EXTENT:
            sch.parallel(sch.fuse(*take) if len(take) > 1 else take[0])
        if lanes is not None:
            # (the block keeps its init: once decomposed, the update block under the reduction loops is
            # neither a complete nor a reduction block, and `vectorize` refuses it)
            sch.vectorize(lanes)
        elif len(take) < len(spatial) == len(loops):
            vectorize_inner(sch, spatial[-1])
    func = pipeline_epilogues(balance_odd_tasks(sch.mod["main"]))
    return request_tiles(func) if tiles else func


def _contiguous_channels(block: s_tir.SBlock) -> bool:
    """Whether the block's innermost spatial axis is the innermost index of everything it reads and
    writes, as it is for the channels of an NHWC pooling window: a vector along it is a contiguous load."""
    last = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar][-1]
    regions = list(block.reads) + list(block.writes)
    return all(r.region and r.region[-1].min.same_as(last) and isinstance(r.region[-1].extent, tirx.IntImm)
               and int(r.region[-1].extent) == 1 for r in regions)


def _channels_inside_reduction(sch: s_tir.Schedule, spatial: list, reduction: list) -> tuple[list, object]:
    """A reduction over the outer axes of an NHWC tensor (a pooling window, a global average's sum): its
    innermost spatial loop, the channels, split into vector-wide pieces that go inside the reduction
    loops, so each window position adds or compares one vector of contiguous channels. Left as it was,
    each output walks its window scalar by scalar at a stride of a whole row: ResNet50's global sum at
    batch 8 (8 x 7 x 7 x 2048 int32) took 0.7-1.1 ms, 0.065 so. Returns the spatial loops left outside and the vector
    loop, or (spatial, None) where the channels are too few or not a multiple of 4."""
    pieces = split_vector(sch, spatial[-1])
    if pieces is None:
        return spatial, None
    outer, vec = pieces
    kept = [*spatial[:-1], *([outer] if outer is not None else [])]
    sch.reorder(*kept, *reduction, vec)
    return kept, vec


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
