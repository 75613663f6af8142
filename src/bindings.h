/* bindings.h — entry points of the binding files that core.c assembles into tide.core. */
#ifndef TIDE_BINDINGS_H
#define TIDE_BINDINGS_H

#include <lua.h>
#include <uv.h>

/* lua_threads.c: sets thread_start, thread_submit, thread_cancel,
 * thread_quarantine, thread_stats and cpu_count into the table at the top. */
void tide__open_threads(lua_State *L, uv_loop_t *loop);

/* lua_threads.c: closes the thread pool, if one runs (before the loop closes). */
void tide__close_threads(lua_State *L);

/* lua_sqlite.c: sets sqlite_open and sqlite_version into the table at the top. */
void tide__open_sqlite(lua_State *L);

/* lua_pg.c: sets pg_connect and pg_on_ready into the table at the top. */
void tide__open_pg(lua_State *L, uv_loop_t *loop);

/* lua_pg.c: closes the watch handles of PostgreSQL connections (before the loop closes). */
void tide__close_pg(lua_State *L);

/* lua_http.c: sets http_listen and random_bytes into the table at the top. */
void tide__open_http(lua_State *L, uv_loop_t *loop);

/* lua_http.c: closes every HTTP server and its connections (before the loop closes). */
void tide__close_http(lua_State *L);

#endif
