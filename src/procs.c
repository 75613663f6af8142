/* procs.c — the parent's side of a child process: spawning, frames, stderr tail, kill and reap (see procs.h). */
#include "procs.h"
#include "loop.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define REAPED_CHECK_MS 50
#define FLUSH_RETRY_MS 10             /* how often a child's held-back stderr is offered again */
#define SENT_MAX 128               /* job ids remembered per child (process_prefetch is 64 at most) */

int tide__proc_in_host = 0;

/* Invariants: `open` counts the handles not yet closed (five once
 * spawned); the struct is freed by the close callback that brings it to
 * zero, and only once `gone` is set (no more events, no more calls).
 * While `held` bytes of the child's stderr wait for the parent's fd 2 to
 * take them, the child's stderr is not read (its own writes then wait:
 * back-pressure) and the `flush` timer offers them again. */
struct tide__proc {
  uv_process_t proc;
  uv_pipe_t chan;                  /* fd 3: frames                        */
  uv_pipe_t err;                   /* fd 2: stderr                        */
  uv_timer_t check;                /* after fd 3's end: is it reaped?     */
  uv_timer_t flush;                /* offers held-back stderr again       */
  tide__proc_cb cb;
  void *data;
  int pid;
  int open;
  int gone;                        /* exited or closed: no more events    */
  int ready;                       /* it sent its 'R' frame               */
  int broken;                      /* it broke the protocol: being killed */
  int dying;                       /* dead: its last bytes are being read  */
  /* The ids of the jobs sent and not done yet, oldest first: a child
   * answers its jobs in order, so a 'done' frame must name the oldest, and
   * is judged as soon as its id arrived (bytes a job wrote on fd 3 would
   * otherwise make a frame that swallows the real ones).  `ids_lost`: more
   * were sent than remembered, and the ids are not checked any more. */
  uint64_t sent[SENT_MAX];
  unsigned sent_head, sent_n;
  int ids_lost;
  char *in;                        /* bytes read from chan, not yet parsed */
  size_t in_len, in_cap;
  char tail[TIDE_PROC_TAIL];       /* the end of stderr                   */
  size_t tail_len;
  char rbuf[READ_CHUNK];           /* libuv reads into this               */
  char held[READ_CHUNK];           /* stderr the parent's fd 2 did not take yet */
  size_t held_off, held_len;
};

/* ===== bytes */

static void put_u32(char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i));
}

static uint64_t get_u64(const char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | (unsigned char)p[i];
  return v;
}

/* ===== writing frames */

typedef struct wreq {
  uv_write_t req;
  char data[];
} wreq;

static void on_written(uv_write_t *req, int status) {
  (void)status;                    /* a dead child: its exit event tells */
  free(req);
}

/* Writes a frame of `type` whose payload is the n (pointer, length)
 * pieces; a piece with a length of SIZE_MAX is written as a string (u32
 * length first; NULL pointer: the NULL marker). */
typedef struct piece { const void *p; size_t len; int is_str; } piece;

static int send_frame(tide__proc *p, char type, const piece *pieces, int n) {
  size_t total = 1;
  for (int i = 0; i < n; i++) total += pieces[i].len + (pieces[i].is_str ? 4 : 0);
  if (total > TIDE_PROC_FRAME_MAX) return UV_E2BIG;
  wreq *w = malloc(sizeof *w + 4 + total);
  if (w == NULL) return UV_ENOMEM;
  char *o = w->data;
  put_u32(o, (uint32_t)total);
  o[4] = type;
  o += 5;
  for (int i = 0; i < n; i++) {
    if (pieces[i].is_str) {
      put_u32(o, pieces[i].p ? (uint32_t)pieces[i].len : 0xffffffffu);
      o += 4;
    }
    if (pieces[i].len) memcpy(o, pieces[i].p, pieces[i].len);
    o += pieces[i].len;
  }
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)(4 + total));
  int rc = uv_write(&w->req, (uv_stream_t *)&p->chan, &buf, 1, on_written);
  if (rc != 0) free(w);
  return rc;
}

#define STR(s, n) ((piece){ (s), (s) ? (n) : 0, 1 })
#define RAW(s, n) ((piece){ (s), (n), 0 })

int tide__proc_submit(tide__proc *p, uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                      const char *args, size_t args_len) {
  if (p->gone) return UV_EPIPE;
  char head[9];
  put_u32(head, (uint32_t)id);
  put_u32(head + 4, (uint32_t)(id >> 32));
  head[8] = (char)(fn_is_name != 0);
  piece ps[] = { RAW(head, 9), STR(fn, fn_len), STR(args, args_len) };
  int rc = send_frame(p, 'J', ps, 3);
  if (rc != 0) return rc;
  if (p->sent_n == SENT_MAX) p->ids_lost = 1;
  else p->sent[(p->sent_head + p->sent_n++) % SENT_MAX] = id;
  return 0;
}

/* ===== closing */

static void on_closed(uv_handle_t *h) {
  tide__proc *p = h->data;
  if (--p->open == 0) {
    free(p->in);
    free(p);
  }
}

static void close_handles(tide__proc *p) {
  tide__close((uv_handle_t *)&p->proc, on_closed);
  tide__close((uv_handle_t *)&p->chan, on_closed);
  tide__close((uv_handle_t *)&p->err, on_closed);
  tide__close((uv_handle_t *)&p->check, on_closed);
  tide__close((uv_handle_t *)&p->flush, on_closed);
}

void tide__proc_close(tide__proc *p) {
  if (p->gone) return;
  p->gone = 1;
  kill(-p->pid, SIGKILL);          /* the child and whatever it started */
  close_handles(p);                /* takes it off libuv's list of children */
  while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR) {}   /* reaped: no zombie */
}

/* ===== reading: frames from fd 3, the tail of stderr */

static void deliver(tide__proc *p, const tide__proc_event *ev) {
  p->cb(p, ev, p->data);
}

/* Handles one frame from the child; -1 when it breaks the protocol. */
static int handle_frame(tide__proc *p, const char *f, size_t len) {
  tide__proc_event ev;
  if (tide__proc_decode(f, len, p->ready, &ev) != 0) return -1;
  if (ev.kind != TIDE_PROC_READY) {
    if (!p->ids_lost && p->sent_n > 0) {             /* checked on arrival: the oldest */
      p->sent_head = (p->sent_head + 1) % SENT_MAX;
      p->sent_n--;
    }
    deliver(p, &ev);
    return 0;
  }
  p->ready = 1;
  char *msg = ev.init_error ? strndup(ev.init_error, ev.init_error_len) : NULL;
  if (ev.init_error && msg == NULL) return -1;        /* out of memory: cannot tell it */
  ev.init_error = msg;
  deliver(p, &ev);
  free(msg);
  return 0;
}

/* Whether the frame that begins at f (n bytes of it arrived) is no 'done'
 * or, once its id arrived, a 'done' of the oldest job sent and not done. */
static int done_id_expected(const tide__proc *p, const char *f, size_t n) {
  if (n < 13 || f[4] != 'D' || p->ids_lost) return 1;
  return p->sent_n > 0 && get_u64(f + 5) == p->sent[p->sent_head];
}

/* Appends bytes read from fd 3 and handles every whole frame; a child
 * whose bytes make no sense is killed (its exit event follows). */
static void take_bytes(tide__proc *p, const char *data, size_t n) {
  if (p->broken) return;
  if (p->in_len + n > p->in_cap) {
    size_t cap = p->in_cap ? p->in_cap : READ_CHUNK;
    while (cap < p->in_len + n) cap *= 2;
    char *in = realloc(p->in, cap);
    if (in == NULL) { tide__proc_kill(p); return; }   /* cannot follow it any more */
    p->in = in;
    p->in_cap = cap;
  }
  memcpy(p->in + p->in_len, data, n);
  p->in_len += n;
  size_t pos = 0, size;
  while (!p->gone && !p->broken) {
    int whole = tide__proc_frame_size(p->in + pos, p->in_len - pos, &size);
    if (whole >= 0 && !done_id_expected(p, p->in + pos, p->in_len - pos)) whole = -1;
    if (whole == 0) break;
    /* p->in stays put during the callback: nothing reads until it returns. */
    if (whole < 0 || handle_frame(p, p->in + pos + 4, size - 4) != 0) {
      p->broken = 1;                                   /* nothing it sends counts any more */
      tide__proc_kill(p);
      break;
    }
    pos += size;
  }
  if (p->gone || p->broken) return;
  memmove(p->in, p->in + pos, p->in_len - pos);
  p->in_len -= pos;
}

static void keep_tail(tide__proc *p, const char *data, size_t n) {
  if (n >= TIDE_PROC_TAIL) {
    memcpy(p->tail, data + n - TIDE_PROC_TAIL, TIDE_PROC_TAIL);
    p->tail_len = TIDE_PROC_TAIL;
    return;
  }
  if (p->tail_len + n > TIDE_PROC_TAIL) {
    size_t drop = p->tail_len + n - TIDE_PROC_TAIL;
    memmove(p->tail, p->tail + drop, p->tail_len - drop);
    p->tail_len -= drop;
  }
  memcpy(p->tail + p->tail_len, data, n);
  p->tail_len += n;
}

/* Writes to the parent's fd 2 what it takes now, without waiting: at most
 * PIPE_BUF bytes a write, each after poll says it has room (a pipe or a
 * terminal with room for PIPE_BUF takes them whole; a file always has).
 * Returns how many bytes went, or n when fd 2 is broken (closed, its
 * reader gone: they would go nowhere, so they are dropped as fwrite's were).
 * The loop thread must never wait here: a parent whose stderr is read late
 * (a slow log collector, a pipe nobody drains yet) stood still for as long,
 * every task and timer with it (spec/review_process_spec.lua). */
static size_t write_ready(const char *data, size_t n) {
  size_t done = 0;
  while (done < n) {
    struct pollfd pfd = { .fd = 2, .events = POLLOUT, .revents = 0 };
    int r = poll(&pfd, 1, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 || (pfd.revents & (POLLERR | POLLNVAL))) return n;
    if (r == 0 || !(pfd.revents & POLLOUT)) break;   /* no room now */
    size_t k = n - done < PIPE_BUF ? n - done : PIPE_BUF;
    ssize_t w = write(2, data + done, k);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      return n;                                      /* EPIPE and the like: nowhere to go */
    }
    done += (size_t)w;
  }
  return done;
}

static void on_err(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);
static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);

/* The flush timer: the held-back bytes once more; when all went, the
 * child's stderr is read again. */
static void on_flush(uv_timer_t *t) {
  tide__proc *p = t->data;
  p->held_off += write_ready(p->held + p->held_off, p->held_len - p->held_off);
  if (p->held_off < p->held_len) return;
  p->held_off = p->held_len = 0;
  uv_timer_stop(&p->flush);
  if (!p->gone && uv_read_start((uv_stream_t *)&p->err, on_alloc, on_err) != 0)
    uv_read_stop((uv_stream_t *)&p->err);            /* (cannot fail on a live pipe) */
}

/* The child's stderr goes where the parent's goes, as fast as the
 * parent's fd 2 takes it: what does not go now is held back, and the
 * child's stderr is not read until it went (see write_ready).  Once the
 * child is dead (`gone`, or drained at its end) what fd 2 does not take
 * now is dropped: the end of it is in the exit event's tail anyway. */
static void take_stderr(tide__proc *p, const char *data, size_t n) {
  keep_tail(p, data, n);
  if (p->held_len > p->held_off) {                   /* at the end: what was held goes first */
    p->held_off += write_ready(p->held + p->held_off, p->held_len - p->held_off);
    if (p->held_off < p->held_len) return;           /* (dying: the rest is dropped) */
    p->held_off = p->held_len = 0;
  }
  size_t done = write_ready(data, n);
  if (done == n || p->gone || p->dying) return;
  memcpy(p->held, data + done, n - done);            /* n <= READ_CHUNK: one read */
  p->held_off = 0;
  p->held_len = n - done;
  uv_read_stop((uv_stream_t *)&p->err);
  uv_timer_start(&p->flush, on_flush, FLUSH_RETRY_MS, FLUSH_RETRY_MS);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  tide__proc *p = h->data;
  *buf = uv_buf_init(p->rbuf, sizeof p->rbuf);
}

static void on_reaped_check(uv_timer_t *t);

static void on_chan(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  tide__proc *p = s->data;
  if (n > 0) {
    take_bytes(p, buf->base, (size_t)n);
  } else if (n < 0) {                                /* EOF: the exit event follows */
    uv_read_stop(s);
    uv_timer_start(&p->check, on_reaped_check, REAPED_CHECK_MS, REAPED_CHECK_MS);
  }
}

static void on_err(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  tide__proc *p = s->data;
  if (n > 0) take_stderr(p, buf->base, (size_t)n);
  else if (n < 0) uv_read_stop(s);
}

/* Reads what is left in a pipe without waiting (the child is dead). */
static void drain(tide__proc *p, uv_pipe_t *pipe, void (*take)(tide__proc *, const char *, size_t)) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)pipe, &fd) != 0) return;
  for (int i = 0; i < 64 && !p->gone; i++) {        /* bounded: 4 MB at most */
    ssize_t n = read(fd, p->rbuf, sizeof p->rbuf);
    if (n > 0) { take(p, p->rbuf, (size_t)n); continue; }
    if (n < 0 && errno == EINTR) continue;
    break;                                           /* EOF, EAGAIN, or an error */
  }
}

/* The child is dead and reaped: take what it wrote last, then tell, then close. */
static void finish(tide__proc *p, int64_t status, int term_signal, int status_known) {
  /* Whatever the child started dies with it, however it ended (it may have
   * exited by itself, past its stop, with a `sleep` it ran still waiting).
   * Its pid names its process group, which is not given to another process
   * while any member lives, so this reaches only what it left behind. */
  kill(-p->pid, SIGKILL);
  drain(p, &p->chan, take_bytes);
  p->dying = 1;                                      /* nothing is held back from here on */
  drain(p, &p->err, take_stderr);
  if (p->gone) return;                               /* closed from an event */
  p->gone = 1;
  tide__proc_event ev = { .kind = TIDE_PROC_EXIT, .exit_status = status, .term_signal = term_signal,
                          .status_known = status_known, .tail = p->tail, .tail_len = p->tail_len };
  deliver(p, &ev);
  close_handles(p);
}

static void on_exit_cb(uv_process_t *h, int64_t status, int term_signal) {
  tide__proc *p = h->data;
  if (!p->gone) finish(p, status, term_signal, 1);
}

/* fd 3 ended, so the child is dead or dying, and libuv reaps it at its
 * SIGCHLD: the exit event comes at once.  Unless the host took SIGCHLD
 * (SIG_IGN, or a handler of its own that reaps every child): then nobody
 * tells libuv, and this check, REAPED_CHECK_MS after the end and every
 * REAPED_CHECK_MS until the exit is known, tells instead. */
static void on_reaped_check(uv_timer_t *t) {
  tide__proc *p = t->data;
  if (p->gone) return;
  int status;
  pid_t r;
  while ((r = waitpid(p->pid, &status, WNOHANG)) < 0 && errno == EINTR) {}
  if (r == 0) {                                      /* alive without its channel: of no use */
    kill(-p->pid, SIGKILL);
    return;
  }
  if (r == p->pid)                                   /* reaped here: libuv never will */
    finish(p, WIFEXITED(status) ? WEXITSTATUS(status) : 0, WIFSIGNALED(status) ? WTERMSIG(status) : 0, 1);
  else                                               /* ECHILD: reaped by someone else */
    finish(p, 0, 0, 0);
}

/* ===== starting and signalling */

int tide__proc_pid(const tide__proc *p) {
  return p->pid;
}

int tide__proc_stop(tide__proc *p, uint64_t id) {
  if (p->gone) return -ESRCH;
  union sigval v;
  v.sival_ptr = (void *)(uintptr_t)id;
  return sigqueue(p->pid, SIGUSR1, v) == 0 ? 0 : -errno;
}

int tide__proc_kill(tide__proc *p) {
  if (p->gone) return -ESRCH;
  return kill(-p->pid, SIGKILL) == 0 ? 0 : -errno;
}

void tide__proc_ref(tide__proc *p, int on) {
  if (p->gone) return;
  if (on) uv_ref((uv_handle_t *)&p->proc);      /* active until its exit is reaped */
  else uv_unref((uv_handle_t *)&p->proc);
}

static int send_config(tide__proc *p, const tide__proc_config *cfg) {
  char head[16];
  uint64_t limit = cfg->memory_limit;
  put_u32(head, (uint32_t)cfg->index);
  put_u32(head + 4, (uint32_t)getpid());
  put_u32(head + 8, (uint32_t)limit);
  put_u32(head + 12, (uint32_t)(limit >> 32));
  const char *path = cfg->path, *cpath = cfg->cpath, *init = cfg->init;
  piece ps[] = { RAW(head, 16), STR(path, path ? strlen(path) : 0),
                 STR(cpath, cpath ? strlen(cpath) : 0), STR(init, init ? strlen(init) : 0) };
  return send_frame(p, 'C', ps, 4);
}

int tide__proc_spawn(uv_loop_t *loop, const tide__proc_config *cfg, tide__proc_cb cb,
                     void *data, tide__proc **out, char *err, size_t errlen) {
  tide__ignore_sigpipe();                   /* (writing to a child that died) */
  tide__proc *p = calloc(1, sizeof *p);
  if (p == NULL) { snprintf(err, errlen, "out of memory"); return UV_ENOMEM; }
  p->cb = cb;
  p->data = data;
  p->proc.data = p->chan.data = p->err.data = p->check.data = p->flush.data = p;
  uv_pipe_init(loop, &p->chan, 0);                   /* cannot fail on unix */
  uv_pipe_init(loop, &p->err, 0);
  uv_timer_init(loop, &p->check);
  uv_unref((uv_handle_t *)&p->check);
  uv_timer_init(loop, &p->flush);
  uv_unref((uv_handle_t *)&p->flush);
  uv_stdio_container_t stdio[4];
  stdio[0].flags = UV_IGNORE;
  stdio[1].flags = UV_INHERIT_FD;
  stdio[1].data.fd = 1;
  stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[2].data.stream = (uv_stream_t *)&p->err;
  stdio[3].flags = UV_CREATE_PIPE | UV_READABLE_PIPE | UV_WRITABLE_PIPE;
  stdio[3].data.stream = (uv_stream_t *)&p->chan;
  uv_process_options_t opt = {
    .exit_cb = on_exit_cb, .file = cfg->file, .args = cfg->args,
    .flags = UV_PROCESS_DETACHED,                    /* a session: kill(-pid) reaches what it starts */
    .stdio_count = 4, .stdio = stdio,
  };
  p->open = 5;
  int rc = uv_spawn(loop, &p->proc, &opt);
  if (rc != 0) {
    snprintf(err, errlen, "cannot start %s: %s", cfg->file, uv_strerror(rc));
    p->gone = 1;
    close_handles(p);
    return rc;
  }
  p->pid = p->proc.pid;
  uv_unref((uv_handle_t *)&p->chan);                /* the child's own handle keeps the loop */
  uv_unref((uv_handle_t *)&p->err);
  if ((rc = send_config(p, cfg)) != 0 ||
      (rc = uv_read_start((uv_stream_t *)&p->chan, on_alloc, on_chan)) != 0 ||
      (rc = uv_read_start((uv_stream_t *)&p->err, on_alloc, on_err)) != 0) {
    snprintf(err, errlen, "cannot talk to process %d: %s", p->pid, uv_strerror(rc));
    tide__proc_close(p);
    return rc;
  }
  *out = p;
  return 0;
}
