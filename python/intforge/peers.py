"""ONNX Runtime, the peer intforge is held to: its static INT8 quantization of a file, its sessions, and
timing two engines call for call.

One definition of the baseline, for `intforge compare` (a user's own ONNX file) and for the benchmarks
(`benchmarks/bench_resnet18.py`, `bench_cpu_suite.py`): static QDQ, per-channel int8 weights, uint8
activations, min/max calibration, ORT's graph optimizations on, as ORT's documentation sets it up for CPUs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntforgeError


def export_for_ort(model: Any, example: Any, path: str | Path) -> Path:
    """A PyTorch module as the .onnx file ORT runs: torch.onnx.export's TorchScript exporter, opset 17, the
    batch axis dynamic (ORT's calibration feeds one sample at a time whatever batch is timed)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the TorchScript exporter announces its deprecation)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Path(path)


def ort_session(path: str | Path, threads: int) -> Callable[..., np.ndarray]:
    """An ONNX Runtime CPU session on `threads` intra-op threads, as a function of its inputs in order
    (the image; token ids and mask) returning the first output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*xs: np.ndarray) -> np.ndarray:
        return sess.run(None, dict(zip(names, xs, strict=True)))[0]

    return run


def ort_quantize_static(fp32_path: str | Path, calib: np.ndarray | list[np.ndarray],
                        out_path: str | Path) -> tuple[Path, dict]:
    """ORT's static INT8 quantization of an ONNX file on `calib` (samples first, fed one at a time; a list:
    one array per input, token ids and mask): QDQ, per-channel int8 weights, uint8 activations, min/max.
    Returns the quantized file and how it was made."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in weights]
    arrays = [calib] if isinstance(calib, np.ndarray) else list(calib)

    def sample(a: np.ndarray, i: int) -> np.ndarray:  # (floats as float32; integer inputs keep their dtype)
        return np.ascontiguousarray(a[i:i + 1], np.float32 if a.dtype.kind == "f" else a.dtype)

    class Reader(CalibrationDataReader):
        def __init__(self, samples: list[np.ndarray]) -> None:
            self._it = iter([{n: sample(a, i) for n, a in zip(names, samples, strict=True)}
                             for i in range(len(samples[0]))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    info: dict[str, Any] = {"format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
                            "weight_type": "QInt8", "calibrate_method": "MinMax",
                            "calibration_samples": len(arrays[0])}
    t0 = time.perf_counter()
    src = fp32_path
    try:  # ORT's recommended preprocessing (shape inference, graph cleanup); optional
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = out_path.with_name(out_path.stem + "_pre.onnx")
        quant_pre_process(str(fp32_path), str(pre))
        src, info["quant_pre_process"] = pre, True
    except Exception as exc:  # noqa: BLE001 - preprocessing is optional; record why it was skipped
        info["quant_pre_process"] = f"skipped: {type(exc).__name__}: {exc}"
    try:
        quantize_static(str(src), str(out_path), Reader(arrays), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many types; the user needs the one line
        raise IntforgeError(f"ONNX Runtime could not quantize {fp32_path}: {type(exc).__name__}: "
                            f"{str(exc).strip()[:300]}") from None
    info["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    return out_path, info


def ort_quantize_dynamic(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, dict]:
    """ORT's dynamic INT8 quantization, what its documentation recommends for transformers: int8 weights,
    activations quantized at run time from each call's own range (float arithmetic around the integer
    matmuls, so not integer-only). Returns the quantized file and how it was made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many types; the user needs the one line
        raise IntforgeError(f"ONNX Runtime could not quantize {fp32_path}: {type(exc).__name__}: "
                            f"{str(exc).strip()[:300]}") from None
    return Path(out_path), {"format": "dynamic (QOperator)", "per_channel": True, "weight_type": "QInt8",
                            "quantize_seconds": round(time.perf_counter() - t0, 2)}


def interleaved_latency(engines: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, rounds: int, repeat: int,
                        warmup: int = 5) -> dict[str, Any]:
    """Each engine's latency (ms) on `x`, measured in turns: every round times `repeat` calls of each engine,
    the order alternating between rounds, so a slow phase of a shared machine lands on all of them alike.
    Per engine: the median over all calls and each round's median; with two engines, `ratio`: the median
    over rounds of the second's round median over the first's (the "round by round" ratio)."""
    names = list(engines)
    for fn in engines.values():
        for _ in range(warmup):
            fn(x)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                engines[n](x)
                ts.append((time.perf_counter() - t0) * 1e3)
            calls[n] += ts
            per_round[n].append(statistics.median(ts))
    out: dict[str, Any] = {"rounds": rounds, "repeat": repeat,
                           "engines": {n: {"median_ms": statistics.median(calls[n]), "min_ms": min(calls[n]),
                                           "round_medians_ms": [round(v, 4) for v in per_round[n]]}
                                       for n in names}}
    if len(names) == 2:
        a, b = names
        out["ratio"] = statistics.median(rb / ra for ra, rb in zip(per_round[a], per_round[b], strict=True))
        out["ratio_of_medians"] = out["engines"][b]["median_ms"] / out["engines"][a]["median_ms"]
    return out
