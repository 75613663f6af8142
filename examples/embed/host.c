/* host.c — a C program that embeds LuaJIT, brings its own libuv loop, and runs a tide script on it.
 *
 * Usage: embed-host SCRIPT [ARGS...]
 *
 * The host owns the loop: besides tide's work, it runs a timer of its own
 * (a stand-in for the host's other duties), and it proves that both share
 * the loop by counting its own ticks while the script runs.
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "tide.h"

static int host_ticks;

static void on_host_timer(uv_timer_t *h) {
  host_ticks++;
  if (host_ticks == 3) uv_timer_stop(h);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s SCRIPT [ARGS...]\n", argv[0]);
    return 2;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  uv_timer_t host_timer;
  uv_timer_init(&loop, &host_timer);
  uv_timer_start(&host_timer, on_host_timer, 5, 5);

  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  int status = 1;
  if (tide_open(L, &loop) != 0 || tide_spawn_file(L, argv[1], argc - 2, argv + 2) != 0) {
    fprintf(stderr, "embed-host: %s\n", lua_tostring(L, -1));
    goto done;
  }
  lua_settop(L, 0);
  /* The host drives its own loop: tide's work runs inside it. */
  uv_run(&loop, UV_RUN_DEFAULT);
  /* tide_run finishes what the loop could not wake (none here) and reports
   * the root task's outcome as an exit status. */
  status = tide_run(L);
  printf("embed-host: host timer ticked %d times; script status %d\n", host_ticks, status);
  if (host_ticks != 3) status = 1;
done:
  tide_close(L);
  uv_close((uv_handle_t *)&host_timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);               /* close callbacks free tide's memory */
  lua_close(L);
  if (uv_loop_close(&loop) != 0) {
    fprintf(stderr, "embed-host: handles left open on the loop\n");
    status = 1;
  }
  return status;
}
