"""ONNX frontend: an .onnx file into a torch nn.Module that the PyTorch path takes from there.

intforge's pipeline starts from torch.export (capture, BatchNorm folding, stable layer names, the
gradients `analyze` needs). Rather than a second capture path, an ONNX graph becomes a real
`nn.Module`: its Conv / Gemm / MatMul / BatchNormalization nodes become `nn.Conv2d`, `nn.Linear` and
`nn.BatchNorm2d` submodules holding the file's weights, registered under the module path the node
came from (`/layer1/layer1.0/conv1/Conv` from torch.onnx.export is `layer1.0.conv1`; otherwise the
weight's name, else the node's), and `forward` runs the other nodes as the torch functions intforge
captures. Calibration, Hessian analysis, ZeroQ distillation (the BN statistics are the file's), bit
plans, tuning and every CLI command then work on it unchanged, and layer names match a PyTorch
compile of the same model.

Shape arithmetic (`Shape`, `Gather`, `Unsqueeze`, `Concat` ... feeding a `Reshape`, as exporters
write `x.view(x.size(0), -1)`) runs on numpy at call time, so it folds to constants under
torch.export. Anything else is refused at import with the op, the node and the file.

TVM has a Relax ONNX frontend (`tvm.relax.frontend.onnx.from_onnx`), but its output is a float Relax
module, not the float graph intforge quantizes, and Hessian analysis needs autograd: so this one is ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import IntforgeError, UnsupportedOpError

SUPPORTED_ONNX_OPS = (
    "Conv (2-D), Pad (zeros around H, W), BatchNormalization (after a Conv: folded), Gemm, MatMul (by a "
    "weight, or of two activations), Add / Sub / Mul / Div of a constant per output channel after a Conv, Gemm "
    "or MatMul (folded), Mul / Div of an activation by one number (a constant, or computed from shapes), Relu, "
    "Clip, Add (of two activations, or of an activation and a constant tensor), MaxPool, AveragePool, "
    "GlobalAveragePool, ReduceMean over H,W, Flatten, Reshape, Concat (of activations and constant tensors), "
    "Expand (of a constant tensor), Transpose, Unsqueeze, Squeeze, Gather (one index), Split and Slice (into "
    "slices of one), Sigmoid, Tanh, Gelu (and "
    "its Div-Erf-Add-Mul-Mul form), HardSwish, HardSigmoid (PyTorch's), LeakyRelu, Elu, Softplus, Mish, Softmax "
    "and LayerNormalization over the last axis, Dropout, Identity; and shape arithmetic on constants (Constant, "
    "Shape, Gather, GatherElements, Unsqueeze, Squeeze, Concat, Cast, Slice, Add, Sub, Mul, Div, ConstantOfShape, "
    "Expand, Range, Equal, compares, And / Or / Xor / Not, Where, Mod, Sqrt); integer inputs (token ids: Gather of a "
    "weight by them, an embedding; an attention mask: those ops on its values, then added to the scores); a "
    "softmax's NaN guard (Where(IsNaN(p), 0, p))"
)

_FLOAT = 1  # onnx.TensorProto.FLOAT
#: Compares and logic, as numpy (folded on constants and shapes) and as torch (on an integer input's values,
#: for capture to evaluate): one table for both.
_COMPARE_LOGIC = {"Equal": (np.equal, torch.eq), "Greater": (np.greater, torch.gt),
                  "GreaterOrEqual": (np.greater_equal, torch.ge), "Less": (np.less, torch.lt),
                  "LessOrEqual": (np.less_equal, torch.le), "And": (np.logical_and, torch.logical_and),
                  "Or": (np.logical_or, torch.logical_or), "Xor": (np.logical_xor, torch.logical_xor),
                  "Not": (np.logical_not, torch.logical_not)}
_INTEGER_INPUTS = {6: "int32", 7: "int64", 9: "bool"}  # token ids, attention masks
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                  "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd"}
# the op kind capture.py names a layer by (`layer1.0.add`), for each ONNX op run inside a module's scope
_CAPTURED_KIND = {"Add": "add", "Relu": "relu", "Clip": "clamp", "MaxPool": "max_pool2d", "AveragePool": "avg_pool2d",
                  "GlobalAveragePool": "avg_pool2d", "ReduceMean": "mean", "Flatten": "reshape", "Reshape": "reshape",
                  "Concat": "concat", "Pad": "pad", "Transpose": "transpose", "Softmax": "softmax",
                  "Sigmoid": "sigmoid", "Tanh": "tanh", "Gelu": "gelu", "Erf": "gelu", "HardSwish": "hardswish",
                  "HardSigmoid": "hardsigmoid", "LeakyRelu": "leaky_relu", "Elu": "elu", "Softplus": "softplus",
                  "Mish": "mish"}
# elementwise functions on activations: ONNX op -> torch function of (x, attrs)
_UNARY_ONNX: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "Sigmoid": lambda x, a: torch.sigmoid(x),
    "Tanh": lambda x, a: torch.tanh(x),
    "Gelu": lambda x, a: torch.nn.functional.gelu(x, approximate=a.get("approximate", "none")),
    "HardSwish": lambda x, a: torch.nn.functional.hardswish(x),
    "HardSigmoid": lambda x, a: torch.nn.functional.hardsigmoid(x),
    "LeakyRelu": lambda x, a: torch.nn.functional.leaky_relu(x, float(a.get("alpha", 0.01))),
    "Elu": lambda x, a: torch.nn.functional.elu(x, float(a.get("alpha", 1.0))),
    "Softplus": lambda x, a: torch.nn.functional.softplus(x),
    "Mish": lambda x, a: torch.nn.functional.mish(x),
}


def scope_path(node_name: str) -> str:
    """torch.onnx.export's node name -> the torch module path it came from: `/features/features.2/conv/
    conv.0/conv.0.0/Conv` -> `features.2.conv.0.0` (each scope repeats its parent's path; the last
    component is the op). '' for names without scopes."""
    scopes = [c for c in node_name.split("/") if c][:-1]
    parts, prev = [], None
    for comp in scopes:
        parts.append(comp[len(prev) + 1:] if prev is not None and comp.startswith(prev + ".") else comp)
        prev = comp
    return ".".join(parts)


def namespace_path(namespace: str) -> str:
    """The torch module path in the `namespace` metadata that torch.onnx.export(dynamo=True) writes on each
    node (`: ResNet/layer1: Sequential/layer1.0: BasicBlock/add: aten.add.Tensor` -> `layer1.0`): each
    component is `path: class`, the first the root, the last the op."""
    names = [c.split(":")[0].strip() for c in namespace.split("/")]
    return names[-2] if len(names) >= 3 else ""


def _clean(name: str) -> str:
    """A module path from any string: components of letters, digits and underscores, joined by dots."""
    parts = [re.sub(r"\W", "_", p).strip("_") for p in name.split(".")]
    return ".".join(p for p in parts if p)


class OnnxModule(torch.nn.Module):
    """An ONNX graph as an nn.Module (see the module docstring). `input_shapes` hold None for symbolic dims."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.input_names: list[str] = []
        self.input_shapes: list[tuple[int | None, ...]] = []
        self.output_names: list[str] = []
        self.file_output_names: list[str] = []  # the graph's outputs as the file names them
        self._constants: dict[str, np.ndarray] = {}
        self._nodes: dict[str, str] = {}  # module path -> "'node name' (OpType)"
        self._steps: list[Callable[[OnnxModule, dict[str, Any]], None]] = []

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.source} takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env: dict[str, Any] = dict(self._constants)
        env.update(zip(self.input_names, inputs, strict=True))
        for step in self._steps:
            step(self, env)
        outs = tuple(env[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def describe_layer(self, layer: str) -> str:
        """Where a captured layer (`layer1.0.conv1`, `layer1.0.add#1`) came from in the file, for errors and
        the integer program's `source`: the ONNX node of its module path or of the nearest scope above."""
        parts = layer.split("#")[0].split(".")
        for n in range(len(parts), 0, -1):
            node = self._nodes.get(".".join(parts[:n]))
            if node is not None:
                return f"{self.source}: ONNX node {node}"
        return self.source

    def example_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The first input's shape, a symbolic batch dim set to `batch`; other symbolic dims are an error."""
        dims = self.input_shapes[0]
        if any(d is None for d in dims[1:]):
            raise IntforgeError(f"{self.source}: input {self.input_names[0]!r} has symbolic dimensions besides the "
                                f"batch ({', '.join('?' if d is None else str(d) for d in dims)}); give the shape to "
                                "compile for (the CLI's --input-shape, e.g. 1,3,224,224)")
        return tuple(batch if d is None else d for d in dims)


class _Scope(torch.nn.Module):
    """A module path's container (`layer1.0`); ops the exporter placed in its scope run through it, so
    torch.export records them inside it, as in the PyTorch model."""

    def forward(self, fn: Callable[..., Any], *xs: Any) -> Any:
        return fn(*xs)


class _Fn(torch.nn.Module):
    """An op without weights, as a module at its torch scope (layer names as a PyTorch capture gives them)."""

    def __init__(self, fn: Callable[..., Any], op_type: str) -> None:
        super().__init__()
        self.fn, self.op_type = fn, op_type

    def forward(self, *xs: Any) -> Any:
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.op_type


def load_onnx(path: str | Path) -> OnnxModule:
    """Read an .onnx file into an `OnnxModule` (eval mode), refusing what intforge cannot lower."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover - onnx is a pinned dependency
        raise IntforgeError("reading .onnx files needs the `onnx` package: pip install onnx") from None
    path = Path(path)
    if not path.is_file():
        raise IntforgeError(f"ONNX file {path} does not exist")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types; all mean "not an ONNX model"
        raise IntforgeError(f"{path} is not a readable ONNX model ({type(exc).__name__}: "
                            f"{str(exc).strip()[:200] or 'no details'})") from None
    if not proto.graph.node:
        raise IntforgeError(f"{path} is not an ONNX model with a graph (no nodes found)")
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    builder = _Builder(proto.graph, str(path), opsets.get("ai.onnx", 1), numpy_helper)
    return builder.build().eval()


class _Builder:
    """Walks the graph once, making submodules and the forward steps."""

    def __init__(self, graph: Any, source: str, opset: int, numpy_helper: Any) -> None:
        self.graph, self.source, self.opset, self.nh = graph, source, opset, numpy_helper
        self.mod = OnnxModule(source)
        self.static: dict[str, np.ndarray] = {}  # initializers and Constant outputs, known at import
        self.shape_like: set[str] = set()  # values computed from shapes: numpy at call time
        self.integer: set[str] = set()  # integer inputs and what is computed from them: torch at call time
        self.alias: dict[str, str] = {}
        self.producer: dict[str, Any] = {}
        self.users: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}  # value -> indices of the nodes reading it
        self.skip: set[int] = set()  # nodes already imported as part of a pattern (GELU's Erf form)
        self.used_paths: set[str] = set()
        self.fns: dict[str, tuple[Any, _Fn]] = {}
        self.made: dict[str, torch.nn.Conv2d | torch.nn.Linear] = {}  # output value -> the layer computing it
        self.params: dict[str, str] = {}  # constant value -> the env key of its parameter (`parameter`)
        self.nan_guards: dict[str, str] = {}  # IsNaN(p) of a softmax's output p -> p (`op_IsNaN`)

    # -- helpers --------------------------------------------------------------------------------------
    def where(self, node: Any, index: int) -> str:
        label = f"'{node.name}'" if node.name else f"#{index} (unnamed, output {node.output[0]!r})"
        return f"ONNX node {label} ({node.op_type}) of {self.source}"

    def refuse(self, node: Any, index: int, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where(node, index)}: {why}")

    def attrs(self, node: Any) -> dict[str, Any]:
        import onnx

        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}  # (strings: auto_pad, mode)

    def name(self, value: str) -> str:
        return self.alias.get(value, value)

    def const(self, node: Any, index: int, value: str, what: str) -> np.ndarray:
        value = self.name(value)
        if value not in self.static:
            raise self.refuse(node, index, f"its {what} ({value!r}) is computed in the graph; intforge needs a "
                                           "constant (an initializer) there")
        return self.static[value]

    def scope(self, node: Any) -> str:
        """The torch module path a node was exported from: from its name (TorchScript exporter) or its
        `namespace` metadata (dynamo exporter); '' if neither says."""
        path = scope_path(node.name)
        if not path:
            meta = {p.key: p.value for p in node.metadata_props}
            path = namespace_path(meta.get("namespace", ""))
        return _clean(path)

    def module_path(self, node: Any, index: int, weight: str | None) -> str:
        """Where a weighted node's module goes: its weight's name if a module path, else its scope, else its name."""
        # (the weight's name first where it is a module path: the dynamo exporter files a conv that absorbed
        # its BatchNorm under the BatchNorm's scope)
        candidates = [weight[: -len(".weight")]] if weight and weight.endswith(".weight") else []
        candidates.append(self.scope(node))
        candidates += [node.name, f"{node.op_type.lower()}_{index}"]
        for cand in candidates:
            path = _clean(cand)
            if not path or path in self.used_paths:
                continue
            if self._attach_ok(path):
                self.used_paths.add(path)
                return path
        path = f"{node.op_type.lower()}_{index}_{len(self.used_paths)}"
        self.used_paths.add(path)
        return path

    def _attach_ok(self, path: str) -> bool:
        """Whether `path` names a free slot in the module tree (containers made as needed), without making it."""
        parts = path.split(".")
        node: torch.nn.Module = self.mod
        for i, p in enumerate(parts):
            if p in node._modules:
                child = node._modules[p]
                if i == len(parts) - 1 or not isinstance(child, _Scope):
                    return False  # taken, or a leaf where a container is needed
                node = child
            elif hasattr(node, p):  # (an attribute of the module: `forward`, `source`, ...)
                return False
            else:
                return True
        return False

    def attach(self, path: str, module: torch.nn.Module, node: Any = None) -> None:
        if node is not None:
            self.mod._nodes[path] = f"'{node.name or node.output[0]}' ({node.op_type})"
        parts = path.split(".")
        parent: torch.nn.Module = self.mod
        for p in parts[:-1]:
            if p not in parent._modules:
                parent.add_module(p, _Scope())
            parent = parent._modules[p]
        parent.add_module(parts[-1], module)

    def _get(self, path: str) -> torch.nn.Module | None:
        node: torch.nn.Module | None = self.mod
        for p in path.split("."):
            node = node._modules.get(p) if node is not None else None
        return node

    def step(self, fn: Callable[..., Any], inputs: list[str], output: str, node: Any = None) -> None:
        """A forward step: output = fn(*values of inputs). With `node`, an op on activations runs as a module
        at the node's torch scope, so its layer name is the one a PyTorch capture gives (`layer1.0.relu`)."""
        path = self.scope(node) if node is not None else ""
        if path and isinstance(self._get(path), _Scope):  # an op inside a module's forward (ResNet's add)
            kind = _CAPTURED_KIND.get(node.op_type, node.op_type.lower())
            self.mod._nodes.setdefault(f"{path}.{kind}", f"'{node.name}' ({node.op_type})")
            def in_scope(mod: OnnxModule, env: dict[str, Any], _p=path, _fn=fn, _in=inputs, _out=output) -> None:
                env[_out] = mod.get_submodule(_p)(_fn, *(env[i] for i in _in))
            self.mod._steps.append(in_scope)
            return
        if path:
            key = (node.op_type, tuple(sorted((x.name, str(x)) for x in node.attribute)), tuple(node.input[1:]))
            again = re.fullmatch(r"(.+)_\d+", path)  # torch.onnx.export names a module's second call `relu_1`
            if again and again.group(1) in self.fns and self.fns[again.group(1)][0] == key:
                path = again.group(1)
            held = self.fns.get(path)
            if held is None and path not in self.used_paths and self._attach_ok(path):
                held = self.fns[path] = (key, _Fn(fn, node.op_type))
                self.used_paths.add(path)
                self.attach(path, held[1], node)
            if held is not None and held[0] == key:  # a module called again (ResNet's relu), as in PyTorch
                self.call_module(path, inputs, output)
                return

        def run(_mod: OnnxModule, env: dict[str, Any], _fn=fn, _in=inputs, _out=output) -> None:
            env[_out] = _fn(*(env[i] for i in _in))
        self.mod._steps.append(run)

    def parameter(self, value: str) -> str:
        """A constant read as an activation (a positional embedding added, a class token concatenated) as a
        parameter of the module, named after its initializer, and the env key a step puts it under: the
        capture then sees a parameter, as in the PyTorch model (a `constant` op)."""
        value = self.name(value)
        if value in self.params:
            return self.params[value]
        path = _clean(value) or "constant"
        if path in self.used_paths or not self._attach_ok(path):
            path = f"constant_{len(self.params)}"
        self.used_paths.add(path)
        *scope, leaf = path.split(".")
        parent: torch.nn.Module = self.mod
        for p in scope:
            if p not in parent._modules:
                parent.add_module(p, _Scope())
            parent = parent._modules[p]
        tensor = torch.from_numpy(np.array(self.static[value], np.float32))  # (a copy: writable)
        parent.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        key = self.params[value] = f"{value}#parameter"

        def run(mod: OnnxModule, env: dict[str, Any], _p=path, _k=key) -> None:
            env[_k] = mod.get_parameter(_p)
        self.mod._steps.append(run)
        return key

    def call_module(self, path: str, inputs: str | list[str], output: str) -> None:
        names = [inputs] if isinstance(inputs, str) else list(inputs)
        module = self._get(path)
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            self.made[output] = module

        def run(mod: OnnxModule, env: dict[str, Any], _p=path, _in=names, _out=output) -> None:
            env[_out] = mod.get_submodule(_p)(*(env[i] for i in _in))
        self.mod._steps.append(run)

    # -- the walk ---------------------------------------------------------------------------------------
    def build(self) -> OnnxModule:
        g = self.graph
        for init in g.initializer:
            self.static[init.name] = self.nh.to_array(init)
        inputs = [i for i in g.input if i.name not in self.static]
        if not inputs:
            raise IntforgeError(f"{self.source} has no graph inputs besides its weights")
        for inp in inputs:
            tt = inp.type.tensor_type
            if not inp.type.HasField("tensor_type") or tt.elem_type not in (_FLOAT, *_INTEGER_INPUTS):
                raise IntforgeError(f"{self.source}: input {inp.name!r} is neither a float32 tensor nor integers "
                                    "(token ids, a mask); intforge compiles models whose inputs are float32 (the "
                                    "library quantizes them at its boundary) or int64 / int32 / bool")
            if tt.elem_type != _FLOAT:
                self.integer.add(inp.name)
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in tt.shape.dim)
            self.mod.input_names.append(inp.name)
            self.mod.input_shapes.append(dims)
        for index, node in enumerate(g.node):
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.users[i] = self.users.get(i, 0) + 1
                self.consumers.setdefault(i, []).append(index)
        for o in g.output:
            self.users[o.name] = self.users.get(o.name, 0) + 1
        for index, node in enumerate(g.node):
            if index not in self.skip:
                self.node(node, index)
        self.mod.output_names = [self.name(o.name) for o in g.output]
        self.mod.file_output_names = [o.name for o in g.output]
        for o in self.mod.output_names:
            if o in self.static or o in self.shape_like:
                raise IntforgeError(f"{self.source}: output {o!r} is a constant, not computed from the inputs")
        self.mod._constants = dict(self.static)
        _name_inputs(self.mod)
        return self.mod

    def node(self, node: Any, index: int) -> None:
        op, a = node.op_type, self.attrs(node)
        if node.domain not in ("", "ai.onnx"):
            raise self.refuse(node, index, f"op {node.domain}::{op} is outside the standard ONNX domain; intforge "
                                           f"imports only: {SUPPORTED_ONNX_OPS}")
        if op in _QUANTIZED_OPS:
            raise self.refuse(node, index, f"op {op}: this file is already quantized. intforge quantizes the model "
                                           "itself (calibration, per-channel weights, integer requantization): "
                                           "give it the float model.")
        ins = [self.name(i) if i else "" for i in node.input]
        out = node.output[0]
        if op == "Constant":
            self.static[out] = self._constant_value(node, index, a)
            return
        live = [i for i in ins if i and i not in self.static]
        if (op == "Expand" and ins[0] in self.static and self.static[ins[0]].dtype.kind == "f"
                and self.static[ins[0]].size > 1 and (ins[1] in self.static or ins[1] in self.shape_like)):
            # a parameter repeated over the batch (a ViT's class token; the shape constant, or computed from
            # the input's): the parameter, then the expand, as PyTorch writes it (the capture then calibrates
            # at the example's batch size)
            def expand(p: torch.Tensor, s: Any) -> torch.Tensor:
                return p.expand(np.broadcast_shapes(tuple(p.shape), tuple(int(d) for d in np.asarray(s).ravel())))
            self.step(expand, [self.parameter(ins[0]), ins[1]], out, node)
            return
        if op == "Shape" and live:  # a value's shape, read at call time (static under torch.export)
            self.shape_like.add(out)
            self.step(lambda x: np.array(x.shape, np.int64), [ins[0]], out)
            return
        if op == "Gather" and ins[0] in self.static and self.static[ins[0]].dtype.kind == "f" and \
                ins[1] in self.integer:  # rows of a weight by token ids: an embedding
            self.step(lambda ids, w: torch.nn.functional.embedding(ids.long(), w), [ins[1], self.parameter(ins[0])],
                      out, node)
            return
        if live and any(i in self.integer for i in live) and \
                all(i in self.integer or i in self.shape_like for i in live):
            # computed from integer inputs (an attention mask's compares and broadcasts): torch at call time,
            # which capture reads by evaluating it (capture._IndexValues)
            self.integer.add(out)
            self.step(self._integer_fn(node, index, op, a), [i for i in ins if i], out)
            return
        if not live or all(i in self.shape_like for i in live):  # shape arithmetic: numpy at call time
            self._numpy_node(node, index, op, a, ins, out)
            return
        if any(i in self.shape_like for i in (live if op != "Reshape" else live[:1])):
            if op in ("Mul", "Div") and len(live) == 2 and sum(i in self.shape_like for i in live) == 1:
                # an activation scaled by a number computed from shapes (attention's 1 / sqrt(head size))
                act, number = (live[0], live[1]) if live[1] in self.shape_like else (live[1], live[0])
                self._scale_by(node, index, act, number, out)
                return
            if op == "Add" and len(live) == 2 and sum(i in self.shape_like for i in live) == 1:
                # an activation plus a tensor computed from shapes: a BERT exported with a dynamic batch axis
                # looks its token-type embeddings up by ids that Expand makes from the input's shape
                act, table = (live[0], live[1]) if live[1] in self.shape_like else (live[1], live[0])
                self._add_computed(node, index, act, table, out)
                return
            raise self.refuse(node, index, "it mixes activations with values computed from shapes; intforge "
                                           "imports shape arithmetic only where it feeds a Reshape or scales an "
                                           "activation by one number")
        if op in ("Add", "Sub", "Mul", "Div") and self._fold_constant(node, op, ins, out):
            return
        if op == "Div" and self._erf_gelu(node, ins, out):
            return
        if op in _UNARY_ONNX:
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            if op == "HardSigmoid" and (abs(alpha - 1 / 6) > 1e-6 or beta != 0.5):
                raise self.refuse(node, index, f"HardSigmoid with alpha {alpha:g}, beta {beta:g}; intforge takes "
                                               "PyTorch's (alpha 1/6, beta 1/2)")
            self.step(lambda x, _f=_UNARY_ONNX[op], _a=a: _f(x, _a), [ins[0]], out, node)
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            if op == "LogSoftmax":
                hint = (" A LogSoftmax at the output does not change the top-1 class: export the model without it "
                        "(or with Softmax).")
            else:
                hint = " Replace it in the model before exporting, or open an issue asking for it."
            raise self.refuse(node, index, f"unsupported op {op}. intforge imports only: {SUPPORTED_ONNX_OPS}.{hint}")
        handler(node, index, a, ins, out)

    def _constant_value(self, node: Any, index: int, a: dict[str, Any]) -> np.ndarray:
        if "value" in a:
            return self.nh.to_array(a["value"])
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                           ("value_ints", np.int64)):
            if key in a:
                return np.array(a[key], dtype)
        raise self.refuse(node, index, "a Constant without a tensor, float or int value")

    def _numpy_node(self, node: Any, index: int, op: str, a: dict[str, Any], ins: list[str], out: str) -> None:
        """A node on constants and shapes, run with numpy (at import if all constant, else at call time)."""
        fn = self._numpy_fn(node, index, op, a, ins)
        used = [i for i in ins if i]
        if all(i in self.static for i in used):
            self.static[out] = np.asarray(fn(*(self.static[i] for i in used)))
        else:
            self.shape_like.add(out)
            self.step(lambda *v, _fn=fn: np.asarray(_fn(*v)), used, out)

    def _numpy_fn(self, node: Any, index: int, op: str, a: dict[str, Any], ins: list[str]) -> Callable[..., Any]:
        n_in = len([i for i in ins if i])

        def axes_of(vals: tuple) -> list[int]:
            return [int(v) for v in (np.asarray(vals[1]).ravel() if len(vals) > 1 else a.get("axes", []))]

        if op in ("Identity", "Dropout"):
            return lambda x, *_: x
        if op == "Cast":
            import onnx

            dtype = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
            return lambda x: np.asarray(x).astype(dtype)
        if op == "Gather":
            axis = int(a.get("axis", 0))
            return lambda x, i: np.take(np.asarray(x), np.asarray(i), axis=axis)
        if op == "Unsqueeze":
            def unsqueeze(*v: Any) -> np.ndarray:
                x = np.asarray(v[0])
                for ax in sorted(d % (x.ndim + len(axes_of(v))) for d in axes_of(v)):
                    x = np.expand_dims(x, ax)
                return x
            return unsqueeze
        if op == "Squeeze":
            return lambda *v: np.squeeze(np.asarray(v[0]), axis=tuple(axes_of(v)) or None)
        if op == "Concat":
            axis = int(a.get("axis", 0))
            return lambda *v: np.concatenate([np.atleast_1d(np.asarray(x)) for x in v], axis=axis)
        if op == "Slice" and n_in >= 3:
            def slice_(x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> np.ndarray:
                x = np.asarray(x)
                axes = range(len(starts)) if axes is None else np.asarray(axes).ravel()
                steps = [1] * len(starts) if steps is None else np.asarray(steps).ravel()
                idx = [slice(None)] * x.ndim
                bounds = zip(np.asarray(starts).ravel(), np.asarray(ends).ravel(), axes, steps, strict=False)
                for s, e, ax, st in bounds:
                    idx[int(ax)] = slice(int(s), int(max(min(e, 2**62), -2**62)), int(st))
                return x[tuple(idx)]
            return slice_
        if op in ("Add", "Sub", "Mul", "Div"):
            fns = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}

            def div(x: Any, y: Any) -> np.ndarray:
                x, y = np.asarray(x), np.asarray(y)
                return x // y if np.issubdtype(x.dtype, np.integer) else x / y
            return fns.get(op, div)
        if op == "Reshape":
            return lambda x, s: np.asarray(x).reshape(_reshape_target(np.asarray(x).shape, s, a))
        if op == "ConstantOfShape":
            fill = self.nh.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
            return lambda s: np.full(tuple(int(d) for d in np.asarray(s).ravel()), fill.ravel()[0], fill.dtype)
        if op == "Expand":  # (ONNX's broadcast: either side may be 1)
            return lambda x, s: np.broadcast_to(np.asarray(x), np.broadcast_shapes(
                np.shape(x), tuple(int(d) for d in np.asarray(s).ravel()))).copy()
        if op in _COMPARE_LOGIC:
            return _COMPARE_LOGIC[op][0]
        if op in ("Where", "Mod", "Sqrt"):
            fmod = int(a.get("fmod", 0))
            return {"Where": np.where, "Sqrt": np.sqrt, "Mod": np.fmod if fmod else np.mod}[op]
        if op == "GatherElements":
            axis = int(a.get("axis", 0))
            return lambda x, i: np.take_along_axis(np.asarray(x), np.asarray(i), axis)
        if op == "Range":  # (position ids up to the input's length)
            return lambda start, limit, delta: np.arange(np.asarray(start).item(), np.asarray(limit).item(),
                                                         np.asarray(delta).item()).astype(np.asarray(start).dtype)
        if op == "Flatten":
            axis = int(a.get("axis", 1))
            return lambda x: np.asarray(x).reshape(int(np.prod(np.shape(x)[:axis])), -1)
        raise self.refuse(node, index, f"op {op} on constants or shapes is not among what intforge folds: "
                                       f"{SUPPORTED_ONNX_OPS}")

    def _integer_fn(self, node: Any, index: int, op: str, a: dict[str, Any]) -> Callable[..., Any]:
        """A node on integer inputs' values (and constants, shapes) as torch ops, so torch.export keeps them
        and capture can evaluate what they compute (an attention mask)."""
        import onnx

        def t(v: Any) -> torch.Tensor:
            return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v))

        def ints(v: Any) -> list[int]:
            return [int(d) for d in np.asarray(v).ravel()]

        def axes(rank: int, given: Any) -> list[int]:
            return sorted(d % rank for d in ints(given if given is not None else a.get("axes", [])))

        if op in ("Identity", "Dropout"):
            return lambda x, *_: x
        if op == "Cast":
            dtype = torch.from_numpy(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(a["to"]))).dtype
            return lambda x: t(x).to(dtype)
        if op == "Flatten":
            axis = int(a.get("axis", 1))
            return lambda x: t(x).reshape(int(np.prod(tuple(t(x).shape)[:axis])), -1)
        if op == "Reshape":
            return lambda x, s: t(x).reshape(_reshape_target(tuple(t(x).shape), s, a))
        if op == "Expand":
            return lambda x, s: t(x).expand(np.broadcast_shapes(tuple(t(x).shape), tuple(ints(s))))
        if op == "Unsqueeze":
            def unsqueeze(x: Any, given: Any = None) -> torch.Tensor:
                x = t(x)
                added = ints(given if given is not None else a.get("axes", []))
                for d in axes(x.dim() + len(added), added):
                    x = x.unsqueeze(d)
                return x
            return unsqueeze
        if op == "Squeeze":
            def squeeze(x: Any, given: Any = None) -> torch.Tensor:
                x = t(x)
                for d in reversed(axes(x.dim(), given)):
                    x = x.squeeze(d)
                return x
            return squeeze
        if op == "Gather":
            axis = int(a.get("axis", 0))

            def gather(x: Any, i: Any) -> torch.Tensor:
                x, i = t(x), t(i).long()
                picked = x.index_select(axis, i.reshape(-1) % x.shape[axis])
                return picked.reshape(*x.shape[:axis], *i.shape, *x.shape[axis + 1:])
            return gather
        if op == "GatherND" and int(a.get("batch_dims", 0)) == 0:
            def gather_nd(x: Any, i: Any) -> torch.Tensor:
                x, i = t(x), t(i).long()
                return x[tuple(i[..., j] for j in range(i.shape[-1]))]
            return gather_nd
        if op == "Concat":
            return lambda *xs: torch.cat([t(x) for x in xs], int(a.get("axis", 0)))
        if op == "Where":
            return lambda c, x, y: torch.where(t(c).bool(), t(x), t(y))
        if op in _COMPARE_LOGIC:
            return lambda *xs, _f=_COMPARE_LOGIC[op][1]: _f(*(t(x) for x in xs))
        binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}
        if op in binary:
            return lambda x, y, _f=binary[op]: _f(t(x), t(y))
        if op == "Div":
            return lambda x, y: torch.div(t(x), t(y), rounding_mode="trunc" if not t(x).is_floating_point() else None)
        raise self.refuse(node, index, f"op {op} on an integer input's values (a token id or mask computation) "
                                       "is not among what intforge runs there: Cast, Flatten, Reshape, Expand, "
                                       "Unsqueeze, Squeeze, Gather, GatherND, Concat, Where, compares, logic and "
                                       "arithmetic")

    # -- ops on activations -----------------------------------------------------------------------------
    def op_Conv(self, node, index, a, ins, out) -> None:
        w = self.const(node, index, ins[1], "weight").astype(np.float32)
        if w.ndim != 4:
            raise self.refuse(node, index, f"a {w.ndim - 2}-D convolution; intforge lowers 2-D convolutions only")
        b = self.const(node, index, ins[2], "bias").astype(np.float32) if len(ins) > 2 and ins[2] else None
        kh, kw = w.shape[2:]
        stride = list(a.get("strides", [1, 1]))
        dilation = list(a.get("dilations", [1, 1]))
        pad = self._conv_pads(a)
        groups = int(a.get("group", 1))
        even = isinstance(pad, list) and pad[:2] == pad[2:]
        conv = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], (kh, kw), stride=stride,
                               padding=pad[:2] if even else 0, dilation=dilation, groups=groups, bias=b is not None)
        x = ins[0]
        if not even:  # uneven padding (TensorFlow's SAME at stride 2): a zero pad first (capture folds the even part)
            x = f"{out}::padded"

            def pad_input(v: torch.Tensor) -> torch.Tensor:
                t, left, bottom, r = pad if isinstance(pad, list) else _same_pads(pad, v.shape[2:], [kh, kw], stride,
                                                                                 dilation)
                return torch.nn.functional.pad(v, (left, r, t, bottom))
            self.step(pad_input, [ins[0]], x)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            if b is not None:
                conv.bias.copy_(torch.from_numpy(b))
        path = self.module_path(node, index, node.input[1])
        self.attach(path, conv, node)
        self.call_module(path, x, out)

    def _conv_pads(self, a: dict[str, Any]) -> list[int] | str:
        """A node's declared padding: [top, left, bottom, right], or "SAME_UPPER" / "SAME_LOWER" (from the
        input's shape, at call time)."""
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            return auto
        pads = list(a.get("pads", [0] * 4)) if auto == "NOTSET" else [0] * 4
        return [int(p) for p in pads]

    def op_Pad(self, node, index, a, ins, out) -> None:
        mode = a.get("mode", "constant")
        if self.opset < 11:
            pads, value, axes = list(a.get("pads", [])), float(a.get("value", 0.0)), None
        else:
            pads = self.const(node, index, ins[1], "pads").ravel().tolist()
            value = float(self.const(node, index, ins[2], "constant value").ravel()[0]) if len(ins) > 2 and ins[2] \
                else 0.0
            axes = self.const(node, index, ins[3], "axes").ravel().tolist() if len(ins) > 3 and ins[3] else None
        if axes is not None:  # (opset 18) pads for the listed axes only
            full = [0] * 8
            for i, ax in enumerate(axes):
                full[int(ax) % 4], full[4 + int(ax) % 4] = pads[i], pads[len(axes) + i]
            pads = full
        if mode != "constant" or value != 0.0 or len(pads) != 8 or any(pads[k] for k in (0, 1, 4, 5)) or \
                min(pads) < 0:
            raise self.refuse(node, index, f"a Pad with mode {mode!r}, value {value} and pads {pads}; intforge pads "
                                           "H and W of an NCHW tensor with zeros only")
        t, left, bottom, r = (int(pads[k]) for k in (2, 3, 6, 7))
        self.step(lambda v: torch.nn.functional.pad(v, (left, r, t, bottom)), [ins[0]], out, node)

    def _pads(self, node, index, a, kernel: list[int], stride: list[int], dilation: list[int]) -> list[int]:
        """A pool's padding, which must be even (a pool has no zero pad before it): [height, width]."""
        pads = self._conv_pads(a)
        if isinstance(pads, str):  # SAME: even only at stride 1 with an even total
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=False)]
            if any(s != 1 or t % 2 for s, t in zip(stride, total, strict=False)):
                raise self.refuse(node, index, f"auto_pad={pads} with strides {stride} pads one side more than the "
                                               "other; intforge supports symmetric padding only: export with "
                                               "explicit symmetric pads")
            return [t // 2 for t in total]
        if len(pads) != 4 or pads[:2] != pads[2:]:
            raise self.refuse(node, index, f"pads {pads} are not symmetric (top, left = bottom, right); intforge "
                                           "supports symmetric padding only")
        return pads[:2]

    def op_BatchNormalization(self, node, index, a, ins, out) -> None:
        src = self.producer.get(ins[0])
        if src is None or src.op_type != "Conv" or self.users.get(ins[0], 0) != 1:
            raise self.refuse(node, index, "a BatchNormalization that does not directly follow a Conv (its only "
                                           "user); intforge folds BatchNorm into the conv before it and supports "
                                           "it nowhere else")
        scale, bias, mean, var = (self.const(node, index, ins[k], what).astype(np.float32)
                                  for k, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")))
        bn = torch.nn.BatchNorm2d(len(scale), eps=_decimal(a.get("epsilon", 1e-5)))
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(scale))
            bn.bias.copy_(torch.from_numpy(bias))
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
        path = self.module_path(node, index, node.input[1])
        self.attach(path, bn, node)
        self.call_module(path, ins[0], out)

    def _linear(self, node, index, x: str, w: np.ndarray, b: np.ndarray | None, out: str) -> None:
        w = np.ascontiguousarray(w, np.float32)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w))
            if b is not None:
                lin.bias.copy_(torch.tensor(np.asarray(b, np.float32).reshape(-1)))
        path = self.module_path(node, index, node.input[1])
        self.attach(path, lin, node)
        self.call_module(path, x, out)

    def op_Gemm(self, node, index, a, ins, out) -> None:
        if int(a.get("transA", 0)):
            raise self.refuse(node, index, "Gemm with transA=1; intforge takes activations as (batch, features)")
        w = self.const(node, index, ins[1], "weight (B)") * float(a.get("alpha", 1.0))
        w = w if int(a.get("transB", 0)) else w.T
        b = None
        if len(ins) > 2 and ins[2]:
            b = self.const(node, index, ins[2], "bias (C)") * float(a.get("beta", 1.0))
            if b.size != w.shape[0]:
                raise self.refuse(node, index, f"a bias C of shape {b.shape}; intforge takes one bias per output "
                                               f"({w.shape[0]})")
        self._linear(node, index, ins[0], w, b, out)

    def op_MatMul(self, node, index, a, ins, out) -> None:
        if ins[1] not in self.static and ins[0] not in self.static:  # two activations (attention)
            self.step(torch.matmul, ins[:2], out, node)
            return
        w = self.const(node, index, ins[1], "weight (second input)")
        if w.ndim != 2:
            raise self.refuse(node, index, f"a MatMul with a {w.ndim}-D weight; intforge takes (in, out) weights")
        self._linear(node, index, ins[0], w.T, None, out)  # (an Add of a bias after it folds: _fold_constant)

    def _fold_constant(self, node: Any, op: str, ins: list[str], out: str) -> bool:
        """`layer(x) op c` with c a constant per output channel (or a scalar), the layer a Conv, Gemm or MatMul
        read by nothing else: folded into its weights and bias (a MatMul's bias Add; Caffe's Scale layers
        as Mul and Add). False where that does not apply."""
        if len(ins) != 2 or (ins[0] in self.static) == (ins[1] in self.static):
            return False
        k = 0 if ins[0] in self.static else 1
        act = ins[1 - k]
        layer = self.made.get(act)
        if layer is None or self.users.get(node.input[1 - k], 0) != 1 or (k == 0 and op in ("Sub", "Div")):
            return False
        c = self.static[ins[k]].astype(np.float64)
        n = layer.weight.shape[0]
        channel_axis = 1 if isinstance(layer, torch.nn.Conv2d) else 0  # (C, 1, 1) / (1, C, 1, 1); (F,) / (1, F)
        trailing = c.shape[len(c.shape) - (3 if channel_axis else 1):] if c.ndim else ()
        if c.size == 1:
            per = np.full(n, float(c.ravel()[0]))
        elif c.size == n and len(trailing) and trailing[0] == n and c.ndim <= (4 if channel_axis else 2):
            per = c.reshape(-1)
        else:
            return False
        if op == "Div" and np.any(per == 0):
            return False
        with torch.no_grad():
            w = layer.weight.detach().to(torch.float64)
            b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(n, dtype=torch.float64)
            t = torch.from_numpy(per)
            if op in ("Mul", "Div"):
                s = t if op == "Mul" else 1.0 / t
                w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
                b = b * s
            else:
                b = b + t if op == "Add" else b - t
            layer.weight.copy_(w.to(torch.float32))
            if layer.bias is None:
                layer.bias = torch.nn.Parameter(torch.zeros(n))
            layer.bias.copy_(b.to(torch.float32))
        self.alias[out] = act
        return True

    def _scale_by(self, node: Any, index: int, act: str, number: str, out: str) -> None:
        """out = act * number (Mul) or act / number (Div), the number one value: a constant, or computed
        from shapes at call time (the step reads it either way; the capture sees a scale by a number)."""
        if node.op_type == "Div" and act != self.name(node.input[0]):
            raise self.refuse(node, index, "a number divided by an activation")
        where, div = self.where(node, index), node.op_type == "Div"

        def scale(x: Any, s: Any) -> Any:
            if np.size(s) != 1:
                raise UnsupportedOpError(f"{where}: an activation times a tensor computed from shapes; intforge "
                                         "scales activations by one number")
            c = float(np.asarray(s).ravel()[0])
            return x / c if div else x * c
        self.step(scale, [act, number], out, node)

    def _add_computed(self, node: Any, index: int, act: str, value: str, out: str) -> None:
        """out = act + value, the value a float tensor computed from constants and shapes at call time: for
        the one input shape intforge compiles, a constant tensor, which the capture sees added (as a
        positional embedding)."""
        where = self.where(node, index)

        def add(x: Any, v: Any) -> Any:
            v = np.asarray(v)
            if v.dtype.kind != "f":
                raise UnsupportedOpError(f"{where}: an activation plus integers computed from shapes; intforge "
                                         "adds an activation and a constant float tensor")
            return x + torch.from_numpy(np.ascontiguousarray(v, np.float32))
        self.step(add, [act, value], out, node)

    def op_Mul(self, node, index, a, ins, out) -> None:
        numbers = [i for i in ins[:2] if i in self.static and self.static[i].size == 1]
        if len(numbers) == 1:  # an activation times (or over) a constant number
            self._scale_by(node, index, ins[1] if numbers[0] == ins[0] else ins[0], numbers[0], out)
            return
        raise self.refuse(node, index, f"a {node.op_type} that is not by one number, nor a constant scale per output "
                                       "channel of the Conv, Gemm or MatMul right before it (which would fold into "
                                       "it). An input normalization ((x - mean) / std) inside the graph: apply it "
                                       "to the data instead")

    op_Div = op_Mul

    def op_Sub(self, node, index, a, ins, out) -> None:
        raise self.refuse(node, index, "a Sub that is not of a constant per output channel of the Conv, Gemm or "
                                       "MatMul right before it (which would fold into it). An input normalization "
                                       "((x - mean) / std) inside the graph: apply it to the data instead")

    def _axes(self, node, index, a, ins) -> list[int]:
        if "axes" in a:
            return [int(d) for d in a["axes"]]
        if len(ins) > 1 and ins[1]:
            return [int(d) for d in self.const(node, index, ins[1], "axes").ravel()]
        return []

    def op_Unsqueeze(self, node, index, a, ins, out) -> None:
        axes = self._axes(node, index, a, ins)

        def unsqueeze(x: Any, _axes=tuple(axes)) -> Any:
            for ax in sorted(d % (x.ndim + len(_axes)) for d in _axes):
                x = x.unsqueeze(ax)
            return x
        self.step(unsqueeze, [ins[0]], out, node)

    def op_Squeeze(self, node, index, a, ins, out) -> None:
        axes = self._axes(node, index, a, ins)
        if not axes:
            raise self.refuse(node, index, "a Squeeze without axes; intforge needs the axes to squeeze")
        self.step(lambda x, _axes=tuple(axes): x.squeeze(_axes), [ins[0]], out, node)

    def op_Split(self, node, index, a, ins, out) -> None:
        """A split into slices of one along an axis (timm's q, k, v out of a packed projection, before a
        Squeeze): each part a select, unsqueezed back to the split's rank (the capture has no slice op)."""
        axis, outs = int(a.get("axis", 0)), list(node.output)
        if len(ins) > 1 and ins[1]:
            sizes = [int(d) for d in self.const(node, index, ins[1], "split sizes").ravel()]
        else:
            sizes = [int(d) for d in a.get("split", [])] or None
        if sizes is not None and any(d != 1 for d in sizes):
            raise self.refuse(node, index, f"a Split of an activation into parts of {sizes}; intforge splits into "
                                           "slices of one (q, k, v of a packed projection)")
        where, parts = self.where(node, index), len(outs)
        for i, o in enumerate(outs):
            def part(x: torch.Tensor, _i=i) -> torch.Tensor:
                if x.shape[axis] != parts:
                    raise UnsupportedOpError(f"{where}: a Split of {x.shape[axis]} into {parts} parts; intforge "
                                             "splits into slices of one")
                return x.select(axis, _i).unsqueeze(axis)
            self.step(part, [ins[0]], o, node)

    def op_Slice(self, node, index, a, ins, out) -> None:
        """A slice of one along one axis (the dynamo exporter's q, k, v): a select, unsqueezed."""
        if self.opset < 10:
            starts, ends, axes = a.get("starts", []), a.get("ends", []), a.get("axes")
            steps = None
        else:
            starts, ends = (self.const(node, index, ins[i], what).ravel().tolist()
                            for i, what in ((1, "starts"), (2, "ends")))
            axes = self.const(node, index, ins[3], "axes").ravel().tolist() if len(ins) > 3 and ins[3] else None
            steps = self.const(node, index, ins[4], "steps").ravel().tolist() if len(ins) > 4 and ins[4] else None
        if len(starts) != 1 or (steps is not None and int(steps[0]) != 1):
            raise self.refuse(node, index, "a Slice of an activation over several axes or with a step; intforge "
                                           "takes a slice of one along one axis (q, k, v of a packed projection)")
        axis, start, end = int(axes[0]) if axes else 0, int(starts[0]), int(ends[0])
        where = self.where(node, index)

        def one(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[axis]
            lo, hi = (max(0, min(n, v + n if v < 0 else v)) for v in (start, end))
            if hi - lo != 1:
                raise UnsupportedOpError(f"{where}: a Slice of {hi - lo} along axis {axis}; intforge takes a slice "
                                         "of one (q, k, v of a packed projection)")
            return x.select(axis, lo).unsqueeze(axis)
        self.step(one, [ins[0]], out, node)

    def op_Gather(self, node, index, a, ins, out) -> None:
        idx = self.const(node, index, ins[1], "indices")
        if idx.ndim != 0:
            raise self.refuse(node, index, f"a Gather of {idx.size} indices from an activation; intforge takes one "
                                           "index (a select: x[:, 0], q, k, v of a packed projection)")
        axis = int(a.get("axis", 0))
        self.step(lambda x, _i=int(idx): x.select(axis, _i), [ins[0]], out, node)

    def op_Relu(self, node, index, a, ins, out) -> None:
        self.step(torch.relu, [ins[0]], out, node)

    def op_Clip(self, node, index, a, ins, out) -> None:
        if self.opset < 11:
            lo, hi = a.get("min"), a.get("max")
        else:
            lo = float(self.const(node, index, ins[1], "min")) if len(ins) > 1 and ins[1] else None
            hi = float(self.const(node, index, ins[2], "max")) if len(ins) > 2 and ins[2] else None
        lo = None if lo is None or lo <= -3.0e38 else float(lo)
        hi = None if hi is None or hi >= 3.0e38 else float(hi)
        if lo is None and hi is None:
            self.alias[out] = ins[0]
            return
        self.step(lambda x, _lo=lo, _hi=hi: torch.clamp(x, _lo, _hi), [ins[0]], out, node)

    def op_Add(self, node, index, a, ins, out) -> None:
        if any(i in self.static and self.static[i].size == 1 for i in ins[:2]):
            raise self.refuse(node, index, "an Add of an activation and a number; intforge adds two activations "
                                           "(a residual connection), an activation and a constant tensor (a "
                                           "positional embedding), and folds a constant per output channel into the "
                                           "Conv, Gemm or MatMul right before it")
        self.step(torch.add, [self.parameter(i) if i in self.static else i for i in ins[:2]], out, node)

    def _pool_common(self, node, index, a) -> tuple[list[int], list[int], list[int], bool]:
        k = list(a["kernel_shape"])
        if len(k) != 2:
            raise self.refuse(node, index, f"a {len(k)}-D pooling; intforge supports 2-D pooling only")
        stride = list(a.get("strides", [1, 1]))
        dilation = list(a.get("dilations", [1, 1]))
        pad = self._pads(node, index, a, k, stride, dilation)
        return k, stride, pad, bool(a.get("ceil_mode", 0))

    def op_MaxPool(self, node, index, a, ins, out) -> None:
        if len(node.output) > 1 and node.output[1]:
            raise self.refuse(node, index, "a MaxPool with an Indices output; intforge takes the values only")
        k, stride, pad, ceil = self._pool_common(node, index, a)
        dilation = list(a.get("dilations", [1, 1]))
        self.step(lambda x: torch.nn.functional.max_pool2d(x, k, stride, pad, dilation, ceil), [ins[0]], out, node)

    def op_AveragePool(self, node, index, a, ins, out) -> None:
        k, stride, pad, ceil = self._pool_common(node, index, a)
        if ceil:
            raise self.refuse(node, index, "an AveragePool with ceil_mode=1; intforge supports ceil_mode=0 only")
        include = bool(a.get("count_include_pad", 0))
        self.step(lambda x: torch.nn.functional.avg_pool2d(x, k, stride, pad, False, include), [ins[0]], out, node)

    def op_GlobalAveragePool(self, node, index, a, ins, out) -> None:
        self.step(lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 1), [ins[0]], out, node)

    def op_ReduceMean(self, node, index, a, ins, out) -> None:
        axes = a.get("axes")
        if axes is None and len(ins) > 1 and ins[1]:
            axes = self.const(node, index, ins[1], "axes").ravel().tolist()
        if axes is None or sorted(int(d) % 4 for d in axes) != [2, 3]:
            raise self.refuse(node, index, f"ReduceMean over axes {axes}; intforge supports the spatial mean of NCHW "
                                           "(axes 2, 3) only")
        keep = bool(a.get("keepdims", 1))  # (as adaptive_avg_pool2d: the layer name PyTorch's capture gives)
        self.step(lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 1) if keep else
                  torch.nn.functional.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], x.shape[1]), [ins[0]], out, node)

    def op_Flatten(self, node, index, a, ins, out) -> None:
        axis = int(a.get("axis", 1))
        if axis == 1:
            self.step(lambda x: torch.flatten(x, 1), [ins[0]], out, node)
        else:
            self.step(lambda x: x.reshape(int(np.prod(x.shape[:axis])), -1), [ins[0]], out)

    def op_Reshape(self, node, index, a, ins, out) -> None:
        if self.opset < 5:
            target = np.array(a["shape"], np.int64)
            self.step(lambda x: x.reshape(_reshape_target(tuple(x.shape), target, a)), [ins[0]], out)
            return
        if ins[1] not in self.static and ins[1] not in self.shape_like:
            raise self.refuse(node, index, "a Reshape to a shape computed from activations")
        self.step(lambda x, s: x.reshape(_reshape_target(tuple(x.shape), s, a)), ins[:2], out)

    def op_Concat(self, node, index, a, ins, out) -> None:
        axis = int(a["axis"])  # (a constant among them: a parameter, as a class token concatenated)
        self.step(lambda *xs: torch.cat(xs, axis), [self.parameter(i) if i in self.static else i for i in ins if i],
                  out, node)

    def _erf_gelu(self, node: Any, ins: list[str], out: str) -> bool:
        """GELU as exporters write it without a Gelu op: y = x * (1 + Erf(x / sqrt 2)) * 0.5 (the two Muls in
        either order), each value read by the next node alone. Imported as one GELU (its nodes skipped); False
        where the nodes differ."""
        g = self.graph.node

        def only_user(value: str, op_type: str) -> Any:
            idx = self.consumers.get(value, [])
            one = len(idx) == 1 and self.users.get(value, 0) == 1
            return g[idx[0]] if one and g[idx[0]].op_type == op_type else None

        def other(n: Any, value: str) -> str:
            return n.input[1] if n.input[0] == value else n.input[0]

        def scalar(value: str, want: float, tol: float) -> bool:
            v, made = self.static.get(self.name(value)), self.producer.get(value)
            if v is None and made is not None and made.op_type == "Constant":  # (one written after the Div)
                v = self._constant_value(made, 0, self.attrs(made))
            return v is not None and v.size == 1 and abs(float(v.ravel()[0]) - want) < tol

        x = ins[0]
        if x in self.static or not scalar(node.input[1], 2 ** 0.5, 1e-3):
            return False
        erf = only_user(node.output[0], "Erf")
        add = erf and only_user(erf.output[0], "Add")
        mul = add and scalar(other(add, erf.output[0]), 1.0, 1e-6) and only_user(add.output[0], "Mul")
        last = mul and only_user(mul.output[0], "Mul")
        if not last:
            return False
        factors = [other(mul, add.output[0]), other(last, mul.output[0])]  # x and 0.5, in either order
        if not any(self.name(f) == x and scalar(h, 0.5, 1e-6) for f, h in (factors, factors[::-1])):
            return False
        self.skip.update(self.consumers[v][0] for v in (node.output[0], erf.output[0], add.output[0], mul.output[0]))
        self.step(lambda v: torch.nn.functional.gelu(v), [x], last.output[0], erf)
        return True

    def op_IsNaN(self, node, index, a, ins, out) -> None:
        """Where(IsNaN(p), 0, p), p a Softmax's output: the guard PyTorch's exported scaled_dot_product_attention
        puts on its probabilities (NaN where a row's every key is masked). Imported as p itself (`op_Where`):
        intforge's integer softmax yields no NaN. Any other IsNaN is refused."""
        users = self.consumers.get(node.output[0], [])
        guard = self.graph.node[users[0]] if len(users) == 1 else None
        src = self.producer.get(node.input[0])
        if (guard is None or guard.op_type != "Where" or guard.input[0] != node.output[0]
                or guard.input[2] != node.input[0] or src is None or src.op_type != "Softmax"):
            raise self.refuse(node, index, "an IsNaN other than a softmax's NaN guard (Where(IsNaN(p), 0, p) on a "
                                           "Softmax's output p); intforge's integer arithmetic has no NaN")
        self.nan_guards[out] = ins[0]

    def op_Where(self, node, index, a, ins, out) -> None:
        zero = ins[1] in self.static and not np.any(self.static[ins[1]])
        if ins[0] not in self.nan_guards or self.nan_guards[ins[0]] != ins[2] or not zero:
            raise self.refuse(node, index, "a Where on activations; intforge imports Where on constants, shapes and "
                                           "an attention mask, and a softmax's NaN guard (Where(IsNaN(p), 0, p))")
        self.alias[node.output[0]] = ins[2]

    def op_Softmax(self, node, index, a, ins, out) -> None:
        if self.opset >= 13:
            axis = int(a.get("axis", -1))
            self.step(lambda x: torch.softmax(x, axis), [ins[0]], out, node)
            return
        axis = int(a.get("axis", 1))  # before opset 13: softmax of the input flattened to 2-D at `axis`

        def softmax(x: torch.Tensor) -> torch.Tensor:
            if axis % x.ndim == x.ndim - 1:
                return torch.softmax(x, -1)
            return torch.softmax(x.flatten(axis), -1).reshape(x.shape)
        self.step(softmax, [ins[0]], out, node)

    def op_Transpose(self, node, index, a, ins, out) -> None:
        perm = a.get("perm")
        self.step(lambda x: x.permute(list(perm) if perm is not None else list(range(x.ndim))[::-1]), [ins[0]], out,
                  node)

    def op_LayerNormalization(self, node, index, a, ins, out) -> None:
        if len(node.output) > 1 and any(node.output[1:]):
            raise self.refuse(node, index, "a LayerNormalization with Mean / InvStdDev outputs; intforge takes Y only")
        scale = self.const(node, index, ins[1], "scale").astype(np.float32)
        if scale.ndim != 1:
            raise self.refuse(node, index, f"a LayerNormalization over {scale.ndim} axes (scale of shape "
                              f"{scale.shape}); intforge normalizes over the last axis only")
        bias = self.const(node, index, ins[2], "bias").astype(np.float32) if len(ins) > 2 and ins[2] else None
        ln = torch.nn.LayerNorm(scale.size, eps=_decimal(a.get("epsilon", 1e-5)), bias=bias is not None)
        with torch.no_grad():
            ln.weight.copy_(torch.from_numpy(scale))
            if bias is not None:
                ln.bias.copy_(torch.from_numpy(bias.reshape(-1)))
        path = self.module_path(node, index, node.input[1])
        self.attach(path, ln, node)
        self.call_module(path, ins[0], out)

    def op_Dropout(self, node, index, a, ins, out) -> None:
        self.alias[out] = ins[0]

    def op_Identity(self, node, index, a, ins, out) -> None:
        self.alias[out] = ins[0]


def _name_inputs(mod: OnnxModule) -> None:
    """Give `forward` the file's input names as parameters, so torch.export (and so the program and the
    library's manifest) calls the inputs what the file does (`data`), not `inputs_0`."""
    import inspect
    import keyword

    names: list[str] = []
    for k, raw in enumerate(mod.input_names):
        name = re.sub(r"\W", "_", raw)
        if not name or name[0].isdigit() or keyword.iskeyword(name) or name in names:
            name = f"input_{k}"
        names.append(name)
    generic = mod.forward

    def forward(*inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return generic(*inputs)

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    mod.forward = forward  # type: ignore[method-assign]


def _decimal(value: float) -> float:
    """A float attribute (ONNX stores float32) as the shortest decimal that reads back as it: the 1e-5 an
    exporter was given, not float32's 9.99999975e-06, so an epsilon folds as in the PyTorch model."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _same_pads(auto: str, size: Any, kernel: list[int], stride: list[int], dilation: list[int]) -> list[int]:
    """ONNX auto_pad SAME_UPPER / SAME_LOWER for an input of spatial `size`: [top, left, bottom, right]."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((-(-int(n) // s) - 1) * s + (k - 1) * d + 1 - int(n), 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return [begin[0], begin[1], end[0], end[1]]


def _reshape_target(shape: tuple[int, ...], target: Any, a: dict[str, Any]) -> tuple[int, ...]:
    """ONNX Reshape's target: 0 copies the input's dim there (unless allowzero), -1 is inferred."""
    t = [int(v) for v in np.asarray(target).ravel()]
    if not int(a.get("allowzero", 0)):
        t = [shape[i] if v == 0 and i < len(shape) else v for i, v in enumerate(t)]
    return tuple(t)
