"""The exact integer square root, floor(sqrt(v)) of int64 v >= 0, as one shared TIR kernel.

LayerNorm's integer form (`intforge.nonlinear.layer_norm`) needs it once a row. It is TVM-side code we
write ourselves: Relax has no integer sqrt. Written as elementwise Relax ops, the digit-by-digit method's
31 steps each read the previous remainder and root twice, and fusion inlines them into one expression
that doubles at every step (22 GB before it was stopped); so it is a loop over two scalars in a TIR
function of its own, marked opaque so fusion leaves it alone. The
reference computes the same integer its own way (`intforge.nonlinear.isqrt_numpy`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

ISQRT_SYMBOL = "intforge_isqrt"
#: Bits of the root: v < 2^(2 * ROOT_BITS) = 2^62, what `nonlinear.layer_norm_params` proves.
ROOT_BITS = 31


def isqrt_func() -> tirx.PrimFunc:
    """(n,) int64 -> (n,) int64 roots, n symbolic: one function for every LayerNorm of a model. Digit by
    digit: for bit = 4^30 .. 4^0, where rem >= root + bit, subtract it and set root = root / 2 + bit,
    else root = root / 2 (rem starts at v, root at 0)."""
    top = 2 * (ROOT_BITS - 1)

    @T.prim_func(s_tir=True)
    def isqrt(v_handle: T.handle, out_handle: T.handle):
        T.func_attr({"global_symbol": ISQRT_SYMBOL, "tir.noalias": True, "op_pattern": 8})  # 8 = kOpaque
        n = T.int64()
        v = T.match_buffer(v_handle, (n,), "int64")
        out = T.match_buffer(out_handle, (n,), "int64")
        for i in range(n):
            with T.sblock("isqrt"):
                vi = T.axis.spatial(n, i)
                T.reads(v[vi])
                T.writes(out[vi])
                state = T.sblock_alloc_buffer((2,), "int64", scope="local")  # rem, root: each row its own
                state[0] = v[vi]
                state[1] = T.int64(0)
                for k in range(ROOT_BITS):
                    bit = T.shift_left(T.int64(1), T.int64(top) - T.Cast("int64", k) * T.int64(2))
                    if state[0] >= state[1] + bit:
                        state[0] = state[0] - state[1] - bit
                        state[1] = T.shift_right(state[1], T.int64(1)) + bit
                    else:
                        state[1] = T.shift_right(state[1], T.int64(1))
                out[vi] = state[1]

    return isqrt
