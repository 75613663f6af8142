/* tap.h — the Test Anything Protocol for the C tests: ok(cond, fmt, ...) and tap_done(). */
#ifndef TIDE_TAP_H
#define TIDE_TAP_H

#include <stdarg.h>
#include <stdio.h>

static int tests, failed;

/* Prints "ok N - ..." or "not ok N - ..."; returns cond. */
__attribute__((format(printf, 2, 3)))
static int ok(int cond, const char *fmt, ...) {
  va_list ap;
  printf("%sok %d - ", cond ? "" : "not ", ++tests);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
  failed += !cond;
  return cond;
}

/* Prints the plan; the exit status for main. */
static int tap_done(void) {
  printf("1..%d\n", tests);
  return failed != 0;
}

#endif
