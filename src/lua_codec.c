/* lua_codec.c — Lua binding of the value codec: encode(v [, root]), encode_unordered, encode_local, decode(s), decode_list(s) and their _local twins. */
#include "codec.h"

#include <lauxlib.h>

#define KEPT_MAX (4 << 20)  /* encode keeps a buffer this big between calls */

/* The buffer encode reuses from call to call, and whether a call is using
 * it.  Calls do nest: making the result string may run a step of the
 * collector, the step a __gc finalizer, and the finalizer may call encode
 * (spawning a thread task does).  A nested call finds the buffer busy and
 * uses one of its own. */
typedef struct shared {
  tide_buf buf;
  int busy;
} shared;

/* Busy for good once collected: at lua_close a finalizer that runs after
 * this one may still encode (spawning a task does), and would grow the
 * buffer again with nothing left to free it (ASan: test_codec_local's
 * finalizers leaked it); such a call uses a buffer of its own. */
static int shared_gc(lua_State *L) {
  shared *sh = lua_touserdata(L, 1);
  tide__buf_free(&sh->buf);
  sh->busy = 1;
  return 0;
}

/* (light userdata: a tide_buf) -> its bytes as a string.  Runs protected. */
static int push_bytes(lua_State *L) {
  const tide_buf *b = lua_touserdata(L, 1);
  lua_pushlstring(L, b->data, b->len);
  return 1;
}

enum { SORTED, UNORDERED, LOCAL };  /* encode, encode_unordered, encode_local (codec.h) */

/* encode(v [, root]) -> string.  Raises "<root><path>: <reason>", e.g.
 * "value.cb: functions cannot cross to a thread".  Upvalues: the shared
 * buffer, push_bytes (taken from there, so that nothing is allocated
 * outside the protected call that makes the string: whatever happens in it,
 * the buffer is released, and its error raised again), and which encoding. */
static int l_encode(lua_State *L) {
  shared *sh = lua_touserdata(L, lua_upvalueindex(1));
  int mode = (int)lua_tointeger(L, lua_upvalueindex(3));
  char err[256];
  luaL_checkany(L, 1);
  const char *root = luaL_optstring(L, 2, "value");
  int nested = sh->busy;
  tide_buf own, *b = nested ? &own : &sh->buf;
  tide__buf_init(&own);
  b->len = 0;
  /* Busy from here: encode_local may run finalizers (LuaJIT's serializer
   * steps the collector once its string is made), and one that encodes
   * then writes into a buffer of its own, not into b under this call. */
  sh->busy = 1;
  int rc = mode == SORTED ? tide__encode(L, 1, root, b, err, sizeof err)
         : mode == UNORDERED ? tide__encode_unordered(L, 1, root, b, err, sizeof err)
         : tide__encode_local(L, 1, root, b, err, sizeof err);   /* none of them raises */
  if (rc != 0) {
    sh->busy = nested;
    tide__buf_free(&own);
    return luaL_error(L, "%s", err);
  }
  lua_pushvalue(L, lua_upvalueindex(2));              /* push_bytes */
  lua_pushlightuserdata(L, b);
  rc = lua_pcall(L, 1, 1, 0);
  sh->busy = nested;
  tide__buf_free(&own);
  if (!nested && sh->buf.cap > KEPT_MAX) tide__buf_free(&sh->buf);
  return rc == 0 ? 1 : lua_error(L);
}

/* decode(s) -> value, or nil, "bad encoding at byte N: <reason>".
 * Upvalue: true for decode_local. */
static int l_decode(lua_State *L) {
  size_t len;
  char err[256];
  luaL_checktype(L, 1, LUA_TSTRING);
  const char *s = lua_tolstring(L, 1, &len);
  int rc = lua_toboolean(L, lua_upvalueindex(1)) ? tide__decode_local(L, s, len, err, sizeof err)
                                                 : tide__decode(L, s, len, err, sizeof err);
  if (rc == 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* decode_list(s) -> v1, ..., vN: the values of an encoded list { n = N, ... }
 * (codec.h), without the table.  Raises "bad encoding ..." or "... not a
 * list of at most 7000 values" (a C function returns at most 8000). */
#define LIST_MAX 7000

static int l_decode_list(lua_State *L) {
  size_t len;
  char err[256];
  luaL_checktype(L, 1, LUA_TSTRING);
  const char *s = lua_tolstring(L, 1, &len);
  int n = lua_toboolean(L, lua_upvalueindex(1))
        ? tide__decode_list_local(L, s, len, LIST_MAX, err, sizeof err)
        : tide__decode_list(L, s, len, LIST_MAX, err, sizeof err);
  return n >= 0 ? n : luaL_error(L, "%s", err);
}

int tide__open_codec(lua_State *L) {
  lua_pushcfunction(L, tide__l_json_marks);
  lua_setfield(L, -2, "json_marks");
  shared *sh = lua_newuserdata(L, sizeof *sh);        /* t, shared */
  tide__buf_init(&sh->buf);
  sh->busy = 0;
  if (luaL_newmetatable(L, "tide.CodecBuffer")) {     /* t, shared, mt */
    lua_pushcfunction(L, shared_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);                            /* t, shared */
  lua_pushcfunction(L, push_bytes);                   /* t, shared, push_bytes */
  static const char *const encoders[] = { "encode", "encode_unordered", "encode_local" };
  for (int mode = SORTED; mode <= LOCAL; mode++) {
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_pushinteger(L, mode);                         /* t, shared, push_bytes, shared, push_bytes, mode */
    lua_pushcclosure(L, l_encode, 3);                 /* t, shared, push_bytes, encode */
    lua_setfield(L, -4, encoders[mode]);
  }
  lua_pop(L, 2);                                      /* t */
  for (int local = 0; local <= 1; local++) {
    lua_pushboolean(L, local);
    lua_pushcclosure(L, l_decode, 1);
    lua_setfield(L, -2, local ? "decode_local" : "decode");
    lua_pushboolean(L, local);
    lua_pushcclosure(L, l_decode_list, 1);
    lua_setfield(L, -2, local ? "decode_list_local" : "decode_list");
  }
  return 0;
}
