/* lua_procs.c — the Lua binding of child processes (functions proc_* in tide.core); policy is in tide.engine.process. */
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>

#include "bindings.h"
#include "lua_call.h"
#include "procs.h"
#include "tide.h"

#define PROCS_MT  "tide.Procs"
#define PROCS_KEY "tide.procs"       /* registry: the binding's userdata */

/* One child the binding knows, by the number Lua calls it. */
typedef struct entry {
  int cid;
  tide__proc *proc;                  /* NULL once it exited or was closed */
  struct binding *b;
  struct entry *next;
} entry;

typedef struct binding {
  uv_loop_t *loop;
  tide__caller caller;               /* events call Lua through it */
  int event_ref;                     /* on_event(kind, cid, ...) */
  int next_cid;
  entry *list;
} binding;

static binding *get(lua_State *L) {
  return luaL_checkudata(L, lua_upvalueindex(1), PROCS_MT);
}

static entry *find(binding *b, int cid) {
  for (entry *e = b->list; e; e = e->next)
    if (e->cid == cid && e->proc) return e;
  return NULL;
}

static void forget(binding *b, entry *gone) {
  for (entry **pe = &b->list; *pe; pe = &(*pe)->next) {
    if (*pe == gone) { *pe = gone->next; free(gone); return; }
  }
}

/* ===== events: on_event(kind, cid, ...) on the loop thread */

typedef struct pushed { const entry *e; const tide__proc_event *ev; } pushed;

static void push_opt(lua_State *L, const char *s, size_t len) {
  if (s) lua_pushlstring(L, s, len); else lua_pushnil(L);
}

/* The event's arguments; runs protected. */
static int push_event(lua_State *L, void *ud) {
  const pushed *pu = ud;
  const tide__proc_event *ev = pu->ev;
  lua_pushinteger(L, pu->e->cid);
  switch (ev->kind) {
  case TIDE_PROC_READY:
    lua_pushliteral(L, "ready");
    if (ev->init_error) lua_pushstring(L, ev->init_error); else lua_pushnil(L);
    return 3;
  case TIDE_PROC_DONE:
    lua_pushliteral(L, "done");
    lua_pushnumber(L, (lua_Number)ev->id);
    lua_pushboolean(L, ev->ok);
    push_opt(L, ev->result, ev->result_len);
    push_opt(L, ev->trace, ev->trace_len);
    return 6;
  default:
    lua_pushliteral(L, "exit");
    if (ev->status_known) lua_pushnumber(L, (lua_Number)ev->exit_status); else lua_pushnil(L);
    if (ev->term_signal) {
      const char *abbrev = sigabbrev_np(ev->term_signal);
      if (abbrev) lua_pushfstring(L, "SIG%s", abbrev);
      else lua_pushfstring(L, "signal %d", ev->term_signal);
    } else {
      lua_pushnil(L);
    }
    lua_pushlstring(L, ev->tail, ev->tail_len);
    return 5;
  }
}

static void on_event(tide__proc *p, const tide__proc_event *ev, void *data) {
  (void)p;
  entry *e = data;
  binding *b = e->b;
  if (ev->kind == TIDE_PROC_EXIT) e->proc = NULL;    /* gone: no call reaches it any more */
  if (b->event_ref != LUA_NOREF) {
    pushed pu = { e, ev };
    int top = lua_gettop(b->caller.L);
    tide__call(&b->caller, b->event_ref, push_event, &pu, 0, "a process's event");
    lua_settop(b->caller.L, top);
  }
  if (ev->kind == TIDE_PROC_EXIT) forget(b, e);
}

/* ===== tide.core functions (upvalue 1: the binding) */

static const char *opt_string(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  const char *s = lua_tostring(L, -1);            /* kept alive by the table */
  lua_pop(L, 1);
  return s;
}

/* proc_spawn{ file=, args={...}, index=, path=, cpath=, init=, memory_limit= } -> cid | nil, err */
static int l_spawn(lua_State *L) {
  binding *b = get(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "args");
  luaL_argcheck(L, lua_istable(L, -1), 1, "args: table expected");
  int nargs = (int)lua_objlen(L, -1);
  luaL_argcheck(L, nargs >= 1 && nargs < 64, 1, "args: 1 to 63 strings expected");
  char *argv[64];
  for (int i = 1; i <= nargs; i++) {
    lua_rawgeti(L, -1, i);
    argv[i - 1] = (char *)lua_tostring(L, -1);     /* kept alive by the args table */
    lua_pop(L, 1);
    luaL_argcheck(L, argv[i - 1] != NULL, 1, "args: strings expected");
  }
  argv[nargs] = NULL;
  lua_getfield(L, 1, "index");
  lua_getfield(L, 1, "memory_limit");
  lua_Number index = luaL_optnumber(L, -2, 1), limit = luaL_optnumber(L, -1, 0);
  luaL_argcheck(L, limit >= 0 && limit < 1e15, 1, "memory_limit out of range");
  tide__proc_config cfg = {
    .file = opt_string(L, 1, "file"), .args = argv, .index = (int)index,
    .path = opt_string(L, 1, "path"), .cpath = opt_string(L, 1, "cpath"),
    .init = opt_string(L, 1, "init"), .memory_limit = (size_t)limit,
  };
  luaL_argcheck(L, cfg.file != NULL, 1, "file: string expected");
  entry *e = calloc(1, sizeof *e);
  if (e == NULL) return luaL_error(L, "tide: out of memory for a process");
  e->b = b;
  e->cid = ++b->next_cid;
  char err[512];
  if (tide__proc_spawn(b->loop, &cfg, on_event, e, &e->proc, err, sizeof err) != 0) {
    free(e);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  e->next = b->list;
  b->list = e;
  lua_pushinteger(L, e->cid);
  return 1;
}

/* proc_submit(cid, id, fn, fn_is_name, args) -> true | nil, err */
static int l_submit(lua_State *L) {
  binding *b = get(L);
  entry *e = find(b, (int)luaL_checkinteger(L, 1));
  uint64_t id = (uint64_t)luaL_checknumber(L, 2);
  size_t fn_len, args_len;
  const char *fn = luaL_checklstring(L, 3, &fn_len);
  int is_name = lua_toboolean(L, 4);
  const char *args = luaL_checklstring(L, 5, &args_len);
  int rc = e ? tide__proc_submit(e->proc, id, fn, fn_len, is_name, args, args_len) : UV_ESRCH;
  if (rc == 0) { lua_pushboolean(L, 1); return 1; }
  lua_pushnil(L);
  lua_pushstring(L, uv_strerror(rc));
  return 2;
}

/* proc_stop(cid, id), proc_kill(cid) -> true when the signal went */
static int l_stop(lua_State *L) {
  entry *e = find(get(L), (int)luaL_checkinteger(L, 1));
  lua_pushboolean(L, e && tide__proc_stop(e->proc, (uint64_t)luaL_checknumber(L, 2)) == 0);
  return 1;
}

static int l_kill(lua_State *L) {
  entry *e = find(get(L), (int)luaL_checkinteger(L, 1));
  lua_pushboolean(L, e && tide__proc_kill(e->proc) == 0);
  return 1;
}

/* proc_ref(cid, on): whether the child keeps the loop alive */
static int l_ref(lua_State *L) {
  entry *e = find(get(L), (int)luaL_checkinteger(L, 1));
  if (e) tide__proc_ref(e->proc, lua_toboolean(L, 2));
  return 0;
}

static int l_pid(lua_State *L) {
  entry *e = find(get(L), (int)luaL_checkinteger(L, 1));
  if (e) lua_pushinteger(L, tide__proc_pid(e->proc)); else lua_pushnil(L);
  return 1;
}

/* proc_close(cid): kill, reap, and forget it (no event comes). */
static int l_close(lua_State *L) {
  binding *b = get(L);
  entry *e = find(b, (int)luaL_checkinteger(L, 1));
  if (e) { tide__proc_close(e->proc); forget(b, e); }
  return 0;
}

static int l_set_handler(lua_State *L) {
  tide__keep_function(L, 1, &get(L)->event_ref);
  return 0;
}

/* proc_command([so]) -> file, { argv... } | nil, why: how to start a
 * child.  The tide binary starts itself with TIDE_PROC_CHILD_ARG; anywhere
 * else a luajit runs tide.so's tide_process_child, found by the path this
 * very code was loaded from (tide.so in a luajit), or at `so` (a C host
 * that links libtide.a: its own executable cannot be loaded).  Either way
 * the child is a fresh exec: nothing of the parent's state, threads or
 * descriptors comes along. */
static int l_command(lua_State *L) {
  const char *given = luaL_optstring(L, 1, NULL);
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n < 0) return luaL_error(L, "tide: cannot find the running executable (/proc/self/exe)");
  exe[n] = '\0';
  lua_createtable(L, 3, 0);
  if (tide__proc_in_host) {
    lua_pushstring(L, exe);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, 1);
    lua_pushliteral(L, TIDE_PROC_CHILD_ARG);
    lua_rawseti(L, -3, 2);
    lua_insert(L, -2);
    return 2;
  }
  Dl_info info;
  char so[PATH_MAX];
  if (given) {
    if (realpath(given, so) == NULL) return luaL_error(L, "tide: cannot find %s", given);
  } else if (dladdr((void *)tide__proc_child_main, &info) == 0 || info.dli_fname == NULL ||
             realpath(info.dli_fname, so) == NULL) {
    return luaL_error(L, "tide: cannot find the path of tide.so");
  } else if (strcmp(so, exe) == 0) {              /* linked into the host's executable */
    lua_pushnil(L);
    lua_pushfstring(L, "tide is linked into %s, which a child cannot load", exe);
    return 2;
  }
  const char *base = strrchr(exe, '/');
  base = base ? base + 1 : exe;
  if (strncmp(base, "luajit", 6) == 0) lua_pushstring(L, exe); else lua_pushliteral(L, "luajit");
  lua_pushvalue(L, -1);
  lua_rawseti(L, -3, 1);
  lua_pushliteral(L, "-e");
  lua_rawseti(L, -3, 2);
  lua_pushfstring(L, "assert(package.loadlib([==[%s]==], 'tide_process_child'))()", so);
  lua_rawseti(L, -3, 3);
  lua_insert(L, -2);
  return 2;
}

/* The child's entry when tide.so runs in a luajit (see l_command). */
TIDE_API int tide_process_child(lua_State *L) {
  (void)L;
  exit(tide__proc_child_main());
}

static void close_binding(lua_State *L, binding *b) {
  while (b->list) {
    entry *e = b->list;
    if (e->proc) tide__proc_close(e->proc);
    b->list = e->next;
    free(e);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, b->event_ref);
  b->event_ref = LUA_NOREF;
}

static int l_gc(lua_State *L) {
  binding *b = luaL_checkudata(L, 1, PROCS_MT);
  close_binding(L, b);
  tide__caller_free(L, &b->caller);
  return 0;
}

void tide__close_procs(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, PROCS_KEY);
  binding *b = luaL_testudata(L, -1, PROCS_MT);
  if (b) close_binding(L, b);
  lua_pop(L, 1);
}

static const luaL_Reg funcs[] = {
  { "proc_spawn", l_spawn }, { "proc_submit", l_submit }, { "proc_stop", l_stop },
  { "proc_kill", l_kill }, { "proc_ref", l_ref }, { "proc_pid", l_pid }, { "proc_close", l_close },
  { "proc_set_handler", l_set_handler }, { "proc_command", l_command }, { NULL, NULL }
};

void tide__open_procs(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  binding *b = lua_newuserdata(L, sizeof *b);
  *b = (binding){ .loop = loop, .event_ref = LUA_NOREF };
  tide__caller_init(L, &b->caller, wd);
  tide__publish_binding(L, PROCS_MT, l_gc, PROCS_KEY, funcs);
}
