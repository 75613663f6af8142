/* fuzz_amqpfields.c — libFuzzer target: an AMQP field table from the wire to Lua and back, until it holds still.
 *
 * fuzz-sources: src/amqp_fields.c
 * fuzz-packages: librabbitmq
 *
 * The input is decoded as a field table by rabbitmq-c (amqp_decode_table,
 * as a broker's arguments and headers are); what decodes is pushed to Lua
 * (tide__amqp_push_table) as V1, built back (tide__amqp_opt_table) and
 * encoded as E1.  V1 may fail to build (a void inside an array leaves a
 * hole), but its error must name the path ("x") and the stack must be as
 * it was.  When it builds, E1 must decode, push as V2, build and encode as
 * E2, and E2 push as V3: V2 and V3 must be equal (numbers bit for bit,
 * strings byte for byte), and so must the properties built from
 * { headers = V2 } and pushed back (tide__amqp_build_props,
 * tide__amqp_push_props).  The first pass may change a value (an 8-bit
 * integer becomes a 64-bit one, -0 becomes 0, a cut table a string); a
 * second pass must not.  Any broken promise aborts, which libFuzzer
 * reports as a crash.
 */
#include "amqp_fields.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static lua_State *L;                   /* one state for every input, for speed */
static char out1[1 << 20], out2[1 << 20];

static void broken(const char *what, const char *err) {
  fprintf(stderr, "fuzz_amqpfields: %s: %s\n", what, err);
  abort();
}

/* Equal as the codec promises: same types, numbers with the same bits,
 * strings with the same bytes, tables with the same keys and values. */
static int same(int a, int b, int depth) {
  if (depth > TIDE_AMQP_FIELDS_DEPTH + 2) broken("a value nested past the cut", "");
  int t = lua_type(L, a);
  if (t != lua_type(L, b)) return 0;
  switch (t) {
    case LUA_TNIL: return 1;
    case LUA_TBOOLEAN: return lua_toboolean(L, a) == lua_toboolean(L, b);
    case LUA_TNUMBER: {
      lua_Number x = lua_tonumber(L, a), y = lua_tonumber(L, b);
      return memcmp(&x, &y, sizeof x) == 0;
    }
    case LUA_TSTRING: {
      size_t n, m;
      const char *s = lua_tolstring(L, a, &n), *r = lua_tolstring(L, b, &m);
      return n == m && memcmp(s, r, n) == 0;
    }
    case LUA_TTABLE: break;
    default: broken("a pushed value of another type", lua_typename(L, t));
  }
  lua_checkstack(L, 4);
  int ok = 1, count = 0;
  lua_pushnil(L);
  while (ok && lua_next(L, a)) {      /* every pair of a is in b */
    count++;
    lua_pushvalue(L, -2);
    lua_rawget(L, b);
    ok = same(lua_gettop(L) - 1, lua_gettop(L), depth + 1);
    lua_pop(L, 2);
  }
  if (!ok) { lua_pop(L, 1); return 0; }
  lua_pushnil(L);
  while (lua_next(L, b)) { count--; lua_pop(L, 1); }   /* and b has no more */
  return count == 0;
}

/* Builds the table at idx and encodes it into out; 0, or -1 with the error. */
static int build(int idx, char *out, size_t *len, const char **err) {
  static tide__amqp_builder bd;
  init_amqp_pool(&bd.pool, 4096);
  amqp_table_t t;
  int top = lua_gettop(L);
  int rc = tide__amqp_opt_table(L, &bd, idx, &t, "x");
  if (lua_gettop(L) != top) broken("a build left the stack changed", bd.err);
  *err = bd.err;
  if (rc == 0) {
    amqp_bytes_t buf = { sizeof out1, out };
    *len = 0;
    if (amqp_encode_table(buf, &t, len) != 0) rc = 1;   /* too large for the buffer: not the codec's fault */
  }
  empty_amqp_pool(&bd.pool);
  return rc;
}

/* Decodes bytes as a field table and pushes it; 0, or -1 (not a table). */
static int push(const char *data, size_t size) {
  amqp_pool_t pool;
  init_amqp_pool(&pool, 4096);
  amqp_table_t t;
  size_t offset = 0;
  int rc = amqp_decode_table((amqp_bytes_t){ size, (void *)data }, &pool, &t, &offset);
  if (rc == 0) tide__amqp_push_table(L, &t);
  empty_amqp_pool(&pool);
  return rc == 0 ? 0 : -1;
}

/* The properties { headers = the table at 1 } built and pushed back hold it unchanged. */
static void props_round_trip(void) {
  static tide__amqp_builder bd;
  init_amqp_pool(&bd.pool, 4096);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "headers");
  amqp_basic_properties_t p;
  if (tide__amqp_build_props(L, &bd, lua_gettop(L), &p) != 0) broken("headers do not build as properties", bd.err);
  if (p._flags != AMQP_BASIC_HEADERS_FLAG) broken("properties other than headers", "");
  tide__amqp_push_props(L, &p);
  empty_amqp_pool(&bd.pool);
  lua_getfield(L, -1, "headers");
  if (!same(1, lua_gettop(L), 0)) broken("headers came back changed", "");
  lua_pop(L, 3);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L && !(L = luaL_newstate())) broken("luaL_newstate", "out of memory");
  lua_settop(L, 0);
  if (push((const char *)data, size) != 0) return 0;
  size_t len1, len2;
  const char *err;
  int rc = build(1, out1, &len1, &err);
  if (rc < 0) {
    if (strncmp(err, "x", 1) != 0) broken("a build error without its path", err);
    return 0;
  }
  if (rc > 0) return 0;
  lua_settop(L, 0);
  if (push(out1, len1) != 0) broken("an encoding does not decode", "");              /* V2 at 1 */
  if (build(1, out2, &len2, &err) != 0) broken("a decoded encoding does not build", err);
  if (push(out2, len2) != 0) broken("a second encoding does not decode", "");        /* V3 at 2 */
  if (!same(1, 2, 0)) broken("a second pass changed the value", "");
  lua_settop(L, 1);
  props_round_trip();
  return 0;
}
