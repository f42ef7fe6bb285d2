/* The INT8 peak of an AVX2 CPU without VNNI, as intforge's kernels reach it: N threads each issue
 * independent 256-bit vpmaddwd (16 int16 x int16 products, summed in pairs into 8 int32 lanes: 16 exact
 * int8 MACs) each followed by its vpaddd into an accumulator, on registers only. Prints GMAC/s.
 * Built and run by bench_cpu_suite.py (cc -O2 -mavx2 -pthread) where vnni_peak.c cannot run. */
#include <immintrin.h>
#include "peak_main.h"
static long iters = 200000000L / 16;
/* One step: 8 distinct products (2 activations x 4 weights, as in a kernel's register tile), each added
 * to its own accumulator. In asm: compilers spill C-level versions of this loop to the stack. */
static void *run(void *arg) {
  int *out = arg;
  long n = iters;
  __asm__ volatile(
      "vpcmpeqd %%ymm0, %%ymm0, %%ymm0\n\tvpabsw %%ymm0, %%ymm0\n\tvpaddw %%ymm0, %%ymm0, %%ymm1\n\t"
      "vpaddw %%ymm1, %%ymm0, %%ymm2\n\tvpaddw %%ymm2, %%ymm0, %%ymm3\n\tvpaddw %%ymm3, %%ymm0, %%ymm4\n\t"
      "vpaddw %%ymm4, %%ymm0, %%ymm5\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\tvmovdqa %%ymm8, %%ymm9\n\tvmovdqa %%ymm8, %%ymm10\n\t"
      "vmovdqa %%ymm8, %%ymm11\n\tvmovdqa %%ymm8, %%ymm12\n\tvmovdqa %%ymm8, %%ymm13\n\t"
      "vmovdqa %%ymm8, %%ymm14\n\tvmovdqa %%ymm8, %%ymm15\n\t"
      "1:\n\t"
      "vpmaddwd %%ymm2, %%ymm0, %%ymm6\n\tvpaddd %%ymm6, %%ymm8, %%ymm8\n\t"
      "vpmaddwd %%ymm3, %%ymm0, %%ymm7\n\tvpaddd %%ymm7, %%ymm9, %%ymm9\n\t"
      "vpmaddwd %%ymm4, %%ymm0, %%ymm6\n\tvpaddd %%ymm6, %%ymm10, %%ymm10\n\t"
      "vpmaddwd %%ymm5, %%ymm0, %%ymm7\n\tvpaddd %%ymm7, %%ymm11, %%ymm11\n\t"
      "vpmaddwd %%ymm2, %%ymm1, %%ymm6\n\tvpaddd %%ymm6, %%ymm12, %%ymm12\n\t"
      "vpmaddwd %%ymm3, %%ymm1, %%ymm7\n\tvpaddd %%ymm7, %%ymm13, %%ymm13\n\t"
      "vpmaddwd %%ymm4, %%ymm1, %%ymm6\n\tvpaddd %%ymm6, %%ymm14, %%ymm14\n\t"
      "vpmaddwd %%ymm5, %%ymm1, %%ymm7\n\tvpaddd %%ymm7, %%ymm15, %%ymm15\n\t"
      "dec %0\n\tjnz 1b\n\t"
      "vpaddd %%ymm8, %%ymm15, %%ymm8\n\tvmovd %%xmm8, %1\n\tvzeroupper"
      : "+r"(n), "=m"(*out)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "cc");
  return NULL;
}
int main(int argc, char **argv) { return peak_main(argc, argv, run, (double)iters * 8 * 16); }
