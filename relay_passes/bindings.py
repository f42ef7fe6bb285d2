"""Reading a dataflow graph through its variable bindings, for our Relax mutators."""

from __future__ import annotations

from tvm import relax
from tvm.relax import Expr, PyExprMutator


def bound_value(mutator: PyExprMutator, e: Expr) -> Expr:
    """The expression a variable is bound to, followed through chains of variables; `e` if unbound."""
    while isinstance(e, relax.Var):
        value = mutator.lookup_binding(e)
        if value is None:
            break
        e = value
    return e
