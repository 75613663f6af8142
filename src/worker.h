/* worker.h — the Lua side of a pool thread: its state, and running one job in it.
 *
 * Each worker thread owns one tide__worker: a LuaJIT state with its own
 * allocator (so a memory limit turns into a catchable "not enough memory"),
 * the package paths of the pool, the module named by `init`, and a small
 * thread-side `tide` module (now, sleep, check, thread).  Only the worker's
 * own thread touches the state, except tide__worker_interrupt.
 */
#ifndef TIDE_WORKER_H
#define TIDE_WORKER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "threads.h"

typedef struct tide__worker {
  lua_State *L;
  int index;                       /* 1-based, for the thread-side module     */
  size_t mem, limit;               /* bytes allocated by L; 0: no limit       */
  _Atomic uint64_t running;        /* id of the job being run, 0 when idle    */
  _Atomic uint64_t stop;           /* id of a job asked to stop               */
  char init_error[256];            /* why `init` failed, or ""                */
} tide__worker;

/* Creates the worker's state.  0, or -1 with a message in err. */
int tide__worker_open(tide__worker *w, const tide__pool_config *cfg, char *err, size_t errlen);
void tide__worker_close(tide__worker *w);

/* Runs the job in the worker's state and fills in its status, result and
 * trace.  Worker thread only. */
void tide__worker_run(tide__worker *w, tide__job *job);

/* Asks the job now running to stop at its next hook (any thread).  A hook
 * that finds another job running removes itself. */
void tide__worker_interrupt(tide__worker *w, uint64_t id);

#endif
