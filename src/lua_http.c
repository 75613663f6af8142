/* lua_http.c — the thin Lua binding of the HTTP server in src/http.c.
 *
 *   http_listen(host, port, opts, on_request) -> server | nil, message
 *       opts: { max_body = bytes, idle_ms = ms, max_conns = n, max_buffered = bytes }
 *       (each optional)
 *       on_request(req, method, url, headers, body, remote, keep_alive)
 *       runs on the loop for each request; headers: lower-case name -> value
 *       (repeated headers joined by ", ", cookies by "; ")
 *   server:address() -> host, port     server:ref(on)     server:stats() -> table
 *   server:close()                     (idempotent; also __gc and the loop's end)
 *   req:write(bytes) -> true | nil, message     the response's bytes, head included
 *   req:finish(keep_alive)             the response is complete
 *   req:open() -> boolean              false once finished or the client is gone
 *   random_bytes(n) -> string          from the OS's random source (uv_random)
 *
 * A request userdata and its connection point at each other until the
 * response is finished or the connection closes; either side clears both
 * links, so neither is used after the other is gone.  Every server is on the
 * binding's list until closed, and tide__close_http closes them before the
 * loop closes.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "bindings.h"
#include "http.h"
#include "lua_call.h"

#define SERVER_MT   "tide.HttpServer"
#define REQUEST_MT  "tide.HttpRequest"
#define BINDING_MT  "tide.HttpBinding"
#define BINDING_KEY "tide.http"

typedef struct server_ud server_ud;

typedef struct binding {
  uv_loop_t *loop;       /* NULL once the loop closed */
  tide__caller caller;   /* request callbacks call Lua through it */
  server_ud *servers;    /* open servers */
} binding;

struct server_ud {
  tide__http_server *s;  /* NULL once closed */
  binding *b;
  int cb_ref;            /* on_request */
  server_ud *prev, *next;
};

typedef struct { tide__http_conn *c; } request_ud;

/* ===== requests ===== */

static void detach(request_ud *r) {
  if (r->c) tide__http_set_conn_data(r->c, NULL);
  r->c = NULL;
}

static int req_write(lua_State *L) {
  request_ud *r = luaL_checkudata(L, 1, REQUEST_MT);
  size_t len;
  const char *bytes = luaL_checklstring(L, 2, &len);
  if (r->c == NULL) { lua_pushnil(L); lua_pushliteral(L, "the connection is closed"); return 2; }
  int rc = tide__http_write(r->c, bytes, len);
  if (rc != 0) { lua_pushnil(L); lua_pushstring(L, uv_strerror(rc)); return 2; }
  lua_pushboolean(L, 1);
  return 1;
}

static int req_finish(lua_State *L) {
  request_ud *r = luaL_checkudata(L, 1, REQUEST_MT);
  tide__http_conn *c = r->c;
  if (c == NULL) return 0;
  detach(r);
  tide__http_end(c, lua_toboolean(L, 2));
  return 0;
}

static int req_open(lua_State *L) {
  request_ud *r = luaL_checkudata(L, 1, REQUEST_MT);
  lua_pushboolean(L, r->c != NULL);
  return 1;
}

/* __gc: a request dropped unanswered closes its connection. */
static int req_gc(lua_State *L) {
  request_ud *r = luaL_checkudata(L, 1, REQUEST_MT);
  tide__http_conn *c = r->c;
  if (c) { detach(r); tide__http_end(c, 0); }
  return 0;
}

static void push_str(lua_State *L, tide__http_str s) { lua_pushlstring(L, s.p, s.len); }

/* headers -> { name = value }, repeated names joined. */
static void push_headers(lua_State *L, const tide__http_request *req) {
  lua_createtable(L, 0, req->nheaders);
  for (int i = 0; i < req->nheaders; i++) {
    push_str(L, req->names[i]);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);                               /* the value so far, or nil */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      push_str(L, req->values[i]);
    } else {
      int cookie = req->names[i].len == 6 && memcmp(req->names[i].p, "cookie", 6) == 0;
      lua_pushstring(L, cookie ? "; " : ", ");
      push_str(L, req->values[i]);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
}

typedef struct call_args {
  tide__http_conn *c;
  const tide__http_request *req;
  request_ud *r;           /* the request's userdata, once made */
} call_args;

/* The arguments of on_request(req, method, url, headers, body, remote,
 * keep_alive); runs protected (lua_call.h), so it may allocate. */
static int push_request(lua_State *L, void *ud) {
  call_args *a = ud;
  const tide__http_request *req = a->req;
  luaL_checkstack(L, 12, "an HTTP request");
  request_ud *r = lua_newuserdata(L, sizeof *r);
  r->c = a->c;
  luaL_getmetatable(L, REQUEST_MT);
  lua_setmetatable(L, -2);
  tide__http_set_conn_data(a->c, r);
  a->r = r;
  lua_pushstring(L, req->method);
  push_str(L, req->url);
  push_headers(L, req);
  push_str(L, req->body);
  lua_pushstring(L, req->remote);
  lua_pushboolean(L, req->keep_alive);
  return 7;
}

static void on_request(tide__http_conn *c, const tide__http_request *req, void *data) {
  server_ud *su = data;
  lua_State *L = su->b->caller.L;
  int top = lua_gettop(L);
  call_args a = { c, req, NULL };
  if (tide__call(&su->b->caller, su->cb_ref, push_request, &a, 0, "an HTTP request handler") != 0 &&
      (a.r == NULL || a.r->c != NULL)) {             /* unanswered: answer for it */
    static const char resp[] = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                               "Connection: close\r\n\r\n";
    tide__http_write(c, resp, sizeof resp - 1);
    if (a.r) detach(a.r);
    tide__http_end(c, 0);
  }
  lua_settop(L, top);
}

static void on_conn_closed(tide__http_conn *c, void *data) {
  (void)data;
  request_ud *r = tide__http_conn_data(c);
  if (r) r->c = NULL;
  tide__http_set_conn_data(c, NULL);
}

/* ===== servers ===== */

static void server_close(lua_State *L, server_ud *su) {
  if (su->s == NULL) return;
  tide__http_close(su->s);
  su->s = NULL;
  if (su->prev) su->prev->next = su->next; else su->b->servers = su->next;
  if (su->next) su->next->prev = su->prev;
  luaL_unref(L, LUA_REGISTRYINDEX, su->cb_ref);
  su->cb_ref = LUA_NOREF;
}

static server_ud *check_server(lua_State *L) {
  server_ud *su = luaL_checkudata(L, 1, SERVER_MT);
  if (su->s == NULL) luaL_error(L, "http server: closed");
  return su;
}

static int srv_close(lua_State *L) {
  server_close(L, luaL_checkudata(L, 1, SERVER_MT));
  return 0;
}

static int srv_address(lua_State *L) {
  server_ud *su = check_server(L);
  char host[64];
  int port;
  int rc = tide__http_address(su->s, host, sizeof host, &port);
  if (rc != 0) { lua_pushnil(L); lua_pushstring(L, uv_strerror(rc)); return 2; }
  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  return 2;
}

static int srv_ref(lua_State *L) {
  tide__http_ref(check_server(L)->s, lua_toboolean(L, 2));
  return 0;
}

static void set_number(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static int srv_stats(lua_State *L) {
  tide__http_stats st;
  tide__http_get_stats(check_server(L)->s, &st);
  lua_createtable(L, 0, 5);
  set_number(L, "connections", (double)st.connections);
  set_number(L, "requests", (double)st.requests);
  set_number(L, "rejected", (double)st.rejected);
  set_number(L, "open", (double)st.open);
  set_number(L, "buffered", (double)st.buffered);
  return 1;
}

static int srv_tostring(lua_State *L) {
  server_ud *su = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushfstring(L, "tide.HttpServer (%s)", su->s ? "open" : "closed");
  return 1;
}

static binding *get_binding(lua_State *L) {
  binding *b = luaL_checkudata(L, lua_upvalueindex(1), BINDING_MT);
  if (b->loop == NULL) luaL_error(L, "tide: the loop is closed");
  return b;
}

/* opts[k] rounded up, at most `max` (0: absent, or not positive: the default).
 * A fraction is not truncated to 0, nor a large value wrapped to 0: either
 * would silently give the default instead of what was asked. */
static double opt_count(lua_State *L, int t, const char *k, double max) {
  lua_getfield(L, t, k);
  double v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 0;
  lua_pop(L, 1);
  if (!(v > 0)) return 0;                          /* (NaN too) */
  return v < max ? ceil(v) : max;
}

/* http_listen(host, port, opts, on_request) -> server | nil, message */
static int l_listen(lua_State *L) {
  binding *b = get_binding(L);
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  server_ud *su = lua_newuserdata(L, sizeof *su);
  memset(su, 0, sizeof *su);
  su->b = b;
  su->cb_ref = LUA_NOREF;
  luaL_getmetatable(L, SERVER_MT);
  lua_setmetatable(L, -2);
  tide__http_options opt = {
    .max_body = (size_t)opt_count(L, 3, "max_body", 9007199254740992.0),   /* 2^53 */
    .idle_ms = (unsigned)opt_count(L, 3, "idle_ms", 4294967295.0),
    .max_conns = (unsigned)opt_count(L, 3, "max_conns", 4294967295.0),
    .max_buffered = (size_t)opt_count(L, 3, "max_buffered", 9007199254740992.0),
    .on_request = on_request, .on_conn_closed = on_conn_closed, .data = su,
  };
  int rc = tide__http_listen(b->loop, host, port, &opt, &su->s);
  if (rc != 0) {
    su->s = NULL;
    lua_pushnil(L);
    lua_pushfstring(L, "cannot listen on %s port %d: %s", host, port, uv_strerror(rc));
    return 2;
  }
  lua_pushvalue(L, 4);
  su->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  su->next = b->servers;
  if (su->next) su->next->prev = su;
  b->servers = su;
  return 1;
}

/* random_bytes(n) -> n bytes from the OS (for tokens). */
static int l_random_bytes(lua_State *L) {
  int n = (int)luaL_checkinteger(L, 1);
  luaL_argcheck(L, n > 0 && n <= 256, 1, "1 to 256 bytes expected");
  char bytes[256];
  int rc = uv_random(NULL, NULL, bytes, (size_t)n, 0, NULL);
  if (rc != 0) return luaL_error(L, "tide: no random bytes: %s", uv_strerror(rc));
  lua_pushlstring(L, bytes, (size_t)n);
  return 1;
}

static const luaL_Reg server_methods[] = {
  { "close", srv_close }, { "address", srv_address }, { "ref", srv_ref },
  { "stats", srv_stats }, { NULL, NULL }
};

static const luaL_Reg request_methods[] = {
  { "write", req_write }, { "finish", req_finish }, { "open", req_open }, { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "http_listen", l_listen }, { "random_bytes", l_random_bytes }, { NULL, NULL }
};

/* Closes every server (before the loop closes). */
void tide__close_http(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, BINDING_KEY);
  binding *b = luaL_testudata(L, -1, BINDING_MT);
  if (b) {
    while (b->servers) server_close(L, b->servers);
    b->loop = NULL;
    tide__caller_free(L, &b->caller);
  }
  lua_pop(L, 1);
}

/* Sets http_listen and random_bytes into the table at the top of the stack. */
void tide__open_http(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  tide__new_type(L, SERVER_MT, server_methods, srv_close, srv_tostring);
  tide__new_type(L, REQUEST_MT, request_methods, req_gc, NULL);
  binding *b = lua_newuserdata(L, sizeof *b);
  memset(b, 0, sizeof *b);
  b->loop = loop;
  tide__caller_init(L, &b->caller, wd);
  tide__publish_binding(L, BINDING_MT, NULL, BINDING_KEY, funcs);
}
