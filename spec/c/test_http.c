/* test_http.c — the HTTP server mechanism alone, on a loop of its own: answers, pipelining,
 * a server closed with a request out, and nothing left open or leaked afterwards (TAP). */
#include <stdlib.h>
#include <string.h>

#include "http.h"

#include "tap.h"

typedef struct {
  int requests, closed_out;
  int hold;                        /* do not answer: leave the request out */
  char last_url[64], last_body[64];
} server_state;

static void on_request(tide__http_conn *c, const tide__http_request *req, void *data) {
  server_state *st = data;
  st->requests++;
  snprintf(st->last_url, sizeof st->last_url, "%.*s", (int)req->url.len, req->url.p);
  snprintf(st->last_body, sizeof st->last_body, "%.*s", (int)req->body.len, req->body.p);
  if (st->hold) return;
  char resp[256];
  int n = snprintf(resp, sizeof resp, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n%.*s",
                   req->url.len, (int)req->url.len, req->url.p);
  tide__http_write(c, resp, (size_t)n);
  tide__http_end(c, req->keep_alive);
}

static void on_conn_closed(tide__http_conn *c, void *data) {
  (void)c;
  ((server_state *)data)->closed_out++;
}

/* ===== a client on the same loop ===== */

typedef struct {
  uv_tcp_t tcp;
  uv_connect_t connect;
  uv_write_t write;
  const char *send;
  char got[4096];
  size_t len;
  int eof;
  tide__http_server *close_when_read;   /* closes this server once bytes arrive */
} client;

static void alloc(uv_handle_t *h, size_t n, uv_buf_t *b) {
  (void)n;
  client *cl = h->data;
  *b = uv_buf_init(cl->got + cl->len, (unsigned)(sizeof cl->got - cl->len - 1));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  (void)b;
  client *cl = s->data;
  if (n < 0) { cl->eof = 1; uv_close((uv_handle_t *)s, NULL); return; }
  cl->len += (size_t)n;
  cl->got[cl->len] = 0;
}

static void on_connect(uv_connect_t *r, int status) {
  client *cl = r->data;
  if (status != 0) { cl->eof = 1; uv_close((uv_handle_t *)&cl->tcp, NULL); return; }
  uv_buf_t b = uv_buf_init((char *)cl->send, (unsigned)strlen(cl->send));
  uv_write(&cl->write, (uv_stream_t *)&cl->tcp, &b, 1, NULL);
  uv_read_start((uv_stream_t *)&cl->tcp, alloc, on_read);
}

static void start_client(uv_loop_t *loop, client *cl, int port, const char *send) {
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", port, &a);
  memset(cl, 0, sizeof *cl);
  cl->send = send;
  uv_tcp_init(loop, &cl->tcp);
  cl->tcp.data = cl->connect.data = cl;
  uv_tcp_connect(&cl->connect, &cl->tcp, (struct sockaddr *)&a, on_connect);
}

/* Runs the loop until the client has seen `want` in its bytes or EOF, at most ~2 s. */
static void run_until(uv_loop_t *loop, client *cl, const char *want, server_state *st, int requests) {
  for (int i = 0; i < 2000; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    if (cl->eof || (want && strstr(cl->got, want)) || (requests && st->requests >= requests)) return;
    uv_sleep(1);
  }
}

static tide__http_server *serve(uv_loop_t *loop, server_state *st, int *port) {
  tide__http_options opt = { .max_body = 64, .on_request = on_request, .on_conn_closed = on_conn_closed, .data = st };
  tide__http_server *s = NULL;
  int rc = tide__http_listen(loop, "127.0.0.1", 0, &opt, &s);
  ok(rc == 0, "listens on 127.0.0.1, a free port (%s)", rc ? uv_strerror(rc) : "ok");
  char host[64];
  tide__http_address(s, host, sizeof host, port);
  return s;
}

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  server_state st = { 0 };
  int port;
  client cl;

  tide__http_server *s = serve(&loop, &st, &port);
  start_client(&loop, &cl, port, "GET /one HTTP/1.1\r\n\r\nPOST /two HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                                  "GET /three HTTP/1.1\r\nConnection: close\r\n\r\n");
  run_until(&loop, &cl, NULL, &st, 0);
  ok(st.requests == 3, "three pipelined requests handed over (%d)", st.requests);
  ok(strcmp(st.last_body, "") == 0 && strstr(cl.got, "\r\n\r\n/one") && strstr(cl.got, "\r\n\r\n/two") &&
     strstr(cl.got, "\r\n\r\n/three"), "each answered, in order");
  ok(strstr(cl.got, "/one") < strstr(cl.got, "/two") && strstr(cl.got, "/two") < strstr(cl.got, "/three"),
     "in the order they were sent");
  ok(cl.eof, "Connection: close ends the connection after the answer");

  start_client(&loop, &cl, port, "POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
  run_until(&loop, &cl, NULL, &st, 0);
  ok(strncmp(cl.got, "HTTP/1.1 413 ", 13) == 0, "a body over max_body: 413 from the mechanism");
  ok(st.requests == 3, "and the owner never saw it");

  start_client(&loop, &cl, port, "NOT HTTP\r\n\r\n");
  run_until(&loop, &cl, NULL, &st, 0);
  ok(strncmp(cl.got, "HTTP/1.1 400 ", 13) == 0, "garbage: 400");

  st.hold = 1;
  start_client(&loop, &cl, port, "GET /held HTTP/1.1\r\n\r\n");
  run_until(&loop, &cl, NULL, &st, 4);
  ok(st.requests == 4 && strcmp(st.last_url, "/held") == 0, "a request left out, unanswered");
  tide__http_stats stats;
  tide__http_get_stats(s, &stats);
  ok(stats.open == 1, "one connection open (%u)", stats.open);
  tide__http_close(s);
  ok(st.closed_out == 1, "closing the server tells the owner the request out is gone");
  run_until(&loop, &cl, NULL, &st, 0);
  ok(cl.eof && cl.len == 0, "the client sees the connection closed, unanswered");

  tide__http_server *dup = NULL;
  tide__http_server *s2 = serve(&loop, &st, &port);
  tide__http_options opt = { .on_request = on_request, .data = &st };
  int rc = tide__http_listen(&loop, "127.0.0.1", port, &opt, &dup);
  ok(rc == UV_EADDRINUSE, "a second server on the same port: EADDRINUSE (%s)", uv_strerror(rc));
  ok(tide__http_listen(&loop, "no-such-host", 0, &opt, &dup) == UV_EINVAL, "a host that is no IP: EINVAL");
  tide__http_close(s2);

  uv_run(&loop, UV_RUN_DEFAULT);                /* the close callbacks */
  ok(uv_loop_close(&loop) == 0, "nothing left open on the loop");
  return tap_done();
}
