/* slab.c — fixed-size blocks from huge-page chunks (see slab.h). */
#include "slab.h"

#include <stdint.h>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define poison(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define unpoison(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define poison(p, n) ((void)(p), (void)(n))
#define unpoison(p, n) ((void)(p), (void)(n))
#endif

/* The header at the start of each chunk; its blocks follow from FIRST on.
 * A chunk is in `all` from its map to its unmap, and besides in exactly one
 * of: its size's `avail` list (it has a free block), the spare list (it is
 * empty and kept), or no list (every block is live). */
struct tide__slab_chunk {
  tide__slab_chunk *next, *prev;     /* avail (doubly linked) or spare (next only) */
  tide__slab_chunk *all_next, *all_prev;
  void *free;                        /* its free blocks, each holding the next one's address */
  size_t bump;                       /* offset of the first block never handed out */
  int live;                          /* blocks handed out */
  int cls;
  int in_avail;
};

#define FIRST 128                    /* past the header, 64-byte aligned */

static size_t block_size(int cls) { return (size_t)256 << cls; }

static int class_of(size_t size) {
  for (int c = 0; c < TIDE_SLAB_CLASSES; c++)
    if (size <= block_size(c)) return c;
  return -1;
}

static tide__slab_chunk *chunk_of(void *block) {
  return (tide__slab_chunk *)((uintptr_t)block & ~(uintptr_t)(TIDE_SLAB_CHUNK - 1));
}

void tide__slab_init(tide__slab *s, int max_spare) {
  *s = (tide__slab){ .max_spare = max_spare };
}

/* ===== chunks */

/* Maps a chunk aligned to its size (a huge page can only back an aligned
 * one): twice the size is mapped, then the ends are cut off.  Huge pages
 * are asked for only once the slab has a chunk already: a slab that needs
 * one (a pool with a few jobs in flight) touches a few small pages of it,
 * not 2 MB at once. */
static tide__slab_chunk *map_chunk(tide__slab *s) {
  size_t size = TIDE_SLAB_CHUNK;
  char *p = mmap(NULL, 2 * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *c = (char *)(((uintptr_t)p + size - 1) & ~(uintptr_t)(size - 1));
  if (c > p) munmap(p, (size_t)(c - p));
  if (c + size < p + 2 * size) munmap(c + size, (size_t)(p + 2 * size - (c + size)));
#ifdef MADV_HUGEPAGE
  if (s->chunks > 0) madvise(c, size, MADV_HUGEPAGE);   /* advice: refused, the chunk has small pages */
#endif
  tide__slab_chunk *k = (tide__slab_chunk *)c;
  k->all_prev = NULL;
  k->all_next = s->all;
  if (s->all) s->all->all_prev = k;
  s->all = k;
  s->chunks++;
  return k;
}

static void unmap_chunk(tide__slab *s, tide__slab_chunk *k) {
  if (k->all_prev) k->all_prev->all_next = k->all_next; else s->all = k->all_next;
  if (k->all_next) k->all_next->all_prev = k->all_prev;
  s->chunks--;
  unpoison(k, TIDE_SLAB_CHUNK);      /* the range may be mapped again, by anyone */
  munmap(k, TIDE_SLAB_CHUNK);
}

static void avail_push(tide__slab *s, tide__slab_chunk *k) {
  tide__slab_chunk **head = &s->avail[k->cls];
  k->prev = NULL;
  k->next = *head;
  if (*head) (*head)->prev = k;
  *head = k;
  k->in_avail = 1;
}

static void avail_unlink(tide__slab *s, tide__slab_chunk *k) {
  if (k->prev) k->prev->next = k->next; else s->avail[k->cls] = k->next;
  if (k->next) k->next->prev = k->prev;
  k->next = k->prev = NULL;
  k->in_avail = 0;
}

/* An empty chunk for blocks of class cls: a spare, or a new one. */
static tide__slab_chunk *fresh_chunk(tide__slab *s, int cls) {
  tide__slab_chunk *k = s->spare;
  if (k) {
    s->spare = k->next;
    s->nspare--;
  } else if ((k = map_chunk(s)) == NULL) {
    return NULL;
  }
  k->free = NULL;
  k->bump = FIRST;
  k->live = 0;
  k->cls = cls;
  poison((char *)k + FIRST, TIDE_SLAB_CHUNK - FIRST);
  avail_push(s, k);
  return k;
}

/* ===== blocks */

void *tide__slab_alloc(tide__slab *s, size_t size) {
  int cls = class_of(size);
  if (cls < 0) return NULL;
  size_t bs = block_size(cls);
  tide__slab_chunk *k = s->avail[cls];
  if (k == NULL && (k = fresh_chunk(s, cls)) == NULL) return NULL;
  char *b;
  if (k->free) {
    b = k->free;
    unpoison(b, bs);
    k->free = *(void **)b;
  } else {
    b = (char *)k + k->bump;
    unpoison(b, bs);
    k->bump += bs;
  }
  k->live++;
  if (k->free == NULL && k->bump + bs > TIDE_SLAB_CHUNK) avail_unlink(s, k);   /* full */
  return b;
}

void tide__slab_free(tide__slab *s, void *block) {
  tide__slab_chunk *k = chunk_of(block);
  size_t bs = block_size(k->cls);
  *(void **)block = k->free;
  k->free = block;
  poison(block, bs);                 /* the link too: only alloc reads it, unpoisoned */
  if (--k->live > 0) {
    if (!k->in_avail) avail_push(s, k);
    return;
  }
  if (k->in_avail) avail_unlink(s, k);   /* empty: kept as a spare, or unmapped */
  if (s->nspare < s->max_spare) {
    k->next = s->spare;
    s->spare = k;
    s->nspare++;
  } else {
    unmap_chunk(s, k);
  }
}

void tide__slab_release(tide__slab *s) {
  while (s->all) unmap_chunk(s, s->all);
  int max_spare = s->max_spare;
  tide__slab_init(s, max_spare);
}
