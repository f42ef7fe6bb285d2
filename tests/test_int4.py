"""INT4 through the compiler: packed weights, 4-bit activations, mixed widths, all bit-exact."""

import numpy as np
import pytest
import torch
import tvm
from test_ops_bitexact import CASES
from tvm import relax

import intforge
import intforge.compiler
from conftest import assert_bit_exact_int, quantize_module
from intforge import reference, zoo
from intforge.compiler import build, compile_module, resolve_target
from intforge.errors import QuantizationError
from intforge.kernels.int4 import pack_int4, unpack_int4
from intforge.quantize import QuantConfig
from intforge.relay_passes import RelaxOps


@pytest.mark.parametrize("count", [1, 2, 7, 1000])
def test_pack_int4_round_trips_with_low_nibble_first(count):
    v = np.random.default_rng(count).integers(-8, 8, count)
    v[:2] = [-8, 7][: min(count, 2)]
    packed = pack_int4(v)
    assert packed.dtype == np.int8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count), v)
    if count >= 2:
        assert (int(packed[0]) & 0xF) == (int(v[0]) & 0xF)  # element 0 in the low nibble


def test_pack_int4_refuses_values_outside_4_bits():
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(np.array([8]))


def test_tir_unpack_kernel_matches_numpy_on_every_byte():
    values = np.array([(a, b) for a in range(-8, 8) for b in range(-8, 8)]).ravel()  # all 256 bytes
    bb = relax.BlockBuilder()
    ops = RelaxOps(bb)
    with bb.function("main", []):
        with bb.dataflow():
            a = ops.unpack_int4(pack_int4(values), (32, 4, 2, 2))
            b = ops.unpack_int4(pack_int4(values[:7]), (7,))  # odd count, same shared kernel
            gv = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(gv)
    mod = bb.get()
    assert sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values()) == 1
    vm = relax.VirtualMachine(compile_module(mod), tvm.cpu())
    out = vm["main"]()
    np.testing.assert_array_equal(out[0].numpy(), values.reshape(32, 4, 2, 2))
    np.testing.assert_array_equal(out[1].numpy(), values[:7])


def test_vnni_int4_packing_puts_weight_t_low_and_t_plus_32_high():
    from intforge.kernels.blocked_dot import pack_int4_blocks

    w = np.random.default_rng(0).integers(-8, 8, (3, 2, 16, 4)).astype(np.int8)
    w[0, 0, 0] = [-8, 7, 0, -1]
    packed = pack_int4_blocks(w).view(np.uint8).astype(np.int32)
    assert packed.shape == (3, 2, 32)
    nibbles = np.concatenate([packed & 0xF, packed >> 4], axis=-1)  # weights 0..31, then 32..63
    np.testing.assert_array_equal(((nibbles ^ 8) - 8).reshape(w.shape), w)  # the kernel's sign extension
    every = np.arange(-8, 8)  # ... is the shared unpack's, on every nibble
    np.testing.assert_array_equal(((every & 0xF) ^ 8) - 8, unpack_int4(pack_int4(every), 16))


def _lowered_kernels(program, target: str = "x86") -> tuple[tvm.IRModule, set[str]]:
    """The program after `target`'s kernel passes (Relax only, no compiler), and the names of the TIR
    functions its main calls."""
    from intforge.compiler.build import _kernel_passes

    preset = intforge.compiler.resolve_target(target)
    with preset.tvm_target():
        mod = tvm.transform.Sequential(_kernel_passes(preset))(intforge.relay_passes.emit_program(program))
    called = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: called.add(e.args[0].name_hint) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return mod, called


@pytest.mark.parametrize("target,kernel,block_bytes", [("x86", "vnni", 32), ("rpi5", "sdot", 8),
                                                      ("graviton", "mmla", 8), ("rpi4", "neon", 8)])
def test_int4_weights_stay_packed_inside_the_tensorized_kernels(target, kernel, block_bytes):
    """With a dot-product instruction (VNNI, sdot, i8mm, and plain NEON on ARM) the conv and dense kernels
    take the packed blocks and unpack them in registers: the model has no int8 copy of the weights and no
    call to the shared unpack kernel. (Only the Relax passes run: no compiler needed.)"""
    from intforge.kernels.int4 import UNPACK_SYMBOL

    preset = intforge.compiler.resolve_target(target)
    if target == "x86" and not (preset.has("avx512vnni") and preset.has("avx512bw")):
        pytest.skip("this CPU has no AVX512-VNNI: its INT4 layers use the shared unpack kernel")
    make, shape = CASES["mean_flatten_linear"]
    torch.manual_seed(0)
    mod, called = _lowered_kernels(quantize_module(make(), shape, quant=QuantConfig(bits=4)), target)
    calls = {gv.name_hint: f for gv, f in mod.functions.items() if gv.name_hint in called}
    assert UNPACK_SYMBOL not in calls and any(kernel in n for n in calls)
    for name, f in calls.items():
        if kernel in name:
            w = f.params[1].ty  # the weight: [..., block_bytes] packed bytes
            assert str(w.dtype) == "int8" and int(w.shape[-1]) == block_bytes, (name, w.shape)


def test_int4_depthwise_weights_stay_packed_inside_the_kernel():
    """The depthwise kernels take INT4 weights packed two to a byte and unpack a channel block's window
    in the kernel: no call to the shared unpack kernel, no int8 copy."""
    from intforge.kernels.int4 import UNPACK_SYMBOL

    make, shape = CASES["conv_depthwise"]
    torch.manual_seed(0)
    mod, called = _lowered_kernels(quantize_module(make(), shape, quant=QuantConfig(bits=4)))
    assert UNPACK_SYMBOL not in called
    dw = [mod[n] for n in called if "depthwise" in n]
    assert len(dw) == 1
    w = dw[0].params[1].ty
    assert str(w.dtype) == "int8" and _shape(w) == [3 * 3 * 8 // 2], _shape(w)  # [KH*KW*C/2] packed
    if not intforge.compiler.resolve_target("x86").has("avx512vnni"):
        return
    # whole 16-channel blocks: the window-rows kernel (VNNI), its weights packed per 64-weight block
    mod, called = _lowered_kernels(quantize_module(torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                                   (1, 32, 6, 6), quant=QuantConfig(bits=4)))
    assert UNPACK_SYMBOL not in called
    dw = [mod[n] for n in called if "depthwise_dot" in n]
    assert len(dw) == 1
    # [2 rows of a pair, KW, C/16, 64 weights / 2] (6 output rows: in pairs, kernels/depthwise_dot.row_pairs)
    assert _shape(dw[0].params[1].ty) == [2, 3, 32 // 16, 16 * 4 // 2]


def _shape(t) -> list[int]:
    return [int(d) for d in t.shape]


INT4_CASES = ["conv_plain", "conv_stride_pad", "conv_stride_pad_batch3", "conv_1x1_batch4", "conv_wide_batch2",
              "conv_depthwise", "depthwise_stack", "depthwise_rows", "depthwise_dot_rect_dilated",
              "depthwise_row_pairs", "conv_groups", "conv_bn_relu", "linear", "linear_relu", "add_relu",
              "add_downsample", "concat", "max_pool", "mean_flatten_linear", "conv_stem_7x7", "linear_tokens_tiled",
              "linear_tokens_wide"]


@pytest.mark.parametrize("case", INT4_CASES)
def test_int4_op_is_bit_exact(case, so_of):
    make, shape = CASES[case]
    torch.manual_seed(0)
    program = quantize_module(make(), shape, quant=QuantConfig(bits=4))
    layers = program.layers()
    assert all(r["weight_bits"] == 4 and r["act_bits"] == 4 for r in layers)
    for op in program.ops:
        if op.kind in ("conv2d", "linear"):
            assert np.abs(op.params["weight"]).max() <= 7
    assert_bit_exact_int(program, so_of(program, boundary="int"))


@pytest.mark.parametrize("case", ["conv_plain", "conv_1x1_batch4", "conv_depthwise", "depthwise_dot_rect_dilated",
                                  "conv_stem_7x7", "linear", "linear_tokens_tiled", "linear_tokens_wide",
                                  "add_downsample"])
def test_w4a8_op_is_bit_exact(case, so_of):
    """4-bit weights on 8-bit inputs (`QuantConfig.int4_input_bits=8`, W4A8), clipped: the same unpacking kernels,
    inputs across the whole 8-bit range, and no 4-bit requantize before a layer."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    # (and each 4-bit channel's clipping range searched: by the error on calibration inputs for linears,
    # `quantize_weight(..., clip="output")`, by the weights' own error for convs)
    program = quantize_module(make(), shape, quant=QuantConfig(bits=4, int4_input_bits=8, int4_clip="output"))
    assert program.meta["int4_clip"] == "output"
    assert all(r["weight_bits"] == 4 and r["act_bits"] == 8 for r in program.layers())
    assert all(t.bits == 8 for t in program.tensors.values() if t.index_dtype is None)
    assert_bit_exact_int(program, so_of(program, boundary="int"))


def test_residual_add_stays_8_bit_and_int4_layers_get_a_requantized_input():
    make, shape = CASES["add_relu"]
    program = quantize_module(make(), shape, quant=QuantConfig(bits=4))
    kinds = [op.kind for op in program.ops]
    assert kinds[0] == "requantize"  # the 8-bit block input narrowed to 4 bits for the conv
    assert program.tensors[program.ops[0].output].qmax == 7  # signed input: [-8, 7]
    add = next(op for op in program.ops if op.kind == "add")
    assert all(program.tensors[i].bits == 8 for i in add.inputs)


def test_standalone_requantize_runs_as_one_loop_nest_without_intermediates():
    """An INT4 layer's input requantize has no kernel to fuse into (its producer feeds the residual add
    too), so the default schedule runs it: the cast, multiply, shift and clamp are one block computing
    each output from its input, with no full-size int64 buffer per stage (those cost 8 ms a call on
    ResNet50 at batch 8)."""
    from intforge.compiler.build import _legalize_passes
    from intforge.kernels import default_schedule_pass

    make, shape = CASES["add_relu"]
    program = quantize_module(make(), shape, quant=QuantConfig(bits=4))
    preset = intforge.compiler.resolve_target("x86")
    target = preset.tvm_target()
    with target:
        passes = _legalize_passes(preset) + [default_schedule_pass(target)]
        mod = tvm.transform.Sequential(passes)(intforge.relay_passes.emit_program(program))
    chains = {gv.name_hint: f for gv, f in mod.functions.items()
              if isinstance(f, tvm.tirx.PrimFunc) and "right_shift" in gv.name_hint
              and not any(k in gv.name_hint for k in ("conv", "dense", "matmul", "depthwise"))}
    assert chains, "the program has a standalone requantize"
    for name, f in chains.items():
        sch = tvm.s_tir.Schedule(f)
        root = sch.get_sblock("root")
        assert len(sch.get_child_blocks(root)) == 1, name
        assert not sch.get(root).alloc_buffers, name


def test_unknown_layer_in_bit_plan_is_refused():
    make, shape = CASES["conv_plain"]
    with pytest.raises(QuantizationError, match="names layers the model does not have"):
        quantize_module(make(), shape, quant=QuantConfig(layer_bits={"nope": 4}))


def test_mnist_mixed_and_int4_are_bit_exact_and_accurate(tmp_path):
    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    from intforge.cli import predict

    for i, cfg in enumerate([QuantConfig(layer_bits={"features.3": 4, "classifier.0": 4}), QuantConfig(bits=4)]):
        program, _ = intforge.quantize_model(model, (torch.from_numpy(x[:1]),), x[:500], quant=cfg)
        lib = intforge.load(build(program, tmp_path / str(i)).library)
        for j in range(0, 40, 3):
            np.testing.assert_array_equal(lib(x[j:j + 1]), reference.run_float(program, x[j:j + 1])[0])
        preds, _ = predict(lib, x[:1000])
        assert (preds == y[:1000]).mean() > 0.98


def test_rebuilding_at_the_same_path_loads_the_new_library(tmp_path):
    """dlopen caches by path; load() must not hand back the previous build's code."""
    make, shape = CASES["linear"]
    a = quantize_module(make(), shape, seed=1)
    torch.manual_seed(5)
    b = quantize_module(make(), shape, seed=2)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    first = intforge.load(build(a, tmp_path).library)(x)
    second = intforge.load(build(b, tmp_path).library)(x)
    np.testing.assert_array_equal(second, reference.run_float(b, x)[0])
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_mixed_precision_torchvision_model_is_bit_exact_and_smaller(name, tmp_path):
    model = getattr(zoo, name)()
    x = zoo.random_images(5, seed=2)
    graph_layers = None
    sizes = {}
    for label in ("int8", "mixed"):
        if label == "int8":
            cfg = QuantConfig()
        else:  # every other layer at INT4, first and last pinned at INT8
            names = [r["name"] for r in graph_layers]
            cfg = QuantConfig(layer_bits={n: 4 for n in names[1:-1:2]})
        program, graph = intforge.quantize_model(model, (torch.from_numpy(x[:1]),), x[1:], quant=cfg)
        graph_layers = graph.layers()
        art = build(program, tmp_path / label)
        lib = intforge.load(art.library)
        np.testing.assert_array_equal(lib(x[:1]), reference.run_float(program, x[:1])[0])
        sizes[label] = (art.library.stat().st_size, art.manifest["weight_bytes"], program)
    int4_params = sum(r["params"] for r in sizes["mixed"][2].layers() if r["weight_bits"] == 4)
    # The stored weights shrink by exactly half a byte per INT4 weight (rounded up per layer) ...
    assert abs(sizes["int8"][1] - sizes["mixed"][1] - int4_params // 2) <= len(graph_layers)
    # ... and so does the file, less the code of the extra kernel variants mixed widths need.
    saved = sizes["int8"][0] - sizes["mixed"][0]
    assert saved > 0.2 * int4_params, (saved, int4_params)


def test_gptq_rounding_is_nearest_where_inputs_are_uncorrelated_or_were_always_zero():
    """With uncorrelated inputs (a diagonal second moment) no column's error has anywhere to go: GPTQ
    rounds every weight to nearest. A column whose input was 0 on every calibration row keeps nearest
    rounding too (GPTQ's code zeroes it; such an input can fire later), and the others are unchanged."""
    from intforge.quantize import gptq_round, quantize_weight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 40)).astype(np.float32)
    q, s = quantize_weight(w, 4)
    h = np.diag(rng.uniform(0.5, 2.0, 40))
    assert np.array_equal(gptq_round(w, s, h, 4), q)
    h[7, 7] = 0.0
    assert np.array_equal(gptq_round(w, s, h, 4), q)


def _nearest_and_gptq(model, calib: np.ndarray, held: np.ndarray, want: np.ndarray, layer_bits: dict[str, int],
                      tmp_path, exact_calls: int) -> tuple[dict, dict, object]:
    """`model` quantized W4A8 with `layer_bits`, rounded each way: ({rounding: mean squared error to `want` on
    `held`}, {rounding: {layer: (its integers, its steps)}}, GPTQ's program), every 4-bit weight checked
    within [-7, 7] and GPTQ's library bit-exact against the reference on `exact_calls` of `held`."""
    errors, weights = {}, {}
    for rounding in ("nearest", "gptq"):
        quant = QuantConfig(layer_bits=layer_bits, int4_input_bits=8, int4_rounding=rounding)
        program, _ = intforge.quantize_model(model, (torch.from_numpy(held[:1]),), calib, quant=quant)
        assert program.meta["int4_rounding"] == rounding
        weights[rounding] = {op.name: (op.params["weight"], op.params["weight_scale"]) for op in program.ops
                             if op.kind in ("conv2d", "linear")}
        assert all(np.abs(w).max() <= 7 for w, _ in weights[rounding].values())
        got = np.concatenate([reference.run_float(program, held[i:i + 1])[0] for i in range(len(held))])
        errors[rounding] = float(np.mean((got - want) ** 2))
    lib = intforge.load(build(program, tmp_path / "gptq").library)
    for i in range(exact_calls):
        np.testing.assert_array_equal(lib(held[i:i + 1]), reference.run_float(program, held[i:i + 1])[0])
    return errors, weights, program


def test_gptq_rounded_int4_linears_are_bit_exact_and_closer_to_float(tmp_path):
    """`int4_rounding="gptq"`: a 4-bit linear's weights keep their channel steps and 4-bit range, the
    library equals the reference, and on inputs like the calibration's (correlated features) the model's
    outputs are closer to float's than with every weight rounded to nearest."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 24)).eval()
    rng = np.random.default_rng(0)
    mix = np.eye(48) + 0.8 * rng.standard_normal((48, 48)) / np.sqrt(48)
    data = (rng.standard_normal((600, 48)) @ mix).astype(np.float32)
    calib, held = data[:256], data[256:]
    with torch.no_grad():
        want = model(torch.from_numpy(held)).numpy()
    errors, weights, _ = _nearest_and_gptq(model, calib, held, want, {"0": 4, "2": 4}, tmp_path, exact_calls=8)
    for name, (wn, sn) in weights["nearest"].items():
        wg, sg = weights["gptq"][name]
        np.testing.assert_array_equal(sn, sg)  # the same steps ...
        assert not np.array_equal(wn, wg)  # ... other integers
    assert errors["gptq"] < 0.85 * errors["nearest"], errors


def test_conv_patches_are_the_rows_a_conv_multiplies_its_weights_by():
    """`calibrate.conv_patches` (what GPTQ's second moments of a conv are taken over): each row times the
    weights reshaped [O, C * KH * KW] is the conv's output at that pixel, with stride, padding and dilation."""
    from intforge.calibrate import conv_patches
    from intforge.capture import FloatOp

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 5, 11, 9)).astype(np.float32))
    w = rng.standard_normal((7, 5, 3, 2)).astype(np.float32)
    attrs = {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1), "groups": 1}
    op = FloatOp("conv2d", "c", ["x"], "y", attrs, {"weight": w, "bias": np.zeros(7, np.float32)})
    want = torch.nn.functional.conv2d(x, torch.from_numpy(w), None, (2, 1), (1, 2), (2, 1))
    rows = conv_patches(op, x, most=10_000)  # every output pixel, in order
    got = rows @ torch.from_numpy(w.reshape(7, -1)).T
    np.testing.assert_allclose(got.numpy(), want.permute(0, 2, 3, 1).reshape(-1, 7).numpy(), rtol=1e-5, atol=1e-4)
    few = conv_patches(op, x, most=16)  # a spread of them
    assert few.shape == (16, 30) and torch.equal(few[0], rows[0]) and torch.equal(few[-1], rows[-1])


def test_gptq_rounded_int4_convs_are_bit_exact_and_closer_to_float(tmp_path):
    """`int4_rounding="gptq"` on convs: a groups-1 conv is GPTQ's linear on its window patches, so on
    smooth images (neighbouring pixels and channels correlated, as in real ones) its outputs come closer
    to float's; the channel steps are unchanged, the depthwise conv rounds to nearest, and the library
    equals the reference."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 8, 1)).eval()
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.standard_normal((320, 3, 20, 20)).astype(np.float32))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2) * 2 + 0.5 * noise.mean(1, keepdim=True)
    data = smooth.numpy()
    calib, held = data[:192], data[192:]
    with torch.no_grad():
        want = model(torch.from_numpy(held)).numpy()
    layers = {"0": 4, "2": 4, "4": 4, "6": 4}
    errors, weights, program = _nearest_and_gptq(model, calib, held, want, layers, tmp_path, exact_calls=4)
    depthwise = next(op.name for op in program.ops if op.kind == "conv2d" and op.attrs["groups"] > 1)
    for name, (wn, sn) in weights["nearest"].items():
        wg, sg = weights["gptq"][name]
        np.testing.assert_array_equal(sn, sg)  # the same steps ...
        assert np.array_equal(wn, wg) == (name == depthwise)  # ... other integers, but for the depthwise conv
    assert errors["gptq"] < 0.85 * errors["nearest"], errors


@pytest.mark.skipif(not resolve_target("x86").has("avx2"), reason="runs haswell code")
@pytest.mark.parametrize("case", ["linear_tokens_tiled", "linear_tokens_wide"])
def test_w4a8_token_linears_on_avx2_are_bit_exact(case, tmp_path):
    """W4A8 linears on tokens built for `x86-avx2`: register tiles of rows, each channel tile's INT4 weights
    unpacked once for all its row tiles (on AVX2 each row used to unpack them again: MiniLM's all-4-bit
    W4A8 call took 3.1x its INT8 time on the Zen 3, 2026-12-07)."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    program = quantize_module(make(), shape, quant=QuantConfig(bits=4, int4_input_bits=8, int4_clip="output"))
    assert_bit_exact_int(program, intforge.load(build(program, tmp_path, target="x86-avx2", boundary="int").library))
