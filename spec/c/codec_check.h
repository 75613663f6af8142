/* codec_check.h — what test_codec and test_codec_refs share: two states, deep equality across them, round trips and damage. */
#ifndef CODEC_CHECK_H
#define CODEC_CHECK_H

#include "codec.h"

#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"

static lua_State *A, *B;  /* A encodes, B decodes: two independent states */

/* Opens A and B with the standard libraries; 0, or -1 when out of memory. */
static int open_states(void) {
  A = luaL_newstate();
  B = luaL_newstate();
  if (!A || !B) return -1;
  luaL_openlibs(A);
  luaL_openlibs(B);
  return 0;
}

/* Checks that both stacks are empty, closes the states, and ends the TAP run. */
static int close_states(void) {
  ok(lua_gettop(A) == 0 && lua_gettop(B) == 0, "both stacks end empty");
  lua_close(A);
  lua_close(B);
  return tap_done();
}

/* Pushes the value the Lua chunk src returns. */
static void eval(lua_State *L, const char *src) {
  if (luaL_loadstring(L, src) || lua_pcall(L, 0, 1, 0)) {
    printf("Bail out! %s\n", lua_tostring(L, -1));
    exit(2);
  }
}

/* ===== DEEP EQUALITY ACROSS STATES ===== */

static int same(lua_State *a, int ia, lua_State *b, int ib, int depth);

static void push_scalar(lua_State *from, int i, lua_State *to) {
  size_t n;
  const char *s;
  switch (lua_type(from, i)) {
  case LUA_TNUMBER: lua_pushnumber(to, lua_tonumber(from, i)); break;
  case LUA_TBOOLEAN: lua_pushboolean(to, lua_toboolean(from, i)); break;
  case LUA_TSTRING: s = lua_tolstring(from, i, &n); lua_pushlstring(to, s, n); break;
  default: lua_pushnil(to); break;
  }
}

/* Is there a table key in b's table ib equal to a's key ka with an equal value? */
static int find_table_key(lua_State *a, int ka, lua_State *b, int ib, int depth) {
  int found = 0;
  lua_pushnil(b);
  while (!found && lua_next(b, ib)) {                 /* key, value */
    int kb = lua_gettop(b) - 1;
    found = lua_type(b, kb) == LUA_TTABLE && same(a, ka, b, kb, depth + 1) &&
            same(a, ka + 1, b, kb + 1, depth + 1);
    lua_pop(b, found ? 2 : 1);
  }
  return found;
}

static int same_table(lua_State *a, int ia, lua_State *b, int ib, int depth) {
  size_t na = 0, nb = 0;
  int equal = 1;
  if (depth > 2 * TIDE_CODEC_DEPTH || !lua_checkstack(a, 6) || !lua_checkstack(b, 6))
    return 0;
  for (lua_pushnil(b); lua_next(b, ib); lua_pop(b, 1)) nb++;
  lua_pushnil(a);
  while (equal && lua_next(a, ia)) {                  /* key, value */
    int ka = lua_gettop(a) - 1;
    na++;
    if (lua_type(a, ka) == LUA_TTABLE) {
      equal = find_table_key(a, ka, b, ib, depth);
    } else {
      push_scalar(a, ka, b);
      lua_rawget(b, ib);                              /* b: value */
      equal = same(a, ka + 1, b, lua_gettop(b), depth + 1);
      lua_pop(b, 1);
    }
    lua_pop(a, equal ? 1 : 2);
  }
  return equal && na == nb;
}

static int same(lua_State *a, int ia, lua_State *b, int ib, int depth) {
  size_t na, nb;
  const char *sa, *sb;
  if (ia < 0) ia = lua_gettop(a) + ia + 1;
  if (ib < 0) ib = lua_gettop(b) + ib + 1;
  if (lua_type(a, ia) != lua_type(b, ib)) return 0;
  switch (lua_type(a, ia)) {
  case LUA_TNIL: return 1;
  case LUA_TBOOLEAN: return lua_toboolean(a, ia) == lua_toboolean(b, ib);
  case LUA_TNUMBER: {
    double x = lua_tonumber(a, ia), y = lua_tonumber(b, ib);
    return (isnan(x) && isnan(y)) || (x == y && signbit(x) == signbit(y));
  }
  case LUA_TSTRING:
    sa = lua_tolstring(a, ia, &na);
    sb = lua_tolstring(b, ib, &nb);
    return na == nb && memcmp(sa, sb, na) == 0;
  case LUA_TTABLE: return same_table(a, ia, b, ib, depth);
  default: return 0;
  }
}

/* ===== ROUND TRIPS AND DAMAGE ===== */

/* The value src returns, encoded unordered into u and decoded in B, is
 * equal to it, and both encode (sorted, into c1 and c2) to the same bytes.
 * Leaves both stacks as they were. */
__attribute__((unused)) static int unordered_round_trip(const char *src, tide_buf *u, tide_buf *c1, tide_buf *c2,
                                char *err, size_t errlen) {
  eval(A, src);
  u->len = c1->len = c2->len = 0;
  int topb = lua_gettop(B);
  int good = tide__encode_unordered(A, -1, "args", u, err, errlen) == 0 &&
             tide__decode(B, u->data, u->len, err, errlen) == 0 &&
             lua_gettop(B) == topb + 1 && same(A, -1, B, -1, 0) &&
             tide__encode(A, -1, "a", c1, err, errlen) == 0 &&
             tide__encode(B, -1, "b", c2, err, errlen) == 0 &&
             c1->len == c2->len && memcmp(c1->data, c2->data, c1->len) == 0;
  lua_settop(A, 0);
  lua_settop(B, topb);
  return good;
}

/* tide.json's markers, crossed by encode (tide__encode_local or tide__encode)
 * and decode: a value with null (at the top, in arrays and records, as a
 * record's field) and empty and full arrays, `n` records long (large: the
 * thread hand-off's serializer), comes back with B's own null in each
 * place (the same table) and B's arrays' metatable on each array. */
static inline int marks_cross(int n, int (*encode)(lua_State *, int, const char *, tide_buf *, char *, size_t),
                              int (*decode)(lua_State *, const char *, size_t, char *, size_t)) {
  char src[512];
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  tide__push_json_null(A);
  lua_setglobal(A, "null");
  tide__push_json_array_mt(A);
  lua_setglobal(A, "amt");
  snprintf(src, sizeof src,
           "local list = {} "
           "for i = 1, %d do list[i] = { id = i, note = null, tags = setmetatable({}, amt), "
           "  more = setmetatable({ 1, null, 3 }, amt) } end "
           "return { null, list = setmetatable(list, amt), top = null, [2] = 'x' }", n);
  eval(A, src);
  int good = encode(A, -1, "args", &b, err, sizeof err) == 0 &&
             decode(B, b.data, b.len, err, sizeof err) == 0;
  lua_pop(A, 1);
  if (good) {
    lua_setglobal(B, "v");
    tide__push_json_null(B);
    lua_setglobal(B, "null");
    tide__push_json_array_mt(B);
    lua_setglobal(B, "amt");
    snprintf(src, sizeof src,
             "if not (rawequal(v[1], null) and rawequal(v.top, null) and v[2] == 'x' "
             "        and getmetatable(v.list) == amt and #v.list == %d) then return false end "
             "for i, r in ipairs(v.list) do "
             "  if not (r.id == i and rawequal(r.note, null) and getmetatable(r.tags) == amt and next(r.tags) == nil "
             "          and getmetatable(r.more) == amt and r.more[1] == 1 and rawequal(r.more[2], null) "
             "          and r.more[3] == 3) then return false end "
             "end "
             "return tostring(null) == 'null' and not pcall(function() null.x = 1 end)", n);
    good = luaL_loadstring(B, src) == 0 && lua_pcall(B, 0, 1, 0) == 0 && lua_toboolean(B, -1);
    if (!good) snprintf(err, sizeof err, "%s", lua_isstring(B, -1) ? lua_tostring(B, -1) : "not the same");
    lua_settop(B, 0);
  }
  if (!good) printf("# %s\n", err);
  tide__buf_free(&b);
  return good;
}

static uint64_t rng = 0x9e3779b97f4a7c15u;

static uint64_t next_random(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

/* Decodes data into B: -1 with nothing pushed, or 0 with one value pushed. */
static int decode_clean(const char *data, size_t len, char *err, size_t errlen) {
  int top = lua_gettop(B);
  int rc = tide__decode(B, data, len, err, errlen);
  int pushed = lua_gettop(B) - top;
  if (pushed) lua_pop(B, pushed);
  return (rc == 0 && pushed == 1) || (rc == -1 && pushed == 0) ? rc : -2;
}

/* How many of b's prefixes (every `step` bytes) decode, or fail with another
 * message than "bad encoding at byte N": each should be rejected so. */
__attribute__((unused)) static int truncations_accepted(const tide_buf *b, size_t step) {
  char err[256];
  int bad = 0;
  for (size_t n = 0; n < b->len; n += step) {
    int rc = decode_clean(b->data, n, err, sizeof err);
    bad += rc != -1 || strncmp(err, "bad encoding at byte ", 21) != 0;
  }
  return bad;
}

/* Decodes `rounds` copies of b with 1 to 3 random bytes changed, counting
 * those decoded and those rejected (a crash ends the test). */
__attribute__((unused)) static void byte_flips(const tide_buf *b, int rounds, int *decoded, int *rejects) {
  char err[256], *copy = malloc(b->len ? b->len : 1);
  if (copy == NULL) exit(2);
  for (int i = 0; i < rounds && b->len > 0; i++) {
    memcpy(copy, b->data, b->len);
    for (int flips = 1 + (int)(next_random() % 3); flips > 0; flips--)
      copy[next_random() % b->len] ^= (char)(1 + next_random() % 255);
    int rc = decode_clean(copy, b->len, err, sizeof err);
    *decoded += rc == 0, *rejects += rc == -1;
  }
  free(copy);
}

#endif
