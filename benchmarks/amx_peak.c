/* The CPU's measured AMX-INT8 peak, beside vnni_peak.c's AVX512-VNNI one: threads pinned one to a CPU (the
 * first 1, then 2, this process may run on) each issue register-only `tdpbusd`s (u8 x s8 -> s32, a 16x64 by
 * 64x16 tile product: 16384 MACs each) into four independent accumulator tiles, so nothing but the tile
 * multiply unit limits the rate. Prints one JSON object: GMAC/s on 1 and 2 threads (best of 3 runs each),
 * and whether one tile product, and the accumulators after the timed loop, equal a scalar reference.
 *
 * Where the CPU has no AMX-INT8 (CPUID.7.0:EDX bits 24/25), the OS does not enable its tile state (XCR0 bits
 * 17/18), or Linux refuses the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA=18;
 * kernel 5.16 and later), it prints {"amx": false, ...} with the reason and exits 0.
 *
 * Build and run: cc -O2 -mamx-tile -mamx-int8 -pthread benchmarks/amx_peak.c -o /tmp/amx && /tmp/amx [iters]
 * (the AMX instructions are inline assembly, so any gcc whose assembler knows them, binutils 2.36 and
 * later, builds it, with or without the -mamx flags). */
#define _GNU_SOURCE
#include <cpuid.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define MACS_PER_TDPBUSD (16L * 16 * 64)

/* AT&T operand order: tdpbusd %tmm<B>, %tmm<A>, %tmm<C> computes C += A (u8) . B (s8, VNNI layout) */
#define TDPBUSD(c, a, b) __asm__ volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::: "memory")
#define TILELOADD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(base)), "r"((long)(stride)) : "memory")
#define TILESTORED(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(base)), "r"((long)(stride)) : "memory")
#define TILEZERO(t) __asm__ volatile("tilezero %%tmm" #t ::: "memory")

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed, aligned(64))) tilecfg_t;

static void tile_config(void) {
  tilecfg_t cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }  /* every tile 16 rows x 64 bytes */
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}
static void tile_release(void) { __asm__ volatile("tilerelease" ::: "memory"); }

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static uint32_t rng_state = 12345u;
static uint32_t rnd(void) { rng_state = rng_state * 1664525u + 1013904223u; return rng_state >> 8; }

/* A: 16 rows x 64 u8 (K = 64). B: K x 16 s8, kept as [K][16]; its VNNI tile layout is 16 rows (K/4) x 64
 * bytes with Bv[k/4][4n + k%4] = B[k][n]. C: 16 x 16 s32. */
static uint8_t A[2][16][64] __attribute__((aligned(64)));
static int8_t B[2][64][16];
static int8_t Bv[2][16][64] __attribute__((aligned(64)));

static void vnni_layout(int j) {
  for (int k = 0; k < 64; k++)
    for (int n = 0; n < 16; n++) Bv[j][k / 4][4 * n + k % 4] = B[j][k][n];
}
static void reference(int i, int j, const int32_t *c0, int32_t *out) {
  for (int m = 0; m < 16; m++)
    for (int n = 0; n < 16; n++) {
      int32_t s = c0 ? c0[m * 16 + n] : 0;
      for (int k = 0; k < 64; k++) s += (int32_t)A[i][m][k] * (int32_t)B[j][k][n];
      out[m * 16 + n] = s;
    }
}

/* One tile product, from a non-zero accumulator, against the scalar reference: the number of differing
 * int32 results (0 = bit-exact) and the largest difference. */
static int check_one(long *max_diff) {
  int32_t c0[256] __attribute__((aligned(64))), got[256] __attribute__((aligned(64))), want[256];
  for (int i = 0; i < 256; i++) c0[i] = (int32_t)(rnd() % 2000001) - 1000000;
  reference(0, 0, c0, want);
  tile_config();
  TILELOADD(0, c0, 64);
  TILELOADD(4, A[0], 64);
  TILELOADD(6, Bv[0], 64);
  TDPBUSD(0, 4, 6);
  TILESTORED(0, got, 64);
  tile_release();
  int bad = 0;
  *max_diff = 0;
  for (int i = 0; i < 256; i++) {
    long d = labs((long)got[i] - (long)want[i]);
    if (d) bad++;
    if (d > *max_diff) *max_diff = d;
  }
  return bad;
}

static long iters = 4000000;
static int cpus[2];
typedef struct { int me; double seconds; int loop_ok; } job_t;
static pthread_barrier_t barrier;

static void *run(void *arg) {
  job_t *job = arg;
  cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpus[job->me], &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  tile_config();  /* the tile configuration is per thread */
  TILELOADD(4, A[0], 64); TILELOADD(5, A[1], 64);
  TILELOADD(6, Bv[0], 64); TILELOADD(7, Bv[1], 64);
  TILEZERO(0); TILEZERO(1); TILEZERO(2); TILEZERO(3);
  for (long i = 0; i < 1000; i++) { TDPBUSD(0, 4, 6); TDPBUSD(1, 4, 7); TDPBUSD(2, 5, 6); TDPBUSD(3, 5, 7); }
  TILEZERO(0); TILEZERO(1); TILEZERO(2); TILEZERO(3);
  pthread_barrier_wait(&barrier);
  double t0 = now();
  for (long i = 0; i < iters; i++) {
    TDPBUSD(0, 4, 6); TDPBUSD(1, 4, 7); TDPBUSD(2, 5, 6); TDPBUSD(3, 5, 7);
  }
  job->seconds = now() - t0;
  /* the accumulators after `iters` products each must be iters x (A_i . B_j), modulo 2^32 */
  int32_t c[4][256] __attribute__((aligned(64)));
  TILESTORED(0, c[0], 64); TILESTORED(1, c[1], 64); TILESTORED(2, c[2], 64); TILESTORED(3, c[3], 64);
  tile_release();
  job->loop_ok = 1;
  for (int t = 0; t < 4; t++) {
    int32_t want[256];
    reference(t / 2, t % 2, NULL, want);
    for (int k = 0; k < 256; k++)
      if ((uint32_t)c[t][k] != (uint32_t)((uint64_t)(uint32_t)want[k] * (uint64_t)iters)) job->loop_ok = 0;
  }
  return NULL;
}

/* GMAC/s of n threads (best of `runs`), all of them running at once; *ok = every accumulator correct */
static double measure(int n, int runs, int *ok, double *all) {
  double best = 0;
  *ok = 1;
  for (int r = 0; r < runs; r++) {
    pthread_t th[2]; job_t jobs[2];
    pthread_barrier_init(&barrier, NULL, n);
    for (int i = 0; i < n; i++) { jobs[i].me = i; pthread_create(&th[i], NULL, run, &jobs[i]); }
    double slowest = 0;
    for (int i = 0; i < n; i++) {
      pthread_join(th[i], NULL);
      if (jobs[i].seconds > slowest) slowest = jobs[i].seconds;
      if (!jobs[i].loop_ok) *ok = 0;
    }
    pthread_barrier_destroy(&barrier);
    double g = (double)n * iters * 4 * MACS_PER_TDPBUSD / slowest / 1e9;
    all[r] = g;
    if (g > best) best = g;
  }
  return best;
}

static void no_amx(const char *why, unsigned edx, unsigned long long xcr0) {
  printf("{\"amx\": false, \"reason\": \"%s\", \"cpuid7_edx\": \"0x%08x\", \"amx_tile\": %s, \"amx_int8\": %s, "
         "\"amx_bf16\": %s, \"xcr0\": \"0x%llx\"}\n", why, edx, (edx >> 24) & 1 ? "true" : "false",
         (edx >> 25) & 1 ? "true" : "false", (edx >> 22) & 1 ? "true" : "false", xcr0);
}

int main(int argc, char **argv) {
  if (argc > 1) iters = atol(argv[1]);
  unsigned a, b, c, d = 0, ecx1 = 0;
  unsigned long long xcr0 = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) { no_amx("no CPUID leaf 7", 0, 0); return 0; }
  if (__get_cpuid(1, &a, &b, &ecx1, &c) && (ecx1 >> 27) & 1) {  /* OSXSAVE: xgetbv is allowed */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = ((unsigned long long)hi << 32) | lo;
  }
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) { no_amx("CPUID: no AMX-TILE/AMX-INT8", d, xcr0); return 0; }
  if (((xcr0 >> 17) & 3) != 3) { no_amx("XCR0: the OS has not enabled the tile state", d, xcr0); return 0; }
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
    no_amx("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused", d, xcr0); return 0;
  }
  unsigned long perm = 0;
  syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm);

  cpu_set_t set; sched_getaffinity(0, sizeof set, &set);
  int ncpu = 0;
  for (int i = 0; i < CPU_SETSIZE && ncpu < 2; i++) if (CPU_ISSET(i, &set)) cpus[ncpu++] = i;
  if (ncpu == 1) cpus[1] = cpus[0];

  for (int j = 0; j < 2; j++) {
    for (int m = 0; m < 16; m++) for (int k = 0; k < 64; k++) A[j][m][k] = (uint8_t)rnd();
    for (int k = 0; k < 64; k++) for (int n = 0; n < 16; n++) B[j][k][n] = (int8_t)rnd();
    vnni_layout(j);
  }
  long max_diff;
  int bad = check_one(&max_diff);
  /* the reference's extremes: u8 255 x s8 -128 over K = 64 stays far inside int32 */
  double r1[3], r2[3];
  int ok1, ok2;
  double g1 = measure(1, 3, &ok1, r1);
  double g2 = ncpu >= 2 ? measure(2, 3, &ok2, r2) : 0;
  if (ncpu < 2) { ok2 = 1; r2[0] = r2[1] = r2[2] = 0; }
  printf("{\"amx\": true, \"amx_bf16\": %s, \"xcr0\": \"0x%llx\", \"xcomp_perm\": \"0x%lx\", "
         "\"tile_product_bitexact\": %s, \"tile_product_mismatches\": %d, \"tile_product_max_abs_diff\": %ld, "
         "\"loop_accumulators_exact\": %s, \"macs_per_tdpbusd\": %ld, \"tdpbusd_per_thread\": %ld, "
         "\"cpus\": [%d, %d], \"gmacs_1t\": %.1f, \"gmacs_2t\": %.1f, "
         "\"runs_1t\": [%.1f, %.1f, %.1f], \"runs_2t\": [%.1f, %.1f, %.1f]}\n",
         (d >> 22) & 1 ? "true" : "false", xcr0, perm, bad == 0 ? "true" : "false", bad, max_diff,
         ok1 && ok2 ? "true" : "false", MACS_PER_TDPBUSD, iters * 4, cpus[0], cpus[1], g1, g2,
         r1[0], r1[1], r1[2], r2[0], r2[1], r2[2]);
  return 0;
}
