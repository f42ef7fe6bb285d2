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
from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx

from intforge.kernels.cuda_tensorcore import BM, BN, GemmShape, epilogue_constants, gemm_kernel, pack_weight
from intforge.program import IntegerProgram, IntOp

from .emit import GemmKernel, RelaxOps


def _symbol(op: IntOp) -> str:
    return "intforge_tc_" + re.sub(r"[^0-9A-Za-z_]", "_", op.name)


@dataclass
class LayerKernel:
    """One layer's Tensor Core kernel and the compile-time arrays it takes after its input: the packed
    weights and the requantize constants (the bias folded in), in argument order (name -> array, dtype)."""

    func: tirx.PrimFunc
    shape: GemmShape
    constants: dict[str, tuple[np.ndarray, str]]

    @property
    def grid(self) -> tuple[int, int]:
        """(blockIdx.x, blockIdx.y) extents of the launch."""
        return -(-self.shape.m // BM), self.constants["c0"][0].shape[0] // BN


def layer_kernel(program: IntegerProgram, op: IntOp, int4_tensor_cores: bool) -> LayerKernel | None:
    """The fused kernel for a conv2d (groups 1) or linear op, or None when the op stays generic."""
    if op.kind not in ("conv2d", "linear"):
        return None
    a, p = op.attrs, op.params
    x_t, y_t = program.tensors[op.inputs[0]], program.tensors[op.output]
    w = p["weight"]
    if op.kind == "conv2d":
        if int(a["groups"]) != 1:
            return None
        n, c, h, wd = x_t.shape
        shape = GemmShape(n, c, h, wd, w.shape[0], tuple(w.shape[2:]), tuple(a["stride"]),
                          tuple(a["padding"]), tuple(a["dilation"]))
    elif op.kind == "linear" and len(x_t.shape) == 2:
        shape = GemmShape(x_t.shape[0], x_t.shape[1], 1, 1, w.shape[0], dense=True)
    else:
        return None
    int4 = int4_tensor_cores and int(a.get("weight_bits", 8)) == 4 and x_t.bits <= 4
    func = gemm_kernel(shape, x_t.dtype, y_t.dtype, int(a["qmin"]), int(a["qmax"]), int4)
    consts = epilogue_constants(p["multiplier"], p["shift"], p["bias"], int(a["qmin"]), int(a["qmax"]),
                                y_t.dtype, shape.out_channels)
    constants = {"wp": (pack_weight(w, int4), "int8"), **{f"c{i}": c for i, c in enumerate(consts)}}
    return LayerKernel(func, shape, constants)


def tensor_core_kernels(int4_tensor_cores: bool) -> GemmKernel:
    """The `emit_program` hook for a GPU; `int4_tensor_cores` says whether it has INT4 mma."""

    def emit(ops: RelaxOps, program: IntegerProgram, op: IntOp, x: relax.Expr) -> relax.Expr | None:
        kernel = layer_kernel(program, op, int4_tensor_cores)
        if kernel is None:
            return None
        x_t, y_t = program.tensors[op.inputs[0]], program.tensors[op.output]
        gv = ops.bb.add_func(kernel.func, _symbol(op))
        args = [ops.bb.emit(relax.op.reshape(x, (int(np.prod(x_t.shape)),))),
                *[relax.const(arr, dtype) for arr, dtype in kernel.constants.values()]]
        flat = ops.bb.emit(relax.call_tir(gv, args, relax.TensorType((int(np.prod(y_t.shape)),), y_t.dtype)))
        return ops.bb.emit(relax.op.reshape(flat, tuple(int(d) for d in y_t.shape)))

    return emit
