"""Capture: torch.export a user's nn.Module into intforge's float graph, with BatchNorm folded.

The float graph is a short list of ops intforge knows how to quantize (conv2d, linear, add, pooling,
activations, reshape, concat). Each op carries a stable layer name (the module path, e.g.
``layer1.0.conv1``) that the calibration, the planner and the integer program share, and the line of
model code it came from, so errors can point at it.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CaptureError, UnsupportedOpError

SUPPORTED_OPS = (
    "conv2d (stride, padding, dilation, groups, depthwise), linear, BatchNorm (folded into the conv "
    "before it), ReLU, ReLU6 / hardtanh / clamp, residual add, max_pool2d, avg_pool2d, "
    "adaptive_avg_pool2d, mean over H,W, flatten / view / reshape / unflatten, permute / transpose, "
    "cat, zero padding (F.pad, ZeroPad2d), "
    "dropout (eval: identity), GELU / SiLU / sigmoid / tanh / hardswish / hardsigmoid / leaky_relu / ELU / "
    "mish / softplus (as integer tables), softmax and LayerNorm over the last axis, linear on (..., features), "
    "matmul / bmm of two activations, scaled_dot_product_attention without a mask (nn.MultiheadAttention), "
    "select / unbind, an activation times or divided by a positive number, embedding of integer token ids, "
    "attention masks (padding, causal) built from an integer mask input and added to scores before softmax"
)

#: Elementwise functions that become integer tables (`nonlinear.unary_table`): aten op -> (name, attrs
#: from the call's arguments after the input, with their defaults).
_UNARY = {
    "aten.gelu.default": ("gelu", (("approximate", "none"),)),
    "aten.silu.default": ("silu", ()), "aten.silu_.default": ("silu", ()),
    "aten.sigmoid.default": ("sigmoid", ()),
    "aten.tanh.default": ("tanh", ()),
    "aten.hardswish.default": ("hardswish", ()), "aten.hardswish_.default": ("hardswish", ()),
    "aten.hardsigmoid.default": ("hardsigmoid", ()),
    "aten.leaky_relu.default": ("leaky_relu", (("negative_slope", 0.01),)),
    "aten.leaky_relu_.default": ("leaky_relu", (("negative_slope", 0.01),)),
    "aten.elu.default": ("elu", (("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0))),
    "aten.mish.default": ("mish", ()),
    "aten.softplus.default": ("softplus", (("beta", 1.0), ("threshold", 20.0))),
}


@dataclass
class FloatOp:
    """One op of the float graph. `inputs` / `output` name tensors; `params` hold float32 numpy."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""


@dataclass
class FloatGraph:
    """A captured model: ops in execution order over named tensors with static shapes."""

    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    ops: list[FloatOp]
    #: Integer inputs (token ids, attention masks): name -> {"dtype", "lo", "hi", "role"}; they stay integers
    #: from the caller to the embedding or the softmax that reads them (no scale).
    index_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fixed_batch(self) -> bool:
        """Whether some op moves or merges the batch axis (attention's heads-and-batch reshapes), so the graph
        runs in float only at the example's batch size (calibration then feeds it batches of that size)."""
        for op in self.ops:
            if op.kind == "transpose" and op.attrs["axes"][0] != 0:
                return True
            if op.kind == "select" and op.attrs["axis"] == 0:
                return True
            if op.kind == "constant" and op.attrs.get("expanded"):
                return True
            if op.kind == "reshape" and self.shapes[op.output][0] != self.shapes[op.inputs[0]][0]:
                return True
        return False

    def producer(self, tensor: str) -> FloatOp | None:
        for op in self.ops:
            if op.output == tensor:
                return op
        return None

    def users(self, tensor: str) -> list[FloatOp]:
        return [op for op in self.ops if tensor in op.inputs]

    def layers(self) -> list[dict[str, Any]]:
        """Quantizable layers (conv2d / linear) with their stable names and sizes."""
        rows = []
        for op in self.ops:
            if op.kind in ("conv2d", "linear"):
                w = op.params["weight"]
                macs = int(np.prod(self.shapes[op.output])) * int(np.prod(w.shape[1:]))
                rows.append({"name": op.name, "kind": op.kind, "weight_shape": list(w.shape),
                             "params": int(w.size), "macs": macs})
        return rows


_IDENTITY = {"aten.dropout.default", "aten.clone.default", "aten.contiguous.default", "aten.alias.default",
             "aten.detach.default", "aten.feature_dropout.default", "aten.dropout_.default"}
_RESHAPE = {"aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
            "aten.squeeze.dim", "aten.squeeze.dims", "aten.unsqueeze.default", "aten.unflatten.int"}


def short_layer_name(name: str, width: int) -> str:
    """A layer name cut to `width` characters for a table, keeping its tail: a transformer's layer names
    differ at the end (`...layer.3.attention.self.query`)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def user_source(node: torch.fx.Node) -> str:
    """'file:line: code' of the innermost frame of model code (not torch's) that made `node`."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    torch_dir = os.path.dirname(torch.__file__)
    for path, line, code in reversed(frames):
        if not path.startswith(torch_dir):
            return f"{path}:{line}: {code.strip()}"
    if frames:
        path, line, code = frames[-1]
        return f"{path}:{line}: {code.strip()}"
    return "(no source location recorded)"


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def _pair(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v


def _eager_failure(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> str | None:
    """What the model raises when called on the inputs in eval mode (its mode restored after), or None."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the inputs' or the model's own
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}"
    finally:
        model.train(training)
    return None


def _export(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, tuple(example_inputs))
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        eager = _eager_failure(model, example_inputs)
        if eager is not None:  # not a capture problem: the model cannot take these inputs at all
            shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in example_inputs)
            raise CaptureError(
                f"{type(model).__name__} cannot run on example inputs of shape {shapes}: {eager}. Give inputs of "
                "the shape and dtype the model takes (the CLI's --input-shape, batch first), or data of that shape."
            ) from None
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}. "
            "intforge needs a model that torch.export.export(model, example_inputs) accepts: remove "
            "data-dependent Python control flow (if/for on tensor values), .item()/.tolist() calls and "
            "non-tensor outputs from forward(), or pass a saved torch.export program instead."
        ) from None


def capture(model: torch.nn.Module | torch.export.ExportedProgram,
            example_inputs: Sequence[torch.Tensor]) -> FloatGraph:
    """Export `model` with `example_inputs` and translate it into a FloatGraph (BatchNorm folded)."""
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
    else:
        if not isinstance(model, torch.nn.Module):
            raise CaptureError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
        model = model.eval()
        ep = _export(model, example_inputs)
    graph = _translate(ep)
    describe = getattr(model, "describe_layer", None)  # an ONNX import (onnx_import.py): the file's nodes
    if callable(describe):
        for op in graph.ops:
            op.source = describe(op.name)
        _rename_outputs(graph, getattr(model, "file_output_names", []))
    return graph


def _rename_outputs(graph: FloatGraph, names: list[str]) -> None:
    """The graph's outputs under the names an ONNX file gives them (`y`, not torch.export's `linear_1`),
    where such a name is an identifier no other tensor has (not the exporter's numbered `191`)."""
    for i, (old, new) in enumerate(zip(list(graph.outputs), names, strict=False)):
        taken = new in graph.shapes or old in graph.inputs or graph.outputs.count(old) > 1
        if not new.isidentifier() or new == old or taken:
            continue
        for op in graph.ops:
            op.inputs = [new if t == old else t for t in op.inputs]
            if op.output == old:
                op.output = new
        graph.shapes[new] = graph.shapes.pop(old)
        graph.outputs[i] = new


#: How an attention mask leaves keys out, by kind: (mask input [B, Sk] as bool, Sq, Sk) -> keys allowed,
#: broadcastable to the scores [B, ..., Sq, Sk]. "causal" needs no input.
MASK_KINDS = {
    "keys": lambda m, sq, sk: m[:, None, :],
    "causal": lambda m, sq, sk: np.tril(np.ones((sq, sk), bool), sk - sq)[None],
    "causal_keys": lambda m, sq, sk: m[:, None, :] & np.tril(np.ones((sq, sk), bool), sk - sq)[None],
}
#: An additive mask's blocked entries must be at most this (exp of it is 0 in float32).
_MASKED_BELOW = -1e4
_FOLD_SKIP = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default"}
#: Ops that give their input again, as another dtype, device or copy: token ids read through them are still
#: the ids (`_IndexValues.is_input`), and a constant read through them is still a constant (folded).
_CONVERSIONS = {"aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten._to_copy.default",
                "aten.clone.default", "aten.alias.default", "aten.detach.default"}
#: ...and a constant's copy (torch.as_tensor of a number inside forward, as the ONNX import's mask steps make).
_CONSTANT_COPIES = _CONVERSIONS | {"aten.lift_fresh_copy.default", "aten.lift_fresh.default"}


class _IndexValues:
    """The integer inputs of an exported program (token ids, attention masks), the nodes computed from them
    (a mask's broadcasts and compares), and constants folded where a node reads constants only (position
    ids, token types). intforge keeps integer inputs integer: an embedding gathers rows by them, and a mask
    is recognised by evaluating its nodes on sample masks (`classify_mask`), not by the ops that built it,
    which differ between library versions."""

    def __init__(self, ep: torch.export.ExportedProgram, consts: dict[str, torch.Tensor]) -> None:
        self.consts = consts
        self.inputs: dict[str, dict[str, Any]] = {}
        self.derived: set[str] = set()
        self.folded: set[str] = set()
        self._nodes = {n.name: n for n in ep.graph.nodes}

    def placeholder(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
            self.inputs[node.name] = {"dtype": str(val.dtype).removeprefix("torch."), "shape": list(val.shape),
                                      "lo": None, "hi": None, "role": None}
            self.derived.add(node.name)

    def input_name(self, n: torch.fx.Node) -> str:
        """The integer input that `n` is, through dtype conversions and copies."""
        while n.name not in self.inputs:
            n = n.args[0]
        return n.name

    def is_input(self, n: Any) -> bool:
        while isinstance(n, torch.fx.Node) and n.name not in self.inputs:
            if str(n.target) not in _CONVERSIONS:
                return False
            n = n.args[0]
        return isinstance(n, torch.fx.Node)

    def used_as(self, n: torch.fx.Node, role: str, lo: int, hi: int) -> None:
        spec = self.inputs[self.input_name(n)]
        if spec["role"] not in (None, role):
            raise UnsupportedOpError(f"integer input '{self.input_name(n)}' is used both as {spec['role']} and "
                                     f"as {role}; pass each as its own input")
        spec.update(role=role, lo=lo if spec["lo"] is None else max(lo, spec["lo"]),
                    hi=hi if spec["hi"] is None else min(hi, spec["hi"]))

    def visit(self, node: torch.fx.Node) -> bool:
        """Take `node` if it is computed from integer inputs and constants (derived) or from constants only
        (folded into `consts`); False leaves it to the op translations."""
        target = str(node.target)
        if target in _FOLD_SKIP:
            return True
        ins = [a for a in node.all_input_nodes]
        val = node.meta.get("val")
        if any(a.name in self.derived for a in ins):
            if all(a.name in self.derived or a.name in self.consts for a in ins):
                self.derived.add(node.name)
                return True
            return False
        if not isinstance(val, torch.Tensor) or not all(a.name in self.consts for a in ins):
            return False
        integer = [not v.dtype.is_floating_point for v in (self.consts[a.name] for a in ins)]
        if ins and val.dtype.is_floating_point and not any(integer) and target not in _CONSTANT_COPIES:
            return False  # float parameters stay parameters (a class token expanded keeps its own rule)
        self.consts[node.name] = self.value(node, {}).detach()
        self.folded.add(node.name)
        return True

    def value(self, node: torch.fx.Node, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """`node` evaluated from constants and the integer inputs in `feed`."""
        memo: dict[str, Any] = {}

        def ev(n: torch.fx.Node) -> Any:
            if n.name in self.consts:
                return self.consts[n.name]
            if n.name in feed:
                return feed[n.name]
            if n.name not in memo:
                args = torch.fx.node.map_arg(n.args, ev)
                kwargs = torch.fx.node.map_arg(n.kwargs, ev)
                with torch.no_grad():
                    memo[n.name] = n.target(*args, **kwargs)
            return memo[n.name]

        return ev(node)

    def _depends_on(self, node: torch.fx.Node) -> list[str]:
        seen, stack, found = set(), [node], []
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.name in self.inputs:
                found.append(n.name)
            stack.extend(n.all_input_nodes)
        return sorted(found)

    def classify_mask(self, mask: torch.fx.Node, scores_shape: tuple[int, ...], additive: bool,
                      node: torch.fx.Node) -> tuple[str, str | None]:
        """Which `MASK_KINDS` entry the mask node computes, by evaluating it on sample masks: ("keys" |
        "causal" | "causal_keys", the mask input), ("causal", None) without one, or ("none", None) for a mask
        that leaves every key in. Anything else is refused, naming the mask."""
        where = f"the attention mask added to the scores in '{_module_path(node) or node.name}' at {user_source(node)}"
        deps = self._depends_on(mask)
        if len(deps) > 1:
            raise UnsupportedOpError(f"{where} is computed from several integer inputs ({', '.join(deps)}); "
                                     "intforge takes a mask from one input of shape (batch, keys)")
        sq, sk = scores_shape[-2], scores_shape[-1]
        rng = np.random.default_rng(0)
        trials: list[np.ndarray | None] = [None]
        if deps:
            spec = self.inputs[deps[0]]
            if tuple(spec["shape"]) != (scores_shape[0], sk):
                raise UnsupportedOpError(f"{where} comes from input '{deps[0]}' of shape {tuple(spec['shape'])}; "
                                         f"intforge takes a mask of shape (batch, keys) = {(scores_shape[0], sk)}")
            trials = [np.ones(spec["shape"], bool)]
            for _ in range(4):
                m = rng.integers(0, 2, spec["shape"]).astype(bool)
                m[:, 0] = True
                trials.append(m)
        allowed = []
        for m in trials:
            feed = {deps[0]: torch.from_numpy(m.astype(spec["dtype"]))} if deps else {}
            v = self.value(mask, feed).detach().to(torch.float64 if additive else torch.bool).numpy()
            ok = (v == 0) if additive else v
            if additive and not np.all(v[~ok] <= _MASKED_BELOW):
                raise UnsupportedOpError(f"{where} has values other than 0 and large negatives (<= "
                                         f"{_MASKED_BELOW:g}): intforge takes masks that leave keys in or out, not "
                                         "biases (relative position or ALiBi biases are not supported)")
            allowed.append(np.broadcast_to(ok, scores_shape).reshape(scores_shape[0], -1, sq, sk))
        if all(a.all() for a in allowed):
            return "none", None
        for kind in (("causal",) if not deps else ("keys", "causal_keys")):
            want = [np.broadcast_to(MASK_KINDS[kind](m if m is not None else np.ones((1, sk), bool), sq, sk)[:, None],
                                    a.shape) for m, a in zip(trials, allowed, strict=True)]
            if all(np.array_equal(w, a) for w, a in zip(want, allowed, strict=True)):
                if deps:
                    self.used_as(self._nodes[deps[0]], "attention mask", 0, 1)
                return kind, deps[0] if deps else None
        raise UnsupportedOpError(f"{where} is neither a padding mask of keys nor causal (nor both); intforge "
                                 "supports those masks only")

    def is_mask(self, n: Any) -> bool:
        """Whether `n` is computed from integer inputs, or is a folded constant that looks like a mask (bool,
        or 0 and large negatives): what an attention mask is, to be classified (`classify_mask`)."""
        if not isinstance(n, torch.fx.Node):
            return False
        if n.name in self.derived:
            return True
        if n.name not in self.folded:
            return False
        v = self.consts[n.name]
        if v.dtype == torch.bool:
            return True
        return bool(v.dtype.is_floating_point and ((v == 0) | (v <= _MASKED_BELOW)).all() and (v != 0).any())

    def refuse(self, n: torch.fx.Node, masked: tuple | None, reader: torch.fx.Node | None) -> None:
        at = f"'{_module_path(reader) or reader.name}' ({reader.target}) at {user_source(reader)}" if reader else ""
        if masked is not None:
            raise UnsupportedOpError(f"scores plus an attention mask are read by {at}; intforge takes a mask "
                                     "added to the scores right before their softmax")
        deps = ", ".join(self._depends_on(n)) or n.name
        raise UnsupportedOpError(f"{at} reads a value computed from the integer input(s) {deps}; intforge takes "
                                 "integer inputs only as the token ids of an embedding (nn.Embedding) and as "
                                 "attention masks added to scores before softmax")

    def check_used(self) -> None:
        """Integer inputs nothing reads keep their dtype's range (the caller still passes them)."""
        for spec in self.inputs.values():
            if spec["role"] is None:
                info = np.iinfo(spec["dtype"]) if spec["dtype"] != "bool" else None
                spec.update(role="unused", lo=int(info.min) if info else 0, hi=int(info.max) if info else 1)


def _translate(ep: torch.export.ExportedProgram) -> FloatGraph:
    sig = ep.graph_signature
    consts: dict[str, torch.Tensor] = {}
    targets: dict[str, str] = {}  # placeholder -> the parameter's name in the model (`encoder.pos_embedding`)
    for spec in sig.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            src = ep.state_dict.get(spec.target)
            if src is None:
                src = ep.constants.get(spec.target)
            consts[spec.arg.name] = src
            targets[spec.arg.name] = str(spec.target)
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
    index = _IndexValues(ep, consts)  # integer inputs, what is computed from them, constants folded

    ops: list[FloatOp] = []
    masked: dict[str, tuple[str, str | None, str]] = {}  # scores + a mask -> (scores, mask input, mask kind)
    shapes: dict[str, tuple[int, ...]] = {}
    alias: dict[str, str] = {}  # tensors that are another tensor (identity ops, getitem)
    name_count: dict[str, int] = {}
    outputs: list[str] = []

    def tname(n: Any) -> str:
        if not isinstance(n, torch.fx.Node):
            raise TypeError
        if n.name in index.derived or n.name in masked:
            index.refuse(n, masked.get(n.name), reader)
        return alias.get(n.name, n.name)

    def const(n: Any, what: str, node: torch.fx.Node) -> np.ndarray:
        if isinstance(n, torch.fx.Node) and n.name in consts:
            return consts[n.name].detach().to(torch.float32).cpu().numpy().copy()
        raise UnsupportedOpError(
            f"{node.target} in layer '{_module_path(node) or node.name}' takes a computed {what}; intforge "
            f"needs it to be a parameter or constant.\n  at {user_source(node)}"
        )

    def constant(n: torch.fx.Node, shape: tuple[int, ...] | None) -> str:
        """A parameter read as an activation (a positional embedding added, a token concatenated): a
        `constant` op, made once, whose tensor has `shape` (the parameter broadcast) or the parameter's."""
        if n.name not in shapes:
            value = const(n, "value", n)
            if shape is not None and value.ndim > 1 and value.shape[0] > 1 and (value == value[:1]).all():
                # (added, and the same for every sample: token types folded at the example's batch, here or
                # by an ONNX exporter; one row, broadcast, so calibration may run other batch sizes)
                value = value[:1].copy()
            name = targets.get(n.name, n.name)
            ops.append(FloatOp("constant", name, [], n.name, {}, {"value": value}, f"(the model's parameter {name})"))
            shapes[n.name] = tuple(int(d) for d in (shape or value.shape))
        return n.name

    def layer_name(node: torch.fx.Node, kind: str, parametric: bool) -> str:
        path = _module_path(node)
        base = path if (parametric and path) else (f"{path}.{kind}" if path else node.name)
        k = name_count.get(base, 0)
        name_count[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    reader: torch.fx.Node | None = None
    for node in ep.graph.nodes:
        reader = node
        if node.op == "placeholder":
            if node.name in user_inputs:
                shapes[node.name] = tuple(int(s) for s in node.meta["val"].shape)
                index.placeholder(node)
            continue
        if node.op == "output":
            outs = node.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for o in outs:
                if not isinstance(o, torch.fx.Node):
                    raise UnsupportedOpError(f"model output {o!r} is not a tensor; return tensors only")
                outputs.append(tname(o))
            continue
        if node.op != "call_function":
            raise UnsupportedOpError(f"graph node {node.format_node()} is not supported")

        target = str(node.target)
        args = node.args
        src = user_source(node)
        val = node.meta.get("val")
        out_shape = tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None

        def emit(kind: str, inputs: list[str], attrs=None, params=None, parametric=False,
                 _node=node, _src=src, _shape=out_shape) -> None:
            ops.append(FloatOp(kind, layer_name(_node, kind, parametric), inputs, _node.name,
                               attrs or {}, params or {}, _src))
            shapes[_node.name] = _shape

        if target == "aten.embedding.default" and index.is_input(args[1]) and args[0].name in consts:
            table = const(args[0], "weight", node)
            index.used_as(args[1], "token ids", 0, table.shape[0] - 1)
            emit("embedding", [index.input_name(args[1])], {}, {"weight": table}, parametric=True)
            continue
        if index.visit(node):  # computed from integer inputs (a mask) or from constants only (folded)
            continue
        if node.target is operator.getitem:
            alias[node.name] = tname(args[0]) if args[1] == 0 else f"{tname(args[0])}[{args[1]}]"
            continue
        if target in _IDENTITY:
            alias[node.name] = tname(args[0])
            continue
        if target == "aten.conv2d.default":
            w = const(args[1], "weight", node)
            b = const(args[2], "bias", node) if len(args) > 2 and args[2] is not None else np.zeros(w.shape[0],
                                                                                                     np.float32)
            stride = _pair(args[3] if len(args) > 3 else 1)
            padding = _pair(args[4] if len(args) > 4 else 0)
            dilation = _pair(args[5] if len(args) > 5 else 1)
            groups = int(args[6]) if len(args) > 6 else 1
            emit("conv2d", [tname(args[0])], {"stride": stride, "padding": padding, "dilation": dilation,
                                              "groups": groups}, {"weight": w, "bias": b}, parametric=True)
        elif target in ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"):
            if target == "aten.batch_norm.default":
                x, gamma, beta, mean, var = args[:5]
                training, eps = bool(args[5]), float(args[7])
                if training:
                    raise UnsupportedOpError(f"BatchNorm in training mode at {src}; call model.eval() first")
            else:
                x, gamma, beta, mean, var = args[:5]
                eps = float(args[6])
            prev = ops[-1] if ops else None
            if prev is None or prev.kind != "conv2d" or prev.output != tname(x) or \
                    sum(1 for u in x.users) != 1:
                raise UnsupportedOpError(
                    f"BatchNorm '{_module_path(node)}' does not directly follow a convolution, so it cannot "
                    f"be folded; intforge supports BatchNorm only right after a conv2d.\n  at {src}"
                )
            c = prev.params["weight"].shape[0]
            g = const(gamma, "weight", node) if gamma is not None else np.ones(c, np.float32)
            bt = const(beta, "bias", node) if beta is not None else np.zeros(c, np.float32)
            mu, v = const(mean, "running_mean", node), const(var, "running_var", node)
            k = (g.astype(np.float64) / np.sqrt(v.astype(np.float64) + eps))
            prev.params["weight"] = (prev.params["weight"] * k.reshape(-1, 1, 1, 1)).astype(np.float32)
            prev.params["bias"] = ((prev.params["bias"] - mu) * k + bt).astype(np.float32)
            prev.attrs["folded_bn"] = _module_path(node)
            alias[node.name] = prev.output
        elif target == "aten.linear.default":
            w = const(args[1], "weight", node)
            b = const(args[2], "bias", node) if len(args) > 2 and args[2] is not None else np.zeros(w.shape[0],
                                                                                                     np.float32)
            if len(shapes.get(tname(args[0]), ())) < 2:
                raise UnsupportedOpError(f"linear on a {len(shapes[tname(args[0])])}-D input at {src}: inputs "
                                         "are (batch, ..., features)")
            emit("linear", [tname(args[0])], {}, {"weight": w, "bias": b}, parametric=True)
        elif target in ("aten.relu.default", "aten.relu_.default"):
            emit("relu", [tname(args[0])], {"lo": 0.0, "hi": None})
        elif target in ("aten.hardtanh.default", "aten.hardtanh_.default", "aten.clamp.default",
                        "aten.clamp_.default", "aten.relu6.default"):
            if target == "aten.relu6.default":
                lo, hi = 0.0, 6.0
            elif "hardtanh" in target:
                lo = float(args[1]) if len(args) > 1 else -1.0
                hi = float(args[2]) if len(args) > 2 else 1.0
            else:
                lo = None if len(args) < 2 or args[1] is None else float(args[1])
                hi = None if len(args) < 3 or args[2] is None else float(args[2])
            emit("relu" if lo == 0.0 else "clamp", [tname(args[0])], {"lo": lo, "hi": hi})
        elif target in ("aten.add.Tensor", "aten.add_.Tensor") and \
                any(index.is_mask(a) for a in args[:2]):
            # scores + an additive attention mask built from an integer input: the next op must be the
            # softmax, which then takes the mask itself (the integer softmax leaves masked keys out)
            m, x = (args[0], args[1]) if index.is_mask(args[0]) else (args[1], args[0])
            kind, mask_input = index.classify_mask(m, shapes[tname(x)], additive=True, node=node)
            if kind == "none":
                alias[node.name] = tname(x)
            else:
                masked[node.name] = (tname(x), mask_input, kind)
        elif target in ("aten.add.Tensor", "aten.add_.Tensor"):
            if not all(isinstance(a, torch.fx.Node) for a in args[:2]) or all(a.name in consts for a in args[:2]):
                raise UnsupportedOpError(f"add of a tensor and a number at {src}: intforge adds two activations (a "
                                         "residual connection) or an activation and a parameter (a positional "
                                         "embedding)")
            if float(node.kwargs.get("alpha", 1)) != 1.0:
                raise UnsupportedOpError(f"add with alpha != 1 at {src} is not supported")
            emit("add", [tname(a) if a.name not in consts else constant(a, out_shape) for a in args[:2]])
        elif target == "aten.expand.default" and isinstance(args[0], torch.fx.Node) and args[0].name in consts:
            # a parameter repeated over the batch (a ViT's class token): a constant of the example's batch, so
            # the float graph runs at that batch size only (FloatGraph.fixed_batch)
            value = np.broadcast_to(const(args[0], "value", node), out_shape).copy()
            ops.append(FloatOp("constant", layer_name(node, "constant", False), [], node.name, {"expanded": True},
                               {"value": value}, src))
            shapes[node.name] = out_shape
        elif target == "aten.max_pool2d.default":
            k = _pair(args[1])
            emit("max_pool2d", [tname(args[0])], {
                "kernel": k, "stride": _pair(args[2]) if len(args) > 2 and args[2] else k,
                "padding": _pair(args[3] if len(args) > 3 else 0), "dilation": _pair(args[4] if len(args) > 4 else 1),
                "ceil_mode": bool(args[5]) if len(args) > 5 else False})
        elif target == "aten.avg_pool2d.default":
            k = _pair(args[1])
            attrs = {"kernel": k, "stride": _pair(args[2]) if len(args) > 2 and args[2] else k,
                     "padding": _pair(args[3] if len(args) > 3 else 0),
                     "ceil_mode": bool(args[4]) if len(args) > 4 else False,
                     "count_include_pad": bool(args[5]) if len(args) > 5 else True,
                     "divisor_override": args[6] if len(args) > 6 else None}
            if attrs["ceil_mode"]:
                raise UnsupportedOpError(f"avg_pool2d with ceil_mode=True at {src} is not supported")
            emit("avg_pool2d", [tname(args[0])], attrs)
        elif target == "aten.adaptive_avg_pool2d.default":
            _, _, h, w = shapes[tname(args[0])]
            oh, ow = (_pair(args[1]) + [None])[:2]
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise UnsupportedOpError(
                    f"adaptive_avg_pool2d from {h}x{w} to {oh}x{ow} at {src}: only output sizes that divide "
                    "the input evenly are supported (e.g. (1, 1))")
            k = [h // oh, w // ow]
            emit("avg_pool2d", [tname(args[0])], {"kernel": k, "stride": k, "padding": [0, 0],
                                                  "ceil_mode": False, "count_include_pad": True,
                                                  "divisor_override": None})
        elif target == "aten.mean.dim":
            x = tname(args[0])
            dims = sorted(d % len(shapes[x]) for d in args[1])
            keep = bool(args[2]) if len(args) > 2 else bool(node.kwargs.get("keepdim", False))
            if len(shapes[x]) != 4 or dims != [2, 3]:
                raise UnsupportedOpError(f"mean over dims {list(args[1])} of a {len(shapes[x])}-D tensor at "
                                         f"{src}: only the spatial mean of NCHW (dims 2, 3) is supported")
            _, _, h, w = shapes[x]
            pooled = node.name if keep else f"{node.name}_pool"
            ops.append(FloatOp("avg_pool2d", layer_name(node, "mean", False), [x], pooled,
                               {"kernel": [h, w], "stride": [h, w], "padding": [0, 0], "ceil_mode": False,
                                "count_include_pad": True, "divisor_override": None}, {}, src))
            shapes[pooled] = (shapes[x][0], shapes[x][1], 1, 1)
            if not keep:
                emit("reshape", [pooled])
        elif target in _RESHAPE:
            emit("reshape", [tname(args[0])])
        elif target in ("aten.pad.default", "aten.constant_pad_nd.default"):
            x = tname(args[0])
            widths = [int(p) for p in args[1]]
            if target == "aten.pad.default":
                mode = args[2] if len(args) > 2 else node.kwargs.get("mode", "constant")
                value = args[3] if len(args) > 3 else node.kwargs.get("value")
            else:
                mode, value = "constant", args[2] if len(args) > 2 else node.kwargs.get("value", 0.0)
            if mode != "constant" or float(value or 0.0) != 0.0 or len(shapes[x]) != 4 or len(widths) not in (2, 4) \
                    or min(widths) < 0:
                raise UnsupportedOpError(
                    f"pad {widths} (mode {mode!r}, value {value}) of a {len(shapes[x])}-D tensor in layer "
                    f"'{_module_path(node) or node.name}' at {src}: intforge pads H and W of NCHW with zeros only "
                    "(no negative pads)")
            left, right, top, bottom = (widths + [0, 0])[:4]
            emit("pad", [x], {"pads": [top, left, bottom, right]})
        elif target in ("aten.permute.default", "aten.transpose.int", "aten.t.default"):
            x = tname(args[0])
            rank = len(shapes[x])
            if target == "aten.permute.default":
                axes = [int(d) % rank for d in args[1]]
            else:
                axes = list(range(rank))
                i, j = (int(args[1]) % rank, int(args[2]) % rank) if target == "aten.transpose.int" else (0, 1)
                axes[i], axes[j] = axes[j], axes[i]
            if axes == list(range(rank)):
                alias[node.name] = x
            else:
                emit("transpose", [x], {"axes": axes})
        elif target in ("aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar") and \
                sum(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args[:2]) == 1:
            x, c = (args[0], args[1]) if isinstance(args[1], (int, float)) else (args[1], args[0])
            if "div" in target and x is not args[0]:
                raise UnsupportedOpError(f"a number divided by a tensor at {src} is not supported")
            factor = float(c) if "mul" in target else 1.0 / float(c) if c else 0.0
            if not isinstance(x, torch.fx.Node) or x.name in consts or not factor > 0:
                raise UnsupportedOpError(f"{'multiplication' if 'mul' in target else 'division'} by {c} at {src}: "
                                         "intforge scales an activation by a positive number only")
            emit("scale", [tname(x)], {"factor": factor})
        elif target == "aten.select.int":
            x = tname(args[0])
            axis = int(args[1]) % len(shapes[x])
            emit("select", [x], {"axis": axis, "index": int(args[2]) % shapes[x][axis]})
        elif target == "aten.unbind.int":  # one select a part (getitem i reads `name[i]`, part 0 `name`)
            x = tname(args[0])
            axis = (int(args[1]) if len(args) > 1 else 0) % len(shapes[x])
            for i in range(shapes[x][axis]):
                out = node.name if i == 0 else f"{node.name}[{i}]"
                ops.append(FloatOp("select", layer_name(node, "select", False), [x], out, {"axis": axis, "index": i},
                                   {}, src))
                shapes[out] = tuple(d for j, d in enumerate(shapes[x]) if j != axis)
        elif target in ("aten.matmul.default", "aten.bmm.default"):
            if not all(isinstance(a, torch.fx.Node) and a.name not in consts for a in args[:2]):
                raise UnsupportedOpError(f"matmul with a constant operand at {src}: intforge multiplies two "
                                         "activations here (attention); use nn.Linear for a weight")
            a_shape, b_shape = shapes[tname(args[0])], shapes[tname(args[1])]
            if len(a_shape) != len(b_shape) or a_shape[:-2] != b_shape[:-2] or len(a_shape) < 2:
                raise UnsupportedOpError(f"matmul of shapes {a_shape} and {b_shape} at {src}: intforge multiplies "
                                         "activations of the same rank and leading dims (no broadcasting)")
            emit("matmul", [tname(args[0]), tname(args[1])], {"alpha": 1.0})
        elif target == "aten.scaled_dot_product_attention.default":
            q, k, v = (tname(a) for a in args[:3])
            mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
            causal = bool(args[5]) if len(args) > 5 else bool(node.kwargs.get("is_causal", False))
            scores_shape = (*shapes[q][:-1], shapes[k][-2])
            mask_kind, mask_input = "none", None
            if mask is not None:
                if not index.is_mask(mask):
                    raise UnsupportedOpError(f"scaled_dot_product_attention with a mask that is an activation or "
                                             f"parameter at {src}: intforge takes masks computed from an integer "
                                             "mask input (padding, causal)")
                additive = mask.meta["val"].dtype.is_floating_point
                mask_kind, mask_input = index.classify_mask(mask, scores_shape, additive=additive, node=node)
            if causal:
                if mask_kind not in ("none", "causal"):
                    raise UnsupportedOpError(f"scaled_dot_product_attention with both is_causal and a mask at {src} "
                                             "is not supported; build the causal mask into attn_mask")
                mask_kind = "causal"
            scale = args[6] if len(args) > 6 else node.kwargs.get("scale")
            scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(shapes[q][-1]))
            if shapes[q][:-2] != shapes[k][:-2] or shapes[k][:-2] != shapes[v][:-2]:
                raise UnsupportedOpError(f"scaled_dot_product_attention of shapes {shapes[q]}, {shapes[k]}, "
                                         f"{shapes[v]} at {src}: grouped or broadcast heads are not supported")
            # (attention as intforge's ops: Q K^T scaled, softmax, times V; each its own integer op)
            kt, scores, probs = f"{node.name}_kt", f"{node.name}_scores", f"{node.name}_probs"
            rank = len(shapes[k])
            for kind, ins, out, attrs, shape in (
                    ("transpose", [k], kt, {"axes": [*range(rank - 2), rank - 1, rank - 2]},
                     (*shapes[k][:-2], shapes[k][-1], shapes[k][-2])),
                    ("matmul", [q, kt], scores, {"alpha": scale}, (*shapes[q][:-1], shapes[k][-2])),
                    ("softmax", [scores] + ([mask_input] if mask_input else []), probs,
                     {"mask": mask_kind} if mask_kind != "none" else {}, scores_shape)):
                ops.append(FloatOp(kind, layer_name(node, kind, False), ins, out, attrs, {}, src))
                shapes[out] = shape
            emit("matmul", [probs, v], {"alpha": 1.0})
        elif target in _UNARY:
            fn, defaults = _UNARY[target]
            attrs = {"fn": fn}
            for i, (key, default) in enumerate(defaults, start=1):
                attrs[key] = args[i] if len(args) > i else node.kwargs.get(key, default)
            emit("unary", [tname(args[0])], attrs)
        elif target in ("aten.softmax.int", "aten._softmax.default") and args[0].name in masked:
            x, mask_input, kind = masked[args[0].name]
            if int(args[1]) % len(shapes[x]) != len(shapes[x]) - 1:
                raise UnsupportedOpError(f"masked softmax over dim {args[1]} at {src}: the last dim only")
            emit("softmax", [x] + ([mask_input] if mask_input else []), {"mask": kind})
        elif target in ("aten.softmax.int", "aten._softmax.default"):
            x = tname(args[0])
            if int(args[1]) % len(shapes[x]) != len(shapes[x]) - 1:
                raise UnsupportedOpError(
                    f"softmax over dim {args[1]} of a {len(shapes[x])}-D tensor in layer "
                    f"'{_module_path(node) or node.name}' at {src}: intforge's integer softmax runs over the last "
                    "dim only; move that dim last (permute) or drop a softmax at the output (top-1 is unchanged)")
            emit("softmax", [x])
        elif target == "aten.layer_norm.default":
            x = tname(args[0])
            dims = [int(d) for d in args[1]]
            if len(dims) != 1 or dims[0] != shapes[x][-1]:
                raise UnsupportedOpError(
                    f"LayerNorm over the last {len(dims)} dims {dims} of a tensor of shape {shapes[x]} in layer "
                    f"'{_module_path(node) or node.name}' at {src}: intforge normalizes over the last dim only")
            n = dims[0]
            w = const(args[2], "weight", node) if len(args) > 2 and args[2] is not None else np.ones(n, np.float32)
            b = const(args[3], "bias", node) if len(args) > 3 and args[3] is not None else np.zeros(n, np.float32)
            eps = float(args[4]) if len(args) > 4 else float(node.kwargs.get("eps", 1e-5))
            emit("layernorm", [x], {"eps": eps}, {"weight": w, "bias": b}, parametric=True)
        elif target == "aten.cat.default":
            axis = int(args[1]) if len(args) > 1 else 0
            emit("concat", [constant(a, None) if a.name in consts else tname(a) for a in args[0]],
                 {"axis": axis % len(out_shape)})
        else:
            for a in node.all_input_nodes:  # (an activation times a mask: say what intforge takes them for)
                if a.name in index.derived:
                    index.refuse(a, None, node)
            raise UnsupportedOpError(
                f"unsupported op {target} in layer '{_module_path(node) or node.name}'\n  at {src}\n"
                f"intforge lowers only: {SUPPORTED_OPS}. Replace this op in the model, or open an issue "
                "asking for it."
            )

    for op in ops:  # resolve aliases created after an op was emitted (e.g. BN folded into its conv)
        op.inputs = [alias.get(i, i) for i in op.inputs]
    index.check_used()
    graph = FloatGraph(user_inputs, [alias.get(o, o) for o in outputs], shapes, ops, index.inputs)
    return _fold_scales(_fold_pads(_dead_ops_removed(graph)))


def _dead_ops_removed(graph: FloatGraph) -> FloatGraph:
    """Without the ops no output depends on (a BERT's pooler when the model returns the hidden states):
    torch.export keeps them, and they would be calibrated, compiled and run for nothing."""
    needed = set(graph.outputs)
    kept = []
    for op in reversed(graph.ops):
        if op.output in needed:
            kept.append(op)
            needed.update(op.inputs)
    graph.ops = kept[::-1]
    return graph


def _fold_pads(graph: FloatGraph) -> FloatGraph:
    """Zero padding read only by a conv becomes the conv's own padding as far as it is symmetric (a conv
    pads both sides alike); an uneven rest (TensorFlow's SAME at stride 2: one row and column more at the
    end) stays a pad op before it."""
    for op in list(graph.ops):
        if op.kind != "pad":
            continue
        users = graph.users(op.output)
        if len(users) != 1 or users[0].kind != "conv2d" or op.output in graph.outputs:
            continue
        conv = users[0]
        t, left, b, r = op.attrs["pads"]
        mh, mw = min(t, b), min(left, r)
        conv.attrs["padding"] = [conv.attrs["padding"][0] + mh, conv.attrs["padding"][1] + mw]
        rest = [t - mh, left - mw, b - mh, r - mw]
        if any(rest):
            op.attrs["pads"] = rest
            graph.shapes[op.output] = (*graph.shapes[op.output][:2], graph.shapes[op.output][2] - 2 * mh,
                                       graph.shapes[op.output][3] - 2 * mw)
        else:
            conv.inputs = [op.inputs[0]]
            graph.ops.remove(op)
            del graph.shapes[op.output]
    return graph


def _fold_scales(graph: FloatGraph) -> FloatGraph:
    """An activation scaled by a number and read only by a matmul of two activations (timm's `q * scale`
    before `q @ k^T`; an ONNX export of scaled_dot_product_attention, which scales q and k by sqrt(scale)
    each), or a matmul's product scaled and read by nothing else (HF's BERT), becomes the matmul's factor:
    one requantize, after the integer products, instead of one rounding to 8 bits more."""
    for op in list(graph.ops):
        if op.kind != "scale":
            continue
        mm = graph.producer(op.inputs[0])
        if mm is not None and mm.kind == "matmul" and mm.output not in graph.outputs and \
                len(graph.users(mm.output)) == 1:  # (HF's BERT: scores = (q @ k^T) * scale, after)
            mm.attrs["alpha"] = float(mm.attrs["alpha"]) * float(op.attrs["factor"])
            del graph.shapes[mm.output]
            mm.output = op.output
            graph.ops.remove(op)
            continue
        if op.output in graph.outputs:
            continue
        users = graph.users(op.output)
        if len(users) != 1 or users[0].kind != "matmul" or users[0].inputs.count(op.output) != 1:
            continue
        mm = users[0]
        mm.inputs = [op.inputs[0] if t == op.output else t for t in mm.inputs]
        mm.attrs["alpha"] = float(mm.attrs["alpha"]) * float(op.attrs["factor"])
        graph.ops.remove(op)
        del graph.shapes[op.output]
    return graph


def torch_op(kind: str):
    """Float implementation of a FloatGraph op kind (used by calibration and by tests)."""
    import torch.nn.functional as F

    def conv2d(op, x):
        return F.conv2d(x, torch.from_numpy(op.params["weight"]), torch.from_numpy(op.params["bias"]),
                        op.attrs["stride"], op.attrs["padding"], op.attrs["dilation"], op.attrs["groups"])

    def linear(op, x):
        return F.linear(x, torch.from_numpy(op.params["weight"]), torch.from_numpy(op.params["bias"]))

    def clamp(op, x):
        return torch.clamp(x, op.attrs["lo"], op.attrs["hi"])

    def avg_pool2d(op, x):
        a = op.attrs
        return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                            a["divisor_override"])

    def layernorm(op, x):
        return F.layer_norm(x, (x.shape[-1],), torch.from_numpy(op.params["weight"]).to(x.dtype),
                            torch.from_numpy(op.params["bias"]).to(x.dtype), op.attrs["eps"])

    def softmax(op, x, mask=None):
        kind = op.attrs.get("mask")
        if kind is None:
            return torch.softmax(x, -1)
        sq, sk = x.shape[-2:]
        m = np.ones((x.shape[0], sk), bool) if mask is None else (mask != 0).numpy()
        allowed = MASK_KINDS[kind](m, sq, sk)
        allowed = np.broadcast_to(allowed, (allowed.shape[0], sq, sk)).reshape(allowed.shape[0],
                                                                               *([1] * (x.dim() - 3)), sq, sk)
        p = torch.softmax(x.masked_fill(~torch.from_numpy(np.array(allowed)), float("-inf")), -1)
        return torch.nan_to_num(p, nan=0.0)  # (a row with every key left out: zeros, as the integer softmax)

    table = {
        "unary": lambda op, x: _UNARY_FLOAT[op.attrs["fn"]](x, op.attrs),
        "softmax": softmax,
        "embedding": lambda op, ids: torch.nn.functional.embedding(ids.long(), torch.from_numpy(op.params["weight"])),
        "transpose": lambda op, x: x.permute(op.attrs["axes"]),
        "constant": lambda op: torch.from_numpy(op.params["value"]),
        "scale": lambda op, x: x * op.attrs["factor"],
        "select": lambda op, x: x.select(op.attrs["axis"], op.attrs["index"]),
        "matmul": lambda op, a, b: torch.matmul(a, b) * op.attrs["alpha"],
        "layernorm": layernorm,
        "conv2d": conv2d,
        "linear": linear,
        "relu": clamp,
        "clamp": clamp,
        "add": lambda op, a, b: a + b,
        "max_pool2d": lambda op, x: F.max_pool2d(x, op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"],
                                                 op.attrs["dilation"], op.attrs["ceil_mode"]),
        "avg_pool2d": avg_pool2d,
        "concat": lambda op, *xs: torch.cat(xs, op.attrs["axis"]),
        "pad": lambda op, x: F.pad(x, (op.attrs["pads"][1], op.attrs["pads"][3], op.attrs["pads"][0],
                                       op.attrs["pads"][2])),
    }
    return table[kind]


#: The float function of each elementwise op (`_UNARY`'s names), of (x, attrs): calibration runs it, and the
#: quantizer tabulates it (`nonlinear.unary_table`).
_UNARY_FLOAT = {
    "gelu": lambda x, a: torch.nn.functional.gelu(x, approximate=a.get("approximate", "none")),
    "silu": lambda x, a: torch.nn.functional.silu(x),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "hardswish": lambda x, a: torch.nn.functional.hardswish(x),
    "hardsigmoid": lambda x, a: torch.nn.functional.hardsigmoid(x),
    "leaky_relu": lambda x, a: torch.nn.functional.leaky_relu(x, a["negative_slope"]),
    "elu": lambda x, a: a["scale"] * torch.where(x > 0, x, a["alpha"] * torch.expm1(x * a["input_scale"])),
    "mish": lambda x, a: torch.nn.functional.mish(x),
    "softplus": lambda x, a: torch.nn.functional.softplus(x, a["beta"], a["threshold"]),
}


def run_float_graph(graph: FloatGraph, *inputs: torch.Tensor, observe=None) -> list[torch.Tensor]:
    """Execute the float graph with torch; `observe(tensor_name, value)` sees every tensor."""
    env = dict(zip(graph.inputs, inputs, strict=True))
    fixed = graph.fixed_batch()
    if observe:
        for k, v in env.items():
            observe(k, v)
    for op in graph.ops:
        args = [env[i] for i in op.inputs]
        if op.kind == "reshape":
            shape = graph.shapes[op.output]
            out = args[0].reshape(shape if fixed else (args[0].shape[0], *shape[1:]))
        else:
            out = torch_op(op.kind)(op, *args)
        env[op.output] = out
        if observe:
            observe(op.output, out)
    return [env[o] for o in graph.outputs]
