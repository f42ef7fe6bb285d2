"""Per-layer latency on the target, per bit width: each layer compiled alone and timed, results cached.

The planner's latency budget needs these numbers measured, not typed in (HAWQ-V3's were). A layer is
built as a one-op integer program with its real shape, stride, padding and groups, at each bit width,
and timed on this machine. Results are cached by (target, layer signature, bits), so layers of the same
shape, and later runs, cost nothing.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .cache import cache_root
from .capture import FloatGraph, FloatOp
from .dyadic import int_range, layer_multipliers
from .program import IntegerProgram, IntOp, QTensor


def cache_path() -> Path:
    """Where measured latencies are kept (INTFORGE_CACHE overrides ~/.cache/intforge)."""
    return cache_root() / "latency.json"


#: Bumped when the kernels or the way a layer is timed change, so older cached times are not reused.
TIMING_VERSION = 6  # 2: NHWC kernels, layers timed with NHWC inputs and outputs; 3: inputs resident;
# 4: TVM workers unpinned (pinned, some layers were timed at single-core speed); 5: the thread count is
# part of the key (TVM's default had been half the cores: one thread on 2 cores); 6: the requantize a
# calibrated layer takes (`TIMED_MULTIPLIER`), not a fixed shift of 40
#: The real requantize multiplier (input scale x weight scale / output scale) of a layer timed alone: the
#: median of ResNet50's and MobileNetV2's calibrated layers (2^-10.4 and 2^-9.6). What matters is the
#: form it gives the epilogue, which `dyadic.layer_multipliers` picks as for the layer in a model: a
#: conv's on 32-bit lanes (shift SHORT_SHIFT). With the fixed (2^30, 40) timed before, an AVX2 CPU
#: ran the epilogue on emulated 64-bit multiplies: MobileNetV2's 24->144 1x1 conv at 56x56 took 0.211 ms
#: alone against 0.103 with its real form (Zen 3, 2026-12-05), which the latency budget then believed.
TIMED_MULTIPLIER = 2.0 ** -10


def _signature(op: FloatOp, in_shape: tuple[int, ...], bits: int, target: str) -> str:
    attrs = {k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups") if k in op.attrs}
    return json.dumps([TIMING_VERSION, target, op.kind, list(in_shape), list(op.params["weight"].shape), attrs,
                       bits])


def layer_program(op: FloatOp, in_shape: tuple[int, ...], out_shape: tuple[int, ...], bits: int) -> IntegerProgram:
    """A one-layer integer program with random weights of the layer's shape, at `bits`."""
    rng = np.random.default_rng(0)
    qmax_w = (1 << (bits - 1)) - 1
    w = rng.integers(-qmax_w, qmax_w + 1, op.params["weight"].shape).astype(np.int8)
    cout = w.shape[0]
    x = QTensor("x", tuple(in_shape), 1.0, bits, signed=False)
    y = QTensor("y", tuple(out_shape), 1.0, 8, signed=False)
    lo, hi = int_range(8, False)
    attrs: dict[str, Any] = {"qmin": lo, "qmax": hi, "weight_bits": bits}
    if op.kind == "conv2d":
        attrs.update({k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")})
    m, n = layer_multipliers(op.kind, np.full(cout, TIMED_MULTIPLIER))
    params = {"weight": w, "bias": np.zeros(cout, np.int32), "multiplier": m, "shift": n,
              "weight_scale": np.ones(cout)}
    return IntegerProgram(["x"], ["y"], {"x": x, "y": y}, [IntOp(op.kind, op.name, ["x"], "y", attrs, params)])


def time_layer_program(program: IntegerProgram, workdir: Path, target: str = "x86", repeat: int = 30,
                       **build_options: Any) -> float:
    """Build a one-layer program (integer boundary) into `workdir` and return its median ms. CPU layers are
    timed with NHWC inputs and outputs, the layout they have inside a model on our CPU kernels, so the
    time has no transposes the model does not have, and with the input already in the library's memory
    (TVM's time evaluator), so it has no numpy conversions a layer inside a model does not have either."""
    from .compiler import build
    from .compiler.targets import resolve_target
    from .runtime import load

    if not resolve_target(target).is_cuda and build_options.get("dot_kernels", True):
        build_options.setdefault("io_layout", "NHWC")
    art = build(program, workdir, target=target, boundary="int", **build_options)
    return load(art.library).time(repeat=repeat, warmup=3, resident=True)["median_ms"]


def measure_layer_latency(graph: FloatGraph, bits: Iterable[int] = (4, 8), target: str = "x86",
                          repeat: int = 30, progress: bool = True) -> dict[str, dict[int, float]]:
    """Median latency (ms) of every conv/linear layer of `graph` at each bit width, on `target`."""
    from .compiler.targets import resolve_target

    preset = resolve_target(target)
    where = preset.describe()
    if not preset.is_cuda:  # a CPU layer's time depends on how many threads run it
        from .threads import pool_threads

        where = {**where, "threads": pool_threads()}
    tkey = json.dumps(where, sort_keys=True)
    path = cache_path()
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        import warnings

        warnings.warn(f"latency cache {path} is corrupt; starting a new one", stacklevel=2)
        cache = {}
    layers = [op for op in graph.ops if op.kind in ("conv2d", "linear")]
    bits = list(bits)
    todo = len(layers) * len(bits)
    out: dict[str, dict[int, float]] = {}
    done = 0
    with tempfile.TemporaryDirectory(prefix="intforge-lat-") as tmp:
        for op in layers:
            in_shape = tuple(graph.shapes[op.inputs[0]])
            out_shape = tuple(graph.shapes[op.output])
            out[op.name] = {}
            for b in bits:
                key = _signature(op, in_shape, b, tkey)
                if key not in cache:
                    cache[key] = time_layer_program(layer_program(op, in_shape, out_shape, b), Path(tmp) / f"l{done}",
                                                    preset, repeat)
                out[op.name][b] = float(cache[key])
                done += 1
                if progress:
                    print(f"\r  latency: {done}/{todo} layer x bits measured", end="", flush=True)
    if progress:
        print()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache))
    return out
