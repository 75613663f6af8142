/* codec.h — the value codec: copies Lua values between independent Lua states as bytes.
 *
 * Thread-mode tasks get their arguments and give back their results through
 * this codec: the sending state encodes into a tide_buf, the bytes cross to
 * the other thread, and the receiving state decodes them.  Supported: nil,
 * booleans, numbers (every double, including -0, NaN and +-inf), strings
 * (binary-safe) and tables nested up to TIDE_CODEC_DEPTH levels, whose keys
 * are any supported value except nil and NaN.  Functions, userdata, threads
 * and cdata are refused with an error naming the path to them
 * ("args[2].cb: functions cannot cross to a thread"), and so are cycles.  A
 * table reachable twice without a cycle is copied twice.
 *
 * The format (all integers little-endian, varints are LEB128):
 *   0 nil | 1 false | 2 true | 3 zigzag-varint integer (|n| <= 2^53)
 *   4 double (8 bytes) | 5 varint length, bytes (string)
 *   6 varint narr, varint nhash, nhash (key, value) pairs, then the values
 *     of t[1..narr], nil for holes (table; narr is the raw #t)
 *   7 varint length, bytes (a string defined for references: the first 7
 *     of a message is string 0, the next string 1, ...)
 *   8 varint k (a reference: string k again)
 *   10 tide.json's null | 11 varint narr, ... as after 6 (a JSON array:
 *     a table with tide.json's array metatable; codec_marks.c)
 * tide__encode sorts hash pairs by their bytes (key, then value), so equal
 * tables encode to equal bytes whatever state or insertion order they come
 * from (holes aside: # may then pick another border).  Decoding then
 * re-encoding gives the same bytes again.  tide__encode_unordered writes
 * the pairs in the order the table walk meets them: the same format, read
 * by the same decoder, without that promise; thread and process hand-offs
 * use it (they only need the value back), and it saves the sort and the
 * copy that puts the pairs in order (a tenth of an encoding's instructions
 * on records: callgrind, bench/threads.lua's 1 MB table).  It also sends a
 * string met again (a record's keys) as a definition the second time and
 * as a reference after, so that the decoder makes it once (codec.c,
 * enc_string_ref); tide__encode never does, and decoding then re-encoding
 * with it gives the same bytes again.
 *
 * Tables are read and written raw: no metamethod runs.  A metatable does
 * not cross, but for tide.json's two markers (codec_marks.c) on values
 * (a table used as a key crosses as a plain table).  A state is touched
 * only by its own thread; the bytes may cross threads freely.
 */
#ifndef TIDE_CODEC_H
#define TIDE_CODEC_H

#include <stddef.h>

#include <lua.h>

#define TIDE_CODEC_DEPTH 100  /* deepest table nesting either side accepts */

/* tide.json's markers in L, made at first use (codec_marks.c): pushes its
 * null, or the metatable of its arrays.  They raise only when memory runs
 * out. */
void tide__push_json_null(lua_State *L);
void tide__push_json_array_mt(lua_State *L);

/* Which marker metatable `mt` (an address) is in L: TIDE_MARK_NULL,
 * TIDE_MARK_ARRAY or 0.  marks[2] caches the markers' addresses for one
 * encoding: { NULL, NULL } the first time.  Never raises. */
enum { TIDE_MARK_NULL = 1, TIDE_MARK_ARRAY = 2 };
int tide__json_mark_of(lua_State *L, const void *mt, const void **marks);

/* core.json_marks() -> null, array metatable (tide.json's). */
int tide__l_json_marks(lua_State *L);

/* A growable byte buffer (malloc-backed); zero-initialised is empty. */
typedef struct tide_buf { char *data; size_t len, cap; } tide_buf;

void tide__buf_init(tide_buf *b);
void tide__buf_free(tide_buf *b);  /* releases the bytes; b is empty again */

/* Appends the encoding of the value at stack index idx to out.  root names
 * the value in error paths ("args").
 * 0 on success; -1 on failure with a message in err (truncated to errlen),
 * like "args[2].cb: functions cannot cross to a thread", and out->len as it
 * was.  The stack is left balanced either way.  It runs no Lua code and no
 * step of the collector (it allocates nothing from L but stack slots, all
 * reserved before it allocates anything of its own), so no finalizer can
 * run inside it; growing the stack is the one thing that can raise (out of
 * memory), and then nothing is held. */
int tide__encode(lua_State *L, int idx, const char *root, tide_buf *out,
                 char *err, size_t errlen);

/* The same as tide__encode, with hash pairs in no promised order: equal
 * tables may encode to different bytes.  For values that only cross. */
int tide__encode_unordered(lua_State *L, int idx, const char *root,
                           tide_buf *out, char *err, size_t errlen);

/* Appends the encoding of the list { n = n, v1, ..., vn } of the n values
 * at stack indices first .. first + n - 1, without making the table (pairs
 * unordered; tide__decode_list gives the n values back).  Errors name the
 * values root[i]; otherwise as tide__encode.  A worker's results cross so:
 * no table of them per job. */
int tide__encode_list(lua_State *L, int first, int n, const char *root,
                      tide_buf *out, char *err, size_t errlen);

/* Appends the encoding of the string s[0..len) to out, with no Lua state:
 * for messages made in C.  0, or -1 when out of memory (out unchanged). */
int tide__encode_string(tide_buf *out, const char *s, size_t len);

/* Decodes exactly one value from data[0..len) and pushes it.
 * 0 on success (one value pushed); -1 on failure (nothing pushed, message in
 * err, like "bad encoding at byte 7: truncated").  Whatever the bytes, it
 * never reads out of bounds, recurses deeper than TIDE_CODEC_DEPTH or
 * preallocates more table slots than len.  Like any API call that allocates,
 * it raises a Lua error when memory runs out. */
int tide__decode(lua_State *L, const char *data, size_t len, char *err,
                 size_t errlen);

/* Decodes a list -- the encoding of a table { n = N, v1, ..., vN } (n may be
 * absent: then #t), as arguments and results cross -- and pushes its N
 * values, not the table: the table is never made when the bytes have that
 * shape.  Returns N (at most max), or -1 with a message in err (nothing
 * pushed) when the bytes are not one value, or not a table, or its count
 * is not an integer from 0 to max.  Raises like tide__decode. */
int tide__decode_list(lua_State *L, const char *data, size_t len, int max,
                      char *err, size_t errlen);

/* ===== Between the threads of one process
 *
 * A thread task's arguments, results and error value cross by LuaJIT's
 * own serializer (string.buffer's encode and decode) when they are large:
 * it reads and builds tables and strings through LuaJIT's internals, which
 * no C API reaches (a 1 MB table of records encodes and decodes over twice
 * as fast as with tide__encode_unordered: bench/threads.lua).  Such an encoding is
 * the byte T_LUAJIT, then the serializer's bytes.  Small values cross in
 * tide's codec, which has no Lua call to make (codec_lj.c, SMALL); so does
 * any value the serializer refuses, so that the error names the path as
 * tide__encode's do.  Between processes, tide's codec alone (canonical,
 * and hardened for bytes from outside).
 *
 * What crosses: what tide__encode takes, and also light userdata (the
 * same pointer: the threads share the process) and LuaJIT's 64-bit
 * integer and complex cdata (an error names what cannot cross at all
 * first).  Unlike tide__encode, these may run Lua's collector (so
 * finalizers), and may need more of the state's memory: a finalizer's
 * error, or running out of memory, inside the serializer makes the value
 * cross by tide's codec; decoding raises when memory runs out. */

/* As tide__encode_unordered, and as tide__encode_list (the table
 * { n = n, ... } is made only for the serializer). */
int tide__encode_local(lua_State *L, int idx, const char *root, tide_buf *out,
                       char *err, size_t errlen);
int tide__encode_list_local(lua_State *L, int first, int n, const char *root,
                            tide_buf *out, char *err, size_t errlen);

/* As tide__decode and tide__decode_list, for the encodings above too.  The
 * serializer's bytes are checked first (format, nesting at most
 * TIDE_CODEC_DEPTH, no count beyond the input), since LuaJIT's decoder
 * trusts them; still, only bytes made in this process are meant for these
 * (a light userdata is a pointer). */
int tide__decode_local(lua_State *L, const char *data, size_t len, char *err,
                       size_t errlen);
int tide__decode_list_local(lua_State *L, const char *data, size_t len, int max,
                            char *err, size_t errlen);

/* Sets the functions `encode(v [, root])` and `decode(s)` into the table at
 * the top of the stack (lua_codec.c).  Returns 0; the stack is unchanged. */
int tide__open_codec(lua_State *L);

#endif
