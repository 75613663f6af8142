/* test_alloc_cache.c — the allocator cache in front of a host's allocator: exact sizes, bounds, every block back at close (TAP).
 *
 * The host's allocator here checks what it is told: each block carries a
 * header with its size, and a free or realloc of a size other than the
 * block's is counted.  After lua_close, every block must have come back
 * to it, with the right sizes, whatever the cache did in between. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "alloc_cache.h"
#include "tide.h"

#include "lua_exercise.h"
#include "tap.h"

#define MAGIC 0x7469646541424cULL

typedef struct { uint64_t magic, size; } header;   /* 16 bytes: keeps the alignment */

typedef struct {
  long long blocks, bytes;   /* outstanding */
  long long peak;            /* the most bytes outstanding */
  long long watched_frees;   /* frees of blocks of the size `watched` */
  size_t watched;
  long long big_asks;        /* allocations and reallocs of more than TIDE_ALLOC_CACHE_LARGEST,
                                a multiple of 8 (an array, not a string) */
  long long news;            /* new blocks asked for (not resizes) */
  long long bad_sizes;       /* frees and reallocs told a wrong size */
  long long bad_blocks;      /* pointers it never gave */
  long long limit;           /* the most bytes outstanding it gives (0: no limit), as a host that
                                bounds a state's memory does (worker.c, thread_memory) */
  int fail_new, fail_all;    /* fail every new block / every allocation and resize */
} host;

static void *host_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  host *h = ud;
  header *b = p ? (header *)p - 1 : NULL;
  if (b) {
    if (b->magic != MAGIC) { h->bad_blocks++; return NULL; }
    if (b->size != osize) h->bad_sizes++;
  }
  if (nsize == 0) {
    if (b) {
      h->blocks--;
      h->bytes -= (long long)b->size;
      if (b->size == h->watched) h->watched_frees++;
      b->magic = 0;
      free(b);
    }
    return NULL;
  }
  if (nsize > TIDE_ALLOC_CACHE_LARGEST && nsize % 8 == 0) h->big_asks++;
  if (b == NULL) h->news++;
  if (h->fail_all || (h->fail_new && b == NULL)) return NULL;
  if (h->limit && h->bytes - (b ? (long long)b->size : 0) + (long long)nsize > h->limit) return NULL;
  header *n = realloc(b, sizeof *n + nsize);
  if (n == NULL) return NULL;
  if (b) h->bytes -= (long long)n->size; else h->blocks++;
  n->magic = MAGIC;
  n->size = nsize;
  h->bytes += (long long)nsize;
  if (h->bytes > h->peak) h->peak = h->bytes;
  return n + 1;
}

/* Another layer a host might put on top after tide: it passes everything on. */
typedef struct { lua_Alloc f; void *ud; long long calls; } outer;

static void *outer_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  outer *o = ud;
  o->calls++;
  return o->f(o->ud, p, osize, nsize);
}

/* A state with tide and its cache, small blocks kept too (off by default:
 * small_off_by_default): most checks here are of the free lists. */
static lua_State *open_default(host *h) {
  lua_State *L = lua_newstate(host_alloc, h);
  if (L == NULL) { printf("Bail out! lua_newstate\n"); exit(1); }
  luaL_openlibs(L);
  if (tide_open(L, NULL) != 0) { printf("Bail out! tide_open: %s\n", lua_tostring(L, -1)); exit(1); }
  lua_setglobal(L, "tide");
  return L;
}

static lua_State *open_with(host *h) {
  lua_State *L = open_default(h);
  tide__alloc_cache_set_small(L, SIZE_MAX);
  return L;
}

/* Closes L and checks that every block came back to the host, each freed
 * with its own size: one check, named `what`. */
static void close_clean(lua_State *L, host *h, const char *what) {
  lua_close(L);
  ok(h->blocks == 0 && h->bytes == 0 && h->bad_sizes == 0 && h->bad_blocks == 0,
     "%s (%lld blocks, %lld bytes, %lld wrong sizes, %lld unknown blocks)",
     what, h->blocks, h->bytes, h->bad_sizes, h->bad_blocks);
}

/* A burst of n tasks spawned, then awaited, in a tide.run. */
static const char *BURST =
  "local n = ...\n"
  "local status = tide.run(function()\n"
  "  local ts = {}\n"
  "  for i = 1, n do ts[i] = tide.spawn(function() return i end) end\n"
  "  for i = 1, n do assert(ts[i]:await() == 'ok' and ts[i].value == i) end\n"
  "end)\n"
  "assert(status == 'ok', status)\n"
  "collectgarbage(); collectgarbage()\n";

static void burst(lua_State *L, int n) {
  luaL_loadstring(L, BURST);
  lua_pushinteger(L, n);
  if (lua_pcall(L, 1, 0, 0) != 0) { printf("# burst: %s\n", lua_tostring(L, -1)); lua_pop(L, 1); }
}

static void stats(lua_State *L, size_t *kept, size_t *cap, unsigned long long *hits) {
  tide__alloc_cache_stats(L, kept, cap, hits);
}

static void reuse_and_bounds(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  size_t kept, cap;
  unsigned long long hits0, hits1;
  stats(L, &kept, &cap, &hits0);
  ok(cap == TIDE_ALLOC_CACHE_DEFAULT, "the cache is in front of a new state's allocator, cap %zu", cap);
  burst(L, 50000);
  stats(L, &kept, &cap, &hits0);
  ok(kept > 0, "a burst of tasks, collected, leaves freed blocks kept (%zu bytes)", kept);
  long long held = h.bytes;
  burst(L, 50000);
  stats(L, &kept, &cap, &hits1);
  ok(hits1 - hits0 >= 50000, "the next burst takes its blocks from the cache (%llu hits)", hits1 - hits0);
  ok(h.bytes <= held + (held / 4), "... and the host's allocator gives out little more (%lld -> %lld bytes)",
     held, h.bytes);
  ok(h.bad_sizes == 0 && h.bad_blocks == 0, "every block came back with its own size (%lld, %lld)",
     h.bad_sizes, h.bad_blocks);

  ok(run(L, "tide.configure{ alloc_cache = 0 }"), "tide.configure{ alloc_cache = 0 }");
  stats(L, &kept, &cap, &hits0);
  ok(kept == 0 && cap == 0, "... gives every kept block back (%zu kept)", kept);
  burst(L, 20000);
  stats(L, &kept, &cap, &hits1);
  ok(kept == 0 && hits1 == hits0, "... and keeps none after (%zu kept, %llu hits)", kept, hits1 - hits0);
  ok(run(L, "tide.configure{ alloc_cache = 1048576 }"), "tide.configure{ alloc_cache = 1 MiB }");
  burst(L, 50000);
  stats(L, &kept, &cap, &hits1);
  ok(cap == 1048576 && kept <= cap && kept > 0, "... keeps no more than its cap (%zu kept)", kept);

  close_clean(L, &h, "after lua_close every block is back with the host");
}

/* Blocks of one size kept, then a larger heap of another size freed: the
 * cache keeps no more small blocks than the heap held at its largest
 * (without the bound it would keep both). */
static void bounded_by_heap(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  ok(run(L,
    "local function fill(n, make) local t = {} for i = 1, n do t[i] = make() end return t end\n"
    "local a = fill(200000, function() return { 1, 2, 3 } end)\n"
    "a = nil; collectgarbage(); collectgarbage()\n"
    "local b = fill(200000, function() return { 1, 2, 3, 4, 5, 6, 7 } end)\n"
    "PEAK = collectgarbage('count') * 1024\n"
    "b = nil; collectgarbage(); collectgarbage()\n"), "two heaps of different block sizes, one after the other");
  lua_getglobal(L, "PEAK");
  double peak = lua_tonumber(L, -1);
  lua_pop(L, 1);
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  size_t small = tide__alloc_cache_small(L);
  ok(small > TIDE_ALLOC_CACHE_FLOOR && (double)small <= peak && small <= kept,
     "the cache keeps no more small blocks than the heap's peak (%zu kept, peak %.0f)", small, peak);
  close_clean(L, &h, "every block is back at close");
}

/* By default no small block is kept (they are handed back in the
 * collector's order, which scatters what is allocated together), and the
 * larger ones are: a burst's arrays. */
static void small_off_by_default(void) {
  host h = { 0 };
  lua_State *L = open_default(&h);
  ok(tide__alloc_cache_small_cap(L) == 0, "small blocks are not kept by default (small_cap 0)");
  burst(L, 100000);
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  ok(tide__alloc_cache_small(L) == 0 && kept > 0,
     "... after a burst: no small block kept, %zu bytes of larger ones", kept);
  long long before = h.news;
  burst(L, 100000);
  ok(h.news - before > 100000, "... and the next burst asks the host for its tables (%lld new blocks)",
     h.news - before);
  ok(tide__alloc_cache_set_small(L, 1 << 20) == 0 && tide__alloc_cache_small_cap(L) == 1 << 20,
     "small blocks kept when asked (1 MiB)");
  burst(L, 100000);
  ok(tide__alloc_cache_small(L) > 0 && tide__alloc_cache_small(L) <= 1 << 20,
     "... up to that (%zu kept)", tide__alloc_cache_small(L));
  ok(tide__alloc_cache_set_small(L, 0) == 0 && tide__alloc_cache_small(L) == 0,
     "... and given back when it is set to 0 again");
  close_clean(L, &h, "every block is back at close");
}

/* A burst whose tasks all ended leaves all its blocks for the next one:
 * the next burst asks the host for almost nothing.  Bounded by the heap
 * in use at each free, the cache kept a burst's blocks only until the
 * collector had freed half of them (144,445 new blocks asked for here),
 * and the allocator gave the rest to the kernel, for the next burst to
 * fault in again. */
static void burst_kept_whole(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  burst(L, 100000);
  burst(L, 100000);
  long long before = h.news;
  burst(L, 100000);
  long long asked = h.news - before;
  ok(asked < 1000, "a burst of 100,000 tasks after another asks the host for %lld new blocks", asked);
  close_clean(L, &h, "every block is back at close");
}

/* ~300 MiB handed out in 1 MiB strings (an odd size, which no free list
 * takes), a collection every 8: returns the heap's largest size seen
 * between strings (one check: the churn ran). */
static double churn(lua_State *L) {
  ok(run(L,
    "TOP = 0\n"
    "local s\n"
    "for i = 1, 300 do\n"
    "  s = string.rep('x', 1048576 + i % 7)\n"
    "  local m = collectgarbage('count') * 1024\n"
    "  if m > TOP then TOP = m end\n"
    "  if i % 8 == 0 then s = nil; collectgarbage() end\n"
    "end\n"
    "s = nil; collectgarbage(); collectgarbage()\n"), "then ~300 MiB handed out in 1 MiB strings");
  lua_getglobal(L, "TOP");
  double top = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return top;
}

/* The bound on small blocks follows the heap's recent peak down: once a
 * burst's peak is two windows (64-128 MiB handed out) behind, a process
 * whose heap stays small keeps no more small blocks than that heap's peak,
 * not the burst's.  The churn allocates only blocks the free lists do not
 * take (1 MiB strings: an odd size), so nothing but the bound can lower
 * what is kept. */
static void small_bound_decays(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  burst(L, 100000);
  size_t after_burst = tide__alloc_cache_small(L);
  double top = churn(L);
  size_t small = tide__alloc_cache_small(L);
  /* TOP is sampled between strings: one string and string.rep's buffer
   * in flight (2 MiB) may come on top of it, and the collector's own
   * blocks: 4 MiB of room, still far below what the burst left. */
  double bound = top + (4 << 20);
  if (bound < (double)TIDE_ALLOC_CACHE_FLOOR) bound = (double)TIDE_ALLOC_CACHE_FLOOR;
  ok(after_burst > bound && (double)small <= bound,
     "the small blocks kept follow the heap's peak down (%zu after the burst, %zu after, peak since %.0f)",
     after_burst, small, top);
  close_clean(L, &h, "every block is back at close");
}

/* An array that grows by doubling (to 1 MiB), freed, then grown again:
 * each of its sizes over TIDE_ALLOC_CACHE_LARGEST comes back from the
 * cache, its contents copied, and the host is asked for none. */
static void growing_arrays(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  const char *grow =
    "local t = {} for i = 1, 100000 do t[i] = i end\n"
    "for i = 1, 100000 do assert(t[i] == i) end\n"
    "t = nil; collectgarbage(); collectgarbage()\n";
  ok(run(L, grow), "an array of 100,000 grown and freed");
  long long asks = h.big_asks, peak = h.peak;
  ok(run(L, grow), "... grown again, its values intact");
  ok(h.big_asks == asks, "... each larger size from the blocks it had before (%lld asked of the host)",
     h.big_asks - asks);
  ok(h.peak == peak, "... and the host gave out no more (peak %lld -> %lld)", peak, h.peak);
  close_clean(L, &h, "every block is back at close");
}

/* The big blocks kept go back once 64 MiB were handed out without them
 * being taken: a process whose arrays stay large does not keep their old
 * sizes for ever. */
static void big_blocks_expire(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  size_t kept0, kept1, cap;
  unsigned long long hits;
  stats(L, &kept0, &cap, &hits);
  ok(run(L, "local t = {} for i = 1, 50000 do t[i] = i end t = nil collectgarbage() collectgarbage()"),
     "an array of 50,000 grown (to 512 KiB) and freed");
  stats(L, &kept1, &cap, &hits);
  ok(kept1 >= kept0 + (65536 + 1) * 8, "... its block is kept (%zu -> %zu bytes)", kept0, kept1);
  h.watched = (65536 + 1) * 8;          /* a LuaJIT array part of 2^16 slots and slot 0 */
  long long before = h.watched_frees;
  ok(run(L, "local x for i = 1, 1000000 do x = { i, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 } end"),
     "then 1,000,000 small tables made and dropped (~170 MB handed out)");
  ok(h.watched_frees - before == 1, "... the array's block went back (%lld)", h.watched_frees - before);
  close_clean(L, &h, "every block is back at close");
}

/* A host wraps the allocator again after tide: tide cannot take itself out
 * at close, and stays a pass-through that keeps nothing. */
static void wrapped_after(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  burst(L, 20000);
  outer o = { 0 };
  o.f = lua_getallocf(L, &o.ud);
  lua_setallocf(L, outer_alloc, &o);
  burst(L, 20000);
  ok(o.calls > 20000, "the host's outer layer sees the allocations (%lld)", o.calls);
  close_clean(L, &h, "wrapped after tide: every block is back at close");
}

/* Bad caps from Lua are refused before anything changes. */
static void bad_options(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  const char *bad[] = { "-1", "1.5", "'64M'", "0/0", "1/0" };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    char code[128];
    snprintf(code, sizeof code, "tide.configure{ alloc_cache = %s }", bad[i]);
    int failed = luaL_dostring(L, code) != 0;
    const char *msg = failed ? lua_tostring(L, -1) : "";
    ok(failed && strstr(msg, "tide.configure") && strstr(msg, "alloc_cache"),
       "alloc_cache = %s is refused, naming the option (%s)", bad[i], msg);
    lua_settop(L, 0);
  }
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  ok(cap == TIDE_ALLOC_CACHE_DEFAULT, "... and the cap is unchanged (%zu)", cap);
  close_clean(L, &h, "every block is back at close");
}

/* A cap beyond what a size_t holds keeps all it may, and a negative one
 * given to tide.core itself is refused: neither turns into some other cap
 * (a double of 2^64 or more converted to size_t is undefined; on x86-64 it
 * was 0, the cache silently off). */
static void huge_cap(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  size_t kept, cap;
  unsigned long long hits;
  const char *huge[] = { "2^53", "2^63", "2^64", "1e300" };
  for (size_t i = 0; i < sizeof huge / sizeof *huge; i++) {
    char code[128];
    snprintf(code, sizeof code, "tide.configure{ alloc_cache = %s }", huge[i]);
    int done = run(L, code);
    stats(L, &kept, &cap, &hits);
    ok(done && cap >= ((size_t)1 << 53), "alloc_cache = %s keeps a cap that large (cap %zu)", huge[i], cap);
  }
  ok(run(L, "local ok, err = pcall(require('tide.core').alloc_cache, -1)\n"
            "assert(not ok and tostring(err):find('non-negative', 1, true), tostring(err))"),
     "tide.core's alloc_cache(-1) is refused");
  stats(L, &kept, &cap, &hits);
  ok(cap >= ((size_t)1 << 53), "... and the cap is unchanged (%zu)", cap);
  close_clean(L, &h, "every block is back at close");
}

/* The allocator's contract, called directly: a resize that fails leaves
 * the old block as it was, and a shrink does not fail when the host's own
 * resize would not ("Lua assumes that the allocator never fails when
 * osize >= nsize", the Lua 5.1 manual, lua_Alloc; LuaJIT shrinks its
 * string buffers and string table inside a GC step).  Cap 0: nothing kept
 * can serve the request. */
static int intact(const unsigned char *p, size_t n, unsigned char v) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != v) return 0;
  return 1;
}

static void failed_resizes(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  ok(run(L, "tide.configure{ alloc_cache = 0 }"), "cap 0");
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t grows[][2] = { { 24, 40 }, { 1000, 3000 }, { 4096, 1000000 }, { 40, 600 }, { 600, 4000000 } };
  for (size_t i = 0; i < sizeof grows / sizeof *grows; i++) {
    size_t o = grows[i][0], n = grows[i][1];
    unsigned char *p = f(ud, NULL, 0, o);
    memset(p, 0xa5, o);
    h.fail_all = 1;
    void *q = f(ud, p, o, n);
    h.fail_all = 0;
    ok(q == NULL && intact(p, o, 0xa5), "a resize %zu -> %zu the host fails returns NULL, the block intact", o, n);
    f(ud, p, o, 0);
  }
  size_t shrinks[][2] = { { 4096, 1024 }, { 1000, 16 }, { 65544, 520 }, { 2000000, 1000 } };
  for (size_t i = 0; i < sizeof shrinks / sizeof *shrinks; i++) {
    size_t o = shrinks[i][0], n = shrinks[i][1];
    unsigned char *p = f(ud, NULL, 0, o);
    memset(p, 0x5a, o);
    h.fail_new = 1;
    unsigned char *q = f(ud, p, o, n);
    h.fail_new = 0;
    ok(q != NULL && intact(q, n, 0x5a), "a shrink %zu -> %zu succeeds when only new blocks fail", o, n);
    f(ud, q ? q : p, q ? n : o, 0);
  }
  close_clean(L, &h, "every block is back at close");
}

/* Random allocations, frees and resizes called directly, with caps
 * changed and a host that refuses now and then: after every call, what the
 * host holds is the state's heap, the blocks live and the blocks kept,
 * to the byte (the cache's count of what it keeps does not drift), kept
 * stays within the cap, and every live block keeps its contents. */
typedef struct { unsigned char *p; size_t size; unsigned char v; } live;

/* The first and last 64 bytes of n (all of a short block): a copy that
 * lost the prefix or the tail shows, without a pass over megabytes. */
static void mark(unsigned char *p, size_t n, unsigned char v) {
  size_t k = n < 128 ? n : 64;
  memset(p, v, k);
  memset(p + n - k, v, k);
}

static int marked(const unsigned char *p, size_t n, unsigned char v) {
  size_t k = n < 128 ? n : 64;
  return intact(p, k, v) && intact(p + n - k, k, v);
}

static size_t random_size(unsigned *seed) {
  unsigned r = rand_r(seed);
  switch (r % 6) {
  case 0: return 8 * (1 + r / 6 % 64);                       /* small, on a list */
  case 1: return 1 + r / 6 % 600;                            /* any size */
  case 2: return 8 * (65 + r / 6 % 4000);                    /* big, in a ring */
  case 3: return ((size_t)1 << (10 + r / 6 % 12)) + 8;       /* a table's array */
  case 4: return TIDE_ALLOC_CACHE_BIGGEST - 8 + 8 * (r / 6 % 3);   /* at the edge */
  default: return 1 + r / 6 % 3000000;
  }
}

static void accounting_under_random_calls(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  long long base = h.bytes - (long long)kept;
  enum { N = 64 };
  live blocks[N] = { { 0 } };
  long long live_bytes = 0, drift = 0, over_cap = 0, small_over = 0, lost = 0, failed_shrinks = 0;
  unsigned seed = 7;
  for (int step = 0; step < 60000; step++) {
    unsigned r = rand_r(&seed);
    live *b = &blocks[r % N];
    h.fail_new = r % 97 == 0;
    h.fail_all = r % 89 == 0;
    if (r % 501 == 0) tide__alloc_cache_set(L, (size_t)(rand_r(&seed) % 4) << 22);
    if (b->p == NULL) {
      size_t n = random_size(&seed);
      b->p = f(ud, NULL, 0, n);
      if (b->p) { b->size = n; b->v = (unsigned char)r; mark(b->p, n, b->v); live_bytes += (long long)n; }
    } else if (r % 3 == 0) {
      if (!marked(b->p, b->size, b->v)) lost++;
      f(ud, b->p, b->size, 0);
      live_bytes -= (long long)b->size;
      b->p = NULL;
    } else {
      size_t n = random_size(&seed);
      unsigned char *q = f(ud, b->p, b->size, n);
      if (q != NULL) {
        if (n >= b->size ? !marked(q, b->size, b->v) : !intact(q, n < 64 ? n : 64, b->v)) lost++;
        live_bytes += (long long)n - (long long)b->size;
        b->p = q;
        b->size = n;
        mark(q, n, b->v);
      } else if (n <= b->size && !h.fail_all) {
        failed_shrinks++;
      } else if (!marked(b->p, b->size, b->v)) {
        lost++;
      }
    }
    h.fail_new = h.fail_all = 0;
    stats(L, &kept, &cap, &hits);
    if (h.bytes != base + live_bytes + (long long)kept) drift++;
    if (kept > cap) over_cap++;
    if (tide__alloc_cache_small(L) > kept) small_over++;
  }
  ok(drift == 0 && over_cap == 0 && small_over == 0,
     "60,000 random calls: the host holds the heap, the live blocks and the kept ones to the byte "
     "(%lld drifts), kept <= cap (%lld over), small <= kept (%lld)", drift, over_cap, small_over);
  ok(lost == 0 && failed_shrinks == 0, "... every block keeps its contents (%lld lost), no shrink fails (%lld)",
     lost, failed_shrinks);
  for (int i = 0; i < N; i++)
    if (blocks[i].p) f(ud, blocks[i].p, blocks[i].size, 0);
  tide__alloc_cache_set(L, 0);
  stats(L, &kept, &cap, &hits);
  ok(kept == 0 && tide__alloc_cache_small(L) == 0 && h.bytes == base,
     "... and cap 0 gives every kept block back (%zu kept, %lld bytes over the heap)", kept, h.bytes - base);
  close_clean(L, &h, "every block is back at close");
}

/* A host that bounds the state's memory (as worker.c does for
 * thread_memory) counts the blocks kept as used: when it refuses, what is
 * kept must go back to it first, or a state fails with room to spare. */
static void kept_blocks_yield_to_a_limit(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  ok(run(L, "local t = {} for i = 1, 200000 do t[i] = { 1, 2, 3 } end t = nil collectgarbage() collectgarbage()"),
     "200,000 small tables made and freed");
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  ok(kept > TIDE_ALLOC_CACHE_FLOOR, "... their blocks are kept (%zu bytes)", kept);
  h.limit = h.bytes + (long long)kept / 2;
  char code[160];
  snprintf(code, sizeof code, "local t = {} for i = 1, %zu do t[i] = { 1, 2, 3, 4, 5, 6, 7 } end", kept / 128);
  ok(run(L, code), "then, under a host limit of what is out + half what is kept, tables of another size "
                   "as large as what is kept (limit %lld)", h.limit);
  h.limit = 0;
  close_clean(L, &h, "every block is back at close");
}

/* Anchors (alloc_cache.c): after a burst and a full collection the cache
 * holds a freed small block in windows (TIDE_ALLOC_CACHE_ANCHOR_SHIFT) where small
 * blocks were freed, never more of them than the cap's share (cap / window), counted
 * in what is kept; a lower cap gives them back, and so does close. */
static void anchors_hold_windows(void) {
  host h = { 0 };
  lua_State *L = open_default(&h);
  burst(L, 100000);
  size_t n = tide__alloc_cache_anchors(L), kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  ok(n > 16 && n <= TIDE_ALLOC_CACHE_DEFAULT >> TIDE_ALLOC_CACHE_ANCHOR_SHIFT && kept >= n * 8,
     "a burst leaves anchors in the windows it freed (%zu, %zu bytes kept)", n, kept);
  tide__alloc_cache_set(L, (size_t)4 << TIDE_ALLOC_CACHE_ANCHOR_SHIFT);
  ok(tide__alloc_cache_anchors(L) <= 4, "a cap of 4 windows leaves at most 4 anchors (%zu)",
     tide__alloc_cache_anchors(L));
  burst(L, 100000);
  stats(L, &kept, &cap, &hits);
  ok(tide__alloc_cache_anchors(L) <= 4 && kept <= cap,
     "... and a burst under it takes no more (%zu anchors, %zu kept)", tide__alloc_cache_anchors(L), kept);
  tide__alloc_cache_set(L, 0);
  stats(L, &kept, &cap, &hits);
  ok(tide__alloc_cache_anchors(L) == 0 && kept == 0, "cap 0: every anchor given back");
  tide__alloc_cache_set(L, TIDE_ALLOC_CACHE_DEFAULT);
  burst(L, 100000);
  ok(tide__alloc_cache_anchors(L) > 16, "anchors again once the cap is back (%zu)", tide__alloc_cache_anchors(L));
  close_clean(L, &h, "every block is back at close, anchors included");
}

/* Anchors follow the heap's recent peak down: once a burst is two windows
 * of volume (64-128 MiB handed out) behind, a process whose heap stays
 * small holds no more than twice its peak's worth of windows, so that the
 * allocator can give the burst's memory back to the kernel. */
static void anchors_decay(void) {
  host h = { 0 };
  lua_State *L = open_default(&h);
  burst(L, 200000);
  size_t after_burst = tide__alloc_cache_anchors(L);
  double top = churn(L) + (4 << 20);              /* room as in small_bound_decays */
  size_t after = tide__alloc_cache_anchors(L);
  double window = (double)((size_t)1 << TIDE_ALLOC_CACHE_ANCHOR_SHIFT);
  ok(after_burst * window / 2 > top && after * window / 2 <= top,
     "the anchors follow the heap's peak down (%zu after the burst, %zu after, peak since %.0f)",
     after_burst, after, top);
  close_clean(L, &h, "every block is back at close");
}

/* The cap changed by the tasks of a burst themselves, while their
 * neighbours' blocks are freed and anchors are taken: every change leaves
 * what is kept within the new cap and the anchors within its share (cap /
 * window), and at close every block, anchors included, is back with its
 * own size. */
static void anchors_under_cap_changes(void) {
  host h = { 0 };
  lua_State *L = open_default(&h);
  lua_pushinteger(L, (lua_Integer)1 << TIDE_ALLOC_CACHE_ANCHOR_SHIFT);
  lua_setglobal(L, "WINDOW");
  ok(run(L,
    "math.randomseed(11)\n"
    "local caps = { 0, 65536, WINDOW, 3 * WINDOW, 8 * WINDOW, 64 * 1048576 }\n"
    "BAD = nil\n"
    "for round = 1, 3 do\n"
    "  local status = tide.run(function()\n"
    "    local ts = {}\n"
    "    for i = 1, 60000 do\n"
    "      ts[i] = tide.spawn(function()\n"
    "        if i % 997 == 0 then\n"
    "          local cap = caps[math.random(#caps)]\n"
    "          tide.configure{ alloc_cache = cap }\n"
    "          local s = tide.stats().alloc_cache\n"
    "          if s.kept > cap or s.anchors > math.floor(cap / WINDOW) then\n"
    "            BAD = ('cap %d: %d kept, %d anchors'):format(cap, s.kept, s.anchors)\n"
    "          end\n"
    "        end\n"
    "        return i\n"
    "      end)\n"
    "      if i % 5000 == 0 then ts = {}; collectgarbage() end\n"
    "    end\n"
    "  end)\n"
    "  assert(status == 'ok', status)\n"
    "  collectgarbage()\n"
    "end\n"), "three bursts whose tasks change the cap");
  lua_getglobal(L, "BAD");
  ok(lua_isnil(L, -1), "every change leaves the kept blocks and the anchors within the cap (%s)",
     lua_isnil(L, -1) ? "so they were" : lua_tostring(L, -1));
  lua_pop(L, 1);
  size_t kept, cap;
  unsigned long long hits;
  stats(L, &kept, &cap, &hits);
  ok(kept <= cap && tide__alloc_cache_anchors(L) <= cap >> TIDE_ALLOC_CACHE_ANCHOR_SHIFT, "... and after (%zu kept, %zu anchors, cap %zu)",
     kept, tide__alloc_cache_anchors(L), cap);
  close_clean(L, &h, "every block is back at close, anchors included");
}

/* EXERCISE (lua_exercise.h) with the cache in front: the host is told
 * each block's own size, and gets all back at close. */
static void luajit_sizes(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  ok(run(L, EXERCISE), "LuaJIT's ways to allocate, with the cache in front");
  ok(h.bad_sizes == 0 && h.bad_blocks == 0, "... each block freed or resized with its own size (%lld, %lld)",
     h.bad_sizes, h.bad_blocks);
  ok(run(L, "tide.configure{ alloc_cache = 65536 }"), "a small cap");
  ok(run(L, EXERCISE), "... the same again");
  close_clean(L, &h, "every block is back at close, each with its own size");
}

/* Finalizers of objects made before tide and after it, run at lua_close
 * before and after the cache is taken out, allocate, free and configure:
 * every block still goes back to the host with its size. */
static void finalizers_at_close(void) {
  host h = { 0 };
  lua_State *L = lua_newstate(host_alloc, &h);
  luaL_openlibs(L);
  const char *proxies =
    "FIN = FIN or {}\n"
    "for i = 1, 50 do\n"
    "  local u = newproxy(true)\n"
    "  getmetatable(u).__gc = function()\n"
    "    local t = {} for j = 1, 2000 do t[j] = { j } end\n"
    "    local s = string.rep('q', 5000 + i) .. i\n"
    "    t = nil collectgarbage()\n"
    "    if tide then pcall(tide.configure, { alloc_cache = (i % 3) * 100000 }) pcall(tide.stats) end\n"
    "  end\n"
    "  FIN[#FIN + 1] = u\n"
    "end\n";
  ok(run(L, proxies), "userdata with finalizers made before tide");
  if (tide_open(L, NULL) != 0) { printf("Bail out! tide_open\n"); exit(1); }
  lua_setglobal(L, "tide");
  ok(run(L, proxies), "... and after");
  burst(L, 20000);
  close_clean(L, &h, "finalizers that allocate at close: every block is back");
}

/* A host that puts its own allocator back while the cache holds blocks:
 * they go back at close all the same. */
static void host_restores_allocator(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  burst(L, 20000);
  lua_setallocf(L, host_alloc, &h);
  burst(L, 20000);
  close_clean(L, &h, "the host's allocator put back under the cache: every block is back at close");
}

/* Two states, each with its own cache, used in turn and closed in the
 * other order: neither takes a block of the other's. */
static void two_states(void) {
  host h1 = { 0 }, h2 = { 0 };
  lua_State *L1 = open_with(&h1), *L2 = open_with(&h2);
  for (int i = 0; i < 3; i++) {
    burst(L1, 10000);
    burst(L2, 10000);
  }
  ok(run(L1, "tide.configure{ alloc_cache = 4096 }"), "one state's cap lowered");
  size_t kept1, kept2, cap1, cap2;
  unsigned long long hits1, hits2;
  stats(L1, &kept1, &cap1, &hits1);
  stats(L2, &kept2, &cap2, &hits2);
  ok(cap1 == 4096 && kept1 <= 4096 && cap2 == TIDE_ALLOC_CACHE_DEFAULT && kept2 > 4096 && hits2 > 0,
     "... the other's is its own (%zu/%zu kept, %zu/%zu kept)", kept1, cap1, kept2, cap2);
  lua_close(L2);
  burst(L1, 10000);
  lua_close(L1);
  ok(h1.blocks == 0 && h2.blocks == 0 && h1.bad_sizes + h2.bad_sizes == 0 && h1.bad_blocks + h2.bad_blocks == 0,
     "two states: every block back to its own host (%lld, %lld, %lld, %lld)", h1.blocks, h2.blocks,
     h1.bad_sizes + h2.bad_sizes, h1.bad_blocks + h2.bad_blocks);
}

/* A larger block taken from its size class's ring leaves its slot free:
 * the next block of that class kept goes there, and pushes out none of the
 * others (with a ring position that only turned, it pushed out the oldest
 * while a slot stood empty). */
static void ring_fills_free_slots(void) {
  host h = { 0 };
  lua_State *L = open_with(&h);
  ok(run(L, "tide.configure{ alloc_cache = 0 } tide.configure{ alloc_cache = 64 * 1024 * 1024 }"),
     "the rings emptied");
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  void *b[9];
  for (int i = 0; i < 9; i++) b[i] = f(ud, NULL, 0, 4096 + 8 * (size_t)i);   /* one class: 4096..8191 */
  for (int i = 0; i < 8; i++) f(ud, b[i], 4096 + 8 * (size_t)i, 0);          /* its ring full */
  size_t kept, cap;
  unsigned long long hits0, hits1;
  stats(L, &kept, &cap, &hits0);
  void *again = f(ud, NULL, 0, 4096 + 8 * 5);
  stats(L, &kept, &cap, &hits1);
  ok(hits1 == hits0 + 1, "a block of a size kept is taken from the ring (%llu hits)", hits1 - hits0);
  h.watched = 4096;
  f(ud, b[8], 4096 + 8 * 8, 0);
  ok(h.watched_frees == 0, "a block of the class freed then takes the free slot: the oldest stays (%lld freed)",
     h.watched_frees);
  void *first = f(ud, NULL, 0, 4096);
  stats(L, &kept, &cap, &hits0);
  ok(hits0 == hits1 + 1, "... and is taken again (%llu hits)", hits0 - hits1);
  f(ud, first, 4096, 0);
  f(ud, again, 4096 + 8 * 5, 0);
  close_clean(L, &h, "every block is back at close");
}

/* Huge blocks (over TIDE_ALLOC_CACHE_BIGGEST): kept only in a size that
 * came back, freed, asked for again and freed again (a flow's 3 MiB hash
 * parts, made again at each definition and run), not the first time one
 * is freed (a burst's last arrays), nor of a size that is not a multiple
 * of 8 or over TIDE_ALLOC_CACHE_HUGEST. */
static void huge_blocks_kept_when_they_come_back(void) {
  host h = { 0 };
  lua_State *L = open_default(&h);
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t huge = (size_t)3 << 20, kept0, kept, cap;
  unsigned long long hits0, hits;
  h.watched = huge;
  stats(L, &kept0, &cap, &hits0);
  void *b = f(ud, NULL, 0, huge);
  memset(b, 1, huge);
  f(ud, b, huge, 0);
  ok(h.watched_frees == 1, "a huge block freed for the first time goes back (%lld)", h.watched_frees);
  b = f(ud, NULL, 0, huge);
  stats(L, &kept, &cap, &hits);
  ok(hits == hits0 && h.watched_frees == 1, "asked for again, it comes from the allocator (%llu hits)", hits - hits0);
  f(ud, b, huge, 0);
  stats(L, &kept, &cap, &hits);
  ok(h.watched_frees == 1 && kept == kept0 + huge, "freed again, its size came back: kept (%zu bytes more)",
     kept - kept0);
  void *again = f(ud, NULL, 0, huge);
  stats(L, &kept, &cap, &hits);
  ok(again == b && hits == hits0 + 1 && kept == kept0, "... and taken by the next of its size (%llu hits)",
     hits - hits0);
  f(ud, again, huge, 0);
  void *other = f(ud, NULL, 0, huge + 8);
  f(ud, other, huge + 8, 0);
  h.watched = huge + 8;
  other = f(ud, NULL, 0, huge + 8);
  f(ud, other, huge + 8, 0);
  stats(L, &kept, &cap, &hits);
  ok(kept == kept0 + huge + huge + 8, "another size that comes back is kept beside it (%zu bytes kept)",
     kept - kept0);
  tide__alloc_cache_set(L, TIDE_ALLOC_CACHE_HUGEST * 4);   /* room for the largest under the cap */
  long long back = 0;
  for (int i = 0; i < 2; i++) {                    /* an odd size, and over the largest: never kept */
    size_t n = i == 0 ? huge + 1 : TIDE_ALLOC_CACHE_HUGEST + 8;
    h.watched = n;
    h.watched_frees = 0;
    for (int k = 0; k < 3; k++) f(ud, f(ud, NULL, 0, n), n, 0);
    back += h.watched_frees;
  }
  ok(back == 6, "a huge block of an odd size or over the largest is never kept (%lld of 6 went back)", back);
  tide__alloc_cache_set(L, huge);
  stats(L, &kept, &cap, &hits);
  ok(kept <= huge, "a lower cap gives huge blocks back (%zu bytes kept)", kept);
  close_clean(L, &h, "every block is back at close");
}

int main(void) {
  reuse_and_bounds();
  bounded_by_heap();
  small_off_by_default();
  burst_kept_whole();
  small_bound_decays();
  growing_arrays();
  big_blocks_expire();
  wrapped_after();
  bad_options();
  huge_cap();
  failed_resizes();
  accounting_under_random_calls();
  kept_blocks_yield_to_a_limit();
  anchors_hold_windows();
  anchors_decay();
  anchors_under_cap_changes();
  luajit_sizes();
  finalizers_at_close();
  host_restores_allocator();
  two_states();
  ring_fills_free_slots();
  huge_blocks_kept_when_they_come_back();
  return tap_done();
}
