"""Exact integer Winograd F(4x4, 3x3) for 3x3 stride-1 convs on x86 AVX512-VNNI, its products on `vpdpwssd`.

A direct 3x3 conv spends 9 multiplies per input channel on each output; Winograd F(4x4, 3x3) computes a
4x4 output tile from a 6x6 input tile with 36 elementwise products per channel instead of 144, after
transforming the tile (B^T d B) and the weights (G g G^T), and transforms the 36 channel sums back
(A^T M A). The transforms' values outgrow bytes, so the products run on 16-bit `vpdpwssd` (16 lanes x 2
channels, half `vpdpbusd`'s rate): 4x fewer products at half the rate, 2x in all before the transforms.
Measured on ResNet18's 56x56x64 and 28x28x128 layers: 1.5x faster than the direct VNNI kernel. On AVX2
CPUs (no VNNI: Zen 2/3, Haswell to Coffee Lake) the products run on `vpmaddwd` pairs (`Flavour`), at the
same rate as the direct int8 kernel there (kernels/x86_avx2.py): 3-3.3x faster than it on those layers.

Exact, in integers only. The 1/4, 1/6 and 1/24 of G are scaled out row by row (G' = diag(12, 6, 6, 24, 24,
3) G is integer) and put back by A' = 24 A^T diag(1/12, 1/6, 1/6, 1/24, 1/24, 1/3), also integer, so that
A'^T (G' g G'^T . B^T d B) A' = 576 x the conv sum. The first and last rows take the 3 (not the smallest
integer G', diag(4, 6, 6, 24, 24, 1)) so that A' holds powers of two only: its 6 and 24 were a `vpmulld`
each (LLVM keeps a multiply by a constant on Zen), 2 in each 6 sums of the inverse transform; no row's
absolute sum grows past 7, so the int16 bound below holds as before. Activations run centered (d = x - 128
for uint8 input, x for int8; padding is 0 in x), so |B^T d B| <= 100 * 128 and |G' g G'^T| <= 49 * 128
fit int16.
The channel sums and the inverse transform wrap on 32-bit lanes (only their value mod 2^32 is used).
576 = 64 * 9: an arithmetic shift by 6 leaves 9 * acc mod 2^26, a multiply by 9's inverse mod 2^32
gives acc mod 2^26, and sign-extending its 26 bits gives acc itself wherever |acc| < 2^25, which
`exact` proves per layer from the weights (|acc| <= 128 * sum|w| of the centered activations). The
uint8 correction +128 * sum(w) comes after, with the epilogue (one definition: blocked_dot's).

Only where it pays: stride 1, dilation 1, padding 1, input channels in 32-channel blocks and output
channels in pairs of 16-lane instructions, rows of tiles that split into runs of 4 to 7, and at most
MAX_WEIGHT_BYTES_PER_TILE of int16 weights per 4x4 output tile of the batch (ResNet18's 7x7 layers, 4
tiles of 512 channels, would stream 19 MB of weights for one image). Rows and columns that are not
multiples of 4 end in a partial tile.

F(2x2, 3x3) (`F2`, `Plan`), on AVX2 where F(4x4) does not pay: 16 products per channel for a 2x2 tile
instead of 36 for 4x4 (2.25x fewer than direct, 1.72x on a 7x7 output's 16 partly used tiles), 8 MB of
int16 weights for ResNet's 7x7 x 512 layer. Its transforms are 0 and +-1 only, with G' = 2 G: the sums
come out 4 x acc, exact while |acc| < 2^29. Its tasks split the output channels instead of the rows of
tiles (each task reads its share of the weights once, all of the tiles from a buffer transformed
before), a row of 4 tiles x 16 lanes a register tile. Inside ResNet18 on the Zen 3 (2026-12-05) the
three 7x7 x 512 convs took 0.65-0.67 ms each against 0.82-0.84 direct, the call 7.6 ms against 8.5; in
4-tile register tiles 0.59 ms. F(4x4) splits its tasks by channels too where its weights a tile pass
`Flavour.f4_channels_bytes_per_tile` (AVX2's 14x14 x 256: 0.63 -> 0.50 ms each), and runs by channels
where all of a layer's tiles make one register tile, whatever its weights a tile: since 2026-12-05 evening
the 7x7 x 512 layers at batch 1 (about 2% of ResNet18's call), F(2x2) keeping batch 8 and light layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import s_tir, te, tirx

from .blocked_dot import ACC_SCOPE, DotIsa, Narrow, add_correction, broadcast_dot_intrin, ensure_intrin, narrow_block
from .dot_product import SHIFT
from .stages import (
    find_block,
    insert_at_loop_top,
    map_stmt,
    prefetch,
    rewrite_marked_loops,
    split_vector,
    vectorize_inner,
)
from .x86_avx2 import avx2_intrin

LANES, GROUP = 16, 2  # vpdpwssd: 16 int32 lanes, each the sum of 2 int16 products
INTRIN = "intforge_dot_16x2_s16s16s32_vnni"
TILE, WINDOW, POS = 4, 6, 36  # output tile side, input tile side, elementwise products per channel
CHANNEL_TILE = 2  # instruction-wide output channel blocks per register tile
MAX_TILE_ROW = 7  # tiles per register tile: 7 x 2 x 16 int32 accumulators (896 bytes, on the stack)
MIN_TILE_ROW = 4  # fewer tiles a register tile (a row of 9, 11 or 13 tiles): the loads would set the pace
# The int16 weights are 8x the int8 ones (36 x 2 bytes against 9), and a model's weights do not stay in
# cache from one call to the next: a layer with few tiles a weight streams more than it computes. Alone,
# with every cache flushed, ResNet's 14x14 x 256 channels at batch 1 (295 KB of weights a tile, 4.7 MB a
# layer) gained (0.249 ms against 0.292), but inside ResNet18, three such layers back to back took
# 0.45-0.63 ms each against 0.30 direct on 2026-12-03, when this shared VM's memory was busy: streamed
# weights cost what memory bandwidth the neighbours leave. 48 KB a tile keeps 56x56 x 64 (1.5 KB) and
# 28x28 x 128 (24 KB) at batch 1, and 14x14 x 256 from batch 8 on (37 KB); 7x7 x 512 never.
MAX_WEIGHT_BYTES_PER_TILE = 48 * 1024
# On AVX2 the direct kernel runs at the products' own int16 rate, so Winograd gains 3x where it is compute
# bound, and streaming its weights costs less against that: ResNet18's 14x14 x 256 layers at batch 1 (295 KB
# of int16 weights a tile, 4.7 MB a layer) took 0.46-0.55 ms against 0.97-1.0 direct on the Zen 3 of
# 2026-12-05 (inside the model). The 7x7 x 512 ones (2 tiles a row, 4.7 MB a tile) are past it: F(2x2), or at
# batch 1 F(4x4) with all 4 tiles in one register tile (`plan`).
AVX2_MAX_WEIGHT_BYTES_PER_TILE = 320 * 1024
AVX2_F2_WEIGHT_BYTES_PER_TILE = 512 * 1024
# ... and past this many bytes a tile F(4x4)'s tasks split the output channels too (`Plan.by_channels`): by
# rows of tiles, each of ResNet's 14x14 x 256 layer's 4 tasks streamed all 4.7 MB of its weights; by
# channels each thread reads its half once, in runs of whole rows of tiles. Inside ResNet18 on the Zen 3
# (2026-12-05, interleaved A/B) those three layers took 0.50-0.52 ms against 0.63-0.64, the call 4% less;
# by channels the 28x28 x 128 ones (24 KB a tile, runs of one 7-tile row) were 9-23% slower.
AVX2_F4_CHANNELS_BYTES_PER_TILE = 128 * 1024
MAX_RUN = 8  # tiles a register tile where a task runs all of the tiles (`Plan.by_channels`)
# ... and where a run of this many tiles divides them on a flavour with instruction-wide parts (AVX2), a
# register tile of that run by both parts (`schedule_winograd_func`)
SQUARE_RUN = 4
CHANNEL_TASKS = 8  # tasks of a conv that runs by channels, where its channel blocks divide so
WEIGHT_PREFETCH_BYTES = 4096  # how far ahead of its products a task prefetches its weight stream: a page
ACC_LIMIT = 1 << 25  # |acc| below this is recovered exactly from 576 * acc mod 2^32
BLOCK = "winograd_gemm"  # the products' block: the schedule rule and tuning look for it
OUT_BLOCK = "winograd_out"  # the recovered conv sums

# B^T, G' (G with its rows scaled to integers) and A'^T for F(4x4, 3x3) at the points 0, +-1, +-2, inf
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.int64)
GP = np.array([[3, 0, 0], [-1, -1, -1], [-1, 1, -1], [1, 2, 4], [1, -2, 4], [0, 0, 3]], np.int64)
AT = np.array([[2, 4, 4, 1, 1, 0], [0, 4, -4, 2, -2, 0], [0, 4, 4, 4, 4, 0], [0, 4, -4, 8, -8, 8]], np.int64)
SCALE_SHIFT = 6  # 576 = 2^6 * 9
INV9 = pow(9, -1, 1 << 32)


def _intrin() -> tuple:
    return broadcast_dot_intrin("llvm.x86.avx512.vpdpwssd.512", "int16", LANES, GROUP, weight_dtype="int16")


@dataclass(frozen=True)
class Flavour:
    """How the products run on one instruction set: the intrinsic, and the output channel blocks (of 16)
    a register tile holds. AVX2's 16 ymm registers hold 7 tiles x 16 lanes of one block (14), not two."""

    intrin: str
    intrin_funcs: Callable[[], tuple]
    channel_tile: int
    max_weight_bytes_per_tile: int
    lanes: int = LANES  # int32 lanes of the instruction: the products run in LANES / lanes passes
    f2_weight_bytes_per_tile: int = 0  # where F(4x4) does not pay, F(2x2) by channels up to this (0: never)
    f4_channels_bytes_per_tile: int = 0  # F(4x4) by channels past this (0: never; not measured on VNNI)


# (AVX2: kernels/x86_avx2.py's 8 x 2 `vpmaddwd` product with int16 weights; a direct int8 conv runs at that
# same int16 rate there, so Winograd's 4x fewer products are all gain, where on VNNI they are half of it)
FLAVOURS = {"vnni": Flavour(INTRIN, _intrin, CHANNEL_TILE, MAX_WEIGHT_BYTES_PER_TILE),
            "avx2": Flavour("intforge_dot_8x2_s16s16s32_avx2", lambda: avx2_intrin("int16"), 1,
                            AVX2_MAX_WEIGHT_BYTES_PER_TILE, 8, AVX2_F2_WEIGHT_BYTES_PER_TILE,
                            AVX2_F4_CHANNELS_BYTES_PER_TILE)}
ISA_ATTR = "winograd_isa"  # the products' block annotation: which flavour schedules it
SPLIT_ATTR = "winograd_by_channels"  # and where present, that its tasks split the output channels (`Plan`)


def flavour_weights(weights: np.ndarray, isa: str, tiling: Tiling | None = None) -> np.ndarray:
    """`weight_layout` with a flavour's channel tile."""
    return weight_layout(weights, FLAVOURS[isa].channel_tile, tiling)


# int8 activations: uint8 ones run as x - 128, corrected by +128 * sum(w) (DotIsa.correction_sign)
WINOGRAD = DotIsa("winograd", INTRIN, _intrin, "int8", lanes=LANES, group=GROUP)


@dataclass(frozen=True)
class Plan:
    """How a conv runs as Winograd: its tiling, and whether its tasks split the output channels (each
    task all of the tiles, `CHANNEL_TASKS` of them) rather than the rows of tiles (each task all of the
    weights: where the weights outweigh the tiles, every thread would stream all of them)."""

    tiling: Tiling
    by_channels: bool = False


def plan(batch: int, h: int, w: int, channels: int, out_channels: int, kernel: tuple[int, int], stride, pad,
         dilation, isa: str = "vnni") -> Plan | None:
    """How a conv runs as Winograd where its shape is one this kernel takes and gains on (see the module's
    docstring), else None: F(4x4) by rows of tiles (by output channels where the flavour allows and its
    weights a tile pass `f4_channels_bytes_per_tile`, and also, past that, where all of its tiles make one
    register tile), or where the flavour allows and F(4x4)'s weights outweigh its tiles, F(2x2) by output
    channels."""
    flavour = FLAVOURS[isa]
    if not (tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and tuple(pad) == (1, 1) and channels % (2 * LANES) == 0
            and out_channels % (flavour.channel_tile * LANES) == 0):
        return None
    rows, row = _tiles(h), _tiles(w)
    tiles = batch * rows * row
    weight_bytes = POS * channels * out_channels * 2
    if _tile_row(row) >= MIN_TILE_ROW and weight_bytes <= flavour.max_weight_bytes_per_tile * tiles:
        return Plan(F4, by_channels=bool(flavour.f4_channels_bytes_per_tile) and _run(rows, row) >= MIN_TILE_ROW
                    and weight_bytes > flavour.f4_channels_bytes_per_tile * tiles)
    if (flavour.f4_channels_bytes_per_tile and _run(rows, row) == tiles >= MIN_TILE_ROW
            and weight_bytes > flavour.f4_channels_bytes_per_tile * tiles):
        # All of the layer's tiles in one register tile (ResNet's 7x7 x 512 at batch 1: 4 tiles), by output
        # channels: each weight is read once for every tile, so F(4x4)'s weights (2.25x F(2x2)'s: 18.9 MB
        # against 8.4) cost their stream once, for 1.78x fewer products (4 tiles x 36 against 16 x 16).
        # ResNet18 on the Zen 3 (2026-12-05, whole calls, uninstrumented A/Bs both ways) 0.6-3.4% faster,
        # about 2% by the median; an instrumented per-kernel A/B had judged it slower (0.78 against 0.67 ms
        # a layer; benchmarks/ab_calls.py)
        return Plan(F4, by_channels=True)
    rows2, row2 = _tiles(h, F2.tile), _tiles(w, F2.tile)
    tiles2 = batch * rows2 * row2
    if (flavour.f2_weight_bytes_per_tile and _run(rows2, row2) >= MIN_TILE_ROW
            and F2.pos * channels * out_channels * 2 <= flavour.f2_weight_bytes_per_tile * tiles2):
        return Plan(F2, by_channels=True)
    return None


def supported(batch: int, h: int, w: int, channels: int, out_channels: int, kernel: tuple[int, int], stride,
              pad, dilation, isa: str = "vnni") -> bool:
    """Whether a conv's shape is one this kernel takes and gains on (`plan`)."""
    return plan(batch, h, w, channels, out_channels, kernel, stride, pad, dilation, isa) is not None


def whole_tiles(h: int, w: int, tiling: Tiling | None = None) -> bool:
    """Whether the output is whole tiles (4x4 by default), which the ClampFirst epilogue's intrinsic needs
    (a partial tile's predicate would sit on the block it is tensorized into)."""
    tile = (tiling or F4).tile
    return h % tile == 0 and w % tile == 0


def _tiles(n: int, tile: int = TILE) -> int:
    """Tiles along a side of n outputs (the last one may run past the edge)."""
    return -(-n // tile)


def _run(rows: int, row: int, most: int = MAX_RUN) -> int:
    """Tiles per register tile where a task runs all of a layer's tiles (`Plan.by_channels`): whole rows of
    tiles, as many as divide the rows and fit `most` (0 where not one does)."""
    return row * max((k for k in range(1, rows + 1) if rows % k == 0 and k * row <= most), default=0)


def _tile_row(tiles: int) -> int:
    """Tiles per register tile: the largest divisor of a row's tiles up to MAX_TILE_ROW."""
    return max(d for d in range(1, MAX_TILE_ROW + 1) if tiles % d == 0)


def exact(weights: np.ndarray, tiling: Tiling | None = None) -> bool:
    """Whether every output channel's sum of centered activations stays within the tiling's limit (F(4x4)'s
    by default), so that it is recovered exactly. weights: [O, C, 3, 3] int8."""
    limit = (tiling or F4).acc_limit
    return int(np.abs(weights.astype(np.int64)).sum(axis=(1, 2, 3)).max()) * SHIFT < limit


def weight_layout(weights: np.ndarray, channel_tile: int = CHANNEL_TILE, tiling: Tiling | None = None) -> np.ndarray:
    """[O, C, 3, 3] int8 -> G' g G'^T as int16 [6, O/32, 6, C/2, 2, 16, 2] (F(4x4); F(2x2): 4 for 6, and
    `tiling` says which): column j of the position
    (i, j), pair of output blocks (a register tile's channels: `channel_tile` of them, 2 here), row i,
    channel pair, output block in the pair, lane, channel in the pair. One 64-byte load feeds one
    vpdpwssd, and a task reads the weights as one contiguous stream, in the order its products run
    (column, pair, row: `schedule_winograd_func`)."""
    t = tiling or F4
    o, c = weights.shape[:2]
    u = np.einsum("ia,ocab,jb->ijco", t.gp, weights.astype(np.int64), t.gp).reshape(t.pos, c, o)
    if np.abs(u).max() >= 1 << 15:
        raise ValueError("transformed weights outgrow int16: weights must be int8")
    u = u.reshape(t.window, t.window, c // 2, GROUP, o // (channel_tile * LANES), channel_tile, LANES)
    return np.ascontiguousarray(u.transpose(1, 4, 0, 2, 5, 6, 3)).astype(np.int16)


def _scale(dtype: str | None):
    """x * c for a constant c: in `dtype` for TIR expressions (a Python int would widen them to int32)."""
    if dtype is None:
        return lambda x, c: x * c
    return lambda x, c: x * tirx.const(c, dtype)


def transform_input(d: list, dtype: str | None = None) -> list:
    """B^T d for the 6 values d of a tile's column (or row): BT's rows with their common terms shared
    (LLVM computes each once per unrolled tile). numpy arrays, or TIR expressions of `dtype`."""
    k = _scale(dtype)
    t4, t3 = d[4] - k(d[2], 4), d[3] - k(d[1], 4)
    u, v = d[4] - d[2], k(d[3] - d[1], 2)
    return [k(d[0], 4) - k(d[2], 5) + d[4], t4 + t3, t4 - t3, u + v, u - v, k(d[1], 4) - k(d[3], 5) + d[5]]


def transform_output(m: list, dtype: str | None = None) -> list:
    """A'^T m for the 6 values m of a column (or row) of channel sums, common terms shared."""
    k = _scale(dtype)
    s12, d12 = m[1] + m[2], m[1] - m[2]
    s34, d34 = m[3] + m[4], m[3] - m[4]
    return [k(m[0], 2) + k(s12, 4) + s34, k(d12, 4) + k(d34, 2), k(s12 + s34, 4),
            k(d12, 4) + k(d34 + m[5], 8)]


def _select(index, values: list) -> tirx.PrimExpr:
    """values[index] for a loop variable `index` the schedule unrolls (the selects then fold away)."""
    out = values[-1]
    for r in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == r, values[r], out)
    return out


def _u32(v) -> tirx.PrimExpr:
    return tirx.reinterpret("uint32", v)


def _recover(t) -> tirx.PrimExpr:
    """acc from t = 576 * acc mod 2^32 (uint32 lanes, wrapping), for |acc| < 2^25."""
    r = tirx.shift_right(tirx.reinterpret("int32", t), tirx.const(SCALE_SHIFT, "int32"))
    v = tirx.reinterpret("uint32", r) * tirx.const(INV9, "uint32")
    v = tirx.shift_left(v, tirx.const(SCALE_SHIFT, "uint32"))
    return tirx.shift_right(tirx.reinterpret("int32", v), tirx.const(SCALE_SHIFT, "int32"))


# F(2x2, 3x3) at the points 0, +-1, inf: B^T, G' = 2 G (integer) and A^T. A^T (G' g G'^T . B^T d B) A is
# 4 x the conv sum; |B^T d B| <= 4 * 128 and |G' g G'^T| <= 9 * 127 fit int16
BT2 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.int64)
GP2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], np.int64)
AT2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.int64)


def transform_input2(d: list, dtype: str | None = None) -> list:
    """F(2x2)'s B^T d for the 4 values d of a tile's column (or row)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def transform_output2(m: list, dtype: str | None = None) -> list:
    """F(2x2)'s A^T m for the 4 values m of a column (or row) of channel sums."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _recover2(t) -> tirx.PrimExpr:
    """acc from t = 4 * acc mod 2^32 (uint32 lanes, wrapping), for |acc| < 2^29."""
    return tirx.shift_right(tirx.reinterpret("int32", t), tirx.const(2, "int32"))


@dataclass(frozen=True)
class Tiling:
    """F(m x m, 3x3): an m x m output tile from an (m + 2) x (m + 2) input tile. `scale` x the conv sum
    comes out of the integer transforms, `recover` takes it back from its value mod 2^32, exactly where
    |acc| < acc_limit."""

    tile: int
    bt: np.ndarray
    gp: np.ndarray
    at: np.ndarray
    transform_input: Callable
    transform_output: Callable
    recover: Callable
    scale: int
    acc_limit: int

    @property
    def window(self) -> int:
        return self.tile + 2

    @property
    def pos(self) -> int:
        return self.window ** 2


F4 = Tiling(TILE, BT, GP, AT, transform_input, transform_output, _recover, 576, ACC_LIMIT)
F2 = Tiling(2, BT2, GP2, AT2, transform_input2, transform_output2, _recover2, 4, 1 << 29)
TILINGS = {t.window: t for t in (F4, F2)}  # a layout's weights say which (their first axis: the window)


def conv2d_winograd(x: te.Tensor, up: te.Tensor, correction: te.Tensor | None, out_channels: int,
                    narrow: Narrow | None = None, isa: str = "vnni", by_channels: bool = False) -> te.Tensor:
    """x: [N, H, W, C] int8/uint8, up: `weight_layout`'s int16 weights (their window says the tiling) ->
    [N, H, W, O] int32, the exact conv sum (3x3, stride 1, padding 1) plus `correction` (+128 * sum(w) for
    uint8 input); with `narrow`, the 8-bit output of its `dyadic.ClampFirst` epilogue (the correction then
    also holds -lo), computed from the recovered sums (OUT_BLOCK) by the blocked kernels' intrinsic.
    `by_channels`: the schedule's tasks split the output channels, not the rows of tiles (`Plan`)."""
    n, h, w, c = (int(d) for d in x.shape)
    t = TILINGS[int(up.shape[0])]
    tile, window = t.tile, t.window
    ct = int(up.shape[4])  # output blocks a register tile (`weight_layout`'s channel_tile)
    th, tw = _tiles(h, tile), _tiles(w, tile)  # the last tiles of a row or column may run past the output's edge
    centered = x.dtype == "uint8"

    def _x(b, i, j, ch):
        inside = tirx.all(i >= 1, i <= h, j >= 1, j <= w)
        v = x[b, i - 1, j - 1, ch].astype("int16")
        v = v - tirx.const(SHIFT, "int16") if centered else v
        return tirx.if_then_else(inside, v, tirx.const(-SHIFT if centered else 0, "int16"))

    xp = te.compute((n, th * tile + 2, tw * tile + 2, c), _x, name="winograd_data")
    # input transform, rows then columns: V[p = window i + j] = (B^T d B)[i, j]
    rows = te.compute((n, th, tw, window, window, c), lambda b, y, z, i, col, ch: _select(
        i, t.transform_input([xp[b, y * tile + a, z * tile + col, ch] for a in range(window)], "int16")),
        name="winograd_rows")

    def _v(b, y, z, p, ch):
        return _select(p % window, t.transform_input([rows[b, y, z, p // window, col, ch] for col in range(window)],
                                                      "int16"))

    if by_channels:
        # the whole layer's transformed input, positions outermost: a register tile's tiles lie a row of
        # channels apart (tiles a position apart lie 4 KB-aliased from C = 128 on: 8 of them and the weights
        # thrashed L1's sets)
        v = te.compute((n, t.pos, th, tw, c), lambda b, p, y, z, ch: _v(b, y, z, p, ch), name="winograd_input")

        def _vat(b, y, z, p, ch):
            return v[b, p, y, z, ch]
    else:
        v = te.compute((n, th, tw, t.pos, c), _v, name="winograd_input")

        def _vat(b, y, z, p, ch):
            return v[b, y, z, p, ch]
    rc, ri = te.reduce_axis((0, c // GROUP), "rc"), te.reduce_axis((0, GROUP), "ri")
    m = te.compute((n, th, tw, window, window, out_channels // LANES, LANES), lambda b, y, z, i, j, ob, ol: te.sum(
        _vat(b, y, z, i * window + j, rc * GROUP + ri).astype("int32")
        * up[j, ob // ct, i, rc, ob % ct, ol, ri].astype("int32"), axis=[rc, ri]),
        name=BLOCK, attrs={ISA_ATTR: isa, **({SPLIT_ATTR: 1} if by_channels else {})})
    # inverse transform on wrapping uint32 lanes: rows A'^T M, then columns
    inv = te.compute((n, th, tw, tile, window, out_channels // LANES, LANES), lambda b, y, z, a, col, ob, ol: _select(
        a, t.transform_output([_u32(m[b, y, z, i, col, ob, ol]) for i in range(window)], "uint32")),
        name="winograd_inverse")

    def _sum(b, i, j, o):
        return t.recover(_select(j % tile, t.transform_output(
            [inv[b, i // tile, j // tile, i % tile, col, o // LANES, o % LANES] for col in range(window)], "uint32")))

    if narrow is not None:
        if correction is None:
            raise ValueError("the ClampFirst epilogue needs its correction (which holds -lo)")
        acc = te.compute((n, h, w, out_channels), _sum, name=OUT_BLOCK)
        return te.compute((n, h, w, out_channels), lambda b, i, j, o: narrow.value(acc[b, i, j, o], correction[o], o),
                          name=narrow_block(WINOGRAD), attrs=narrow.attrs)
    return te.compute((n, h, w, out_channels), lambda b, i, j, o: add_correction(_sum(b, i, j, o), correction, o),
                      name=OUT_BLOCK)


def schedule_winograd_func(sch: s_tir.Schedule) -> set[str] | None:
    """Schedule a fused function built around `conv2d_winograd` (its epilogue fused after it): a parallel
    task per row of tiles and run of up to MAX_TILE_ROW tiles, which transforms its input, runs the
    products with 7 x 2 x 16 accumulators in registers (a column of 6 positions for a pair of channel
    blocks, then that column's inverse transform), and transforms back and requantizes. Returns None
    when the function has no Winograd kernel. By channels (`Plan`, on AVX2): the input transformed
    first, a task per row of tiles, then a task per run of output channel blocks over every tile, runs
    of up to MAX_RUN tiles (whole rows of them) a register tile, or on AVX2 where rows of tiles divide
    into runs of SQUARE_RUN, those runs by both 8-lane parts.

    Products and inverse interleaved by column: on Zen 5 (2026-12-05, interleaved A/B inside ResNet18,
    outputs identical) the 56x56x64 convs 7-8% faster, the 28x28x128 ones 1-2%; the whole row's sums
    (64-129 KB a task) had gone to L2 between the two stages, with the inverse transform a tenth of the
    56x56 kernel's time (`perf`, software clock samples)."""
    found = find_block(sch, BLOCK)
    if found is None:
        return None
    blocks, names, k = found
    data, rows, inp = (blocks[names.index(nm)] for nm in ("winograd_data", "winograd_rows", "winograd_input"))
    gemm, inverse = blocks[k], blocks[names.index("winograd_inverse")]
    gemm_weights = next(r.source for r in sch.get(gemm).reads if len(r.source.shape) == 7)  # [6, O/32, 6, C/2, ...]
    flavour = FLAVOURS[str(sch.get(gemm).annotations.get(ISA_ATTR, "vnni"))]
    by_channels = SPLIT_ATTR in sch.get(gemm).annotations
    tiling = TILINGS[int(gemm_weights.shape[0])]
    tile = tiling.tile
    channel_tile = int(gemm_weights.shape[4])
    tail = blocks[names.index(OUT_BLOCK):]
    tail_names = [sch.get(b).name_hint for b in tail]
    narrow_name = narrow_block(WINOGRAD)
    # With the ClampFirst epilogue, the recovered sums and the narrow stage stay blocks of their own,
    # 16 channels at a time (the intrinsic reads the sums from a 64-byte buffer on the stack); whatever
    # fuses after (a residual add) joins the last block. Else the whole chain is one block.
    keep = {OUT_BLOCK, narrow_name} if narrow_name in tail_names else set()
    for b, name in zip(tail[:-1], tail_names[:-1], strict=True):
        if name not in keep:
            sch.compute_inline(b)
    last, last_name = tail[-1], tail_names[-1]
    b_, y, x, o = sch.get_loops(last)
    ty, a = sch.split(y, [None, tile])
    blocks = int(sch.get(o).extent) // LANES
    if by_channels:
        # a task per run of output channel blocks (whole register tiles), all of the tiles
        per_task = channel_tile * max(1, blocks // channel_tile // CHANNEL_TASKS)
        while (blocks // channel_tile) % (per_task // channel_tile):
            per_task -= channel_tile
        par, oo, oi = sch.split(o, [None, per_task, LANES])
        tx, cx = sch.split(x, [None, tile])
        sch.reorder(par, b_, ty, a, tx, oo, cx, oi)
    else:
        run = _tile_row(_tiles(int(sch.get(x).extent), tile))
        bx, tx, cx = sch.split(x, [None, run, tile])
        oo, oi = sch.split(o, [None, LANES])
        # a tile row's outputs (cx) inside the channel block: their column transforms share the loads
        sch.reorder(b_, ty, bx, a, tx, oo, cx, oi)
        par = sch.fuse(b_, ty, bx)
    sch.parallel(par)
    sch.unroll(cx)
    staged = [sch.get_sblock(nm) for nm in (narrow_name, OUT_BLOCK) if nm in keep and nm != last_name]
    for blk in staged:
        sch.compute_at(blk, oo, preserve_unit_loops=True)
        sch.unroll(sch.get_loops(blk)[-2])
    # The inverse transform runs a column of positions (col) and a pair of channel blocks at a time, and
    # the products of those 6 positions and channels are computed right before it, inside the same
    # loops: their sums (7 tiles x 6 x 32 int32, 5.4 KB) are read back from L1, where the whole row's
    # (64-129 KB) had gone to L2 and come back
    sch.compute_at(inverse, par, preserve_unit_loops=True)
    *_, ib, iy, itx, ia, icol, iob, iol = sch.get_loops(inverse)
    obo, iobi = sch.split(iob, [None, channel_tile])
    sch.reorder(icol, obo, *([ib, iy] if by_channels else []), itx, ia, iobi, iol)
    sch.compute_at(gemm, obo, preserve_unit_loops=True)
    if by_channels:
        # the input transform once, before the products: a task per row of tiles
        pb, pp, py, pz, pch = sch.get_loops(inp)
        sch.reorder(pb, py, pz, pp)
        in_par = sch.fuse(pb, py)
        sch.parallel(in_par)
        for blk in (rows, data):
            sch.compute_at(blk, in_par, preserve_unit_loops=True)
    else:
        for blk in (inp, rows, data):
            sch.compute_at(blk, par, preserve_unit_loops=True)
    if keep:
        from .x86_ifma import tensorize_narrow

        tensorize_narrow(sch, narrow_name)
        sch.vectorize(sch.get_loops(sch.get_sblock(OUT_BLOCK))[-1])
    if last_name != narrow_name:
        sch.vectorize(sch.get_loops(sch.get_sblock(last_name))[-1])
    # products: per position (row gi of the column) the run's tiles x 2 x 16 accumulators in registers
    acc = sch.cache_write(gemm, 0, ACC_SCOPE)
    *_, gb, gy, gz, gi, gj, gob, gol, grc, gri = sch.get_loops(gemm)
    square = False
    if by_channels:
        # all of the tiles, MAX_RUN (or SQUARE_RUN) at a time, a position's weights read from L1 by each run
        th, tw = int(sch.get(gy).extent), int(sch.get(gz).extent)
        square = flavour.lanes < LANES and _run(th, tw, SQUARE_RUN) >= MIN_TILE_ROW
        runs, gy = sch.split(gy, [None, _run(th, tw, SQUARE_RUN if square else MAX_RUN) // tw])
        sch.reorder(gi, gb, runs, gy, gz)
        tiles, outer = [gy, gz], runs
    else:
        tiles, outer = [gz], gi
    if square:
        # (AVX2, by channels) 4 tiles by both 8-lane parts: 8 accumulators, the 2 parts' weights in
        # registers, each tile's broadcast feeding both (22 instructions for 8 products a step, where 8
        # tiles of one part took 25 for 8). Alone on the Zen 3 (2026-12-05), ResNet's 7x7 x 512 F(2x2) conv
        # 0.48 ms against 0.52-0.56 (0.57 against 0.65-0.73 with its weights from memory), the 14x14 x 256
        # F(4x4) one 0.30 against 0.33
        part, gol = sch.split(gol, [None, flavour.lanes])
        sch.reorder(gi, grc, *tiles, gob, part, gol, gri)
        sch.reverse_compute_at(acc, outer)
        sch.unroll(part)
    elif flavour.lanes < LANES:
        # (AVX2) the lanes in instruction-wide parts, each its own pass over the channels: 7 tiles x 16 lanes
        # are 14 of its 16 ymm registers, and LLVM spilled and shuffled them (half of each weight line is
        # read a pass; laid out a stream a part, the schedule's accumulators left the registers)
        part, gol = sch.split(gol, [None, flavour.lanes])
        sch.reorder(gi, part, grc, *tiles, gob, gol, gri)
        sch.reverse_compute_at(acc, part)
    else:
        sch.reorder(gi, grc, *tiles, gob, gol, gri)
        sch.reverse_compute_at(acc, outer)
    init = sch.decompose_reduction(gemm, grc)
    # inverse: [tiles, block, a, 16 lanes]: a unrolled (folds the selects) inside the channel vector, so
    # the 4 outputs of a column share its 6 loads and sums
    _outputs_together(sch, ia, [iobi], iol, LANES)
    ensure_intrin(flavour.intrin, flavour.intrin_funcs)
    sch.tensorize(gol, flavour.intrin)
    for lp in tiles:
        sch.unroll(lp)
    sch.unroll(gob)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    # input transform, channels 32 int16 lanes a vector: the 6 outputs of a row (column) unrolled (folds
    # the selects) inside the vector loop, sharing its 6 loads and common terms
    *_, ri, rcol, rch = sch.get_loops(rows)
    _outputs_together(sch, ri, [rcol], rch, 2 * LANES)
    *_, ip, ich = sch.get_loops(inp)
    _, pj = sch.split(ip, [tiling.window, tiling.window])
    _outputs_together(sch, pj, [], ich, 2 * LANES)
    vectorize_inner(sch, sch.get_loops(data)[-1], most=2 * LANES)
    if by_channels:
        task = sch.get(par).loop_var
        pair = task * tirx.const(per_task // channel_tile, str(task.ty))
        _prefetch_weights_ahead(sch, grc, [icol, obo, gi], gemm_weights, pair)
        return set()
    if os.environ.get("INTFORGE_WINOGRAD_HALVES", "1") != "0":  # =0: to compare without
        _mark_halves(sch, par, [(obo, blocks // channel_tile), (oo, blocks)])
    _prefetch_weights_ahead(sch, grc, [icol, obo, gi], gemm_weights)
    _stagger_columns(sch, icol, par)
    return set()


def _outputs_together(sch: s_tir.Schedule, unrolled, between: list, channels, lanes: int) -> None:
    """Order a transform stage's loops [unrolled, *between, channels] as [*between, channel vectors,
    unrolled, lanes] and unroll `unrolled` (which output of a row or column of the tile): one iteration
    of the vector loop then loads the row's 6 values once and computes every output from them, where each
    output had its own vector loop and loaded them again."""
    outer, inner = split_vector(sch, channels, most=lanes)  # (Winograd's channels are whole vectors)
    sch.reorder(*between, *([outer] if outer is not None else []), unrolled)
    sch.unroll(unrolled)
    sch.vectorize(inner)


def _prefetch_weights_ahead(sch: s_tir.Schedule, channels, outer: list, weights, first_pair=None) -> None:
    """Each step of the products' channel loop prefetches the two weight lines WEIGHT_PREFETCH_BYTES
    ahead of the two it reads.

    A task reads the layer's int16 weights as one contiguous stream (column of positions, output channel
    pair, row, input channel pair: 1.2 MB at 28x28x128), and a thread's first task finds them in memory. The
    hardware prefetchers follow a stream only within a 4 KB page, so at every page boundary the
    products wait for memory again; a software prefetch one page ahead keeps the stream going across
    them. On Zen 5 (2026-12-04, interleaved per-kernel A/Bs) inside ResNet18 the 28x28x128 convs ran
    2-8% faster and the 56x56x64 ones 0-5% (calls 0.963-0.979x in three A/Bs; 8 KB ahead the same,
    2 KB 0.987-1.005x), inside ResNet50, in a quiet minute, unchanged. A prefetch past the end of the
    weights never faults. The calls go in front of the loop's body (`stages.insert_at_loop_top`)."""
    index = [sch.get(lp).loop_var for lp in (*outer, channels)]
    if first_pair is not None:  # (a task's output channels from a pair of blocks on: `Plan.by_channels`)
        index[1] = index[1] + first_pair
    step = tirx.address_of(tirx.BufferLoad(weights, index + [0] * (len(weights.shape) - len(index))))
    step_bytes = 2 * int(np.prod([int(d) for d in weights.shape[-3:]]))  # a step's weights: 128 B on VNNI, 64 on AVX2
    insert_at_loop_top(sch, channels, [prefetch(tirx.call_intrin(
        "handle", "tirx.handle_add_byte_offset", step, tirx.const(WEIGHT_PREFETCH_BYTES + line, "int32")))
        for line in range(0, step_bytes, 64)])


def _stagger_columns(sch: s_tir.Schedule, column, par) -> None:
    """Start task t of T at column floor(t * 6 / T) of the products' loop over columns of positions,
    wrapping around.

    Every task reads all of the layer's int16 weights, column by column (each column's are contiguous),
    and a model's weights do not stay in cache from one call to the next: each thread's first task
    streams them from memory, the threads in step with each other. Started apart (the static split gives
    thread k of K the tasks from k * T / K on), the threads ask for different weights first, and what one
    thread fetched another may find on chip when it gets there. On Zen 5 (2026-12-04, interleaved
    per-kernel A/Bs inside ResNet18 and ResNet50, then staggered by position) the 28x28x128 convs (1.2 MB
    of weights) 2-5% faster, the 56x56x64 ones 0-3%; outputs identical (the positions are independent sums).

    The column loop's variable becomes a value bound at the top of its body, (q + offset) mod 6 for a new
    loop variable q (`stages.insert_at_loop_top`)."""
    loop, task = sch.get(column), sch.get(par)
    dtype = str(loop.extent.ty)
    tasks = int(task.extent)
    if tasks < 2:
        return
    extent = tirx.const(int(loop.extent), dtype)
    offset = tirx.floordiv(tirx.Cast(dtype, task.loop_var) * extent, tirx.const(tasks, dtype))
    q = tirx.Var("q", dtype)
    insert_at_loop_top(sch, column, [tirx.Bind(loop.loop_var, tirx.floormod(q + offset, extent))], loop_var=q)


BALANCE = "intforge.winograd_halves"  # on the parallel loop of a Winograd conv with an odd number of tasks
CHANNELS = "intforge.winograd_channels"  # on each loop over its output channels (GEMM pairs, blocks of 16)


def _mark_halves(sch: s_tir.Schedule, par, channel_loops: list) -> None:
    """Mark a conv whose tasks (rows of tiles) are odd in number for `balance_odd_tasks`, and its loops over
    the output channels, given as (loop, the extent it must have), where each has it and halves."""
    tasks = int(sch.get(par).extent)
    extents = [int(sch.get(lp).extent) for lp, _ in channel_loops]
    if tasks < 3 or tasks % 2 == 0 or extents != [e for _, e in channel_loops] or any(e % 2 for e in extents):
        return
    sch.annotate(par, BALANCE, 1)
    for lp, _ in channel_loops:
        sch.annotate(lp, CHANNELS, 1)


def balance_odd_tasks(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """An odd number T = 2m + 1 of tasks (ResNet's 28x28 layers: 7 rows of tiles) as T + 1: the last row
    twice, each time for half of the output channels, placed so that TVM's static split of the parallel
    loop gives each of two threads m whole rows and one half (tasks m and 2m + 1). Split 4 rows to 3, one
    thread waited an eighth of the conv on the other; each half instead transforms the row's input again
    (about a fifth of a row's work): m + 0.6 rows a thread instead of m + 1. (With more threads every row's
    work is still done once, in tasks of one row or half of one.) On Zen 5 (2026-12-04, interleaved A/Bs
    inside the models, outputs identical) ResNet18's 28x28x128 convs ran 4-8% faster in three runs, the
    calls 0.986-0.992x; ResNet50's 3-5%, its calls 0.996-0.998x. (The same split tried that afternoon,
    its channel loops guarded by the task, had measured 0.96-1.02x inside the models, before the
    requantize moved to 32-bit lanes.)

    A post-scheduling rewrite, like `epilogue_pipeline.pipeline_epilogues`: the new parallel loop binds
    the old loop's variable to the task's row (`tirx.Bind`), and each marked channel loop runs over the
    task's half ([0, E/2) or [E/2, E)) or both."""

    def halve(loop: tirx.For):
        tasks = int(loop.extent)
        m = tasks // 2
        dtype = str(loop.loop_var.ty)

        def c(v: int):
            return tirx.const(v, dtype)

        t = tirx.Var("task", dtype)
        # Arithmetic only (a Select would make TVM's buffer compaction take the hull of both branches, and
        # the per-task buffers grow to the whole layer): thread h in {0, 1} of the static split has tasks
        # h (m + 1) + k, k < m its rows h m + k, k = m the last row's half h.
        h, k = tirx.floordiv(t, c(m + 1)), tirx.floormod(t, c(m + 1))
        last = tirx.floordiv(k, c(m))  # 1 for the halves
        row = h * c(m) + k + last * (c(2 * m) - h * c(m) - k)
        second = last * h  # 1 for the half with the upper channels

        def halves(stmt: tirx.For):
            if CHANNELS not in stmt.annotations:
                return None
            # Rounds of E/2 iterations, 1 for a half and 2 for a whole row, each binding the old variable
            # (`tirx.Bind`): every loop keeps a constant extent, and so does each buffer's region (the
            # GEMM's accumulators stay on the stack, in registers; a guarded or dynamic loop put them in
            # the workspace pool, and the conv took 2.3x as long)
            half = int(stmt.extent) // 2
            r, w = (tirx.Var(f"{stmt.loop_var.name}_{n}", dtype) for n in ("round", "w"))
            inner = tirx.For(w, c(0), c(half), stmt.kind,
                             tirx.SeqStmt([tirx.Bind(stmt.loop_var, w + (r + second) * c(half)),
                                           map_stmt(stmt.body, halves)]), stmt.thread_binding,
                             {key: val for key, val in stmt.annotations.items() if key != CHANNELS})
            return tirx.For(r, c(0), c(2), tirx.ForKind.SERIAL, tirx.IfThenElse(r < c(2) - last, inner, None))

        return tirx.For(t, c(0), c(tasks + 1), loop.kind,
                        tirx.SeqStmt([tirx.Bind(loop.loop_var, row), map_stmt(loop.body, halves)]),
                        loop.thread_binding, {key: val for key, val in loop.annotations.items() if key != BALANCE})

    return rewrite_marked_loops(func, BALANCE, halve)
