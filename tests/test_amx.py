"""AMX-INT8 tile kernels (kernels/x86_amx.py): 1x1 convs and dense layers as GEMMs on the tile unit.

Built for `x86-amx` on any x86 machine (LLVM's Sapphire Rapids): the tile instructions must be in the
library; where the CPU has AMX-INT8 each case must also compute, bit for bit, what the reference
computes; where it has AVX512 but no AMX, a call must stop with the error that names AMX."""

import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import intforge
from conftest import assert_bit_exact_int, quantize_module
from intforge.compiler import build, resolve_target
from intforge.compiler.build import amx_kernels
from intforge.compiler.targets import extra_features
from intforge.kernels import x86_amx

HOST_AMX = resolve_target("x86").has("amx-int8")


class Bottleneck(nn.Module):
    """A stem conv, then ResNet's bottleneck at small sizes: 1x1 down, 3x3, 1x1 up, the residual add
    after the last."""

    def __init__(self, channels: int = 64, mid: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(16, channels, 3, padding=1)
        self.a, self.b = nn.Conv2d(channels, mid, 1), nn.Conv2d(mid, mid, 3, padding=1)
        self.c = nn.Conv2d(mid, channels, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.relu(x + self.c(torch.relu(self.b(torch.relu(self.a(x))))))


class BasicBlock(nn.Module):
    """A stem conv, then ResNet18's basic block: two 3x3 convs, the residual add after the second."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(16, channels, 3, padding=1)
        self.a, self.b = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.relu(x + self.b(torch.relu(self.a(x))))


# 1x1 convs and linears (`dense_amx`): signed input (tdpbssd) then unsigned (tdpbusd); rows not a whole
# 32-row tile (49, 48: padded); a residual add fused after a tile kernel through the views of its 2-D
# output; a batch; tokens. Windowed convs (`conv2d_amx`): rows of 14 (two grid rows of 16 a tile), of 56
# (two runs of 28 a row), of 18 (one run, 14 positions discarded) with a signed input, and a residual
# add fused after one; a 7x7 output (odd rows on two-row tiles) stays on vpdpbusd
CASES = {
    "pair_8x8": (lambda: nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 128, 1)), (1, 64, 8, 8)),
    "rows_7x7": (lambda: nn.Sequential(nn.Conv2d(128, 64, 1), nn.ReLU(), nn.Conv2d(64, 96, 1)), (1, 128, 7, 7)),
    "bottleneck_batch2": (lambda: Bottleneck(), (2, 16, 6, 6)),
    "linear_tokens": (lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)), (1, 48, 64)),
    "window_14": (lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)), (1, 64, 14, 14)),
    "window_56": (lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)), (1, 64, 56, 56)),
    "window_signed_20x18": (lambda: nn.Conv2d(64, 96, 3, padding=1), (1, 64, 20, 18)),
    "basic_block": (lambda: BasicBlock(), (1, 16, 14, 14)),
    "window_7x7": (lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1)), (1, 64, 7, 7)),
}


def _disassembly(library) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout


def _symbols(library) -> str:
    return subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True, check=True).stdout


def _program(case: str):
    make, shape = CASES[case]
    torch.manual_seed(0)
    return quantize_module(make(), shape)


def test_tile_kernels_take_whole_steps_and_tiles_only():
    assert x86_amx.supported(32, 64, 32, "uint8") and x86_amx.supported(49, 2048, 512, "int8")
    assert not x86_amx.supported(31, 64, 32, "uint8")  # less than one row tile: the vector kernels
    assert not x86_amx.supported(64, 96, 32, "uint8")  # 96 input channels: not whole 64-byte steps
    assert not x86_amx.supported(64, 64, 48, "uint8")  # 48 output channels: not whole 32-channel tiles
    assert not x86_amx.supported(64, 64, 32, "int32")
    # windowed convs: one image, stride 1, and a grid (`conv_grid`) whose tiles hold whole output rows or runs
    assert x86_amx.conv_grid(14, 3) == (16, 2, 1) and x86_amx.conv_grid(56, 3) == (32, 1, 2)
    assert x86_amx.conv_grid(28, 3) == (32, 1, 1) and x86_amx.conv_grid(31, 3) is None  # (31 is prime: no runs)
    assert x86_amx.conv_supported((1, 56, 56, 64), 64, (3, 3), (1, 1), (1, 1), (1, 1), "uint8")
    assert not x86_amx.conv_supported((2, 56, 56, 64), 64, (3, 3), (1, 1), (1, 1), (1, 1), "uint8")
    assert not x86_amx.conv_supported((1, 56, 56, 64), 64, (3, 3), (2, 2), (1, 1), (1, 1), "uint8")
    assert not x86_amx.conv_supported((1, 7, 7, 512), 512, (3, 3), (1, 1), (1, 1), (1, 1), "uint8")  # odd rows


def test_amx_is_found_where_llvm_names_the_cpu_without_it():
    """A KVM guest on a Xeon with AMX reported a model LLVM names 'rocketlake': the host preset adds what
    /proc/cpuinfo lists and that name lacks, and nothing where the name has it or the CPU does not."""
    flags = {"avx512f", "amx_tile", "amx_int8"}
    assert extra_features(flags, "rocketlake") == ("+amx-tile", "+amx-int8")
    assert extra_features(flags, "sapphirerapids") == ()
    assert extra_features({"avx512f"}, "rocketlake") == ()


def test_amx_kernels_follow_the_target(monkeypatch):
    assert amx_kernels(resolve_target("x86-amx"))
    assert not amx_kernels(resolve_target("x86-avx2"))
    monkeypatch.setenv("INTFORGE_AMX", "0")
    assert not amx_kernels(resolve_target("x86-amx"))


def test_tile_kernels_compile_to_tile_instructions(tmp_path):
    """On any machine: the 1x1 convs become tile kernels (signed input on tdpbssd, unsigned on tdpbusd),
    the 3x3 stays on vpdpbusd, the residual add fuses after the last tile kernel, and the library asks
    Linux for the tile data with the error that names AMX where it is refused."""
    program = _program("bottleneck_batch2")
    lib = build(program, tmp_path, target="x86-amx", boundary="int").library
    asm, symbols = _disassembly(lib), _symbols(lib)
    for op in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease"):
        assert op in asm, op
    assert "conv2d_amx" in symbols and "conv2d_vnni" in symbols
    assert any("conv2d_amx" in s and "residual_add" in s for s in symbols.split())
    assert b"ARCH_REQ_XCOMP_PERM" in lib.read_bytes()
    signed = build(_program("pair_8x8"), tmp_path / "signed", target="x86-amx", boundary="int").library
    assert "tdpbssd" in _disassembly(signed)
    block = build(_program("basic_block"), tmp_path / "block", target="x86-amx", boundary="int").library
    assert any("conv2d_amx_window" in s and "residual_add" in s for s in _symbols(block).split())


@pytest.mark.skipif(not HOST_AMX, reason="needs a CPU with AMX-INT8")
@pytest.mark.parametrize("case", sorted(CASES))
def test_tile_kernels_are_bit_exact(case, tmp_path):
    program = _program(case)
    lib = build(program, tmp_path, target="x86-amx", boundary="int").library
    assert ("tdpb" in _disassembly(lib)) == (case != "window_7x7")
    assert_bit_exact_int(program, intforge.load(lib))


@pytest.mark.skipif(HOST_AMX or not resolve_target("x86").has("avx512vnni"),
                    reason="needs a CPU with AVX512-VNNI and without AMX")
def test_a_tile_kernel_without_amx_stops_with_an_error_that_names_it(tmp_path):
    program = _program("pair_8x8")
    lib = intforge.load(build(program, tmp_path, target="x86-amx", boundary="int").library)
    spec = lib.inputs[0]
    with pytest.raises(Exception, match="AMX"):
        lib(np.zeros(spec["shape"], spec["dtype"]))


def test_tuning_leaves_the_tile_kernels_to_their_own_schedule():
    """`intforge tune` skips every function built around a tile kernel (dense or windowed), as it skips the
    other hand-scheduled kernels: a tuned schedule from the database would replace the tile kernel's."""
    import tvm

    from intforge.compiler.build import _legalize_passes
    from intforge.compiler.tuning import _has_own_schedule
    from intforge.relay_passes import emit_program

    mod = emit_program(_program("basic_block"), boundary="int")
    preset = resolve_target("x86-amx")
    with preset.tvm_target():
        fused = tvm.transform.Sequential(_legalize_passes(preset))(mod)
    tiles = [f for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "amx" in gv.name_hint]
    assert len(tiles) == 2  # the block's two 3x3 convs (the stem's 16 input channels are not a whole step)
    assert all(_has_own_schedule(tvm.IRModule({"main": f})) for f in tiles)
