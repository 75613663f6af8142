/* codec_decode.c — decodes the bytes codec.c writes into a Lua state (see codec.h). */
#include "codec.h"
#include "codec_format.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define PREALLOC_MAX (1 << 24)     /* most slots lua_createtable gets up front  */

typedef struct dec {
  lua_State *L;
  const unsigned char *p, *start, *end;
  size_t budget;              /* table slots the input may still claim */
  int depth;                  /* tables open                           */
  int base;                   /* the stack's top before decoding       */
  int strs;                   /* stack index of the table of defined strings, or 0 */
  size_t nstrs;               /* strings defined so far                */
  char *err;
  size_t errlen;
} dec;

/* Writes "bad encoding at byte N: <message>" into err and returns -1. */
static int bad(dec *d, const unsigned char *at, const char *fmt, ...) {
  if (d->errlen == 0) return -1;
  int n = snprintf(d->err, d->errlen, "bad encoding at byte %zu: ",
                   (size_t)(at - d->start));
  if (n > 0 && (size_t)n < d->errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err + n, d->errlen - (size_t)n, fmt, ap);
    va_end(ap);
  }
  return -1;
}

/* A varint of two bytes or more (get_varint has read none of it). */
static int get_long_varint(dec *d, uint64_t *v) {
  const unsigned char *at = d->p;
  uint64_t x = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (d->p == d->end) return bad(d, d->p, "truncated");
    unsigned b = *d->p++;
    x |= (uint64_t)(b & 0x7f) << shift;
    if (b < 0x80) {
      *v = x;
      return 0;
    }
  }
  return bad(d, at, "varint longer than 10 bytes");
}

/* Inlined for the one-byte varints most lengths, counts and references are. */
static inline int get_varint(dec *d, uint64_t *v) {
  if (d->p < d->end && *d->p < 0x80) {
    *v = *d->p++;
    return 0;
  }
  return get_long_varint(d, v);
}

/* dec_value is inlined into the loops of dec_table (most values are not
 * tables: 36.9 M instructions a decoding of bench/threads.lua's table
 * against 39.8 M with a call per value), and dec_table, which it calls for
 * a nested table, is kept out of line. */
__attribute__((always_inline)) static inline int dec_value(dec *d);
static int dec_strdef(dec *d);

/* Decodes n (key, value) pairs into the table on top. */
static int dec_pairs(dec *d, uint64_t n) {
  lua_State *L = d->L;
  for (; n > 0; n--) {
    const unsigned char *at = d->p;
    if (at < d->end && *at == T_NIL) return bad(d, at, "table key is nil");
    if (dec_value(d)) return -1;                      /* key */
    if (*at == T_DOUBLE && isnan(lua_tonumber(L, -1)))
      return bad(d, at, "table key is NaN");
    if (dec_value(d)) return -1;                      /* key, value */
    lua_rawset(L, -3);
  }
  return 0;
}

/* Decodes a table whose tag, at `at`, has been read. */
__attribute__((noinline)) static int dec_table(dec *d, const unsigned char *at) {
  lua_State *L = d->L;
  uint64_t narr, nhash;
  if (d->depth == TIDE_CODEC_DEPTH)
    return bad(d, at, "nesting deeper than %d", TIDE_CODEC_DEPTH);
  if (get_varint(d, &narr) || get_varint(d, &nhash)) return -1;
  if (narr > d->budget || nhash > (d->budget - narr) / 2 || narr > INT_MAX)
    return bad(d, at, "table claims more values than the input holds");
  d->budget -= narr + 2 * nhash;
  if (!lua_checkstack(L, 3)) return bad(d, at, "Lua stack overflow");
  lua_createtable(L, (int)(narr < PREALLOC_MAX ? narr : PREALLOC_MAX),
                  (int)(nhash < PREALLOC_MAX ? nhash : PREALLOC_MAX));
  d->depth++;
  if (dec_pairs(d, nhash)) return -1;
  for (uint64_t i = 1; i <= narr; i++) {
    if (dec_value(d)) return -1;
    lua_rawseti(L, -2, (int)i);
  }
  d->depth--;
  return 0;
}

/* A string defined for later references (T_STRDEF): pushed, and kept in a
 * table made at the first one, below everything decoded (the caller takes
 * it out at the end: dec_done). */
static int dec_strdef(dec *d) {
  lua_State *L = d->L;
  uint64_t n;
  if (get_varint(d, &n)) return -1;
  if (n > (uint64_t)(d->end - d->p)) return bad(d, d->end, "truncated");
  if (!lua_checkstack(L, 2)) return bad(d, d->p, "Lua stack overflow");
  if (d->nstrs >= INT_MAX) return bad(d, d->p, "more than %d strings defined", INT_MAX);
  if (d->strs == 0) {
    lua_createtable(L, 64, 0);
    lua_insert(L, d->base + 1);
    d->strs = d->base + 1;
  }
  lua_pushlstring(L, (const char *)d->p, (size_t)n);
  d->p += n;
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->strs, (int)++d->nstrs);           /* (at most len / 2 of them) */
  return 0;
}

/* Takes the table of defined strings out from under the decoded values. */
static void dec_done(dec *d) {
  if (d->strs) lua_remove(d->L, d->strs);
  d->strs = 0;
}

static inline int dec_value(dec *d) {
  lua_State *L = d->L;
  const unsigned char *at = d->p;
  uint64_t n;
  if (d->p == d->end) return bad(d, at, "truncated");
  switch (*d->p++) {
  case T_NIL: lua_pushnil(L); return 0;
  case T_FALSE: lua_pushboolean(L, 0); return 0;
  case T_TRUE: lua_pushboolean(L, 1); return 0;
  case T_INT:
    if (get_varint(d, &n)) return -1;
    lua_pushnumber(L, n & 1 ? -(lua_Number)(n >> 1) - 1 : (lua_Number)(n >> 1));
    return 0;
  case T_DOUBLE: {
    if (d->end - d->p < 8) return bad(d, d->end, "truncated");
    uint64_t bits = 0;
    lua_Number v;
    for (int i = 0; i < 8; i++) bits |= (uint64_t)d->p[i] << (8 * i);
    memcpy(&v, &bits, 8);
    d->p += 8;
    lua_pushnumber(L, v);
    return 0;
  }
  case T_STRING:
    if (get_varint(d, &n)) return -1;
    if (n > (uint64_t)(d->end - d->p)) return bad(d, d->end, "truncated");
    lua_pushlstring(L, (const char *)d->p, (size_t)n);
    d->p += n;
    return 0;
  case T_STRDEF: return dec_strdef(d);
  case T_STRREF:
    if (get_varint(d, &n)) return -1;
    if (n >= d->nstrs) return bad(d, at, "reference to string %llu, of %zu defined",
                                  (unsigned long long)n, d->nstrs);
    lua_rawgeti(L, d->strs, (int)n + 1);
    return 0;
  case T_TABLE: return dec_table(d, at);
  case T_NULL:
    if (!lua_checkstack(L, 3)) return bad(d, at, "Lua stack overflow");
    tide__push_json_null(L);
    return 0;
  case T_ARRAY:
    if (dec_table(d, at)) return -1;                  /* (the layout after T_TABLE) */
    if (!lua_checkstack(L, 3)) return bad(d, at, "Lua stack overflow");
    tide__push_json_array_mt(L);
    lua_setmetatable(L, -2);
    return 0;
  default: return bad(d, at, "unknown tag 0x%02x", *at);
  }
}

int tide__decode(lua_State *L, const char *data, size_t len, char *err,
                 size_t errlen) {
  int top = lua_gettop(L);
  const unsigned char *p = (const unsigned char *)(data ? data : "");
  dec d = { .L = L, .p = p, .start = p, .end = p + (data ? len : 0),
            .budget = len, .err = err, .errlen = err ? errlen : 0, .base = top };
  if (!lua_checkstack(L, 1)) return bad(&d, p, "Lua stack overflow");
  if (dec_value(&d) == 0) {
    if (d.p == d.end) { dec_done(&d); return 0; }
    bad(&d, d.p, "trailing bytes after the value");
  }
  lua_settop(L, top);
  return -1;
}

/* The count of the list table on top (its field n, or its length), which
 * is popped; -1 when not an integer from 0 to max. */
static lua_Number list_count(lua_State *L, int max) {
  lua_pushliteral(L, "n");
  lua_rawget(L, -2);                                  /* raw: a JSON array (T_ARRAY) has tide.json's metatable */
  lua_Number n = lua_isnil(L, -1) ? (lua_Number)lua_objlen(L, -2)
               : lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
  lua_pop(L, 1);
  return n >= 0 && n <= max && n == (lua_Number)(int)n ? n : -1;
}

int tide__decode_list(lua_State *L, const char *data, size_t len, int max,
                      char *err, size_t errlen) {
  int top = lua_gettop(L);
  const unsigned char *p = (const unsigned char *)(data ? data : "");
  dec d = { .L = L, .p = p, .start = p, .end = p + (data ? len : 0),
            .budget = len, .err = err, .errlen = err ? errlen : 0, .base = top };
  uint64_t narr, nhash, n;
  /* The shape every list has: T_TABLE narr 0|1 ["n" T_INT n], then narr values. */
  if (d.p < d.end && *d.p == T_TABLE) {
    d.p++;
    if (get_varint(&d, &narr) || get_varint(&d, &nhash)) return -1;
    int fast = nhash == 0;
    n = narr;
    if (nhash == 1 && d.end - d.p >= 4 && d.p[0] == T_STRING && d.p[1] == 1 &&
        d.p[2] == 'n' && d.p[3] == T_INT) {
      d.p += 4;
      if (get_varint(&d, &n)) return -1;
      fast = (n & 1) == 0;                            /* zigzag: not negative */
      n >>= 1;
    }
    if (fast && n >= narr && n <= (uint64_t)max && narr <= d.budget) {
      if (!lua_checkstack(L, (int)n + 1)) return bad(&d, p, "Lua stack overflow");
      for (uint64_t i = 0; i < narr; i++)
        if (dec_value(&d)) { lua_settop(L, top); return -1; }
      if (d.p != d.end) {
        lua_settop(L, top);
        return bad(&d, d.p, "trailing bytes after the value");
      }
      dec_done(&d);
      for (uint64_t i = narr; i < n; i++) lua_pushnil(L);
      return (int)n;
    }
  }
  /* Any other table: decoded whole, then unpacked (1 .. n or #). */
  if (tide__decode(L, data, len, err, errlen) != 0) return -1;
  return tide__unpack_list(L, max, err, errlen);
}

int tide__unpack_list(lua_State *L, int max, char *err, size_t errlen) {
  int at = lua_gettop(L);
  lua_Number count = lua_istable(L, at) ? list_count(L, max) : -1;
  if (count < 0 || !lua_checkstack(L, (int)count + 1)) {
    lua_settop(L, at - 1);
    if (err && errlen) snprintf(err, errlen, "not a list of at most %d values", max);
    return -1;
  }
  for (int i = 1; i <= (int)count; i++) lua_rawgeti(L, at, i);
  lua_remove(L, at);
  return (int)count;
}
