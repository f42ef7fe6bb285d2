"""ONNX input: files become nn.Modules that match the exporter's model, ONNX Runtime, and the PyTorch path.

The real models are torchvision's (random weights) and the trained MNIST net, exported by torch.onnx;
the small graphs are written node by node for what exporters other than PyTorch's emit (opset-10 Clip,
MatMul + Add, a Reshape fed by shape arithmetic, Gemm with transB=0 and alpha), each checked against
ONNX Runtime running the same file.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intforge
from conftest import assert_bit_exact_int, intforge_cli
from intforge import reference, zoo
from intforge.capture import capture
from intforge.errors import IntforgeError, UnsupportedOpError
from intforge.onnx_import import load_onnx, scope_path


def export(model: torch.nn.Module, shape: tuple[int, ...], path, fold: bool = True) -> str:
    """torch.onnx.export (TorchScript exporter, opset 17, batch dynamic); `fold` folds BatchNorm into convs."""
    torch.onnx.export(model.eval(), (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=fold, input_names=["image"], output_names=["y"],
                      dynamic_axes={"image": {0: "batch"}, "y": {0: "batch"}})
    return str(path)


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def program_numbers(program) -> list:
    """An integer program's numbers and structure, without tensor names and source locations."""
    out = []
    for op in program.ops:
        out.append((op.kind, op.name, dict(op.attrs),
                    {k: np.asarray(v).tolist() for k, v in op.params.items()},
                    [(program.tensors[t].scale, program.tensors[t].zero_point, program.tensors[t].dtype)
                     for t in [*op.inputs, op.output]]))
    return out


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_export_imports_as_the_same_model(name, tmp_path):
    model = getattr(zoo, name)(seed=0).eval()
    x = torch.from_numpy(zoo.random_images(3, seed=1, size=96))
    unfolded = load_onnx(export(model, (1, 3, 96, 96), tmp_path / "bn.onnx", fold=False))
    with torch.no_grad():
        np.testing.assert_array_equal(unfolded(x).numpy(), model(x).numpy())  # same modules, same math
    folded_path = export(model, (1, 3, 96, 96), tmp_path / "folded.onnx")
    folded = load_onnx(folded_path)
    with torch.no_grad():
        got = folded(x).numpy()
    np.testing.assert_allclose(got, ort_run(folded_path, x.numpy()), rtol=1e-4, atol=1e-4)
    want = [op.name for op in capture(model, (x[:1],)).ops]
    assert [op.name for op in capture(unfolded, (x[:1],)).ops] == want
    assert [op.name for op in capture(folded, (x[:1],)).ops] == want  # layer names as a PyTorch compile has them
    # BatchNorm left in the file (not folded by the exporter): the integer program is the PyTorch path's
    calib = zoo.random_images(5, seed=2, size=96)
    p_torch, _ = intforge.quantize_model(model, (x[:1],), calib)
    p_onnx, _ = intforge.quantize_model(unfolded, (x[:1],), calib)
    assert program_numbers(p_onnx) == program_numbers(p_torch)
    conv = next(op for op in p_onnx.ops if op.kind == "conv2d")
    assert conv.source.startswith(f"{tmp_path / 'bn.onnx'}: ONNX node '/") and "(Conv)" in conv.source


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_dynamo_exporter_files_import_with_pytorch_layer_names(name, tmp_path):
    """torch.onnx.export's default exporter (dynamo=True): node names say nothing, the module paths are in
    each node's `namespace` metadata and the weights keep PyTorch's names."""
    import warnings

    model = getattr(zoo, name)(seed=0).eval()
    x = torch.from_numpy(zoo.random_images(2, seed=1, size=64))
    path = str(tmp_path / "dynamo.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:1],), path, dynamo=True, verbose=False)
    module = load_onnx(path)
    with torch.no_grad():
        got = module(x[:1]).numpy()
        np.testing.assert_allclose(got, model(x[:1]).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, ort_run(path, x[:1].numpy()), rtol=1e-4, atol=1e-4)
    ours = [op.name for op in capture(module, (x[:1],)).ops]
    theirs = [op.name for op in capture(model, (x[:1],)).ops]
    # the one difference: the exporter writes torch.flatten as a Reshape
    assert ours == [n if n != "flatten" else "reshape" for n in theirs]


def test_onnx_mobilenet_compiles_bit_exact(tmp_path, so_of):
    """The usual file (BatchNorm folded by the exporter) through the compiler: the .so equals the reference."""
    path = export(zoo.mobilenet_v2(seed=0), (1, 3, 64, 64), tmp_path / "m.onnx")
    calib = zoo.random_images(5, seed=2, size=64)
    program, _ = intforge.quantize_model(path, (torch.from_numpy(calib[:1]),), calib)  # the API takes the path
    assert_bit_exact_int(program, so_of(program, "int"))


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _check_against_ort(m, tmp_path, shape, seed=0):
    path = str(tmp_path / "g.onnx")
    onnx.save(m, path)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    module = load_onnx(path)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ort_run(path, x), rtol=1e-5, atol=1e-5)
    return module, x


def test_hand_written_graph_of_other_exporters_matches_onnx_runtime(tmp_path):
    """opset 10: Clip's bounds as attributes; an unfolded BatchNorm; SAME padding; AveragePool without the
    pads in its count; Concat; Reshape to a shape computed from Shape/Gather/Unsqueeze/Concat; MatMul + Add
    (the bias folded into a linear layer); Gemm with transB=0 and alpha."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32) * 0.3
    bn = [np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5, rng.standard_normal(8).astype(np.float32),
          rng.standard_normal(8).astype(np.float32) * 0.1, np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5]
    mm = rng.standard_normal((12 * 4 * 4, 16)).astype(np.float32) * 0.1
    mb = rng.standard_normal(16).astype(np.float32)
    gw = rng.standard_normal((16, 5)).astype(np.float32) * 0.3
    gb = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "mu", "var"], ["n1"], name="stem_bn", epsilon=1e-3),
        helper.make_node("Clip", ["n1"], ["r1"], name="relu6", min=0.0, max=6.0),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="side"),
        helper.make_node("Relu", ["c2"], ["r2"], name="side_relu"),
        helper.make_node("Concat", ["r1", "r2"], ["cat"], name="cat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n"], ["n1d"], axes=[0]),
        helper.make_node("Concat", ["n1d", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "mm"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "mb"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("Gemm", ["hr", "gw", "gb"], ["y"], name="fc2", alpha=0.5, beta=2.0),
    ]
    inits = [("w1", w1), ("w2", w2), ("g", bn[0]), ("b", bn[1]), ("mu", bn[2]), ("var", bn[3]), ("mm", mm),
             ("mb", mb), ("gw", gw), ("gb", gb), ("zero", np.array(0, np.int64)), ("minus1", np.array([-1], np.int64))]
    m = _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 5])], inits, opset=10)
    module, x = _check_against_ort(m, tmp_path, (3, 3, 8, 8))
    assert {n for n, _ in module.named_modules() if n} >= {"stem", "stem_bn", "side", "fc1", "fc2"}
    graph = capture(module, (torch.from_numpy(x[:1]),))
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("conv2d") == 2 and kinds.count("linear") == 2 and "concat" in kinds
    assert graph.ops[0].attrs["folded_bn"] == "stem_bn"  # BatchNorm folded into the conv by capture, as in PyTorch
    program, _ = intforge.quantize_model(module, (torch.from_numpy(x[:1]),), x)
    q = np.concatenate([reference.run_float(program, x[i:i + 1])[0] for i in range(len(x))])
    assert np.corrcoef(q.ravel(), ort_run(str(tmp_path / "g.onnx"), x).ravel())[0, 1] > 0.99


@pytest.mark.parametrize("opset", [10, 17, 18])
def test_uneven_padding_as_tensorflow_converters_write_it(opset, tmp_path, so_of):
    """TensorFlow's SAME at stride 2 pads one more row and column at the end: explicit uneven Conv pads,
    auto_pad SAME_UPPER / SAME_LOWER, and Pad nodes (attributes before opset 11, inputs after, axes from
    18). They import as zero pads that capture folds into the conv as far as they are even, and the
    compiled library stays bit-exact with the reference."""
    rng = np.random.default_rng(3)
    w = [rng.standard_normal((4, c, 3, 3)).astype(np.float32) * 0.3 for c in (3, 4, 4, 4)]
    if opset < 11:
        pad = [helper.make_node("Pad", ["r2"], ["p"], name="pad", pads=[0, 0, 2, 1, 0, 0, 1, 1])]
        extra = []
    elif opset < 18:
        pad = [helper.make_node("Pad", ["r2", "pads"], ["p"], name="pad")]
        extra = [("pads", np.array([0, 0, 2, 1, 0, 0, 1, 1], np.int64))]
    else:
        pad = [helper.make_node("Pad", ["r2", "pads", "", "axes"], ["p"], name="pad")]
        extra = [("pads", np.array([2, 1, 1, 1], np.int64)), ("axes", np.array([2, 3], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="explicit", strides=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="upper", strides=[2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="lower", strides=[2, 2], auto_pad="SAME_LOWER"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             *pad,
             helper.make_node("Conv", ["p", "w3"], ["y"], name="after_pad")]
    inits = [(f"w{k}", v) for k, v in enumerate(w)] + extra
    m = _model(nodes, [_vi("x", [1, 3, 16, 16])], [_vi("y", [1, 4, 3, 2])], inits, opset=opset)
    module, x = _check_against_ort(m, tmp_path, (1, 3, 16, 16))
    graph = capture(module, (torch.from_numpy(x),))
    convs = {op.name: op for op in graph.ops if op.kind == "conv2d"}
    assert convs["after_pad"].attrs["padding"] == [1, 1]  # the even part of Pad's [2, 1, 1, 1], folded
    pads = [op.attrs["pads"] for op in graph.ops if op.kind == "pad"]
    assert pads == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]  # explicit, UPPER, LOWER, Pad's rest
    calib = np.random.default_rng(4).standard_normal((8, 3, 16, 16)).astype(np.float32)
    program, _ = intforge.quantize_model(module, (torch.from_numpy(calib[:1]),), calib)
    assert_bit_exact_int(program, so_of(program, "int"))


def test_constant_scales_and_shifts_after_a_layer_fold_into_it(tmp_path):
    """Caffe's Scale layers (Mul, Add per channel after a Conv), a Gemm divided by a scalar and shifted
    per feature: each folds into the layer's weights and bias, so capture sees convs and linears only."""
    rng = np.random.default_rng(7)
    w, fc = rng.standard_normal((6, 3, 3, 3)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["s", "c"], ["cs"]),
             helper.make_node("Add", ["cs", "t"], ["ct"]),
             helper.make_node("Relu", ["ct"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["g"], transB=1),
             helper.make_node("Div", ["g", "two"], ["gd"]),
             helper.make_node("Sub", ["gd", "shift"], ["y"])]
    inits = [("w", w), ("fc", fc), ("s", rng.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32)),
             ("t", rng.standard_normal((6, 1, 1)).astype(np.float32)), ("two", np.array(2.0, np.float32)),
             ("shift", rng.standard_normal(5).astype(np.float32))]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 5])], inits, opset=17)
    module, x = _check_against_ort(m, tmp_path, (1, 3, 8, 8))
    kinds = [op.kind for op in capture(module, (torch.from_numpy(x),)).ops]
    assert kinds == ["conv2d", "relu", "avg_pool2d", "reshape", "linear"]


def test_old_model_zoo_style_file_with_weights_among_the_inputs(tmp_path):
    """ONNX IR 3 / opset 8, as the early model zoo files are: every initializer also listed as a graph
    input, BatchNormalization with its `spatial` attribute. Only `data` is an input to the module."""
    rng = np.random.default_rng(5)
    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    inits = {"w": normal(8, 3, 3, 3), "g": np.abs(normal(8)) + 0.5, "b": normal(8), "m": normal(8) * 0.1,
             "v": np.abs(normal(8)) + 0.5, "fc": normal(10, 8), "fb": normal(10)}
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], spatial=1, epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    inputs = [_vi("data", [1, 3, 8, 8])] + [_vi(k, list(v.shape)) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "old", inputs, [_vi("y", [1, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    path = str(tmp_path / "old.onnx")
    onnx.save(m, path)
    module = load_onnx(path)
    assert module.input_names == ["data"]
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ort_run(path, x), rtol=1e-5, atol=1e-5)


def test_reduce_mean_global_pool_dropout_and_identity(tmp_path):
    w = np.random.default_rng(1).standard_normal((6, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Identity", ["c"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]),
             helper.make_node("MaxPool", ["d"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("GlobalAveragePool", ["mp"], ["g"]),
             helper.make_node("ReduceMean", ["mp"], ["r"], axes=[2, 3], keepdims=1),
             helper.make_node("Add", ["g", "r"], ["s"]),
             helper.make_node("Flatten", ["s"], ["y"], axis=1)]
    m = _model(nodes, [_vi("x", [2, 2, 10, 10])], [_vi("y", [2, 6])], [("w", w)], opset=17)
    module, _ = _check_against_ort(m, tmp_path, (2, 2, 10, 10))
    assert module.example_shape() == (2, 2, 10, 10)
    loose = _model(nodes, [_vi("x", ["N", 2, "H", "W"])], [_vi("y", ["N", 6])], [("w", w)], opset=17)
    onnx.save(loose, str(tmp_path / "loose.onnx"))
    with pytest.raises(IntforgeError, match="symbolic dimensions besides the batch"):
        load_onnx(tmp_path / "loose.onnx").example_shape()


@pytest.mark.parametrize("case, message", [
    ("sine", "unsupported op Sin"),
    ("log_softmax", "export the model without it"),
    ("hard_sigmoid", "intforge takes PyTorch's (alpha 1/6"),
    ("layernorm_2d", "over the last axis only"),
    ("asymmetric", "not symmetric"),
    ("reflect", "with zeros only"),
    ("bn_alone", "does not directly follow a Conv"),
    ("const_add", "an Add of an activation and a number"),
    ("gather_many", "a Gather of 2 indices from an activation"),
    ("mul_tensor", "a Mul that is not by one number"),
    ("split_wide", "a Split of an activation into parts of [2, 2]"),
    ("normalize", "input normalization"),
    ("computed_weight", "its weight"),
    ("half_input", "neither a float32 tensor nor integers"),
    ("custom_domain", "outside the standard ONNX domain"),
    ("quantized", "give it the float model"),
])
def test_unsupported_graphs_are_refused_naming_the_node_and_file(case, message, tmp_path):
    w = np.ones((4, 3, 3, 3), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1])
    x, y = _vi("x", [1, 3, 8, 8]), _vi("y", None)
    inits = [("w", w)]
    nodes = {
        "sine": [conv, helper.make_node("Sin", ["c"], ["y"], name="wave")],
        "log_softmax": [conv, helper.make_node("Flatten", ["c"], ["f"]),
                        helper.make_node("LogSoftmax", ["f"], ["y"], name="probs")],
        "hard_sigmoid": [conv, helper.make_node("HardSigmoid", ["c"], ["y"], name="gate")],
        "layernorm_2d": [conv, helper.make_node("LayerNormalization", ["c", "s2"], ["y"], name="ln", axis=2)],
        "asymmetric": [helper.make_node("MaxPool", ["x"], ["y"], name="pool0", kernel_shape=[2, 2],
                                        pads=[0, 0, 1, 1])],
        "reflect": [helper.make_node("Pad", ["x", "p"], ["y"], name="pad0", mode="reflect")],
        "bn_alone": [conv, helper.make_node("Relu", ["c"], ["r"]),
                     helper.make_node("BatchNormalization", ["r", "s", "s", "s", "s"], ["y"], name="bn")],
        "const_add": [conv, helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "k"], ["y"],
                                                                                   name="bias_add")],
        "gather_many": [conv, helper.make_node("Gather", ["c", "two"], ["y"], name="pick", axis=1)],
        "mul_tensor": [conv, helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Mul", ["r", "k"], ["y"],
                                                                                    name="gain")],
        "split_wide": [conv, helper.make_node("Split", ["c", "halves"], ["y", "z"], name="halve", axis=1)],
        "normalize": [helper.make_node("Sub", ["x", "k3"], ["s"], name="minus_mean"), conv],
        "computed_weight": [helper.make_node("Relu", ["x"], ["r"]),
                            helper.make_node("Conv", ["x", "r"], ["y"], name="conv0")],
        "half_input": [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "custom_domain": [helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")],
        "quantized": [helper.make_node("QuantizeLinear", ["x", "qs"], ["q"], name="quant"),
                      helper.make_node("DequantizeLinear", ["q", "qs"], ["y"], name="dequant")],
    }[case]
    if case == "quantized":
        inits.append(("qs", np.array(0.05, np.float32)))
    if case == "reflect":
        inits.append(("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    if case == "layernorm_2d":
        inits.append(("s2", np.ones((6, 6), np.float32)))
    if case == "bn_alone":
        inits.append(("s", np.ones(4, np.float32)))
    if case == "const_add":
        inits.append(("k", np.ones((1,), np.float32)))
    if case == "mul_tensor":
        inits.append(("k", np.ones((1, 4, 1, 1), np.float32)))
    if case == "split_wide":
        inits.append(("halves", np.array([2, 2], np.int64)))
    if case == "gather_many":
        inits.append(("two", np.array([0, 2], np.int64)))
    if case == "normalize":
        inits.append(("k3", np.full((1, 3, 1, 1), 0.5, np.float32)))
        nodes[1].input[0] = "s"
    if case == "half_input":  # (int64 / int32 / bool inputs are token ids and masks: test_text.py)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / f"{case}.onnx"
    onnx.save(m, str(path))
    with pytest.raises(IntforgeError) as info:
        load_onnx(path)
    text = str(info.value)
    assert message in text and str(path) in text
    if case != "half_input":
        assert isinstance(info.value, UnsupportedOpError) and "ONNX node '" in text


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(IntforgeError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(IntforgeError, match="is not"):
        load_onnx(tmp_path / "junk.onnx")


def test_scope_path_of_torch_exporter_names():
    assert scope_path("/features/features.2/conv/conv.0/conv.0.0/Conv") == "features.2.conv.0.0"
    assert scope_path("/layer1/layer1.0/Add") == "layer1.0"
    assert scope_path("/Flatten") == "" and scope_path("Conv_12") == ""


def test_cli_compiles_and_runs_an_onnx_file(tmp_path):
    """`intforge compile model.onnx` on the trained MNIST net: its accuracy is the PyTorch-path compile's."""
    path = export(zoo.mnist_net(), (1, 1, 28, 28), tmp_path / "mnist.onnx")
    proc = intforge_cli("compile", path, "--calib", "mnist:300", "-o", str(tmp_path / "onnx"))
    assert "integer-only: yes" in proc.stdout
    intforge_cli("compile", "intforge.zoo:mnist_net", "--calib", "mnist:300", "-o", str(tmp_path / "torch"))
    accs = [float(intforge_cli("run", str(tmp_path / d / "model.so"), "--data", "mnist", "--count", "1000")
                  .stdout.split("accuracy ")[1].split()[0]) for d in ("onnx", "torch")]
    assert accs[0] > 0.98 and abs(accs[0] - accs[1]) <= 0.002
    inspect = intforge_cli("inspect", str(tmp_path / "onnx" / "model.so")).stdout
    assert "features.3" in inspect and "classifier.0" in inspect
    manifest = json.loads(intforge_cli("inspect", str(tmp_path / "onnx" / "model.so"), "--json").stdout)
    assert manifest["inputs"][0]["name"] == "image"  # the file's input and output names
    assert manifest["outputs"][0]["name"] == "y"


def test_cli_compare_scores_and_times_intforge_against_onnx_runtime_on_the_same_file(tmp_path):
    path = export(zoo.mnist_net(), (1, 1, 28, 28), tmp_path / "mnist.onnx")
    out = tmp_path / "cmp.json"
    proc = intforge_cli("compare", path, "--calib", "mnist:200", "--data", "mnist:500", "--rounds", "2", "--repeat",
                        "5", "--threads", "1", "--json", str(out), "-o", str(tmp_path / "cmp"))
    assert "intforge INT8 / ORT INT8 latency:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["samples"] == 500 and result["threads"] == 1
    assert result["accuracy"]["intforge_int8"] > 0.98 and result["accuracy"]["ort_int8"] > 0.98
    assert abs(result["accuracy"]["ort_fp32"] - 0.9986) < 0.01  # the trained net, run by ORT in float
    timing = result["latency"]
    assert len(timing["engines"]["ort_int8"]["round_medians_ms"]) == 2 and timing["ratio"] > 0
    assert (tmp_path / "cmp" / "ort_int8_qdq.onnx").is_file() and (tmp_path / "cmp" / "intforge" / "model.so").is_file()
    # a PyTorch model: exported to ONNX first, and both engines compile that file
    proc = intforge_cli("compare", "intforge.zoo:mnist_net", "--calib", "mnist:100", "--data", "mnist:200",
                        "--rounds", "1", "--repeat", "3", "-o", str(tmp_path / "cmp_torch"))
    assert "exported intforge.zoo:mnist_net to" in proc.stdout and (tmp_path / "cmp_torch" / "model.onnx").is_file()
    assert float(proc.stdout.split("accuracy")[1].split()[2]) > 0.97  # intforge INT8's column
    for args, message in ((["intforge.zoo:mnist_net"], "compare needs --calib data"),
                          ([path], "compare needs --calib data"),
                          ([path, "--calib", "mnist:10", "--target", "rpi5"], "leave --target")):
        proc = intforge_cli("compare", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_compare_on_a_text_encoder_scores_embeddings_against_ort_static_and_dynamic(tmp_path):
    """`intforge compare` on the real all-MiniLM-L6-v2 with movie-review snippets (token ids and masks): the
    model exported with a dynamic batch axis, which both engines compile; ORT's static and dynamic INT8
    (its advice for transformers) beside intforge's, scored by the cosine of their sentence embeddings to
    ORT FP32's, and timed in turns, intforge against each."""
    out = tmp_path / "cmp.json"
    proc = intforge_cli("compare", "intforge.zoo:minilm_l6", "--calib", "snippets:12", "--data", "snippets:16",
                        "--input-shape", "1,16", "--rounds", "2", "--repeat", "3", "--threads", "1", "--json",
                        str(out), "-o", str(tmp_path / "cmp"))
    assert "ORT INT8 dyn" in proc.stdout and "intforge INT8 / ORT INT8 dyn latency:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["samples"] == 16 and result["batch"] == 1
    cos = result["embedding_cosine_to_ort_fp32"]
    assert cos["intforge_int8"]["mean"] > 0.97 and cos["ort_int8_dynamic"]["mean"] > 0.97
    assert "top1_agreement_with_ort_fp32" not in result  # hidden states are not class scores
    timing = result["latency"]
    assert set(timing["engines"]) == {"ort_int8", "ort_int8_dynamic", "intforge_int8"}
    assert timing["ratio_over_ort_int8_dynamic"] > 0 and timing["ratio"] == timing["ratio_over_ort_int8"]
    assert (tmp_path / "cmp" / "ort_int8_dynamic.onnx").is_file() and (tmp_path / "cmp" / "model.onnx").is_file()
    # an image model given text data: named, not a traceback from the exporter
    proc = intforge_cli("compare", "intforge.zoo:mnist_net", "--calib", "snippets:4", "-o", str(tmp_path / "bad"),
                        check=False)
    assert proc.returncode == 2 and "gives 2 inputs a sample" in proc.stderr and "takes 1" in proc.stderr


def _exported_and_pytorch_programs(model: torch.nn.Module, calib_shape: tuple[int, ...], dynamo: bool, tmp_path):
    """The integer programs of `model` exported to ONNX (by the dynamo exporter or TorchScript's) and of
    the model itself, quantized on the same random calibration set; and that set."""
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, *calib_shape[1:]),), str(path), dynamo=dynamo,
                      opset_version=18 if dynamo else 17)
    calib = np.random.default_rng(0).standard_normal(calib_shape).astype(np.float32)
    example = (torch.from_numpy(calib[:1]),)
    ours, theirs = (intforge.quantize_model(m, example, calib)[0] for m in (str(path), model))
    return ours, theirs, calib


def _assert_as_close_as_the_pytorch_path_and_bit_exact(model, ours, theirs, x: np.ndarray, so_of) -> None:
    """The imported program's float output on `x` within 1.5x the PyTorch path's error against the model,
    and its compiled library bit-exact with the reference."""
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got, pytorch_path = reference.run_float(ours, x)[0], reference.run_float(theirs, x)[0]
    assert np.abs(got - want).max() <= 1.5 * np.abs(pytorch_path - want).max() + 1e-6
    assert_bit_exact_int(ours, so_of(ours, "int"))


@pytest.mark.parametrize("dynamo", [False, True])
def test_token_model_from_either_exporter_is_the_pytorch_programs_integers(dynamo, tmp_path, so_of):
    """The transformer-style block (LayerNormalization, GELU as Div-Erf-Add-Mul-Mul, Transpose, MatMul on
    tokens, Softmax) imports as the model it was exported from: the same integer program as the PyTorch
    path (layer for layer, weights and tables to the bit), and compiles bit-exact."""
    from test_nonlinear import TokenMixer

    torch.manual_seed(0)
    model = TokenMixer().eval()
    ours, theirs, _ = _exported_and_pytorch_programs(model, (32, 1, 28, 28), dynamo, tmp_path)
    assert [op.kind for op in ours.ops] == [op.kind for op in theirs.ops]
    assert "lut" in {op.kind for op in ours.ops}  # the Erf form became one GELU table
    for a, b in zip(ours.ops, theirs.ops, strict=True):
        assert sorted(a.params) == sorted(b.params)
        for key in a.params:
            np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=f"{a.name}.{key}")
    assert_bit_exact_int(ours, so_of(ours, "int"))


@pytest.mark.parametrize("dynamo", [False, True])
def test_vision_transformer_from_either_exporter_imports_as_the_pytorch_program(dynamo, tmp_path, so_of):
    """torchvision's VisionTransformer (small, random weights) exported by either exporter: the class token
    (a constant Expand, concatenated), the positional embedding (an Add of a constant tensor: the add's
    offset), the packed q, k, v projection (Unsqueeze, a 5-D Transpose, Squeeze, Gather of one index),
    attention as MatMuls of two activations with q and k scaled by sqrt(1 / sqrt(head size)) computed from
    shapes (Shape, Slice, Cast, Sqrt, Div), and the class token's Gather before the head. It imports as the
    same integer program as the PyTorch path, op for op, weights to the bit (both scales fold into the
    matmul, as SDPA's does: capture._fold_scales); the requantize multipliers and the offset only as close
    as the exporter's float32 arithmetic of the scale leaves the calibrated ranges. Compiled bit-exact, and
    as close to the model as PyTorch's."""
    from test_nonlinear import small_vision_transformer

    model = small_vision_transformer()
    ours, theirs, calib = _exported_and_pytorch_programs(model, (9, 3, 32, 32), dynamo, tmp_path)
    # (the dynamo exporter orders a transpose and a reshape of q's path the other way round)
    assert sorted(op.kind for op in ours.ops) == sorted(op.kind for op in theirs.ops)
    assert [op.kind for op in ours.ops].count("matmul") == 4 and "scale" not in {op.kind for op in ours.ops}
    assert sum("offset" in op.params for op in ours.ops) == 1  # (the positional embedding, in its add)
    weighted = [[op for op in program.ops if op.params] for program in (ours, theirs)]
    assert [op.kind for op in weighted[0]] == [op.kind for op in weighted[1]]
    for a, b in zip(*weighted, strict=True):
        assert sorted(a.params) == sorted(b.params)
        for key in a.params:
            if key in ("multiplier", "shift", "table", "offset"):
                continue
            if key == "mul":  # a layer norm's integer gain: from the same float32 ranges (one step apart on an
                # Intel Xeon, 2026-12-07, where AMD's CPUs gave the same integer)
                np.testing.assert_allclose(a.params[key], b.params[key], rtol=1e-5, err_msg=f"{a.name}.{key}")
                continue
            np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=f"{a.name}.{key}")
        if "multiplier" in a.params:  # (the shift: per channel in params, or one in attrs)
            ra, rb = (np.asarray(op.params["multiplier"], np.float64)
                      * 2.0 ** -np.asarray(op.params.get("shift", op.attrs.get("shift")), np.float64) for op in (a, b))
            np.testing.assert_allclose(ra, rb, rtol=1e-4, err_msg=a.name)
        if "offset" in a.params:  # (a constant added, in output steps: as close as those steps)
            oa, ob = (op.params["offset"] * 2.0 ** -np.asarray(op.attrs["shift"], np.float64) for op in (a, b))
            np.testing.assert_allclose(oa, ob, rtol=1e-4, atol=1e-3, err_msg=a.name)
    _assert_as_close_as_the_pytorch_path_and_bit_exact(model, ours, theirs, calib[:1], so_of)


@pytest.mark.parametrize("dynamo", [False, True])
def test_timm_style_attention_from_either_exporter_imports_and_compiles_bit_exact(dynamo, tmp_path, so_of):
    """timm's attention (qkv in one linear, reshaped, permuted, unbound; scaled_dot_product_attention):
    the TorchScript exporter writes the unbind as a Split into slices of one and Squeezes, the dynamo
    exporter as Slices of one; both import (each part a select), compile bit-exact, and the integer
    program's output is as close to the model's as the PyTorch path's."""
    from test_nonlinear import TinyViT

    torch.manual_seed(0)
    model = TinyViT().eval()
    ours, theirs, calib = _exported_and_pytorch_programs(model, (16, 1, 28, 28), dynamo, tmp_path)
    assert [op.kind for op in ours.ops].count("matmul") == 2 and [op.kind for op in ours.ops].count("select") == 3
    _assert_as_close_as_the_pytorch_path_and_bit_exact(model, ours, theirs, calib[:1], so_of)


def test_activation_tables_softmax_and_transpose_match_onnx_runtime(tmp_path, so_of):
    """Sigmoid, Tanh, LeakyRelu, Elu, HardSwish, PyTorch's HardSigmoid, Softplus, Gelu (opset 20, tanh form),
    Transpose, and an opset-11 Softmax (over the input flattened at axis 1, not the last axis alone), against
    ONNX Runtime as floats, then compiled bit-exact."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    chain = ["Sigmoid", "Tanh", "LeakyRelu", "Elu", "HardSwish", "HardSigmoid", "Softplus"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv0")]
    prev = "c"
    for k, op in enumerate(chain):
        attrs = {"alpha": 1 / 6} if op == "HardSigmoid" else {"alpha": 0.2} if op == "LeakyRelu" else {}
        nodes.append(helper.make_node(op, [prev], [f"a{k}"], name=f"act{k}", **attrs))
        prev = f"a{k}"
    nodes += [helper.make_node("Gelu", [prev], ["g"], name="gelu0", approximate="tanh"),
              helper.make_node("Reshape", ["g", "shape"], ["t"], name="tokens"),
              helper.make_node("Transpose", ["t"], ["tt"], name="swap", perm=[0, 2, 1])]
    m20 = _model(nodes, [_vi("x", [2, 3, 4, 5])], [_vi("tt", [2, 20, 6])],
                 [("w", w), ("shape", np.array([2, 6, 20], np.int64))], opset=20)
    _check_against_ort(m20, tmp_path, (2, 3, 4, 5))
    soft = _model([helper.make_node("Softmax", ["x"], ["y"], name="probs")], [_vi("x", [2, 3, 7])],
                  [_vi("y", [2, 3, 7])], opset=11)
    module, x = _check_against_ort(soft, tmp_path, (2, 3, 7))
    for model_proto, shape in ((m20, (2, 3, 4, 5)), (soft, (2, 3, 7))):
        path = tmp_path / "g.onnx"
        onnx.save(model_proto, str(path))
        calib = rng.standard_normal((16, *shape[1:])).astype(np.float32) * 2
        program, _ = intforge.quantize_model(str(path), (torch.from_numpy(calib[:2]),), calib)
        assert_bit_exact_int(program, so_of(program, "int"))
