"""A conv tile's requantize epilogue run during the next tile's dot products (software pipelining).

The blocked conv kernel (`blocked_dot`) computes a register tile of accumulators (pixels x channel
blocks), then its epilogue: the requantize (`blocked_dot.Narrow`) and whatever fuses after it (a
residual add). The epilogue's ~5-12 instructions per 16 outputs run after the tile's last `vpdpbusd`,
and on Zen 5 they run at about 2 a cycle, the dot-product pipes idle: for a 1x1 conv with 64 input
channels that is 12 of every 28 instruction slots of a residual conv. Placed among the dot products of
the next tile instead, they go to the other pipes alongside them: a hand-scheduled copy of the kernel
(`benchmarks/epilogue_overlap.py`) ran a 64-channel residual tile 21% faster, 128 channels 11%, 256 8%.

So the tile loop becomes: for each tile, the dot products, and in its reduction steps (all S of them
unrolled, MAX_STEPS at most) the epilogue of the tile before, vector by vector (vector v of V at step
floor(v * S / V), S >= V), reading that tile's accumulators from a copy (`ACC_PREV`, 14 vectors on the
stack) made when its products ended; one more round of the loop, its products skipped, finishes the last
tile. Measured inside ResNet50 on Zen 5 (2026-12-04, interleaved A/Bs, outputs identical): its 64-channel
residual 1x1 convs 5-10% faster, the 128-channel ones 3-4%, the 64->256 downsample 6%; the model's kernels
about 1%. Every output is the same integer expression of the same accumulators: only the order of the
work changes.

TVM has no schedule primitive for this: its software pipelining (`InjectSoftwarePipeline`) moves whole
statements between iterations, which leaves the epilogue after the products in program order. So the
schedule marks the tile loop (`MARK`) and its reduction (`STEPS_MARK`), and `pipeline_epilogues`
rewrites the scheduled function's statements; where they are not in the shape it expects it leaves the
function as it is. `INTFORGE_PIPELINE_EPILOGUE=0` builds without it (to compare).
"""

from __future__ import annotations

from tvm import ir, s_tir, tirx

from .blocked_dot import STACK_BYTES
from .stages import map_stmt, rewrite_marked_loops

MARK = "intforge.pipeline_epilogue"  # on the tile loop (and MARK.pixels, MARK.blocks: its register tile)
STEPS_MARK = "intforge.epilogue_steps"  # on the outermost reduction loop of the tile
ACC_PREV = "acc_prev"
MIN_TILES = 4  # tiles a task, at least: the last tile's epilogue runs alone, in one more round of the loop
MAX_STEPS = 32  # reduction steps a tile, at most: all of them unrolled, each piece of epilogue at constant
# indices. Longer reductions spend a smaller share on the epilogue; on Zen 5 (2026-12-04) 1x1 convs of 256
# channels at 14x14 (2 tiles a task) ran 6% slower pipelined, and a 3x3 one 11%. At least one step a
# vector of the tile: with fewer (MobileNetV2's 1x1 convs of 16-32 channels) the pieces crowd the
# products out, and those convs ran 6-16% slower.


def mark(sch: s_tir.Schedule, tile, first_reduce, epilogue: list[str], pixels: int, channel_blocks: int,
         steps: int) -> bool:
    """Prepare the scheduled conv for `pipeline_epilogues`: fuse each epilogue block's (pixel, channel
    block) loops into one and mark the loops. Returns False (nothing changed) where it would not pay: a
    task of fewer than MIN_TILES tiles, a tile of more than MAX_STEPS reduction steps or of fewer steps
    than vectors, or a tile of accumulators that is not on the stack (its copy would not be either)."""
    vectors = pixels * channel_blocks
    if int(sch.get(tile).extent) < MIN_TILES or not vectors <= steps <= MAX_STEPS or vectors * 64 >= STACK_BYTES:
        return False
    for name in epilogue:
        loops = sch.get_loops(sch.get_sblock(name))
        depth = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(tile))][0]
        pix, chan = loops[depth + 1], loops[depth + 2]
        if int(sch.get(pix).extent) != pixels or int(sch.get(chan).extent) != channel_blocks:
            raise ValueError(f"epilogue block {name}: loops ({sch.get(pix).extent}, {sch.get(chan).extent}), "
                             f"expected ({pixels}, {channel_blocks})")
        sch.fuse(pix, chan)
    sch.annotate(tile, MARK, 1)
    sch.annotate(tile, MARK + ".pixels", pixels)
    sch.annotate(tile, MARK + ".blocks", channel_blocks)
    sch.annotate(first_reduce, STEPS_MARK, 1)
    return True


def pipeline_epilogues(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Rewrite each tile loop `mark` marked (see the module's docstring); the function unchanged where
    there is none, or where its statements are not in the expected shape."""
    found: list = []

    def rewrite(loop):
        try:
            return _rewrite(loop, found)
        except _Unexpected:
            return None

    func = rewrite_marked_loops(func, MARK, rewrite)
    func = rewrite_marked_loops(func, STEPS_MARK, lambda loop: None)  # (the marks of loops left as they were)
    if not found:
        return func
    root = func.body
    block = root.block
    block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, block.body, block.init,
                         [*block.alloc_buffers, *found], block.match_buffers, block.annotations)
    return func.with_body(s_tir.SBlockRealize(root.iter_values, root.predicate, block))


def _blocks(stmt) -> list:
    """The SBlocks under `stmt`, outermost first."""
    out: list = []
    map_stmt(stmt, on_block=lambda b: out.append(b) or b)
    return out


def _rewrite(loop: tirx.For, found: list):
    """The pipelined form of one marked tile loop, or None where it is not in the expected shape."""
    pixels, blocks = int(loop.annotations[MARK + ".pixels"]), int(loop.annotations[MARK + ".blocks"])
    vectors = pixels * blocks
    if not isinstance(loop.body, tirx.SeqStmt):
        return None
    kids = list(loop.body.seq)
    at_steps = [i for i, k in enumerate(kids) if isinstance(k, tirx.For) and STEPS_MARK in k.annotations]
    if len(at_steps) != 1 or at_steps[0] < 1:
        return None
    # before the reduction: the accumulators' init (`decompose_reduction`'s block) and whatever packs the
    # tile's input
    pre, red, epilogue = kids[:at_steps[0]], kids[at_steps[0]], kids[at_steps[0] + 1:]
    inits = [k for k in pre if any(b.name_hint.endswith("_init") for b in _blocks(k))]
    if len(inits) != 1:
        return None
    init = inits[0]
    if not epilogue or any(not isinstance(e, tirx.For) or int(e.extent) != vectors for e in epilogue):
        return None
    copy, acc, prev = _copy_of(init, pixels, blocks)

    def region(r):
        if not r.source.same_as(acc):
            return r
        rs = list(r.region)
        return tirx.BufferRegion(prev, [ir.Range.from_min_extent(tirx.floormod(rs[3].min, pixels), 1),
                                        ir.Range.from_min_extent(tirx.floormod(rs[1].min, blocks), 1), rs[4]])

    def remap(block: s_tir.SBlock) -> s_tir.SBlock:  # the epilogue reads the copy, not the accumulators
        matches = [s_tir.MatchBufferRegion(m.buffer, region(m.source)) for m in block.match_buffers]
        return s_tir.SBlock(block.iter_vars, [region(r) for r in block.reads], block.writes, block.name_hint,
                            block.body, block.init, block.alloc_buffers, matches, block.annotations)

    j, dtype = loop.loop_var, str(loop.loop_var.ty)
    n_tiles = int(loop.extent)

    def c(v: int):
        return tirx.const(v, dtype)

    chain = [red]
    while isinstance(chain[-1].body, tirx.For):
        chain.append(chain[-1].body)
    # the reduction's steps all unrolled (at most MAX_STEPS): each piece of epilogue at constant indices,
    # vector v at step floor(v * S / V), with no address arithmetic a step
    steps, step = 1, c(0)
    for lp in chain:
        steps *= int(lp.extent)
        step = step * c(int(lp.extent)) + (lp.loop_var - lp.min)
    lo = tirx.floordiv(step * c(vectors) + c(steps - 1), c(steps))
    hi = tirx.floordiv((step + c(1)) * c(vectors) + c(steps - 1), c(steps))
    previous = [(j, j - c(1))]
    pieces = [tirx.For(e.loop_var, lo, hi - lo, tirx.ForKind.SERIAL,
                       map_stmt(_substitute_bindings(e.body, previous), on_block=remap)) for e in epilogue]
    now, before = j < c(n_tiles), j > c(0)
    new = tirx.SeqStmt([tirx.IfThenElse(now, chain[-1].body, None), tirx.IfThenElse(before, _seq(pieces), None)])
    for lp in reversed(chain):
        annotations = {k: v for k, v in lp.annotations.items() if k != STEPS_MARK}
        new = tirx.For(lp.loop_var, lp.min, lp.extent, tirx.ForKind.UNROLLED, new, lp.thread_binding, annotations)
    body = [tirx.IfThenElse(now, _seq(pre), None), new, tirx.IfThenElse(now, copy, None)]
    annotations = {k: v for k, v in loop.annotations.items() if not k.startswith(MARK)}
    found.append(prev)
    return tirx.For(j, loop.min, c(n_tiles + 1), loop.kind, _seq(body), loop.thread_binding, annotations)


def _substitute_bindings(stmt, vmap: list):
    """`stmt` (loops and blocks) with `vmap`'s variables replaced in the loops' bounds and the blocks'
    bindings and predicates: the only places a block's surroundings show inside a block-level function
    (a block's body sees only its own iteration variables). TVM exposes no substitution to Python."""
    sub = lambda e: _substitute(e, vmap)  # noqa: E731
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, sub(stmt.min), sub(stmt.extent), stmt.kind,
                        _substitute_bindings(stmt.body, vmap), stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_substitute_bindings(s, vmap) for s in stmt.seq])
    if isinstance(stmt, s_tir.SBlockRealize):
        return s_tir.SBlockRealize([sub(v) for v in stmt.iter_values], sub(stmt.predicate), stmt.block)
    raise _Unexpected(type(stmt).__name__)


class _Unexpected(ValueError):
    """A statement or expression the rewrite does not know how to substitute into."""


_BINARY = ("Add", "Sub", "Mul", "FloorDiv", "FloorMod", "Div", "Mod", "Min", "Max", "EQ", "NE", "LT", "LE", "GT",
           "GE", "And", "Or")


def _substitute(e, vmap: list):
    """`e` with each (var, value) of `vmap` substituted."""
    if isinstance(e, tirx.Var):
        for k, v in vmap:
            if e.same_as(k):
                return v
        return e
    if isinstance(e, (tirx.IntImm, bool)):
        return e
    kind = type(e).__name__
    if kind in _BINARY:
        return getattr(tirx, kind)(_substitute(e.a, vmap), _substitute(e.b, vmap))
    if isinstance(e, tirx.Cast):
        return tirx.Cast(str(e.ty), _substitute(e.value, vmap))
    if isinstance(e, tirx.Not):
        return tirx.Not(_substitute(e.a, vmap))
    raise _Unexpected(kind)


def _copy_of(init, pixels: int, blocks: int):
    """(loop nest, accumulators, copy buffer): the nest that copies a tile's accumulators into a
    [pixels, blocks, lanes] buffer, built from the nest that zeroes them (`decompose_reduction`'s init
    block, one vector a pixel and channel block), as plain stores under the same loops."""
    loops = []
    s = init
    while isinstance(s, tirx.For):
        loops.append(s)
        s = s.body
    if not isinstance(s, s_tir.SBlockRealize) or not isinstance(s.block.body, tirx.BufferStore):
        raise _Unexpected("accumulator init")
    store, block = s.block.body, s.block
    acc = store.buffer
    if len(acc.shape) != 5 or not loops:
        raise _Unexpected("accumulator shape")
    bound = [(iv.var, value) for iv, value in zip(block.iter_vars, s.iter_values, strict=True)]
    fresh = [(lp.loop_var, tirx.Var(f"{lp.loop_var.name}_copy", str(lp.loop_var.ty))) for lp in loops]
    idx = [_substitute(_substitute(i, bound), fresh) for i in store.indices]
    prev = tirx.decl_buffer((pixels, blocks, int(acc.shape[4])), str(acc.dtype), name=ACC_PREV, scope=acc.scope())
    # constant indices once unrolled: LLVM keeps the accumulators in registers and stores them
    body = tirx.BufferStore(prev, tirx.BufferLoad(acc, idx), [tirx.floormod(idx[3], pixels),
                                                              tirx.floormod(idx[1], blocks), idx[4]])
    for lp in reversed(loops):
        kind = tirx.ForKind.VECTORIZED if lp.same_as(loops[-1]) else tirx.ForKind.UNROLLED
        body = tirx.For(_substitute(lp.loop_var, fresh), lp.min, lp.extent, kind, body)
    return body, acc, prev


def _seq(stmts: list):
    """A SeqStmt of `stmts`, or the one statement (TVM refuses a SeqStmt of one)."""
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)
