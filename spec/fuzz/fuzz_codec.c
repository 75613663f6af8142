/* fuzz_codec.c — libFuzzer target: decode any bytes; whatever decodes must re-encode to a fixed point.
 *
 * fuzz-sources: src/codec.c src/codec_decode.c src/codec_marks.c
 *
 * For input X that decodes to V1: E1 = encode(V1) must succeed (V1 came out of
 * the decoder, so it holds nothing the encoder refuses), E1 must decode to V2,
 * and encode(V2) must give E1 again byte for byte; the unordered encoding of
 * V1 must decode to a V3 whose encode(V3) is E1 too, and so must V1 as a
 * task's arguments { n = 1, V1 } (args_round_trip).  A failed decode must
 * leave the stack as it was.  The same bytes decoded as a list
 * (tide__decode_list) push exactly the count it returns, or nothing; the
 * values of a list encode as one (tide__encode_list), and those bytes decode
 * to as many values, each equal to its original (canonical encodings).  Any
 * broken promise aborts, which libFuzzer reports as a crash.
 */
#include "codec.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static lua_State *L;            /* one state for every input, for speed */
static tide_buf first, second;  /* E1 and encode(V2), reused */
static tide_buf unordered;      /* encode_unordered(V1), reused */
static tide_buf list;           /* encode_list of a list's values, reused */

static void broken(const char *what, const char *err) {
  fprintf(stderr, "fuzz_codec: %s: %s\n", what, err);
  abort();
}

/* The values of a decoded list (at 1..n) encode as a list, and decode from
 * it to n values equal to them one by one. */
static void list_round_trip(int n) {
  char err[256] = "";
  list.len = 0;
  if (tide__encode_list(L, 1, n, "list", &list, err, sizeof err) != 0)
    broken("a decoded list's values do not encode as a list", err);
  if (tide__decode_list(L, list.data, list.len, 50, err, sizeof err) != n)
    broken("a list encoding does not decode to its count", err);
  for (int i = 1; i <= n; i++) {
    first.len = second.len = 0;
    if (tide__encode(L, i, "a", &first, err, sizeof err) != 0 ||
        tide__encode(L, n + i, "b", &second, err, sizeof err) != 0)
      broken("a list value does not encode", err);
    if (first.len != second.len || memcmp(first.data, second.data, first.len) != 0)
      broken("a list's value came back changed", "");
  }
}

/* V1 (at 1) as a task's arguments, { n = 1, V1 }: array values and a pair,
 * the shape where the unordered encoder writes the pairs again without
 * references.  Its unordered encoding decodes to a table that encodes
 * (sorted) as the original does. */
static void args_round_trip(void) {
  char err[256] = "";
  lua_settop(L, 1);
  lua_createtable(L, 1, 1);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, 1);
  lua_setfield(L, -2, "n");                           /* V1, { n = 1, V1 } */
  first.len = second.len = unordered.len = 0;
  if (tide__encode(L, 2, "args", &first, err, sizeof err) != 0) {
    if (strstr(err, "nesting deeper than") != NULL) return;   /* V1 was 100 deep */
    broken("a decoded value does not encode as arguments", err);
  }
  if (tide__encode_unordered(L, 2, "args", &unordered, err, sizeof err) != 0)
    broken("a decoded value does not encode unordered as arguments", err);
  if (tide__decode(L, unordered.data, unordered.len, err, sizeof err) != 0)
    broken("arguments encoded unordered do not decode", err);
  if (tide__encode(L, 3, "v4", &second, err, sizeof err) != 0)
    broken("decoded arguments do not encode", err);
  if (first.len != second.len || memcmp(first.data, second.data, first.len) != 0)
    broken("the arguments decoded to another value", "");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[256] = "";
  if (!L && !(L = luaL_newstate())) broken("luaL_newstate", "out of memory");
  lua_settop(L, 0);
  int n = tide__decode_list(L, (const char *)data, size, 50, err, sizeof err);
  if (n < -1 || n > 50 || lua_gettop(L) != (n < 0 ? 0 : n))
    broken("decode_list pushed other than its count", err);
  if (n >= 0) list_round_trip(n);
  lua_settop(L, 0);
  if (tide__decode(L, (const char *)data, size, err, sizeof err) != 0) {
    if (lua_gettop(L) != 0) broken("a failed decode pushed values", err);
    return 0;
  }
  if (lua_gettop(L) != 1) broken("a decode pushed other than one value", "");
  first.len = second.len = 0;
  if (tide__encode(L, 1, "v1", &first, err, sizeof err) != 0)
    broken("a decoded value does not encode", err);
  if (tide__decode(L, first.data, first.len, err, sizeof err) != 0)
    broken("an encoding does not decode", err);
  if (tide__encode(L, 2, "v2", &second, err, sizeof err) != 0)
    broken("a decoded encoding does not encode", err);
  if (first.len != second.len || memcmp(first.data, second.data, first.len) != 0)
    broken("re-encoding changed the bytes", "");
  unordered.len = second.len = 0;
  if (tide__encode_unordered(L, 1, "v1", &unordered, err, sizeof err) != 0)
    broken("a decoded value does not encode unordered", err);
  if (tide__decode(L, unordered.data, unordered.len, err, sizeof err) != 0)
    broken("an unordered encoding does not decode", err);
  if (tide__encode(L, -1, "v3", &second, err, sizeof err) != 0)
    broken("a decoded unordered encoding does not encode", err);
  if (first.len != second.len || memcmp(first.data, second.data, first.len) != 0)
    broken("the unordered encoding decoded to another value", "");
  args_round_trip();
  return 0;
}
