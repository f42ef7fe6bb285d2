"""The reference executor: runs an integer program with plain numpy integers. It is the golden model.

Integer products and sums are exact. Convolution and matmul sums are evaluated in float64 so they can
use BLAS; that is exact because every partial sum is bounded by the int32 accumulator bound the
quantizer proves (|acc| < 2^31 << 2^53), and the result is converted back to int64 before anything
else touches it. Requantization, pooling, adds and clamps go through `dyadic`, the same definitions
the Relax emitter uses.
"""

from __future__ import annotations

import numpy as np

from . import dyadic, nonlinear
from .dyadic import NUMPY_OPS as OPS
from .errors import IntforgeError
from .program import IntegerProgram, IntOp, check_index_values


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of a pooling window sweep, with PyTorch's ceil_mode rule."""
    eff = d * (k - 1) + 1
    if ceil_mode:
        out = -(-(size + 2 * p - eff) // s) + 1
        if (out - 1) * s >= size + p:  # the last window must start inside the input or left pad
            out -= 1
        return out
    return (size + 2 * p - eff) // s + 1


def _windows(xp: np.ndarray, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int], out_hw: tuple[int, int]):
    """Stack of strided views: result[i, j, n, c, y, x] = xp[n, c, y*s0 + i*d0, x*s1 + j*d1]."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = k, s, d, out_hw
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            cols.append(xp[:, :, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw])
        rows.append(np.stack(cols))
    return np.stack(rows)


def conv2d_acc(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Exact integer convolution (NCHW x OIHW), returned as int64."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ph, pw = padding
    ho = pool_output_size(h, kh, stride[0], ph, dilation[0], False)
    wo = pool_output_size(wd, kw, stride[1], pw, dilation[1], False)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = _windows(xp, (kh, kw), stride, dilation, (ho, wo))  # kh, kw, n, c, ho, wo
    cols = cols.reshape(kh, kw, n, groups, cg, ho, wo)
    wg = w.astype(np.float64).reshape(groups, o // groups, cg, kh, kw)
    out = np.einsum("ijngcyx,gocij->ngoyx", cols, wg, optimize=True)
    return np.rint(out).astype(np.int64).reshape(n, o, ho, wo)


def _conv2d(op: IntOp, x: np.ndarray, out_t) -> np.ndarray:
    a = op.attrs
    acc = conv2d_acc(x, op.params["weight"], a["stride"], a["padding"], a["dilation"], a["groups"])
    m = op.params["multiplier"].reshape(1, -1, 1, 1)
    n = op.params["shift"].reshape(1, -1, 1, 1)
    return dyadic.requantize(OPS, acc.astype(np.int32), m, n, op.attrs["qmin"], op.attrs["qmax"], out_t.dtype,
                             bias=op.params["bias"].reshape(1, -1, 1, 1))


def matmul_acc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer a @ b (any leading dims), as int64: float64 sums are exact below 2^53, and the quantizer
    proves every accumulator stays below 2^31."""
    return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)


def _linear(op: IntOp, x: np.ndarray, out_t) -> np.ndarray:
    acc = matmul_acc(x, op.params["weight"].T)
    m = op.params["multiplier"].reshape(1, -1)
    n = op.params["shift"].reshape(1, -1)
    return dyadic.requantize(OPS, acc.astype(np.int32), m, n, op.attrs["qmin"], op.attrs["qmax"], out_t.dtype,
                             bias=op.params["bias"].reshape(1, -1))


def _max_pool2d(op: IntOp, x: np.ndarray) -> np.ndarray:
    a = op.attrs
    (kh, kw), s, (ph, pw), d = a["kernel"], a["stride"], a["padding"], a["dilation"]
    n, c, h, w = x.shape
    ho = pool_output_size(h, kh, s[0], ph, d[0], a["ceil_mode"])
    wo = pool_output_size(w, kw, s[1], pw, d[1], a["ceil_mode"])
    # Pad with a value below any representable integer, so padding never wins (PyTorch's -inf).
    extra_h = max(0, (ho - 1) * s[0] + d[0] * (kh - 1) + 1 - (h + 2 * ph))
    extra_w = max(0, (wo - 1) * s[1] + d[1] * (kw - 1) + 1 - (w + 2 * pw))
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)),
                constant_values=np.iinfo(np.int64).min)
    out = _windows(xp, (kh, kw), s, d, (ho, wo)).max(axis=(0, 1))
    return out.astype(x.dtype)


def _avg_pool2d(op: IntOp, x: np.ndarray, out_t) -> np.ndarray:
    a = op.attrs
    (kh, kw), s, (ph, pw) = a["kernel"], a["stride"], a["padding"]
    n, c, h, w = x.shape
    ho = pool_output_size(h, kh, s[0], ph, 1, False)
    wo = pool_output_size(w, kw, s[1], pw, 1, False)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    acc = _windows(xp, (kh, kw), s, (1, 1), (ho, wo)).sum(axis=(0, 1)).astype(np.int32)
    m = op.params["multiplier"].reshape(1, 1, ho, wo)
    return dyadic.requantize(OPS, acc, m, int(op.attrs["shift"]), a["qmin"], a["qmax"], out_t.dtype)


def run_op(program: IntegerProgram, op: IntOp, args: list[np.ndarray]) -> np.ndarray:
    """Execute one integer op on numpy integer arrays."""
    out_t = program.tensors[op.output]
    a = op.attrs
    if op.kind == "conv2d":
        return _conv2d(op, args[0], out_t)
    if op.kind == "linear":
        return _linear(op, args[0], out_t)
    if op.kind == "add":
        return dyadic.residual_add(OPS, args, op.params["multipliers"], op.shift, a["qmin"], a["qmax"], out_t.dtype,
                                   op.params.get("offset", 0))
    if op.kind == "concat":
        parts = [
            dyadic.requantize(OPS, x, int(m), int(n), a["qmin"], a["qmax"], out_t.dtype)
            for x, m, n in zip(args, op.params["multipliers"], op.params["shifts"], strict=True)
        ]
        return np.concatenate(parts, axis=a["axis"])
    if op.kind == "requantize":
        return dyadic.requantize(OPS, args[0], int(op.params["multiplier"]), int(a["shift"]), a["qmin"], a["qmax"],
                                 out_t.dtype)
    if op.kind == "clamp":
        return OPS.clip(args[0], a["lo"], a["hi"]).astype(out_t.dtype)
    if op.kind == "max_pool2d":
        return _max_pool2d(op, args[0])
    if op.kind == "avg_pool2d":
        return _avg_pool2d(op, args[0], out_t)
    if op.kind == "reshape":
        return args[0].reshape(out_t.shape)
    if op.kind == "constant":
        return op.params["value"].copy()
    if op.kind == "transpose":
        return np.ascontiguousarray(np.transpose(args[0], a["axes"]))
    if op.kind == "select":
        return np.ascontiguousarray(np.take(args[0], a["index"], axis=a["axis"]))
    if op.kind == "matmul":
        acc = matmul_acc(args[0], args[1]).astype(np.int32)
        return dyadic.requantize(OPS, acc, int(op.params["multiplier"]), int(a["shift"]), a["qmin"], a["qmax"],
                                 out_t.dtype)
    if op.kind == "pad":
        t, left, b, r = a["pads"]
        return np.pad(args[0], ((0, 0), (0, 0), (t, b), (left, r)))
    if op.kind in nonlinear.KINDS:
        return nonlinear.run(nonlinear.NUMPY_TENSOR_OPS, op.kind, a, op.params, args[0], out_t.dtype, *args[1:])
    raise IntforgeError(f"the reference executor has no rule for op kind {op.kind!r} ({op.name})")


def run_int(program: IntegerProgram, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run the program on integer inputs (already quantized); returns the integer outputs."""
    env: dict[str, np.ndarray] = {}
    for name, x in zip(program.inputs, inputs, strict=True):
        t = program.tensors[name]
        x = np.asarray(x)
        if tuple(x.shape) != tuple(t.shape):
            raise IntforgeError(f"input {name!r} has shape {tuple(x.shape)}, the program expects {t.shape}")
        env[name] = x.astype(t.dtype)
    for op in program.ops:
        env[op.output] = run_op(program, op, [env[i] for i in op.inputs])
    return [env[o] for o in program.outputs]


def quantize_inputs(program: IntegerProgram, *inputs: np.ndarray) -> list[np.ndarray]:
    """The float input boundary, exactly as the .so computes it."""
    out = []
    for name, x in zip(program.inputs, inputs, strict=True):
        t = program.tensors[name]
        if t.index_dtype is not None:  # token ids, a mask: integers, passed as they are
            out.append(check_index_values(name, x, t.index_dtype, *t.index_range, error=IntforgeError))
            continue
        x = np.asarray(x, dtype=np.float32)
        dyadic.refuse_nan(name, x)
        out.append(dyadic.quantize_float(OPS, x, t.scale, t.qmin, t.qmax, t.dtype))
    return out


def dequantize_outputs(program: IntegerProgram, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """The float output boundary, exactly as the .so computes it."""
    return [dyadic.dequantize_int(OPS, q, program.tensors[name].scale) for name, q in zip(program.outputs, outputs,
                                                                                          strict=True)]


def run_float(program: IntegerProgram, *inputs: np.ndarray) -> list[np.ndarray]:
    """Float in, float out: quantize prologue, integer program, dequantize epilogue."""
    return dequantize_outputs(program, run_int(program, *quantize_inputs(program, *inputs)))
