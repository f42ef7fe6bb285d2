"""benchmarks/amx_gemm_tir.py: an int8 GEMM on AMX tiles, written in TIR with LLVM's AMX intrinsics. TVM's
LLVM must turn it into tile instructions on any machine; where the CPU has AMX-INT8 it must also compute,
bit for bit, what numpy computes (elsewhere that half skips: this project's machines have no AMX)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from amx_gemm_tir import gemm_func, inputs, request_amx  # noqa: E402

from intforge.compiler.targets import resolve_target  # noqa: E402

SPR = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})


def test_the_amx_gemm_compiles_to_tile_instructions():
    lib = tvm.compile(tvm.IRModule({"amx_gemm": gemm_func(64, 128, 32)}), target=SPR)
    asm = lib.mod.inspect_source("asm")
    # 2 pixel blocks x 1 channel block, unrolled over 2 steps of 64 input channels: 4 products a step
    assert asm.count("tdpbusd") >= 4 and "tileloadd" in asm and "tilestored" in asm and "ldtilecfg" in asm
    narrow = tvm.compile(tvm.IRModule({"amx_gemm": gemm_func(64, 128, 32, narrow=True)}), target=SPR)
    asm = narrow.mod.inspect_source("asm")
    assert "tilestored" in asm and "vpmovdb" in asm  # tiles to the stack, their low bytes out
    with pytest.raises(ValueError, match="multiples of 32"):
        gemm_func(784, 128, 32)


@pytest.mark.skipif(not resolve_target("x86").has("amx-int8"), reason="needs a CPU with AMX-INT8")
def test_the_amx_gemm_is_bit_exact_where_the_cpu_has_amx():
    assert request_amx()
    m, k, n = 96, 256, 64
    a, b, want = inputs(m, k, n, np.random.default_rng(0))
    for narrow, dtype in ((False, np.int32), (True, np.int8)):
        fn = tvm.compile(tvm.IRModule({"amx_gemm": gemm_func(m, k, n, narrow)}), target=SPR)["amx_gemm"]
        c = tvm.runtime.tensor(np.zeros((m, n), dtype))
        fn(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
        assert np.array_equal(c.numpy(), want.astype(dtype))
