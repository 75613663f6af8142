/* bench/http_parsers.c — parsing one browser request: http-parser (what tide links) against
 * picohttpparser (inside Debian's libh2o, the other candidate).  Built and run by
 * bench/run.sh only when libh2o-dev is installed (it is not a dependency of tide). */
#include <http_parser.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

struct phr_header { const char *name; size_t name_len; const char *value; size_t value_len; };
int phr_parse_request(const char *buf, size_t len, const char **method, size_t *method_len,
                      const char **path, size_t *path_len, int *minor_version,
                      struct phr_header *headers, size_t *num_headers, size_t last_len);

static const char REQ[] =
  "GET /jobs?queue=default&status=discarded HTTP/1.1\r\n"
  "Host: 127.0.0.1:8080\r\nConnection: keep-alive\r\n"
  "sec-ch-ua: \"Chromium\";v=\"156\", \"Not-A.Brand\";v=\"24\"\r\nsec-ch-ua-mobile: ?0\r\n"
  "sec-ch-ua-platform: \"Linux\"\r\nUpgrade-Insecure-Requests: 1\r\n"
  "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36\r\n"
  "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
  "Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n"
  "Referer: http://127.0.0.1:8080/\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
  "Cookie: tide_token_8080=7f3a9c2e5b1d4a6f8e0c2b4d6f8a0c2e\r\n\r\n";

static int fields;
static int on_data(http_parser *p, const char *at, size_t n) { (void)p; (void)at; (void)n; fields++; return 0; }
static int on_done(http_parser *p) { (void)p; return 0; }

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void) {
  enum { N = 1000000 };
  size_t len = sizeof REQ - 1;
  http_parser_settings s = { .on_url = on_data, .on_header_field = on_data, .on_header_value = on_data,
                             .on_headers_complete = on_done, .on_message_complete = on_done };
  for (int run = 0; run < 3; run++) {
    double t0 = now();
    for (int i = 0; i < N; i++) {
      http_parser p;
      http_parser_init(&p, HTTP_REQUEST);
      if (http_parser_execute(&p, &s, REQ, len) != len) { puts("http-parser failed"); return 1; }
    }
    double t1 = now();
    for (int i = 0; i < N; i++) {
      const char *m, *path;
      size_t ml, pl, nh = 32;
      int minor;
      struct phr_header h[32];
      if (phr_parse_request(REQ, len, &m, &ml, &path, &pl, &minor, h, &nh, 0) != (int)len) { puts("pico failed"); return 1; }
    }
    double t2 = now();
    printf("%zu-byte request: http-parser %.0f ns, picohttpparser %.0f ns\n", len, (t1 - t0) / N * 1e9, (t2 - t1) / N * 1e9);
  }
  return 0;
}
