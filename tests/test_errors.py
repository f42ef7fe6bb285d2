"""Bad input gets a clear error naming what and where, never a traceback from inside TVM."""

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import intforge
from conftest import quantize_module
from intforge.capture import capture
from intforge.compiler import build
from intforge.errors import (
    ArtifactError,
    CalibrationError,
    CaptureError,
    QuantizationError,
    UnsupportedOpError,
)


class WithSine(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sin(self.conv(x))  # the unsupported line


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class BareBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x)


def test_unsupported_op_names_the_op_the_layer_and_the_model_line():
    with pytest.raises(UnsupportedOpError) as err:
        intforge.quantize_model(WithSine(), (torch.randn(1, 3, 8, 8),), np.zeros((2, 3, 8, 8), np.float32))
    msg = str(err.value)
    assert "aten.sin" in msg
    assert "test_errors.py" in msg and "the unsupported line" in msg
    assert "conv2d" in msg  # lists what is supported


def test_zero_padding_is_folded_where_even_and_other_padding_is_refused():
    from intforge.capture import capture

    even = torch.nn.Sequential(torch.nn.ZeroPad2d((2, 1, 1, 1)), torch.nn.Conv2d(3, 4, 3))
    graph = capture(even, (torch.randn(1, 3, 8, 8),))
    assert [op.kind for op in graph.ops] == ["pad", "conv2d"]
    assert graph.ops[0].attrs["pads"] == [0, 1, 0, 0] and graph.ops[1].attrs["padding"] == [1, 1]
    graph = capture(torch.nn.Sequential(torch.nn.ZeroPad2d(1), torch.nn.Conv2d(3, 4, 3)), (torch.randn(1, 3, 8, 8),))
    assert [op.kind for op in graph.ops] == ["conv2d"] and graph.ops[0].attrs["padding"] == [1, 1]
    with pytest.raises(UnsupportedOpError, match="with zeros only"):
        capture(torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(3, 4, 3)), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(UnsupportedOpError, match="with zeros only"):
        capture(torch.nn.ConstantPad2d(1, 0.5), (torch.randn(1, 3, 8, 8),))


def test_model_that_cannot_be_exported_gets_a_capture_error():
    with pytest.raises(CaptureError, match="torch.export could not capture DataDependent"):
        intforge.quantize_model(DataDependent(), (torch.randn(1, 3),), np.zeros((2, 3), np.float32))


def test_example_inputs_the_model_cannot_take_are_named_as_such():
    """A shape the model cannot run on is not a capture problem: the error gives the shape, not export advice."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(CaptureError, match=r"Sequential cannot run on example inputs of shape \(1, 5, 8, 8\)") as err:
        capture(model, (torch.randn(1, 5, 8, 8),))
    assert "--input-shape" in str(err.value) and "data-dependent" not in str(err.value)
    with pytest.raises(CaptureError, match=r"example inputs of shape \(1, 3, 8, 8\) int64: .*shape and dtype"):
        capture(model, (torch.zeros(1, 3, 8, 8, dtype=torch.int64),))


def test_batchnorm_without_a_conv_before_it_is_refused():
    with pytest.raises(UnsupportedOpError, match="does not directly follow a convolution"):
        intforge.quantize_model(BareBatchNorm(), (torch.randn(1, 3, 4, 4),), np.zeros((2, 3, 4, 4), np.float32))


def test_calibration_set_of_the_wrong_shape_is_refused():
    with pytest.raises(CalibrationError, match=r"has shape \(10, 784\).*expects \(N, 3, 8, 8\)"):
        intforge.quantize_model(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), np.zeros((10, 784), np.float32))


def test_calibration_set_with_nan_is_refused():
    data = np.zeros((4, 3, 8, 8), np.float32)
    data[1, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        intforge.quantize_model(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), data)


def test_zero_scale_is_refused_before_building(tmp_path):
    program = quantize_module(nn.Conv2d(3, 4, 3), (1, 3, 6, 6))
    program.tensors[program.inputs[0]].scale = 0.0
    with pytest.raises(QuantizationError, match="scale 0.0"):
        build(program, tmp_path)


def test_accumulator_that_could_overflow_int32_is_refused():
    lin = nn.Linear(140000, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    with pytest.raises(QuantizationError, match="overflow its int32 accumulator"):
        quantize_module(nn.Sequential(nn.ReLU(), lin), (1, 140000), n_calib=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    program = quantize_module(nn.Conv2d(3, 4, 3), (1, 3, 6, 6))
    return build(program, tmp_path_factory.mktemp("art"))


def _copy(art, dst):
    shutil.copytree(art.library.parent, dst)
    return dst / art.library.name


def test_an_output_path_blocked_by_a_file_is_reported(built, tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    program = intforge.load(built.library).program()
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub" / "m.so"):
        with pytest.raises(intforge.IntforgeError, match="cannot write the model into .*taken"):
            build(program, out)


def test_missing_library_is_reported(built, tmp_path):
    so = _copy(built, tmp_path / "a")
    so.unlink()
    with pytest.raises(ArtifactError, match="does not exist.*manifest model.json is there"):
        intforge.load(so)


def test_a_manifest_or_program_path_loads_the_library_beside_it(built):
    """`intforge.load("model.json")` used to call the manifest a tampered library."""
    for path in (built.library.with_suffix(".json"), built.library.with_suffix(".iprog"), built.library.parent):
        assert intforge.load(path).library == built.library


def test_nan_inputs_are_refused_and_infinities_saturate(built):
    """NaN has no integer to go to: the .so took it as +inf and numpy's cast as 0, so both refuse it;
    +-inf saturates to the input's bounds, the .so equal to the reference."""
    from intforge import reference

    lib = intforge.load(built.library)
    program = lib.program()
    x = np.zeros(lib.inputs[0]["shape"], np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(QuantizationError, match=r"input 'input' holds NaN \(1 of 108 values\)"):
        lib(x)
    with pytest.raises(QuantizationError, match="holds NaN"):
        reference.run_float(program, x)
    x = np.full(lib.inputs[0]["shape"], np.inf, np.float32)
    x[0, 1] = -np.inf
    np.testing.assert_array_equal(lib(x), reference.run_float(program, x)[0])


@pytest.mark.parametrize("size", [100, 8192, 8193, 150528])  # x . x up to dyadic.SMALL_INPUT, x.max() past it
def test_the_nan_check_finds_one_nan_anywhere_and_passes_infinities(size):
    from intforge.dyadic import refuse_nan

    x = np.full(size, 3e38, np.float32)  # squares overflow to inf: not NaN
    x[::2] = -np.inf
    x[1::3] = np.inf
    refuse_nan("x", x)
    for where in (0, size // 2, size - 1):
        y = x.copy()
        y[where] = np.nan
        with pytest.raises(QuantizationError, match=f"holds NaN \\(1 of {size} values\\)"):
            refuse_nan("x", y)


def test_missing_manifest_is_reported(built, tmp_path):
    so = _copy(built, tmp_path / "b")
    so.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="has no manifest"):
        intforge.load(so)


def test_tampered_library_is_refused(built, tmp_path):
    so = _copy(built, tmp_path / "c")
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        intforge.load(so)


def test_wrong_input_shape_at_run_time_is_reported(built):
    lib = intforge.load(built.library)
    with pytest.raises(intforge.IntforgeError, match=r"compiled for \(1, 3, 6, 6\)"):
        lib(np.zeros((1, 3, 7, 7), np.float32))
