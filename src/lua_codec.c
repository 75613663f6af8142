/* lua_codec.c — Lua binding of the value codec: encode(v [, root]) and decode(s). */
#include "codec.h"

#include <lauxlib.h>

#define KEPT_MAX (4 << 20)  /* encode keeps a buffer this big between calls */

static int buffer_gc(lua_State *L) {
  tide__buf_free(lua_touserdata(L, 1));
  return 0;
}

/* encode(v [, root]) -> string.  Raises "<root><path>: <reason>", e.g.
 * "value.cb: functions cannot cross to a thread".  The buffer is an upvalue,
 * reused by every call; encode runs no Lua code, so no call can nest. */
static int l_encode(lua_State *L) {
  tide_buf *b = lua_touserdata(L, lua_upvalueindex(1));
  char err[256];
  luaL_checkany(L, 1);
  const char *root = luaL_optstring(L, 2, "value");
  b->len = 0;
  int rc = tide__encode(L, 1, root, b, err, sizeof err);
  if (rc == 0) lua_pushlstring(L, b->data, b->len);   /* encoding */
  if (b->cap > KEPT_MAX) tide__buf_free(b);
  return rc == 0 ? 1 : luaL_error(L, "%s", err);
}

/* decode(s) -> value, or nil, "bad encoding at byte N: <reason>". */
static int l_decode(lua_State *L) {
  size_t len;
  char err[256];
  luaL_checktype(L, 1, LUA_TSTRING);
  const char *s = lua_tolstring(L, 1, &len);
  if (tide__decode(L, s, len, err, sizeof err) == 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

int tide__open_codec(lua_State *L) {
  tide_buf *b = lua_newuserdata(L, sizeof *b);        /* t, buf */
  tide__buf_init(b);
  if (luaL_newmetatable(L, "tide.CodecBuffer")) {     /* t, buf, mt */
    lua_pushcfunction(L, buffer_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);                            /* t, buf */
  lua_pushcclosure(L, l_encode, 1);                   /* t, encode */
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, l_decode);
  lua_setfield(L, -2, "decode");
  return 0;
}
