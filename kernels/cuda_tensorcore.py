"""INT8 / INT4 Tensor Core kernels for NVIDIA GPUs (sm_75 and newer): implicit-GEMM conv2d and dense.

One kernel shape covers both layers: a GEMM Y[m, n] = sum_k A[m, k] * W[n, k] where, for a conv, m runs
over (image, output row, output column), n over output channels and k over (input channel, kernel row,
kernel column); A is never materialized: each thread block gathers its A tile straight from the NCHW
input into shared memory (zero outside the image, the reference's zero padding). Weights are packed at
compile time as W[N_pad, K_pad] (bytes), zero-padded so padded lanes add nothing.

The inner product is PTX `mma.sync`:
  - INT8: `m8n8k16` (u8 or s8 activations x s8 weights -> s32), available from sm_75 (Turing);
  - INT4: `m8n8k32` (u4 or s4 x s4 -> s32), sm_75..sm_89 only (Hopper has no INT4 Tensor Cores).
Both read the same byte layout (an INT4 row is packed two values per byte, low nibble first, exactly
`kernels.int4.pack_int4`), so the fragment loads are shared. Fragment layouts follow the PTX ISA's
"Matrix fragments for mma.m8n8k16 / m8n8k32": lane l holds row l // 4, bytes 4 * (l % 4) .. +3 of A (and
of W's row, B being column-major), and accumulator columns 2 * (l % 4) + {0, 1} of row l // 4.

The requantize epilogue is fused: each thread takes its accumulators through `intforge.dyadic`
(the one definition of the integer semantics) with a TIR backend whose per-channel constants are
kernel arguments, and stores the narrow result. We write these kernels ourselves because TVM 0.27's
Tensor Core intrinsics are 16x16 WMMA and sm_80 `m16n8k32` only; none covers INT4, nor sm_75 `mma`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from intforge import dyadic

from .tir_ops import TirChannelOps

#: CTA tile (rows of the GEMM x output channels), K step in bytes, and the 2 x 2 warps that share it.
BM, BN, BKB = 64, 64, 32
WARPS_M, WARPS_N = 2, 2
THREADS = 32 * WARPS_M * WARPS_N
MI, NI = BM // WARPS_M // 8, BN // WARPS_N // 8  # 8x8 mma tiles per warp
SMEM_STRIDE = BKB + 16  # bytes per shared row: 48 keeps the fragment loads free of bank conflicts


@dataclass(frozen=True)
class GemmShape:
    """An integer conv2d (NCHW / OIHW, groups 1) or dense layer seen as a GEMM."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    dense: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        from intforge.reference import pool_output_size

        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (pool_output_size(self.height, kh, sh, ph, dh, False),
                pool_output_size(self.width, kw, sw, pw, dw, False))

    @property
    def m(self) -> int:
        oh, ow = self.out_hw
        return self.batch * oh * ow

    @property
    def k(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]


def k_per_byte(int4: bool) -> int:
    return 2 if int4 else 1


def pack_weight(w: np.ndarray, int4: bool) -> np.ndarray:
    """OIHW (or [out, in]) integer weights -> the kernel's [N_pad, K_pad bytes] int8, zero padded."""
    n = w.shape[0]
    flat = np.asarray(w, dtype=np.int64).reshape(n, -1)
    per = k_per_byte(int4)
    kb = -(-flat.shape[1] // per)
    kb_pad = -(-kb // BKB) * BKB
    n_pad = -(-n // BN) * BN
    vals = np.zeros((n_pad, kb_pad * per), np.int64)
    vals[:n, : flat.shape[1]] = flat
    if not int4:
        return vals.astype(np.int8)
    lo, hi = vals[:, 0::2] & 0xF, vals[:, 1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def epilogue_constants(multiplier: np.ndarray, shift: np.ndarray, bias: np.ndarray, qmin: int, qmax: int,
                       out_dtype: str, channels: int) -> list[tuple[np.ndarray, str]]:
    """The per-channel arrays (padded to the CTA tile) the fused requantize reads, in argument order: the
    multiplier, bias * multiplier + the rounding offset, and the shift."""
    rec = TirChannelOps()
    m = np.broadcast_to(np.asarray(multiplier).ravel(), (channels,))
    n = np.broadcast_to(np.asarray(shift).ravel(), (channels,))
    b = np.broadcast_to(np.asarray(bias).ravel(), (channels,))
    if channels == 1:  # keep them arrays so they stay kernel arguments
        m, n, b = np.concatenate([m, m]), np.concatenate([n, n]), np.concatenate([b, b])
    dyadic.requantize(rec, tirx.Var("acc", "int32"), m, n, qmin, qmax, out_dtype, bias=b)
    n_pad = -(-channels // BN) * BN
    out = []
    for arr, dtype in rec.recorded:
        padded = np.zeros(n_pad, dtype=dtype)
        padded[:channels] = arr[:channels]
        out.append((padded, dtype))
    return out


def gemm_kernel(shape: GemmShape, in_dtype: str, out_dtype: str, qmin: int, qmax: int, int4: bool,
                n_consts: int = 3) -> tirx.PrimFunc:
    """The fused Tensor Core kernel for one layer.

    Arguments: x (flat NCHW or [batch, in]), w (packed), the `n_consts` per-channel requantize constants
    of `epilogue_constants` (int64 [N_pad], the bias folded in), y (flat NCHW or [batch, out]).
    """
    c_in, h, w_in, n_out = shape.in_channels, shape.height, shape.width, shape.out_channels
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = shape.kernel, shape.stride, shape.padding, shape.dilation
    oh, ow = shape.out_hw
    m_total, k_total = shape.m, shape.k
    per = k_per_byte(int4)
    k_bytes = -(-k_total // per)
    kb_pad = -(-k_bytes // BKB) * BKB
    n_pad = -(-n_out // BN) * BN
    grid_m, grid_n, k_tiles = -(-m_total // BM), n_pad // BN, kb_pad // BKB
    x_size = shape.batch * c_in * h * w_in
    y_size = m_total * n_out
    unsigned = in_dtype == "uint8"
    if int4:
        a_type, b_type, mma_shape = ("uint4" if unsigned else "int4"), "int4", "m8n8k32"
    else:
        a_type, b_type, mma_shape = in_dtype, "int8", "m8n8k16"

    def a_value(x, m, k):
        """A[m, k] in the input's dtype: the element under kernel tap k of output position m (0 outside)."""
        zero = tirx.const(0, in_dtype)
        if shape.dense:
            return tirx.if_then_else(tirx.all(m < m_total, k < k_total), x[m * c_in + k], zero)
        img, pix = m // (oh * ow), m % (oh * ow)
        c, tap = k // (kh * kw), k % (kh * kw)
        iy = (pix // ow) * sh - ph + (tap // kw) * dh
        ix = (pix % ow) * sw - pw + (tap % kw) * dw
        ok = tirx.all(m < m_total, k < k_total, iy >= 0, iy < h, ix >= 0, ix < w_in)
        return tirx.if_then_else(ok, x[((img * c_in + c) * h + iy) * w_in + ix], zero)

    def a_byte(x, m, kb):
        """The shared-memory byte for A[m, kb]: one int8/uint8 value (bits kept: the mma reads .u8 or .s8),
        or two 4-bit values packed low nibble first."""
        if not int4:
            v = a_value(x, m, kb)
            return v if in_dtype == "int8" else tirx.reinterpret("int8", v)
        lo = tirx.bitwise_and(a_value(x, m, 2 * kb).astype("int32"), 15)
        hi = tirx.shift_left(tirx.bitwise_and(a_value(x, m, 2 * kb + 1).astype("int32"), 15), 4)
        return tirx.reinterpret("int8", tirx.bitwise_or(lo, hi).astype("uint8"))

    def y_index(m, n):
        if shape.dense:
            return m * n_out + n
        img, pix = m // (oh * ow), m % (oh * ow)
        return (img * n_out + n) * (oh * ow) + pix

    def requant(acc, n, consts):  # the constants' values are in the buffers: only their order counts here
        ops = TirChannelOps(list(consts), n)
        zeros = np.zeros(2, np.int64)
        got = dyadic.requantize(ops, acc, zeros, zeros, qmin, qmax, out_dtype, bias=zeros)
        if len(ops.recorded) != n_consts:  # pragma: no cover - dyadic changed shape: rebuild constants
            raise AssertionError("epilogue constants out of step with intforge.dyadic.requantize")
        return got

    assert n_consts == 3, "dyadic.requantize reads multiplier, rounding offset and shift"

    words = SMEM_STRIDE // 4  # 32-bit words per shared row
    warp_rows, warp_cols = BM // WARPS_M, BN // WARPS_N

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((x_size,), in_dtype), wp: T.Buffer((n_pad, kb_pad), "int8"),
               c0: T.Buffer((n_pad,), "int64"),
               c1: T.Buffer((n_pad,), "int64"), c2: T.Buffer((n_pad,), "int64"),
               y: T.Buffer((y_size,), out_dtype)):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        for bm in T.thread_binding(grid_m, thread="blockIdx.x"):
            for bn in T.thread_binding(grid_n, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    # Shared tiles are flat (rows padded to SMEM_STRIDE bytes), written bytewise and read
                    # as 32-bit words: one word is one thread's mma operand register.
                    a_s = T.alloc_buffer((BM * SMEM_STRIDE,), "int8", scope="shared")
                    b_s = T.alloc_buffer((BN * SMEM_STRIDE,), "int8", scope="shared")
                    a_w = T.decl_buffer((BM * words,), "int32", data=a_s.data, scope="shared")
                    b_w = T.decl_buffer((BN * words,), "int32", data=b_s.data, scope="shared")
                    acc = T.alloc_buffer((MI * NI * 2,), "int32", scope="local")
                    af = T.alloc_buffer((MI,), "int32", scope="local")
                    bf = T.alloc_buffer((NI,), "int32", scope="local")
                    for i in T.unroll(MI * NI * 2):
                        acc[i] = 0
                    for kt in T.serial(k_tiles):
                        for it in T.unroll(BM * BKB // THREADS):  # consecutive threads: consecutive rows m
                            a_s[(it * THREADS + tx) % BM * SMEM_STRIDE + (it * THREADS + tx) // BM] = a_byte(
                                x, bm * BM + (it * THREADS + tx) % BM, kt * BKB + (it * THREADS + tx) // BM)
                        for it in T.unroll(BN * BKB // THREADS):  # consecutive threads: consecutive bytes
                            b_s[(it * THREADS + tx) // BKB * SMEM_STRIDE + (it * THREADS + tx) % BKB] = wp[
                                bn * BN + (it * THREADS + tx) // BKB, kt * BKB + (it * THREADS + tx) % BKB]
                        T.tvm_storage_sync("shared")
                        for ks in T.unroll(BKB // 16):
                            for mi in T.unroll(MI):
                                af[mi] = a_w[((tx // 32) // WARPS_N * warp_rows + mi * 8 + (tx % 32) // 4) * words
                                             + ks * 4 + tx % 4]
                            for ni in T.unroll(NI):
                                bf[ni] = b_w[((tx // 32) % WARPS_N * warp_cols + ni * 8 + (tx % 32) // 4) * words
                                             + ks * 4 + tx % 4]
                            for mi in T.unroll(MI):
                                for ni in T.unroll(NI):
                                    T.evaluate(T.ptx_legacy.mma(mma_shape, "row", "col", a_type, b_type, "int32",
                                                                af.data, mi, bf.data, ni, acc.data,
                                                                (mi * NI + ni) * 2, False, dtype="int32"))
                        T.tvm_storage_sync("shared")
                    for mi in T.unroll(MI):
                        for ni in T.unroll(NI):
                            for e in T.unroll(2):
                                if (bm * BM + (tx // 32) // WARPS_N * warp_rows + mi * 8 + (tx % 32) // 4
                                        < m_total) and (bn * BN + (tx // 32) % WARPS_N * warp_cols + ni * 8
                                                        + (tx % 4) * 2 + e < n_out):
                                    y[y_index(bm * BM + (tx // 32) // WARPS_N * warp_rows + mi * 8 + (tx % 32) // 4,
                                              bn * BN + (tx // 32) % WARPS_N * warp_cols + ni * 8
                                              + (tx % 4) * 2 + e)] = requant(
                                        acc[(mi * NI + ni) * 2 + e],
                                        bn * BN + (tx // 32) % WARPS_N * warp_cols + ni * 8 + (tx % 4) * 2 + e,
                                        [c0, c1, c2])

    return kernel
