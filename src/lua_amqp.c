/* lua_amqp.c — a thin Lua binding of amqp_conn.c for the RabbitMQ source: connections opened off the loop, frames as Lua tables.
 *
 *   amqp_connect(id, { host, port, vhost, user, password, name, heartbeat, timeout })
 *                      connects and logs in on a thread of its own; then
 *                      ready(id, "open", conn | nil, message) runs on the loop
 *   amqp_on_ready(fn)  fn(id, "open", ...) as above, or fn(id, "io") when the
 *                      connection has something to read or was lost
 *   conn:next() -> "basic.deliver", channel, tag, redelivered, exchange, routing_key, body,
 *                  properties | method, channel, event | nil (nothing now) | false, message (lost)
 *   conn:channel_open(ch)  conn:channel_close(ch, code, text)  conn:channel_close_ok(ch)
 *   conn:qos(ch, count)    conn:declare(ch, queue, passive, durable, exclusive, auto_delete, args)
 *   conn:delete(ch, queue) conn:purge(ch, queue)  conn:confirm(ch)
 *   conn:consume(ch, queue, tag, exclusive, args)  conn:cancel(ch, tag)
 *   conn:ack(ch, tag, multiple)  conn:nack(ch, tag, multiple, requeue)
 *   conn:publish(ch, exchange, routing_key, body, properties)
 *                      each -> true | nil, message (lost) | nil, message, "encode"
 *                      (nothing sent: it cannot be encoded; the connection goes on)
 *   conn:info() -> { heartbeat, frame_max, channel_max, pending }   conn:close()
 *
 * An event is a table of the method's fields (AMQP's names: `delivery_tag`
 * of a publisher confirm), its method's name ("queue.declare-ok") and
 * channel beside it; a returned message adds body = and properties =
 * { headers = {...}, ... } (none when it has no properties).  A delivery
 * comes as plain values (see conn_next).  Field tables cross both ways
 * (amqp_fields.c): strings, booleans, numbers (integers as 64-bit
 * integers), arrays and nested tables, 32 levels deep.
 *
 * Connections belong to the loop: they are closed when closed from Lua,
 * collected, or when the loop closes (tide__close_amqp), whichever comes
 * first.  A connect still under way when the loop closes is left to its
 * thread, which closes the connection it gets and lets the binding go.
 * A connect does not keep the loop alive: whoever waits for it does, with
 * a timer (amqp.lua waits 2 x its timeout + 1 s, longer than the thread
 * can block).  When the async handle kept it alive, a connect nobody waited
 * for any more (its task cancelled, the script ended, tide.shutdown, a
 * SIGTERM) held `tide run` until the broker answered, up to 2 x the
 * connect timeout (spec/review_amqp_spec.lua).
 *
 * Each connect has a thread of its own (detached), not one of libuv's
 * shared worker threads: a TCP connect and a login block for up to their
 * timeout, and four connects to a broker that never answers held all four
 * of libuv's threads, so a connect to a healthy broker waited behind them
 * (spec/review_amqp_spec.lua).  A thread hands its result to the loop
 * through the binding's `finished` list and async handle, under its lock.
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "amqp_conn.h"
#include "amqp_fields.h"
#include "bindings.h"
#include "lua_call.h"
#include "loop.h"

#define CONN_MT     "tide.AmqpConn"
#define BINDING_MT  "tide.AmqpBinding"
#define BINDING_KEY "tide.amqp"          /* registry: the binding's userdata */

typedef struct conn_ud conn_ud;
typedef struct connect_req connect_req;

/* Shared by the module, its async handle and the connects under way:
 * freed when all let go.  `lock` guards refs, closed and finished (the
 * connects' threads touch them); the rest is the loop thread's. */
typedef struct binding {
  uv_loop_t *loop;        /* NULL once the loop closed */
  tide__caller caller;    /* callbacks call Lua through it */
  int ready_ref;
  int refs;
  conn_ud *conns;         /* open connections */
  uv_mutex_t lock;
  uv_async_t async;       /* a connect's thread finished */
  int closed;             /* the loop closed: threads clean up after themselves */
  connect_req *finished;  /* handed over by the threads, not yet taken by the loop */
} binding;

struct conn_ud {
  tide__amqp *c;          /* NULL once closed */
  binding *b;
  int id;
  conn_ud *prev, *next;
};

struct connect_req {
  binding *b;
  int id;
  tide__amqp_config cfg;
  char *strings;          /* host, vhost, user, password, name: one block */
  tide__amqp *c;
  char err[256];
  connect_req *fnext;         /* b->finished: under b->lock */
};

typedef struct { binding *b; } binding_ud;

static void binding_unref(binding *b) {
  uv_mutex_lock(&b->lock);
  int left = --b->refs;
  uv_mutex_unlock(&b->lock);
  if (left == 0) {
    uv_mutex_destroy(&b->lock);
    free(b);
  }
}

/* What a callback into Lua carries: ready(id, kind[, conn, err]).  Pushed
 * inside the protected call (see lua_call.h): nothing allocates before it. */
typedef struct { binding *b; int id; const char *kind; connect_req *open; } ready_args;

static int push_open(lua_State *L, ready_args *a);

static int push_ready(lua_State *L, void *ud) {
  ready_args *a = ud;
  if (a->open) return push_open(L, a);
  lua_pushinteger(L, a->id);
  lua_pushstring(L, a->kind);
  return 2;
}

/* Calls ready(id, kind, ...), protected; a failure goes to the error sink. */
static void call_ready(ready_args *a) {
  binding *b = a->b;
  if (b->ready_ref == LUA_NOREF) return;
  int top = lua_gettop(b->caller.L);
  tide__call(&b->caller, b->ready_ref, push_ready, a, 0, "a RabbitMQ callback");
  lua_settop(b->caller.L, top);
}

/* ===== connections ===== */

static void unlink_conn(conn_ud *u) {
  if (u->prev) u->prev->next = u->next; else u->b->conns = u->next;
  if (u->next) u->next->prev = u->prev;
  u->prev = u->next = NULL;
}

static void close_conn(conn_ud *u) {
  if (u->c == NULL) return;
  tide__amqp_close(u->c);
  u->c = NULL;
  unlink_conn(u);
}

static void on_io(tide__amqp *c, void *data) {
  (void)c;
  conn_ud *u = data;
  ready_args a = { u->b, u->id, "io", NULL };
  call_ready(&a);
}

static conn_ud *check_conn(lua_State *L) {
  return luaL_checkudata(L, 1, CONN_MT);
}

/* The connection, or NULL after pushing nil, message (closed or lost). */
static tide__amqp *live(lua_State *L, conn_ud *u) {
  if (u->c == NULL) { lua_pushnil(L); lua_pushliteral(L, "connection closed"); return NULL; }
  return u->c;
}

/* true | nil, message (lost) | nil, message, "encode" (nothing was sent:
 * the method or properties cannot be encoded; the connection goes on). */
static int sent(lua_State *L, conn_ud *u, int rc) {
  if (rc == 0) { lua_pushboolean(L, 1); return 1; }
  lua_pushnil(L);
  if (rc == -2) {
    lua_pushstring(L, tide__amqp_send_error(u->c));
    lua_pushliteral(L, "encode");
    return 3;
  }
  lua_pushstring(L, *tide__amqp_error(u->c) ? tide__amqp_error(u->c) : "connection lost");
  return 2;
}

/* ===== events ===== */

static void set_num(lua_State *L, const char *k, double v) { lua_pushnumber(L, v); lua_setfield(L, -2, k); }
static void set_bool(lua_State *L, const char *k, int v) { lua_pushboolean(L, v); lua_setfield(L, -2, k); }
static void set_bytes(lua_State *L, const char *k, amqp_bytes_t v) { tide__amqp_push_bytes(L, v); lua_setfield(L, -2, k); }

/* "AMQP_QUEUE_DECLARE_OK_METHOD" -> "queue.declare-ok" */
static void push_method_name(lua_State *L, amqp_method_number_t id) {
  const char *n = amqp_method_name(id);
  char buf[64];
  size_t j = 0;
  int dot = 0;
  if (n == NULL || strncmp(n, "AMQP_", 5) != 0) { lua_pushfstring(L, "unknown method %d", (int)id); return; }
  for (const char *p = n + 5; *p && j < sizeof buf - 1; p++) {
    if (strcmp(p, "_METHOD") == 0) break;
    if (*p == '_') buf[j++] = dot++ ? '-' : '.';
    else buf[j++] = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
  }
  lua_pushlstring(L, buf, j);
}

static void push_close(lua_State *L, uint16_t code, amqp_bytes_t text, uint16_t cls, uint16_t m) {
  set_num(L, "reply_code", code);
  set_bytes(L, "reply_text", text);
  set_num(L, "class_id", cls);
  set_num(L, "method_id", m);
}

/* Pushes the event's table (its channel and method are returned apart:
 * a delivery's table becomes the delivery itself, so it holds only its own
 * fields, with room for the few the source adds). */
static void push_event(lua_State *L, const tide__amqp_event *ev) {
  lua_createtable(L, 0, ev->method.id == AMQP_BASIC_DELIVER_METHOD ? 10 : 4);
  void *d = ev->method.decoded;
  switch (ev->method.id) {
    case AMQP_BASIC_DELIVER_METHOD: {
      amqp_basic_deliver_t *m = d;
      set_num(L, "tag", (double)m->delivery_tag);
      set_bool(L, "redelivered", m->redelivered);
      set_bytes(L, "exchange", m->exchange);
      set_bytes(L, "routing_key", m->routing_key);
      break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
      amqp_basic_return_t *m = d;
      set_num(L, "reply_code", m->reply_code);
      set_bytes(L, "reply_text", m->reply_text);
      set_bytes(L, "exchange", m->exchange);
      set_bytes(L, "routing_key", m->routing_key);
      break;
    }
    case AMQP_BASIC_ACK_METHOD: {
      amqp_basic_ack_t *m = d;
      set_num(L, "delivery_tag", (double)m->delivery_tag);
      set_bool(L, "multiple", m->multiple);
      break;
    }
    case AMQP_BASIC_NACK_METHOD: {
      amqp_basic_nack_t *m = d;
      set_num(L, "delivery_tag", (double)m->delivery_tag);
      set_bool(L, "multiple", m->multiple);
      break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
      amqp_channel_close_t *m = d;
      push_close(L, m->reply_code, m->reply_text, m->class_id, m->method_id);
      break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      amqp_connection_close_t *m = d;
      push_close(L, m->reply_code, m->reply_text, m->class_id, m->method_id);
      break;
    }
    case AMQP_QUEUE_DECLARE_OK_METHOD: {
      amqp_queue_declare_ok_t *m = d;
      set_bytes(L, "queue", m->queue);
      set_num(L, "message_count", m->message_count);
      set_num(L, "consumer_count", m->consumer_count);
      break;
    }
    case AMQP_QUEUE_DELETE_OK_METHOD: set_num(L, "message_count", ((amqp_queue_delete_ok_t *)d)->message_count); break;
    case AMQP_QUEUE_PURGE_OK_METHOD: set_num(L, "message_count", ((amqp_queue_purge_ok_t *)d)->message_count); break;
    case AMQP_BASIC_CONSUME_OK_METHOD: set_bytes(L, "consumer_tag", ((amqp_basic_consume_ok_t *)d)->consumer_tag); break;
    case AMQP_BASIC_CANCEL_METHOD: set_bytes(L, "consumer_tag", ((amqp_basic_cancel_t *)d)->consumer_tag); break;
    case AMQP_BASIC_CANCEL_OK_METHOD: set_bytes(L, "consumer_tag", ((amqp_basic_cancel_ok_t *)d)->consumer_tag); break;
    case AMQP_CONNECTION_BLOCKED_METHOD: set_bytes(L, "reason", ((amqp_connection_blocked_t *)d)->reason); break;
    default: break;
  }
  if (ev->has_content) {
    tide__amqp_push_bytes(L, ev->body);
    lua_setfield(L, -2, "body");
    if (ev->props->_flags != 0) {     /* none: the field stays nil */
      tide__amqp_push_props(L, ev->props);
      lua_setfield(L, -2, "properties");
    }
  }
}

/* Pushes b, reusing the string last pushed in slot `slot` of the connection's
 * environment table when the bytes are the same: a queue's deliveries mostly
 * share their exchange and routing key, and interning them again costs more
 * than this compare.  The connection is at index 1. */
static void push_cached(lua_State *L, int slot, amqp_bytes_t b) {
  lua_getfenv(L, 1);
  lua_rawgeti(L, -1, slot);
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  if (s != NULL && n == b.len && (n == 0 || memcmp(s, b.bytes, n) == 0)) {
    lua_remove(L, -2);                             /* the environment */
    return;
  }
  lua_pop(L, 1);
  tide__amqp_push_bytes(L, b);
  lua_pushvalue(L, -1);
  lua_rawseti(L, -3, slot);
  lua_remove(L, -2);                               /* the environment */
}

/* conn:next() -> "basic.deliver", channel, tag, redelivered, exchange, routing_key, body, properties | nil
 *              | method, channel, event | nil (nothing now) | false, message (lost)
 * A delivery comes as values, not a table: the source builds its delivery
 * with one Lua table constructor, several times cheaper than setting the
 * fields one by one through the C API (callgrind: 2,100 instructions per
 * delivery in lua_setfield alone). */
static int conn_next(lua_State *L) {
  conn_ud *u = check_conn(L);
  if (u->c == NULL) { lua_pushboolean(L, 0); lua_pushliteral(L, "connection closed"); return 2; }
  tide__amqp_event ev;
  int rc = tide__amqp_next(u->c, &ev);
  if (rc == 0) return 0;
  if (rc < 0) { lua_pushboolean(L, 0); lua_pushstring(L, tide__amqp_error(u->c)); return 2; }
  if (ev.method.id == AMQP_BASIC_DELIVER_METHOD) {
    amqp_basic_deliver_t *m = ev.method.decoded;
    lua_pushliteral(L, "basic.deliver");
    lua_pushinteger(L, ev.channel);
    lua_pushnumber(L, (lua_Number)m->delivery_tag);
    lua_pushboolean(L, m->redelivered);
    push_cached(L, 1, m->exchange);
    push_cached(L, 2, m->routing_key);
    tide__amqp_push_bytes(L, ev.body);
    if (ev.props->_flags != 0) tide__amqp_push_props(L, ev.props); else lua_pushnil(L);
    return 8;
  }
  push_method_name(L, ev.method.id);
  lua_pushinteger(L, ev.channel);
  push_event(L, &ev);
  return 3;
}

/* ===== sending ===== */

static amqp_bytes_t arg_bytes(lua_State *L, int idx) {
  amqp_bytes_t b;
  b.bytes = (void *)luaL_optlstring(L, idx, "", &b.len);
  return b;
}

static amqp_channel_t arg_channel(lua_State *L) {
  lua_Integer ch = luaL_checkinteger(L, 2);
  if (ch < 1 || ch > 65535) luaL_argerror(L, 2, "channel out of range");
  return (amqp_channel_t)ch;
}

#define SEND(L, u, ch, id, m) do { tide__amqp *c_ = live(L, u); if (!c_) return 2; \
    return sent(L, u, tide__amqp_send_method(c_, ch, id, &(m))); } while (0)

static int conn_channel_open(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_open_t m = { amqp_empty_bytes };
  SEND(L, u, arg_channel(L), AMQP_CHANNEL_OPEN_METHOD, m);
}

static int conn_channel_close(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_close_t m = { (uint16_t)luaL_optinteger(L, 3, 200), arg_bytes(L, 4), 0, 0 };
  SEND(L, u, arg_channel(L), AMQP_CHANNEL_CLOSE_METHOD, m);
}

static int conn_channel_close_ok(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_close_ok_t m = { 0 };
  SEND(L, u, arg_channel(L), AMQP_CHANNEL_CLOSE_OK_METHOD, m);
}

static int conn_qos(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_basic_qos_t m = { 0, (uint16_t)luaL_checkinteger(L, 3), 0 };
  SEND(L, u, arg_channel(L), AMQP_BASIC_QOS_METHOD, m);
}

static int conn_confirm(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_confirm_select_t m = { 0 };
  SEND(L, u, arg_channel(L), AMQP_CONFIRM_SELECT_METHOD, m);
}

static int conn_ack(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_t ch = arg_channel(L);
  uint64_t tag = (uint64_t)luaL_checknumber(L, 3);
  tide__amqp *c = live(L, u);
  if (c == NULL) return 2;
  return sent(L, u, tide__amqp_send_ack(c, ch, tag, lua_toboolean(L, 4)));
}

static int conn_nack(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_basic_nack_t m = { (uint64_t)luaL_checknumber(L, 3), lua_toboolean(L, 4), lua_toboolean(L, 5) };
  SEND(L, u, arg_channel(L), AMQP_BASIC_NACK_METHOD, m);
}

static int conn_cancel(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_basic_cancel_t m = { arg_bytes(L, 3), 0 };
  SEND(L, u, arg_channel(L), AMQP_BASIC_CANCEL_METHOD, m);
}

static int conn_delete(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_queue_delete_t m = { 0, arg_bytes(L, 3), 0, 0, 0 };
  SEND(L, u, arg_channel(L), AMQP_QUEUE_DELETE_METHOD, m);
}

static int conn_purge(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_queue_purge_t m = { 0, arg_bytes(L, 3), 0 };
  SEND(L, u, arg_channel(L), AMQP_QUEUE_PURGE_METHOD, m);
}

/* Sends a method whose field table is built first; the pool goes afterwards. */
static int send_with_table(lua_State *L, conn_ud *u, amqp_channel_t ch, amqp_method_number_t id, void *m,
                           tide__amqp_builder *bd, int rc) {
  if (rc != 0) { empty_amqp_pool(&bd->pool); return luaL_error(L, "%s", bd->err); }
  tide__amqp *c = live(L, u);
  if (c == NULL) { empty_amqp_pool(&bd->pool); return 2; }
  rc = tide__amqp_send_method(c, ch, id, m);
  empty_amqp_pool(&bd->pool);
  return sent(L, u, rc);
}

/* conn:declare(ch, queue, passive, durable, exclusive, auto_delete, args) */
static int conn_declare(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_t ch = arg_channel(L);
  tide__amqp_builder bd;
  init_amqp_pool(&bd.pool, 4096);
  amqp_queue_declare_t m = { 0, arg_bytes(L, 3), lua_toboolean(L, 4), lua_toboolean(L, 5), lua_toboolean(L, 6),
                             lua_toboolean(L, 7), 0, amqp_empty_table };
  int rc = tide__amqp_opt_table(L, &bd, 8, &m.arguments, "arguments");
  return send_with_table(L, u, ch, AMQP_QUEUE_DECLARE_METHOD, &m, &bd, rc);
}

/* conn:consume(ch, queue, tag, exclusive, args) */
static int conn_consume(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_t ch = arg_channel(L);
  tide__amqp_builder bd;
  init_amqp_pool(&bd.pool, 4096);
  amqp_basic_consume_t m = { 0, arg_bytes(L, 3), arg_bytes(L, 4), 0, 0, lua_toboolean(L, 5), 0, amqp_empty_table };
  int rc = tide__amqp_opt_table(L, &bd, 6, &m.arguments, "arguments");
  return send_with_table(L, u, ch, AMQP_BASIC_CONSUME_METHOD, &m, &bd, rc);
}

/* conn:publish(ch, exchange, routing_key, body, properties) */
static int conn_publish(lua_State *L) {
  conn_ud *u = check_conn(L);
  amqp_channel_t ch = arg_channel(L);
  size_t len;
  const char *body = luaL_checklstring(L, 5, &len);
  tide__amqp_builder bd;
  init_amqp_pool(&bd.pool, 4096);
  amqp_basic_properties_t props;
  int rc = tide__amqp_build_props(L, &bd, 6, &props);
  if (rc != 0) { empty_amqp_pool(&bd.pool); return luaL_error(L, "%s", bd.err); }
  tide__amqp *c = live(L, u);
  if (c == NULL) { empty_amqp_pool(&bd.pool); return 2; }
  amqp_basic_publish_t m = { 0, arg_bytes(L, 3), arg_bytes(L, 4), 0, 0 };
  rc = tide__amqp_send_publish(c, ch, &m, &props, body, len);
  empty_amqp_pool(&bd.pool);
  return sent(L, u, rc);
}

static int conn_info(lua_State *L) {
  conn_ud *u = check_conn(L);
  if (u->c == NULL) return 0;
  lua_createtable(L, 0, 4);
  set_num(L, "heartbeat", tide__amqp_heartbeat(u->c));
  set_num(L, "frame_max", tide__amqp_frame_max(u->c));
  set_num(L, "channel_max", tide__amqp_channel_max(u->c));
  set_num(L, "pending", (double)tide__amqp_pending(u->c));
  return 1;
}

/* close() and __gc: idempotent. */
static int conn_close(lua_State *L) {
  close_conn(check_conn(L));
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn_ud *u = check_conn(L);
  lua_pushfstring(L, "tide.AmqpConn %d (%s)", u->id, u->c == NULL ? "closed" : *tide__amqp_error(u->c) ? "lost" : "open");
  return 1;
}

/* ===== connecting, off the loop ===== */

static void free_req(connect_req *r) {
  if (r->c) tide__amqp_close(r->c);          /* (not attached to a loop: any thread may) */
  free(r->strings);
  free(r);
}

/* A connect's own thread: connects and logs in (blocking, up to its
 * timeout), then hands the result to the loop, or, the loop gone, closes
 * it and lets the binding go. */
static void *connect_thread(void *arg) {
  connect_req *r = arg;
  binding *b = r->b;
  r->c = tide__amqp_open(&r->cfg, r->err, sizeof r->err);
  uv_mutex_lock(&b->lock);
  int orphan = b->closed;
  if (!orphan) {
    r->fnext = b->finished;
    b->finished = r;
    uv_async_send(&b->async);
  }
  uv_mutex_unlock(&b->lock);
  if (orphan) {
    free_req(r);
    binding_unref(b);
  }
  return NULL;
}

/* ready(id, "open", conn, nil) or ready(id, "open", nil, err): the
 * connection's userdata is made here, inside the protected call; r->c is
 * cleared once the userdata owns it, so a failure leaves it to the caller. */
static int push_open(lua_State *L, ready_args *a) {
  connect_req *r = a->open;
  binding *b = a->b;
  lua_pushinteger(L, r->id);
  lua_pushliteral(L, "open");
  if (r->c == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, r->err);
    return 4;
  }
  conn_ud *u = lua_newuserdata(L, sizeof *u);
  memset(u, 0, sizeof *u);
  u->b = b;
  u->id = r->id;
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
  lua_createtable(L, 2, 0);                      /* strings reused by push_cached */
  lua_setfenv(L, -2);
  int rc = tide__amqp_attach(r->c, b->loop, on_io, u);
  if (rc != 0) {                                 /* the connection went with its handles' close */
    r->c = NULL;                                 /* (connect_done closing it again closed them twice) */
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot watch the socket: %s", uv_strerror(rc));
    return 4;
  }
  u->c = r->c;
  r->c = NULL;                                   /* the userdata owns it now */
  u->next = b->conns;
  if (u->next) u->next->prev = u;
  b->conns = u;
  lua_pushnil(L);
  return 4;
}

/* On the loop: a connect's thread finished; ready(id, "open", ...). */
static void connect_done(connect_req *r) {
  binding *b = r->b;
  ready_args a = { b, r->id, "open", r };
  call_ready(&a);                         /* takes r->c over when it made a connection of it */
  free_req(r);
  binding_unref(b);
}

/* The async handle: takes what the threads handed over, oldest first. */
static void on_connected(uv_async_t *h) {
  binding *b = h->data;
  uv_mutex_lock(&b->lock);
  connect_req *list = NULL, *r = b->finished;
  b->finished = NULL;
  uv_mutex_unlock(&b->lock);
  while (r) {                                  /* (handed over newest first) */
    connect_req *next = r->fnext;
    r->fnext = list;
    list = r;
    r = next;
  }
  while (list && b->loop) {
    r = list;
    list = r->fnext;
    connect_done(r);
  }
  while (list) {          /* the loop closed under a ready callback: core.c refuses that; a guard */
    r = list;
    list = r->fnext;
    free_req(r);
    binding_unref(b);
  }
}

static binding *get(lua_State *L) {
  binding_ud *bu = luaL_checkudata(L, lua_upvalueindex(1), BINDING_MT);
  if (bu->b == NULL || bu->b->loop == NULL) luaL_error(L, "tide: the loop is closed");
  return bu->b;
}

static char *cfg_string(lua_State *L, const char *key, char **dst, char *p) {
  lua_getfield(L, 2, key);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (s == NULL) luaL_error(L, "amqp_connect: '%s' expected", key);
  memcpy(p, s, len + 1);
  *dst = p;
  lua_pop(L, 1);
  return p + len + 1;
}

static int cfg_int(lua_State *L, const char *key) {
  lua_getfield(L, 2, key);
  int v = (int)luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* A number of ms from cfg, clamped to what an int holds (3e9 ms became a
 * negative timeout, "invalid parameter"; 1e300 became 0: "timed out"). */
static int cfg_ms(lua_State *L, const char *key) {
  lua_getfield(L, 2, key);
  lua_Number v = luaL_checknumber(L, -1);
  lua_pop(L, 1);
  if (!(v > 0)) return 0;
  return v < INT_MAX ? (int)v : INT_MAX;
}

/* amqp_connect(id, cfg): starts connecting; the answer comes through ready. */
static int l_connect(lua_State *L) {
  binding *b = get(L);
  int id = (int)luaL_checkinteger(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  static const char *keys[] = { "host", "vhost", "user", "password", "name" };
  size_t total = 0;
  for (int i = 0; i < 5; i++) {
    lua_getfield(L, 2, keys[i]);
    size_t len = 0;
    if (lua_tolstring(L, -1, &len) == NULL) return luaL_error(L, "amqp_connect: '%s' expected", keys[i]);
    total += len + 1;
    lua_pop(L, 1);
  }
  connect_req *r = calloc(1, sizeof *r);
  char *block = malloc(total);
  if (r == NULL || block == NULL) { free(r); free(block); return luaL_error(L, "amqp_connect: out of memory"); }
  char *host, *vhost, *user, *password, *name, *p = block;
  p = cfg_string(L, "host", &host, p);
  p = cfg_string(L, "vhost", &vhost, p);
  p = cfg_string(L, "user", &user, p);
  p = cfg_string(L, "password", &password, p);
  cfg_string(L, "name", &name, p);
  r->strings = block;
  r->cfg = (tide__amqp_config){ host, cfg_int(L, "port"), vhost, user, password, name,
                                cfg_int(L, "heartbeat"), cfg_ms(L, "timeout") };
  r->b = b;
  r->id = id;
  uv_mutex_lock(&b->lock);
  b->refs++;                                   /* the thread's */
  uv_mutex_unlock(&b->lock);
  pthread_attr_t attr;
  pthread_t thread;
  int rc = pthread_attr_init(&attr);
  if (rc == 0) {
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    rc = pthread_create(&thread, &attr, connect_thread, r);
    pthread_attr_destroy(&attr);
  }
  if (rc != 0) {
    free(block);
    free(r);
    binding_unref(b);
    return luaL_error(L, "amqp_connect: cannot start a thread: %s", strerror(rc));
  }
  return 0;
}

static int l_on_ready(lua_State *L) {
  tide__keep_function(L, 1, &get(L)->ready_ref);
  return 0;
}

static const luaL_Reg conn_methods[] = {
  { "next", conn_next }, { "channel_open", conn_channel_open }, { "channel_close", conn_channel_close },
  { "channel_close_ok", conn_channel_close_ok }, { "qos", conn_qos }, { "declare", conn_declare },
  { "delete", conn_delete }, { "purge", conn_purge }, { "confirm", conn_confirm },
  { "consume", conn_consume }, { "cancel", conn_cancel }, { "ack", conn_ack }, { "nack", conn_nack },
  { "publish", conn_publish }, { "info", conn_info }, { "close", conn_close }, { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "amqp_connect", l_connect }, { "amqp_on_ready", l_on_ready }, { NULL, NULL }
};

static void on_async_closed(uv_handle_t *h) { binding_unref(h->data); }

/* Closes every connection and gives up connects under way (before the loop closes). */
void tide__close_amqp(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, BINDING_KEY);
  binding_ud *bu = luaL_testudata(L, -1, BINDING_MT);
  if (bu && bu->b) {
    binding *b = bu->b;
    while (b->conns) close_conn(b->conns);
    uv_mutex_lock(&b->lock);
    b->closed = 1;                                      /* threads still connecting clean up after themselves */
    connect_req *r = b->finished;
    b->finished = NULL;
    uv_mutex_unlock(&b->lock);
    while (r) {                                         /* handed over, never taken: closed here */
      connect_req *next = r->fnext;
      free_req(r);
      binding_unref(b);
      r = next;
    }
    b->loop = NULL;
    tide__close((uv_handle_t *)&b->async, on_async_closed);
    luaL_unref(L, LUA_REGISTRYINDEX, b->ready_ref);
    b->ready_ref = LUA_NOREF;
    tide__caller_free(L, &b->caller);
    bu->b = NULL;
    binding_unref(b);
  }
  lua_pop(L, 1);
}

/* Sets amqp_connect and amqp_on_ready into the table at the top of the stack. */
void tide__open_amqp(lua_State *L, uv_loop_t *loop, tide__watchdog *wd) {
  tide__new_type(L, CONN_MT, conn_methods, conn_close, conn_tostring);
  binding *b = calloc(1, sizeof *b);
  if (b == NULL) luaL_error(L, "tide: out of memory");
  if (uv_mutex_init(&b->lock) != 0) { free(b); luaL_error(L, "tide: cannot make a mutex"); }
  if (uv_async_init(loop, &b->async, on_connected) != 0) {
    uv_mutex_destroy(&b->lock);
    free(b);
    luaL_error(L, "tide: cannot make an async handle");
  }
  b->async.data = b;
  uv_unref((uv_handle_t *)&b->async);                 /* a connect keeps no loop alive (above) */
  b->loop = loop;
  b->refs = 2;                                        /* the module's and the async handle's */
  b->ready_ref = LUA_NOREF;
  tide__caller_init(L, &b->caller, wd);
  binding_ud *bu = lua_newuserdata(L, sizeof *bu);
  bu->b = b;
  tide__publish_binding(L, BINDING_MT, NULL, BINDING_KEY, funcs);
}
