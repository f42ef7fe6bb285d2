/* How unevenly this machine's cores run at one moment, and what that costs a statically split kernel.
 *
 * Two threads, each pinned to its own CPU (the first two this process may use), run the same
 * register-only vpdpbusd loop (about 80 us) in lockstep rounds: a barrier, then both time their loop. A
 * kernel whose tasks are split into one fixed share per thread (TVM's parallel loops) lasts as long as
 * the slower thread of each round, against the mean of the two had the work gone to whichever thread
 * was free; `static_loss` is that ratio over all rounds. Threads that run at one speed give 1.00; on
 * this project's shared 2-vCPU VM it was 1.003-1.11 within minutes on 2026-12-04, one vCPU up to 20%
 * slower than the other for a whole run.
 *
 * Build and run: cc -O2 -mavx512f -mavx512vnni -pthread benchmarks/thread_skew.c -o /tmp/skew && /tmp/skew [rounds]
 * On a CPU without AVX512-VNNI build it with -mavx2 instead: the loop is then vpmaddwd + vpaddd (the
 * instructions of kernels/x86_avx2.py), in the same 8 chains and rounds.
 * Prints one JSON object. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_ROUNDS 100000
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static pthread_barrier_t barrier;
static double took[2][MAX_ROUNDS];
static int rounds = 2000, cpus[2];  /* the first two CPUs this process may run on */

static void *run(void *arg) {
  int me = (int)(long)arg;
  cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpus[me], &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#ifdef __AVX512VNNI__
  __m512i acc[8], a = _mm512_set1_epi32(3), b = _mm512_set1_epi32(5);
  for (int i = 0; i < 8; i++) acc[i] = _mm512_set1_epi32(i);
#else
  __m256i acc[8], a = _mm256_set1_epi16(3), b = _mm256_set1_epi16(5);
  for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
#endif
  for (int r = 0; r < rounds; r++) {
    pthread_barrier_wait(&barrier);
    double t0 = now();
    for (int k = 0; k < 20000; k++)
#ifdef __AVX512VNNI__
      for (int i = 0; i < 8; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
#else
      for (int i = 0; i < 8; i++) {
        __asm__ volatile("" : "+x"(a));  /* a "changes": the product is not hoisted out of the loop */
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a, b));
      }
#endif
    took[me][r] = now() - t0;
  }
  int sum = 0;
#ifdef __AVX512VNNI__
  for (int i = 0; i < 8; i++) sum += _mm512_reduce_add_epi32(acc[i]);
#else
  for (int i = 0; i < 8; i++) {
    int lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc[i]);
    for (int l = 0; l < 8; l++) sum += lanes[l];
  }
#endif
  return (void *)(long)sum;  /* keeps the loop from being optimized away */
}

int main(int argc, char **argv) {
  if (argc > 1) rounds = atoi(argv[1]);
  if (rounds < 1 || rounds > MAX_ROUNDS) { fprintf(stderr, "rounds: 1 to %d\n", MAX_ROUNDS); return 2; }
  cpu_set_t allowed; int found = 0;
  if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
    for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
      if (CPU_ISSET(c, &allowed)) cpus[found++] = c;
  if (found < 2) { fprintf(stderr, "needs two CPUs\n"); return 2; }
  pthread_barrier_init(&barrier, NULL, 2);
  pthread_t th[2];
  for (long i = 0; i < 2; i++) pthread_create(&th[i], NULL, run, (void *)i);
  for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
  double sum0 = 0, sum1 = 0, slowest = 0;
  int over10 = 0, over25 = 0;
  for (int r = 0; r < rounds; r++) {
    double a = took[0][r], b = took[1][r], hi = a > b ? a : b, lo = a > b ? b : a;
    sum0 += a; sum1 += b; slowest += hi;
    over10 += hi > 1.10 * lo; over25 += hi > 1.25 * lo;
  }
  printf("{\"benchmark\": \"thread_skew\", \"rounds\": %d, \"mean_us\": [%.1f, %.1f], "
         "\"rounds_over_10pct_apart\": %d, \"rounds_over_25pct_apart\": %d, \"static_loss\": %.4f}\n",
         rounds, sum0 / rounds * 1e6, sum1 / rounds * 1e6, over10, over25, slowest / ((sum0 + sum1) / 2));
  return 0;
}
