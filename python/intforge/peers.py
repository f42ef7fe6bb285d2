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
    batch axis dynamic (ORT's calibration feeds one sample at a time whatever batch is timed). `example`: one
    tensor (an image model's input), or a tuple of them (a text encoder's token ids and mask)."""
    import warnings

    import torch

    several = isinstance(example, tuple)
    inputs = [f"input{i}" for i in range(len(example))] if several else ["input"]
    output = "output" if several else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the TorchScript exporter announces its deprecation)
        torch.onnx.export(model, example if several else (example,), str(path), dynamo=False, opset_version=17,
                          input_names=inputs, output_names=[output],
                          dynamic_axes={n: {0: "batch"} for n in [*inputs, output]})
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


SWITCH_PAUSE_S = 0.2  # between two engines' blocks: the last one's spinning threads park
QUIET_WINDOW_S = 0.05  # ... and then until this process's threads used under QUIET_SHARE of a CPU this long
QUIET_SHARE = 0.1
QUIET_MOST_S = 3.0


def settle() -> float:
    """Sleep SWITCH_PAUSE_S, then until this process's threads are idle (under QUIET_SHARE of one CPU over
    QUIET_WINDOW_S, at most QUIET_MOST_S): the seconds slept. An engine's pool threads spin after its last
    call, and the next engine shares their cores meanwhile. TVM's workers spin-yield about 0.26 s on the
    Zen 3 VM of 2026-12-05 (0.2 s had been enough on the Zen 5): the core probe after them read 2 threads
    no faster than 1, and whatever ran next lost a core to them."""
    t0 = time.perf_counter()
    time.sleep(SWITCH_PAUSE_S)
    while time.perf_counter() - t0 < QUIET_MOST_S:
        c0 = time.process_time()
        time.sleep(QUIET_WINDOW_S)
        if time.process_time() - c0 < QUIET_SHARE * QUIET_WINDOW_S:
            break
    return time.perf_counter() - t0


def interleaved_latency(engines: dict[str, Callable[..., Any]], x: np.ndarray | tuple[np.ndarray, ...], rounds: int,
                        repeat: int, warmup: int = 5) -> dict[str, Any]:
    """Each engine's latency (ms) on `x` (one input, or a tuple of them: token ids and mask), measured in
    turns: every round times `repeat` calls of each engine, the order alternating between rounds, so a slow
    phase of a shared machine lands on all of them alike; each block after `settle` and one untimed call
    (the engine before it leaves its threads spinning). Per engine: the median over all calls and each
    round's median; with two engines, `ratio`: `round_ratio` of the second over the first."""
    names = list(engines)
    args = x if isinstance(x, tuple) else (x,)
    for fn in engines.values():
        for _ in range(warmup):
            fn(*args)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            settle()
            engines[n](*args)
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                engines[n](*args)
                ts.append((time.perf_counter() - t0) * 1e3)
            calls[n] += ts
            per_round[n].append(statistics.median(ts))
    out: dict[str, Any] = {"rounds": rounds, "repeat": repeat,
                           "engines": {n: {"median_ms": statistics.median(calls[n]), "min_ms": min(calls[n]),
                                           "round_medians_ms": [round(v, 4) for v in per_round[n]]}
                                       for n in names}}
    if len(names) == 2:
        out["ratio"], out["ratio_of_medians"] = round_ratio(out, *names), ratio_of_medians(out, *names)
    return out


def round_ratio(timing: dict[str, Any], a: str, b: str) -> float:
    """The "round by round" ratio of an `interleaved_latency` timing: the median over rounds of engine b's
    round median over engine a's."""
    ra, rb = (timing["engines"][n]["round_medians_ms"] for n in (a, b))
    return statistics.median(y / x for x, y in zip(ra, rb, strict=True))


def ratio_of_medians(timing: dict[str, Any], a: str, b: str) -> float:
    """Engine b's median call over engine a's, in an `interleaved_latency` timing."""
    return timing["engines"][b]["median_ms"] / timing["engines"][a]["median_ms"]
