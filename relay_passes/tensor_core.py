"""Emit conv2d / linear ops as fused Tensor Core kernels for a CUDA target.

Every integer conv2d with groups 1 and every linear layer becomes one `call_tir` to a kernel of
`kernels.cuda_tensorcore`: implicit GEMM on `mma.sync`, bias and dyadic requantize fused, weights packed
at compile time. INT4 layers whose activations are 4-bit too run on INT4 Tensor Cores (`m8n8k32`) where
the GPU has them (sm_75 to sm_89); elsewhere their weights are widened to int8 at compile time and they
run on the INT8 path (Hopper). Depthwise / grouped convs and everything else take TVM's generic GPU
lowering (DLight).
"""

from __future__ import annotations

import re

import numpy as np
from tvm import relax

from intforge.kernels.cuda_tensorcore import GemmShape, epilogue_constants, gemm_kernel, pack_weight
from intforge.program import IntegerProgram, IntOp

from .emit import GemmKernel, RelaxOps


def _symbol(op: IntOp) -> str:
    return "intforge_tc_" + re.sub(r"[^0-9A-Za-z_]", "_", op.name)


def tensor_core_kernels(int4_tensor_cores: bool) -> GemmKernel:
    """The `emit_program` hook for a GPU; `int4_tensor_cores` says whether it has INT4 mma."""

    def emit(ops: RelaxOps, program: IntegerProgram, op: IntOp, x: relax.Expr) -> relax.Expr | None:
        a, p = op.attrs, op.params
        x_t, y_t = program.tensors[op.inputs[0]], program.tensors[op.output]
        w = p["weight"]
        if op.kind == "conv2d":
            if int(a["groups"]) != 1:
                return None
            n, c, h, wd = x_t.shape
            shape = GemmShape(n, c, h, wd, w.shape[0], tuple(w.shape[2:]), tuple(a["stride"]),
                              tuple(a["padding"]), tuple(a["dilation"]))
        else:
            if len(x_t.shape) != 2:
                return None
            shape = GemmShape(x_t.shape[0], x_t.shape[1], 1, 1, w.shape[0], dense=True)
        int4 = int4_tensor_cores and int(a.get("weight_bits", 8)) == 4 and x_t.bits <= 4
        func = gemm_kernel(shape, x_t.dtype, y_t.dtype, int(a["qmin"]), int(a["qmax"]), int4)
        gv = ops.bb.add_func(func, _symbol(op))
        consts = epilogue_constants(p["multiplier"], p["shift"], int(a["qmin"]), int(a["qmax"]), y_t.dtype,
                                    shape.out_channels)
        bias = np.zeros(consts[0][0].shape[0], np.int32)
        bias[: shape.out_channels] = np.asarray(p["bias"], np.int32).ravel()
        args = [ops.bb.emit(relax.op.reshape(x, (int(np.prod(x_t.shape)),))),
                relax.const(pack_weight(w, int4), "int8"), relax.const(bias, "int32"),
                *[relax.const(arr, dtype) for arr, dtype in consts]]
        flat = ops.bb.emit(relax.call_tir(gv, args, relax.TensorType((int(np.prod(y_t.shape)),), y_t.dtype)))
        return ops.bb.emit(relax.op.reshape(flat, tuple(int(d) for d in y_t.shape)))

    return emit
