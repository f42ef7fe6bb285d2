/* The driver shared by the register-only peak loops (vnni_peak.c, avx2_peak.c): run the file's `run` on
 * N threads (argv[1], default 1) and print GMAC/s, given the MACs one thread's `run` performs. */
#ifndef INTFORGE_PEAK_MAIN_H
#define INTFORGE_PEAK_MAIN_H
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <pthread.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int peak_main(int argc, char **argv, void *(*run)(void *), double macs_per_thread) {
  int n = argc > 1 ? atoi(argv[1]) : 1; pthread_t th[64]; int out[64];
  if (n < 1 || n > 64) { fprintf(stderr, "threads: 1 to 64\n"); return 1; }
  double t0 = now();
  for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, run, &out[i]);
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  double dt = now() - t0;
  printf("%.1f\n", n * macs_per_thread / dt / 1e9);
  return 0;
}
#endif
