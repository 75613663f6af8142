/* arena.c — a Lua state's small blocks in pages of their own size, in huge pages (see arena.h). */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "arena.h"
#include "poison.h"

/* The range reserved: 32 GiB of address space, of which a state touches
 * what it uses.  A state that fills it gets its further blocks from its own
 * allocator. */
#define RANGE ((size_t)32 << 30)
#define HUGE_PAGE ((size_t)2 << 20)
#define SMALL_START ((size_t)4 << 20)                    /* in 4 KiB pages: a small state's */
#define COMMIT_STEP ((size_t)4 << 20)                    /* the range made writable this much at a time */
#define PAGE TIDE_ARENA_PAGE                            /* 16 KiB: 16 blocks of the largest size */
#define PAGE_SHIFT 14
_Static_assert(PAGE == (size_t)1 << PAGE_SHIFT, "PAGE_SHIFT is PAGE's");
#define NSIZES (TIDE_ARENA_LARGEST / 8)                  /* sizes 8, 16, ... LARGEST: size/8 - 1 */
#define MAX_RUN (TIDE_ARENA_RUN_MAX / PAGE)

typedef struct page {
  void *free;              /* its free blocks, linked through their first word */
  char *untouched;         /* its blocks never handed out: untouched .. the page's end */
  struct page *prev, *next;   /* on its size's list of pages with room, or a list of free runs */
  uint32_t used;           /* blocks handed out */
  /* Its blocks' size: up to TIDE_ARENA_LARGEST, a page of small blocks;
   * more, the first page of a run of size / PAGE pages, one block. */
  uint32_t size;
  uint32_t pages;          /* a free run's length */
  uint8_t listed;          /* on its size's list of pages with room */
  uint8_t backed;          /* a free run still backed (not given back to the kernel) */
  uint32_t freed_at;       /* a free run's: the arena's epoch when it was freed */
} page;

struct tide_arena {
  struct tide__arena_range range;   /* first: tide__arena_owns reads it */
  char *base;              /* the range, writable */
  char *fresh;             /* pages never used: fresh .. the range's end */
  char *writable;          /* the range is writable up to here (commit) */
  page *pages;             /* one per PAGE of the range (NORESERVE too) */
  page *current[NSIZES];   /* the page each size's blocks come from */
  page *room[NSIZES];      /* other pages of each size with free blocks (doubly linked) */
  page *runs[MAX_RUN + 1]; /* free runs of each length: n pages (an empty page: 1) */
  size_t small_pages;      /* pages serving small blocks */
  size_t run_pages;        /* pages of runs handed out as blocks */
  size_t backed, given_back;   /* pages of free runs, still backed or not */
  size_t keep_empty;       /* the most bytes of free runs kept backed past an epoch */
  uint32_t epoch;          /* purges so far (tide__arena_purge) */
};

static char *start_of(const tide_arena *a, const page *pg) {
  return a->base + ((size_t)(pg - a->pages) << PAGE_SHIFT);
}

static page *page_of(const tide_arena *a, const void *p) {
  return &a->pages[((size_t)((const char *)p - a->base)) >> PAGE_SHIFT];
}

/* Address space, reserved: not writable (nor counted against the
 * system's commit limit under vm.overcommit_memory=2, where MAP_NORESERVE
 * is ignored) until `commit` makes a part of it so. */
static void *map(size_t n) {
  void *p = mmap(NULL, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

/* Makes the range writable up to `upto` at least (in steps of COMMIT_STEP),
 * with the pages' descriptors: 0 when the kernel refuses (the arena is
 * spent then: the state's allocator serves). */
static int commit(tide_arena *a, const char *upto) {
  size_t want = ((size_t)(upto - a->base) + COMMIT_STEP - 1) & ~(COMMIT_STEP - 1);
  if (want > RANGE) want = RANGE;
  size_t have = (size_t)(a->writable - a->base);
  size_t d_have = (have / PAGE * sizeof(page) + 4095) & ~(size_t)4095;
  size_t d_want = (want / PAGE * sizeof(page) + 4095) & ~(size_t)4095;
  if (mprotect(a->writable, want - have, PROT_READ | PROT_WRITE) != 0) return 0;
  if (d_want > d_have && mprotect((char *)a->pages + d_have, d_want - d_have, PROT_READ | PROT_WRITE) != 0) {
    (void)mprotect(a->writable, want - have, PROT_NONE);
    return 0;
  }
  a->writable = a->base + want;
  return 1;
}

tide_arena *tide__arena_new(size_t keep_empty) {
  tide_arena *a = calloc(1, sizeof *a);
  if (a == NULL) return NULL;
  /* One huge page more than the range, so that the range can start on a
   * huge page's boundary (the kernel backs only aligned 2 MiB extents). */
  char *raw = map(RANGE + HUGE_PAGE);
  a->pages = map(RANGE / PAGE * sizeof(page));
  if (raw == NULL || a->pages == NULL) {
    if (raw != NULL) munmap(raw, RANGE + HUGE_PAGE);
    if (a->pages != NULL) munmap(a->pages, RANGE / PAGE * sizeof(page));
    free(a);
    return NULL;
  }
  char *base = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (base > raw) munmap(raw, (size_t)(base - raw));
  if (base + RANGE < raw + RANGE + HUGE_PAGE) munmap(base + RANGE, (size_t)(raw + HUGE_PAGE - base));
  /* Huge pages past the first SMALL_START bytes: a huge page is backed
   * whole at its first touch, and a state's first pages, one for each size
   * of block it makes (120-140 at tide's start, 2.2 MiB), would make every
   * state 2-4 MiB larger, each thread's included.  (A hint: without it,
   * 4 KiB pages.) */
  (void)madvise(base + SMALL_START, RANGE - SMALL_START, MADV_HUGEPAGE);
  a->base = a->fresh = a->writable = base;
  a->range.base = base;
  a->range.end = base + RANGE;
  a->keep_empty = keep_empty;
  return a;
}

void tide__arena_delete(tide_arena *a) {
  if (a == NULL) return;
  /* (ASan keeps the poison of memory unmapped: the next mapping there, by
   * anyone, would start poisoned) */
  UNPOISON(a->base, (size_t)(a->fresh - a->base));
  munmap(a->base, RANGE);
  munmap(a->pages, RANGE / PAGE * sizeof(page));
  free(a);
}

/* ---- lists */

static void unlist(tide_arena *a, page *pg) {
  if (pg->prev != NULL) pg->prev->next = pg->next;
  else a->room[pg->size / 8 - 1] = pg->next;
  if (pg->next != NULL) pg->next->prev = pg->prev;
  pg->prev = pg->next = NULL;
  pg->listed = 0;
}

static void list(tide_arena *a, page *pg) {
  page **head = &a->room[pg->size / 8 - 1];
  pg->prev = NULL;
  pg->next = *head;
  if (*head != NULL) (*head)->prev = pg;
  *head = pg;
  pg->listed = 1;
}

/* Free run pg of n pages goes back to the kernel (it reads as zeros after). */
static void give_back(tide_arena *a, page *pg, size_t n) {
  char *start = start_of(a, pg);
  UNPOISON(start, n * PAGE);
  (void)madvise(start, n * PAGE, MADV_DONTNEED);
  POISON(start, n * PAGE);
  pg->backed = 0;
  a->backed -= n;
  a->given_back += n;
}

/* A free run of n pages, kept backed: memory freed is mostly reused soon
 * (the collector frees a burst's blocks, the next burst takes them), and
 * given back at a free, it was faulted in again at once, page by page
 * (40 rounds of 200,000 tables made and dropped: 2.5-4x slower, most of
 * it madvise's and the faults' kernel time).  tide__arena_purge gives
 * back the runs left unused for a while, with a bound of 0 too (giving
 * back at each free, 40 such rounds took 8 s instead of 0.85: a madvise
 * and faults for every page the collector emptied). */
static void free_run(tide_arena *a, page *pg, size_t n) {
  pg->size = 0;
  pg->pages = (uint32_t)n;
  pg->backed = 1;
  pg->freed_at = a->epoch;
  a->backed += n;
  POISON(start_of(a, pg), n * PAGE);
  pg->next = a->runs[n];
  a->runs[n] = pg;
}

/* A run of n pages: a free one of that length, or fresh pages; NULL when
 * the range is spent. */
static page *take_run(tide_arena *a, size_t n) {
  page *pg = a->runs[n];
  if (pg != NULL) {
    a->runs[n] = pg->next;
    if (pg->backed) a->backed -= n;
    else a->given_back -= n;
  } else if ((size_t)(a->range.end - a->fresh) >= n * PAGE &&
             (a->fresh + n * PAGE <= a->writable || commit(a, a->fresh + n * PAGE))) {
    pg = page_of(a, a->fresh);
    a->fresh += n * PAGE;
  } else {
    return NULL;
  }
  pg->next = NULL;
  pg->free = NULL;
  pg->used = 0;
  pg->untouched = start_of(a, pg);
  return pg;
}

/* Page pg, whose small blocks are all free, is emptied for any use. */
static void empty(tide_arena *a, page *pg) {
  if (pg->listed) unlist(a, pg);
  a->small_pages--;
  free_run(a, pg, 1);
}

/* A page for small blocks of `size` bytes: one of that size with room, or
 * an empty one; NULL when the range is spent. */
static page *page_for(tide_arena *a, size_t size) {
  page *pg = a->room[size / 8 - 1];
  if (pg != NULL) {
    unlist(a, pg);
    return pg;
  }
  pg = take_run(a, 1);
  if (pg == NULL) return NULL;
  POISON(start_of(a, pg), PAGE);                   /* (fresh: its untouched blocks too) */
  pg->size = (uint32_t)size;
  a->small_pages++;
  return pg;
}

/* ---- blocks */

/* A block of page pg, which has room: a free one, else an untouched one. */
static void *take(const tide_arena *a, page *pg) {
  void *b = pg->free;
  if (b != NULL) {
    UNPOISON(b, pg->size);
    pg->free = *(void **)b;
  } else {
    if (pg->untouched + pg->size > start_of(a, pg) + PAGE) return NULL;
    b = pg->untouched;
    pg->untouched += pg->size;
    UNPOISON(b, pg->size);
  }
  pg->used++;
  return b;
}

/* A run of whole pages for one block of `size` bytes. */
static void *run_alloc(tide_arena *a, size_t size) {
  size_t n = (size + PAGE - 1) >> PAGE_SHIFT;
  page *pg = take_run(a, n);
  if (pg == NULL) return NULL;
  pg->size = (uint32_t)(n * PAGE);
  a->run_pages += n;
  POISON(start_of(a, pg), n * PAGE);               /* (fresh: its tail too) */
  UNPOISON(start_of(a, pg), size);
  return start_of(a, pg);
}

void *tide__arena_alloc(tide_arena *a, size_t size) {
  if (size > TIDE_ARENA_LARGEST) return run_alloc(a, size);
  size = (size + 7) & ~(size_t)7;
  page **current = &a->current[size / 8 - 1];
  page *pg = *current;
  void *b = pg != NULL ? take(a, pg) : NULL;
  if (b != NULL) return b;
  /* The current page is full (it is on no list: it goes on its size's
   * list when one of its blocks is freed). */
  pg = page_for(a, size);
  if (pg == NULL) return NULL;
  *current = pg;
  return take(a, pg);
}

void tide__arena_free(tide_arena *a, void *p) {
  page *pg = page_of(a, p);
  if (pg->size > TIDE_ARENA_LARGEST) {           /* a run */
    size_t n = pg->size / PAGE;
    a->run_pages -= n;
    free_run(a, pg, n);
    return;
  }
  *(void **)p = pg->free;
  pg->free = p;
  POISON(p, pg->size);
  pg->used--;
  if (pg == a->current[pg->size / 8 - 1]) return;
  if (pg->used == 0) empty(a, pg);
  else if (!pg->listed) list(a, pg);
}

int tide__arena_fits(const tide_arena *a, const void *p, size_t size) {
  size_t have = page_of(a, p)->size;
  if (have > TIDE_ARENA_LARGEST) return ((size + PAGE - 1) & ~(PAGE - 1)) == have;
  return ((size + 7) & ~(size_t)7) == have;
}

int tide__arena_resize(tide_arena *a, void *p, size_t size) {
  if (!tide__arena_fits(a, p, size)) return 0;
  size_t have = page_of(a, p)->size;
  if (have > TIDE_ARENA_LARGEST) {                 /* a run: its bytes past `size` are free */
    POISON(p, have);
    UNPOISON(p, size);
  }
  return 1;
}

/* Gives back free runs over `keep` bytes, the longest first; only those
 * freed before epoch `before` (all: the epoch after this one). */
static void trim(tide_arena *a, size_t keep, uint32_t before) {
  for (size_t n = MAX_RUN; n >= 1 && a->backed * PAGE > keep; n--)
    for (page *pg = a->runs[n]; pg != NULL && a->backed * PAGE > keep; pg = pg->next)
      if (pg->backed && (int32_t)(before - pg->freed_at) > 0) give_back(a, pg, n);
}

void tide__arena_keep(tide_arena *a, size_t keep_empty) {
  a->keep_empty = keep_empty;
  trim(a, keep_empty, a->epoch + 1);
}

void tide__arena_purge(tide_arena *a) {
  trim(a, a->keep_empty, a->epoch);
  a->epoch++;
}

void tide__arena_stats(const tide_arena *a, tide_arena_stats *s) {
  s->small_pages = a->small_pages;
  s->run_pages = a->run_pages;
  s->free_backed = a->backed;
  s->given_back = a->given_back;
  s->fresh = (size_t)(a->range.end - a->fresh) / PAGE;
}
