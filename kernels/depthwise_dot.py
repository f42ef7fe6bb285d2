"""Depthwise conv2d in NHWC as per-lane dot products: x86 `vpdpbusd` with the kernel's rows as the 4 bytes.

`vpdpbusd` sums 4 byte products into each of 16 int32 lanes. In a depthwise conv there is no channel
reduction, so the 4 bytes of a lane are taken from the window instead: for output row i, a packing stage
builds P[j, c] = x[i*sh, j, c] | x[i*sh + dh, j, c] << 8 | x[i*sh + 2*dh, j, c] << 16 (one uint32 a
channel: the kernel's KH <= 4 rows at input column j), and the weights are laid out at compile time as
Wr[rw, c] = w[0, rw, c] | w[1, rw, c] << 8 | w[2, rw, c] << 16. Output (i, j) of 16 channels is then KW
instructions: acc += dot4(P[j*sw + rw*dw], Wr[rw]). A 3x3 window is 3 `vpdpbusd` per 16 outputs where
the channel-vectorized kernel (kernels/depthwise.py) widens and multiplies 9 times and adds 8.

The packing stage is three zero-extending loads, two shifts and two ors per 16 channels of a column, run
per tile of output pixels (a column feeds KW/sw outputs). With stride 1 down the rows and KH < 4
(`row_pairs`), output rows go in pairs: a column packs the KH + 1 rows both read, and row i takes them with
its window in bytes 0..KH-1, row i + 1 with it in bytes 1..KH (weights [2, KW, C/16, 16, 4]), so one
packed column feeds two instructions and the packing is 4 loads, 3 shifts and 3 ors per two rows
(MobileNetV2's stride-1 depthwise convs: 10-20% faster alone). Signed activations go in as a + 128 (padding:
128, an original 0) and `correction[c] = -128 * sum(w[:, :, c])` restores the exact sum, as in
`blocked_dot`; the fourth byte pairs with a zero weight. The int32 lanes wrap like the reference's int32
arithmetic, so the result is bit-exact. INT4 weights stay packed, 64 to a 32-byte block, and each row
unpacks a channel block's KW blocks in registers (`blocked_dot`'s unpack stage). Only x86 with VNNI takes
this path (channels a multiple of 16, KH <= 4); other depthwise convs keep kernels/depthwise.py.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from intforge.reference import pool_output_size

from .blocked_dot import (
    ACC_SCOPE,
    INT4_BLOCK,
    STACK_BYTES,
    Narrow,
    _as_act,
    _unpack_at,
    _unpacked,
    add_correction,
    ensure_intrin,
)
from .stages import find_block, vectorize_inner
from .x86_vnni import VNNI

DWDOT_BLOCK = "dwconv_dot"
NARROW_BLOCK = f"{DWDOT_BLOCK}_narrow"  # the output stage in dyadic.ClampFirst's form (kernels/x86_ifma.py)
PACK_BLOCK = "dw_rows"  # the packing stage: KH input rows -> one uint32 per channel and column
LANES = VNNI.lanes  # int32 accumulators of one vpdpbusd
ROWS = VNNI.group  # bytes reduced per lane: the window rows one instruction takes
INTRIN = "intforge_dot_16x4_lanes_u8s8s32_vnni"
TILE_PIXELS = 8  # output pixels per register tile, at most


def supported(channels: int, kh: int) -> bool:
    """Whether a depthwise conv fits this kernel: whole 16-channel blocks, at most 4 kernel rows."""
    return channels % LANES == 0 and kh <= ROWS


def row_pairs(h: int, kh: int, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> bool:
    """Whether output rows go in pairs: stride and dilation 1 down the rows and KH < 4, so that the
    KH + 1 input rows two neighbouring output rows read fit one lane's 4 bytes, and an even number of
    rows (MobileNetV2's stride-1 depthwise convs but the 7x7 ones). A packed column then serves both
    rows: row i with the window's rows in bytes 0..KH-1, row i + 1 with them in bytes 1..KH."""
    oh = pool_output_size(h, kh, stride[0], padding[0], dilation[0], False)
    return stride[0] == 1 and dilation[0] == 1 and kh < ROWS and oh % 2 == 0 and oh >= 4


def weight_layout(w_hwc: np.ndarray, pairs: bool = False) -> np.ndarray:
    """[KH, KW, C] int8 -> [KW, C/16, 16, 4] int8: row t of the window in byte t of a lane, zero past KH;
    one 64-byte block per instruction, the layout of `blocked_dot`'s VNNI weights (INT4 weights are
    packed from it with `blocked_dot.pack_int4_blocks` and unpacked by its in-kernel stage). With `pairs`,
    [2, KW, C/16, 16, 4]: the first output row's weights, then the second's, one byte later."""
    kh, kw, c = w_hwc.shape
    out = np.zeros((2 if pairs else 1, kw, c, ROWS), np.int8)
    for r in range(out.shape[0]):
        out[r, :, :, r:r + kh] = w_hwc.transpose(1, 2, 0)
    out = out.reshape(-1, kw, c // LANES, LANES, ROWS)
    return out if pairs else out[0]


def _byte(p, t):
    """Byte t of a packed uint32 column, as int32: the expression the intrinsic's description matches."""
    return tirx.Cast("int32", tirx.bitwise_and(tirx.shift_right(p, tirx.Cast("uint32", t * 8)),
                                               tirx.const(255, "uint32")))


def depthwise_dot(x: te.Tensor, w: te.Tensor, correction: te.Tensor | None, stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int], kh: int, narrow: Narrow | None = None,
                  pairs: bool = False) -> te.Tensor:
    """x: [N, H, W, C] int8/uint8, w: [KW, C/16, 16, 4] int8 (`weight_layout`), or INT4 packed per block
    [KW, C/16, 32], correction: [C] int32 for signed x -> [N, OH, OW, C] int32; with `narrow`, the 8-bit
    output of the `dyadic.ClampFirst` epilogue (its -lo in `correction`), as `blocked_dot.conv2d_blocked`."""
    lead = 3 if pairs else 2  # [2,] KW, C/16
    if len(w.shape) == lead + 1:  # packed INT4: a row's channel block unpacks its KW weight blocks in registers
        w = _unpacked(w, lead, VNNI)
    n, h, wd, c = (int(d) for d in x.shape)
    kw = int(w.shape[lead - 2])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)
    wp = wd + 2 * pw
    pad_value = _as_act(tirx.const(0, x.dtype), x.dtype, VNNI).astype("uint32")

    def act(b, r, col, ch):  # an input byte as the instruction's unsigned byte, zero outside the image
        inside = tirx.all(r >= 0, r < h, col >= 0, col < wd)
        return tirx.if_then_else(inside, _as_act(x[b, r, col, ch], x.dtype, VNNI).astype("uint32"), pad_value)

    def pack(b, i, j, ch):  # i: an output row, or with pairs a pair of them
        total = None
        for t in range(kh + 1 if pairs else kh):
            v = act(b, (2 * i if pairs else i * sh) + t * dh - ph, j - pw, ch)
            v = v if t == 0 else tirx.shift_left(v, tirx.const(8 * t, "uint32"))
            total = v if total is None else tirx.bitwise_or(total, v)
        return total

    packed = te.compute((n, oh // 2 if pairs else oh, wp, c), pack, name=PACK_BLOCK)
    rw, rt = te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, ROWS), "rt")

    def weight(i, rw, ch, rt):
        return (w[i % 2, rw, ch // LANES, ch % LANES, rt] if pairs else w[rw, ch // LANES, ch % LANES, rt])

    acc = te.compute((n, oh, ow, c), lambda b, i, j, ch: te.sum(
        _byte(packed[b, i // 2 if pairs else i, j * sw + rw * dw, ch], rt) * weight(i, rw, ch, rt).astype("int32"),
        axis=[rw, rt]),
        name=DWDOT_BLOCK, attrs={"dw_stride": sw, "dw_span": (kw - 1) * dw + 1,  # for the tile size
                                 "dw_pairs": int(pairs)})
    if narrow is not None:
        return te.compute((n, oh, ow, c), lambda b, i, j, ch: narrow.value(acc[b, i, j, ch], correction[ch], ch),
                          name=NARROW_BLOCK, attrs=narrow.attrs)
    if correction is None:
        return acc
    return te.compute((n, oh, ow, c), lambda b, i, j, ch: add_correction(acc[b, i, j, ch], correction, ch),
                      name=f"{DWDOT_BLOCK}_out")


def window_rows_intrin(lanes: int, parts: int, weight_dtype: str, part, product) -> tuple:
    """(description, implementation) of a window-rows kernel's instruction (this one, kernels/
    depthwise_avx2.py): C[i] += sum over k of part(A[i], k) * B[i, k], A `lanes` packed uint32 columns,
    B their `parts` weights each. The description is `part` itself, the expression the kernel's block
    computes; `product(A, B, C)` is the instruction, the new accumulator vector."""
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), "uint32", offset_factor=1)
        B = T.match_buffer(b, (lanes, parts), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes, 0:parts])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, parts):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + part(A[vi], vk) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), "uint32", offset_factor=1)
        B = T.match_buffer(b, (lanes, parts), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes, 0:parts])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = product(A, B, C)

    return desc, impl


def _intrin() -> tuple:
    """`vpdpbusd`: the 4 bytes of each lane by its 4 weights."""
    return window_rows_intrin(LANES, ROWS, "int8", _byte, lambda A, B, C: T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
        T.reinterpret(A.vload([0], "uint32x16"), dtype="uint8x64"), B.vload([0, 0], dtype="int8x64"),
        dtype="int32x16"))


def tile_pixels(width: int, block, lanes: int, packs: int = 1) -> int:
    """Output pixels per register tile of a window-rows kernel (this one, kernels/depthwise_avx2.py): the
    largest divisor of the row, at most TILE_PIXELS, whose accumulators (`lanes` int32 a pixel, both rows
    of a pair) and packed input columns (`packs` uint32 a lane and column) both stay under STACK_BYTES, so
    both live on the stack (the accumulators in registers), not in TVM's workspace pool."""
    stride, span, pairs = (int(block.annotations[k]) for k in ("dw_stride", "dw_span", "dw_pairs"))

    def fits(d: int) -> bool:
        return ((1 + pairs) * d * lanes * 4 < STACK_BYTES
                and ((d - 1) * stride + span) * lanes * 4 * packs < STACK_BYTES)

    return max((d for d in range(1, TILE_PIXELS + 1) if width % d == 0 and fits(d)), default=1)


def tile_and_tensorize(sch: s_tir.Schedule, block, last, lanes: int, packs: int, intrin: str,
                       make_intrin) -> tuple:
    """The schedule both window-rows kernels share: a parallel task per output row (per pair of rows with
    `dw_pairs`), in it per channel block of `lanes` the row in tiles of `tile_pixels` outputs, the tile's
    sums (cached in ACC_SCOPE) and its epilogue block `last` (or None) right after its products, the
    products tensorized on `intrin` over the channel block. Returns (accumulator block, channel block
    loop, tile loop); the caller schedules the epilogue and the packing stage."""
    acc = sch.cache_write(block, 0, ACC_SCOPE)
    b_, i, j, ch, *reduce, rt = sch.get_loops(block)
    co, ci = sch.split(ch, [None, lanes])
    jo, ji = sch.split(j, [None, tile_pixels(int(sch.get(j).extent), sch.get(block), lanes, packs)])
    pairs = int(sch.get(block).annotations["dw_pairs"])
    i2 = None
    if pairs:  # both rows of a pair under each packed column: one load feeds two instructions
        i, i2 = sch.split(i, [None, 2])
    outer = [b_, i]
    if int(sch.get(b_).extent) * int(sch.get(i).extent) % 2 and int(sch.get(co).extent) % 2 == 0:
        # An odd number of row tasks splits unevenly over an even pool (MobileNetV2's 14x14 rows in pairs,
        # 7 tasks: 4 on one thread, 3 on the other), so each row's channel blocks go as two tasks. (As the
        # outermost loop, one half of every row per thread, it was slower; Zen 3, 2026-12-05.)
        half, co = sch.split(co, [2, None])
        outer.append(half)
    sch.reorder(*outer, co, jo, *reduce, *([ji, i2, ci, rt] if pairs else [ji, ci, rt]))
    par = sch.fuse(*outer)
    sch.parallel(par)
    sch.reverse_compute_at(acc, jo)
    if last is not None:
        sch.reverse_compute_at(last, jo)
    init = sch.decompose_reduction(block, reduce[0])
    ensure_intrin(intrin, make_intrin)
    sch.tensorize(ci, intrin)
    sch.unroll(ji)
    if pairs:
        sch.unroll(i2)
    sch.vectorize(sch.get_loops(init)[-1])
    return acc, co, jo


def schedule_depthwise_dot_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around a dwconv_dot block; None when it has none. Returns the
    names of the blocks left for the default rule (none)."""
    found = find_block(sch, DWDOT_BLOCK)
    if found is None:
        return None
    blocks, names, k = found
    block, epilogue = blocks[k], blocks[k + 1:]
    for b in epilogue[:-1]:  # correction, dyadic multiply, shift, clamp, cast: one block per tile
        sch.compute_inline(b)
    last = epilogue[-1]
    acc, co, jo = tile_and_tensorize(sch, block, last, LANES, 1, INTRIN, _intrin)
    try:
        sch.compute_inline(acc)
    except s_tir.ScheduleError:
        sch.vectorize(sch.get_loops(acc)[-1])
    if sch.get(last).name_hint == NARROW_BLOCK:  # alone: its 16 channels as one intrinsic
        from .x86_ifma import narrow_intrin

        sch.tensorize(sch.get_loops(last)[-1], narrow_intrin(sch.get(last)))
    else:
        vectorize_inner(sch, sch.get_loops(last)[-1], most=LANES)
    # the packed columns a tile reads, built right before it: a few bytes a column, on the stack
    pack = blocks[names.index(PACK_BLOCK)]
    sch.compute_at(pack, jo, preserve_unit_loops=True)
    vectorize_inner(sch, sch.get_loops(pack)[-1], most=LANES)
    if INT4_BLOCK in names:  # a channel block's KW weight blocks, unpacked once per output row
        _unpack_at(sch, blocks[names.index(INT4_BLOCK)], co)
    return set()
