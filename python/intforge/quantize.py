"""Post-training quantization: a float graph plus calibrated ranges becomes an integer program.

Weights are symmetric per output channel; activations have static symmetric scales, unsigned after a
ReLU/ReLU6. An activation that directly follows a conv2d / linear / add is fused into that op's
saturating clamp, so it costs nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import dyadic, nonlinear
from .calibrate import hessian_key
from .capture import FloatGraph, FloatOp, torch_op
from .dyadic import int_range
from .errors import QuantizationError, UnsupportedOpError
from .program import IntegerProgram, IntOp, QTensor

ACC_LIMIT = (1 << 31) - 1
SUPPORTED_BITS = (4, 8)
#: Ops whose output has the bits and scale of their input.
PASS_THROUGH = ("max_pool2d", "reshape", "transpose", "select", "relu", "clamp", "avg_pool2d", "pad")


#: A tensor gets a power-of-two step per channel (`channel_exponents`) where its widest channel's range is
#: at least this many times its median channel's.
OUTLIER_RATIO = 4.0
#: The largest channel exponent (also held to what a LayerNorm reading the tensor takes).
MAX_CHANNEL_EXP = 12


def channel_exponents(absmax: np.ndarray, limit: int = MAX_CHANNEL_EXP) -> tuple[int, ...] | None:
    """Exponents k_c >= 0 for a tensor whose channels' ranges differ widely: a transformer's residual stream,
    where a few channels reach 100x the rest (BERT's FFN outputs: 194 against a 99th percentile of 0.67),
    and one 8-bit step for the tensor rounds the other channels to a few steps or to 0. The tensor's scale
    holds the median channel in 127 steps, and channel c has the step scale * 2^k_c, the smallest such that
    holds its range (up to `limit`). Powers of two keep a LayerNorm's integer sums exact: it shifts each
    channel to the finest step first. None where the widest channel is within OUTLIER_RATIO of the median."""
    a = np.asarray(absmax, dtype=np.float64)
    med = float(np.median(a))
    if not med > 0 or float(a.max()) < OUTLIER_RATIO * med:
        return None
    k = np.clip(np.ceil(np.log2(np.maximum(a / med, 1.0)) - 1e-9), 0, limit)
    return tuple(int(v) for v in k)


@dataclass
class QuantConfig:
    """The quantization scheme: a default bit width and optional per-layer bits (from a plan).

    A layer at b bits has b-bit weights (symmetric per channel) and b-bit input activations, except that
    with `int4_input_bits=8` a 4-bit layer reads 8-bit inputs (W4A8: 4-bit weights, which halve the
    weight bytes, on activations kept at 8 bits; transformers need it, as 4-bit inputs to any of
    MiniLM's linears cost its sentence embeddings most of their cosine to float). Tensors feeding
    residual adds, concats and the model's outputs stay 8-bit.
    """

    bits: int = 8
    layer_bits: dict[str, int] = field(default_factory=dict)
    # the input activations' bits of a 4-bit layer: 4 (W4A4, HAWQ-V3's scheme) or 8 (W4A8)
    int4_input_bits: int = 4
    # how a 4-bit layer's weight channels choose their step (`quantize_weight`): "max", "mse" or "output"
    # ("output": by the error on calibration inputs, attention's query and key projections unclipped; the
    # best of the three on MiniLM and MNIST, 2026-12-06)
    int4_clip: str = "output"
    # how a 4-bit layer's weights round to its channel steps (`quantize_weight`'s, whatever the clip chose):
    # "nearest", or "gptq": column by column, each column's rounding error spread over the columns not yet
    # rounded by the calibration inputs' second moments (`gptq_round`: linears, and groups-1 convs on their
    # window patches; grouped and depthwise convs round to nearest)
    int4_rounding: str = "nearest"
    # conv requantizes at shift 24 where every channel's multiplier keeps 12 bits there
    # (`dyadic.conv_multipliers`: x86's epilogue then runs on 32-bit lanes); False keeps 24+ bits
    short_requant: bool = True

    def __post_init__(self) -> None:
        for name, b in [("bits", self.bits), *self.layer_bits.items()]:
            if b not in SUPPORTED_BITS:
                raise QuantizationError(f"bit width of {name!r} must be one of {SUPPORTED_BITS}, got {b}")
        if self.int4_input_bits not in SUPPORTED_BITS:
            raise QuantizationError(f"int4_input_bits (the inputs of a 4-bit layer) must be 4 or 8, got "
                                    f"{self.int4_input_bits}")
        if self.int4_clip not in WEIGHT_CLIPS:
            raise QuantizationError(f"int4_clip must be one of {WEIGHT_CLIPS}, got {self.int4_clip!r}")
        if self.int4_rounding not in WEIGHT_ROUNDINGS:
            raise QuantizationError(f"int4_rounding must be one of {WEIGHT_ROUNDINGS}, got {self.int4_rounding!r}")

    def bits_of(self, layer: str) -> int:
        return int(self.layer_bits.get(layer, self.bits))

    def input_bits_of(self, layer: str) -> int:
        """The bits of the input activations a conv/linear reads: its own, or 8 where a 4-bit layer reads
        8-bit inputs (`int4_input_bits`)."""
        bits = self.bits_of(layer)
        return self.int4_input_bits if bits == 4 else bits


def _scale(lo: float, hi: float, bits: int, signed: bool) -> float:
    qmax = int_range(bits, signed)[1]
    amax = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    return float(amax / qmax) if amax > 0 else 1.0


#: How a weight channel's step is chosen (`quantize_weight`).
WEIGHT_CLIPS = ("max", "mse", "output")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
#: The clipping ranges the "mse" choice tries, as fractions of a channel's largest magnitude.
CLIP_RATIOS = np.linspace(1.0, 0.5, 26)


def _to_steps(w: np.ndarray, steps: np.ndarray, qmax: int) -> np.ndarray:
    """`w` in whole steps (`steps` broadcast against it), rounded half to even and clipped to +-qmax: the one
    rounding of weights to integers (`quantize_weight`'s clip search and result, `gptq_round`'s columns)."""
    return np.clip(np.round(w / steps), -qmax, qmax)


def quantize_weight(w: np.ndarray, bits: int, clip: str = "max",
                    rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization: returns (q as int8, scales as float64).

    clip="max": a channel's step is its largest magnitude over qmax. clip="mse": the step of the
    clipping range (a CLIP_RATIOS fraction of that magnitude, the largest weights clipped) that gives
    the channel the least squared error; at 4 bits (7 steps a side) one outlier weight otherwise spends
    the steps every other weight needs. Neither wins everywhere: on all-MiniLM-L6-v2 at W4A8 (2026-12-06)
    "mse" took the FFN output linears from cosine 0.89 to 0.95 and every linear at 4 bits from 0.63 to
    0.75, but its attention projections (query, key, output) from 0.965 to 0.936. clip="output": the
    clipping range of least squared error in the layer's outputs on `rows` (a linear's calibration
    inputs, [R, K]), ||rows (w_c - q_c)||^2 a channel; without rows, as "mse". `QuantConfig.int4_clip`
    picks one for 4-bit layers ("output" by default, attention's query and key kept at "max")."""
    if clip not in WEIGHT_CLIPS:
        raise QuantizationError(f"weight clip must be one of {WEIGHT_CLIPS}, got {clip!r}")
    qmax = (1 << (bits - 1)) - 1
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if clip == "output" and (rows is None or rows.shape[-1] != flat.shape[1]):
        clip = "mse"
    if clip in ("mse", "output"):
        best = np.full(len(flat), np.inf)
        for ratio in CLIP_RATIOS:  # (ratio 1 first: a tie keeps the unclipped range)
            s = np.where(amax > 0, ratio * amax / qmax, 1.0)
            diff = _to_steps(flat, s[:, None], qmax) * s[:, None] - flat
            err = (diff ** 2).sum(axis=1) if clip == "mse" else ((rows @ diff.T) ** 2).sum(axis=0)
            better = err < best
            best, scale = np.where(better, err, best), np.where(better, s, scale)
    q = _to_steps(w, scale.reshape(-1, *([1] * (w.ndim - 1))), qmax).astype(np.int8)
    return q, scale


#: GPTQ's damping: the least fraction of the second moments' mean diagonal added to their diagonal.
GPTQ_DAMP = 0.01


def gptq_damping(columns: int, rows: int) -> float:
    """The damping for second moments of `columns` inputs taken over `rows` calibration rows: GPTQ's 1%
    where rows are many, else columns / rows (at most 1), a ridge that grows as the estimate gets noisier.
    With few rows GPTQ fits the calibration set's quirks: MNISTNet's 3136-input linear, on 500 digits,
    cut its calibration output error 106x and its held-out error 1.14x at 1% damping; at 100% the
    held-out error fell 1.53x (its 128-input last linear: 1.05x worse at 1%, 1.07x better at 26%)."""
    return min(1.0, max(GPTQ_DAMP, columns / max(rows, 1)))


def gptq_round(w: np.ndarray, scale: np.ndarray, hessian: np.ndarray, bits: int, damp: float = GPTQ_DAMP,
               block: int = 128, order: bool = True) -> np.ndarray:
    """A linear's weights [O, K] rounded to their channel steps `scale` [O] GPTQ's way (Frantar et al.,
    2022: optimal brain quantization one column at a time), as int8 values in [-qmax, qmax]: column k is
    rounded to nearest, and its rounding error moved onto the columns after it, weighted by the inverse
    of `hessian` (the calibration inputs' mean x x^T, [K, K]; its diagonal damped by `damp` of its mean),
    which lowers the layer's output error on inputs like those where rounding every weight to nearest
    only lowers each weight's own. Same steps, same integer contract: only which integers the weights get.
    With `order` the columns go largest input energy first (GPTQ's "act order"), blocks of `block`
    columns take their updates at once (its lazy batches); columns whose inputs are always 0 go to 0.
    Our own (numpy) implementation of the published algorithm. On all-MiniLM-L6-v2 with every linear at
    4 bits on 8-bit inputs (2026-12-06, 300 held-out snippets): embedding cosine to float 0.824 rounded to
    nearest, 0.886 by GPTQ in input order, 0.894 in act order; its 12 FFN linears alone 0.851, 0.905,
    0.911 (with `gptq_damping` and input-less columns at nearest, 0.899 and 0.915). On correlated random
    inputs the output error fell 39-41%; on a conv's patches of smooth images, 84%."""
    qmax = (1 << (bits - 1)) - 1
    W = np.array(w, np.float64).reshape(w.shape[0], -1)
    K = W.shape[1]
    H = np.array(hessian, np.float64)
    perm = np.argsort(-np.diag(H), kind="stable") if order else np.arange(K)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    # A column whose input was 0 on every calibration row takes no error and gives none: rounded to nearest.
    # (GPTQ's own code zeroes it, harmless with an LLM's millions of rows; a CNN classifier's ReLU units
    # idle on 500 calibration digits fired on held-out ones, and zeroed weights took MNISTNet's last
    # linear's held-out output error from 91 to 604 where nearest rounding left it at 91.)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += damp * float(np.mean(np.diag(H)))
    # the upper Cholesky factor of H^-1: row k says how column k's error spreads over the columns after it
    hinv = np.linalg.inv(H)
    U = np.linalg.cholesky((hinv + hinv.T) / 2).T
    s = np.asarray(scale, np.float64)
    Q = np.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, E1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1))
        for j in range(i2 - i1):
            q = _to_steps(W1[:, j], s, qmax)
            Q[:, i1 + j] = q
            err = (W1[:, j] - q * s) / U[i1 + j, i1 + j]
            W1[:, j:] -= np.outer(err, U[i1 + j, i1 + j:i2])
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    out = np.empty_like(Q)
    out[:, perm] = Q
    return out.astype(np.int8).reshape(w.shape)


def hessian_layers(graph: FloatGraph, config: QuantConfig) -> list[FloatOp]:
    """The layers whose weights `config` rounds by GPTQ (4-bit linears and groups-1 convs, with
    `int4_rounding="gptq"`): what calibration collects second moments for (`collect_ranges(..., hessians=)`)."""
    if config.int4_rounding != "gptq":
        return []
    return [op for op in graph.ops if config.bits_of(op.name) == 4
            and (op.kind == "linear" or (op.kind == "conv2d" and op.attrs["groups"] == 1))]


def attention_score_inputs(graph: FloatGraph) -> set[str]:
    """The linear layers whose outputs reach, through reshapes, transposes and scalings, a matmul of two
    activations that a softmax reads: attention's query and key projections. `int4_clip="output"` keeps
    their 4-bit weights unclipped: their largest outputs decide which keys win the softmax, which a
    squared error on the outputs understates (MiniLM's query and key linears at W4A8, 2026-12-06: cosine
    0.974 to float unclipped, 0.936 clipped by output error, while its value and output projections
    gained by clipping, 0.968 -> 0.977 and 0.979 -> 0.983)."""
    path = ("reshape", "transpose", "scale", "select")
    scores = {op.name for op in graph.ops if op.kind == "matmul"
              and any(u.kind == "softmax" for u in _readers_past(graph, op.output, (*path, "add")))}
    return {op.name for op in graph.ops if op.kind == "linear"
            and any(u.name in scores for u in _readers_past(graph, op.output, path))}


def int4_clips(graph: FloatGraph, clip: str) -> dict[str, str]:
    """How each conv/linear's weights are clipped at 4 bits under `QuantConfig.int4_clip=clip`: `clip`,
    but "max" for attention's query and key projections under "output" (`attention_score_inputs`). The
    quantizer and the planner's perturbations both read it."""
    keep = attention_score_inputs(graph) if clip == "output" else set()
    return {op.name: "max" if op.name in keep else clip for op in graph.ops if op.kind in ("conv2d", "linear")}


def _readers_past(graph: FloatGraph, tensor: str, through: tuple[str, ...], depth: int = 8) -> list[FloatOp]:
    """The ops that read `tensor`, looking past ops of the kinds `through` (at most `depth` deep)."""
    out = []
    for user in graph.users(tensor):
        if user.kind in through and depth:
            out += _readers_past(graph, user.output, through, depth - 1)
        else:
            out.append(user)
    return out


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


def _readers(entries) -> dict[str, list]:
    """Each tensor's consuming entries (op, inputs, output, fused activation), in order."""
    readers: dict[str, list] = {}
    for e in entries:
        for i in e[1]:
            readers.setdefault(i, []).append(e)
    return readers


def _tensor_bits(consumers: dict[str, list], outputs: list[str], config: QuantConfig) -> dict[str, int]:
    """Bits of each activation tensor: 4 only when every consumer wants 4-bit input.

    A conv/linear wants its layer's bits; adds, concats and model outputs want 8; pass-through ops
    (pooling, reshape, clamp) want what their own output gets.
    """
    memo: dict[str, int] = {}

    def need(entry) -> int:
        op = entry[0]
        if op.kind in ("conv2d", "linear"):
            return config.input_bits_of(op.name)
        if op.kind in PASS_THROUGH:
            return req(entry[2])
        return 8

    def req(t: str) -> int:
        if t not in memo:
            needs = [need(c) for c in consumers.get(t, [])] + ([8] if t in outputs else [])
            memo[t] = 4 if needs and all(n == 4 for n in needs) else 8
        return memo[t]

    return {t: req(t) for t in {*consumers, *outputs}}


def quantize(graph: FloatGraph, ranges: dict[str, tuple[float, float]],
             config: QuantConfig | None = None) -> IntegerProgram:
    """Turn a calibrated float graph into an integer program."""
    config = config or QuantConfig()
    known = {op.name for op in graph.ops if op.kind in ("conv2d", "linear")}
    unknown = sorted(set(config.layer_bits) - known)
    if unknown:
        raise QuantizationError(f"the bit plan names layers the model does not have: {unknown}. "
                                f"Quantizable layers: {sorted(known)}")
    fused = _fusions(graph)
    skip = {a.name for a in fused.values()}
    alias: dict[str, str] = {}  # float tensor -> program tensor (fused activations)
    entries = []
    for op in graph.ops:
        if op.name in skip:
            continue
        act = fused.get(op.name)
        out_name = act.output if act is not None else op.output
        if act is not None:
            alias[op.output] = out_name
            graph.shapes.setdefault(out_name, graph.shapes[op.output])
        entries.append((op, [alias.get(i, i) for i in op.inputs], out_name, act))
    outputs = [alias.get(o, o) for o in graph.outputs]
    readers = _readers(entries)
    tbits = _tensor_bits(readers, outputs, config)
    # tensor -> the kinds of the ops reading it (a linear: at its input's bits)
    consumers = {t: [f"linear{config.input_bits_of(e[0].name)}" if e[0].kind == "linear" else e[0].kind for e in es]
                 for t, es in readers.items()}
    channels = getattr(ranges, "channels", {})
    inputs = getattr(ranges, "rows", {})
    hessians = getattr(ranges, "hessians", {}) if config.int4_rounding == "gptq" else {}
    hessian_rows = getattr(ranges, "hessian_rows", {})
    clips = int4_clips(graph, config.int4_clip)

    # A constant read only by an add (a positional embedding) joins that add's rounding offset at the output's
    # step, unrounded to 8 bits of its own: its largest entries (position 0's) had set a step 20x the rest's.
    added = {op.output: op for op, _, out_name, _ in entries
             if op.kind == "constant" and consumers.get(out_name) == ["add"] and out_name not in outputs}

    def with_outlier_channels(t: QTensor, absmax: np.ndarray | None = None) -> QTensor:
        """`t`, or `t` with a step per channel (`channel_exponents`) where it has outlier channels and only
        adds, LayerNorms, elementwise tables and 8-bit linear layers read it: adds and LayerNorms rescale per
        channel, a table becomes a table a channel, and a linear layer takes 2^k_c into its weights' column c
        (SmoothQuant's migration, by powers of two)."""
        kinds = consumers.get(t.name, [])
        absmax = channels.get(t.name) if absmax is None else absmax
        if t.name in outputs or absmax is None or not kinds or t.bits != 8 or \
                any(k not in ("add", "layernorm", "linear8", "unary") for k in kinds):
            return t
        limit = MAX_CHANNEL_EXP
        if "layernorm" in kinds:
            limit = min(limit, nonlinear.layer_norm_max_exp(t.shape[-1], t.bits))
        exp = channel_exponents(absmax, limit)
        if exp is None:
            return t
        qmax = int_range(t.bits, True)[1]
        wide = QTensor(t.name, t.shape, float(np.median(absmax)) / qmax, t.bits, True, channel_exp=exp)
        tensors[t.name] = wide
        return wide

    tensors: dict[str, QTensor] = {}
    ops: list[IntOp] = []
    narrowed: dict[tuple[str, int], str] = {}  # (tensor, bits) -> requantized copy

    def rng(name: str) -> tuple[float, float]:
        if name not in ranges:
            raise QuantizationError(f"no calibration range for tensor {name!r}; was the model calibrated?")
        return ranges[name]

    def new_tensor(name: str, signed: bool, bits: int | None = None, range_of: str | None = None) -> QTensor:
        bits = bits if bits is not None else tbits.get(name, 8)
        lo, hi = rng(range_of or name)
        t = QTensor(name, tuple(graph.shapes[range_of or name]), _scale(lo, hi, bits, signed), bits, signed)
        tensors[name] = t
        return t

    def input_at(name: str, bits: int, op: FloatOp) -> str:
        """`name` at `bits` wide: itself, or a requantized copy made once and shared."""
        src = tensors[name]
        if src.bits == bits:
            return name
        key = (name, bits)
        if key not in narrowed:
            out = new_tensor(f"{name}.int{bits}", src.signed, bits, range_of=name)
            ops.append(_scalar_requantize("requantize", f"{op.name}.input_int{bits}", [name], out,
                                          src.scale / out.scale, op.source))
            narrowed[key] = out.name
        return narrowed[key]

    for name in graph.inputs:
        spec = graph.index_inputs.get(name)
        if spec is not None:  # token ids, a mask: integers read as themselves
            tensors[name] = QTensor(name, tuple(graph.shapes[name]), 1.0, 8, True, index_dtype=spec["dtype"],
                                    index_range=(int(spec["lo"]), int(spec["hi"])))
            continue
        lo, _ = rng(name)
        new_tensor(name, signed=lo < 0)

    for op, ins, out_name, act in entries:
        if out_name in added:
            continue  # (the add that reads it takes its value)
        constant = next((added[i].params["value"] for i in ins if i in added), None)
        ins = [i for i in ins if i not in added]
        in_ts = [tensors[i] for i in ins]
        unsigned = act is not None and act.attrs.get("lo") is not None and act.attrs["lo"] >= 0

        if op.kind in ("conv2d", "linear"):
            bits = config.bits_of(op.name)
            source = ins[0]  # (calibration kept rows of it: `Ranges.rows`)
            ins = [input_at(ins[0], config.input_bits_of(op.name), op)]
            out = new_tensor(out_name, signed=not unsigned)
            if op.kind == "linear" and act is None:
                out = with_outlier_channels(out)
            ops.append(_quantize_matmul_like(op, tensors[ins[0]], out, act, bits, config.short_requant,
                                             clips[op.name] if bits == 4 else "max",
                                             inputs.get(source), hessians.get(hessian_key(op)) if bits == 4 else None,
                                             hessian_rows.get(hessian_key(op), 0)))
            ops[-1].inputs = ins
        elif op.kind == "add":
            if len(in_ts) == 2 and in_ts[0].shape != in_ts[1].shape:
                raise UnsupportedOpError(f"add of shapes {in_ts[0].shape} and {in_ts[1].shape} in '{op.name}' "
                                         f"(broadcasting) is not supported\n  at {op.source}")
            out = new_tensor(out_name, signed=not unsigned)
            if act is None:
                out = with_outlier_channels(out)
            lo, hi = _act_bounds(act, out)
            ops.append(_quantize_add(op, ins, in_ts, out, lo, hi, constant))
        elif op.kind == "concat":
            out = new_tensor(out_name, signed=any(t.signed for t in in_ts))
            pairs = [dyadic.quantize_multiplier(t.scale / out.scale) for t in in_ts]
            ops.append(IntOp("concat", op.name, ins, out_name,
                             {"axis": op.attrs["axis"], "qmin": out.qmin, "qmax": out.qmax},
                             {"multipliers": np.array([p[0] for p in pairs], np.int64),
                              "shifts": np.array([p[1] for p in pairs], np.int64)}, op.source))
        elif op.kind in PASS_THROUGH:
            src = in_ts[0]
            out = QTensor(out_name, tuple(graph.shapes[out_name]), src.scale, src.bits, src.signed)
            tensors[out_name] = out
            if op.kind in ("relu", "clamp"):
                lo, hi = _act_bounds(op, out)
                ops.append(IntOp("clamp", op.name, ins, out_name, {"lo": lo, "hi": hi}, {}, op.source))
            elif op.kind == "avg_pool2d":
                ops.append(_quantize_avg_pool(op, src, out))
                ops[-1].inputs = ins
            else:
                ops.append(IntOp(op.kind, op.name, ins, out_name, dict(op.attrs), {}, op.source))
        elif op.kind == "scale":  # x * c, c > 0: a requantize from the input's scale to the output's
            out = new_tensor(out_name, signed=in_ts[0].signed)
            ops.append(_scalar_requantize("requantize", op.name, ins, out,
                                          op.attrs["factor"] * in_ts[0].scale / out.scale, op.source))
        elif op.kind == "constant":
            out = new_tensor(out_name, signed=rng(out_name)[0] < 0)
            q = dyadic.round_to_steps(np.broadcast_to(op.params["value"], out.shape), out.scale, out.qmin, out.qmax,
                                      out.dtype)
            ops.append(IntOp("constant", op.name, [], out_name, {}, {"value": q}, op.source))
        elif op.kind == "matmul":
            out = new_tensor(out_name, signed=rng(out_name)[0] < 0)
            ops.append(_scalar_requantize("matmul", op.name, ins, out,
                                          op.attrs["alpha"] * in_ts[0].scale * in_ts[1].scale / out.scale, op.source))
        elif op.kind == "embedding":  # the table's range over all its rows (any id may come), a step a column
            w = op.params["weight"]  # where some columns reach far beyond the rest
            amax = float(np.max(np.abs(w))) or 1.0
            out = QTensor(out_name, tuple(graph.shapes[out_name]), amax / 127.0, 8, True)
            tensors[out_name] = out
            out = with_outlier_channels(out, np.maximum(np.abs(w).max(axis=0).astype(np.float64), 1e-12))
            table = np.clip(np.floor(w.astype(np.float64) / out.steps + 0.5), -127, 127).astype(np.int8)
            ops.append(IntOp("embedding", op.name, ins, out_name, {}, {"table": table}, op.source))
        elif op.kind in ("unary", "softmax", "layernorm"):
            ops.append(_quantize_nonlinear(op, in_ts[0], out_name, new_tensor, rng, tensors, graph,
                                           with_outlier_channels))
            ops[-1].inputs = ins
        else:
            raise UnsupportedOpError(f"no quantization rule for op {op.kind!r} ('{op.name}')\n  at {op.source}")

    prog = IntegerProgram(list(graph.inputs), outputs, tensors, ops,
                          {"bits": config.bits, "layer_bits": {n: config.bits_of(n) for n in sorted(known)},
                           "int4_input_bits": config.int4_input_bits, "int4_clip": config.int4_clip,
                           "int4_rounding": config.int4_rounding})
    check_accumulators(prog)
    return prog


def _quantize_add(op: FloatOp, ins: list[str], in_ts: list[QTensor], out: QTensor, lo: int, hi: int,
                  constant: np.ndarray | None = None) -> IntOp:
    """A residual add: each input rescaled to the output's step by a multiplier over one shared shift; where
    an input or the output has outlier channels (`QTensor.channel_exp`), a multiplier a channel and a shift
    a channel (full 31-bit multipliers: the channels' ratios span up to 2^12). A `constant` term (a
    positional embedding) is the `offset` param: its value in output steps times 2^shift, rounded once."""
    reals = [np.asarray(t.steps, np.float64) / np.asarray(out.steps, np.float64) for t in in_ts]
    if all(r.ndim == 0 for r in reals):
        bits = dyadic.ADD_MULTIPLIER_BITS if constant is None else dyadic.MULTIPLIER_BITS
        ms, shift = dyadic.shared_shift_multipliers([float(r) for r in reals], bits=bits)
        attrs = {"shift": shift, "qmin": lo, "qmax": hi}
        params = {"multipliers": np.array(ms, dtype=np.int64)}
    else:
        c = out.shape[-1]
        reals = [np.broadcast_to(r, (c,)) for r in reals]
        pairs = [dyadic.shared_shift_multipliers([float(r[j]) for r in reals]) for j in range(c)]
        shift = np.array([p[1] for p in pairs], dtype=np.int64)
        attrs = {"qmin": lo, "qmax": hi}
        params = {"multipliers": np.array([p[0] for p in pairs], dtype=np.int64).T.copy(), "shift": shift}
    if constant is not None:
        units = np.asarray(constant, np.float64) / np.asarray(out.steps, np.float64) * np.exp2(shift)
        if not np.all(np.abs(units) < 2.0 ** 60):
            raise QuantizationError(f"the constant added in '{op.name}' is too large for the output's scale "
                                    f"{out.scale:.3g}; calibrate on more representative data\n  at {op.source}")
        params["offset"] = np.floor(units + 0.5).astype(np.int64)
    return IntOp("add", op.name, ins, out.name, attrs, params, op.source)


def _quantize_matmul_like(op: FloatOp, x: QTensor, out: QTensor, act: FloatOp | None, wbits: int,
                          short_requant: bool = True, clip: str = "max", rows: np.ndarray | None = None,
                          hessian: np.ndarray | None = None, hessian_rows: int = 0) -> IntOp:
    w = op.params["weight"]
    k = int(np.prod(w.shape[1:]))  # (a conv's columns: its window patches', `calibrate.conv_patches`)
    if hessian is not None and (hessian.shape != (k, k) or op.attrs.get("groups", 1) != 1):
        hessian = None
    if x.channel_exp is not None:  # input channel c at step x.scale * 2^k_c: the 2^k_c joins the weights
        w = w * np.exp2(np.asarray(x.channel_exp, np.float64)).astype(np.float32)
        if rows is not None and rows.shape[-1] == w.shape[1]:  # (and leaves the inputs it multiplies)
            rows = rows * np.exp2(-np.asarray(x.channel_exp, np.float64))
        if hessian is not None:
            inv = np.exp2(-np.asarray(x.channel_exp, np.float64))
            hessian = hessian * inv[:, None] * inv[None, :]
    qw, sw = quantize_weight(w, wbits, clip, rows if op.kind == "linear" else None)
    if hessian is not None:
        qw = gptq_round(w, sw, hessian, wbits,
                        gptq_damping(k, hessian_rows) if hessian_rows else GPTQ_DAMP)
    acc_scale = x.scale * sw
    bias = np.round(op.params["bias"].astype(np.float64) / acc_scale)
    if np.any(np.abs(bias) > ACC_LIMIT):
        worst = int(np.argmax(np.abs(bias)))
        raise QuantizationError(
            f"the bias of layer '{op.name}' (channel {worst}) does not fit int32 at scale "
            f"{acc_scale[worst]:.3g}; its input scale is too small for its bias. Calibrate on more "
            f"representative data.\n  at {op.source}"
        )
    m, n = dyadic.layer_multipliers(op.kind, acc_scale / out.steps, short=short_requant)
    lo, hi = _act_bounds(act, out)
    attrs = {"qmin": lo, "qmax": hi, "weight_bits": wbits}
    if op.kind == "conv2d":
        attrs.update({k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")})
        if op.attrs.get("folded_bn"):
            attrs["folded_bn"] = op.attrs["folded_bn"]
    return IntOp(op.kind, op.name, [x.name], out.name, attrs,
                 {"weight": qw, "bias": bias.astype(np.int32), "multiplier": m, "shift": n,
                  "weight_scale": sw}, op.source)


def _scalar_requantize(kind: str, name: str, ins: list[str], out: QTensor, real: float, source: str) -> IntOp:
    """An op whose result is requantized to `out` by one dyadic multiplier for the tensor (a requantize,
    a matmul of two activations): `real` = the input steps' product over the output's step."""
    m, n = dyadic.quantize_multiplier(real)
    return IntOp(kind, name, ins, out.name, {"shift": n, "qmin": out.qmin, "qmax": out.qmax},
                 {"multiplier": np.array(m, np.int64)}, source)


def _quantize_nonlinear(op: FloatOp, x: QTensor, out_name: str, new_tensor, rng, tensors: dict[str, QTensor],
                        graph: FloatGraph, with_outlier_channels) -> IntOp:
    """An elementwise function as a table, softmax, or LayerNorm (`intforge.nonlinear`)."""
    if op.kind == "softmax":  # probabilities: uint8 at 1/Q, Q from the largest one calibration saw
        q = nonlinear.softmax_q(rng(out_name)[1])
        out = QTensor(out_name, tuple(graph.shapes[out_name]), 1.0 / q, 8, False)
        tensors[out_name] = out
        mask = {"mask": op.attrs["mask"]} if op.attrs.get("mask") else {}
        return IntOp("softmax", op.name, [x.name], out_name, {"q": q, **mask},
                     {"table": nonlinear.softmax_table(x.scale, x.bits)}, op.source)
    if op.kind == "layernorm":  # (outlier channels in the output: their steps in the per-channel mul / add)
        out = with_outlier_channels(new_tensor(out_name, signed=True))
        widen = max(x.channel_exp) if x.channel_exp is not None else 0
        p = nonlinear.layer_norm_params(x.shape[-1], x.scale, x.bits + widen, x.signed, op.params["weight"],
                                        op.params["bias"], op.attrs["eps"], out.steps, op.name)
        params = {"mul": p["mul"], "add": p["add"]}
        if x.channel_exp is not None:  # outlier channels: each shifted to the finest step first
            params["in_mul"] = np.left_shift(np.int64(1), np.asarray(x.channel_exp, np.int64))
        return IntOp("layernorm", op.name, [x.name], out_name,
                     {"eps_term": p["eps_term"], "shift": p["shift"],
                      "qmin": out.qmin, "qmax": out.qmax}, params, op.source)
    out = with_outlier_channels(new_tensor(out_name, signed=rng(out_name)[0] < 0))

    def fn(v: np.ndarray) -> np.ndarray:
        return torch_op("unary")(op, torch.from_numpy(v)).numpy()

    # (outlier channels in the input or the output: a table a channel)
    table = nonlinear.unary_table(fn, x.steps, x.bits, x.signed, out.steps, out.qmin, out.qmax, out.dtype)
    table, row_of_channel = nonlinear.distinct_rows(table)
    params = {"table": table} if row_of_channel is None else {"table": table, "row_of_channel": row_of_channel}
    return IntOp("lut", op.name, [x.name], out_name, {"fn": op.attrs["fn"], "in_qmin": x.qmin}, params, op.source)


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
        if not op.inputs:  # a constant
            continue
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
        elif op.kind == "matmul":
            b = program.tensors[op.inputs[1]]
            k = x.shape[-1]
            if k * xmax * max(abs(b.qmin), abs(b.qmax)) > ACC_LIMIT:
                raise QuantizationError(f"matmul '{op.name}' can overflow its int32 accumulator: reduction length {k} "
                                        f"of {x.dtype} by {b.dtype}\n  at {op.source}")
        elif op.kind == "avg_pool2d":
            kh, kw = op.attrs["kernel"]
            if kh * kw * xmax > ACC_LIMIT:
                raise QuantizationError(f"pooling window of '{op.name}' ({kh}x{kw}) can overflow int32")
