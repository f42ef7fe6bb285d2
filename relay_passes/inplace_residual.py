"""Relax pass: a residual add written over its shortcut tensor where that is the tensor's last use.

A conv with its residual add fused after it (relay_passes.residual_add) reads the shortcut tensor and
writes a new one of the same shape. The new tensor's lines are not in cache: each store first fetches
its line from memory (the write-allocate), which makes ResNet50's 56x56 expand convs a third slower in
the model than alone on a warm output (benchmarks/kernel_alone.py). Where the shortcut dies at the add, as
it does in every ResNet identity block and MobileNetV2 inverted residual, the kernel can write its result
into the shortcut's own buffer: each store then hits the line the epilogue has just read. Relax's
`call_tir_inplace` says so to the VM's memory planner; the fused PrimFunc loses its output parameter,
aliased to the shortcut's (`PrimFunc.specialize`).

Which parameter is the shortcut is decided on the fused PrimFunc before it is scheduled, where the add is
still its own block: a parameter read by that block alone, at exactly the element it writes, and nowhere
else. TVM's own DataflowUseInplaceCalls does this for single Relax operators, not for fused kernels; this
is ours for those.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm_ffi import structural_equal

_CALL_TIR = "relax.call_tir"


def _blocks(func: tirx.PrimFunc) -> list[s_tir.SBlock]:
    """Every block of `func` under its root, nested ones included."""
    sch = s_tir.Schedule(func)
    found, todo = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        b = todo.pop()
        found.append(sch.get(b))
        todo += sch.get_child_blocks(b)
    return found


def _same_region(a, b) -> bool:
    return len(a.region) == len(b.region) and all(
        structural_equal(x.min, y.min) and structural_equal(x.extent, y.extent)
        for x, y in zip(a.region, b.region, strict=True))


def shortcut_params(func: tirx.PrimFunc) -> list[int]:
    """Indices of `func`'s parameters it could write its single output over: same shape and dtype as the
    output, read by exactly one block, the `residual_add` block that writes the output, at the element it
    writes, and by no other block; never written."""
    params = list(func.params)
    out = params[-1]
    blocks = _blocks(func)
    writers = [b for b in blocks if any(w.source.same_as(out) for w in b.writes)]
    if len(writers) != 1 or not writers[0].name_hint.startswith("residual_add"):
        return []
    add = writers[0]
    (write,) = [w for w in add.writes if w.source.same_as(out)]
    found = []
    for i, p in enumerate(params[:-1]):
        if str(p.ty.dtype) != str(out.ty.dtype) or not structural_equal(p.ty.shape, out.ty.shape):
            continue
        readers = [b for b in blocks if any(r.source.same_as(p) for r in b.reads)]
        written = any(w.source.same_as(p) for b in blocks for w in b.writes)
        if readers == [add] and not written and all(_same_region(r, write) for r in add.reads if r.source.same_as(p)):
            found.append(i)
    return found


def _uses(func: relax.Function) -> tuple[dict[relax.Var, list[int]], set[relax.Var]]:
    """Where each variable is used (binding positions, the result at the end), and the variables used
    anywhere but as a plain call_tir argument (a view, a tuple, the result: storage that may live on)."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    uses: dict[relax.Var, list[int]] = {}
    escaping: set[relax.Var] = set()

    def note(expr: relax.Expr, pos: int, plain_args: set[relax.Var]) -> None:
        def visit(e) -> None:
            if isinstance(e, relax.Var):
                uses.setdefault(e, []).append(pos)
                if e not in plain_args:
                    escaping.add(e)
        relax.analysis.post_order_visit(expr, visit)

    for pos, b in enumerate(bindings):
        value = b.value
        plain: set[relax.Var] = set()
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == _CALL_TIR \
                and isinstance(value.args[1], relax.Tuple):
            plain = {a for a in value.args[1].fields if isinstance(a, relax.Var)}
        note(value, pos, plain)
    note(func.body.body, len(bindings), set())
    return uses, escaping


def _rewrite(bb: relax.BlockBuilder, func: relax.Function,
             shortcuts: dict[str, list[int]]) -> tuple[relax.Function, int]:
    """`func` with each call of a kernel in `shortcuts` made in place over its shortcut argument where that
    argument is a tensor the function computed (not a parameter or constant), used only as plain kernel
    arguments, for the last time here and once in this call; and how many calls it rewrote."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    uses, escaping = _uses(func)
    fresh = {b.var for b in bindings if isinstance(b.value, relax.Call)
             and getattr(b.value.op, "name", "") in (_CALL_TIR, "relax.call_tir_inplace")
             and isinstance(b.var.ty, relax.TensorType)}
    replaced: dict[relax.Var, relax.Expr] = {}
    for pos, b in enumerate(bindings):
        call = b.value
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == _CALL_TIR):
            continue
        gv = call.args[0]
        args = list(call.args[1].fields)
        for i in shortcuts.get(gv.name_hint, []):
            x = args[i]
            if (x in fresh and x not in escaping and max(uses[x]) == pos
                    and sum(a.same_as(x) for a in args) == 1 and len(call.args) == 2):
                prim = bb.get()[gv]
                new_gv = bb.add_func(prim.specialize({prim.params[-1]: prim.params[i]}), gv.name_hint + "_inplace")
                replaced[b.var] = bb.normalize(relax.op.call_tir_inplace(new_gv, relax.Tuple(args), i, b.var.ty))
                break
    if not replaced:
        return func, 0
    blocks = []
    for block in func.body.blocks:
        new = [relax.VarBinding(b.var, replaced[b.var]) if b.var in replaced else b for b in block.bindings]
        blocks.append(relax.DataflowBlock(new) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(new))
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span), len(replaced)


class InplaceResidual:
    """The two halves of the rewrite: `find()` before the kernels are scheduled (it reads the fused
    PrimFuncs while each add is still a block of its own), `apply()` after (so that scheduling and the
    tuning database see the functions they always saw)."""

    def __init__(self) -> None:
        self.shortcuts: dict[str, list[int]] = {}
        self.rewritten = 0

    def find(self) -> tvm.transform.Pass:
        @tvm.transform.module_pass(opt_level=0, name="intforge.FindShortcutParams")
        def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            for gv, func in mod.functions_items():
                if isinstance(func, tirx.PrimFunc) and "residual_add" in gv.name_hint:
                    found = shortcut_params(func)
                    if found:
                        self.shortcuts[gv.name_hint] = found
            return mod

        return _run

    def apply(self) -> tvm.transform.Pass:
        @tvm.transform.module_pass(opt_level=0, name="intforge.InplaceResidual")
        def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            if not self.shortcuts:
                return mod
            bb = relax.BlockBuilder(mod)
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    new, n = _rewrite(bb, func, self.shortcuts)
                    if n:
                        self.rewritten += n
                        bb.update_func(gv, new)
            return bb.get()

        return _run


__all__ = ["InplaceResidual", "shortcut_params"]
