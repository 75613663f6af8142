/* amqp_fields.c — AMQP field tables and message properties to Lua values and back (see amqp_fields.h).
 *
 * Used by lua_amqp.c for events, deliveries and the arguments of the
 * methods it sends; no connection here, so spec/fuzz/fuzz_amqpfields.c can
 * drive it alone.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "amqp_fields.h"

#define MAX_DEPTH TIDE_AMQP_FIELDS_DEPTH

/* ===== field tables: AMQP -> Lua ===== */

static void push_table(lua_State *L, const amqp_table_t *t, int depth);

static void push_field(lua_State *L, const amqp_field_value_t *v, int depth) {
  if (depth > MAX_DEPTH) { lua_pushliteral(L, "(nested too deep)"); return; }
  switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: lua_pushboolean(L, v->value.boolean); break;
    case AMQP_FIELD_KIND_I8: lua_pushnumber(L, v->value.i8); break;
    case AMQP_FIELD_KIND_U8: lua_pushnumber(L, v->value.u8); break;
    case AMQP_FIELD_KIND_I16: lua_pushnumber(L, v->value.i16); break;
    case AMQP_FIELD_KIND_U16: lua_pushnumber(L, v->value.u16); break;
    case AMQP_FIELD_KIND_I32: lua_pushnumber(L, v->value.i32); break;
    case AMQP_FIELD_KIND_U32: lua_pushnumber(L, v->value.u32); break;
    case AMQP_FIELD_KIND_I64: lua_pushnumber(L, (lua_Number)v->value.i64); break;
    case AMQP_FIELD_KIND_U64: case AMQP_FIELD_KIND_TIMESTAMP: lua_pushnumber(L, (lua_Number)v->value.u64); break;
    case AMQP_FIELD_KIND_F32: lua_pushnumber(L, v->value.f32); break;
    case AMQP_FIELD_KIND_F64: lua_pushnumber(L, v->value.f64); break;
    case AMQP_FIELD_KIND_DECIMAL:
      lua_pushnumber(L, v->value.decimal.value / pow(10, v->value.decimal.decimals));
      break;
    case AMQP_FIELD_KIND_UTF8: case AMQP_FIELD_KIND_BYTES: tide__amqp_push_bytes(L, v->value.bytes); break;
    case AMQP_FIELD_KIND_ARRAY:
      lua_checkstack(L, 3);
      lua_createtable(L, v->value.array.num_entries, 0);
      for (int i = 0; i < v->value.array.num_entries; i++) {
        push_field(L, &v->value.array.entries[i], depth + 1);
        lua_rawseti(L, -2, i + 1);
      }
      break;
    case AMQP_FIELD_KIND_TABLE: push_table(L, &v->value.table, depth + 1); break;
    default: lua_pushnil(L); break;                     /* void */
  }
}

static void push_table(lua_State *L, const amqp_table_t *t, int depth) {
  lua_checkstack(L, 4);
  lua_createtable(L, 0, t->num_entries);
  for (int i = 0; i < t->num_entries; i++) {
    tide__amqp_push_bytes(L, t->entries[i].key);
    push_field(L, &t->entries[i].value, depth);
    lua_rawset(L, -3);
  }
}

void tide__amqp_push_table(lua_State *L, const amqp_table_t *t) {
  push_table(L, t, 1);
}

#define PROPS(X) \
  X(content_type, AMQP_BASIC_CONTENT_TYPE_FLAG) X(content_encoding, AMQP_BASIC_CONTENT_ENCODING_FLAG) \
  X(correlation_id, AMQP_BASIC_CORRELATION_ID_FLAG) X(reply_to, AMQP_BASIC_REPLY_TO_FLAG) \
  X(expiration, AMQP_BASIC_EXPIRATION_FLAG) X(message_id, AMQP_BASIC_MESSAGE_ID_FLAG) \
  X(type, AMQP_BASIC_TYPE_FLAG) X(user_id, AMQP_BASIC_USER_ID_FLAG) X(app_id, AMQP_BASIC_APP_ID_FLAG)

/* The table is made at its final size: one field per property present (a
 * message with only delivery_mode, the usual case, costs one hash slot, not
 * four: a table per delivery is a good part of what the collector sweeps). */
void tide__amqp_push_props(lua_State *L, const amqp_basic_properties_t *p) {
  lua_createtable(L, 0, __builtin_popcount(p->_flags & 0xffff));
#define X(name, flag) if (p->_flags & flag) { tide__amqp_push_bytes(L, p->name); lua_setfield(L, -2, #name); }
  PROPS(X)
#undef X
  if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) { lua_pushnumber(L, p->delivery_mode); lua_setfield(L, -2, "delivery_mode"); }
  if (p->_flags & AMQP_BASIC_PRIORITY_FLAG) { lua_pushnumber(L, p->priority); lua_setfield(L, -2, "priority"); }
  if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) { lua_pushnumber(L, (lua_Number)p->timestamp); lua_setfield(L, -2, "timestamp"); }
  if (p->_flags & AMQP_BASIC_HEADERS_FLAG) { push_table(L, &p->headers, 1); lua_setfield(L, -2, "headers"); }
}

/* ===== field tables: Lua -> AMQP (memory from a pool; errors returned, not raised) ===== */

typedef tide__amqp_builder builder;

static int build_table(lua_State *L, builder *bd, int idx, amqp_table_t *out, int depth, const char *path);

static int build_field(lua_State *L, builder *bd, int idx, amqp_field_value_t *v, int depth, const char *path) {
  if (depth > MAX_DEPTH) { snprintf(bd->err, sizeof bd->err, "%s: nested too deep", path); return -1; }
  switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN: v->kind = AMQP_FIELD_KIND_BOOLEAN; v->value.boolean = lua_toboolean(L, idx); return 0;
    case LUA_TNUMBER: {
      double d = lua_tonumber(L, idx);
      if (d == floor(d) && fabs(d) < 9.2e18) { v->kind = AMQP_FIELD_KIND_I64; v->value.i64 = (int64_t)d; }
      else { v->kind = AMQP_FIELD_KIND_F64; v->value.f64 = d; }
      return 0;
    }
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      v->kind = AMQP_FIELD_KIND_UTF8;
      v->value.bytes.len = len;
      v->value.bytes.bytes = (void *)s;                 /* anchored by the caller's table */
      return 0;
    }
    case LUA_TTABLE: {
      size_t n = lua_objlen(L, idx);
      if (n == 0) { v->kind = AMQP_FIELD_KIND_TABLE; return build_table(L, bd, idx, &v->value.table, depth + 1, path); }
      v->kind = AMQP_FIELD_KIND_ARRAY;
      v->value.array.num_entries = (int)n;
      v->value.array.entries = amqp_pool_alloc(&bd->pool, sizeof(amqp_field_value_t) * n);
      if (v->value.array.entries == NULL) { snprintf(bd->err, sizeof bd->err, "out of memory"); return -1; }
      lua_checkstack(L, 3);
      for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (int)i + 1);
        int rc = build_field(L, bd, lua_gettop(L), &v->value.array.entries[i], depth + 1, path);
        lua_pop(L, 1);
        if (rc != 0) return rc;
      }
      return 0;
    }
    default:
      snprintf(bd->err, sizeof bd->err, "%s: %s cannot be sent (string, number, boolean or table expected)",
               path, lua_typename(L, lua_type(L, idx)));
      return -1;
  }
}

static int build_table(lua_State *L, builder *bd, int idx, amqp_table_t *out, int depth, const char *path) {
  int n = 0;
  lua_checkstack(L, 4);
  lua_pushnil(L);
  while (lua_next(L, idx)) { n++; lua_pop(L, 1); }
  out->num_entries = 0;
  out->entries = n ? amqp_pool_alloc(&bd->pool, sizeof(amqp_table_entry_t) * (size_t)n) : NULL;
  if (n && out->entries == NULL) { snprintf(bd->err, sizeof bd->err, "out of memory"); return -1; }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      snprintf(bd->err, sizeof bd->err, "%s: keys must be strings (got %s)", path, lua_typename(L, lua_type(L, -2)));
      lua_pop(L, 2);
      return -1;
    }
    amqp_table_entry_t *e = &out->entries[out->num_entries++];
    size_t len;
    const char *k = lua_tolstring(L, -2, &len);
    e->key.bytes = (void *)k;
    e->key.len = len;
    char sub[160];
    snprintf(sub, sizeof sub, "%s.%s", path, k);
    if (build_field(L, bd, lua_gettop(L), &e->value, depth, sub) != 0) { lua_pop(L, 2); return -1; }
    lua_pop(L, 1);
  }
  return 0;
}

/* An optional field table at index idx (nil: empty). */
int tide__amqp_opt_table(lua_State *L, builder *bd, int idx, amqp_table_t *out, const char *path) {
  if (lua_isnoneornil(L, idx)) { *out = amqp_empty_table; return 0; }
  if (!lua_istable(L, idx)) { snprintf(bd->err, sizeof bd->err, "%s: table expected", path); return -1; }
  return build_table(L, bd, idx, out, 1, path);
}

static amqp_bytes_t field_bytes(lua_State *L, int tbl, const char *key, amqp_flags_t flag, amqp_flags_t *flags) {
  amqp_bytes_t b = { 0, NULL };
  lua_getfield(L, tbl, key);
  if (lua_type(L, -1) == LUA_TSTRING) {
    b.bytes = (void *)lua_tolstring(L, -1, &b.len);    /* anchored by the properties table */
    *flags |= flag;
  }
  lua_pop(L, 1);
  return b;
}

int tide__amqp_build_props(lua_State *L, builder *bd, int idx, amqp_basic_properties_t *p) {
  memset(p, 0, sizeof *p);
  if (lua_isnoneornil(L, idx)) return 0;
#define X(name, flag) p->name = field_bytes(L, idx, #name, flag, &p->_flags);
  PROPS(X)
#undef X
  lua_getfield(L, idx, "delivery_mode");
  if (lua_isnumber(L, -1)) { p->delivery_mode = (uint8_t)lua_tointeger(L, -1); p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG; }
  lua_getfield(L, idx, "priority");
  if (lua_isnumber(L, -1)) { p->priority = (uint8_t)lua_tointeger(L, -1); p->_flags |= AMQP_BASIC_PRIORITY_FLAG; }
  lua_getfield(L, idx, "timestamp");
  if (lua_isnumber(L, -1)) { p->timestamp = (uint64_t)lua_tonumber(L, -1); p->_flags |= AMQP_BASIC_TIMESTAMP_FLAG; }
  lua_pop(L, 3);
  lua_getfield(L, idx, "headers");
  int rc = 0;
  if (lua_istable(L, -1)) {
    rc = build_table(L, bd, lua_gettop(L), &p->headers, 1, "headers");
    p->_flags |= AMQP_BASIC_HEADERS_FLAG;
  }
  lua_pop(L, 1);                     /* the strings stay anchored by the properties table */
  return rc;
}
