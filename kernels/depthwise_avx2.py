"""Depthwise conv2d in NHWC on AVX2's `vpmaddwd`: two rows of the window as the int16 pair of a lane.

`vpmaddwd` multiplies 8 lanes of int16 pairs by 8 more and adds each pair into an int32 lane, exactly.
A depthwise conv has no channel reduction to pair, so the pair is taken from the window (as
kernels/depthwise_dot.py takes 4 rows on VNNI): for output row i, a packing stage builds
P[q, col, c], the int16s x[i*sh + 2q*dh - ph, col - pw, c] and the next window row's as the two halves of
a uint32 (vectorized over channels: two widening loads, a shift and an or per 8 channels), and the
weights are laid out at compile time as W[q, rw, C/8, 8, 2] = w[2q + t, rw, c], zero past KH. Output
(i, j) of 8 channels is then ceil(KH/2) x KW instructions, acc += vpmaddwd(P[q, j*sw + rw*dw], W[q, rw]):
6 for a 3x3 window, where kernels/depthwise.py widens every byte to an int32 lane and multiplies 9 times
(`vpmulld`). With stride and dilation 1 down the rows, output rows go in pairs (`row_pairs`): the KH + 1
input rows both read are packed once, and the second row's weights are the window one row later. With
stride 2 and dilation 1 across (`column_pairs`), the pair is two window columns instead: output j reads
packed pairs j .. j + ceil(KW/2) - 1 of each of its KH input rows, each input pixel packed once (rows in
pairs pack every column twice at stride 2, and a zero half for an odd KH).

Both signednesses go in as they are (int16 holds them): no correction. Padding is 0 on the integers,
like the reference's; the int32 lanes wrap like the reference's int32 arithmetic: bit-exact. The
requantize runs in the short `ClampFirst` form on 32-bit lanes (AVX2 has no 64-bit multiply), right
after the tile's sums. The packing runs per tile of output pixels (a column feeds KW / sw outputs), into
a few hundred bytes on the stack. Only where the blocked kernels are AVX2's (kernels/x86_avx2.py), for
whole 8-channel blocks and 8-bit weights (INT4 depthwise weights keep kernels/depthwise.py).

On the Zen 3 of 2026-12-05 (interleaved A/Bs inside MobileNetV2) its depthwise convs took 0.90 ms in all
on kernels/depthwise.py, 0.67 on this kernel one row at a time, and the stride-1 ones 6-17% less again
with rows in pairs. Its stride-2 convs with column pairs (2026-12-05 night): 0.76-0.79x the time of row
pairs for the 112x112 x 96 and 56x56 x 144 ones, MobileNetV2 0.973x and 1/1.021 in whole calls (A/B
both ways round). TVM has no such intrinsic; this one is ours.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from intforge.reference import pool_output_size

from .blocked_dot import Narrow
from .depthwise_dot import tile_and_tensorize, window_rows_intrin
from .stages import find_block, vectorize_inner

BLOCK = "dwconv_pairs"
NARROW_BLOCK = f"{BLOCK}_narrow"
PACK_BLOCK = "dw_row_pairs"  # the packing stage: pairs of window rows, int16, per column and channel
LANES, GROUP = 8, 2  # vpmaddwd: 8 int32 lanes, each the sum of 2 int16 products
INTRIN = "intforge_dot_8x2_lanes_s16s16s32_avx2"


def supported(channels: int) -> bool:
    """Whether a depthwise conv fits this kernel: whole 8-channel blocks."""
    return channels % LANES == 0


def row_pairs(h: int, kh: int, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> bool:
    """Whether output rows go in pairs: stride and dilation 1 down the rows and an even number of output
    rows. Rows i and i + 1 then read the KH + 1 input rows from i on, packed once for both: row i with the
    window's rows from the pairs' first half on, row i + 1 from the second (`weight_layout`)."""
    oh = pool_output_size(h, kh, stride[0], padding[0], dilation[0], False)
    return stride[0] == 1 and dilation[0] == 1 and oh % 2 == 0 and oh >= 2


def column_pairs(stride: tuple[int, int], dilation: tuple[int, int], pairs: bool) -> bool:
    """Whether a lane's pair is two window columns instead of two rows: stride 2 and dilation 1 across,
    where output rows do not pair. Output j's window columns 2j + 2p + t (t = 0, 1) are then packed pair
    j + p of the input row, so each input pixel of the rows an output row reads is packed once; pairs of
    window rows pack each column's rows at stride 2 for each output (KW columns over 2 outputs) and a
    zero half where KH is odd: about 1.5x the packing for a 3x3 window."""
    return stride[1] == 2 and dilation[1] == 1 and not pairs


def weight_layout(w_hwc: np.ndarray, pairs: bool = False, columns: bool = False) -> np.ndarray:
    """[KH, KW, C] int8 -> [Q, KW, C/8, 8, 2] int16, Q = ceil(KH/2): rows 2q and 2q + 1 of the window as
    the pair of a lane, zero past KH; one 32-byte load per instruction. With `pairs`, [2, Q, KW, C/8, 8, 2]
    with Q = ceil((KH + 1)/2): the first output row's, then the second's, its window one row later. With
    `columns` (`column_pairs`), [KH, QW, C/8, 8, 2], QW = ceil(KW/2): columns 2p and 2p + 1, zero past KW."""
    kh, kw, c = w_hwc.shape
    if columns:
        qw = -(-kw // GROUP)
        cols = np.zeros((kh, qw * GROUP, c), np.int16)
        cols[:, :kw] = w_hwc
        return np.ascontiguousarray(cols.reshape(kh, qw, GROUP, c // LANES, LANES).transpose(0, 1, 3, 4, 2))
    rows = kh + 1 if pairs else kh
    q = -(-rows // GROUP)
    out = np.zeros((2 if pairs else 1, q * GROUP, kw, c), np.int16)
    for r in range(out.shape[0]):
        out[r, r:r + kh] = w_hwc
    out = np.ascontiguousarray(out.reshape(-1, q, GROUP, kw, c // LANES, LANES).transpose(0, 1, 3, 4, 5, 2))
    return out if pairs else out[0]


def _half(p, t):
    """Half t of a packed uint32 as the int16 it holds, widened: the expression the intrinsic matches."""
    bits = tirx.bitwise_and(tirx.shift_right(p, tirx.Cast("uint32", t * 16)), tirx.const(0xFFFF, "uint32"))
    return tirx.Cast("int32", tirx.Cast("int16", bits))


def depthwise_pairs(x: te.Tensor, w: te.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int], kh: int, narrow: Narrow | None = None,
                    bounds: te.Tensor | None = None, column_kw: int | None = None) -> te.Tensor:
    """x: [N, H, W, C] int8/uint8, w: `weight_layout`'s int16 weights of a KH-row window (with a leading 2:
    rows in pairs, `row_pairs`; with `column_kw`, the window's width: pairs of window columns,
    `column_pairs`) -> [N, OH, OW, C] int32, the window sums; with `narrow` (and its `bounds`, the
    correction argument of the blocked kernels' `Narrow`), the 8-bit output of that `dyadic.ClampFirst`
    epilogue."""
    if column_kw is not None:
        return _column_pairs(x, w, stride, padding, dilation, (kh, column_kw), narrow, bounds)
    n, h, wd, c = (int(d) for d in x.shape)
    pairs = len(w.shape) == 6
    q, kw = int(w.shape[-5]), int(w.shape[-4])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)
    wp = wd + 2 * pw

    def pack(b, i, p, col, ch):  # the pair as one uint32 a channel (low half: row 2p), vectorized over channels
        r = (2 * i if pairs else i * sh) + p * GROUP * dh - ph  # (i: a pair of output rows, with pairs)
        return _pair(x, (b, r, col - pw, ch), (b, r + dh, col - pw, ch))

    packed = te.compute((n, oh // 2 if pairs else oh, q, wp, c), pack, name=PACK_BLOCK)
    rq, rw, rt = te.reduce_axis((0, q), "rq"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, GROUP), "rt")

    def weight(i, rq, rw, ch, rt):
        at = [rq, rw, ch // LANES, ch % LANES, rt]
        return (w[i % 2, *at] if pairs else w[*at]).astype("int32")

    acc = te.compute((n, oh, ow, c), lambda b, i, j, ch: te.sum(
        _half(packed[b, i // 2 if pairs else i, rq, j * sw + rw * dw, ch], rt) * weight(i, rq, rw, ch, rt),
        axis=[rq, rw, rt]),
        name=BLOCK, attrs={"dw_stride": sw, "dw_span": (kw - 1) * dw + 1, "dw_pairs": int(pairs)})
    return _narrowed(acc, narrow, bounds)


def _pair(x: te.Tensor, low: tuple, high: tuple):
    """Two inputs (indices [b, row, column, channel]) as the int16 halves of a uint32, zero outside the image."""
    h, wd = int(x.shape[1]), int(x.shape[2])

    def half(b, r, cc, ch):
        inside = tirx.all(r >= 0, r < h, cc >= 0, cc < wd)
        v = x[b, r, cc, ch].astype("int16").astype("uint16").astype("uint32")
        return tirx.if_then_else(inside, v, tirx.const(0, "uint32"))

    return tirx.bitwise_or(half(*low), tirx.shift_left(half(*high), tirx.const(16, "uint32")))


def _narrowed(acc: te.Tensor, narrow: Narrow | None, bounds: te.Tensor | None) -> te.Tensor:
    if narrow is not None:
        return te.compute(acc.shape, lambda b, i, j, ch: narrow.value(
            acc[b, i, j, ch], bounds[ch], ch, immediate=True), name=NARROW_BLOCK, attrs=narrow.attrs)
    return acc


def _column_pairs(x: te.Tensor, w: te.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], window: tuple[int, int], narrow: Narrow | None,
                  bounds: te.Tensor | None) -> te.Tensor:
    """`depthwise_pairs` with a lane's pair two window columns (`column_pairs`): for output row i, packed
    P[r, jp, c] = the int16s x[i*sh + r*dh - ph, 2jp - pw, c] and x[.., 2jp + 1 - pw, c] as a uint32, and
    output (i, j) = sum over r, p of vpmaddwd(P[r, j + p], W[r, p]), W[r, p] = (w[r, 2p], w[r, 2p + 1])."""
    n, h, wd, c = (int(d) for d in x.shape)
    (kh, kw), qw = window, int(w.shape[1])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)

    def pack(b, i, r, jp, ch):  # columns 2jp and 2jp + 1 as one uint32 a channel (low half: the first)
        row = i * sh + r * dh - ph
        return _pair(x, (b, row, 2 * jp - pw, ch), (b, row, 2 * jp + 1 - pw, ch))

    packed = te.compute((n, oh, kh, ow + qw - 1, c), pack, name=PACK_BLOCK)
    rr, rp, rt = te.reduce_axis((0, kh), "rr"), te.reduce_axis((0, qw), "rp"), te.reduce_axis((0, GROUP), "rt")
    acc = te.compute((n, oh, ow, c), lambda b, i, j, ch: te.sum(
        _half(packed[b, i, rr, j + rp, ch], rt) * w[rr, rp, ch // LANES, ch % LANES, rt].astype("int32"),
        axis=[rr, rp, rt]),
        name=BLOCK, attrs={"dw_stride": 1, "dw_span": qw, "dw_pairs": 0, "dw_packs": kh})
    return _narrowed(acc, narrow, bounds)


def _intrin() -> tuple:
    """`vpmaddwd`: the 2 int16 halves of each lane by its 2 weights, into the accumulator."""
    return window_rows_intrin(LANES, GROUP, "int16", _half, lambda A, B, C: C.vload([0], dtype="int32x8")
                              + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
        T.reinterpret(A.vload([0], dtype="uint32x8"), dtype="int16x16"), B.vload([0, 0], dtype="int16x16"),
        dtype="int32x8"))


def schedule_depthwise_pairs_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around a dwconv_pairs block; None when it has none. A parallel task
    per output row (or pair of rows); in it, per 8-channel block, tiles of up to 8 outputs, each packing
    the columns it reads right before its products, the tile's sums in registers, then its requantize
    (`depthwise_dot.tile_and_tensorize`, the VNNI kernel's schedule)."""
    found = find_block(sch, BLOCK)
    if found is None:
        return None
    blocks, names, k = found
    block, epilogue = blocks[k], blocks[k + 1:]
    for b in epilogue[:-1]:  # a requantize chain fused after the sums: one block per tile
        sch.compute_inline(b)
    last = epilogue[-1] if epilogue else None
    # (a column's packs: two uint32 a lane, the window's first two rows and the next two, for 3x3; with
    # column pairs one a window row)
    packs = int(sch.get(block).annotations.get("dw_packs", 2))
    acc, _, jo = tile_and_tensorize(sch, block, last, LANES, packs, INTRIN, _intrin)
    if last is not None:
        try:
            sch.compute_inline(acc)
        except s_tir.ScheduleError:
            sch.vectorize(sch.get_loops(acc)[-1])
        vectorize_inner(sch, sch.get_loops(last)[-1], most=LANES)
    else:
        sch.vectorize(sch.get_loops(acc)[-1])
    pack = blocks[names.index(PACK_BLOCK)]
    sch.compute_at(pack, jo, preserve_unit_loops=True)
    vectorize_inner(sch, sch.get_loops(pack)[-1], most=LANES)
    return set()
