/* lua_pg.c — a thin, non-blocking Lua binding of libpq for the PostgreSQL job store.
 *
 * tide.store_postgres drives the protocol; this file moves bytes and events:
 *
 *   pg_connect(conninfo, name) -> conn | nil, message   (starts connecting)
 *   pg_on_ready(fn)              fn(id, readable, writable) runs on the loop
 *                                when a watched socket is ready
 *   conn:connect_poll() -> "read" | "write" | "ok" | nil, message
 *   conn:watch(id, readable, writable, keep_alive)   conn:unwatch()
 *                                (a watch stays armed until unwatched: see
 *                                conn_watch)
 *   conn:input() -> boolean      something (bytes, or the end of the
 *                                stream) waits on the socket, unread
 *   conn:wait(readable, writable, timeout_ms) -> ready  (blocking poll(2):
 *                                for callers outside the loop)
 *   conn:send(sql, ...) -> true | nil, message      ($1..$n bound as text; a string
 *                                with a NUL byte goes whole, in binary format:
 *                                exact for bytea, refused by the server for text)
 *   conn:flush() -> 0 (sent) | 1 (more to send) | nil, message
 *   conn:consume() -> true | nil, message   conn:busy() -> boolean
 *   conn:result() -> nil (no more) | { ok, rows, changes, command, sqlstate, message }
 *                                (in a pipeline: false at the end of each
 *                                statement's results, nil after the sync,
 *                                which leaves pipeline mode)
 *   conn:pipeline() -> true | nil, message   enters pipeline mode: the
 *                                statements sent next go out together, with
 *                                no wait in between, until conn:sync()
 *   conn:sync() -> true | nil, message       ends the pipeline's statements
 *                                (a statement after a failed one is skipped:
 *                                its result is not ok, "skipped")
 *   conn:put_copy(data) -> true | nil, message   queues bytes of a COPY ... FROM
 *                                STDIN (after conn:result() said copy_in);
 *                                conn:flush() sends them
 *   conn:copy_end([error]) -> true | nil, message   ends the COPY's data (with
 *                                an error message: fails the COPY instead);
 *                                its result follows as any statement's
 *   conn:notifies() -> { { channel, payload }, ... } | nil
 *   conn:ok() -> boolean   conn:close()
 *
 * Watch handles belong to the loop: they are closed (uv_close) when the
 * connection closes, is collected, or the loop closes (tide__close_pg),
 * whichever comes first; the memory goes in the close callback.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <math.h>

#include <lauxlib.h>
#include <libpq-fe.h>

#include "bindings.h"
#include "lua_call.h"
#include "loop.h"

#define CONN_MT     "tide.PgConn"
#define RESULT_MT   "tide.PgResult"
#define BINDING_MT  "tide.PgBinding"
#define BINDING_KEY "tide.pg"                /* registry: the binding's userdata */

typedef struct watch watch;

typedef struct binding {
  uv_loop_t *loop;
  tide__caller caller;   /* ready callbacks call Lua through it */
  int ready_ref;
  watch *watches;        /* every open watch handle, to close with the loop */
} binding;

typedef struct conn {
  PGconn *pg;
  watch *w;              /* NULL when not watched */
  binding *b;
  char name[256];
} conn;

struct watch {
  uv_poll_t handle;      /* first: the handle's address is the watch's */
  binding *b;
  conn *owner;           /* valid while the watch is linked */
  int id;
  int sock;              /* the socket it watches */
  int events;            /* what it was started with (valid while active) */
  watch *prev, *next;
};

/* ===== watch handles ===== */

static void watch_free(uv_handle_t *h) { free(h); }

static void watch_close(watch *w) {
  w->owner->w = NULL;
  if (w->prev) w->prev->next = w->next; else w->b->watches = w->next;
  if (w->next) w->next->prev = w->prev;
  tide__close((uv_handle_t *)&w->handle, watch_free);
}

typedef struct ready { int id, readable, writable; } ready;

static int push_ready(lua_State *L, void *ud) {
  const ready *r = ud;
  lua_pushnumber(L, r->id);
  lua_pushboolean(L, r->readable);
  lua_pushboolean(L, r->writable);
  return 3;
}

/* Loop thread: tells Lua's ready(id, readable, writable).  A call that
 * fails is not tried again here: the socket is watched level-triggered, so
 * it is reported again while it stays ready. */
static void on_poll(uv_poll_t *h, int status, int events) {
  watch *w = (watch *)h;
  binding *b = w->b;
  if (b->ready_ref == LUA_NOREF) return;
  ready r = { w->id, status < 0 || (events & (UV_READABLE | UV_DISCONNECT)),  /* an error reads as ready */
              status < 0 || (events & UV_WRITABLE) };
  int top = lua_gettop(b->caller.L);
  tide__call(&b->caller, b->ready_ref, push_ready, &r, 0, "a PostgreSQL callback");
  lua_settop(b->caller.L, top);
}

/* ===== connections ===== */

static conn *check_conn(lua_State *L) {
  conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (c->pg == NULL) luaL_error(L, "%s: connection is closed", c->name);
  return c;
}

static int fail(lua_State *L, conn *c) {
  const char *msg = c->pg ? PQerrorMessage(c->pg) : "connection is closed";
  size_t len = strlen(msg);
  while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' ')) len--;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: ", c->name);
  lua_pushlstring(L, msg, len);
  lua_concat(L, 2);
  return 2;
}

static void unwatch(conn *c) {
  if (c->w) watch_close(c->w);
}

/* conn:watch(id, readable, writable, keep_alive).  The watch follows the
 * connection's socket: libpq may open another one while it connects (the
 * next host of a multi-host URL), and a watch of the old one is replaced.
 * A watch already armed for the same events is left armed (only its id and
 * keep_alive change): every uv_poll_start costs two epoll_ctl calls (a DEL,
 * then an ADD), and a connection that runs statement after statement keeps
 * one watch for all of them (strace: 12 epoll_ctl per job that commits its
 * own transaction, 4 of them failing, before). */
static int conn_watch(lua_State *L) {
  conn *c = check_conn(L);
  int id = (int)luaL_checkinteger(L, 2);
  int events = (lua_toboolean(L, 3) ? UV_READABLE : 0) | (lua_toboolean(L, 4) ? UV_WRITABLE : 0);
  int keep = lua_toboolean(L, 5);
  int sock = PQsocket(c->pg);
  if (c->b->loop == NULL) return luaL_error(L, "tide: the loop is closed");
  if (sock < 0) return luaL_error(L, "%s: the connection has no socket", c->name);
  if (c->w && c->w->sock != sock) unwatch(c);
  if (c->w == NULL) {
    watch *w = calloc(1, sizeof *w);
    if (w == NULL) return luaL_error(L, "%s: out of memory", c->name);
    int rc = uv_poll_init_socket(c->b->loop, &w->handle, sock);
    if (rc != 0) { free(w); return luaL_error(L, "%s: cannot watch the socket: %s", c->name, uv_strerror(rc)); }
    w->sock = sock;
    w->b = c->b;
    w->owner = c;
    w->next = c->b->watches;
    if (w->next) w->next->prev = w;
    c->b->watches = w;
    c->w = w;
  }
  c->w->id = id;
  if (keep) uv_ref((uv_handle_t *)&c->w->handle); else uv_unref((uv_handle_t *)&c->w->handle);
  events |= UV_DISCONNECT;
  if (uv_is_active((uv_handle_t *)&c->w->handle) && c->w->events == events) return 0;
  int rc = uv_poll_start(&c->w->handle, events, on_poll);
  if (rc != 0) return luaL_error(L, "%s: cannot watch the socket: %s", c->name, uv_strerror(rc));
  c->w->events = events;
  return 0;
}

/* conn:unwatch(): a watch already stopped (the ready callback stops it,
 * then the waiter) is left alone: a second uv_poll_stop removes the socket
 * from epoll again, a failing syscall (ENOENT) per wait. */
static int conn_unwatch(lua_State *L) {
  conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (c->w && uv_is_active((uv_handle_t *)&c->w->handle)) uv_poll_stop(&c->w->handle);
  return 0;
}

/* conn:wait(readable, writable, timeout_ms) -> true when ready, false on
 * timeout, or nil, message.  A signal does not end the wait: poll is
 * called again for what is left of the timeout. */
static int conn_wait(lua_State *L) {
  conn *c = check_conn(L);
  struct pollfd p = { .fd = PQsocket(c->pg), .events = 0 };
  if (lua_toboolean(L, 2)) p.events |= POLLIN;
  if (lua_toboolean(L, 3)) p.events |= POLLOUT;
  lua_Number ms = luaL_optnumber(L, 4, -1);
  if (ms > 2e9) ms = 2e9;
  uint64_t end = ms >= 0 ? uv_hrtime() + (uint64_t)(ms * 1e6) : 0;
  int rc;
  while ((rc = poll(&p, 1, ms < 0 ? -1 : (int)ms)) < 0 && errno == EINTR) {
    if (ms < 0) continue;
    uint64_t now = uv_hrtime();
    ms = now >= end ? 0 : (lua_Number)((end - now + 999999) / 1000000);
  }
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: cannot wait for the socket: %s", c->name, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, rc > 0);
  return 1;
}

/* conn:connect_poll() -> "read" | "write" | "ok" | nil, message.  The watch
 * is dropped first: PQconnectPoll may close its socket (and open another,
 * maybe with the same number, that the old watch would never report). */
static int conn_connect_poll(lua_State *L) {
  conn *c = check_conn(L);
  unwatch(c);
  switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING: lua_pushliteral(L, "read"); return 1;
    case PGRES_POLLING_WRITING: lua_pushliteral(L, "write"); return 1;
    case PGRES_POLLING_OK:
      if (PQsetnonblocking(c->pg, 1) != 0) return fail(L, c);
      lua_pushliteral(L, "ok");
      return 1;
    default: return fail(L, c);
  }
}

/* The text of parameter i (a Lua value at index idx), or NULL for nil;
 * *len gets its length and *binary is set for a string holding a NUL byte
 * (libpq reads text parameters up to the first NUL). */
static const char *param_text(lua_State *L, conn *c, int idx, char *buf, size_t size, int *len, int *binary) {
  *binary = 0;
  *len = 0;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: return NULL;
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? "true" : "false";
    case LUA_TNUMBER: {
      double d = lua_tonumber(L, idx);
      if (d == floor(d) && fabs(d) < 9007199254740992.0) snprintf(buf, size, "%.0f", d);
      else snprintf(buf, size, "%.17g", d);
      return buf;
    }
    case LUA_TSTRING: {
      size_t n;
      const char *str = lua_tolstring(L, idx, &n);
      if (n > INT_MAX) luaL_error(L, "%s: parameter %d is too long", c->name, idx - 2);
      *len = (int)n;
      *binary = memchr(str, 0, n) != NULL;
      return str;
    }
    default:
      luaL_error(L, "%s: cannot bind parameter %d (nil, boolean, number or string expected, got %s)",
                 c->name, idx - 2, luaL_typename(L, idx));
      return NULL;
  }
}

#define MAX_PARAMS 4096

/* Parameters from stack index `first` on, as libpq takes them: texts (NULL
 * for nil), and lengths and formats when a string holds a NUL byte (sent as
 * bytes then).  The arrays are scratch userdata on the stack, collected
 * later.  Returns the count; *binary tells whether lengths and formats apply. */
static int params(lua_State *L, conn *c, int first, const char ***values, int **lengths, int **formats,
                  int *binary) {
  int n = lua_gettop(L) - first + 1;
  if (n > MAX_PARAMS) return luaL_error(L, "%s: too many parameters (%d)", c->name, n);
  *values = NULL;
  *lengths = *formats = NULL;
  *binary = 0;
  if (n <= 0) return 0;
  *values = lua_newuserdata(L, sizeof **values * (size_t)n);
  char (*bufs)[32] = lua_newuserdata(L, sizeof *bufs * (size_t)n);
  *lengths = lua_newuserdata(L, sizeof **lengths * (size_t)n);
  *formats = lua_newuserdata(L, sizeof **formats * (size_t)n);
  for (int i = 0; i < n; i++) {
    (*values)[i] = param_text(L, c, first + i, bufs[i], sizeof bufs[i], &(*lengths)[i], &(*formats)[i]);
    *binary |= (*formats)[i];
  }
  return n;
}

static const char *check_sql(lua_State *L, conn *c, int idx) {
  size_t len;
  const char *sql = luaL_checklstring(L, idx, &len);
  if (memchr(sql, 0, len) != NULL) luaL_error(L, "%s: the SQL text holds a NUL byte", c->name);
  return sql;
}

/* conn:send(sql, ...) */
static int conn_send(lua_State *L) {
  conn *c = check_conn(L);
  const char *sql = check_sql(L, c, 2);
  const char **values;
  int *lengths, *formats, binary;
  int n = params(L, c, 3, &values, &lengths, &formats, &binary);
  if (!PQsendQueryParams(c->pg, sql, n, NULL, values, binary ? lengths : NULL, binary ? formats : NULL, 0))
    return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:prepare(name, sql): sends a Parse of a named statement (its
 * parameters' types inferred by the server).  In a pipeline only: its
 * result comes before that of the statement sent after it. */
static int conn_prepare(lua_State *L) {
  conn *c = check_conn(L);
  const char *name = check_sql(L, c, 2);
  const char *sql = check_sql(L, c, 3);
  if (!PQsendPrepare(c->pg, name, sql, 0, NULL)) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:send_prepared(name, ...): runs a statement prepared on this
 * connection (conn:prepare), parameters bound as conn:send binds them. */
static int conn_send_prepared(lua_State *L) {
  conn *c = check_conn(L);
  const char *name = check_sql(L, c, 2);
  const char **values;
  int *lengths, *formats, binary;
  int n = params(L, c, 3, &values, &lengths, &formats, &binary);
  if (!PQsendQueryPrepared(c->pg, name, n, values, binary ? lengths : NULL, binary ? formats : NULL, 0))
    return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:pipeline(): the statements sent from here to conn:sync() share a
 * round trip (libpq 14+ pipeline mode). */
static int conn_pipeline(lua_State *L) {
  conn *c = check_conn(L);
  if (!PQenterPipelineMode(c->pg)) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_sync(lua_State *L) {
  conn *c = check_conn(L);
  if (!PQpipelineSync(c->pg)) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_flush(lua_State *L) {
  conn *c = check_conn(L);
  int rc = PQflush(c->pg);
  if (rc < 0) return fail(L, c);
  lua_pushinteger(L, rc);
  return 1;
}

static int conn_consume(lua_State *L) {
  conn *c = check_conn(L);
  if (!PQconsumeInput(c->pg)) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:input() -> true when bytes or the end of the stream wait on the
 * socket unread (or the socket failed), false when nothing does: one
 * non-blocking peek, where reading with PQconsumeInput to find out took
 * two reads (see pg_conn's run). */
static int conn_input(lua_State *L) {
  conn *c = check_conn(L);
  char byte;
  ssize_t n;
  do n = recv(PQsocket(c->pg), &byte, 1, MSG_PEEK | MSG_DONTWAIT); while (n < 0 && errno == EINTR);
  lua_pushboolean(L, !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)));
  return 1;
}

static int conn_busy(lua_State *L) {
  lua_pushboolean(L, PQisBusy(check_conn(L)->pg));
  return 1;
}

static int conn_ok(lua_State *L) {
  conn *c = luaL_checkudata(L, 1, CONN_MT);
  lua_pushboolean(L, c->pg != NULL && PQstatus(c->pg) == CONNECTION_OK);
  return 1;
}

/* ===== COPY ... FROM STDIN ===== */

/* In non-blocking mode libpq grows its output buffer rather than refuse
 * data, so 0 ("not queued, try again") comes only when it cannot: treated
 * as the failure it is. */
static int conn_put_copy(lua_State *L) {
  conn *c = check_conn(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (len > INT_MAX) return luaL_error(L, "%s: COPY data too long", c->name);
  if (PQputCopyData(c->pg, data, (int)len) != 1) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_copy_end(lua_State *L) {
  conn *c = check_conn(L);
  const char *err = luaL_optstring(L, 2, NULL);
  if (PQputCopyEnd(c->pg, err) != 1) return fail(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* ===== results ===== */

static void push_value(lua_State *L, PGresult *r, int row, int col) {
  if (PQgetisnull(r, row, col)) { lua_pushnil(L); return; }
  const char *v = PQgetvalue(r, row, col);
  switch (PQftype(r, col)) {
    case 16: lua_pushboolean(L, v[0] == 't'); break;                       /* bool */
    case 20: case 21: case 23: case 26: case 700: case 701: case 1700:     /* numbers */
      lua_pushnumber(L, strtod(v, NULL));
      break;
    case 17: {                                                              /* bytea */
      size_t len = 0;
      unsigned char *bytes = PQunescapeBytea((const unsigned char *)v, &len);
      if (bytes == NULL) luaL_error(L, "out of memory decoding bytea");
      lua_pushlstring(L, (const char *)bytes, len);
      PQfreemem(bytes);
      break;
    }
    default: lua_pushlstring(L, v, (size_t)PQgetlength(r, row, col));
  }
}

static void push_rows(lua_State *L, PGresult *r) {
  int nrows = PQntuples(r), ncols = PQnfields(r);
  lua_createtable(L, nrows, 0);
  for (int i = 0; i < nrows; i++) {
    lua_createtable(L, 0, ncols);
    for (int j = 0; j < ncols; j++) {
      push_value(L, r, i, j);
      lua_setfield(L, -2, PQfname(r, j));
    }
    lua_rawseti(L, -2, i + 1);
  }
}

static void set_string(lua_State *L, const char *key, const char *v) {
  if (v == NULL) return;
  size_t len = strlen(v);
  while (len > 0 && v[len - 1] == '\n') len--;
  lua_pushlstring(L, v, len);
  lua_setfield(L, -2, key);
}

/* A PGresult held by a userdata while Lua values are made from it: when
 * making them raises (out of memory, a finalizer's error), __gc clears it. */
typedef struct { PGresult *r; } result_ud;

static int result_gc(lua_State *L) {
  result_ud *u = luaL_checkudata(L, 1, RESULT_MT);
  if (u->r) PQclear(u->r);
  u->r = NULL;
  return 0;
}

/* conn:result() -> nil | { ok, rows, changes, sqlstate, message, copy_in, copy_out } */
static int conn_result(lua_State *L) {
  conn *c = check_conn(L);
  result_ud *u = lua_newuserdata(L, sizeof *u);       /* before the result: it may raise */
  u->r = NULL;
  luaL_getmetatable(L, RESULT_MT);
  lua_setmetatable(L, -2);
  int piped = PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF;
  PGresult *r = u->r = PQgetResult(c->pg);
  if (r == NULL) {
    if (!piped) return 0;
    if (PQstatus(c->pg) == CONNECTION_BAD) return fail(L, c);  /* no sync will come */
    lua_pushboolean(L, 0);                          /* one statement's results end */
    return 1;
  }
  ExecStatusType st = PQresultStatus(r);
  if (st == PGRES_PIPELINE_SYNC) {                  /* the pipeline's end */
    PQclear(r);
    u->r = NULL;
    if (!PQexitPipelineMode(c->pg)) return fail(L, c);
    return 0;
  }
  int ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY || st == PGRES_COPY_IN;
  lua_createtable(L, 0, 5);
  lua_pushboolean(L, ok);
  lua_setfield(L, -2, "ok");
  if (st == PGRES_COPY_IN) {                        /* the server waits for the data: conn:put_copy */
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "copy_in");
  } else if (st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {  /* data no caller reads: until the */
    lua_pushboolean(L, 1);                                      /* connection closes, PQgetResult  */
    lua_setfield(L, -2, "copy_out");                            /* returns this result again       */
  }
  if (st == PGRES_TUPLES_OK) {
    push_rows(L, r);
    lua_setfield(L, -2, "rows");
  }
  if (st == PGRES_COMMAND_OK)                       /* "COMMIT", or "ROLLBACK" for an aborted one */
    set_string(L, "command", PQcmdStatus(r));
  const char *changes = PQcmdTuples(r);
  lua_pushnumber(L, changes && *changes ? strtod(changes, NULL) : 0);
  lua_setfield(L, -2, "changes");
  if (!ok) {
    set_string(L, "sqlstate", PQresultErrorField(r, PG_DIAG_SQLSTATE));
    set_string(L, "message", PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY));
    if (st == PGRES_PIPELINE_ABORTED) set_string(L, "message", "skipped: an earlier statement of its pipeline failed");
    else if (PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) == NULL) set_string(L, "message", PQresultErrorMessage(r));
  }
  PQclear(r);
  u->r = NULL;
  return 1;
}

static int conn_notifies(lua_State *L) {
  conn *c = check_conn(L);
  PGnotify *n;
  int i = 0;
  while ((n = PQnotifies(c->pg)) != NULL) {
    if (i == 0) lua_newtable(L);
    lua_createtable(L, 2, 0);
    lua_pushstring(L, n->relname);
    lua_rawseti(L, -2, 1);
    lua_pushstring(L, n->extra);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, ++i);
    PQfreemem(n);
  }
  return i > 0 ? 1 : 0;
}

/* close() and __gc: idempotent. */
static int conn_close(lua_State *L) {
  conn *c = luaL_checkudata(L, 1, CONN_MT);
  unwatch(c);
  if (c->pg) { PQfinish(c->pg); c->pg = NULL; }
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn *c = luaL_checkudata(L, 1, CONN_MT);
  lua_pushfstring(L, "tide.PgConn (%s%s)", c->name, c->pg ? "" : ", closed");
  return 1;
}

/* ===== the module functions ===== */

static binding *get(lua_State *L) {
  binding *b = luaL_checkudata(L, lua_upvalueindex(1), BINDING_MT);
  if (b->loop == NULL) luaL_error(L, "tide: the loop is closed");
  return b;
}

/* Server notices (NOTICE: relation already exists...) are not errors: dropped. */
static void ignore_notice(void *arg, const char *message) { (void)arg; (void)message; }

/* pg_connect(conninfo, name) -> conn | nil, message */
static int l_connect(lua_State *L) {
  binding *b = get(L);
  const char *info = luaL_checkstring(L, 1);
  const char *name = luaL_checkstring(L, 2);
  conn *c = lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->b = b;
  snprintf(c->name, sizeof c->name, "%s", name);
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
  c->pg = PQconnectStart(info);
  if (c->pg == NULL) return luaL_error(L, "%s: out of memory", name);
  if (PQstatus(c->pg) == CONNECTION_BAD) {
    int n = fail(L, c);
    PQfinish(c->pg);
    c->pg = NULL;
    return n;
  }
  PQsetNoticeProcessor(c->pg, ignore_notice, NULL);
  return 1;
}

static int l_on_ready(lua_State *L) {
  tide__keep_function(L, 1, &get(L)->ready_ref);
  return 0;
}

static const luaL_Reg conn_methods[] = {
  { "watch", conn_watch }, { "unwatch", conn_unwatch }, { "wait", conn_wait },
  { "connect_poll", conn_connect_poll }, { "send", conn_send }, { "flush", conn_flush },
  { "consume", conn_consume }, { "input", conn_input }, { "busy", conn_busy }, { "result", conn_result },
  { "pipeline", conn_pipeline }, { "sync", conn_sync },
  { "prepare", conn_prepare }, { "send_prepared", conn_send_prepared },
  { "put_copy", conn_put_copy }, { "copy_end", conn_copy_end },
  { "notifies", conn_notifies }, { "ok", conn_ok }, { "close", conn_close }, { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "pg_connect", l_connect }, { "pg_on_ready", l_on_ready }, { NULL, NULL }
};

/* Closes every watch handle (before the loop closes). */
void tide__close_pg(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, BINDING_KEY);
  binding *b = luaL_testudata(L, -1, BINDING_MT);
  if (b) {
    while (b->watches) watch_close(b->watches);
    b->loop = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, b->ready_ref);
    b->ready_ref = LUA_NOREF;
    tide__caller_free(L, &b->caller);
  }
  lua_pop(L, 1);
}

/* Sets pg_connect and pg_on_ready into the table at the top of the stack. */
void tide__open_pg(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  luaL_newmetatable(L, RESULT_MT);
  lua_pushcfunction(L, result_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  tide__new_type(L, CONN_MT, conn_methods, conn_close, conn_tostring);
  binding *b = lua_newuserdata(L, sizeof *b);
  memset(b, 0, sizeof *b);
  b->loop = loop;
  tide__caller_init(L, &b->caller, wd);
  b->ready_ref = LUA_NOREF;
  tide__publish_binding(L, BINDING_MT, NULL, BINDING_KEY, funcs);
}
