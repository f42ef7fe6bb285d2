"""Integer conv2d and dense as register-blocked dot products, tensorized to one CPU instruction.

One kernel, several instructions (`DotIsa`): x86 `vpdpbusd` (kernels/x86_vnni.py), ARM `sdot`, and ARM
i8mm `usmmla`/`smmla` (kernels/arm_dot.py). Each instruction multiplies `rows` output pixels by `lanes`
output channels, reducing `group` input channels per lane: vpdpbusd is 1 x 16 x 4, sdot 1 x 4 x 4, and
the smmla 2 x 2 tile is 2 x 2 x 8.

Layout: weights are pre-packed at compile time to [O/lanes, KH, KW, C/group, lanes, group] (dense:
[N/lanes, K/group, lanes, group]), so one contiguous load feeds one instruction; channels are padded to
the blocks with zero weights. The input is padded (and, from NCHW, transposed) to NHWC by a packing stage,
which also converts it to the activation type the instruction takes: signed activations run as a + 128
on an instruction that wants unsigned bytes (vpdpbusd), unsigned ones as a - 128 on one that wants signed
bytes (sdot), and `correction[o] = -/+128 * sum(w[o])` restores the exact sum. The int32 lanes wrap like
the reference's int32 arithmetic, so the result is bit-exact.

INT4 weights stay packed in the kernel: each weight block (lanes x group) is half as many bytes, weight t
in the low nibble of byte t and weight t + block/2 in the high one. A small stage unpacks one block right
before the instructions that use it (vector and, xor, subtract on bytes: ((n ^ 8) - 8) sign-extends a
nibble n), so no int8 copy of the weights is ever made.

The schedule keeps a tile of accumulators (pixels x channels) in registers for the whole reduction,
tensorizes the innermost product to the instruction, and computes the requantize epilogue per tile
inside the same parallel loop, so the int32 accumulators never make a round trip through memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from intforge.dyadic import SHORT_SHIFT
from intforge.reference import pool_output_size

from .dot_product import SHIFT  # unsigned <-> signed bytes: one definition, shared with the weight-sum corrections
from .stages import compute_inputs_at, insert_at_loop_top, prefetch, vectorize_inner

# TVM (LowerTVMBuiltin) keeps a CPU buffer on the stack only if its scope is "global" and it is smaller
# than kMaxStackAlloca (1024 bytes); any other buffer, every "local" one included, costs a
# TVMBackendAllocWorkspace and a TVMBackendFreeWorkspace call in each parallel task. The accumulator
# tile is therefore "global", and at most STACK_BYTES - 1 bytes where that costs the tile little. On the
# stack LLVM also keeps the whole tile in registers: no store and reload before the epilogue.
ACC_SCOPE = "global"
STACK_BYTES = 1024
INT4_BLOCK = "weight_int4"  # the in-kernel unpack stage of packed INT4 weights
FOLD_BLOCK = "data_rows"  # a folded conv's input rows as runs of bytes, packed once before the kernel
MIN_INT4_BLOCKS = 8  # channel blocks (x batch) for an INT4 conv to unpack its weights once per block
HOIST_BELOW_CHANNELS = 16  # a conv's packing stage with fewer input channels runs once, before the kernel
# an AVX2 1x1 conv split by rows runs a task per row (pair) that widens its own input row where it has at
# least this many, an even number: 7 (7x7, or 14x14 in row pairs at batch 8) would split 4 to 3 on two
# threads, where its (row, channel tile) tasks balance any pool. (At 28 MobileNetV2's 14x14 layers kept
# their stage: 0.6-1% slower on the Zen 3, 2026-12-05.)
MIN_ROW_TASKS = 14
# A conv whose weights are at least SPREAD_WEIGHT_BYTES (more than a core's L2: they come from memory on
# every call) and at least SPREAD_TILE_BYTES a channel tile spreads its next-tile prefetches evenly over
# each visit instead of in bursts (`_prefetch_next_tile`)
SPREAD_WEIGHT_BYTES = 1 << 20
SPREAD_TILE_BYTES = 32 * 1024
# A dense kernel with at least this many rows (a transformer's tokens, not a batch of images) takes a
# register tile of several rows by `channel_tile` blocks, like a conv's, its rows padded to the tile
# (`dense_row_tile`); with fewer, one row by one block a task. This and the matmul of two activations
# (`matmul_blocked`) on TOKEN_KERNEL_ISAS only: measured there (AVX2 since 2026-12-07: MiniLM's whole
# calls on the Zen 3, INT8 13.1 -> 9.5 ms with the row tiles, -> 7.3-7.6 with the matmuls too).
DENSE_TILE_MIN_ROWS = 16
TOKEN_KERNEL_ISAS = ("vnni", "avx2")
SUM_BLOCKS = ("row_sums", "column_sums")  # the kernels of a matmul of two activations' correction terms
ROW_UNPACK_BYTES = 16 * 1024  # an INT4 conv with fewer blocks and at most this many weights a tile
# unpacks its tile's weights once per output row (they stay in L1), not once per pixel tile


@dataclass(frozen=True)
class DotIsa:
    """One dot-product instruction and the register tile built around it."""

    name: str  # block names: conv_<name>, dense_<name>
    intrin: str  # the TensorIntrin the innermost product is tensorized to
    # (description, implementation) of that intrinsic: parsed on first use, since each TVMScript parse
    # costs a fraction of a second in every process that imports the kernels
    intrin_funcs: Callable[[], tuple] = field(compare=False, repr=False)
    act_dtype: str  # what the instruction takes: "uint8" or "int8" bytes, or "int16" (either, widened)
    lanes: int  # output channels per instruction
    group: int  # input channels reduced per lane
    rows: int = 1  # output pixels per instruction
    channel_tile: int = 2  # instruction-wide channel blocks per register tile
    pixel_tile: int = 8  # output pixels per register tile, at most
    epilogue_lanes: int = 16  # vector width of the requantize epilogue (int64 arithmetic)
    # where a conv's output row divides into tiles of `square_pixels` pixels, a register tile of up to
    # `square_channels` channel blocks by that many pixels instead (0: never; `register_tile`)
    square_channels: int = 0
    square_pixels: int = 0
    # where a row does not divide into `square_pixels` but into half as many, the conv has an even number
    # of output rows and at least `two_row_blocks` channel blocks: the square tile over two output rows,
    # square_pixels / 2 pixels of each (0: never; `register_tile`)
    two_row_blocks: int = 0

    @property
    def block(self) -> int:
        """Weights per instruction: lanes x group."""
        return self.lanes * self.group

    @property
    def conv_block(self) -> str:
        return f"conv_{self.name}"

    @property
    def dense_block(self) -> str:
        return f"dense_{self.name}"

    @property
    def matmul_block(self) -> str:
        """The block of a matmul of two activations (`matmul_blocked`)."""
        return f"matmul_{self.name}"

    def correction_sign(self, x_dtype: str) -> int:
        """0 when activations of `x_dtype` go in as they are (or widened to int16, which holds either
        signedness); else the sign of the 128 * sum(w) correction."""
        if x_dtype == self.act_dtype or self.act_dtype == "int16":
            return 0
        return -1 if self.act_dtype == "uint8" else 1


def broadcast_dot_intrin(llvm_intrinsic: str, act_dtype: str, lanes: int, group: int,
                         weight_dtype: str = "int8") -> tuple:
    """(description, implementation) of a dot-product instruction of `lanes` int32 lanes, each the sum of
    `group` products, the activation's `group` elements (32 bits in all) broadcast to every lane:
    C[i] += sum_k A[k] * B[i, k]. x86 vpdpbusd (16 x 4, u8 x s8), x86 vpdpwssd (16 x 2, s16 x s16) and
    ARM sdot (4 x 4, s8 x s8) are all this shape. The LLVM intrinsic takes (accumulators, activations,
    weights) as <lanes x i32>, then <lanes*group x i8> (or i16) twice."""
    n = lanes * group

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, group), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, group), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=ACC_SCOPE)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{act_dtype}x{group}"), dtype="int32"), lanes),
                              dtype=f"{act_dtype}x{n}"),
                B.vload([0, 0], dtype=f"{weight_dtype}x{n}"),
                dtype=f"int32x{lanes}",
            )

    return desc, impl


_ISAS: dict[str, DotIsa] = {}


def ensure_intrin(name: str, make: Callable[[], tuple]) -> None:
    """Register tensor intrinsic `name` from `make()` (its description and implementation) on first use."""
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *make())


def register_isa(isa: DotIsa) -> DotIsa:
    """Make an instruction's blocks known to `schedule_blocked_func` (and to tuning, which skips them)."""
    _ISAS[isa.name] = isa
    return isa


def kernel_block_names() -> set[str]:
    """The block names of every registered instruction's conv and dense kernels."""
    return {n for isa in _ISAS.values() for n in (isa.conv_block, isa.dense_block, isa.matmul_block)}


def blocks(n: int, size: int) -> int:
    return -(-n // size)


def conv_weight_layout(w: np.ndarray, isa: DotIsa) -> np.ndarray:
    """[O, C, KH, KW] -> [O/lanes, KH, KW, C/group, lanes, group], channels zero-padded to the blocks."""
    o, c, kh, kw = w.shape
    ob, cb = blocks(o, isa.lanes), blocks(c, isa.group)
    wpad = np.zeros((ob * isa.lanes, cb * isa.group, kh, kw), np.int8)
    wpad[:o, :c] = w
    return np.ascontiguousarray(wpad.reshape(ob, isa.lanes, cb, isa.group, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def dense_weight_layout(w: np.ndarray, isa: DotIsa) -> np.ndarray:
    """[N, K] -> [N/lanes, K/group, lanes, group], zero-padded."""
    n, k = w.shape
    nb, kb = blocks(n, isa.lanes), blocks(k, isa.group)
    wpad = np.zeros((nb * isa.lanes, kb * isa.group), np.int8)
    wpad[:n, :k] = w
    return np.ascontiguousarray(wpad.reshape(nb, isa.lanes, kb, isa.group).transpose(0, 2, 1, 3))


def pack_int4_blocks(w: np.ndarray) -> np.ndarray:
    """Blocked INT4 weights [..., lanes, group] (values in [-8, 7]) -> [..., lanes * group / 2] bytes: weight
    t of each block in the low nibble of byte t, weight t + block/2 in the high nibble."""
    block = w.shape[-1] * w.shape[-2]
    flat = w.reshape(*w.shape[:-2], block).astype(np.int64) & 0xF
    return (flat[..., :block // 2] | (flat[..., block // 2:] << 4)).astype(np.uint8).view(np.int8)


def _unpacked(wq: te.Tensor, lead: int, isa: DotIsa) -> te.Tensor:
    """The in-kernel unpack stage: packed [..., block/2] int8 -> [..., lanes, group] int8 (`lead` leading
    axes). (n ^ 8) - 8 on a byte is the same sign extension as `int4.unpack_int4`'s shift pair, written on
    bytes so LLVM vectorizes it; test_int4 checks the two against each other on every nibble."""
    half = isa.block // 2

    def fcompute(*idx):
        *head, o2, rci = idx
        t = o2 * isa.group + rci
        byte = tirx.reinterpret("uint8", wq[(*head, tirx.floormod(t, half))])
        nibble = tirx.if_then_else(t < half, byte & tirx.const(0xF, "uint8"),
                                   tirx.shift_right(byte, tirx.const(4, "uint8")))
        return tirx.reinterpret("int8", nibble ^ tirx.const(8, "uint8")) - tirx.const(8, "int8")

    return te.compute((*wq.shape[:lead], isa.lanes, isa.group), fcompute, name=INT4_BLOCK)


def _act_shift(x_dtype: str, isa: DotIsa) -> int:
    """What an activation of `x_dtype` is shifted by in the instruction's type: +128 (signed into unsigned
    bytes), -128 (unsigned into signed), or 0."""
    sign = isa.correction_sign(x_dtype)
    return SHIFT if sign < 0 else -SHIFT if sign > 0 else 0


def _shifted(v, by: int, dtype: str, v_dtype: str):
    """v (of `v_dtype`) + by, in `dtype`: v itself where it is that already and by is 0."""
    if by == 0:
        return v if v_dtype == dtype else v.astype(dtype)
    return (v.astype("int32") + by).astype(dtype)


def _as_act(v, x_dtype: str, isa: DotIsa):
    """An activation in the instruction's type: shifted by 128 where the signedness differs, widened
    where the instruction takes int16."""
    return _shifted(v, _act_shift(x_dtype, isa), isa.act_dtype, x_dtype)


def add_correction(v, correction: te.Tensor | None, channel):
    """v + correction[channel] on wrapping 32-bit lanes (the same bits as int32). On int32, LLVM reads
    `add nsw` as licence to sign-extend both operands into the int64 requantize that follows and adds
    on int64 lanes: two instructions per 16 outputs instead of one."""
    if correction is None:
        return v
    total = tirx.reinterpret("uint32", v) + tirx.reinterpret("uint32", correction[channel])
    return tirx.reinterpret("int32", total)


@dataclass(frozen=True)
class Narrow:
    """The per-channel constants of a `dyadic.ClampFirst` epilogue fused into a conv kernel (the
    correction argument carries its -lo), and the 8-bit type it writes. `whole_bytes`: every shift is
    x86_ifma.BYTE_SHIFT, so the kernel picks the result's byte instead of shifting. `bounds` (with
    whole_bytes only): the correction argument holds the clamp's low bound on the raw accumulator, `span`
    its high bound, and `add` the constant with the correction folded in (`narrow_value`). `short` (with
    bounds): every shift is dyadic.SHORT_SHIFT and the form wraps on 32-bit lanes, `mul`, `add` and
    `shift` int32."""

    span: te.Tensor  # int32
    mul: te.Tensor  # int64 (int32 short)
    add: te.Tensor  # int64 (int32 short)
    shift: te.Tensor  # int64 (int32 short)
    out_dtype: str
    whole_bytes: bool = False
    bounds: bool = False
    short: bool = False

    def value(self, acc, corr, ch, immediate: bool = False):
        """Output channel `ch` of this epilogue for accumulator `acc` and correction `corr`. `immediate`
        (the short form, where it is vectorized rather than tensorized): the shift as the constant every
        channel has (dyadic.SHORT_SHIFT), so that LLVM shifts by an immediate and picks each lane's byte
        3 for the 8-bit result, where a per-channel shift vector took a load and a variable shift."""
        shift = tirx.const(SHORT_SHIFT, "int32") if immediate and self.short else self.shift[ch]
        return narrow_value(acc, corr, self.span[ch], self.mul[ch], self.add[ch], shift, self.out_dtype,
                            self.bounds, self.short)

    @property
    def attrs(self) -> dict:
        """The output stage's block annotation, which picks the intrinsic."""
        return {"narrow_bytes": int(self.whole_bytes), "narrow_bounds": int(self.bounds),
                "narrow_short": int(self.short)}


def narrow_block(isa: DotIsa) -> str:
    return f"{isa.conv_block}_narrow"


def narrow_value(acc, corr, span, mul, add, shift, out_dtype: str, bounds: bool = False, short: bool = False):
    """One output of the `ClampFirst` epilogue: t = acc + corr (wrapping 32-bit lanes; corr includes -lo),
    u = clip(t, 0, span), then (u * mul + add) >> shift, which is in the output's range already. x86_ifma's
    intrinsic describes exactly this expression (tensorize matches it structurally).

    With `bounds` (`Narrow.bounds`; corr = lo - c, span = lo - c + span, add = add + (c - lo) * mul mod
    2^64, c the correction): u' = clip(acc, corr, span) = u + lo - c, and u' * mul + add is the same
    value, so one 32-bit add fewer per 16 outputs. u' * mul can pass 64 bits, so this form runs on
    wrapping uint64 lanes: the output is the byte at BYTE_SHIFT of the true value, which wrapping leaves
    alone (and IFMA's 52-bit products too).

    With `short` (bounds too; `Narrow.short`) the same on wrapping 32-bit lanes: the true value lies in
    [qmin, qmax + 1) * 2^shift with shift = dyadic.SHORT_SHIFT, a 2^32-wide window, so the wrapped lane is
    that value (as int32 for a signed result, uint32 for an unsigned one), and shifting it gives the result."""
    if short:
        u = tirx.min(tirx.max(acc, corr), span)
        v = tirx.reinterpret("uint32", u) * tirx.reinterpret("uint32", mul) + tirx.reinterpret("uint32", add)
        if out_dtype == "int8":
            return tirx.shift_right(tirx.reinterpret("int32", v), shift).astype(out_dtype)
        return tirx.shift_right(v, tirx.reinterpret("uint32", shift)).astype(out_dtype)
    if bounds:
        u = tirx.min(tirx.max(acc, corr), span).astype("int64")
        v = tirx.reinterpret("uint64", u) * tirx.reinterpret("uint64", mul) + tirx.reinterpret("uint64", add)
        return tirx.shift_right(v, tirx.reinterpret("uint64", shift)).astype(out_dtype)
    t = tirx.reinterpret("int32", tirx.reinterpret("uint32", acc) + tirx.reinterpret("uint32", corr))
    u = tirx.min(tirx.max(t, tirx.const(0, "int32")), span)
    return tirx.shift_right(u.astype("int64") * mul + add, shift).astype(out_dtype)


def _round_up(n: int, m: int) -> int:
    return blocks(n, m) * m


def fold_columns(channels: int, kernel: tuple[int, int], dilation: tuple[int, int], isa: DotIsa) -> bool:
    """Whether a conv with few input channels (an RGB stem) takes each window row's
    KW x C bytes as its channels (`conv2d_blocked`'s `fold`): ResNet's 7x7x3 stem then reduces 6 groups
    of 4 bytes a row where one group a tap, 3 of its 4 bytes used, made 7 (on AVX2's 2-channel groups, 11
    a row against 14). "Few" is fewer than 4 channels, or than a group where groups are wider."""
    kw = kernel[1]
    return (channels < max(isa.group, 4) and dilation[1] == 1
            and blocks(kw * channels, isa.group) < kw * blocks(channels, isa.group))


def fold_weight(w: np.ndarray, isa: DotIsa) -> np.ndarray:
    """OIHW weights of a conv whose window rows are folded into its channels: [O, KW * C padded to the
    group, KH, 1], tap (rw, c) at channel rw * C + c, zero weights in the padding."""
    o, c, kh, kw = w.shape
    out = np.zeros((o, _round_up(kw * c, isa.group), kh, 1), w.dtype)
    out[:, :kw * c, :, 0] = w.transpose(0, 3, 1, 2).reshape(o, kw * c, kh)
    return out


def conv2d_blocked(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_channels: int,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                   isa: DotIsa, layout: str = "NCHW", narrow: Narrow | None = None,
                   fold: int | None = None) -> te.Tensor:
    """x: [N, C, H, W] (or [N, H, W, C] with layout "NHWC") int8/uint8; wp: [O/lanes, KH, KW, C/group,
    lanes, group] int8, or [..., C/group, block/2] packed INT4; -> int32 in the same layout as x, or with
    `narrow` (NHWC only) the requantized 8-bit output of its `dyadic.ClampFirst` epilogue.

    In NHWC the channels of a pixel are contiguous, so the packing stage is a plain copy, and it is
    skipped when there is nothing to do (activations already the instruction's type, no padding, channels
    a multiple of the group, the row wide enough for whole instructions): the kernel then reads its input
    where the previous layer wrote it.

    `fold` (NHWC, few input channels): wp holds `fold_weight`'s layout for a window `fold` columns wide,
    and the packing stage lays each padded input row out as one run of bytes (FOLD_BLOCK), pixel after
    pixel, so that the KW x C bytes of a window row are contiguous and read as the channels."""
    nhwc = layout == "NHWC"
    if len(wp.shape) == 5:  # packed INT4: unpacked block by block inside the kernel
        wp = _unpacked(wp, 4, isa)
    n, c, h, wd = (int(d) for d in ((x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if nhwc else x.shape))
    ob, kh, kw, cb = (int(d) for d in wp.shape[:4])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = pool_output_size(h, kh, sh, ph, dh, False), pool_output_size(wd, fold or kw, sw, pw, dw, False)
    owc = _round_up(ow, isa.rows)  # whole instructions: an odd row computes one pixel more, never stored
    width = max(wd + 2 * pw, (owc - 1) * sw + (kw - 1) * dw + 1)
    pad_value = _as_act(tirx.const(0, x.dtype), x.dtype, isa)

    def _x(b, ch, i, j):
        return x[b, i, j, ch] if nhwc else x[b, ch, i, j]

    def _packed(b, i, j, ch):
        inside = tirx.all(i >= ph, i < h + ph, j >= pw, j < wd + pw, ch < c)
        return tirx.if_then_else(inside, _as_act(_x(b, ch, i - ph, j - pw), x.dtype, isa), pad_value)

    cp = cb * isa.group
    if fold is not None:
        if not nhwc or kw != 1 or dw != 1:
            raise ValueError("a folded conv takes NHWC input, fold_weight's [.., KH, 1] weights, no column dilation")

        def _flat(b, r, q):  # byte q of padded row r: pixel q // C, channel q % C; zeros past the row's end
            col = q // c
            inside = tirx.all(r >= ph, r < h + ph, col >= pw, col < wd + pw)
            return tirx.if_then_else(inside, _as_act(x[b, r - ph, col - pw, q % c], x.dtype, isa), pad_value)

        # one row's bytes, plus a group's slack: a window row's last group reads past the last pixel
        xf = te.compute((n, h + 2 * ph, (wd + 2 * pw) * c + cp), _flat, name=FOLD_BLOCK)

        def _tap(b, i, j, ch, rw):
            return xf[b, i, j * sw * c + ch]
    elif isa.rows > 1 and sw > 1:
        # The pixels of one instruction must be adjacent rows of its activation block: with a stride, the
        # input row is split into its sw phases (column q * sw + p at [p, q]), and neighbouring output
        # pixels read neighbouring columns of one phase.
        wq = blocks(width, sw)
        xs = te.compute((n, h + 2 * ph, sw, wq, cp), lambda b, i, p, q, ch: _packed(b, i, q * sw + p, ch),
                        name=f"data_{isa.name}")

        def _tap(b, i, j, ch, rw):
            col = rw * dw
            return xs[b, i, col % sw, j + col // sw, ch]
    else:
        if nhwc and x.dtype == isa.act_dtype and ph == pw == 0 and c == cp and width == wd:
            xp = x
        else:
            xp = te.compute((n, h + 2 * ph, width, cp), _packed, name=f"data_{isa.name}")

        def _tap(b, i, j, ch, rw):
            return xp[b, i, j * sw + rw * dw, ch]

    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    rcb, rci = te.reduce_axis((0, cb), "rcb"), te.reduce_axis((0, isa.group), "rci")
    conv = te.compute(
        (n, ob, oh, owc, isa.lanes),
        lambda b, o1, i, j, o2: te.sum(
            _tap(b, i * sh + rh * dh, j, rcb * isa.group + rci, rw).astype("int32")
            * wp[o1, rh, rw, rcb, o2, rci].astype("int32"), axis=[rh, rw, rcb, rci]),
        name=isa.conv_block)

    def _out(b, o, i, j):
        return add_correction(conv[b, o // isa.lanes, i, j, o % isa.lanes], correction, o)

    if narrow is not None:
        if not nhwc or correction is None:
            raise ValueError("the ClampFirst epilogue needs NHWC and its correction (which holds -lo)")
        return te.compute((n, oh, ow, out_channels), lambda b, i, j, o: narrow.value(
            conv[b, o // isa.lanes, i, j, o % isa.lanes], correction[o], o, immediate=isa.act_dtype == "int16"),
            name=narrow_block(isa),
            attrs=narrow.attrs)
    if nhwc:
        return te.compute((n, oh, ow, out_channels), lambda b, i, j, o: _out(b, o, i, j), name=f"{isa.conv_block}_out")
    return te.compute((n, out_channels, oh, ow), _out, name=f"{isa.conv_block}_out")


def dense_blocked(x: te.Tensor, wp: te.Tensor, correction: te.Tensor | None, out_features: int,
                  isa: DotIsa, narrow: Narrow | None = None) -> te.Tensor:
    """x: [M, K] int8/uint8; wp: [N/lanes, K/group, lanes, group] int8, or [N/lanes, K/group, block/2]
    packed INT4; -> [M, N] int32, or with `narrow` the requantized 8-bit output of its `dyadic.ClampFirst`
    epilogue (as `conv2d_blocked`'s)."""
    if len(wp.shape) == 3:
        wp = _unpacked(wp, 2, isa)
    m, k = (int(d) for d in x.shape)
    nb, kb = (int(d) for d in wp.shape[:2])
    xp = _packed_rows(x, kb, isa)
    mc = int(xp.shape[0])
    rkb, rki = te.reduce_axis((0, kb), "rkb"), te.reduce_axis((0, isa.group), "rki")
    # rows then lanes innermost: the accumulators of one instruction are contiguous
    acc = te.compute((nb, mc, isa.lanes), lambda o1, i, o2: te.sum(
        xp[i, rkb * isa.group + rki].astype("int32") * wp[o1, rkb, o2, rki].astype("int32"), axis=[rkb, rki]),
        name=isa.dense_block)

    def _out(i, o):
        return add_correction(acc[o // isa.lanes, i, o % isa.lanes], correction, o)

    if narrow is not None:
        if correction is None:
            raise ValueError("the ClampFirst epilogue needs its correction (which holds -lo)")
        # over the padded rows too, then copied out where they were padded: the intrinsic it is tensorized
        # to takes no predicate, and the last tile's would be one
        out = te.compute((mc, out_features), lambda i, o: narrow.value(
            acc[o // isa.lanes, i, o % isa.lanes], correction[o], o, immediate=isa.act_dtype == "int16"),
            name=narrow_block(isa), attrs=narrow.attrs)
        return out if mc == m else te.compute((m, out_features), lambda i, o: out[i, o], name=f"{isa.dense_block}_out")
    return te.compute((m, out_features), _out, name=f"{isa.dense_block}_out")


def _packed_rows(x: te.Tensor, k_groups: int, isa: DotIsa) -> te.Tensor:
    """The rows a dense kernel (or a matmul of two activations) reads, [..., M, K] -> [..., M', K']: in the
    instruction's activation type (`_as_act`), rows padded to whole register tiles (`dense_row_tile`,
    where there are DENSE_TILE_MIN_ROWS or more) and K to `k_groups` whole groups, with zeros."""
    *lead, m, k = (int(d) for d in x.shape)
    mc = _round_up(m, isa.rows * (dense_row_tile(isa, m) if m >= DENSE_TILE_MIN_ROWS else 1))

    def packed(*idx):
        *t, i, j = idx
        return tirx.if_then_else(tirx.all(i < m, j < k), _as_act(x[(*t, i, j)], str(x.dtype), isa),
                                 tirx.const(0, isa.act_dtype))

    return te.compute((*lead, mc, k_groups * isa.group), packed, name=f"data_{isa.name}")


#: A shorter register tile (down to 4 rows) is taken where it pads the rows at least this much less than
#: the tallest: BERT's 64 tokens took 10 tiles of 7 rows (70), and 16 of 4 ran its linears 6-8% faster
#: (`profile_in_model.py --against`, Zen 4, 2026-12-06); a ViT's 197 stay at 7 (203 against 198 at 6).
ROW_TILE_SAVING = 0.04


def dense_row_tile(isa: DotIsa, m: int | None = None) -> int:
    """Rows (in instructions' worth) of a dense kernel's register tile where it has at least
    DENSE_TILE_MIN_ROWS rows: as many as keep `channel_tile` blocks of accumulators on the stack (the
    conv's tile: 7 rows x 2 blocks on VNNI, 14 rows x 1 block on AVX2), or 1 (one row a tile) on the
    instructions not measured so (ARM's). On AVX2 (Zen 3, 2026-12-07, whole MiniLM calls both ways
    round) the row tiles took INT8 to 0.71-0.76x its time one row a task, and all-4-bit W4A8 to 0.32x
    (a row a task unpacked its channel block's INT4 weights again for every row);
    with the row count `m`, fewer (down to 4) where that pads `m` ROW_TILE_SAVING less. A function of
    the padded count gives the same tile (`_packed_rows` pads, the schedule sees the padded rows)."""
    if isa.name not in TOKEN_KERNEL_ISAS:
        return 1
    top = max(1, min(isa.pixel_tile // isa.rows, (STACK_BYTES - 1) // (isa.rows * isa.channel_tile * isa.lanes * 4)))
    if m is None or top <= 4:
        return top
    units = -(-int(m) // isa.rows)
    best = min(range(top, 3, -1), key=lambda r: _round_up(units, r))  # (ties: the taller tile, listed first)
    return best if _round_up(units, best) * (1 + ROW_TILE_SAVING) <= _round_up(units, top) else top


def matmul_shifts(a_dtype: str, b_dtype: str, isa: DotIsa) -> tuple[int, int]:
    """(sa, sb): a matmul of two activations runs a' = a + sa and b' = b + sb on the instruction (its
    activation type for a, as `_as_act`; signed bytes for b)."""
    return _act_shift(a_dtype, isa), (-SHIFT if b_dtype == "uint8" else 0)


def matmul_row_term(a: te.Tensor, b_dtype: str, isa: DotIsa) -> te.Tensor:
    """-sb * sum_k a'[..., m, k] as int32 [..., M] (`matmul_blocked`; needed where sb != 0)."""
    k = int(a.shape[-1])
    sa, sb = matmul_shifts(str(a.dtype), b_dtype, isa)
    r = te.reduce_axis((0, k), "rk")
    return te.compute(a.shape[:-1], lambda *idx: te.sum(
        _shifted(a[(*idx, r)], sa, "int32", str(a.dtype)) * tirx.const(-sb, "int32"), axis=r), name=SUM_BLOCKS[0])


def matmul_column_term(b: te.Tensor, a_dtype: str, isa: DotIsa) -> te.Tensor:
    """-sa * sum_k b'[..., k, n] + K sa sb as int32 [..., N] (`matmul_blocked`; needed where sa != 0)."""
    *lead, k, n = b.shape
    sa, sb = matmul_shifts(a_dtype, str(b.dtype), isa)
    r = te.reduce_axis((0, int(k)), "rk")
    total = te.compute((*lead, n), lambda *idx: te.sum(
        _shifted(b[(*idx[:-1], r, idx[-1])], sb, "int32", str(b.dtype)), axis=r), name=SUM_BLOCKS[1])
    const = tirx.const(int(k) * sa * sb, "int32")
    return te.compute((*lead, n), lambda *idx: total[idx] * tirx.const(-sa, "int32") + const,
                      name=f"{SUM_BLOCKS[1]}_term")


def matmul_blocked(a: te.Tensor, b: te.Tensor, isa: DotIsa, row_term: te.Tensor | None = None,
                   column_term: te.Tensor | None = None) -> te.Tensor:
    """A matmul of two activations (attention's Q K^T and P V): a [..., M, K], b [..., K, N], 8-bit either
    signedness, the same leading axes -> int32 [..., M, N], the exact sums.

    The dense kernel with its weights packed at run time: b to [..., N/lanes, K/group, lanes, group] (N
    padded to whole register tiles of `channel_tile` blocks, K to whole groups), a to [..., M', K'] (M
    padded to the register tile's rows; on AVX2 widened to int16, b staying signed bytes). Where an
    operand has the other signedness than the instruction takes, it runs shifted by 128 (`matmul_shifts`)
    and the sums are corrected from the other operand's row or column sums: with a' = a + sa and b' = b + sb,
    sum(a b) = sum(a' b') - sb sum_k a' - sa sum_k b' + K sa sb, on wrapping int32 lanes. The two terms
    come in computed by kernels of their own (`matmul_row_term`, `matmul_column_term`): as blocks of this
    one they would have to run inside each tile, which reads them."""
    *lead, m, k = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    if [int(d) for d in b.shape[:-2]] != lead or int(b.shape[-2]) != k:
        raise ValueError(f"matmul_blocked: shapes {list(a.shape)} and {list(b.shape)} do not chain")
    sa, sb = matmul_shifts(str(a.dtype), str(b.dtype), isa)
    if (row_term is None) != (sb == 0) or (column_term is None) != (sa == 0):
        raise ValueError("matmul_blocked: the correction terms do not match the operands' types")
    nb = _round_up(blocks(n, isa.lanes), isa.channel_tile)
    kb = blocks(k, isa.group)
    lead_shape = a.shape[:-2]

    def _bp(*idx):
        *t, o1, kk, o2, g = idx
        return tirx.if_then_else(tirx.all(o1 * isa.lanes + o2 < n, kk * isa.group + g < k),
                                 _shifted(b[(*t, kk * isa.group + g, o1 * isa.lanes + o2)], sb, "int8", str(b.dtype)),
                                 tirx.const(0, "int8"))

    ap = _packed_rows(a, kb, isa)
    mc = int(ap.shape[-2])
    bp = te.compute((*lead_shape, nb, kb, isa.lanes, isa.group), _bp, name=f"packed_{isa.name}")
    rkb, rki = te.reduce_axis((0, kb), "rkb"), te.reduce_axis((0, isa.group), "rki")

    def _acc(*idx):
        *t, o1, i, o2 = idx
        return te.sum(ap[(*t, i, rkb * isa.group + rki)].astype("int32")
                      * bp[(*t, o1, rkb, o2, rki)].astype("int32"), axis=[rkb, rki])

    acc = te.compute((*lead_shape, nb, mc, isa.lanes), _acc, name=isa.matmul_block)

    def _out(*idx):
        *t, i, j = idx
        v = tirx.reinterpret("uint32", acc[(*t, j // isa.lanes, i, j % isa.lanes)])
        if row_term is not None:
            v = v + tirx.reinterpret("uint32", row_term[(*t, i)])
        if column_term is not None:
            v = v + tirx.reinterpret("uint32", column_term[(*t, j)])
        return tirx.reinterpret("int32", v)

    return te.compute((*lead, m, n), _out, name=f"{isa.matmul_block}_out")


def _largest_divisor(extent: int, most: int) -> int:
    return max(d for d in range(1, most + 1) if extent % d == 0)


def _pixel_pairs(pairs: int, isa: DotIsa, channel_blocks: int) -> int:
    """Instructions' worth of pixels (`rows` each) per register tile: the largest divisor of the row whose
    accumulators stay on the stack (STACK_BYTES), unless the largest up to `pixel_tile` is more than
    a third bigger (a 32-wide row: 4 on the stack against 8), then that one, in a workspace."""
    most = max(1, isa.pixel_tile // isa.rows)
    tile_bytes = isa.rows * channel_blocks * isa.lanes * 4  # int32 accumulators per instruction's pixels
    on_stack = _largest_divisor(pairs, max(1, min(most, (STACK_BYTES - 1) // tile_bytes)))
    best = _largest_divisor(pairs, most)
    return on_stack if 4 * on_stack >= 3 * best else best


def register_tile(row_pairs: int, channel_blocks: int, isa: DotIsa, square: bool = True,
                  out_rows: int = 1) -> tuple[int, int, int]:
    """A conv's register tile: (channel blocks, instructions' worth of pixels a row, output rows). The
    ISA's tile (`channel_tile` blocks by `_pixel_pairs`, one row), or where it has a squarer one
    (`square_channels` x `square_pixels`), the row divides into it and `square` (not the folded RGB stem,
    which it slowed), that one. On AVX2 (Zen 3, 2026-12-05) a tile of 1 block x 14 pixels spends 14
    broadcasts on 14 products a step (43 instructions), 2 x 4 spends 4 on 8 (22): alone, with int32
    outputs, 1x1 and 3x3 convs with rows of 112, 56 and 28 pixels ran 7-17% faster; inside ResNet50 (A/B)
    the call 1.4-1.8% (28x28 convs 4%), MobileNetV2 the same (its low-K 1x1 convs are bound by their
    epilogue and memory). 3 x 4 spilled (12 accumulators, 3 weights, a broadcast and a product: 17
    registers) and slowed MobileNetV2 by 5%. Rows of 14 (`two_row_blocks`, `out_rows` even) take the
    square tile over two rows, 2 pixels of each: ResNet50's 14x14 convs to 256 channels or more ran 5-11%
    faster alone and the model 1.7-2.1% faster (uninstrumented calls, A/B both ways); convs to 64 channels
    ran 7-28% slower alone, so they keep 1 x 14. Rows of 7 keep 1 x 7: 2 x 7 does not fit AVX2's 16
    registers (2x slower), 4 x 2 or 2 x 2 in one row were no faster, rows padded to 8 for 2 x 4 slower."""
    if square and isa.square_channels:
        if row_pairs % isa.square_pixels == 0:
            shape = (isa.square_pixels, 1)
        elif (isa.two_row_blocks and channel_blocks >= isa.two_row_blocks and out_rows % 2 == 0
              and row_pairs % (isa.square_pixels // 2) == 0):
            shape = (isa.square_pixels // 2, 2)
        else:
            shape = None
        channels = _largest_divisor(channel_blocks, isa.square_channels)
        if shape is not None and channels > 1:
            return channels, *shape
    channels = _largest_divisor(channel_blocks, isa.channel_tile)
    return channels, _pixel_pairs(row_pairs, isa, channels), 1


def _rows_outer(sch: s_tir.Schedule, block) -> bool:
    """Whether a conv's threads split its output rows (each thread all channel blocks of its rows)
    rather than its channel blocks (each thread every row of its blocks). The static split hands each
    thread one contiguous half of the parallel loop. Split by channel blocks, a thread reads all of the
    activations and half of the weights; split by rows, half of the activations (the rows the same
    thread wrote in the layer before, where that one was split the same way) and all of the weights.
    So rows where the activations outweigh the weights: the early layers, and at batch 8 nearly all.
    At batch 8 ResNet50's 56x56 and 28x28 1x1 convs, whose activations (0.8-6.4 MB) no longer fit a
    core's L2 while their weights (16-64 KB) do, ran 6-24% faster split by rows, and the model 3.6-7%
    (2026-12-04). The activations are what the conv's packed input holds where it has one: a stride-2
    conv's taps read all of it, 4 times what one tap reads, so ResNet50's 56x56x128 stride-2 3x3 (0.4
    MB of input, 0.15 MB of weights) goes by rows, 3-6% faster in three A/Bs inside the model."""
    n, ob, oh, owc, lanes, kh, kw, cb, group = (int(sch.get(loop).extent) for loop in sch.get_loops(block))
    activation_bytes = n * oh * owc * cb * group  # the input a tap reads, over the whole output
    packed = _packed_input(sch, block)
    if packed is not None:  # the whole packed input: a strided conv's taps together read stride^2 times one tap's
        activation_bytes = max(activation_bytes, int(np.prod([int(d) for d in packed.shape])))
    weight_bytes = ob * kh * kw * cb * lanes * group
    return activation_bytes > weight_bytes


def schedule_blocked_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around one of our conv/dense blocks. Returns None when the
    function has none of ours, else the names of the blocks left for the default rule (input packing).

    The accumulator tile (pixels x channel_tile * lanes channels for conv, one channel block for dense)
    lives in a local buffer, which LLVM keeps in vector registers for the whole reduction; the innermost
    product is tensorized to the instruction; and the requantize epilogue is inlined into one block
    computed per tile, inside the same parallel loop.
    """
    root = sch.get_sblock("root")
    blocks_ = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks_]
    found = [(isa, n) for isa in _ISAS.values() for n in (isa.conv_block, isa.dense_block, isa.matmul_block)
             if n in names]
    if not found:
        return None
    isa, kind = found[0]
    k = names.index(kind)
    block, epilogue = blocks_[k], blocks_[k + 1:]
    # A ClampFirst epilogue that something fuses after (a residual add) keeps its own block, computed per
    # tile into a small buffer and tensorized like a lone one; what follows reads its 8-bit results.
    narrow = narrow_block(isa)
    epilogue_names = [sch.get(b).name_hint for b in epilogue]
    staged = next((b for b in epilogue[:-1] if sch.get(b).name_hint == narrow), None)
    for b in epilogue[:-1]:  # the _out stage, bias add, dyadic multiply, shift, clamp, cast: one block
        if b != staged:
            sch.compute_inline(b)
    last, last_name = epilogue[-1], epilogue_names[-1]
    acc = sch.cache_write(block, 0, ACC_SCOPE)
    prefetch = None  # (the loops, tiling and weights of a conv whose tiles prefetch their successor's weights)
    if kind == isa.conv_block:
        n, o1, i, j, o2, rh, rw, rcb, rci = sch.get_loops(block)
        rows_outer = _rows_outer(sch, block)
        oh_ext = int(sch.get(i).extent)
        pack_once = isa.name == "vnni" and _stride_one_window(sch, block, oh_ext, int(sch.get(rh).extent))
        if isa.act_dtype == "int16" and _packed_input(sch, block) is not None:
            # Widened activations (AVX2) are packed for every conv, and inside the kernel each task (a row
            # of one 8-channel block) widened its rows again: 32 times over for a 1x1 conv to 256
            # channels. Packed once, ResNet50's 1x1 convs ran 10-48% faster, the model 1.13x (Zen 3,
            # 2026-12-05, interleaved A/B inside it); the 7x7x512 3x3 convs (`_stride_one_window`
            # alone, earlier that day) 6-15%.
            pack_once = True
        weights = next(r.source for r in sch.get(block).reads if len(r.source.shape) == 6)
        # several channel blocks per tile: each activation load feeds channel_tile instructions
        pairs = int(sch.get(j).extent) // isa.rows
        # (INT4 convs keep one row a tile: their whole-block path walks the rows one by one)
        tile_blocks, tile_pairs, tile_rows = register_tile(pairs, int(sch.get(o1).extent), isa, FOLD_BLOCK not in names,
                                                           oh_ext if INT4_BLOCK not in names else 1)
        o1o, o1i = sch.split(o1, [None, tile_blocks])
        jo, ji, jr = sch.split(j, [None, tile_pairs, isa.rows])
        ii = None  # the tile's rows, where it has two
        if tile_rows > 1:
            i, ii = sch.split(i, [None, tile_rows])
        batch, nblk = int(sch.get(n).extent), int(sch.get(o1o).extent)
        few_channels = int(sch.get(rcb).extent) * isa.group < HOIST_BELOW_CHANNELS
        # Packed INT4 weights: with enough channel blocks to share among threads, a thread takes whole
        # channel blocks, unpacks the block's weights once and runs every output row over them, instead
        # of unpacking each weight again for every tile of pixels (as costly as the tile's products).
        whole = INT4_BLOCK in names and batch * nblk >= MIN_INT4_BLOCKS
        pack_once = pack_once and not whole  # (whole-block INT4 convs keep their per-row packing: not measured)
        if whole:  # a thread's channel blocks serve every image of the batch: unpacked once
            sch.reorder(o1o, n, i, jo, rh, rw, rcb, ji, o1i, jr, o2, rci)
            par = o1o if nblk >= MIN_INT4_BLOCKS else sch.fuse(o1o, n)
            inputs_at = i
        else:
            # The images of a batch run inside a task, one row of each: a tile's weights (channel_tile
            # blocks) are read from cache for all of them, not fetched again for each image.
            outer = (i, o1o) if rows_outer else (o1o, i)
            sch.reorder(*outer, n, jo, rh, rw, rcb, *([ii] if ii is not None else []), ji, o1i, jr, o2, rci)
            rows, one_by_one = int(sch.get(i).extent), int(sch.get(rh).extent) * int(sch.get(rw).extent) == 1
            row_tasks = (pack_once and rows_outer and isa.act_dtype == "int16" and FOLD_BLOCK not in names
                         and one_by_one and rows >= MIN_ROW_TASKS and rows % 2 == 0)
            par = i if row_tasks else sch.fuse(*outer)
            inputs_at = par
            if row_tasks:
                # A 1x1 conv split by rows on AVX2: a task is a whole output row (pair), every channel tile, and
                # widens the input row it reads itself, right before (a few KB, in L1), where one stage
                # before the kernel widened the whole input into a buffer of twice its bytes (MobileNetV2's
                # 56x56x144: 0.9 MB, past a Zen 3 core's L2) and cost a parallel launch of its own.
                pack_once = False
            elif one_by_one:
                # A 1x1 conv's tiles share no input pixels: each packs its own (the same work as one
                # row per task), in a buffer small enough for the stack (STACK_BYTES) instead of a
                # workspace-pool row per task. MobileNetV2's signed-input expand convs: 1% of the model.
                inputs_at = jo
        sch.parallel(par)
        # (not for INT4: what the kernel reads there is the in-kernel unpack stage, not the packed weights)
        # (not on AVX2: there a step is 14 broadcast loads and products, the kernel is bound by the
        # core's dispatch, not by memory, and the prefetch's compare and branch a step cost more than it
        # gained: on the Zen 3, 2026-12-05, interleaved A/Bs inside the models, ResNet50 1.5% and
        # ResNet18's direct convs 3% faster without it)
        if not whole and INT4_BLOCK not in names and nblk > 1 and isa.act_dtype != "int16":
            tiling = _Tiling(oh_ext, nblk, int(sch.get(o1i).extent), rows_outer)
            prefetch = ([par, n, jo, rh, rw, rcb], tiling, weights)
        tile, first_reduce, rblock = jo, rh, (par if whole else rcb)
        red_steps = kh_kw_cb(sch, block)  # (the block's handle goes with tensorization, below)
        if INT4_BLOCK in names and not whole:
            tile_weights = int(sch.get(o1i).extent) * isa.block * kh_kw_cb(sch, block)
            if tile_weights <= ROW_UNPACK_BYTES:
                rblock = par
    else:
        loops = sch.get_loops(block)
        lead = loops[:-5] if kind == isa.matmul_block else []  # a matmul of two activations: (heads, ...)
        o1, i, o2, rkb, rki = loops[-5:]
        rows, nb = int(sch.get(i).extent) // isa.rows, int(sch.get(o1).extent)
        rt = dense_row_tile(isa, rows * isa.rows) if rows * isa.rows >= DENSE_TILE_MIN_ROWS else 1
        ji = o1i = None
        unpack_once = None  # (a W4A8 linear's parallel loop, over channel tiles, whose weights unpack once)
        if rt > 1 and rows % rt == 0:
            # Tokens: a register tile of rt rows by up to channel_tile blocks, each broadcast feeding
            # channel_tile instructions and each weight load rt (one row by one block fed each
            # instruction a load of each). Threads split the rows where the activations outweigh the
            # weights, else the channel tiles (each thread then reads its share of the weights once).
            o1, o1i = sch.split(o1, [None, _largest_divisor(nb, isa.channel_tile)])
            io, ji, jr = sch.split(i, [None, rt, isa.rows])
            # Packed INT4 weights: a task is a channel tile over every row tile, its weights unpacked once
            # (`_unpack_at`) rather than again for each row tile
            whole = INT4_BLOCK in names and not lead and int(sch.get(o1).extent) >= MIN_INT4_BLOCKS
            # (activations, weights: K bytes a row)
            outer = (io, o1) if rows * isa.rows > nb * isa.lanes and not whole else (o1, io)
            sch.reorder(*lead, *outer, rkb, ji, o1i, jr, o2, rki)
            if whole:
                unpack_once, tile = outer
            else:
                tile = sch.fuse(*lead, *outer)
        else:
            io, jr = sch.split(i, [None, isa.rows])
            sch.reorder(*lead, o1, io, rkb, jr, o2, rki)
            tile = sch.fuse(*lead, o1, io)
        sch.parallel(unpack_once if unpack_once is not None else tile)
        first_reduce, inputs_at, ii = rkb, None, None
        rblock = unpack_once if unpack_once is not None else rkb
        few_channels = pack_once = False
    sch.reverse_compute_at(acc, tile)
    if staged is not None:
        sch.reverse_compute_at(staged, tile)
    sch.reverse_compute_at(last, tile)
    producers = [b for b, name in zip(blocks_[:k], names[:k], strict=True) if name != INT4_BLOCK]
    if INT4_BLOCK in names:  # unpack each weight block right before the instructions that use it
        _unpack_at(sch, blocks_[names.index(INT4_BLOCK)], rblock)
    init = sch.decompose_reduction(block, first_reduce)
    ensure_intrin(isa.intrin, isa.intrin_funcs)
    sch.tensorize(jr if isa.rows > 1 else o2, isa.intrin)
    for loop in (o1i, ji, ii):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    try:  # the epilogue reads the accumulators where the kernel left them: no copy of the tile
        sch.compute_inline(acc)
    except s_tir.ScheduleError:
        sch.vectorize(sch.get_loops(acc)[-1])
    # (blocks by name from here: inlining the accumulators replaced the handles)
    if narrow in epilogue_names and isa.lanes == 16:  # the ClampFirst epilogue: 16 channels at a time as one intrinsic
        from .x86_ifma import tensorize_narrow

        tensorize_narrow(sch, narrow)
    elif narrow in epilogue_names:  # (AVX2's tile is 8 channels: the short form's arithmetic, vectorized)
        vectorize_inner(sch, sch.get_loops(sch.get_sblock(narrow))[-1], most=isa.epilogue_lanes)
    if last_name != narrow:
        # the requantize epilogue (or what fuses after the ClampFirst one) several channels at a time: its
        # integer arithmetic as vector ops instead of scalar ones per output
        vectorize_inner(sch, sch.get_loops(sch.get_sblock(last_name))[-1], most=isa.epilogue_lanes)
    if prefetch is not None:
        _prefetch_next_tile(sch, *prefetch)
    if (kind == isa.conv_block and narrow in epilogue_names and isa.name == "vnni" and INT4_BLOCK not in names
            and os.environ.get("INTFORGE_PIPELINE_EPILOGUE", "1") != "0"):  # =0: to compare without
        from .epilogue_pipeline import mark

        mark(sch, tile, first_reduce, [f"{narrow}_o", *([last_name] if last_name != narrow else [])],
             tile_pairs * isa.rows, int(sch.get(o1i).extent), red_steps)
    if inputs_at is None:  # dense: its input is a few rows, packed once rather than once per output block
        return {sch.get(b).name_hint for b in producers}
    if few_channels or FOLD_BLOCK in names or pack_once:
        # The 3-channel stem: its packing stage vectorizes over only 4 channels, and inside the kernel
        # each input row would be packed again for every row of the window and every channel block
        # (7 x 2 times for ResNet's 7x7 stem). Packed once, by the default rule, the stem runs 20% faster.
        # So do 3x3 stride-1 convs (`_stride_one_window`), by 4%.
        return {sch.get(b).name_hint for b in producers}
    return compute_inputs_at(sch, producers, inputs_at)


def _stride_one_window(sch: s_tir.Schedule, block, out_rows: int, window_rows: int) -> bool:
    """Whether a conv slides a window of several rows one row at a time over an input it packs (a 3x3
    conv at stride 1, or any taller window at stride 1 and dilation 1: the packed input then has exactly
    `out_rows + window_rows - 1` rows), whose packing stage then runs once, before the kernel. Packed
    inside each task (a row of one channel tile), every input row is copied again for each row of the
    window and each channel tile: 24 times for ResNet's 14x14x256 convs, about 4% of their time alone
    (the same conv unpadded, which packs nothing, took 0.954x). Packed once, on the Zen 5 (2026-12-04,
    interleaved A/Bs inside the models): the 14x14x256 convs 4%, the 7x7x512 ones 4-6% faster,
    ResNet50 0.988-0.997x, ResNet18 0.977-0.991x at batch 1 and 0.986x at batch 8. Not with a stride:
    two of ResNet50's three stride-2 3x3 convs ran 9% and 20% slower packed once (the third 4% faster),
    as in an earlier session. Not measured on ARM, so the ARM kernels keep packing per task (AVX2's
    widened inputs are packed once for every conv: `schedule_blocked_func`)."""
    packed = _packed_input(sch, block)
    return packed is not None and window_rows > 1 and int(packed.shape[1]) == out_rows + window_rows - 1


def _packed_input(sch: s_tir.Schedule, block):
    """The buffer of a conv's packing stage ([N, H, W, C], named `data_<isa>` by `conv2d_blocked`), or None
    where the conv reads its input where the previous layer wrote it (or packs folded rows)."""
    return next((r.source for r in sch.get(block).reads
                 if r.source.name.startswith("data_") and len(r.source.shape) == 4), None)


@dataclass(frozen=True)
class _Tiling:
    """How a conv's parallel tasks walk its channel tiles (for `_prefetch_next_tile`)."""

    rows: int  # output rows
    tiles: int  # channel tiles
    blocks: int  # channel blocks a tile
    rows_outer: bool  # tasks ordered (row, tile), else (tile, row)

    def spread(self, steps: int, block_bytes: int) -> bool:
        """Whether the next tile's prefetches go evenly over each visit (weights that come from memory, in
        tiles past L1) rather than in one burst a visit."""
        tile_bytes = self.blocks * steps * block_bytes
        return tile_bytes >= SPREAD_TILE_BYTES and self.tiles * tile_bytes >= SPREAD_WEIGHT_BYTES


def _prefetch_next_tile(sch: s_tir.Schedule, loops: list, tile: _Tiling, weights) -> None:
    """Prefetch the weights of the channel tile a task runs next, a slice on each of this tile's visits.

    A parallel task runs one channel tile (`channel_tile` blocks of `lanes` output channels) over one
    output row (threads split by rows) or over every row of the tile (split by channel blocks), in
    visits of one pixel tile each; each visit reads all of the tile's weights, one line a block per
    reduction step. The first visit of a tile finds them in memory: a model's weights do not stay in
    cache from one call to the next, and a 1x1 conv's 8-32 KB a tile are too short a stream for the
    hardware prefetcher to get ahead of. So each reduction step also prefetches, into L1
    (`PREFETCH_LOCALITY`), the same step's lines of the next tile, on just one of the tile's visits:
    step s of S on visit floor(s * V / S) of V, so the next tile's lines are requested once each,
    spread evenly over the work before it. On Zen 5 (2026-12-04, interleaved per-kernel A/B) ResNet50's
    7x7 and 14x14 1x1 convs ran 7-30% faster, the model 4-6% at batch 1 and 2% at batch 8, ResNet18 3-4%.

    That puts a visit's prefetches in one burst, `blocks` lines a step over 1/V of its steps. Where the
    weights come from memory (a conv's weights past a core's L2, `SPREAD_WEIGHT_BYTES`) and a tile's
    stream is long (`SPREAD_TILE_BYTES`), such a burst asks for more lines than the core can have in
    flight to memory, and the tile's own loads wait behind them. Those convs instead prefetch one line
    every `every` steps (a power of two, `_spread_stride`), the next tile's lines in order: on Zen 5
    (2026-12-04 afternoon, interleaved A/Bs) ResNet50's 7x7x512 3x3 convs ran 13-17% faster, its
    stride-2 14x14x512 3x3 and 2048->512 1x1 14-15%, ResNet18's layer4 convs 6-12%; spread the same way,
    the smaller convs did not gain (14x14x256 3x3, 0.6 MB: 1-2% slower; a 1x1 of 16 KB tiles, 8-11%).

    The prefetch goes in front of the reduction-step loop's body (`stages.insert_at_loop_top`)."""
    par, n, jo, rh, rw, rcb = (sch.get(lp) for lp in loops)
    pv, nv, jv, rhv, rwv, rcbv = (lp.loop_var for lp in (par, n, jo, rh, rw, rcb))
    batch, jo_ext, kh, kw, cb = (int(lp.extent) for lp in (n, jo, rh, rw, rcb))
    dtype = str(par.extent.ty)

    def c(v: int):
        return tirx.const(v, dtype)

    if tile.rows_outer:  # a task: one (row, channel tile); the next task: the row's next channel tile
        o1o, row, visits = tirx.floormod(pv, c(tile.tiles)), c(0), batch * jo_ext
    else:  # a task: one channel tile, every row
        o1o, row, visits = tirx.floordiv(pv, c(tile.rows)), tirx.floormod(pv, c(tile.rows)), tile.rows * batch * jo_ext
    steps = kh * kw * cb
    visit = (row * c(batch) + nv) * c(jo_ext) + jv
    step = (rhv * c(kw) + rwv) * c(cb) + rcbv
    first = tirx.floormod(o1o + c(1), c(tile.tiles)) * c(tile.blocks)

    def line(block, h, w, cgroup) -> tirx.Stmt:  # the line of channel block `block` at step (h, w, cgroup)
        return prefetch(tirx.address_of(tirx.BufferLoad(weights, [block, h, w, cgroup, c(0), c(0)])))

    every = _spread_stride(visits, tile.blocks)
    if every and tile.spread(steps, int(weights.shape[-1]) * int(weights.shape[-2])):
        # Spread: the next tile's lines in order (block by block), one request every `every` steps, visit v
        # taking lines [v * S / every, (v + 1) * S / every): `every` is a power of two at most V / blocks,
        # so the V visits cover all blocks * S lines
        nth = visit * c(-(-steps // every)) + tirx.floordiv(step, c(every))
        mine = tirx.all(tirx.floormod(step, c(every)) == c(0), nth < c(tile.blocks * steps))
        at = tirx.floormod(nth, c(steps))  # (divisions only on the steps that prefetch)
        then = line(first + tirx.floordiv(nth, c(steps)), tirx.floordiv(at, c(kw * cb)),
                    tirx.floormod(tirx.floordiv(at, c(cb)), c(kw)), tirx.floormod(at, c(cb)))
    else:
        # Bursts: step s is this visit's when floor(s * V / S) == v, that is when
        # ceil(v * S / V) <= s < ceil((v + 1) * S / V), and then each block's line of step s: the bounds are
        # the task's (LLVM computes them outside the reduction), each step only compares (per-step
        # multiplies and divisions cost the hot 3x3 convs 2-7%)
        lo, hi = (tirx.floordiv(v * c(steps) + c(visits - 1), c(visits)) for v in (visit, visit + c(1)))
        mine = tirx.all(lo <= step, step < hi)
        calls = [line(first + c(b), rhv, rwv, rcbv) for b in range(tile.blocks)]
        then = tirx.SeqStmt(calls) if len(calls) > 1 else calls[0]
    insert_at_loop_top(sch, loops[-1], [tirx.IfThenElse(mine, then, None)])


def _spread_stride(visits: int, blocks: int) -> int:
    """Steps between two spread prefetches: the largest power of two at most visits / blocks (so a
    tile's visits cover the next tile's lines), or 0 when a tile has fewer than two visits a block."""
    most = visits // blocks
    return 1 << (most.bit_length() - 1) if most >= 2 else 0


def kh_kw_cb(sch: s_tir.Schedule, block) -> int:
    """Reduction steps of a conv tile (KH x KW x C/group): how many weight blocks one channel block has."""
    rh, rw, rcb, _rci = (iv for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return int(rh.dom.extent) * int(rw.dom.extent) * int(rcb.dom.extent)


def _unpack_at(sch: s_tir.Schedule, block, loop) -> None:
    """Compute the INT4 unpack stage under `loop` (one reduction step, or a thread's whole channel block):
    each weight block as two vector halves (low nibbles, then high), each a few byte-wide vector ops."""
    sch.compute_at(block, loop, preserve_unit_loops=False)
    *_, o2, rci = sch.get_loops(block)
    half, o2i = sch.split(o2, [2, None])
    sch.vectorize(sch.fuse(o2i, rci))
    sch.unroll(half)
