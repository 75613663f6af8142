/* core.c — the Lua binding of tide's loop (module "tide.core"), the embedded Lua modules and the embedding API. */
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <libpq-fe.h>
#include <luajit.h>
#include <lualib.h>
#include <sqlite3.h>

#include "alloc_cache.h"
#include "bindings.h"
#include "codec.h"
#include "loop.h"
#include "lua_call.h"
#include "modules.h"
#include "tide.h"
#include "watchdog.h"

#define STATE_KEY "tide.state"     /* registry: the tide.Loop userdata */
#define CORE_KEY  "tide.core"      /* registry: the tide.core table, kept when package.loaded is cleared */
#define LOOP_MT   "tide.Loop"

static const char HOOK_STATE_KEY;  /* registry, light key: the state, for the stall hook */

/* One per Lua universe.  Heap-allocated apart from its userdata because
 * libuv owns the handles until their close callbacks have run. */
typedef struct state {
  tide__loop loop;
  tide__caller caller;  /* the loop's calls into Lua run on caller.L     */
  tide__watchdog *wd;   /* NULL when it could not be made (no watchdog)  */
  int tick_ref;         /* Lua tick(): runs due timers and tasks         */
  int signal_ref;       /* Lua on_signal(signum)                         */
  int in_call;          /* the loop's calls into Lua under way (nesting) */
  int failed_ticks;     /* ticks in a row that raised                    */
  int hooked;           /* the stall hook is set, replacing prev_*       */
  uint64_t pass_now;    /* when the timers' pass under way began (pop)   */
  lua_Hook prev_hook;
  int prev_mask, prev_count;
  double virtual_wall_base;  /* the virtual clock's start: the real wall clock (ms) */
  double virtual_mono_base;  /* and its monotonic time then (ns)                  */
} state;

typedef struct { state *s; } loop_ud;

/* ===== calling Lua from the loop
 *
 * Every call goes through tide__call (lua_call.h): protected, with nothing
 * allocated before the protection begins, and a failure reported to the
 * error sink.  A tick can fail without a bug in tide: a __gc finalizer that
 * raises, run by a collector step inside the engine, throws from there (on
 * LuaJIT before 2023-04).  The engine repairs what such an error
 * interrupted at its next tick (tide.engine.sched), so after a failed tick
 * the loop ticks again; a tick that keeps failing is given up after
 * MAX_FAILED_TICKS in a row, and the loop goes on with its other handles. */
#define MAX_FAILED_TICKS 100

static void on_tick(tide__loop *loop) {
  state *s = loop->data;
  lua_State *L = s->caller.L;
  int top = lua_gettop(L);
  s->in_call++;
  int rc = tide__call(&s->caller, s->tick_ref, NULL, NULL, 1, "the loop's tick");
  s->in_call--;
  int more = rc == 0 ? lua_toboolean(L, -1) : ++s->failed_ticks < MAX_FAILED_TICKS;
  if (rc == 0) s->failed_ticks = 0;
  lua_settop(L, top);
  tide__alloc_cache_tick(L, uv_now(loop->uv));
  tide__loop_after_tick(loop, more);
}

static int push_signum(lua_State *L, void *ud) {
  lua_pushinteger(L, *(int *)ud);
  return 1;
}

static void on_signal(tide__loop *loop, int signum) {
  state *s = loop->data;
  lua_State *L = s->caller.L;
  if (s->signal_ref == LUA_NOREF) return;
  int top = lua_gettop(L);
  s->in_call++;
  tide__call(&s->caller, s->signal_ref, push_signum, &signum, 0, "the signal handler");
  s->in_call--;
  lua_settop(L, top);
}

/* ===== the watchdog's hook
 *
 * The watchdog thread found a call into Lua running for too long and sent
 * SIGURG to this thread: on_poke runs in the signal handler and sets a
 * one-shot hook, as luajit's own SIGINT handler does (lua_sethook from a
 * signal handler on the thread that runs the state; never from another
 * thread).  The hook runs at the next instruction the interpreter executes
 * -- not inside JIT-compiled code, not inside a C function -- in the code
 * that holds the loop, and reports it there. */

static void stall_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_pushlightuserdata(L, (void *)&HOOK_STATE_KEY);
  lua_rawget(L, LUA_REGISTRYINDEX);
  state *s = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (s == NULL || !s->hooked) { lua_sethook(L, NULL, 0, 0); return; }
  s->hooked = 0;
  lua_sethook(L, s->prev_hook, s->prev_mask, s->prev_count);
  uint64_t ms = s->wd ? tide__watchdog_claim(s->wd) : 0;
  if (ms) tide__report_stall(L, s->wd, ms, 1);
}

static void on_poke(void *data) {
  state *s = data;
  lua_State *L = s->caller.L;
  if (s->hooked || L == NULL) return;
  s->prev_hook = lua_gethook(L);
  s->prev_mask = lua_gethookmask(L);
  s->prev_count = lua_gethookcount(L);
  s->hooked = 1;
  lua_sethook(L, stall_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* ===== tide.core functions (upvalue 1: the tide.Loop userdata) ===== */

static state *get_state(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  if (u->s == NULL) luaL_error(L, "tide: the loop is closed");
  return u->s;
}

/* now([real]) -> ms on the monotonic clock; under tide.testing's virtual
 * clock the virtual time, unless real (a PostgreSQL store's measure of the
 * server's clock counts real time). */
static int l_now(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  uint64_t ns = lua_toboolean(L, 1) || u->s == NULL ? uv_hrtime() : tide__loop_now(&u->s->loop);
  lua_pushnumber(L, (double)ns / 1e6);
  return 1;
}

/* wallclock([real]) -> UTC milliseconds since the Unix epoch (integral):
 * for durable schedule times only; intervals use now(). */
/* Under the virtual clock, the wall clock moves with it: it reads the real
 * wall clock at the moment the virtual one started, plus the virtual time
 * since (so jobs scheduled for later become due when a test advances).
 * wallclock(true) reads the real one all the same: what a PostgreSQL
 * store's distance from the server's clock is measured against. */
static int l_wallclock(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  state *s = u->s;
  uv_timeval64_t tv;
  if (s && tide__loop_is_virtual(&s->loop) && !lua_toboolean(L, 1)) {
    double ms = s->virtual_wall_base + ((double)tide__loop_now(&s->loop) - s->virtual_mono_base) / 1e6;
    lua_pushnumber(L, floor(ms));
    return 1;
  }
  if (uv_gettimeofday(&tv) != 0) return luaL_error(L, "tide: cannot read the wall clock");
  lua_pushnumber(L, (double)tv.tv_sec * 1000.0 + (double)(tv.tv_usec / 1000));
  return 1;
}

/* pid(), hostname(): name a worker in the leases it holds. */
static int l_pid(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_os_getpid());
  return 1;
}

static int l_hostname(lua_State *L) {
  char buf[UV_MAXHOSTNAMESIZE];
  size_t size = sizeof buf;
  if (uv_os_gethostname(buf, &size) != 0) lua_pushliteral(L, "localhost");
  else lua_pushlstring(L, buf, size);
  return 1;
}

/* Delays past this (about 31 years) are clamped: such a timer never fires
 * in practice, and its deadline in ns still fits in 64 bits. */
#define MAX_DELAY_MS 1e12

/* A timer due ms milliseconds from now (ms >= 0; NaN counts as 0): its
 * key, or -1 when out of memory.  A positive delay is at least 1 ns: a
 * tide.every of 1e-7 ms started again inside a pass of pop() must not be
 * due in that same pass (under the virtual clock, time stands still). */
static int64_t start_ms(state *s, double ms) {
  if (!(ms > 0)) ms = 0;
  if (ms > MAX_DELAY_MS) ms = MAX_DELAY_MS;
  uint64_t ns = (uint64_t)(ms * 1e6);
  if (ns == 0 && ms > 0) ns = 1;
  return tide__loop_timer_start(&s->loop, tide__loop_now(&s->loop) + ns);
}

/* The next timer due in the pass of pops under way, or 0.  `first` starts
 * a pass: it fires what was due when it began, so a timer started during
 * it (a tide.every started again as it fires) waits for the next pass,
 * after the runs queued by this one -- as libuv's timers use the loop's
 * cached time.  Before, a tide.every shorter than a pass fired again and
 * again in it (up to the engine's 10,000 fires a pass). */
static int64_t pop_due(state *s, int first) {
  if (first) s->pass_now = tide__loop_now(&s->loop);
  return tide__timers_pop_due(&s->loop.timers, s->pass_now);
}

/* timer_start(ms) -> key: a timer due ms milliseconds from now (ms >= 0,
 * checked by the caller); -1 when out of memory, -2 once the loop is
 * closed (the caller names itself in the error, tide.engine.runq). */
static int l_timer_start(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  double ms = luaL_checknumber(L, 1);
  lua_pushnumber(L, u->s ? (lua_Number)start_ms(u->s, ms) : -2);
  return 1;
}

/* timer_cancel(key) -> true when it was pending; false too once the loop
 * is closed (no timer can fire then: a cancel is harmless). */
static int l_timer_cancel(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  int64_t key = (int64_t)luaL_checknumber(L, 1);
  lua_pushboolean(L, u->s && tide__loop_timer_cancel(&u->s->loop, key) == 0);
  return 1;
}

/* timer_count() -> the number of pending timers. */
static int l_timer_count(lua_State *L) {
  lua_pushnumber(L, (lua_Number)tide__timers_count(&get_state(L)->loop.timers));
  return 1;
}

/* timer_compact() -> n: every pending key is <= n; compacts the keys and
 * gives the heap's memory back after a burst (tide__timers_compact). */
static int l_timer_compact(lua_State *L) {
  lua_pushnumber(L, (lua_Number)tide__timers_compact(&get_state(L)->loop.timers));
  return 1;
}

/* closed() -> true once close() ran: the loop's functions raise then. */
static int l_closed(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  lua_pushboolean(L, u->s == NULL);
  return 1;
}

/* pop(first) -> key of a timer due in this pass, or nil (see pop_due). */
static int l_pop(lua_State *L) {
  state *s = get_state(L);
  int64_t key = pop_due(s, lua_toboolean(L, 1));
  if (key == 0) return 0;
  lua_pushnumber(L, (lua_Number)key);
  return 1;
}

/* ===== the same three through LuaJIT's FFI (tide.engine.runq)
 *
 * Every timer is started and popped once, and a call through the classic
 * API costs ~300 instructions of trace stitching and stack handling around
 * a heap operation of ~100 (callgrind, bench/cg after); an FFI call is
 * compiled into the caller's trace.  These take the tide.Loop userdata
 * (its payload: FFI passes a userdata as a pointer to it), never call into
 * Lua, and return -2 once the loop is closed (its state freed).  Numbers
 * are doubles, as the keys are on the Lua side. */
static double ffi_timer_start(loop_ud *u, double ms) {
  if (u->s == NULL) return -2;
  return (double)start_ms(u->s, ms);      /* a key, or -1 */
}

static double ffi_timer_cancel(loop_ud *u, double key) {
  if (u->s == NULL) return -2;
  return tide__loop_timer_cancel(&u->s->loop, (int64_t)key) == 0 ? 1 : 0;
}

static double ffi_pop(loop_ud *u, int first) {
  if (u->s == NULL) return -2;
  return (double)pop_due(u->s, first);    /* a key, or 0 */
}

/* Adds timer_ffi = { loop = the userdata, start, cancel, pop = the
 * functions as light userdata } to the table on top; the userdata is at
 * `ud`. */
static void open_timer_ffi(lua_State *L, int ud) {
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, ud);
  lua_setfield(L, -2, "loop");
  lua_pushlightuserdata(L, (void *)(uintptr_t)ffi_timer_start);
  lua_setfield(L, -2, "start");
  lua_pushlightuserdata(L, (void *)(uintptr_t)ffi_timer_cancel);
  lua_setfield(L, -2, "cancel");
  lua_pushlightuserdata(L, (void *)(uintptr_t)ffi_pop);
  lua_setfield(L, -2, "pop");
  lua_setfield(L, -2, "timer_ffi");
}

static int l_kick(lua_State *L) {
  tide__loop_kick(&get_state(L)->loop);
  return 0;
}

#define LOST "tide: the host closed tide's handles on its loop (close tide with tide_close before the loop's other handles)"

/* run([once]) -> true when work is still left afterwards: tide's own
 * handles (its timer, its idle), or any referenced handle on the loop
 * (uv_run's result).  Thread and process tasks in flight, sockets waited
 * on, keep only their own handles alive: counting tide's two alone, one
 * step found "no work" and the engine reaped thread tasks still running
 * as stalled (spec/review_r1_spec.lua).  With a host loop the host's
 * handles count too: the step runs its callbacks as well.
 * Refused while the loop runs, whoever runs it: a nested uv_run on the
 * same loop (from a task, under a host that runs the loop itself) would run
 * the outer run's callbacks inside a tick, and reap its tasks. */
static int l_run(lua_State *L) {
  state *s = get_state(L);
  if (s->loop.running || s->in_call) return luaL_error(L, "the loop is already running");
  if (tide__loop_lost(&s->loop)) return luaL_error(L, LOST);
  int alive = tide__loop_run(&s->loop, lua_toboolean(L, 1) ? UV_RUN_NOWAIT : UV_RUN_DEFAULT);
  lua_pushboolean(L, alive != 0 || tide__loop_active(&s->loop) > 0);
  return 1;
}

/* running() -> true inside tide.run, tide_run, or any call the loop makes
 * into Lua (a host that runs the loop itself). */
static int l_running(lua_State *L) {
  state *s = get_state(L);
  lua_pushboolean(L, s->loop.running > 0 || s->in_call > 0);
  return 1;
}

/* set_handlers(tick, on_signal): the Lua side of the loop. */
static int l_set_handlers(lua_State *L) {
  state *s = get_state(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, s->tick_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, s->signal_ref);
  lua_pushvalue(L, 1);
  s->tick_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 2);
  s->signal_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* signals(on [, grace_ms]): watch SIGINT and SIGTERM (the loop, and the
 * watchdog, which ends a process still blocked grace_ms after one). */
static int l_signals(lua_State *L) {
  state *s = get_state(L);
  int on = lua_toboolean(L, 1);
  double grace = luaL_optnumber(L, 2, -1);
  if (!on && s->wd) tide__watchdog_signals(s->wd, 0);   /* first: never the only watcher */
  if (on && tide__loop_lost(&s->loop)) return luaL_error(L, LOST);
  int rc = tide__loop_signals(&s->loop, on);
  if (rc != 0) return luaL_error(L, "tide: cannot watch signals: %s", uv_strerror(rc));
  if (on && s->wd) {
    tide__watchdog_configure(s->wd, -1, grace);
    tide__watchdog_signals(s->wd, 1);
  }
  return 0;
}

/* watchdog(stall_ms): a call into Lua longer than this is a stall (0: off). */
static int l_watchdog(lua_State *L) {
  state *s = get_state(L);
  double ms = luaL_checknumber(L, 1);
  luaL_argcheck(L, ms >= 0 && ms < 1e12, 1, "non-negative number of ms expected");
  if (s->wd) tide__watchdog_configure(s->wd, ms, -1);
  return 0;
}

/* stats() -> active handles, pending timers, bytes held by the timer heap. */
static int l_stats(lua_State *L) {
  state *s = get_state(L);
  lua_pushinteger(L, tide__loop_active(&s->loop));
  lua_pushinteger(L, (lua_Integer)tide__timers_count(&s->loop.timers));
  lua_pushnumber(L, (lua_Number)tide__timers_bytes(&s->loop.timers));
  return 3;
}

/* alloc_cache([cap [, small_cap]]) -> bytes kept, cap, hits, bytes kept in
 * small blocks, small_cap, anchors, and the arena's figures (a table, or
 * none): the allocator cache's figures, after setting its caps (bytes)
 * when given (alloc_cache.h). */
static int l_alloc_cache(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) {
    lua_Number cap = luaL_checknumber(L, 1);
    luaL_argcheck(L, cap >= 0, 1, "non-negative number of bytes expected");
    /* (lua_Number)SIZE_MAX is 2^64: converting it or more is undefined (on x86-64, 0) */
    tide__alloc_cache_set(L, cap < (lua_Number)SIZE_MAX ? (size_t)cap : SIZE_MAX);
  }
  if (!lua_isnoneornil(L, 2)) {
    lua_Number small = luaL_checknumber(L, 2);
    luaL_argcheck(L, small >= 0, 2, "non-negative number of bytes expected");
    tide__alloc_cache_set_small(L, small < (lua_Number)SIZE_MAX ? (size_t)small : SIZE_MAX);
  }
  size_t kept, cap;
  unsigned long long hits;
  tide__alloc_cache_stats(L, &kept, &cap, &hits);
  lua_pushnumber(L, (lua_Number)kept);
  lua_pushnumber(L, (lua_Number)cap);
  lua_pushnumber(L, (lua_Number)hits);
  lua_pushnumber(L, (lua_Number)tide__alloc_cache_small(L));
  lua_pushnumber(L, (lua_Number)tide__alloc_cache_small_cap(L));
  lua_pushnumber(L, (lua_Number)tide__alloc_cache_anchors(L));
  tide_arena_stats a;
  if (!tide__alloc_cache_arena(L, &a)) return 6;
  lua_createtable(L, 0, 4);                        /* the arena's, in bytes */
  lua_pushnumber(L, (lua_Number)a.small_pages * TIDE_ARENA_PAGE);
  lua_setfield(L, -2, "small");
  lua_pushnumber(L, (lua_Number)a.run_pages * TIDE_ARENA_PAGE);
  lua_setfield(L, -2, "large");
  lua_pushnumber(L, (lua_Number)a.free_backed * TIDE_ARENA_PAGE);
  lua_setfield(L, -2, "free");
  lua_pushnumber(L, (lua_Number)a.given_back * TIDE_ARENA_PAGE);
  lua_setfield(L, -2, "given_back");
  return 7;
}

static void free_state(tide__loop *loop) {
  free(loop->data);
}

/* True while the loop runs or calls into Lua (a tick, a signal, any
 * binding's callback: they all tell the watchdog).  The loop cannot be
 * closed then: the handles, callers and watchdog that very call runs on
 * would be freed under it (a RabbitMQ ready callback that closed the loop
 * crashed: heap-use-after-free, spec/review_amqp_spec.lua). */
static int busy(const state *s) {
  return s->loop.running > 0 || s->in_call > 0 || tide__watchdog_in_call(s->wd);
}

/* close() -> uv_loop_close's result for an owned loop (0: nothing left open);
 * UV_EBUSY, closing nothing, while busy. */
static int close_state(lua_State *L, loop_ud *u) {
  state *s = u->s;
  if (s == NULL) return 0;                   /* closed already */
  if (busy(s)) return UV_EBUSY;
  u->s = NULL;
  tide__close_threads(L);                    /* its async handle is on our loop */
  tide__close_procs(L);                      /* so are the children's pipes     */
  tide__close_pg(L);                         /* so are the sockets' watches     */
  tide__close_amqp(L);                       /* and the brokers' connections    */
  tide__close_http(L);                       /* and the HTTP servers' handles   */
  tide__close_fswatch(L);                    /* and the file watches            */
  tide__watchdog_free(s->wd);                /* their callbacks told it of calls */
  s->wd = NULL;
  if (s->hooked) lua_sethook(L, s->prev_hook, s->prev_mask, s->prev_count);
  s->hooked = 0;
  lua_pushlightuserdata(L, (void *)&HOOK_STATE_KEY);
  lua_pushnil(L);
  lua_rawset(L, LUA_REGISTRYINDEX);
  luaL_unref(L, LUA_REGISTRYINDEX, s->tick_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, s->signal_ref);
  tide__caller_free(L, &s->caller);
  return tide__loop_close(&s->loop, free_state);
}

static int l_close(lua_State *L) {
  loop_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  if (u->s && busy(u->s)) return luaL_error(L, "tide.core.close: the loop is running (close it once its run returned)");
  lua_pushinteger(L, close_state(L, u));
  return 1;
}

/* Collected only by lua_close (the registry anchors it): tasks still live
 * are cancelled first, their outcomes delivered, as by tide_close. */
static int cancel_live(lua_State *L, state *s, const char *by);

static int loop_gc(lua_State *L) {
  loop_ud *u = luaL_checkudata(L, 1, LOOP_MT);
  if (u->s && !busy(u->s)) cancel_live(L, u->s, "lua_close");
  close_state(L, u);
  return 0;
}

/* isatty(fd) -> true when fd is a terminal. */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, uv_guess_handle((int)luaL_checkinteger(L, 1)) == UV_TTY);
  return 1;
}

/* clock_virtual(on): switches the virtual clock (tide.testing) on or off. */
static int l_clock_virtual(lua_State *L) {
  state *s = get_state(L);
  int on = lua_toboolean(L, 1);
  if (on && !tide__loop_is_virtual(&s->loop)) {
    uv_timeval64_t tv;
    if (uv_gettimeofday(&tv) != 0) return luaL_error(L, "tide: cannot read the wall clock");
    s->virtual_wall_base = (double)tv.tv_sec * 1000.0 + (double)(tv.tv_usec / 1000);
    tide__loop_set_virtual(&s->loop, 1);
    s->virtual_mono_base = (double)tide__loop_now(&s->loop);
    return 0;
  }
  tide__loop_set_virtual(&s->loop, on);
  return 0;
}

/* clock_step(target_ms, until_idle) -> true when the clock moved to the
 * next timer's deadline (exactly, in ns: a deadline round-tripped through a
 * double of ms may land a nanosecond short of due); false when no timer is
 * due by the target: the clock then moves to the target, unless until_idle. */
/* The farthest the virtual clock goes, in ms (about 290 years of uptime):
 * its ns fit in 64 bits with room for a timer of MAX_DELAY_MS after it
 * (a larger double cast to uint64_t is undefined: 1e300 came out as 0). */
#define MAX_CLOCK_MS 9.2e12

static int l_clock_step(lua_State *L) {
  state *s = get_state(L);
  double target_ms = luaL_checknumber(L, 1);
  if (!(target_ms > 0)) target_ms = 0;                 /* NaN too */
  if (target_ms > MAX_CLOCK_MS) target_ms = MAX_CLOCK_MS;
  /* Whole nanoseconds, cut down; but a target a hair under a whole one
   * (now() + 40 most often is, in binary) counts as it: cut, it lost a
   * nanosecond each time.  A real fraction (10.5 ns) is still cut. */
  uint64_t target = (uint64_t)(target_ms * 1e6 + 0.01), deadline;
  if (target < tide__loop_now(&s->loop)) target = tide__loop_now(&s->loop);   /* never backwards */
  if (tide__timers_next(&s->loop.timers, &deadline) && deadline <= target) {
    tide__loop_set_now(&s->loop, deadline);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (!lua_toboolean(L, 2)) tide__loop_set_now(&s->loop, target);
  lua_pushboolean(L, 0);
  return 1;
}

/* caller_is(co, fn) -> own, yieldable: whether fn is the function at
 * level 1 of coroutine co, which is not running (suspended in the
 * coroutine.resume at its level 0), and whether co could yield from there:
 * false when a C call lies between co's resume and that point (a __gc
 * finalizer run by co's allocation, a debug hook, a function a C function
 * calls, like table.sort's comparator), where a yield raises "attempt to
 * yield across C-call boundary".  lua_isyieldable reads co's C-frame link
 * only.  For the wait check (sched.lua, own_runner), which calls it from a
 * coroutine of its own so that no C call runs on a task's stack. */
static int l_caller_is(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_State *co = lua_tothread(L, 1);
  lua_Debug ar;
  int yes = 0;
  if (co != L && lua_getstack(co, 1, &ar) && lua_getinfo(co, "f", &ar)) {
    lua_xmove(co, L, 1);                     /* the function, from co's stack to ours */
    yes = lua_rawequal(L, -1, 2);
    lua_pop(L, 1);
  }
  lua_pushboolean(L, yes);
  lua_pushboolean(L, yes && lua_isyieldable(co));
  return 2;
}

/* versions() -> { luajit =, libuv =, sqlite =, libpq = }: what this tide
 * was built with and runs on (libraries linked dynamically report theirs). */
static int l_versions(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, LUAJIT_VERSION);
  lua_setfield(L, -2, "luajit");
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv");
  lua_pushstring(L, sqlite3_libversion());
  lua_setfield(L, -2, "sqlite");
  int pq = PQlibVersion();                   /* 150018 = 15.18; before 10: 90624 = 9.6.24 */
  if (pq >= 100000) lua_pushfstring(L, "%d.%d", pq / 10000, pq % 10000);
  else lua_pushfstring(L, "%d.%d.%d", pq / 10000, pq / 100 % 100, pq % 100);
  lua_setfield(L, -2, "libpq");
  return 1;
}

static const luaL_Reg core_funcs[] = {
  { "now", l_now },           { "timer_start", l_timer_start },
  { "timer_cancel", l_timer_cancel }, { "pop", l_pop },
  { "timer_count", l_timer_count }, { "timer_compact", l_timer_compact },
  { "kick", l_kick },         { "run", l_run },
  { "running", l_running },   { "set_handlers", l_set_handlers },
  { "caller_is", l_caller_is },
  { "signals", l_signals },   { "stats", l_stats },
  { "close", l_close },       { "closed", l_closed },
  { "isatty", l_isatty },
  { "wallclock", l_wallclock }, { "pid", l_pid },
  { "hostname", l_hostname }, { "versions", l_versions },
  { "clock_virtual", l_clock_virtual },
  { "clock_step", l_clock_step }, { "watchdog", l_watchdog },
  { "alloc_cache", l_alloc_cache },
  { NULL, NULL }
};

/* ===== opening ===== */

static int load_module(lua_State *L) {
  const tide__module *m = lua_touserdata(L, lua_upvalueindex(1));
  char chunkname[128];
  snprintf(chunkname, sizeof chunkname, "=%s", m->name);
  if (luaL_loadbuffer(L, m->bytecode, m->size, chunkname) != 0) return lua_error(L);
  lua_pushstring(L, m->name);
  lua_call(L, 1, 1);
  return 1;
}

static int push_core(lua_State *L, uv_loop_t *uv, int required);

/* package.preload["tide.core"]: the state's tide.core again, once
 * package.loaded was cleared of it (tide.core is made by tide_open, never
 * loaded from a file: require "tide" failed with "module 'tide.core' not
 * found").  A second copy of the engine then takes its loop over, as when
 * tide.core stays loaded (tide.engine.runq). */
static int load_core(lua_State *L) {
  if (push_core(L, NULL, 1) != 0) return lua_error(L);
  return 1;
}

/* Registers every embedded module in package.preload ("tide.init" as "tide"),
 * and tide.core. */
static void preload_modules(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, load_core);
  lua_setfield(L, -2, "tide.core");
  for (const tide__module *m = tide__modules; m->name; m++) {
    lua_pushlightuserdata(L, (void *)m);
    lua_pushcclosure(L, load_module, 1);
    lua_setfield(L, -2, strcmp(m->name, "tide.init") == 0 ? "tide" : m->name);
  }
  lua_pop(L, 2);                             /* preload, package */
}

/* Pushes package.loaded["tide.core"], creating it with a new loop if needed.
 * One per Lua state: one cleared from package.loaded is found again in the
 * registry (a second loop in the state would take the registry's keys of
 * the first one's bindings, and the first one's close would close them). */
static int push_core(lua_State *L, uv_loop_t *uv, int required) {
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "tide.core");
  if (lua_istable(L, -1)) { lua_remove(L, -2); return 0; }   /* (require's mark while loading it: not a table) */
  lua_pop(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, CORE_KEY);
  if (!lua_isnil(L, -1)) {
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "tide.core");              /* loaded again */
    lua_remove(L, -2);                             /* _LOADED */
    return 0;
  }
  lua_pop(L, 1);
  const char *arena = getenv("TIDE_ARENA");        /* (read by tide__alloc_cache_open) */
  if (arena != NULL && *arena && strcmp(arena, "on") != 0 && strcmp(arena, "off") != 0) {
    lua_pop(L, 1);
    lua_pushfstring(L, "tide: TIDE_ARENA must be on or off (got \"%s\")", arena);
    return -1;
  }
  tide__alloc_cache_open(L, required);             /* without it (no memory), L keeps its allocator */
  state *s = calloc(1, sizeof *s);
  if (s == NULL) { lua_pop(L, 1); lua_pushstring(L, "tide: out of memory"); return -1; }
  int rc = tide__loop_init(&s->loop, uv, on_tick, on_signal, s);
  if (rc != 0) {
    if (!s->loop.leak) free(s);
    lua_pop(L, 1);
    lua_pushfstring(L, "tide: cannot start the loop: %s", uv_strerror(rc));
    return -1;
  }
  s->wd = tide__watchdog_new(on_poke, s);
  tide__caller_init(L, &s->caller, s->wd);
  s->tick_ref = s->signal_ref = LUA_NOREF;
  lua_pushlightuserdata(L, (void *)&HOOK_STATE_KEY);
  lua_pushlightuserdata(L, s);
  lua_rawset(L, LUA_REGISTRYINDEX);
  loop_ud *u = lua_newuserdata(L, sizeof *u);
  u->s = s;
  luaL_newmetatable(L, LOOP_MT);
  lua_pushcfunction(L, loop_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, STATE_KEY);   /* anchors the userdata */
  lua_createtable(L, 0, 16);
  lua_pushvalue(L, -2);
  luaL_openlib(L, NULL, core_funcs, 1);            /* upvalue: the userdata */
  open_timer_ffi(L, lua_gettop(L) - 1);            /* timer_ffi      */
  tide__open_call(L);                              /* set_reporter   */
  tide__open_codec(L);                             /* encode, decode */
  tide__open_threads(L, s->loop.uv, s->wd);        /* thread_*       */
  tide__open_procs(L, s->loop.uv, s->wd);          /* proc_*         */
  tide__open_sqlite(L);                            /* sqlite_*       */
  tide__open_pg(L, s->loop.uv, s->wd);             /* pg_*           */
  tide__open_amqp(L, s->loop.uv, s->wd);           /* amqp_*         */
  tide__open_http(L, s->loop.uv, s->wd);           /* http_listen    */
  tide__open_fswatch(L, s->loop.uv, s->wd);        /* fs_watch       */
  lua_remove(L, -2);                               /* the userdata */
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, CORE_KEY);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "tide.core");
  lua_remove(L, -2);                               /* _LOADED */
  return 0;
}

/* Why tide cannot be opened on `uv` in L (any: on whatever loop it has), or
 * NULL.  Opened before on the same loop, it is opened again (nothing new). */
static const char *refuse_open(lua_State *L, uv_loop_t *uv, int any) {
  lua_getfield(L, LUA_REGISTRYINDEX, STATE_KEY);
  loop_ud *u = luaL_testudata(L, -1, LOOP_MT);
  lua_pop(L, 1);
  if (u == NULL) return NULL;                      /* never opened */
  if (u->s == NULL)
    return "tide_open: tide was closed in this Lua state (tide_close); it cannot be opened again in it";
  if (!any && (uv ? uv != u->s->loop.uv : !u->s->loop.owns_uv))
    return "tide_open: tide is already open on another loop in this Lua state";
  return NULL;
}

static int open_tide(lua_State *L, uv_loop_t *uv, int any) {
  const char *why = refuse_open(L, uv, any);
  if (why) { lua_pushstring(L, why); return -1; }
  if (push_core(L, uv, any) != 0) return -1;
  lua_pop(L, 1);
  preload_modules(L);
  /* Not require "tide": luaopen_tide runs inside that very require. */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_getfield(L, -1, "tide");
  lua_remove(L, -2);                               /* preload */
  lua_remove(L, -2);                               /* package */
  lua_pushstring(L, "tide");
  if (lua_pcall(L, 1, 1, 0) != 0) return -1;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "tide");
  lua_pop(L, 1);                                   /* _LOADED */
  return 0;
}

TIDE_API int tide_open(lua_State *L, uv_loop_t *uv) {
  return open_tide(L, uv, 0);
}

/* require "tide" takes tide on whatever loop the state has (a host's). */
TIDE_API int luaopen_tide(lua_State *L) {
  if (open_tide(L, NULL, 1) != 0) return lua_error(L);
  return 1;
}

/* ===== the embedding API: thin calls into tide.host ===== */

/* Pushes tide.host[name], protected; -1 with a message pushed on failure
 * (before tide_open: that, not require's list of paths searched). */
static int push_host_fn(lua_State *L, const char *name) {
  lua_getfield(L, LUA_REGISTRYINDEX, STATE_KEY);
  int opened = luaL_testudata(L, -1, LOOP_MT) != NULL;
  lua_pop(L, 1);
  if (!opened) { lua_pushliteral(L, "tide: tide_open was not called on this Lua state"); return -1; }
  lua_getglobal(L, "require");
  lua_pushstring(L, "tide.engine.host");
  if (lua_pcall(L, 1, 1, 0) != 0) return -1;
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  return 0;
}

TIDE_API int tide_spawn_file(lua_State *L, const char *path, int argc, char **argv) {
  /* A NULL path reached loadfile as nil, which reads the script from stdin
   * (a host blocked on its terminal); a negative argc sized a table of 4 G
   * entries. */
  if (path == NULL || argc < 0 || (argc > 0 && argv == NULL)) {
    lua_pushstring(L, path == NULL ? "tide_spawn_file: bad argument 'path' (a file name expected, got NULL)"
                                   : "tide_spawn_file: bad arguments 'argc', 'argv' (argc >= 0 strings in argv expected)");
    return -1;
  }
  if (push_host_fn(L, "spawn_file") != 0) return -1;
  lua_pushstring(L, path);
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    if (argv[i] == NULL) {                         /* (not a string: would be nil, a hole in arg) */
      lua_pop(L, 3);                               /* the table, the path, the function */
      lua_pushfstring(L, "tide_spawn_file: bad argument 'argv' (a string expected at argv[%d], got NULL)", i);
      return -1;
    }
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  if (lua_pcall(L, 2, 2, 0) != 0) return -1;
  if (lua_isnil(L, -2)) { lua_remove(L, -2); return -1; }
  lua_pop(L, 2);
  return 0;
}

/* Calls tide.host[name] with the nargs values on top; its integer result,
 * or -1 with a message pushed in their place. */
static int call_host_int(lua_State *L, const char *name, int nargs) {
  if (push_host_fn(L, name) != 0) {
    lua_insert(L, -1 - nargs);                     /* the message, below the arguments */
    lua_pop(L, nargs);
    return -1;
  }
  lua_insert(L, -1 - nargs);
  if (lua_pcall(L, nargs, 1, 0) != 0) return -1;
  int rc = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return rc;
}

TIDE_API int tide_run(lua_State *L) { return call_host_int(L, "run", 0); }
TIDE_API int tide_step(lua_State *L) { return call_host_int(L, "step", 0); }

TIDE_API void tide_shutdown(lua_State *L, double grace_ms) {
  lua_pushnumber(L, grace_ms);
  if (call_host_int(L, "shutdown", 1) < 0) lua_pop(L, 1);   /* the message: nothing is left */
}

/* Tasks still live when the host closes tide are cancelled first, their
 * outcomes delivered (tide.engine.host.close_tasks): closed under them, they
 * never got one, and their handle_result never ran. */
TIDE_API int tide_close(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, STATE_KEY);
  loop_ud *u = luaL_testudata(L, -1, LOOP_MT);
  lua_pop(L, 1);
  if (u == NULL || u->s == NULL) return 0;         /* never opened, or closed already */
  if (busy(u->s)) return UV_EBUSY;
  cancel_live(L, u->s, "tide_close");
  return close_state(L, u);
}

static int cancel_live(lua_State *L, state *s, const char *by) {
  int top = lua_gettop(L);
  s->in_call++;                                    /* a handle_result cannot close it meanwhile */
  lua_pushfstring(L, "tide was closed (%s)", by);
  int n = call_host_int(L, "close_tasks", 1);      /* (an error: reported by the engine) */
  s->in_call--;
  lua_settop(L, top);
  return n;
}
