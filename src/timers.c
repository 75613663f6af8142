/* timers.c — 4-ary min-heap of deadlines with stable keys (see timers.h). */
#include "timers.h"

#include <stdlib.h>

#define FREE_SLOT UINT32_MAX
#define NO_LIMIT UINT32_MAX
#define MIN_CAP 64

typedef struct tide__tnode {
  uint64_t deadline, seq;
  uint32_t key;
} tnode;

void tide__timers_init(tide__timers *t) {
  *t = (tide__timers){ .limit = NO_LIMIT };
}

void tide__timers_free(tide__timers *t) {
  free(t->heap);
  free(t->pos);
  free(t->free_keys);
  tide__timers_init(t);
}

static int before(const tnode *a, const tnode *b) {
  return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static void place(tide__timers *t, uint32_t i, tnode n) {
  t->heap[i] = n;
  t->pos[n.key] = i;
}

/* A 4-ary heap: half the depth of a binary one, and the four children of
 * a node side by side in memory.  With a million timers pending, a pop is
 * bound by cache misses (one per level, and one more for `pos`), so fewer
 * levels is what makes it faster. */
#define ARITY 4

static void sift_up(tide__timers *t, uint32_t i) {
  tnode n = t->heap[i];
  while (i > 0) {
    uint32_t parent = (i - 1) / ARITY;
    if (!before(&n, &t->heap[parent])) break;
    place(t, i, t->heap[parent]);
    i = parent;
  }
  place(t, i, n);
}

/* Refills the hole at heap[i] with the subtree's next node and so on down,
 * then puts the node that was at i back where it belongs, climbing from the
 * bottom.  The node being placed is the heap's last one (remove_at), late
 * as a rule: it seldom climbs far, and going down costs no comparison
 * with it (3 per level instead of 4). */
static void sift_down(tide__timers *t, uint32_t i) {
  tnode n = t->heap[i];
  uint32_t top = i;
  for (;;) {
    uint32_t first = ARITY * i + 1;
    if (first >= t->count) break;
    uint32_t last = first + ARITY < t->count ? first + ARITY : t->count;
    uint32_t c = first;                     /* the earliest child */
    for (uint32_t k = first + 1; k < last; k++)
      if (before(&t->heap[k], &t->heap[c])) c = k;
    place(t, i, t->heap[c]);
    i = c;
  }
  while (i > top) {
    uint32_t parent = (i - 1) / ARITY;
    if (!before(&n, &t->heap[parent])) break;
    place(t, i, t->heap[parent]);
    i = parent;
  }
  place(t, i, n);
}

/* Grows heap, pos and free_keys together so that one more key always fits. */
static int reserve(tide__timers *t) {
  if (t->nkeys + 1 < t->cap) return 0;
  uint32_t cap = t->cap ? t->cap * 2 : MIN_CAP;
  tnode *heap = realloc(t->heap, cap * sizeof *heap);
  if (!heap) return -1;
  t->heap = heap;
  uint32_t *pos = realloc(t->pos, cap * sizeof *pos);
  if (!pos) return -1;
  t->pos = pos;
  uint32_t *free_keys = realloc(t->free_keys, cap * sizeof *free_keys);
  if (!free_keys) return -1;
  t->free_keys = free_keys;
  t->cap = cap;
  return 0;
}

int64_t tide__timers_start(tide__timers *t, uint64_t deadline) {
  uint32_t key;
  if (t->nfree > 0) {
    key = t->free_keys[--t->nfree];
  } else {
    if (reserve(t) != 0) return -1;
    key = ++t->nkeys;                       /* key 0 is never used */
    if (key > t->limit) t->nabove++;        /* (compacting: a burst above the limit) */
  }
  t->heap[t->count] = (tnode){ deadline, t->seq++, key };
  t->pos[key] = t->count;
  sift_up(t, t->count++);
  return key;
}

/* Frees a key: on the stack for reuse, unless it is above the limit.  No
 * timer pending: the numbering starts again at 1. */
static void free_key(tide__timers *t, uint32_t key) {
  t->pos[key] = FREE_SLOT;
  if (t->count == 0) {
    t->nkeys = t->nfree = t->nabove = 0;
    t->limit = NO_LIMIT;
  } else if (key <= t->limit) {
    t->free_keys[t->nfree++] = key;
  } else if (--t->nabove == 0) {            /* the last key above the limit */
    t->nkeys = t->limit;
    t->limit = NO_LIMIT;
  }
}

/* Removes heap[i], keeping the heap ordered, and frees its key. */
static void remove_at(tide__timers *t, uint32_t i) {
  uint32_t key = t->heap[i].key;
  t->count--;
  free_key(t, key);
  if (t->count == i) return;
  place(t, i, t->heap[t->count]);
  if (i > 0 && before(&t->heap[i], &t->heap[(i - 1) / ARITY]))
    sift_up(t, i);
  else
    sift_down(t, i);
}

int tide__timers_cancel(tide__timers *t, int64_t key) {
  if (key < 1 || key > t->nkeys || t->pos[key] == FREE_SLOT) return -1;
  remove_at(t, t->pos[key]);
  return 0;
}

int64_t tide__timers_pop_due(tide__timers *t, uint64_t now) {
  if (t->count == 0 || t->heap[0].deadline > now) return 0;
  uint32_t key = t->heap[0].key;
  remove_at(t, 0);
  return key;
}

/* Shrinks the three arrays to `cap` entries.  A realloc that fails keeps
 * its larger block, which is as good. */
static void shrink_to(tide__timers *t, uint32_t cap) {
  tnode *heap = realloc(t->heap, cap * sizeof *heap);
  if (heap) t->heap = heap;
  uint32_t *pos = realloc(t->pos, cap * sizeof *pos);
  if (pos) t->pos = pos;
  uint32_t *free_keys = realloc(t->free_keys, cap * sizeof *free_keys);
  if (free_keys) t->free_keys = free_keys;
  t->cap = cap;
}

uint32_t tide__timers_compact(tide__timers *t) {
  if (t->limit == NO_LIMIT && t->nkeys > 2 * MIN_CAP && t->count < t->nkeys / 8) {
    uint32_t limit = 2 * t->count + MIN_CAP;  /* < nkeys: room for the timers pending, twice */
    t->nfree = 0;
    for (uint32_t k = limit; k >= 1; k--)     /* the lowest free key on top */
      if (t->pos[k] == FREE_SLOT) t->free_keys[t->nfree++] = k;
    t->nabove = 0;
    for (uint32_t i = 0; i < t->count; i++)
      if (t->heap[i].key > limit) t->nabove++;
    if (t->nabove == 0) t->nkeys = limit;
    else t->limit = limit;
  }
  if (t->limit == NO_LIMIT) {
    uint32_t cap = MIN_CAP;
    while (cap < 2 * (t->nkeys + 1)) cap *= 2;
    if (cap < t->cap) shrink_to(t, cap);
  }
  return t->nkeys;
}

int tide__timers_next(const tide__timers *t, uint64_t *deadline) {
  if (t->count == 0) return 0;
  *deadline = t->heap[0].deadline;
  return 1;
}

uint32_t tide__timers_count(const tide__timers *t) {
  return t->count;
}

size_t tide__timers_bytes(const tide__timers *t) {
  return (size_t)t->cap * (sizeof(tnode) + 2 * sizeof(uint32_t));
}
