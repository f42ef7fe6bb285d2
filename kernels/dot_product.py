"""Integer conv2d and dense laid out for CPU dot-product instructions (ARM sdot/udot/usdot, x86 vpdp*).

TOPI's NCHW conv reduces over input channels with a stride of H*W, so LLVM can only emit scalar or
widening multiply-adds. These kernels lay the reduction out contiguously in both operands: the input is
padded and transposed to NHWC inside the kernel, the weights are pre-packed at compile time to OHWI
(dense: [N, K], already contiguous), and the innermost loop is the input-channel reduction. LLVM's loop
vectorizer then turns `acc += sext(a) * sext(w)` into `sdot` (s8 x s8), and `usdot` (u8 x s8) when the
CPU has i8mm.

Unsigned activations on a CPU with sdot but without usdot are made signed exactly: the kernel computes
with a - 128 (padding becomes -128, i.e. an original 0), and `correction[o] = 128 * sum(w[o])`, added to
the accumulator, restores sum(a * w). The accumulator bound is unchanged: |a - 128| <= 128.

Where the CPU has a dot-product instruction, groups-1 convs and dense run in the tensorized, register-
blocked kernels of `blocked_dot` instead; these kernels remain for grouped convs and for x86 CPUs
without VNNI, where LLVM's vectorizer emits what the CPU has (sdot on an ARM with it, checked by a
disassembly test).
"""

from __future__ import annotations

from tvm import te, tirx

from intforge.reference import pool_output_size

SHIFT = 128


def conv2d_nhwc_dot(x: te.Tensor, w: te.Tensor, correction: te.Tensor | None, stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                    shift_unsigned: bool, layout: str = "NCHW") -> te.Tensor:
    """x: [N, C, H, W] int8/uint8 (or [N, H, W, C] with layout "NHWC"), w: [O, KH, KW, C/groups] int8,
    correction: [O] int32 or None. Returns int32 [N, O, OH, OW] (or [N, OH, OW, O] in NHWC)."""
    nhwc = layout == "NHWC"
    n, c, h, wd = (int(d) for d in ((x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if nhwc else x.shape))
    o, kh, kw, cg = (int(d) for d in w.shape)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, kw, sw, pw, dw, False)
    shift = shift_unsigned and x.dtype == "uint8"
    in_dtype = "int8" if shift else x.dtype
    pad_value = -SHIFT if shift else 0

    def _packed(b, i, j, ch):
        inside = tirx.all(i >= ph, i < h + ph, j >= pw, j < wd + pw)
        v = x[b, i - ph, j - pw, ch] if nhwc else x[b, ch, i - ph, j - pw]
        v = (v.astype("int32") - SHIFT).astype("int8") if shift else v
        return tirx.if_then_else(inside, v, tirx.const(pad_value, in_dtype))

    if nhwc and not shift and ph == pw == 0:
        xp = x  # already NHWC, nothing to pad or shift: read it where the previous layer wrote it
    else:
        xp = te.compute((n, h + 2 * ph, wd + 2 * pw, c), _packed, name="data_nhwc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cg), "rc")
    per_group = o // groups

    def _acc(b, oc, i, j):
        ch = rc if groups == 1 else (oc // per_group) * cg + rc
        return te.sum(xp[b, i * sh + rh * dh, j * sw + rw * dw, ch].astype("int32")
                      * w[oc, rh, rw, rc].astype("int32"), axis=[rh, rw, rc])

    if nhwc:
        acc = te.compute((n, oh, ow, o), lambda b, i, j, oc: _acc(b, oc, i, j), name="conv_dot")
        if correction is None:
            return acc
        return te.compute(acc.shape, lambda b, i, j, oc: acc[b, i, j, oc] + correction[oc], name="conv_dot_corr")
    acc = te.compute((n, o, oh, ow), _acc, name="conv_dot")
    if correction is None:
        return acc
    return te.compute(acc.shape, lambda b, oc, i, j: acc[b, oc, i, j] + correction[oc], name="conv_dot_corr")


def dense_dot(x: te.Tensor, w: te.Tensor, correction: te.Tensor | None, shift_unsigned: bool) -> te.Tensor:
    """x: [M, K] int8/uint8, w: [N, K] int8, correction: [N] int32 or None -> [M, N] int32."""
    m, k = (int(d) for d in x.shape)
    n = int(w.shape[0])
    shift = shift_unsigned and x.dtype == "uint8"
    if shift:
        x = te.compute((m, k), lambda i, j: (x[i, j].astype("int32") - SHIFT).astype("int8"), name="data_s8")
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, rk].astype("int32") * w[j, rk].astype("int32"), axis=rk),
                     name="dense_dot")
    if correction is None:
        return acc
    return te.compute(acc.shape, lambda i, j: acc[i, j] + correction[j], name="dense_dot_corr")
