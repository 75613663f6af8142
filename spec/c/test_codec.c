/* test_codec.c — TAP tests of the value codec: round trips between two states, refusals, damaged bytes. */
#include <stdarg.h>

#include "codec_check.h"

/* ===== ROUND TRIPS ===== */

/* Encodes the value src returns in A, decodes it in B, compares them, and
 * checks that B's copy encodes to the same bytes.  Leaves the copy on B. */
static int round_trip(const char *desc, const char *src) {
  tide_buf b1, b2;
  char err[256] = "";
  int topa, topb, good;
  tide__buf_init(&b1);
  tide__buf_init(&b2);
  eval(A, src);
  topa = lua_gettop(A);
  topb = lua_gettop(B);
  good = tide__encode(A, -1, "args", &b1, err, sizeof err) == 0 &&
         lua_gettop(A) == topa &&
         tide__decode(B, b1.data, b1.len, err, sizeof err) == 0 &&
         lua_gettop(B) == topb + 1 && same(A, -1, B, -1, 0) &&
         tide__encode(B, -1, "copy", &b2, err, sizeof err) == 0 &&
         b1.len == b2.len && memcmp(b1.data, b2.data, b1.len) == 0;
  if (!ok(good, "round trip: %s", desc)) printf("# %s\n", err);
  lua_pop(A, 1);
  tide__buf_free(&b1);
  tide__buf_free(&b2);
  return good;
}

/* Round trip, then the Lua chunk check, run in B with the copy as `...`, must return true. */
static void round_trip_check(const char *desc, const char *src, const char *check) {
  if (!round_trip(desc, src)) {
    lua_pop(B, 1);
    return;
  }
  if (luaL_loadstring(B, check)) exit(2);
  lua_insert(B, -2);                                  /* check, copy */
  int good = lua_pcall(B, 1, 1, 0) == 0 && lua_toboolean(B, -1);
  if (!ok(good, "%s: %s", desc, check)) printf("# %s\n", lua_tostring(B, -1));
  lua_pop(B, 1);
}

static const struct { const char *desc, *src; } cases[] = {
    { "nil", "return nil" },
    { "true", "return true" },
    { "false", "return false" },
    { "zero", "return 0" },
    { "negative zero keeps its sign", "return -0.0" },
    { "small integers", "return {1, -1, 63, -64, 127, 128, -129, 16383, 16384}" },
    { "2^53 and -2^53", "return {2^53, -2^53, 2^53 - 1}" },
    { "beyond 2^53", "return {2^53 + 2, -2^53 - 2, 2^63, 2^64, -2^63}" },
    { "fractions", "return {0.1, -2.5, 1/3, 1e-300}" },
    { "NaN", "return 0/0" },
    { "+inf and -inf", "return {1/0, -1/0}" },
    { "denormal and extreme doubles", "return {5e-324, 1.7976931348623157e308}" },
    { "empty string", "return ''" },
    { "string with NUL bytes", "return 'a\\0b\\0\\0c\\0'" },
    { "every byte value", "local t = {} for i = 0, 255 do t[#t + 1] = string.char(i) end "
                          "return table.concat(t)" },
    { "1 MB string", "return string.rep('0123456789abcdef', 65536)" },
    { "empty table", "return {}" },
    { "array", "return {1, 2, 3, 'four', true}" },
    { "mixed array and hash", "return {1, 2, 3, x = 1, y = 'z', [true] = false, n = {}}" },
    { "sparse array", "return {[1] = 1, [1000] = 2, [-5] = 3, [0] = 4, [1e9] = 5}" },
    { "array with holes", "return {1, nil, 3, nil, nil, 6}" },
    { "number keys", "return {[1.5] = 'a', [-0.25] = 'b', [2^53] = 'c', [1/0] = 'd', "
                     "[-1/0] = 'e', [2^60] = 'f'}" },
    { "boolean keys", "return {[true] = 1, [false] = 0}" },
    { "binary string keys", "return {['a\\0b'] = 1, [''] = 2, ['odd key'] = 3}" },
    { "table keys", "return {[{1, 2}] = 'pair', [{k = {}}] = {v = 1}}" },
    { "table keys with equal contents", "return {[{a = {}}] = true, [{a = {}}] = 'v', [{}] = 1, [{}] = 2, [{0}] = 3, [{0}] = 3}" },
    { "nested records", "return {user = {name = 'ada', langs = {'lua', 'c'}, "
                        "addr = {city = 'London', zip = 'N1'}}, n = 2}" },
    { "100 levels of nesting", "local t = {} local c = t for i = 2, 100 do c[1] = {} "
                               "c = c[1] end c.leaf = true return t" },
    { "large table", "local t = {} for i = 1, 20000 do t[i] = {id = i, s = 'item' .. i, "
                     "f = i / 7, tags = {'a', 'b'}} t['k' .. i] = i end return t" },
    { "200 pairs (a 2-byte count) beside array values",
      "local t = {1, 2, 3} for i = 1, 200 do t['k' .. i] = {i} end return t" },
};

static void test_round_trips(void) {
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    if (round_trip(cases[i].desc, cases[i].src)) lua_pop(B, 1);
  }
  round_trip_check("negative zero", "return -0.0", "return 1 / ... == -1/0");
  round_trip_check("a shared table", "local s = {1} return {s, s, x = s}",
                   "local t = ... return t[1] ~= t[2] and t[1] ~= t.x and t[2][1] == 1");
  round_trip_check("holes", "return {1, nil, 3}",
                   "local t = ... return t[1] == 1 and t[2] == nil and t[3] == 3");
}

/* tide__encode_unordered: every case decodes to an equal value, which
 * encodes (sorted) to the bytes the original does; errors are the same. */
static void test_unordered(void) {
  tide_buf u, c1, c2;
  char err[256] = "";
  int bad = 0;
  tide__buf_init(&u);
  tide__buf_init(&c1);
  tide__buf_init(&c2);
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    if (!unordered_round_trip(cases[i].src, &u, &c1, &c2, err, sizeof err))
      bad++, printf("# unordered %s: %s\n", cases[i].desc, err);
  ok(bad == 0, "unordered: %zu cases decode to equal values, with the same sorted bytes",
     sizeof cases / sizeof *cases);
  eval(A, "return {1, {x = {cb = print}}}");
  u.len = 0;
  int rc = tide__encode_unordered(A, -1, "args", &u, err, sizeof err);
  ok(rc == -1 && u.len == 0 && strcmp(err, "args[2].x.cb: functions cannot cross to a thread") == 0,
     "unordered: the same path error, nothing written");
  lua_pop(A, 1);
  eval(A, "local t = {} for i = 1, 300 do t['k' .. i] = i end return t");
  u.len = 0;
  tide__encode_unordered(A, -1, "a", &u, NULL, 0);
  c1.len = 0;
  tide__encode(A, -1, "a", &c1, NULL, 0);
  ok(u.len == c1.len && memcmp(u.data, c1.data, u.len) != 0,
     "unordered: the pairs in walk order, not sorted (same length, other bytes)");
  lua_pop(A, 1);
  tide__buf_free(&u);
  tide__buf_free(&c1);
  tide__buf_free(&c2);
}

/* The same contents built in different orders encode to the same bytes. */
static void test_canonical(void) {
  tide_buf b1, b2;
  char err[256] = "";
  tide__buf_init(&b1);
  tide__buf_init(&b2);
  eval(A, "local t = {} for i = 1, 300 do t['k' .. i] = i t[i + 0.5] = i end return t");
  eval(A, "local t = {} for i = 300, 1, -1 do t[i + 0.5] = i t['k' .. i] = i end "
          "for i = 1, 100 do t['x' .. i] = true end "
          "for i = 1, 100 do t['x' .. i] = nil end return t");
  int good = tide__encode(A, -2, "a", &b1, err, sizeof err) == 0 &&
             tide__encode(A, -1, "b", &b2, err, sizeof err) == 0 &&
             b1.len == b2.len && memcmp(b1.data, b2.data, b1.len) == 0;
  ok(good, "equal tables built in different orders encode to equal bytes");
  lua_pop(A, 2);
  b1.len = b2.len = 0;
  eval(A, "local t = {} t[{a = {}}] = true t[{a = {}}] = 'v' return t");
  eval(A, "local t = {} t[{a = {}}] = 'v' t[{a = {}}] = true return t");
  good = tide__encode(A, -2, "a", &b1, err, sizeof err) == 0 &&
         tide__encode(A, -1, "b", &b2, err, sizeof err) == 0 &&
         b1.len == b2.len && memcmp(b1.data, b2.data, b1.len) == 0;
  ok(good, "table keys that encode alike are ordered by their values");
  lua_pop(A, 2);
  b2.len = 0;
  eval(A, "return {z = 1, a = 2, m = 3}");
  good = tide__encode(A, -1, "a", &b2, err, sizeof err) == 0;
  ok(good && b2.len > 0 && (unsigned char)b2.data[0] == 6,
     "a table encodes to tag 6 followed by its counts");
  lua_pop(A, 1);
  tide__buf_free(&b1);
  tide__buf_free(&b2);
}

/* ===== REFUSALS ===== */

static void refused(const char *src, const char *want) {
  tide_buf b;
  char err[1024] = "";
  tide__buf_init(&b);
  eval(A, src);
  int top = lua_gettop(A);
  int rc = tide__encode(A, top, "args", &b, err, sizeof err);
  if (!ok(rc == -1 && strcmp(err, want) == 0 && lua_gettop(A) == top && b.len == 0,
          "refused: %s", want))
    printf("# got %d \"%s\"\n", rc, err);
  lua_pop(A, 1);
  tide__buf_free(&b);
}

static void test_refusals(void) {
  lua_newuserdata(A, 8);
  lua_setglobal(A, "ud");
  lua_pushlightuserdata(A, &tests);
  lua_setglobal(A, "lud");
  refused("return print", "args: functions cannot cross to a thread");
  refused("return {1, {cb = function() end}}", "args[2].cb: functions cannot cross to a thread");
  refused("return {u = ud}", "args.u: userdata cannot cross to a thread");
  refused("return {lud}", "args[1]: light userdata cannot cross to a thread");
  refused("return {co = coroutine.create(print)}", "args.co: coroutines cannot cross to a thread");
  refused("return {c = require('ffi').new('int[1]')}", "args.c: cdata cannot cross to a thread");
  refused("return {n = require('ffi').new('int64_t', 1)}", "args.n: cdata cannot cross to a thread");
  refused("local t = {a = {b = {}}} t.a.b = t return t", "args.a.b: cycle (table refers to itself)");
  refused("local t = {} t.self = t return t", "args.self: cycle (table refers to itself)");
  refused("local t = {} t[1] = {t} return t", "args[1][1]: cycle (table refers to itself)");
  refused("local t = {} t[t] = 1 return t",
          "args: cycle (table refers to itself) (in a table key)");
  refused("return {['odd key'] = {f = print}}", "args[\"odd key\"].f: functions cannot cross to a thread");
  refused("return {['say \"hi\"\\\\'] = print}",
          "args[\"say \\\"hi\\\"\\\\\"]: functions cannot cross to a thread");
  refused("return {['a\\0b\\n'] = print}", "args[\"a\\000b\\010\"]: functions cannot cross to a thread");
  refused("return {['1a'] = print}", "args[\"1a\"]: functions cannot cross to a thread");
  refused("return {['a-b'] = print}", "args[\"a-b\"]: functions cannot cross to a thread");
  refused("return {[string.rep('k', 41)] = print}",
          "args[\"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...\"]: functions cannot cross to a thread");
  refused("return {[1.5] = print}", "args[1.5]: functions cannot cross to a thread");
  refused("return {[-3] = print}", "args[-3]: functions cannot cross to a thread");
  refused("return {[10] = print}", "args[10]: functions cannot cross to a thread");
  refused("return {[true] = {print}}", "args[true][1]: functions cannot cross to a thread");
  refused("return {[{}] = {f = print}}", "args[table].f: functions cannot cross to a thread");
  refused("return {[print] = 1}", "args: functions cannot cross to a thread (in a table key)");
  refused("return {a = {[{f = print}] = 1}}",
          "args.a: functions cannot cross to a thread (in a table key)");

  char deep[512] = "args";
  for (int i = 0; i < TIDE_CODEC_DEPTH; i++) strcat(deep, "[1]");
  strcat(deep, ": nesting deeper than 100");
  refused("local t = {} local c = t for i = 1, 100 do c[1] = {} c = c[1] end return t", deep);
}

/* Failure leaves out as it was; a short err buffer is cut, never overrun. */
static void test_refusal_edges(void) {
  tide_buf b;
  char err[8];
  tide__buf_init(&b);
  eval(A, "return 'kept'");
  eval(A, "return {1, 2, {3, print}}");
  int rc = tide__encode(A, -2, "x", &b, err, sizeof err);
  size_t len = b.len;
  rc |= tide__encode(A, -1, "args", &b, err, sizeof err) != -1;
  ok(rc == 0 && b.len == len && memcmp(b.data + len - 4, "kept", 4) == 0,
     "a failed encode leaves the buffer's length as it was");
  ok(strcmp(err, "args[3]") == 0, "a short error buffer is cut and terminated");
  ok(tide__encode(A, -1, NULL, &b, NULL, 0) == -1, "a NULL error buffer is allowed");
  char err64[64];
  eval(A, "local t = {} local c = t for i = 1, 100 do c[1] = {} c = c[1] end return t");
  tide__encode(A, -1, "args", &b, err64, sizeof err64);
  if (!ok(strcmp(err64, "args[1]...[1][1][1][1][1][1][1][1][1]: nesting deeper than 100") == 0,
          "a path too long for the buffer is elided, the reason kept"))
    printf("# got \"%s\"\n", err64);
  lua_pop(A, 1);
  lua_pop(A, 2);
  ok(tide__encode(A, 1, "args", &b, err, sizeof err) == 0 && lua_gettop(A) == 0,
     "an empty stack slot encodes as nil");
  tide__buf_free(&b);
}

/* ===== DAMAGED BYTES ===== */

static void rejected(const char *desc, const char *data, size_t len, const char *want) {
  char err[256] = "";
  int rc = decode_clean(data, len, err, sizeof err);
  if (!ok(rc == -1 && strcmp(err, want) == 0, "rejected: %s", desc))
    printf("# got %d \"%s\"\n", rc, err);
}

static void test_malformed(void) {
  char deep[2 * 3 * TIDE_CODEC_DEPTH + 8];
  size_t n = 0;
  rejected("empty input", "", 0, "bad encoding at byte 0: truncated");
  rejected("unknown tag", "\x09", 1, "bad encoding at byte 0: unknown tag 0x09");
  rejected("reference before any definition", "\x08\x00", 2,
           "bad encoding at byte 0: reference to string 0, of 0 defined");
  rejected("reference past the definitions", "\x06\x02\x00\x07\x01" "a" "\x08\x01", 8,
           "bad encoding at byte 6: reference to string 1, of 1 defined");
  rejected("definition longer than the input", "\x07\x0a" "abc", 5, "bad encoding at byte 5: truncated");
  ok(decode_clean("\x06\x02\x00\x07\x01" "a" "\x08\x00", 8, NULL, 0) == 0,
     "a definition, then a reference to it, decode");
  rejected("reference of 2^64 - 1", "\x06\x02\x00\x07\x01" "a" "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 17,
           "bad encoding at byte 6: reference to string 18446744073709551615, of 1 defined");
  rejected("a definition, then bad bytes: the table of definitions goes too", "\x06\x02\x00\x07\x01" "a" "\x09", 7,
           "bad encoding at byte 6: unknown tag 0x09");
  rejected("a definition cut short inside a table key", "\x06\x00\x01\x07\x05" "ab", 7, "bad encoding at byte 7: truncated");
  ok(decode_clean("\x07\x01" "a", 3, NULL, 0) == 0 && decode_clean("\x06\x00\x02\x07\x01" "k" "\x08\x00\x06\x00\x01\x08\x00\x08\x00\x02", 16, NULL, 0) == 0,
     "a definition at the top; one in a key, referred to as a value and as a key in a nested table, decode");
  /* the same bytes as a list: a definition then bad bytes leave nothing; references decode to the values */
  int top = lua_gettop(B);
  char lerr[256] = "";
  int n1 = tide__decode_list(B, "\x06\x02\x00\x07\x01" "a" "\x09", 7, 10, lerr, sizeof lerr);
  int left = lua_gettop(B) - top;
  int n2 = tide__decode_list(B, "\x06\x03\x00\x07\x01" "a" "\x08\x00\x06\x00\x01\x08\x00\x08\x00", 15, 10, lerr, sizeof lerr);
  int values = n2 == 3 && lua_gettop(B) == top + 3 && lua_istable(B, -1);
  if (values) lua_getfield(B, -1, "a");               /* 'a', 'a', { a = 'a' }, 'a' */
  for (int i = -4; values && i <= -1; i += i == -3 ? 2 : 1)
    values = lua_type(B, i) == LUA_TSTRING && strcmp(lua_tostring(B, i), "a") == 0;
  ok(n1 == -1 && left == 0 && values,
     "decode_list: a definition then bad bytes push nothing; definitions and references push the values only");
  lua_settop(B, top);
  rejected("trailing bytes", "\x00\x00", 2, "bad encoding at byte 1: trailing bytes after the value");
  rejected("string longer than the input", "\x05\x0a" "abc", 5, "bad encoding at byte 5: truncated");
  rejected("short double", "\x04\x00\x00", 3, "bad encoding at byte 3: truncated");
  rejected("nil key", "\x06\x00\x01\x00\x02", 5, "bad encoding at byte 3: table key is nil");
  rejected("NaN key", "\x06\x00\x01\x04\x00\x00\x00\x00\x00\x00\xf8\x7f\x02", 13,
           "bad encoding at byte 3: table key is NaN");
  rejected("count beyond the input", "\x06\xff\xff\xff\xff\x0f\x00", 7,
           "bad encoding at byte 0: table claims more values than the input holds");
  rejected("hash count beyond the input", "\x06\x00\x03\x02\x02", 5,
           "bad encoding at byte 0: table claims more values than the input holds");
  rejected("varint of 11 bytes", "\x03\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", 12,
           "bad encoding at byte 1: varint longer than 10 bytes");
  for (int i = 0; i <= TIDE_CODEC_DEPTH; i++) deep[n++] = 6, deep[n++] = 1, deep[n++] = 0;
  deep[n++] = 0;
  rejected("101 nested tables", deep, n, "bad encoding at byte 300: nesting deeper than 100");
  ok(decode_clean(deep + 3, n - 3, NULL, 0) == 0, "100 nested tables decode");
  ok(decode_clean("\x04\x00\x00\x00\x00\x00\x00\xf0\x3f", 9, NULL, 0) == 0 &&
     decode_clean("\x03\x80\x00", 3, NULL, 0) == 0,
     "non-canonical numbers (1.0 as a double, a padded varint) decode");
  tide__decode(B, "\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11, NULL, 0);
  ok(lua_tonumber(B, -1) == -9223372036854775808.0, "the largest varint decodes as -2^63");
  lua_pop(B, 1);
}

/* A value with every supported type, encoded: the victim of the damage tests. */
static void rich_encoding(tide_buf *b) {
  eval(A, "return {1, -2, 2^53, 0.5, -0.0, 0/0, 1/0, 'str', 'a\\0b', true, false, {}, "
          "{x = {y = {z = 'deep', n = {300, 70000}}}}, [1.5] = 'f', [true] = 1, "
          "key = 'value', [{}] = 'table key', s = string.rep('x', 200)}");
  if (tide__encode(A, -1, "args", b, NULL, 0)) exit(2);
  lua_pop(A, 1);
}

static void test_damage(void) {
  tide_buf b;
  char err[256], copy[4096];
  int decoded = 0, rejects = 0;
  tide__buf_init(&b);
  rich_encoding(&b);
  ok(decode_clean(b.data, b.len, err, sizeof err) == 0, "the undamaged encoding decodes");
  ok(truncations_accepted(&b, 1) == 0, "truncated at each of %zu positions: rejected", b.len);
  byte_flips(&b, 50000, &decoded, &rejects);
  ok(decoded + rejects == 50000, "50000 random byte flips: %d decoded, %d rejected, no crash",
     decoded, rejects);
  decoded = rejects = 0;
  for (int i = 0; i < 50000; i++) {
    size_t len = next_random() % 64;
    for (size_t j = 0; j < len; j++) copy[j] = (char)(next_random() % 8);  /* mostly tags */
    int rc = decode_clean(copy, len, err, sizeof err);
    decoded += rc == 0, rejects += rc == -1;
  }
  ok(decoded + rejects == 50000, "50000 random short inputs: %d decoded, %d rejected, no crash",
     decoded, rejects);
  tide__buf_free(&b);
}

/* ===== LISTS FROM THE STACK (tide__encode_list) ===== */

/* Encodes the values src returns (as a list, from the stack), decodes them
 * with tide__decode_list in B and checks them with `check`, a function of
 * (n, ...) run in B. */
static void list_check(const char *desc, const char *src, const char *check) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  int base = lua_gettop(A);
  if (luaL_loadstring(A, src) || lua_pcall(A, 0, LUA_MULTRET, 0)) { printf("Bail out! %s\n", lua_tostring(A, -1)); exit(2); }
  int n = lua_gettop(A) - base;
  lua_pushliteral(A, "not part of the list");          /* the list stops where it is told */
  int top = lua_gettop(A);
  int rc = tide__encode_list(A, base + 1, n, "results", &b, err, sizeof err);
  int balanced = lua_gettop(A) == top;
  lua_settop(A, base);
  eval(B, check);
  int fn = lua_gettop(B);
  int got = rc == 0 ? tide__decode_list(B, b.data, b.len, 7000, err, sizeof err) : -1;
  int good = rc == 0 && balanced && got == n && lua_pcall(B, got, 1, 0) == 0 && lua_toboolean(B, -1);
  if (!ok(good, "encode_list: %s", desc)) printf("# rc %d, got %d of %d: %s\n", rc, got, n, err);
  lua_settop(B, fn - 1);
  tide__buf_free(&b);
}

static void test_lists(void) {
  list_check("no values", "return", "return function(...) return select('#', ...) == 0 end");
  list_check("values of every kind, holes and trailing nils kept",
             "return 1, nil, 'x', { a = { 2 } }, false, nil, nil",
             "return function(...) local v = { n = select('#', ...), ... } "
             "return v.n == 7 and v[1] == 1 and v[2] == nil and v[3] == 'x' and v[4].a[1] == 2 "
             "and v[5] == false and v[6] == nil and v[7] == nil end");
  list_check("a thousand values", "local t = {} for i = 1, 1000 do t[i] = i * 1.5 end return unpack(t)",
             "return function(...) if select('#', ...) ~= 1000 then return false end "
             "for i = 1, 1000 do if select(i, ...) ~= i * 1.5 then return false end end return true end");
  list_check("values whose strings repeat (references), holes kept",
             "return 'r', { r = 'r', { 'r' } }, nil, 'r', { s = 'r' }",
             "return function(...) local v = { n = select('#', ...), ... } "
             "return v.n == 5 and v[1] == 'r' and v[2].r == 'r' and v[2][1][1] == 'r' and v[3] == nil "
             "and v[4] == 'r' and v[5].s == 'r' end");
  /* the same bytes tide__decode reads as the table { n = N, ... } */
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  lua_pushinteger(A, 5);
  lua_pushnil(A);
  lua_pushstring(A, "y");
  int rc = tide__encode_list(A, -3, 3, "results", &b, err, sizeof err);
  lua_settop(A, 0);
  rc = rc == 0 ? tide__decode(B, b.data, b.len, err, sizeof err) : rc;
  eval(B, "return function(t) return t.n == 3 and t[1] == 5 and t[2] == nil and t[3] == 'y' end");
  lua_insert(B, -2);
  ok(rc == 0 && lua_pcall(B, 1, 1, 0) == 0 && lua_toboolean(B, -1),
     "encode_list: the bytes of the table { n = 3, 5, nil, 'y' }, negative index given");
  lua_settop(B, 0);
  /* refusals name the value by its place in the list, and leave nothing */
  b.len = 0;
  eval(A, "return 1");
  eval(A, "return { cb = print }");
  size_t before = b.len;
  rc = tide__encode_list(A, 1, 2, "results", &b, err, sizeof err);
  ok(rc == -1 && strcmp(err, "results[2].cb: functions cannot cross to a thread") == 0 && b.len == before &&
     lua_gettop(A) == 2, "encode_list refuses what cannot cross, naming results[2].cb (got \"%s\")", err);
  eval(A, "local t = {} t.self = t return t");
  rc = tide__encode_list(A, 3, 1, "results", &b, err, sizeof err);
  ok(rc == -1 && strcmp(err, "results[1].self: cycle (table refers to itself)") == 0,
     "encode_list refuses a cycle inside a value (got \"%s\")", err);
  rc = tide__encode_list(A, 2, 5, "results", &b, err, sizeof err);
  ok(rc == -1 && lua_gettop(A) == 3, "encode_list refuses a list past the top of the stack");
  lua_settop(A, 0);
  tide__buf_free(&b);
}

/* ===== LUA BINDING ===== */

static void lua_ok(const char *desc, const char *src) {
  int good = luaL_loadstring(A, src) == 0 && lua_pcall(A, 0, 1, 0) == 0 && lua_toboolean(A, -1);
  if (!ok(good, "binding: %s", desc)) printf("# %s\n", lua_tostring(A, -1));
  lua_pop(A, 1);
}

static void test_binding(void) {
  lua_newtable(A);
  int top = lua_gettop(A);
  tide__open_codec(A);
  ok(lua_gettop(A) == top, "tide__open_codec leaves the stack as it was");
  lua_setglobal(A, "codec");
  lua_ok("decode(encode(v)) copies v",
         "local v = codec.decode(codec.encode({1, 'x', {a = true, [2.5] = 'y'}})) "
         "return v[1] == 1 and v[2] == 'x' and v[3].a == true and v[3][2.5] == 'y'");
  lua_ok("encode raises the path error",
         "local ok, err = pcall(codec.encode, {1, {cb = print}}) "
         "return not ok and err == 'value[2].cb: functions cannot cross to a thread'");
  lua_ok("encode names the root it is given",
         "local ok, err = pcall(codec.encode, {print}, 'args') "
         "return not ok and err == 'args[1]: functions cannot cross to a thread'");
  lua_ok("decode returns nil and a message for bad bytes",
         "local v, err = codec.decode('\\9') "
         "return v == nil and err == 'bad encoding at byte 0: unknown tag 0x09'");
  lua_ok("decode checks its argument",
         "local ok, err = pcall(codec.decode, 42) "
         "return not ok and err:find('string expected', 1, true) ~= nil");
  lua_ok("encode needs a value",
         "local ok, err = pcall(codec.encode) "
         "return not ok and err:find('value expected', 1, true) ~= nil");
  lua_ok("decode_list returns a list's values, holes and trailing nils included",
         "local function pack(...) return { n = select('#', ...), ... } end "
         "local v = pack(codec.decode_list(codec.encode({ n = 4, 1, nil, 'x' }))) "
         "return v.n == 4 and v[1] == 1 and v[2] == nil and v[3] == 'x' and v[4] == nil");
  lua_ok("decode_list of an empty list returns nothing",
         "return select('#', codec.decode_list(codec.encode({ n = 0 }))) == 0 "
         "and select('#', codec.decode_list(codec.encode({}))) == 0");
  lua_ok("decode_list without n takes the length; other keys are ignored",
         "local a, b, c = codec.decode_list(codec.encode({ 5, 6, k = 'v' })) "
         "return a == 5 and b == 6 and c == nil");
  lua_ok("decode_list with n below the length returns n values",
         "local function pack(...) return { n = select('#', ...), ... } end "
         "local v = pack(codec.decode_list(codec.encode({ n = 1, 5, 6 }))) "
         "return v.n == 1 and v[1] == 5");
  lua_ok("decode_list copies nested tables",
         "local a, b = codec.decode_list(codec.encode({ n = 2, { x = { 1 } }, true })) "
         "return a.x[1] == 1 and b == true");
  lua_ok("decode_list refuses what is not a list",
         "for _, v in ipairs{ 5, 'x', { n = -1 }, { n = 1.5 }, { n = 'a' }, { n = 7001 } } do "
         "  local ok, err = pcall(codec.decode_list, codec.encode(v)) "
         "  if ok or err ~= 'not a list of at most 7000 values' then return false end "
         "end return true");
  lua_ok("decode_list refuses damaged bytes",
         "local good = codec.encode({ n = 2, 1, 'abc' }) "
         "local ok1, e1 = pcall(codec.decode_list, good:sub(1, -2)) "
         "local ok2, e2 = pcall(codec.decode_list, good .. 'x') "
         "return not ok1 and e1:find('truncated', 1, true) ~= nil "
         "and not ok2 and e2:find('trailing bytes', 1, true) ~= nil");
  lua_ok("encode_unordered copies v like encode, and raises the same errors",
         "local v = codec.decode(codec.encode_unordered({1, 'x', {a = true, [2.5] = 'y'}, n = 3})) "
         "local ok, err = pcall(codec.encode_unordered, {1, {cb = print}}, 'args') "
         "return v[1] == 1 and v[2] == 'x' and v[3].a == true and v[3][2.5] == 'y' and v.n == 3 "
         "and not ok and err == 'args[2].cb: functions cannot cross to a thread' "
         "and codec.encode(codec.decode(codec.encode_unordered(v))) == codec.encode(v)");
  lua_ok("encode of a large value, then a small one",
         "local s = codec.encode(string.rep('z', 200000)) "
         "return #codec.decode(s) == 200000 and codec.decode(codec.encode(7)) == 7");
}

/* tide.json's null and arrays, between processes (tide__encode and
 * tide__decode): B's own in their places.  A T_ARRAY whose table is cut
 * short is refused as any table would be. */
static void test_json_marks(void) {
  ok(marks_cross(3, tide__encode_unordered, tide__decode), "tide.json's null and arrays cross (unordered)");
  ok(marks_cross(300, tide__encode, tide__decode), "tide.json's null and arrays cross (canonical)");
  char err[256] = "";
  const char cut[] = { 11, 2, 0, 2 };                 /* T_ARRAY, narr 2, nhash 0, one value of two */
  ok(tide__decode(B, cut, sizeof cut, err, sizeof err) == -1 && lua_gettop(B) == 0,
     "a JSON array cut short is refused (%s)", err);
  /* A list's count is read raw: a JSON array (T_ARRAY, tide.json's
   * metatable, which a script may give an __index) at the top of a list's
   * bytes had its `n` read through that metamethod, which ran inside the
   * decoding and gave the count. */
  lua_settop(B, 0);
  tide__push_json_array_mt(B);
  lua_setglobal(B, "amt");
  eval(B, "amt.__index = function(_, k) ran = true; if k == 'n' then return 5 end end");
  lua_settop(B, 0);
  const char list[] = { 11, 1, 0, 3, 2 };            /* T_ARRAY, narr 1, nhash 0, T_INT 1 */
  int n = tide__decode_list(B, list, sizeof list, 10, err, sizeof err);
  lua_getglobal(B, "ran");
  int ran = lua_toboolean(B, -1);
  lua_pop(B, 1);
  ok(n == 1 && lua_gettop(B) == 1 && lua_tonumber(B, 1) == 1 && !ran,
     "a JSON array as a list gives its values, its count read raw (%d values, metamethod %s)", n, ran ? "ran" : "not run");
  lua_settop(B, 0);
  tide__push_json_array_mt(B);
  lua_pushnil(B);
  lua_setfield(B, -2, "__index");
  lua_settop(B, 0);
}

int main(void) {
  if (open_states() != 0) return 2;
  test_json_marks();
  test_round_trips();
  test_unordered();
  test_canonical();
  test_refusals();
  test_refusal_edges();
  test_malformed();
  test_damage();
  test_lists();
  test_binding();
  return close_states();
}
