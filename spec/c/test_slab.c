/* test_slab.c — the job memory's slab against a reference of live blocks: sizes, reuse, bounds (TAP). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slab.h"

#include "tap.h"

static size_t class_size(size_t n) {
  return n <= 256 ? 256 : n <= 512 ? 512 : 1024;
}

static void sizes(void) {
  tide__slab s;
  tide__slab_init(&s, 2);
  ok(s.chunks == 0, "a new slab maps nothing");
  ok(tide__slab_alloc(&s, TIDE_SLAB_MAX + 1) == NULL, "a request above %d bytes gets NULL", TIDE_SLAB_MAX);
  ok(s.chunks == 0, "... and maps nothing");
  size_t asks[] = { 0, 1, 255, 256, 257, 512, 513, 1000, 1024 };
  void *b[9];
  int aligned = 1;
  for (int i = 0; i < 9; i++) {
    b[i] = tide__slab_alloc(&s, asks[i]);
    if (b[i] == NULL || (uintptr_t)b[i] % 64 != 0) aligned = 0;
    else memset(b[i], 0xA0 + i, class_size(asks[i]));     /* the whole block is usable */
  }
  ok(aligned, "blocks of every size are given, 64-byte aligned");
  ok(s.chunks == 3, "one chunk per size in use (got %zu)", s.chunks);
  int intact = 1;
  for (int i = 0; i < 9; i++)
    for (size_t j = 0; j < class_size(asks[i]); j++)
      if (((unsigned char *)b[i])[j] != 0xA0 + i) intact = 0;
  ok(intact, "no block overlaps another");
  for (int i = 0; i < 9; i++) tide__slab_free(&s, b[i]);
  ok(s.chunks == 2 && s.nspare == 2, "emptied chunks are kept up to max_spare (2), the rest unmapped");
  void *again = tide__slab_alloc(&s, 700);
  ok(again != NULL && s.chunks == 2 && s.nspare == 1, "a spare chunk serves the next size asked for");
  tide__slab_free(&s, again);
  tide__slab_release(&s);
  ok(s.chunks == 0 && s.nspare == 0, "release unmaps every chunk");
}

/* A chunk that was full gets blocks back: it serves again before any new
 * chunk is mapped. */
static void full_chunk_reused(void) {
  tide__slab s;
  tide__slab_init(&s, 0);
  size_t per_chunk = 0;
  void **held = malloc(20000 * sizeof *held);
  while (s.chunks < 2) held[per_chunk++] = tide__slab_alloc(&s, 1024);
  per_chunk--;                                              /* the last one opened chunk 2 */
  ok(per_chunk > 1900 && per_chunk < 2048, "a chunk holds about 2 MB of 1 KB blocks (%zu)", per_chunk);
  tide__slab_free(&s, held[7]);
  void *b = tide__slab_alloc(&s, 1024);
  ok(b == held[7] && s.chunks == 2, "a freed block in a full chunk is handed out again");
  int more = 0;
  for (int i = 0; i < 3000; i++) if ((held[per_chunk + 1 + i] = tide__slab_alloc(&s, 1024))) more++;
  ok(more == 3000 && s.chunks == 3, "new chunks are mapped as needed (%zu)", s.chunks);
  for (size_t i = 0; i < per_chunk + 1 + 3000; i++) if (i != 7) tide__slab_free(&s, held[i]);
  tide__slab_free(&s, b);
  ok(s.chunks == 0, "with no spare kept, every emptied chunk is unmapped (%zu left)", s.chunks);
  free(held);
}

/* Random allocs and frees of every size against the set of live blocks:
 * each block keeps its contents while live, and memory stays bounded by
 * the live blocks' chunks plus the spares. */
#define LIVE 30000
static void random_against_reference(void) {
  static unsigned char *block[LIVE];
  static size_t len[LIVE];
  static uint32_t stamp[LIVE];
  tide__slab s;
  tide__slab_init(&s, 3);
  srand(7);
  int corrupt = 0, refused = 0;
  size_t most = 0;
  for (int step = 0; step < 400000; step++) {
    int i = rand() % LIVE;
    if (block[i]) {
      for (size_t j = 0; j < len[i]; j++)
        if (block[i][j] != (unsigned char)(stamp[i] + j)) { corrupt++; break; }
      tide__slab_free(&s, block[i]);
      block[i] = NULL;
    } else {
      len[i] = (size_t)(rand() % (TIDE_SLAB_MAX + 1));
      block[i] = tide__slab_alloc(&s, len[i]);
      if (block[i] == NULL) { refused++; continue; }
      stamp[i] = (uint32_t)step;
      for (size_t j = 0; j < len[i]; j++) block[i][j] = (unsigned char)(stamp[i] + j);
    }
    if (s.chunks > most) most = s.chunks;
  }
  ok(corrupt == 0 && refused == 0, "400,000 random allocs and frees: no block changed while live (%d), none refused (%d)",
     corrupt, refused);
  ok(most <= 3 * (LIVE * 1024 / TIDE_SLAB_CHUNK + 2) + 3, "chunks mapped stay bounded (most %zu)", most);
  for (int i = 0; i < LIVE; i++) if (block[i]) tide__slab_free(&s, block[i]);
  ok(s.chunks == 3 && s.nspare == 3, "all freed: the spares are all that is left (%zu chunks)", s.chunks);
  tide__slab_release(&s);
}

int main(void) {
  sizes();
  full_chunk_reused();
  random_against_reference();
  return tap_done();
}
