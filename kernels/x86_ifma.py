"""x86 AVX512-IFMA: the requantize epilogue of the blocked conv kernels as 52-bit multiply-adds.

The epilogue that `dyadic.requantize` defines costs, per 16 int32 accumulators, about 15 vector
instructions on 64-bit lanes (sign-extend, multiply, add, shift, clamp, saturating narrow, each twice),
more than the 4 `vpdpbusd`s of a 1x1 conv with 16 input channels. In its `dyadic.ClampFirst` form the
clamp happens on the int32 accumulators (16 lanes at a time) and the product has at most 52 bits, so
the multiply and the add are one `vpmadd52luq`, and as the result needs no clamp, one `vpermi2b` picks
the 16 result bytes out of the two 8-lane halves: 12 instructions, all told. Where every channel's shift
can be raised to 40 (`ClampFirst.with_shift`; the quantizer holds conv shifts to `dyadic.CAPPED_SHIFT`
for this), the result is byte 5 of each 64-bit lane and the two shifts go too, and so does the add of
the correction: `ClampFirst.with_bounds` clamps the raw sum to bounds that hold it (`Narrow.bounds`).
The description is the form's exact integer arithmetic (`blocked_dot.narrow_value`), which is what the
kernel computes wherever the intrinsic is not applied.

Where the quantizer took shift 24 for every channel (`dyadic.conv_multipliers`: multipliers of 12+ bits
there), the same bounds form runs on 32-bit lanes instead (`_intrin(..., short=True)`, `blocked_dot.Narrow.short`):
the clamp, one `vpmulld` and one `vpaddd` on all 16 lanes and a shift by 24, with no widening.

TVM has no such intrinsics; these are ours, tensorized onto the epilogue's innermost 16 channels.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from intforge.dyadic import CAPPED_SHIFT, SHORT_SHIFT

from .blocked_dot import ACC_SCOPE, ensure_intrin, narrow_value

LANES = 16
# the shift the kernel takes as a byte offset (the result is byte 5 of the 64-bit lane): the one the
# quantizer holds conv requantize shifts to
BYTE_SHIFT = CAPPED_SHIFT


def _intrin(out_dtype: str, whole_bytes: bool, bounds: bool = False, short: bool = False) -> tuple:
    """(description, implementation) for 16 outputs of `out_dtype`. The description is
    `blocked_dot.narrow_value` itself, with each channel's shift; with `whole_bytes` (every shift is
    BYTE_SHIFT) the implementation picks each lane's byte 5 instead of shifting; with `bounds`
    (`Narrow.bounds`, whole bytes only) it clamps the raw accumulator to per-channel bounds instead of
    adding a correction first. vpmadd52luq's product is then exact only below 2^52, which is all the byte
    at BYTE_SHIFT needs. With `short` (`Narrow.short`, bounds only; int32 constants) it is the clamp, one
    32-bit multiply (`vpmulld`) and add on all 16 lanes and the shift by SHORT_SHIFT (every channel's):
    no widening to two 8-lane halves and one multiply instead of two. A signed result shifts
    arithmetically, so a residual add fused after it reads the int32 lanes as they are (LLVM folds the
    narrowing and its sign extension away)."""
    if bounds and not whole_bytes:
        raise ValueError("the bounds form of the ClampFirst epilogue needs whole bytes (every shift BYTE_SHIFT)")
    if short and not bounds:
        raise ValueError("the short form of the ClampFirst epilogue is its bounds form on 32-bit lanes")
    bytes_ = f"{out_dtype}x64"
    consts = "int32" if short else "int64"  # the per-channel multiplier, constant and shift
    lane = "int32" if out_dtype == "int8" else "uint32"  # the short form's lanes, as its result reads them

    def _clamped(A, C, S):
        """u = clip(acc + corr, 0, span) on 16 int32 lanes (u >= 0: its sign extension is its zero
        extension); with bounds, u = clip(acc, lo, hi), which can be negative: sign-extended, its low 52
        bits are u mod 2^52, and so is vpmadd52luq's product below bit 52."""
        acc, corr, span = A.vload([0], "int32x16"), C.vload([0], "int32x16"), S.vload([0], "int32x16")
        if bounds:
            return T.min(T.max(acc, corr), span)
        t = T.reinterpret("int32x16", T.reinterpret("uint32x16", acc) + T.reinterpret("uint32x16", corr))
        return T.min(T.max(t, T.broadcast(0, LANES)), span)

    first = BYTE_SHIFT // 8 if whole_bytes else 0  # the result's byte within its 64-bit lane

    def _half(u, K, M, N, at):
        """(u * mul + add) for 8 lanes: vpmadd52luq adds the low 52 bits of u * mul, which are all of it;
        then each lane's shift, unless the bytes are picked at BYTE_SHIFT."""
        v = T.call_llvm_pure_intrin("int64x8", "llvm.x86.avx512.vpmadd52l.uq.512", K.vload([at], "int64x8"),
                                    T.Shuffle([u], list(range(at, at + 8))), M.vload([at], "int64x8"))
        return v if whole_bytes else T.shift_right(v, N.vload([at], "int64x8"))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle, s: T.handle, m: T.handle, k: T.handle, n: T.handle, o: T.handle) -> None:
        A = T.match_buffer(a, (LANES,), "int32", offset_factor=1, scope=ACC_SCOPE)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        S = T.match_buffer(s, (LANES,), "int32", offset_factor=1)
        M = T.match_buffer(m, (LANES,), consts, offset_factor=1)
        K = T.match_buffer(k, (LANES,), consts, offset_factor=1)
        N = T.match_buffer(n, (LANES,), consts, offset_factor=1)
        Out = T.match_buffer(o, (LANES,), out_dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:LANES], C[0:LANES], S[0:LANES], M[0:LANES], K[0:LANES], N[0:LANES])
            T.writes(Out[0:LANES])
            for i in range(LANES):
                with T.sblock("narrow"):
                    vi = T.axis.remap("S", [i])
                    Out[vi] = narrow_value(A[vi], C[vi], S[vi], M[vi], K[vi], N[vi], out_dtype, bounds, short)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle, s: T.handle, m: T.handle, k: T.handle, n: T.handle, o: T.handle) -> None:
        A = T.match_buffer(a, (LANES,), "int32", offset_factor=1, scope=ACC_SCOPE)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        S = T.match_buffer(s, (LANES,), "int32", offset_factor=1)
        M = T.match_buffer(m, (LANES,), consts, offset_factor=1)
        K = T.match_buffer(k, (LANES,), consts, offset_factor=1)
        N = T.match_buffer(n, (LANES,), consts, offset_factor=1)
        Out = T.match_buffer(o, (LANES,), out_dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:LANES], C[0:LANES], S[0:LANES], M[0:LANES], K[0:LANES], N[0:LANES])
            T.writes(Out[0:LANES])
            if short:
                u = T.bind(_clamped(A, C, S))
                v = T.bind(T.reinterpret("uint32x16", u) * T.reinterpret("uint32x16", M.vload([0], "int32x16"))
                           + T.reinterpret("uint32x16", K.vload([0], "int32x16")))
                # every channel's shift is SHORT_SHIFT: one immediate shift
                Out[T.ramp(0, 1, LANES)] = T.Cast(f"{out_dtype}x16", T.shift_right(
                    T.reinterpret(f"{lane}x16", v), T.broadcast(T.Cast(lane, SHORT_SHIFT), LANES)))
            else:
                u = T.bind(T.Cast("int64x16", _clamped(A, C, S)))
                # byte `first` of each 64-bit lane, the low half's 8 then the high half's: one vpermi2b
                Out[T.ramp(0, 1, LANES)] = T.Shuffle([T.reinterpret(bytes_, T.call_llvm_pure_intrin(
                    "int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                    T.reinterpret("int8x64", _half(u, K, M, N, 0)),
                    T.Shuffle([T.ramp(T.int8(first), T.int8(8), LANES), T.broadcast(T.int8(0), 64 - LANES)],
                              list(range(64))),
                    T.reinterpret("int8x64", _half(u, K, M, N, 8))))], list(range(LANES)))

    return desc, impl


def tensorize_narrow(sch: s_tir.Schedule, name: str) -> None:
    """Tensorize the `blocked_dot.Narrow` epilogue block called `name`, 16 channels (its innermost loop)
    at a time: what the blocked and the Winograd conv kernels do with it."""
    block = sch.get_sblock(name)
    _, lanes = sch.split(sch.get_loops(block)[-1], [None, LANES])
    sch.tensorize(lanes, narrow_intrin(sch.get(block)))


def narrow_intrin(block: s_tir.SBlock) -> str:
    """The intrinsic (registered on first use) for an epilogue block of `blocked_dot.Narrow`: its output
    type, and whether it runs on 32-bit lanes ("narrow_short") or picks bytes instead of shifting
    ("narrow_bytes", "narrow_bounds")."""
    out_dtype = str(block.writes[0].source.dtype)
    whole_bytes, bounds, short = (bool(int(block.annotations.get(f"narrow_{key}", 0)))
                                  for key in ("bytes", "bounds", "short"))
    name = (f"intforge_requantize_16_{'short' if short else 'ifma'}_{out_dtype}"
            + ("_byte5" if whole_bytes and not short else "") + ("_bounds" if bounds and not short else ""))
    ensure_intrin(name, lambda: _intrin(out_dtype, whole_bytes, bounds, short))
    return name
