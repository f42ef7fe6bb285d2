"""The integer program: intforge's target-independent specification of a quantized model.

Every op carries its integer parameters (weights, int32 bias, dyadic multipliers and shifts,
saturation bounds). The reference executor (`reference.py`) runs it with numpy integers, the Relax
emitter (`intforge.relay_passes.emit`) lowers it to TVM; both must agree bit for bit.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dyadic import int_range, storage_dtype
from .errors import ArtifactError

#: The op kinds an integer program may contain, with the meaning of their attrs/params.
OP_KINDS = {
    "conv2d": "int conv (NCHW/OIHW) + int32 bias, requantized per output channel",
    "linear": "int matmul (x @ weight.T) + int32 bias, requantized per output feature",
    "add": "residual add: both inputs rescaled to the output scale with a shared shift (per channel where the "
           "output has outlier channels), saturated",
    "concat": "each input requantized to the output scale, then concatenated",
    "requantize": "rescale a tensor to another scale / bit width (8-bit producer feeding an INT4 layer)",
    "clamp": "saturate to [lo, hi] on the integers (standalone ReLU / ReLU6 / hardtanh)",
    "max_pool2d": "max over windows, on the integers",
    "avg_pool2d": "integer window sum times a dyadic 1/count (per output position)",
    "reshape": "reshape / flatten, integers unchanged",
    "constant": "a parameter read as an activation (positional embedding, class token): `value`, quantized",
    "transpose": "permute the axes (`axes`), integers unchanged",
    "select": "the slice at `index` of axis `axis`, that axis dropped, integers unchanged",
    "matmul": "int matmul of two activations (attention's Q K^T and P V), one dyadic requantize for the tensor",
    "pad": "zeros around H and W (`pads` top, left, bottom, right): the real 0, as zero points are 0",
    "lut": "elementwise function (GELU, SiLU, sigmoid, ...) as a table of 2^bits outputs indexed by x - in_qmin",
    "softmax": "softmax over the last axis: an exp table on x - max(x), one integer division a row; uint8 at 1/q; "
               "with attrs mask ('keys' from a (batch, keys) mask input, 'causal', 'causal_keys') left-out keys "
               "are 0",
    "embedding": "rows of an int8 table gathered by integer token ids (one scale for the table)",
    "layernorm": "LayerNorm over the last axis: integer mean and variance, exact integer square root, "
                 "gamma / beta / output scale as a per-channel dyadic multiply-add; an input with outlier "
                 "channels first multiplied by in_mul (2^channel_exp) to one step",
}

PROGRAM_FORMAT = 1


def check_index_values(name: str, x: Any, dtype: str, lo: int, hi: int, role: str = "",
                       error: type[Exception] = ArtifactError) -> np.ndarray:
    """An integer input's values (token ids, a mask) as `dtype`, refused with `error` (naming the input, its
    role and range) where they are not integers in [lo, hi]: an id past the vocabulary has no row to gather.
    Calibration, the reference and the library's boundary all check with this."""
    x = np.asarray(x)
    what = f"input '{name}'" + (f" ({role})" if role else "")
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise error(f"{what} takes integers ({dtype}), got dtype {x.dtype}")
    if x.size and (int(x.min()) < lo or int(x.max()) > hi):
        raise error(f"{what} takes values in [{lo}, {hi}], got [{int(x.min())}, {int(x.max())}]")
    return x.astype(dtype, copy=False)


@dataclass
class QTensor:
    """A quantized tensor: real value = scale * (q - zero_point)."""

    name: str
    shape: tuple[int, ...]
    scale: float
    bits: int = 8
    signed: bool = True
    zero_point: int = 0
    #: An integer input read as itself (token ids, an attention mask): its dtype, with no scale (1.0), and
    #: the values the caller may pass, [lo, hi] (checked at the boundary).
    index_dtype: str | None = None
    index_range: tuple[int, int] | None = None
    #: Outlier channels (a transformer's residual stream): channel c of the last axis has the step
    #: scale * 2^channel_exp[c] (`quantize.channel_exponents`); None: one step for the tensor.
    channel_exp: tuple[int, ...] | None = None

    @property
    def steps(self) -> float | np.ndarray:
        """The real value of one integer step: the scale, or per channel of the last axis."""
        if self.channel_exp is None:
            return self.scale
        return self.scale * np.exp2(np.asarray(self.channel_exp, dtype=np.float64))

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    @property
    def dtype(self) -> str:
        return self.index_dtype or storage_dtype(self.bits, self.signed)


@dataclass
class IntOp:
    """One integer op; `name` is the stable layer name shared with the layer table and the planner."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def shift(self) -> np.ndarray | int:
        """The op's rounding shift: one a channel (params, as a conv's or an add's with outlier channels) or
        one for the op (attrs)."""
        return self.params["shift"] if "shift" in self.params else self.attrs["shift"]


@dataclass
class IntegerProgram:
    """A whole quantized model: tensors, ops in execution order, and the float boundary."""

    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, QTensor]
    ops: list[IntOp]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> QTensor:
        return self.tensors[name]

    def layers(self) -> list[dict[str, Any]]:
        """The table of quantizable layers (conv2d / linear): name, kind, shape, bits, MACs."""
        rows = []
        for op in self.ops:
            if op.kind not in ("conv2d", "linear"):
                continue
            w = op.params["weight"]
            out = self.tensors[op.output]
            k = int(np.prod(w.shape[1:]))
            macs = int(np.prod(out.shape)) * k
            rows.append(
                {
                    "name": op.name,
                    "kind": op.kind,
                    "weight_shape": list(w.shape),
                    "weight_bits": int(op.attrs.get("weight_bits", 8)),
                    "act_bits": self.tensors[op.inputs[0]].bits,
                    "params": int(np.prod(w.shape)),
                    # what the .so stores: INT4 packed two per byte
                    "weight_bytes": -(-int(np.prod(w.shape)) * int(op.attrs.get("weight_bits", 8)) // 8),
                    "macs": macs,
                }
            )
        return rows

    def validate(self) -> None:
        """Refuse a program that breaks the integer contract (zero / non-finite scales, bad multipliers)."""
        from .errors import QuantizationError

        for t in self.tensors.values():
            if not (np.isfinite(t.scale) and t.scale > 0):
                raise QuantizationError(
                    f"tensor '{t.name}' has scale {t.scale!r}; scales must be positive and finite. A zero "
                    "scale means the tensor was never calibrated (or was constant zero): recalibrate."
                )
        for op in self.ops:
            for key in ("multiplier", "multipliers"):
                if key in op.params:
                    m = op.params[key]
                    if m.dtype != np.int64 or np.any(m < 0) or np.any(m >= (1 << 31)):
                        raise QuantizationError(f"op '{op.name}': {key} must be int64 in [0, 2^31)")
            for key in ("shift", "shifts"):
                vals = op.params.get(key, op.attrs.get(key) if key == "shift" else None)
                if vals is not None and (np.any(np.asarray(vals) < 0) or np.any(np.asarray(vals) > 62)):
                    raise QuantizationError(f"op '{op.name}': {key} must lie in [0, 62]")
            out = self.tensors[op.output]
            for key in ("qmin", "qmax", "lo", "hi"):
                if key in op.attrs and not out.qmin <= op.attrs[key] <= out.qmax:
                    raise QuantizationError(f"op '{op.name}': {key}={op.attrs[key]} outside {out.dtype}")

    # -- serialization: one zip holding program.json and the arrays as .npy ----------------------
    def save(self, path: str | Path) -> Path:
        """Write the program to `path` (a zip of JSON + .npy arrays)."""
        path = Path(path)
        header = {
            "format": PROGRAM_FORMAT,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tensors": [_qtensor_json(t) for t in self.tensors.values()],
            "ops": [
                {
                    "kind": op.kind,
                    "name": op.name,
                    "inputs": op.inputs,
                    "output": op.output,
                    "attrs": op.attrs,
                    "params": sorted(op.params),
                    "source": op.source,
                }
                for op in self.ops
            ],
            "meta": self.meta,
        }
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("program.json", json.dumps(header, indent=1))
            for i, op in enumerate(self.ops):
                for key, arr in op.params.items():
                    buf = io.BytesIO()
                    np.save(buf, arr, allow_pickle=False)
                    zf.writestr(f"params/{i}/{key}.npy", buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> IntegerProgram:
        """Read a program written by `save`."""
        path = Path(path)
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"cannot read integer program {path}: {exc}") from None
        with zf:
            header = json.loads(zf.read("program.json"))
            if header.get("format") != PROGRAM_FORMAT:
                raise ArtifactError(
                    f"{path} is integer-program format {header.get('format')}, this intforge reads "
                    f"format {PROGRAM_FORMAT}; recompile the model with this version."
                )
            tensors = {}
            for t in header["tensors"]:
                for key in ("shape", "index_range", "channel_exp"):
                    if t.get(key) is not None:
                        t[key] = tuple(t[key])
                tensors[t["name"]] = QTensor(**t)
            ops = []
            for i, o in enumerate(header["ops"]):
                params = {k: np.load(io.BytesIO(zf.read(f"params/{i}/{k}.npy"))) for k in o.pop("params")}
                ops.append(IntOp(params=params, **o))
        return cls(header["inputs"], header["outputs"], tensors, ops, header.get("meta", {}))


def _qtensor_json(t: QTensor) -> dict[str, Any]:
    d = asdict(t)
    d["shape"] = list(t.shape)
    return d
