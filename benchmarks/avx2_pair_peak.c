/* Exact int8 products on AVX2 without VNNI, two ways, as register-only loops (GMAC/s on N threads):
 *
 *   direct      what intforge's AVX2 kernels issue (kernels/x86_avx2.py): vpmaddwd of a broadcast int16
 *               activation pair by 8 x 2 int16 weights, then vpaddd: 16 MACs for 2 vector instructions.
 *   pair        Winograd's 1968 inner product: sum_k a_k w_k over k = 0..3 is
 *               (a0 + w1)(a1 + w0) + (a2 + w3)(a3 + w2) - (a0 a1 + a2 a3) - (w0 w1 + w2 w3), and the two
 *               sums of each pair are one vpaddw each (a u8 or s8 activation plus an s8 weight fits int16),
 *               so one vpmaddwd does 4 MACs a lane: 2 vpaddw, vpmaddwd, vpaddd for 32 MACs. The a a' terms
 *               are one number a pixel (K/2 products, shared by every output channel), the w w' terms
 *               constants of the layer. Exact, like direct.
 *   direct-mem, pair-mem
 *               the same with each activation broadcast loaded from memory (vpbroadcastd, L1), as the
 *               kernels do: a tile of 8 pixels by one 8-channel block a step.
 *
 * Usage: cc -O2 -mavx2 -pthread benchmarks/avx2_pair_peak.c -o /tmp/pair && /tmp/pair THREADS MODE
 * On the Zen 3 of 2026-12-06 23:55 UTC, a noisy host (thread_skew's static loss 1.10-1.16), one thread, the
 * best of 8 interleaved runs: direct 73.2, pair 91.9 (1.26x), direct-mem 71.1, pair-mem 83.9 (1.18x); an
 * earlier variant of these loops, 23:30 UTC: 80.7, 97.5 (1.21x), 77.6, 85.6 (1.10x), and ONNX Runtime's
 * saturating vpmaddubsw + vpmaddwd + vpaddd 96.5. intforge's kernels do not use the pair form (yet):
 * README, Limitations. */
#include <immintrin.h>
#include <string.h>
#include "peak_main.h"
static long iters = 200000000L / 16;
static int buf[4096] __attribute__((aligned(64)));

#define REGS_SETUP                                                                                        \
  "vpcmpeqd %%ymm0, %%ymm0, %%ymm0\n\tvpabsw %%ymm0, %%ymm0\n\tvpaddw %%ymm0, %%ymm0, %%ymm1\n\t"         \
  "vpaddw %%ymm1, %%ymm0, %%ymm2\n\tvpaddw %%ymm2, %%ymm0, %%ymm3\n\tvpaddw %%ymm3, %%ymm0, %%ymm4\n\t"    \
  "vpaddw %%ymm4, %%ymm0, %%ymm5\n\tvpaddw %%ymm5, %%ymm0, %%ymm6\n\tvpaddw %%ymm6, %%ymm0, %%ymm7\n\t"    \
  "vpxor %%ymm8, %%ymm8, %%ymm8\n\tvmovdqa %%ymm8, %%ymm9\n\tvmovdqa %%ymm8, %%ymm10\n\t"                 \
  "vmovdqa %%ymm8, %%ymm11\n\t"
#define CLOBBERS                                                                                          \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",      \
      "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"

/* direct, registers: 8 products a step, 2 activation pairs (ymm0, ymm1) x 4 weight blocks (ymm2-5) */
#define D(a, w, acc) "vpmaddwd %%ymm" #w ", %%ymm" #a ", %%ymm12\n\tvpaddd %%ymm12, %%ymm" #acc ", %%ymm" #acc "\n\t"
static void *direct(void *arg) {
  long n = iters;
  __asm__ volatile(REGS_SETUP "1:\n\t" D(0, 2, 8) D(0, 3, 9) D(0, 4, 10) D(0, 5, 11) D(1, 2, 8) D(1, 3, 9)
                   D(1, 4, 10) D(1, 5, 11) "dec %0\n\tjnz 1b\n\tvpaddd %%ymm8, %%ymm11, %%ymm8\n\t"
                   "vmovd %%xmm8, %1\n\tvzeroupper"
                   : "+r"(n), "=m"(*(int *)arg) : : CLOBBERS);
  return NULL;
}

/* pair, registers: 4 products a step, 2 pixels (ymm0/1 and ymm2/3: the pairs a0 a2 and a1 a3) x 2 blocks
 * (ymm4/5 and ymm6/7: the weights w1 w3 and w0 w2) */
#define P(a, b, u, v, acc)                                                                                 \
  "vpaddw %%ymm" #a ", %%ymm" #u ", %%ymm12\n\tvpaddw %%ymm" #b ", %%ymm" #v ", %%ymm13\n\t"               \
  "vpmaddwd %%ymm12, %%ymm13, %%ymm12\n\tvpaddd %%ymm12, %%ymm" #acc ", %%ymm" #acc "\n\t"
static void *pair(void *arg) {
  long n = iters;
  __asm__ volatile(REGS_SETUP "1:\n\t" P(0, 1, 4, 5, 8) P(0, 1, 6, 7, 9) P(2, 3, 4, 5, 10) P(2, 3, 6, 7, 11)
                   "dec %0\n\tjnz 1b\n\tvpaddd %%ymm8, %%ymm11, %%ymm8\n\tvmovd %%xmm8, %1\n\tvzeroupper"
                   : "+r"(n), "=m"(*(int *)arg) : : CLOBBERS);
  return NULL;
}

/* the -mem forms: 8 pixels by one block a step, each pixel's activations broadcast from memory; one loop
 * for both, STEP(offset, accumulator) a product (accumulators ymm2-5 and ymm8-11) */
#define MEM_LOOP(STEP)                                                                                     \
  __asm__ volatile(REGS_SETUP "vmovdqa %%ymm8, %%ymm2\n\tvmovdqa %%ymm8, %%ymm3\n\tvmovdqa %%ymm8, %%ymm4\n\t"     \
                   "vmovdqa %%ymm8, %%ymm5\n\t1:\n\t" STEP(0, 2) STEP(64, 3) STEP(128, 4) STEP(192, 5)          \
                   STEP(256, 8) STEP(320, 9) STEP(384, 10) STEP(448, 11) "dec %0\n\tjnz 1b\n\t"                 \
                   "vpaddd %%ymm2, %%ymm11, %%ymm2\n\tvmovd %%xmm2, %1\n\tvzeroupper"                          \
                   : "+r"(n), "=m"(*(int *)arg) : "r"(buf) : CLOBBERS)
#define DM(off, acc) "vpbroadcastd " #off "(%2), %%ymm12\n\tvpmaddwd %%ymm12, %%ymm0, %%ymm12\n\t"        \
  "vpaddd %%ymm12, %%ymm" #acc ", %%ymm" #acc "\n\t"
static void *direct_mem(void *arg) {
  long n = iters;
  MEM_LOOP(DM);
  return NULL;
}
#define PM(off, acc)                                                                                       \
  "vpbroadcastd " #off "(%2), %%ymm12\n\tvpbroadcastd " #off "+4(%2), %%ymm13\n\t"                         \
  "vpaddw %%ymm12, %%ymm0, %%ymm12\n\tvpaddw %%ymm13, %%ymm1, %%ymm13\n\t"                                 \
  "vpmaddwd %%ymm12, %%ymm13, %%ymm12\n\tvpaddd %%ymm12, %%ymm" #acc ", %%ymm" #acc "\n\t"
static void *pair_mem(void *arg) {
  long n = iters;
  MEM_LOOP(PM);
  return NULL;
}

int main(int argc, char **argv) {
  const char *mode = argc > 2 ? argv[2] : "pair";
  if (!strcmp(mode, "direct")) return peak_main(argc, argv, direct, (double)iters * 8 * 16);
  if (!strcmp(mode, "pair")) return peak_main(argc, argv, pair, (double)iters * 4 * 32);
  if (!strcmp(mode, "direct-mem")) return peak_main(argc, argv, direct_mem, (double)iters * 8 * 16);
  if (!strcmp(mode, "pair-mem")) return peak_main(argc, argv, pair_mem, (double)iters * 8 * 32);
  fprintf(stderr, "mode: direct, pair, direct-mem or pair-mem\n");
  return 1;
}
