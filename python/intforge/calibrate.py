"""Calibration: observe the float graph on sample data and choose each tensor's range."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .capture import FloatGraph, FloatOp, run_float_graph
from .errors import CalibrationError
from .program import check_index_values

METHODS = ("minmax", "percentile")


@dataclass
class CalibConfig:
    """How activation ranges are chosen: the observed min/max, or a percentile of the values."""

    method: str = "minmax"
    percentile: float = 99.99
    batch_size: int = 64
    max_samples_per_tensor: int = 1 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; choose one of {METHODS}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise CalibrationError(f"batch_size must be positive, got {self.batch_size}")


def check_calibration_data(graph: FloatGraph, data: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate one array per model input, each (N, *input_shape[1:]), and return them as float32."""
    if len(data) != len(graph.inputs):
        raise CalibrationError(
            f"the model takes {len(graph.inputs)} input(s) ({', '.join(graph.inputs)}) but "
            f"{len(data)} calibration array(s) were given; pass one array per input."
        )
    out = []
    n0 = None
    for name, arr in zip(graph.inputs, data, strict=True):
        arr = np.asarray(arr)
        want = graph.shapes[name][1:]
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != tuple(want):
            raise CalibrationError(
                f"calibration data for input '{name}' has shape {tuple(arr.shape)}, but the model expects "
                f"(N, {', '.join(map(str, want))}) (samples first, then the example input's shape without "
                "its batch dimension). Reshape the data, or give an example input of the data's shape."
            )
        if not np.issubdtype(arr.dtype, np.number):
            raise CalibrationError(f"calibration data for input '{name}' is not numeric (dtype {arr.dtype})")
        if arr.shape[0] == 0:
            raise CalibrationError(f"calibration data for input '{name}' is empty")
        if n0 is not None and arr.shape[0] != n0:
            raise CalibrationError("calibration arrays of different inputs have different sample counts")
        n0 = arr.shape[0]
        spec = graph.index_inputs.get(name)
        if spec is not None:  # token ids, a mask: integers in the range the model reads them at
            out.append(check_index_values(name, arr, spec["dtype"], spec["lo"], spec["hi"], spec["role"],
                                          CalibrationError))
            continue
        if not np.all(np.isfinite(arr)):
            raise CalibrationError(f"calibration data for input '{name}' contains NaN or infinity")
        out.append(arr.astype(np.float32, copy=False))
    return out


class Ranges(dict):
    """(lo, hi) of every tensor, plus `channels`: the largest |value| of each channel of the last axis of the
    outputs of linear layers, adds, LayerNorms and elementwise functions on tokens (rank 3 or more), where a
    transformer's residual stream has its outlier channels (`quantize.channel_exponents`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels: dict[str, np.ndarray] = {}
        # a few rows (last axis) of each linear layer's input: what `int4_clip="output"` measures errors on
        self.rows: dict[str, np.ndarray] = {}
        # the mean of x x^T over the rows of the layers' inputs `collect_ranges` was asked for (`hessians`),
        # by `hessian_key`: what GPTQ rounds a 4-bit layer's weights by (`quantize.gptq_round`)
        self.hessians: dict[str, np.ndarray] = {}
        self.hessian_rows: dict[str, int] = {}  # the rows each of those means is over


#: Rows of each linear layer's input that calibration keeps (`Ranges.rows`), spread over its batches.
KEEP_ROWS = 128
#: Window patches a batch adds to a conv's second moments (`conv_patches`), spread over its images and pixels.
PATCHES_PER_BATCH = 4096


def hessian_key(op: FloatOp) -> str:
    """Where `Ranges.hessians` keeps a layer's second moments: a linear's under its input tensor (the linears
    reading one tensor share them), a conv's under its own name (its window decides what a row is)."""
    return op.inputs[0] if op.kind == "linear" else op.name


def conv_patches(op: FloatOp, x: torch.Tensor, most: int = PATCHES_PER_BATCH) -> torch.Tensor:
    """Up to `most` of the windows a groups-1 conv multiplies its weights by, evenly spread over the batch's
    output pixels, as rows [R, C * KH * KW] in the order of `weight.reshape(O, -1)` (channel, then window
    row, then column): a conv is a linear layer on these rows, which is how GPTQ treats it."""
    (sh, sw), (ph, pw), (dh, dw) = op.attrs["stride"], op.attrs["padding"], op.attrs["dilation"]
    kh, kw = op.params["weight"].shape[2:]
    n, _, h, w = x.shape
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pick = torch.from_numpy(np.unique(np.linspace(0, n * oh * ow - 1, min(most, n * oh * ow)).astype(np.int64)))
    b, y, z = pick // (oh * ow), (pick // ow) % oh * sh, pick % ow * sw
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    taps = [xp[b, :, y + i * dh, z + j * dw] for i in range(kh) for j in range(kw)]  # each [R, C]
    return torch.stack(taps, dim=2).reshape(len(pick), -1)


def collect_ranges(graph: FloatGraph, data: Sequence[np.ndarray],
                   config: CalibConfig | None = None, hessians: Collection[FloatOp] = ()) -> Ranges:
    """Run the float graph over `data` and return (lo, hi) for every tensor, and for each layer in
    `hessians` (linears, groups-1 convs) the mean of x x^T over the rows it multiplies its weights by
    (`Ranges.hessians`, by `hessian_key`): a linear's input rows, every one; a conv's window patches,
    `PATCHES_PER_BATCH` a batch."""
    config = config or CalibConfig()
    second: dict[str, torch.Tensor] = {}  # sums of x x^T (float64; a conv's float32), and their rows
    counted: dict[str, int] = {}
    reading: dict[str, dict[str, FloatOp]] = {}  # tensor -> {hessian key: the layer (one of the linears) it serves}
    for op in hessians:
        if op.kind == "conv2d" and op.attrs["groups"] != 1:
            raise CalibrationError(f"second moments of a grouped conv ('{op.name}') are not collected: GPTQ "
                                   f"rounds linears and groups-1 convs")
        reading.setdefault(op.inputs[0], {}).setdefault(hessian_key(op), op)
    tokens = {op.output for op in graph.ops
              if op.kind in ("linear", "add", "layernorm", "unary") and len(graph.shapes[op.output]) >= 3}
    channels: dict[str, np.ndarray] = {}
    linear_inputs = {op.inputs[0] for op in graph.ops if op.kind == "linear"}
    rows: dict[str, list[np.ndarray]] = {}
    arrays = check_calibration_data(graph, data)
    n = arrays[0].shape[0]
    rng = np.random.default_rng(config.seed)
    mins: dict[str, float] = {}
    maxs: dict[str, float] = {}
    samples: dict[str, list[np.ndarray]] = {}
    per_batch = max(1, config.max_samples_per_tensor // max(1, -(-n // config.batch_size)))

    def observe(name: str, value: torch.Tensor) -> None:
        v = value.detach()
        lo, hi = float(v.min()), float(v.max())
        mins[name] = min(mins.get(name, lo), lo)
        maxs[name] = max(maxs.get(name, hi), hi)
        if name in tokens:
            top = v.abs().reshape(-1, v.shape[-1]).amax(0).numpy().astype(np.float64)
            channels[name] = np.maximum(channels[name], top) if name in channels else top
        if name in linear_inputs and sum(len(r) for r in rows.get(name, [])) < KEEP_ROWS:
            flat = v.reshape(-1, v.shape[-1]).numpy()
            take = np.linspace(0, len(flat) - 1, min(len(flat), per_batch_rows), dtype=np.int64)
            rows.setdefault(name, []).append(flat[take].astype(np.float64))
        for key, op in reading.get(name, {}).items():
            if op.kind == "conv2d":
                flat = conv_patches(op, v.to(torch.float32))
                xx = flat.T @ flat  # (float32: K x K is up to 4608 x 4608 a conv)
            else:
                flat = v.reshape(-1, v.shape[-1]).to(torch.float32)
                xx = (flat.T @ flat).to(torch.float64)
            second[key] = second[key] + xx if key in second else xx
            counted[key] = counted.get(key, 0) + flat.shape[0]
        if config.method == "percentile":
            flat = v.reshape(-1).numpy()
            if flat.size > per_batch:
                flat = flat[rng.choice(flat.size, per_batch, replace=False)]
            samples.setdefault(name, []).append(flat)

    size = config.batch_size
    if graph.fixed_batch():  # (attention mixes batch and heads: the graph's shapes hold its batch size)
        size = graph.shapes[graph.inputs[0]][0]
        if n % size:  # the last batch filled up with the first samples (repeats move no min or max)
            arrays = [np.concatenate([a, np.resize(a, (size - n % size, *a.shape[1:]))]) for a in arrays]
            n = arrays[0].shape[0]
    per_batch = max(1, config.max_samples_per_tensor // max(1, -(-n // size)))  # (observe reads it)
    per_batch_rows = max(8, KEEP_ROWS // max(1, -(-n // size)))
    with torch.no_grad():
        for start in range(0, n, size):
            batch = [torch.from_numpy(a[start:start + size]) for a in arrays]
            run_float_graph(graph, *batch, observe=observe)

    ranges = Ranges()
    ranges.channels = channels
    ranges.rows = {name: np.concatenate(r)[:KEEP_ROWS] for name, r in rows.items()}
    ranges.hessians = {key: (h.to(torch.float64) / counted[key]).numpy() for key, h in second.items()}
    ranges.hessian_rows = {key: counted[key] for key in second}
    for name in mins:
        lo, hi = mins[name], maxs[name]
        if config.method == "percentile":
            vals = np.concatenate(samples[name])
            lo = min(0.0, float(np.percentile(vals, 100.0 - config.percentile))) if lo < 0 else lo
            hi = float(np.percentile(vals, config.percentile)) if hi > 0 else hi
        ranges[name] = (lo, hi)
    return ranges
