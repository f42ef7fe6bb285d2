"""AMX through TVM: a 1x1 conv's int8 GEMM (u8 activations x s8 weights -> int32) written in TIR with LLVM's AMX
intrinsics (tileloadd64, tdpbusd, tilestored64), built by TVM, checked bit-exact against numpy.

TVM 0.27 has no AMX tensor intrinsics; LLVM 22 (TVM's) has the intrinsics with immediate tile numbers. Each
parallel task computes 32 pixels x 32 channels in 4 accumulator tiles (tmm0-3): per 64 input channels, two
16x64 activation tiles straight from the NHWC rows (stride = channels) and two 16-row weight tiles from the
existing VNNI layout [O/16, C/4, 16, 4] (stride 64 bytes), then 4 tdpbusd (16384 MACs each).

With `narrow`, each task stores its tiles to a 4 KB scratch on the stack and writes int8 (each sum's low
byte): the data flow of a conv kernel whose requantize reads the tiles back from L1.

  build DIR   (any x86 machine with TVM's compiler) libraries for `-mcpu=sapphirerapids`, inputs, expected
  run DIR     (a CPU with AMX-INT8; TVM's runtime only) asks Linux for the tile data, runs, checks, times
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# (pixels, input channels, output channels) of ResNet50's 1x1 convs at batch 1, pixels rounded to a multiple
# of 32 (the task's rows: 784 -> 768, 196 -> 192, 49 -> 64)
SHAPES = [(3136, 64, 256), (768, 128, 512), (768, 512, 128), (192, 1024, 256), (192, 256, 1024), (64, 2048, 512)]


def gemm_func(P: int, K: int, N: int, narrow: bool = False):
    """The GEMM as a PrimFunc `amx_gemm(A, B, C)`. Plain, the int32 tiles go straight to C [P, N] int32.
    With `narrow`, each task stores its 4 tiles to a 4 KB scratch buffer on the stack and writes C [P, N]
    int8, each sum's low byte (vpmovdb): the data flow of a conv kernel whose requantize reads the tiles
    back from L1, without the requantize's arithmetic."""
    from tvm.script import tirx as T

    if P % 32 or N % 32 or K % 64:
        raise ValueError(f"pixels and output channels must be multiples of 32, input channels of 64: {P, K, N}")

    tasks = (P // 32) * (N // 32)
    ob_n = N // 32

    @T.macro
    def products(A, B, t):
        cfg = T.alloc_buffer((64,), "uint8", scope="local")
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)  # palette 1
        for r in range(8):
            cfg[16 + 2 * r] = T.uint8(64)  # colsb[r] = 64 bytes (little-endian uint16)
            cfg[48 + r] = T.uint8(16)  # rows[r] = 16
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(0)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(1)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(2)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(3)))
        for k in range(K // 64):
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4),
                                          T.address_of(A[(t // ob_n) * 32, k * 64]), T.int64(K)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5),
                                          T.address_of(A[(t // ob_n) * 32 + 16, k * 64]), T.int64(K)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6),
                                          T.address_of(B[(t % ob_n) * 2, k * 16, 0, 0]), T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7),
                                          T.address_of(B[(t % ob_n) * 2 + 1, k * 16, 0, 0]), T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(0), T.int8(4), T.int8(6)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(1), T.int8(4), T.int8(7)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(2), T.int8(5), T.int8(6)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(3), T.int8(5), T.int8(7)))

    @T.macro
    def store(C, p0, o0, stride):
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(0), T.address_of(C[p0, o0]), stride))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(1), T.address_of(C[p0, o0 + 16]),
                                      stride))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(2), T.address_of(C[p0 + 16, o0]),
                                      stride))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(3),
                                      T.address_of(C[p0 + 16, o0 + 16]), stride))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    @T.macro
    def to_int32(C, t):  # the tiles straight to C
        store(C, (t // ob_n) * 32, (t % ob_n) * 32, T.int64(N * 4))

    @T.macro
    def to_int8(C, t):  # the tiles to a stack scratch, their low bytes to C
        scratch = T.alloc_buffer((32, 32), "int32", scope="local")
        store(scratch, 0, 0, T.int64(128))
        for i in range(32):
            for j in T.vectorized(32):
                C[(t // ob_n) * 32 + i, (t % ob_n) * 32 + j] = T.Cast("int8", scratch[i, j])

    out_dtype, finish = ("int8", to_int8) if narrow else ("int32", to_int32)

    @T.prim_func
    def amx_gemm(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"global_symbol": "amx_gemm", "tir.noalias": True})
        A = T.match_buffer(a, (P, K), "uint8")
        B = T.match_buffer(b, (N // 16, K // 4, 16, 4), "int8")
        C = T.match_buffer(c, (P, N), out_dtype)
        for t in T.parallel(tasks):
            products(A, B, t)
            finish(C, t)

    return amx_gemm


def inputs(P: int, K: int, N: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random u8 activations [P, K] (one row all 255), s8 weights (one output channel all -128) in the
    blocked kernels' dense layout (`blocked_dot.dense_weight_layout`, the B tiles' layout), and numpy's
    int32 products [P, N]."""
    from intforge.kernels.blocked_dot import dense_weight_layout
    from intforge.kernels.x86_vnni import VNNI

    a = rng.integers(0, 256, (P, K), dtype=np.uint8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    w[0, :] = -128  # extremes: the largest products
    a[0, :] = 255
    c = a.astype(np.int64) @ w.astype(np.int64).T
    return a, dense_weight_layout(w, VNNI), c.astype(np.int32)


def build(out: Path) -> None:
    import tvm

    out.mkdir(parents=True, exist_ok=True)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    rng = np.random.default_rng(0)
    index = []
    for P, K, N in SHAPES:
        name = f"gemm_{P}_{K}_{N}"
        lib = tvm.compile(tvm.IRModule({"amx_gemm": gemm_func(P, K, N)}), target=target)
        lib.export_library(str(out / f"{name}.so"))
        lib = tvm.compile(tvm.IRModule({"amx_gemm": gemm_func(P, K, N, narrow=True)}), target=target)
        lib.export_library(str(out / f"{name}_narrow.so"))
        a, b, c = inputs(P, K, N, rng)
        np.save(out / f"{name}_a.npy", a)
        np.save(out / f"{name}_b.npy", b)
        np.save(out / f"{name}_c.npy", c)
        index.append({"name": name, "P": P, "K": K, "O": N})
        print(name, "built", flush=True)
    (out / "index.json").write_text(json.dumps(index))


def request_amx() -> bool:
    """Linux hands out AMX tile data only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0


def _time(f, *args, repeat: int = 200) -> float:
    for _ in range(20):
        f(*args)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(*args)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def run(out: Path) -> dict:
    """Each shape plain (int32 results to memory) and narrowed (tiles through an L1 scratch, int8 out)."""
    import tvm

    res = {"amx_permission": request_amx(), "threads": int(tvm.get_global_func("runtime.NumThreads")()), "shapes": []}
    for s in json.loads((out / "index.json").read_text()):
        name, P, K, N = s["name"], s["P"], s["K"], s["O"]
        a = tvm.runtime.tensor(np.load(out / f"{name}_a.npy"))
        b = tvm.runtime.tensor(np.load(out / f"{name}_b.npy"))
        want = np.load(out / f"{name}_c.npy")
        row = dict(s)
        for kind, dtype, expect in (("plain", np.int32, want), ("narrow", np.int8, want.astype(np.int8))):
            so = out / (f"{name}.so" if kind == "plain" else f"{name}_narrow.so")
            if not so.exists():
                continue
            f = tvm.runtime.load_module(str(so))["amx_gemm"]
            c = tvm.runtime.tensor(np.zeros((P, N), dtype))
            f(a, b, c)
            ms = _time(f, a, b, c)
            row[kind] = {"bit_exact": bool(np.array_equal(c.numpy(), expect)), "median_ms": round(ms, 4),
                         "gmacs_per_s": round(P * K * N / ms / 1e6, 1)}
        print(row, flush=True)
        res["shapes"].append(row)
    return res


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        sys.modules.setdefault("torch", None)  # tvm_ffi imports torch where installed: not needed here
        r = run(Path(sys.argv[2]))
        Path(os.environ.get("OUT", "."), f"amx_gemm_{r['threads']}t.json").write_text(json.dumps(r, indent=1))
