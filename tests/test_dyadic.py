"""The integer semantics: dyadic multipliers, round-half-up shift, saturation."""

import math

import numpy as np
import pytest

from intforge import dyadic
from intforge.dyadic import NUMPY_OPS
from intforge.errors import QuantizationError


@pytest.mark.parametrize("real", [1e-9, 3.7e-5, 0.0123, 0.5, 0.999999, 1.0, 1.5, 1234.5])
def test_multiplier_is_31_bit_and_accurate(real):
    m, n = dyadic.quantize_multiplier(real)
    assert (1 << 30) <= m < (1 << 31)
    assert 0 <= n <= dyadic.MAX_SHIFT
    assert abs(m / 2**n - real) <= real * 2**-30


def test_capped_shift_keeps_at_least_24_bits_and_leaves_tiny_multipliers_alone():
    """Conv requantizes hold their shift to CAPPED_SHIFT (the x86 epilogue then picks a byte instead of
    shifting) where the multiplier keeps CAPPED_MIN_BITS bits; others keep their own 31-bit multiplier."""
    reals = [0.3, 0.0009, 1e-4, 7.7e-6, 3e-6, 1e-8]
    m, n = dyadic.quantize_multipliers(reals, max_shift=dyadic.CAPPED_SHIFT)
    m0, n0 = dyadic.quantize_multipliers(reals)
    capped = [False, True, True, True, False, False]
    for r, mc, nc, mo, no, cap in zip(reals, m, n, m0, n0, capped, strict=True):
        assert (nc == dyadic.CAPPED_SHIFT < no) == cap
        if cap:
            assert (1 << (dyadic.CAPPED_MIN_BITS - 1)) <= mc < (1 << 30)
            assert abs(mc / 2**nc - r) <= r * 2**-dyadic.CAPPED_MIN_BITS
        else:
            assert (mc, nc) == (mo, no)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_zero_negative_and_nonfinite_multipliers_are_refused(bad):
    with pytest.raises(QuantizationError, match="positive finite"):
        dyadic.quantize_multiplier(bad)


def test_tiny_multiplier_saturates_the_shift_instead_of_overflowing():
    m, n = dyadic.quantize_multiplier(1e-30)
    assert n == dyadic.MAX_SHIFT and m == 0


def test_round_shift_rounds_half_up_including_negative_ties():
    acc = np.array([5, 6, 7, -5, -6, -7, 0, 4, -4], dtype=np.int32)  # / 4 with m = 1, n = 2
    got = dyadic.requantize(NUMPY_OPS, acc, 1, 2, -128, 127, "int8")
    # 1.25->1, 1.5->2, 1.75->2, -1.25->-1, -1.5->-1 (half up), -1.75->-2, 0, 1, -1
    np.testing.assert_array_equal(got, [1, 2, 2, -1, -1, -2, 0, 1, -1])


def test_requantize_saturates_at_int8_and_uint8_bounds():
    acc = np.array([-(2**31), -1000, 1000, 2**31 - 1], dtype=np.int32)
    np.testing.assert_array_equal(dyadic.requantize(NUMPY_OPS, acc, 1 << 30, 30, -128, 127, "int8"),
                                  [-128, -128, 127, 127])
    np.testing.assert_array_equal(dyadic.requantize(NUMPY_OPS, acc, 1 << 30, 30, 0, 255, "uint8"),
                                  [0, 0, 255, 255])


def test_extreme_accumulator_times_multiplier_does_not_overflow_int64():
    acc = np.array([2**31 - 1, -(2**31)], dtype=np.int32)
    m = (1 << 31) - 1
    got = dyadic.requantize(NUMPY_OPS, acc, m, 62, -128, 127, "int8")
    exact = [round(int(a) * m / 2**62) for a in acc]
    np.testing.assert_array_equal(got, exact)


def test_shared_shift_keeps_relative_multipliers():
    ms, n = dyadic.shared_shift_multipliers([0.75, 0.25])
    assert ms[0] == 3 * ms[1]
    assert ms[0] < (1 << 31)


@pytest.mark.parametrize("reals", [(0.75, 0.25), (1.0, 1.0), (0.999999, 0.3), (1.7, 0.004), (3e-5, 1e-3),
                                   (40000.0, 1.0)])
def test_add_multipliers_keep_15_bits_within_2_to_the_minus_15_of_the_largest(reals):
    """An add's multipliers (bits=ADD_MULTIPLIER_BITS) have their low 16 bits zero and the shared shift
    of the full-precision ones, each within 2^-15 of the largest (a largest one of 2^15 or more keeps
    all its bits)."""
    full, n_full = dyadic.shared_shift_multipliers(list(reals))
    ms, n = dyadic.shared_shift_multipliers(list(reals), bits=dyadic.ADD_MULTIPLIER_BITS)
    if max(reals) >= 2**15:
        assert (ms, n) == (full, n_full)
        return
    assert n in (n_full, n_full - 1) and all(m % (1 << dyadic.SPLIT_BITS) == 0 and 0 <= m < (1 << 31) for m in ms)
    for r, m in zip(reals, ms, strict=True):
        assert abs(m / 2**n - r) <= max(reals) * 2**-15


def test_quantize_float_is_round_half_even_and_clamped():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1000.0, 1000.0], dtype=np.float32)
    got = dyadic.quantize_float(NUMPY_OPS, x, 1.0, -128, 127, "int8")
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -128, 127])


def test_bias_joins_the_rounding_offset_exactly_and_never_wraps_in_int32():
    """requantize(acc, bias=b) is round_shift((acc + b) * m, n) on exact integers: the same as adding the
    bias to the accumulator first wherever that sum fits int32, and still exact where it does not."""
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**24), 2**24, (64, 8)).astype(np.int32)
    bias = rng.integers(-(2**20), 2**20, (1, 8)).astype(np.int32)
    m, n = dyadic.quantize_multipliers(rng.uniform(1e-4, 0.9, 8))
    m, n = m.reshape(1, 8), n.reshape(1, 8)
    folded = dyadic.requantize(NUMPY_OPS, acc, m, n, -128, 127, "int8", bias=bias)
    np.testing.assert_array_equal(folded, dyadic.requantize(NUMPY_OPS, acc + bias, m, n, -128, 127, "int8"))
    top = np.array([2**31 - 1], dtype=np.int32)  # acc + bias would wrap to a large negative int32
    got = dyadic.requantize(NUMPY_OPS, top, 1 << 30, 62, -(2**31), 2**31 - 1, "int64", bias=np.int32(1000))
    np.testing.assert_array_equal(got, [((2**31 - 1 + 1000) * (1 << 30) + (1 << 61)) >> 62])


@pytest.mark.parametrize("qmin, qmax", [(0, 255), (-128, 127), (0, 127), (-8, 7)])
def test_clamp_first_form_equals_requantize_at_and_around_every_bound(qmin, qmax):
    """dyadic.ClampFirst (the x86 IFMA epilogue's arithmetic) equals requantize on random accumulators,
    on each side of its clamp bounds, at the accumulator's proven bound, and on the step into every
    output value; its product fits 52 bits and acc - lo fits int32."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        channels = 6
        m, n = dyadic.quantize_multipliers(np.exp(rng.uniform(np.log(1e-4), 0.0, channels)))
        bias = rng.integers(-2**22, 2**22, channels)
        bound = rng.integers(1, 2**26, channels)
        form = dyadic.clamp_first(m, n, dyadic.requantize_total(m, n, bias), qmin, qmax, bound)
        if form is None:
            continue
        assert (form.span * form.mul < 2**dyadic.IFMA_BITS).all()
        assert (np.abs(form.lo) + bound < 2**31).all()
        edges = np.concatenate([form.lo + d for d in range(-2, 3)] + [form.lo + form.span + d for d in range(-2, 3)])
        steps = form.lo + ((np.arange(qmax - qmin + 1)[:, None] << n) // m).astype(np.int64)  # each value's start
        acc = np.concatenate([rng.integers(-bound, bound + 1, (500, channels)), edges.reshape(-1, channels),
                              steps, steps - 1, steps + 1, -bound[None], bound[None]])
        acc = np.clip(acc, -bound, bound).astype(np.int32)
        want = dyadic.requantize(NUMPY_OPS, acc, m, n, qmin, qmax, "int64", bias=bias)
        np.testing.assert_array_equal(form(acc), want)


def test_clamp_first_declines_what_it_cannot_do_exactly():
    """A multiplier above 1 (the result steps over values), a product over 52 bits (a multiplier so small
    that the accumulator's useful range is huge) and an accumulator bound near 2^31 give None."""
    total = lambda m, n: dyadic.requantize_total(m, n)  # noqa: E731
    m, n = dyadic.quantize_multipliers([1.5])
    assert dyadic.clamp_first(m, n, total(m, n), 0, 255, [1000]) is None
    m, n = dyadic.quantize_multipliers([1e-6])
    assert dyadic.clamp_first(m, n, total(m, n), 0, 255, [1000]) is None
    m, n = dyadic.quantize_multipliers([0.01])
    assert dyadic.clamp_first(m, n, total(m, n), 0, 255, [1000]) is not None
    assert dyadic.clamp_first(m, n, total(m, n), 0, 255, [2**31 - 10]) is None


def test_clamp_first_with_a_raised_shift_is_the_same_function():
    """Raising every channel's shift to 40 (the x86 kernel then reads byte 5 instead of shifting) scales
    mul and add exactly; a channel whose shift is already larger declines."""
    rng = np.random.default_rng(11)
    m, n = dyadic.quantize_multipliers([0.02, 0.005, 0.0031])
    form = dyadic.clamp_first(m, n, dyadic.requantize_total(m, n, [5, -7, 0]), -128, 127, [10**6] * 3)
    raised = form.with_shift(40)
    assert raised is not None and (raised.shift == 40).all() and (n < 40).all()
    acc = np.concatenate([rng.integers(-10**6, 10**6, (5000, 3)), form.lo + np.arange(-3, 4)[:, None],
                          form.lo + form.span + np.arange(-3, 4)[:, None]]).astype(np.int32)
    np.testing.assert_array_equal(raised(acc), form(acc))
    assert form.with_shift(int(n.max()) - 1) is None


def _ifma_byte(raw: np.ndarray, low, high, mul, add, shift: int, signed: bool) -> np.ndarray:
    """What the x86 kernel computes in `ClampFirst.with_bounds`' form, in Python integers: clamp the raw
    int32 sum, sign-extend, let vpmadd52luq add the low 52 bits of the product to the 64-bit constant
    (wrapping), and read the byte at `shift`."""
    out = np.empty(raw.shape, dtype=np.int64)
    for idx in np.ndindex(raw.shape):
        ch = idx[-1]
        u = min(max(int(raw[idx]), int(low[ch])), int(high[ch]))
        product = ((u % 2**64) % 2**52) * int(mul[ch]) % 2**52
        byte = ((int(add[ch]) % 2**64 + product) % 2**64 >> shift) & 0xFF
        out[idx] = byte - 256 if signed and byte >= 128 else byte
    return out


def _random_clamp_first(rng, multipliers, least: float, most: float, bias: int, qmin: int, qmax: int):
    """(m, n, bias, bound, form) for 4 channels: real multipliers log-uniform in [least, most] made dyadic
    by `multipliers`, biases in [-bias, bias), accumulator bounds up to 2^24, and their `ClampFirst` form
    (None where there is none)."""
    channels = 4
    m, n = multipliers(np.exp(rng.uniform(np.log(least), np.log(most), channels)))
    b = rng.integers(-bias, bias, channels)
    bound = rng.integers(1, 2**24, channels)
    return m, n, b, bound, dyadic.clamp_first(m, n, dyadic.requantize_total(m, n, b), qmin, qmax, bound)


@pytest.mark.parametrize("qmin, qmax", [(0, 255), (-128, 127)])
def test_clamp_first_with_its_correction_in_the_bounds_gives_the_same_bytes(qmin, qmax):
    """`ClampFirst.with_bounds`: the raw sum (before the signed-input correction c) clamped to
    [lo - c, lo - c + span] with c folded into the constant gives, on IFMA's wrapping 52-bit products,
    the same output byte as the form with the correction added first: at random sums, around both bounds
    and at the accumulator's bound, with corrections of both signs that make the clamped value negative
    and the product pass 64 bits."""
    rng = np.random.default_rng(13)
    checked = 0
    for _ in range(150):
        _, _, _, bound, form = _random_clamp_first(rng, dyadic.quantize_multipliers, 1e-4, 0.5, 2**20, qmin, qmax)
        channels = len(bound)
        byte = form.with_shift(40) if form is not None else None
        if byte is None:
            continue
        c = rng.integers(-2**26, 2**26, channels)  # 128 * sum(w) of a conv with signed inputs
        low, high, add = byte.with_bounds(c)
        assert (high.astype(np.int64) - low == byte.span).all()
        raw = np.concatenate([rng.integers(-bound, bound + 1, (300, channels)) - c,
                              low + np.arange(-2, 3)[:, None], high + np.arange(-2, 3)[:, None],
                              (-bound - c)[None], (bound - c)[None]]).astype(np.int64)
        raw = np.clip(raw, -2**31, 2**31 - 1)
        want = byte(raw + c)  # the correction added first, exactly (int64)
        got = _ifma_byte(raw, low, high, byte.mul, add, 40, qmin < 0)
        np.testing.assert_array_equal(got, want)
        checked += 1
    assert checked >= 20
    m, n = dyadic.quantize_multipliers([0.01])
    form = dyadic.clamp_first(m, n, dyadic.requantize_total(m, n), 0, 255, [1000])
    assert form.with_bounds([-(2**31)]) is None  # the low bound would leave int32
    assert form.with_shift(45) is None or form.with_shift(45).with_bounds([0]) is None  # byte past bit 52


def test_conv_multipliers_take_the_short_shift_only_where_every_channel_keeps_12_bits():
    """`dyadic.conv_multipliers`: shift SHORT_SHIFT where every channel's multiplier keeps SHORT_MIN_BITS
    bits there (each within 2^-12 of its real), else the layer keeps CAPPED_SHIFT's 24 bits; `short=False`
    always the latter."""
    reals = np.array([0.3, 0.01, 2.5e-4])  # 2.5e-4 * 2^24 = 4194: 13 bits
    m, n = dyadic.conv_multipliers(reals)
    assert (n <= dyadic.SHORT_SHIFT).all() and (n[1:] == dyadic.SHORT_SHIFT).all()
    assert (np.abs(m / 2.0**n - reals) <= reals * 2.0**-dyadic.SHORT_MIN_BITS).all()
    assert m[2] >= 1 << (dyadic.SHORT_MIN_BITS - 1)
    for layer in (np.append(reals, 1e-4), reals):  # 1e-4 * 2^24 = 1678: 11 bits, the whole layer declines
        m, n = dyadic.conv_multipliers(layer, short=layer.size == reals.size + 1)
        np.testing.assert_array_equal(n, dyadic.quantize_multipliers(layer, max_shift=dyadic.CAPPED_SHIFT)[1])


def _short_lane(raw: np.ndarray, low, high, mul, add, signed: bool) -> np.ndarray:
    """What the x86 kernel computes in the short form (`Narrow.short`), in Python integers: clamp the
    raw int32 sum, multiply and add on a wrapping 32-bit lane, shift by SHORT_SHIFT (arithmetically for
    a signed result)."""
    out = np.empty(raw.shape, dtype=np.int64)
    for idx in np.ndindex(raw.shape):
        ch = idx[-1]
        u = min(max(int(raw[idx]), int(low[ch])), int(high[ch]))
        v = (u * int(mul[ch]) + int(add[ch])) % 2**32
        if signed and v >= 2**31:
            v -= 2**32
        out[idx] = v >> dyadic.SHORT_SHIFT
    return out


@pytest.mark.parametrize("qmin, qmax", [(0, 255), (-128, 127)])
def test_short_form_on_wrapping_32_bit_lanes_equals_requantize(qmin, qmax):
    """The short bounds form (shift SHORT_SHIFT, 32-bit lanes): a conv's raw sum clamped to its bounds,
    times mul plus add wrapping mod 2^32, shifted, equals requantize of the corrected sum exactly: at
    random sums, around both bounds, on the step into every output value and at the accumulator's bound,
    with corrections of both signs. A shift above SHORT_SHIFT declines."""
    rng = np.random.default_rng(17)
    checked = 0
    for _ in range(120):
        m, n, bias, bound, form = _random_clamp_first(rng, dyadic.conv_multipliers, 3e-4, 0.9, 2**16, qmin, qmax)
        channels = len(bound)
        short = form.with_shift(dyadic.SHORT_SHIFT, bits=dyadic.SHORT_BITS) if form is not None else None
        if short is None:
            continue
        c = rng.integers(-2**22, 2**22, channels)
        low, high, add = short.with_bounds(c, bits=dyadic.SHORT_BITS)
        assert (np.abs(add) < 2**31).all() and (short.mul < 2**31).all()
        steps = form.lo + ((np.arange(qmax - qmin + 1)[:, None] << n) // m).astype(np.int64) - c
        raw = np.concatenate([rng.integers(-bound, bound + 1, (200, channels)) - c,
                              low + np.arange(-2, 3)[:, None], high + np.arange(-2, 3)[:, None],
                              steps, steps - 1, (-bound - c)[None], (bound - c)[None]]).astype(np.int64)
        raw = np.clip(raw, -bound - c, bound - c)
        want = dyadic.requantize(NUMPY_OPS, raw + c, m, n, qmin, qmax, "int64", bias=bias)
        np.testing.assert_array_equal(_short_lane(raw, low, high, short.mul, add, qmin < 0), want)
        checked += 1
    assert checked >= 20
    m, n = dyadic.quantize_multipliers([1e-5], max_shift=dyadic.CAPPED_SHIFT)
    form = dyadic.clamp_first(m, n, dyadic.requantize_total(m, n), 0, 255, [1000])
    assert form.with_shift(dyadic.SHORT_SHIFT, bits=dyadic.SHORT_BITS) is None


@pytest.mark.parametrize("bits", [dyadic.MULTIPLIER_BITS, dyadic.ADD_MULTIPLIER_BITS])
@pytest.mark.parametrize("dtypes", [("int8", "uint8", "uint8"), ("uint8", "uint8", "int8"), ("int8", "int8", "int8")])
def test_split32_residual_add_equals_rescale_sum_on_every_pair_of_inputs(dtypes, bits):
    """The residual add's int32 form gives rescale_sum's integers for all 256 x 256 input pairs, over
    multiplier ratios from 1/400 to 20 (shared shifts 25 to 40), both output signednesses; with an add's
    15-bit multipliers, without low-part products."""
    a_t, b_t, out_t = dtypes
    a = np.arange(256).astype(np.uint8).view(a_t).astype(np.int64).reshape(-1, 1).repeat(256, 1).astype(a_t)
    b = np.arange(256).astype(np.uint8).view(b_t).astype(np.int64).reshape(1, -1).repeat(256, 0).astype(b_t)
    qmin, qmax = dyadic.int_range(8, out_t == "int8")
    ranges = [dyadic.int_range(8, t == "int8") for t in (a_t, b_t)]
    rng = np.random.default_rng(0)
    for reals in [(1.0, 1.0), (0.0025, 20.0), (20.0, 0.05), *np.exp(rng.uniform(-6, 3, (40, 2)))]:
        ms, n = dyadic.shared_shift_multipliers([float(r) for r in reals], bits=bits)
        form = dyadic.split32(ms, n, qmin, qmax, ranges)
        assert form is not None, (reals, ms, n)
        assert form.low == (0, 0) or bits == dyadic.MULTIPLIER_BITS
        want = dyadic.rescale_sum(NUMPY_OPS, [(a, ms[0]), (b, ms[1])], n, qmin, qmax, out_t)
        got = form.apply(NUMPY_OPS, [a, b], out_t)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_split32_declines_sums_that_could_leave_int32():
    """A shift of 50 puts the rounding constant's high part at 2^33: no int32 form."""
    assert dyadic.split32([1 << 30, 1 << 30], 50, -128, 127, [(-128, 127), (0, 255)]) is None
    assert dyadic.split32([1 << 30, 1 << 30], 31, -128, 127, [(-128, 127), (0, 255)]) is not None
