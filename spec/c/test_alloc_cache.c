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
  long long bad_sizes;       /* frees and reallocs told a wrong size */
  long long bad_blocks;      /* pointers it never gave */
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

static lua_State *open_with(host *h) {
  lua_State *L = lua_newstate(host_alloc, h);
  if (L == NULL) { printf("Bail out! lua_newstate\n"); exit(1); }
  luaL_openlibs(L);
  if (tide_open(L, NULL) != 0) { printf("Bail out! tide_open: %s\n", lua_tostring(L, -1)); exit(1); }
  lua_setglobal(L, "tide");
  return L;
}

static int run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != 0) {
    printf("# %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return 0;
  }
  return 1;
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

  lua_close(L);
  ok(h.blocks == 0 && h.bytes == 0, "after lua_close every block is back with the host (%lld blocks, %lld bytes)",
     h.blocks, h.bytes);
  ok(h.bad_sizes == 0 && h.bad_blocks == 0, "... each with its own size (%lld, %lld)", h.bad_sizes, h.bad_blocks);
}

/* Blocks of one size kept, then a larger heap of another size freed: the
 * cache keeps no more than the heap held at its largest (without the
 * bound it would keep both). */
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
  ok(kept > TIDE_ALLOC_CACHE_FLOOR && (double)kept <= peak,
     "the cache keeps no more than the heap's peak (%zu kept, peak %.0f)", kept, peak);
  lua_close(L);
  ok(h.blocks == 0 && h.bad_sizes == 0, "every block is back at close (%lld, %lld)", h.blocks, h.bad_sizes);
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
  lua_close(L);
  ok(h.blocks == 0 && h.bad_sizes == 0, "every block is back at close (%lld, %lld)", h.blocks, h.bad_sizes);
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
  lua_close(L);
  ok(h.blocks == 0 && h.bad_sizes == 0, "every block is back at close (%lld, %lld)", h.blocks, h.bad_sizes);
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
  lua_close(L);
  ok(h.blocks == 0 && h.bytes == 0, "wrapped after tide: every block is back at close (%lld blocks, %lld bytes)",
     h.blocks, h.bytes);
  ok(h.bad_sizes == 0 && h.bad_blocks == 0, "... each with its own size (%lld, %lld)", h.bad_sizes, h.bad_blocks);
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
  lua_close(L);
  ok(h.blocks == 0, "every block is back at close (%lld)", h.blocks);
}

int main(void) {
  reuse_and_bounds();
  bounded_by_heap();
  growing_arrays();
  big_blocks_expire();
  wrapped_after();
  bad_options();
  return tap_done();
}
