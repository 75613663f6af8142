/* fuzz_procframe.c — libFuzzer target: what a child sends its parent, read as the parent reads it.
 *
 * fuzz-sources: src/proc_frame.c
 *
 * The input is a byte stream from a child, cut into reads at the places its
 * first byte says (so frames arrive whole, split and glued as a socket
 * gives them).  Each whole frame is decoded as procs.c's take_bytes does,
 * until one breaks the protocol.  Every string an event gives must lie
 * inside its frame, a frame must consume what its length says, and a
 * stream must never yield a second "ready" or a "done" before the first.
 * Any broken promise aborts, which libFuzzer reports as a crash.
 */
#include "procs.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void broken(const char *what) {
  fprintf(stderr, "fuzz_procframe: %s\n", what);
  abort();
}

static void inside(const char *s, size_t n, const char *f, size_t len, const char *what) {
  if (s == NULL) { if (n != 0) broken(what); return; }
  if (s < f || (size_t)(s - f) > len || n > len - (size_t)(s - f)) broken(what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  size_t step = (size_t)data[0] % 16 + 1;          /* the size of each read */
  const char *stream = (const char *)data + 1;
  size_t total = size - 1, arrived = 0, pos = 0;
  int ready = 0, readies = 0;
  while (arrived < total) {
    arrived += step < total - arrived ? step : total - arrived;
    for (;;) {
      size_t fsize = 0;
      int whole = tide__proc_frame_size(stream + pos, arrived - pos, &fsize);
      if (whole < 0) return 0;                      /* the parent kills such a child */
      if (whole == 0) break;
      if (fsize < 5 || fsize > arrived - pos) broken("a frame's size outside what arrived");
      const char *f = stream + pos + 4;
      size_t len = fsize - 4;
      tide__proc_event ev;
      if (tide__proc_decode(f, len, ready, &ev) != 0) return 0;
      if (ev.kind == TIDE_PROC_READY) {
        if (ready || ++readies > 1) broken("a second ready");
        inside(ev.init_error, ev.init_error_len, f, len, "init error outside its frame");
        ready = 1;
      } else if (ev.kind == TIDE_PROC_DONE) {
        if (!ready) broken("a done before the ready");
        if (ev.result == NULL && ev.result_len != 0) broken("a NULL result with a length");
        inside(ev.result, ev.result_len, f, len, "result outside its frame");
        inside(ev.trace, ev.trace_len, f, len, "trace outside its frame");
      } else {
        broken("an event of another kind");
      }
      pos += fsize;
    }
  }
  return 0;
}
