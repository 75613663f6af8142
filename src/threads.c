/* threads.c — the pool of worker threads: queues, hand-off to the loop, quarantine (see threads.h). */
#include "threads.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slab.h"
#include "worker.h"
#include "loop.h"

/* One worker thread.  `current` and `quarantined` are guarded by the pool's
 * mutex; the worker's Lua state is its own thread's alone (it makes it). */
typedef struct slot {
  tide__worker w;
  uv_thread_t thread;
  tide__pool *pool;
  tide__job *current;
  int opening;              /* still making its state (thread_init may be slow) */
  int quarantined;          /* given up on: retires (and frees itself) when it returns */
} slot;

/* Where a job is: the `place` of a job in the pool. */
enum { QUEUED = 1, RUNNING, DONE };

/* The jobs of the pool by id: open addressing, linear probing, deletion by
 * backward shift.  Holds every job whose place is QUEUED or RUNNING: the
 * places a cancel or a quarantine must find a job in.  (A finished job is
 * taken out by its worker, so that delivering a batch holds the mutex no
 * longer than taking the list; cancelling it then finds nothing, and its
 * late result is dropped by the caller.) */
typedef struct jobmap {
  tide__job **slots;
  size_t cap, count;        /* cap: a power of two, or 0 */
} jobmap;

/* Invariants, under `mu`: every job is in exactly one place — `queue`, a
 * slot's `current`, `done`, `dead`, or handed to on_done/freed — and is in
 * `jobs` exactly while it is in one of the first two; `refs` counts the
 * loop side (until close) plus each quarantined thread still running, and
 * the last to drop it frees the pool.
 *
 * Job memory (`slab`) is touched by the loop thread only, and by pool_free
 * (the last reference: nobody else is left).  So a worker never frees a
 * job: one whose result is dropped goes on `dead`, which the loop empties
 * at its next submit or wake-up.
 *
 * Memory ordering: the hand-off is this mutex, nothing lock-free.  A
 * worker fills in a job (status, result, trace) before it locks `mu` to
 * append the job to `done`; the loop takes the whole list under `mu` (one
 * lock per wake-up, however many jobs), so the worker's unlock and the
 * loop's lock order those writes before the loop's reads.  The other way,
 * a job's bytes are written before the submit's lock, read after the
 * worker's.  Only `running` and `stop` (worker.h) are atomics, read
 * outside the lock by design. */
struct tide__pool {
  uv_mutex_t mu;
  uv_cond_t cv;
  tide__job *queue, *queue_tail;
  tide__job *done, *done_tail;
  int ndone;                /* jobs in `done` */
  tide__job *dead;          /* finished or stopped jobs to free (through `next`) */
  tide__slab slab;          /* the memory of jobs made by tide__pool_job_new */
  jobmap jobs;
  uv_async_t *async;
  uv_prepare_t *prepare;    /* wakes sleeping workers once per loop iteration */
  slot **slots;             /* the active workers (never quarantined ones) */
  int nslots;
  tide__pool_config cfg;    /* strings owned by the pool */
  tide__job_cb on_done;
  void *data;
  int closing, refs;
  int busy, queued, quarantined, replaced, panicked;
  int sleeping;             /* workers waiting on `cv`: signal only when > 0 */
  int waking;               /* of those, signalled and not yet awake */
  int wake_due;             /* `prepare` will wake them (loop thread) */
  int in_flight;            /* loop thread only */
};

/* Empty chunks of job memory the pool keeps for the next burst (2 MB each,
 * slab.h): 100,000 trivial jobs in flight fill 13.  Kept, a later burst of
 * that size faults none of them in again; glibc's malloc gave such memory
 * back between runs, and every run faulted it in anew (~6,500 faults per
 * 100,000 jobs, ~20 us each on the VMs measured: bench/RESULTS.md). */
#define SPARE_CHUNKS 16

/* ===== jobs */

static char *dup_bytes(const char *s, size_t len) {
  char *p = malloc(len + 1);
  if (p) { if (len) memcpy(p, s, len); p[len] = '\0'; }
  return p;
}

/* The bytes a job with these lengths takes (0: too many). */
static size_t job_size(size_t fn_len, size_t args_len) {
  if (fn_len > SIZE_MAX / 2 || args_len > SIZE_MAX / 2 - fn_len - sizeof(tide__job) - 2) return 0;
  return sizeof(tide__job) + fn_len + 1 + args_len + 1;
}

/* Makes a fresh job in the job_size(fn_len, args_len) bytes at `job`. */
static tide__job *fill_job(tide__job *job, uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                           const char *args, size_t args_len) {
  memset(job, 0, sizeof *job);
  job->id = id;
  job->fn = (char *)(job + 1);               /* the bytes follow the job: NUL-terminated */
  if (fn_len) memcpy(job->fn, fn, fn_len);
  job->fn[fn_len] = '\0';
  job->fn_len = fn_len;
  job->fn_is_name = fn_is_name;
  job->args = job->fn + fn_len + 1;
  if (args_len) memcpy(job->args, args, args_len);
  job->args[args_len] = '\0';
  job->args_len = args_len;
  return job;
}

tide__job *tide__job_new(uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                         const char *args, size_t args_len) {
  size_t size = job_size(fn_len, args_len);
  tide__job *job = size ? malloc(size) : NULL;
  return job ? fill_job(job, id, fn, fn_len, fn_is_name, args, args_len) : NULL;
}

void tide__job_free(tide__job *job) {
  if (job == NULL) return;
  if (job->result != job->small) free(job->result);
  free(job->trace);
  free(job);
}

/* Loop thread (or pool_free). */
tide__job *tide__pool_job_new(tide__pool *p, uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                              const char *args, size_t args_len) {
  size_t size = job_size(fn_len, args_len);
  tide__job *job = size ? tide__slab_alloc(&p->slab, size) : NULL;
  if (job == NULL) return tide__job_new(id, fn, fn_len, fn_is_name, args, args_len);   /* too large, or no chunk */
  fill_job(job, id, fn, fn_len, fn_is_name, args, args_len);
  job->in_slab = 1;
  return job;
}

/* Loop thread (or pool_free). */
void tide__pool_job_free(tide__pool *p, tide__job *job) {
  if (job == NULL || !job->in_slab) { tide__job_free(job); return; }
  if (job->result != job->small) free(job->result);
  free(job->trace);
  tide__slab_free(&p->slab, job);
}

void tide__job_set_result(tide__job *job, tide_buf *buf) {
  if (job->result != job->small) free(job->result);
  job->result_len = buf->len;
  if (buf->len <= sizeof job->small) {
    if (buf->len) memcpy(job->small, buf->data, buf->len);
    job->result = job->small;
  } else {
    job->result = buf->data;
    tide__buf_init(buf);
  }
}

static void map_del(jobmap *m, uint64_t id);

/* ===== lists (doubly linked: a job leaves any place in O(1)) */

static void append(tide__job **head, tide__job **tail, tide__job *job) {
  job->next = NULL;
  job->prev = *tail;
  if (*tail) (*tail)->next = job; else *head = job;
  *tail = job;
}

static void unlink_job(tide__job **head, tide__job **tail, tide__job *job) {
  if (job->prev) job->prev->next = job->next; else *head = job->next;
  if (job->next) job->next->prev = job->prev; else *tail = job->prev;
  job->prev = job->next = NULL;
}

/* Frees a list of jobs, taking each out of the map (if m).  Loop thread. */
static void free_list(tide__pool *p, jobmap *m, tide__job *j) {
  while (j) {
    tide__job *next = j->next;
    if (m) map_del(m, j->id);
    tide__pool_job_free(p, j);
    j = next;
  }
}

/* Frees the jobs workers left on `dead`.  Loop thread, locked (or pool_free). */
static void bury(tide__pool *p) {
  tide__job *j = p->dead;
  p->dead = NULL;
  free_list(p, NULL, j);
}

/* ===== the map of jobs by id */

static size_t hash_id(uint64_t id) {
  id ^= id >> 33;
  id *= 0xff51afd7ed558ccdull;
  id ^= id >> 33;
  return (size_t)id;
}

/* Index of job `id` in the map, or of the empty slot where it would go. */
static size_t map_find(const jobmap *m, uint64_t id) {
  size_t mask = m->cap - 1, i = hash_id(id) & mask;
  while (m->slots[i] && m->slots[i]->id != id) i = (i + 1) & mask;
  return i;
}

static tide__job *map_get(const jobmap *m, uint64_t id) {
  return m->cap ? m->slots[map_find(m, id)] : NULL;
}

/* Adds a job (its id not in the map); 0, or -1 when out of memory. */
static int map_put(jobmap *m, tide__job *job) {
  if (2 * (m->count + 1) > m->cap) {                 /* at most half full */
    size_t cap = m->cap ? 2 * m->cap : 64;
    tide__job **slots = calloc(cap, sizeof *slots);
    if (slots == NULL) return -1;
    jobmap bigger = { slots, cap, m->count };
    for (size_t i = 0; i < m->cap; i++)
      if (m->slots[i]) slots[map_find(&bigger, m->slots[i]->id)] = m->slots[i];
    free(m->slots);
    *m = bigger;
  }
  m->slots[map_find(m, job->id)] = job;
  m->count++;
  return 0;
}

static void map_del(jobmap *m, uint64_t id) {
  if (m->cap == 0) return;
  size_t mask = m->cap - 1, i = map_find(m, id);
  if (m->slots[i] == NULL) return;
  m->slots[i] = NULL;
  m->count--;
  for (size_t j = (i + 1) & mask; m->slots[j]; j = (j + 1) & mask) {
    size_t home = hash_id(m->slots[j]->id) & mask;    /* may it move back to i? */
    if (((j - home) & mask) >= ((j - i) & mask)) {
      m->slots[i] = m->slots[j];
      m->slots[j] = NULL;
      i = j;
    }
  }
}

/* ===== the pool's lifetime */

static void pool_free(tide__pool *p) {
  bury(p);
  tide__slab_release(&p->slab);
  uv_mutex_destroy(&p->mu);
  uv_cond_destroy(&p->cv);
  free(p->jobs.slots);
  free((char *)p->cfg.path);
  free((char *)p->cfg.cpath);
  free((char *)p->cfg.init);
  free(p->slots);
  free(p);
}

/* Drops one reference; the last one frees the pool.  Called unlocked. */
static void pool_unref(tide__pool *p) {
  uv_mutex_lock(&p->mu);
  int last = --p->refs == 0;
  uv_mutex_unlock(&p->mu);
  if (last) pool_free(p);
}

/* ===== worker threads */

/* Takes the next job, waiting for one; NULL when the slot must stop.  Locked. */
static tide__job *take(tide__pool *p, slot *s) {
  while (p->queue == NULL && !p->closing) {
    p->sleeping++;
    uv_cond_wait(&p->cv, &p->mu);
    p->sleeping--;
    if (p->waking > 0) p->waking--;
  }
  if (p->closing) return NULL;
  tide__job *job = p->queue;
  unlink_job(&p->queue, &p->queue_tail, job);
  p->queued--;
  p->busy++;
  job->place = RUNNING;
  job->slot = s;
  s->current = job;
  atomic_store(&s->w.running, job->id);
  return job;
}

/* The job is finished: hand it to the loop, or drop it.  Locked. */
static void give_back(tide__pool *p, slot *s, tide__job *job) {
  atomic_store(&s->w.running, 0);
  s->current = NULL;
  job->slot = NULL;
  if (!s->quarantined) p->busy--;            /* a quarantined one stopped counting */
  p->panicked += s->w.panics;
  s->w.panics = 0;
  map_del(&p->jobs, job->id);
  if (job->abandoned || p->closing) {
    job->next = p->dead;                     /* the loop frees it (job memory is its own) */
    p->dead = job;
    if (p->closing) uv_cond_broadcast(&p->cv);   /* tide__pool_close waits for us */
    return;
  }
  job->place = DONE;
  int first = p->done == NULL;
  append(&p->done, &p->done_tail, job);
  p->ndone++;
  if (first) uv_async_send(p->async);        /* else a wake-up is due: it takes the whole list */
}

static void worker_main(void *arg) {
  slot *s = arg;
  tide__pool *p = s->pool;
  char err[256];
  tide__worker_open(&s->w, &p->cfg, err, sizeof err);   /* a failure fails each job */
  uv_mutex_lock(&p->mu);
  s->opening = 0;
  if (p->closing) uv_cond_broadcast(&p->cv);   /* tide__pool_close waits for us */
  tide__job *job;
  while (!s->quarantined && (job = take(p, s)) != NULL) {
    uv_mutex_unlock(&p->mu);
    tide__worker_run(&s->w, job);
    uv_mutex_lock(&p->mu);
    give_back(p, s, job);
  }
  int quarantined = s->quarantined;
  uv_mutex_unlock(&p->mu);
  if (quarantined) {                         /* nobody joins us: clean up */
    tide__worker_close(&s->w);
    free(s);
    pool_unref(p);
  }
}

/* Starts a worker thread (which makes its own state).  Loop thread. */
static slot *start_slot(tide__pool *p, int index, char *err, size_t errlen) {
  slot *s = calloc(1, sizeof *s);
  if (s == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  s->pool = p;
  s->w.index = index;
  s->w.cfg = &p->cfg;
  s->opening = 1;                            /* before the thread runs: it clears it, locked */
  if (uv_thread_create(&s->thread, worker_main, s) != 0) {
    snprintf(err, errlen, "cannot start thread %d", index);
    free(s);
    return NULL;
  }
  return s;
}

/* ===== the loop side */

/* Delivers finished jobs, TIDE_POOL_BATCH at a time.  on_done may close
 * the pool: a reference held for the wake-up keeps it allocated, and what
 * is left after a close is freed undelivered.  A job on_done could not
 * deliver goes back to `done`, for the next wake-up (at most
 * MAX_DELIVERIES tries: then it is dropped, said on stderr, and its task
 * waits until the loop reaps it); the jobs after it are delivered now.
 * A delivery fails when an allocation runs a __gc finalizer that raises,
 * and each such finalizer runs once: so a storm of them is outlasted, not
 * given up on.  At 100 tries, a storm of up to 20,000 raising finalizers
 * dropped a job in 1 run of 30-40 (finalizer_spec: its task then ended
 * "cancelled: stalled" instead of with its result); at 10,000, none in
 * 100 runs.  A failure that never ends is given up after 10,000 wake-ups
 * (test_threads: about 12 s, at some 1.2 ms each). */
#define MAX_DELIVERIES TIDE_POOL_MAX_DELIVERIES

static void on_async(uv_async_t *a) {
  tide__pool *p = a->data;
  tide__job *retry = NULL, *retry_tail = NULL;
  uv_mutex_lock(&p->mu);
  tide__job *job = p->done;
  int left = p->ndone;
  p->done = p->done_tail = NULL;
  p->ndone = 0;
  p->refs++;
  bury(p);
  uv_mutex_unlock(&p->mu);
  while (job && !p->closing) {
    int n = left < TIDE_POOL_BATCH ? left : TIDE_POOL_BATCH;
    int delivered = p->on_done(p, job, n, p->data);
    left -= delivered;
    for (int i = 0; i < delivered; i++) {
      tide__job *next = job->next;
      if (!p->closing) p->in_flight--;
      tide__pool_job_free(p, job);
      job = next;
    }
    if (delivered == n || p->closing) continue;
    tide__job *failed = job;                 /* not delivered: the others go on */
    job = job->next;
    left--;
    if (++failed->deliveries < MAX_DELIVERIES) {
      append(&retry, &retry_tail, failed);
    } else {
      fprintf(stderr, "tide: thread job %llu could not be delivered; dropped\n",
              (unsigned long long)failed->id);
      p->in_flight--;
      tide__pool_job_free(p, failed);
    }
  }
  free_list(p, NULL, job);                   /* closed: what is left goes undelivered */
  if (retry) {
    uv_mutex_lock(&p->mu);
    for (tide__job *j = retry, *next; j; j = next) {
      next = j->next;
      if (p->closing) { tide__pool_job_free(p, j); continue; }
      append(&p->done, &p->done_tail, j);
      p->ndone++;
    }
    if (p->done) uv_async_send(p->async);
    uv_mutex_unlock(&p->mu);
  }
  if (!p->closing && p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  pool_unref(p);
}

/* Once per loop iteration after a submit found workers asleep: wakes them
 * for the jobs queued since (see tide__pool_submit). */
static void on_prepare(uv_prepare_t *h) {
  tide__pool *p = h->data;
  uv_prepare_stop(h);
  uv_mutex_lock(&p->mu);
  p->wake_due = 0;
  if (p->queue && p->sleeping > p->waking) {
    p->waking = p->sleeping;
    uv_cond_broadcast(&p->cv);
  }
  uv_mutex_unlock(&p->mu);
}

static char *dup_str(const char *s) {
  return s ? dup_bytes(s, strlen(s)) : NULL;
}

tide__pool *tide__pool_start(uv_loop_t *loop, const tide__pool_config *cfg,
                             tide__job_cb on_done, void *data, char *err, size_t errlen) {
  if (cfg->threads < 1 || cfg->threads > TIDE_THREADS_MAX) {
    snprintf(err, errlen, "threads must be from 1 to %d (got %d)", TIDE_THREADS_MAX, cfg->threads);
    return NULL;
  }
  tide__pool *p = calloc(1, sizeof *p);
  if (p == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  if (uv_mutex_init(&p->mu) != 0) { free(p); snprintf(err, errlen, "cannot make a mutex"); return NULL; }
  if (uv_cond_init(&p->cv) != 0) {
    uv_mutex_destroy(&p->mu);
    free(p);
    snprintf(err, errlen, "cannot make a condition variable");
    return NULL;
  }
  p->cfg = (tide__pool_config){ cfg->threads, dup_str(cfg->path), dup_str(cfg->cpath),
                                dup_str(cfg->init), cfg->memory_limit, cfg->same_process };
  p->on_done = on_done;
  p->data = data;
  p->refs = 1;
  tide__slab_init(&p->slab, SPARE_CHUNKS);
  p->slots = calloc((size_t)cfg->threads, sizeof *p->slots);
  p->async = malloc(sizeof *p->async);
  p->prepare = malloc(sizeof *p->prepare);
  int rc = -1;
  if (p->slots == NULL || p->async == NULL || p->prepare == NULL || (cfg->path && !p->cfg.path) ||
      (cfg->cpath && !p->cfg.cpath) || (cfg->init && !p->cfg.init)) {
    snprintf(err, errlen, "out of memory");
  } else if ((rc = uv_async_init(loop, p->async, on_async)) != 0) {
    snprintf(err, errlen, "cannot watch for results: %s", uv_strerror(rc));
  }
  if (rc != 0) {
    free(p->async);
    free(p->prepare);
    pool_free(p);
    return NULL;
  }
  p->async->data = p;
  uv_unref((uv_handle_t *)p->async);
  uv_prepare_init(loop, p->prepare);         /* cannot fail */
  p->prepare->data = p;
  uv_unref((uv_handle_t *)p->prepare);       /* it never keeps the loop alive */
  for (int i = 0; i < cfg->threads; i++) {
    if ((p->slots[i] = start_slot(p, i + 1, err, errlen)) == NULL) {
      tide__pool_close(p);
      return NULL;
    }
    p->nslots++;
  }
  return p;
}

/* Sleeping workers are woken in runs of jobs, not one futex wake per job:
 * a submit that finds them asleep signals one when SIGNAL_AT jobs wait,
 * else leaves the wake-up to `prepare`, which runs once the loop's
 * iteration is done with its tasks (before it polls for I/O).  On a 2-core
 * machine the loop makes jobs slower than two workers run them, so each
 * submit found a worker asleep and signalled it: 21,000 futex calls on the
 * loop and 15,000 on each worker per 100,000 thread tasks (perf), against
 * 13,000 and 7,700 since. */
#define SIGNAL_AT 16

int tide__pool_submit(tide__pool *p, tide__job *job) {
  int due = 0;
  uv_mutex_lock(&p->mu);
  if (p->dead) bury(p);
  int rc = p->closing ? -1 : map_put(&p->jobs, job);
  if (rc == 0) {
    job->place = QUEUED;
    append(&p->queue, &p->queue_tail, job);
    p->queued++;
    if (p->sleeping > p->waking) {           /* a busy worker finds it anyway */
      if (p->queued >= SIGNAL_AT) {
        p->waking++;
        uv_cond_signal(&p->cv);
      } else if (!p->wake_due) {
        p->wake_due = due = 1;
      }
    }
  }
  uv_mutex_unlock(&p->mu);
  if (due) uv_prepare_start(p->prepare, on_prepare);
  if (rc != 0) return -1;
  if (p->in_flight++ == 0) uv_ref((uv_handle_t *)p->async);
  return 0;
}

int tide__pool_cancel(tide__pool *p, uint64_t id) {
  int rc = 0;
  uv_mutex_lock(&p->mu);
  tide__job *job = map_get(&p->jobs, id);
  if (job && job->place == QUEUED) {
    unlink_job(&p->queue, &p->queue_tail, job);
    map_del(&p->jobs, id);
    p->queued--;
    tide__pool_job_free(p, job);
    rc = 1;
  } else if (job && job->place == RUNNING && !job->abandoned) {
    slot *s = job->slot;
    job->abandoned = 1;                      /* stays in the map, for quarantine */
    tide__worker_interrupt(&s->w, id);
    rc = 2;
  }
  uv_mutex_unlock(&p->mu);
  if (rc && --p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  return rc;
}

/* A thread given up on may run on inside this library (its worker loop, the
 * stop hook) until the process ends, so the library must never be unloaded:
 * lua_close unloads the C modules it loaded (busted's os.exit(code, true)
 * does), and the thread would then jump into unmapped code.  Reopening the
 * object already loaded with RTLD_NODELETE pins it; the reference is kept.
 * (In the tide binary this names the executable: a no-op.)  Loop thread. */
static void keep_library_loaded(void) {
  static int pinned;
  if (pinned) return;
  pinned = 1;
  Dl_info info;
  if (dladdr((void *)keep_library_loaded, &info) != 0 && info.dli_fname != NULL)
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

int tide__pool_quarantine(tide__pool *p, uint64_t id) {
  uv_mutex_lock(&p->mu);
  tide__job *job = map_get(&p->jobs, id);
  slot *s = job && job->place == RUNNING ? job->slot : NULL;
  int i = 0, index = 0, was_abandoned = 0;
  while (s && i < p->nslots && p->slots[i] != s) i++;
  if (s && i < p->nslots && !s->quarantined) {
    index = s->w.index;                      /* s is the thread's own from here on */
    was_abandoned = job->abandoned;
    s->quarantined = 1;
    job->abandoned = 1;
    p->quarantined++;
    p->busy--;
    p->refs++;                               /* the thread holds the pool now */
    pthread_detach(s->thread);
    keep_library_loaded();
  } else {
    s = NULL;
  }
  uv_mutex_unlock(&p->mu);
  if (s == NULL) return 0;
  if (!was_abandoned && --p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  char err[256];
  slot *fresh = start_slot(p, index, err, sizeof err);   /* makes its state on its thread */
  uv_mutex_lock(&p->mu);
  if (fresh) {
    p->slots[i] = fresh;
    p->replaced++;
  } else {                                   /* the pool shrinks, rather than fail */
    p->slots[i] = p->slots[--p->nslots];
  }
  uv_mutex_unlock(&p->mu);
  if (fresh == NULL) fprintf(stderr, "tide: cannot replace a quarantined thread: %s\n", err);
  return 1;
}

void tide__pool_stats_get(tide__pool *p, tide__pool_stats *st) {
  uv_mutex_lock(&p->mu);
  st->size = p->nslots;
  st->busy = p->busy;
  st->idle = p->nslots - p->busy;
  st->quarantined = p->quarantined;
  st->replaced = p->replaced;
  st->panicked = p->panicked;
  st->queued = p->queued;
  st->in_flight = p->in_flight;
  uv_mutex_unlock(&p->mu);
}

static void free_async(uv_handle_t *h) {   /* the async and prepare handles */
  free(h);
}

/* Gives up on slot i, which may never return (stuck in compiled code or in
 * C): it is detached and retires by itself if it ever returns.  Locked. */
static void abandon_slot(tide__pool *p, int i) {
  slot *s = p->slots[i];
  s->quarantined = 1;
  p->refs++;                                 /* the thread holds the pool now */
  pthread_detach(s->thread);
  keep_library_loaded();
  p->slots[i] = NULL;
}

/* True while some worker still makes its state or runs a job.  Locked. */
static int workers_busy(tide__pool *p) {
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i] && (p->slots[i]->opening || p->slots[i]->current)) return 1;
  return 0;
}

void tide__pool_close(tide__pool *p) {
  uv_mutex_lock(&p->mu);
  p->closing = 1;
  uv_cond_broadcast(&p->cv);
  for (int i = 0; i < p->nslots; i++) {      /* ask every worker to stop what it does */
    slot *s = p->slots[i];
    if (s->current) {
      s->current->abandoned = 1;
      tide__worker_interrupt(&s->w, s->current->id);
    } else if (s->opening) {
      tide__worker_interrupt(&s->w, TIDE_WORKER_OPENING);
    }
  }
  free_list(p, &p->jobs, p->queue);          /* the running jobs stay in the map */
  free_list(p, NULL, p->done);
  bury(p);
  p->queue = p->queue_tail = p->done = p->done_tail = NULL;
  p->ndone = 0;
  /* Workers stop at their next check (a job, or thread_init); those still
   * at it after TIDE_POOL_CLOSE_WAIT_MS (compiled code runs no hook, C code
   * none either) are left to retire by themselves. */
  uint64_t deadline = uv_hrtime() + (uint64_t)TIDE_POOL_CLOSE_WAIT_MS * 1000000u;
  for (uint64_t now = uv_hrtime(); workers_busy(p) && now < deadline; now = uv_hrtime())
    uv_cond_timedwait(&p->cv, &p->mu, deadline - now);
  int left = 0;
  for (int i = 0; i < p->nslots; i++) {
    slot *s = p->slots[i];
    if (s && (s->opening || s->current)) { abandon_slot(p, i); left++; }
  }
  uv_mutex_unlock(&p->mu);
  if (left)
    fprintf(stderr, "tide: %d thread%s did not stop within %d ms of the pool's close "
            "(stuck in compiled code or in C); left to end by %s\n",
            left, left == 1 ? "" : "s", TIDE_POOL_CLOSE_WAIT_MS, left == 1 ? "itself" : "themselves");
  for (int i = 0; i < p->nslots; i++) {      /* the others have exited: join them */
    slot *s = p->slots[i];
    if (s == NULL) continue;
    uv_thread_join(&s->thread);
    tide__worker_close(&s->w);
    free(s);
  }
  p->nslots = 0;
  tide__close((uv_handle_t *)p->async, free_async);
  tide__close((uv_handle_t *)p->prepare, free_async);
  pool_unref(p);
}
