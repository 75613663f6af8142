/* lua_threads.c — the Lua binding of the thread pool (functions thread_* in tide.core). */
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "bindings.h"
#include "lua_call.h"
#include "threads.h"

#define THREADS_MT  "tide.Threads"
#define THREADS_KEY "tide.threads"        /* registry: the binding's userdata */

typedef struct binding {
  tide__pool *pool;
  uv_loop_t *loop;
  tide__caller caller;   /* deliveries call Lua through it */
  int done_ref;
  int list_ref;          /* the table a batch of deliveries is handed over in */
} binding;

/* The binding is every function's upvalue, set by tide__open_threads and
 * out of Lua's reach: no type check needed (luaL_checkudata's registry
 * lookup was ~215 instructions of each thread_submit). */
static binding *get(lua_State *L) {
  return lua_touserdata(L, lua_upvalueindex(1));
}

static binding *get_pool(lua_State *L) {
  binding *b = get(L);
  if (b->pool == NULL) luaL_error(L, "tide: the thread pool is not running");
  return b;
}

/* ===== deliveries: one call into Lua per batch of finished jobs
 *
 * The batch is handed over in one table, made once with room for
 * TIDE_POOL_BATCH jobs: list[5i-4 .. 5i] = id, tag, ok, result bytes, trace
 * (or false) of job i.  done(list, n) delivers them in order and counts each
 * one delivered in list[0] (LuaJIT's array part starts at 0: storing there,
 * or anywhere in the array, allocates nothing).  When an error interrupts
 * done (an allocation that ran a finalizer that raised), list[0] says how
 * far it went: the pool tries the job after those again later. */

#define PER_JOB 5        /* list entries per job */

typedef struct batch { tide__job *first; int n; int list_ref; } batch;

/* Fills the list and pushes done's arguments (list, n); runs protected. */
static int push_batch(lua_State *L, void *ud) {
  const batch *bt = ud;
  lua_rawgeti(L, LUA_REGISTRYINDEX, bt->list_ref);
  tide__job *job = bt->first;
  for (int i = 0; i < bt->n; i++, job = job->next) {
    lua_pushnumber(L, (lua_Number)job->id);
    lua_rawseti(L, -2, PER_JOB * i + 1);
    lua_pushinteger(L, (lua_Integer)job->tag);
    lua_rawseti(L, -2, PER_JOB * i + 2);
    lua_pushboolean(L, job->status == TIDE_JOB_OK);
    lua_rawseti(L, -2, PER_JOB * i + 3);
    lua_pushlstring(L, job->result ? job->result : "", job->result ? job->result_len : 0);
    lua_rawseti(L, -2, PER_JOB * i + 4);
    if (job->trace) lua_pushstring(L, job->trace); else lua_pushboolean(L, 0);
    lua_rawseti(L, -2, PER_JOB * i + 5);
  }
  lua_pushinteger(L, bt->n);
  return 2;
}

/* Loop thread: hands n finished jobs to Lua's done(list, n); returns how
 * many were delivered.  None of the list's stores allocates (see above), so
 * none of them can raise outside a protected call. */
static int on_done(tide__pool *pool, tide__job *first, int n, void *data) {
  (void)pool;
  binding *b = data;
  lua_State *L = b->caller.L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, b->list_ref);
  lua_pushinteger(L, 0);
  lua_rawseti(L, -2, 0);                     /* none delivered yet */
  batch bt = { first, n, b->list_ref };
  int rc = tide__call(&b->caller, b->done_ref, push_batch, &bt, 0, "a thread task's delivery");
  int delivered = n;
  if (rc != 0) {
    lua_rawgeti(L, top + 1, 0);
    delivered = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
  }
  for (int i = 0; i < n; i++) {              /* the results may be collected now */
    lua_pushnil(L);                          /* (the other entries hold no object) */
    lua_rawseti(L, top + 1, PER_JOB * i + 4);
    lua_pushnil(L);
    lua_rawseti(L, top + 1, PER_JOB * i + 5);
  }
  lua_settop(L, top);
  return delivered >= 0 && delivered <= n ? delivered : 0;
}

static const char *opt_string(lua_State *L, const char *key) {
  lua_getfield(L, 1, key);
  const char *s = lua_tostring(L, -1);    /* kept alive by the config table */
  lua_pop(L, 1);
  return s;
}

/* thread_start{ threads=, path=, cpath=, init=, memory_limit= }, done -> true | nil, err
 * With the pool started already, only `done` is taken: a second copy of
 * tide's engine (package.loaded cleared, tide required again) takes the
 * deliveries over from the first, retired copy.  Kept, the first copy's
 * done was handed every result of the second's tasks, which never ended
 * (spec/review_r1_spec.lua). */
static int l_start(lua_State *L) {
  binding *b = get(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (b->pool) {
    luaL_unref(L, LUA_REGISTRYINDEX, b->done_ref);  /* the old one first */
    lua_pushvalue(L, 2);
    b->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_getfield(L, 1, "threads");
  lua_getfield(L, 1, "memory_limit");
  lua_Number threads = luaL_checknumber(L, -2), limit = luaL_optnumber(L, -1, 0);
  lua_pop(L, 2);
  luaL_argcheck(L, threads >= 1 && threads <= TIDE_THREADS_MAX, 1, "threads out of range");
  luaL_argcheck(L, limit >= 0 && limit < 1e15, 1, "memory_limit out of range");
  tide__pool_config cfg = {
    .threads = (int)threads, .path = opt_string(L, "path"),
    .cpath = opt_string(L, "cpath"), .init = opt_string(L, "init"),
    .memory_limit = (size_t)limit, .same_process = 1,
  };
  char err[256];
  lua_createtable(L, PER_JOB * TIDE_POOL_BATCH, 0);  /* the deliveries' list */
  int list_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 2);
  int done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  b->pool = tide__pool_start(b->loop, &cfg, on_done, b, err, sizeof err);
  if (b->pool == NULL) {                     /* a failed start keeps no reference */
    luaL_unref(L, LUA_REGISTRYINDEX, list_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, done_ref);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  b->list_ref = list_ref;
  b->done_ref = done_ref;
  lua_pushboolean(L, 1);
  return 1;
}

/* thread_submit(id, tag, fn, fn_is_name, args): tag (0 .. 2^32 - 1) comes back with the result */
static int l_submit(lua_State *L) {
  binding *b = get_pool(L);
  size_t fn_len, args_len;
  uint64_t id = (uint64_t)luaL_checknumber(L, 1);
  lua_Number tag = luaL_checknumber(L, 2);
  luaL_argcheck(L, tag >= 0 && tag <= UINT32_MAX, 2, "tag out of range");
  const char *fn = luaL_checklstring(L, 3, &fn_len);
  int is_name = lua_toboolean(L, 4);
  const char *args = luaL_checklstring(L, 5, &args_len);
  tide__job *job = tide__pool_job_new(b->pool, id, fn, fn_len, is_name, args, args_len);
  if (job == NULL) return luaL_error(L, "tide: out of memory for a thread job");
  job->tag = (uint32_t)tag;
  if (tide__pool_submit(b->pool, job) != 0) {
    tide__pool_job_free(b->pool, job);
    return luaL_error(L, "tide: the thread pool is closing");
  }
  return 0;
}

/* thread_cancel(id) -> 0 unknown, 1 dropped from the queue, 2 asked to stop.
 * Once the pool is closed, 0: its jobs are gone, and a task cancelled then
 * (lua_close cancels the live tasks after the pool's __gc may have run)
 * must still end without an error. */
static int l_cancel(lua_State *L) {
  binding *b = get(L);
  uint64_t id = (uint64_t)luaL_checknumber(L, 1);
  lua_pushinteger(L, b->pool ? tide__pool_cancel(b->pool, id) : 0);
  return 1;
}

/* thread_quarantine(id) -> true when the job's thread was quarantined;
 * false once the pool is closed (as thread_cancel). */
static int l_quarantine(lua_State *L) {
  binding *b = get(L);
  uint64_t id = (uint64_t)luaL_checknumber(L, 1);
  lua_pushboolean(L, b->pool && tide__pool_quarantine(b->pool, id));
  return 1;
}

static int l_stats(lua_State *L) {
  binding *b = get(L);
  tide__pool_stats st = { 0 };
  if (b->pool) tide__pool_stats_get(b->pool, &st);
  lua_createtable(L, 0, 8);
#define FIELD(name) (lua_pushinteger(L, st.name), lua_setfield(L, -2, #name))
  FIELD(size); FIELD(busy); FIELD(idle); FIELD(quarantined);
  FIELD(replaced); FIELD(panicked); FIELD(queued); FIELD(in_flight);
#undef FIELD
  return 1;
}

static int l_cpu_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

static void close_binding(lua_State *L, binding *b) {
  if (b->pool) tide__pool_close(b->pool);
  b->pool = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, b->done_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, b->list_ref);
  b->done_ref = b->list_ref = LUA_NOREF;
}

static int l_gc(lua_State *L) {
  binding *b = luaL_checkudata(L, 1, THREADS_MT);
  close_binding(L, b);
  tide__caller_free(L, &b->caller);
  return 0;
}

/* Closes the pool, if any, before the loop it lives on closes. */
void tide__close_threads(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, THREADS_KEY);
  binding *b = luaL_testudata(L, -1, THREADS_MT);
  if (b) close_binding(L, b);
  lua_pop(L, 1);
}

static const luaL_Reg funcs[] = {
  { "thread_start", l_start }, { "thread_submit", l_submit },
  { "thread_cancel", l_cancel }, { "thread_quarantine", l_quarantine },
  { "thread_stats", l_stats }, { "cpu_count", l_cpu_count }, { NULL, NULL }
};

/* Sets the thread_* functions into the table at the top of the stack. */
void tide__open_threads(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  binding *b = lua_newuserdata(L, sizeof *b);
  *b = (binding){ .loop = loop, .done_ref = LUA_NOREF, .list_ref = LUA_NOREF };
  tide__caller_init(L, &b->caller, wd);
  luaL_newmetatable(L, THREADS_MT);
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, THREADS_KEY);
  luaL_openlib(L, NULL, funcs, 1);         /* pops the userdata: the upvalue */
  lua_pushinteger(L, TIDE_THREADS_MAX);
  lua_setfield(L, -2, "thread_max");
}
