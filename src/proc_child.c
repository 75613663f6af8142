/* proc_child.c — the child's side of process mode: setup, the parent watch, and the job loop (see procs.h). */
#include "procs.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <lauxlib.h>

#include "codec.h"
#include "worker.h"

#define CHAN 3                     /* the socketpair's end: fd 3 */
#define AS_SLACK (64u << 20)       /* address space beyond the limit: code, stacks, JIT areas */

static tide__worker child;         /* this process runs one worker */
static tide__pool_config child_cfg;

/* The ids of the last STOP_RING stop requests: a job the parent sent ahead
 * (process_prefetch) and then gave up on is skipped when its turn comes. */
#define STOP_RING 64
static _Atomic uint64_t stop_ring[STOP_RING];
static _Atomic unsigned stop_next;

/* What fd 3 brought and no frame took yet (frames are read from here, so
 * jobs sent ahead cost no read each). */
static char *in_buf;
static size_t in_len, in_pos, in_cap;

/* ===== plumbing */

static int write_full(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static uint32_t get_u32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i));
}

/* Makes sure `n` bytes are buffered after in_pos, reading as much as fd 3
 * has (one read may bring several frames).  -1 at the end or on failure. */
static int buffer_at_least(size_t n) {
  if (in_pos > 0 && in_pos == in_len) in_pos = in_len = 0;
  while (in_len - in_pos < n) {
    if (in_pos + n > in_cap) {
      if (in_pos > 0) {                              /* room first: drop what was taken */
        memmove(in_buf, in_buf + in_pos, in_len - in_pos);
        in_len -= in_pos;
        in_pos = 0;
      }
      if (n + 65536 > in_cap) {
        char *b = realloc(in_buf, n + 65536);
        if (b == NULL) return -1;
        in_buf = b;
        in_cap = n + 65536;
      }
    }
    ssize_t r = read(CHAN, in_buf + in_len, in_cap - in_len);
    if (r < 0 && errno == EINTR) continue;           /* a stop request between jobs */
    if (r <= 0) return -1;
    in_len += (size_t)r;
  }
  return 0;
}

/* Reads one frame: its bytes (type first) in a malloc'd buffer, or NULL at
 * the end (the parent closed its side) or on nonsense. */
static char *read_frame(size_t *len) {
  if (buffer_at_least(4) != 0) return NULL;
  uint32_t n = get_u32((const unsigned char *)in_buf + in_pos);
  if (n == 0 || n > 0xfffffff0u || buffer_at_least(4 + (size_t)n) != 0) return NULL;
  char *f = malloc(n);
  if (f == NULL) return NULL;
  memcpy(f, in_buf + in_pos + 4, n);
  in_pos += 4 + (size_t)n;
  *len = n;
  return f;
}

/* A string of a frame at *p (u32 length, bytes; 0xffffffff: NULL), copied
 * NUL-terminated into *out.  -1 past the end or out of memory. */
static int take_str(const char **p, const char *end, char **out, size_t *out_len) {
  if (end - *p < 4) return -1;
  uint32_t n = get_u32((const unsigned char *)*p);
  *p += 4;
  *out = NULL;
  if (out_len) *out_len = 0;
  if (n == 0xffffffffu) return 0;
  if ((size_t)(end - *p) < n) return -1;
  if ((*out = malloc((size_t)n + 1)) == NULL) return -1;
  memcpy(*out, *p, n);
  (*out)[n] = '\0';
  *p += n;
  if (out_len) *out_len = n;
  return 0;
}

/* Sends one frame: type, then (pointer, length) pieces; a piece marked as a
 * string goes with its u32 length first (NULL: the NULL marker). */
static int send_frame(char type, const char *head, size_t head_len,
                      const char *s1, size_t n1, const char *s2, size_t n2, int nstr) {
  size_t total = 1 + head_len + (size_t)nstr * 4 + (s1 ? n1 : 0) + (s2 ? n2 : 0);
  char *f = malloc(4 + total);
  if (f == NULL) return -1;
  char *o = f;
  put_u32(o, (uint32_t)total);
  o[4] = type;
  o += 5;
  memcpy(o, head, head_len);
  o += head_len;
  const char *ss[2] = { s1, s2 };
  size_t ns[2] = { n1, n2 };
  for (int i = 0; i < nstr; i++) {
    put_u32(o, ss[i] ? (uint32_t)ns[i] : 0xffffffffu);
    o += 4;
    if (ss[i] && ns[i]) { memcpy(o, ss[i], ns[i]); o += ns[i]; }
  }
  int rc = write_full(CHAN, f, 4 + total);
  free(f);
  return rc;
}

/* ===== never outliving the parent, never holding its files */

/* Closes every descriptor above fd 3: whatever the exec let through (a
 * listening socket, a store's connection opened without CLOEXEC). */
static void close_inherited(void) {
#ifdef SYS_close_range
  if (syscall(SYS_close_range, 4u, ~0u, 0u) == 0) return;
#endif
  long max = sysconf(_SC_OPEN_MAX);
  if (max < 0 || max > 65536) max = 65536;
  for (int fd = 4; fd < max; fd++) close(fd);
}

/* Ends the child and everything it started (its process group: the child
 * leads a session of its own), so that a `sleep` a job ran does not outlive
 * a parent that is gone.  Async-signal-safe. */
static void end_group(void) {
  kill(0, SIGKILL);
  _exit(0);
}

/* PDEATHSIG: the parent died. */
static void on_parent_death(int sig) {
  (void)sig;
  end_group();
}

/* The watch: a thread that waits for the parent's end of fd 3 to close
 * (the parent exited, or closed the pool) and ends the process then. */
static void *watch_parent(void *arg) {
  (void)arg;
  struct pollfd pf = { .fd = CHAN, .events = POLLRDHUP };
  for (;;) {
    int r = poll(&pf, 1, -1);
    if (r > 0 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) end_group();
    if (r < 0 && errno != EINTR) end_group();
  }
  return NULL;
}

static int start_watch(void) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);        /* the watch takes no signal: SIGUSR1 is the job's */
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t th;
  int rc = pthread_create(&th, &attr, watch_parent, NULL);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

/* SIGUSR1 from the parent (sigqueue, the job's id as value): asks the job
 * to stop.  Only an atomic store: the worker's stop hook does the rest. */
static void on_stop_request(int sig, siginfo_t *si, void *uc) {
  (void)sig;
  (void)uc;
  if (si->si_code != SI_QUEUE) return;
  uint64_t id = (uint64_t)(uintptr_t)si->si_value.sival_ptr;
  atomic_store(&stop_ring[atomic_fetch_add(&stop_next, 1) % STOP_RING], id);
  atomic_store(&child.stop, id);
}

static int stopped_before_start(uint64_t id) {
  for (int i = 0; i < STOP_RING; i++)
    if (atomic_load(&stop_ring[i]) == id) return 1;
  return 0;
}

/* The address space the process has now, in bytes (0 if unknown). */
static size_t address_space(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long pages = 0;
  if (f == NULL) return 0;
  if (fscanf(f, "%lu", &pages) != 1) pages = 0;
  fclose(f);
  return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

/* ===== the process-side `tide`: the thread-side one, named for a process (tide.process: its pid) */

static const char PROCESS_TIDE[] =
  "local tide, pid = ...\n"
  "tide.thread, tide.process = nil, pid\n"
  "local select, tostring, concat, stderr = select, tostring, table.concat, io.stderr\n"
  "local prefix = ('tide[process %d]:'):format(pid)\n"
  "tide.log = function(...)\n"
  "  local parts = { prefix }\n"
  "  for i = 1, select('#', ...) do parts[i + 1] = tostring((select(i, ...))) end\n"
  "  stderr:write(concat(parts, ' ') .. '\\n')\n"
  "end\n";

static int rename_tide(lua_State *L) {
  if (luaL_loadbuffer(L, PROCESS_TIDE, sizeof PROCESS_TIDE - 1, "=tide.process") != 0) lua_error(L);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "tide");
  lua_remove(L, -2);
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_call(L, 2, 0);
  return 0;
}

/* ===== setup and the job loop */

/* A result (or trace) a frame cannot hold becomes the job's error, rather
 * than a frame whose u32 length would be cut and the stream lost. */
static void too_big_to_send(tide__job *job) {
  char msg[160];
  int n = snprintf(msg, sizeof msg, "the process task's result is too large to send: %zu bytes (at most %u)",
                   job->result_len, (unsigned)TIDE_PROC_FRAME_MAX - 64);
  tide_buf buf;
  tide__buf_init(&buf);
  tide__encode_string(&buf, msg, (size_t)n);
  tide__job_set_result(job, &buf);
  tide__buf_free(&buf);
  free(job->trace);
  job->trace = NULL;
  job->status = TIDE_JOB_ERROR;
}

/* Reads the config frame and applies it; -1 when the parent is gone. */
static int configure(void) {
  size_t len;
  char *f = read_frame(&len);
  if (f == NULL || f[0] != 'C' || len < 17) { free(f); return -1; }
  const unsigned char *u = (const unsigned char *)f + 1;
  child.index = (int)get_u32(u);
  pid_t parent = (pid_t)get_u32(u + 4);
  uint64_t limit = (uint64_t)get_u32(u + 8) | (uint64_t)get_u32(u + 12) << 32;
  const char *p = f + 17, *end = f + len;
  char *path, *cpath, *init;
  int rc = take_str(&p, end, &path, NULL) | take_str(&p, end, &cpath, NULL) | take_str(&p, end, &init, NULL);
  free(f);
  if (rc != 0 || getppid() != parent) return -1;  /* the parent died before PDEATHSIG was set */
  child_cfg = (tide__pool_config){ 1, path, cpath, init, (size_t)limit, 0 };  /* results go to another process */
  if (limit) {
    /* The state's own allocator stops Lua at the limit (a catchable "not
     * enough memory"); RLIMIT_AS stops native code a little further on. */
    size_t as = address_space() + (size_t)limit + AS_SLACK;
    struct rlimit rl = { as, as };
    setrlimit(RLIMIT_AS, &rl);
  }
  return 0;
}

static void run_job(const char *f, size_t len) {
  if (len < 10) exit(3);
  const unsigned char *u = (const unsigned char *)f + 1;
  uint64_t id = (uint64_t)get_u32(u) | (uint64_t)get_u32(u + 4) << 32;
  int is_name = u[8] != 0;
  const char *p = f + 10, *end = f + len;
  char *fn, *args;
  size_t fn_len, args_len;
  if (take_str(&p, end, &fn, &fn_len) != 0 || take_str(&p, end, &args, &args_len) != 0 || !fn || !args)
    exit(3);
  tide__job *job = tide__job_new(id, fn, fn_len, is_name, args, args_len);
  free(fn);
  free(args);
  if (job == NULL) exit(3);
  if (stopped_before_start(id)) {                     /* given up on while it waited here */
    tide_buf buf;
    tide__buf_init(&buf);
    tide__encode_string(&buf, "cancelled", 9);
    job->status = TIDE_JOB_ERROR;
    job->result = buf.data;
    job->result_len = buf.len;
  } else {
    atomic_store(&child.running, id);
    tide__worker_run(&child, job);
    atomic_store(&child.running, 0);
  }
  const char *trace = job->trace;
  if (tide__proc_done_length(job->result_len, trace ? strlen(trace) : SIZE_MAX) == 0)
    too_big_to_send(job);
  char head[9];
  put_u32(head, (uint32_t)id);
  put_u32(head + 4, (uint32_t)(id >> 32));
  head[8] = (char)(job->status == TIDE_JOB_OK);
  trace = job->trace;
  int rc = send_frame('D', head, 9, job->result ? job->result : "", job->result ? job->result_len : 0,
                      trace, trace ? strlen(trace) : 0, 2);
  tide__job_free(job);
  if (rc != 0) end_group();                           /* the parent is gone */
}

int tide__proc_child_main(void) {
  signal(SIGHUP, on_parent_death);
  prctl(PR_SET_PDEATHSIG, SIGHUP);
  int fl = fcntl(CHAN, F_GETFL);
  if (fl < 0) return 2;                               /* not started by a tide parent */
  fcntl(CHAN, F_SETFL, fl & ~O_NONBLOCK);
  fcntl(CHAN, F_SETFD, FD_CLOEXEC);                   /* what the job runs never holds it */
  close_inherited();
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (configure() != 0) return 0;
  if (start_watch() != 0) return 2;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_stop_request;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, NULL);
  char err[256];
  if (tide__worker_open(&child, &child_cfg, err, sizeof err) == 0)
    lua_cpcall(child.L, rename_tide, NULL);           /* a failure leaves the thread's names */
  const char *init_error = child.init_error[0] ? child.init_error : NULL;
  if (send_frame('R', "", 0, init_error, init_error ? strlen(init_error) : 0, NULL, 0, 1) != 0) return 0;
  for (;;) {
    size_t len;
    char *f = read_frame(&len);
    if (f == NULL) break;                             /* the parent closed its side */
    if (f[0] == 'J') run_job(f, len);
    free(f);
  }
  fflush(stdout);
  return 0;
}
