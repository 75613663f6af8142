/* fuzz_codec_local.c — libFuzzer target: LuaJIT's serialization as threads hand it over (codec_lj.c), read from any bytes.
 *
 * fuzz-sources: src/codec.c src/codec_decode.c src/codec_lj.c src/codec_marks.c
 *
 * The input, after the tag byte T_LUAJIT, goes to tide__decode_local and
 * tide__decode_list_local.  Neither may crash, however deep, long or
 * malformed the bytes (LuaJIT's decoder trusts its input: the check before
 * it must stop what would overflow the C stack or preallocate past the
 * input); a failed decode pushes nothing, a list pushes exactly its count.
 * A value that decodes must encode again by tide__encode_local, and those
 * bytes decode to a value deeply equal to it, when it is one tide's codec
 * takes too (no cdata, no light userdata: codec_check.h's comparison).  Any
 * broken promise aborts, which libFuzzer reports as a crash.
 */
#include "../c/codec_check.h"

static lua_State *L;               /* one state for every input, for speed */
static tide_buf in, again, check;  /* the tagged input, its re-encoding, a canonical one */

static void broken(const char *what, const char *err) {
  fprintf(stderr, "fuzz_codec_local: %s: %s\n", what, err);
  abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[256] = "";
  if (!L) {
    if (!(L = luaL_newstate())) broken("luaL_newstate", "out of memory");
    luaL_openlibs(L);                  /* require, for the FFI cdata needs */
  }
  lua_settop(L, 0);
  in.len = 0;
  if (tide__encode_string(&in, "", 0) != 0) broken("tide_buf", "out of memory");
  in.len = 0;
  char *p = realloc(in.data, size + 1);
  if (p == NULL) broken("realloc", "out of memory");
  in.data = p, in.cap = size + 1;
  in.data[0] = 9;                      /* T_LUAJIT */
  if (size) memcpy(in.data + 1, data, size);
  in.len = size + 1;
  int n = tide__decode_list_local(L, in.data, in.len, 50, err, sizeof err);
  if (n < -1 || n > 50 || lua_gettop(L) != (n < 0 ? 0 : n))
    broken("decode_list_local pushed other than its count", err);
  lua_settop(L, 0);
  if (tide__decode_local(L, in.data, in.len, err, sizeof err) != 0) {
    if (lua_gettop(L) != 0) broken("a failed decode pushed values", err);
    return 0;
  }
  if (lua_gettop(L) != 1) broken("a decode pushed other than one value", "");
  again.len = 0;
  if (tide__encode_local(L, 1, "v1", &again, err, sizeof err) != 0) {
    if (strstr(err, "nesting deeper than") != NULL) return 0;  /* 100 deep, then a key */
    broken("a decoded value does not encode again", err);
  }
  if (tide__decode_local(L, again.data, again.len, err, sizeof err) != 0)
    broken("a re-encoding does not decode", err);
  check.len = 0;
  if (tide__encode(L, 1, "v1", &check, err, sizeof err) != 0) return 0;   /* cdata, light userdata */
  if (!same(L, 1, L, 2, 0)) broken("the value came back changed", "");
  return 0;
}
