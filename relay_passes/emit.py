"""Emit an integer program as a Relax IRModule of integer ops.

Convolutions and matmuls become int8/uint8 x int8 -> int32 Relax ops; requantization is lowered to a
dyadic multiply, rounding shift and clamp by calling `intforge.dyadic` with a Relax backend (`RelaxOps`),
so the emitted arithmetic is the reference's arithmetic by construction. With boundary="float" the
function takes float32 inputs and returns float32 outputs through one quantize prologue and one
dequantize epilogue; with boundary="int" it is integer-only end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.op import nn as rnn

from intforge import dyadic, nonlinear
from intforge.errors import IntforgeError
from intforge.kernels.int4 import UNPACK_SYMBOL, pack_int4, unpack_int4_func
from intforge.kernels.isqrt import ISQRT_SYMBOL, isqrt_func
from intforge.program import IntegerProgram, IntOp

BOUNDARIES = ("float", "int")


class RelaxOps:
    """`intforge.dyadic.IntOps` that emits Relax bindings into a BlockBuilder."""

    def __init__(self, bb: relax.BlockBuilder) -> None:
        self.bb = bb
        self._unpack: relax.GlobalVar | None = None
        self._isqrt: relax.GlobalVar | None = None

    def unpack_int4(self, packed: np.ndarray, shape: tuple[int, ...]) -> relax.Expr:
        """Packed INT4 constant -> int8 tensor of `shape`, through the one shared unpack kernel."""
        if self._unpack is None:
            self._unpack = self.bb.add_func(unpack_int4_func(), UNPACK_SYMBOL)
        count = int(np.prod(shape))
        flat = self.bb.emit(relax.call_tir(self._unpack, [relax.const(packed, "int8")],
                                           relax.TensorType((count,), "int8")))
        return self.bb.emit(relax.op.reshape(flat, shape))

    def const(self, value: np.ndarray | int, dtype: str) -> relax.Expr:
        arr = np.asarray(value, dtype=dtype)
        return relax.const(arr, dtype) if arr.ndim else relax.const(arr.item(), dtype)

    def cast(self, x: relax.Expr, dtype: str) -> relax.Expr:
        if _dtype(x) == dtype:
            return x
        return self.bb.emit(relax.op.astype(x, dtype))

    def add(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.add(a, b))

    def mul(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.multiply(a, b))

    def right_shift(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.right_shift(a, b))

    def clip(self, x: relax.Expr, lo: int | float, hi: int | float) -> relax.Expr:
        return self.bb.emit(relax.op.clip(x, lo, hi))

    def round(self, x: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.round(x))

    # the rest of `intforge.nonlinear.TensorOps`
    def sub(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.subtract(a, b))

    def take(self, table: np.ndarray, index: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.take(relax.const(table, str(table.dtype)), index, axis=0, mode="clip"))

    def max_last(self, x: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.max(x, axis=-1, keepdims=True))

    def sum_last(self, x: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.sum(x, axis=-1, keepdims=True))

    def floor_divide(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        return self.bb.emit(relax.op.floor_divide(a, b))

    def isqrt(self, v: relax.Expr) -> relax.Expr:
        """floor(sqrt(v)) through the one shared TIR kernel (`intforge.kernels.isqrt`)."""
        if self._isqrt is None:
            self._isqrt = self.bb.add_func(isqrt_func(), ISQRT_SYMBOL)
        shape = self.shape(v)
        count = int(np.prod(shape))
        flat = self.bb.emit(relax.op.reshape(v, (count,)))
        root = self.bb.emit(relax.call_tir(self._isqrt, [flat], relax.TensorType((count,), "int64")))
        return self.bb.emit(relax.op.reshape(root, shape))

    def shape(self, x: relax.Expr) -> tuple[int, ...]:
        return tuple(int(d) for d in x.ty.shape)

    def reshape(self, x: relax.Expr, shape: tuple[int, ...]) -> relax.Expr:
        return self.bb.emit(relax.op.reshape(x, shape))


def _dtype(x: relax.Expr) -> str:
    return str(x.ty.dtype)


def _per_channel(arr: np.ndarray, ndim: int, axis: int = 1) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(arr).reshape(shape)


def _weight(ops: RelaxOps, w: np.ndarray, bits: int) -> relax.Expr:
    """The int8 weight operand: a constant, or for INT4 a packed constant unpacked by a TIR kernel."""
    if bits == 8:
        return relax.const(np.ascontiguousarray(w), "int8")
    return ops.unpack_int4(pack_int4(w), tuple(int(d) for d in w.shape))


def _emit_conv2d(ops: RelaxOps, op: IntOp, x: relax.Expr, out_dtype: str) -> relax.Expr:
    a, p = op.attrs, op.params
    w = _weight(ops, p["weight"], int(a.get("weight_bits", 8)))
    acc = ops.bb.emit(rnn.conv2d(x, w, strides=a["stride"], padding=a["padding"],
                                 dilation=a["dilation"], groups=a["groups"], out_dtype="int32"))
    return dyadic.requantize(ops, acc, _per_channel(p["multiplier"], 4), _per_channel(p["shift"], 4),
                             a["qmin"], a["qmax"], out_dtype, bias=_per_channel(p["bias"], 4))


def _emit_linear(ops: RelaxOps, op: IntOp, x: relax.Expr, out_dtype: str) -> relax.Expr:
    a, p = op.attrs, op.params
    shape = ops.shape(x)
    if len(shape) > 2:  # tokens: (batch, ..., features) as one (rows, features) matmul, the kernels' form
        x = ops.bb.emit(relax.op.reshape(x, (int(np.prod(shape[:-1])), shape[-1])))
    wt = _weight(ops, np.ascontiguousarray(p["weight"].T), int(a.get("weight_bits", 8)))
    acc = ops.bb.emit(relax.op.matmul(x, wt, out_dtype="int32"))
    y = dyadic.requantize(ops, acc, p["multiplier"].reshape(1, -1), p["shift"].reshape(1, -1),
                          a["qmin"], a["qmax"], out_dtype, bias=p["bias"].reshape(1, -1))
    if len(shape) > 2:
        y = ops.bb.emit(relax.op.reshape(y, (*shape[:-1], int(p["weight"].shape[0]))))
    return y


def _emit_avg_pool2d(ops: RelaxOps, op: IntOp, x: relax.Expr, out_dtype: str) -> relax.Expr:
    a = op.attrs
    kh, kw = a["kernel"]
    _, c, h, w = (int(d) for d in x.ty.shape)
    x32 = ops.cast(x, "int32")
    if [kh, kw] == [h, w] and a["padding"] == [0, 0]:
        acc = ops.bb.emit(relax.op.sum(x32, axis=[2, 3], keepdims=True))
    else:  # window sums as a depthwise convolution with a kernel of ones (zero padding adds nothing)
        ones = relax.const(np.ones((c, 1, kh, kw), np.int32), "int32")
        acc = ops.bb.emit(rnn.conv2d(x32, ones, strides=a["stride"], padding=a["padding"], groups=c,
                                     out_dtype="int32"))
    m = op.params["multiplier"]
    return dyadic.requantize(ops, acc, m.reshape(1, 1, *m.shape), int(a["shift"]), a["qmin"], a["qmax"],
                             out_dtype)


#: A target's own fused kernel for a conv2d / linear op: (ops, program, op, input) -> output, or None to
#: leave the op to the generic Relax lowering.
GemmKernel = Callable[[RelaxOps, IntegerProgram, IntOp, relax.Expr], "relax.Expr | None"]


def emit_op(ops: RelaxOps, program: IntegerProgram, op: IntOp, args: list[relax.Expr],
            gemm_kernel: GemmKernel | None = None) -> relax.Expr:
    """Emit one integer op; returns the Relax value of its output."""
    out_t = program.tensors[op.output]
    a = op.attrs
    if gemm_kernel is not None and op.kind in ("conv2d", "linear"):
        got = gemm_kernel(ops, program, op, args[0])
        if got is not None:
            return got
    if op.kind == "conv2d":
        return _emit_conv2d(ops, op, args[0], out_t.dtype)
    if op.kind == "linear":
        return _emit_linear(ops, op, args[0], out_t.dtype)
    if op.kind == "add":
        return dyadic.residual_add(ops, args, op.params["multipliers"], op.shift, a["qmin"], a["qmax"], out_t.dtype,
                                   op.params.get("offset", 0))
    if op.kind == "concat":
        parts = [dyadic.requantize(ops, x, int(m), int(n), a["qmin"], a["qmax"], out_t.dtype)
                 for x, m, n in zip(args, op.params["multipliers"], op.params["shifts"], strict=True)]
        return ops.bb.emit(relax.op.concat(parts, axis=a["axis"]))
    if op.kind == "requantize":
        return dyadic.requantize(ops, args[0], int(op.params["multiplier"]), int(a["shift"]), a["qmin"], a["qmax"],
                                 out_t.dtype)
    if op.kind == "clamp":
        return ops.clip(args[0], int(a["lo"]), int(a["hi"]))
    if op.kind == "max_pool2d":
        return ops.bb.emit(rnn.max_pool2d(args[0], pool_size=a["kernel"], strides=a["stride"],
                                          padding=a["padding"], dilation=a["dilation"], ceil_mode=a["ceil_mode"]))
    if op.kind == "avg_pool2d":
        return _emit_avg_pool2d(ops, op, args[0], out_t.dtype)
    if op.kind == "reshape":
        return ops.bb.emit(relax.op.reshape(args[0], out_t.shape))
    if op.kind == "constant":
        return relax.const(np.ascontiguousarray(op.params["value"]), out_t.dtype)
    if op.kind == "transpose":
        return ops.bb.emit(relax.op.permute_dims(args[0], a["axes"]))
    if op.kind == "select":
        axis, i = a["axis"], a["index"]
        part = ops.bb.emit(relax.op.strided_slice(args[0], axes=[axis], begin=[i], end=[i + 1]))
        return ops.bb.emit(relax.op.reshape(part, out_t.shape))
    if op.kind == "matmul":  # two activations (attention), widened: u8 x s8 has no Relax form of its own
        acc = ops.bb.emit(relax.op.matmul(ops.cast(args[0], "int32"), ops.cast(args[1], "int32"), out_dtype="int32"))
        return dyadic.requantize(ops, acc, int(op.params["multiplier"]), int(a["shift"]), a["qmin"], a["qmax"],
                                 out_t.dtype)
    if op.kind == "pad":
        t, left, b, r = a["pads"]
        return ops.bb.emit(rnn.pad(args[0], [0, 0, 0, 0, t, b, left, r], "constant", 0.0))
    if op.kind in nonlinear.KINDS:
        return nonlinear.run(ops, op.kind, a, op.params, args[0], out_t.dtype, *args[1:])
    raise IntforgeError(f"the Relax emitter has no rule for op kind {op.kind!r} ({op.name})")


def boundary_shape(shape: tuple[int, ...], io_layout: str) -> tuple[int, ...]:
    """A tensor's shape at the function boundary: NCHW as in the program, or NHWC for 4-D tensors."""
    if io_layout == "NHWC" and len(shape) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    return tuple(shape)


def emit_program(program: IntegerProgram, boundary: str = "float", func_name: str = "main",
                 gemm_kernel: GemmKernel | None = None, io_layout: str = "NCHW") -> Any:
    """Build the IRModule whose `func_name` computes `program` (see the module docstring). `gemm_kernel`
    lets a target emit its own fused kernels for conv2d / linear (the GPU's Tensor Core kernels).
    `io_layout="NHWC"`: 4-D inputs and outputs are NHWC at the function's boundary (the program itself
    stays NCHW); on NHWC targets the layout passes then cancel the transposes, which is how one layer is
    timed alone without transposes the whole model would not have."""
    if boundary not in BOUNDARIES:
        raise IntforgeError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if io_layout not in ("NCHW", "NHWC"):
        raise IntforgeError(f"io_layout must be NCHW or NHWC, got {io_layout!r}")
    nhwc = io_layout == "NHWC"
    bb = relax.BlockBuilder()
    ops = RelaxOps(bb)
    params = []
    for name in program.inputs:
        t = program.tensors[name]
        dtype = "float32" if boundary == "float" and t.index_dtype is None else t.dtype
        params.append(relax.Var(name, relax.TensorType(boundary_shape(t.shape, io_layout), dtype)))
    with bb.function(func_name, params, attrs={"intforge.boundary": boundary}):
        with bb.dataflow():
            env: dict[str, relax.Expr] = {}
            for name, var in zip(program.inputs, params, strict=True):
                t = program.tensors[name]
                if nhwc and len(t.shape) == 4:
                    var = bb.emit(relax.op.permute_dims(var, [0, 3, 1, 2]))
                env[name] = dyadic.quantize_float(ops, var, t.scale, t.qmin, t.qmax, t.dtype) \
                    if boundary == "float" and t.index_dtype is None else var
            for op in program.ops:
                env[op.output] = emit_op(ops, program, op, [env[i] for i in op.inputs], gemm_kernel)
            outs = []
            for name in program.outputs:
                q = env[name]
                if nhwc and len(program.tensors[name].shape) == 4:
                    q = bb.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
                outs.append(dyadic.dequantize_int(ops, q, program.tensors[name].scale) if boundary == "float"
                            else q)
            result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
            gv = bb.emit_output(result)
        bb.emit_func_output(gv)
    return bb.get()
