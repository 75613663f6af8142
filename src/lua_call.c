/* lua_call.c — calling Lua from a libuv callback: one protected call, one traceback handler, one error sink (see lua_call.h). */
#include "lua_call.h"

#include <stdio.h>

#include <lauxlib.h>

/* Registry keys: the addresses of these (light userdata keys allocate nothing). */
static const char HANDLER_KEY, TRAMPOLINE_KEY, REPORT_KEY, REPORTER_KEY, STALL_KEY;

/* ===== the traceback: the one error handler */

const char *tide__error_text(lua_State *L, int idx) {
  int type = lua_type(L, idx);
  if (type == LUA_TSTRING || type == LUA_TNUMBER) return lua_tostring(L, idx);
  if (type == LUA_TNIL || type == LUA_TNONE) return "nil";
  return lua_pushfstring(L, "(error object is a %s value)", lua_typename(L, type));
}

int tide__traceback(lua_State *L) {
  luaL_traceback(L, L, tide__error_text(L, 1), 1);
  return 1;
}

/* ===== the protected bodies */

typedef struct call {
  int fn_ref, nres;            /* the function: registry[fn_ref] ...          */
  const char *fn_key;          /* ... or registry[light userdata fn_key]      */
  tide__push_fn push;
  void *ud;
} call;

/* (light userdata: a call) -> the function's nres results.  Runs protected. */
static int trampoline(lua_State *L) {
  const call *k = lua_touserdata(L, 1);
  lua_pop(L, 1);
  if (k->fn_key) {
    lua_pushlightuserdata(L, (void *)k->fn_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, k->fn_ref);
  }
  int nargs = k->push ? k->push(L, k->ud) : 0;
  lua_call(L, nargs, k->nres);
  return k->nres;
}

/* (light userdata: where, error value): calls the reporter, if one is set,
 * with (where, message, message); true when it did.  Runs protected. */
static int report_body(lua_State *L) {
  const char *where = lua_touserdata(L, 1);
  lua_pushlightuserdata(L, (void *)&REPORTER_KEY);
  lua_rawget(L, LUA_REGISTRYINDEX);                   /* where, err, reporter */
  if (!lua_isfunction(L, -1)) return 0;
  lua_pushstring(L, where);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 2);
  lua_call(L, 3, 0);
  lua_pushboolean(L, 1);
  return 1;
}

/* Pushes registry[key] (a light userdata key): no allocation. */
static void push_registered(lua_State *L, const char *key) {
  lua_pushlightuserdata(L, (void *)key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* Prints the error at the top of L on stderr, allocating nothing: the last
 * resort when the sink itself cannot be called. */
static void print_error(lua_State *L, const char *where, const char *why) {
  const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(not a string)";
  fprintf(stderr, "tide: error in %s%s: %s\n", where, why, msg);
}

/* Tries REPORT_TRIES times: the report allocates, and each allocation may
 * run a finalizer that raises (each such finalizer runs once). */
#define REPORT_TRIES 3

void tide__report(lua_State *L, const char *where) {
  int err = lua_gettop(L);
  for (int i = 0; i < REPORT_TRIES; i++) {
    push_registered(L, &REPORT_KEY);                  /* err, report_body */
    lua_pushlightuserdata(L, (void *)where);
    lua_pushvalue(L, err);                            /* err, body, where, err */
    int rc = lua_pcall(L, 2, 1, 0);
    int reported = rc == 0 && lua_toboolean(L, -1);
    if (rc == 0 || i == REPORT_TRIES - 1) {
      lua_settop(L, err);
      if (!reported)                                  /* no sink registered, or no way to call it */
        print_error(L, where, rc ? " (the error sink could not be called)" : "");
      break;
    }
    lua_settop(L, err);
  }
  lua_settop(L, err - 1);
}

/* ===== calling */

static int call_on(lua_State *L, const call *k, const char *where) {
  int top = lua_gettop(L);
  push_registered(L, &HANDLER_KEY);
  push_registered(L, &TRAMPOLINE_KEY);
  lua_pushlightuserdata(L, (void *)k);
  int rc = lua_pcall(L, 1, k->nres, top + 1);
  if (rc != 0) {
    tide__report(L, where);
    lua_settop(L, top);
    return rc;
  }
  lua_remove(L, top + 1);                             /* the handler */
  return 0;
}

int tide__call(tide__caller *c, int fn_ref, tide__push_fn push, void *ud, int nres,
               const char *where) {
  call k = { fn_ref, nres, NULL, push, ud };
  tide__watchdog_enter(c->wd);
  int rc = call_on(c->L, &k, where);
  uint64_t stalled = tide__watchdog_leave(c->wd);
  if (stalled) tide__report_stall(c->L, c->wd, stalled, 0);
  return rc;
}

/* ===== stalls */

typedef struct stall { double ms; int hooked; } stall;

static int push_stall(lua_State *L, void *ud) {
  const stall *st = ud;
  lua_pushnumber(L, st->ms);
  lua_pushboolean(L, st->hooked);
  return 2;
}

void tide__report_stall(lua_State *L, tide__watchdog *wd, uint64_t ms, int hooked) {
  stall st = { (double)ms, hooked };
  call k = { LUA_NOREF, 1, &STALL_KEY, push_stall, &st };
  int top = lua_gettop(L);
  push_registered(L, &STALL_KEY);
  int set = lua_isfunction(L, -1);
  lua_pop(L, 1);
  if (set && call_on(L, &k, "the watchdog") == 0 && lua_type(L, -1) == LUA_TSTRING)
    tide__watchdog_note(wd, lua_tostring(L, -1));
  lua_settop(L, top);
}

/* ===== setting up */

static void set_registered(lua_State *L, const char *key, lua_CFunction fn) {
  lua_pushlightuserdata(L, (void *)key);
  lua_pushcfunction(L, fn);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

void tide__caller_init(lua_State *L, tide__caller *c, tide__watchdog *wd) {
  set_registered(L, &HANDLER_KEY, tide__traceback);
  set_registered(L, &TRAMPOLINE_KEY, trampoline);
  set_registered(L, &REPORT_KEY, report_body);
  c->wd = wd;
  c->L = lua_newthread(L);
  c->thread_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_checkstack(c->L, LUA_MINSTACK);
}

void tide__caller_free(lua_State *L, tide__caller *c) {
  luaL_unref(L, LUA_REGISTRYINDEX, c->thread_ref);
  c->thread_ref = LUA_NOREF;
  c->L = NULL;
}

/* set_reporter(fn): fn(where, message, traceback) receives the failures. */
static int l_set_reporter(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushlightuserdata(L, (void *)&REPORTER_KEY);
  lua_pushvalue(L, 1);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

/* set_stall_reporter(fn): fn(ms, hooked) -> a line naming what held the loop. */
static int l_set_stall_reporter(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushlightuserdata(L, (void *)&STALL_KEY);
  lua_pushvalue(L, 1);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

void tide__open_call(lua_State *L) {
  lua_pushcfunction(L, l_set_reporter);
  lua_setfield(L, -2, "set_reporter");
  lua_pushcfunction(L, l_set_stall_reporter);
  lua_setfield(L, -2, "set_stall_reporter");
}
