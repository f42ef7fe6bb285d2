"""INT4 weight storage: two signed nibbles per byte, low nibble first, and the exact unpack kernel.

TVM's "int4" dtype is read one value per byte by CPU codegen (wrong results), so INT4 weights are
stored as int8 bytes holding two values and unpacked in TIR before the int8 convolution / matmul.
The unpack moves the wanted nibble to the top of a 32-bit word (an unsigned shift left, by 28 for the
low nibble and 24 for the high one) and shifts it back arithmetically by 28, which sign-extends it:
no branches, no shift of a negative value. numpy and TIR use the same formula.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

INT4_MIN, INT4_MAX = -8, 7
UNPACK_SYMBOL = "intforge_unpack_int4"


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack signed 4-bit values (any shape, flattened C-order) into int8 bytes, low nibble first."""
    flat = np.asarray(values).astype(np.int64).ravel()
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError(f"values outside the signed 4-bit range [{INT4_MIN}, {INT4_MAX}]")
    if flat.size % 2:
        flat = np.concatenate([flat, [0]])
    lo, hi = flat[0::2] & 0xF, flat[1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of `pack_int4`: the first `count` values as int8."""
    b = np.asarray(packed, dtype=np.int8).view(np.uint8).astype(np.uint32)
    out = np.empty(b.size * 2, dtype=np.int32)
    for k in (0, 1):  # element 2i + k sits in nibble k of byte i
        out[k::2] = (b << np.uint32(28 - 4 * k)).view(np.int32) >> 28
    return out[:count].astype(np.int8)


def unpack_int4_func() -> tirx.PrimFunc:
    """One TIR kernel for every INT4 weight: (ceil(n/2),) packed int8 -> (n,) int8, n symbolic.

    Marked opaque so fusion leaves it alone: all layers share this one compiled function instead of
    each getting a shape-specialized copy (which would cost more code than packing saves).
    """
    n = tirx.Var("n", "int64")
    packed = te.placeholder((tirx.floordiv(n + 1, 2),), "int8", name="packed")

    def fcompute(i):
        byte = tirx.reinterpret("uint8", packed[tirx.floordiv(i, 2)]).astype("uint32")
        up = tirx.shift_left(byte, (28 - 4 * tirx.floormod(i, 2)).astype("uint32"))
        return tirx.shift_right(tirx.reinterpret("int32", up), tirx.const(28, "int32")).astype("int8")

    out = te.compute((n,), fcompute, name="unpacked")
    func = te.create_prim_func([packed, out])
    return func.with_attr("global_symbol", UNPACK_SYMBOL).with_attr("op_pattern", 8)  # 8 = kOpaque
