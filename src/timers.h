/* timers.h — a min-heap of deadlines: the bookkeeping behind every tide timer.
 *
 * No Lua and no libuv here: one uv_timer_t in loop.c is armed for the
 * earliest deadline, and the binding pops what is due.  A timer is named by a
 * small integer key, reused after it fires or is cancelled, so the Lua side
 * can keep its callbacks in a dense array indexed by key.
 *
 * Ties are broken by insertion order: two timers with the same deadline fire
 * in the order they were started.  Not thread-safe: loop thread only.
 *
 * Keys stay small after a burst.  When no timer is pending the numbering
 * starts again at 1.  When a few are pending among many keys handed out (a
 * million timers fired, a few periodic ones still pending on high keys),
 * tide__timers_compact sets a limit: the free keys under it are handed out
 * first, and a key above it is not reused once freed; when the last one
 * above it is freed, nkeys falls to the limit and the arrays can shrink.
 * Every pending key is <= nkeys: the caller's arrays indexed by key need
 * no more than that.
 */
#ifndef TIDE_TIMERS_H
#define TIDE_TIMERS_H

#include <stddef.h>
#include <stdint.h>

typedef struct tide__timers {
  struct tide__tnode *heap;   /* heap[0..count) ordered by (deadline, seq) */
  uint32_t *pos;              /* pos[key] = index in heap, or FREE_SLOT     */
  uint32_t *free_keys;        /* stack of keys ready for reuse              */
  uint32_t count, cap;        /* heap size and capacity                     */
  uint32_t nkeys, nfree;      /* keys 1..nkeys may be pending; keys on the stack */
  uint32_t limit, nabove;     /* keys above limit are not reused (compacting, see
                                 above; else UINT32_MAX), and how many are pending */
  uint64_t seq;               /* insertion counter for stable ties          */
} tide__timers;

void tide__timers_init(tide__timers *t);
void tide__timers_free(tide__timers *t);

/* Starts a timer due at `deadline` (any monotonic unit, tide uses ns).
 * Returns its key (>= 1), or -1 when out of memory. */
int64_t tide__timers_start(tide__timers *t, uint64_t deadline);

/* Cancels a pending timer.  0 when it was pending; -1 for an unknown key or
 * one that already fired or was cancelled (harmless). */
int tide__timers_cancel(tide__timers *t, int64_t key);

/* Pops the earliest timer if it is due at `now`: returns its key, or 0 when
 * nothing is due.  The key may be handed out again by the next start. */
int64_t tide__timers_pop_due(tide__timers *t, uint64_t now);

/* 1 and the earliest deadline in *deadline when a timer is pending, else 0. */
int tide__timers_next(const tide__timers *t, uint64_t *deadline);

/* After a burst: when fewer than one key in 8 is pending, starts the
 * compaction described above; when no key above the limit is pending any
 * more, gives back the arrays' memory beyond twice nkeys.  Returns nkeys:
 * every pending key is <= it.  O(nkeys) when it compacts, else O(1) (and a
 * realloc when it shrinks). */
uint32_t tide__timers_compact(tide__timers *t);

/* Number of pending timers, and bytes held by the heap's arrays. */
uint32_t tide__timers_count(const tide__timers *t);
size_t tide__timers_bytes(const tide__timers *t);

#endif
