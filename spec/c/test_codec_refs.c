/* test_codec_refs.c — TAP tests of the codec's string references (unordered encodings): shapes, random values, late array values. */
#include <time.h>

#include "codec_check.h"

/* Strings met again in an unordered encoding cross as references: the
 * values come back equal, with the same canonical bytes, in shapes where
 * the encoder moves or takes back what it wrote (a table with array values
 * and pairs; array values met late), and the bytes are fewer. */
static void test_references(void) {
  static const struct { const char *desc, *src; } shapes[] = {
    { "keys and values repeated",
      "local t = {} for i = 1, 500 do t[i] = { name = 'n' .. i % 7, city = 'Springfield', "
      "tags = { 'a', 'b', 'a' } } end return t" },
    { "a table with array values and pairs, repeats on both sides",
      "return { 'k', 'k', { 'k', k = 'k' }, k = 'k', kk = { 'k' } }" },
    { "array values met late (set backwards), with repeats",
      "local t = {} for i = 40, 1, -1 do t[i] = 'v' .. i % 3 end t.v1 = 'v2' return { t, t2 = 'v1' }" },
    { "a list whose values the walk meets out of order (keys set in this order), with repeats",
      "local t = {} for _, k in ipairs{ 9,17,27,29,1,5,12,10,34,22,13,18,20,19,14,30,28,25,8,6,24,16,2,"
      "4,33,11,32,31,21,23,15,7,3,26 } do t[k] = 'v' .. k % 3 end return { t, 'v1', 'v2', 'v0' }" },
    { "nested mixed tables",
      "local t = { 'x', x = { 'y', y = { 'x', 'y', x = 'y' } } } return { t, { t2 = t }, 'y', y = 'x' }" },
    { "a task's arguments: records among the values, their strings again in a pair",
      "local r = {} for i = 1, 20 do r[i] = { name = 'x', city = 'y' } end "
      "return { n = 3, r, 'name', 'x', name = { city = 'x', y = 'name' } }" },
    { "array values and 200 pairs (a 2-byte count), strings repeated among both",
      "local t = { 'v', 'v', 'w' } for i = 1, 200 do t['k' .. i] = i % 3 == 0 and 'v' or 'k' .. i % 7 end return t" },
    { "values and pairs both defining, a mixed table among the pairs",
      "return { 'a', 'a', 'b', x = { 'b', 'b', 'a', y = 'a', z = 'b' }, a = 'b', b = 'a', [{ 'a', 'b', a = 'b' }] = 'b' }" },
    { "more distinct strings than the encoder tells apart",
      "local t = {} for i = 1, 5000 do t[i] = { k = 'v' .. i, kk = 'v' .. (i - 1) } end return t" },
  };
  tide_buf u, c1, c2;
  char err[256] = "";
  tide__buf_init(&u);
  tide__buf_init(&c1);
  tide__buf_init(&c2);
  for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
    int good = unordered_round_trip(shapes[i].src, &u, &c1, &c2, err, sizeof err);
    if (!ok(good, "references: %s (%zu bytes, %zu sorted)", shapes[i].desc, u.len, c1.len))
      printf("# %s\n", err);
    if (i == 0) ok(u.len < c1.len / 2, "references: repeated strings cross once (%zu bytes against %zu)",
                   u.len, c1.len);
  }
  /* A task's arguments are { n = N, ... }: array values and one pair.  The
   * records among the values keep their references. */
  eval(A, shapes[0].src);
  u.len = 0;
  tide__encode_unordered(A, -1, "a", &u, NULL, 0);
  size_t alone = u.len;
  lua_createtable(A, 1, 1);
  lua_insert(A, -2);
  lua_rawseti(A, -2, 1);
  lua_pushinteger(A, 1);
  lua_setfield(A, -2, "n");                           /* { n = 1, records } */
  u.len = c1.len = 0;
  tide__encode_unordered(A, -1, "a", &u, NULL, 0);
  tide__encode(A, -1, "a", &c1, NULL, 0);
  lua_pop(A, 1);
  ok(u.len == alone + 8, "references: the arguments { n = 1, records } keep them, 8 bytes more (the header, n = 1): "
     "%zu bytes; %zu the records alone, %zu sorted", u.len, alone, c1.len);
  /* Damage to an encoding full of references: rejected or decoded, never a crash. */
  eval(A, shapes[0].src);
  u.len = 0;
  tide__encode_unordered(A, -1, "a", &u, NULL, 0);
  lua_pop(A, 1);
  int decoded = 0, rejects = 0;
  ok(truncations_accepted(&u, 7) == 0, "references: truncated at every 7th of %zu positions, rejected", u.len);
  byte_flips(&u, 2000, &decoded, &rejects);
  ok(decoded + rejects == 2000, "references: 2000 random byte flips: %d decoded, %d rejected, no crash",
     decoded, rejects);
  tide__buf_free(&u);
  tide__buf_free(&c1);
  tide__buf_free(&c2);
}

/* Random values (fixed seeds): tables of strings that repeat, numbers,
 * booleans and tables as keys and values, with array values set forwards,
 * backwards or after the pairs.  P.gen() makes one; P.copy(v) makes an equal
 * value with every table's keys inserted in another order (and other keys
 * inserted and removed first); arrays are dense, so that # is the same. */
static const char random_values[] =
    "local seed = ... math.randomseed(seed) "
    "local R = math.random "
    "local words = {} "
    "for i = 1, 12 do words[i] = ({ 'id', 'name', 'x', '', 'a\\0b', 'city', 'k' })[i % 7 + 1] .. (i > 7 and i % 11 or '') end "
    "local function str() "
    "  if R(12) == 1 then return 'u' .. R(1e9) elseif R(30) == 1 then return string.rep('L', R(100, 300)) end "
    "  return words[R(#words)] "
    "end "
    "local function scalar() "
    "  local r = R(10) "
    "  if r <= 5 then return str() elseif r == 6 then return R(-1e6, 1e6) elseif r == 7 then return R() * 10 ^ R(-5, 20) "
    "  elseif r == 8 then return R(2) == 1 elseif r == 9 then return -0.0 else return 2 ^ 53 + R(0, 5) * 2 end "
    "end "
    "local gen "
    "local function key(d) "
    "  local r = R(10) "
    "  if r <= 7 then return str() elseif r == 8 then return R(0, 3) + 0.5 elseif r == 9 then return R(2) == 1 end "
    "  return gen(d + 1, true) "
    "end "
    "function gen(d, table) "
    "  if not table and (d >= 4 or R(d + 2) > 2) then return scalar() end "
    "  local t, shape = {}, R(6) "
    "  local na = shape ~= 2 and R(0, 8) or 0 "
    "  local np = shape ~= 1 and R(0, 8) or 0 "
    "  local order = {} for i = 1, na do order[i] = i end "
    "  if shape == 3 then for i = 1, na do order[i] = na + 1 - i end "      /* backwards */
    "  elseif shape == 6 then for i = na, 2, -1 do local j = R(i) order[i], order[j] = order[j], order[i] end end "
    "  if shape ~= 5 then for _, i in ipairs(order) do t[i] = gen(d + 1) end end "
    "  for _ = 1, np do t[key(d)] = gen(d + 1) end "
    "  if shape == 5 then for _, i in ipairs(order) do t[i] = gen(d + 1) end end "   /* after the pairs */
    "  return t "
    "end "
    "local function copy(v) "
    "  if type(v) ~= 'table' then return v end "
    "  local ks, t = {}, {} "
    "  for k in pairs(v) do ks[#ks + 1] = k end "
    "  for i = #ks, 2, -1 do local j = R(i) ks[i], ks[j] = ks[j], ks[i] end "
    "  for i = 1, R(0, 20) do t['junk' .. i] = i end "
    "  for _, k in ipairs(ks) do t[copy(k)] = copy(v[k]) end "
    "  for i = 1, 20 do t['junk' .. i] = nil end "
    "  return t "
    "end "
    "return { gen = function() return gen(0, true) end, copy = copy }";

/* Random values cross unordered and come back equal, with the sorted bytes
 * of the original; their copies built in other orders encode (sorted) to
 * the same bytes; their array values cross as a list one by one. */
static void test_random_values(void) {
  tide_buf u, c1, c2;
  char err[256] = "";
  int bad_unordered = 0, bad_order = 0, bad_list = 0, values = 0;
  tide__buf_init(&u);
  tide__buf_init(&c1);
  tide__buf_init(&c2);
  for (int seed = 1; seed <= 4; seed++) {
    if (luaL_loadstring(A, random_values)) exit(2);
    lua_pushinteger(A, seed);
    if (lua_pcall(A, 1, 1, 0)) { printf("Bail out! %s\n", lua_tostring(A, -1)); exit(2); }
    lua_setglobal(A, "P");
    for (int i = 0; i < 150; i++, values++) {
      if (!unordered_round_trip("P.v = P.gen() return P.v", &u, &c1, &c2, err, sizeof err))
        bad_unordered++, printf("# seed %d, value %d: %s\n", seed, i, err);
      eval(A, "return P.v");
      eval(A, "return P.copy(P.v)");
      c1.len = c2.len = 0;
      if (tide__encode(A, 1, "a", &c1, err, sizeof err) || tide__encode(A, 2, "b", &c2, err, sizeof err) ||
          c1.len != c2.len || memcmp(c1.data, c2.data, c1.len) != 0)
        bad_order++, printf("# seed %d, value %d: another order, other bytes\n", seed, i);
      lua_settop(A, 0);
      eval(A, "return unpack(P.v)");                  /* its array values, as a worker returns them */
      int n = lua_gettop(A);
      u.len = 0;
      if (tide__encode_list(A, 1, n, "results", &u, err, sizeof err) ||
          tide__decode_list(B, u.data, u.len, 100, err, sizeof err) != n)
        bad_list++, printf("# seed %d, value %d: %s\n", seed, i, err);
      else
        for (int j = 1; j <= n; j++) bad_list += !same(A, j, B, j, 0);
      lua_settop(A, 0);
      lua_settop(B, 0);
    }
  }
  lua_pushnil(A);
  lua_setglobal(A, "P");
  ok(bad_unordered == 0, "random values: %d of %d do not cross unordered equal", bad_unordered, values);
  ok(bad_order == 0, "random values: %d of %d copies built in another order encode to other bytes",
     bad_order, values);
  ok(bad_list == 0, "random values: %d of %d lists of array values do not cross equal", bad_list, values);
  tide__buf_free(&u);
  tide__buf_free(&c1);
  tide__buf_free(&c2);
}

/* A table whose array value the walk meets after a pair, nested 26 deep:
 * when each level encoded its contents again after giving up on its first
 * walk, that was 2^26 encodings of the leaf (11 s sorted, 39 s unordered;
 * 40 levels, days).  Each level is encoded once now. */
static void test_late_values_nested(void) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  eval(A, "local function level(child) "
          "  for _, name in ipairs{ 'x', 'y', 'z', 'a', 'b', 'c', 'd', 'e', 'f', 'g' } do "
          "    local t = {} t[name] = child t[1] = 'v' "
          "    if type(next(t)) == 'string' then return t end "   /* the pair first, [1] late */
          "  end "
          "  error('no key the walk meets before [1]') "
          "end "
          "local t = 'leaf' for _ = 1, 26 do t = level(t) end return t");
  for (int sorted = 1; sorted >= 0; sorted--) {
    b.len = 0;
    clock_t t0 = clock();
    int rc = sorted ? tide__encode(A, -1, "a", &b, err, sizeof err)
                    : tide__encode_unordered(A, -1, "a", &b, err, sizeof err);
    double s = (double)(clock() - t0) / CLOCKS_PER_SEC;
    int good = rc == 0 && tide__decode(B, b.data, b.len, err, sizeof err) == 0 && same(A, -1, B, -1, 0);
    lua_settop(B, 0);
    ok(good && s < 1.0, "26 nested tables, each with its array value met late: %s encoding in %.3f s (%zu bytes)",
       sorted ? "sorted" : "unordered", s, b.len);
  }
  lua_pop(A, 1);
  tide__buf_free(&b);
}

int main(void) {
  if (open_states() != 0) return 2;
  test_references();
  test_random_values();
  test_late_values_nested();
  return close_states();
}
