/* alloc_cache.c — freed small blocks of a Lua state kept for reuse (see alloc_cache.h). */
#include <stdatomic.h>
#include <stdlib.h>

#include <lauxlib.h>

#include "alloc_cache.h"

/* Under ASan a kept block is poisoned until it is handed out again: C code
 * that reads Lua memory after Lua freed it is caught (LuaJIT's own
 * allocator is not instrumented). */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define NLISTS (TIDE_ALLOC_CACHE_LARGEST / 8)   /* sizes 8, 16, ... LARGEST: list size/8 - 1 */
#define CACHE_MT "tide.AllocCache"

static const char CACHE_KEY;                    /* registry, light key: the sentinel userdata */

typedef struct cache {
  struct cache *next;      /* on the orphans' list (sentinel_gc) */
  lua_Alloc inner;         /* the state's allocator, which every block comes from */
  void *inner_ud;
  size_t cap;              /* the most bytes kept */
  size_t kept;             /* bytes on the lists now */
  size_t in_use;           /* the state's heap, as this allocator sees it */
  unsigned long long hits; /* allocations served from a list */
  void *list[NLISTS];      /* freed blocks of each size, linked through their first word */
} cache;

/* Caches left as pass-throughs behind another's wrapper: still called
 * through it until the state is gone, so never freed; listed here so that
 * they stay reachable (a leak checker does not report them). */
static cache *_Atomic orphans;

static size_t bound(const cache *c) {
  size_t b = c->in_use > TIDE_ALLOC_CACHE_FLOOR ? c->in_use : TIDE_ALLOC_CACHE_FLOOR;
  return b < c->cap ? b : c->cap;
}

static int keepable(size_t size) {
  return size != 0 && size <= TIDE_ALLOC_CACHE_LARGEST && (size & 7) == 0;
}

/* The lua_Alloc in front of the state's own. */
static void *cached_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  cache *c = ud;
  if (nsize == 0) {                                /* a free */
    if (p == NULL) return NULL;
    c->in_use -= osize < c->in_use ? osize : c->in_use;
    if (keepable(osize) && c->kept + osize <= bound(c)) {
      void **head = &c->list[osize / 8 - 1];
      *(void **)p = *head;
      *head = p;
      c->kept += osize;
      POISON(p, osize);
      return NULL;
    }
    return c->inner(c->inner_ud, p, osize, 0);
  }
  if (p == NULL && keepable(nsize)) {              /* a new block: from its list when it has one */
    void **head = &c->list[nsize / 8 - 1];
    void *q = *head;
    if (q != NULL) {
      UNPOISON(q, nsize);
      *head = *(void **)q;
      c->kept -= nsize;
      c->in_use += nsize;
      c->hits++;
      return q;
    }
  }
  void *q = c->inner(c->inner_ud, p, osize, nsize);
  if (q != NULL) {
    size_t old = p ? osize : 0;
    if (nsize >= old) c->in_use += nsize - old;
    else c->in_use -= old - nsize < c->in_use ? old - nsize : c->in_use;
  }
  return q;
}

/* Gives the blocks kept over `keep` bytes back to the state's allocator. */
static void trim(cache *c, size_t keep) {
  for (int i = NLISTS - 1; i >= 0 && c->kept > keep; i--) {
    size_t size = (size_t)(i + 1) * 8;
    while (c->list[i] != NULL && c->kept > keep) {
      void *p = c->list[i];
      UNPOISON(p, size);
      c->list[i] = *(void **)p;
      c->kept -= size;
      c->inner(c->inner_ud, p, size, 0);
    }
  }
}

static cache *get(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&CACHE_KEY);
  lua_rawget(L, LUA_REGISTRYINDEX);
  cache **u = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return u ? *u : NULL;
}

/* The sentinel's finalizer: runs at lua_close before the state frees the
 * rest (or when tide.core is collected).  Everything kept goes back, and
 * the state gets its allocator back when the cache is still the one in
 * front; else (another wrapped it since) the cache stays as a pass-through
 * (cap 0), an orphan: that wrapper still calls it. */
static int sentinel_gc(lua_State *L) {
  cache **u = lua_touserdata(L, 1);
  cache *c = *u;
  if (c == NULL) return 0;
  *u = NULL;
  c->cap = 0;
  trim(c, 0);
  void *ud;
  if (lua_getallocf(L, &ud) == cached_alloc && ud == c) {
    lua_setallocf(L, c->inner, c->inner_ud);
    free(c);
    return 0;
  }
  c->next = atomic_load(&orphans);
  while (!atomic_compare_exchange_weak(&orphans, &c->next, c)) {}
  return 0;
}

int tide__alloc_cache_open(lua_State *L) {
  if (get(L) != NULL) return 0;
  cache **u = lua_newuserdata(L, sizeof *u);
  *u = NULL;                                       /* (its finalizer does nothing until set) */
  luaL_newmetatable(L, CACHE_MT);
  lua_pushcfunction(L, sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushlightuserdata(L, (void *)&CACHE_KEY);
  lua_insert(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);                /* anchors the sentinel */
  cache *c = calloc(1, sizeof *c);
  if (c == NULL) return -1;
  c->inner = lua_getallocf(L, &c->inner_ud);
  c->cap = TIDE_ALLOC_CACHE_DEFAULT;
  c->in_use = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
  *u = c;
  lua_setallocf(L, cached_alloc, c);
  return 0;
}

long long tide__alloc_cache_set(lua_State *L, size_t cap) {
  cache *c = get(L);
  if (c == NULL) return -1;
  c->cap = cap;
  trim(c, bound(c));
  return (long long)c->kept;
}

void tide__alloc_cache_stats(lua_State *L, size_t *kept, size_t *cap, unsigned long long *hits) {
  cache *c = get(L);
  *kept = c ? c->kept : 0;
  *cap = c ? c->cap : 0;
  *hits = c ? c->hits : 0;
}
