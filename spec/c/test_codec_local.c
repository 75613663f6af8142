/* test_codec_local.c — TAP tests of the hand-offs between threads: LuaJIT's serializer for large values, tide's codec for small ones and for errors. */
#include "codec_check.h"

#define T_LUAJIT 9  /* codec_format.h */

/* A table of n records, as bench/threads.lua's (its third field, cb, is set
 * to print in record `bad` when bad > 0). */
static void push_records(lua_State *L, int n, int bad) {
  char src[512];
  snprintf(src, sizeof src,
           "local users = {} "
           "for i = 1, %d do users[i] = { id = i, name = 'user' .. i, score = i * 1.5, "
           "  active = i %% 2 == 0, tags = { 'alpha', 'beta' }, address = { zip = 10000 + i } } end "
           "if %d > 0 then users[%d].cb = print end "
           "return users", n, bad, bad);
  eval(L, src);
}

/* Encodes A's top by encode_local, decodes it in B by decode_local, and
 * compares; *tag gets the encoding's first byte.  Pops both copies. */
static int crosses(const char *desc, int *tag) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  int topa = lua_gettop(A), topb = lua_gettop(B);
  int good = tide__encode_local(A, -1, "args", &b, err, sizeof err) == 0 && lua_gettop(A) == topa &&
             tide__decode_local(B, b.data, b.len, err, sizeof err) == 0 &&
             lua_gettop(B) == topb + 1 && same(A, -1, B, -1, 0);
  *tag = b.len ? (unsigned char)b.data[0] : -1;
  if (!ok(good, "crosses: %s", desc)) printf("# %s\n", err);
  lua_settop(A, topa - 1);
  lua_settop(B, topb);
  tide__buf_free(&b);
  return good;
}

static void test_which_codec(void) {
  int tag;
  push_records(A, 200, 0);
  crosses("200 records", &tag);
  ok(tag == T_LUAJIT, "a large table crosses by LuaJIT's serializer (first byte %d)", tag);
  eval(A, "return { n = 2, 'hello', { x = 1 } }");
  crosses("a task's small arguments", &tag);
  ok(tag == 6, "a small table crosses in tide's codec (first byte %d)", tag);
  eval(A, "return string.rep('s', 100000)");
  crosses("a long string", &tag);
  ok(tag == 5, "a string crosses in tide's codec whatever its length (first byte %d)", tag);
}

/* What only the serializer takes: 64-bit integer and complex cdata, and
 * light userdata, which crosses as the same pointer. */
static void test_what_only_luajit_takes(void) {
  static int x;
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  eval(A, "require('ffi') return { -5LL, 18446744073709551615ULL, 3i, k = 2 }");
  lua_pushlightuserdata(A, &x);
  lua_setfield(A, -2, "p");
  int rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  ok(rc == 0 && b.data[0] == T_LUAJIT, "a small table with cdata crosses by the serializer");
  rc = rc == 0 ? tide__decode_local(B, b.data, b.len, err, sizeof err) : -1;
  if (rc == 0) {
    lua_setglobal(B, "v");
    lua_pushlightuserdata(B, &x);
    lua_setglobal(B, "p");
  }
  int good = rc == 0 && luaL_loadstring(B, "return tostring(v[1]) == '-5LL' and "
                                           "tostring(v[2]) == '18446744073709551615ULL' and "
                                           "tostring(v[3]) == '0+3i' and v.k == 2 and v.p == p") == 0 &&
             lua_pcall(B, 0, 1, 0) == 0 && lua_toboolean(B, -1);
  if (!ok(good, "int64, uint64 and complex come back equal, and the pointer the same")) printf("# %s\n", err);
  lua_settop(B, 0);
  lua_pop(A, 1);
  b.len = 0;
  eval(A, "return 7LL");
  rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  ok(rc == 0 && tide__decode_local(B, b.data, b.len, err, sizeof err) == 0 &&
     luaL_loadstring(B, "return tostring(...) == '7LL'") == 0 && (lua_insert(B, -2), lua_pcall(B, 1, 1, 0)) == 0 &&
     lua_toboolean(B, -1), "a bare int64 crosses");
  lua_settop(B, 0);
  lua_pop(A, 1);
  b.len = 0;
  eval(A, "return { require('ffi').new('int[2]') }");
  rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  ok(rc == -1 && strcmp(err, "args[1]: cdata cannot cross to a thread") == 0 && b.len == 0,
     "other cdata is refused, with the path (%s)", err);
  lua_pop(A, 1);
  tide__buf_free(&b);
}

/* A large value the serializer refuses: tide's codec then names the path. */
static void refused_local(const char *desc, const char *want) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  b.len = 0;
  int top = lua_gettop(A);
  int rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  if (!ok(rc == -1 && strstr(err, want) != NULL && b.len == 0 && lua_gettop(A) == top, "refused: %s", desc))
    printf("# got %d \"%s\"\n", rc, err);
  lua_pop(A, 1);
  tide__buf_free(&b);
}

static void test_refusals(void) {
  push_records(A, 300, 250);
  refused_local("a function deep in a large table", "args[250].cb: functions cannot cross to a thread");
  eval(A, "local users = {} for i = 1, 300 do users[i] = { i } end users[300].self = users return users");
  refused_local("a cycle in a large table", "args[300].self: cycle (table refers to itself)");
  eval(A, "local t = { pad = string.rep('x', 400) } local c = t "
          "for i = 1, 101 do c.next = {} c = c.next end return t");
  refused_local("nesting 102 deep", ".next: nesting deeper than 100");
}

static void test_lists(void) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  lua_pushinteger(A, 1);
  push_records(A, 100, 0);
  lua_pushnil(A);
  int rc = tide__encode_list_local(A, 1, 3, "results", &b, err, sizeof err);
  ok(rc == 0 && b.data[0] == T_LUAJIT && lua_gettop(A) == 3, "a list with a large table crosses by the serializer");
  int n = rc == 0 ? tide__decode_list_local(B, b.data, b.len, 10, err, sizeof err) : -1;
  ok(n == 3 && lua_tointeger(B, 1) == 1 && same(A, 2, B, 2, 0) && lua_isnil(B, 3),
     "decode_list_local gives its 3 values back, the trailing nil too (%s)", err);
  lua_settop(B, 0);
  b.len = 0;
  rc = tide__encode_list_local(A, 1, 1, "results", &b, err, sizeof err);
  ok(rc == 0 && b.data[0] == 6 && tide__decode_list_local(B, b.data, b.len, 10, err, sizeof err) == 1 &&
     lua_tointeger(B, 1) == 1, "a small list crosses in tide's codec");
  lua_settop(B, 0);
  b.len = 0;
  rc = tide__encode_list_local(A, 2, 5, "results", &b, err, sizeof err);
  if (!ok(rc == -1 && strcmp(err, "results: bad list of values") == 0 && b.len == 0, "a list past the top is refused"))
    printf("# got %d \"%s\" %zu\n", rc, err, b.len);
  lua_settop(A, 0);
  b.len = 0;
  push_records(A, 100, 0);
  rc = tide__encode_local(A, 1, "v", &b, err, sizeof err);
  n = rc == 0 ? tide__decode_list_local(B, b.data, b.len, 10, err, sizeof err) : 0;
  ok(n == -1 && strcmp(err, "not a list of at most 10 values") == 0 && lua_gettop(B) == 0,
     "decode_list_local refuses a table of more values than max (%s)", err);
  lua_settop(A, 0);
  tide__buf_free(&b);
}

static void bad_local(const char *desc, const char *data, size_t len, const char *want) {
  char err[256] = "";
  int top = lua_gettop(B);
  int rc = tide__decode_local(B, data, len, err, sizeof err);
  if (!ok(rc == -1 && strcmp(err, want) == 0 && lua_gettop(B) == top, "rejected: %s", desc))
    printf("# got %d \"%s\"\n", rc, err);
  lua_settop(B, top);
}

static void test_malformed(void) {
  bad_local("the tag alone", "\x09", 1, "bad encoding at byte 1: truncated");
  bad_local("a table cut short", "\x09\x0c\x03\x06\x01\x00\x00\x00", 8, "bad encoding at byte 8: truncated");
  bad_local("a string longer than the input", "\x09\x24" "abc", 5, "bad encoding at byte 5: truncated");
  bad_local("a count beyond the input", "\x09\x0c\xff\xff\xff\xff\x7f", 7,
            "bad encoding at byte 1: table counts more values than bytes left");
  bad_local("a dictionary string", "\x09\x0f\x00", 3, "bad encoding at byte 1: unknown tag");
  bad_local("a dictionary metatable past tide.json's two", "\x09\x0e\x02\x08", 4,
            "bad encoding at byte 1: bad metatable reference");
  bad_local("a dictionary metatable on a string", "\x09\x0e\x00\x21" "a", 5,
            "bad encoding at byte 1: bad metatable reference");
  bad_local("a dictionary metatable cut short", "\x09\x0e", 2, "bad encoding at byte 2: truncated");
  bad_local("a tag no version writes", "\x09\x13", 2, "bad encoding at byte 1: unknown tag");
  bad_local("trailing bytes", "\x09\x00\x00", 3, "bad encoding at byte 2: trailing bytes after the value");
  bad_local("a nil key", "\x09\x09\x01\x00\x02", 5, "bad encoding at byte 1: table index is nil");
  bad_local("a key twice", "\x09\x09\x02\x21" "a" "\x02\x21" "a" "\x01", 9,
            "bad encoding at byte 1: duplicate table key");
  /* LuaJIT's decoder recurses once per table: 200,000 levels would
   * overflow the C stack of a release without its own limit of 100. */
  size_t n = 1 + 2 * 200000 + 1;
  char *deep = malloc(n);
  if (deep == NULL) exit(2);
  deep[0] = T_LUAJIT;
  for (size_t i = 0; i < 200000; i++) deep[1 + 2 * i] = 0x0c, deep[2 + 2 * i] = 0x02;
  deep[n - 1] = 0;
  bad_local("200,000 tables nested", deep, n, "bad encoding at byte 201: tables nested too deep");
  free(deep);
  char err[256] = "";
  ok(tide__decode(B, "\x09\x00", 2, err, sizeof err) == -1 &&
     strcmp(err, "bad encoding at byte 0: unknown tag 0x09") == 0 && lua_gettop(B) == 0,
     "tide__decode, for bytes from other processes, refuses the serializer's");
  ok(tide__decode_local(B, "\x03\x04", 2, err, sizeof err) == 0 && lua_tointeger(B, -1) == 2,
     "decode_local reads tide's codec as tide__decode does");
  lua_settop(B, 0);
}

/* LuaJIT's serializer steps the collector once its string is made: a
 * finalizer may run inside encode_local, and encode a value of its own
 * through the same binding, whose buffer the outer call is using.  In a
 * state of its own, with a collector that ends a cycle at every step. */
static void test_finalizer_inside(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  lua_newtable(L);
  tide__open_codec(L);
  lua_setglobal(L, "codec");
  const char *src =
    "local users = {} for i = 1, 300 do users[i] = { id = i, name = 'u' .. i, tags = { 'a' } } end "
    "local small = { x = 1, y = { 'z' } } "
    "local want_big, want_small = codec.encode(users), codec.encode(small) "
    "local ran, bad = 0, 0 "
    "local function watch() "
    "  local p = newproxy(true) "
    "  getmetatable(p).__gc = function() "
    "    ran = ran + 1 "
    "    if codec.encode(codec.decode_local(codec.encode_local(small))) ~= want_small then bad = bad + 1 end "
    "    watch() "
    "  end "
    "end "
    "watch() "
    "collectgarbage('setpause', 0) collectgarbage('setstepmul', 100000) "
    "for i = 1, 300 do "
    "  local s = codec.encode_local(users) "
    "  if codec.encode(codec.decode_local(s)) ~= want_big then bad = bad + 1 end "
    "end "
    "collectgarbage('setpause', 200) collectgarbage('setstepmul', 200) "
    "return ran, bad";
  int good = luaL_loadstring(L, src) == 0 && lua_pcall(L, 0, 2, 0) == 0;
  int ran = good ? (int)lua_tointeger(L, -2) : 0, bad = good ? (int)lua_tointeger(L, -1) : -1;
  if (!ok(good && ran > 100 && bad == 0,
          "values encoded while finalizers encode their own come back intact (%d finalizers, %d bad)", ran, bad))
    printf("# %s\n", good ? "" : lua_tostring(L, -1));
  lua_close(L);
}

/* An allocator that refuses past *ud bytes in use (a thread_memory limit). */
typedef struct { size_t used, limit; } budget;
static void *limited(void *ud, void *ptr, size_t osize, size_t nsize) {
  budget *b = ud;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) { free(ptr); b->used -= osize; return NULL; }
  if (nsize > osize && b->used + (nsize - osize) > b->limit) return NULL;
  void *p = realloc(ptr, nsize);
  if (p) b->used = b->used - osize + nsize;
  return p;
}

static const tide_buf *oom_bytes;
static char oom_err[256];                 /* (no allocation to tell it: memory is out) */
static int decode_oom(lua_State *L) {
  oom_err[0] = '\0';
  if (tide__decode_local(L, oom_bytes->data, oom_bytes->len, oom_err, sizeof oom_err) != 0) return 0;
  return 1;
}

/* codec.h: the _local decoders are "as tide__decode", which raises when
 * memory runs out (a thread_memory limit): running out of memory inside
 * LuaJIT's decoder is no "bad encoding" of the bytes. */
static void test_out_of_memory(void) {
  budget bud = { 0, (size_t)-1 };
  lua_State *L = lua_newstate(limited, &bud);
  luaL_openlibs(L);
  lua_settop(L, 0);
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  push_records(A, 2000, 0);
  int rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  lua_pop(A, 1);
  ok(rc == 0 && b.len > 0 && (unsigned char)b.data[0] == T_LUAJIT, "2000 records encode by the serializer");
  /* room for the string (the serializer's functions made already), not
   * for the tables */
  oom_bytes = &b;
  lua_pushcfunction(L, decode_oom);
  rc = lua_pcall(L, 0, 1, 0);
  ok(rc == 0 && lua_istable(L, -1), "they decode with no limit");
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
  bud.limit = bud.used + b.len + 65536;
  lua_pushcfunction(L, decode_oom);
  int status = lua_pcall(L, 0, 1, 0);
  const char *what = status != 0 ? lua_tostring(L, -1) : NULL;
  if (!ok(what != NULL && strcmp(what, "not enough memory") == 0,
          "decode_local raises \"not enough memory\" when memory runs out inside LuaJIT's decoder (status %d)",
          status))
    printf("# returned -1: %s\n", oom_err);
  lua_settop(L, 0);
  bud.limit = (size_t)-1;
  /* Out of memory making the bytes' string, which lj_get pushed after it
   * took the kept decode buffer and outside the protected call: the raise
   * left the buffer taken (its slot false) for good, and every decoding
   * after made a buffer of its own (2cefd0a). */
  tide_buf other;                          /* other bytes: the string of the last ones may be kept */
  tide__buf_init(&other);
  push_records(A, 1500, 0);
  rc = tide__encode_local(A, -1, "args", &other, err, sizeof err);
  lua_pop(A, 1);
  oom_bytes = &other;
  lua_gc(L, LUA_GCCOLLECT, 0);
  bud.limit = bud.used + other.len / 2;
  lua_pushcfunction(L, decode_oom);
  status = rc == 0 ? lua_pcall(L, 0, 1, 0) : -1;
  tide__buf_free(&other);
  lua_settop(L, 0);
  bud.limit = (size_t)-1;
  eval(L, "for k, t in pairs(debug.getregistry()) do "
          "  if type(k) == 'userdata' and type(t) == 'table' and type(t[2]) == 'function' "
          "     and t[5] ~= nil then return t[5] ~= false end "
          "end "
          "return 'no serializer table'");
  ok(status != 0 && lua_toboolean(L, -1) && lua_type(L, -1) != LUA_TSTRING,
     "out of memory for the bytes' string leaves the kept decode buffer in place (status %d, %s)", status,
     lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : lua_toboolean(L, -1) ? "kept" : "taken for good");
  lua_settop(L, 0);
  lua_close(L);
  tide__buf_free(&b);
}

/* The FFI a decoder needs is loaded from the registry's tables, not by the
 * global `require`: a script's own ran (and could refuse, yield or do
 * anything), and a sandbox without one could not decode cdata.  Without
 * the FFI at all, cdata is refused with an error, and nothing breaks. */
static void test_ffi_without_require(void) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  eval(A, "return 7LL");
  int rc = tide__encode_local(A, -1, "args", &b, err, sizeof err);
  lua_pop(A, 1);
  lua_State *C = luaL_newstate();
  if (C == NULL) exit(2);
  luaL_openlibs(C);
  eval(C, "calls = 0; require = function() calls = calls + 1; error('not this one') end");
  lua_pop(C, 1);
  rc = rc == 0 ? tide__decode_local(C, b.data, b.len, err, sizeof err) : -1;
  int good = rc == 0 && luaL_loadstring(C, "return tostring(...) == '7LL' and calls == 0") == 0 &&
             (lua_insert(C, -2), lua_pcall(C, 1, 1, 0)) == 0 && lua_toboolean(C, -1);
  if (!ok(good, "a state whose global require refuses decodes an int64, without calling it")) printf("# %s\n", err);
  lua_close(C);
  C = luaL_newstate();
  if (C == NULL) exit(2);
  luaL_openlibs(C);
  eval(C, "package.preload.ffi = nil; require = nil");
  lua_pop(C, 1);
  int top = lua_gettop(C);
  rc = tide__decode_local(C, b.data, b.len, err, sizeof err);
  ok(rc == -1 && err[0] != '\0' && lua_gettop(C) == top, "without the FFI, cdata is refused with an error (%s)", err);
  eval(C, "return 1 + 1");                        /* the state still works */
  ok(lua_tointeger(C, -1) == 2, "and the state is left as it was");
  lua_close(C);
  tide__buf_free(&b);
}

/* tide.json's null and arrays cross as B's own, by either codec: they
 * came back as plain empty tables (a method saw {} for null, and `[]`
 * encoded as `{}`). */
static void test_json_marks(void) {
  ok(marks_cross(1, tide__encode_local, tide__decode_local), "tide.json's null and arrays cross (small)");
  ok(marks_cross(200, tide__encode_local, tide__decode_local),
     "tide.json's null and arrays cross (large: by LuaJIT's serializer)");
}

/* A table with null's metatable and contents is not null: tide's codec
 * sends it as a plain table.  LuaJIT's serializer wrote null's metatable on
 * it, and lj_check refused the bytes ("bad metatable reference"): a large
 * value with one in it failed to cross.  Now it crosses plain, as a value
 * and as a key, and a key that is null crosses as a plain table too. */
static void test_full_table_with_nulls_metatable(void) {
  tide_buf b;
  char err[256] = "";
  tide__buf_init(&b);
  tide__push_json_null(A);
  lua_setglobal(A, "null");
  eval(A, "local function fake() local t = setmetatable({}, getmetatable(null)) "
          "  for i = 1, 40 do rawset(t, 'k' .. i, 'value ' .. i) end return t end "
          "return { fake(), inner = { f = fake(), [fake()] = 1, [null] = 2, n = null } }");
  int good = tide__encode_local(A, -1, "args", &b, err, sizeof err) == 0 && b.data[0] == T_LUAJIT &&
             tide__decode_local(B, b.data, b.len, err, sizeof err) == 0;
  lua_pop(A, 1);
  if (good) {
    lua_setglobal(B, "v");
    tide__push_json_null(B);
    lua_setglobal(B, "null");
    good = luaL_loadstring(B,
      "local keys = 0 "
      "for k in pairs(v.inner) do if type(k) == 'table' then keys = keys + 1 "
      "  if getmetatable(k) ~= nil then return false end end end "
      "return keys == 2 and getmetatable(v[1]) == nil and v[1].k40 == 'value 40' "
      "  and getmetatable(v.inner.f) == nil and v.inner.f.k1 == 'value 1' and rawequal(v.inner.n, null)") == 0 &&
      lua_pcall(B, 0, 1, 0) == 0 && lua_toboolean(B, -1);
    if (!good) snprintf(err, sizeof err, "%s", lua_isstring(B, -1) ? lua_tostring(B, -1) : "not plain");
    lua_settop(B, 0);
  }
  if (!good) printf("# %s\n", err);
  tide__buf_free(&b);
  ok(good, "a table with null's metatable and contents crosses as a plain table (large)");
}

int main(void) {
  if (open_states() != 0) return 2;
  test_json_marks();
  test_full_table_with_nulls_metatable();
  test_which_codec();
  test_what_only_luajit_takes();
  test_refusals();
  test_lists();
  test_malformed();
  test_finalizer_inside();
  test_out_of_memory();
  test_ffi_without_require();
  return close_states();
}
