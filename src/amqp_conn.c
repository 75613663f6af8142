/* amqp_conn.c — an AMQP 0-9-1 connection on a libuv loop (see amqp_conn.h): handshake by rabbitmq-c, then non-blocking frames both ways. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <amqp_tcp_socket.h>

#include "amqp_conn.h"
#include "loop.h"

#define IN_SIZE 65536          /* bytes read per read(2)                       */
#define READS_PER_READY 8      /* reads per ready callback: then others run    */
#define FRAME_OVERHEAD 8       /* type, channel, size, end                     */

/* A message being assembled on a channel: its method, then a header frame,
 * then body frames until body_size bytes came.  `buf` is used only when the
 * body spans several frames (one frame: the body points into the pool). */
typedef struct assembly {
  int state;                 /* 0: none, 1: want header, 2: want body */
  amqp_method_t method;
  amqp_basic_properties_t *props;
  uint64_t size, got;
  amqp_bytes_t single;
  char *buf;
} assembly;

struct tide__amqp {
  amqp_connection_state_t st;
  int fd;
  int heartbeat, frame_max, channel_max;
  int lib_pending;           /* rabbitmq-c may hold bytes read during the handshake */
  /* the loop */
  uv_poll_t poll;
  uv_timer_t timer;
  uv_prepare_t prepare;      /* flushes what a tick queued, before the loop polls */
  int attached, open_handles, poll_events;
  tide__amqp_ready_cb ready;
  void *data;
  uint64_t last_recv, last_send;   /* uv_now, ms */
  /* input */
  char *in;
  size_t in_len, in_off;
  int reads_left;
  assembly *asm_by_ch;       /* indexed by channel, grown on demand */
  int asm_n;
  int release_ch;            /* channel whose pool the last event used; -1: none */
  char *release_buf;         /* body buffer of the last event */
  /* output */
  char *out;
  size_t out_len, out_off, out_cap;
  long ack_at;               /* offset of the last queued frame when it is a basic.ack with
                                `multiple` of which no byte was sent yet; -1: none */
  amqp_channel_t ack_ch;     /* its channel */
  /* state */
  int lost;
  char err[256];
};

/* ===== errors ===== */

/* Marks the connection lost (the first reason stays); returns -1. */
static int lose(tide__amqp *c, const char *fmt, ...) {
  if (c->lost) return -1;
  c->lost = 1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  if (c->attached && !uv_is_closing((uv_handle_t *)&c->poll)) {
    uv_poll_stop(&c->poll);
    uv_timer_stop(&c->timer);
    uv_prepare_stop(&c->prepare);
  }
  return -1;
}

const char *tide__amqp_error(const tide__amqp *c) { return c->lost ? c->err : ""; }
int tide__amqp_heartbeat(const tide__amqp *c) { return c->heartbeat; }
int tide__amqp_frame_max(const tide__amqp *c) { return c->frame_max; }
int tide__amqp_channel_max(const tide__amqp *c) { return c->channel_max; }
size_t tide__amqp_pending(const tide__amqp *c) { return c->out_len - c->out_off; }

/* ===== opening (blocking: a worker thread) ===== */

static void describe_reply(amqp_rpc_reply_t r, const char *what, char *err, size_t errlen) {
  if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
    snprintf(err, errlen, "%s: %s", what, amqp_error_string2(r.library_error));
  } else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
             r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
    amqp_connection_close_t *m = r.reply.decoded;
    snprintf(err, errlen, "%s: refused by the broker: %u %.*s", what, m->reply_code,
             (int)m->reply_text.len, (const char *)m->reply_text.bytes);
  } else {
    snprintf(err, errlen, "%s: unexpected reply from the broker", what);
  }
}

tide__amqp *tide__amqp_open(const tide__amqp_config *cfg, char *err, size_t errlen) {
  amqp_connection_state_t st = amqp_new_connection();
  if (st == NULL) { snprintf(err, errlen, "out of memory"); return NULL; }
  amqp_socket_t *sock = amqp_tcp_socket_new(st);
  struct timeval tv = { cfg->timeout_ms / 1000, (cfg->timeout_ms % 1000) * 1000 };
  int rc = sock ? amqp_socket_open_noblock(sock, cfg->host, cfg->port, &tv) : AMQP_STATUS_NO_MEMORY;
  if (rc != AMQP_STATUS_OK) {
    snprintf(err, errlen, "cannot connect: %s", amqp_error_string2(rc));
    amqp_destroy_connection(st);
    return NULL;
  }
  amqp_set_handshake_timeout(st, &tv);
  amqp_set_rpc_timeout(st, &tv);
  /* What we understand from the broker, besides rabbitmq-c's own capabilities. */
  static const char *caps[] = { "consumer_cancel_notify", "connection.blocked", "basic.nack", "publisher_confirms" };
  amqp_table_entry_t cap[4];
  for (int i = 0; i < 4; i++) {
    cap[i].key = amqp_cstring_bytes(caps[i]);
    cap[i].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    cap[i].value.value.boolean = 1;
  }
  amqp_table_entry_t entries[2] = {
    { amqp_cstring_bytes("connection_name"), { AMQP_FIELD_KIND_UTF8, { .bytes = amqp_cstring_bytes(cfg->name) } } },
    { amqp_cstring_bytes("capabilities"), { AMQP_FIELD_KIND_TABLE, { .table = { 4, cap } } } },
  };
  amqp_table_t props = { 2, entries };
  amqp_rpc_reply_t r = amqp_login_with_properties(st, cfg->vhost, 0, 131072, cfg->heartbeat, &props,
                                                  AMQP_SASL_METHOD_PLAIN, cfg->user, cfg->password);
  if (r.reply_type != AMQP_RESPONSE_NORMAL) {
    describe_reply(r, "login", err, errlen);
    amqp_destroy_connection(st);
    return NULL;
  }
  tide__amqp *c = calloc(1, sizeof *c);
  char *in = malloc(IN_SIZE);
  if (c == NULL || in == NULL) {
    free(c); free(in);
    snprintf(err, errlen, "out of memory");
    amqp_destroy_connection(st);
    return NULL;
  }
  c->st = st;
  c->in = in;
  c->fd = amqp_get_sockfd(st);
  c->heartbeat = amqp_get_heartbeat(st);
  c->frame_max = amqp_get_frame_max(st);
  c->channel_max = amqp_get_channel_max(st);
  c->release_ch = -1;
  c->ack_at = -1;
  /* From here on heartbeats are ours: rabbitmq-c must never write by itself. */
  amqp_tune_connection(st, c->channel_max, c->frame_max, 0);
  c->lib_pending = amqp_data_in_buffer(st) || amqp_frames_enqueued(st);
  int flags = fcntl(c->fd, F_GETFL, 0);
  if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    snprintf(err, errlen, "cannot make the socket non-blocking: %s", strerror(errno));
    tide__amqp_close(c);
    return NULL;
  }
  return c;
}

/* ===== the loop's side ===== */

static void on_poll(uv_poll_t *h, int status, int events);

/* Writes what is queued, as far as the socket takes it. */
static void flush(tide__amqp *c) {
  while (c->out_off < c->out_len) {
    ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (n > 0) {
      c->out_off += (size_t)n;
      c->ack_at = -1;                              /* sent, at least in part: no longer patched */
      if (c->attached) c->last_send = uv_now(c->poll.loop);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      lose(c, "connection lost: %s", n < 0 ? strerror(errno) : "write returned 0");
      return;
    }
  }
  if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
}

/* Readable always; writable only while bytes wait that the socket did not
 * take when they were flushed; the loop stays alive only while bytes wait
 * (readers keep it alive with timers of their own). */
static void on_closed(uv_handle_t *h);

static void update_poll(tide__amqp *c) {
  if (!c->attached || c->lost) return;
  int pending = c->out_len > c->out_off;
  int events = UV_READABLE | UV_DISCONNECT | (pending ? UV_WRITABLE : 0);
  if (events != c->poll_events) {
    c->poll_events = events;
    uv_poll_start(&c->poll, events, on_poll);
  }
  if (pending) uv_ref((uv_handle_t *)&c->poll); else uv_unref((uv_handle_t *)&c->poll);
}

/* Before the loop polls (after the tick that queued them), the queued
 * frames are written at once: a write(2) that the socket takes needs no
 * wait for writability, which would cost an epoll_ctl to watch for it, an
 * epoll_wait and another epoll_ctl to stop watching, per loop iteration.
 * Only what the socket refuses waits for UV_WRITABLE. */
static void on_prepare(uv_prepare_t *h) {
  tide__amqp *c = h->data;
  uv_prepare_stop(h);
  if (c->lost) return;
  flush(c);
  if (c->lost) { c->ready(c, c->data); return; }
  update_poll(c);
}

/* Frames were queued: they leave before the loop next polls. */
static void want_flush(tide__amqp *c) {
  if (!c->attached || c->lost || c->out_len == c->out_off) return;
  if (!uv_is_active((uv_handle_t *)&c->prepare)) uv_prepare_start(&c->prepare, on_prepare);
}

static void on_poll(uv_poll_t *h, int status, int events) {
  tide__amqp *c = h->data;
  if (status < 0) {
    lose(c, "connection lost: %s", uv_strerror(status));
    c->ready(c, c->data);
    return;
  }
  if (events & UV_WRITABLE) {
    flush(c);
    if (c->lost) { c->ready(c, c->data); return; }
    update_poll(c);
  }
  if (events & (UV_READABLE | UV_DISCONNECT)) {
    c->reads_left = READS_PER_READY;
    c->ready(c, c->data);
  }
}

static int append(tide__amqp *c, const void *bytes, size_t len);

/* Heartbeats: one sent when nothing was written for half the interval; the
 * connection is lost when nothing was read for two intervals. */
static void on_timer(uv_timer_t *h) {
  tide__amqp *c = h->data;
  if (c->lost) return;
  uint64_t now = uv_now(h->loop), hb = (uint64_t)c->heartbeat * 1000;
  if (now - c->last_recv > 2 * hb) {
    lose(c, "connection lost: no heartbeat from the broker for %d s", 2 * c->heartbeat);
    c->ready(c, c->data);
    return;
  }
  if (now - c->last_send >= hb / 2 && c->out_len == c->out_off) {
    static const unsigned char frame[FRAME_OVERHEAD] = { AMQP_FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, AMQP_FRAME_END };
    if (append(c, frame, sizeof frame) == 0) flush(c);
    if (c->lost) { c->ready(c, c->data); return; }
    update_poll(c);
  }
}

int tide__amqp_attach(tide__amqp *c, uv_loop_t *loop, tide__amqp_ready_cb ready, void *data) {
  uv_timer_init(loop, &c->timer);                      /* cannot fail */
  uv_prepare_init(loop, &c->prepare);                  /* nor this */
  c->timer.data = c->poll.data = c->prepare.data = c;
  int rc = uv_poll_init_socket(loop, &c->poll, c->fd);
  if (rc != 0) {                                       /* c goes with the timer and the prepare */
    c->attached = 1;
    c->open_handles = 2;
    tide__close((uv_handle_t *)&c->timer, on_closed);
    tide__close((uv_handle_t *)&c->prepare, on_closed);
    if (c->st) amqp_destroy_connection(c->st);
    c->st = NULL;
    return rc;
  }
  c->attached = 1;
  c->open_handles = 3;
  c->ready = ready;
  c->data = data;
  c->last_recv = c->last_send = uv_now(loop);
  c->poll_events = UV_READABLE | UV_DISCONNECT;
  uv_poll_start(&c->poll, c->poll_events, on_poll);
  uv_unref((uv_handle_t *)&c->poll);
  if (c->heartbeat > 0) {
    uint64_t every = (uint64_t)c->heartbeat * 250;       /* a quarter of the interval */
    uv_timer_start(&c->timer, on_timer, every, every);
  }
  uv_unref((uv_handle_t *)&c->timer);
  return 0;
}

/* ===== reading ===== */

/* The next frame: 1, 0 (none for now), -1 (lost). */
static int next_frame(tide__amqp *c, amqp_frame_t *f) {
  if (c->lib_pending) {                  /* bytes rabbitmq-c read during the handshake */
    if (amqp_data_in_buffer(c->st) || amqp_frames_enqueued(c->st)) {
      struct timeval zero = { 0, 0 };
      int rc = amqp_simple_wait_frame_noblock(c->st, f, &zero);
      if (rc == AMQP_STATUS_OK) return 1;
      if (rc != AMQP_STATUS_TIMEOUT) return lose(c, "connection lost: %s", amqp_error_string2(rc));
    }
    c->lib_pending = 0;
  }
  for (;;) {
    if (c->in_off < c->in_len) {
      amqp_bytes_t b = { c->in_len - c->in_off, c->in + c->in_off };
      int n = amqp_handle_input(c->st, b, f);
      if (n < 0) return lose(c, "protocol error: %s", amqp_error_string2(n));
      if (n == 0 && f->frame_type == 0) return lose(c, "protocol error: the decoder made no progress");
      c->in_off += (size_t)n;
      if (f->frame_type != 0) return 1;
      continue;
    }
    if (c->reads_left <= 0) return 0;
    ssize_t n = read(c->fd, c->in, IN_SIZE);
    if (n > 0) {
      c->in_len = (size_t)n;
      c->in_off = 0;
      /* A short read drained the socket: reading again now would only
       * return EAGAIN (the poll is level-triggered: more bytes wake it). */
      c->reads_left = (size_t)n < IN_SIZE ? 0 : c->reads_left - 1;
      if (c->attached) c->last_recv = uv_now(c->poll.loop);
    } else if (n == 0) {
      return lose(c, "connection lost: closed by the broker");
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      c->reads_left = 0;
      return 0;
    } else {
      return lose(c, "connection lost: %s", strerror(errno));
    }
  }
}

static assembly *assembly_of(tide__amqp *c, amqp_channel_t ch) {
  if (ch >= c->asm_n) {
    int n = c->asm_n ? c->asm_n : 8;
    while (n <= ch) n *= 2;
    assembly *a = realloc(c->asm_by_ch, sizeof *a * (size_t)n);
    if (a == NULL) return NULL;
    memset(a + c->asm_n, 0, sizeof *a * (size_t)(n - c->asm_n));
    c->asm_by_ch = a;
    c->asm_n = n;
  }
  return &c->asm_by_ch[ch];
}

static int is_content_method(amqp_method_number_t id) {
  return id == AMQP_BASIC_DELIVER_METHOD || id == AMQP_BASIC_RETURN_METHOD || id == AMQP_BASIC_GET_OK_METHOD;
}

static int complete(tide__amqp *c, assembly *a, amqp_channel_t ch, tide__amqp_event *ev) {
  ev->channel = ch;
  ev->method = a->method;
  ev->has_content = 1;
  ev->props = a->props;
  if (a->buf) { ev->body.bytes = a->buf; ev->body.len = (size_t)a->size; }
  else ev->body = a->single;
  c->release_buf = a->buf;                 /* freed with the event */
  memset(a, 0, sizeof *a);
  c->release_ch = ch;
  return 1;
}

/* 1: an event is ready in ev; 0: the frame was absorbed; -1: lost. */
static int on_frame(tide__amqp *c, amqp_frame_t *f, tide__amqp_event *ev) {
  amqp_channel_t ch = f->channel;
  assembly *a;
  switch (f->frame_type) {
    case AMQP_FRAME_HEARTBEAT:
      return 0;
    case AMQP_FRAME_METHOD:
      if (is_content_method(f->payload.method.id)) {
        if ((a = assembly_of(c, ch)) == NULL) return lose(c, "out of memory");
        if (a->state != 0) return lose(c, "protocol error: a method inside a message on channel %u", ch);
        a->state = 1;
        a->method = f->payload.method;
        return 0;
      }
      ev->channel = ch;
      ev->method = f->payload.method;
      ev->has_content = 0;
      ev->props = NULL;
      ev->body.len = 0;
      ev->body.bytes = NULL;
      c->release_ch = ch;
      return 1;
    case AMQP_FRAME_HEADER:
      a = ch < c->asm_n ? &c->asm_by_ch[ch] : NULL;
      if (a == NULL || a->state != 1) return lose(c, "protocol error: an unexpected content header on channel %u", ch);
      /* rabbitmq-c decodes the properties by the class the frame names: for
       * any class but basic, a struct of another (smaller) type, which the
       * binding would read as basic properties. */
      if (f->payload.properties.class_id != AMQP_BASIC_CLASS)
        return lose(c, "protocol error: a content header of class %u on channel %u",
                    (unsigned)f->payload.properties.class_id, ch);
      if (f->payload.properties.body_size > TIDE_AMQP_BODY_MAX)
        return lose(c, "a message of %llu bytes is larger than %u", (unsigned long long)f->payload.properties.body_size,
                    TIDE_AMQP_BODY_MAX);
      a->props = f->payload.properties.decoded;
      a->size = f->payload.properties.body_size;
      a->got = 0;
      a->state = 2;
      return a->size == 0 ? complete(c, a, ch, ev) : 0;
    case AMQP_FRAME_BODY: {
      a = ch < c->asm_n ? &c->asm_by_ch[ch] : NULL;
      amqp_bytes_t part = f->payload.body_fragment;
      if (a == NULL || a->state != 2 || a->got + part.len > a->size)
        return lose(c, "protocol error: an unexpected body frame on channel %u", ch);
      if (a->got == 0 && part.len == a->size) {
        a->single = part;
      } else {
        if (a->buf == NULL && (a->buf = malloc((size_t)a->size)) == NULL) return lose(c, "out of memory for a message");
        memcpy(a->buf + a->got, part.bytes, part.len);
      }
      a->got += part.len;
      return a->got == a->size ? complete(c, a, ch, ev) : 0;
    }
    default:
      return lose(c, "protocol error: frame type %d", f->frame_type);
  }
}

/* Releases the memory of the event returned last. */
static void release_last(tide__amqp *c) {
  free(c->release_buf);
  c->release_buf = NULL;
  if (c->release_ch >= 0) {
    amqp_channel_t ch = (amqp_channel_t)c->release_ch;
    if (ch >= c->asm_n || c->asm_by_ch[ch].state == 0) amqp_maybe_release_buffers_on_channel(c->st, ch);
    c->release_ch = -1;
  }
}

int tide__amqp_next(tide__amqp *c, tide__amqp_event *ev) {
  release_last(c);
  if (c->lost) return -1;
  for (;;) {
    amqp_frame_t f;
    int rc = next_frame(c, &f);
    if (rc <= 0) return rc;
    rc = on_frame(c, &f, ev);
    if (rc != 0) return rc;
  }
}

/* ===== writing ===== */

/* Room for n more bytes at the end of the queue; -1 (and lost) past the bound. */
static int reserve(tide__amqp *c, size_t n) {
  if (c->out_len + n <= c->out_cap) return 0;
  if (c->out_off > 0) {                              /* slide the unsent bytes down */
    memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
    if (c->out_len + n <= c->out_cap) return 0;
  }
  if (c->out_len + n > TIDE_AMQP_OUT_MAX)
    return lose(c, "more than %u bytes queued for the broker, which is not reading them (blocked by a resource alarm?)",
                TIDE_AMQP_OUT_MAX);
  size_t cap = c->out_cap ? c->out_cap : 4096;
  while (cap < c->out_len + n) cap *= 2;
  char *p = realloc(c->out, cap);
  if (p == NULL) return lose(c, "out of memory for the output queue");
  c->out = p;
  c->out_cap = cap;
  return 0;
}

static int append(tide__amqp *c, const void *bytes, size_t len) {
  c->ack_at = -1;
  if (reserve(c, len) != 0) return -1;
  memcpy(c->out + c->out_len, bytes, len);
  c->out_len += len;
  return 0;
}

static void put16(char *p, uint16_t v) { p[0] = (char)(v >> 8); p[1] = (char)v; }
static void put32(char *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static void put64(char *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

/* Starts a frame at the end of the queue; returns its payload's address
 * (room: frame_max - FRAME_OVERHEAD bytes), or NULL (lost). */
static char *frame_begin(tide__amqp *c, uint8_t type, amqp_channel_t ch) {
  c->ack_at = -1;                                  /* the last frame will be another one */
  if (reserve(c, (size_t)c->frame_max) != 0) return NULL;
  char *p = c->out + c->out_len;
  p[0] = (char)type;
  put16(p + 1, ch);
  return p + 7;
}

/* Ends the frame begun last, whose payload is `size` bytes. */
static void frame_end(tide__amqp *c, size_t size) {
  char *p = c->out + c->out_len;
  put32(p + 3, (uint32_t)size);
  p[7 + size] = (char)AMQP_FRAME_END;
  c->out_len += FRAME_OVERHEAD + size;
}

int tide__amqp_send_method(tide__amqp *c, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
  if (c->lost) return -1;
  char *p = frame_begin(c, AMQP_FRAME_METHOD, ch);
  if (p == NULL) return -1;
  put32(p, id);
  amqp_bytes_t room = { (size_t)c->frame_max - FRAME_OVERHEAD - 4, p + 4 };
  int n = amqp_encode_method(id, decoded, room);
  if (n < 0) { snprintf(c->err, sizeof c->err, "cannot encode a method: %s", amqp_error_string2(n)); return -2; }
  frame_end(c, 4 + (size_t)n);
  want_flush(c);
  return 0;
}

/* basic.ack: method frame header (7 bytes), class and method (4), delivery
 * tag (8), flags (1), frame end (1). */
#define ACK_FRAME_SIZE 21
#define ACK_TAG_AT 11

int tide__amqp_send_ack(tide__amqp *c, amqp_channel_t ch, uint64_t tag, int multiple) {
  if (c->lost) return -1;
  /* An ack with `multiple` settles every delivery of the channel up to its
   * tag; a later one with a higher tag covers all the earlier one did.  So
   * while the earlier one still waits whole at the end of the queue (no
   * byte of it sent, no other frame after it), raising its tag in place
   * says the same in one frame.  The caller promises that `multiple` covers
   * only deliveries that are settled (tide.sources.rabbitmq acks with it
   * only up to the first tag whose outcome is unknown). */
  if (multiple && c->ack_at >= 0 && c->ack_ch == ch) {
    char *p = c->out + c->ack_at + ACK_TAG_AT;
    uint64_t old = 0;
    for (int i = 0; i < 8; i++) old = old << 8 | (unsigned char)p[i];
    if (tag > old) { put64(p, tag); return 0; }
  }
  amqp_basic_ack_t m = { tag, multiple ? 1 : 0 };
  int rc = tide__amqp_send_method(c, ch, AMQP_BASIC_ACK_METHOD, &m);
  if (rc == 0 && multiple && c->out_len - c->out_off >= ACK_FRAME_SIZE) {
    c->ack_at = (long)(c->out_len - ACK_FRAME_SIZE);
    c->ack_ch = ch;
  }
  return rc;
}

int tide__amqp_send_content(tide__amqp *c, amqp_channel_t ch, const amqp_basic_properties_t *props,
                            const void *body, size_t len) {
  if (c->lost) return -1;
  char *p = frame_begin(c, AMQP_FRAME_HEADER, ch);
  if (p == NULL) return -1;
  put16(p, AMQP_BASIC_CLASS);
  put16(p + 2, 0);                                  /* weight */
  put64(p + 4, len);
  amqp_bytes_t room = { (size_t)c->frame_max - FRAME_OVERHEAD - 12, p + 12 };
  int n = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)props, room);
  if (n < 0) { snprintf(c->err, sizeof c->err, "cannot encode the properties: %s", amqp_error_string2(n)); return -2; }
  frame_end(c, 12 + (size_t)n);
  size_t max = (size_t)c->frame_max - FRAME_OVERHEAD;
  for (size_t off = 0; off < len; off += max) {
    size_t part = len - off < max ? len - off : max;
    if ((p = frame_begin(c, AMQP_FRAME_BODY, ch)) == NULL) return -1;
    memcpy(p, (const char *)body + off, part);
    frame_end(c, part);
  }
  want_flush(c);
  return 0;
}

int tide__amqp_send_publish(tide__amqp *c, amqp_channel_t ch, const amqp_basic_publish_t *m,
                            const amqp_basic_properties_t *props, const void *body, size_t len) {
  if (c->lost) return -1;
  /* Nothing is written before the loop's next prepare (want_flush only
   * asks for it), and reserve keeps the unsent bytes whole when it slides
   * them: so dropping what this call queued is cutting the queue back to
   * the unsent length it had. */
  size_t unsent = c->out_len - c->out_off;
  int rc = tide__amqp_send_method(c, ch, AMQP_BASIC_PUBLISH_METHOD, (void *)m);
  if (rc == 0) rc = tide__amqp_send_content(c, ch, props, body, len);
  if (rc == -2) {                                  /* a method frame alone would break the channel */
    c->out_len = c->out_off + unsent;
    c->ack_at = -1;
  }
  return rc;
}

const char *tide__amqp_send_error(const tide__amqp *c) { return c->err; }

/* ===== closing ===== */

static void free_conn(tide__amqp *c) {
  if (c->asm_by_ch) for (int i = 0; i < c->asm_n; i++) free(c->asm_by_ch[i].buf);
  free(c->asm_by_ch);
  free(c->release_buf);
  free(c->in);
  free(c->out);
  free(c);
}

static void on_closed(uv_handle_t *h) {
  tide__amqp *c = h->data;
  if (--c->open_handles == 0) free_conn(c);
}

void tide__amqp_close(tide__amqp *c) {
  if (!c->lost && c->st) {
    amqp_connection_close_t m = { 200, amqp_cstring_bytes("closed by tide"), 0, 0 };
    if (tide__amqp_send_method(c, 0, AMQP_CONNECTION_CLOSE_METHOD, &m) == 0) flush(c);
    lose(c, "connection closed");
  }
  if (c->attached) {
    uv_poll_stop(&c->poll);
    tide__close((uv_handle_t *)&c->poll, on_closed);
    tide__close((uv_handle_t *)&c->timer, on_closed);
    tide__close((uv_handle_t *)&c->prepare, on_closed);
  }
  if (c->st) {
    amqp_destroy_connection(c->st);                 /* closes the socket */
    c->st = NULL;
  }
  if (!c->attached) free_conn(c);
}
