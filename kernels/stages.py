"""Schedule steps shared by the CPU kernels: where an input stage runs, and vectorizing a stage.

TVM's thread pool starts and joins its workers once per parallel loop. A padding or packing stage given
its own parallel loop costs one more of those per layer, which on a small layer (MobileNetV2's 14x14 and
7x7 blocks) is as long as the layer's arithmetic. Computed inside the kernel's own parallel loop, each
thread pads the rows it reads, right before it reads them (a few rows computed twice where windows
overlap), and the layer runs as one parallel region.
"""

from __future__ import annotations

from tvm import s_tir, tirx

VECTOR_LANES = 64  # elements per vectorized piece: one 512-bit register of bytes
PREFETCH_LOCALITY = 3  # llvm.prefetch's: 3 is prefetcht0 (into L1); ResNet50's layer4 convs ran 2-7% faster than with 2


def find_block(sch: s_tir.Schedule, name: str) -> tuple[list, list[str], int] | None:
    """The root's child blocks, their names, and the index of the block called `name`; None when the
    function has no such block (it is not the kernel a schedule rule is for)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if name not in names:
        return None
    return blocks, names, names.index(name)


def split_vector(sch: s_tir.Schedule, loop, least: int = 4, most: int = VECTOR_LANES) -> tuple | None:
    """Split `loop` (channels in NHWC) into (outer, vector) with a vector piece of at most `most` lanes,
    when its extent is a known multiple of 4 and at least `least`; outer is None when the whole loop is
    one piece. None when it cannot be vectorized."""
    ext = sch.get(loop).extent
    if not isinstance(ext, tirx.IntImm) or int(ext) < least:
        return None
    n = int(ext)
    lanes = next((v for v in (most, 32, 16, 8, 4) if v <= min(n, most) and n % v == 0), None)
    if lanes is None:
        return None
    if lanes < n:
        return tuple(sch.split(loop, [None, lanes]))
    return None, loop


def vectorize_inner(sch: s_tir.Schedule, loop, least: int = 4, most: int = VECTOR_LANES) -> bool:
    """Vectorize `loop` (a spatial block's innermost loop, channels in NHWC) in pieces of at most `most`
    lanes when its extent is a known multiple of 4 or more; returns whether it did."""
    pieces = split_vector(sch, loop, least, most)
    if pieces is None:
        return False
    sch.vectorize(pieces[1])
    return True


def compute_inputs_at(sch: s_tir.Schedule, producers: list, loop) -> set[str]:
    """Move each input stage (padding, packing) under the kernel's parallel `loop`, vectorized over its
    innermost loop. Returns the names of the stages that could not move (left to the default rule)."""
    left = set()
    for block in reversed(producers):  # the one feeding the kernel first, so its own inputs can follow
        name = sch.get(block).name_hint
        try:
            sch.compute_at(block, loop, preserve_unit_loops=True)
        except s_tir.ScheduleError:
            left.add(name)
            continue
        loops = sch.get_loops(block)
        if loops and loops[-1] != loop:
            vectorize_inner(sch, loops[-1])
    return left


def prefetch(address: tirx.PrimExpr) -> tirx.Stmt:
    """A read prefetch of the cache line at `address` into L1 (`PREFETCH_LOCALITY`)."""
    return tirx.Evaluate(tirx.call_intrin("void", "tirx.prefetch", address, 0, PREFETCH_LOCALITY, 1))


def insert_at_loop_top(sch: s_tir.Schedule, loop, stmts: list, loop_var: tirx.Var | None = None) -> None:
    """Rebuild `loop` with `stmts` in front of its body, and put it in the schedule's place
    (`ScheduleState.replace`). TVM's schedule language has no statement to put inside a loop (TE's
    `prefetch` went with TE schedules), nor can it rotate a loop or substitute a variable from Python:
    with `loop_var` the loop runs over that new variable, and `stmts` bind the old one (`tirx.Bind`)."""
    node = sch.get(loop)
    body = tirx.SeqStmt([*stmts, node.body])
    sch.state.replace(sch.get_sref(loop), tirx.For(loop_var if loop_var is not None else node.loop_var, node.min,
                                                   node.extent, node.kind, body, node.thread_binding,
                                                   node.annotations), {})


def map_stmt(stmt: tirx.Stmt, on_for=None, on_block=None) -> tirx.Stmt:
    """`stmt` rebuilt through its loops, sequences, branches and blocks (TVM exposes no statement mutator
    to Python): `on_for(loop)` may return a replacement for a loop (None: the loop kept, its body mapped),
    `on_block(block)` a block to put in place of one (its body then mapped). Other statements are kept."""
    def again(s):
        return map_stmt(s, on_for, on_block)

    if isinstance(stmt, tirx.For):
        new = on_for(stmt) if on_for is not None else None
        if new is not None:
            return new
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, again(stmt.body), stmt.thread_binding,
                        stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([again(s) for s in stmt.seq])
    if isinstance(stmt, tirx.IfThenElse):
        return tirx.IfThenElse(stmt.condition, again(stmt.then_case),
                               None if stmt.else_case is None else again(stmt.else_case))
    if isinstance(stmt, s_tir.SBlockRealize):
        b = on_block(stmt.block) if on_block is not None else stmt.block
        b = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, again(b.body), b.init, b.alloc_buffers,
                         b.match_buffers, b.annotations)
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, b)
    return stmt


def rewrite_marked_loops(func: tirx.PrimFunc, mark: str, rewrite) -> tirx.PrimFunc:
    """`func` with each loop annotated `mark` replaced by rewrite(loop), or, where that returns None, kept
    without the annotation; `func` itself where no loop is marked."""
    found = [False]

    def on_for(loop: tirx.For):
        if mark not in loop.annotations:
            return None
        found[0] = True
        new = rewrite(loop)
        if new is not None:
            return new
        annotations = {k: v for k, v in loop.annotations.items() if k != mark}
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, map_stmt(loop.body, on_for),
                        loop.thread_binding, annotations)

    body = map_stmt(func.body, on_for)
    return func.with_body(body) if found[0] else func
