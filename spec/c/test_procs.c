/* test_procs.c — the parent's side of a child process, with shell scripts as children (TAP). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "procs.h"

#include "tap.h"

/* What a child's events said. */
typedef struct seen {
  int ready, done, exits;
  int init_error_null;
  uint64_t id;
  int ok_flag;
  char result[64], tail[TIDE_PROC_TAIL + 1];
  int trace_null;
  int64_t status;
  int signal, known;
} seen;

static void on_event(tide__proc *p, const tide__proc_event *ev, void *data) {
  (void)p;
  seen *s = data;
  switch (ev->kind) {
  case TIDE_PROC_READY:
    s->ready++;
    s->init_error_null = ev->init_error == NULL;
    break;
  case TIDE_PROC_DONE:
    s->done++;
    s->id = ev->id;
    s->ok_flag = ev->ok;
    snprintf(s->result, sizeof s->result, "%.*s", (int)ev->result_len, ev->result);
    s->trace_null = ev->trace == NULL;
    break;
  case TIDE_PROC_EXIT:
    s->exits++;
    s->status = ev->exit_status;
    s->signal = ev->term_signal;
    s->known = ev->status_known;
    snprintf(s->tail, sizeof s->tail, "%.*s", (int)ev->tail_len, ev->tail);
    break;
  }
}

/* Runs `script` (sh -c) as a child until its exit event and its handles are closed. */
static tide__proc *start(uv_loop_t *loop, const char *script, seen *s) {
  char *args[] = { "sh", "-c", (char *)script, NULL };
  tide__proc_config cfg = { .file = "/bin/sh", .args = args, .index = 1, .path = "p", .cpath = "c" };
  tide__proc *p = NULL;
  char err[256];
  memset(s, 0, sizeof *s);
  if (tide__proc_spawn(loop, &cfg, on_event, s, &p, err, sizeof err) != 0) {
    ok(0, "spawn: %s", err);
    return NULL;
  }
  return p;
}

static void exit_status_and_tail(uv_loop_t *loop) {
  seen s;
  start(loop, "echo last words >&2; exit 3", &s);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 1 && s.status == 3 && s.signal == 0 && s.known, "an exit comes once, with its status (%lld)",
     (long long)s.status);
  ok(strcmp(s.tail, "last words\n") == 0, "with the end of its stderr (%zu bytes)", strlen(s.tail));
}

static void death_by_signal(uv_loop_t *loop) {
  seen s;
  start(loop, "kill -SEGV $$", &s);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 1 && s.signal == SIGSEGV, "a death by a signal names it (%d)", s.signal);
}

#define READY_FRAME "printf '\\005\\000\\000\\000R\\377\\377\\377\\377' >&3; "
#define DONE_7_FRAME "printf '\\023\\000\\000\\000D\\007\\000\\000\\000\\000\\000\\000\\000\\001\\001\\000\\000\\000x" \
                     "\\377\\377\\377\\377' >&3"

/* A child that speaks the protocol by hand: ready, then the result of job 7
 * (sent to it first: a child answers only the jobs it was sent, in order). */
static void frames(uv_loop_t *loop) {
  seen s;
  tide__proc *p = start(loop, READY_FRAME DONE_7_FRAME, &s);
  if (p) tide__proc_submit(p, 7, "f", 1, 1, "a", 1);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.ready == 1 && s.init_error_null, "a ready frame without an init error");
  ok(s.done == 1 && s.id == 7 && s.ok_flag && strcmp(s.result, "x") == 0 && s.trace_null,
     "a done frame: id, status, result, no trace");
  ok(s.exits == 1 && s.status == 0, "then its exit");
}

static void nonsense_is_killed(uv_loop_t *loop) {
  seen s;
  start(loop, "printf '\\001\\000\\000\\000Z' >&3; sleep 100", &s);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 1 && s.signal == SIGKILL, "a frame that makes no sense gets the child killed (%d)", s.signal);
  start(loop, READY_FRAME DONE_7_FRAME "; sleep 100", &s);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 1 && s.signal == SIGKILL && s.done == 0,
     "so does a done for a job it was not sent (%d)", s.signal);
}

static void kill_takes_the_group(uv_loop_t *loop) {
  seen s;
  tide__proc *p = start(loop, "sleep 100 & wait", &s);
  int pid = tide__proc_pid(p);
  usleep(100 * 1000);                        /* the grandchild starts */
  ok(tide__proc_kill(p) == 0, "kill sends SIGKILL to the process group");
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 1 && s.signal == SIGKILL, "the child dies of it");
  int gone = 0;
  for (int i = 0; i < 200 && !gone; i++) {   /* the grandchild, reparented, is reaped by init */
    gone = kill(-pid, 0) != 0 && errno == ESRCH;
    if (!gone) usleep(10 * 1000);
  }
  ok(gone, "and so does what it started");
}

static void close_reaps(uv_loop_t *loop) {
  seen s;
  tide__proc *p = start(loop, "sleep 100", &s);
  int pid = tide__proc_pid(p);
  tide__proc_close(p);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(s.exits == 0, "close delivers no event");
  ok(waitpid(pid, NULL, WNOHANG) < 0 && errno == ECHILD, "and leaves no zombie (reaped)");
}

/* A host that took SIGCHLD (here SIG_IGN once the child runs: the kernel
 * reaps, libuv never hears): the end of fd 3 still brings the exit, its
 * status unknown. */
static void reaped_elsewhere(uv_loop_t *loop) {
  seen s;
  struct sigaction ign, old;
  memset(&ign, 0, sizeof ign);
  ign.sa_handler = SIG_IGN;
  start(loop, "sleep 0.2; exit 4", &s);
  sigaction(SIGCHLD, &ign, &old);            /* after the spawn: uv_spawn installs libuv's handler */
  uv_run(loop, UV_RUN_DEFAULT);
  sigaction(SIGCHLD, &old, NULL);
  ok(s.exits == 1 && !s.known && s.signal == 0, "a child reaped by someone else still gives its exit, status unknown "
     "(%d exits, known %d, signal %d)", s.exits, s.known, s.signal);
}

static void spawn_failure(uv_loop_t *loop) {
  char *args[] = { "no-such-program-tide", NULL };
  tide__proc_config cfg = { .file = "no-such-program-tide", .args = args };
  tide__proc *p = NULL;
  seen s;
  char err[256];
  int rc = tide__proc_spawn(loop, &cfg, on_event, &s, &p, err, sizeof err);
  uv_run(loop, UV_RUN_DEFAULT);
  ok(rc == UV_ENOENT && p == NULL, "a program that cannot start is an error (%s)", err);
}

/* A result a frame's u32 length cannot give is refused before it is sent
 * (the child then sends an error in its place), at the exact bound. */
static void done_length(void) {
  size_t fixed = 1 + 9 + 4 + 4, max = TIDE_PROC_FRAME_MAX;
  ok(tide__proc_done_length(1, SIZE_MAX) == fixed + 1, "a done frame's length counts type, head and lengths");
  ok(tide__proc_done_length(3, 5) == fixed + 8, "and the trace when there is one");
  ok(tide__proc_done_length(max - fixed, SIZE_MAX) == max, "a result that fills a frame exactly fits");
  ok(tide__proc_done_length(max - fixed + 1, SIZE_MAX) == 0, "one byte more does not");
  ok(tide__proc_done_length(max - fixed - 10, 11) == 0, "nor does a trace that tips it over");
  ok(tide__proc_done_length((size_t)5 << 30, SIZE_MAX) == 0, "a 5 GiB result is refused, not cut to its low bits");
  ok(tide__proc_done_length(SIZE_MAX - 3, 7) == 0, "lengths near SIZE_MAX do not wrap around");
}

int main(void) {
  done_length();
  uv_loop_t loop;
  uv_loop_init(&loop);
  exit_status_and_tail(&loop);
  death_by_signal(&loop);
  frames(&loop);
  nonsense_is_killed(&loop);
  kill_takes_the_group(&loop);
  close_reaps(&loop);
  reaped_elsewhere(&loop);
  spawn_failure(&loop);
  ok(uv_loop_close(&loop) == 0, "no handle is left open");
  return tap_done();
}
