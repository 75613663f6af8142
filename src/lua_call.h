/* lua_call.h — calling Lua from a libuv callback: one protected call, one traceback handler, one error sink.
 *
 * No Lua frame catches an error raised in a libuv callback: it would unwind
 * through libuv's C frames into whatever lua_pcall happens to sit further
 * down the C stack (or panic).  And any allocation may raise: it may run a
 * step of the collector, the step may run a __gc finalizer, and LuaJIT
 * releases before 2023-04 (Debian 12's among them) rethrow a finalizer's
 * error from the allocation that ran it.  So, from a libuv callback:
 *
 *   - nothing is pushed before the protected call but values taken from the
 *     registry (the handler, the trampoline, the function: lua_rawgeti and
 *     lua_rawget of a light userdata key copy a value and allocate nothing)
 *     and light userdata;
 *   - the arguments are pushed by a `push` function that runs inside the
 *     protected call;
 *   - a failure goes, with its traceback, to the error sink: a Lua function
 *     the engine registers (core.set_reporter, lua/tide/engine/log.lua),
 *     called protected in the same way; stderr is the last resort.
 *
 * The callback thread's stack is checked once, when the caller is set up:
 * a stack is never shrunk below LJ_STACK_START + LJ_STACK_EXTRA (47) slots,
 * so the few slots a call needs never grow it.
 *
 * Only call these from the loop thread.
 */
#ifndef TIDE_LUA_CALL_H
#define TIDE_LUA_CALL_H

#include <lua.h>

#include "watchdog.h"

/* Pushes the arguments of a call (it runs protected, so it may allocate and
 * raise); returns how many it pushed. */
typedef int (*tide__push_fn)(lua_State *L, void *ud);

typedef struct tide__caller {
  lua_State *L;              /* a thread of our own: calls run on it         */
  int thread_ref;            /* anchors L                                    */
  tide__watchdog *wd;        /* told when a call begins and ends, or NULL    */
} tide__caller;

/* Sets up c: a new thread for its calls, and (once per Lua universe) the
 * handler, the trampoline and the reporter's slot in the registry.  Call it
 * where an error can be caught (it allocates).  wd may be NULL. */
void tide__caller_init(lua_State *L, tide__caller *c, tide__watchdog *wd);

/* Releases c's thread (idempotent). */
void tide__caller_free(lua_State *L, tide__caller *c);

/* Calls the function the registry holds at fn_ref with the arguments
 * push(L, ud) pushes (push may be NULL: no arguments), protected.  On
 * success leaves nres results on c->L (the caller restores the top it had);
 * on failure, reports the error as from `where` and leaves nothing.
 * Returns 0 or the lua_pcall status. */
int tide__call(tide__caller *c, int fn_ref, tide__push_fn push, void *ud, int nres,
               const char *where);

/* Reports a stall of `ms` through the engine's stall reporter (set with
 * core.set_stall_reporter), protected, on L: from the watchdog's hook
 * (hooked = 1, L is the code that held the loop) or after the call ended
 * (hooked = 0: no hook reached it).  The line it returns goes to wd's note. */
void tide__report_stall(lua_State *L, tide__watchdog *wd, uint64_t ms, int hooked);

/* Reports the error value at the top of L's stack as from `where` through
 * the error sink, protected; pops it.  Allocates nothing outside its
 * protected call. */
void tide__report(lua_State *L, const char *where);

/* The error handler: turns the error at index 1 into its text and a stack
 * traceback.  Use it as lua_pcall's msgh (it is the one tide has). */
int tide__traceback(lua_State *L);

/* The text of the error value at idx: a string or number as it is, else
 * "(error object is a <type> value)".  May allocate: call it protected. */
const char *tide__error_text(lua_State *L, int idx);

/* Sets set_reporter(fn) and set_stall_reporter(fn) into the table at the
 * top of the stack: fn(where, message, traceback) receives every failure
 * reported here; the stall reporter, fn(ms, hooked), every stall. */
void tide__open_call(lua_State *L);

#endif
