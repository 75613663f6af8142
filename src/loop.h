/* loop.h — tide's event loop: the libuv handles that drive ticks, timers and signals.
 *
 * No Lua here.  A tide loop runs on a uv_loop_t that it owns or that the host
 * lends it.  It keeps three kinds of handle:
 *   - `wake`, a uv_timer_t armed for the earliest deadline in `timers`;
 *   - `idle`, a uv_idle_t that is active while work is runnable, so the loop
 *     polls for I/O without blocking and then ticks again;
 *   - two uv_signal_t (SIGINT, SIGTERM), unreferenced, so they never keep the
 *     loop alive by themselves.
 * Each time one of them fires, the loop calls `on_tick` (or `on_signal`), and
 * the callback tells it, through tide__loop_after_tick, whether work remains.
 *
 * Only call these from the loop thread.
 */
#ifndef TIDE_LOOP_H
#define TIDE_LOOP_H

#include <uv.h>

#include "timers.h"

typedef struct tide__loop tide__loop;
typedef void (*tide__tick_cb)(tide__loop *loop);
typedef void (*tide__signal_cb)(tide__loop *loop, int signum);

struct tide__loop {
  uv_loop_t *uv;              /* the loop the handles live on             */
  uv_loop_t own;              /* storage when tide owns its loop          */
  int owns_uv;                /* 1 when uv == &own                        */
  uv_timer_t wake;
  uv_idle_t idle;
  uv_signal_t sigint, sigterm;
  tide__timers timers;
  uint64_t armed;             /* deadline `wake` is armed for; 0: disarmed */
  int open_handles;           /* handles not yet closed                   */
  int running;                /* nesting depth of tide__loop_run          */
  int leak;                   /* a failed init left a handle closing on the host's loop */
  int virtual_on;             /* the virtual clock is on (tide.testing)   */
  uint64_t virtual_now;       /* its time, in ns                          */
  tide__tick_cb on_tick;
  tide__signal_cb on_signal;
  void (*closed)(tide__loop *);  /* runs once every handle is closed      */
  void *data;                 /* the binding's state                      */
};

/* Initialises loop on `uv` (NULL: a loop of its own).  0 or a UV_E* code;
 * after a failure, `leak` says the struct must not be freed (a handle of
 * it is still closing on the host's loop). */
int tide__loop_init(tide__loop *loop, uv_loop_t *uv, tide__tick_cb on_tick,
                    tide__signal_cb on_signal, void *data);

/* Starts closing every handle; `done` runs (on the loop) once all are closed,
 * and may free the struct.  With an owned loop, also runs it until then and
 * closes it: returns the result of uv_loop_close (0: nothing was left open). */
int tide__loop_close(tide__loop *loop, void (*done)(tide__loop *));

/* Monotonic clock in nanoseconds (the virtual one while it is on). */
uint64_t tide__loop_now(const tide__loop *loop);

/* The virtual clock, for tests (each loop its own): on, now() stops moving by itself and
 * timers fire only when tide__loop_set_now moves it past them (forward only;
 * it kicks the loop so that a tick fires what became due). */
void tide__loop_set_virtual(tide__loop *loop, int on);
int tide__loop_is_virtual(const tide__loop *loop);
void tide__loop_set_now(tide__loop *loop, uint64_t now);

/* Timers, in ns of tide__loop_now.  start returns a key >= 1 or -1 (ENOMEM). */
int64_t tide__loop_timer_start(tide__loop *loop, uint64_t deadline);
int tide__loop_timer_cancel(tide__loop *loop, int64_t key);

/* Marks work as runnable: the loop ticks again without blocking. */
void tide__loop_kick(tide__loop *loop);

/* Called by on_tick's owner after a tick: `more` says whether work is still
 * runnable; re-arms `wake` for the earliest timer. */
void tide__loop_after_tick(tide__loop *loop, int more);

/* Watches SIGINT and SIGTERM (on != 0) or stops watching them. */
int tide__loop_signals(tide__loop *loop, int on);

/* uv_close(h, cb), unless h is closing or closed already: a host that closes
 * every handle on its loop (uv_walk, a common way to shut down) closes
 * tide's too, and a second uv_close aborts the process on libuv's assertion.
 * 1 when it closed h; 0 when it did not: cb will not run for h, and h's
 * memory must be kept (the host's close callback may still be due), which
 * its owner does by never seeing its count of closed handles reach zero. */
static inline int tide__close(uv_handle_t *h, uv_close_cb cb) {
  if (uv_is_closing(h)) return 0;
  uv_close(h, cb);
  return 1;
}

/* True when a handle of tide's own (its timer, idle, signals) was closed by
 * someone else: the host closed the handles on its loop before tide_close. */
int tide__loop_lost(const tide__loop *loop);

/* Runs the loop (uv_run with `mode`); returns uv_run's result. */
int tide__loop_run(tide__loop *loop, uv_run_mode mode);

/* Number of active handles that tide holds (ticks still to come). */
int tide__loop_active(const tide__loop *loop);

/* Sets SIGPIPE to ignored, unless the host set a handler of its own: a write
 * to a pipe or socket whose reader is gone then fails with EPIPE (libuv
 * reports it to the write's callback) instead of killing the process.
 * Called by what writes to peers that may vanish: process pools, HTTP
 * servers.  Any thread. */
void tide__ignore_sigpipe(void);

#endif
