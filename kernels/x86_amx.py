"""x86 AMX-INT8: integer GEMMs on the tile unit (`tdpbusd`/`tdpbssd`), for dense layers, 1x1 convs and
stride-1 windowed (3x3) convs.

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
views only). A windowed conv is the same register tile over a grid of its input (`conv_grid`), the
window's taps joining the reduction (`conv2d_amx`).

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
CONV_BLOCK = "conv_amx"  # a stride-1 conv with a window (3x3): the window's taps in the reduction
CONV_NARROW = f"{CONV_BLOCK}_narrow"
CONV_DATA = "data_conv_amx"  # its input padded, on the grid's rows (`conv_grid`)
WINDOW_WIDTH = "amx_window_width"  # the conv block's annotation: KW (the taps are one reduction axis)
SEGMENTS = "amx_segments"  # and the grid rows an output row takes (`conv_grid`)
CONV_VALID = "conv_amx_valid"  # a grid row's outputs (`conv2d_amx`)
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


@T.macro
def _tile_step(a0, a1, b0, b1, a_stride, b_stride, tdp):
    """One 64-channel step of a register tile: activation tiles tmm4-5 and weight tiles tmm6-7 loaded from
    the 4 addresses, then tmm0..3 += their 4 products (`tdp`: tdpbusd or tdpbssd)."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4), a0, T.int64(a_stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5), a1, T.int64(a_stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6), b0, T.int64(b_stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7), b1, T.int64(b_stride)))
    T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(0), T.int8(4), T.int8(6)))
    T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(1), T.int8(4), T.int8(7)))
    T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(2), T.int8(5), T.int8(6)))
    T.evaluate(T.call_llvm_intrin("void", tdp, T.int8(3), T.int8(5), T.int8(7)))


@T.macro
def _store_tiles(c0, c1, c2, c3, stride):
    """tmm0..3 stored to the 4 addresses, rows `stride` bytes apart."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(0), c0, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(1), c1, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(2), c2, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(3), c3, T.int64(stride)))


@T.macro
def _zero_tiles():
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(0)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(1)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(2)))
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(3)))


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
                _tile_step(A.access_ptr("r", offset=s * K_STEP), A.access_ptr("r", offset=16 * sa + s * K_STEP),
                           B.access_ptr("r", offset=s * 16 * sb1), B.access_ptr("r", offset=sb0 + s * 16 * sb1),
                           sa, sb1, tdp)
            _store_tiles(C.access_ptr("w"), C.access_ptr("w", offset=sc0), C.access_ptr("w", offset=16 * sc1),
                         C.access_ptr("w", offset=sc0 + 16 * sc1), sc1 * 4)

    return desc, impl


def conv_grid(out_width: int, kernel_width: int) -> tuple[int, int, int] | None:
    """(grid row width, grid rows a register tile, grid rows an output row) of a stride-1 conv, or None
    where it has no grid. The kernel computes every position of the grid: an output row is cut into
    `segments` equal runs of columns, each with its window's halo (KW - 1 input columns) on a grid row of
    16 or 32 positions (the positions past a run's outputs are discarded), so that a register tile's 32
    positions are one grid row (or two of 16) and each window tap's activation tile is 32 consecutive
    positions of the input laid out on the same grid. Every tile then holds the same output columns:
    the requantize after it needs no predicate (its intrinsic takes none)."""
    halo = kernel_width - 1
    if out_width + halo <= 16:
        return 16, 2, 1
    # (runs of at least 16 outputs: half of each tile's positions, at the least, outputs)
    segments = next((n for n in range(1, out_width // (ROWS // 2) + 1)
                     if out_width % n == 0 and out_width // n + halo <= ROWS), None)
    return None if segments is None else (ROWS, 1, segments)


def _conv_intrin(k: int, act_dtype: str, kh: int, kw: int, wg: int, rows: int, segments: int) -> tuple:
    """(description, implementation) of a stride-1 conv's register tile, its whole reduction over the
    kh x kw window and k input channels: C[2, rows, 32/rows, 16] += sum over taps t of A[r + t's offset, k]
    x B[2, t, k/4, 16, 4], position r of the tile at row r of A (the padded input, grid-wide rows)."""
    kb, taps, cols = k // GROUP, kh * kw, ROWS // rows
    span = ROWS + (kh - 1) * segments * wg + kw - 1 + (rows - 1) * (wg - cols)
    tap_rows = segments * wg  # a window row further down: the next input row's run, `segments` grid rows on
    tdp = INSTRUCTION[act_dtype]
    second = rows - 1  # positions 16-31 of a tile: the grid's second row (of 16), else 16 on in the row

    @T.prim_func(s_tir=True)
    def desc_two_rows(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (span, k), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, taps, kb, LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, rows, cols, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:2, 0:rows, 0:cols, 0:LANES], A[0:span, 0:k], B[0:2, 0:taps, 0:kb, 0:LANES, 0:GROUP])
            T.writes(C[0:2, 0:rows, 0:cols, 0:LANES])
            for o1, i, j, o2, t, rk, ri in T.grid(2, rows, cols, LANES, taps, kb, GROUP):
                with T.sblock("update"):
                    vo1, vi, vj, vo2, vt, vk, vr = T.axis.remap("SSSSRRR", [o1, i, j, o2, t, rk, ri])
                    C[vo1, vi, vj, vo2] = C[vo1, vi, vj, vo2] + (
                        T.cast(A[vi * wg + vt // kw * tap_rows + vj + vt % kw, vk * GROUP + vr], "int32")
                        * T.cast(B[vo1, vt, vk, vo2, vr], "int32"))

    @T.prim_func(s_tir=True)
    def desc_one_row(a: T.handle, b: T.handle, c: T.handle) -> None:  # (no loop of extent 1 over the rows)
        A = T.match_buffer(a, (span, k), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, taps, kb, LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, rows, cols, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:2, 0:rows, 0:cols, 0:LANES], A[0:span, 0:k], B[0:2, 0:taps, 0:kb, 0:LANES, 0:GROUP])
            T.writes(C[0:2, 0:rows, 0:cols, 0:LANES])
            for o1, j, o2, t, rk, ri in T.grid(2, cols, LANES, taps, kb, GROUP):
                with T.sblock("update"):
                    vo1, vj, vo2, vt, vk, vr = T.axis.remap("SSSRRR", [o1, j, o2, t, rk, ri])
                    C[vo1, 0, vj, vo2] = C[vo1, 0, vj, vo2] + (
                        T.cast(A[vt // kw * tap_rows + vj + vt % kw, vk * GROUP + vr], "int32")
                        * T.cast(B[vo1, vt, vk, vo2, vr], "int32"))

    desc = desc_two_rows if rows == 2 else desc_one_row

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sb2 = T.int32()
        sb3 = T.int32()
        sc0 = T.int32()
        sc1 = T.int32()
        sc2 = T.int32()
        A = T.match_buffer(a, (span, k), act_dtype, offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (2, taps, kb, LANES, GROUP), "int8", offset_factor=1, strides=[sb0, sb1, sb2, sb3, 1])
        C = T.match_buffer(c, (2, rows, cols, LANES), "int32", offset_factor=1, scope=ACC_SCOPE,
                           strides=[sc0, sc1, sc2, 1])
        with T.sblock("root"):
            T.reads(C[0:2, 0:rows, 0:cols, 0:LANES], A[0:span, 0:k], B[0:2, 0:taps, 0:kb, 0:LANES, 0:GROUP])
            T.writes(C[0:2, 0:rows, 0:cols, 0:LANES])
            # (tmm0..3 zeroed by the init's intrinsic; positions 16-31 of the tile are A's rows 16-31 past
            # the tap's first, on the grid's rows of `cols` positions)
            for t in range(taps):
                for s in range(k // K_STEP):
                    _tile_step(A.access_ptr("r", offset=(t // kw * tap_rows + t % kw) * sa + s * K_STEP),
                               A.access_ptr("r", offset=(t // kw * tap_rows + t % kw + 16) * sa + s * K_STEP),
                               B.access_ptr("r", offset=t * sb1 + s * 16 * sb2),
                               B.access_ptr("r", offset=sb0 + t * sb1 + s * 16 * sb2), sa, sb2, tdp)
            # tiles of 16 positions: C[o1] positions 0-15 and 16-31 (one row of 32, or the second row of 16)
            _store_tiles(C.access_ptr("w"), C.access_ptr("w", offset=sc0),
                         C.access_ptr("w", offset=second * sc1 + (1 - second) * 16 * sc2),
                         C.access_ptr("w", offset=sc0 + second * sc1 + (1 - second) * 16 * sc2), sc2 * 4)

    return desc, impl


def _zero_intrin(rows: int = 0) -> tuple:
    """(description, implementation) of a register tile's init: its 4 accumulator tiles zeroed in the tile
    unit (`tilezero`), where the reduction's intrinsic, which runs right after, takes them. `rows`: a
    conv's tile, [2, rows, 32 / rows, 16]; 0: a dense layer's, [2, 32, 16]."""
    if rows == 1:
        @T.prim_func(s_tir=True)
        def desc1(c: T.handle) -> None:
            C = T.match_buffer(c, (2, 1, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:2, 0:1, 0:ROWS, 0:LANES])
                for o1, j, o2 in T.grid(2, ROWS, LANES):
                    with T.sblock("init"):
                        vo1, vj, vo2 = T.axis.remap("SSS", [o1, j, o2])
                        C[vo1, 0, vj, vo2] = T.int32(0)

        @T.prim_func(s_tir=True)
        def impl1(c: T.handle) -> None:
            C = T.match_buffer(c, (2, 1, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:2, 0:1, 0:ROWS, 0:LANES])
                _zero_tiles()

        return desc1, impl1
    if rows:
        cols = ROWS // rows

        @T.prim_func(s_tir=True)
        def desc(c: T.handle) -> None:
            C = T.match_buffer(c, (2, rows, cols, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:2, 0:rows, 0:cols, 0:LANES])
                for o1, i, j, o2 in T.grid(2, rows, cols, LANES):
                    with T.sblock("init"):
                        vo1, vi, vj, vo2 = T.axis.remap("SSSS", [o1, i, j, o2])
                        C[vo1, vi, vj, vo2] = T.int32(0)

        @T.prim_func(s_tir=True)
        def impl(c: T.handle) -> None:
            C = T.match_buffer(c, (2, rows, cols, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:2, 0:rows, 0:cols, 0:LANES])
                _zero_tiles()

        return desc, impl

    @T.prim_func(s_tir=True)
    def desc2(c: T.handle) -> None:
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            for o1, i, o2 in T.grid(2, ROWS, LANES):
                with T.sblock("init"):
                    vo1, vi, vo2 = T.axis.remap("SSS", [o1, i, o2])
                    C[vo1, vi, vo2] = T.int32(0)

    @T.prim_func(s_tir=True)
    def impl2(c: T.handle) -> None:
        C = T.match_buffer(c, (2, ROWS, LANES), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:2, 0:ROWS, 0:LANES])
            _zero_tiles()

    return desc2, impl2


def zero_intrin(rows: int = 0) -> str:
    name = f"intforge_amx_zero_32x32_{rows}"
    ensure_intrin(name, lambda: _zero_intrin(rows))
    return name


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


def conv_supported(x_shape: tuple[int, ...], out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], x_dtype: str) -> bool:
    """Whether a groups-1 NHWC conv (input `x_shape`) runs on the windowed tile kernel (`conv2d_amx`): stride
    1, no dilation, a window (1x1 convs are `dense_amx`'s), whole 64-channel steps and 32-channel tiles,
    one image, and where a register tile is two grid rows, an even number of output rows (an odd one's
    last tile would have a row past the output, and the requantize's intrinsic takes no row predicate)."""
    n, h, w, c = (int(d) for d in x_shape)
    kh, kw = (int(d) for d in kernel)
    if not (x_dtype in INSTRUCTION and n == 1 and c % K_STEP == 0 and out_channels % COLS == 0
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and (kh, kw) != (1, 1)):
        return False
    grid = conv_grid(w + 2 * padding[1] - kw + 1, kw)
    return grid is not None and (h + 2 * padding[0] - kh + 1) % grid[1] == 0


def conv2d_amx(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_channels: int,
               padding: tuple[int, int], kernel: tuple[int, int], narrow: Narrow | None = None) -> te.Tensor:
    """x: [1, H, W, C] uint8 or int8 (`conv_supported`); wp: [O/16, KH * KW, C/4, 16, 4] int8 (the VNNI
    conv layout, its window flattened); -> [1, OH, OW, O] int32 (plus `correction`), or with `narrow` the
    requantized 8-bit output. The input is padded onto the grid's rows (`conv_grid`), with rows to spare
    below for the last tiles' taps; the kernel computes every grid position and the epilogue writes the
    output's."""
    _, h, w, c = (int(d) for d in x.shape)
    nb = int(wp.shape[0])
    kh, kw = kernel
    ph, pw = padding
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    wg, rows, segments = conv_grid(ow, kw)
    seg = ow // segments
    ohc = blocks(oh, rows) * rows

    def packed(q, ch):  # grid row g: input row g // segments, its run g % segments (with the run's halo)
        g, pos = q // wg, q % wg
        r, col = g // segments - ph, (g % segments) * seg + pos - pw
        return tirx.if_then_else(tirx.all(r >= 0, r < h, col >= 0, col < w), x[0, r, col, ch], tirx.const(0, x.dtype))

    xp = te.compute(((ohc + kh) * segments * wg, c), packed, name=CONV_DATA)
    rt, rk, ri = (te.reduce_axis((0, kh * kw), "rt"), te.reduce_axis((0, c // GROUP), "rk"),
                  te.reduce_axis((0, GROUP), "ri"))
    acc = te.compute((nb, ohc * segments, wg, LANES), lambda o1, g, j, o2: te.sum(
        xp[(g + rt // kw * segments) * wg + j + rt % kw, rk * GROUP + ri].astype("int32")
        * wp[o1, rt, rk, o2, ri].astype("int32"), axis=[rt, rk, ri]), name=CONV_BLOCK,
        attrs={WINDOW_WIDTH: kw, SEGMENTS: segments})

    # the positions of each grid row that are outputs: what the epilogue reads, a stage of its own while the
    # schedule places the epilogue (so that each register tile's outputs are exactly its run's), then inlined
    valid = te.compute((nb, ohc * segments, seg, LANES), lambda o1, g, j, o2: acc[o1, g, j, o2], name=CONV_VALID)

    def grid(o, i, j):  # output (i, j)'s accumulator
        return valid[o // LANES, i * segments + j // seg, j % seg, o % LANES]

    if narrow is not None:
        if correction is None:
            raise ValueError("the ClampFirst epilogue needs its correction (which holds -lo)")
        return te.compute((1, oh, ow, out_channels), lambda b, i, j, o: narrow.value(
            grid(o, i, j), correction[o], o), name=CONV_NARROW, attrs=narrow.attrs)
    return te.compute((1, oh, ow, out_channels), lambda b, i, j, o: add_correction(
        grid(o, i, j), correction, o), name=f"{CONV_BLOCK}_out")


def schedule_amx_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a function built around `dense_amx` or `conv2d_amx`; None where it has neither. A parallel
    task is one row tile (32 rows, or a grid row or two) by one or more 32-channel tiles (`MIN_TASKS`);
    each register tile's reduction is one tensor intrinsic, its init another (`tilezero`), its
    accumulators go to a 4 KB scratch, and the epilogue (tensorized requantize, or the int32 output
    vectorized) reads them back right there. Returns the names of the blocks left to the default rule
    (the padded input's copy)."""
    found = find_block(sch, BLOCK)
    conv = found is None
    if conv:
        found = find_block(sch, CONV_BLOCK)
    if found is None:
        return None
    narrow = CONV_NARROW if conv else NARROW
    blocks_, names, k = found
    block, epilogue = blocks_[k], blocks_[k + 1:]
    valid = epilogue.pop(0) if conv else None
    staged = next((b for b in epilogue[:-1] if sch.get(b).name_hint == narrow), None)
    for b in epilogue[:-1]:  # elementwise stages between the accumulators and the last: one block
        if b != staged:
            sch.compute_inline(b)
    last, last_name = epilogue[-1], sch.get(epilogue[-1]).name_hint
    act_dtype = next(str(r.source.dtype) for r in sch.get(block).reads if len(r.source.shape) == 2)
    acc = sch.cache_write(block, 0, ACC_SCOPE)
    if conv:
        o1, i, j, o2, rt, rk, ri = sch.get_loops(block)
        wg = int(sch.get(j).extent)
        rows = 2 if wg == 16 else 1
        o1o, o1i = sch.split(o1, [None, COLS // LANES])
        io, ii = sch.split(i, [None, rows]) if rows > 1 else (i, None)  # (no loop of extent 1: the intrinsic has none)
        jo, ji = sch.split(j, [None, ROWS // rows])
        kw, segments = (int(sch.get(block).annotations[key]) for key in (WINDOW_WIDTH, SEGMENTS))
        kernel = (int(sch.get(rt).extent) // kw, kw)
        inner = (o1i, ii, ji) if ii is not None else (o1i, ji)
        sch.reorder(io, jo, o1o, *inner, o2, rt, rk, ri)
        io = sch.fuse(io, jo)
        reduction = (o2, rt, rk, ri)
        k_bytes = int(sch.get(rk).extent) * GROUP
        name = f"intforge_amx_conv_{act_dtype}_{k_bytes}_{kernel[0]}x{kernel[1]}_{wg}x{segments}"
        ensure_intrin(name, lambda: _conv_intrin(k_bytes, act_dtype, *kernel, wg, rows, segments))
    else:
        o1, i, o2, rk, ri = sch.get_loops(block)
        k_bytes = int(sch.get(rk).extent) * GROUP
        o1o, o1i = sch.split(o1, [None, COLS // LANES])
        io, ii = sch.split(i, [None, ROWS])
        reduction = (o2, rk, ri)
        inner = (o1i, ii)
        rows = 0
        name = intrin_name(k_bytes, act_dtype)
        ensure_intrin(name, lambda: _intrin(k_bytes, act_dtype))
    row_tiles, col_tiles = int(sch.get(io).extent), int(sch.get(o1o).extent)
    # a task: one row tile by as many channel tiles as leave MIN_TASKS tasks (configured once, its
    # activation tiles read from L1 after the first)
    per_task = max(d for d in range(1, col_tiles + 1)
                   if d == 1 or col_tiles % d == 0 and row_tiles * (col_tiles // d) >= MIN_TASKS)
    o1a, o1b = sch.split(o1o, [None, per_task])
    sch.reorder(io, o1a, o1b, *inner, *reduction)
    task = sch.fuse(io, o1a)
    sch.parallel(task)
    tile = o1b
    sch.reverse_compute_at(acc, tile)
    if valid is not None:
        sch.reverse_compute_at(valid, tile)
    if staged is not None:
        sch.reverse_compute_at(staged, tile)
    sch.reverse_compute_at(last, tile)
    init = sch.decompose_reduction(block, o1i)
    sch.tensorize(o1i, name)
    sch.tensorize(sch.get_loops(init)[-(len(inner) + 1)], zero_intrin(rows))
    if valid is not None:
        sch.compute_inline(valid)
    sch.compute_inline(acc)
    if narrow in names:
        from .x86_ifma import tensorize_narrow

        tensorize_narrow(sch, narrow)
    if last_name != narrow:
        loop = sch.get_loops(sch.get_sblock(last_name))[-1]
        _, lanes = sch.split(loop, [None, LANES])  # one weight tile's channels: contiguous accumulators
        sch.vectorize(lanes)
    return {n for n in names[:k] if n in (DATA, CONV_DATA)}


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


