/* http.c — the HTTP/1.1 server mechanism (see http.h): libuv sockets, http-parser requests. */
#include "http.h"
#include "loop.h"

#include <http_parser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

/* READING, HANDLING and CLOSING as in http.h; FLUSHING: the last response
 * is written and the connection closes once the bytes are out; LINGERING:
 * they are all with the kernel and a FIN follows them (linger). */
enum { READING, HANDLING, FLUSHING, LINGERING, CLOSING };

#define MAX_URL      8192
#define SWEEP_MS     1000
#define READ_SIZE    65536
/* A body buffer larger than this is freed once its request is answered,
 * not kept for the connection's next request: 256 idle keep-alive
 * connections that each once sent a 1 MiB body held 256 MiB. */
#define BODY_KEEP    65536

typedef struct { char *p; size_t len, cap; } buf;

struct tide__http_conn {
  uv_tcp_t handle;              /* first: the handle's address is the conn's */
  tide__http_server *s;         /* valid until state is CLOSING */
  tide__http_conn *prev, *next; /* the server's open connections */
  tide__http_conn *resume_next; /* the server's resume list */
  int in_resume;
  int draining;                 /* READING, but the last answer is not all sent: nothing is read */
  int eof;                      /* the client has half-closed */
  uv_shutdown_t shut;           /* LINGERING: the FIN after the answer */
  http_parser parser;
  int state;
  int writes;                   /* uv_write requests not yet called back */
  size_t queued;                /* bytes not yet with the client (libuv's and the kernel's), at the last look */
  uint64_t last;                /* uv_now of the last activity */
  uint64_t begun;               /* uv_now when the request being read began; 0: none */
  /* the request being read: the URL, then header names and values, in `head` */
  buf head, body, pending;
  size_t url_len;
  int hstate;                   /* 0: no header yet, 1: in a name, 2: in a value */
  int nheaders;
  size_t name_off[TIDE_HTTP_MAX_HEADERS], name_len[TIDE_HTTP_MAX_HEADERS];
  size_t value_off[TIDE_HTTP_MAX_HEADERS], value_len[TIDE_HTTP_MAX_HEADERS];
  int ready;                    /* a complete request is parsed (the parser is paused) */
  int error_status;             /* set by a callback that refused the request */
  tide__http_request req;
  void *data;
};

struct tide__http_server {
  uv_tcp_t listener;
  uv_timer_t sweep;
  uv_idle_t resume;
  uv_loop_t *loop;
  tide__http_options opt;
  tide__http_conn *conns;
  tide__http_conn *resume_list;
  tide__http_stats stats;
  int handles_open;             /* of listener, sweep, resume */
  int closing, ref;
  char rbuf[READ_SIZE];         /* reads land here; what is kept is copied */
};

static void feed(tide__http_conn *c, const char *data, size_t len);
static void resume_reading(tide__http_conn *c);
static void linger(tide__http_conn *c);

/* ===== buffers ===== */

static int buf_add(buf *b, const char *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n) cap *= 2;
    char *q = realloc(b->p, cap);
    if (q == NULL) return -1;
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

static void buf_free(buf *b) {
  free(b->p);
  *b = (buf){ 0 };
}

/* The request's body is done with: its bytes leave the server's count,
 * and a large buffer goes back to the allocator. */
static void body_release(tide__http_conn *c) {
  if (c->s) c->s->stats.buffered -= c->body.len;
  c->body.len = 0;
  if (c->body.cap > BODY_KEEP) buf_free(&c->body);
}

/* ===== closing ===== */

static void conn_free(uv_handle_t *h) {
  tide__http_conn *c = (tide__http_conn *)h;
  buf_free(&c->head);
  buf_free(&c->body);
  buf_free(&c->pending);
  free(c);
}

static void resume_remove(tide__http_server *s, tide__http_conn *c) {
  if (!c->in_resume) return;
  for (tide__http_conn **p = &s->resume_list; *p; p = &(*p)->resume_next) {
    if (*p == c) { *p = c->resume_next; break; }
  }
  c->in_resume = 0;
}

/* Closes a connection (idempotent).  A request out is dropped: its owner
 * hears of it through on_conn_closed.  The memory goes in the close callback
 * (after libuv has called back every write, with UV_ECANCELED). */
static void close_conn(tide__http_conn *c) {
  if (c->state == CLOSING) return;
  tide__http_server *s = c->s;
  int was = c->state;
  c->state = CLOSING;
  if (was == HANDLING && s->opt.on_conn_closed) s->opt.on_conn_closed(c, s->opt.data);
  body_release(c);
  resume_remove(s, c);
  if (c->prev) c->prev->next = c->next; else s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->stats.open--;
  c->s = NULL;
  tide__close((uv_handle_t *)&c->handle, conn_free);
}

static void server_closed(uv_handle_t *h) {
  tide__http_server *s = h->data;
  if (--s->handles_open == 0) free(s);
}

void tide__http_close(tide__http_server *s) {
  if (s->closing) return;
  s->closing = 1;
  while (s->conns) close_conn(s->conns);
  tide__close((uv_handle_t *)&s->listener, server_closed);
  tide__close((uv_handle_t *)&s->sweep, server_closed);
  tide__close((uv_handle_t *)&s->resume, server_closed);
}

/* ===== writing ===== */

typedef struct { uv_write_t req; tide__http_conn *c; char data[]; } wreq;

static void on_written(uv_write_t *r, int status) {
  wreq *w = (wreq *)r;
  tide__http_conn *c = w->c;
  free(w);
  c->writes--;
  if (status < 0) { close_conn(c); return; }
  c->last = uv_now(c->handle.loop);
  if (c->state == FLUSHING && c->writes == 0) linger(c);
  else if (c->state == READING && c->draining) resume_reading(c);
}

int tide__http_write(tide__http_conn *c, const char *data, size_t len) {
  if (c->state == CLOSING) return UV_ECANCELED;
  if (len == 0) return 0;
  wreq *w = malloc(sizeof *w + len);
  if (w == NULL) { close_conn(c); return UV_ENOMEM; }
  w->c = c;
  memcpy(w->data, data, len);
  uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->handle, &b, 1, on_written);
  if (rc != 0) { free(w); close_conn(c); return rc; }
  c->writes++;
  c->queued = (size_t)-1;                   /* (the sweep's first look is progress) */
  return 0;
}

/* Answers a request this file refused, and closes. */
static void reject(tide__http_conn *c, int status) {
  const char *reason = http_status_str((enum http_status)status);
  char msg[256];
  int n = snprintf(msg, sizeof msg, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Length: %zu\r\nConnection: close\r\n\r\n%s\n",
                   status, reason, strlen(reason) + 1, reason);
  if (c->s) c->s->stats.rejected++;
  uv_read_stop((uv_stream_t *)&c->handle);
  c->state = FLUSHING;
  if (tide__http_write(c, msg, (size_t)n) == 0 && c->writes == 0) close_conn(c);
}

/* ===== parsing ===== */

static tide__http_conn *conn_of(http_parser *p) { return p->data; }

static int on_message_begin(http_parser *p) {
  tide__http_conn *c = conn_of(p);
  c->head.len = 0;
  body_release(c);
  c->url_len = 0;
  c->hstate = c->nheaders = 0;
  c->error_status = 0;
  c->begun = uv_now(c->handle.loop);
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
  tide__http_conn *c = conn_of(p);
  if (c->url_len + n > MAX_URL) { c->error_status = 414; return -1; }
  if (buf_add(&c->head, at, n) != 0) { c->error_status = 503; return -1; }
  c->url_len += n;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
  tide__http_conn *c = conn_of(p);
  if (c->hstate != 1) {                     /* a new header */
    if (c->nheaders == TIDE_HTTP_MAX_HEADERS) { c->error_status = 431; return -1; }
    c->name_off[c->nheaders] = c->head.len;
    c->name_len[c->nheaders] = c->value_len[c->nheaders] = 0;
    c->value_off[c->nheaders] = c->head.len;
    c->nheaders++;
    c->hstate = 1;
  }
  size_t at_len = c->head.len;
  if (buf_add(&c->head, at, n) != 0) { c->error_status = 503; return -1; }
  for (size_t i = at_len; i < c->head.len; i++) {
    char ch = c->head.p[i];
    if (ch >= 'A' && ch <= 'Z') c->head.p[i] = (char)(ch - 'A' + 'a');
  }
  c->name_len[c->nheaders - 1] += n;
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
  tide__http_conn *c = conn_of(p);
  int i = c->nheaders - 1;
  if (c->hstate != 2) { c->value_off[i] = c->head.len; c->value_len[i] = 0; c->hstate = 2; }
  if (buf_add(&c->head, at, n) != 0) { c->error_status = 503; return -1; }
  c->value_len[i] += n;
  return 0;
}

static int header_is(tide__http_conn *c, int i, const char *name, const char *value) {
  size_t nl = strlen(name), vl = strlen(value);
  return c->name_len[i] == nl && memcmp(c->head.p + c->name_off[i], name, nl) == 0 &&
         c->value_len[i] == vl && strncasecmp(c->head.p + c->value_off[i], value, vl) == 0;
}

/* Returns -1 to refuse (never 1: that would tell the parser "no body"). */
static int on_headers_complete(http_parser *p) {
  tide__http_conn *c = conn_of(p);
  if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->s->opt.max_body) {
    c->error_status = 413;
    return -1;
  }
  for (int i = 0; i < c->nheaders; i++) {
    if (header_is(c, i, "expect", "100-continue")) {
      tide__http_write(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
      break;
    }
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
  tide__http_conn *c = conn_of(p);
  tide__http_server *s = c->s;
  if (c->body.len + n > s->opt.max_body) { c->error_status = 413; return -1; }
  /* every connection's bodies together: 256 connections each sending 1 MiB
   * (max_conns, max_body) held 256 MiB until their requests timed out */
  if (s->stats.buffered + n > s->opt.max_buffered) { c->error_status = 503; return -1; }
  if (buf_add(&c->body, at, n) != 0) { c->error_status = 503; return -1; }
  s->stats.buffered += n;
  return 0;
}

static int on_message_complete(http_parser *p) {
  tide__http_conn *c = conn_of(p);
  c->ready = 1;
  http_parser_pause(p, 1);                  /* one request at a time */
  return 0;
}

static const http_parser_settings settings = {
  .on_message_begin = on_message_begin, .on_url = on_url,
  .on_header_field = on_header_field, .on_header_value = on_header_value,
  .on_headers_complete = on_headers_complete, .on_body = on_body,
  .on_message_complete = on_message_complete,
};

/* Hands the parsed request to the owner; reading stops until it ends. */
static void dispatch(tide__http_conn *c) {
  tide__http_server *s = c->s;
  tide__http_request *r = &c->req;
  c->ready = 0;
  c->begun = 0;
  uv_read_stop((uv_stream_t *)&c->handle);
  c->state = HANDLING;
  r->method = http_method_str((enum http_method)c->parser.method);
  r->url = (tide__http_str){ c->head.p, c->url_len };
  r->nheaders = c->nheaders;
  for (int i = 0; i < c->nheaders; i++) {
    r->names[i] = (tide__http_str){ c->head.p + c->name_off[i], c->name_len[i] };
    r->values[i] = (tide__http_str){ c->head.p + c->value_off[i], c->value_len[i] };
  }
  r->body = (tide__http_str){ c->body.p ? c->body.p : "", c->body.len };
  /* An Upgrade (WebSocket) is ignored, as HTTP allows: the request is
   * answered, and the connection closes after it, so the bytes that follow
   * are never read as HTTP. */
  r->keep_alive = http_should_keep_alive(&c->parser) && !c->parser.upgrade;
  r->http_minor = c->parser.http_minor;
  s->stats.requests++;
  s->opt.on_request(c, r, s->opt.data);
}

static void feed(tide__http_conn *c, const char *data, size_t len) {
  size_t n = http_parser_execute(&c->parser, &settings, data, len);
  if (c->ready && c->parser.method == HTTP_CONNECT) { reject(c, 501); return; }
  if (c->ready) {
    c->pending.len = 0;
    if (n < len && buf_add(&c->pending, data + n, len - n) != 0) { close_conn(c); return; }
    dispatch(c);
    return;
  }
  enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
  if (c->parser.upgrade) reject(c, 501);   /* CONNECT: not served */
  else if (e == HPE_HEADER_OVERFLOW) reject(c, 431);
  else if (e != HPE_OK) reject(c, c->error_status ? c->error_status : 400);
}

/* ===== the loop's callbacks ===== */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  (void)suggested;
  tide__http_conn *c = (tide__http_conn *)h;
  *b = uv_buf_init(c->s->rbuf, READ_SIZE);
}

static void on_read(uv_stream_t *h, ssize_t nread, const uv_buf_t *b) {
  tide__http_conn *c = (tide__http_conn *)h;
  if (c->state == LINGERING) {              /* what the client sends now is dropped */
    if (nread < 0) close_conn(c);           /* it has the whole answer, or is gone */
    return;
  }
  if (nread == UV_EOF && c->writes > 0) {   /* half-closed: the answer still goes out */
    uv_read_stop(h);
    c->eof = 1;
    c->state = FLUSHING;
    return;
  }
  if (nread < 0) { close_conn(c); return; }  /* EOF or error */
  if (nread == 0 || c->state != READING) return;
  c->last = uv_now(h->loop);
  feed(c, b->base, (size_t)nread);
}

/* Parses requests that arrived pipelined behind the last one. */
static void on_resume(uv_idle_t *h) {
  tide__http_server *s = h->data;
  while (s->resume_list) {
    tide__http_conn *c = s->resume_list;
    s->resume_list = c->resume_next;
    c->in_resume = 0;
    if (c->state != READING) continue;
    buf bytes = c->pending;
    c->pending = (buf){ 0 };
    uint64_t requests = s->stats.requests;
    feed(c, bytes.p, bytes.len);
    buf_free(&bytes);
    /* every byte parsed and no request made: read more (after a request,
     * tide__http_end resumes, maybe already: a handler may answer at once) */
    if (c->state == READING && s->stats.requests == requests)
      uv_read_start((uv_stream_t *)&c->handle, on_alloc, on_read);
  }
  uv_idle_stop(h);
}

void tide__http_end(tide__http_conn *c, int keep_alive) {
  if (c->state != HANDLING) return;
  tide__http_server *s = c->s;
  c->last = uv_now(c->handle.loop);
  body_release(c);                          /* (the request's pointers end here) */
  if (!keep_alive || !c->req.keep_alive || s->closing) {
    c->state = FLUSHING;
    if (c->writes == 0) linger(c);          /* (writes that ended may still be in the kernel) */
    return;
  }
  c->state = READING;
  http_parser_pause(&c->parser, 0);
  resume_reading(c);
}

/* ===== lingering ===== */

static void on_shut(uv_shutdown_t *r, int status) {
  tide__http_conn *c = r->data;             /* (still there: a close calls this back first) */
  if (status < 0 && status != UV_ECANCELED) close_conn(c);
}

/* Bytes the kernel holds for the client: not sent, or not acknowledged (-1: unknown). */
static long unsent(tide__http_conn *c) {
  uv_os_fd_t fd;
  int n;
  if (uv_fileno((uv_handle_t *)&c->handle, &fd) != 0 || ioctl(fd, TIOCOUTQ, &n) != 0) return -1;
  return n;
}

/* The last answer is all with the kernel: a FIN goes after it, and the
 * socket stays open until the client has it all.  Closed at once, a socket
 * with bytes still to send is an orphan that the kernel may reset while a
 * slow client's window is shut: the end of a large answer was lost (50 KB
 * of 6 MiB, one run in four, to a client reading 2 MiB/s).  What the client
 * sends meanwhile is dropped; its EOF closes the connection, or the sweep
 * does once the kernel holds nothing more for it, or nothing moved for
 * idle_ms. */
static void linger(tide__http_conn *c) {
  c->state = LINGERING;
  c->last = uv_now(c->handle.loop);
  c->queued = (size_t)-1;                   /* (the sweep's first look is progress) */
  c->shut.data = c;
  if (uv_shutdown(&c->shut, (uv_stream_t *)&c->handle, on_shut) != 0) { close_conn(c); return; }
  if (!c->eof) {
    int rc = uv_read_start((uv_stream_t *)&c->handle, on_alloc, on_read);
    if (rc != 0 && rc != UV_EALREADY) close_conn(c);
  }
}

/* Reads the next request (pipelined bytes first) once the last answer's
 * bytes have all gone to the kernel; until then the connection is READING
 * but `draining`, and on_written calls this again.  So a client that sends
 * requests and reads no answer costs one answer here, not one per request;
 * the sweep closes it once its answer has not moved for idle_ms. */
static void resume_reading(tide__http_conn *c) {
  tide__http_server *s = c->s;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->handle) > 0) { c->draining = 1; return; }
  c->draining = 0;
  if (c->pending.len > 0) {
    if (!c->in_resume) { c->in_resume = 1; c->resume_next = s->resume_list; s->resume_list = c; }
    uv_idle_start(&s->resume, on_resume);
  } else {
    uv_read_start((uv_stream_t *)&c->handle, on_alloc, on_read);
  }
}

/* Closes connections idle past idle_ms, not reading their response, or
 * sending a request for longer than idle_ms (a byte at a time keeps a
 * connection active, not its request alive).  A client reading an answer
 * is active while the bytes not yet with it shrink (libuv's queue and the
 * kernel's: the kernel takes more from libuv only once half its buffer
 * drained, a second or more for a slow reader).  A write ends only once
 * all of it went to the kernel, and an answer is one write: counted by
 * writes ended, a large answer read slowly but steadily was cut off. */
static void on_sweep(uv_timer_t *h) {
  tide__http_server *s = h->data;
  uint64_t now = uv_now(h->loop);
  tide__http_conn *c = s->conns;
  while (c) {
    tide__http_conn *next = c->next;
    if (c->state == LINGERING || c->writes > 0) {
      long kernel = unsent(c);
      if (c->state == LINGERING && kernel == 0) { close_conn(c); c = next; continue; }   /* all delivered */
      size_t left = uv_stream_get_write_queue_size((uv_stream_t *)&c->handle) + (kernel > 0 ? (size_t)kernel : 0);
      if (left < c->queued) c->last = now;
      c->queued = left;
    }
    if ((c->state == READING || c->state == FLUSHING || c->state == LINGERING) &&
        (now - c->last > s->opt.idle_ms || (c->state == READING && c->begun && now - c->begun > s->opt.idle_ms)))
      close_conn(c);
    c = next;
  }
}

static void peer_name(tide__http_conn *c) {
  struct sockaddr_storage a;
  int len = sizeof a;
  char ip[48] = "?";
  int port = 0;
  if (uv_tcp_getpeername(&c->handle, (struct sockaddr *)&a, &len) == 0) {
    if (a.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&a, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&a, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in *)&a)->sin_port);
    }
  }
  snprintf(c->req.remote, sizeof c->req.remote, "%s:%d", ip, port);
}

/* The connection to close to make room for a new one when all max_conns
 * are open: the one waiting for a request the longest (READING, nothing
 * pipelined, no answer still going out), or NULL.  Left open, max_conns
 * silent connections held the server for idle_ms each, and every other
 * client was closed unanswered; a client whose idle connection goes opens
 * another, as after a keep-alive timeout. */
static tide__http_conn *longest_waiting(tide__http_server *s) {
  tide__http_conn *oldest = NULL;
  for (tide__http_conn *c = s->conns; c; c = c->next) {
    if (c->state != READING || c->writes > 0 || c->draining || c->pending.len > 0) continue;
    uint64_t since = c->begun ? c->begun : c->last;
    if (oldest == NULL || since < (oldest->begun ? oldest->begun : oldest->last)) oldest = c;
  }
  return oldest;
}

static void on_connection(uv_stream_t *l, int status) {
  tide__http_server *s = l->data;
  if (status < 0 || s->closing) return;
  tide__http_conn *c = calloc(1, sizeof *c);
  if (c == NULL) return;
  uv_tcp_init(s->loop, &c->handle);
  c->state = CLOSING;                       /* until it is linked */
  if (uv_accept(l, (uv_stream_t *)&c->handle) != 0) { tide__close((uv_handle_t *)&c->handle, conn_free); return; }
  tide__http_conn *room = s->stats.open >= s->opt.max_conns ? longest_waiting(s) : NULL;
  if (room != NULL) close_conn(room);
  if (s->stats.open >= s->opt.max_conns) {
    s->stats.rejected++;
    tide__close((uv_handle_t *)&c->handle, conn_free);
    return;
  }
  if (!s->ref) uv_unref((uv_handle_t *)&c->handle);
  uv_tcp_nodelay(&c->handle, 1);
  c->s = s;
  c->state = READING;
  c->last = uv_now(s->loop);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  peer_name(c);
  c->next = s->conns;
  if (c->next) c->next->prev = c;
  s->conns = c;
  s->stats.open++;
  s->stats.connections++;
  if (uv_read_start((uv_stream_t *)&c->handle, on_alloc, on_read) != 0) close_conn(c);
}

/* ===== the server ===== */

int tide__http_listen(uv_loop_t *loop, const char *host, int port,
                      const tide__http_options *opt, tide__http_server **out) {
  struct sockaddr_storage addr;
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) return UV_EINVAL;
  tide__http_server *s = calloc(1, sizeof *s);
  if (s == NULL) return UV_ENOMEM;
  tide__ignore_sigpipe();                  /* a client gone mid-answer: EPIPE, not death */
  s->loop = loop;
  s->opt = *opt;
  if (s->opt.max_body == 0) s->opt.max_body = 1 << 20;
  if (s->opt.idle_ms == 0) s->opt.idle_ms = 10000;
  if (s->opt.max_conns == 0) s->opt.max_conns = 256;
  if (s->opt.max_buffered == 0) s->opt.max_buffered = (size_t)32 << 20;
  if (s->opt.max_buffered < s->opt.max_body) s->opt.max_buffered = s->opt.max_body;
  uv_tcp_init(loop, &s->listener);
  uv_timer_init(loop, &s->sweep);
  uv_idle_init(loop, &s->resume);
  s->listener.data = s->sweep.data = s->resume.data = s;
  s->handles_open = 3;
  uv_unref((uv_handle_t *)&s->listener);
  uv_unref((uv_handle_t *)&s->sweep);
  int rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&s->listener, 128, on_connection);
  if (rc != 0) { tide__http_close(s); return rc; }
  uv_timer_start(&s->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
  *out = s;
  return 0;
}

int tide__http_address(tide__http_server *s, char *host, size_t size, int *port) {
  struct sockaddr_storage a;
  int len = sizeof a;
  int rc = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&a, &len);
  if (rc != 0) return rc;
  if (a.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&a, host, size);
    *port = ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&a, host, size);
    *port = ntohs(((struct sockaddr_in *)&a)->sin_port);
  }
  return 0;
}

void tide__http_ref(tide__http_server *s, int on) {
  s->ref = on;
  if (s->closing) return;
  if (on) uv_ref((uv_handle_t *)&s->listener); else uv_unref((uv_handle_t *)&s->listener);
  for (tide__http_conn *c = s->conns; c; c = c->next) {
    if (on) uv_ref((uv_handle_t *)&c->handle); else uv_unref((uv_handle_t *)&c->handle);
  }
}

void tide__http_get_stats(const tide__http_server *s, tide__http_stats *st) { *st = s->stats; }

void *tide__http_conn_data(tide__http_conn *c) { return c->data; }
void tide__http_set_conn_data(tide__http_conn *c, void *data) { c->data = data; }
