"""x86 AVX512-VNNI: `vpdpbusd` as the instruction of the blocked dot-product kernels (kernels/blocked_dot.py).

16 output channels per zmm register of int32 accumulators, 4 input channels per lane: weights are
pre-packed to [O/16, KH, KW, C/4, 16, 4], so one 64-byte load feeds one `vpdpbusd`, and the activation's
4 bytes are broadcast to all 16 lanes. `vpdpbusd` multiplies unsigned by signed bytes: signed activations
are shifted to unsigned (a + 128) in the packing stage and corrected by -128 * sum(w[o]). A tile is
2 x 16 channels by up to 8 pixels: each broadcast feeds 2 instructions.

TVM ships a `dot_16x4_vnni` intrinsic, but its LLVM call passes <16 x i32> operands where LLVM 22's
`llvm.x86.avx512.vpdpbusd.512` takes <64 x i8>, and the module fails verification; ours passes bytes.
"""

from __future__ import annotations

from .blocked_dot import DotIsa, broadcast_dot_intrin, register_isa

LANES = 16  # int32 accumulators per zmm register
GROUP = 4  # bytes reduced per lane
VNNI_INTRIN = "intforge_dot_16x4_u8s8s32_vnni"


def _vnni_intrin() -> tuple:
    return broadcast_dot_intrin("llvm.x86.avx512.vpdpbusd.512", "uint8", LANES, GROUP)


VNNI = register_isa(DotIsa("vnni", VNNI_INTRIN, _vnni_intrin, "uint8", lanes=LANES, group=GROUP, channel_tile=2,
                           pixel_tile=8, epilogue_lanes=16))
