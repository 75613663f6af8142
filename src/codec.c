/* codec.c — encodes Lua values to bytes (see codec.h; codec_decode.c reads them back). */
#include "codec.h"
#include "codec_format.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TYPE_CDATA 10              /* lua_type of LuaJIT's FFI objects */
#define EXACT_INT 9007199254740992.0  /* 2^53: doubles up to here hold any integer */
#define KEY_SHOWN 40               /* bytes of a string key an error path shows */
#define STEP_TEXT (KEY_SHOWN * 4 + 16)  /* room for the text of one path step */

/* True when d is an integer the T_INT form keeps exactly (-0 is not: it
 * would come back as +0). */
static int exact_int(lua_Number d) {
  return d >= -EXACT_INT && d <= EXACT_INT && d == (lua_Number)(int64_t)d &&
         !(d == 0 && signbit(d));
}

/* ===== BUFFER ===== */

void tide__buf_init(tide_buf *b) {
  *b = (tide_buf){ 0 };
}

void tide__buf_free(tide_buf *b) {
  free(b->data);
  tide__buf_init(b);
}

/* Makes room for n more bytes: 0, or -1 when out of memory. */
static int grow(tide_buf *b, size_t n) {
  size_t cap = b->cap ? b->cap : 256;
  if (n > SIZE_MAX / 2 - b->len) return -1;
  while (cap - b->len < n) cap *= 2;
  char *p = realloc(b->data, cap);
  if (!p) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

static inline int reserve(tide_buf *b, size_t n) {
  return b->cap - b->len >= n ? 0 : grow(b, n);
}

int tide__buf_reserve(tide_buf *b, size_t n) { return reserve(b, n); }

/* memcpy for the short runs most pairs and strings are: two overlapping
 * fixed-size moves instead of a call.  dst and src must not overlap. */
static inline void copy_short(char *dst, const char *src, size_t n) {
  if (n > 16) {
    memcpy(dst, src, n);
  } else if (n >= 8) {
    memcpy(dst, src, 8);
    memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    memcpy(dst, src, 4);
    memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    for (size_t i = 0; i < n; i++) dst[i] = src[i];
  }
}

/* Writes v as a LEB128 varint at p (at most 10 bytes); returns the length. */
static inline size_t put_varint(char *p, uint64_t v) {
  size_t n = 0;
  for (; v >= 0x80; v >>= 7) p[n++] = (char)(v | 0x80);
  p[n++] = (char)v;
  return n;
}

/* ===== ENCODING ===== */

/* One step of the path from the root to the value being encoded. */
typedef struct step {
  enum { STEP_INDEX, STEP_KEY, STEP_IN_KEY } kind;
  size_t index;               /* STEP_INDEX: position in the array part */
  int key;                    /* STEP_KEY: stack index of the key       */
} step;

/* One encoded hash pair (key bytes, then value bytes) awaiting its place. */
typedef struct pair {
  const char *bytes;          /* where it is while being sorted */
  size_t off, len;            /* where it was written in out, its length */
} pair;

typedef struct enc {
  lua_State *L;
  tide_buf *out;
  const char *root;
  char *err;
  size_t errlen, errused;
  int sorted;                              /* canonical order (tide__encode) */
  int depth;                               /* tables open on the path    */
  const void *open[TIDE_CODEC_DEPTH];      /* those tables, outermost first */
  step path[TIDE_CODEC_DEPTH];             /* path[i]: the step out of open[i] */
  pair *pairs;                             /* hash pairs of every open table */
  size_t npairs, cappairs;
  /* Strings met twice (unordered encodings only: see enc_string_ref). */
  int refs;                                /* on                          */
  struct sref *seen;                       /* by address: open addressing */
  size_t seencap, nseen;
  const char **defs;                       /* defs[k]: the string defined as k */
  size_t ndefs, capdefs;
  /* The most bytes the value may take past `start`: met, the encoding
   * stops with `over` set and no message (tide__encode_within). */
  size_t start, limit;
  int over;
  /* Light userdata and cdata pass as nil: only the reason another value
   * cannot cross is wanted (tide__encode_why). */
  int pass_local;
  const void *marks[2];                    /* tide__json_mark_of's cache */
} enc;

/* A string the encoder met: its address (Lua strings are interned, so one
 * address is one content within a state) and 0 when met once, k + 1 once
 * defined as k. */
typedef struct sref { const char *p; size_t def; } sref;

static void say(enc *e, const char *fmt, ...) {
  if (e->errused + 1 >= e->errlen) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(e->err + e->errused, e->errlen - e->errused, fmt, ap);
  va_end(ap);
  if (n > 0) e->errused += (size_t)n;
  if (e->errused >= e->errlen) e->errused = e->errlen - 1;
}

static int is_identifier(const char *s, size_t n) {
  if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9')))
      return 0;
  }
  return 1;
}

/* Writes a string key as .name, or as ["quoted"] with \ddd escapes, cut at
 * KEY_SHOWN bytes, into buf[STEP_TEXT]. */
static void string_step(char *buf, const char *s, size_t n) {
  if (n <= KEY_SHOWN && is_identifier(s, n)) {
    sprintf(buf, ".%.*s", (int)n, s);
    return;
  }
  char *w = buf;
  *w++ = '[', *w++ = '"';
  for (size_t i = 0; i < n && i < KEY_SHOWN; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') *w++ = '\\', *w++ = (char)c;
    else if (c < 0x20 || c == 0x7f) w += sprintf(w, "\\%03u", c);
    else *w++ = (char)c;
  }
  sprintf(w, "%s\"]", n > KEY_SHOWN ? "..." : "");
}

/* Writes one step of a path — [2], .cb, ["odd key"], [true] — into buf[STEP_TEXT]. */
static void step_text(enc *e, const step *s, char *buf) {
  lua_State *L = e->L;
  size_t n;
  if (s->kind == STEP_INDEX) {
    snprintf(buf, STEP_TEXT, "[%zu]", s->index);
    return;
  }
  switch (lua_type(L, s->key)) {
  case LUA_TSTRING: {
    const char *k = lua_tolstring(L, s->key, &n);
    string_step(buf, k, n);
    break;
  }
  case LUA_TNUMBER: {
    lua_Number d = lua_tonumber(L, s->key);
    if (exact_int(d)) snprintf(buf, STEP_TEXT, "[%lld]", (long long)d);
    else snprintf(buf, STEP_TEXT, "[%.14g]", d);
    break;
  }
  case LUA_TBOOLEAN: strcpy(buf, lua_toboolean(L, s->key) ? "[true]" : "[false]"); break;
  default: strcpy(buf, "[table]"); break;
  }
}

/* Writes "<path>: <reason>" into err and returns -1.  The path runs from the
 * root through every open table; inside a key it stops at the table holding
 * the key, and the reason says so.  When the path does not fit, steps after
 * the first give way to "..." so that the reason is always there in full. */
static int fail(enc *e, const char *fmt, ...) {
  char reason[96], text[STEP_TEXT];
  size_t len[TIDE_CODEC_DEPTH], total = 0;
  int n = 0;
  if (e->errlen == 0) return -1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, sizeof reason, fmt, ap);
  va_end(ap);
  for (; n < e->depth && e->path[n].kind != STEP_IN_KEY; n++) {
    step_text(e, &e->path[n], text);
    total += len[n] = strlen(text);
  }
  const char *where = n < e->depth ? " (in a table key)" : "";
  size_t fixed = strlen(e->root) + strlen(": ") + strlen(reason) + strlen(where) + 1;
  int keep = n > 1, skip = keep;                /* steps [keep, skip) give way */
  if (fixed + total > e->errlen) {
    size_t room = e->errlen > fixed + 3 ? e->errlen - fixed - 3 : 0;
    while (skip < n && total > room) total -= len[skip++];
  }
  e->errused = 0;
  say(e, "%s", e->root);
  for (int i = 0; i < n; i++) {
    if (i == keep && skip > keep) say(e, "...");
    if (i >= keep && i < skip) continue;
    step_text(e, &e->path[i], text);
    say(e, "%s", text);
  }
  say(e, ": %s%s", reason, where);
  return -1;
}

static int out_of_memory(enc *e) {
  e->depth = 0;
  return fail(e, "out of memory");
}

static int enc_value(enc *e, int idx);

static int enc_number(enc *e, lua_Number d) {
  if (reserve(e->out, 10)) return out_of_memory(e);
  char *p = e->out->data + e->out->len;
  if (exact_int(d)) {
    int64_t i = (int64_t)d;
    uint64_t zigzag = i < 0 ? ~((uint64_t)i << 1) : (uint64_t)i << 1;
    *p = T_INT;
    e->out->len += 1 + put_varint(p + 1, zigzag);
    return 0;
  }
  uint64_t bits;
  memcpy(&bits, &d, 8);
  *p++ = T_DOUBLE;
  for (int i = 0; i < 8; i++) p[i] = (char)(bits >> (8 * i));
  e->out->len += 9;
  return 0;
}

/* A string's bytes after `tag` (T_STRING, or T_STRDEF). */
static int put_string(enc *e, int tag, const char *s, size_t n) {
  if (reserve(e->out, 11 + n)) return out_of_memory(e);
  char *p = e->out->data + e->out->len;
  *p = (char)tag;
  size_t head = 1 + put_varint(p + 1, n);
  copy_short(p + head, s, n);
  e->out->len += head + n;
  return 0;
}

static int enc_string(enc *e, const char *s, size_t n) { return put_string(e, T_STRING, s, n); }

/* The strings of an unordered encoding that repeat cross once: the second
 * time a string is met it is written as a definition (T_STRDEF, its bytes,
 * numbered from 0 in the order they come), and each time after as a
 * reference to that number (T_STRREF).  Decoding then makes each such
 * string once: LuaJIT interns every string it makes (a hash, a lookup and
 * a compare), most of a decoding's time on records, whose keys repeat
 * (bench/threads.lua; bench/RESULTS.md, issue 21).  The canonical encoding
 * has none, so that equal tables still encode to equal bytes. */
/* The most strings told apart; those met after are written whole.  The
 * strings that repeat in records, their keys, come first; and a table of
 * 64 KB stays in the cache and in malloc's heap (a larger one was mapped
 * and faulted in at each encoding: 2.8 -> 8 ms for bench/threads.lua's). */
#define SEEN_MAX ((size_t)2048)

static sref *seen_slot(enc *e, const char *p) {
  size_t mask = e->seencap - 1;
  size_t i = (size_t)(((uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ULL) >> 40) & mask;
  while (e->seen[i].p != NULL && e->seen[i].p != p) i = (i + 1) & mask;
  return &e->seen[i];
}

/* Makes room for one more string met: 0, or -1 when it cannot (then the
 * string is written whole).  The table starts at 64 slots (1 KB): a small
 * value, a task's arguments, then zeroes no 16 KB (5/6 of the instructions
 * of encoding { n = 2, 'hello', 42 }), and a large one doubles it 6 times. */
static int seen_room(enc *e) {
  if (2 * (e->nseen + 1) <= e->seencap) return 0;
  if (e->seencap >= 2 * SEEN_MAX) return -1;
  size_t cap = e->seencap ? 2 * e->seencap : 64;
  sref *old = e->seen, *fresh = calloc(cap, sizeof *fresh);
  if (fresh == NULL) return -1;
  size_t oldcap = e->seencap;
  e->seen = fresh;
  e->seencap = cap;
  for (size_t i = 0; i < oldcap; i++)
    if (old[i].p != NULL) *seen_slot(e, old[i].p) = old[i];
  free(old);
  return 0;
}

static int put_strref(enc *e, size_t k) {
  if (reserve(e->out, 11)) return out_of_memory(e);
  char *p = e->out->data + e->out->len;
  *p = T_STRREF;
  e->out->len += 1 + put_varint(p + 1, k);
  return 0;
}

static int enc_string_ref(enc *e, const char *s, size_t n) {
  if (!e->refs) return enc_string(e, s, n);
  sref *r = e->seen ? seen_slot(e, s) : NULL;
  if (r == NULL || r->p == NULL) {                    /* first met: written whole */
    if (seen_room(e) == 0) {
      r = seen_slot(e, s);
      r->p = s;
      r->def = 0;
      e->nseen++;
    }
    return enc_string(e, s, n);
  }
  if (r->def) return put_strref(e, r->def - 1);
  if (e->ndefs == e->capdefs) {                       /* met again: defined */
    size_t cap = e->capdefs ? 2 * e->capdefs : 256;
    const char **d = realloc(e->defs, cap * sizeof *d);
    if (d == NULL) return out_of_memory(e);
    e->defs = d;
    e->capdefs = cap;
  }
  if (put_string(e, T_STRDEF, s, n)) return -1;
  e->defs[e->ndefs] = s;
  r->def = ++e->ndefs;
  return 0;
}

/* Forgets the definitions made since there were `mark` (their bytes were
 * taken back): those strings count as met once again. */
static void undo_defs(enc *e, size_t mark) {
  for (; e->ndefs > mark; e->ndefs--) seen_slot(e, e->defs[e->ndefs - 1])->def = 0;
}

/* Pairs are ordered by their bytes.  Every encoding is self-delimiting, so
 * that compares the keys and, only when two keys encode alike (two tables
 * with the same contents), their values; pairs that still tie are the same
 * bytes, and their order cannot show. */
static int cmp_pairs(const void *a, const void *b) {
  const pair *x = a, *y = b;
  int c = memcmp(x->bytes, y->bytes, x->len < y->len ? x->len : y->len);
  return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* cmp_pairs(x, y) < 0, inlined: keys are short and differ early. */
static inline int pair_less(const pair *x, const pair *y) {
  const unsigned char *a = (const unsigned char *)x->bytes;
  const unsigned char *b = (const unsigned char *)y->bytes;
  size_t n = x->len < y->len ? x->len : y->len;
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return a[i] < b[i];
  return x->len < y->len;
}

/* Insertion sort for the few keys of a record, qsort past that. */
static void sort_pairs_of(pair *p, size_t n) {
  if (n > 16) {
    qsort(p, n, sizeof *p, cmp_pairs);
    return;
  }
  for (size_t i = 1; i < n; i++) {
    pair x = p[i];
    size_t j = i;
    for (; j > 0 && pair_less(&x, &p[j - 1]); j--) p[j] = p[j - 1];
    p[j] = x;
  }
}

/* Turns out[at..) — a byte kept for the pair count, the array values, then
 * the pairs pairs[base..npairs) in the order they were met — into the
 * format's order: count, pairs (sorted, unless e->sorted is 0), array
 * values.  Unless that is already the order, the pairs are copied past the
 * end of out, and written back from there; out->len never counts the copy.
 * Unsorted, a record (fewer than 128 pairs, no array values) is already in
 * order: its count is written into the byte kept for it, and nothing moves. */
static int place_pairs(enc *e, size_t base, size_t at) {
  tide_buf *out = e->out;
  size_t n = e->npairs - base;
  pair *p = n ? e->pairs + base : NULL;
  size_t from = n ? p[0].off : out->len;
  size_t body = out->len - from, values = from - at - 1;
  int moved = 0;
  char head[10];
  size_t hlen = put_varint(head, n);
  e->npairs = base;
  if (e->sorted) {
    for (size_t i = 0; i < n; i++) p[i].bytes = out->data + p[i].off;
    sort_pairs_of(p, n);
    for (size_t i = 1; i < n; i++) moved |= p[i].off < p[i - 1].off;
  }
  if (!moved && hlen == 1 && (n == 0 || values == 0)) {  /* in order already */
    out->data[at] = head[0];
    return 0;
  }
  if (reserve(out, 10 + body)) return out_of_memory(e);
  char *copy = out->data + out->len + 10, *w = out->data + at;
  memcpy(copy, out->data + from, body);
  memmove(w + hlen + body, w + 1, values);            /* array values to the end */
  memcpy(w, head, hlen);
  w += hlen;
  for (size_t i = 0; i < n; i++) {
    copy_short(w, copy + (p[i].off - from), p[i].len);
    w += p[i].len;
  }
  out->len = at + hlen + body + values;
  return 0;
}

/* Makes room for 64 more pairs, or twice as many: 0, or -1 when out of memory. */
static int more_pairs(enc *e) {
  size_t cap = e->cappairs ? 2 * e->cappairs : 64;
  pair *p = realloc(e->pairs, cap * sizeof *p);
  if (!p) return out_of_memory(e);
  e->pairs = p;
  e->cappairs = cap;
  return 0;
}

/* Notes the pair written from off to the end of out.  Inlined into
 * enc_pair, as enc_pair is into the walks: with the stack check enc_table
 * no longer makes, 43.3 -> 41.1 M instructions an unordered encoding of
 * bench/threads.lua's table (callgrind). */
static inline int push_pair(enc *e, size_t off) {
  if (e->npairs == e->cappairs && more_pairs(e)) return -1;
  e->pairs[e->npairs++] = (pair){ NULL, off, e->out->len - off };
  return 0;
}

/* The key at k as an index in 1..narr, or 0 when it is not one. */
static size_t array_index(lua_State *L, int k, size_t narr) {
  if (lua_type(L, k) != LUA_TNUMBER) return 0;
  lua_Number d = lua_tonumber(L, k);
  if (!(d >= 1 && d <= (lua_Number)narr)) return 0;
  int64_t i = (int64_t)d;                             /* (one instruction, unlike size_t) */
  return (lua_Number)i == d ? (size_t)i : 0;
}

static int enc_element(enc *e, size_t i, int idx) {
  step *s = &e->path[e->depth - 1];
  s->kind = STEP_INDEX;
  s->index = i;
  return enc_value(e, idx);
}

/* Encodes the pair whose key is at k and value at k + 1. */
__attribute__((always_inline)) static inline int enc_pair(enc *e, int k) {
  step *s = &e->path[e->depth - 1];
  size_t off = e->out->len;
  s->kind = STEP_IN_KEY;
  if (enc_value(e, k)) return -1;
  s->kind = STEP_KEY;
  s->key = k;
  return enc_value(e, k + 1) || push_pair(e, off) ? -1 : 0;
}

/* Writes t[from..narr] by index, nil for holes. */
static int values_by_index(enc *e, int t, size_t from, size_t narr) {
  lua_State *L = e->L;
  for (size_t i = from; i <= narr; i++) {
    lua_rawgeti(L, t, (int)i);                        /* t[i] */
    if (enc_element(e, i, -1)) return -1;
    lua_pop(L, 1);
  }
  return 0;
}

/* Writes t's pairs other than its array values t[1..narr], in lua_next order. */
static int walk_pairs(enc *e, int t, size_t narr) {
  lua_State *L = e->L;
  lua_pushnil(L);
  int k = lua_gettop(L);
  while (lua_next(L, t)) {                            /* key, value */
    if (!array_index(L, k, narr) && enc_pair(e, k)) return -1;
    lua_pop(L, 1);                                    /* key */
  }
  return 0;
}

/* Writes t's array values t[1..narr], then its other pairs, each once.
 * One lua_next walk does it while the walk meets 1, 2, ... narr first:
 * LuaJIT walks its array part first, so a list or a record goes so.  At
 * the first key out of that order (a hole, a pair, an index met early) the
 * values left are taken by index and the pairs by a walk of their own:
 * nothing written is taken back, as that would encode a table's contents
 * again at each level of nesting (2^depth times).  *vdefs: e->ndefs once
 * the values are written (enc_table: strings they defined). */
static int walk(enc *e, int t, size_t narr, size_t *vdefs) {
  lua_State *L = e->L;
  size_t want = 1;
  *vdefs = e->ndefs;
  lua_pushnil(L);
  int k = lua_gettop(L);                              /* the key's slot */
  while (lua_next(L, t)) {                            /* key, value */
    if (want > narr) {                                /* t[1..narr] met: a pair */
      if (enc_pair(e, k)) return -1;
    } else if (array_index(L, k, narr) == want) {
      if (enc_element(e, want++, k + 1)) return -1;
      *vdefs = e->ndefs;
    } else {
      lua_pop(L, 2);
      if (values_by_index(e, t, want, narr)) return -1;
      *vdefs = e->ndefs;
      return walk_pairs(e, t, narr);
    }
    lua_pop(L, 1);                                    /* key */
  }
  return 0;
}

static int enc_table(enc *e, int t) {
  lua_State *L = e->L;
  if (t < 0) t = lua_gettop(L) + t + 1;
  const void *self = lua_topointer(L, t);
  for (int i = 0; i < e->depth; i++)
    if (e->open[i] == self) return fail(e, "cycle (table refers to itself)");
  if (e->depth == TIDE_CODEC_DEPTH)
    return fail(e, "nesting deeper than %d", TIDE_CODEC_DEPTH);
  /* Its 3 stack slots were reserved with the others (ENC_STACK), and
   * nothing in an encoding runs the collector, which could shrink them. */
  if (reserve(e->out, 12)) return out_of_memory(e);
  int mark = 0, is_key = e->depth > 0 && e->path[e->depth - 1].kind == STEP_IN_KEY;
  if (!is_key && lua_getmetatable(L, t)) {            /* (a slot of ENC_STACK's margin) */
    mark = tide__json_mark_of(L, lua_topointer(L, -1), e->marks);
    lua_pop(L, 1);
    if (mark == TIDE_MARK_NULL) {                     /* (empty: null is read-only; else a plain table) */
      lua_pushnil(L);
      if (lua_next(L, t)) {
        lua_pop(L, 2);
        mark = 0;
      }
    }
    if (mark == TIDE_MARK_NULL) {
      e->out->data[e->out->len++] = T_NULL;
      return 0;
    }
  }
  size_t narr = lua_objlen(L, t), base = e->npairs, defs = e->ndefs, vdefs;
  char *p = e->out->data + e->out->len;
  *p = mark == TIDE_MARK_ARRAY ? T_ARRAY : T_TABLE;
  e->out->len += 1 + put_varint(p + 1, narr);
  size_t at = e->out->len++;                          /* the pair count's byte */
  e->open[e->depth++] = self;
  if (walk(e, t, narr, &vdefs)) return -1;
  if (vdefs > defs && e->npairs > base) {
    /* Strings defined among the array values, and pairs: place_pairs
     * moves the pairs before the values, where a reference to one of
     * those strings, or a string defined (they are numbered in the order
     * they come), would be out of place.  The pairs are encoded again
     * without references; the values keep theirs (a task's arguments
     * { n = N, ... }: the records among them, and one pair). */
    e->out->len = e->pairs[base].off;
    e->npairs = base;
    undo_defs(e, vdefs);
    int refs = e->refs;
    e->refs = 0;
    int rc = walk_pairs(e, t, narr);
    e->refs = refs;
    if (rc) return -1;
  }
  if (place_pairs(e, base, at)) return -1;
  e->depth--;
  return 0;
}

static const char *refused(int type) {
  switch (type) {
  case LUA_TFUNCTION: return "functions";
  case LUA_TUSERDATA: return "userdata";
  case LUA_TLIGHTUSERDATA: return "light userdata";
  case LUA_TTHREAD: return "coroutines";
  case TYPE_CDATA: return "cdata";
  default: return "values of this type";
  }
}

static int enc_value(enc *e, int idx) {
  lua_State *L = e->L;
  int type = lua_type(L, idx);
  if (e->out->len - e->start > e->limit) {
    e->over = 1;
    return -1;
  }
  switch (type) {
  case LUA_TNONE:
  case LUA_TNIL:
  case LUA_TBOOLEAN:
    if (reserve(e->out, 1)) return out_of_memory(e);
    e->out->data[e->out->len++] =
        type == LUA_TBOOLEAN ? (lua_toboolean(L, idx) ? T_TRUE : T_FALSE) : T_NIL;
    return 0;
  case LUA_TNUMBER: return enc_number(e, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return enc_string_ref(e, s, n);
  }
  case LUA_TTABLE: return enc_table(e, idx);
  case LUA_TLIGHTUSERDATA:
  case TYPE_CDATA:
    if (e->pass_local) {
      if (reserve(e->out, 1)) return out_of_memory(e);
      e->out->data[e->out->len++] = T_NIL;
      return 0;
    }
    /* fall through */
  default: return fail(e, "%s cannot cross to a thread", refused(type));
  }
}

/* Stack slots the deepest encoding uses (3 per open table), reserved before
 * anything is allocated: growing a stack is the one thing in encoding that
 * can raise (out of memory), and then nothing must be held. */
#define ENC_STACK (3 * TIDE_CODEC_DEPTH + 8)

static void enc_init(enc *e, lua_State *L, const char *root, tide_buf *out,
                     char *err, size_t errlen, int sorted, size_t limit) {
  e->L = L, e->out = out, e->root = root ? root : "value", e->sorted = sorted;
  e->err = err, e->errlen = err ? errlen : 0, e->errused = 0;
  e->depth = 0, e->pairs = NULL, e->npairs = e->cappairs = 0;
  e->refs = !sorted, e->seen = NULL, e->seencap = e->nseen = 0;
  e->defs = NULL, e->ndefs = e->capdefs = 0;
  e->start = out->len, e->limit = limit, e->over = 0, e->pass_local = 0;
  e->marks[0] = e->marks[1] = NULL;
}

static void enc_free(enc *e) {
  free(e->pairs);
  free(e->seen);
  free(e->defs);
}

/* 0; -1 with a message in err; TIDE_CODEC_OVER past `limit` bytes. */
static int encode(lua_State *L, int idx, const char *root, tide_buf *out,
                  char *err, size_t errlen, int sorted, size_t limit, int pass_local) {
  int top = lua_gettop(L);
  size_t len = out->len;
  enc e;                                /* path and open need no zeroing */
  enc_init(&e, L, root, out, err, errlen, sorted, limit);
  e.pass_local = pass_local;
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = top + idx + 1;
  if (lua_type(L, idx) == LUA_TTABLE && !lua_checkstack(L, ENC_STACK))
    return fail(&e, "Lua stack overflow");
  int rc = enc_value(&e, idx);
  lua_settop(L, top);
  if (rc) out->len = len;
  enc_free(&e);
  return rc && e.over ? TIDE_CODEC_OVER : rc;
}

int tide__encode(lua_State *L, int idx, const char *root, tide_buf *out,
                 char *err, size_t errlen) {
  return encode(L, idx, root, out, err, errlen, 1, SIZE_MAX, 0);
}

int tide__encode_unordered(lua_State *L, int idx, const char *root,
                           tide_buf *out, char *err, size_t errlen) {
  return encode(L, idx, root, out, err, errlen, 0, SIZE_MAX, 0);
}

int tide__encode_within(lua_State *L, int idx, const char *root, tide_buf *out,
                        size_t limit, char *err, size_t errlen) {
  return encode(L, idx, root, out, err, errlen, 0, limit, 0);
}

/* { n = n, v1 .. vn } for the values at first .. first + n - 1: its one
 * pair, then the values (nil for holes), as enc_table would write that
 * table with narr = n. */
static int enc_list(enc *e, int first, int n) {
  if (reserve(e->out, 15)) return out_of_memory(e);
  char *p = e->out->data + e->out->len;
  size_t len = 0;
  p[len++] = T_TABLE;
  len += put_varint(p + len, (uint64_t)n);
  p[len++] = 1;                                       /* one pair: n */
  p[len++] = T_STRING;
  p[len++] = 1;
  p[len++] = 'n';
  e->out->len += len;
  if (enc_number(e, n)) return -1;
  e->open[0] = NULL;                                  /* no table: none can be a cycle with it */
  e->depth = 1;
  for (int i = 1; i <= n; i++)
    if (enc_element(e, (size_t)i, first + i - 1)) return -1;
  e->depth = 0;
  return 0;
}

/* As encode, for a list. */
static int encode_list(lua_State *L, int first, int n, const char *root,
                       tide_buf *out, char *err, size_t errlen, size_t limit, int pass_local) {
  int top = lua_gettop(L);
  size_t len = out->len;
  enc e;
  enc_init(&e, L, root, out, err, errlen, 0, limit);
  e.pass_local = pass_local;
  if (first < 0 && first > LUA_REGISTRYINDEX) first = top + first + 1;
  int rc = n < 0 || first < 1 || first + n - 1 > top ? fail(&e, "bad list of values")
         : !lua_checkstack(L, ENC_STACK) ? fail(&e, "Lua stack overflow")
         : enc_list(&e, first, n);
  lua_settop(L, top);
  if (rc) out->len = len;
  enc_free(&e);
  return rc && e.over ? TIDE_CODEC_OVER : rc;
}

int tide__encode_list(lua_State *L, int first, int n, const char *root,
                      tide_buf *out, char *err, size_t errlen) {
  return encode_list(L, first, n, root, out, err, errlen, SIZE_MAX, 0);
}

int tide__encode_list_within(lua_State *L, int first, int n, const char *root,
                             tide_buf *out, size_t limit, char *err, size_t errlen) {
  return encode_list(L, first, n, root, out, err, errlen, limit, 0);
}

/* The encodings, into a buffer of their own that is then dropped, with
 * light userdata and cdata passing: n < 0 for the value at idx, else the
 * list of n from idx. */
int tide__encode_why(lua_State *L, int idx, int n, const char *root, char *err, size_t errlen) {
  tide_buf scratch;
  tide__buf_init(&scratch);
  int rc = n < 0 ? encode(L, idx, root, &scratch, err, errlen, 0, SIZE_MAX, 1)
                 : encode_list(L, idx, n, root, &scratch, err, errlen, SIZE_MAX, 1);
  tide__buf_free(&scratch);
  return rc;
}

int tide__encode_string(tide_buf *out, const char *s, size_t len) {
  enc e = { .out = out, .limit = SIZE_MAX };
  return enc_string(&e, s, len);
}
