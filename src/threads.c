/* threads.c — the pool of worker threads: queues, hand-off to the loop, quarantine (see threads.h). */
#include "threads.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

/* One worker thread.  `current` and `quarantined` are guarded by the pool's
 * mutex; the worker's Lua state is its own thread's alone. */
typedef struct slot {
  tide__worker w;
  uv_thread_t thread;
  tide__pool *pool;
  tide__job *current;
  int quarantined;          /* given up on: retires (and frees itself) when it returns */
} slot;

/* Invariants, under `mu`: every job is in exactly one place — `queue`, a
 * slot's `current`, `done`, or handed to on_done/freed; `refs` counts the
 * loop side (until close) plus each quarantined thread still running, and
 * the last to drop it frees the pool. */
struct tide__pool {
  uv_mutex_t mu;
  uv_cond_t cv;
  tide__job *queue, *queue_tail;
  tide__job *done, *done_tail;
  uv_async_t *async;
  slot **slots;             /* the active workers (never quarantined ones) */
  int nslots;
  tide__pool_config cfg;    /* strings owned by the pool */
  tide__job_cb on_done;
  void *data;
  int closing, refs;
  int busy, queued, quarantined, replaced;
  int sleeping;             /* workers waiting on `cv`: signal only when > 0 */
  int in_flight;            /* loop thread only */
};

/* ===== jobs */

static char *dup_bytes(const char *s, size_t len) {
  char *p = malloc(len + 1);
  if (p) { if (len) memcpy(p, s, len); p[len] = '\0'; }
  return p;
}

tide__job *tide__job_new(uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                         const char *args, size_t args_len) {
  tide__job *job = calloc(1, sizeof *job);
  if (job == NULL) return NULL;
  job->id = id;
  job->fn = dup_bytes(fn, fn_len);
  job->fn_len = fn_len;
  job->fn_is_name = fn_is_name;
  job->args = dup_bytes(args, args_len);
  job->args_len = args_len;
  if (job->fn == NULL || job->args == NULL) { tide__job_free(job); return NULL; }
  return job;
}

void tide__job_free(tide__job *job) {
  if (job == NULL) return;
  free(job->fn);
  free(job->args);
  free(job->result);
  free(job->trace);
  free(job);
}

static void append(tide__job **head, tide__job **tail, tide__job *job) {
  job->next = NULL;
  if (*tail) (*tail)->next = job; else *head = job;
  *tail = job;
}

/* Unlinks the job with `id` from a list; returns it or NULL. */
static tide__job *unlink_id(tide__job **head, tide__job **tail, uint64_t id) {
  tide__job *prev = NULL;
  for (tide__job *j = *head; j; prev = j, j = j->next) {
    if (j->id != id) continue;
    if (prev) prev->next = j->next; else *head = j->next;
    if (*tail == j) *tail = prev;
    return j;
  }
  return NULL;
}

static void free_list(tide__job *j) {
  while (j) { tide__job *next = j->next; tide__job_free(j); j = next; }
}

/* ===== the pool's lifetime */

static void pool_free(tide__pool *p) {
  uv_mutex_destroy(&p->mu);
  uv_cond_destroy(&p->cv);
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
  }
  if (p->closing) return NULL;
  tide__job *job = p->queue;
  p->queue = job->next;
  if (p->queue == NULL) p->queue_tail = NULL;
  p->queued--;
  p->busy++;
  s->current = job;
  atomic_store(&s->w.running, job->id);
  lua_sethook(s->w.L, NULL, 0, 0);          /* a stale stop request from before */
  return job;
}

/* The job is finished: hand it to the loop, or drop it.  Locked. */
static void give_back(tide__pool *p, slot *s, tide__job *job) {
  atomic_store(&s->w.running, 0);
  s->current = NULL;
  if (!s->quarantined) p->busy--;            /* a quarantined one stopped counting */
  if (job->abandoned || p->closing) {
    tide__job_free(job);
    return;
  }
  append(&p->done, &p->done_tail, job);
  uv_async_send(p->async);
}

static void worker_main(void *arg) {
  slot *s = arg;
  tide__pool *p = s->pool;
  uv_mutex_lock(&p->mu);
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

/* Creates a worker with its state and starts its thread.  Loop thread. */
static slot *start_slot(tide__pool *p, int index, char *err, size_t errlen) {
  slot *s = calloc(1, sizeof *s);
  if (s == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  s->pool = p;
  s->w.index = index;
  if (tide__worker_open(&s->w, &p->cfg, err, errlen) != 0) { free(s); return NULL; }
  if (uv_thread_create(&s->thread, worker_main, s) != 0) {
    snprintf(err, errlen, "cannot start thread %d", index);
    tide__worker_close(&s->w);
    free(s);
    return NULL;
  }
  return s;
}

/* ===== the loop side */

/* Delivers finished jobs.  on_done may close the pool: a reference held
 * for the batch keeps it allocated, and what is left after a close is freed
 * undelivered. */
static void on_async(uv_async_t *a) {
  tide__pool *p = a->data;
  uv_mutex_lock(&p->mu);
  tide__job *job = p->done;
  p->done = p->done_tail = NULL;
  p->refs++;
  uv_mutex_unlock(&p->mu);
  while (job) {
    tide__job *next = job->next;
    if (!p->closing) {
      p->in_flight--;
      p->on_done(p, job, p->data);
    }
    tide__job_free(job);
    job = next;
  }
  if (!p->closing && p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  pool_unref(p);
}

static char *dup_str(const char *s) {
  return s ? dup_bytes(s, strlen(s)) : NULL;
}

tide__pool *tide__pool_start(uv_loop_t *loop, const tide__pool_config *cfg,
                             tide__job_cb on_done, void *data, char *err, size_t errlen) {
  tide__pool *p = calloc(1, sizeof *p);
  if (p == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  p->cfg = (tide__pool_config){ cfg->threads, dup_str(cfg->path), dup_str(cfg->cpath),
                                dup_str(cfg->init), cfg->memory_limit };
  p->on_done = on_done;
  p->data = data;
  p->refs = 1;
  p->slots = calloc((size_t)cfg->threads, sizeof *p->slots);
  p->async = malloc(sizeof *p->async);
  uv_mutex_init(&p->mu);
  uv_cond_init(&p->cv);
  if (p->slots == NULL || p->async == NULL) {
    snprintf(err, errlen, "out of memory");
    free(p->async);
    pool_free(p);
    return NULL;
  }
  uv_async_init(loop, p->async, on_async);
  p->async->data = p;
  uv_unref((uv_handle_t *)p->async);
  for (int i = 0; i < cfg->threads; i++) {
    if ((p->slots[i] = start_slot(p, i + 1, err, errlen)) == NULL) {
      tide__pool_close(p);
      return NULL;
    }
    p->nslots++;
  }
  return p;
}

int tide__pool_submit(tide__pool *p, tide__job *job) {
  uv_mutex_lock(&p->mu);
  int closing = p->closing;
  if (!closing) {
    append(&p->queue, &p->queue_tail, job);
    p->queued++;
    if (p->sleeping > 0) uv_cond_signal(&p->cv);   /* a busy worker finds it anyway */
  }
  uv_mutex_unlock(&p->mu);
  if (closing) return -1;
  if (p->in_flight++ == 0) uv_ref((uv_handle_t *)p->async);
  return 0;
}

static slot *running(tide__pool *p, uint64_t id) {
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i]->current && p->slots[i]->current->id == id) return p->slots[i];
  return NULL;
}

int tide__pool_cancel(tide__pool *p, uint64_t id) {
  int rc = 0;
  uv_mutex_lock(&p->mu);
  tide__job *job = unlink_id(&p->queue, &p->queue_tail, id);
  if (job) {
    p->queued--;
    tide__job_free(job);
    rc = 1;
  } else if ((job = unlink_id(&p->done, &p->done_tail, id)) != NULL) {
    tide__job_free(job);                     /* finished, not yet delivered */
    rc = 2;
  } else {
    slot *s = running(p, id);
    if (s) {
      s->current->abandoned = 1;
      tide__worker_interrupt(&s->w, id);
      rc = 2;
    }
  }
  uv_mutex_unlock(&p->mu);
  if (rc && --p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  return rc;
}

int tide__pool_quarantine(tide__pool *p, uint64_t id) {
  uv_mutex_lock(&p->mu);
  slot *s = running(p, id);
  int i = 0, index = 0, was_abandoned = 0;
  if (s) {
    while (p->slots[i] != s) i++;
    index = s->w.index;                      /* s is the thread's own from here on */
    was_abandoned = s->current->abandoned;
    s->quarantined = 1;
    s->current->abandoned = 1;
    p->quarantined++;
    p->busy--;
    p->refs++;                               /* the thread holds the pool now */
    pthread_detach(s->thread);
  }
  uv_mutex_unlock(&p->mu);
  if (s == NULL) return 0;
  if (!was_abandoned && --p->in_flight == 0) uv_unref((uv_handle_t *)p->async);
  char err[256];
  slot *fresh = start_slot(p, index, err, sizeof err);
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
  st->queued = p->queued;
  st->in_flight = p->in_flight;
  uv_mutex_unlock(&p->mu);
}

static void free_async(uv_handle_t *h) {
  free(h);
}

void tide__pool_close(tide__pool *p) {
  uv_mutex_lock(&p->mu);
  p->closing = 1;
  uv_cond_broadcast(&p->cv);
  for (int i = 0; i < p->nslots; i++) {      /* busy workers are abandoned */
    slot *s = p->slots[i];
    if (s->current == NULL) continue;
    s->quarantined = 1;
    s->current->abandoned = 1;
    tide__worker_interrupt(&s->w, s->current->id);
    p->busy--;
    p->refs++;
    pthread_detach(s->thread);
    p->slots[i] = NULL;
  }
  free_list(p->queue);
  free_list(p->done);
  p->queue = p->queue_tail = p->done = p->done_tail = NULL;
  uv_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nslots; i++) {      /* idle ones exit: join them */
    slot *s = p->slots[i];
    if (s == NULL) continue;
    uv_thread_join(&s->thread);
    tide__worker_close(&s->w);
    free(s);
  }
  p->nslots = 0;
  uv_close((uv_handle_t *)p->async, free_async);
  pool_unref(p);
}
