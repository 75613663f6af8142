/* alloc_cache.c — freed small blocks of a Lua state kept for reuse (see alloc_cache.h). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "alloc_cache.h"
#include "arena.h"
#include "poison.h"


#define NLISTS (TIDE_ALLOC_CACHE_LARGEST / 8)   /* sizes 8, 16, ... LARGEST: list size/8 - 1 */
/* Larger blocks, up to TIDE_ALLOC_CACHE_BIGGEST and of a size that is a
 * multiple of 8 (a table's array or hash part, a stack; not a string of
 * any length), are kept in one ring per power of two of their size, so
 * that the odd blocks of one size class never push out those of another
 * (with one ring for all, a burst's arrays were pushed out before the
 * next burst by the strings that loading code frees). */
#define BIG_CLASS(size) (63 - __builtin_clzll((unsigned long long)(size)) - 9)   /* 513..1023: 0 */
#define NCLASSES (BIG_CLASS(TIDE_ALLOC_CACHE_HUGEST) + 1)
#define PER_CLASS 8
/* Huge blocks (more than TIDE_ALLOC_CACHE_BIGGEST bytes) go in the same
 * rings, but only in a size that came back: one freed, then asked for
 * again, then freed again.  Anchors (below) leave no free chunk larger
 * than a window in the memory they hold, so the allocator maps each huge
 * block afresh and unmaps it when it is freed: every page of it is
 * faulted in again (~12 us each on these VMs, most of it counted as user
 * time).  Without anchors it had carved the block out of the memory a
 * full collection freed.  A flow of 100,000 nodes has tables whose hash
 * part is 2^17 nodes (3 MiB): 770 faults at each definition after a full
 * collection and 1,540 at each run, 10 and 20 ms (bench/flow.lua, 45 ms a
 * run against 25 without anchors).  A burst's last arrays come back in no
 * such rhythm, and stay with the allocator (TIDE_ALLOC_CACHE_BIGGEST).
 * NSEEN: the sizes of the last huge blocks freed, as the rhythm's memory. */
#define NSEEN 8
typedef struct seen { size_t size; int back; } seen;   /* back: asked for again since freed */
/* A big block kept is given back when BIG_LIFETIME bytes were handed out
 * since without it being taken: the old sizes of an array that grew are
 * taken again by the next burst that grows one, and not kept for ever by
 * a process whose arrays stay large (1,000,000 sleeping tasks kept 42
 * bytes more a task in RSS without it: bench/peers.lua mem). */
#define BIG_LIFETIME ((size_t)64 << 20)
#define EXPIRY_EVERY ((size_t)1 << 20)
/* The small blocks kept are bounded by the heap's recent peak: its largest
 * in this window of PEAK_WINDOW bytes handed out, or in the one before. */
#define PEAK_WINDOW BIG_LIFETIME
#define CACHE_MT "tide.AllocCache"

static const char CACHE_KEY;                    /* registry, light key: the sentinel userdata */

typedef struct big { void *p; size_t size, at; } big;   /* at: `volume` when kept */

/* Anchors.  LuaJIT's allocator takes memory from the kernel in segments
 * (mmap, 128 KiB at least) and gives a segment back as soon as all of it is
 * free, and the end of its last one once more than 2 MiB there is free: a
 * burst of tasks that all ended leaves its segments free after a full
 * collection, and the next burst faults the same memory in again, page by
 * page.  So the cache holds one freed small block in each ANCHOR_WINDOW of
 * address space where small blocks were freed: no segment is ever wholly
 * free, nor the end of the last one, and the allocator reuses the memory
 * around the anchors itself, in its own order (the free lists of kept
 * small blocks hand blocks out in the collector's order instead, which
 * scatters what is allocated together: alloc_cache.h).  An anchor is never
 * handed out: it only holds its window.  What anchors keep mapped is
 * bounded by the cap (cap / ANCHOR_WINDOW anchors), and they all go back
 * when the heap's recent peak falls under half the span they hold. */
#define ANCHOR_SHIFT TIDE_ALLOC_CACHE_ANCHOR_SHIFT
#define ANCHOR_WINDOW ((size_t)1 << ANCHOR_SHIFT)
typedef struct anchor { void *p; size_t size; } anchor;   /* p NULL: a free slot */

typedef struct cache {
  struct cache *next;      /* on the orphans' list (sentinel_gc) */
  lua_Alloc inner;         /* the state's allocator, which every block comes from */
  void *inner_ud;
  size_t cap;              /* the most bytes kept */
  size_t small_cap;        /* the most bytes kept on the free lists (0: none) */
  size_t kept;             /* bytes kept now, small and big */
  size_t kept_small;       /* of which on the free lists */
  size_t in_use;           /* the state's heap, as this allocator sees it */
  size_t peak, peak_before;   /* in_use at its largest in this window and the one before */
  size_t window_end;       /* the volume at which the next window starts */
  unsigned long long hits; /* allocations served from what was kept */
  void *list[NLISTS];      /* small freed blocks of each size, linked through their first word */
  big bigs[NCLASSES][PER_CLASS];   /* larger freed blocks (p NULL: a free slot) */
  seen seen[NSEEN];        /* sizes of huge blocks freed lately (size 0: none) */
  unsigned next_seen;      /* the entry of seen replaced next */
  anchor *anchors;         /* an open-addressing set of ANCHOR_WINDOW-sized windows (malloc'ed) */
  size_t nanchors, anchor_slots;   /* anchors held; slots in the set (a power of two, or 0) */
  uintptr_t last_window;   /* the window of the last small free looked at (1 + its number) */
  size_t volume;           /* bytes handed out so far */
  size_t next_expiry;      /* the volume at which big blocks are looked at next */
  tide_arena *arena;       /* the small blocks' (arena.h), or NULL */
  uint64_t purged_at;      /* the loop's time (ms) at the arena's last timed purge */
  /* Closing (the sentinel's finalizer ran in lua_close): the arena is
   * unmapped, with every block still in it, at the state's last block,
   * `last`.  Until then it serves and frees as before: finalizers that run
   * after the sentinel's may make and drop much. */
  int closing;
  const void *last;
} cache;

/* Caches left as pass-throughs behind another's wrapper: still called
 * through it until the state is gone, so never freed; listed here so that
 * they stay reachable (a leak checker does not report them). */
static cache *_Atomic orphans;

/* The most bytes of small blocks kept: small_cap (0 by default: none), and
 * within it the heap's recent peak (the blocks of a burst whose tasks all
 * ended, for the next burst), at least TIDE_ALLOC_CACHE_FLOOR.  Bounded by the heap at the moment of each free
 * instead, a burst's blocks were kept only while the collector had freed
 * less than half of them: the rest went back to the allocator, which gave
 * it to the kernel, and the next burst faulted it in again (1,000-2,800
 * faults, a third to two thirds of a warm burst's time, one run in two). */
static size_t small_bound(const cache *c) {
  size_t b = c->peak > c->peak_before ? c->peak : c->peak_before;
  if (b < TIDE_ALLOC_CACHE_FLOOR) b = TIDE_ALLOC_CACHE_FLOOR;
  return b < c->small_cap ? b : c->small_cap;
}

static void grew(cache *c, size_t n) {
  c->in_use += n;
  if (c->in_use > c->peak) c->peak = c->in_use;
}
static void shrank(cache *c, size_t n) { c->in_use -= n < c->in_use ? n : c->in_use; }

static void give_back_big(cache *c, big *b) {
  UNPOISON(b->p, b->size);
  c->inner(c->inner_ud, b->p, b->size, 0);
  c->kept -= b->size;
  b->p = NULL;
}

static void trim_small(cache *c, size_t limit);
static void release_anchors(cache *c);

static void expire(cache *c) {
  c->next_expiry = c->volume + EXPIRY_EVERY;
  if (c->volume >= c->window_end) {
    c->window_end = c->volume + PEAK_WINDOW;
    c->peak_before = c->peak;
    c->peak = c->in_use;
    /* The bound may have come down with the window: the small blocks kept
     * under an older peak go back, so that what is kept stays within the
     * heap's recent peak (else a burst's blocks stayed for ever, up to the
     * cap, however small the heap remained after). */
    trim_small(c, small_bound(c));
    if (c->arena != NULL) tide__arena_purge(c->arena);
    size_t peak = c->peak > c->peak_before ? c->peak : c->peak_before;
    if (c->nanchors * ANCHOR_WINDOW / 2 > peak) release_anchors(c);
  }
  for (int k = 0; k < NCLASSES; k++)
    for (int i = 0; i < PER_CLASS; i++) {
      big *b = &c->bigs[k][i];
      if (b->p != NULL && c->volume - b->at > BIG_LIFETIME) give_back_big(c, b);
    }
}

/* The slot of a size class's ring a big block is kept in: a free one (a
 * block taken leaves one), else the one kept longest. */
static big *slot_for(big *ring) {
  big *b = &ring[0];
  for (int i = 0; i < PER_CLASS; i++) {
    if (ring[i].p == NULL) return &ring[i];
    if (ring[i].at < b->at) b = &ring[i];
  }
  return b;
}

/* The entry of seen for huge blocks of `size` bytes, or NULL. */
static seen *seen_of(cache *c, size_t size) {
  for (int i = 0; i < NSEEN; i++)
    if (c->seen[i].size == size) return &c->seen[i];
  return NULL;
}

/* Whether a huge block of `size` bytes just freed is kept by its rhythm:
 * its size freed, asked for again since, and now freed again.  A size
 * freed for the first time is remembered (in place of the oldest). */
static int came_back(cache *c, size_t size) {
  seen *s = seen_of(c, size);
  if (s == NULL) {
    s = &c->seen[c->next_seen++ % NSEEN];
    s->size = size;
    s->back = 0;
  }
  return s->back;
}

/* Keeps a freed block when the bounds allow (1), else 0: the caller gives
 * it back.  Small ones go on their size's list; a big one takes a slot,
 * and the block in that slot before goes back (the rings bound them). */
static int keep(cache *c, void *p, size_t size) {
  if ((size & 7) || size > TIDE_ALLOC_CACHE_HUGEST || c->kept + size > c->cap) return 0;
  if (size > TIDE_ALLOC_CACHE_BIGGEST && !came_back(c, size)) return 0;
  if (size <= TIDE_ALLOC_CACHE_LARGEST) {
    if (c->kept_small + size > small_bound(c)) return 0;
    void **head = &c->list[size / 8 - 1];
    *(void **)p = *head;
    *head = p;
    c->kept_small += size;
  } else {
    big *b = slot_for(c->bigs[BIG_CLASS(size)]);
    if (b->p != NULL) give_back_big(c, b);
    b->p = p;
    b->size = size;
    b->at = c->volume;
  }
  c->kept += size;
  POISON(p, size);
  return 1;
}

/* A kept block of exactly `size` bytes, or NULL. */
static void *take(cache *c, size_t size) {
  void *q = NULL;
  if ((size & 7) || size > TIDE_ALLOC_CACHE_HUGEST) return NULL;
  if (size <= TIDE_ALLOC_CACHE_LARGEST) {
    void **head = &c->list[size / 8 - 1];
    if (*head == NULL) return NULL;
    q = *head;
    UNPOISON(q, size);
    *head = *(void **)q;
    c->kept_small -= size;
  } else {
    big *b = c->bigs[BIG_CLASS(size)];
    for (int i = 0; i < PER_CLASS && q == NULL; i++) {
      if (b[i].p != NULL && b[i].size == size) {
        q = b[i].p;
        b[i].p = NULL;
        UNPOISON(q, size);
      }
    }
    if (q == NULL) {
      seen *s = size > TIDE_ALLOC_CACHE_BIGGEST ? seen_of(c, size) : NULL;
      if (s != NULL) s->back = 1;                  /* a huge size freed comes back: keep it next time */
      return NULL;
    }
  }
  c->kept -= size;
  c->hits++;
  return q;
}

/* The anchors' set doubled (0 when there is no memory for it: no anchor
 * is added then). */
static int grow_anchors(cache *c) {
  size_t n = c->anchor_slots ? 2 * c->anchor_slots : 64;
  anchor *a = calloc(n, sizeof *a);
  if (a == NULL) return 0;
  for (size_t i = 0; i < c->anchor_slots; i++) {
    void *p = c->anchors[i].p;
    if (p == NULL) continue;
    size_t h = ((uintptr_t)p >> ANCHOR_SHIFT) * 0x9E3779B97F4A7C15ull >> 32 & (n - 1);
    while (a[h].p != NULL) h = (h + 1) & (n - 1);
    a[h] = c->anchors[i];
  }
  free(c->anchors);
  c->anchors = a;
  c->anchor_slots = n;
  return 1;
}

/* Holds freed small block p as its window's anchor when the window has
 * none yet (1), else 0: the caller gives it back or keeps it otherwise. */
static int anchor_at(cache *c, void *p, size_t size) {
  uintptr_t w = (uintptr_t)p >> ANCHOR_SHIFT;
  if (w + 1 == c->last_window) return 0;            /* frees come in runs: the collector sweeps in order */
  c->last_window = w + 1;
  if (c->nanchors >= c->cap >> ANCHOR_SHIFT || c->kept + size > c->cap) return 0;
  if (2 * (c->nanchors + 1) > c->anchor_slots && !grow_anchors(c)) return 0;
  size_t mask = c->anchor_slots - 1;
  for (size_t h = w * 0x9E3779B97F4A7C15ull >> 32 & mask;; h = (h + 1) & mask) {
    anchor *a = &c->anchors[h];
    if (a->p == NULL) {
      a->p = p;
      a->size = size;
      c->nanchors++;
      c->kept += size;
      POISON(p, size);
      return 1;
    }
    if ((uintptr_t)a->p >> ANCHOR_SHIFT == w) return 0;
  }
}

/* Gives every anchor back to the state's allocator (it may then give
 * their segments back to the kernel). */
static void release_anchors(cache *c) {
  for (size_t i = 0; i < c->anchor_slots && c->nanchors > 0; i++) {
    anchor *a = &c->anchors[i];
    if (a->p == NULL) continue;
    UNPOISON(a->p, a->size);
    c->inner(c->inner_ud, a->p, a->size, 0);
    c->kept -= a->size;
    c->nanchors--;
    a->p = NULL;
  }
  c->last_window = 0;
}

static void release(cache *c, void *p, size_t size) {
  shrank(c, size);
  if (size <= TIDE_ALLOC_CACHE_LARGEST) {
    if (anchor_at(c, p, size)) return;
    if (c->small_cap == 0) {                      /* no free lists (the default): straight back */
      c->inner(c->inner_ud, p, size, 0);
      return;
    }
  }
  if (!keep(c, p, size)) c->inner(c->inner_ud, p, size, 0);
}

static void trim(cache *c, size_t limit);

/* The state's allocator asked again, after everything kept went back to
 * it: a host that bounds the state's memory counts the blocks kept as used
 * (worker.c, thread_memory).  Out of the hot path. */
__attribute__((noinline, cold))
static void *ask_again(cache *c, void *p, size_t osize, size_t nsize) {
  trim(c, 0);
  return c->inner(c->inner_ud, p, osize, nsize);
}

/* The state's allocator; when it refuses, ask_again. */
static inline void *ask(cache *c, void *p, size_t osize, size_t nsize) {
  void *q = c->inner(c->inner_ud, p, osize, nsize);
  return q != NULL || c->kept == 0 ? q : ask_again(c, p, osize, nsize);
}

/* A block to or from the state's own allocator, through what is kept. */
static void *plain_alloc(cache *c, void *p, size_t osize, size_t nsize) {
  if (nsize == 0) {                                /* a free */
    if (p != NULL) release(c, p, osize);
    return NULL;
  }
  /* A new block, or one that grows or shrinks (a table's array, a
   * coroutine's stack).  It moves to a kept block of the new size when
   * there is one; a big block that grows moves anyway, so that its old
   * size is kept for the next array that grows (resized by the allocator,
   * it would be mapped and faulted in again every time). */
  c->volume += nsize;
  if (c->volume >= c->next_expiry) expire(c);
  void *q = take(c, nsize);
  if (q == NULL && p != NULL && osize > TIDE_ALLOC_CACHE_LARGEST && osize <= TIDE_ALLOC_CACHE_BIGGEST)
    q = ask(c, NULL, 0, nsize);
  if (q == NULL) {
    /* New, or resized by the allocator: also a big block it had no room
     * to move, as a shrink must not fail ("Lua assumes that the allocator
     * never fails when osize >= nsize", the Lua 5.1 manual, lua_Alloc). */
    q = ask(c, p, osize, nsize);
    if (q != NULL) {
      if (p != NULL) shrank(c, osize);
      grew(c, nsize);
    }
    return q;                                      /* (NULL: p is as it was) */
  }
  grew(c, nsize);
  if (p != NULL) {
    memcpy(q, p, osize < nsize ? osize : nsize);
    release(c, p, osize);
  }
  return q;
}

/* A block of a size the arena serves, or one of the arena's (mine) that is
 * freed or resized.  A block moves between the arena and the state's
 * allocator when it is resized to a size the other serves. */
static void *arena_alloc(cache *c, void *p, size_t osize, size_t nsize, int mine) {
  tide_arena *a = c->arena;
  if (nsize == 0) {
    shrank(c, osize);
    tide__arena_free(a, p);                       /* (closing too: finalizers after the sentinel's reuse it) */
    return NULL;
  }
  if (mine && tide__arena_resize(a, p, nsize)) {  /* the same size rounded to 8, or pages */
    shrank(c, osize);
    grew(c, nsize);
    return p;
  }
  void *q = tide__arena_serves(nsize) ? tide__arena_alloc(a, nsize) : NULL;
  if (q != NULL) {
    c->volume += nsize;
    if (c->volume >= c->next_expiry) expire(c);
    grew(c, nsize);
  } else {
    q = plain_alloc(c, NULL, 0, nsize);           /* not of its sizes, or the arena is spent */
  }
  if (q == NULL) {
    /* "Lua assumes that the allocator never fails when osize >= nsize" (the
     * Lua 5.1 manual, lua_Alloc): p stays, and is freed later by its page
     * or its allocator, neither of which needs the size it is told. */
    if (p != NULL && nsize <= osize) {
      shrank(c, osize);
      grew(c, nsize);
      return p;
    }
    return NULL;
  }
  if (p != NULL) {
    memcpy(q, p, osize < nsize ? osize : nsize);
    if (mine) {
      shrank(c, osize);
      tide__arena_free(a, p);
    } else {
      release(c, p, osize);
    }
  }
  return q;
}

/* The state's last free in lua_close, its own block (lua_close frees the
 * main thread last): the arena goes, with everything in it, then the
 * cache, and the state's allocator frees the last block. */
__attribute__((noinline, cold))
static void *close_last(cache *c, void *p, size_t osize) {
  lua_Alloc inner = c->inner;
  void *inner_ud = c->inner_ud;
  tide__arena_delete(c->arena);
  free(c);
  return inner(inner_ud, p, osize, 0);
}

/* The lua_Alloc in front of the state's own. */
static void *cached_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  cache *c = ud;
  if (c->arena != NULL) {
    int mine = tide__arena_owns(c->arena, p);
    if (mine || tide__arena_serves(nsize))        /* (nsize 0: a free of another's block) */
      return arena_alloc(c, p, osize, nsize, mine);
    if (c->closing && p == c->last && nsize == 0) return close_last(c, p, osize);
  }
  return plain_alloc(c, p, osize, nsize);
}

/* Gives the first small block of list i back to the state's allocator. */
static void give_back_small(cache *c, int i) {
  size_t size = (size_t)(i + 1) * 8;
  void *p = c->list[i];
  UNPOISON(p, size);
  c->list[i] = *(void **)p;
  c->kept -= size;
  c->kept_small -= size;
  c->inner(c->inner_ud, p, size, 0);
}

/* Gives the blocks kept over `limit` bytes back to the state's allocator. */
static void trim(cache *c, size_t limit) {
  for (int k = 0; k < NCLASSES && c->kept > limit; k++)
    for (int i = 0; i < PER_CLASS && c->kept > limit; i++)
      if (c->bigs[k][i].p != NULL) give_back_big(c, &c->bigs[k][i]);
  for (int i = NLISTS - 1; i >= 0 && c->kept > limit; i--)
    while (c->list[i] != NULL && c->kept > limit) give_back_small(c, i);
  if (c->kept > limit || c->nanchors > limit >> ANCHOR_SHIFT) release_anchors(c);
}

/* Gives the small blocks kept over `limit` bytes back (the largest sizes first). */
static void trim_small(cache *c, size_t limit) {
  for (int i = NLISTS - 1; i >= 0 && c->kept_small > limit; i--)
    while (c->list[i] != NULL && c->kept_small > limit) give_back_small(c, i);
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
  free(c->anchors);
  c->anchors = NULL;
  c->anchor_slots = 0;
  if (c->arena != NULL) {
    /* The arena's blocks cannot go to another allocator: the cache stays
     * in front to the end of lua_close, whose finalizers run on the main
     * thread, the block the state frees last (arena.c, close_last). */
    c->closing = 1;
    if (lua_pushthread(L)) c->last = L;
    lua_pop(L, 1);
    if (c->last == NULL) {                        /* (never: the arena stays, an orphan) */
      c->next = atomic_load(&orphans);
      while (!atomic_compare_exchange_weak(&orphans, &c->next, c)) {}
    }
    return 0;
  }
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

/* LuaJIT's own allocator, that of luaL_newstate (NULL: none found). */
static lua_Alloc luajit_alloc;
static pthread_once_t luajit_alloc_once = PTHREAD_ONCE_INIT;

static void find_luajit_alloc(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return;
  luajit_alloc = lua_getallocf(L, NULL);
  lua_close(L);
}

/* Whether a state whose allocator is `inner` gets an arena (alloc_cache.h). */
static int arena_wanted(lua_Alloc inner, int luajit_ok) {
  const char *e = getenv("TIDE_ARENA");
  if (e != NULL && strcmp(e, "off") == 0) return 0;
  if (inner == tide__state_alloc) return 1;
  pthread_once(&luajit_alloc_once, find_luajit_alloc);
  return inner == luajit_alloc && (luajit_ok || (e != NULL && strcmp(e, "on") == 0));
}

void *tide__state_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(p);
    return NULL;
  }
  void *q = realloc(p, nsize);
  return q != NULL || nsize > osize ? q : p;       /* a shrink never fails */
}

int tide__alloc_cache_open(lua_State *L, int luajit_ok) {
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
  c->small_cap = TIDE_ALLOC_CACHE_SMALL_DEFAULT;
  c->in_use = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
  c->peak = c->in_use;
  c->window_end = PEAK_WINDOW;
  if (arena_wanted(c->inner, luajit_ok)) c->arena = tide__arena_new(c->cap);
  *u = c;
  lua_setallocf(L, cached_alloc, c);
  return 0;
}

long long tide__alloc_cache_set(lua_State *L, size_t cap) {
  cache *c = get(L);
  if (c == NULL) return -1;
  c->cap = cap;
  trim(c, cap);
  if (c->arena != NULL) tide__arena_keep(c->arena, cap);
  return (long long)c->kept;
}

long long tide__alloc_cache_set_small(lua_State *L, size_t cap) {
  cache *c = get(L);
  if (c == NULL) return -1;
  c->small_cap = cap;
  trim_small(c, small_bound(c));
  return (long long)c->kept_small;
}

size_t tide__alloc_cache_small_cap(lua_State *L) {
  cache *c = get(L);
  return c ? c->small_cap : 0;
}

void tide__alloc_cache_stats(lua_State *L, size_t *kept, size_t *cap, unsigned long long *hits) {
  cache *c = get(L);
  *kept = c ? c->kept : 0;
  *cap = c ? c->cap : 0;
  *hits = c ? c->hits : 0;
}

size_t tide__alloc_cache_small(lua_State *L) {
  cache *c = get(L);
  return c ? c->kept_small : 0;
}

size_t tide__alloc_cache_anchors(lua_State *L) {
  cache *c = get(L);
  return c ? c->nanchors : 0;
}

int tide__alloc_cache_arena(lua_State *L, tide_arena_stats *s) {
  cache *c = get(L);
  if (c == NULL || c->arena == NULL) return 0;
  tide__arena_stats(c->arena, s);
  return 1;
}

/* Purges by time as well as by volume: a process that allocates little
 * after a burst (a worker between jobs) would otherwise keep the burst's
 * free pages, over the cap, until 64 MiB more were handed out.  Two purges
 * give back a page left unused since the first. */
#define PURGE_EVERY_MS 5000

void tide__alloc_cache_tick(lua_State *L, uint64_t now_ms) {
  cache *c = get(L);
  if (c == NULL || c->arena == NULL || c->closing || now_ms - c->purged_at < PURGE_EVERY_MS) return;
  c->purged_at = now_ms;
  tide__arena_purge(c->arena);
}
