/* intforge's thread pool: what a model.so's parallel loops are launched on (python/intforge/pool.py).
 *
 * TVM's generated code runs each parallel loop through a function pointer in the library,
 * `__TVMBackendParallelLaunch`, which TVM's loader points at its own pool (src/runtime/thread_pool.cc).
 * That pool waits with `sched_yield` on both sides, the caller for the workers and the workers for the
 * next loop, so a launch costs about two system calls however little it does: 1.25-1.45 us on the Zen 3
 * of 2026-12-05, against 0.26 us for a round trip of two threads spinning on `pause`
 * (benchmarks/bench_launch.py), and MobileNetV2 makes 73 launches a call. This pool has the same calling
 * convention; its workers and the caller wait spinning on `pause` (ARM: `yield`) for SPIN_NS, then with
 * `sched_yield` (a core shared with another thread gives it its turn), and the idle workers sleep on a
 * futex after IDLE_NS. TVM has no pool with a pluggable wait; this one is ours.
 *
 * One pool a process, made lazily by the first launch, with the thread count and placement that
 * pool.py configures (threads.py's one worker per physical core). A launch made while another is running
 * (a second calling thread, or a parallel loop inside a task) runs its tasks serially in the caller.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelGroupEnv; /* TVM's TVMParallelGroupEnv */
typedef int (*ParallelLambda)(int task_id, ParallelGroupEnv* penv, void* cdata);

#define MAX_THREADS 256
#define SPIN_NS 50000LL     /* waits this long on pause before yielding: longer than a gap between kernels */
#define IDLE_NS 5000000LL   /* an idle worker sleeps after this long without a launch */

static struct {
  _Alignas(64) _Atomic uint32_t generation; /* bumped by each launch; the workers wait for it to move */
  _Alignas(64) _Atomic int remaining;       /* workers still running the current launch's tasks */
  _Alignas(64) _Atomic int sleepers;        /* workers asleep on the futex (or about to be) */
  _Alignas(64) _Atomic int busy;            /* a launch is running */
  _Atomic int failed;
  ParallelLambda fn;
  void* cdata;
  int num_task;
  int threads;  /* the caller and the workers */
  _Atomic int started;  /* the workers exist (set last, after `threads`, under `lock`) */
  uint32_t first_generation; /* the generation when they were made */
  pthread_t workers[MAX_THREADS];
  _Atomic int tids[MAX_THREADS]; /* each worker's kernel thread id, once it runs (threads.py reads their CPU clocks) */
  /* placement: worker i on cpus[i] alone (one_each), or every worker on all of cpus */
  int cpus[MAX_THREADS];
  int ncpus;
  int one_each;
  pthread_mutex_t lock; /* start and placement */
} P = {.threads = 1, .lock = PTHREAD_MUTEX_INITIALIZER};

static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ volatile("yield");
#endif
}

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void place(int worker) {
  if (P.ncpus == 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (P.one_each) {
    if (worker >= P.ncpus) return;
    CPU_SET(P.cpus[worker], &set);
  } else {
    for (int i = 0; i < P.ncpus; i++) CPU_SET(P.cpus[i], &set);
  }
  pthread_setaffinity_np(P.workers[worker], sizeof set, &set);
}

static void run_tasks(int first, int step) {
  ParallelGroupEnv env = {NULL, P.num_task};
  for (int t = first; t < P.num_task; t += step)
    if (P.fn(t, &env, P.cdata) != 0) atomic_store(&P.failed, 1);
}

static void* worker_main(void* arg) {
  int id = (int)(intptr_t)arg;
  atomic_store(&P.tids[id], (int)syscall(SYS_gettid));
  uint32_t seen = P.first_generation; /* (not a load now: a launch may have begun since the start) */
  for (;;) {
    long long start = now_ns();
    unsigned spins = 0;
    uint32_t g;
    while ((g = atomic_load_explicit(&P.generation, memory_order_acquire)) == seen) {
      if (++spins & 63) {
        relax();
        continue;
      }
      long long waited = now_ns() - start;
      if (waited < SPIN_NS) continue;
      if (waited < IDLE_NS) {
        sched_yield();
        continue;
      }
      atomic_fetch_add(&P.sleepers, 1);
      if (atomic_load(&P.generation) == seen)
        syscall(SYS_futex, &P.generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      atomic_fetch_sub(&P.sleepers, 1);
      start = now_ns();
    }
    seen = g;
    run_tasks(id, P.threads);
    atomic_fetch_sub_explicit(&P.remaining, 1, memory_order_release);
  }
  return NULL;
}

static void after_fork_in_child(void) {
  /* the workers are not copied into a forked child: it makes its own on its first launch */
  atomic_store(&P.started, 0);
  for (int i = 0; i < MAX_THREADS; i++) atomic_store(&P.tids[i], 0);
  atomic_store(&P.busy, 0);
  atomic_store(&P.sleepers, 0);
  atomic_store(&P.remaining, 0);
  pthread_mutex_init(&P.lock, NULL);
}

static void start_workers(void) {
  pthread_mutex_lock(&P.lock);
  if (!atomic_load(&P.started)) {
    static int registered = 0;
    if (!registered) {
      pthread_atfork(NULL, NULL, after_fork_in_child);
      registered = 1;
    }
    int made = 1;
    P.first_generation = atomic_load(&P.generation);
    for (int i = 1; i < P.threads; i++) {
      if (pthread_create(&P.workers[i], NULL, worker_main, (void*)(intptr_t)i) != 0) break;
      pthread_detach(P.workers[i]);
      place(i);
      made++;
    }
    P.threads = made;
    atomic_store(&P.started, 1);
  }
  pthread_mutex_unlock(&P.lock);
}

/* The number of threads (caller included) launches will use; takes effect before the first launch only. */
int intforge_pool_set_threads(int threads) {
  pthread_mutex_lock(&P.lock);
  if (!P.started) P.threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
  int n = P.threads;
  pthread_mutex_unlock(&P.lock);
  return n;
}

/* The number of threads (caller included) launches use. */
int intforge_pool_threads(void) { return P.threads; }

/* The kernel thread ids of the running workers into `out` (at most `max`); how many. */
int intforge_pool_worker_tids(int* out, int max) {
  int n = 0;
  if (P.started)
    for (int i = 1; i < P.threads && n < max; i++) {
      int tid = atomic_load(&P.tids[i]);
      if (tid) out[n++] = tid;
    }
  return n;
}

/* Where the workers run: worker i on cpus[i] alone (one_each; cpus[0] is the caller's, not applied), or
 * each on all `n` cpus. Applies to running workers at once and to those started later. */
int intforge_pool_place(const int* cpus, int n, int one_each) {
  pthread_mutex_lock(&P.lock);
  P.ncpus = n < 0 ? 0 : n > MAX_THREADS ? MAX_THREADS : n;
  memcpy(P.cpus, cpus, sizeof(int) * (size_t)P.ncpus);
  P.one_each = one_each;
  if (P.started)
    for (int i = 1; i < P.threads; i++) place(i);
  pthread_mutex_unlock(&P.lock);
  return 0;
}

/* TVM's TVMBackendParallelLaunch: run flambda(task, env, cdata) for every task, num_task of them (0: one
 * a thread), and return 0, or -1 where a task failed. */
int intforge_parallel_launch(ParallelLambda flambda, void* cdata, int num_task) {
  if (!atomic_load(&P.started)) start_workers();
  int n = P.threads;
  if (num_task <= 0) num_task = n;
  int idle = 0;
  if (n <= 1 || !atomic_compare_exchange_strong(&P.busy, &idle, 1)) {
    ParallelGroupEnv env = {NULL, num_task};
    int rc = 0;
    for (int t = 0; t < num_task; t++) rc |= flambda(t, &env, cdata);
    return rc ? -1 : 0;
  }
  P.fn = flambda;
  P.cdata = cdata;
  P.num_task = num_task;
  atomic_store(&P.failed, 0);
  atomic_store_explicit(&P.remaining, n - 1, memory_order_relaxed);
  atomic_fetch_add(&P.generation, 1);
  if (atomic_load(&P.sleepers) > 0) syscall(SYS_futex, &P.generation, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
  run_tasks(0, n);
  long long start = 0;
  unsigned spins = 0;
  while (atomic_load_explicit(&P.remaining, memory_order_acquire) != 0) {
    if (++spins & 63) {
      relax();
      continue;
    }
    if (start == 0) start = now_ns();
    else if (now_ns() - start >= SPIN_NS) sched_yield();
  }
  int failed = atomic_load(&P.failed);
  atomic_store(&P.busy, 0);
  return failed ? -1 : 0;
}
