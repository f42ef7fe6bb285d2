"""x86 AVX512-VNNI conv2d and dense: `vpdpbusd` through TVM tensorization.

Layout: 16 output channels per vector lane group, 4 input channels per lane. Weights are pre-packed at
compile time to [O/16, KH, KW, C/4, 16, 4] (dense: [N/16, K/4, 16, 4]), so one 64-byte load feeds one
`vpdpbusd`; the activation's 4 bytes are broadcast to all 16 lanes. Channels are padded to the blocks
with zero weights. `vpdpbusd` multiplies unsigned by signed bytes: signed activations are shifted to
unsigned (a + 128) in the packing stage and `correction[o] = -128 * sum(w[o])` restores the exact sum.
The int32 lanes wrap like the reference's int32 arithmetic, so the result is bit-exact.

INT4 weights stay packed in the kernel: each 64-weight block (16 channels x 4) is 32 bytes, weight t in
the low nibble of byte t and weight t + 32 in the high one ([O/16, KH, KW, C/4, 32]; dense [N/16, K/4, 32]).
A small stage unpacks one block into 64 int8 right before the `vpdpbusd`s that use it (vector and, xor,
subtract on bytes: ((n ^ 8) - 8) sign-extends a nibble n), so no int8 copy of the weights is ever made.

TVM ships a `dot_16x4_vnni` intrinsic, but its LLVM call passes <16 x i32> operands where LLVM 22's
`llvm.x86.avx512.vpdpbusd.512` takes <64 x i8>, and the module fails verification; ours passes bytes.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from intforge.reference import pool_output_size

from .dot_product import SHIFT
from .stages import compute_inputs_at, vectorize_inner

LANES = 16  # int32 accumulators per zmm register
GROUP = 4  # bytes reduced per lane
VNNI_INTRIN = "intforge_dot_16x4_u8s8s32_vnni"
CONV_BLOCK = "conv_vnni"
DENSE_BLOCK = "dense_vnni"
INT4_BLOCK = "weight_int4"  # the in-kernel unpack stage of packed INT4 weights
BLOCK = LANES * GROUP  # weights per vpdpbusd: 64, packed INT4 in 32 bytes


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            a,
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni)


def blocks(n: int, size: int) -> int:
    return -(-n // size)


def pack_vnni_int4(w: np.ndarray) -> np.ndarray:
    """VNNI-laid-out INT4 weights [..., 16, 4] (values in [-8, 7]) -> [..., 32] bytes: weight t of each
    64-block in the low nibble of byte t, weight t + 32 in the high nibble."""
    flat = w.reshape(*w.shape[:-2], BLOCK).astype(np.int64) & 0xF
    return (flat[..., :BLOCK // 2] | (flat[..., BLOCK // 2:] << 4)).astype(np.uint8).view(np.int8)


def _unpacked(wq: te.Tensor, lead: int) -> te.Tensor:
    """The in-kernel unpack stage: packed [..., 32] int8 -> [..., 16, 4] int8 (`lead` leading axes).
    (n ^ 8) - 8 on a byte is the same sign extension as `int4.unpack_int4`'s shift pair, written on bytes
    so LLVM vectorizes it 64 lanes wide; test_int4 checks the two against each other on every nibble."""

    def fcompute(*idx):
        *head, o2, rci = idx
        t = o2 * GROUP + rci
        byte = tirx.reinterpret("uint8", wq[(*head, tirx.floormod(t, BLOCK // 2))])
        nibble = tirx.if_then_else(t < BLOCK // 2, byte & tirx.const(0xF, "uint8"),
                                   tirx.shift_right(byte, tirx.const(4, "uint8")))
        return tirx.reinterpret("int8", nibble ^ tirx.const(8, "uint8")) - tirx.const(8, "int8")

    return te.compute((*wq.shape[:lead], LANES, GROUP), fcompute, name=INT4_BLOCK)


def _as_unsigned(v, signed: bool):
    return (v.astype("int32") + SHIFT).astype("uint8") if signed else v


def conv2d_vnni(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_channels: int,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                layout: str = "NCHW") -> te.Tensor:
    """x: [N, C, H, W] (or [N, H, W, C] with layout "NHWC") int8/uint8; wp: [O/16, KH, KW, C/4, 16, 4] int8
    (packed); -> int32 in the same layout as x.

    In NHWC the channels of a pixel are contiguous, so the packing stage is a plain copy, and it is
    skipped when there is nothing to do (unsigned input, no padding, channels a multiple of 4): the
    kernel then reads its input where the previous layer wrote it. The output is written 16 channels at
    a time."""
    nhwc = layout == "NHWC"
    if len(wp.shape) == 5:  # packed INT4: unpacked block by block inside the kernel
        wp = _unpacked(wp, 4)
    n, c, h, wd = (int(d) for d in ((x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if nhwc else x.shape))
    ob, kh, kw, cb = (int(d) for d in wp.shape[:4])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)
    signed = x.dtype == "int8"

    def _x(b, ch, i, j):
        return x[b, i, j, ch] if nhwc else x[b, ch, i, j]

    def _packed(b, i, j, ch):
        inside = tirx.all(i >= ph, i < h + ph, j >= pw, j < wd + pw, ch < c)
        v = _as_unsigned(_x(b, ch, i - ph, j - pw), signed)
        return tirx.if_then_else(inside, v, tirx.const(SHIFT if signed else 0, "uint8"))

    if nhwc and not signed and ph == pw == 0 and c == cb * GROUP:
        xp = x
    else:
        xp = te.compute((n, h + 2 * ph, wd + 2 * pw, cb * GROUP), _packed, name="data_vnni")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    rcb, rci = te.reduce_axis((0, cb), "rcb"), te.reduce_axis((0, GROUP), "rci")
    conv = te.compute(
        (n, ob, oh, ow, LANES),
        lambda b, o1, i, j, o2: te.sum(
            xp[b, i * sh + rh * dh, j * sw + rw * dw, rcb * GROUP + rci].astype("int32")
            * wp[o1, rh, rw, rcb, o2, rci].astype("int32"), axis=[rh, rw, rcb, rci]),
        name=CONV_BLOCK)

    def _out(b, o, i, j):
        v = conv[b, o // LANES, i, j, o % LANES]
        return v + correction[o] if correction is not None else v

    if nhwc:
        return te.compute((n, oh, ow, out_channels), lambda b, i, j, o: _out(b, o, i, j), name="conv_vnni_out")
    return te.compute((n, out_channels, oh, ow), _out, name="conv_vnni_out")


def dense_vnni(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_features: int) -> te.Tensor:
    """x: [M, K] int8/uint8; wp: [N/16, K/4, 16, 4] int8, or [N/16, K/4, 32] packed INT4; -> [M, N] int32."""
    if len(wp.shape) == 3:
        wp = _unpacked(wp, 2)
    m, k = (int(d) for d in x.shape)
    nb, kb = (int(d) for d in wp.shape[:2])
    signed = x.dtype == "int8"
    xp = te.compute((m, kb * GROUP), lambda i, j: tirx.if_then_else(
        j < k, _as_unsigned(x[i, j], signed), tirx.const(0, "uint8")), name="data_vnni")
    rkb, rki = te.reduce_axis((0, kb), "rkb"), te.reduce_axis((0, GROUP), "rki")
    acc = te.compute((m, nb, LANES), lambda i, o1, o2: te.sum(
        xp[i, rkb * GROUP + rki].astype("int32") * wp[o1, rkb, o2, rki].astype("int32"), axis=[rkb, rki]),
        name=DENSE_BLOCK)

    def _out(i, o):
        v = acc[i, o // LANES, o % LANES]
        return v + correction[o] if correction is not None else v

    return te.compute((m, out_features), _out, name="dense_vnni_out")


def _spatial_block(extent: int, most: int = 8) -> int:
    """Output pixels per register block: the largest divisor of the row width up to `most`."""
    return max(d for d in range(1, most + 1) if extent % d == 0)


def schedule_vnni_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around a conv_vnni / dense_vnni block. Returns None when the
    function has none of ours, else the names of the blocks left for the default rule (input packing).

    The accumulator tile (pixels x 32 channels for conv, 16 channels for dense) lives in a local buffer,
    which LLVM keeps in zmm registers for the whole reduction; the 16x4 inner product is tensorized to
    vpdpbusd; and the requantize epilogue is inlined into one block computed per tile, inside the same
    parallel loop, so the int32 accumulators never make a round trip through memory.
    """
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    kind = CONV_BLOCK if CONV_BLOCK in names else DENSE_BLOCK if DENSE_BLOCK in names else None
    if kind is None:
        return None
    k = names.index(kind)
    block, epilogue = blocks[k], blocks[k + 1:]
    for b in epilogue[:-1]:  # conv_vnni_out, bias add, dyadic multiply, shift, clamp, cast: one block
        sch.compute_inline(b)
    last = epilogue[-1]
    acc = sch.cache_write(block, 0, "local")
    if kind == CONV_BLOCK:
        n, o1, i, j, o2, rh, rw, rcb, rci = sch.get_loops(block)
        ob = 2 if int(sch.get(o1).extent) % 2 == 0 else 1  # 2 x 16 channels: each broadcast feeds 2 vpdpbusd
        o1o, o1i = sch.split(o1, [None, ob])
        jo, ji = sch.split(j, [None, _spatial_block(int(sch.get(j).extent))])
        sch.reorder(n, o1o, i, jo, rh, rw, rcb, ji, o1i, o2, rci)
        par = sch.fuse(n, o1o, i)
        sch.parallel(par)
        tile, first_reduce = jo, rh
    else:
        i, o1, o2, rkb, rki = sch.get_loops(block)
        sch.reorder(i, o1, rkb, o2, rki)
        tile = sch.fuse(i, o1)
        sch.parallel(tile)
        first_reduce, ji, o1i, par, rcb = rkb, None, None, None, None
    sch.reverse_compute_at(acc, tile)
    sch.reverse_compute_at(last, tile)
    producers = [b for b, name in zip(blocks[:k], names[:k], strict=True) if name != INT4_BLOCK]
    if INT4_BLOCK in names:  # unpack each weight block right before the vpdpbusds that use it
        _unpack_at(sch, blocks[names.index(INT4_BLOCK)], rcb if kind == CONV_BLOCK else first_reduce)
    init = sch.decompose_reduction(block, first_reduce)
    sch.tensorize(o2, VNNI_INTRIN)
    for loop in (o1i, ji):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    try:  # the epilogue reads the accumulators where the kernel left them: no copy of the tile
        sch.compute_inline(acc)
    except s_tir.ScheduleError:
        sch.vectorize(sch.get_loops(acc)[-1])
    # the requantize epilogue 16 channels at a time: its int64 multiply, rounding shift and clamp as AVX-512
    # vector ops instead of scalar ones per output
    vectorize_inner(sch, sch.get_loops(last)[-1], most=LANES)
    if par is None:  # dense: its input is one row, packed once rather than once per output block
        return {sch.get(b).name_hint for b in producers}
    return compute_inputs_at(sch, producers, par)


def _unpack_at(sch: s_tir.Schedule, block, loop) -> None:
    """Compute the INT4 unpack stage under `loop` (one reduction step): 64 weights per 16 output channels,
    as two 32-byte vector halves (low nibbles, then high), each a few byte-wide vector ops."""
    sch.compute_at(block, loop, preserve_unit_loops=False)
    *_, o2, rci = sch.get_loops(block)
    half, o2i = sch.split(o2, [2, None])
    sch.vectorize(sch.fuse(o2i, rci))
    sch.unroll(half)
