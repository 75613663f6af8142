/* codec_marks.c — tide.json's two markers, which every state has and the codec crosses as themselves (codec.h).
 *
 * tide.json decodes JSON null inside a table as its `null` (a read-only
 * empty table) and gives arrays a metatable of their own (so that `[]`
 * encodes as an array again).  A thread or process task that got such a
 * value through the codec had a plain empty table in their place: its
 * method saw `{}` for null, and what it gave back encoded as `{}`.  Each
 * state keeps its own pair in its registry, made at first use; the codec
 * writes a table whose metatable is one of them as T_NULL or T_ARRAY, and
 * the decoding state puts its own in their place.  tide.json takes the
 * main state's from here (core.json_marks), so they are one and the same.
 */
#include "codec.h"

#include <lauxlib.h>

static char NULL_KEY, ARRAY_KEY;          /* their addresses are the registry's keys */

static int null_tostring(lua_State *L) {
  lua_pushliteral(L, "null");
  return 1;
}

static int null_newindex(lua_State *L) {
  luaL_where(L, 1);                       /* where the assignment is (level 1: the function that assigns), as error(msg, 2) in a Lua __newindex */
  lua_pushliteral(L, "tide.json.null is read-only");
  lua_concat(L, 2);
  return lua_error(L);
}

/* Pushes registry[key], made by make() when absent. */
static void push_mark(lua_State *L, char *key, void (*make)(lua_State *L)) {
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  make(L);
  lua_pushlightuserdata(L, key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

static void make_null(lua_State *L) {
  lua_createtable(L, 0, 0);
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, null_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, null_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_setmetatable(L, -2);
}

static void make_array_mt(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "tide.json.array");
  lua_setfield(L, -2, "__name");
}

void tide__push_json_null(lua_State *L) { push_mark(L, &NULL_KEY, make_null); }

void tide__push_json_array_mt(lua_State *L) { push_mark(L, &ARRAY_KEY, make_array_mt); }

/* The address of registry[key]'s metatable (is_mt: of registry[key]
 * itself), or NULL when it was not made. */
static const void *mark_address(lua_State *L, char *key, int is_mt) {
  const void *p = NULL;
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) {
    if (is_mt) {
      p = lua_topointer(L, -1);
    } else if (lua_getmetatable(L, -1)) {
      p = lua_topointer(L, -1);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  return p;
}

int tide__json_mark_of(lua_State *L, const void *mt, const void **marks) {
  if (marks[0] == NULL && marks[1] == NULL) {
    marks[0] = mark_address(L, &NULL_KEY, 0);
    marks[1] = mark_address(L, &ARRAY_KEY, 1);
    if (marks[0] == NULL && marks[1] == NULL) marks[0] = marks[1] = (const void *)&NULL_KEY;  /* looked: none */
  }
  return mt == marks[0] ? TIDE_MARK_NULL : mt == marks[1] ? TIDE_MARK_ARRAY : 0;
}

/* core.json_marks() -> null, array metatable (tide.json's). */
int tide__l_json_marks(lua_State *L) {
  tide__push_json_null(L);
  tide__push_json_array_mt(L);
  return 2;
}
