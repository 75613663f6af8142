/* fuzz_codec.c — libFuzzer target: decode any bytes; whatever decodes must re-encode to a fixed point.
 *
 * fuzz-sources: src/codec.c
 *
 * For input X that decodes to V1: E1 = encode(V1) must succeed (V1 came out of
 * the decoder, so it holds nothing the encoder refuses), E1 must decode to V2,
 * and encode(V2) must give E1 again byte for byte; the unordered encoding of
 * V1 must decode to a V3 whose encode(V3) is E1 too.  A failed decode must
 * leave the stack as it was.  The same bytes decoded as a list
 * (tide__decode_list) push exactly the count it returns, or nothing.  Any broken promise aborts, which libFuzzer
 * reports as a crash.
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

static void broken(const char *what, const char *err) {
  fprintf(stderr, "fuzz_codec: %s: %s\n", what, err);
  abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[256] = "";
  if (!L && !(L = luaL_newstate())) broken("luaL_newstate", "out of memory");
  lua_settop(L, 0);
  int n = tide__decode_list(L, (const char *)data, size, 50, err, sizeof err);
  if (n < -1 || n > 50 || lua_gettop(L) != (n < 0 ? 0 : n))
    broken("decode_list pushed other than its count", err);
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
  return 0;
}
