"""Integer-only nonlinear ops (the I-BERT family): elementwise functions, softmax and LayerNorm.

Like `dyadic`, each op is written once on an ops backend (numpy for the reference executor, Relax for the
emitter), so the two compute the same integers by construction. Floats appear only here, at quantize
time, where the constants (tables, multipliers) are derived; the run-time arithmetic is integer.

- Elementwise functions (GELU, SiLU, sigmoid, tanh, hardswish, ...) of a b-bit input take one of 2^b
  values, so the op is a table of 2^b output integers indexed by the input: each entry is the float
  function rounded once, more accurate than I-BERT's second-order polynomial and one gather at run time.
- Softmax over the last axis: x - max(x) is an integer in [-(2^b - 1), 0], so exp of it is a table of
  2^b fixed-point values (`SOFTMAX_EXP_BITS` fraction bits); the output is round(Q * e / sum(e)) by one
  integer division, uint8 at scale 1/255 (Q = 255): probabilities, 1.0 included.
- LayerNorm over the last axis: with d = N x - sum(x) (N features), (x - mean) / std is
  d sqrt(N) / sqrt(sum d^2 + E) in the input's units (E carries eps), the square root an exact integer
  square root (floor, `intforge.kernels.isqrt`), the quotient in fixed point (`LAYERNORM_FRAC_BITS`),
  then gamma, beta and the output scale as one dyadic multiply-add per channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from . import dyadic
from .dyadic import IntOps, int_range
from .errors import QuantizationError

#: Fraction bits of softmax's exp table: exp(0) = 2^22. A row of L entries sums to under L * 2^22, and
#: each entry's rounding moves a probability by under 2^-23 of the row's sum.
SOFTMAX_EXP_BITS = 22
#: Softmax's output: uint8 probabilities at scale 1 / Q, Q = SOFTMAX_Q (1.0 is 255) unless calibration saw
#: no probability above 255 / Q for a larger Q (`softmax_q`), up to SOFTMAX_MAX_Q.
SOFTMAX_Q = 255
SOFTMAX_MAX_Q = 1 << 16
#: Fraction bits of LayerNorm's normalized value (x - mean) / std / sqrt(N), which lies in [-1, 1].
LAYERNORM_FRAC_BITS = 24


class TensorOps(IntOps, Protocol):
    """`IntOps` plus the gathers, reductions and selects the nonlinear ops need (last axis only)."""

    def sub(self, a: Any, b: Any) -> Any: ...
    def take(self, table: np.ndarray, index: Any) -> Any: ...
    def max_last(self, x: Any) -> Any: ...
    def sum_last(self, x: Any) -> Any: ...
    def floor_divide(self, a: Any, b: Any) -> Any: ...
    def isqrt(self, v: Any) -> Any: ...
    def shape(self, x: Any) -> tuple[int, ...]: ...
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...


# -- elementwise functions as tables ---------------------------------------------------------------

def unary_table(fn: Callable[[np.ndarray], np.ndarray], in_scale: float | np.ndarray, in_bits: int,
                in_signed: bool, out_scale: float | np.ndarray, qmin: int, qmax: int, out_dtype: str) -> np.ndarray:
    """The 2^in_bits outputs of `fn` (float64 in, float64 out) on every input integer, lowest first:
    clamp(floor(fn(in_scale * q) / out_scale + 1/2)). Rounds half up, like every requantize. With a step a
    channel on either side (`QTensor.steps`: outlier channels), a table a channel: shape (C, 2^in_bits)."""
    lo, hi = int_range(in_bits, in_signed)
    per_channel = np.ndim(in_scale) > 0 or np.ndim(out_scale) > 0
    q = np.arange(lo, hi + 1, dtype=np.float64)
    if per_channel:
        in_scale = np.reshape(np.asarray(in_scale, np.float64), (-1, 1))
        out_scale = np.reshape(np.asarray(out_scale, np.float64), (-1, 1))
    y = np.asarray(fn(in_scale * q), dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise QuantizationError("an elementwise function gave a non-finite value on the input's range")
    return dyadic.round_to_steps(y, out_scale, qmin, qmax, out_dtype)


def lookup(ops: TensorOps, x: Any, table: np.ndarray, in_qmin: int, row_of_channel: np.ndarray | None = None) -> Any:
    """table[x - in_qmin]: an elementwise function of a b-bit integer as one gather. With a table a channel
    of the last axis (`unary_table` with steps a channel), `table` holds its distinct rows (R, 2^b) and
    `row_of_channel` channel c's row: gathered flat at row_of_channel[c] 2^b + x - in_qmin. Channels' steps
    differ by powers of two, so a few rows serve them all (a BERT FFN's 1536 channels: about a dozen rows,
    a few kB that stay in L1 where 1536 rows took 384 kB)."""
    index = ops.add(ops.cast(x, "int32"), ops.const(-in_qmin, "int32"))
    if row_of_channel is not None:
        width = np.shape(table)[1]
        index = ops.add(index, ops.const(np.asarray(row_of_channel, np.int32) * width, "int32"))
        table = np.ascontiguousarray(table).reshape(-1)
    return ops.take(table, index)


def distinct_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A table a channel (C, 2^b) as its distinct rows and each channel's row (`lookup`); a single table as
    itself and None."""
    if np.ndim(table) != 2:
        return table, None
    rows, row_of_channel = np.unique(table, axis=0, return_inverse=True)
    return rows, row_of_channel.reshape(-1).astype(np.int32)


# -- softmax ---------------------------------------------------------------------------------------

def softmax_table(in_scale: float, in_bits: int) -> np.ndarray:
    """round(2^SOFTMAX_EXP_BITS * exp(in_scale * d)) for d = -(2^b - 1) .. 0, as int32 (index d + 2^b - 1)."""
    d = np.arange(-(1 << in_bits) + 1, 1, dtype=np.float64)
    return np.floor(np.exp(in_scale * d) * (1 << SOFTMAX_EXP_BITS) + 0.5).astype(np.int32)


def softmax_q(max_prob: float) -> int:
    """Q of a softmax's output scale 1 / Q, from the largest probability calibration saw: the finest steps
    that still hold it in 255 (floor(255 / max_prob)), at least SOFTMAX_Q (1.0 at 255) and at most
    SOFTMAX_MAX_Q. Attention over N tokens has rows of probabilities near 1 / N: at 1/255 a ViT's 197
    tokens kept one or two steps each, most rounding to 0."""
    if not max_prob > 0:
        return SOFTMAX_Q
    return int(min(max(math.floor(SOFTMAX_Q / max_prob), SOFTMAX_Q), SOFTMAX_MAX_Q))


def attention_keep(ops: TensorOps, mask: Any, kind: str, shape: tuple[int, ...]) -> Any:
    """Which keys each row of scores of `shape` (B, ..., Sq, Sk) keeps, int32 0/1 broadcastable to it: from
    `mask` (B, Sk), nonzero = keep (the boundary admits 0 and 1 only), for kind "keys"; the causal triangle
    (key j <= query i + Sk - Sq) for "causal"; both for "causal_keys" (`capture.MASK_KINDS`)."""
    sq, sk = shape[-2:]
    keep = None
    if kind in ("keys", "causal_keys"):
        keep = ops.reshape(ops.clip(ops.cast(mask, "int32"), 0, 1), (shape[0], *[1] * (len(shape) - 2), sk))
    if kind in ("causal", "causal_keys"):
        tri = np.tril(np.ones((sq, sk), np.int32), sk - sq).reshape(*[1] * (len(shape) - 2), sq, sk)
        keep = ops.const(tri, "int32") if keep is None else ops.mul(keep, ops.const(tri, "int32"))
    if keep is None:
        raise ValueError(f"not an attention mask kind: {kind!r}")
    return keep


def softmax(ops: TensorOps, x: Any, table: np.ndarray, out_dtype: str = "uint8", q: int = SOFTMAX_Q,
            keep: Any = None) -> Any:
    """Softmax over the last axis: e = table[x - max(x)], p = floor((2 Q e + sum e) / (2 sum e)), i.e.
    Q e / sum(e) rounded half up, in [0, Q] (e <= sum e; the max's entry is 2^22 > 0, so sum e > 0). With
    Q > 255 (`softmax_q`) p saturates at 255: the numerator is held to 512 sum e first (min(a, b) as
    b - clip(b - a, 0, ...)), so the quotient stays at most 256 (`divide_by_row`'s bound), then clamped.

    With `keep` (`attention_keep`), left-out keys are moved 2^b below the input's range before the max (so
    the max is a kept key's), their table index clipped into the table and their e multiplied by 0: the
    kept keys get exactly the softmax of the kept scores. A row that keeps no key has sum e = 0 and gets
    0 everywhere (its divisor held at 2; float softmax would give 0/0)."""
    x = ops.cast(x, "int32")
    if keep is not None:
        x = ops.sub(x, ops.mul(ops.sub(ops.const(1, "int32"), keep), ops.const(len(table), "int32")))
    index = ops.add(ops.sub(x, ops.max_last(x)), ops.const(len(table) - 1, "int32"))
    if keep is not None:
        index = ops.clip(index, 0, len(table) - 1)
    e = ops.cast(ops.take(table, index), "int64")
    if keep is not None:
        e = ops.mul(e, ops.cast(keep, "int64"))
    total = ops.sum_last(e)
    num = ops.add(ops.mul(e, ops.const(2 * q, "int64")), total)
    if q != SOFTMAX_Q:
        cap = ops.mul(total, ops.const(2 * 256, "int64"))
        num = ops.sub(cap, ops.clip(ops.sub(cap, num), 0, 1 << 62))
    den = total if keep is None else ops.clip(total, 1, 1 << 62)
    p = divide_by_row(ops, num, ops.mul(den, ops.const(2, "int64")))
    if q != SOFTMAX_Q:
        p = ops.clip(p, 0, 255)
    return ops.cast(p, out_dtype)


#: `divide_by_row`'s reciprocals: 2^53 / den, floored.
RECIPROCAL_SHIFT = 53


def divide_by_row(ops: TensorOps, num: Any, den: Any) -> Any:
    """floor(num / den) on int64, for 0 <= num < 2^53, den > 0 one value a row (the last axis reduced to 1),
    and quotients under 2^9 (softmax's, at most Q): one integer division a row and two multiplies a value,
    where dividing each value took an integer division each (a scalar `idiv`: no vector unit divides
    integers), 60% of a ViT-S/16's softmax time.

    With r = floor(2^S / den) (S = RECIPROCAL_SHIFT), num r / 2^S <= num / den and the difference
    num (2^S / den - r) / 2^S is below num / 2^S < 1, so q0 = (num r) >> S is the quotient q or q - 1;
    q0 + 1 where (q0 + 1) den <= num, i.e. clip(num - (q0 + 1) den + 1, 0, 1) added, is q. num r <=
    (num / den) 2^S < 2^62, so the product fits int64."""
    r = ops.floor_divide(ops.const(1 << RECIPROCAL_SHIFT, "int64"), den)
    q0 = ops.right_shift(ops.mul(num, r), ops.const(RECIPROCAL_SHIFT, "int64"))
    over = ops.sub(num, ops.mul(ops.add(q0, ops.const(1, "int64")), den))
    return ops.add(q0, ops.clip(ops.add(over, ops.const(1, "int64")), 0, 1))


# -- LayerNorm -------------------------------------------------------------------------------------

def layer_norm_params(features: int, in_scale: float, in_bits: int, in_signed: bool, gamma: np.ndarray,
                      beta: np.ndarray, eps: float, out_scale: float, name: str) -> dict[str, Any]:
    """The integer constants of LayerNorm over `features` values: eps in the units of sum d^2, and gamma,
    beta and the output scale as per-channel int64 (mul, add) over one shift. Refuses a layer whose sums
    could pass int64."""
    n = int(features)
    lo, hi = int_range(in_bits, in_signed)
    span = hi - lo
    d_max = n * span  # |N x_i - sum x| <= N (hi - lo)
    eps_term = int(round(n ** 3 * float(eps) / (in_scale * in_scale)))
    v_max = n * d_max * d_max + eps_term
    if v_max >= 1 << 62 or d_max << (LAYERNORM_FRAC_BITS + 1) >= 1 << 62:
        raise QuantizationError(
            f"LayerNorm '{name}' over {n} features (eps {eps:g} at input scale {in_scale:.3g}) would pass int64 "
            "in its variance; intforge's integer LayerNorm takes up to ~40,000 features and an eps under "
            "2^62 / N^3 input steps squared")
    # y_i = t_i * sqrt(N) * gamma_i / 2^K + beta_i, t = round(2^K d / sqrt(v)); in output steps:
    g = np.asarray(gamma, np.float64) * math.sqrt(n) / (out_scale * (1 << LAYERNORM_FRAC_BITS))
    b = np.asarray(beta, np.float64) / out_scale
    top = float(np.abs(g).max())
    if top > 0:
        _, shift = dyadic.quantize_multiplier(top)
    else:
        shift = dyadic.MULTIPLIER_BITS
    # held to 37: `add` (beta in output steps, times 2^shift) stays under 2^60 for |beta| up to 2^23 steps,
    # and |t * mul| < 2^(K + 1 + 31) = 2^56, so their sum with the rounding offset fits int64
    shift = min(shift, 62 - LAYERNORM_FRAC_BITS - 1)
    mul = np.round(g * (1 << shift)).astype(np.int64)
    add = np.round(b * (1 << shift)).astype(np.int64)
    if np.any(np.abs(add) >= 1 << 60) or np.any(np.abs(mul) >= 1 << 31):
        raise QuantizationError(f"LayerNorm '{name}': beta / gamma are too large for the output scale "
                                f"{out_scale:.3g}; calibrate the output on more representative data")
    return {"eps_term": eps_term, "shift": int(shift), "mul": mul, "add": add}


def layer_norm_max_exp(features: int, in_bits: int = 8) -> int:
    """The largest channel exponent k (`QTensor.channel_exp`) a LayerNorm over `features` values takes: its
    input times 2^k spans in_bits + k bits, and N (N 2^(in_bits + k))^2, its variance's bound with room for
    eps, must stay under 2^61 (`layer_norm_params` refuses past 2^62). 9 for 384 features, 8 for 768."""
    n, k = int(features), 0
    while k < 24 and n * (n << (in_bits + k + 1)) ** 2 < 1 << 61:
        k += 1
    return k


def layer_norm(ops: TensorOps, x: Any, eps_term: int, mul: Any, add: Any, shift: int,
               qmin: int, qmax: int, out_dtype: str) -> Any:
    """LayerNorm over the last axis (N features), on int64: d = N x - sum x, r = max(floor(sqrt(sum d^2 + E)), 1),
    t = round(2^K d / r) (half up), q = clamp((t mul + add + 2^(shift-1)) >> shift). `mul`, `add` are the
    per-channel constants of `layer_norm_params` shaped to broadcast on the last axis."""
    x = ops.cast(x, "int64")
    n = ops.shape(x)[-1]
    d = ops.sub(ops.mul(x, ops.const(n, "int64")), ops.sum_last(x))
    v = ops.add(ops.sum_last(ops.mul(d, d)), ops.const(eps_term, "int64"))
    r = ops.clip(ops.isqrt(v), 1, 1 << 31)
    t = normalize_by_row(ops, d, r)
    return dyadic.rescale_sum(ops, [(t, mul)], shift, qmin, qmax, out_dtype, offset=add)


#: `normalize_by_row`'s reciprocals: 2^(K + NORMALIZE_SHIFT) / r, floored (K = LAYERNORM_FRAC_BITS).
NORMALIZE_SHIFT = 38


def normalize_by_row(ops: TensorOps, d: Any, r: Any) -> Any:
    """round(2^K d / r) half up, i.e. floor((2^(K+1) d + r) / (2 r)), on int64 (K = LAYERNORM_FRAC_BITS), for
    one r a row with |d| <= r < 2^31 (LayerNorm: r = floor(sqrt(sum d^2 + E)) >= |d|) and |d| < 2^37
    (`layer_norm_params`): one integer division a row and multiplies a value, not an integer division
    each (a scalar `idiv`).

    With R = floor(2^(K+S) / r) (S = NORMALIZE_SHIFT), v' = (d R + 2^(S-1)) / 2^S differs from the exact
    v = 2^K d / r + 1/2 by |d| (2^(K+S) / r - R) / 2^S < |d| / 2^S < 1/2, so q0 = floor(v') is the result
    q or q -+ 1; adding [num >= (q0 + 1) 2r] and subtracting [num < q0 2r] (num = 2^(K+1) d + r, as clips)
    gives q. |d R| <= 2^(K+S) since |d| <= r, so every product fits int64."""
    k, s = LAYERNORM_FRAC_BITS, NORMALIZE_SHIFT
    big = ops.floor_divide(ops.const(1 << (k + s), "int64"), r)
    q0 = ops.right_shift(ops.add(ops.mul(d, big), ops.const(1 << (s - 1), "int64")), ops.const(s, "int64"))
    num = ops.add(ops.mul(d, ops.const(1 << (k + 1), "int64")), r)
    den = ops.mul(r, ops.const(2, "int64"))
    one = ops.const(1, "int64")
    up = ops.clip(ops.add(ops.sub(num, ops.mul(ops.add(q0, one), den)), one), 0, 1)
    down = ops.clip(ops.sub(ops.mul(q0, den), num), 0, 1)
    return ops.sub(ops.add(q0, up), down)


def isqrt_numpy(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of int64 v in [0, 2^62), exactly: the float root, then corrected by whole steps
    (r^2 <= 2^62 fits int64). An implementation independent of the kernel's: both compute the one integer
    floor(sqrt(v)), which the bit-exact tests compare."""
    v = np.asarray(v, dtype=np.int64)
    r = np.sqrt(v.astype(np.float64)).astype(np.int64)
    for _ in range(2):
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


# -- the ops of the integer program --------------------------------------------------------------------

KINDS = ("lut", "softmax", "layernorm", "embedding")


def run(ops: TensorOps, kind: str, attrs: dict[str, Any], params: dict[str, np.ndarray], x: Any,
        out_dtype: str, *rest: Any) -> Any:
    """One integer-program op of these `KINDS` on `ops` (its first input `x`, the others `rest`: a
    softmax's mask): the reference executor and the Relax emitter both call this, so they read the op's
    attrs and params the same way."""
    if kind == "lut":
        return lookup(ops, x, params["table"], attrs["in_qmin"], params.get("row_of_channel"))
    if kind == "embedding":  # token ids (checked in range at the boundary) -> rows of the int8 table
        return ops.take(params["table"], ops.cast(x, "int32"))
    if kind == "softmax":
        keep = attention_keep(ops, rest[0] if rest else None, attrs["mask"], ops.shape(x)) \
            if attrs.get("mask") else None
        return softmax(ops, x, params["table"], out_dtype, int(attrs.get("q", SOFTMAX_Q)), keep)
    if kind == "layernorm":
        if "in_mul" in params:  # outlier channels (`QTensor.channel_exp`): each to the finest step first
            x = ops.mul(ops.cast(x, "int64"), ops.const(params["in_mul"], "int64"))
        return layer_norm(ops, x, attrs["eps_term"], params["mul"], params["add"], attrs["shift"], attrs["qmin"],
                          attrs["qmax"], out_dtype)
    raise ValueError(f"not a nonlinear op kind: {kind!r}")


# -- numpy backend ---------------------------------------------------------------------------------

class NumpyTensorOps(dyadic.NumpyOps):
    """`TensorOps` on numpy arrays: what the reference executor computes with."""

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.subtract(a, b)

    def take(self, table: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.asarray(table)[index]

    def max_last(self, x: np.ndarray) -> np.ndarray:
        return np.max(x, axis=-1, keepdims=True)

    def sum_last(self, x: np.ndarray) -> np.ndarray:
        return np.sum(x, axis=-1, keepdims=True, dtype=x.dtype)

    def floor_divide(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.floor_divide(a, b)

    def isqrt(self, v: np.ndarray) -> np.ndarray:
        return isqrt_numpy(v)

    def shape(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(int(d) for d in np.shape(x))

    def reshape(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.reshape(x, shape)


NUMPY_TENSOR_OPS = NumpyTensorOps()
