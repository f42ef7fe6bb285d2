"""Depthwise conv2d in NHWC for CPUs: the channels of a pixel are contiguous, so one vector holds the
same tap of many channels and the multiply-adds vectorize across channels.

TOPI's depthwise conv with our default schedule runs one channel at a time (the reduction over the
kernel window is innermost). Here the KH x KW window is written out as one sum (the window is known at
compile time), so the conv is a purely spatial block: the requantize chain after it is inlined into the
same expression, and the innermost loop runs over `lanes` channels as one vector. Padding is zero on
the integers, like the reference's.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from intforge.reference import pool_output_size

from .blocked_dot import Narrow
from .stages import compute_inputs_at, find_block

DW_BLOCK = "dwconv_nhwc"
DW_INT4_BLOCK = "dw_weight_int4"  # the in-kernel unpack of packed INT4 depthwise weights
J_UNROLL = 4  # output pixels of a row per unrolled step of the depthwise kernel


def _unpacked(wq: te.Tensor, kh: int, kw: int, c: int) -> te.Tensor:
    """INT4 weights packed flat in [KH, KW, C] order (`int4.pack_int4`: element f in nibble f % 2 of byte
    f // 2) -> [KH, KW, C] int8. (n ^ 8) - 8 is `int4.unpack_int4`'s sign extension, written on bytes."""
    def fcompute(rh, rw, ch):
        f = (rh * kw + rw) * c + ch
        byte = tirx.reinterpret("uint8", wq[f // 2])
        nibble = tirx.if_then_else(f % 2 == 0, byte & tirx.const(0xF, "uint8"),
                                   tirx.shift_right(byte, tirx.const(4, "uint8")))
        return tirx.reinterpret("int8", nibble ^ tirx.const(8, "uint8")) - tirx.const(8, "int8")

    return te.compute((kh, kw, c), fcompute, name=DW_INT4_BLOCK)


def depthwise_nhwc(x: te.Tensor, w: te.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], kernel: tuple[int, int] | None = None,
                   narrow: Narrow | None = None, bounds: te.Tensor | None = None) -> te.Tensor:
    """x: [N, H, W, C] int8/uint8, w: [KH, KW, C] int8, or INT4 packed flat (`kernel` then gives KH, KW)
    -> [N, OH, OW, C] int32; with `narrow` (and its `bounds`, the correction argument of the blocked
    kernels' `Narrow`), the 8-bit output of that `dyadic.ClampFirst` epilogue on 32-bit lanes, in the same
    expression. Where the requantize is not in that form it stays a chain after the window sum, on
    int64 lanes: AVX2 has no 64-bit multiply (MobileNetV2's depthwise convs on AVX2, 2026-12-05)."""
    n, h, wd, c = (int(d) for d in x.shape)
    if len(w.shape) == 1:
        w = _unpacked(w, int(kernel[0]), int(kernel[1]), c)
    kh, kw = int(w.shape[0]), int(w.shape[1])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)
    if ph or pw:
        xp = te.compute((n, h + 2 * ph, wd + 2 * pw, c), lambda b, i, j, ch: tirx.if_then_else(
            tirx.all(i >= ph, i < h + ph, j >= pw, j < wd + pw), x[b, i - ph, j - pw, ch],
            tirx.const(0, x.dtype)), name="data_dw")
    else:
        xp = x

    def window_sum(b, i, j, ch):  # the window written out: a spatial block, vectorizable across channels
        # The sum runs on uint32, whose adds wrap, and is read back as int32: the same bits, as no 8-bit
        # window overflows int32. On int32 LLVM sees `add nsw`, sign-extends the products one by one into
        # the int64 requantize and sums half the window on int64 lanes (57 instructions per 16 channels,
        # not 39: the 56x56x144 depthwise conv of MobileNetV2 took 0.168 ms, now 0.131).
        terms = [tirx.reinterpret("uint32", xp[b, i * sh + rh * dh, j * sw + rw * dw, ch].astype("int32")
                                  * w[rh, rw, ch].astype("int32"))
                 for rh in range(kh) for rw in range(kw)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return tirx.reinterpret("int32", total)

    if narrow is not None:
        return te.compute((n, oh, ow, c), lambda b, i, j, ch: narrow.value(window_sum(b, i, j, ch), bounds[ch], ch),
                          name=DW_BLOCK)
    return te.compute((n, oh, ow, c), window_sum, name=DW_BLOCK)


def _lanes(c: int) -> int:
    return next(v for v in (32, 16, 8, 4, 2, 1) if c % v == 0)


def schedule_depthwise_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around a dwconv_nhwc block; None when it has none. Returns the
    names of the blocks left for the default rule (the padding stage)."""
    found = find_block(sch, DW_BLOCK)
    if found is None:
        return None
    blocks, names, k = found
    block = blocks[k]
    for b in blocks[k + 1:]:  # the requantize chain folds into the window sum: one expression per output
        sch.reverse_compute_inline(b)
    b_, i, j, ch = sch.get_loops(block)
    co, ci = sch.split(ch, [None, _lanes(int(sch.get(ch).extent))])
    sch.reorder(b_, i, co, j, ci)  # a channel block sweeps the row: its KH x KW weights stay in registers
    # Neighbouring outputs of a row share input pixels (two of three per window row at stride 1):
    # unrolled, LLVM loads and widens each pixel once for all of them (18 loads for 4 outputs, not 36).
    if int(sch.get(j).extent) % J_UNROLL == 0:  # (by 2, a 14-wide row measured 15% slower)
        sch.unroll(sch.split(j, [None, J_UNROLL])[1])
    par = sch.fuse(b_, i)
    sch.parallel(par)
    sch.vectorize(ci)
    producers = list(blocks[:k])
    if DW_INT4_BLOCK in names[:k]:  # a channel block's window, unpacked right before its row sweep
        unpack = producers.pop(names.index(DW_INT4_BLOCK))
        sch.compute_at(unpack, co, preserve_unit_loops=False)
    return compute_inputs_at(sch, producers, par)
