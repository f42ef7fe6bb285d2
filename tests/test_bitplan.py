"""From sensitivity to plan to compiled mixed-precision model: the glue and the measured latencies."""

import json

import numpy as np
import pytest
import torch

from intforge import zoo
from intforge.bitplan import plan_layers, read_plan_bits, residual_ties
from intforge.capture import capture
from intforge.errors import IntforgeError
from intforge.hessian import LayerSensitivity, SensitivityReport
from intforge.latency import measure_layer_latency
from intforge.planner import Budget, plan


def fake_report(graph, values):
    return SensitivityReport(layers=[LayerSensitivity(r["name"], r["kind"], r["params"], v * r["params"], v, v, 1, 1)
                                     for r, v in zip(graph.layers(), values, strict=True)])


@pytest.fixture(scope="module")
def mnist_graph():
    return capture(zoo.mnist_net(), (torch.zeros(1, 1, 28, 28),))


def test_plan_layers_carry_sizes_macs_and_perturbations(mnist_graph):
    layers = plan_layers(mnist_graph, fake_report(mnist_graph, [1.0, 2.0, 3.0, 4.0]))
    assert [p.name for p in layers] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert layers[2].params == 401408 and layers[2].macs == 401408
    assert all(p.perturbation[4] > p.perturbation[8] > 0 for p in layers)


def test_more_sensitive_layers_keep_8_bits(mnist_graph):
    # classifier.0 is most of the weights; make it very sensitive: the size budget must then go elsewhere
    # and cannot, so it stays INT8 only under a loose budget; with it insensitive it goes INT4 first.
    cheap = plan(plan_layers(mnist_graph, fake_report(mnist_graph, [1.0, 1.0, 1e-9, 1.0])),
                 budgets=[Budget("size", 0.5, relative=True)])
    assert cheap.bits["classifier.0"] == 4


def test_report_for_another_model_is_refused(mnist_graph):
    other = SensitivityReport(layers=[LayerSensitivity("fc", "linear", 10, 1.0, 0.1, 1.0, 1, 1)])
    with pytest.raises(IntforgeError, match="no entry for layers"):
        plan_layers(mnist_graph, other)


def test_residual_ties_pair_each_blocks_branches():
    graph = capture(zoo.resnet18(), (torch.zeros(1, 3, 224, 224),))
    ties = residual_ties(graph)
    # Downsampling blocks tie conv2 with the shortcut conv; the first block's shortcut is the stem's
    # (max-pooled) output; identity shortcuts from a previous add tie nothing.
    assert ties == [["conv1", "layer1.0.conv2"], ["layer2.0.conv2", "layer2.0.downsample.0"],
                    ["layer3.0.conv2", "layer3.0.downsample.0"], ["layer4.0.conv2", "layer4.0.downsample.0"]]


def test_latency_is_measured_per_layer_and_bits_then_cached(mnist_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("INTFORGE_CACHE", str(tmp_path))
    lat = measure_layer_latency(mnist_graph, bits=(4, 8), repeat=5, progress=False)
    assert set(lat) == {"features.0", "features.3", "classifier.0", "classifier.2"}
    assert all(v[b] > 0 for v in lat.values() for b in (4, 8))
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert len(cache) == 8
    import intforge.compiler

    def no_build(*a, **k):
        raise AssertionError("a cached latency was measured again")

    monkeypatch.setattr(intforge.compiler, "build", no_build)
    assert measure_layer_latency(mnist_graph, bits=(4, 8), progress=False) == lat


def test_corrupt_latency_cache_warns_and_is_rebuilt(mnist_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("INTFORGE_CACHE", str(tmp_path))
    (tmp_path / "latency.json").write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        lat = measure_layer_latency(mnist_graph, bits=(8,), repeat=3, progress=False)
    assert len(lat) == 4


def test_read_plan_bits_errors(tmp_path):
    with pytest.raises(IntforgeError, match="does not exist"):
        read_plan_bits(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(IntforgeError):
        read_plan_bits(tmp_path / "bad.json")




def test_layers_are_timed_in_the_layout_they_run_in_a_model(tmp_path):
    """A layer timed alone takes and returns NHWC, like inside a model on the NHWC CPU kernels: no
    transposes are left in what is timed, and the integers are the reference's."""
    import collections

    import tvm
    from tvm import relax

    from intforge import load, reference
    from intforge.capture import FloatOp
    from intforge.compiler import build
    from intforge.compiler.build import _kernel_passes
    from intforge.compiler.targets import resolve_target
    from intforge.latency import layer_program
    from intforge.relay_passes import emit_program

    op = FloatOp("conv2d", "c", ["x"], "y", {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
                 {"weight": np.zeros((24, 8, 3, 3), np.float32), "bias": np.zeros(24, np.float32)})
    prog = layer_program(op, (1, 8, 14, 14), (1, 24, 7, 7), 8)
    preset = resolve_target("x86")
    with preset.tvm_target():
        mod = tvm.transform.Sequential(_kernel_passes(preset))(emit_program(prog, boundary="int", io_layout="NHWC"))
    ops = collections.Counter()
    relax.analysis.post_order_visit(mod["main"], lambda e: isinstance(e, relax.Call) and ops.update(
        [getattr(e.op, "name", "")]))
    assert ops["relax.permute_dims"] == 0 and ops["relax.call_tir"] == 1
    lib = load(build(prog, tmp_path / "m", boundary="int", io_layout="NHWC").library)
    assert lib.inputs[0]["shape"] == [1, 14, 14, 8] and lib.manifest["io_layout"] == "NHWC"
    x = np.random.default_rng(0).integers(0, 256, (1, 8, 14, 14)).astype(np.uint8)
    got = lib(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), reference.run_int(prog, x)[0])


def test_a_timed_layer_takes_the_requantize_a_calibrated_layer_takes():
    """A layer timed alone for the latency budget runs the epilogue the same layer runs inside a
    calibrated model: a conv's on 32-bit lanes (shift SHORT_SHIFT), a dense layer's capped at CAPPED_SHIFT.
    With a fixed shift of 40 every timed conv took the 64-bit form, twice as slow on AVX2 for few input
    channels, and the budget believed it."""
    from torch import nn

    from conftest import quantize_module
    from intforge import dyadic
    from intforge.capture import FloatOp
    from intforge.latency import layer_program

    calibrated = quantize_module(nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(24 * 6 * 6, 10)), (1, 8, 6, 6))
    shifts = {op.kind: set(np.asarray(op.params["shift"]).tolist()) for op in calibrated.ops
              if op.kind in ("conv2d", "linear")}
    assert shifts == {"conv2d": {dyadic.SHORT_SHIFT}, "linear": {dyadic.CAPPED_SHIFT}}
    conv = FloatOp("conv2d", "c", ["x"], "y", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
                   {"weight": np.zeros((24, 8, 3, 3), np.float32)})
    dense = FloatOp("linear", "d", ["x"], "y", {}, {"weight": np.zeros((10, 864), np.float32)})
    for op, in_shape, out_shape in ((conv, (1, 8, 6, 6), (1, 24, 6, 6)), (dense, (1, 864), (1, 10))):
        for bits in (4, 8):
            timed = layer_program(op, in_shape, out_shape, bits).ops[0]
            assert set(np.asarray(timed.params["shift"]).tolist()) == shifts[op.kind], (op.kind, bits)


def test_gptq_perturbations_are_measured_as_the_inputs_see_them_on_held_out_samples():
    """With `int4_rounding="gptq"` a layer's 4-bit perturbation is tr(D S D^T) K / tr(S), S its inputs'
    second moments on the samples GPTQ did not round on: on white inputs (S about a multiple of the
    identity, where GPTQ rounds about as nearest does) it is about nearest rounding's ||D||^2; on
    correlated ones GPTQ's far smaller, though its ||D||^2 is larger."""
    from torch import nn

    from intforge.bitplan import deployed_int4_perturbations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48)).eval()
    rng = np.random.default_rng(0)
    white = rng.standard_normal((2000, 32)).astype(np.float32)
    graph = capture(model, (torch.from_numpy(white[:1]),))
    near = deployed_int4_perturbations(graph, white, 8, "max", "nearest")["0"]
    gptq = deployed_int4_perturbations(graph, white, 8, "max", "gptq")["0"]
    assert 0.8 * near < gptq < 1.2 * near, (near, gptq)
    mixed = (white @ (np.eye(32) + 0.9 * rng.standard_normal((32, 32)) / np.sqrt(32))).astype(np.float32)
    near = deployed_int4_perturbations(graph, mixed, 8, "max", "nearest")["0"]
    gptq = deployed_int4_perturbations(graph, mixed, 8, "max", "gptq")["0"]
    assert gptq < 0.7 * near, (near, gptq)
