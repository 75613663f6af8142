/* test_arena.c — the small blocks' arena (src/arena.h): blocks whole and apart under random calls,
 * pages reused and given back, and Lua states that close with their arena (TAP). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <lauxlib.h>
#include <lualib.h>

#include "alloc_cache.h"
#include "arena.h"
#include "tide.h"

#include "lua_exercise.h"
#include "tap.h"

#define PAGE TIDE_ARENA_PAGE

typedef struct { unsigned char *p; size_t size; unsigned char v; } live;

/* A block's bytes all set to v (the first word too: a free block's link). */
static void mark(unsigned char *p, size_t n, unsigned char v) { memset(p, v, n); }

static int marked(const unsigned char *p, size_t n, unsigned char v) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != v) return 0;
  return 1;
}

/* A size the arena serves: small of any length, or a run. */
static size_t random_size(unsigned *seed) {
  unsigned r = rand_r(seed);
  switch (r % 5) {
  case 0: return 1 + r / 5 % TIDE_ARENA_LARGEST;
  case 1: return 8 * (1 + r / 5 % 24);                         /* the common ones, crowded */
  case 2: return TIDE_ARENA_LARGEST - 2 + r / 5 % 3;             /* at the edge: 1022-1024 */
  case 3: return TIDE_ARENA_RUN_MIN + r / 5 % (3 * PAGE);
  default: return TIDE_ARENA_RUN_MAX - r / 5 % 3;
  }
}

static size_t pages_in(const tide_arena_stats *s) {
  return s->small_pages + s->run_pages + s->free_backed + s->given_back;
}

/* 200,000 random allocations, frees and purges over 400 live blocks: each
 * block keeps its bytes until it is freed (none overlaps another, none is
 * handed out twice), `fits` says what a block can hold, and the pages add
 * up. */
static void random_calls(void) {
  tide_arena *a = tide__arena_new((size_t)8 << 20);
  if (a == NULL) { printf("Bail out! tide__arena_new\n"); exit(1); }
  enum { N = 400 };
  static live blocks[N];
  long long lost = 0, misplaced = 0, wrong_fit = 0, failed = 0;
  unsigned seed = 11;
  for (int step = 0; step < 200000; step++) {
    unsigned r = rand_r(&seed);
    live *b = &blocks[r % N];
    if (r % 1009 == 0) tide__arena_purge(a);
    if (b->p == NULL) {
      size_t n = random_size(&seed);
      b->p = tide__arena_alloc(a, n);
      if (b->p == NULL) { failed++; continue; }
      b->size = n;
      b->v = (unsigned char)(r >> 8);
      if (!tide__arena_owns(a, b->p) || (uintptr_t)b->p % 8 != 0) misplaced++;
      if (!tide__arena_fits(a, b->p, n) || tide__arena_fits(a, b->p, n + (n > TIDE_ARENA_LARGEST ? PAGE : 8)))
        wrong_fit++;
      mark(b->p, n, b->v);
    } else {
      if (!marked(b->p, b->size, b->v)) lost++;
      tide__arena_free(a, b->p);
      b->p = NULL;
    }
  }
  ok(failed == 0 && misplaced == 0, "200,000 random calls: every allocation served, 8-aligned, in the range "
     "(%lld failed, %lld misplaced)", failed, misplaced);
  ok(lost == 0, "... every block keeps its bytes until freed: none overlaps, none is handed out twice (%lld lost)", lost);
  ok(wrong_fit == 0, "... a block fits its own size and not the next one up (%lld wrong)", wrong_fit);
  tide_arena_stats s;
  tide__arena_stats(a, &s);
  size_t used = pages_in(&s);
  for (int i = 0; i < N; i++)
    if (blocks[i].p != NULL) {
      if (!marked(blocks[i].p, blocks[i].size, blocks[i].v)) lost++;
      tide__arena_free(a, blocks[i].p);
      blocks[i].p = NULL;
    }
  tide__arena_stats(a, &s);
  ok(lost == 0 && pages_in(&s) == used && s.run_pages == 0,
     "... all freed: the pages it used are all free, kept or given back (%zu small, %zu in runs, %zu + %zu free of %zu)",
     s.small_pages, s.run_pages, s.free_backed, s.given_back, used);
  ok(s.small_pages <= 2 * (TIDE_ARENA_LARGEST / 8),
     "... the small blocks' pages left are at most each size's current one or two (%zu)", s.small_pages);
  tide__arena_keep(a, 0);
  tide__arena_stats(a, &s);
  ok(s.free_backed == 0 && s.given_back + s.small_pages == used, "a bound of 0 gives every free page back at once "
     "(%zu kept, %zu given back)", s.free_backed, s.given_back);
  unsigned char *p = tide__arena_alloc(a, 100);
  unsigned char *q = tide__arena_alloc(a, TIDE_ARENA_RUN_MIN);
  ok(p != NULL && q != NULL && marked(q, TIDE_ARENA_RUN_MIN, 0), "... its pages serve again, zeroed");
  tide__arena_free(a, p);
  tide__arena_free(a, q);
  tide__arena_delete(a);
}

/* The bound: free pages past it that were not reused since the last purge
 * go back at the next one; those reused in between stay. */
static void purges(void) {
  tide_arena *a = tide__arena_new(2 * PAGE);
  enum { N = 64 };
  void *runs[N];
  for (int i = 0; i < N; i++) runs[i] = tide__arena_alloc(a, PAGE);
  for (int i = 0; i < N; i++) tide__arena_free(a, runs[i]);
  tide_arena_stats s;
  tide__arena_stats(a, &s);
  ok(s.free_backed == N && s.given_back == 0, "64 runs freed: kept backed at the free (%zu, %zu)", s.free_backed,
     s.given_back);
  tide__arena_purge(a);                               /* freed in this epoch: not yet */
  tide__arena_stats(a, &s);
  size_t after_one = s.free_backed;
  for (int i = 0; i < 8; i++) runs[i] = tide__arena_alloc(a, PAGE);   /* reused */
  for (int i = 0; i < 8; i++) tide__arena_free(a, runs[i]);
  tide__arena_purge(a);
  tide__arena_stats(a, &s);
  ok(after_one == N && s.free_backed >= 8 && s.free_backed <= 8 + 2 && s.given_back == N - s.free_backed,
     "... a purge leaves those freed since the last one; the next gives back the rest down to the bound "
     "(%zu after one, %zu kept after two, %zu given back)", after_one, s.free_backed, s.given_back);
  tide__arena_purge(a);
  tide__arena_stats(a, &s);
  ok(s.free_backed == 2, "... and one more, the rest over the bound of 2 pages (%zu kept)", s.free_backed);
  tide__arena_delete(a);
}

static long minor_faults(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}

/* A bound of 0 (tide.configure{ alloc_cache = 0 }) gives free pages back at
 * the purges, as any bound, not at each free: a page emptied by the
 * collector and taken again at once was given back and faulted in again,
 * page by page (40 rounds of 200,000 tables made and dropped, 8 s instead
 * of 0.85). */
static void bound_zero_no_storm(void) {
  tide_arena *a = tide__arena_new(0);
  enum { N = 20000 };
  static char *b[N];
  long before = 0;
  for (int round = 0; round < 10; round++) {
    if (round == 1) before = minor_faults();
    for (int i = 0; i < N; i++) { b[i] = tide__arena_alloc(a, 64); memset(b[i], round, 64); }
    for (int i = 0; i < N; i++) tide__arena_free(a, b[i]);
  }
  long faults = minor_faults() - before;
  ok(faults < 100, "a bound of 0: 9 rounds of 20,000 blocks made and freed fault %ld pages in (the first, %d)",
     faults, (int)(N * 64 / 4096));
  tide_arena_stats s;
  tide__arena_purge(a);
  tide__arena_purge(a);
  tide__arena_stats(a, &s);
  ok(s.free_backed == 0, "... and the purges give the free pages back (%zu kept, %zu given back)", s.free_backed,
     s.given_back);
  tide__arena_delete(a);
}

/* Reads one figure (kB) of this process's /proc/self/status: "VmSize", "VmRSS". */
static long status_kb(const char *name) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kb = -1;
  size_t n = strlen(name);
  while (f != NULL && fgets(line, sizeof line, f) != NULL)
    if (strncmp(line, name, n) == 0 && line[n] == ':' && sscanf(line + n + 1, "%ld", &kb) == 1) break;
  if (f != NULL) fclose(f);
  return kb;
}

/* A state as tide makes them, with tide: its small blocks in an arena. */
static lua_State *open_state(void) {
  lua_State *L = lua_newstate(tide__state_alloc, NULL);
  if (L == NULL) { printf("Bail out! luaL_newstate\n"); exit(1); }
  luaL_openlibs(L);
  if (tide_open(L, NULL) != 0) { printf("Bail out! tide_open: %s\n", lua_tostring(L, -1)); exit(1); }
  lua_setglobal(L, "tide");
  return L;
}

/* Finalizers that run at lua_close, after the cache's own, and allocate
 * and free (the arena's blocks are freed all at once, at the state's last
 * block), made before and after blocks moved between the arena and
 * LuaJIT's allocator. */
static const char *AT_CLOSE =
  "for i = 1, 50 do\n"
  "  local u = newproxy(true)\n"
  "  getmetatable(u).__gc = function()\n"
  "    local t = {} for j = 1, 3000 do t[j] = { j, tostring(j) } end\n"
  "    local s = string.rep('q', 70000 + i) .. i\n"
  "    t = nil collectgarbage()\n"
  "    pcall(tide.configure, { alloc_cache = (i % 3) * 100000 }) pcall(tide.stats)\n"
  "  end\n"
  "  KEEP = KEEP or {} KEEP[#KEEP + 1] = u\n"
  "end\n"
  "local status = tide.run(function()\n"
  "  local ts = {}\n"
  "  for i = 1, 20000 do ts[i] = tide.spawn(function() tide.sleep(0) return i end) end\n"
  "  for i = 1, 20000 do assert(ts[i]:await() == 'ok' and ts[i].value == i) end\n"
  "end)\n"
  "assert(status == 'ok', status)\n";

static void states_close_their_arena(void) {
  lua_State *L = open_state();
  tide_arena_stats s;
  int has = tide__alloc_cache_arena(L, &s);
  ok(has && s.small_pages > 0, "a state of tide's allocator gets an arena (%zu pages of small blocks)",
     has ? s.small_pages : 0);
  ok(run(L, EXERCISE), "LuaJIT's ways to allocate, with the arena");
  ok(run(L, AT_CLOSE), "... tasks, and finalizers for lua_close");
  lua_close(L);
  ok(1, "... closed");
  long before = status_kb("VmSize"), rss_before = status_kb("VmRSS");
  for (int i = 0; i < 40; i++) {
    L = open_state();
    if (!run(L, AT_CLOSE)) break;
    lua_close(L);
  }
  long after = status_kb("VmSize"), rss_after = status_kb("VmRSS");
  /* Each arena reserves 32 GiB of address space: 40 left behind would be
   * 1.25 TiB more. */
  ok(before > 0 && after - before < 1024 * 1024, "40 states opened and closed: their arenas are unmapped "
     "(%ld kB more address space, %ld kB more RSS)", after - before, rss_after - rss_before);
}

/* A run resized in place to more bytes (the same pages): all of them are
 * the block's.  Under ASan, those past its first size stayed poisoned
 * (a reused run's: poisoned whole at its free), and writing them was
 * reported (make sanitize: build/asan/test_arena). */
static void run_resized_in_place(void) {
  lua_State *L = open_state();
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t small = TIDE_ARENA_RUN_MIN + PAGE - 100, large = TIDE_ARENA_RUN_MIN + PAGE;
  unsigned char *p = f(ud, NULL, 0, small);
  f(ud, p, small, 0);
  p = f(ud, NULL, 0, small);                        /* the same run, again */
  unsigned char *q = f(ud, p, small, large);
  if (q != NULL) mark(q, large, 7);
  ok(q == p && marked(q, large, 7), "a run grown in place to %zu bytes: all of them written", large);
  f(ud, q, large, 0);
  lua_close(L);
}

/* A finalizer that runs at lua_close after the cache's sentinel, and makes
 * and drops 2,000,000 tables, collecting as it goes: what it drops is
 * reused.  The arena's frees were ignored once the sentinel's finalizer
 * ran (+250 MB of RSS here; +9 MB with TIDE_ARENA=off). */
static const char *CHURN_AT_CLOSE =
  "local u = newproxy(true)\n"
  "getmetatable(u).__gc = function()\n"
  "  local function rss() for l in io.lines('/proc/self/status') do\n"
  "    local kb = l:match('^VmRSS:%s+(%d+)') if kb then return tonumber(kb) end end end\n"
  "  local before = rss()\n"
  "  for i = 1, 2000000 do local t = { i, i } if i % 100000 == 0 then collectgarbage() end end\n"
  "  collectgarbage()\n"
  "  CHURN_KB(rss() - before)\n"
  "end\n"
  "KEEP_CHURN = u\n";

static long churn_kb = -1;
static int l_churn_kb(lua_State *L) { churn_kb = (long)luaL_checknumber(L, 1); return 0; }

static void churn_at_close(void) {
  lua_State *L = open_state();
  lua_register(L, "CHURN_KB", l_churn_kb);
  int made = run(L, CHURN_AT_CLOSE);
  lua_close(L);
  ok(made && churn_kb >= 0 && churn_kb < 48 * 1024, "a finalizer at lua_close that makes and drops 2,000,000 tables "
     "reuses their memory (RSS +%ld kB)", churn_kb);
}

/* A state whose arena is spent (32 GiB reserved: 16,382 runs of 2 MiB,
 * never touched, then small blocks until it refuses one) gets its further
 * blocks from its own allocator, of every size: Lua raised "not enough
 * memory" with the C library's heap all there. */
static void full_arena(void) {
  lua_State *L = open_state();
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  enum { MAX = 20000, SMALL = 100000 };
  static void *runs[MAX], *smalls[SMALL];
  size_t n = 0, m = 0;
  while (n < MAX && (runs[n] = f(ud, NULL, 0, TIDE_ARENA_RUN_MAX)) != NULL) {
    tide_arena_stats s;
    tide__alloc_cache_arena(L, &s);
    n++;
    if (s.fresh < TIDE_ARENA_RUN_MAX / PAGE) break;
  }
  tide_arena_stats s;
  tide__alloc_cache_arena(L, &s);
  size_t past = 0;                                 /* blocks asked for once no page was fresh */
  while (m < SMALL && past < PAGE / 1000 + 1 && (smalls[m] = f(ud, NULL, 0, 1000)) != NULL) {
    m++;
    tide__alloc_cache_arena(L, &s);
    if (s.fresh == 0) past++;
  }
  tide__alloc_cache_arena(L, &s);
  unsigned char *small = f(ud, NULL, 0, 1000), *big = f(ud, NULL, 0, TIDE_ARENA_RUN_MIN);
  unsigned char *grown = small ? f(ud, small, 1000, 1016) : NULL;
  if (grown != NULL) small = grown;
  ok(s.fresh == 0 && small != NULL && grown != NULL && big != NULL,
     "the arena spent (%zu runs, %zu small blocks, %zu pages fresh): blocks still served, by the state's allocator "
     "(small %p, grown %p, run %p)", n, m, s.fresh, (void *)small, (void *)grown, (void *)big);
  if (small) f(ud, small, 1016, 0);
  if (big) f(ud, big, TIDE_ARENA_RUN_MIN, 0);
  for (size_t i = 0; i < m; i++) f(ud, smalls[i], 1000, 0);
  for (size_t i = 0; i < n; i++) f(ud, runs[i], TIDE_ARENA_RUN_MAX, 0);
  ok(run(L, "local t = {} for i = 1, 1000 do t[i] = { i } end"), "... and Lua runs on");
  lua_close(L);
}

/* LuaJIT's own allocator gets an arena only when tide is loaded by
 * require (alloc_cache.h): the cache then stays in front to the end of
 * lua_close, and frees the arena with the state's last block. */
static void luajit_allocator(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (tide_open(L, NULL) != 0) { printf("Bail out! tide_open\n"); exit(1); }
  tide_arena_stats s;
  ok(!tide__alloc_cache_arena(L, &s), "LuaJIT's own allocator, tide_open: no arena (a C host may close states)");
  lua_close(L);
  long before = status_kb("VmSize");
  for (int i = 0; i < 3; i++) {
    L = luaL_newstate();
    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_tide);             /* what require "tide" calls */
    lua_call(L, 0, 1);
    lua_setglobal(L, "tide");
    int has = tide__alloc_cache_arena(L, &s);
    ok(has && run(L, EXERCISE) && run(L, AT_CLOSE), "LuaJIT's own allocator, require 'tide': an arena, used");
    lua_close(L);
  }
  long after = status_kb("VmSize");
  ok(after - before < 16 * 1024, "... closed: the arenas are unmapped (%ld kB more address space)", after - before);
}

int main(void) {
  random_calls();
  purges();
  bound_zero_no_storm();
  states_close_their_arena();
  full_arena();
  run_resized_in_place();
  churn_at_close();
  luajit_allocator();
  return tap_done();
}
