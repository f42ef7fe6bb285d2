"""The I-BERT family of integer ops (intforge.nonlinear): how close they are to float, their integer square
root on extremes, refusals, and a token model trained on real digits compiled bit-exact."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intforge
from conftest import assert_bit_exact_int, quantize_module
from intforge import nonlinear, reference, zoo
from intforge.errors import QuantizationError, UnsupportedOpError
from intforge.program import IntegerProgram


def _dequantized_input(program, rng, shape=None):
    """Every integer the input can hold, or random ones, and their real values."""
    t = program.tensors[program.inputs[0]]
    q = rng.integers(t.qmin, t.qmax + 1, shape or t.shape).astype(t.dtype)
    return q, t.scale * q.astype(np.float64)


@pytest.mark.parametrize("fn", [nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(),
                                nn.Hardsigmoid(), nn.LeakyReLU(0.1), nn.ELU(), nn.Mish(), nn.Softplus()])
def test_elementwise_tables_round_the_float_function_once(fn):
    """Each table entry is the float function of the input's real value rounded to the output's step: within
    half a step of it wherever the output range holds it."""
    program = quantize_module(nn.Sequential(fn), (1, 64), n_calib=64, scale=3.0)
    (op,) = program.ops
    x, out = program.tensors[op.inputs[0]], program.tensors[op.output]
    assert op.kind == "lut" and op.params["table"].size == 256
    q = np.arange(x.qmin, x.qmax + 1)
    want = fn(torch.from_numpy(x.scale * q.astype(np.float64))).numpy()
    got = op.params["table"].astype(np.float64) * out.scale
    inside = (want >= out.qmin * out.scale) & (want <= out.qmax * out.scale)
    assert inside.mean() > 0.9
    assert np.abs(got - want)[inside].max() <= out.scale / 2 + 1e-12
    assert out.signed == bool(want.min() < 0)  # sigmoid, softplus: unsigned, all 256 steps on [0, hi]


def test_division_by_a_rows_reciprocal_is_floor_division():
    """nonlinear.divide_by_row (one division a row, multiplies a value) equals num // den wherever its
    bounds hold (0 <= num < 2^53, quotients under 2^9): random rows, quotients right at and around every
    multiple of the divisor, the largest divisors and numerators, and softmax's own extremes."""
    ops = nonlinear.NumpyTensorOps()
    rng = np.random.default_rng(0)
    den = np.concatenate([rng.integers(1, 1 << 40, 200), [1, 2, 3, 255, 256, (1 << 44) - 1, (1 << 44) + 1]])
    den = den.astype(np.int64).reshape(-1, 1)
    q = np.concatenate([rng.integers(0, 512, (den.size, 64)), np.tile(np.arange(0, 512, 8), (den.size, 1))], axis=1)
    num = q * den + np.array([-1, 0, 1])[rng.integers(0, 3, q.shape)] * rng.integers(0, 2, q.shape)
    num = np.clip(num + rng.integers(0, 1 << 20, q.shape) % den, 0, (1 << 53) - 1).astype(np.int64)
    num = np.minimum(num, 511 * den + den - 1)
    np.testing.assert_array_equal(nonlinear.divide_by_row(ops, num, den), num // den)
    for total in (1 << 22, 197 << 22, (1 << 31) - 1, 1 << 40):  # softmax: (2 Q e + T) / (2 T), e <= min(T, 2^22)
        e = np.array([[0, 1, 2, 1 << 21, min(total, 1 << 22)]], np.int64)
        n = 2 * nonlinear.SOFTMAX_Q * e + total
        d = np.array([[2 * total]], np.int64)
        np.testing.assert_array_equal(nonlinear.divide_by_row(ops, n, d), n // d)


def test_layernorms_normalization_by_a_rows_reciprocal_is_the_rounded_quotient():
    """nonlinear.normalize_by_row equals floor((2^(K+1) d + r) / (2 r)) wherever |d| <= r < 2^31 and
    |d| < 2^37 hold: random rows, d at +-r, 0, +-1, and r at 1, small and near 2^31."""
    ops = nonlinear.NumpyTensorOps()
    rng = np.random.default_rng(1)
    k = nonlinear.LAYERNORM_FRAC_BITS
    r = np.concatenate([rng.integers(1, 1 << 31, 300), [1, 2, 3, 7, (1 << 31) - 1, (1 << 31) - 2, 1 << 30]])
    r = r.astype(np.int64).reshape(-1, 1)
    d = (rng.random((r.size, 64)) * 2 - 1) * r
    d = np.concatenate([d.astype(np.int64), r, -r, 0 * r, np.minimum(r, 1), -np.minimum(r, 1), r - 1, 1 - r,
                        r // 2, -(r // 2), r // 3], axis=1)
    want = (d * (1 << (k + 1)) + r) // (2 * r)
    np.testing.assert_array_equal(nonlinear.normalize_by_row(ops, d, r), want)


def test_a_scale_read_only_by_a_matmul_of_activations_folds_into_it():
    """`(q * c) @ k^T` (timm's unfused attention) is one matmul with factor c, requantized once after the
    integer products, not q rounded to 8 bits at its scaled range first; a scale read elsewhere too stays."""
    from test_ops_bitexact import ScaledQAttention

    from intforge.capture import capture

    torch.manual_seed(0)
    graph = capture(ScaledQAttention().eval(), (torch.zeros(1, 18, 16),))
    assert "scale" not in [op.kind for op in graph.ops]
    assert math.isclose(next(op for op in graph.ops if op.kind == "matmul").attrs["alpha"], 16 ** -0.5)
    kinds = [op.kind for op in quantize_module(ScaledQAttention(), (1, 18, 16)).ops]
    assert "requantize" not in kinds and kinds.count("matmul") == 2

    class Shared(ScaledQAttention):
        def forward(self, x):
            q = self.q(x) * self.scale
            return (q @ self.k(x).transpose(-2, -1)).softmax(dim=-1) @ self.v(x) + q

    assert "requantize" in [op.kind for op in quantize_module(Shared(), (1, 18, 16)).ops]


def test_softmax_is_within_half_a_step_of_float_at_its_calibrated_scale():
    """Probabilities at 1/Q, Q = floor(255 / the largest probability calibration saw) (at least 255): within
    half a step of float up to 255/Q, saturated at 255 above (a row more peaked than any calibrated)."""
    program = quantize_module(nn.Softmax(-1), (4, 1000), n_calib=8, scale=4.0)
    op = program.ops[-1]
    q_steps = op.attrs["q"]
    assert q_steps > 2 * 255  # no probability near 1.0 in calibration (rows of 1000): finer steps than 1/255
    rng = np.random.default_rng(0)
    q, real = _dequantized_input(program, rng)
    got = reference.run_int(program, q)[0]
    assert got.dtype == np.uint8 and program.tensors[program.outputs[0]].scale == pytest.approx(1 / q_steps)
    want = torch.softmax(torch.from_numpy(real), -1).numpy()
    assert np.abs(got / q_steps - np.minimum(want, 255 / q_steps)).max() <= 0.5 / q_steps + 1e-4
    # a peaked row saturates at 255 (its max took what the rest left: above anything calibrated)
    peaked = np.full((4, 1000), program.tensors[program.inputs[0]].qmin, np.int8)
    peaked[:, 7] = 127
    assert (reference.run_int(program, peaked)[0][:, 7] == 255).all()
    # calibrated on peaked rows, 1.0 is 255 (Q = 255) and the rest rounds as before
    one_hot = quantize_module(nn.Softmax(-1), (4, 10), n_calib=8, scale=50.0)
    assert one_hot.ops[-1].attrs["q"] == nonlinear.SOFTMAX_Q
    q, real = _dequantized_input(one_hot, rng)
    want = torch.softmax(torch.from_numpy(real), -1).numpy()
    assert np.abs(reference.run_int(one_hot, q)[0] / 255.0 - want).max() <= 0.5 / 255 + 1e-4


def test_layernorm_is_within_one_step_of_float_layernorm():
    torch.manual_seed(0)
    ln = nn.LayerNorm(96, eps=1e-5)
    with torch.no_grad():
        ln.weight.uniform_(-2, 2)
        ln.bias.uniform_(-1, 1)
    program = quantize_module(ln, (2, 7, 96), n_calib=32)
    rng = np.random.default_rng(1)
    q, real = _dequantized_input(program, rng)
    got = reference.run_float(program, real.astype(np.float32))[0]
    with torch.no_grad():
        want = ln(torch.from_numpy(real.astype(np.float32))).numpy()
    step = program.tensors[program.outputs[0]].scale
    inside = np.abs(want) <= 127 * step
    assert np.abs(got - want)[inside].max() <= 1.0 * step


def test_layernorm_of_constant_rows_is_beta():
    """d = 0 everywhere: the root of eps alone (or 1 where eps rounds to 0), the normalized value 0."""
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.bias.copy_(torch.linspace(-1, 1, 8))
    program = quantize_module(ln, (1, 8), n_calib=16)
    out = program.tensors[program.outputs[0]]
    for fill in (-128, 0, 127):
        got = reference.run_int(program, np.full((1, 8), fill, np.int8))[0]
        np.testing.assert_array_equal(got[0], np.clip(np.floor(np.linspace(-1, 1, 8) / out.scale + 0.5), -128, 127))


def test_the_integer_square_root_kernel_is_exact_on_extremes(tmp_path):
    """The TIR kernel (kernels/isqrt.py) against Python's math.isqrt, and against the reference's numpy form,
    on squares, their neighbours and the ends of [0, 2^62)."""
    import tvm

    from intforge.kernels.isqrt import ISQRT_SYMBOL, isqrt_func

    lib = tvm.compile(tvm.IRModule({ISQRT_SYMBOL: isqrt_func()}), target="llvm")
    rng = np.random.default_rng(0)
    roots = np.concatenate([np.arange(0, 70), rng.integers(0, 1 << 31, 500), [(1 << 31) - 1]]).astype(np.int64)
    v = np.concatenate([roots * roots, roots * roots - 1, roots * roots + 1, rng.integers(0, 1 << 62, 2000),
                        [(1 << 62) - 1, 1 << 61, (1 << 60) - 1]])
    v = np.clip(v, 0, (1 << 62) - 1).astype(np.int64)
    out = tvm.runtime.tensor(np.zeros_like(v))
    lib[ISQRT_SYMBOL](tvm.runtime.tensor(v), out)
    want = np.array([math.isqrt(int(a)) for a in v], np.int64)
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(nonlinear.isqrt_numpy(v), want)


class _Softmax1(nn.Module):
    def forward(self, x):
        return torch.softmax(x, 1)


class _ActivationMask(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x, attn_mask=x @ x.transpose(-1, -2))


class _Negate(nn.Module):
    def forward(self, x):
        return x * -2.0


class _ConstantMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        return torch.matmul(x, self.w)


@pytest.mark.parametrize("module, shape, words", [
    (_Softmax1(), (2, 5, 6), ["softmax over dim 1", "last dim"]),
    (nn.LayerNorm((5, 6)), (2, 5, 6), ["LayerNorm over the last 2 dims", "last dim only"]),
    (_ActivationMask(), (1, 2, 5, 6), ["mask that is an activation", "integer mask input"]),
    (_ConstantMatmul(), (2, 5, 6), ["constant operand", "nn.Linear"]),
    (_Negate(), (2, 5, 6), ["multiplication by -2.0", "positive number only"]),
])
def test_unsupported_forms_are_refused_by_name(module, shape, words):
    with pytest.raises(UnsupportedOpError) as err:
        quantize_module(module, shape)
    for w in words:
        assert w in str(err.value)


def test_layernorm_whose_variance_could_pass_int64_is_refused():
    with pytest.raises(QuantizationError, match="would pass int64"):
        nonlinear.layer_norm_params(64, 1e-10, 8, True, np.ones(64), np.zeros(64), 1e-5, 0.1, "ln")


def test_attention_calibrates_at_the_example_batch_over_every_sample():
    """nn.MultiheadAttention merges the batch with its heads, so the float graph runs only at the example's
    batch size: calibration feeds it batches of that size (the last filled up with the first samples), and
    the output's range is the model's over all the data."""
    from test_ops_bitexact import MhaBlock

    from intforge.calibrate import collect_ranges
    from intforge.capture import capture

    torch.manual_seed(0)
    model = MhaBlock().eval()
    data = np.random.default_rng(0).standard_normal((7, 6, 16)).astype(np.float32)
    data[6] *= 3  # the odd sample out has the largest values
    graph = capture(model, (torch.from_numpy(data[:2]),))
    assert graph.fixed_batch()
    ranges = collect_ranges(graph, [data])
    with torch.no_grad():
        out = np.concatenate([model(torch.from_numpy(data[i:i + 2])).numpy() for i in (0, 2, 4)] +
                             [model(torch.from_numpy(data[[6, 0]])).numpy()])
    lo, hi = ranges[graph.outputs[0]]
    assert lo == pytest.approx(float(out.min()), rel=1e-5) and hi == pytest.approx(float(out.max()), rel=1e-5)


class TokenMixer(nn.Module):
    """A transformer-style MLP block on 7x7 patches of a digit: patch embedding, LayerNorm, a GELU MLP with a
    residual add, LayerNorm, a linear head and softmax."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(16 * dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.norm1(t))))
        return torch.softmax(self.head(self.norm2(t).flatten(1)), -1)


def _trained_on_digits(make, loss, shuffle_seed: int):
    """A model trained for 8 epochs on 4,000 of the 5,000 digits (shuffled: they come sorted by label), in
    eval mode, with its float accuracy on the other 1,000: (model, accuracy, digits, held-out digits, labels)."""
    x, y = zoo.mnist_digits()
    order = np.random.default_rng(shuffle_seed).permutation(len(x))
    x, y = x[order], y[order]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        xt, yt = torch.from_numpy(x[:4000]), torch.from_numpy(y[:4000])
        for _ in range(8):
            perm = torch.randperm(4000)
            for i in range(0, 4000, 64):
                idx = perm[i:i + 64]
                value = loss(model(xt[idx]), yt[idx])
                opt.zero_grad()
                value.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        float_acc = (model(torch.from_numpy(x[4000:])).argmax(1).numpy() == y[4000:]).mean()
    return model, float_acc, x, x[4000:], y[4000:]


def _compiled_on_digits(model, x, test_x, test_y, output, checked: int):
    """Compile on 256 digits (integer-only), run the .so on every held-out digit, and check its first
    `checked` outputs against the reference bit for bit: (program, outputs, INT8 accuracy)."""
    art = intforge.compile(model, (torch.from_numpy(x[:1]),), x[:256], output=output)
    assert art.manifest["integer_only"] is True
    program = IntegerProgram.load(art.program_path)
    lib = intforge.load(art.library)
    got = np.concatenate([lib(test_x[i:i + 1]) for i in range(len(test_x))])
    want = np.concatenate([reference.run_float(program, test_x[i:i + 1])[0] for i in range(checked)])
    np.testing.assert_array_equal(got[:checked], want)
    return program, got, (got.argmax(1) == test_y).mean()


def test_a_token_model_trained_on_digits_compiles_integer_only_and_bit_exact(tmp_path):
    model, float_acc, x, test_x, test_y = _trained_on_digits(
        TokenMixer, lambda probs, labels: F.nll_loss(torch.log(probs + 1e-9), labels), shuffle_seed=0)
    program, got, int_acc = _compiled_on_digits(model, x, test_x, test_y, tmp_path / "mixer", checked=200)
    kinds = {op.kind for op in program.ops}
    assert {"layernorm", "lut", "softmax", "transpose", "add", "linear"} <= kinds
    assert float_acc > 0.88
    assert int_acc >= float_acc - 0.01
    assert np.allclose(got.sum(1), 1.0, atol=0.02)  # probabilities at 1/255


class TinyViT(nn.Module):
    """A vision transformer for 28x28 digits: 7x7 patches, one pre-norm block of 4-head attention (timm's
    form: qkv in one linear, scaled_dot_product_attention) and a GELU MLP, LayerNorm, a linear head."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(16 * dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4) \
            .unbind(0)
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(self.norm3(t).flatten(1))


def test_a_vision_transformer_trained_on_digits_compiles_integer_only_and_bit_exact(tmp_path):
    model, float_acc, x, test_x, test_y = _trained_on_digits(TinyViT, F.cross_entropy, shuffle_seed=1)
    program, got, int_acc = _compiled_on_digits(model, x, test_x, test_y, tmp_path / "vit", checked=100)
    assert sum(op.kind == "matmul" for op in program.ops) == 2
    assert float_acc > 0.9
    assert int_acc >= float_acc - 0.015


def small_vision_transformer() -> nn.Module:
    """torchvision's own VisionTransformer class, a small configuration (32x32 images, 8x8 patches, 2
    layers of 2 heads, width 16), seeded random weights; its class token and head drawn too (torchvision
    starts both at zero)."""
    from intforge.zoo import _torchvision

    _torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                  num_classes=10).eval()
        with torch.no_grad():
            model.encoder.pos_embedding.normal_(0, 0.1)
            model.class_token.normal_(0, 0.5)
            model.heads.head.weight.normal_(0, 0.2)
    return model


def test_torchvisions_vision_transformer_compiles_bit_exact(so_of):
    """torchvision's own VisionTransformer class (a small configuration, random weights): class token,
    positional embedding, nn.MultiheadAttention, GELU MLP, LayerNorm, the class token's head."""
    model = small_vision_transformer()
    program = quantize_module(model, (1, 3, 32, 32), n_calib=9)
    kinds = [op.kind for op in program.ops]
    assert kinds.count("constant") == 1 and kinds.count("matmul") == 4 and kinds.count("layernorm") == 5
    # (the class token a constant; the positional embedding in its add's offset, at the sum's step)
    assert [op.params["offset"].shape for op in program.ops if "offset" in op.params] == [(1, 17, 16)]
    assert_bit_exact_int(program, so_of(program, "int"))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = reference.run_float(program, x)[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
