"""What a conv tile's epilogue costs after its dot products, and what it costs among the next tile's.

A hand-written copy of the blocked VNNI conv kernel's register tile (7 pixels x 2 blocks of 16 output
channels, 14 accumulators in zmm0-13, the K input channels in steps of 4), in inline assembly so that no
compiler reorders it, run over 448 tiles on one core with everything in L1, three ways:
  none: the dot products alone (the tile's sums folded into one store);
  sequential: each tile's epilogue after its dot products, as the kernel had it (clamp, vpmulld, add,
    shift by 24, narrow: `blocked_dot.Narrow.short`; with --residual the fused residual add after it);
  pipelined: the tile's accumulators stored to the stack when its products end, and their epilogue run
    during the next tile's products, one vector a reduction step (`kernels/epilogue_pipeline.py`).

On the Zen 5 EPYC (2026-12-04, `results/epilogue_overlap.json`), GMAC/s, one core:
  K=64:  none 579, sequential 482, pipelined 538 (+11%); with the residual add 397 -> 479 (+21%)
  K=128: none 579, sequential 526, pipelined 557 (+6%);  with the residual add 447 -> 496 (+11%)
  K=256: none 560, sequential 468, pipelined 520 (+11%); with the residual add 498 -> 539 (+8%)
(an earlier run: K=64 451 -> 505 and 371 -> 448, K=128 493 -> 522 and 441 -> 494, K=256 496 -> 504 and
478 -> 509: this shared VM's noise is a few percent).
Inside ResNet50 the kernels gain less (the 64-channel residual convs 5-10%): a task has 4-8 tiles, the
last one's epilogue runs alone, and the constants come from memory.

Usage: python benchmarks/epilogue_overlap.py [--out results/epilogue_overlap.json]   (needs cc, AVX512-VNNI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PIXELS, BLOCKS, TILES = 7, 2, 448
TEMPS = [(25, 26), (27, 28), (29, 30)]  # registers the epilogue of one vector works in (3 in flight)


def _step(s: int, k: int) -> list[str]:
    """Reduction step s: two weight vectors, then each pixel's 4 input bytes broadcast into 2 vpdpbusd."""
    lines = [f"vmovdqa64 {s * 128}(%[w]), %%zmm14", f"vmovdqa64 {s * 128 + 64}(%[w]), %%zmm15"]
    for p in range(PIXELS):
        lines += [f"vpbroadcastd {p * k + s * 4}(%[x]), %%zmm16", f"vpdpbusd %%zmm14, %%zmm16, %%zmm{2 * p}",
                  f"vpdpbusd %%zmm15, %%zmm16, %%zmm{2 * p + 1}"]
    return lines


def _epilogue(v: int, src: str, residual: bool, out: str, identity: str) -> list[str]:
    """Vector v's epilogue; constants in zmm17-24 (bounds, multiplier, add; residual multipliers, rounding, 0)."""
    t, t2 = TEMPS[v % len(TEMPS)]
    off = (v >> 1) * 32 + (v & 1) * 16
    lines = [f"vpmaxsd {src}, %%zmm17, %%zmm{t}", f"vpminsd %%zmm18, %%zmm{t}, %%zmm{t}",
             f"vpmulld %%zmm19, %%zmm{t}, %%zmm{t}", f"vpaddd %%zmm20, %%zmm{t}, %%zmm{t}",
             f"vpsrad $24, %%zmm{t}, %%zmm{t}"]
    if residual:
        lines += [f"vpmovzxbd {off}(%[{identity}]), %%zmm{t2}", f"vpmaddwd %%zmm21, %%zmm{t}, %%zmm{t}",
                  f"vpdpwssd %%zmm22, %%zmm{t2}, %%zmm{t}", f"vpaddd %%zmm23, %%zmm{t}, %%zmm{t}",
                  f"vpsrad $14, %%zmm{t}, %%zmm{t}", f"vpmaxsd %%zmm24, %%zmm{t}, %%zmm{t}"]
    return lines + [f"vpmovusdb %%zmm{t}, {off}(%[{out}])"]


def tile_source(k: int, residual: bool, mode: str) -> str:
    """The C function `tile(...)` that runs one tile in `mode` (none, sequential, pipelined)."""
    steps, vectors = k // 4, PIXELS * BLOCKS
    body = [f"vpxord %%zmm{i}, %%zmm{i}, %%zmm{i}" for i in range(vectors)]
    for s in range(steps):
        body += _step(s, k)
        if mode == "pipelined":  # vector v of the tile before at step floor(v * S / V)
            for v in range(-(-s * vectors // steps), -(-(s + 1) * vectors // steps)):
                body += _epilogue(v, f"{v * 64}(%[prev])", residual, "pout", "pid")
    if mode == "sequential":
        for v in range(vectors):
            body += _epilogue(v, f"%%zmm{v}", residual, "out", "id")
    elif mode == "none":
        body += [f"vpxord %%zmm{i}, %%zmm0, %%zmm0" for i in range(1, vectors)] + ["vmovdqu64 %%zmm0, (%[out])"]
    else:
        body += [f"vmovdqa64 %%zmm{i}, {i * 64}(%[prev])" for i in range(vectors)]
    asm = "\n".join(f'"{line}\\n"' for line in body)
    clobbers = ", ".join(f'"xmm{i}"' for i in (*range(17), *range(25, 31)))
    return f"""static inline void tile(const unsigned char* x, const signed char* w, const unsigned char* id,
  unsigned char* out, const unsigned char* pid, unsigned char* pout, void* prev) {{
  __asm__ volatile({asm}
  :: [x]"r"(x), [w]"r"(w), [id]"r"(id), [out]"r"(out), [pid]"r"(pid), [pout]"r"(pout), [prev]"r"(prev)
  : "memory", {clobbers});
}}
"""


DRIVER = r"""
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static uint8_t in[NT * PIX * K] __attribute__((aligned(64)));
static int8_t w[K * 32] __attribute__((aligned(64)));
static uint8_t idn[NT * PIX * 32 + 64] __attribute__((aligned(64)));
static uint8_t out[NT * PIX * 32 + 64] __attribute__((aligned(64)));
static int32_t prev[14 * 16] __attribute__((aligned(64)));
static int32_t consts[8][16] __attribute__((aligned(64)));
int main(void) {
  for (size_t i = 0; i < sizeof in; i++) in[i] = i * 7;
  for (size_t i = 0; i < sizeof w; i++) w[i] = i * 13;
  int cv[8] = {-100000, 100000, 3000, 1 << 23, 1234, 2345, 1 << 13, 0};
  for (int c = 0; c < 8; c++) for (int l = 0; l < 16; l++) consts[c][l] = cv[c];
  __asm__ volatile("vmovdqa64 0(%0), %%zmm17\n vmovdqa64 64(%0), %%zmm18\n vmovdqa64 128(%0), %%zmm19\n"
                   "vmovdqa64 192(%0), %%zmm20\n vmovdqa64 256(%0), %%zmm21\n vmovdqa64 320(%0), %%zmm22\n"
                   "vmovdqa64 384(%0), %%zmm23\n vmovdqa64 448(%0), %%zmm24\n"
                   :: "r"(consts) : "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24");
  double best = 1e9;
  for (int r = 0; r < 400; r++) {
    double t0 = now();
    for (int t = 0; t < NT; t++)
      tile(in + t * PIX * K, w, idn + t * PIX * 32, out + t * PIX * 32, idn + (t ? t - 1 : 0) * PIX * 32,
           out + (t ? t - 1 : 0) * PIX * 32, prev);
    double d = now() - t0; if (d < best) best = d;
  }
  printf("%.1f\n", (double)NT * PIX * 32 * K / best / 1e9);
  return 0;
}
"""


def run(k: int, residual: bool, mode: str, workdir: Path) -> float:
    """GMAC/s of one (K, residual, mode) on one core (the best of 400 passes over the tiles)."""
    src = workdir / f"t_{k}_{int(residual)}_{mode}.c"
    header = f"#define K {k}\n#define NT {TILES}\n#define PIX {PIXELS}\n"
    src.write_text(header + tile_source(k, residual, mode) + DRIVER)
    exe = src.with_suffix("")
    subprocess.run(["cc", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-o", str(exe), str(src)], check=True)
    return float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "epilogue_overlap.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (64, 128, 256):
            for residual in (False, True):
                rates = {mode: run(k, residual, mode, Path(tmp)) for mode in ("none", "sequential", "pipelined")}
                rows.append({"k": k, "residual": residual, "gmacs_per_s": rates,
                             "pipelined_over_sequential": round(rates["pipelined"] / rates["sequential"], 3)})
                gain = rows[-1]["pipelined_over_sequential"]
                print(f"K={k:3d} {'residual' if residual else 'plain   '}: "
                      + ", ".join(f"{m} {r:.0f}" for m, r in rates.items()) + f" GMAC/s; pipelined x{gain}")
    Path(args.out).write_text(json.dumps({"benchmark": "epilogue_overlap", "tile": [PIXELS, BLOCKS * 16],
                                          "tiles": TILES, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
