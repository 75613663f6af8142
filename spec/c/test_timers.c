/* test_timers.c — the timer heap against a sorted reference, with cancels and key reuse (TAP). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "timers.h"

#include "tap.h"

static void empty_heap(void) {
  tide__timers t;
  tide__timers_init(&t);
  uint64_t d;
  ok(tide__timers_pop_due(&t, 1000) == 0, "an empty heap has nothing due");
  ok(tide__timers_next(&t, &d) == 0, "an empty heap has no next deadline");
  ok(tide__timers_cancel(&t, 1) == -1, "cancelling an unknown key fails");
  tide__timers_free(&t);
}

static void ties_in_insertion_order(void) {
  tide__timers t;
  tide__timers_init(&t);
  int64_t a = tide__timers_start(&t, 10), b = tide__timers_start(&t, 10), c = tide__timers_start(&t, 5);
  ok(tide__timers_pop_due(&t, 4) == 0, "nothing due before the earliest deadline");
  ok(tide__timers_pop_due(&t, 10) == c, "earliest deadline first");
  ok(tide__timers_pop_due(&t, 10) == a, "equal deadlines: first started first");
  ok(tide__timers_pop_due(&t, 10) == b, "equal deadlines: then the second");
  ok(tide__timers_cancel(&t, a) == -1, "a fired key cannot be cancelled");
  tide__timers_free(&t);
}

/* Random starts, cancels and pops against a brute-force reference: every
 * pop is due, pops come in deadline order, and no due timer is left behind. */
#define N 20000
static void random_against_reference(void) {
  static uint64_t deadline[N + 1];
  static int pending[N + 1];
  tide__timers t;
  tide__timers_init(&t);
  srand(42);
  int mismatches = 0, live = 0;
  uint64_t now = 0;
  for (int step = 0; step < 200000; step++) {
    int op = rand() % 10;
    if (op < 5 && live < N) {
      uint64_t d = now + (uint64_t)(rand() % 1000);
      int64_t key = tide__timers_start(&t, d);
      if (key < 1 || key > N || pending[key]) { mismatches++; continue; }
      deadline[key] = d;
      pending[key] = 1;
      live++;
    } else if (op < 7 && live > 0) {
      int64_t key = 1 + rand() % N;
      int rc = tide__timers_cancel(&t, key);
      if ((rc == 0) != (pending[key] == 1)) mismatches++;
      if (rc == 0) { pending[key] = 0; live--; }
    } else {
      now += (uint64_t)(rand() % 50);
      int64_t key;
      uint64_t last = 0;
      while ((key = tide__timers_pop_due(&t, now)) != 0) {
        if (!pending[key] || deadline[key] > now || deadline[key] < last) mismatches++;
        last = deadline[key];
        pending[key] = 0;
        live--;
      }
      for (int k = 1; k <= N; k++)
        if (pending[k] && deadline[k] <= now && step % 1000 == 0) mismatches++;
    }
  }
  ok(mismatches == 0, "random starts, cancels and pops agree with the reference");
  ok(tide__timers_count(&t) == (uint32_t)live, "the count matches the live timers");
  tide__timers_free(&t);
}

/* Equal deadlines among many, with cancels and keys reused: they pop in the
 * order their timers started (the order is kept by key, not in the node). */
static void many_ties_in_start_order(void) {
  static uint64_t started_at[N + 1];
  static int pending[N + 1];
  tide__timers t;
  tide__timers_init(&t);
  srand(11);
  uint64_t order = 0;
  for (int i = 0; i < 30000; i++) {
    if (rand() % 4 == 0) {
      int64_t key = 1 + rand() % N;
      if (tide__timers_cancel(&t, key) == 0) pending[key] = 0;
    } else {
      uint64_t d = 100 + (uint64_t)(rand() % 3);      /* three deadlines, thousands of ties each */
      int64_t key = tide__timers_start(&t, d);
      if (key < 1 || key > N) break;
      started_at[key] = d * 1000000 + order++;       /* deadline first, then start order */
      pending[key] = 1;
    }
  }
  int in_order = 1, count = 0;
  uint64_t last = 0;
  int64_t key;
  while ((key = tide__timers_pop_due(&t, 1000)) != 0) {
    if (!pending[key] || started_at[key] < last) in_order = 0;
    last = started_at[key];
    pending[key] = 0;
    count++;
  }
  ok(in_order && count > 1000, "thousands of equal deadlines pop in start order, through cancels and reused keys");
  tide__timers_free(&t);
}

/* Pops come out in non-decreasing deadline order. */
static void pops_sorted(void) {
  tide__timers t;
  tide__timers_init(&t);
  srand(7);
  for (int i = 0; i < 100000; i++) tide__timers_start(&t, (uint64_t)(rand() % 100000));
  for (int i = 0; i < 20000; i++) tide__timers_cancel(&t, 1 + rand() % 100000);
  uint64_t prev = 0, d;
  int sorted = 1, count = 0;
  while (tide__timers_next(&t, &d)) {
    if (d < prev) sorted = 0;
    prev = d;
    if (tide__timers_pop_due(&t, d) == 0) { sorted = 0; break; }
    count++;
  }
  ok(sorted, "100,000 timers pop in deadline order");
  ok(count > 80000 && count <= 100000, "cancelled timers never pop");
  tide__timers_free(&t);
}

/* After a burst, with a few timers pending on high keys all along (periodic
 * ones, started again as they pop): compaction hands out low keys, a high key
 * is not reused once freed, and the arrays shrink when none is pending.
 * Random starts, cancels, pops and compactions against a reference: keys
 * are never handed out twice, every pending key is <= what compact says,
 * and pops come in deadline order. */
#define B 100000
static void compaction_after_a_burst(void) {
  static uint64_t deadline[B + 1];
  static int pending[B + 1], periodic[B + 1];
  tide__timers t;
  tide__timers_init(&t);
  int bad = 0, live = 0;
  int64_t k_;
  uint64_t now = 0;
#define START(d) do { uint64_t d_ = (d); k_ = tide__timers_start(&t, d_); \
    if (k_ < 1 || k_ > B || pending[k_]) bad++; else { pending[k_] = 1; deadline[k_] = d_; live++; } } while (0)
  for (int i = 0; i < B - 10; i++) START(1 + (uint64_t)(i % 1000));
  for (int i = 0; i < 3; i++) {                            /* the periodic ones: the highest keys */
    START(5000 + (uint64_t)i);
    if (!bad) periodic[k_] = 1;
  }
  size_t burst_bytes = tide__timers_bytes(&t);
  srand(5);
  uint32_t top = 0;
  for (int step = 0; step < 400000 && !bad; step++) {
    int op = rand() % 100;
    if (op < 2 && live < B / 2) {
      START(now + 1 + (uint64_t)(rand() % 3000));
    } else if (op < 3) {
      int64_t key = 1 + rand() % B;
      if (periodic[key]) continue;                         /* (those are never stopped) */
      int rc = tide__timers_cancel(&t, key);
      if ((rc == 0) != (pending[key] == 1)) bad++;
      if (rc == 0) { pending[key] = 0; live--; }
    } else if (op < 5) {
      top = tide__timers_compact(&t);
      for (uint32_t k = top + 1; k <= B; k++) if (pending[k]) { bad++; break; }
    } else {
      now += 1;
      int64_t key;
      uint64_t last = 0;
      while ((key = tide__timers_pop_due(&t, now)) != 0) {
        if (!pending[key] || deadline[key] > now || deadline[key] < last) bad++;
        last = deadline[key];
        pending[key] = 0;
        live--;
        if (periodic[key]) {                               /* started again as it pops */
          periodic[key] = 0;
          START(now + 5000);
          if (!bad) periodic[k_] = 1;
        }
      }
    }
  }
  ok(bad == 0, "keys are never handed out twice and pending keys stay under compact's bound, through compactions");
  ok(tide__timers_count(&t) == (uint32_t)live && live >= 3, "the count matches the live timers");
  top = tide__timers_compact(&t);
  ok(top < 1000, "after the burst, the keys in use are few and low again");
  ok(tide__timers_bytes(&t) * 16 < burst_bytes, "and the arrays gave the burst's memory back");
  tide__timers_free(&t);
#undef START
}

int main(void) {
  empty_heap();
  ties_in_insertion_order();
  random_against_reference();
  many_ties_in_start_order();
  pops_sorted();
  compaction_after_a_burst();
  return tap_done();
}
