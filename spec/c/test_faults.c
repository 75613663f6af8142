/* test_faults.c — TAP tests of the C core when what it calls fails or misbehaves: libuv inits, a
 * thread that cannot start, a worker state that panics; and of its threading and allocation rules.
 *
 * Linked with `ld --wrap` (see FAULT_WRAPS in the Makefile): every call the core's objects make to
 * a wrapped function reaches __wrap_<name> here, which counts it, checks it, or fails it on
 * request, and otherwise calls the real one (__real_<name>).
 */
#include <lauxlib.h>
#include <lualib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "tap.h"
#include "threads.h"
#include "tide.h"

#define WAIT_MS 5000

/* ===== THE WRAPPERS ===== */

static pthread_t main_thread;
static int on_main(void) { return pthread_equal(pthread_self(), main_thread); }

/* Failures on request: each flag fails the next calls while it is set. */
static _Atomic int fail_async_init, fail_mutex_init, fail_signal_init, fail_thread_create;
static _Atomic int panic_next_job;        /* the next job's outer lua_pcall raises instead */

/* Counts, by the loop (main) thread or by workers. */
static _Atomic int closures_on_main;      /* lua_pushcclosure from the main thread */
static _Atomic int collects_on_workers;   /* lua_gc(LUA_GCCOLLECT) from worker threads */

/* Which thread runs each Lua state (inside lua_pcall), to check lua_sethook's callers. */
#define MAX_STATES 64
static struct { lua_State *L; pthread_t thread; int depth; } running[MAX_STATES];
static pthread_mutex_t running_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int foreign_sethooks;      /* lua_sethook on a state another thread is running */

int __real_uv_async_init(uv_loop_t *loop, uv_async_t *a, uv_async_cb cb);
int __wrap_uv_async_init(uv_loop_t *loop, uv_async_t *a, uv_async_cb cb) {
  if (fail_async_init) return UV_EMFILE;
  return __real_uv_async_init(loop, a, cb);
}

int __real_uv_mutex_init(uv_mutex_t *m);
int __wrap_uv_mutex_init(uv_mutex_t *m) {
  if (fail_mutex_init) return UV_ENOMEM;
  return __real_uv_mutex_init(m);
}

int __real_uv_signal_init(uv_loop_t *loop, uv_signal_t *h);
int __wrap_uv_signal_init(uv_loop_t *loop, uv_signal_t *h) {
  if (fail_signal_init) return UV_EMFILE;
  return __real_uv_signal_init(loop, h);
}

int __real_uv_thread_create(uv_thread_t *t, uv_thread_cb cb, void *arg);
int __wrap_uv_thread_create(uv_thread_t *t, uv_thread_cb cb, void *arg) {
  if (fail_thread_create) return UV_EAGAIN;
  return __real_uv_thread_create(t, cb, arg);
}

void __real_lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);
void __wrap_lua_pushcclosure(lua_State *L, lua_CFunction fn, int n) {
  if (on_main()) closures_on_main++;
  __real_lua_pushcclosure(L, fn, n);
}

int __real_lua_gc(lua_State *L, int what, int data);
int __wrap_lua_gc(lua_State *L, int what, int data) {
  if (what == LUA_GCCOLLECT && !on_main()) collects_on_workers++;
  return __real_lua_gc(L, what, data);
}

static int slot_of(lua_State *L) {       /* locked */
  int free_slot = -1;
  for (int i = 0; i < MAX_STATES; i++) {
    if (running[i].L == L) return i;
    if (running[i].L == NULL && free_slot < 0) free_slot = i;
  }
  if (free_slot >= 0) running[free_slot].L = L;
  return free_slot;
}

int __real_lua_pcall(lua_State *L, int nargs, int nres, int errfunc);
int __wrap_lua_pcall(lua_State *L, int nargs, int nres, int errfunc) {
  /* The outer call of a job (worker.c: body, job, worker; no results, no
   * handler): raising here is an error no protected call catches. */
  if (!on_main() && nargs == 2 && nres == 0 && errfunc == 0 && atomic_exchange(&panic_next_job, 0)) {
    lua_settop(L, 0);
    lua_pushliteral(L, "injected by test_faults");
    lua_error(L);
  }
  pthread_mutex_lock(&running_mu);
  int i = slot_of(L);
  if (i >= 0 && running[i].depth++ == 0) running[i].thread = pthread_self();
  pthread_mutex_unlock(&running_mu);
  int rc = __real_lua_pcall(L, nargs, nres, errfunc);
  pthread_mutex_lock(&running_mu);
  if (i >= 0) running[i].depth--;
  pthread_mutex_unlock(&running_mu);
  return rc;
}

int __real_lua_sethook(lua_State *L, lua_Hook f, int mask, int count);
int __wrap_lua_sethook(lua_State *L, lua_Hook f, int mask, int count) {
  pthread_mutex_lock(&running_mu);
  for (int i = 0; i < MAX_STATES; i++)
    if (running[i].L == L && running[i].depth > 0 && !pthread_equal(running[i].thread, pthread_self()))
      foreign_sethooks++;
  pthread_mutex_unlock(&running_mu);
  return __real_lua_sethook(L, f, mask, count);
}

/* ===== A TIDE OF THE TEST'S OWN ===== */

static lua_State *open_tide(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (tide_open(L, NULL) != 0) {
    printf("Bail out! tide_open: %s\n", lua_tostring(L, -1));
    exit(2);
  }
  lua_settop(L, 0);
  return L;
}

static void close_tide(lua_State *L, const char *name) {
  ok(tide_close(L) == 0, "%s: tide closes with nothing left open", name);
  lua_close(L);
}

/* Runs a Lua chunk; 1 when it returned true, else 0 (its error printed). */
static int run_lua(lua_State *L, const char *src) {
  int good = 0;
  if (luaL_loadstring(L, src) != 0 || lua_pcall(L, 0, 1, 0) != 0)
    printf("# %s\n", lua_tostring(L, -1));
  else
    good = lua_toboolean(L, -1);
  lua_settop(L, 0);
  return good;
}

/* ===== THE CASES ===== */

static void failed_inits(void) {
  fail_signal_init = 1;
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  int rc = tide_open(L, NULL);
  const char *msg = rc != 0 ? lua_tostring(L, -1) : "";
  ok(rc != 0 && msg && strstr(msg, "cannot start the loop"),
     "uv_signal_init fails: tide_open fails, saying why (%s)", msg ? msg : "?");
  fail_signal_init = 0;
  lua_close(L);

  L = open_tide();
  const char *start =
      "local core = require 'tide.core'\n"
      "local ok, err = core.thread_start({ threads = 2 }, function() end)\n"
      "return ok == nil and err\n";
  fail_async_init = 1;
  if (luaL_loadstring(L, start) || lua_pcall(L, 0, 1, 0)) printf("# %s\n", lua_tostring(L, -1));
  ok(lua_isstring(L, -1) && strstr(lua_tostring(L, -1), "cannot watch for results"),
     "uv_async_init fails: thread_start gives nil and the reason (%s)", lua_tostring(L, -1));
  lua_settop(L, 0);
  fail_async_init = 0;
  fail_mutex_init = 1;
  if (luaL_loadstring(L, start) || lua_pcall(L, 0, 1, 0)) printf("# %s\n", lua_tostring(L, -1));
  ok(lua_isstring(L, -1) && strstr(lua_tostring(L, -1), "cannot make a mutex"),
     "uv_mutex_init fails: thread_start gives nil and the reason (%s)", lua_tostring(L, -1));
  lua_settop(L, 0);
  fail_mutex_init = 0;

  size_t before = lua_objlen(L, LUA_REGISTRYINDEX);
  fail_thread_create = 1;
  int all_failed = 1;
  for (int i = 0; i < 50; i++) {
    if (luaL_loadstring(L, start) || lua_pcall(L, 0, 1, 0)) printf("# %s\n", lua_tostring(L, -1));
    all_failed &= lua_isstring(L, -1) && strstr(lua_tostring(L, -1), "cannot start thread") != NULL;
    lua_settop(L, 0);
  }
  fail_thread_create = 0;
  size_t after = lua_objlen(L, LUA_REGISTRYINDEX);
  ok(all_failed, "uv_thread_create fails: thread_start gives nil, 'cannot start thread', 50 times");
  ok(after == before, "... and keeps no registry reference (registry length %zu, then %zu)", before, after);
  ok(run_lua(L, "local tide = require 'tide'\n"
                "local _, s, v = tide.run(function()\n"
                "  return tide.spawn{ mode = 'thread', run = function(x) return x * 2 end, args = { 21 } }:await()\n"
                "end)\n"
                "return s == 'ok' and select(2, tide.run(function() return 1 end)) == 1"),
     "then the pool starts, and a thread task runs");
  close_tide(L, "failed inits");
}

static void shutdown_keeps_the_stack(void) {
  lua_State *L = open_tide();
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_pushnil(L);
  lua_setfield(L, -2, "tide.engine.host");
  lua_getfield(L, -2, "preload");
  lua_pushnil(L);
  lua_setfield(L, -2, "tide.engine.host");
  lua_settop(L, 0);
  lua_pushliteral(L, "mine");
  tide_shutdown(L, 100);
  ok(lua_gettop(L) == 1 && lua_isstring(L, 1) && strcmp(lua_tostring(L, 1), "mine") == 0,
     "tide_shutdown whose call fails leaves the stack as it was (top %d)", lua_gettop(L));
  close_tide(L, "shutdown");
}

/* A worker whose state panics: the job gets an error, the state is made
 * again, and the next job runs on it. */
static void worker_state_panic(void) {
  lua_State *L = open_tide();
  ok(run_lua(L, "local tide = require 'tide'\n"
                "tide.configure{ threads = 1 }\n"
                "local _, s = tide.run(function()\n"
                "  return tide.spawn{ mode = 'thread', run = function() return 1 end }:await()\n"
                "end)\n"
                "return s == 'ok'"),
     "a thread task runs (the worker's state is made)");
  panic_next_job = 1;
  ok(run_lua(L, "local tide = require 'tide'\n"
                "local _, s, v = tide.run(function()\n"
                "  return tide.spawn{ mode = 'thread', run = function() return 2 end }:await()\n"
                "end)\n"
                "print('# ' .. tostring(s) .. ' ' .. tostring(v))\n"
                "return s == 'error' and v:find('panicked', 1, true) and v:find('injected by test_faults', 1, true)"),
     "a job whose state panics gets an error outcome that says so");
  ok(run_lua(L, "local tide = require 'tide'\n"
                "local _, s, v = tide.run(function()\n"
                "  return tide.spawn{ mode = 'thread', run = function() return 3 end }:await()\n"
                "end)\n"
                "local st = tide.stats().threads\n"
                "return s == 'ok' and v == 3 and st.panicked == 1 and st.size == 1"),
     "the next job runs on a state made again (stats: panicked 1, size 1)");
  close_tide(L, "panic");
}

/* The loop thread never calls lua_sethook on a worker's state (it used to,
 * to stop a job, while the worker ran it). */
static void stop_requests_set_no_foreign_hook(void) {
  lua_State *L = open_tide();
  foreign_sethooks = 0;
  ok(run_lua(L, "local tide = require 'tide'\n"
                "tide.configure{ threads = 2, thread_stop_wait = 2000 }\n"
                "local s1, s2\n"
                "tide.run(function()\n"
                "  local busy = function() jit.off() local x = 0 while true do x = x + 1 end end\n"
                "  local a = tide.spawn{ mode = 'thread', run = busy, timeout = 100 }\n"
                "  local b = tide.spawn{ mode = 'thread', run = function() require('tide').sleep(5000) end, timeout = 100 }\n"
                "  s1, s2 = a:await(), b:await()\n"
                "  tide.sleep(100)\n"
                "end)\n"
                "local st = tide.stats().threads\n"
                "return s1 == 'timeout' and s2 == 'timeout' and st.quarantined == 0 and st.busy == 0"),
     "two running thread tasks time out; both threads stop (an interpreted loop, a sleep): none quarantined");
  ok(foreign_sethooks == 0, "no lua_sethook on a worker's state from another thread (%d)", foreign_sethooks);
  close_tide(L, "stop");
}

/* Calls from the loop into Lua make no closure (a traceback handler, once,
 * sat in the registry; it used to be pushed for every call). */
static void no_closure_per_callback(void) {
  lua_State *L = open_tide();
  ok(run_lua(L, "local tide = require 'tide'\n"
                "tide.configure{ threads = 2 }\n"
                "return select(2, tide.run(function() return tide.spawn{ mode = 'thread', run = 'string.rep', args = { 'a', 2 } }:await() end)) == 'ok'"),
     "the pool runs (warm-up)");
  closures_on_main = 0;
  ok(run_lua(L, "local tide = require 'tide'\n"
                "local good = 0\n"
                "tide.run(function()\n"
                "  for i = 1, 200 do\n"
                "    tide.sleep(0)\n"
                "    local s, v = tide.spawn{ mode = 'thread', run = 'string.rep', args = { 'a', 2 } }:await()\n"
                "    if s == 'ok' and v == 'aa' then good = good + 1 end\n"
                "  end\n"
                "end)\n"
                "return good == 200"),
     "200 loop ticks and 200 thread deliveries");
  ok(closures_on_main == 0, "no closure was pushed by the core meanwhile (%d)", closures_on_main);
  close_tide(L, "closures");
}

/* A job that fails (not out of memory) costs no full collection. */
static void no_collection_after_failure(void) {
  lua_State *L = open_tide();
  collects_on_workers = 0;
  ok(run_lua(L, "local tide = require 'tide'\n"
                "tide.configure{ threads = 1, thread_memory = 64 }\n"
                "local failed, oom = 0, 0\n"
                "tide.run(function()\n"
                "  for i = 1, 30 do\n"
                "    local s = tide.spawn{ mode = 'thread', run = function() error('no') end }:await()\n"
                "    if s == 'error' then failed = failed + 1 end\n"
                "  end\n"
                "end)\n"
                "_G.after_errors = failed\n"
                "return failed == 30"),
     "30 failing jobs");
  int after_errors = collects_on_workers;
  ok(after_errors == 0, "no full collection after them (%d)", after_errors);
  ok(run_lua(L, "local tide = require 'tide'\n"
                "local _, s, v = tide.run(function()\n"
                "  return tide.spawn{ mode = 'thread', run = function()\n"
                "    local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end end }:await()\n"
                "end)\n"
                "print('# ' .. tostring(s) .. ' ' .. tostring(v))\n"
                "return s == 'error' and tostring(v):find('not enough memory', 1, true) ~= nil"),
     "a job that runs out of memory fails with 'not enough memory'");
  ok(collects_on_workers - after_errors == 1, "after it, one full collection (%d)",
     collects_on_workers - after_errors);
  close_tide(L, "collections");
}

int main(void) {
  main_thread = pthread_self();
  failed_inits();
  shutdown_keeps_the_stack();
  worker_state_panic();
  stop_requests_set_no_foreign_hook();
  no_closure_per_callback();
  no_collection_after_failure();
  return tap_done();
}
