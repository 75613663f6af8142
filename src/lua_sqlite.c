/* lua_sqlite.c — a thin Lua binding of SQLite for the durable job store (tide.store_sqlite).
 *
 * The store's SQL lives in Lua; this file only moves values across:
 *
 *   sqlite_open(path, name, busy_ms) -> db | nil, message, code
 *   db:exec(sql)                  runs one or more statements without parameters
 *   db:busy_timeout(ms)           how long SQLite itself waits for a lock (0: not at all)
 *   db:prepare(sql) -> stmt       a prepared statement, reused many times
 *   db:changes()  db:last_id()  db:in_transaction()  db:close()
 *   stmt:run(...)   -> changes    binds ... to ?1..?n, steps to the end
 *   stmt:rows(...)  -> { row... } every result row, as { column = value }
 *   stmt:first(...) -> row | nil  the first result row
 *   stmt:column(...) -> { v... }  the first column of every row, as an array
 *   stmt:finalize()
 *
 * Errors raise "<name>: <sqlite message> (SQLITE_<CODE>)", where <name> is
 * the store's name given at open (e.g. "sqlite:jobs.db").  Statements keep
 * their connection alive (a shared, reference-counted struct), so closing a
 * connection or collecting the objects in any order is safe; a statement of
 * a closed connection raises "database is closed".
 */
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <sqlite3.h>

#include "bindings.h"

#define DB_MT   "tide.SQLite"
#define STMT_MT "tide.SQLiteStatement"

typedef struct conn {
  sqlite3 *db;       /* NULL once closed                   */
  int refs;          /* the db userdata + live statements  */
  char name[256];    /* names the store in error messages  */
} conn;

typedef struct { conn *c; } db_ud;
typedef struct { conn *c; sqlite3_stmt *st; } stmt_ud;

static void conn_release(conn *c) {
  if (--c->refs == 0) free(c);
}

/* ===== errors ===== */

static const char *code_name(int rc) {
  switch (rc) {                                /* extended codes that say more than their base */
    case SQLITE_READONLY_DIRECTORY: return "SQLITE_READONLY_DIRECTORY";
    case SQLITE_READONLY_CANTINIT: return "SQLITE_READONLY_CANTINIT";
    case SQLITE_READONLY_RECOVERY: return "SQLITE_READONLY_RECOVERY";
    case SQLITE_READONLY_CANTLOCK: return "SQLITE_READONLY_CANTLOCK";
    case SQLITE_READONLY_DBMOVED: return "SQLITE_READONLY_DBMOVED";
    default: break;
  }
  switch (rc & 0xff) {
    case SQLITE_ERROR: return "SQLITE_ERROR";         case SQLITE_INTERNAL: return "SQLITE_INTERNAL";
    case SQLITE_PERM: return "SQLITE_PERM";           case SQLITE_ABORT: return "SQLITE_ABORT";
    case SQLITE_BUSY: return "SQLITE_BUSY";           case SQLITE_LOCKED: return "SQLITE_LOCKED";
    case SQLITE_NOMEM: return "SQLITE_NOMEM";         case SQLITE_READONLY: return "SQLITE_READONLY";
    case SQLITE_INTERRUPT: return "SQLITE_INTERRUPT"; case SQLITE_IOERR: return "SQLITE_IOERR";
    case SQLITE_CORRUPT: return "SQLITE_CORRUPT";     case SQLITE_NOTFOUND: return "SQLITE_NOTFOUND";
    case SQLITE_FULL: return "SQLITE_FULL";           case SQLITE_CANTOPEN: return "SQLITE_CANTOPEN";
    case SQLITE_PROTOCOL: return "SQLITE_PROTOCOL";   case SQLITE_SCHEMA: return "SQLITE_SCHEMA";
    case SQLITE_TOOBIG: return "SQLITE_TOOBIG";       case SQLITE_CONSTRAINT: return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH: return "SQLITE_MISMATCH";   case SQLITE_MISUSE: return "SQLITE_MISUSE";
    case SQLITE_RANGE: return "SQLITE_RANGE";         case SQLITE_NOTADB: return "SQLITE_NOTADB";
    default: return "SQLITE_UNKNOWN";
  }
}

/* Pushes "<name>: <message> (SQLITE_CODE)". */
static void push_error(lua_State *L, conn *c, int rc) {
  const char *msg = c->db ? sqlite3_errmsg(c->db) : sqlite3_errstr(rc);
  lua_pushfstring(L, "%s: %s (%s)", c->name, msg, code_name(rc));
}

static int raise_error(lua_State *L, conn *c, int rc) {
  push_error(L, c, rc);
  return lua_error(L);
}

static conn *check_open(lua_State *L, conn *c) {
  if (c->db == NULL) luaL_error(L, "%s: database is closed", c->name);
  return c;
}

/* ===== values ===== */

static void bind_one(lua_State *L, stmt_ud *s, int param, int idx) {
  int rc;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: rc = sqlite3_bind_null(s->st, param); break;
    case LUA_TBOOLEAN: rc = sqlite3_bind_int(s->st, param, lua_toboolean(L, idx)); break;
    case LUA_TNUMBER: {
      double d = lua_tonumber(L, idx);
      if (d == floor(d) && fabs(d) < 9007199254740992.0)   /* 2^53: exact as an integer */
        rc = sqlite3_bind_int64(s->st, param, (sqlite3_int64)d);
      else
        rc = sqlite3_bind_double(s->st, param, d);
      break;
    }
    case LUA_TSTRING: {
      size_t len;
      const char *str = lua_tolstring(L, idx, &len);
      rc = sqlite3_bind_text64(s->st, param, str, len, SQLITE_TRANSIENT, SQLITE_UTF8);
      break;
    }
    default:
      luaL_error(L, "%s: cannot bind parameter %d (nil, boolean, number or string expected, got %s)",
                 s->c->name, param, luaL_typename(L, idx));
      return;
  }
  if (rc != SQLITE_OK) raise_error(L, s->c, rc);
}

/* Resets the statement and binds the arguments from index 2 on. */
static void bind_all(lua_State *L, stmt_ud *s) {
  int n = lua_gettop(L) - 1;
  sqlite3_reset(s->st);
  sqlite3_clear_bindings(s->st);
  int want = sqlite3_bind_parameter_count(s->st);
  for (int i = want + 1; i <= n; i++)         /* trailing nils are no parameters */
    if (!lua_isnil(L, i + 1))
      luaL_error(L, "%s: %d parameters given, the statement takes %d", s->c->name, n, want);
  for (int i = 1; i <= n && i <= want; i++) bind_one(L, s, i, i + 1);
}

static void push_column(lua_State *L, sqlite3_stmt *st, int col) {
  switch (sqlite3_column_type(st, col)) {
    case SQLITE_INTEGER: lua_pushnumber(L, (lua_Number)sqlite3_column_int64(st, col)); break;
    case SQLITE_FLOAT: lua_pushnumber(L, sqlite3_column_double(st, col)); break;
    case SQLITE_NULL: lua_pushnil(L); break;
    default: {                                 /* text and blobs: the bytes as they are */
      const void *p = sqlite3_column_blob(st, col);
      lua_pushlstring(L, p ? p : "", (size_t)sqlite3_column_bytes(st, col));
    }
  }
}

static void push_row(lua_State *L, sqlite3_stmt *st, int ncol) {
  lua_createtable(L, 0, ncol);
  for (int i = 0; i < ncol; i++) {
    push_column(L, st, i);
    lua_setfield(L, -2, sqlite3_column_name(st, i));
  }
}

/* Steps once; 1 with a row ready, 0 when done; raises on failure. */
static int step(lua_State *L, stmt_ud *s) {
  int rc = sqlite3_step(s->st);
  if (rc == SQLITE_ROW) return 1;
  if (rc == SQLITE_DONE) return 0;
  push_error(L, s->c, rc);
  sqlite3_reset(s->st);
  return lua_error(L);
}

/* ===== statements ===== */

static stmt_ud *check_stmt(lua_State *L) {
  stmt_ud *s = luaL_checkudata(L, 1, STMT_MT);
  if (s->st == NULL) luaL_error(L, "%s: statement is finalized", s->c->name);
  check_open(L, s->c);
  return s;
}

/* st:params() -> how many parameters the statement takes (its highest ?N). */
static int stmt_params(lua_State *L) {
  lua_pushinteger(L, sqlite3_bind_parameter_count(check_stmt(L)->st));
  return 1;
}

static int stmt_run(lua_State *L) {
  stmt_ud *s = check_stmt(L);
  bind_all(L, s);
  while (step(L, s)) {}
  sqlite3_reset(s->st);
  lua_pushnumber(L, sqlite3_changes(s->c->db));
  return 1;
}

static int stmt_rows(lua_State *L) {
  stmt_ud *s = check_stmt(L);
  bind_all(L, s);
  int ncol = sqlite3_column_count(s->st);
  lua_newtable(L);
  for (int n = 1; step(L, s); n++) {
    push_row(L, s->st, ncol);
    lua_rawseti(L, -2, n);
  }
  sqlite3_reset(s->st);
  return 1;
}

static int stmt_first(lua_State *L) {
  stmt_ud *s = check_stmt(L);
  bind_all(L, s);
  if (step(L, s)) push_row(L, s->st, sqlite3_column_count(s->st));
  else lua_pushnil(L);
  sqlite3_reset(s->st);
  return 1;
}

static int stmt_column(lua_State *L) {
  stmt_ud *s = check_stmt(L);
  bind_all(L, s);
  lua_newtable(L);
  for (int n = 1; step(L, s); n++) {
    push_column(L, s->st, 0);
    lua_rawseti(L, -2, n);
  }
  sqlite3_reset(s->st);
  return 1;
}

/* finalize() and __gc: idempotent. */
static int stmt_finalize(lua_State *L) {
  stmt_ud *s = luaL_checkudata(L, 1, STMT_MT);
  if (s->st) {
    sqlite3_finalize(s->st);
    s->st = NULL;
    conn_release(s->c);
  }
  return 0;
}

static int stmt_tostring(lua_State *L) {
  stmt_ud *s = luaL_checkudata(L, 1, STMT_MT);
  lua_pushfstring(L, "tide.SQLiteStatement (%s)", s->st ? sqlite3_sql(s->st) : "finalized");
  return 1;
}

/* ===== connections ===== */

static conn *check_db(lua_State *L) {
  db_ud *u = luaL_checkudata(L, 1, DB_MT);
  return check_open(L, u->c);
}

static int db_exec(lua_State *L) {
  conn *c = check_db(L);
  int rc = sqlite3_exec(c->db, luaL_checkstring(L, 2), NULL, NULL, NULL);
  if (rc != SQLITE_OK) return raise_error(L, c, rc);
  return 0;
}

/* The userdata comes first, empty: making it may raise (out of memory, a
 * finalizer's error), and then no statement must be held by nobody. */
static int db_prepare(lua_State *L) {
  conn *c = check_db(L);
  size_t len;
  const char *sql = luaL_checklstring(L, 2, &len);
  /* SQLite stops at a NUL: what follows it would be dropped unseen, and
   * the "more SQL follows" check below would not see it either. */
  if (memchr(sql, 0, len) != NULL) return luaL_error(L, "%s: the SQL text holds a NUL byte", c->name);
  stmt_ud *s = lua_newuserdata(L, sizeof *s);
  s->c = c;
  s->st = NULL;
  luaL_getmetatable(L, STMT_MT);
  lua_setmetatable(L, -2);
  const char *tail = NULL;
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_prepare_v3(c->db, sql, (int)len, SQLITE_PREPARE_PERSISTENT, &st, &tail);
  if (rc != SQLITE_OK) return raise_error(L, c, rc);
  if (st == NULL) return luaL_error(L, "%s: no SQL statement in \"%s\"", c->name, sql);
  while (tail && *tail && strchr(" \t\r\n;", *tail)) tail++;
  if (tail && *tail) {
    sqlite3_finalize(st);
    return luaL_error(L, "%s: one statement expected, more SQL follows: \"%s\"", c->name, tail);
  }
  s->st = st;
  c->refs++;
  return 1;
}

static int db_changes(lua_State *L) {
  lua_pushnumber(L, sqlite3_changes(check_db(L)->db));
  return 1;
}

/* db:last_id() -> the rowid of the last row inserted on this connection. */
static int db_last_id(lua_State *L) {
  lua_pushnumber(L, (lua_Number)sqlite3_last_insert_rowid(check_db(L)->db));
  return 1;
}

static int db_busy_timeout(lua_State *L) {
  conn *c = check_db(L);
  lua_Number ms = luaL_checknumber(L, 2);
  sqlite3_busy_timeout(c->db, ms < 0 ? 0 : ms > INT_MAX ? INT_MAX : (int)ms);
  return 0;
}

static int db_in_transaction(lua_State *L) {
  lua_pushboolean(L, !sqlite3_get_autocommit(check_db(L)->db));
  return 1;
}

/* close() and __gc: idempotent.  Statements still alive keep the struct
 * (not the connection: sqlite3_close_v2 defers until they are finalized). */
static int db_close(lua_State *L) {
  db_ud *u = luaL_checkudata(L, 1, DB_MT);
  if (u->c) {
    if (u->c->db) sqlite3_close_v2(u->c->db);
    u->c->db = NULL;
    conn_release(u->c);
    u->c = NULL;
  }
  return 0;
}

static int db_tostring(lua_State *L) {
  db_ud *u = luaL_checkudata(L, 1, DB_MT);
  lua_pushfstring(L, "tide.SQLite (%s)", u->c ? u->c->name : "closed");
  return 1;
}

/* ===== the library's own settings, once per process ===== */

/* No bulk allocation of page-cache memory per cache.  By default every page
 * cache allocates 20 pages (87 KB) at once when it is made, and SQLite makes
 * one for each temporary b-tree: the VALUES list of a batch statement, the
 * rows of a RETURNING, an UPDATE ... FROM.  Freed at the statement's end,
 * that block sat at the top of the heap, so glibc gave it back to the kernel
 * and the next statement faulted it in again: for a durable flow's step, 3
 * page faults and 35 of its 115 us of CPU were the kernel's (sys 1.14 s
 * against 0.45 s, 60,000 minor faults against 18,000, 20,000 steps).  Pages
 * are then allocated one at a time, as the cache fills.
 *
 * sqlite3_config works only before SQLite initializes: this runs once, before
 * tide's first open.  A host that initialized SQLite before (another binding)
 * keeps its settings (the call returns SQLITE_MISUSE, ignored): only speed
 * depends on it.  Both calls are process-wide, as SQLite's settings are. */
static pthread_once_t configured = PTHREAD_ONCE_INIT;

static void configure_once(void) {
  (void)sqlite3_config(SQLITE_CONFIG_PAGECACHE, (void *)NULL, 0, 0);
  (void)sqlite3_initialize();
}

/* sqlite_open(path, name, busy_ms) -> db | nil, message, code.  The
 * userdata is made before the struct it will own (making it may raise). */
static int l_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  const char *name = luaL_checkstring(L, 2);
  lua_Number busy = luaL_optnumber(L, 3, 5000);
  db_ud *u = lua_newuserdata(L, sizeof *u);
  u->c = NULL;
  luaL_getmetatable(L, DB_MT);
  lua_setmetatable(L, -2);
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) return luaL_error(L, "%s: out of memory", name);
  snprintf(c->name, sizeof c->name, "%s", name);
  c->refs = 1;
  u->c = c;
  pthread_once(&configured, configure_once);
  int rc = sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                           SQLITE_OPEN_NOMUTEX, NULL);
  if (rc != SQLITE_OK) {
    lua_pushnil(L);
    push_error(L, c, rc);
    lua_pushstring(L, code_name(rc));
    sqlite3_close_v2(c->db);                   /* a failed open may still hold a handle */
    c->db = NULL;
    return 3;
  }
  sqlite3_busy_timeout(c->db, busy < 0 ? 0 : busy > INT_MAX ? INT_MAX : (int)busy);
  sqlite3_extended_result_codes(c->db, 1);
  return 1;
}

static const luaL_Reg stmt_methods[] = {
  { "run", stmt_run }, { "rows", stmt_rows }, { "first", stmt_first },
  { "column", stmt_column }, { "finalize", stmt_finalize }, { "params", stmt_params }, { NULL, NULL }
};

static const luaL_Reg db_methods[] = {
  { "exec", db_exec }, { "prepare", db_prepare }, { "changes", db_changes }, { "last_id", db_last_id },
  { "in_transaction", db_in_transaction }, { "busy_timeout", db_busy_timeout }, { "close", db_close },
  { NULL, NULL }
};

void tide__open_sqlite(lua_State *L) {
  tide__new_type(L, DB_MT, db_methods, db_close, db_tostring);
  tide__new_type(L, STMT_MT, stmt_methods, stmt_finalize, stmt_tostring);
  lua_pushcfunction(L, l_open);
  lua_setfield(L, -2, "sqlite_open");
  lua_pushstring(L, sqlite3_libversion());
  lua_setfield(L, -2, "sqlite_version");
}
