/* worker.c — a pool thread's LuaJIT state: creation, the thread-side `tide`, and running a job. */
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "codec.h"

#define TRACE_KEY "tide.trace"     /* registry: traceback of the last error */
#define FNS_KEY   "tide.fns"       /* registry: function cache, by name or bytecode */

/* ===== memory: every state allocates through this, with an optional limit */

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  tide__worker *w = ud;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    free(ptr);
    w->mem -= osize;
    return NULL;
  }
  if (w->limit && nsize > osize && w->mem + (nsize - osize) > w->limit) return NULL;
  void *p = realloc(ptr, nsize);
  if (p != NULL) w->mem = w->mem - osize + nsize;
  return p;
}

#define WORKER_KEY "tide.worker"   /* registry: lightuserdata, this state's worker */

static tide__worker *worker_of(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, WORKER_KEY);
  tide__worker *w = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return w;
}

/* ===== stopping: a hook set from the loop thread, checked by the worker */

/* Raises "cancelled" when the job now running was asked to stop. */
static void check_stop(lua_State *L, tide__worker *w) {
  uint64_t running = atomic_load(&w->running);
  if (running != 0 && atomic_load(&w->stop) == running) luaL_error(L, "cancelled");
}

static void stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);      /* one shot: stale requests cost one hit */
  check_stop(L, worker_of(L));
}

/* Like luajit's own SIGINT handler, this sets a hook on a state that another
 * thread is running: LuaJIT reads the hook fields at its next dispatch. */
void tide__worker_interrupt(tide__worker *w, uint64_t id) {
  atomic_store(&w->stop, id);
  lua_sethook(w->L, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* ===== the thread-side `tide` module */

static int t_now(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e6);
  return 1;
}

/* sleep(ms): blocks this thread, waking every 5 ms to honour a stop request. */
static int t_sleep(lua_State *L) {
  double ms = luaL_checknumber(L, 1);
  luaL_argcheck(L, ms >= 0 && ms < 1e12, 1, "non-negative number of ms expected");
  tide__worker *w = worker_of(L);
  uint64_t end = uv_hrtime() + (uint64_t)(ms * 1e6);
  for (;;) {
    check_stop(L, w);
    uint64_t now = uv_hrtime();
    if (now >= end) break;
    uint64_t ns = end - now < 5000000 ? end - now : 5000000;
    struct timespec ts = { 0, (long)ns };
    nanosleep(&ts, NULL);
  }
  return 0;
}

/* check(): a cancellation point for loops the debug hook cannot reach. */
static int t_check(lua_State *L) {
  check_stop(L, worker_of(L));
  return 0;
}

/* log(...): one line on stderr, "tide[thread N]: " and the tostring'd
 * arguments separated by spaces, written at once so lines never interleave. */
static int t_log(lua_State *L) {
  int n = lua_gettop(L);
  luaL_checkstack(L, 2 * n + 4, "too many arguments to log");
  lua_getglobal(L, "tostring");                          /* n + 1 */
  lua_pushfstring(L, "tide[thread %d]:", worker_of(L)->index);
  for (int i = 1; i <= n; i++) {
    lua_pushliteral(L, " ");
    lua_pushvalue(L, n + 1);
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
  }
  lua_pushliteral(L, "\n");
  lua_concat(L, 2 * n + 2);
  size_t len;
  const char *line = lua_tolstring(L, -1, &len);
  fwrite(line, 1, len, stderr);
  return 0;
}

static const luaL_Reg thread_funcs[] = {
  { "now", t_now }, { "sleep", t_sleep }, { "check", t_check }, { "log", t_log }, { NULL, NULL }
};

/* ===== opening a worker state */

static int open_state(lua_State *L) {
  const tide__pool_config *cfg = lua_touserdata(L, 1);
  tide__worker *w = lua_touserdata(L, 2);
  lua_pushlightuserdata(L, w);
  lua_setfield(L, LUA_REGISTRYINDEX, WORKER_KEY);
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  if (cfg->path) { lua_pushstring(L, cfg->path); lua_setfield(L, -2, "path"); }
  if (cfg->cpath) { lua_pushstring(L, cfg->cpath); lua_setfield(L, -2, "cpath"); }
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  luaL_register(L, NULL, thread_funcs);
  lua_pushinteger(L, w->index);
  lua_setfield(L, -2, "thread");
  lua_setfield(L, -2, "tide");              /* package.loaded.tide */
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, FNS_KEY);
  if (cfg->init) {
    lua_getglobal(L, "require");
    lua_pushstring(L, cfg->init);
    if (lua_pcall(L, 1, 0, 0) != 0)
      snprintf(w->init_error, sizeof w->init_error, "thread_init '%s' failed: %s",
               cfg->init, lua_tostring(L, -1));
  }
  return 0;
}

int tide__worker_open(tide__worker *w, const tide__pool_config *cfg, char *err, size_t errlen) {
  /* LuaJIT's own allocator is faster; ours only when a limit is asked for. */
  w->limit = cfg->memory_limit;
  w->L = w->limit ? lua_newstate(limited_alloc, w) : luaL_newstate();
  if (w->L == NULL) {
    snprintf(err, errlen, "cannot create a Lua state for thread %d", w->index);
    return -1;
  }
  lua_pushcfunction(w->L, open_state);
  lua_pushlightuserdata(w->L, (void *)cfg);
  lua_pushlightuserdata(w->L, w);
  if (lua_pcall(w->L, 2, 0, 0) != 0) {
    snprintf(err, errlen, "cannot set up thread %d: %s", w->index, lua_tostring(w->L, -1));
    lua_close(w->L);
    w->L = NULL;
    return -1;
  }
  return 0;
}

void tide__worker_close(tide__worker *w) {
  if (w->L) lua_close(w->L);
  w->L = NULL;
}

/* ===== running a job */

/* Error handler: records the traceback, keeps the original error value. */
static int on_error(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = lua_isnil(L, 1) ? "nil" : "(error object is not a string)";
  luaL_traceback(L, L, msg, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, TRACE_KEY);
  lua_settop(L, 1);
  return 1;
}

/* Pushes the job's function: cached, or resolved ("mod.fn") or loaded. */
static void push_function(lua_State *L, tide__job *job) {
  lua_getfield(L, LUA_REGISTRYINDEX, FNS_KEY);
  lua_pushlstring(L, job->fn, job->fn_len);
  lua_rawget(L, -2);
  if (!lua_isnil(L, -1)) { lua_remove(L, -2); return; }
  lua_pop(L, 1);
  if (job->fn_is_name) {
    const char *name = job->fn, *dot = strrchr(name, '.');   /* NUL-terminated */
    if (dot == NULL || dot == name || dot[1] == '\0')
      luaL_error(L, "'%s' is not a \"module.function\" name", name);
    lua_getglobal(L, "require");
    lua_pushlstring(L, name, (size_t)(dot - name));
    lua_call(L, 1, 1);
    lua_getfield(L, -1, dot + 1);
    if (!lua_isfunction(L, -1))
      luaL_error(L, "'%s': the module has no function '%s'", name, dot + 1);
    lua_remove(L, -2);                       /* the module */
  } else if (luaL_loadbuffer(L, job->fn, job->fn_len, "=thread task") != 0) {
    lua_error(L);
  }
  lua_pushlstring(L, job->fn, job->fn_len);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4);                         /* cache it */
  lua_remove(L, -2);                         /* the cache table */
}

/* Protected body: function, arguments, call; returns { n = N, ... }. */
static int run_job(lua_State *L) {
  tide__job *job = lua_touserdata(L, 1);
  lua_settop(L, 0);
  push_function(L, job);
  char err[256];
  if (tide__decode(L, job->args, job->args_len, err, sizeof err) != 0)
    return luaL_error(L, "bad arguments: %s", err);
  int n = (int)lua_objlen(L, 2);
  lua_getfield(L, 2, "n");
  if (lua_isnumber(L, -1)) n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  luaL_checkstack(L, n + LUA_MINSTACK, "too many arguments");
  for (int i = 1; i <= n; i++) lua_rawgeti(L, 2, i);
  lua_remove(L, 2);                          /* the argument table */
  lua_call(L, n, LUA_MULTRET);
  int nres = lua_gettop(L);
  lua_createtable(L, nres, 1);
  lua_insert(L, 1);
  for (int i = nres; i >= 1; i--) lua_rawseti(L, 1, i);
  lua_pushinteger(L, nres);
  lua_setfield(L, 1, "n");
  return 1;
}

static char *copy_bytes(const char *s, size_t len) {
  char *p = malloc(len + 1);
  if (p) { memcpy(p, s, len); p[len] = '\0'; }
  return p;
}

/* Encodes the value at the top as the job's result (or, failing that, the
 * encoding error as an error string). */
static void take_result(lua_State *L, tide__job *job, const char *root) {
  tide_buf buf;
  char err[256];
  tide__buf_init(&buf);
  if (tide__encode(L, -1, root, &buf, err, sizeof err) != 0) {
    job->status = TIDE_JOB_ERROR;
    lua_pushstring(L, err);
    tide__encode(L, -1, root, &buf, err, sizeof err);
    if (job->trace == NULL) job->trace = copy_bytes(err, strlen(err));
  }
  job->result = buf.data;
  job->result_len = buf.len;
}

void tide__worker_run(tide__worker *w, tide__job *job) {
  lua_State *L = w->L;
  int top = lua_gettop(L);
  if (w->init_error[0]) {                    /* every job fails like its init */
    job->status = TIDE_JOB_ERROR;
    job->trace = copy_bytes(w->init_error, strlen(w->init_error));
    lua_pushstring(L, w->init_error);
  } else {
    lua_pushcfunction(L, on_error);
    lua_pushcfunction(L, run_job);
    lua_pushlightuserdata(L, job);
    int rc = lua_pcall(L, 1, 1, top + 1);
    job->status = rc == 0 ? TIDE_JOB_OK : TIDE_JOB_ERROR;
    if (rc != 0) {
      lua_gc(L, LUA_GCCOLLECT, 0);           /* the failed job's garbage, before allocating */
      lua_getfield(L, LUA_REGISTRYINDEX, TRACE_KEY);
      const char *tb = lua_tostring(L, -1);
      if (tb == NULL || rc == LUA_ERRMEM) tb = lua_tostring(L, -2);
      if (tb) job->trace = copy_bytes(tb, strlen(tb));
      lua_pop(L, 1);
      lua_pushnil(L);
      lua_setfield(L, LUA_REGISTRYINDEX, TRACE_KEY);
    }
  }
  take_result(L, job, job->status == TIDE_JOB_OK ? "results" : "error");
  lua_settop(L, top);
}
