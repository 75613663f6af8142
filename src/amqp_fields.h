/* amqp_fields.h — AMQP field tables and message properties to Lua values and back (the RabbitMQ binding's codec).
 *
 * AMQP -> Lua (never fails; allocates, so it may raise like any push):
 *   booleans stay booleans; every integer kind, float, double, timestamp and
 *   decimal becomes a number (64-bit integers past 2^53 lose precision);
 *   strings and byte arrays become strings (binary-safe); arrays become
 *   sequences, tables become tables (a key seen twice: the last wins); void
 *   becomes nil.  Tables nested deeper than TIDE_AMQP_FIELDS_DEPTH are cut:
 *   the field reads "(nested too deep)".
 * Lua -> AMQP (errors returned with a message naming the path, not raised):
 *   booleans; numbers that are integers below 9.2e18 in magnitude go as
 *   64-bit integers, others as doubles; strings as long strings; a table
 *   with #t > 0 as an array of t[1..#t] (its other keys are not sent), any
 *   other table as a field table whose keys must be strings.  Anything else,
 *   and nesting past TIDE_AMQP_FIELDS_DEPTH, is an error.  The built
 *   structures live in the builder's pool, but strings point into the Lua
 *   values: keep them anchored (in the argument tables) until sent.
 * Properties: the nine short-string properties, delivery_mode, priority,
 * timestamp and headers (a field table); others are neither read nor set.
 *
 * Only call these from the thread that owns the Lua state.
 */
#ifndef TIDE_AMQP_FIELDS_H
#define TIDE_AMQP_FIELDS_H

#include <amqp.h>
#include <amqp_framing.h>
#include <lua.h>

#define TIDE_AMQP_FIELDS_DEPTH 32         /* field tables nested deeper are cut */

/* Memory for what the Lua -> AMQP side builds, and its last error.  The
 * caller does init_amqp_pool(&bd.pool, ...) before and empty_amqp_pool
 * after sending. */
typedef struct tide__amqp_builder {
  amqp_pool_t pool;
  char err[200];
} tide__amqp_builder;

/* Pushes the bytes as a string (binary-safe; an empty one may be NULL). */
static inline void tide__amqp_push_bytes(lua_State *L, amqp_bytes_t b) {
  lua_pushlstring(L, b.len ? (const char *)b.bytes : "", b.len);
}

/* Pushes a field table as a Lua table. */
void tide__amqp_push_table(lua_State *L, const amqp_table_t *t);

/* Pushes a message's properties as a table holding those present. */
void tide__amqp_push_props(lua_State *L, const amqp_basic_properties_t *p);

/* The field table at idx into *out: nil (or none) gives the empty table;
 * 0, or -1 with bd->err naming `path` ("arguments.x-y: ..."). */
int tide__amqp_opt_table(lua_State *L, tide__amqp_builder *bd, int idx, amqp_table_t *out, const char *path);

/* The properties table at idx (nil or none: no properties) into *p;
 * 0, or -1 with bd->err (a header that cannot be sent). */
int tide__amqp_build_props(lua_State *L, tide__amqp_builder *bd, int idx, amqp_basic_properties_t *p);

#endif
