/* What one epilogue instruction costs next to the dot products, on this CPU: a loop of 16 independent
 * 512-bit vpdpbusd (register operands only) is timed alone, then with 4 instructions of one kind added
 * (independent of each other and of the vpdpbusd chain). An instruction that shares vpdpbusd's pipes
 * adds time; one that runs on the other pipes adds next to nothing. Prints ns per loop iteration and
 * the cost of each added instruction in vpdpbusd slots.
 *
 * On the Zen 4 EPYC of the README (2026-12-03, two runs): vpmadd52luq, vpmaddwd, vpdpwssd and vpmulld
 * cost 0.75 to 1 vpdpbusd each (the integer multiply pipes), vpermt2b 0.4 to 0.6, vpsravd 0 to 0.5;
 * adds, min/max, logic, shifts by an immediate, sign/zero extensions, vextracti64x4, saturating narrows
 * and register moves 0 to 0.17. On the Zen 5 EPYC (2026-12-04, twice the vpdpbusd rate): the multiplies
 * 0.73 to 0.81, vpmovsxdq, vpmovzxbd and vpmovusdb 0.42 to 0.5, vextracti64x4 0.7, vpermt2b 0.79, adds,
 * min/max, logic and immediate shifts 0.05 to 0.13, moves 0.18, vpsravd 0.2.
 * These are prices for instructions that run alongside the dot products.
 * A conv's epilogue does not: it runs after its tile's vpdpbusd, at about 2 instructions a cycle
 * whatever they are (README, Limitations), so there its instruction count is what it costs.
 *
 * Build and run: cc -O2 -mavx512f -o /tmp/epilogue_port_costs benchmarks/epilogue_port_costs.c && /tmp/epilogue_port_costs */
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

#define N 20000000L
#define DP(r) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #r "\n"
#define DP8 DP(0) DP(1) DP(2) DP(3) DP(4) DP(5) DP(6) DP(7)
#define FOUR(op) op("10") op("11") op("12") op("13")
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm10", "xmm11", "xmm12", "xmm13"
#define RUN(name, extra)                                                              \
  {                                                                                   \
    double t = now();                                                                 \
    for (long i = 0; i < N; i++) __asm__ volatile(DP8 DP8 extra ::: CLOBBER);         \
    t = (now() - t) / N * 1e9;                                                        \
    if (base == 0) base = t;                                                          \
    printf("%-34s %.3f ns/iter  %+.2f vpdpbusd slots each\n", name, t, (t - base) / (base / 16) / 4); \
  }

#define MAXSD(r) "vpmaxsd %%zmm29, %%zmm30, %%zmm" r "\n"
#define ADDD(r) "vpaddd %%zmm29, %%zmm30, %%zmm" r "\n"
#define SXDQ(r) "vpmovsxdq %%ymm29, %%zmm" r "\n"
#define EXTR(r) "vextracti64x4 $1, %%zmm29, %%ymm" r "\n"
#define MADD52(r) "vpmadd52luq %%zmm29, %%zmm30, %%zmm" r "\n"
#define PERMT2B(r) "vpermt2b %%zmm29, %%zmm30, %%zmm" r "\n"
#define MADDWD(r) "vpmaddwd %%zmm29, %%zmm30, %%zmm" r "\n"
#define DPWSSD(r) "vpdpwssd %%zmm29, %%zmm30, %%zmm" r "\n"
#define SRAD(r) "vpsrad $13, %%zmm29, %%zmm" r "\n"
#define SRAVD(r) "vpsravd %%zmm29, %%zmm30, %%zmm" r "\n"
#define ANDQ(r) "vpandq %%zmm29, %%zmm30, %%zmm" r "\n"
#define MOVUSDB(r) "vpmovusdb %%zmm29, %%xmm" r "\n"
#define ZXBD(r) "vpmovzxbd %%xmm29, %%zmm" r "\n"
#define MOVQ(r) "vmovdqa64 %%zmm29, %%zmm" r "\n"
#define MULLD(r) "vpmulld %%zmm29, %%zmm30, %%zmm" r "\n"

int main(void) {
  double base = 0;
  __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n vpxord %%zmm31, %%zmm31, %%zmm31\n"
                   "vpternlogd $0xff, %%zmm29, %%zmm29, %%zmm29\n" ::: "xmm29", "xmm30", "xmm31");
  RUN("16 vpdpbusd", "")
  RUN("+ 4 vpaddd", FOUR(ADDD))
  RUN("+ 4 vpmaxsd", FOUR(MAXSD))
  RUN("+ 4 vpandq", FOUR(ANDQ))
  RUN("+ 4 vpsrad (immediate)", FOUR(SRAD))
  RUN("+ 4 vpmovsxdq", FOUR(SXDQ))
  RUN("+ 4 vpmovzxbd", FOUR(ZXBD))
  RUN("+ 4 vextracti64x4", FOUR(EXTR))
  RUN("+ 4 vpmovusdb", FOUR(MOVUSDB))
  RUN("+ 4 vmovdqa64", FOUR(MOVQ))
  RUN("+ 4 vpermt2b", FOUR(PERMT2B))
  RUN("+ 4 vpsravd", FOUR(SRAVD))
  RUN("+ 4 vpmadd52luq", FOUR(MADD52))
  RUN("+ 4 vpmaddwd", FOUR(MADDWD))
  RUN("+ 4 vpdpwssd", FOUR(DPWSSD))
  RUN("+ 4 vpmulld", FOUR(MULLD))
  return 0;
}
