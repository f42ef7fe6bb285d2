"""`dyadic.IntOps` on TIR expressions: the integer semantics written into a kernel's own compute.

The fused Tensor Core kernels use it for their requantize epilogue, and the CPU residual add
(`relay_passes.residual_add`) for its sum, so both compute exactly what `dyadic` defines.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx


def _dtype(x: tirx.PrimExpr) -> str:
    return str(x.ty)


class TirChannelOps:
    """`dyadic.IntOps` on TIR scalars for one output channel `n`: a per-channel constant becomes a load
    from the next kernel argument buffer (in the order `dyadic` asks for them), a scalar a literal."""

    def __init__(self, buffers: list[tirx.Buffer] | None = None, channel: tirx.PrimExpr | None = None) -> None:
        self.buffers = buffers
        self.channel = channel
        self.recorded: list[tuple[np.ndarray, str]] = []

    def const(self, value, dtype: str):
        arr = np.asarray(value)
        if arr.size == 1:
            return tirx.const(int(arr.ravel()[0]), dtype)
        if self.buffers is None:  # recording pass: which per-channel arrays the epilogue needs
            self.recorded.append((arr.ravel().astype(dtype), dtype))
            return tirx.const(0, dtype)
        buf = self.buffers[len(self.recorded)]
        self.recorded.append((arr, dtype))
        return buf[self.channel]

    def cast(self, x, dtype: str):
        return x if _dtype(x) == dtype else x.astype(dtype)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def right_shift(self, a, b):
        return tirx.shift_right(a, b)

    def clip(self, x, lo, hi):
        return tirx.max(tirx.min(x, tirx.const(int(hi), _dtype(x))), tirx.const(int(lo), _dtype(x)))

    def round(self, x):  # pragma: no cover - the integer epilogue never rounds floats
        raise NotImplementedError("no float rounding inside an integer kernel")
