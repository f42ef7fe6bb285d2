"""Relax pass: each residual add as one elementwise kernel over its two 8-bit inputs.

The emitter writes a residual add as Relax ops: each term cast to int64 and multiplied by its dyadic
multiplier, then the sum's rounding shift and clamp (`dyadic.rescale_sum`). FuseOps then puts a term's
cast and multiply into the function of the conv that produces it whenever that conv has no other
consumer, as a ResNet downsample branch has none: that conv wrote its output as an int64 tensor (8x the
bytes) for the add to read back. Here the whole chain becomes one `residual_add` kernel, computed by the
same `dyadic.rescale_sum` on TIR expressions, which fuses after one conv and reads the other's int8
output. It runs after the NHWC layout pass: ConvertLayout cannot see into a call_tir, and would wrap it
in transposes.
"""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm.relax import Call, Expr, PyExprMutator, expr_functor

from intforge import dyadic
from intforge.kernels.tir_ops import TirChannelOps
from intforge.relay_passes.bindings import bound_value

_BYTES = ("int8", "uint8")


def _op(e: Expr, name: str) -> bool:
    return isinstance(e, Call) and getattr(e.op, "name", "") == name


def _scalar(e: Expr) -> int | None:
    if isinstance(e, tvm.ir.Constant) and e.value.numpy().ndim == 0:
        return int(e.value.numpy())
    return None


@expr_functor.mutator
class _ResidualAdd(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def _bound(self, e: Expr) -> Expr:
        return bound_value(self, e)

    def _term(self, e: Expr) -> tuple[Expr, int] | None:
        """x * m with x an 8-bit tensor cast to int64 and m a scalar constant."""
        mul = self._bound(e)
        if not _op(mul, "relax.multiply"):
            return None
        cast, m = self._bound(mul.args[0]), _scalar(self._bound(mul.args[1]))
        if m is None or not _op(cast, "relax.astype") or str(cast.attrs.dtype) != "int64":
            return None
        x = cast.args[0]
        return (x, m) if str(x.ty.dtype) in _BYTES else None

    def _match(self, call: Call) -> tuple[list[Expr], list[int], int, int, int, str] | None:
        """astype(clip(right_shift(add(add(t1, t2), r), n), lo, hi)): what rescale_sum emits for two terms."""
        if not _op(call, "relax.astype") or str(call.attrs.dtype) not in _BYTES:
            return None
        clip = self._bound(call.args[0])
        if not _op(clip, "relax.clip"):
            return None
        shift = self._bound(clip.args[0])
        if not _op(shift, "relax.right_shift"):
            return None
        n = _scalar(self._bound(shift.args[1]))
        rounded = self._bound(shift.args[0])
        if n is None or not _op(rounded, "relax.add"):
            return None
        r = _scalar(self._bound(rounded.args[1]))
        total = self._bound(rounded.args[0])
        if r != int(dyadic.rounding_offset(n)) or not _op(total, "relax.add"):
            return None
        terms = [self._term(t) for t in total.args]
        if any(t is None for t in terms) or terms[0][0].ty.shape is None:
            return None
        shapes = {tuple(int(d) for d in t[0].ty.shape) for t in terms}
        if len(shapes) != 1:
            return None
        lo, hi = (int(v.value) for v in clip.args[1:3])
        return [t[0] for t in terms], [t[1] for t in terms], n, lo, hi, str(call.attrs.dtype)

    def visit_call_(self, call: Call) -> Expr:
        matched = self._match(call)
        if matched is None:
            return super().visit_call_(call)
        xs, ms, n, lo, hi, out_dtype = matched
        tir_ops = TirChannelOps()
        # on int32 lanes where that is provably exact (twice the lanes of the int64 form), else in int64
        form = dyadic.split32(ms, n, lo, hi, [dyadic.int_range(8, str(x.ty.dtype) == "int8") for x in xs])

        def value(*vs: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
            if form is not None:
                return form.apply(tir_ops, vs, out_dtype)
            return dyadic.rescale_sum(tir_ops, list(zip(vs, ms, strict=True)), n, lo, hi, out_dtype)

        def compute(*ts: te.Tensor) -> te.Tensor:
            return te.compute(ts[0].shape, lambda *i: value(*(t(*i) for t in ts)), name="residual_add")

        self.rewritten += 1
        vs = [self.visit_expr(x) for x in xs]
        flat = self._flat(vs)
        if flat is None:
            return self.builder_.call_te(compute, *vs, primfunc_name_hint="residual_add")
        # a term that is a view of a 2-D kernel output (AMX's 1x1 convs): the add on that kernel's shape,
        # where it fuses after the kernel, the other terms viewed so too, and the sum viewed back
        shape = [int(d) for d in flat.ty.shape]
        vs = [flat if (src := self._viewed(v)) is not None and src.same_as(flat) else
              self.builder_.emit(relax.op.reshape(v, shape)) for v in vs]
        out = self.builder_.emit(self.builder_.call_te(compute, *vs, primfunc_name_hint="residual_add"))
        return relax.op.reshape(out, call.ty.shape)

    def _viewed(self, v: Expr) -> Expr | None:
        """What `v` is a reshape of, where it is one of a 2-D tensor."""
        bound = self._bound(v)
        if _op(bound, "relax.reshape") and bound.args[0].ty.shape is not None and len(bound.args[0].ty.shape) == 2:
            return bound.args[0]
        return None

    def _flat(self, vs: list[Expr]) -> Expr | None:
        """The first term's 2-D source where it is a reshape of a kernel's 2-D output, else None."""
        for v in vs:
            src = self._viewed(v)
            if src is not None and _op(self._bound(src), "relax.call_tir"):
                return src
        return None


def residual_add_pass() -> tvm.transform.Pass:
    """The rewrite as a module pass, then dead-code elimination of the Relax ops it replaced."""

    @tvm.transform.module_pass(opt_level=0, name="intforge.ResidualAdd")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _ResidualAdd(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _run


__all__ = ["residual_add_pass"]
