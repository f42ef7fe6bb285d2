"""Relax pass: integer conv2d / matmul -> intforge's CPU kernels, with weights re-laid out at compile time.

Runs before legalization. Where the CPU has a dot-product instruction (x86 AVX512-VNNI `vpdpbusd`,
ARM `sdot`, ARM i8mm `usmmla`/`smmla`, or on any ARM plain NEON widening multiplies in the same shape),
conv2d (groups 1) and dense become the tensorized kernels of `intforge.kernels.blocked_dot`; elsewhere
(x86 without VNNI, and grouped convs) the dot-product layout kernels of `intforge.kernels.dot_product`.
Weights are known at compile time (an INT8 constant, or INT4 nibbles that the shared unpack kernel
expands from a constant), so they are re-laid out in numpy into the kernel's layout and stored that way.
INT4 weights stay nibbles: packed per instruction block for the tensorized kernels, which unpack them
in registers, and re-packed in the new order for the others, whose shared unpack kernel then produces
their layout directly. Convs arrive in NCHW or, after `nhwc_layout_pass`, NHWC with OHWI weights; in
NHWC depthwise convs get the channel-vectorized kernel of `intforge.kernels.depthwise`. Float ops keep
TOPI's lowering. The arithmetic is unchanged: the same integer sums.
With VNNI, depthwise convs of whole 16-channel blocks and at most 4 kernel rows run on `vpdpbusd` instead,
the window's rows as the 4 bytes of a lane (`intforge.kernels.depthwise_dot`); with AVX2's kernels, those
of whole 8-channel blocks on `vpmaddwd`, two window rows a lane (`intforge.kernels.depthwise_avx2`). 3x3
stride-1 convs run as Winograd where `intforge.kernels.winograd.plan` says it pays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import Call, Expr, PyExprMutator, expr_functor

from intforge import dyadic
from intforge.kernels import depthwise_avx2 as dwavx2
from intforge.kernels import depthwise_dot as dwdot
from intforge.kernels import winograd, x86_amx
from intforge.kernels.arm_dot import NEON, SDOT, SMMLA, USMMLA
from intforge.kernels.blocked_dot import (
    TOKEN_KERNEL_ISAS,
    DotIsa,
    Narrow,
    conv2d_blocked,
    conv_weight_layout,
    dense_blocked,
    dense_weight_layout,
    fold_columns,
    fold_weight,
    matmul_blocked,
    matmul_column_term,
    matmul_row_term,
    matmul_shifts,
    pack_int4_blocks,
)
from intforge.kernels.depthwise import depthwise_nhwc
from intforge.kernels.dot_product import SHIFT, conv2d_nhwc_dot, dense_dot
from intforge.kernels.int4 import UNPACK_SYMBOL, pack_int4, unpack_int4
from intforge.kernels.x86_avx2 import AVX2
from intforge.kernels.x86_ifma import BYTE_SHIFT
from intforge.kernels.x86_ifma import LANES as IFMA_LANES
from intforge.kernels.x86_vnni import VNNI
from intforge.relay_passes.bindings import bound_value

# instruction families of the blocked kernels: activation dtype -> the instruction that takes it
BLOCKED = {"vnni": {"uint8": VNNI, "int8": VNNI}, "sdot": {"uint8": SDOT, "int8": SDOT},
           "i8mm": {"uint8": USMMLA, "int8": SMMLA}, "neon": {"uint8": NEON, "int8": NEON},
           "avx2": {"uint8": AVX2, "int8": AVX2}}

_INT_IN = ("int8", "uint8")
OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind kOutEWiseFusable


def _dtype(e: Expr) -> str:
    return str(e.ty.dtype)


def _ints(v) -> tuple[int, ...]:
    return tuple(int(i) for i in v)


@dataclass(frozen=True)
class _Requant:
    """A conv's or dense layer's requantize as `_narrow` found it after the layer: clamp((acc * m + total) >> n)."""

    m: np.ndarray
    total: np.ndarray
    n: np.ndarray
    qmin: int
    qmax: int
    out_dtype: str


@expr_functor.mutator
class _KernelRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, shift_unsigned: bool, blocked: str | None, ifma: bool = False,
                 winograd_convs: bool = False, amx: bool = False) -> None:
        super().__init__(mod)
        self.shift_unsigned = shift_unsigned
        self.blocked = BLOCKED[blocked] if blocked else None
        self.depthwise_dot = blocked == "vnni"  # vpdpbusd over the window's rows: kernels/depthwise_dot.py
        self.ifma = ifma and blocked == "vnni"  # requantize epilogues as 52-bit multiply-adds: kernels/x86_ifma.py
        # and on 32-bit lanes where the quantizer took shift 24 (`Narrow.short`): AVX512F only, so every
        # VNNI CPU, Cascade Lake's too
        self.short = blocked in ("vnni", "avx2")
        # 3x3 convs as Winograd (kernels/winograd.py): products on vpdpwssd, or AVX2's vpmaddwd
        self.winograd = blocked if winograd_convs and blocked in winograd.FLAVOURS else None
        self.amx = amx and blocked == "vnni"  # 1x1 convs and dense layers on AMX's tiles: kernels/x86_amx.py
        self.original: dict = {}  # var -> value in the function as it came (set per function by the pass)
        self.rewritten = 0

    def _bound(self, e: Expr) -> Expr:
        return bound_value(self, e)

    def _weight_value(self, w: Expr) -> tuple[np.ndarray, relax.GlobalVar | None] | None:
        """The weight's int8 values if known at compile time, and the INT4 unpack kernel it came through
        (seen through a permute_dims, which ConvertLayout puts on weights)."""
        bound = self._bound(w)
        if isinstance(bound, tvm.ir.Constant):
            return bound.value.numpy(), None
        if isinstance(bound, Call) and getattr(bound.op, "name", "") == "relax.permute_dims":
            inner = self._weight_value(bound.args[0])
            if inner is None:
                return None
            axes = _ints(bound.attrs.axes) if bound.attrs.axes is not None else None
            return np.ascontiguousarray(np.transpose(inner[0], axes)), inner[1]
        reshape = bound
        if not (isinstance(reshape, Call) and getattr(reshape.op, "name", "") == "relax.reshape"):
            return None
        unpack = self._bound(reshape.args[0])
        if not (isinstance(unpack, Call) and getattr(unpack.op, "name", "") == "relax.call_tir"):
            return None
        gv, args = unpack.args[0], unpack.args[1]
        if not (isinstance(gv, relax.GlobalVar) and gv.name_hint == UNPACK_SYMBOL and len(args) == 1
                and isinstance(args[0], tvm.ir.Constant)):
            return None
        shape = _ints(w.ty.shape)
        return unpack_int4(args[0].value.numpy(), int(np.prod(shape))).reshape(shape), gv

    def _emit_weight(self, arr: np.ndarray, unpack: relax.GlobalVar | None) -> Expr:
        """The re-laid-out weight: a constant, or for INT4 nibbles in the new order and the unpack kernel."""
        if unpack is None:
            return relax.const(arr, "int8")
        flat = self.builder_.emit(relax.call_tir(unpack, [relax.const(pack_int4(arr), "int8")],
                                                 relax.TensorType((arr.size,), "int8")))
        return self.builder_.emit(relax.op.reshape(flat, arr.shape))

    @staticmethod
    def _blocked_weight(arr: np.ndarray, unpack: relax.GlobalVar | None) -> Expr:
        """Blocked weights: int8, or INT4 kept packed for the kernel to unpack block by block."""
        return relax.const(arr if unpack is None else pack_int4_blocks(arr), "int8")

    def _isa(self, x: Expr) -> DotIsa | None:
        return self.blocked[_dtype(x)] if self.blocked else None

    @staticmethod
    def _correction_sums(value: np.ndarray, axes: tuple[int, ...], sign: int) -> np.ndarray:
        """sign * 128 * sum(w) per output channel (int64): what the other signedness's +/-128 added."""
        return sign * SHIFT * value.astype(np.int64).sum(axis=axes)

    @classmethod
    def _correction(cls, value: np.ndarray | None, axes: tuple[int, ...], sign: int) -> Expr | None:
        if value is None:
            return None
        return relax.const(cls._correction_sums(value, axes, sign).astype(np.int32), "int32")

    def _clamp_first(self, requant: _Requant, value: np.ndarray, axes: tuple[int, ...], x_dtype: str,
                     isa: DotIsa) -> tuple[Expr, list[Expr], Callable[..., Narrow]] | None:
        """A conv's requantize in `dyadic.clamp_first`'s form, for its kernel's epilogue: (its correction,
        which also holds -lo, or where the result byte is picked the clamp's low bound (`Narrow.bounds`);
        the epilogue's per-channel constants; a function of their te tensors to the `Narrow`), or None
        where the form would not be exact or the channels are not whole 16-blocks.
        `value`'s `axes` are the ones each output channel sums over."""
        bound = np.abs(value.astype(np.int64)).sum(axis=axes) * (255 if x_dtype == "uint8" else 128)
        # the intrinsic takes whole 16-channel blocks; AVX2's 8-channel tiles vectorize the form themselves
        if bound.size % (isa.lanes if isa.act_dtype == "int16" else IFMA_LANES):
            return None
        form = dyadic.clamp_first(requant.m, requant.n, requant.total, requant.qmin, requant.qmax, bound)
        if form is None:
            return None
        signed_corr = self._correction_sums(value, axes, isa.correction_sign(x_dtype))
        # a conv quantized at dyadic.SHORT_SHIFT: the bounds form on 32-bit lanes (`Narrow.short`)
        short = form.with_shift(dyadic.SHORT_SHIFT, bits=dyadic.SHORT_BITS)
        folded = short.with_bounds(signed_corr, bits=dyadic.SHORT_BITS) if short is not None else None
        if folded is not None:
            first, span, add = folded
            consts = [relax.const(v.astype(np.int32), "int32") for v in (span, short.mul, add, short.shift)]
            return (relax.const(first, "int32"), consts, lambda ss, mm, kk, nn: Narrow(
                ss, mm, kk, nn, requant.out_dtype, whole_bytes=True, bounds=True, short=True))
        if not self.ifma:  # the 52-bit forms need AVX512-IFMA and VBMI
            return None
        # every channel's shift raised to BYTE_SHIFT where that is exact: the kernel then picks bytes, no shifts
        byte = form.with_shift(BYTE_SHIFT)
        # and then the correction folded into the clamp's bounds and the constant (`Narrow.bounds`)
        folded = byte.with_bounds(signed_corr) if byte is not None else None
        form = byte or form
        if folded is not None:
            first, span, add = folded
        else:
            # The correction (signed activations) and -lo as one int32, added on wrapping lanes: exact, as
            # |acc - lo| < 2^31 (clamp_first checked it against the accumulator's bound).
            corr = signed_corr - form.lo
            first = ((corr + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)
            span, add = form.span.astype(np.int32), form.add
        consts = [relax.const(span, "int32"), relax.const(form.mul, "int64"), relax.const(add, "int64"),
                  relax.const(form.shift, "int64")]
        return (relax.const(first, "int32"), consts, lambda ss, mm, kk, nn: Narrow(
            ss, mm, kk, nn, requant.out_dtype, whole_bytes=byte is not None, bounds=folded is not None))

    @staticmethod
    def _blocked_conv(value: np.ndarray, stride, pad, dilation, isa: DotIsa, layout: str):
        """(te function of (x, weights, correction, epilogue), the OIHW weights it takes) of a groups-1
        conv on the blocked kernel; an RGB stem in NHWC on VNNI or AVX2 with its window rows folded into
        the channels (`blocked_dot.fold_columns`)."""
        o, c, kh, kw = value.shape
        fold = layout == "NHWC" and isa.name in ("vnni", "avx2") and fold_columns(c, (kh, kw), dilation, isa)

        def conv(xx, ww, cc, narrow):
            return conv2d_blocked(xx, ww, cc, o, stride, pad, dilation, isa, layout, narrow, kw if fold else None)

        return conv, (fold_weight(value, isa) if fold else value)

    def _epilogue(self, requant: _Requant | None, value: np.ndarray, axes: tuple[int, ...], x: Expr, isa: DotIsa
                  ) -> tuple[Expr | None, list[Expr], Callable[..., Narrow] | None]:
        """A blocked kernel's correction (activations of the other signedness run shifted by 128, corrected
        by the weight sums), and with `requant` its `_clamp_first` epilogue: (correction or None, the
        epilogue's constants, the function to its `Narrow`, or None without one)."""
        if requant is not None and (found := self._clamp_first(requant, value, axes, _dtype(x), isa)) is not None:
            return found
        sign = isa.correction_sign(_dtype(x))
        return (self._correction(value, axes, sign) if sign else None), [], None

    def _call(self, fn, name: str, x: Expr, w: Expr, corr: Expr | None) -> Expr:
        self.rewritten += 1
        args = [x, w] + ([corr] if corr is not None else [])
        return self.builder_.call_te(lambda xx, ww, *cc: fn(xx, ww, cc[0] if cc else None), *args,
                                     primfunc_name_hint=name)

    def _conv2d(self, call: Call, requant: _Requant | None = None) -> Expr | None:
        """The conv's kernel; with `requant`, the kernel that also requantizes (x86 IFMA), or None where
        there is none for this conv."""
        a = call.attrs
        x, w = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
        nhwc = layouts == ("NHWC", "OHWI", "NHWC")
        if layouts != ("NCHW", "OIHW", "NCHW") and not nhwc:
            return None
        if _dtype(x) not in _INT_IN or _dtype(w) != "int8" or str(a.out_dtype) != "int32":
            return None
        channels = int(x.ty.shape[3 if nhwc else 1])
        depthwise = int(w.ty.shape[3 if nhwc else 1]) == 1 and int(a.groups) == channels == int(w.ty.shape[0])
        if depthwise and not nhwc:  # no channel reduction for a dot product to run over: TOPI's lowering
            return None
        pad = _ints(a.padding)
        if len(pad) == 4 and (pad[0], pad[1]) != (pad[2], pad[3]):
            return None  # asymmetric padding: not produced by our frontend; keep TOPI's lowering
        known = self._weight_value(w)
        if known is None:
            return None
        value, unpack = known
        stride, dilation, groups = _ints(a.strides)[:2], _ints(a.dilation)[:2], int(a.groups)
        if depthwise:  # NHWC: vectorized across channels; weights [C, KH, KW, 1] -> [KH, KW, C]
            w_hwc = np.ascontiguousarray(value[..., 0].transpose(1, 2, 0))
            self.rewritten += 1
            if self.depthwise_dot and dwdot.supported(channels, w_hwc.shape[0]):
                kh = w_hwc.shape[0]
                pairs = dwdot.row_pairs(int(x.ty.shape[1]), kh, stride, pad[:2], dilation)
                corr, consts, epilogue = self._epilogue(requant, w_hwc, (0, 1), x, VNNI)
                if requant is not None and epilogue is None:
                    return None
                return self.builder_.call_te(
                    lambda xx, ww, *rest: dwdot.depthwise_dot(
                        xx, ww, rest[0] if corr is not None else None, stride, pad[:2], dilation, kh,
                        epilogue(*rest[1:]) if epilogue else None, pairs),
                    x, self._blocked_weight(dwdot.weight_layout(w_hwc, pairs), unpack),
                    *([corr] if corr is not None else []), *consts,
                    primfunc_name_hint="depthwise_dot_ifma" if epilogue else "depthwise_dot",
                    primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            # INT4 stays packed: the kernel unpacks a channel block's window once per row it sweeps
            wk = relax.const(w_hwc if unpack is None else pack_int4(w_hwc), "int8")
            kernel = w_hwc.shape[:2]
            isa = self._isa(x)
            if isa is not None and isa.name == "avx2" and unpack is None and dwavx2.supported(channels):
                # AVX2: two window rows a vpmaddwd lane (kernels/depthwise_avx2.py)
                kh = int(kernel[0])
                pairs = dwavx2.row_pairs(int(x.ty.shape[1]), kh, stride, pad[:2], dilation)
                columns = dwavx2.column_pairs(stride, dilation, pairs)
                wk = relax.const(dwavx2.weight_layout(w_hwc, pairs, columns), "int16")
                kw = int(kernel[1]) if columns else None
                if requant is None:
                    return self.builder_.call_te(
                        lambda xx, ww: dwavx2.depthwise_pairs(xx, ww, stride, pad[:2], dilation, kh, column_kw=kw),
                        x, wk, primfunc_name_hint="depthwise_avx2",
                        primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
                bounds, consts, epilogue = self._epilogue(requant, w_hwc, (0, 1), x, isa)
                if epilogue is None:
                    return None
                return self.builder_.call_te(
                    lambda xx, ww, bb, *rest: dwavx2.depthwise_pairs(xx, ww, stride, pad[:2], dilation, kh,
                                                                     epilogue(*rest), bb, column_kw=kw),
                    x, wk, bounds, *consts, primfunc_name_hint="depthwise_avx2_narrow",
                    primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            if requant is not None:
                # the short ClampFirst epilogue in the window sum's expression, where the kernels take
                # activations of either signedness as they are (AVX2's: no correction to add)
                if isa is None or isa.act_dtype != "int16":
                    return None
                bounds, consts, epilogue = self._epilogue(requant, w_hwc, (0, 1), x, isa)
                if epilogue is None:
                    return None
                return self.builder_.call_te(
                    lambda xx, ww, bb, *rest: depthwise_nhwc(xx, ww, stride, pad[:2], dilation, kernel,
                                                             epilogue(*rest), bb),
                    x, wk, bounds, *consts, primfunc_name_hint="depthwise_nhwc_narrow",
                    primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            return self.builder_.call_te(lambda xx, ww: depthwise_nhwc(xx, ww, stride, pad[:2], dilation, kernel),
                                         x, wk, primfunc_name_hint="depthwise_nhwc",
                                         # a conv to fusion (its sum has no reduce axis, which would make
                                         # it elementwise): requantize fuses after it, another conv not
                                         primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
        if nhwc:
            value = np.ascontiguousarray(value.transpose(0, 3, 1, 2))  # OHWI -> OIHW
            if (self.amx and groups == 1 and unpack is None and x86_amx.conv_supported(
                    x.ty.shape, value.shape[0], value.shape[2:], stride, pad[:2], dilation, _dtype(x))
                    and (out := self._amx_conv(x, value, pad[:2], requant)) is not None):
                return out
            plan = (winograd.plan(*(int(x.ty.shape[i]) for i in range(3)), channels, value.shape[0],
                                  value.shape[2:], stride, pad[:2], dilation, self.winograd)
                    if self.winograd and groups == 1 and unpack is None else None)
            if plan is not None and winograd.exact(value, plan.tiling):
                # with the CPU's IFMA epilogue, the requantize in the kernel; else it stays a separate
                # chain (None here), fused after the kernel when the conv itself is visited
                return self._winograd_conv(x, value, plan, requant)
        layout = layouts[0]
        if (self.amx and nhwc and groups == 1 and unpack is None and value.shape[2:] == (1, 1)
                and stride == (1, 1) and dilation == (1, 1) and not any(pad)):
            n, h, wd = (int(x.ty.shape[i]) for i in range(3))
            out = self._amx_dense(self.builder_.emit(relax.op.reshape(x, (n * h * wd, channels))),
                                  value.reshape(value.shape[0], channels), requant, "conv2d_amx")
            if out is not None:  # (a view of the same bytes, as is the input's reshape)
                return relax.op.reshape(self.builder_.emit(out), (n, h, wd, value.shape[0]))
        isa = self._isa(x)
        if isa is not None and groups == 1:
            corr, consts, epilogue = self._epilogue(requant, value, (1, 2, 3), x, isa)
            if requant is not None and epilogue is None:
                return None
            conv, value = self._blocked_conv(value, stride, pad[:2], dilation, isa, layout)
            self.rewritten += 1
            return self.builder_.call_te(
                lambda xx, ww, *rest: conv(xx, ww, rest[0] if corr is not None else None,
                                           epilogue(*rest[1:]) if epilogue else None),
                x, self._blocked_weight(conv_weight_layout(value, isa), unpack),
                *([corr] if corr is not None else []), *consts,
                primfunc_name_hint=f"conv2d_{isa.name}" + ("_ifma" if epilogue else ""))
        if requant is not None:
            return None
        shift = self.shift_unsigned and _dtype(x) == "uint8"
        corr = self._correction(value, (1, 2, 3), 1) if shift else None
        w_ohwi = np.ascontiguousarray(value.transpose(0, 2, 3, 1))
        return self._call(lambda xx, ww, cc: conv2d_nhwc_dot(xx, ww, cc, stride, pad[:2], dilation, groups,
                                                             self.shift_unsigned, layout),
                          "conv2d_dot", x, self._emit_weight(w_ohwi, unpack), corr)

    def _amx_dense(self, x: Expr, value: np.ndarray, requant: _Requant | None, name: str) -> Expr | None:
        """x [M, K] @ value[N, K]^T on AMX's tiles (kernels/x86_amx.py), with `requant` the kernel that also
        requantizes; None where the shape is not the tile kernel's or the requantize has no kernel form."""
        rows, k = (int(d) for d in x.ty.shape)
        if not x86_amx.supported(rows, k, value.shape[0], _dtype(x)):
            return None
        isa = x86_amx.isa(_dtype(x))
        corr, consts, epilogue = self._epilogue(requant, value, (1,), x, isa)
        if requant is not None and epilogue is None:
            return None
        self.rewritten += 1
        n = value.shape[0]
        return self.builder_.call_te(
            lambda xx, ww, *rest: x86_amx.dense_amx(xx, ww, rest[0] if corr is not None else None, n,
                                                    epilogue(*rest[1:]) if epilogue else None),
            x, relax.const(dense_weight_layout(value, VNNI), "int8"), *([corr] if corr is not None else []),
            *consts, primfunc_name_hint=name + ("_ifma" if epilogue else ""),
            primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _amx_conv(self, x: Expr, value: np.ndarray, padding: tuple[int, int], requant: _Requant | None) -> Expr | None:
        """A stride-1 windowed conv (OIHW weights `value`) on AMX's tiles (`x86_amx.conv2d_amx`); with
        `requant` the kernel that also requantizes, or None where that form has no kernel."""
        isa = x86_amx.isa(_dtype(x))
        corr, consts, epilogue = self._epilogue(requant, value, (1, 2, 3), x, isa)
        if requant is not None and epilogue is None:
            return None
        o, c, kh, kw = value.shape
        weights = conv_weight_layout(value, VNNI).reshape(o // VNNI.lanes, kh * kw, c // VNNI.group, VNNI.lanes,
                                                          VNNI.group)
        self.rewritten += 1
        return self.builder_.call_te(
            lambda xx, ww, *rest: x86_amx.conv2d_amx(xx, ww, rest[0] if corr is not None else None, o, padding,
                                                     (kh, kw), epilogue(*rest[1:]) if epilogue else None),
            x, relax.const(weights, "int8"), *([corr] if corr is not None else []), *consts,
            primfunc_name_hint="conv2d_amx_window" + ("_ifma" if epilogue else ""),
            primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _winograd_conv(self, x: Expr, value: np.ndarray, plan: winograd.Plan,
                       requant: _Requant | None = None) -> Expr | None:
        """A 3x3 stride-1 conv (OIHW weights `value`) on the Winograd kernel, its int32 output corrected
        like the blocked kernels' (uint8 input runs centred: +128 * sum(w)); with `requant`, the kernel
        that also requantizes in `_clamp_first`'s form, or None where that form would not be exact."""
        if requant is not None and not winograd.whole_tiles(*(int(x.ty.shape[i]) for i in (1, 2)), plan.tiling):
            return None  # (partial tiles: the epilogue stays a separate chain)
        corr, consts, epilogue = self._epilogue(requant, value, (1, 2, 3), x, winograd.WINOGRAD)
        if requant is not None and epilogue is None:
            return None
        o = value.shape[0]
        self.rewritten += 1
        return self.builder_.call_te(
            lambda xx, ww, *rest: winograd.conv2d_winograd(
                xx, ww, rest[0] if corr is not None else None, o, epilogue(*rest[1:]) if epilogue else None,
                self.winograd, plan.by_channels),
            x, relax.const(winograd.flavour_weights(value, self.winograd, plan.tiling), "int16"),
            *([corr] if corr is not None else []), *consts,
            primfunc_name_hint="conv2d_winograd" + ("_ifma" if epilogue else ""),
            primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _widened(self, e: Expr) -> Expr | None:
        """The 8-bit activation an int32 operand was widened from (`astype`), else None."""
        e = self._orig(e)
        if isinstance(e, Call) and getattr(e.op, "name", "") == "relax.astype" and str(e.attrs.dtype) == "int32":
            inner = self.visit_expr(e.args[0])
            if _dtype(inner) in _INT_IN:
                return inner
        return None

    def _activation_matmul(self, call: Call) -> Expr | None:
        """A matmul of two widened 8-bit activations with the same leading axes (the emitter's attention
        products) as the blocked kernel with its operand packed at run time (`matmul_blocked`)."""
        if str(call.attrs.out_dtype) != "int32":
            return None
        a, b = (self._widened(arg) for arg in call.args)
        if a is None or b is None:
            return None
        isa = self._isa(a)
        sa, sb = ([int(d) for d in v.ty.shape] for v in (a, b))
        if (isa is None or isa.name not in TOKEN_KERNEL_ISAS or len(sa) < 2 or len(sa) != len(sb)
                or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]):
            return None
        self.rewritten += 1
        shift_a, shift_b = matmul_shifts(_dtype(a), _dtype(b), isa)
        terms = []
        if shift_b:
            terms.append(self.builder_.emit(self.builder_.call_te(
                lambda aa: matmul_row_term(aa, _dtype(b), isa), a, primfunc_name_hint="matmul_row_term")))
        if shift_a:
            terms.append(self.builder_.emit(self.builder_.call_te(
                lambda bb: matmul_column_term(bb, _dtype(a), isa), b, primfunc_name_hint="matmul_column_term")))

        def kernel(aa, bb, *tt):
            rest = list(tt)
            row = rest.pop(0) if shift_b else None
            return matmul_blocked(aa, bb, isa, row, rest.pop(0) if shift_a else None)

        return self.builder_.call_te(kernel, a, b, *terms, primfunc_name_hint=f"matmul_{isa.name}",
                                     primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _matmul(self, call: Call, requant: _Requant | None = None) -> Expr | None:
        """The dense kernel of x @ W; with `requant`, the kernel that also requantizes, or None where there
        is none for this layer."""
        out = self._activation_matmul(call) if requant is None else None
        if out is not None:
            return out
        x, wt = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        if _dtype(x) not in _INT_IN or _dtype(wt) != "int8" or str(call.attrs.out_dtype) != "int32":
            return None
        if len(x.ty.shape) != 2 or len(wt.ty.shape) != 2:
            return None
        known = self._weight_value(wt)
        if known is None:
            return None
        value, unpack = np.ascontiguousarray(known[0].T), known[1]  # emitted as x @ W^T; the kernels take W
        isa = self._isa(x)
        n = value.shape[0]
        if self.amx and unpack is None and (out := self._amx_dense(x, value, requant, "dense_amx")) is not None:
            return out
        if isa is not None and requant is not None:
            corr, consts, epilogue = self._epilogue(requant, value, (1,), x, isa)
            if epilogue is None:
                return None
            self.rewritten += 1
            return self.builder_.call_te(
                lambda xx, ww, cc, *rest: dense_blocked(xx, ww, cc, n, isa, epilogue(*rest)),
                x, self._blocked_weight(dense_weight_layout(value, isa), unpack), corr, *consts,
                primfunc_name_hint=f"dense_{isa.name}_ifma")
        if requant is not None:
            return None
        if isa is not None:
            sign = isa.correction_sign(_dtype(x))
            corr = self._correction(value, (1,), sign) if sign else None
            return self._call(lambda xx, ww, cc: dense_blocked(xx, ww, cc, n, isa), f"dense_{isa.name}", x,
                              self._blocked_weight(dense_weight_layout(value, isa), unpack), corr)
        corr = self._correction(value, (1,), 1) if self.shift_unsigned and _dtype(x) == "uint8" else None
        return self._call(lambda xx, ww, cc: dense_dot(xx, ww, cc, self.shift_unsigned), "dense_dot", x,
                          self._emit_weight(value, unpack), corr)

    def _orig(self, e: Expr) -> Expr:
        """What `e` is bound to in the function as it came, through chains of variables."""
        while isinstance(e, relax.Var) and e in self.original:
            e = self.original[e]
        return e

    def _channel_const(self, e: Expr, channels: int) -> np.ndarray | None:
        """A constant (seen through a permute_dims) as one int64 value per channel, else None."""
        e = self._orig(e)
        axes = None
        if isinstance(e, Call) and getattr(e.op, "name", "") == "relax.permute_dims":
            axes = _ints(e.attrs.axes) if e.attrs.axes is not None else None
            e = self._orig(e.args[0])
        if not isinstance(e, tvm.ir.Constant):
            return None
        value = e.value.numpy()
        if value.ndim and axes is not None:
            value = np.transpose(value, axes)
        if value.size == 1:
            return np.full(channels, int(value.ravel()[0]), dtype=np.int64)
        if value.ndim not in (2, 4) or any(d != 1 for d in value.shape[:-1]) or value.shape[-1] != channels:
            return None  # per-channel along the last axis only (NHWC, or a dense layer's features)
        return value.reshape(channels).astype(np.int64)

    def _narrow(self, call: Call) -> Expr | None:
        """astype(clip(right_shift(add(multiply(astype(conv2d, int64), m), total), n), lo, hi)), the
        requantize of an NHWC conv, as one kernel that also requantizes (`_conv2d` with the `_Requant`),
        or None where there is none."""
        out_dtype = str(call.attrs.dtype)
        if out_dtype not in _INT_IN:
            return None
        chain, names = [], ("relax.clip", "relax.right_shift", "relax.add", "relax.multiply", "relax.astype",
                            ("relax.nn.conv2d", "relax.matmul"))
        e = call
        for name in names:
            e = self._orig(e.args[0])
            if not (isinstance(e, Call) and getattr(e.op, "name", "") in ((name,) if isinstance(name, str) else name)):
                return None
            chain.append(e)
        clip, shift, add, mul, wide, layer = chain
        if str(wide.attrs.dtype) != "int64":
            return None
        if layer.op.name == "relax.matmul":  # a dense layer: x [M, K] @ W^T [K, N], constants [1, N]
            if len(layer.args[1].ty.shape) != 2:
                return None
            channels = int(layer.args[1].ty.shape[1])
        else:
            a = layer.attrs
            if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NHWC", "OHWI", "NHWC"):
                return None
            channels = int(layer.args[1].ty.shape[0])
        consts = [self._channel_const(v, channels) for v in (mul.args[1], add.args[1], shift.args[1])]
        if any(c is None for c in consts):
            return None
        m, total, n = consts
        requant = _Requant(m, total, n, int(clip.args[1].value), int(clip.args[2].value), out_dtype)
        if layer.op.name == "relax.matmul":
            return self._matmul(layer, requant)
        return self._conv2d(layer, requant)

    def visit_call_(self, call: Call) -> Expr:
        name = getattr(call.op, "name", "")
        out = None
        if name == "relax.astype" and self.short:  # (self.ifma implies it)
            out = self._narrow(call)
            if out is not None:
                return out
        if name == "relax.permute_dims" and call.attrs.axes is not None:
            axes = _ints(call.attrs.axes)
            if list(axes) == sorted(axes):  # the identity (ConvertLayout leaves these at outputs)
                return self.visit_expr(call.args[0])
            arg = self._bound(self.visit_expr(call.args[0]))
            if isinstance(arg, tvm.ir.Constant):  # a constant ConvertLayout re-laid out: fold it, once
                value = np.ascontiguousarray(np.transpose(arg.value.numpy(), axes))
                return relax.const(value, str(value.dtype))
            if (isinstance(arg, Call) and getattr(arg.op, "name", "") == "relax.permute_dims"
                    and arg.attrs.axes is not None):  # two transposes in a row: one, or none
                inner = _ints(arg.attrs.axes)
                composed = [inner[i] for i in axes]
                if composed == sorted(composed):
                    return arg.args[0]
                return relax.op.permute_dims(arg.args[0], composed)
        if name == "relax.nn.conv2d":
            out = self._conv2d(call)
        elif name == "relax.matmul":
            out = self._matmul(call)
        return out if out is not None else super().visit_call_(call)


def dot_product_layout_pass(shift_unsigned: bool, blocked: str | None = None, ifma: bool = False,
                            winograd_convs: bool = False, amx: bool = False) -> tvm.transform.Pass:
    """The rewrite as a module pass, followed by dead-code elimination (the original weights and their
    unpacking go). `shift_unsigned`: the CPU multiplies s8 x s8 but not u8 x s8 (sdot without usdot), so
    unsigned activations of the contiguous-layout kernels run shifted by -128 with a weight-sum
    correction. `blocked`: the instruction family of the tensorized kernels, "vnni" (x86 AVX512-VNNI),
    "sdot" (ARM dot product), "i8mm" (ARM usmmla/smmla) or "neon" (ARM without either), or None for the
    contiguous-layout kernels. With "vnni" the requantize of a conv with whole 16-channel blocks runs
    inside the conv kernel on 32-bit lanes where its shifts are dyadic.SHORT_SHIFT (`Narrow.short`), and
    with `ifma` (x86 AVX512-IFMA and VBMI) also as 52-bit multiply-adds where they are not. `winograd_convs`
    (with "vnni"): 3x3 stride-1 convs that gain on it run as exact Winograd F(4x4, 3x3) on vpdpwssd. `amx`
    (with "vnni"): 1x1 stride-1 convs and dense layers of shapes the tile kernel takes run on AMX-INT8
    (`intforge.kernels.x86_amx`)."""

    @tvm.transform.module_pass(opt_level=0, name="intforge.DotProductLayout")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _KernelRewriter(mod, shift_unsigned, blocked, ifma, winograd_convs, amx)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.original = dict(relax.analysis.get_var2val(func))
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _run
