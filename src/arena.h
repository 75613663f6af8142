/* arena.h — a Lua state's small blocks in pages of their own size, in huge pages.
 *
 * Why: a cold run is mostly page faults.  On the virtual machines these
 * figures come from, touching a fresh 4 KiB page costs ~10 us, half of it
 * the hypervisor's, and a cold burst of 200,000 tasks or a 10,000-node
 * flow is thousands of them; a 2 MiB huge page costs about as much as one
 * and backs 512 (bench/RESULTS.md, issue 21).  LuaJIT maps its segments
 * itself, in 4 KiB pages, so only memory tide maps can be advised into
 * huge pages.  The arena takes every block of up to TIDE_ARENA_LARGEST
 * bytes (a task's table, coroutine and first stack, a closure, a short
 * string); larger ones stay with the state's allocator.
 *
 * How: one range of address space is reserved per state (NORESERVE: what
 * is never touched costs nothing) and advised MADV_HUGEPAGE past its first
 * 2 MiB.  It is cut in pages of 16 KiB; a page serves blocks of one size (a multiple of 8: Lua
 * tells the allocator every block's size, so a block has no header), from
 * the free list of that page, then from its untouched end.  A page whose
 * blocks are all free again is emptied and can serve any size; empty
 * pages past the cap are given back to the kernel (MADV_DONTNEED).  Blocks
 * freed together are reused together, in the page they came from, rather
 * than in the collector's order across the heap (alloc_cache.h says why
 * that matters).
 *
 * One per state; a state is used by one thread at a time, and so is its
 * arena. */
#ifndef TIDE_ARENA_H
#define TIDE_ARENA_H

#include <stddef.h>

#define TIDE_ARENA_PAGE ((size_t)16 << 10)         /* a page: one size's small blocks */
#define TIDE_ARENA_LARGEST 1024                    /* the largest small block */
#define TIDE_ARENA_RUN_MIN ((size_t)64 << 10)      /* blocks in runs of pages: from ... */
#define TIDE_ARENA_RUN_MAX ((size_t)2 << 20)       /* ... to (both multiples of a page) */

typedef struct tide_arena tide_arena;

/* A new arena, or NULL when there is no address space for one (the state
 * keeps its own allocator then). */
tide_arena *tide__arena_new(size_t keep_empty);

/* Unmaps everything: every block handed out is gone. */
void tide__arena_delete(tide_arena *a);

/* Whether p is a block of the arena (NULL is not). */
static inline int tide__arena_owns(const tide_arena *a, const void *p);

/* Whether the arena serves blocks of `size` bytes: 1 to
 * TIDE_ARENA_LARGEST (small blocks), or TIDE_ARENA_RUN_MIN to
 * TIDE_ARENA_RUN_MAX (a run of pages each). */
static inline int tide__arena_serves(size_t size) {
  return size - 1 < TIDE_ARENA_LARGEST || size - TIDE_ARENA_RUN_MIN <= TIDE_ARENA_RUN_MAX - TIDE_ARENA_RUN_MIN;
}

/* A block of `size` bytes (one the arena serves), or NULL when the arena
 * is full. */
void *tide__arena_alloc(tide_arena *a, size_t size);

/* Frees block p (its size is its page's). */
void tide__arena_free(tide_arena *a, void *p);

/* Whether block p, of the arena, can hold `size` bytes in place: a
 * block of the same size rounded up to 8. */
int tide__arena_fits(const tide_arena *a, const void *p, size_t size);

/* tide__arena_fits, and when it does, p now holds `size` bytes (under
 * ASan: a run's bytes up to `size` are the block's, those past it free). */
int tide__arena_resize(tide_arena *a, void *p, size_t size);

/* The most bytes of free pages kept for reuse past a purge: those over it
 * go back to the kernel at once, then at each purge those not reused since
 * the one before (0 too: between purges, what the collector frees is there
 * for what is made next). */
void tide__arena_keep(tide_arena *a, size_t keep_empty);

/* Called now and then (the allocator cache: every 64 MiB handed out): the
 * free pages over the bound that were not reused since the last purge go
 * back to the kernel. */
void tide__arena_purge(tide_arena *a);

typedef struct tide_arena_stats {   /* in pages (TIDE_ARENA_PAGE) */
  size_t small_pages;  /* serving small blocks */
  size_t run_pages;    /* in runs handed out as blocks */
  size_t free_backed;  /* free, kept backed for reuse */
  size_t given_back;   /* free, given back to the kernel */
  size_t fresh;        /* never used, of the range reserved */
} tide_arena_stats;

void tide__arena_stats(const tide_arena *a, tide_arena_stats *s);

/* ---- inline */

struct tide__arena_range { const char *base, *end; };

static inline int tide__arena_owns(const tide_arena *a, const void *p) {
  const struct tide__arena_range *r = (const struct tide__arena_range *)a;   /* its first member */
  return (const char *)p >= r->base && (const char *)p < r->end;
}

#endif
