"""AArch64 instructions for the blocked dot-product kernels (kernels/blocked_dot.py): `sdot`, i8mm, NEON.

- `sdot` (ARMv8.2 dot product: Cortex-A76 / rpi5, Neoverse): 4 output channels per 128-bit register,
  4 input channels per lane, the activation's 4 bytes broadcast to the 4 lanes. It is s8 x s8, so
  unsigned activations run as a - 128 with a +128 * sum(w) correction. A tile is 4 x 4 channels by up
  to 4 pixels: 16 accumulator registers of the 32. TVM has the same intrinsic (`dot_4x4_i8i8s32_sdot`,
  same description), but importing it parses every TVM intrinsic (CUDA, ROCm, ...), about 25 s in
  each process, and it declares its accumulators in global memory; ours are a register tile.
- plain NEON (ARMv8.0: Cortex-A72 / rpi4, generic arm64): the same 4 x 4 product as two `smull`, two
  `saddlp` and an `addp`, in the same tile.
- i8mm `usmmla` / `smmla` (Neoverse V1 / Graviton3, Cortex-A710 and later): one instruction multiplies a
  2 x 8 block of activations (2 pixels x 8 input channels) by an 8 x 2 block of weights (8 input channels
  x 2 output channels) into a 2 x 2 tile of int32, twice the multiply-adds of an `sdot`. `usmmla` takes
  unsigned activations as they are and `smmla` signed ones, so neither needs a shift or a correction.
  TVM ships no i8mm intrinsic; these are ours. The two pixels' rows are 8 bytes each, one input pixel
  apart (a strided conv's packing stage splits each input row into its stride phases): the intrinsic
  loads them separately and combines them in a register.
  A tile is 4 x 2 channels by 8 pixels: 16 accumulator registers.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .blocked_dot import ACC_SCOPE, DotIsa, broadcast_dot_intrin, register_isa

SDOT_INTRIN = "intforge_dot_4x4_s8s8s32_sdot"


def _sdot_intrin() -> tuple:
    return broadcast_dot_intrin("llvm.aarch64.neon.sdot.v4i32.v16i8", "int8", 4, 4)


SDOT = register_isa(DotIsa("sdot", SDOT_INTRIN, _sdot_intrin, "int8", lanes=4, group=4, channel_tile=4,
                           pixel_tile=4, epilogue_lanes=8))


def _neon_intrin() -> tuple:
    """sdot's 4 x 4 product on plain NEON (ARMv8.0: Cortex-A72 / rpi4): two widening multiplies of the
    broadcast activation by two weight rows each, then pairwise widening adds (|a * w| <= 2^14 fits int16)."""
    desc, _ = broadcast_dot_intrin("llvm.aarch64.neon.sdot.v4i32.v16i8", "int8", 4, 4)

    def _intrin(name: str):
        return T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            act = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2), dtype="int8x8")
            w = B.vload([0, 0], dtype="int8x16")
            rows01 = T.call_llvm_pure_intrin(_intrin("saddlp.v4i32.v8i16"), T.call_llvm_pure_intrin(
                _intrin("smull.v8i16"), act, T.vectorlow(w, dtype="int8x8"), dtype="int16x8"), dtype="int32x4")
            rows23 = T.call_llvm_pure_intrin(_intrin("saddlp.v4i32.v8i16"), T.call_llvm_pure_intrin(
                _intrin("smull.v8i16"), act, T.vectorhigh(w, dtype="int8x8"), dtype="int16x8"), dtype="int32x4")
            C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
                _intrin("addp.v4i32"), rows01, rows23, dtype="int32x4")

    return desc, impl


NEON_INTRIN = "intforge_dot_4x4_s8s8s32_neon"
NEON = register_isa(DotIsa("neon", NEON_INTRIN, _neon_intrin, "int8", lanes=4, group=4, channel_tile=4,
                           pixel_tile=4, epilogue_lanes=8))


def _mmla_intrin(act_dtype: str):
    """The 2 x 2 x 8 i8mm tile: C[i, j] += sum_k A[i, k] * B[j, k], A of `act_dtype`, B int8."""
    instr = "usmmla" if act_dtype == "uint8" else "smmla"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        A = T.match_buffer(a, (2, 8), act_dtype, offset_factor=1, strides=[s0, 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for i, j, k in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        A = T.match_buffer(a, (2, 8), act_dtype, offset_factor=1, strides=[s0, 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            rows = T.vectorcombine(A.vload([0, 0], f"{act_dtype}x8"), A.vload([1, 0], f"{act_dtype}x8"),
                                   dtype=f"{act_dtype}x16")
            C.vstore([0, 0], T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{instr}.v4i32.v16i8"),
                C.vload([0, 0], dtype="int32x4"),
                T.reinterpret(rows, dtype="int8x16"),
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            ))

    return desc, impl


USMMLA_INTRIN = "intforge_mmla_2x2x8_u8s8s32"
SMMLA_INTRIN = "intforge_mmla_2x2x8_s8s8s32"

_MMLA_TILE = {"lanes": 2, "group": 8, "rows": 2, "channel_tile": 4, "pixel_tile": 8, "epilogue_lanes": 8}
USMMLA = register_isa(DotIsa("usmmla", USMMLA_INTRIN, lambda: _mmla_intrin("uint8"), "uint8", **_MMLA_TILE))
SMMLA = register_isa(DotIsa("smmla", SMMLA_INTRIN, lambda: _mmla_intrin("int8"), "int8", **_MMLA_TILE))
