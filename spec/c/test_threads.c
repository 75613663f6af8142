/* test_threads.c — TAP tests of the thread pool (threads.c, worker.c) driven from a loop of the test's own. */
#include "threads.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>

#include "tap.h"

#include <uv.h>

#include "codec.h"

#define WAIT_MS 5000  /* the longest any wait may take: past it, the check fails */
#define MAX_ID  1024  /* job ids used here are 1 .. MAX_ID - 1 */

static lua_State *S;  /* scratch state: encodes arguments, dumps bytecode, decodes results */

static void bail_out(const char *what, const char *why) {
  printf("Bail out! %s: %s\n", what, why ? why : "?");
  exit(2);
}

/* ===== WHAT on_done DELIVERED, BY JOB ID ===== */

typedef struct inbox {
  int count[MAX_ID];                 /* deliveries of each id: must end 0 or 1 */
  tide__job_status status[MAX_ID];   /* of the last delivery */
  char *result[MAX_ID];              /* copies of the last delivery's bytes */
  size_t result_len[MAX_ID];
  char *trace[MAX_ID];
  int total, stray;                  /* every delivery; those with an id out of range */
  int refuse[MAX_ID];                /* times on_done refuses to deliver each id */
  int refused, largest_batch;
} inbox;

static char *copy_bytes(const char *s, size_t len) {
  char *p = malloc(len + 1);
  if (p == NULL) bail_out("copy_bytes", "out of memory");
  if (len) memcpy(p, s, len);
  p[len] = '\0';
  return p;
}

static int on_done(tide__pool *pool, tide__job *first, int n, void *data) {
  inbox *box = data;
  (void)pool;
  if (n > box->largest_batch) box->largest_batch = n;
  tide__job *job = first;
  for (int i = 0; i < n; i++, job = job->next) {
    if (job->id > 0 && job->id < MAX_ID && box->refuse[job->id] > 0) {
      box->refuse[job->id]--;                       /* "could not deliver": tried again later */
      box->refused++;
      return i;
    }
    box->total++;
    if (job->id == 0 || job->id >= MAX_ID) { box->stray++; continue; }
    uint64_t id = job->id;
    box->count[id]++;
    box->status[id] = job->status;
    free(box->result[id]);
    free(box->trace[id]);
    box->result[id] = job->result ? copy_bytes(job->result, job->result_len) : NULL;
    box->result_len[id] = job->result ? job->result_len : 0;
    box->trace[id] = job->trace ? copy_bytes(job->trace, strlen(job->trace)) : NULL;
  }
  return n;
}

/* ===== A LOOP AND A POOL OF THE TEST'S OWN ===== */

typedef struct rig {
  uv_loop_t loop;
  tide__pool *pool;
  inbox box;
} rig;

static const char *module_path;     /* package.path of the workers: a temp dir */

static rig *rig_start(int threads, size_t memory_limit, const char *init) {
  rig *r = calloc(1, sizeof *r);
  if (r == NULL || uv_loop_init(&r->loop) != 0) bail_out("rig_start", "no loop");
  tide__pool_config cfg = { .threads = threads, .init = init, .memory_limit = memory_limit,
                            .path = module_path };
  char err[256];
  r->pool = tide__pool_start(&r->loop, &cfg, on_done, &r->box, err, sizeof err);
  if (r->pool == NULL) bail_out("tide__pool_start", err);
  return r;
}

/* Closes the pool, then the loop (once the async handle's close callback ran). */
static void rig_stop(rig *r, const char *name) {
  tide__pool_close(r->pool);
  uv_run(&r->loop, UV_RUN_DEFAULT);
  ok(uv_loop_close(&r->loop) == 0, "%s: the loop closes with no handle left", name);
  for (int i = 0; i < MAX_ID; i++) {
    free(r->box.result[i]);
    free(r->box.trace[i]);
  }
  free(r);
}

static tide__pool_stats stats(rig *r) {
  tide__pool_stats st;
  tide__pool_stats_get(r->pool, &st);
  return st;
}

static uint64_t deadline_in(int ms) {
  return uv_hrtime() + (uint64_t)ms * 1000000u;
}

/* Runs the loop without blocking, then naps 1 ms; 0 once `deadline` has passed. */
static int tick(rig *r, uint64_t deadline) {
  uv_run(&r->loop, UV_RUN_NOWAIT);
  if (uv_hrtime() >= deadline) return 0;
  uv_sleep(1);
  return 1;
}

static void run_for(rig *r, int ms) {
  uint64_t dl = deadline_in(ms);
  while (tick(r, dl)) {}
}

/* Waits until n jobs in all were delivered; 1 if they were in time. */
static int wait_delivered(rig *r, int n, int ms) {
  uint64_t dl = deadline_in(ms);
  while (r->box.total < n && tick(r, dl)) {}
  return r->box.total >= n;
}

/* Waits until the pool counts `busy` busy threads; 1 if it did in time. */
static int wait_busy(rig *r, int busy, int ms) {
  uint64_t dl = deadline_in(ms);
  while (stats(r).busy != busy && tick(r, dl)) {}
  return stats(r).busy == busy;
}

/* ===== JOBS: ARGUMENTS, BYTECODE, RESULTS (in the scratch state) ===== */

/* The codec bytes of a Lua expression, like "{ n = 2, 'ab', 3 }". */
static tide_buf args_of(const char *expr) {
  char src[256], err[256];
  tide_buf b;
  tide__buf_init(&b);
  snprintf(src, sizeof src, "return %s", expr);
  if (luaL_loadstring(S, src) || lua_pcall(S, 0, 1, 0)) bail_out(expr, lua_tostring(S, -1));
  if (tide__encode(S, -1, "args", &b, err, sizeof err) != 0) bail_out(expr, err);
  lua_pop(S, 1);                                      /* the value */
  return b;
}

static int append(lua_State *L, const void *p, size_t n, void *ud) {
  tide_buf *b = ud;
  (void)L;
  char *data = realloc(b->data, b->len + n);
  if (data == NULL) return 1;
  memcpy(data + b->len, p, n);
  b->data = data;
  b->len += n;
  b->cap = b->len;
  return 0;
}

/* The bytecode of a Lua chunk (luaL_loadstring, then lua_dump). */
static tide_buf bytecode_of(const char *src) {
  tide_buf b;
  tide__buf_init(&b);
  if (luaL_loadstring(S, src) != 0) bail_out(src, lua_tostring(S, -1));
  if (lua_dump(S, append, &b) != 0) bail_out(src, "lua_dump failed");
  lua_pop(S, 1);                                      /* the function */
  return b;
}

static void submit(rig *r, uint64_t id, const char *fn, size_t fn_len, int is_name,
                   const tide_buf *args) {
  tide__job *job = tide__job_new(id, fn, fn_len, is_name, args->data, args->len);
  if (job == NULL) bail_out("tide__job_new", "out of memory");
  if (tide__pool_submit(r->pool, job) != 0) bail_out("tide__pool_submit", "the pool is closing");
}

static void submit_name(rig *r, uint64_t id, const char *name, const char *args_expr) {
  tide_buf args = args_of(args_expr);
  submit(r, id, name, strlen(name), 1, &args);
  tide__buf_free(&args);
}

static void submit_code(rig *r, uint64_t id, const char *src, const char *args_expr) {
  tide_buf code = bytecode_of(src), args = args_of(args_expr);
  submit(r, id, code.data, code.len, 0, &args);
  tide__buf_free(&code);
  tide__buf_free(&args);
}

/* Decodes job id's result as { n = 1, v } and gives tostring(v) in out; 1 if it was so. */
static int result_1(rig *r, uint64_t id, char *out, size_t outlen) {
  char err[256];
  int good = 0;
  out[0] = '\0';
  if (r->box.result[id] == NULL ||
      tide__decode(S, r->box.result[id], r->box.result_len[id], err, sizeof err) != 0)
    return 0;
  if (lua_istable(S, -1)) {
    lua_getfield(S, -1, "n");                         /* results, n */
    lua_rawgeti(S, -2, 1);                            /* results, n, v */
    good = lua_tonumber(S, -2) == 1 && lua_isstring(S, -1);
    if (good) snprintf(out, outlen, "%s", lua_tostring(S, -1));
    lua_pop(S, 2);
  }
  lua_pop(S, 1);                                      /* the results */
  return good;
}

static int result_is(rig *r, uint64_t id, const char *expected) {
  char got[256];
  return r->box.status[id] == TIDE_JOB_OK && result_1(r, id, got, sizeof got) &&
         strcmp(got, expected) == 0;
}

/* Job id failed, and both its error value (a string) and its trace contain `part`. */
static int failed_with(rig *r, uint64_t id, const char *part) {
  char err[256];
  int good = 0;
  if (r->box.status[id] != TIDE_JOB_ERROR || r->box.trace[id] == NULL ||
      strstr(r->box.trace[id], part) == NULL || r->box.result[id] == NULL)
    return 0;
  if (tide__decode(S, r->box.result[id], r->box.result_len[id], err, sizeof err) != 0) return 0;
  good = lua_type(S, -1) == LUA_TSTRING && strstr(lua_tostring(S, -1), part) != NULL;
  lua_pop(S, 1);                                      /* the error value */
  return good;
}

/* ===== THE CASES ===== */

#define AB3 "{ n = 2, 'ab', 3 }"

static void by_name_and_by_bytecode(void) {
  rig *r = rig_start(2, 0, NULL);
  submit_name(r, 1, "string.rep", AB3);
  submit_code(r, 2, "local s, k = ... return string.rep(s, k)", AB3);
  ok(wait_delivered(r, 2, WAIT_MS), "a job by name and one by bytecode are delivered");
  ok(result_is(r, 1, "ababab"), "by name: 'string.rep' gives OK and { n = 1, 'ababab' }");
  ok(result_is(r, 2, "ababab"), "by bytecode: the dumped function gives OK and { n = 1, 'ababab' }");
  ok(r->box.trace[1] == NULL && r->box.trace[2] == NULL, "a job that succeeds has no trace");
  rig_stop(r, "by name and bytecode");
}

/* Deliveries come in batches; one the delivery refuses is tried again at
 * the next wake-up, and the jobs after it in its batch are delivered at once. */
static void refused_delivery_is_retried(void) {
  enum { N = 200 };
  rig *r = rig_start(2, 0, NULL);
  tide_buf args = args_of(AB3);
  r->box.refuse[7] = 3;                               /* refused 3 times, then taken */
  r->box.refuse[9] = TIDE_POOL_MAX_DELIVERIES + 10;   /* refused every time: dropped */
  for (uint64_t id = 1; id <= N; id++) submit(r, id, "string.rep", strlen("string.rep"), 1, &args);
  tide__buf_free(&args);
  ok(wait_delivered(r, N - 1, WAIT_MS), "every job but the one always refused is delivered");
  uint64_t dl = deadline_in(12 * WAIT_MS);            /* one refusal per wake-up */
  while (r->box.refused < 3 + TIDE_POOL_MAX_DELIVERIES && tick(r, dl)) {}
  run_for(r, 20);
  int once = 1;
  for (uint64_t id = 1; id <= N; id++) once &= r->box.count[id] == (id == 9 ? 0 : 1);
  ok(once && r->box.stray == 0, "each once, the refused one after its refusals");
  ok(r->box.refuse[7] == 0 && result_is(r, 7, "ababab"), "a job refused 3 times comes back with its result");
  ok(r->box.refused == 3 + TIDE_POOL_MAX_DELIVERIES, "a job refused TIDE_POOL_MAX_DELIVERIES times is dropped "
     "(refusals: %d)", r->box.refused);
  ok(r->box.largest_batch <= TIDE_POOL_BATCH, "no batch is larger than TIDE_POOL_BATCH");
  tide__pool_stats st = stats(r);
  ok(st.in_flight == 0 && st.queued == 0, "nothing is left in flight (in_flight %d)", st.in_flight);
  rig_stop(r, "refused deliveries");
}

/* Many jobs finished before the loop looks come in one batch. */
static void deliveries_come_in_batches(void) {
  enum { N = 600 };
  rig *r = rig_start(2, 0, NULL);
  tide_buf args = args_of(AB3);
  for (uint64_t id = 1; id <= N; id++) submit(r, id, "string.rep", strlen("string.rep"), 1, &args);
  tide__buf_free(&args);
  uint64_t dl = deadline_in(WAIT_MS);                 /* no loop run until all are done */
  while (stats(r).in_flight > 0 && (stats(r).queued > 0 || stats(r).busy > 0) && uv_hrtime() < dl)
    uv_sleep(1);
  ok(wait_delivered(r, N, WAIT_MS), "600 jobs are delivered");
  ok(r->box.largest_batch > 1, "in batches (largest: %d jobs)", r->box.largest_batch);
  rig_stop(r, "batches");
}

static void error_with_traceback(void) {
  rig *r = rig_start(2, 0, NULL);
  submit_code(r, 1, "local function inner() error('boom') end inner()", "{ n = 0 }");
  submit_name(r, 2, "nosuchmodule.fn", "{ n = 0 }");
  ok(wait_delivered(r, 2, WAIT_MS), "erroring jobs are delivered");
  ok(failed_with(r, 1, "boom"), "an error gives TIDE_JOB_ERROR and its message");
  ok(r->box.trace[1] && strstr(r->box.trace[1], "stack traceback"),
     "its trace has a stack traceback");
  ok(failed_with(r, 2, "nosuchmodule"), "a function from a missing module is an error naming it");
  rig_stop(r, "errors");
}

static void thousand_jobs_once_each(void) {
  enum { N = 1000 };
  rig *r = rig_start(2, 0, NULL);
  tide_buf args = args_of(AB3);
  for (uint64_t id = 1; id <= N; id++) submit(r, id, "string.rep", strlen("string.rep"), 1, &args);
  tide__buf_free(&args);
  ok(wait_delivered(r, N, WAIT_MS), "1,000 jobs are delivered");
  run_for(r, 50);                                     /* room for a duplicate to show */
  int once = 1, good = 1;
  for (uint64_t id = 1; id <= N; id++) {
    once &= r->box.count[id] == 1;
    good &= result_is(r, id, "ababab");
  }
  ok(once && r->box.total == N && r->box.stray == 0, "each exactly once, through on_done");
  ok(good, "each with its own right result");
  tide__pool_stats st = stats(r);
  ok(st.in_flight == 0 && st.queued == 0 && st.busy == 0, "nothing is left queued or in flight");
  rig_stop(r, "1,000 jobs");
}

static void cancel_queued_and_running(void) {
  rig *r = rig_start(2, 0, NULL);
  submit_name(r, 1, "tide.sleep", "{ n = 1, 5000 }");
  submit_name(r, 2, "tide.sleep", "{ n = 1, 5000 }");
  submit_name(r, 3, "string.rep", AB3);               /* queued behind them */
  ok(wait_busy(r, 2, WAIT_MS), "two sleeping jobs occupy both threads");
  ok(tide__pool_cancel(r->pool, 3) == 1, "cancelling a queued job returns 1");
  ok(stats(r).queued == 0, "the queue is empty then");
  ok(tide__pool_cancel(r->pool, 1) == 2, "cancelling a running job returns 2");
  ok(wait_busy(r, 1, 1000), "its thread is idle again within 1 s");
  ok(tide__pool_cancel(r->pool, 2) == 2, "cancelling the other running job returns 2");
  ok(wait_busy(r, 0, 1000), "both threads are idle within 1 s");
  ok(tide__pool_cancel(r->pool, 1) == 0 && tide__pool_cancel(r->pool, 99) == 0,
     "cancelling a gone or unknown job returns 0");
  submit_name(r, 4, "string.rep", AB3);
  submit_name(r, 5, "string.rep", AB3);
  ok(wait_delivered(r, 2, WAIT_MS), "later jobs still run");
  run_for(r, 100);
  ok(r->box.count[1] + r->box.count[2] + r->box.count[3] == 0, "no cancelled job is ever delivered");
  ok(result_is(r, 4, "ababab") && result_is(r, 5, "ababab"),
     "jobs after a cancel are not hit by a stale stop request");
  tide__pool_stats st = stats(r);
  ok(st.quarantined == 0 && st.replaced == 0 && st.size == 2, "no thread was quarantined");
  ok(st.in_flight == 0 && st.busy == 0 && st.idle == 2, "nothing in flight, both threads idle");
  rig_stop(r, "cancel");
}

/* Blocks 600 ms in C, where the stop hook cannot run, then returns on its own. */
#define STUCK "os.execute('sleep 0.6') return 'late'"
#define SLEEP_200 "local t = require('tide') t.sleep(200) return t.thread"

static void quarantine_stuck_job(void) {
  rig *r = rig_start(2, 0, NULL);
  submit_code(r, 1, STUCK, "{ n = 0 }");
  ok(wait_busy(r, 1, WAIT_MS), "the blocked job is running");
  run_for(r, 50);                    /* inside os.execute by now: a stop before it would be obeyed */
  ok(tide__pool_cancel(r->pool, 1) == 2, "asked to stop (cancel returns 2)");
  run_for(r, 50);
  ok(stats(r).busy == 1, "it ignores the request");
  ok(tide__pool_quarantine(r->pool, 1) == 1, "tide__pool_quarantine returns 1");
  ok(tide__pool_quarantine(r->pool, 1) == 0 && tide__pool_quarantine(r->pool, 99) == 0,
     "quarantining it again, or an unknown job, returns 0");
  tide__pool_stats st = stats(r);
  ok(st.quarantined == 1 && st.replaced == 1 && st.size == 2,
     "stats: quarantined 1, replaced 1, size 2");
  uint64_t t0 = uv_hrtime();
  submit_code(r, 2, SLEEP_200, "{ n = 0 }");
  submit_code(r, 3, SLEEP_200, "{ n = 0 }");
  ok(wait_delivered(r, 2, WAIT_MS), "new jobs complete");
  double ms = (double)(uv_hrtime() - t0) / 1e6;
  char a[32], b[32];
  ok(result_1(r, 2, a, sizeof a) && result_1(r, 3, b, sizeof b) && strcmp(a, b) != 0 && ms < 380,
     "two 200 ms jobs ran at once on two threads (%.0f ms, threads %s and %s)", ms, a, b);
  ok(wait_busy(r, 0, WAIT_MS), "the quarantined thread returns on its own");
  uv_sleep(100);                                      /* ... and retires: state closed, ref dropped */
  run_for(r, 50);
  st = stats(r);
  ok(r->box.count[1] == 0 && st.in_flight == 0, "its late result is dropped");
  ok(st.size == 2 && st.idle == 2, "the pool has 2 idle threads");
  rig_stop(r, "quarantine");
}

#define HOG "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end"

static void memory_limit(void) {
  rig *r = rig_start(1, 32u << 20, NULL);
  submit_code(r, 1, HOG, "{ n = 0 }");
  ok(wait_delivered(r, 1, WAIT_MS), "a job allocating without bound under a 32 MB limit ends");
  ok(failed_with(r, 1, "not enough memory"), "with TIDE_JOB_ERROR and 'not enough memory'");
  submit_name(r, 2, "string.rep", AB3);
  ok(wait_delivered(r, 2, WAIT_MS) && result_is(r, 2, "ababab"), "the next job on that thread succeeds");
  rig_stop(r, "memory limit");
}

/* Many distinct functions, one after another, on a thread with a memory
 * limit: the thread's cache of functions stays bounded. */
static void many_distinct_functions(void) {
  rig *r = rig_start(1, 4u << 20, NULL);
  char src[5000];
  int failed = 0;
  for (int i = 1; i <= 1000; i++) {
    snprintf(src, sizeof src, "return #'%04d%.4000s'", i,
             "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
             "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
             "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    submit_code(r, (uint64_t)i, src, "{ n = 0 }");
    if (!wait_delivered(r, i, WAIT_MS)) break;
    if (r->box.status[i] != TIDE_JOB_OK) failed++;
  }
  ok(r->box.total == 1000 && failed == 0,
     "1,000 distinct functions of 4 KB each run one after another under a 4 MB limit (%d failed)", failed);
  rig_stop(r, "many functions");
}

static void failing_thread_init(void) {
  rig *r = rig_start(2, 0, "tide_test_no_such_module");
  submit_name(r, 1, "string.rep", AB3);
  submit_code(r, 2, "return 1", "{ n = 0 }");
  submit_name(r, 3, "string.rep", AB3);
  ok(wait_delivered(r, 3, WAIT_MS), "jobs on threads whose init failed are delivered");
  ok(failed_with(r, 1, "thread_init") && failed_with(r, 2, "thread_init") &&
     failed_with(r, 3, "thread_init"), "each fails with a message naming thread_init");
  ok(strstr(r->box.trace[1], "tide_test_no_such_module") != NULL, "and the module");
  rig_stop(r, "thread_init");
}

/* Job arguments whose `n` is not a count fail the job; they never reach lua_call. */
static void bad_argument_counts(void) {
  rig *r = rig_start(1, 0, NULL);
  submit_code(r, 1, "return select('#', ...)", "{ n = -1 }");
  submit_code(r, 2, "return select('#', ...)", "{ n = 1e10 }");
  submit_code(r, 3, "return select('#', ...)", "{ n = 'two', 1, 2 }");
  submit_code(r, 4, "return select('#', ...)", "{ n = 2.5 }");
  submit_code(r, 5, "return select('#', ...)", "{ n = 3, 1 }");
  ok(wait_delivered(r, 5, WAIT_MS), "five jobs with odd argument counts are delivered");
  int all = 1;
  for (uint64_t id = 1; id <= 4; id++) all &= failed_with(r, id, "bad arguments: 'n' must be an integer from 0 to 7000");
  ok(all, "n = -1, 1e10, 'two' and 2.5 each fail with \"bad arguments: 'n' must be an integer from 0 to 7000\"");
  ok(result_is(r, 5, "3"), "n = 3 with one value passes three arguments (two nil)");
  rig_stop(r, "argument counts");
}

/* Cancelling queued jobs finds each by its id: 40,000 cancels, newest
 * first (the worst order for a scan from the head), take well under 1 s. */
static void cancel_many_queued(void) {
  enum { N = 40000 };
  rig *r = rig_start(1, 0, NULL);
  submit_name(r, 1, "tide.sleep", "{ n = 1, 5000 }");
  ok(wait_busy(r, 1, WAIT_MS), "the only thread is busy");
  tide_buf args = args_of(AB3);
  for (uint64_t id = 2; id <= N + 1; id++) submit(r, id, "string.rep", strlen("string.rep"), 1, &args);
  tide__buf_free(&args);
  ok(stats(r).queued == N, "40,000 jobs are queued");
  uint64_t t0 = uv_hrtime();
  int all = 1;
  for (uint64_t id = N + 1; id >= 2; id--) all &= tide__pool_cancel(r->pool, id) == 1;
  double ms = (double)(uv_hrtime() - t0) / 1e6;
  ok(all && stats(r).queued == 0, "each cancel returns 1, and the queue is empty");
  ok(ms < 1000, "40,000 cancels, newest first, in %.1f ms (< 1000)", ms);
  ok(tide__pool_cancel(r->pool, 1) == 2 && wait_busy(r, 0, WAIT_MS), "the running job stops too");
  rig_stop(r, "cancel many");
}

/* Each worker makes its state (and runs thread_init) on its own thread: a
 * slow init holds neither the pool's start nor a quarantine's replacement. */
static void slow_init_on_own_threads(void) {
  uint64_t t0 = uv_hrtime();
  rig *r = rig_start(4, 0, "tide_test_slow_init");
  double start_ms = (double)(uv_hrtime() - t0) / 1e6;
  ok(start_ms < 150, "starting 4 threads whose init takes 200 ms each returns in %.0f ms (< 150)", start_ms);
  submit_code(r, 1, "return tostring(_G.slow_init_done)", "{ n = 0 }");
  ok(wait_delivered(r, 1, WAIT_MS) && result_is(r, 1, "true"), "a job runs after its thread's init");
  submit_code(r, 2, STUCK, "{ n = 0 }");
  ok(wait_busy(r, 1, WAIT_MS), "a job blocks in C");
  run_for(r, 50);
  t0 = uv_hrtime();
  int q = tide__pool_quarantine(r->pool, 2);
  double q_ms = (double)(uv_hrtime() - t0) / 1e6;
  ok(q == 1 && q_ms < 100, "quarantining it (a replacement with a 200 ms init) returns in %.0f ms (< 100)", q_ms);
  submit_code(r, 3, "return tostring(_G.slow_init_done)", "{ n = 0 }");
  ok(wait_delivered(r, 2, WAIT_MS) && result_is(r, 3, "true"), "the pool goes on");
  ok(wait_busy(r, 0, WAIT_MS), "the quarantined thread returns on its own");
  uv_sleep(100);
  rig_stop(r, "slow init");
}

/* Closing a pool whose workers are still in thread_init, or running a job,
 * stops them and joins them; one stuck where no hook runs (compiled code)
 * is left after TIDE_POOL_CLOSE_WAIT_MS, and the close returns. */
static double close_ms(rig *r, const char *name) {
  uint64_t t0 = uv_hrtime();
  rig_stop(r, name);
  return (double)(uv_hrtime() - t0) / 1e6;
}

static void close_during_init(void) {
  rig *r = rig_start(2, 0, "tide_test_loop_init");      /* never ends, in the interpreter */
  run_for(r, 50);
  double ms = close_ms(r, "looping init");
  ok(ms < 500, "closing a pool whose thread_init loops stops it: %.0f ms (< 500)", ms);

  r = rig_start(2, 0, "tide_test_slow_init");            /* tide.sleep(200) */
  ms = close_ms(r, "sleeping init");
  ok(ms < 150, "closing a pool whose thread_init sleeps stops it: %.0f ms (< 150)", ms);

  r = rig_start(1, 0, NULL);
  submit_code(r, 1, "jit.off() local x = 0 while true do x = x + 1 end", "{ n = 0 }");
  ok(wait_busy(r, 1, WAIT_MS), "a job loops");
  ms = close_ms(r, "looping job");
  ok(ms < 500, "closing a pool stops a running job and joins its thread: %.0f ms (< 500)", ms);
}

/* Last: the stuck thread spins until the process exits. */
static void close_with_init_stuck_in_compiled_code(void) {
  rig *r = rig_start(1, 0, "tide_test_jit_init");
  run_for(r, 100);
  double ms = close_ms(r, "init stuck in compiled code");
  ok(ms >= TIDE_POOL_CLOSE_WAIT_MS - 50 && ms < TIDE_POOL_CLOSE_WAIT_MS + 1000,
     "closing a pool whose thread_init is stuck in compiled code returns after %.0f ms (~%d)",
     ms, TIDE_POOL_CLOSE_WAIT_MS);
}

static char module_dir[64];

static const struct { const char *name, *text; } modules[] = {
  { "tide_test_slow_init", "require('tide').sleep(200)\n_G.slow_init_done = true\n" },
  { "tide_test_loop_init", "jit.off()\nlocal x = 0\nwhile true do x = x + 1 end\n" },
  { "tide_test_jit_init", "local x = 0\nwhile true do x = x + 1 end\n" },
};

static void write_modules(void) {
  snprintf(module_dir, sizeof module_dir, "/tmp/tide_test_threads_XXXXXX");
  if (mkdtemp(module_dir) == NULL) bail_out("mkdtemp", "failed");
  char file[128], path[128];
  for (size_t i = 0; i < sizeof modules / sizeof modules[0]; i++) {
    snprintf(file, sizeof file, "%s/%s.lua", module_dir, modules[i].name);
    FILE *f = fopen(file, "w");
    if (f == NULL) bail_out("fopen", file);
    fputs(modules[i].text, f);
    fclose(f);
  }
  snprintf(path, sizeof path, "%s/?.lua;;", module_dir);
  module_path = strdup(path);
}

static void remove_modules(void) {
  char file[128];
  for (size_t i = 0; i < sizeof modules / sizeof modules[0]; i++) {
    snprintf(file, sizeof file, "%s/%s.lua", module_dir, modules[i].name);
    remove(file);
  }
  rmdir(module_dir);
  free((char *)module_path);
}

static void on_alarm(int sig) {
  (void)sig;
  static const char msg[] = "Bail out! the tests hung (a close that never returns?)\n";
  if (write(1, msg, sizeof msg - 1) < 0) _exit(3);
  _exit(2);
}

int main(void) {
  signal(SIGALRM, on_alarm);
  alarm(120);
  write_modules();
  S = luaL_newstate();
  luaL_openlibs(S);
  by_name_and_by_bytecode();
  error_with_traceback();
  refused_delivery_is_retried();
  deliveries_come_in_batches();
  thousand_jobs_once_each();
  cancel_queued_and_running();
  quarantine_stuck_job();
  memory_limit();
  failing_thread_init();
  many_distinct_functions();
  bad_argument_counts();
  cancel_many_queued();
  slow_init_on_own_threads();
  close_during_init();
  close_with_init_stuck_in_compiled_code();
  lua_close(S);
  remove_modules();
  return tap_done();
}
