/* codec_lj.c — values handed between the threads of one process: LuaJIT's own serializer, tide's codec behind it (codec.h). */
#include "codec.h"
#include "codec_format.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The registry's { encode, decode, encode_list }: string.buffer's
 * stand-alone functions, made in each state from luaopen_string_buffer
 * rather than taken from package.loaded, where a script could have put
 * others, and put_list over that encode. */
static const char LJ_KEY = 0;             /* its address is the key: no string to make */
enum { LJ_ENCODE = 1, LJ_DECODE = 2, LJ_ENCODE_LIST = 3, LJ_ENCODE_BUF = 4, LJ_DECODE_BUF = 5 };

/* Pushes the list { n = n, v1 .. vn } of the values at from .. from + n - 1. */
static void push_list(lua_State *L, int from, int n) {
  lua_createtable(L, n, 1);
  for (int i = 0; i < n; i++) {
    lua_pushvalue(L, from + i);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
}

/* (buffer, v1 .. vn) -> the serializer's bytes for { n = n, v1 .. vn }.
 * Upvalue: the serializer's encode.  Called protected (lj_put): the list
 * table is made where running out of memory fails only this way of
 * encoding. */
static int put_list(lua_State *L) {
  int n = lua_gettop(L) - 1;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  push_list(L, 2, n);
  lua_call(L, 2, 1);
  return 1;
}

/* The decoder makes cdata only once the FFI has its state (else "cannot
 * deserialize"): loads the module as `require "ffi"` would, but from the
 * registry's tables, not through the global `require` (a script's own, or
 * none in a sandbox).  Loaded already, as it nearly always is, nothing
 * runs; without it (a LuaJIT built without the FFI), cdata cannot be
 * decoded, and nothing else changes.  Never raises: a loader that fails
 * leaves the FFI unloaded. */
static void load_ffi(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, LUA_REGISTRYINDEX, "_PRELOAD");
  if (lua_istable(L, -2) && lua_istable(L, -1)) {
    lua_getfield(L, -2, "ffi");
    lua_getfield(L, -2, "ffi");                       /* _LOADED, _PRELOAD, loaded, loader */
    if (lua_isnil(L, -2) && lua_isfunction(L, -1)) {
      lua_pushliteral(L, "ffi");
      if (lua_pcall(L, 1, 1, 0) == 0) {
        if (lua_isnil(L, -1)) { lua_pop(L, 1); lua_pushboolean(L, 1); }
        lua_setfield(L, -4, "ffi");                   /* _LOADED.ffi, as require sets it */
      } else {
        lua_pop(L, 1);                                /* the loader's error */
      }
    } else {
      lua_pop(L, 1);                                  /* the loader */
    }
    lua_pop(L, 1);                                    /* loaded */
  }
  lua_pop(L, 2);
}

/* (buffer.new, null's metatable, the arrays' metatable) -> encode(buffer,
 * v), decode(buffer, s), and a buffer for each: the serializer with
 * tide.json's markers as its metatable dictionary, so that they cross
 * (codec_marks.c).  The buffer is emptied before use, and its memory
 * serves the next value; a nil one (a call made while the kept one is in
 * use: see take_buffer) is made for the call.  decode reads one value,
 * which lj_check found to be all the bytes. */
static const char LJ_FUNCTIONS[] =
  "local new, null_mt, array_mt = ...\n"
  "local options = { metatable = { null_mt, array_mt } }\n"
  "local b = new(options)\n"
  "local reset, encode, get, set, decode = b.reset, b.encode, b.get, b.set, b.decode\n"
  "return function(buf, v) buf = buf or new(options); reset(buf); encode(buf, v); return get(buf) end,\n"
  "  function(buf, s) buf = buf or new(options); set(buf, s); local v = decode(buf); reset(buf); return v end,\n"
  "  b, new(options)\n";

/* Makes the registry's table.  Run by lua_cpcall: nothing it allocates,
 * its own closure included, is made outside the protected call. */
static int open_lj(lua_State *L) {
  load_ffi(L);
  if (luaL_loadbuffer(L, LJ_FUNCTIONS, sizeof LJ_FUNCTIONS - 1, "=tide.codec_lj") != 0) lua_error(L);
  lua_pushcfunction(L, luaopen_string_buffer);
  lua_call(L, 0, 1);                                  /* chunk, the module */
  lua_getfield(L, -1, "new");
  lua_replace(L, -2);                                 /* chunk, new */
  tide__push_json_null(L);
  lua_getmetatable(L, -1);
  lua_replace(L, -2);                                 /* chunk, new, null's metatable */
  tide__push_json_array_mt(L);
  lua_call(L, 3, 4);                                  /* encode, decode, their buffers */
  lua_createtable(L, 5, 0);
  for (int i = 1; i <= 4; i++) {
    lua_pushvalue(L, -6 + i);
    lua_rawseti(L, -2, i == 3 ? LJ_ENCODE_BUF : i == 4 ? LJ_DECODE_BUF : i);
  }
  lua_pushvalue(L, -5);
  lua_pushcclosure(L, put_list, 1);
  lua_rawseti(L, -2, LJ_ENCODE_LIST);
  lua_pushlightuserdata(L, (void *)&LJ_KEY);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Pushes the serializer's function `which`: 0, or -1 (nothing pushed) when
 * it cannot be had (out of memory making it).  Allocates nothing but in a
 * protected call: it never raises.  Needs 3 stack slots. */
static int push_lj(lua_State *L, int which) {
  for (int tries = 0;; tries++) {
    lua_pushlightuserdata(L, (void *)&LJ_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_istable(L, -1)) break;
    lua_pop(L, 1);
    if (tries > 0 || lua_cpcall(L, open_lj, NULL) != 0) {
      if (tries == 0) lua_pop(L, 1);                  /* the error */
      return -1;
    }
  }
  lua_rawgeti(L, -1, which);
  lua_remove(L, -2);
  return 0;
}

/* Pushes the serializer's buffer kept in `slot` (LJ_ENCODE_BUF or
 * LJ_DECODE_BUF), taking it (the slot holds false until give_buffer), or
 * nil when a call under way has it: the collector may run a finalizer
 * between the steps of a call (the value's tables and strings are
 * allocated), which may hand over a value too, and would empty the buffer
 * under the first (finalizer_spec: a thread task got another's
 * arguments).  After push_lj: allocates nothing, never raises.  Needs 2
 * stack slots. */
static void take_buffer(lua_State *L, int slot) {
  lua_pushlightuserdata(L, (void *)&LJ_KEY);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_rawgeti(L, -1, slot);
  if (lua_toboolean(L, -1)) {
    lua_pushboolean(L, 0);
    lua_rawseti(L, -3, slot);                         /* (an array slot that exists: no allocation) */
  } else {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  lua_remove(L, -2);
}

/* Puts back the buffer at idx, if take_buffer gave one.  Never raises. */
static void give_buffer(lua_State *L, int idx, int slot) {
  if (lua_isnil(L, idx)) return;
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  lua_pushlightuserdata(L, (void *)&LJ_KEY);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, idx);
  lua_rawseti(L, -2, slot);
  lua_pop(L, 1);
}

/* ===== ENCODING ===== */

/* Appends T_LUAJIT and the serializer's bytes for the value at the
 * (absolute) index first (n = 1, `which` LJ_ENCODE), or for the list
 * { n = n, ... } of the n values from there (LJ_ENCODE_LIST): 0, or -1
 * when the serializer refuses the value (a function, a cycle, ...) or
 * memory runs out; out is then as it was.  Everything it allocates from L
 * is made in a protected call, but for stack slots past the ENC_STACK
 * tide's codec reserved just before (codec.c), as tide__encode_list grows
 * the stack, and the list of more values than the stack has room to copy. */
static int lj_put(lua_State *L, int which, int first, int n, tide_buf *out) {
  if (!lua_checkstack(L, n + 5)) {
    /* No room for copies of the values (over ~4,000 of them: the stack
     * holds 8,000): the list is made here, where out of memory raises. */
    if (which != LJ_ENCODE_LIST || !lua_checkstack(L, 5)) return -1;
    push_list(L, first, n);
    int rc = lj_put(L, LJ_ENCODE, lua_gettop(L), 1, out);
    lua_pop(L, 1);
    return rc;
  }
  if (push_lj(L, which) != 0) return -1;              /* fn */
  take_buffer(L, LJ_ENCODE_BUF);
  lua_pushvalue(L, -1);
  lua_insert(L, -3);                                  /* buffer, fn, buffer */
  for (int i = 0; i < n; i++) lua_pushvalue(L, first + i);
  int called = lua_pcall(L, n + 1, 1, 0);             /* buffer, bytes | error */
  give_buffer(L, -2, LJ_ENCODE_BUF);
  if (called != 0) {
    lua_pop(L, 2);
    return -1;
  }
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  int rc = tide__buf_reserve(out, len + 1);
  if (rc == 0) {
    out->data[out->len] = T_LUAJIT;
    memcpy(out->data + out->len + 1, s, len);
    out->len += len + 1;
  }
  lua_pop(L, 2);
  return rc;
}

/* Values whose encoding by tide's codec is at most about this long cross
 * in it: it writes them straight from the stack and reads them straight
 * onto it, where the serializer's way costs Lua calls, strings and a list
 * table of its own, about 1 us a round trip.  Past it, tide's codec gives
 * up (having done at most this many bytes' worth) and the serializer takes
 * the value.  A thread task's round trip of records, simulated in one
 * state (args and results, encode and decode): 105 bytes 2.2 us in tide's
 * codec, 2.8 by the serializer; 262 bytes 5.9 against 3.9; 434 bytes 10.2
 * against 7.7 (2026-12-04). */
#define SMALL 256

/* When the serializer refused what tide's codec refused too, or what
 * tide's codec refused for a light userdata or cdata (which the serializer
 * takes): the message says why, naming what cannot cross at all when
 * there is one, not a 64-bit integer met before it (tide__encode_why). */
int tide__encode_local(lua_State *L, int idx, const char *root, tide_buf *out,
                       char *err, size_t errlen) {
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  int rc = tide__encode_within(L, idx, root, out, SMALL, err, errlen);
  if (rc == 0 || lj_put(L, LJ_ENCODE, idx, 1, out) == 0) return 0;  /* large, or cdata, light userdata */
  if (rc == TIDE_CODEC_OVER && tide__encode_unordered(L, idx, root, out, err, errlen) == 0) return 0;
  tide__encode_why(L, idx, -1, root, err, errlen);
  return -1;
}

int tide__encode_list_local(lua_State *L, int first, int n, const char *root,
                            tide_buf *out, char *err, size_t errlen) {
  int top = lua_gettop(L);
  if (first < 0 && first > LUA_REGISTRYINDEX) first = top + first + 1;
  int rc = tide__encode_list_within(L, first, n, root, out, SMALL, err, errlen);
  int valid = n >= 0 && first >= 1 && first + n - 1 <= top;
  if (rc == 0 || (valid && lj_put(L, LJ_ENCODE_LIST, first, n, out) == 0)) return 0;
  if (!valid) return -1;
  if (rc == TIDE_CODEC_OVER && tide__encode_list(L, first, n, root, out, err, errlen) == 0) return 0;
  tide__encode_why(L, first, n, root, err, errlen);
  return -1;
}

/* ===== DECODING ===== */

/* Writes "bad encoding at byte N: <what>" into err and returns -1. */
static int refuse(char *err, size_t errlen, size_t at, const char *what) {
  if (err && errlen) snprintf(err, errlen, "bad encoding at byte %zu: %s", at, what);
  return -1;
}

/* Reads one of the format's prefix-encoded 32-bit numbers at *p:
 * 0..0xdf in one byte, up to 0x1fdf in two, else 0xff and 4 bytes. */
static int get_u(const unsigned char **p, const unsigned char *end, uint32_t *v) {
  const unsigned char *r = *p;
  if (r >= end) return -1;
  uint32_t x = *r++;
  if (x >= 0xe0 && x != 0xff) {
    if (r >= end) return -1;
    x = ((x & 0x1f) << 8) + *r++ + 0xe0;
  } else if (x == 0xff) {
    if (end - r < 4) return -1;
    x = (uint32_t)r[0] | (uint32_t)r[1] << 8 | (uint32_t)r[2] << 16 | (uint32_t)r[3] << 24;
    r += 4;
  }
  *p = r;
  *v = x;
  return 0;
}

/* Checks that data[0..len) is exactly one value in the serializer's format
 * as lj_put writes it (no dictionary entries), tables nested at most
 * TIDE_CODEC_DEPTH deep, and no table counting more values than bytes are
 * left.  LuaJIT's decoder recurses once per table level (Debian 12's stops
 * at 100 levels; this check does not count on a release doing so: deep
 * enough bytes would overflow the C stack) and sizes each table from its
 * counts before reading it; after this check neither can go wrong.
 * `at` is the offset of data in the bytes the caller was given, for the
 * message.  Made for bytes that come from no other process: the tags it
 * lets through include light userdata (a pointer). */
static int lj_check(const char *data, size_t len, size_t at, size_t *nulls, char *err, size_t errlen) {
  const unsigned char *start = (const unsigned char *)data, *p = start, *end = p + len;
  uint64_t left[TIDE_CODEC_DEPTH + 1];          /* values still to read at each level */
  int depth = 0;
  left[0] = 1;                                  /* the value itself */
  for (;;) {
    while (left[depth] == 0) {                  /* the tables read to their end */
      if (depth == 0) goto done;
      depth--;
    }
    left[depth]--;
    const unsigned char *tag_at = p;
    uint32_t tp, a = 0, h = 0;
    size_t skip = 0;
    if (get_u(&p, end, &tp)) return refuse(err, errlen, at + len, "truncated");
    if (tp >= 0x20) {
      skip = tp - 0x20;                         /* a string */
    } else {
      switch (tp) {
      case 0x00: case 0x01: case 0x02: case 0x03: case 0x08: break;  /* nil .. NULL, {} */
      case 0x0e: {                              /* a marker's metatable (0: null, 1: array), */
        uint32_t mt, next;                      /* then its table: the same value            */
        const unsigned char *table_at;
        if (get_u(&p, end, &mt)) return refuse(err, errlen, at + len, "truncated");
        table_at = p;
        if (get_u(&table_at, end, &next)) return refuse(err, errlen, at + len, "truncated");
        if (mt > 1 || next < 0x08 || next > 0x0d)   /* (null's on a full table too: unify_value makes it plain) */
          return refuse(err, errlen, at + (size_t)(tag_at - start), "bad metatable reference");
        *nulls += mt == 0;
        left[depth]++;
        break;
      }
      case 0x04: case 0x06: skip = 4; break;
      case 0x05: case 0x07: case 0x10: case 0x11: skip = 8; break;
      case 0x12: skip = 16; break;
      case 0x09: case 0x0a: case 0x0b: case 0x0c: case 0x0d: {
        if ((tp >= 0x0a && get_u(&p, end, &a)) || ((tp & 1) && get_u(&p, end, &h)))
          return refuse(err, errlen, at + len, "truncated");
        uint64_t n = (tp <= 0x0b ? a : a ? a - 1 : 0) + 2 * (uint64_t)h;
        if (n > (uint64_t)(end - p))
          return refuse(err, errlen, at + (size_t)(tag_at - start), "table counts more values than bytes left");
        if (depth == TIDE_CODEC_DEPTH)
          return refuse(err, errlen, at + (size_t)(tag_at - start), "tables nested too deep");
        left[++depth] = n;
        break;
      }
      default:
        return refuse(err, errlen, at + (size_t)(tag_at - start), "unknown tag");
      }
    }
    if (skip > (size_t)(end - p)) return refuse(err, errlen, at + len, "truncated");
    p += skip;
  }
done:
  if (p != end) return refuse(err, errlen, at + (size_t)(p - start), "trailing bytes after the value");
  return 0;
}

/* Whether the table at (absolute) idx is a copy of null the serializer
 * made: an empty table with null's metatable.  One with null's metatable
 * and contents (a script's: tide.json's null is empty and read-only) is
 * not null, and is made plain, as tide's codec sends it.  Allocates
 * nothing: never raises.  Needs 2 stack slots. */
static int null_copy(lua_State *L, int idx, const void *null_mt) {
  if (!lua_getmetatable(L, idx)) return 0;
  int has = lua_topointer(L, -1) == null_mt;
  lua_pop(L, 1);
  if (!has) return 0;
  lua_pushnil(L);
  if (lua_next(L, idx) == 0) return 1;
  lua_pop(L, 2);                                      /* key, value */
  lua_pushnil(L);
  lua_setmetatable(L, idx);                           /* (nil: no allocation) */
  return 0;
}

/* Puts L's null in place of each copy of it among the values of the table
 * at t, down to `depth` more levels (in tables used as keys too): the
 * serializer makes a new table with null's metatable for each (tide.json's
 * null is one table, compared as one).  A key that is a copy is made a
 * plain table, as tide's codec sends it (a key cannot be replaced without
 * allocating).  Allocates nothing: never raises. */
static void unify_nulls(lua_State *L, int t, const void *null_mt, int depth) {
  if (!lua_checkstack(L, 5)) return;
  lua_pushnil(L);
  while (lua_next(L, t)) {                            /* key, value */
    int top = lua_gettop(L);
    if (lua_istable(L, -2)) {
      if (null_copy(L, top - 1, null_mt)) {
        lua_pushnil(L);
        lua_setmetatable(L, top - 1);                 /* a key: plain */
      }
      if (depth > 0) unify_nulls(L, top - 1, null_mt, depth - 1);
    }
    if (lua_istable(L, -1)) {
      if (null_copy(L, top, null_mt)) {
        lua_pop(L, 1);                                /* key */
        lua_pushvalue(L, -1);
        tide__push_json_null(L);                      /* (made already: it decoded the copies) */
        lua_rawset(L, t);                             /* an existing key: no allocation */
        continue;
      }
      if (depth > 0) unify_nulls(L, top, null_mt, depth - 1);
    }
    lua_pop(L, 1);
  }
}

/* The value on top, decoded from bytes with null's metatable in them: each
 * copy of null, itself included, becomes L's null (and a full table with
 * null's metatable a plain one).  Never raises. */
static void unify_value(lua_State *L) {
  if (!lua_istable(L, -1) || !lua_checkstack(L, 4)) return;
  int v = lua_gettop(L);
  tide__push_json_null(L);                            /* v, null (made already) */
  lua_getmetatable(L, -1);
  const void *null_mt = lua_topointer(L, -1);
  lua_pop(L, 1);                                      /* v, null */
  if (null_copy(L, v, null_mt)) {
    lua_replace(L, v);                                /* null in the copy's place */
    return;
  }
  lua_pop(L, 1);                                      /* v */
  unify_nulls(L, v, null_mt, TIDE_CODEC_DEPTH);
}

/* Checks the serializer's bytes data[0..len) (lj_check), then pushes the
 * value they hold: 0, or -1 with a message in err (nothing pushed).
 * Raises when memory runs out, as tide__decode does. */
static int lj_get(lua_State *L, const char *data, size_t len, size_t at, char *err, size_t errlen) {
  size_t nulls = 0;
  if (lj_check(data, len, at, &nulls, err, errlen)) return -1;
  if (!lua_checkstack(L, 6)) return refuse(err, errlen, 0, "Lua stack overflow");
  if (push_lj(L, LJ_DECODE) != 0) return refuse(err, errlen, 0, "out of memory");
  lua_pushlstring(L, data, len);                      /* fn, s: may raise, so before the buffer is taken */
  take_buffer(L, LJ_DECODE_BUF);                      /* fn, s, buffer */
  lua_insert(L, -3);                                  /* buffer, fn, s */
  lua_pushvalue(L, -3);
  lua_insert(L, -2);                                  /* buffer, fn, buffer, s */
  int rc = lua_pcall(L, 2, 1, 0);                     /* buffer, value | error */
  give_buffer(L, -2, LJ_DECODE_BUF);
  lua_remove(L, -2);
  if (rc == 0) {
    if (nulls) unify_value(L);
    return 0;
  }
  if (rc == LUA_ERRMEM) lua_error(L);     /* "not enough memory" raised again (as a run-time error:
                                           * the API has no other): not the bytes' fault */
  const char *why = lua_tostring(L, -1);
  static const char chunk[] = "tide.codec_lj:";     /* (the position LJ_FUNCTIONS' line gives it) */
  if (why && strncmp(why, chunk, sizeof chunk - 1) == 0 && strstr(why, ": ")) why = strstr(why, ": ") + 2;
  refuse(err, errlen, at, why ? why : "an error");
  lua_pop(L, 1);
  return -1;
}

int tide__decode_local(lua_State *L, const char *data, size_t len, char *err,
                       size_t errlen) {
  if (data == NULL || len == 0 || data[0] != T_LUAJIT)
    return tide__decode(L, data, len, err, errlen);
  return lj_get(L, data + 1, len - 1, 1, err, errlen);
}

int tide__decode_list_local(lua_State *L, const char *data, size_t len, int max,
                            char *err, size_t errlen) {
  if (data == NULL || len == 0 || data[0] != T_LUAJIT)
    return tide__decode_list(L, data, len, max, err, errlen);
  if (lj_get(L, data + 1, len - 1, 1, err, errlen)) return -1;
  return tide__unpack_list(L, max, err, errlen);
}
