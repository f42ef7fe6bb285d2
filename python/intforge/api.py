"""The one obvious call: intforge.compile(model, example_inputs, calib_data=..., target=...)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .calibrate import CalibConfig, collect_ranges
from .capture import FloatGraph, capture
from .program import IntegerProgram
from .quantize import QuantConfig, hessian_layers, quantize


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _onnx_model(path: str | Path) -> torch.nn.Module:
    if not str(path).endswith(".onnx"):
        from .errors import IntforgeError

        raise IntforgeError(f"model {str(path)!r}: a path must name an .onnx file; pass other models as an "
                            "nn.Module or a torch.export program")
    from .onnx_import import load_onnx

    return load_onnx(path)


def quantize_model(
    model: torch.nn.Module | torch.export.ExportedProgram | str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    calib_data: Sequence[np.ndarray] | np.ndarray | str | None = None,
    calibration: str | CalibConfig = "minmax",
    quant: QuantConfig | None = None,
) -> tuple[IntegerProgram, FloatGraph]:
    """Capture, calibrate and quantize: returns the integer program and the float graph it came from.

    `calib_data` is one array per input (samples first), or "distilled" to synthesize inputs from the
    model's BatchNorm statistics (ZeroQ) when there is no data.
    """
    if isinstance(model, (str, Path)):  # an .onnx file
        model = _onnx_model(model)
    example = tuple(torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                    for x in _as_tuple(example_inputs))
    graph = capture(model, example)
    if isinstance(calib_data, str):
        if calib_data != "distilled":
            from .errors import CalibrationError

            raise CalibrationError(f"calib_data={calib_data!r}: pass arrays, or the string 'distilled' for "
                                   "data-free calibration")
        if len(example) != 1 or not isinstance(model, torch.nn.Module):
            from .errors import CalibrationError

            raise CalibrationError("distilled calibration needs an nn.Module with a single input")
        from .distill import distill_inputs

        calib_data = distill_inputs(model, tuple(example[0].shape[1:]))
    if calib_data is None:
        warnings.warn("no calibration data given: calibrating on the example inputs alone; activation "
                      "ranges (and accuracy) will be poor. Pass calib_data=.", stacklevel=2)
        calib = [x.detach().numpy() for x in example]
    else:
        calib = list(_as_tuple(calib_data)) if not isinstance(calib_data, np.ndarray) else [calib_data]
    cfg = calibration if isinstance(calibration, CalibConfig) else CalibConfig(method=calibration)
    ranges = collect_ranges(graph, calib, cfg, hessians=hessian_layers(graph, quant or QuantConfig()))
    program = quantize(graph, ranges, quant)
    program.meta["calibration"] = {"method": cfg.method, "percentile": cfg.percentile,
                                   "samples": int(np.asarray(calib[0]).shape[0])}
    return program, graph


def compile(  # noqa: A001 - the public verb, like torch.compile / tvm.compile
    model: torch.nn.Module | torch.export.ExportedProgram | str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    calib_data: Sequence[np.ndarray] | np.ndarray | str | None = None,
    output: str | Path = "build/model",
    target: str = "x86",
    boundary: str = "float",
    calibration: str | CalibConfig = "minmax",
    quant: QuantConfig | None = None,
):
    """Compile a PyTorch model (or an .onnx file's path) into an integer-only model.so + model.json under
    `output`."""
    from .compiler import build

    program, _ = quantize_model(model, example_inputs, calib_data, calibration, quant)
    return build(program, output, target=target, boundary=boundary)
