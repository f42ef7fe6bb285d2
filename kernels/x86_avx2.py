"""x86 AVX2 (no VNNI: Zen 2/3, Haswell to Coffee Lake): `vpmaddwd` as the blocked kernels' instruction.

AVX2 has no byte dot product that is exact: `vpmaddubsw` adds two u8 x s8 products into an int16 with
saturation (255 * 127 * 2 overflows it), which is why ONNX Runtime asks for 7-bit weights on such CPUs.
`vpmaddwd` multiplies int16 pairs and adds each pair into an int32 lane, exactly. So the activations are
widened to int16 once, in the kernel's packing stage (uint8 and int8 alike: no shift by 128 and no
weight-sum correction), the weights stay int8 in memory and are sign-extended in registers
(`vpmovsxbw`, once per block, shared by the tile's pixels), and each activation pair is broadcast
straight from memory to the 8 lanes (`vpbroadcastd`, a load, no vector ALU work). One instruction is
8 output channels x 2 input channels; weights are packed [O/8, KH, KW, C/2, 8, 2].

A tile is one channel block by up to 14 pixels (ResNet's rows of 56, 28 and 14 split into 14s): 14
accumulators, the weights and one broadcast fill the 16 ymm registers. On the Zen 3 of 2026-12-05 that
ran ResNet50 3.5% (its 1x1 convs 4-15%), MobileNetV2 2.3% and ResNet18 1.5% faster than tiles of up to 8;
two channel blocks by up to 6 pixels ran ResNet50 9% slower (its 14- and 7-pixel rows then took tiles of 2
and 1). Where a row divides into 4s, 2 blocks x 4 pixels (`DotIsa.square_channels`, `register_tile`):
4 broadcasts for 8 products, ResNet50 1.4-1.8% faster; rows of 14 of convs to 256 channels or more take
2 blocks x 2 rows x 2 pixels (`DotIsa.two_row_blocks`), ResNet50 another 1.7-2.1%.

The price of exactness: `benchmarks/avx2_peak.c` measures `vpmaddwd` + `vpaddd` at 82.8 GMAC/s a core on
that Zen 3 (16 MACs for 2 vector ops), and ONNX Runtime's u8s8 sequence (`vpmaddubsw`, `vpmaddwd` by
ones, `vpaddd`: 32 MACs for 3) at 97.9, 1.18x more, for products that saturate when a pair of them
passes 32767. Winograd (kernels/winograd.py) is where intforge gets ahead on AVX2.

TVM has no AVX2 integer dot-product intrinsic for this layout; this one is ours.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .blocked_dot import ACC_SCOPE, DotIsa, broadcast_dot_intrin, register_isa

LANES = 8  # int32 accumulators per ymm register
GROUP = 2  # int16 products summed per lane
INTRIN = "intforge_dot_8x2_s16s8s32_avx2"


def avx2_intrin(weight_dtype: str = "int8") -> tuple:
    """C[i] += A[0] * B[i, 0] + A[1] * B[i, 1]: A two int16 activations, B 8 x 2 weights, int8 (sign-extended
    in the register) or int16 (Winograd's transformed weights, kernels/winograd.py)."""
    desc, _ = broadcast_dot_intrin("llvm.x86.avx2.pmadd.wd", "int16", LANES, GROUP, weight_dtype=weight_dtype)
    n = LANES * GROUP

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "int16", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES])
            # (the broadcast written inline: bound to a name, TVM gives it a stack slot, and LLVM kept one
            # store to it a reduction step)
            C[T.ramp(T.int32(0), 1, LANES)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), LANES),
                              dtype="int16x16"),
                T.Cast(f"int16x{n}", B.vload([0, 0], dtype=f"{weight_dtype}x{n}")), dtype="int32x8")

    return desc, impl


AVX2 = register_isa(DotIsa("avx2", INTRIN, avx2_intrin, "int16", lanes=LANES, group=GROUP, channel_tile=1,
                           pixel_tile=14, epilogue_lanes=8, square_channels=2, square_pixels=4,
                           two_row_blocks=32))
