/* http.h — a small HTTP/1.1 server on a libuv loop; requests are parsed by http-parser.
 *
 * No Lua here.  A server listens on one TCP address and hands each complete
 * request (method, URL, headers with lower-case names, body) to `on_request`.
 * The owner answers with tide__http_write (any number of times) and then
 * tide__http_end; only then, and once that answer's bytes have all gone to
 * the kernel, is the next request on that connection parsed (pipelined bytes
 * wait in a buffer, and reading stops meanwhile: a client that reads no
 * answer holds at most one).  A client that half-closes after its request
 * still gets the whole answer.  A connection's last answer is followed by a
 * FIN, and the socket stays open until the client has it all (http.c,
 * linger).  The bytes written are the whole response,
 * head included: this file frames nothing.
 *
 * Where a connection can be (each is in exactly one state):
 *   READING   the parser is fed from the socket; no request is out
 *   HANDLING  a request was handed to on_request; reading is stopped
 *   CLOSING   uv_close was called; on_conn_closed has run, its memory goes
 *             in the close callback
 * A request whose head or body is too large, or that does not parse, is
 * answered here (400, 413, 431) and its connection closed: on_request never
 * sees it.  Connections idle past `idle_ms`, or whose request takes longer
 * than that to arrive (however steadily its bytes trickle in), are closed by
 * a sweep timer that runs once a second.
 *
 * Handles: the listener, the sweep timer, an idle handle that resumes
 * pipelined requests, and one uv_tcp_t per connection.  All are unreferenced
 * (they never keep the loop alive) unless tide__http_ref(s, 1) was called;
 * tide__http_close closes every one of them and frees the server in the last
 * close callback.  Only call these from the loop thread.
 */
#ifndef TIDE_HTTP_H
#define TIDE_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define TIDE_HTTP_MAX_HEADERS 64

typedef struct tide__http_server tide__http_server;
typedef struct tide__http_conn tide__http_conn;

typedef struct { const char *p; size_t len; } tide__http_str;

typedef struct {
  const char *method;                       /* "GET", "POST", ... */
  tide__http_str url;                       /* as sent: path and query   */
  int nheaders;
  tide__http_str names[TIDE_HTTP_MAX_HEADERS];   /* lower-case */
  tide__http_str values[TIDE_HTTP_MAX_HEADERS];
  tide__http_str body;
  int keep_alive;                           /* the client allows another request */
  int http_minor;                           /* 1.0 or 1.1 */
  char remote[64];                          /* "127.0.0.1:51234" */
} tide__http_request;

typedef struct {
  size_t max_body;        /* bytes; a larger body gets 413 (default 1 MiB)      */
  unsigned idle_ms;       /* keep-alive idle and request read time (default 10 s) */
  unsigned max_conns;     /* more connections are closed at once (default 256)  */
  size_t max_buffered;    /* bytes of request bodies held at once, all connections
                           * together; a body past it gets 503 (default 32 MiB,
                           * at least max_body) */
  /* A request: valid until tide__http_end (the pointers are into the
   * connection's buffers).  `data` is tide__http_listen's. */
  void (*on_request)(tide__http_conn *c, const tide__http_request *req, void *data);
  /* The connection closes (client gone, error, server closed) while a
   * request is out: its owner must forget `c`. */
  void (*on_conn_closed)(tide__http_conn *c, void *data);
  void *data;
} tide__http_options;

typedef struct {
  uint64_t connections;   /* accepted so far           */
  uint64_t requests;      /* handed to on_request      */
  uint64_t rejected;      /* answered here: 4xx, or too many connections */
  unsigned open;          /* connections open now      */
  size_t buffered;        /* bytes of request bodies held now (max_buffered) */
} tide__http_stats;

/* Starts listening on host:port (an IPv4 or IPv6 literal; port 0: any free
 * one).  Returns 0 and *out, or a negative UV_E* code. */
int tide__http_listen(uv_loop_t *loop, const char *host, int port,
                      const tide__http_options *opt, tide__http_server **out);

/* The address listened on ("127.0.0.1", 8080).  0 or a UV_E* code. */
int tide__http_address(tide__http_server *s, char *host, size_t size, int *port);

/* Closes the listener and every connection (requests out are dropped:
 * on_conn_closed runs for each).  The server is freed later, on the loop. */
void tide__http_close(tide__http_server *s);

/* 1: the listener keeps the loop alive; 0: it does not (the default). */
void tide__http_ref(tide__http_server *s, int on);

void tide__http_get_stats(const tide__http_server *s, tide__http_stats *st);

/* Queues bytes of the response to the request out on `c` (copied).
 * 0, or a UV_E* code (the connection is closing). */
int tide__http_write(tide__http_conn *c, const char *data, size_t len);

/* The response is complete: with keep_alive, the next request is read;
 * otherwise the connection closes once the bytes are sent. */
void tide__http_end(tide__http_conn *c, int keep_alive);

/* The connection's owner data (set by the owner, NULL at first). */
void *tide__http_conn_data(tide__http_conn *c);
void tide__http_set_conn_data(tide__http_conn *c, void *data);

#endif
