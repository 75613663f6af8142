/* codec_format.h — what the encoder (codec.c), the decoder (codec_decode.c) and the hand-offs within one process (codec_lj.c) share (codec.h). */
#ifndef TIDE_CODEC_FORMAT_H
#define TIDE_CODEC_FORMAT_H

#include "codec.h"

enum { T_NIL, T_FALSE, T_TRUE, T_INT, T_DOUBLE, T_STRING, T_TABLE, T_STRDEF, T_STRREF };

/* The first byte of a value LuaJIT's serializer wrote (codec_lj.c): only
 * the _local decoders read it; to tide__decode it is an unknown tag. */
#define T_LUAJIT 9

/* tide.json's null, and a JSON array (laid out as after T_TABLE):
 * codec_marks.c. */
#define T_NULL 10
#define T_ARRAY 11

/* tide__encode_unordered and tide__encode_list that give up once the
 * encoding takes more than `limit` bytes: then TIDE_CODEC_OVER, no message,
 * and out as it was (codec_lj.c hands larger values to LuaJIT's serializer). */
#define TIDE_CODEC_OVER (-2)
int tide__encode_within(lua_State *L, int idx, const char *root, tide_buf *out,
                        size_t limit, char *err, size_t errlen);
int tide__encode_list_within(lua_State *L, int first, int n, const char *root,
                             tide_buf *out, size_t limit, char *err, size_t errlen);

/* Why a value (n < 0: the one at idx) or a list (the n values from idx)
 * cannot cross between the threads of one process, by tide's codec with
 * light userdata and cdata passing (LuaJIT's serializer judges those):
 * -1 with the message of the first other value it refuses, or 0 (err
 * untouched) when there is none.  Nothing is kept of the encoding. */
int tide__encode_why(lua_State *L, int idx, int n, const char *root, char *err, size_t errlen);

/* Makes room for n more bytes in b: 0, or -1 when out of memory. */
int tide__buf_reserve(tide_buf *b, size_t n);

/* The table on top of the stack as a list, { n = N, ... } (n absent: #t):
 * pops it and pushes its N values.  N (at most max), or -1 with "not a
 * list of at most <max> values" in err when it is not one (the table is
 * popped either way). */
int tide__unpack_list(lua_State *L, int max, char *err, size_t errlen);

#endif
