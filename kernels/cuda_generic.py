"""GPU schedules for the layers that stay off the Tensor Cores: a DLight rule for short reductions.

Depthwise and grouped convs, pooling windows and the like sum a few elements per output (a 3×3
depthwise conv: 9). DLight's `Reduction` / `GeneralReduction` rules give every output its own thread
block and sum across the block's threads: for a depthwise conv that is 9 busy threads of 256 and a
launch of one block per output, which made MobileNetV2 on an H200 126 ms at batch 64 (PyTorch: 5 ms).
`ShortReduction` takes such functions first and schedules them with DLight's `Fallback`: one thread per
output, the reduction serial in it, outputs of neighbouring threads neighbouring in memory.
TVM has no such rule (its rules pick by the shape of the computation, not the reduction's length).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu import Fallback
from tvm.target import Target

#: the longest reduction (elements summed per output) scheduled serially in one thread: 3×3 taps of up to
#: 28 channels a group, a 7×7 pooling window (ResNet's global average pool) fit. Longer ones keep the
#: cross-thread rules, which pay where a few outputs each sum many elements.
SHORT_REDUCTION = 256


def reduction_lengths(func: tirx.PrimFunc) -> list[int] | None:
    """Elements summed per output by each reduction block of `func` (none: []), or None where a length is
    not a constant or DLight cannot analyse the function."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None:
        return None
    doms = [[it.dom for it in info.iters if it.kind == "R"] for info in infos]
    if not all(isinstance(d, int | tirx.IntImm) for ds in doms for d in ds):
        return None
    return [math.prod(int(d) for d in ds) for ds in doms if ds]


class ShortReduction(Fallback):
    """DLight's Fallback (one GPU thread per output), for functions whose every reduction sums at most
    SHORT_REDUCTION elements an output. Anything else is left to the rules after this one."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        lengths = reduction_lengths(func)
        if not lengths or max(lengths) > SHORT_REDUCTION:
            return None
        return super().apply(func, target, tunable)
