"""x86 AMX-INT8: integer GEMMs on the tile unit (`tdpbusd`/`tdpbssd`), for dense layers and 1x1 convs.

A tile instruction multiplies a 16 x 64 byte tile of activations by a 16-row tile of weights (64 input
channels x 16 output channels, 4 bytes a lane: the VNNI layout's [K/4, 16, 4] block, so the weights are
the ones `blocked_dot.dense_weight_layout` packs) into 16 x 16 int32 accumulators: 16384 exact MACs an
instruction, 8 times a 512-bit `vpdpbusd`'s 64 x 16. `tdpbusd` takes unsigned activations, `tdpbssd`
signed ones, both signed weights, so neither needs the +-128 shift and weight-sum correction of VNNI.

A register tile is 32 rows x 32 output channels: 4 accumulator tiles (tmm0-3) that stay in the tile
unit for the whole reduction, fed per 64 input channels by two activation tiles (tmm4-5) loaded
straight from the rows (stride: the row's bytes) and two weight tiles (tmm6-7), then 4 instructions.
Then the tiles are stored to a 4 KB scratch and the requantize epilogue (`blocked_dot.Narrow`, the VNNI
kernels' own, tensorized to x86_ifma's intrinsic) reads them back from L1 and writes the 8-bit output.
A 1x1 stride-1 conv in NHWC is this GEMM over its pixels (the Relax pass reshapes its input and output,
views only).

TVM 0.27 has no AMX tensor intrinsics (its LLVM 22 has the instructions, as intrinsics with immediate
tile numbers), so the whole reduction of a register tile is one tensor intrinsic of ours, registered per
reduction length. Linux hands a process AMX's tile data only on request (arch_prctl
ARCH_REQ_XCOMP_PERM), so each kernel asks first (a system call per kernel call, a fraction of a
microsecond) and stops with an error naming it where Linux refuses, instead of dying on SIGILL.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from .blocked_dot import ACC_SCOPE, DotIsa, Narrow, add_correction, blocks, ensure_intrin
from .stages import find_block, map_stmt

ROWS = 32  # rows of a register tile: two 16-row activation tiles
COLS = 32  # output channels of a register tile: two 16-channel weight tiles
K_STEP = 64  # input channels (bytes) per tile instruction
# parallel tasks a kernel keeps at least, where it has that many register tiles: a task configures the
# tiles once and runs several register tiles on them
MIN_TASKS = 16
LANES = 16  # output channels per weight tile (the VNNI layout's block)
GROUP = 4
BLOCK = "dense_amx"
NARROW = f"{BLOCK}_narrow"
DATA = "data_amx"  # rows padded to whole register tiles, where they are not
# Linux (arch/x86/include/uapi/asm/prctl.h): arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
INSTRUCTION = {"uint8": "llvm.x86.tdpbusd", "int8": "llvm.x86.tdpbssd"}


def isa(act_dtype: str) -> DotIsa:
    """The tile instruction for activations of `act_dtype` as a `DotIsa`, for what the Relax pass asks of
    one (activation type, lanes: which correction and epilogue form a kernel takes). Not registered with
    blocked_dot: `schedule_amx_func` schedules the tile kernel."""
    return DotIsa(f"amx_{act_dtype}", intrin_name(0, act_dtype), lambda: None, act_dtype, lanes=LANES, group=GROUP)


def supported(rows: int, k: int, n: int, x_dtype: str) -> bool:
    """Whether a GEMM of `rows` x `k` 8-bit activations by k x `n` weights runs on the tile kernel: whole
    64-channel steps, whole 32-channel register tiles, and at least one whole 32-row tile (fewer rows, a
    classifier's batch, stay on the vector kernels: the tile unit would run mostly on padding)."""
    return x_dtype in INSTRUCTION and k % K_STEP == 0 and n % COLS == 0 and rows >= ROWS


def intrin_name(k: int, act_dtype: str) -> str:
    return f"intforge_amx_{act_dtype}_32x32x{k}"


def _intrin(k: int, act_dtype: str) -> tuple:
    """(description, implementation) of a register tile's whole reduction: C[2, 32, 16] += A[32, k] x
    B[2, k/4, 16, 4], C the accumulators of 2 x 16 channels by 32 rows."""
    kb = k // GROUP
    tdp = INSTRUCTION[act_dtype]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (ROWS, k), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, kb, LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:2, 0:ROWS, 0:LANES], A[0:ROWS, 0:k], B[0:2, 0:kb, 0:LANES, 0:GROUP])
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            for o1, i, o2, rk, ri in T.grid(2, ROWS, LANES, kb, GROUP):
                with T.sblock("update"):
                    vo1, vi, vo2, vk, vr = T.axis.remap("SSSRR", [o1, i, o2, rk, ri])
                    C[vo1, vi, vo2] = C[vo1, vi, vo2] + (T.cast(A[vi, vk * GROUP + vr], "int32")
                                                         * T.cast(B[vo1, vk, vo2, vr], "int32"))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sb2 = T.int32()
        sc0 = T.int32()
        sc1 = T.int32()
        A = T.match_buffer(a, (ROWS, k), act_dtype, offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (2, kb, LANES, GROUP), "int8", offset_factor=1, strides=[sb0, sb1, sb2, 1])
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE, strides=[sc0, sc1, 1])
        with T.sblock("root"):
            T.reads(C[0:2, 0:ROWS, 0:LANES], A[0:ROWS, 0:k], B[0:2, 0:kb, 0:LANES, 0:GROUP])
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            # (the tiles are configured once per parallel task: `request_tiles`; tmm0..3, the accumulators
            # C[0, 0:16], C[1, 0:16], C[0, 16:32], C[1, 16:32], were zeroed by the init's intrinsic, right before)
            for s in range(k // K_STEP):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4),
                                              A.access_ptr("r", offset=s * K_STEP), T.int64(sa)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5),
                                              A.access_ptr("r", offset=16 * sa + s * K_STEP), T.int64(sa)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6),
                                              B.access_ptr("r", offset=s * 16 * sb1), T.int64(sb1)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7),
                                              B.access_ptr("r", offset=sb0 + s * 16 * sb1), T.int64(sb1)))
                T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(0), T.int8(4), T.int8(6)))
                T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(1), T.int8(4), T.int8(7)))
                T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(2), T.int8(5), T.int8(6)))
                T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(3), T.int8(5), T.int8(7)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(0),
                                          C.access_ptr("w"), T.int64(sc1 * 4)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(1),
                                          C.access_ptr("w", offset=sc0), T.int64(sc1 * 4)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(2),
                                          C.access_ptr("w", offset=16 * sc1), T.int64(sc1 * 4)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(3),
                                          C.access_ptr("w", offset=sc0 + 16 * sc1), T.int64(sc1 * 4)))

    return desc, impl


def _zero_intrin() -> tuple:
    """(description, implementation) of a register tile's init: its 4 accumulator tiles zeroed in the tile
    unit (`tilezero`), where the reduction's intrinsic, which runs right after, takes them."""

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            for o1, i, o2 in T.grid(2, ROWS, LANES):
                with T.sblock("init"):
                    vo1, vi, vo2 = T.axis.remap("SSS", [o1, i, o2])
                    C[vo1, vi, vo2] = T.int32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc0 = T.int32()
        sc1 = T.int32()
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE, strides=[sc0, sc1, 1])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(0)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(1)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(2)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(3)))

    return desc, impl


ZERO_INTRIN = "intforge_amx_zero_32x32"


def dense_amx(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_features: int,
              narrow: Narrow | None = None) -> te.Tensor:
    """x: [M, K] uint8 or int8 (`supported`); wp: [N/16, K/4, 16, 4] int8 (`dense_weight_layout` for
    VNNI); -> [M, N] int32 (plus `correction`, where given), or with `narrow` the requantized 8-bit output
    of its `dyadic.ClampFirst` epilogue. Rows are padded to whole register tiles (a copy of the input and
    one of the output) only where they are not whole already."""
    m, k = (int(d) for d in x.shape)
    nb = int(wp.shape[0])
    mc = blocks(m, ROWS) * ROWS
    xp = x if mc == m else te.compute(
        (mc, k), lambda i, j: tirx.if_then_else(i < m, x[i, j], tirx.const(0, x.dtype)), name=DATA)
    rk, ri = te.reduce_axis((0, k // GROUP), "rk"), te.reduce_axis((0, GROUP), "ri")
    acc = te.compute((nb, mc, LANES), lambda o1, i, o2: te.sum(
        xp[i, rk * GROUP + ri].astype("int32") * wp[o1, rk, o2, ri].astype("int32"), axis=[rk, ri]), name=BLOCK)
    if narrow is not None:
        if correction is None:
            raise ValueError("the ClampFirst epilogue needs its correction (which holds -lo)")
        out = te.compute((mc, out_features), lambda i, o: narrow.value(
            acc[o // LANES, i, o % LANES], correction[o], o), name=NARROW, attrs=narrow.attrs)
        return out if mc == m else te.compute((m, out_features), lambda i, o: out[i, o], name=f"{BLOCK}_out")
    return te.compute((m, out_features), lambda i, o: add_correction(acc[o // LANES, i, o % LANES], correction, o),
                      name=f"{BLOCK}_out")


def schedule_amx_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a function built around `dense_amx`; None where it has none. A parallel task is one
    register tile: its reduction is one tensor intrinsic, its accumulators go to a 4 KB scratch, and the
    epilogue (tensorized requantize, or the int32 output vectorized) reads them back right there.
    Returns the names of the blocks left to the default rule (the padded rows' copy)."""
    found = find_block(sch, BLOCK)
    if found is None:
        return None
    blocks_, names, k = found
    block, epilogue = blocks_[k], blocks_[k + 1:]
    staged = next((b for b in epilogue[:-1] if sch.get(b).name_hint == NARROW), None)
    for b in epilogue[:-1]:  # elementwise stages between the accumulators and the last: one block
        if b != staged:
            sch.compute_inline(b)
    last, last_name = epilogue[-1], sch.get(epilogue[-1]).name_hint
    act_dtype = next(str(r.source.dtype) for r in sch.get(block).reads if len(r.source.shape) == 2)
    acc = sch.cache_write(block, 0, ACC_SCOPE)
    o1, i, o2, rk, ri = sch.get_loops(block)
    k_bytes = int(sch.get(rk).extent) * GROUP
    o1o, o1i = sch.split(o1, [None, COLS // LANES])
    io, ii = sch.split(i, [None, ROWS])
    row_tiles, col_tiles = int(sch.get(io).extent), int(sch.get(o1o).extent)
    # a task: one row tile by as many channel tiles as leave MIN_TASKS tasks (configured once, its
    # activation tiles read from L1 after the first)
    per_task = max(d for d in range(1, col_tiles + 1)
                   if d == 1 or col_tiles % d == 0 and row_tiles * (col_tiles // d) >= MIN_TASKS)
    o1a, o1b = sch.split(o1o, [None, per_task])
    sch.reorder(io, o1a, o1b, o1i, ii, o2, rk, ri)
    task = sch.fuse(io, o1a)
    sch.parallel(task)
    tile = o1b
    sch.reverse_compute_at(acc, tile)
    if staged is not None:
        sch.reverse_compute_at(staged, tile)
    sch.reverse_compute_at(last, tile)
    init = sch.decompose_reduction(block, o1i)
    name = intrin_name(k_bytes, act_dtype)
    ensure_intrin(name, lambda: _intrin(k_bytes, act_dtype))
    sch.tensorize(o1i, name)
    ensure_intrin(ZERO_INTRIN, _zero_intrin)
    sch.tensorize(sch.get_loops(init)[-3], ZERO_INTRIN)
    sch.compute_inline(acc)
    if NARROW in names:
        from .x86_ifma import tensorize_narrow

        tensorize_narrow(sch, NARROW)
    if last_name != NARROW:
        loop = sch.get_loops(sch.get_sblock(last_name))[-1]
        _, lanes = sch.split(loop, [None, LANES])  # one weight tile's channels: contiguous accumulators
        sch.vectorize(lanes)
    return {n for n in names[:k] if n == DATA}


def request_tiles(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with a first statement that asks Linux for the tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
    granted once a process; later calls return at once) and stops with a message where it is refused;
    then the tile configuration (palette 1, every tile 16 rows of 64 bytes), which each parallel task
    loads first (`ldtilecfg`: a thread's own state) and releases last."""
    ask = tirx.call_extern("int64", "syscall", tirx.const(SYS_ARCH_PRCTL, "int64"),
                           tirx.const(ARCH_REQ_XCOMP_PERM, "int64"), tirx.const(XFEATURE_XTILEDATA, "int64"))
    message = ("intforge: Linux refused this process AMX's tile data (arch_prctl ARCH_REQ_XCOMP_PERM): this "
               "library has AMX-INT8 kernels (target x86-amx, or x86 on a CPU with AMX) and runs on such a CPU "
               "under Linux 5.16 or later. Compile again for this machine (--target x86), or with INTFORGE_AMX=0.")
    # (TVM 0.27's Python AssertStmt passes (kind, condition) to a constructor that takes (condition, kind))
    check = tirx.AssertStmt(ask == tirx.const(0, "int64"), tvm.ir.StringImm("RuntimeError"),
                            [tvm.ir.StringImm(message)])
    cfg = tirx.decl_buffer((64,), "uint8", name="tile_config")
    settings = {0: 1, **{16 + 2 * t: K_STEP for t in range(8)}, **{48 + t: 16 for t in range(8)}}
    stores = [tirx.BufferStore(cfg, tirx.const(settings.get(q, 0), "uint8"), [tirx.const(q, "int32")])
              for q in range(64)]
    load = tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.x86.ldtilecfg", tirx.address_of(cfg[0])))
    release = tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    def configure(op):
        if isinstance(op, tirx.For) and op.kind == tirx.ForKind.PARALLEL:
            return tirx.For(op.loop_var, op.min, op.extent, op.kind, tirx.SeqStmt([load, op.body, release]),
                            op.thread_binding, op.annotations)
        return None

    body = map_stmt(func.body, configure)
    return func.with_body(tirx.SeqStmt([check, tirx.AllocBuffer(cfg), *stores, body]))


