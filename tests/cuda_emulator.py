"""Run our generated CUDA kernels on the CPU, so their integers are checked on machines without a GPU.

The CUDA C that TVM generated for one Tensor Core kernel is compiled with g++: each CUDA thread of a block
is a std::thread, `__syncthreads` a barrier, `__shared__` arrays are shared by the block's threads, and
every inline-PTX `mma.sync` becomes a call to an emulation written from the PTX ISA's fragment tables
("Matrix fragments for mma.m8n8k16" and "mma.m8n8k32"), independently of our kernel's index maps: each
lane publishes its A, B registers, the warp meets, each lane computes its two accumulators from the others'
registers. Blocks run one after another. Slow, exact, and enough to catch a wrong index or layout.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
from pathlib import Path

import numpy as np

HARNESS = r"""
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>
#define uchar unsigned char
#define __restrict__ __restrict
struct Dim { int x = 0, y = 0, z = 0; };
static thread_local Dim threadIdx, blockIdx;
static std::barrier<>* g_bar;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
template <class A, class B> static inline A max(A a, B b) { return a > (A)b ? a : (A)b; }
template <class A, class B> static inline A min(A a, B b) { return a < (A)b ? a : (A)b; }
static uint32_t g_a[4][32], g_b[4][32];
// mma.sync.m8n8k{16,32}.row.col.s32.{atype}.{btype}.s32, one warp (PTX ISA fragment layouts):
//   A (8 x K, row):  lane l holds row l/4, elements K/8*(l%4) .. +K/8-1 in one 32-bit register;
//   B (K x 8, col):  lane l holds column l/4, the same element range of k;
//   C, D (8 x 8):    lane l holds row l/4, columns 2*(l%4) and 2*(l%4)+1.
template <int BITS, bool A_SIGNED>
static int elem(uint32_t reg, int i) {
  uint32_t v = (reg >> (i * BITS)) & ((1u << BITS) - 1);
  if (A_SIGNED && (v >> (BITS - 1))) return (int)v - (1 << BITS);
  return (int)v;
}
template <int BITS, bool A_SIGNED>
static void emu_mma(int& d0, int& d1, uint32_t a, uint32_t b, int c0, int c1) {
  int lane = threadIdx.x % 32, w = threadIdx.x / 32, per = 32 / BITS;
  g_a[w][lane] = a; g_b[w][lane] = b;
  __syncthreads();
  int row = lane / 4, out[2] = {c0, c1};
  for (int j = 0; j < 2; ++j) {
    int col = 2 * (lane % 4) + j;
    for (int k = 0; k < 4 * per; ++k)
      out[j] += elem<BITS, A_SIGNED>(g_a[w][row * 4 + k / per], k % per) *
                elem<BITS, true>(g_b[w][col * 4 + k / per], k % per);
  }
  __syncthreads();
  d0 = out[0]; d1 = out[1];
}
"""

_MMA = re.compile(
    r"__asm__ __volatile__\(\s*\"mma\.sync\.aligned\.(m8n8k16|m8n8k32)\.row\.col\.s32\."
    r"([us])(?:8|4)\.s(?:8|4)\.s32\"\s*"
    r"\"[^\"]*\"\s*:\s*\"=r\"\((.*?)\),\s*\"=r\"\((.*?)\)\s*:\s*\"r\"\((.*?)\),\s*\"r\"\((.*?)\),\s*"
    r"\"r\"\((.*?)\),\s*\"r\"\((.*?)\)\);", re.S)


def _kernel_source(cuda_source: str, name: str) -> tuple[str, list[tuple[str, str]]]:
    found = re.search(rf"void __launch_bounds__\(\d+\) {name}\(([^)]*)\)\s*\{{", cuda_source)
    if found is None:  # pragma: no cover
        raise ValueError(f"kernel {name} not found in the CUDA source")
    brace = found.end() - 1
    depth, i = 0, brace
    while True:
        depth += {"{": 1, "}": -1}.get(cuda_source[i], 0)
        i += 1
        if depth == 0:
            break
    params = []
    for p in found.group(1).split(","):
        *ty, pname = p.replace("__restrict__", "").split()
        params.append((" ".join(ty), pname))
    body = cuda_source[brace:i]

    def mma(m: re.Match) -> str:
        bits = 8 if m.group(1) == "m8n8k16" else 4
        signed = "true" if m.group(2) == "s" else "false"
        d0, d1, a, b, c0, c1 = m.groups()[2:]
        return f"emu_mma<{bits}, {signed}>({d0}, {d1}, (uint32_t)({a}), (uint32_t)({b}), {c0}, {c1});"

    body = _MMA.sub(mma, body)
    if "__asm__" in body:  # pragma: no cover - an instruction the emulator does not know
        raise ValueError("unemulated inline PTX in kernel " + name)
    body = re.sub(r"__shared__ (alignas\(\d+\) )?", r"\1static ", body)
    return body, params


def build_emulator(cuda_source: str, name: str, workdir: Path):
    """Compile kernel `name` of `cuda_source` for the CPU; returns (launch(grid_x, grid_y, arrays), params)."""
    body, params = _kernel_source(cuda_source, name)
    args = ", ".join(f"({t})args[{i}]" for i, (t, _) in enumerate(params))
    sig = ", ".join(f"{t} {n}" for t, n in params)
    src = (HARNESS + f"static void kernel({sig}) {body}\n"
           + "extern \"C\" void launch(int gx, int gy, int threads, void** args) {\n"
           "  std::barrier<> bar(threads); g_bar = &bar;\n"
           "  for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {\n"
           "    std::vector<std::thread> ts;\n"
           "    for (int t = 0; t < threads; ++t) ts.emplace_back([=] { blockIdx.x = bx; blockIdx.y = by; "
           f"threadIdx.x = t; kernel({args}); }});\n"
           "    for (auto& th : ts) th.join();\n  }\n}\n")
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    cpp, lib = workdir / f"emu_{key}.cc", workdir / f"emu_{key}.so"
    cpp.write_text(src)
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(cpp)], check=True,
                   capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))

    def launch(grid_x: int, grid_y: int, threads: int, arrays: dict[str, np.ndarray]) -> None:
        ptrs = (ctypes.c_void_p * len(params))(*[arrays[n.removesuffix("_ptr")].ctypes.data for _, n in params])
        dll.launch(grid_x, grid_y, threads, ptrs)

    return launch, [n.removesuffix("_ptr") for _, n in params]
