/* worker.c — a pool thread's LuaJIT state: creation, the thread-side `tide`, and running a job. */
#include "worker.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "codec.h"
#include "lua_call.h"

#define TRACE_KEY "tide.trace"     /* registry: traceback of the last error */
#define FNS_KEY   "tide.fns"       /* registry: function cache, by name or bytecode */
#define INDEX_KEY "tide.thread"    /* registry: the worker's index */
#define MAX_ARGS  7000             /* most arguments a job may pass (LUAI_MAXCSTACK is 8000) */
#define MAX_FNS   256              /* functions cached per state: past it the cache starts afresh */

/* The worker this thread runs: the thread-side functions, the hook and the
 * panic function find it here (a worker's state is its thread's alone). */
static _Thread_local tide__worker *self;

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

/* ===== stopping: a hook the worker installs on its own state */

/* Raises "cancelled" when the job now running was asked to stop.  (w is
 * NULL when the state runs Lua on another thread: finalizers at close.) */
static void check_stop(lua_State *L, tide__worker *w) {
  if (w == NULL) return;
  uint64_t running = atomic_load(&w->running);
  if (running != 0 && atomic_load(&w->stop) == running) luaL_error(L, "cancelled");
}

/* Installed once, by the worker's thread, when it makes the state; runs
 * every TIDE_STOP_CHECK_INSTRUCTIONS interpreted instructions (a count hook
 * costs the interpreter next to nothing between calls, and compiled code
 * nothing at all -- nor does it run there). */
static void stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  if (self) check_stop(L, self);
}

void tide__worker_interrupt(tide__worker *w, uint64_t id) {
  atomic_store(&w->stop, id);
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
  uint64_t end = uv_hrtime() + (uint64_t)(ms * 1e6);
  for (;;) {
    check_stop(L, self);
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
  check_stop(L, self);
  return 0;
}

/* log(...): one line on stderr, "tide[thread N]: " and the tostring'd
 * arguments separated by spaces, written at once so lines never interleave. */
static int t_log(lua_State *L) {
  int n = lua_gettop(L);
  luaL_checkstack(L, 2 * n + 4, "too many arguments to log");
  lua_getglobal(L, "tostring");                          /* n + 1 */
  lua_getfield(L, LUA_REGISTRYINDEX, INDEX_KEY);         /* not self: finalizers may run at close */
  lua_pushfstring(L, "tide[thread %d]:", (int)lua_tointeger(L, -1));
  lua_remove(L, -2);
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

/* array([t]) -> t: marks t (or a new table) as a JSON array, as
 * tide.json.array does: it crosses back as one, `[]` when empty. */
static int t_array(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  }
  luaL_argcheck(L, lua_istable(L, 1), 1, "table or nil expected");
  lua_settop(L, 1);
  tide__push_json_array_mt(L);
  lua_setmetatable(L, 1);
  return 1;
}

static const luaL_Reg thread_funcs[] = {
  { "now", t_now }, { "sleep", t_sleep }, { "check", t_check }, { "log", t_log }, { "array", t_array },
  { NULL, NULL }
};

/* ===== failing a job from C (when Lua cannot be used) */

static char *copy_bytes(const char *s, size_t len) {
  char *p = malloc(len + 1);
  if (p) { memcpy(p, s, len); p[len] = '\0'; }
  return p;
}

/* Makes the job an error with this message as its value and trace. */
static void fail_job(tide__job *job, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  tide_buf buf;
  tide__buf_init(&buf);
  tide__encode_string(&buf, msg, strlen(msg));       /* out of memory: an empty result */
  free(job->trace);
  job->status = TIDE_JOB_ERROR;
  tide__job_set_result(job, &buf);
  tide__buf_free(&buf);                      /* what the job did not take over */
  job->trace = copy_bytes(msg, strlen(msg));
}

/* ===== running a job (all inside body(), one protected call) */

/* Error handler of a job: records the traceback, keeps the error value. */
static int on_error(lua_State *L) {
  tide__traceback(L);                                /* err, traceback */
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
    if (!lua_isfunction(L, -1) && lua_istable(L, -2)) {
      /* a job target of the form { methods = {...}, options } */
      lua_pop(L, 1);
      lua_getfield(L, -1, "methods");
      if (lua_istable(L, -1)) lua_getfield(L, -1, dot + 1); else lua_pushnil(L);
      lua_remove(L, -2);                     /* methods */
    }
    if (!lua_isfunction(L, -1))
      luaL_error(L, "'%s': the module has no function '%s'", name, dot + 1);
    lua_remove(L, -2);                       /* the module */
  } else if (luaL_loadbuffer(L, job->fn, job->fn_len, "=thread task") != 0) {
    lua_error(L);
  }
  /* Cache it.  The cache is bounded: a state given ever new functions (a
   * different constant each time) would otherwise keep all of them, and a
   * thread_memory limit then fails every job once it is full. */
  if (self && ++self->nfns > MAX_FNS) {
    self->nfns = 1;
    lua_newtable(L);                         /* fn, cache, fresh */
    lua_replace(L, -3);                      /* fresh, fn */
    lua_pushvalue(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, FNS_KEY);
  }
  lua_pushlstring(L, job->fn, job->fn_len);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4);
  lua_remove(L, -2);                         /* the cache table */
}

/* Raises the error of arguments that are not a list (tide__decode_list
 * said no; this runs only then): which of "not a table" and "a bad n".  */
static int bad_args(lua_State *L, const tide__worker *w, tide__job *job, const char *err) {
  char why[256];
  int rc = w->cfg->same_process ? tide__decode_local(L, job->args, job->args_len, why, sizeof why)
                                : tide__decode(L, job->args, job->args_len, why, sizeof why);
  if (rc != 0)
    return luaL_error(L, "bad arguments: %s", why);
  if (!lua_istable(L, -1)) return luaL_error(L, "bad arguments: a table expected");
  lua_getfield(L, -1, "n");
  if (!lua_isnil(L, -1) || lua_objlen(L, -2) > MAX_ARGS)
    return luaL_error(L, "bad arguments: 'n' must be an integer from 0 to %d", MAX_ARGS);
  return luaL_error(L, "bad arguments: %s", err);
}

/* Protected: (job, worker): function, arguments, call; returns every
 * result.  Arguments and results cross as lists, decoded straight onto the
 * stack, encoded straight from it (take_result); only those with a table
 * among them cross as a table of them, by LuaJIT's serializer when the
 * values stay in this process (codec.h, tide__encode_list_local). */
static int run_job(lua_State *L) {
  tide__job *job = lua_touserdata(L, 1);
  const tide__worker *w = lua_touserdata(L, 2);
  lua_settop(L, 0);
  push_function(L, job);
  char err[256];
  int n = w->cfg->same_process
        ? tide__decode_list_local(L, job->args, job->args_len, MAX_ARGS, err, sizeof err)
        : tide__decode_list(L, job->args, job->args_len, MAX_ARGS, err, sizeof err);
  if (n < 0) return bad_args(L, w, job, err);
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L);
}

/* Encodes the job's result: on ok, the list of the values from stack index
 * `first` to the top (tide__encode_list); on error, the value at the top
 * (tide__encode_unordered); in a thread pool, by their _local twins.
 * Failing that, the encoding error as an error string. */
static void take_result(lua_State *L, tide__worker *w, tide__job *job, int first) {
  tide_buf *buf = &w->out;                   /* the worker's, kept from job to job */
  char err[256];
  buf->len = 0;
  int n = lua_gettop(L) - first + 1;
  int local = w->cfg->same_process, ok = job->status == TIDE_JOB_OK;
  int rc = ok && local ? tide__encode_list_local(L, first, n, "results", buf, err, sizeof err)
         : ok ? tide__encode_list(L, first, n, "results", buf, err, sizeof err)
         : local ? tide__encode_local(L, -1, "error", buf, err, sizeof err)
         : tide__encode_unordered(L, -1, "error", buf, err, sizeof err);   /* only crosses: codec.h */
  if (rc != 0) {
    job->status = TIDE_JOB_ERROR;
    if (job->trace == NULL) job->trace = copy_bytes(err, strlen(err));
    tide__encode_string(buf, err, strlen(err));
  }
  tide__job_set_result(job, buf);
}

/* body(job, worker): runs the job protected and records its outcome.
 * Itself runs protected (tide__worker_run): whatever it allocates may
 * raise (out of memory, a finalizer's error), and then the job is failed
 * from C. */
static int body(lua_State *L) {
  tide__job *job = lua_touserdata(L, 1);
  tide__worker *w = lua_touserdata(L, 2);
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->handler_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->job_ref);
  lua_pushlightuserdata(L, job);
  lua_pushlightuserdata(L, w);
  int rc = lua_pcall(L, 2, LUA_MULTRET, 1);  /* ok: its results from index 2 on */
  job->status = rc == 0 ? TIDE_JOB_OK : TIDE_JOB_ERROR;
  if (rc != 0) {
    /* Out of memory: the failed job's garbage goes before its error is
     * encoded.  Any other failure leaves the collector to its pace (a
     * full collection of a large heap costs a second or more). */
    if (rc == LUA_ERRMEM) lua_gc(L, LUA_GCCOLLECT, 0);
    lua_getfield(L, LUA_REGISTRYINDEX, TRACE_KEY);
    const char *tb = lua_tostring(L, -1);
    if (tb == NULL || rc == LUA_ERRMEM) tb = lua_tostring(L, -2);
    if (tb) job->trace = copy_bytes(tb, strlen(tb));
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, TRACE_KEY);
  }
  take_result(L, w, job, 2);
  return 0;
}

/* A panic: an error with no protected call to catch it.  Cannot happen from
 * the paths above; should it, this jumps back to tide__worker_run. */
static int on_panic(lua_State *L) {
  tide__worker *w = self;
  if (w == NULL || w->panic_at == NULL) return 0;    /* LuaJIT then exits */
  const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "not a string";
  snprintf(w->panic_msg, sizeof w->panic_msg, "%s", msg);
  longjmp(*w->panic_at, 1);
}

void tide__worker_run(tide__worker *w, tide__job *job) {
  self = w;
  if (w->L == NULL) {                        /* after a panic, or a failed open */
    char err[256];
    if (tide__worker_open(w, w->cfg, err, sizeof err) != 0) {
      fail_job(job, "%s", err);
      return;
    }
  }
  if (w->init_error[0]) {                    /* every job fails like its init (the state */
    fail_job(job, "%s", w->init_error);      /* may be full: no Lua needed here)        */
    return;
  }
  if (lua_gethook(w->L) != stop_hook)       /* a job's debug.sethook replaced it */
    lua_sethook(w->L, stop_hook, LUA_MASKCOUNT, TIDE_STOP_CHECK_INSTRUCTIONS);
  jmp_buf at;
  if (setjmp(at) == 0) {
    w->panic_at = &at;
    lua_State *L = w->L;
    lua_settop(L, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->body_ref);
    lua_pushlightuserdata(L, job);
    lua_pushlightuserdata(L, w);
    if (lua_pcall(L, 2, 0, 0) != 0) {
      const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "an error";
      fail_job(job, "thread %d: %s (while running a job)", w->index, msg);
    }
    lua_settop(L, 0);
    w->panic_at = NULL;
    return;
  }
  w->panic_at = NULL;                        /* here from on_panic */
  w->panics++;
  fail_job(job, "thread %d: its Lua state panicked (%s); the state is discarded and made "
                "again for the next job", w->index, w->panic_msg);
  tide__worker_close(w);
}

/* ===== opening a worker state */

/* The thread-side twin of tide.engine.finalizers: a finalizer set through
 * newproxy(true), ffi.gc or ffi.metatype runs protected, and its error is
 * written to stderr (LuaJIT before 2023-04 rethrows it from any
 * allocation, and crashes when that is a trace exit).  Argument: the
 * thread-side tide. */
static const char GUARD_FINALIZERS[] =
  "local tide = ...\n"
  "local xpcall, traceback, rawset, type = xpcall, debug.traceback, rawset, type\n"
  "local function protect(fn)\n"
  "  return function(o)\n"
  "    local ok, err = xpcall(fn, traceback, o)\n"
  "    if not ok then pcall(tide.log, 'error in a __gc finalizer: ' .. tostring(err)) end\n"
  "  end\n"
  "end\n"
  "local guard = { __newindex = function(mt, k, v)\n"
  "  if k == '__gc' and type(v) == 'function' then v = protect(v) end\n"
  "  rawset(mt, k, v)\n"
  "end }\n"
  "local raw_newproxy = newproxy\n"
  "newproxy = function(arg)\n"
  "  local p = raw_newproxy(arg)\n"
  "  if arg == true then setmetatable(getmetatable(p), guard) end\n"
  "  return p\n"
  "end\n"
  "local ok, ffi = pcall(require, 'ffi')\n"
  "if ok then\n"
  "  local raw_gc = ffi.gc\n"
  "  ffi.gc = function(cdata, fn)\n"
  "    if type(fn) == 'function' then fn = protect(fn) end\n"
  "    return raw_gc(cdata, fn)\n"
  "  end\n"
  "  local raw_metatype = ffi.metatype\n"
  "  ffi.metatype = function(ct, mt)\n"
  "    if type(mt) == 'table' and type(rawget(mt, '__gc')) == 'function' then\n"
  "      rawset(mt, '__gc', protect(rawget(mt, '__gc')))\n"
  "    end\n"
  "    return raw_metatype(ct, mt)\n"
  "  end\n"
  "end\n";

/* os.exit on a worker thread: exit() would end the whole process, the loop
 * and every other task with it (a thread task that called it took the
 * process down with its status).  It raises instead: the task ends with an
 * `error` outcome.  (In process mode the child's exit is its own, reported
 * as its death.) */
static int refuse_exit(lua_State *L) {
  return luaL_error(L, "os.exit cannot be called in a thread task: it would end the whole process "
                       "(return, or raise an error, instead)");
}

/* (cfg, worker): libraries, paths, the thread-side tide, init.  Protected. */
static int open_state(lua_State *L) {
  tide__worker *w = lua_touserdata(L, 1);
  const tide__pool_config *cfg = w->cfg;
  lua_settop(L, 0);
  luaL_openlibs(L);
  if (cfg->same_process) {
    lua_getglobal(L, "os");
    lua_pushcfunction(L, refuse_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);                          /* os */
  }
  lua_getglobal(L, "package");
  if (cfg->path) { lua_pushstring(L, cfg->path); lua_setfield(L, -2, "path"); }
  if (cfg->cpath) { lua_pushstring(L, cfg->cpath); lua_setfield(L, -2, "cpath"); }
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  luaL_register(L, NULL, thread_funcs);
  lua_pushinteger(L, w->index);
  lua_setfield(L, -2, "thread");
  tide__push_json_null(L);                  /* what tide.json.null crosses as (codec_marks.c) */
  lua_setfield(L, -2, "null");
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "tide");              /* package.loaded.tide */
  if (luaL_loadbuffer(L, GUARD_FINALIZERS, sizeof GUARD_FINALIZERS - 1, "=tide.finalizers") != 0)
    lua_error(L);
  lua_insert(L, -2);                        /* the chunk, below the thread-side tide */
  lua_call(L, 1, 0);
  lua_settop(L, 0);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, FNS_KEY);
  lua_pushinteger(L, w->index);
  lua_setfield(L, LUA_REGISTRYINDEX, INDEX_KEY);
  lua_pushcfunction(L, body);
  w->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, run_job);
  w->job_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushcfunction(L, on_error);
  w->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_sethook(L, stop_hook, LUA_MASKCOUNT, TIDE_STOP_CHECK_INSTRUCTIONS);   /* init can be stopped */
  if (cfg->init) {
    lua_getglobal(L, "require");
    lua_pushstring(L, cfg->init);
    if (lua_pcall(L, 1, 0, 0) != 0) {
      snprintf(w->init_error, sizeof w->init_error, "thread_init '%s' failed: %s",
               cfg->init, tide__error_text(L, -1));
      lua_settop(L, 0);
      lua_gc(L, LUA_GCCOLLECT, 0);           /* what init left: each job needs room to fail */
    }
  }
  return 0;
}

int tide__worker_open(tide__worker *w, const tide__pool_config *cfg, char *err, size_t errlen) {
  /* LuaJIT's own allocator; a counting one when a limit is asked for.
   * (Not tide__state_alloc: with no cache in front, the C library's
   * allocator alone is slower than LuaJIT's, and a thread left stuck in
   * compiled code at the pool's close keeps its state for ever, which
   * LeakSanitizer then reports.) */
  self = w;
  w->cfg = cfg;
  w->limit = cfg->memory_limit;
  w->mem = 0;
  w->nfns = 0;
  w->init_error[0] = '\0';
  w->L = w->limit ? lua_newstate(limited_alloc, w) : luaL_newstate();
  if (w->L == NULL) {
    snprintf(w->init_error, sizeof w->init_error, "cannot create a Lua state for thread %d%s",
             w->index, w->limit ? " (is thread_memory large enough?)" : "");
    snprintf(err, errlen, "%s", w->init_error);
    return -1;
  }
  lua_atpanic(w->L, on_panic);
  /* While the state is made, `running` says so: the pool's close can stop
   * a thread_init that takes long (tide__worker_interrupt). */
  uint64_t was = atomic_exchange(&w->running, TIDE_WORKER_OPENING);
  /* lua_cpcall makes its function object inside the protection. */
  int rc = lua_cpcall(w->L, open_state, w);
  atomic_store(&w->running, was);
  if (rc != 0) {
    snprintf(w->init_error, sizeof w->init_error, "cannot set up thread %d: %s", w->index,
             lua_type(w->L, -1) == LUA_TSTRING ? lua_tostring(w->L, -1) : "an error");
    snprintf(err, errlen, "%s", w->init_error);
    lua_close(w->L);
    w->L = NULL;
    return -1;
  }
  lua_settop(w->L, 0);
  return 0;
}

void tide__worker_close(tide__worker *w) {
  if (w->L) lua_close(w->L);
  w->L = NULL;
  tide__buf_free(&w->out);
}
