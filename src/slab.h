/* slab.h — small blocks of a few fixed sizes, from 2 MB chunks that the kernel may back with huge pages.
 *
 * Why: the first touch of a page is a page fault, and on the VMs these
 * figures come from a fault costs ~20 us (bench/RESULTS.md, issue 21):
 * 100,000 thread jobs in flight (~27 MB of malloc) took ~6,500 faults on
 * their first run, 1.3 us per job, and nearly as many on every later run,
 * since glibc gave the memory back to the system between runs.  A slab maps
 * TIDE_SLAB_CHUNK bytes at a time, aligned to that size, with MADV_HUGEPAGE
 * from its second chunk on (one fault per chunk when the kernel has a huge
 * page for it, else the same faults as malloc's; the first chunk keeps small
 * pages, so that a few blocks in use touch a few pages), and keeps up to
 * `max_spare` empty chunks for the next burst instead of unmapping them.
 *
 * A block is one of TIDE_SLAB_CLASSES sizes (the smallest that fits the
 * request); a request above TIDE_SLAB_MAX gets NULL: the caller uses malloc.
 * Each chunk holds blocks of one size, keeps its free blocks in a list of
 * its own and counts those handed out: a chunk stays mapped while one of
 * its blocks is live, and an empty one is kept (up to max_spare) or
 * unmapped at once.  So the memory held is the live blocks' chunks plus
 * max_spare chunks at most.  Blocks are 64-byte aligned.
 *
 * Where the kernel's THP `defrag` setting lets a fault compact memory for a
 * huge page (`madvise`, `always`), a chunk's first touch may wait while it
 * does; with THP `never`, chunks have small pages and only the keeping of
 * spares is left.
 *
 * Not thread-safe: its owner calls it from one thread at a time.  Under
 * ASan, a block is poisoned from its free until its next alloc.
 */
#ifndef TIDE_SLAB_H
#define TIDE_SLAB_H

#include <stddef.h>

#define TIDE_SLAB_CHUNK ((size_t)2 << 20)   /* a huge page on x86-64 */
#define TIDE_SLAB_CLASSES 3                 /* blocks of 256, 512 and 1024 bytes */
#define TIDE_SLAB_MAX 1024                  /* the largest block */

typedef struct tide__slab_chunk tide__slab_chunk;

typedef struct tide__slab {
  tide__slab_chunk *avail[TIDE_SLAB_CLASSES];   /* chunks with a free block, by size */
  tide__slab_chunk *spare;                      /* empty chunks kept for later */
  tide__slab_chunk *all;                        /* every chunk mapped */
  int nspare, max_spare;
  size_t chunks;                                /* chunks mapped (spares included) */
} tide__slab;

/* An empty slab that keeps up to max_spare empty chunks.  Maps nothing yet. */
void tide__slab_init(tide__slab *s, int max_spare);

/* A block of at least `size` bytes; NULL when size > TIDE_SLAB_MAX or no
 * chunk can be mapped. */
void *tide__slab_alloc(tide__slab *s, size_t size);

/* Gives back a block from tide__slab_alloc of this slab. */
void tide__slab_free(tide__slab *s, void *block);

/* Unmaps every chunk, live blocks or not; the slab is empty again. */
void tide__slab_release(tide__slab *s);

#endif
