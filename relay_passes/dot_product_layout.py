"""Relax pass: integer conv2d / matmul -> the dot-product kernels of `intforge.kernels.dot_product`.

Runs before legalization on targets with integer dot-product instructions. Weights that are constants
(INT8) are re-laid out in numpy at compile time, so the .so carries them pre-packed in the kernel's
layout; INT4 weights come out of the unpack kernel at run time and are transposed there by a Relax op.
Depthwise convolutions (one input channel per group: nothing to reduce over channels) and float ops
keep TOPI's lowering. The arithmetic is unchanged: the same integer sums, bit for bit.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import Call, Expr, PyExprMutator, expr_functor

from intforge.kernels.dot_product import SHIFT, conv2d_nhwc_dot, dense_dot
from intforge.kernels.x86_vnni import GROUP, LANES, blocks, conv2d_vnni, dense_vnni

_INT_IN = ("int8", "uint8")


def _dtype(e: Expr) -> str:
    return str(e.ty.dtype)


def _ints(v) -> tuple[int, ...]:
    return tuple(int(i) for i in v)


@expr_functor.mutator
class _DotProductRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, shift_unsigned: bool, vnni: bool) -> None:
        super().__init__(mod)
        self.shift_unsigned = shift_unsigned
        self.vnni = vnni
        self.rewritten = 0

    def _vnni_correction(self, x: Expr, w_np: np.ndarray, axes: tuple[int, ...]) -> Expr | None:
        """vpdpbusd is u8 x s8: signed activations run as a + 128, corrected by -128 * sum(w)."""
        if _dtype(x) != "int8":
            return None
        return relax.const((-SHIFT * w_np.astype(np.int64).sum(axis=axes)).astype(np.int32), "int32")

    def _conv2d_vnni(self, x: Expr, w_np: np.ndarray, a, pad: tuple[int, ...]) -> Expr:
        o, c, kh, kw = w_np.shape
        ob, cb = blocks(o, LANES), blocks(c, GROUP)
        wpad = np.zeros((ob * LANES, cb * GROUP, kh, kw), np.int8)
        wpad[:o, :c] = w_np
        # [O, C, KH, KW] -> [O/16, 16, C/4, 4, KH, KW] -> [O/16, KH, KW, C/4, 16, 4]
        packed = wpad.reshape(ob, LANES, cb, GROUP, kh, kw).transpose(0, 4, 5, 2, 1, 3)
        corr = self._vnni_correction(x, w_np, (1, 2, 3))
        args = [x, relax.const(np.ascontiguousarray(packed), "int8")] + ([corr] if corr is not None else [])
        self.rewritten += 1
        return self.builder_.call_te(
            lambda xx, ww, *cc: conv2d_vnni(xx, ww, cc[0] if cc else None, o, _ints(a.strides)[:2], pad[:2],
                                            _ints(a.dilation)[:2]),
            *args, primfunc_name_hint="conv2d_vnni")

    def _dense_vnni(self, x: Expr, w_np: np.ndarray) -> Expr:
        n, k = w_np.shape
        nb, kb = blocks(n, LANES), blocks(k, GROUP)
        wpad = np.zeros((nb * LANES, kb * GROUP), np.int8)
        wpad[:n, :k] = w_np
        packed = wpad.reshape(nb, LANES, kb, GROUP).transpose(0, 2, 1, 3)  # [N/16, K/4, 16, 4]
        corr = self._vnni_correction(x, w_np, (1,))
        args = [x, relax.const(np.ascontiguousarray(packed), "int8")] + ([corr] if corr is not None else [])
        self.rewritten += 1
        return self.builder_.call_te(lambda xx, ww, *cc: dense_vnni(xx, ww, cc[0] if cc else None, n), *args,
                                     primfunc_name_hint="dense_vnni")

    def _correction(self, w: Expr, w_np: np.ndarray | None, x: Expr, axes: list[int]) -> Expr | None:
        if not (self.shift_unsigned and _dtype(x) == "uint8"):
            return None
        if w_np is not None:
            corr = SHIFT * w_np.astype(np.int64).sum(axis=tuple(axes))
            return relax.const(corr.astype(np.int32), "int32")
        w32 = self.builder_.emit(relax.op.astype(w, "int32"))
        total = self.builder_.emit(relax.op.sum(w32, axis=axes))
        return self.builder_.emit(relax.op.multiply(total, relax.const(SHIFT, "int32")))

    def _conv2d(self, call: Call) -> Expr | None:
        a = call.attrs
        x, w = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            return None
        if _dtype(x) not in _INT_IN or _dtype(w) != "int8" or str(a.out_dtype) != "int32":
            return None
        if int(w.ty.shape[1]) == 1:  # depthwise: no channel reduction for a dot product to run over
            return None
        pad = _ints(a.padding)
        if len(pad) == 4 and (pad[0], pad[1]) != (pad[2], pad[3]):
            return None  # asymmetric padding: not produced by our frontend; keep TOPI's lowering
        if self.vnni and isinstance(w, tvm.ir.Constant) and int(a.groups) == 1:
            return self._conv2d_vnni(x, w.value.numpy(), a, pad)
        if isinstance(w, tvm.ir.Constant):
            w_np = w.value.numpy()
            w_ohwi = relax.const(np.ascontiguousarray(w_np.transpose(0, 2, 3, 1)), "int8")
        else:
            w_np = None
            w_ohwi = self.builder_.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
        corr = self._correction(w, w_np, x, [1, 2, 3])
        args = [x, w_ohwi] + ([corr] if corr is not None else [])
        self.rewritten += 1
        return self.builder_.call_te(
            lambda xx, ww, *cc: conv2d_nhwc_dot(xx, ww, cc[0] if cc else None, _ints(a.strides)[:2],
                                                pad[:2], _ints(a.dilation)[:2], int(a.groups),
                                                self.shift_unsigned),
            *args, primfunc_name_hint="conv2d_dot")

    def _matmul(self, call: Call) -> Expr | None:
        x, wt = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        if _dtype(x) not in _INT_IN or _dtype(wt) != "int8" or str(call.attrs.out_dtype) != "int32":
            return None
        if len(x.ty.shape) != 2 or len(wt.ty.shape) != 2:
            return None
        if self.vnni and isinstance(wt, tvm.ir.Constant):
            return self._dense_vnni(x, np.ascontiguousarray(wt.value.numpy().T))
        if isinstance(wt, tvm.ir.Constant):  # emitted as x @ W^T: store W ([N, K], K contiguous) instead
            w_np = np.ascontiguousarray(wt.value.numpy().T)
            w = relax.const(w_np, "int8")
        else:
            w_np = None
            w = self.builder_.emit(relax.op.permute_dims(wt, [1, 0]))
        corr = self._correction(w, w_np, x, [1])
        args = [x, w] + ([corr] if corr is not None else [])
        self.rewritten += 1
        return self.builder_.call_te(
            lambda xx, ww, *cc: dense_dot(xx, ww, cc[0] if cc else None, self.shift_unsigned),
            *args, primfunc_name_hint="dense_dot")

    def visit_call_(self, call: Call) -> Expr:
        name = getattr(call.op, "name", "")
        out = None
        if name == "relax.nn.conv2d":
            out = self._conv2d(call)
        elif name == "relax.matmul":
            out = self._matmul(call)
        return out if out is not None else super().visit_call_(call)


def dot_product_layout_pass(shift_unsigned: bool, vnni: bool = False) -> tvm.transform.Pass:
    """The rewrite as a module pass. `shift_unsigned`: the CPU multiplies s8 x s8 but not u8 x s8 (sdot
    without usdot), so unsigned activations run shifted by -128 with a weight-sum correction. `vnni`:
    x86 with AVX512-VNNI; INT8 conv2d (groups 1) and dense use the tensorized vpdpbusd kernels."""

    @tvm.transform.module_pass(opt_level=0, name="intforge.DotProductLayout")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _DotProductRewriter(mod, shift_unsigned, vnni)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _run
