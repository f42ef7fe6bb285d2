/* The CPU's measured INT8 peak: N threads each issue independent 512-bit vpdpbusd (64 u8 x s8 MACs each)
 * on registers only, so nothing but the dot-product units limits the rate. Prints GMAC/s.
 * Built and run by bench_cpu_suite.py (cc -O2 -mavx512f -mavx512bw -mavx512vnni -pthread). The nominal
 * peak from /proc/cpuinfo's MHz understates it on CPUs that boost above their base clock. */
#include <immintrin.h>
#include "peak_main.h"
static long iters = 200000000L / 16;
static void *run(void *arg) {
  __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x02020202);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0;
  for (long i = 0; i < iters; i++) {
    c0 = _mm512_dpbusd_epi32(c0, a, b); c1 = _mm512_dpbusd_epi32(c1, a, b);
    c2 = _mm512_dpbusd_epi32(c2, a, b); c3 = _mm512_dpbusd_epi32(c3, a, b);
    c4 = _mm512_dpbusd_epi32(c4, a, b); c5 = _mm512_dpbusd_epi32(c5, a, b);
    c6 = _mm512_dpbusd_epi32(c6, a, b); c7 = _mm512_dpbusd_epi32(c7, a, b);
    c8 = _mm512_dpbusd_epi32(c8, a, b); c9 = _mm512_dpbusd_epi32(c9, a, b);
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7), "+v"(c8), "+v"(c9));
  }
  int *out = arg; __m512i s = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c8, c9));
  *out = _mm512_reduce_add_epi32(s);
  return NULL;
}
int main(int argc, char **argv) { return peak_main(argc, argv, run, (double)iters * 10 * 64); }
