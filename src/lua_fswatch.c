/* lua_fswatch.c — file change watches on the loop (libuv fs events: inotify on Linux), for Lua.
 *
 *   fs_watch(path, fn) -> watch | nil, message
 *                         fn(event) runs on the loop when the file changes:
 *                         event is "change", "rename" (the file was renamed
 *                         or deleted: the watch sees no more changes) or an
 *                         error message
 *   watch:close()         idempotent; also run by __gc and when the loop closes
 *
 * The SQLite job store watches its -wal file with it: every commit of any
 * process writes there, so a worker learns of another process's enqueue
 * without polling (tide.jobs.store.sqlite says how the events are checked).
 *
 * A watch does not keep the loop alive (it is unreferenced).  Its handle
 * belongs to the loop: the memory goes in the close callback, and the
 * userdata points to it (NULL once closed).  Only call these from the loop
 * thread.
 */
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "bindings.h"
#include "lua_call.h"
#include "loop.h"

#define WATCH_MT    "tide.FsWatch"
#define BINDING_MT  "tide.FsWatchBinding"
#define BINDING_KEY "tide.fswatch"           /* registry: the binding's userdata */

typedef struct fwatch fwatch;

typedef struct binding {
  uv_loop_t *loop;       /* NULL once the loop closed */
  tide__caller caller;   /* change callbacks call Lua through it */
  fwatch *watches;       /* every open watch, to close with the loop */
} binding;

struct fwatch {
  uv_fs_event_t handle;  /* first: the handle's address is the watch's */
  binding *b;
  int fn_ref;            /* fn(event), LUA_NOREF once closed */
  fwatch **ud;           /* the userdata's pointer to us, cleared on close */
  fwatch *prev, *next;
};

/* ===== watches ===== */

static void watch_free(uv_handle_t *h) { free(h); }

/* Unlinks and closes w, and releases its callback (its memory goes once
 * libuv is done with the handle). */
static void watch_close(lua_State *L, fwatch *w) {
  binding *b = w->b;
  if (w->prev) w->prev->next = w->next; else b->watches = w->next;
  if (w->next) w->next->prev = w->prev;
  if (w->ud) *w->ud = NULL;                  /* mark the userdata closed */
  luaL_unref(L, LUA_REGISTRYINDEX, w->fn_ref);
  w->fn_ref = LUA_NOREF;
  uv_fs_event_stop(&w->handle);
  tide__close((uv_handle_t *)&w->handle, watch_free);
}

typedef struct event { const char *what; } event;

static int push_event(lua_State *L, void *ud) {
  lua_pushstring(L, ((event *)ud)->what);
  return 1;
}

/* Loop thread: tells Lua's fn(event). */
static void on_event(uv_fs_event_t *h, const char *filename, int events, int status) {
  fwatch *w = (fwatch *)h;
  (void)filename;
  if (w->fn_ref == LUA_NOREF) return;
  event e = { status < 0 ? uv_strerror(status) : (events & UV_RENAME) ? "rename" : "change" };
  lua_State *L = w->b->caller.L;
  int top = lua_gettop(L);
  tide__call(&w->b->caller, w->fn_ref, push_event, &e, 0, "a file watch callback");
  lua_settop(L, top);
}

static binding *get(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(1)); }

/* fs_watch(path, fn) -> watch | nil, message */
static int l_watch(lua_State *L) {
  binding *b = get(L);
  const char *path = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (b->loop == NULL) return luaL_error(L, "tide: the loop is closed");
  fwatch **ud = lua_newuserdata(L, sizeof *ud);   /* first, so that nothing leaks if it raises */
  *ud = NULL;
  luaL_getmetatable(L, WATCH_MT);
  lua_setmetatable(L, -2);
  fwatch *w = calloc(1, sizeof *w);
  if (w == NULL) return luaL_error(L, "fs_watch: out of memory");
  int rc = uv_fs_event_init(b->loop, &w->handle);
  if (rc != 0) free(w);
  else if ((rc = uv_fs_event_start(&w->handle, on_event, path, 0)) != 0) {
    tide__close((uv_handle_t *)&w->handle, watch_free);
  }
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot watch %s: %s", path, uv_strerror(rc));
    return 2;
  }
  uv_unref((uv_handle_t *)&w->handle);
  w->b = b;
  lua_pushvalue(L, 2);
  w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->ud = ud;
  *ud = w;
  w->next = b->watches;
  if (w->next) w->next->prev = w;
  b->watches = w;
  return 1;                                  /* the userdata */
}

/* watch:close() (and __gc) */
static int watch_close_l(lua_State *L) {
  fwatch **ud = luaL_checkudata(L, 1, WATCH_MT);
  if (*ud) watch_close(L, *ud);
  return 0;
}

static int watch_tostring(lua_State *L) {
  fwatch **ud = luaL_checkudata(L, 1, WATCH_MT);
  lua_pushstring(L, *ud ? "tide.FsWatch" : "tide.FsWatch (closed)");
  return 1;
}

static const luaL_Reg watch_methods[] = { { "close", watch_close_l }, { NULL, NULL } };

static const luaL_Reg funcs[] = { { "fs_watch", l_watch }, { NULL, NULL } };

/* Closes every watch (before the loop closes). */
void tide__close_fswatch(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, BINDING_KEY);
  binding *b = luaL_testudata(L, -1, BINDING_MT);
  if (b && b->loop) {
    while (b->watches) watch_close(L, b->watches);
    b->loop = NULL;
    tide__caller_free(L, &b->caller);
  }
  lua_pop(L, 1);
}

/* Sets fs_watch into the table at the top of the stack. */
void tide__open_fswatch(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  tide__new_type(L, WATCH_MT, watch_methods, watch_close_l, watch_tostring);
  binding *b = lua_newuserdata(L, sizeof *b);
  memset(b, 0, sizeof *b);
  b->loop = loop;
  tide__caller_init(L, &b->caller, wd);
  tide__publish_binding(L, BINDING_MT, NULL, BINDING_KEY, funcs);
}
