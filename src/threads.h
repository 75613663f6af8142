/* threads.h — a pool of OS threads, each running jobs in a LuaJIT state of its own.
 *
 * A job is a function (a "module.function" name, or Lua bytecode) and its
 * arguments, both as bytes; its result comes back as bytes.  Values cross
 * only as copies (codec.h): a Lua state is touched by one thread only.
 *
 * The loop thread submits jobs; workers take them in order; finished jobs
 * are queued back and `on_done` runs on the loop thread for them, in
 * batches (woken by a uv_async_t: one wake-up takes every job finished by
 * then).  Each worker creates its Lua state (and runs thread_init)
 * on its own thread, so starting a pool or replacing a thread never holds
 * the loop.  A running job can be asked to stop: the worker's debug hook
 * raises "cancelled" at its next check.  LuaJIT runs no hooks inside
 * compiled traces, so a job may not stop; tide__pool_quarantine then gives
 * up on its worker: a replacement starts at once, so the pool keeps its size,
 * and the stuck worker retires by itself if it ever returns (its result is
 * dropped).  At close, every worker is asked to stop (its job, or its
 * thread_init) and joined; one still running after TIDE_POOL_CLOSE_WAIT_MS
 * is abandoned (detached: it frees itself if it ever returns).
 * Every job is found by its id in O(1) (a hash of the jobs in the pool),
 * so cancelling many queued jobs costs no scan of the queue.
 *
 * Unless said otherwise, call these only from the loop thread.
 */
#ifndef TIDE_THREADS_H
#define TIDE_THREADS_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "codec.h"

typedef enum { TIDE_JOB_OK = 0, TIDE_JOB_ERROR = 1 } tide__job_status;

#define TIDE_THREADS_MAX 1024  /* most threads a pool may have */
#define TIDE_POOL_CLOSE_WAIT_MS 1000  /* how long close waits for workers to stop */

#define TIDE_JOB_SMALL 64       /* results this short are kept in the job itself */

typedef struct tide__job {
  uint64_t id;                 /* chosen by the submitter, unique while live */
  uint32_t tag;                /* the submitter's, handed back with the job (0 by default) */
  char *fn;                    /* "module.function" or bytecode (in the job's own block) */
  size_t fn_len;
  int fn_is_name;
  int in_slab;                 /* from its pool's slab (tide__pool_job_new), not malloc */
  char *args;                  /* codec bytes of the argument table (ditto) */
  size_t args_len;
  /* filled by the worker */
  tide__job_status status;
  char *result;                /* codec bytes: { n = N, ... } on ok, the error value on error; */
  size_t result_len;           /* malloc'd, or `small` (tide__job_set_result) */
  char small[TIDE_JOB_SMALL];
  char *trace;                 /* error message with the thread's traceback  */
  /* pool bookkeeping */
  int abandoned;               /* cancelled or timed out: result is dropped */
  int place;                   /* where it is (threads.c)                   */
  int deliveries;              /* failed attempts to deliver it             */
  void *slot;                  /* the worker running it                     */
  struct tide__job *prev, *next;
} tide__job;

typedef struct tide__pool tide__pool;

/* Most finished jobs handed to one call of the delivery callback. */
#define TIDE_POOL_BATCH 1024

/* A finished job whose delivery failed this many times is dropped (see
 * on_async in threads.c: why so many). */
#define TIDE_POOL_MAX_DELIVERIES 10000

/* Delivers n finished jobs (loop thread): `first` and the n - 1 jobs after
 * it through `next` (1 <= n <= TIDE_POOL_BATCH), in order.  Returns how
 * many of them, from the first, were delivered: n, or fewer when the job
 * after those could not be (the Lua call failed before it changed anything
 * for that job): the pool keeps that job and tries it again at the next
 * wake-up, and hands the ones after it over in a new call.  It may not
 * change the list. */
typedef int (*tide__job_cb)(tide__pool *pool, tide__job *first, int n, void *data);

typedef struct tide__pool_config {
  int threads;                 /* 1 .. TIDE_THREADS_MAX                     */
  const char *path, *cpath;    /* package.path / cpath for worker states    */
  const char *init;            /* module each worker requires once, or NULL */
  size_t memory_limit;         /* bytes per worker state; 0: no limit       */
  int same_process;            /* 1: values stay in this process, and cross by
                                  tide__encode_local and tide__decode_local
                                  (codec.h); 0 (a process child's): tide's
                                  codec alone, made for bytes from outside  */
} tide__pool_config;

typedef struct tide__pool_stats {
  int size, busy, idle, quarantined, replaced;
  int panicked;                /* worker states discarded after a panic     */
  int queued;                  /* jobs waiting for a worker                 */
  int in_flight;               /* submitted, not yet delivered or abandoned */
} tide__pool_stats;

/* Starts the pool on `loop`.  on_done(pool, job, data) runs on the loop
 * thread for each finished job that was not abandoned; the pool frees the
 * job once it was delivered.  The threads start at once; each makes its
 * state before its first job (a state that cannot be made, or whose init
 * fails, fails every job it is given, with the reason).  NULL with a
 * message in err when the threads cannot start. */
tide__pool *tide__pool_start(uv_loop_t *loop, const tide__pool_config *cfg,
                             tide__job_cb on_done, void *data, char *err, size_t errlen);

/* Allocates a job with copies of fn and args, all in one block (NULL when
 * out of memory). */
tide__job *tide__job_new(uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                         const char *args, size_t args_len);
void tide__job_free(tide__job *job);

/* The same, from the pool's own memory (its slab, slab.h: chunks kept from
 * burst to burst, backed by huge pages where the kernel has them; malloc
 * for a job too large for it).  Such a job is submitted to this pool, or
 * freed with tide__pool_job_free; never with tide__job_free. */
tide__job *tide__pool_job_new(tide__pool *pool, uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                              const char *args, size_t args_len);
void tide__pool_job_free(tide__pool *pool, tide__job *job);

/* Makes buf's bytes the job's result (any result it had is freed): copied
 * into the job when short, so that buf keeps its memory for the next one;
 * else taken over, and buf is left empty. */
void tide__job_set_result(tide__job *job, tide_buf *buf);

/* Queues a job (the pool owns it from now on).  0, or -1 once closing. */
int tide__pool_submit(tide__pool *pool, tide__job *job);

/* Gives up on job `id`: a queued job is dropped (1); a running one is
 * asked to stop and its result will be dropped (2); 0 when unknown, given
 * up on already, or finished (then it is still delivered: the caller drops
 * the late result).  O(1). */
int tide__pool_cancel(tide__pool *pool, uint64_t id);

/* If job `id` is still running (it ignored the stop request), quarantines
 * its worker and starts a replacement.  1 when it did, else 0. */
int tide__pool_quarantine(tide__pool *pool, uint64_t id);

void tide__pool_stats_get(tide__pool *pool, tide__pool_stats *st);

/* Stops the pool: queued jobs are dropped, running jobs and thread_init
 * are asked to stop, and every worker that stops within
 * TIDE_POOL_CLOSE_WAIT_MS is joined (its state closed); the others are
 * abandoned, said on stderr.  The async handle is closed.  The pool is freed
 * once the last abandoned worker is gone (maybe never: a stuck thread).
 * Blocks the calling (loop) thread for at most TIDE_POOL_CLOSE_WAIT_MS. */
void tide__pool_close(tide__pool *pool);

#endif
