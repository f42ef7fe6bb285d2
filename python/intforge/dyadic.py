"""The one definition of intforge's integer semantics: dyadic multipliers, rounding shift, saturation.

The reference executor (numpy) and the Relax emitter both call the functions below with their own
``ops`` backend, so the arithmetic they perform cannot drift apart. Rounding is "round half up"
(add 2^(n-1), then arithmetic shift right by n), saturation is a clamp to the target range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import QuantizationError

#: Multipliers are 31-bit: m in [2^30, 2^31) so that int32 accumulator * m fits int64.
MULTIPLIER_BITS = 31
#: Largest shift we emit; a real multiplier below 2^-MAX_SHIFT rounds to zero.
MAX_SHIFT = 62
#: The shift a per-channel conv/dense requantize is held to where that keeps its multiplier precise
#: (`quantize_multipliers(..., max_shift=CAPPED_SHIFT)`): at 40 the requantized value is byte 5 of a
#: 64-bit lane, which the x86 IFMA epilogue picks out instead of shifting (two instructions fewer per
#: 16 outputs), and u * m of `ClampFirst` stays under 52 bits for any 8-bit result.
CAPPED_SHIFT = 40
#: A capped multiplier keeps at least this many bits (relative error under 2^-CAPPED_MIN_BITS); a real
#: multiplier too small for that keeps its own shift.
CAPPED_MIN_BITS = 24
#: The shift a conv's requantize takes where every channel's multiplier keeps SHORT_MIN_BITS bits there
#: (`conv_multipliers`): at 24 an 8-bit result is byte 3 of a 32-bit lane, so `ClampFirst`'s
#: u * m + add, wrapping on 32-bit lanes, still holds it exactly (`ClampFirst.with_bounds(..., bits=32)`),
#: and the x86 epilogue multiplies 16 lanes at a time (`vpmulld`) instead of 8 (`vpmadd52luq`).
SHORT_SHIFT = 24
#: Bits of the lanes the short form wraps on.
SHORT_BITS = 32
#: The fewest bits a multiplier keeps in the short form: relative error under 2^-12, so an output of
#: magnitude q (in output steps) moves by under q * 2^-12 (0.031 of a step at 127, 0.062 at 255)
#: before its rounding, against the rounding's own 0.5.
SHORT_MIN_BITS = 12


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Return (qmin, qmax) of a `bits`-wide integer, signed or unsigned."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def storage_dtype(bits: int, signed: bool) -> str:
    """The numpy/TVM dtype that holds a `bits`-wide value (INT4 lives in int8/uint8 until packed)."""
    if bits > 8:
        raise QuantizationError(f"activations wider than 8 bits are not supported (asked for {bits})")
    return "int8" if signed else "uint8"


def quantize_multiplier(real: float, shift: int | None = None) -> tuple[int, int]:
    """Approximate a positive real multiplier M by m / 2^n with m a 31-bit integer.

    With `shift` given, n is fixed and only m is derived (used when several terms share one shift).
    """
    if not math.isfinite(real) or real <= 0.0:
        raise QuantizationError(
            f"requantization multiplier {real!r} is not a positive finite number; a zero or negative "
            "scale reached the integer program. Check the calibration ranges and weight scales."
        )
    if shift is None:
        mant, exp = math.frexp(real)  # real = mant * 2^exp, mant in [0.5, 1)
        shift = MULTIPLIER_BITS - exp
        if shift < 0:
            raise QuantizationError(
                f"requantization multiplier {real:g} is too large (>= 2^31); the output scale is "
                "implausibly small compared to the input scales."
            )
        shift = min(shift, MAX_SHIFT)
    m = round(real * (1 << shift))
    if m >= (1 << MULTIPLIER_BITS):  # rounding carried into bit 31
        if shift == 0:
            raise QuantizationError(f"requantization multiplier {real:g} does not fit 31 bits")
        m = round(real * (1 << (shift - 1)))
        shift -= 1
    return int(m), int(shift)


def quantize_multipliers(reals: Sequence[float] | np.ndarray, max_shift: int | None = None,
                         min_bits: int = CAPPED_MIN_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `quantize_multiplier` for per-channel multipliers: (m, n) as int64 arrays. With
    `max_shift`, a channel whose shift would be larger gets that shift (and a shorter m) where m keeps
    `min_bits` bits."""
    pairs = [_capped(float(r), max_shift, min_bits) for r in np.asarray(reals, dtype=np.float64).ravel()]
    m = np.array([p[0] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    n = np.array([p[1] for p in pairs], dtype=np.int64).reshape(np.shape(reals))
    return m, n


def conv_multipliers(reals: Sequence[float] | np.ndarray, short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A conv's per-channel (m, n): shifts held to SHORT_SHIFT where every channel's multiplier keeps
    SHORT_MIN_BITS bits there (and `short`), else to CAPPED_SHIFT (`quantize_multipliers`)."""
    if short:
        m, n = quantize_multipliers(reals, max_shift=SHORT_SHIFT, min_bits=SHORT_MIN_BITS)
        if (n <= SHORT_SHIFT).all():
            return m, n
    return quantize_multipliers(reals, max_shift=CAPPED_SHIFT)


def layer_multipliers(kind: str, reals: Sequence[float] | np.ndarray,
                      short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (m, n) of a conv2d or linear layer's requantize, as the quantizer gives them: a
    conv's held to SHORT_SHIFT where it can be (`conv_multipliers`); a dense layer's keep 24+ bits at
    CAPPED_SHIFT (it is often the model's output). One definition, so that a layer timed alone
    (`latency.layer_program`) takes the same epilogue as the layer inside a model."""
    if kind == "conv2d":
        return conv_multipliers(reals, short=short)
    return quantize_multipliers(reals, max_shift=CAPPED_SHIFT)


def _capped(real: float, max_shift: int | None, min_bits: int = CAPPED_MIN_BITS) -> tuple[int, int]:
    m, n = quantize_multiplier(real)
    if max_shift is not None and n > max_shift:
        mc, nc = quantize_multiplier(real, shift=max_shift)
        if mc >= 1 << (min_bits - 1):
            return mc, nc
    return m, n


def shared_shift_multipliers(reals: Sequence[float], bits: int = MULTIPLIER_BITS) -> tuple[list[int], int]:
    """Multipliers for terms summed before one rounding shift (residual add, average pool).

    The shift is chosen so that the largest multiplier uses the full 31 bits. With `bits` < 31 every
    multiplier keeps only its top `bits` bits (the low 31 - bits are zero), unless the largest one is so
    large (2^bits or more) that it keeps them all.
    """
    _, shift = quantize_multiplier(max(reals))
    drop = MULTIPLIER_BITS - bits if shift >= MULTIPLIER_BITS - bits else 0
    coarse = shift - drop
    ms = [quantize_multiplier(r, shift=coarse)[0] for r in reals]
    if drop and max(ms) >= 1 << bits:  # rounding carried into bit `bits`
        coarse -= 1
        ms = [quantize_multiplier(r, shift=coarse)[0] for r in reals]
    return [m << drop for m in ms], coarse + drop


def rounding_offset(shift: np.ndarray | int) -> np.ndarray:
    """2^(n-1) for n > 0, else 0: the bias that turns an arithmetic shift into round-half-up."""
    n = np.asarray(shift, dtype=np.int64)
    return np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0).astype(np.int64)


class IntOps(Protocol):
    """The handful of operations the integer semantics are written in (numpy or Relax)."""

    def const(self, value: np.ndarray | int, dtype: str) -> Any: ...
    def cast(self, x: Any, dtype: str) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def right_shift(self, a: Any, b: Any) -> Any: ...
    def clip(self, x: Any, lo: int | float, hi: int | float) -> Any: ...
    def round(self, x: Any) -> Any: ...


def rescale_sum(
    ops: IntOps,
    terms: Sequence[tuple[Any, np.ndarray | int]],
    shift: np.ndarray | int,
    qmin: int,
    qmax: int,
    out_dtype: str,
    offset: np.ndarray | int = 0,
) -> Any:
    """clamp(round_shift(sum_i x_i * m_i + offset, n), qmin, qmax), computed in int64.

    Every requantization in intforge is this function: one term for conv/linear/pooling,
    two for a residual add. `offset` (int64, per channel) joins the rounding offset in one constant.
    """
    acc = None
    for x, m in terms:
        t = ops.mul(ops.cast(x, "int64"), ops.const(np.asarray(m, dtype=np.int64), "int64"))
        acc = t if acc is None else ops.add(acc, t)
    acc = ops.add(acc, ops.const(rounding_offset(shift) + np.asarray(offset, dtype=np.int64), "int64"))
    acc = ops.right_shift(acc, ops.const(np.asarray(shift, dtype=np.int64), "int64"))
    acc = ops.clip(acc, qmin, qmax)
    return ops.cast(acc, out_dtype)


def residual_add(ops: IntOps, args: Sequence[Any], multipliers: np.ndarray, shift: np.ndarray | int, qmin: int,
                 qmax: int, out_dtype: str, offset: np.ndarray | int = 0) -> Any:
    """The add op: input i times multipliers[i] (a number, or one a channel of the last axis where the
    output has outlier channels), summed with `offset` (a constant added, in output steps times 2^shift),
    one rounding shift (or one a channel), clamped."""
    return rescale_sum(ops, list(zip(args, list(multipliers), strict=True)), shift, qmin, qmax, out_dtype, offset)


#: Low bits of each multiplier that `Split32` keeps apart (the high part is m >> SPLIT_BITS).
SPLIT_BITS = 16
#: Significant bits of an add's multipliers (`shared_shift_multipliers(..., bits=ADD_MULTIPLIER_BITS)`):
#: with their low SPLIT_BITS bits zero, `Split32` has no low-part products, and a residual add is one
#: 16-bit multiply a term on int32 lanes (x86 `vpmaddwd`). Each multiplier is then off by at most 2^-15
#: of the largest one, r: an 8-bit term's error stays under 255 * 2^-15 * r, 0.008 r of an output step.
ADD_MULTIPLIER_BITS = MULTIPLIER_BITS - SPLIT_BITS


@dataclass(frozen=True)
class Split32:
    """A `rescale_sum` of narrow (8-bit) terms rewritten so that every step fits int32 lanes.

    With each multiplier split as m_i = h_i * 2^s + l_i (0 <= l_i < 2^s) and the constant as
    R = Rh * 2^s + Rl, the int64 sum is X = 2^s * A + B, A = sum q_i h_i + Rh, B = sum q_i l_i + Rl, and
        floor(X / 2^n) == (A + (B >> s)) >> (n - s)
    (floor(X / 2^s) = A + floor(B / 2^s) as A is an integer; then floor of a floor). `split32` derives it
    only where |A|, |B| and A + (B >> s) provably stay below 2^31 for every input in range, so a kernel
    computes the same integers on 16 int32 lanes a register instead of 8 int64 ones. A residual add's
    rescale-add-clamp is this with two terms."""

    high: tuple[int, ...]  # h_i
    low: tuple[int, ...]  # l_i
    add_high: int  # Rh
    add_low: int  # Rl
    split: int  # s
    shift: int  # n - s
    qmin: int
    qmax: int

    def apply(self, ops: IntOps, xs: Sequence[Any], out_dtype: str) -> Any:
        """The rewritten sum on `ops` (numpy or TIR), each x_i cast to int32 first."""
        xs = [ops.cast(x, "int32") for x in xs]
        a = b = None
        for x, h, lo in zip(xs, self.high, self.low, strict=True):
            ta = ops.mul(x, ops.const(h, "int32"))
            a = ta if a is None else ops.add(a, ta)
            if lo:  # (an add's multipliers have no low part: ADD_MULTIPLIER_BITS)
                tb = ops.mul(x, ops.const(lo, "int32"))
                b = tb if b is None else ops.add(b, tb)
        if b is None:  # B is the constant Rl: its part above the split joins A's constant
            total = ops.add(a, ops.const(self.add_high + (self.add_low >> self.split), "int32"))
        else:
            a = ops.add(a, ops.const(self.add_high, "int32"))
            b = ops.add(b, ops.const(self.add_low, "int32"))
            total = ops.add(a, ops.right_shift(b, ops.const(self.split, "int32")))
        return ops.cast(ops.clip(ops.right_shift(total, ops.const(self.shift, "int32")), self.qmin, self.qmax),
                        out_dtype)


def split32(multipliers: Sequence[int], shift: int, qmin: int, qmax: int,
            term_ranges: Sequence[tuple[int, int]]) -> Split32 | None:
    """The `Split32` form of rescale_sum(terms, shift, qmin, qmax) for terms whose values lie in
    `term_ranges` (inclusive, one (lo, hi) a term), or None where some intermediate could leave int32
    (then the int64 form stays)."""
    if shift < 1 or any(m < 0 for m in multipliers):
        return None
    s = min(SPLIT_BITS, shift)
    total = int(rounding_offset(shift))
    high = tuple(int(m) >> s for m in multipliers)
    low = tuple(int(m) & ((1 << s) - 1) for m in multipliers)
    rh, rl = total >> s, total & ((1 << s) - 1)

    def extreme(coeffs: Sequence[int], const: int) -> int:
        """max |sum x_i c_i + const| over the term ranges."""
        top = const + sum(max(c * lo, c * hi) for c, (lo, hi) in zip(coeffs, term_ranges, strict=True))
        bottom = const + sum(min(c * lo, c * hi) for c, (lo, hi) in zip(coeffs, term_ranges, strict=True))
        return max(abs(top), abs(bottom))

    b_max = extreme(low, rl)
    a_max = extreme(high, rh)
    if max(a_max + (b_max >> s) + 1, b_max) >= (1 << 31):
        return None
    return Split32(high, low, rh, rl, s, shift - s, qmin, qmax)


def requantize_total(m: np.ndarray | int, n: np.ndarray | int, bias: np.ndarray | int | None = None) -> np.ndarray:
    """The int64 constant `requantize` adds before its shift (what `rescale_sum` adds): the rounding
    offset plus bias * m."""
    return rounding_offset(n) + _bias_offset(m, bias)


def _bias_offset(m: np.ndarray | int, bias: np.ndarray | int | None) -> np.ndarray | int:
    """bias * m in int64, the part of the requantize's constant that the bias brings (0 without one)."""
    return 0 if bias is None else np.asarray(bias, dtype=np.int64) * np.asarray(m, dtype=np.int64)


def requantize(
    ops: IntOps, acc: Any, m: np.ndarray | int, n: np.ndarray | int, qmin: int, qmax: int, out_dtype: str,
    bias: np.ndarray | int | None = None,
) -> Any:
    """Dyadic requantization of one int32 accumulator: clamp(round_shift((acc + bias) * m, n)).

    The bias (int32, per channel) is not added to the accumulator: bias * m joins the rounding offset in
    one int64 constant, so each output costs one add instead of two, and acc + bias never wraps in int32.
    (|acc * m|, |bias * m| < 2^62: the int64 sum cannot overflow.)"""
    return rescale_sum(ops, [(acc, m)], n, qmin, qmax, out_dtype, _bias_offset(m, bias))


#: Bits of the unsigned product a 52-bit multiply-add (x86 AVX512-IFMA `vpmadd52luq`) keeps.
IFMA_BITS = 52


@dataclass(frozen=True)
class ClampFirst:
    """`requantize` rewritten so that its int64 part needs no clamp and its product has at most 52 bits.

    For each channel, with u = clip(acc - lo, 0, span) (an int32, at most `span`):
        requantize(acc) == (u * mul + add) >> shift      (int64, exact; the result is in [qmin, qmax])
    lo is the largest accumulator that requantizes to qmin, lo + span the smallest that gives qmax, so
    clamping the accumulator first clamps the result, and u * mul < 2^52 is an unsigned 52-bit product.
    A kernel then needs no 64-bit clamp and can do the multiply-add as one `vpmadd52luq` (8 lanes).
    Arrays are int64, one entry per channel."""

    lo: np.ndarray
    span: np.ndarray
    mul: np.ndarray
    add: np.ndarray
    shift: np.ndarray

    def with_shift(self, shift: int, bits: int = IFMA_BITS) -> ClampFirst | None:
        """The same function with every channel's shift raised to `shift` (mul and add scaled by the same
        power of 2: exact), or None where a channel's shift is larger or its product would pass `bits`
        bits. With shift 40, a kernel reads the result as byte 5 of the 64-bit lane instead of shifting;
        with SHORT_SHIFT, byte 3 of a 32-bit lane (bits=SHORT_BITS)."""
        if (self.shift > shift).any():
            return None
        k = shift - self.shift
        if (self.span * (self.mul << k) >= (1 << bits)).any() or (np.abs(self.add) >= (1 << (62 - k))).any():
            return None
        return ClampFirst(self.lo, self.span, self.mul << k, self.add << k, np.full_like(self.shift, shift))

    def with_bounds(self, correction: np.ndarray, bits: int = IFMA_BITS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The same function on a raw accumulator r = acc - correction (a kernel's sum before its
        per-channel correction: signed activations run shifted by 128), with no add on r:
            u' = clip(r, low, high),  v = u' * mul + add'   (low = lo - c, high = low + span,
                                                            add' = add + (c - lo) * mul)
        Then v = u * mul + add exactly (u' = u + lo - c), but u' can be negative and u' * mul can pass 64
        bits, so a kernel computes v on wrapping lanes, where only bits below 52 (vpmadd52luq) or 64 are
        right: enough for the result when it is the byte at `shift` and shift + 8 <= 52. With bits=32
        (SHORT_BITS) the lanes are 32 bits wide: the result byte needs shift + 8 <= 32, and add' is
        returned mod 2^32 (as a signed int64 in int32's range). Returns (low, high as int32, add' as int64
        mod 2^64 or 2^32), or None where a shift is too large or a bound leaves int32."""
        if (self.shift + 8 > bits).any():
            return None
        c = np.asarray(correction, dtype=np.int64)
        low = self.lo - c
        high = low + self.span
        if (np.abs(low) >= (1 << 31)).any() or (np.abs(high) >= (1 << 31)).any():
            return None
        u64 = lambda v: np.asarray(v, dtype=np.int64).view(np.uint64)  # noqa: E731 - two's complement
        add = (u64(self.add) + u64(c - self.lo) * u64(self.mul)).view(np.int64)  # wraps mod 2^64
        if bits == SHORT_BITS:  # the same value mod 2^32, as the int32 a 32-bit lane holds
            add = add.astype(np.int32).astype(np.int64)
        return low.astype(np.int32), high.astype(np.int32), add

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        """The rewritten requantize on numpy int32 accumulators (channels last): what a kernel computes."""
        u = np.clip(acc.astype(np.int64) - self.lo, 0, self.span)
        return (u * self.mul + self.add) >> self.shift


def clamp_first(m: np.ndarray, n: np.ndarray, total: np.ndarray, qmin: int, qmax: int,
                acc_bound: np.ndarray) -> ClampFirst | None:
    """Derive the `ClampFirst` form of a one-term `rescale_sum`: clamp((acc * m + total) >> n, qmin,
    qmax), where total is the constant it adds (rounding offset and bias * m; `requantize_total`),
    per channel, or None where one channel has none: a multiplier above 1 (m > 2^n, the result could
    skip qmin, so a clamped accumulator would not clamp the result), a product over 52 bits, or clamp
    bounds that acc - lo could overflow int32 with (|acc| <= acc_bound, the accumulator's proven bound)."""
    m, n, total, acc_bound = (np.broadcast_to(np.asarray(v, dtype=np.int64), np.shape(m)).ravel()
                              for v in (m, n, total, acc_bound))
    lo, span, add = [], [], []
    for mc, nc, tc, bc in zip(m.tolist(), n.tolist(), total.tolist(), acc_bound.tolist(), strict=True):
        if mc <= 0 or mc > (1 << nc):
            return None

        def first_at_least(q: int, mc=mc, nc=nc, tc=tc) -> int:
            """The smallest accumulator a with (a * m + total) >> n >= q."""
            return -((tc - (q << nc)) // mc)  # ceil((q * 2^n - total) / m)

        low = first_at_least(qmin + 1) - 1
        high = first_at_least(qmax)
        if ((high - low) * mc + mc >= (1 << IFMA_BITS) or max(abs(low), abs(high)) + bc >= (1 << 31)
                or high - low >= (1 << 31) or max(abs(qmin), abs(qmax) + 1) << nc >= (1 << 63)):
            return None  # (the last: u * mul + add, at most (qmax + 1) * 2^n, must fit int64)
        lo.append(low)
        span.append(high - low)
        add.append(low * mc + tc)
    as64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    return ClampFirst(as64(lo), as64(span), m.copy(), as64(add), n.copy())


def round_to_steps(values: np.ndarray, scale: float, qmin: int, qmax: int, dtype: str) -> np.ndarray:
    """Float values (known at quantize time: a table's entries, a constant parameter) as integers at
    `scale`: clamp(floor(v / scale + 1/2)), half up like every requantize."""
    return np.clip(np.floor(np.asarray(values, np.float64) / scale + 0.5), qmin, qmax).astype(dtype)


def quantize_float(ops: IntOps, x: Any, scale: float, qmin: int, qmax: int, out_dtype: str) -> Any:
    """The input boundary: clamp(round_half_even(x * float32(1/scale))) in float32."""
    inv = np.float32(1.0 / scale)
    y = ops.round(ops.mul(ops.cast(x, "float32"), ops.const(np.asarray(inv, dtype=np.float32), "float32")))
    return ops.cast(ops.clip(y, float(qmin), float(qmax)), out_dtype)


def refuse_nan(name: str, x: np.ndarray) -> None:
    """The input boundary takes no NaN: an integer model has no NaN to give back, and `quantize_float`'s clamp
    leaves it to the compiled code (the .so took it as +inf, numpy's cast gave 0), so both sides refuse it.
    +-inf saturates to the clamp's bounds like any value past the range. Small inputs test x . x (NaN exactly
    where some element is: squares are >= 0, no inf - inf), 3 us a call inside the MNIST demo's 55 where
    x.max() took 7; large ones x.max() (BLAS may run a long dot product on its own threads, which then spin
    beside the model's), about 15 us at 1x3x224x224, 0.5% of a MobileNetV2 call (Zen 3, 2026-12-06)."""
    if x.dtype.kind != "f" or not x.size:
        return
    if math.isnan(np.vdot(x, x) if x.size <= SMALL_INPUT else x.max()):
        raise QuantizationError(f"input '{name}' holds NaN ({int(np.isnan(x).sum())} of {x.size} values): an "
                                "integer model has nothing to map it to; replace the NaNs before the call")


SMALL_INPUT = 8192  # elements: below OpenBLAS's threshold for threading a dot product (10,000)


def dequantize_int(ops: IntOps, q: Any, scale: float) -> Any:
    """The output boundary: float32(q) * float32(scale)."""
    return ops.mul(ops.cast(q, "float32"), ops.const(np.asarray(np.float32(scale)), "float32"))


class NumpyOps:
    """`IntOps` on numpy arrays: what the reference executor computes with."""

    def const(self, value: np.ndarray | int, dtype: str) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def cast(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return np.asarray(x).astype(dtype)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.add(a, b)

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.multiply(a, b)

    def right_shift(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.right_shift(a, b)

    def clip(self, x: np.ndarray, lo: int | float, hi: int | float) -> np.ndarray:
        return np.clip(x, np.asarray(lo, dtype=x.dtype), np.asarray(hi, dtype=x.dtype))

    def round(self, x: np.ndarray) -> np.ndarray:
        return np.round(x)


NUMPY_OPS = NumpyOps()
