/* Stress of intforge's thread pool (python/intforge/pool.c), built with ThreadSanitizer by
 * tests/test_pool.py: launches of every task count, workers woken from sleep, launches inside tasks,
 * and two calling threads at once; every task must run exactly once and no access may race. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

typedef struct {
  void* sync_handle;
  int num_task;
} Env;
int intforge_pool_set_threads(int threads);
int intforge_parallel_launch(int (*fn)(int, Env*, void*), void* cdata, int num_task);

static _Atomic long runs;
static _Atomic int seen[64];

static int task(int t, Env* env, void* cdata) {
  (void)cdata;
  atomic_fetch_add(&seen[t], 1);
  atomic_fetch_add(&runs, 1);
  return t < env->num_task ? 0 : 1;
}

static int nested(int t, Env* env, void* cdata) {
  (void)t, (void)env, (void)cdata;
  return intforge_parallel_launch(task, NULL, 2);
}

static void* caller(void* arg) {
  (void)arg;
  for (int i = 0; i < 20000; i++)
    if (intforge_parallel_launch(task, NULL, 0) != 0) return (void*)1;
  return NULL;
}

int main(void) {
  intforge_pool_set_threads(3);
  long want = 0;
  for (int i = 0; i < 50000; i++) {
    for (int t = 0; t < 8; t++) atomic_store(&seen[t], 0);
    int n = i % 6; /* 0: a task a thread (3); 1 to 5: that many, more tasks than threads too */
    if (intforge_parallel_launch(task, NULL, n) != 0) return 2;
    for (int t = 0; t < (n ? n : 3); t++)
      if (atomic_load(&seen[t]) != 1) {
        printf("launch %d: task %d ran %d times\n", i, t, atomic_load(&seen[t]));
        return 3;
      }
    want += n ? n : 3;
  }
  usleep(20000); /* past the workers' spin: asleep */
  for (int i = 0; i < 1000; i++) {
    intforge_parallel_launch(task, NULL, 0);
    if (i % 100 == 0) usleep(6000);
  }
  for (int i = 0; i < 1000; i++)
    if (intforge_parallel_launch(nested, NULL, 0) != 0) return 4;
  pthread_t a, b;
  void *ra, *rb;
  pthread_create(&a, NULL, caller, NULL);
  pthread_create(&b, NULL, caller, NULL);
  pthread_join(a, &ra);
  pthread_join(b, &rb);
  want += 1000 * 3 + 1000 * 3 * 2 + 2 * 20000 * 3;
  if (ra || rb || atomic_load(&runs) != want) {
    printf("runs %ld, want %ld\n", atomic_load(&runs), want);
    return 5;
  }
  printf("ok %ld tasks\n", want);
  return 0;
}
