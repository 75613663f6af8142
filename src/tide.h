/* tide.h — embedding tide in a C program that runs LuaJIT (and maybe its own libuv loop).
 *
 * The contract, in the order a host uses it:
 *
 *   lua_State *L = luaL_newstate(); luaL_openlibs(L);
 *   tide_open(L, my_loop);                 // or NULL: tide runs a loop of its own
 *   tide_spawn_file(L, "script.lua", argc, argv);
 *   uv_run(my_loop, UV_RUN_DEFAULT);       // or tide_run(L) / tide_step(L)
 *   tide_close(L);  uv_run(my_loop, UV_RUN_DEFAULT);  lua_close(L);
 *
 * lua_close without tide_close closes tide too, as tide_close does (tasks
 * still live are cancelled, "tide was closed (lua_close)", then the handles
 * closed: with a host loop, run it once more afterwards).
 *
 * Every function returns 0 (or a count) on success and a negative number on
 * failure; where a message exists it is left on top of the Lua stack.  Only
 * call these from the thread that runs the loop and owns L.
 */
#ifndef TIDE_H
#define TIDE_H

#include <lua.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define TIDE_API __attribute__((visibility("default")))
#else
#define TIDE_API
#endif

#define TIDE_VERSION_STRING "0.1.0"

/* Loads tide into L, bound to `loop` (NULL: a loop owned by tide), and makes
 * `require "tide"` return it.  Pushes the module table.  Again on the same
 * loop: the same tide.  One loop per Lua state: -1 when tide is open in L on
 * another loop, or was closed in L (tide_close: it is not opened again).
 * 0 on success; -1 with an error message pushed instead.  The functions
 * below, before tide_open: -1, "tide: tide_open was not called on this Lua
 * state". */
TIDE_API int tide_open(lua_State *L, uv_loop_t *loop);

/* Loads the script at `path` and spawns it as the root task, with the global
 * `arg` set as luajit sets it (arg[0] = path, arg[1..argc] = argv).
 * 0 on success (nothing pushed); -1 with "file:line: message" pushed, or
 * with what was wrong with the arguments (path NULL, argc < 0, a NULL among
 * argv[0 .. argc-1]). */
TIDE_API int tide_spawn_file(lua_State *L, const char *path, int argc, char **argv);

/* Runs the loop until no work is left, then cancels what can never wake up
 * (every task still gets its outcome).  With a host loop, the host may run it
 * instead.  Returns the process exit status the `tide` host would use:
 * 0, 1 when the root task failed, 128 + signal after a shutdown by signal. */
TIDE_API int tide_run(lua_State *L);

/* Runs one non-blocking iteration.  Returns 1 while work remains (tide's,
 * thread and process tasks in flight included, and on a host's loop any
 * handle that keeps that loop alive), else 0: tasks that nothing can wake
 * then were cancelled, as by tide_run. */
TIDE_API int tide_step(lua_State *L);

/* Starts a graceful shutdown: nothing new starts, running tasks get
 * `grace_ms`, then are cancelled.  Outcomes are still delivered. */
TIDE_API void tide_shutdown(lua_State *L, double grace_ms);

/* Closes tide's handles.  Tasks still live are cancelled first ("tide was
 * closed (tide_close)"), each outcome delivered to its handle_result and
 * awaiters.  With a host loop, run it once more afterwards so
 * the close callbacks free tide's memory.  Returns uv_loop_close's result
 * for tide's own loop (0: nothing left open), else 0; UV_EBUSY, closing
 * nothing, when called while tide runs the loop or calls into Lua (from a
 * callback: close once the run returned).  Close tide before closing every
 * handle on the loop (uv_walk): a host that closed tide's handles itself
 * gets tide_run's -1 ("the host closed tide's handles on its loop"), and
 * tide_close then closes what is left and keeps the memory of the others. */
TIDE_API int tide_close(lua_State *L);

/* The module entry point for `require "tide"` from stock luajit. */
TIDE_API int luaopen_tide(lua_State *L);

#ifdef __cplusplus
}
#endif
#endif
