/* bindings.h — entry points of the binding files that core.c assembles into tide.core. */
#ifndef TIDE_BINDINGS_H
#define TIDE_BINDINGS_H

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "watchdog.h"

/* lua_binding.c, shared by the binding files: */

/* Registers the metatable `name` (luaL_newmetatable): __index holds methods;
 * __gc and __tostring when given (either may be NULL). */
void tide__new_type(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                    lua_CFunction tostring);

/* The userdata at the top is a binding: gives it the metatable `mt` (with
 * __gc when gc is not NULL), anchors it in the registry at `key`, and sets
 * `funcs` into the table below it, each with the binding as its upvalue.
 * Pops the userdata. */
void tide__publish_binding(lua_State *L, const char *mt, lua_CFunction gc, const char *key,
                           const luaL_Reg *funcs);

/* Keeps the function at idx in the registry at *ref, releasing the one *ref
 * held (a callback set from Lua); raises when idx holds no function. */
void tide__keep_function(lua_State *L, int idx, int *ref);

/* lua_threads.c: sets thread_start, thread_submit, thread_cancel,
 * thread_quarantine, thread_stats, thread_max and cpu_count into the table
 * at the top.  Deliveries tell wd (may be NULL) of their calls into Lua. */
void tide__open_threads(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_threads.c: closes the thread pool, if one runs (before the loop closes). */
void tide__close_threads(lua_State *L);

/* lua_procs.c: sets proc_spawn, proc_submit, proc_stop, proc_kill, proc_ref,
 * proc_pid, proc_close, proc_set_handler and proc_command into the table at
 * the top.  Events tell wd (may be NULL) of their calls into Lua. */
void tide__open_procs(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_procs.c: kills and reaps every child process (before the loop closes). */
void tide__close_procs(lua_State *L);

/* lua_sqlite.c: sets sqlite_open and sqlite_version into the table at the top. */
void tide__open_sqlite(lua_State *L);

/* lua_pg.c: sets pg_connect and pg_on_ready into the table at the top. */
void tide__open_pg(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_pg.c: closes the watch handles of PostgreSQL connections (before the loop closes). */
void tide__close_pg(lua_State *L);

/* lua_amqp.c: sets amqp_connect and amqp_on_ready into the table at the top. */
void tide__open_amqp(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_amqp.c: closes RabbitMQ connections and gives up connects under way (before the loop closes). */
void tide__close_amqp(lua_State *L);

/* lua_http.c: sets http_listen and random_bytes into the table at the top. */
void tide__open_http(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_http.c: closes every HTTP server and its connections (before the loop closes). */
void tide__close_http(lua_State *L);

/* lua_fswatch.c: sets fs_watch into the table at the top. */
void tide__open_fswatch(lua_State *L, uv_loop_t *loop, tide__watchdog *wd);

/* lua_fswatch.c: closes every file watch (before the loop closes). */
void tide__close_fswatch(lua_State *L);

#endif
