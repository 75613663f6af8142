/* worker.h — the Lua side of a pool thread: its state, and running one job in it.
 *
 * Each worker thread owns one tide__worker: a LuaJIT state with its own
 * allocator (so a memory limit turns into a catchable "not enough memory"),
 * the package paths of the pool, the module named by `init`, and a small
 * thread-side `tide` module (now, sleep, check, log, thread).  Only the
 * worker's own thread touches the state; other threads only store into the
 * atomic `stop` (tide__worker_interrupt).
 *
 * Every Lua call on the state happens inside one protected call (opening
 * it, and running each job), so no error -- out of memory, a __gc finalizer
 * that raises -- can reach the panic function.  Should one ever do (a bug),
 * the panic function jumps back to tide__worker_run: the job gets an
 * `error` outcome saying so, and the state is discarded and made again for
 * the next job.
 */
#ifndef TIDE_WORKER_H
#define TIDE_WORKER_H

#include <setjmp.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "threads.h"

/* The stop hook runs every this many interpreted instructions. */
#define TIDE_STOP_CHECK_INSTRUCTIONS 10000

typedef struct tide__worker {
  lua_State *L;                    /* NULL until opened, and after a panic    */
  int index;                       /* 1-based, for the thread-side module     */
  const tide__pool_config *cfg;    /* the pool's (outlives the worker)        */
  size_t mem, limit;               /* bytes allocated by L; 0: no limit       */
  _Atomic uint64_t running;        /* id of the job being run, 0 when idle    */
  _Atomic uint64_t stop;           /* id of a job asked to stop               */
  char init_error[256];            /* why the state or `init` failed, or ""   */
  int body_ref, job_ref, handler_ref;  /* registry: the protected functions */
  jmp_buf *panic_at;               /* where a panic returns to, during a job  */
  char panic_msg[128];
  int panics;                      /* states discarded after a panic          */
  int nfns;                        /* functions in the state's cache          */
  tide_buf out;                    /* where results are encoded (kept: reused) */
} tide__worker;

/* Creates the worker's state (worker thread).  0, or -1 with a message in
 * err (and in w->init_error).  A failing `init` is not a failure here: it
 * is kept in w->init_error, and every job then fails with it. */
int tide__worker_open(tide__worker *w, const tide__pool_config *cfg, char *err, size_t errlen);
void tide__worker_close(tide__worker *w);

/* Runs the job in the worker's state (opening one first if there is none)
 * and fills in its status, result and trace.  Worker thread only. */
void tide__worker_run(tide__worker *w, tide__job *job);

/* The id `running` holds while the worker makes its state (thread_init):
 * interrupting it stops a slow or looping init at its next check. */
#define TIDE_WORKER_OPENING UINT64_MAX

/* Asks job `id`, if it is the one running, to stop (any thread): it raises
 * "cancelled" at its next check -- the hook, tide.sleep, tide.check.
 * Threading rule: this only stores into an atomic.  The worker installed
 * its stop hook itself, on its own thread, when it made its state; no other
 * thread ever calls lua_sethook on a worker's state (LuaJIT does not make
 * that safe: the hook fields and the dispatch table are the state's, and
 * the JIT may be recording a trace). */
void tide__worker_interrupt(tide__worker *w, uint64_t id);

#endif
