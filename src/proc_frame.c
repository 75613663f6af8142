/* proc_frame.c — what a child sends its parent, read: frame lengths, and payloads checked against the protocol into events (see procs.h).  No libuv: fuzzed on its own (spec/fuzz/fuzz_procframe.c). */
#include "procs.h"

static uint32_t get_u32(const char *p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) v |= (uint32_t)(unsigned char)p[i] << (8 * i);
  return v;
}

static uint64_t get_u64(const char *p) {
  return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* A reader over a frame's payload: each get fails (returns -1) past its end. */
typedef struct reader { const char *p; size_t left; } reader;

static int rd_bytes(reader *r, size_t n, const char **out) {
  if (r->left < n) return -1;
  *out = r->p;
  r->p += n;
  r->left -= n;
  return 0;
}

/* A string: *s NULL for the NULL marker. */
static int rd_str(reader *r, const char **s, size_t *len) {
  const char *p;
  if (rd_bytes(r, 4, &p) != 0) return -1;
  uint32_t n = get_u32(p);
  if (n == 0xffffffffu) { *s = NULL; *len = 0; return 0; }
  *len = n;
  return rd_bytes(r, n, s);
}

/* The shortest payload of a frame of each type a child may send: 'R' with
 * its string's length, 'D' with its id, ok and two strings' lengths. */
#define READY_MIN 5u
#define DONE_MIN 18u

/* A frame's type is judged as soon as it arrived, not once the whole frame
 * did: bytes a job wrote on fd 3 (a log line) make a plausible length, and
 * waiting for that many bytes would swallow the child's real frames, its
 * task waiting for ever. */
int tide__proc_frame_size(const char *buf, size_t len, size_t *size) {
  if (len < 4) return 0;
  uint32_t n = get_u32(buf);
  if (n == 0 || n > TIDE_PROC_FRAME_MAX) return -1;
  if (len > 4 && !(buf[4] == 'R' && n >= READY_MIN) && !(buf[4] == 'D' && n >= DONE_MIN)) return -1;
  if (len - 4 < n) return 0;
  *size = 4 + (size_t)n;
  return 1;
}

/* The protocol: one 'R' first, then only 'D's; bytes after a frame's
 * last field make no sense either (a writer that meant something else). */
int tide__proc_decode(const char *f, size_t len, int ready, tide__proc_event *ev) {
  *ev = (tide__proc_event){ 0 };
  if (len == 0) return -1;
  reader r = { f + 1, len - 1 };
  if (f[0] == 'R') {
    if (ready || rd_str(&r, &ev->init_error, &ev->init_error_len) != 0) return -1;
    ev->kind = TIDE_PROC_READY;
    return r.left == 0 ? 0 : -1;
  }
  const char *b;
  if (f[0] != 'D' || !ready || rd_bytes(&r, 9, &b) != 0) return -1;
  ev->kind = TIDE_PROC_DONE;
  ev->id = get_u64(b);
  ev->ok = b[8] != 0;
  if (rd_str(&r, &ev->result, &ev->result_len) != 0 || rd_str(&r, &ev->trace, &ev->trace_len) != 0)
    return -1;
  return r.left == 0 ? 0 : -1;
}

size_t tide__proc_done_length(size_t result_len, size_t trace_len) {
  size_t fixed = 1 + 9 + 4 + 4;                     /* type, id and ok, two string lengths */
  if (trace_len == SIZE_MAX) trace_len = 0;
  if (result_len > TIDE_PROC_FRAME_MAX - fixed || trace_len > TIDE_PROC_FRAME_MAX - fixed - result_len)
    return 0;
  return fixed + result_len + trace_len;
}
