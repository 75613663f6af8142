/* watchdog.h — a thread that watches the loop thread's calls into Lua, for stalls and for signals nobody serves.
 *
 * No Lua here.  A coroutine task that never yields holds the loop thread:
 * timers, timeouts and signals wait behind it.  The loop thread marks each
 * call into Lua (tide__watchdog_enter / _leave: two atomic stores and a
 * clock read per call, not per task), and a watchdog thread of its own,
 * with a libuv loop of its own, looks every stall/5 ms (10..200 ms):
 *
 *   - a call that has run `stall` ms is a stall: the watchdog sends SIGURG
 *     to the loop thread, once per call, and `on_poke` runs there, in the
 *     signal handler (the binding sets a one-shot debug hook, as luajit's
 *     own SIGINT handler does; the hook names the task and reports it).  A
 *     hook cannot reach JIT-compiled code or a C function: such a stall is
 *     reported when the call ends (tide__watchdog_leave says so), or never;
 *   - while signals are watched (tide__watchdog_signals), SIGINT and SIGTERM
 *     reach the watchdog's loop too (libuv tells every loop that watches a
 *     signal).  When `grace` ms after the first one the loop thread is still
 *     blocked (inside one call for at least `stall` ms), or at a second
 *     signal while it is, the watchdog writes why on stderr and ends the
 *     process with _exit(128 + signal): 130 or 143.
 *
 * With stall = 0 the watchdog does neither.  SIGURG's handler is installed
 * when the first watchdog starts and chains to the one it replaced.
 *
 * Unless said otherwise, call these only from the loop thread.
 */
#ifndef TIDE_WATCHDOG_H
#define TIDE_WATCHDOG_H

#include <stdint.h>

typedef struct tide__watchdog tide__watchdog;

/* Runs in a signal handler on the loop thread: async-signal-safe work only. */
typedef void (*tide__poke_cb)(void *data);

/* A watchdog with stall 1000 ms and grace 5000 ms; its thread starts at the
 * first tide__watchdog_enter.  NULL when out of memory. */
tide__watchdog *tide__watchdog_new(tide__poke_cb on_poke, void *data);

/* Stops and joins the thread, then frees w (NULL: nothing). */
void tide__watchdog_free(tide__watchdog *w);

/* A call into Lua begins (nested calls count as one).  The first call
 * records the calling thread as the loop thread and starts the watchdog. */
void tide__watchdog_enter(tide__watchdog *w);

/* The call ends.  Returns how long it ran (ms, >= 1) when it was a stall
 * that no hook reported, so the caller can report it; else 0. */
uint64_t tide__watchdog_leave(tide__watchdog *w);

/* True while a call into Lua is under way (between enter and leave). */
int tide__watchdog_in_call(const tide__watchdog *w);

/* Sets the stall time (0: off) and the grace period, in ms; a negative
 * value leaves that one as it is. */
void tide__watchdog_configure(tide__watchdog *w, double stall_ms, double grace_ms);

/* Watches SIGINT and SIGTERM (on) or stops (off, and forgets a signal
 * seen).  Only while the loop watches them too: the watchdog's uv_signal
 * handles must never be the only ones, or a signal would stop killing. */
void tide__watchdog_signals(tide__watchdog *w, int on);

/* From the hook that on_poke set: claims the report of the stall now under
 * way.  Returns its length so far in ms (>= 1), or 0 when there is nothing
 * to report (it ended, or was reported). */
uint64_t tide__watchdog_claim(tide__watchdog *w);

/* Keeps a line naming what held the loop, for the exit message. */
void tide__watchdog_note(tide__watchdog *w, const char *text);

#endif
