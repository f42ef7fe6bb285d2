"""Post-training quantization: a float graph plus calibrated ranges becomes an integer program.

Weights are symmetric per output channel; activations have static symmetric scales, unsigned after a
ReLU/ReLU6. An activation that directly follows a conv2d / linear / add is fused into that op's
saturating clamp, so it costs nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dyadic
from .capture import FloatGraph, FloatOp
from .dyadic import int_range
from .errors import QuantizationError, UnsupportedOpError
from .program import IntegerProgram, IntOp, QTensor

ACC_LIMIT = (1 << 31) - 1


@dataclass
class QuantConfig:
    """The quantization scheme. Bits are per model here; per-layer bits come from a plan."""

    weight_bits: int = 8
    act_bits: int = 8

    def __post_init__(self) -> None:
        for what, b in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if b not in (4, 8):
                raise QuantizationError(f"{what} must be 4 or 8, got {b}")
        if self.act_bits != 8 or self.weight_bits != 8:
            raise QuantizationError(
                "INT4 layers arrive with mixed-precision planning; this build compiles INT8 only "
                "(weight_bits=8, act_bits=8)."
            )


def _scale(lo: float, hi: float, bits: int, signed: bool) -> float:
    qmax = int_range(bits, signed)[1]
    amax = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    return float(amax / qmax) if amax > 0 else 1.0


def quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization: returns (q as int8, scales as float64)."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax).astype(np.int8)
    return q, scale


def _fusions(graph: FloatGraph) -> dict[str, FloatOp]:
    """Map producer op name -> activation op fused into it (single user, not a graph output)."""
    fused = {}
    for op in graph.ops:
        if op.kind not in ("conv2d", "linear", "add") or op.output in graph.outputs:
            continue
        users = graph.users(op.output)
        if len(users) == 1 and users[0].kind in ("relu", "clamp"):
            fused[op.name] = users[0]
    return fused


def _act_bounds(act: FloatOp | None, out: QTensor) -> tuple[int, int]:
    """Integer clamp bounds of an output tensor after an optional fused activation."""
    lo, hi = out.qmin, out.qmax
    if act is not None:
        if act.attrs.get("lo") is not None:
            lo = max(lo, min(hi, int(round(act.attrs["lo"] / out.scale))))
        if act.attrs.get("hi") is not None:
            hi = min(hi, max(lo, int(round(act.attrs["hi"] / out.scale))))
    return lo, hi


def quantize(graph: FloatGraph, ranges: dict[str, tuple[float, float]],
             config: QuantConfig | None = None) -> IntegerProgram:
    """Turn a calibrated float graph into an integer program."""
    config = config or QuantConfig()
    fused = _fusions(graph)
    skip = {a.name for a in fused.values()}
    alias: dict[str, str] = {}  # float tensor -> program tensor (fused activations)
    tensors: dict[str, QTensor] = {}
    ops: list[IntOp] = []
    bits = config.act_bits

    def rng(name: str) -> tuple[float, float]:
        if name not in ranges:
            raise QuantizationError(f"no calibration range for tensor {name!r}; was the model calibrated?")
        return ranges[name]

    def new_tensor(name: str, signed: bool, scale: float | None = None) -> QTensor:
        lo, hi = rng(name)
        t = QTensor(name, tuple(graph.shapes[name]), scale if scale is not None else _scale(lo, hi, bits, signed),
                    bits, signed)
        tensors[name] = t
        return t

    for name in graph.inputs:
        lo, _ = rng(name)
        new_tensor(name, signed=lo < 0)

    for op in graph.ops:
        if op.name in skip:
            continue
        ins = [alias.get(i, i) for i in op.inputs]
        in_ts = [tensors[i] for i in ins]
        act = fused.get(op.name)
        out_name = act.output if act is not None else op.output
        if act is not None:
            alias[op.output] = out_name
            graph.shapes.setdefault(out_name, graph.shapes[op.output])
        unsigned = act is not None and act.attrs.get("lo") is not None and act.attrs["lo"] >= 0

        if op.kind in ("conv2d", "linear"):
            out = new_tensor(out_name, signed=not unsigned)
            ops.append(_quantize_matmul_like(op, in_ts[0], out, act, config.weight_bits))
            ops[-1].inputs = ins
            ops[-1].output = out_name
        elif op.kind == "add":
            if in_ts[0].shape != in_ts[1].shape:
                raise UnsupportedOpError(f"add of shapes {in_ts[0].shape} and {in_ts[1].shape} in '{op.name}' "
                                         f"(broadcasting) is not supported\n  at {op.source}")
            out = new_tensor(out_name, signed=not unsigned)
            ms, shift = dyadic.shared_shift_multipliers([t.scale / out.scale for t in in_ts])
            lo, hi = _act_bounds(act, out)
            ops.append(IntOp("add", op.name, ins, out_name, {"shift": shift, "qmin": lo, "qmax": hi},
                             {"multipliers": np.array(ms, dtype=np.int64)}, op.source))
        elif op.kind == "concat":
            out = new_tensor(out_name, signed=any(t.signed for t in in_ts))
            pairs = [dyadic.quantize_multiplier(t.scale / out.scale) for t in in_ts]
            ops.append(IntOp("concat", op.name, ins, out_name,
                             {"axis": op.attrs["axis"], "qmin": out.qmin, "qmax": out.qmax},
                             {"multipliers": np.array([p[0] for p in pairs], np.int64),
                              "shifts": np.array([p[1] for p in pairs], np.int64)}, op.source))
        elif op.kind in ("relu", "clamp"):
            src = in_ts[0]
            out = QTensor(out_name, tuple(graph.shapes[out_name]), src.scale, src.bits, src.signed)
            tensors[out_name] = out
            lo, hi = _act_bounds(op, out)
            ops.append(IntOp("clamp", op.name, ins, out_name, {"lo": lo, "hi": hi}, {}, op.source))
        elif op.kind in ("max_pool2d", "reshape"):
            src = in_ts[0]
            tensors[out_name] = QTensor(out_name, tuple(graph.shapes[out_name]), src.scale, src.bits, src.signed)
            ops.append(IntOp(op.kind, op.name, ins, out_name, dict(op.attrs), {}, op.source))
        elif op.kind == "avg_pool2d":
            src = in_ts[0]
            out = QTensor(out_name, tuple(graph.shapes[out_name]), src.scale, src.bits, src.signed)
            tensors[out_name] = out
            ops.append(_quantize_avg_pool(op, src, out))
        else:
            raise UnsupportedOpError(f"no quantization rule for op {op.kind!r} ('{op.name}')\n  at {op.source}")

    outputs = [alias.get(o, o) for o in graph.outputs]
    prog = IntegerProgram(list(graph.inputs), outputs, tensors, ops,
                          {"weight_bits": config.weight_bits, "act_bits": config.act_bits})
    check_accumulators(prog)
    return prog


def _quantize_matmul_like(op: FloatOp, x: QTensor, out: QTensor, act: FloatOp | None, wbits: int) -> IntOp:
    w = op.params["weight"]
    qw, sw = quantize_weight(w, wbits)
    acc_scale = x.scale * sw
    bias = np.round(op.params["bias"].astype(np.float64) / acc_scale)
    if np.any(np.abs(bias) > ACC_LIMIT):
        worst = int(np.argmax(np.abs(bias)))
        raise QuantizationError(
            f"the bias of layer '{op.name}' (channel {worst}) does not fit int32 at scale "
            f"{acc_scale[worst]:.3g}; its input scale is too small for its bias. Calibrate on more "
            f"representative data.\n  at {op.source}"
        )
    m, n = dyadic.quantize_multipliers(acc_scale / out.scale)
    lo, hi = _act_bounds(act, out)
    attrs = {"qmin": lo, "qmax": hi, "weight_bits": wbits}
    if op.kind == "conv2d":
        attrs.update({k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")})
        if op.attrs.get("folded_bn"):
            attrs["folded_bn"] = op.attrs["folded_bn"]
    return IntOp(op.kind, op.name, list(op.inputs), out.name, attrs,
                 {"weight": qw, "bias": bias.astype(np.int32), "multiplier": m, "shift": n,
                  "weight_scale": sw}, op.source)


def _quantize_avg_pool(op: FloatOp, x: QTensor, out: QTensor) -> IntOp:
    a = op.attrs
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    _, _, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    if a.get("divisor_override"):
        count = np.full((ho, wo), float(a["divisor_override"]))
    elif a["count_include_pad"]:
        count = np.full((ho, wo), float(kh * kw))
    else:
        ys = np.arange(ho) * sh - ph
        xs = np.arange(wo) * sw - pw
        ch = np.minimum(ys + kh, h) - np.maximum(ys, 0)
        cw = np.minimum(xs + kw, w) - np.maximum(xs, 0)
        count = np.outer(ch, cw).astype(np.float64)
    reals = (x.scale / out.scale) / count
    ms, shift = dyadic.shared_shift_multipliers(list(reals.ravel()))
    return IntOp("avg_pool2d", op.name, list(op.inputs), out.name,
                 {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "shift": shift,
                  "qmin": out.qmin, "qmax": out.qmax},
                 {"multiplier": np.array(ms, np.int64).reshape(ho, wo)}, op.source)


def check_accumulators(program: IntegerProgram) -> None:
    """Prove every int32 accumulator cannot overflow: K * max|x| * max|w| + max|bias| < 2^31."""
    for op in program.ops:
        x = program.tensors[op.inputs[0]]
        xmax = max(abs(x.qmin), abs(x.qmax))
        if op.kind in ("conv2d", "linear"):
            w = op.params["weight"].astype(np.int64)
            k = int(np.prod(w.shape[1:]))
            # Per-channel bound: sum of |w| over the reduction, times the largest input magnitude.
            bound = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1) * xmax + np.abs(op.params["bias"].astype(np.int64))
            if bound.max() > ACC_LIMIT:
                raise QuantizationError(
                    f"layer '{op.name}' can overflow its int32 accumulator: reduction length {k}, inputs up "
                    f"to {xmax}, worst channel bound {int(bound.max())} > 2^31-1. Split the layer or "
                    f"quantize its weights to fewer bits.\n  at {op.source}"
                )
        elif op.kind == "avg_pool2d":
            kh, kw = op.attrs["kernel"]
            if kh * kw * xmax > ACC_LIMIT:
                raise QuantizationError(f"pooling window of '{op.name}' ({kh}x{kw}) can overflow int32")
