"""Verify that a Relax module computes with integers only, floats allowed at the boundary alone.

A float value is allowed when it is part of the input prologue (computed only from the function's
parameters and float constants, on its way to an integer cast) or of the output epilogue (every use of
it leads to the function's result through float values only). Anything else, e.g. a requantization
done in float in the middle of the graph, fails the build.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from intforge.errors import VerificationError


@dataclass
class FloatValue:
    """A floating-point binding found inside the integer part of a function."""

    function: str
    var: str
    op: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.function}: {self.var} = {self.op}(...) -> {self.dtype}"


def _dtypes(sinfo: relax.Type) -> list[str]:
    if isinstance(sinfo, relax.TensorType):
        return [str(sinfo.dtype)]
    if isinstance(sinfo, relax.TupleType):
        return [d for f in sinfo.fields for d in _dtypes(f)]
    dtype = getattr(sinfo, "dtype", None)  # PrimType
    return [str(dtype)] if dtype is not None else []


def _is_float(sinfo: relax.Type) -> bool:
    return any(d.startswith(("float", "bfloat")) for d in _dtypes(sinfo))


def _var_args(expr: relax.Expr) -> list[relax.Var]:
    found: list[relax.Var] = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _op_name(expr: relax.Expr) -> str:
    if isinstance(expr, relax.Call):
        op = expr.op
        return str(op.name) if isinstance(op, tvm.ir.Op) else str(getattr(op, "name_hint", op))
    return type(expr).__name__


def find_float_values(mod: tvm.IRModule) -> list[FloatValue]:
    """Every float binding of every Relax function that is neither prologue nor epilogue."""
    bad: list[FloatValue] = []
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        bindings = [b for block in func.body.blocks for b in block.bindings]
        params = {p for p in func.params}
        prologue: set[relax.Var] = set()
        for b in bindings:
            if _is_float(b.var.ty):
                args = _var_args(b.value)
                if all(a in params or a in prologue for a in args):
                    prologue.add(b.var)
        # Epilogue, walked backwards: every user of the value is an epilogue value or the result.
        result_vars = set(_var_args(func.body.body))
        users: dict[relax.Var, list[relax.Var]] = {}
        for b in bindings:
            for a in _var_args(b.value):
                users.setdefault(a, []).append(b.var)
        epilogue: set[relax.Var] = set()
        for b in reversed(bindings):
            if not _is_float(b.var.ty) or b.var in prologue:
                continue
            us = users.get(b.var, [])
            if (us or b.var in result_vars) and all(u in epilogue for u in us):
                epilogue.add(b.var)
        for b in bindings:
            if _is_float(b.var.ty) and b.var not in prologue and b.var not in epilogue:
                bad.append(FloatValue(gv.name_hint, b.var.name, _op_name(b.value),
                                      ",".join(_dtypes(b.var.ty))))
    return bad


def verify_integer_only(mod: tvm.IRModule) -> None:
    """Raise VerificationError listing the float values inside the integer graph, if any."""
    bad = find_float_values(mod)
    if bad:
        listing = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise VerificationError(
            f"integer-only check failed: {len(bad)} floating-point value(s) inside the integer graph "
            f"(floats are allowed only in the input quantize prologue and the output dequantize epilogue):"
            f"\n  {listing}{more}\nThe graph was not built. A pass emitted float arithmetic between integer ops."
        )


@tvm.transform.module_pass(opt_level=0, name="intforge.VerifyIntegerOnly")
class VerifyIntegerOnly:
    """Module pass form of `verify_integer_only`: returns the module unchanged or raises."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        verify_integer_only(mod)
        return mod
