/* main.c — the `tide` host binary: LuaJIT + tide, then tide.cli.main(argv). */
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "alloc_cache.h"
#include "lua_call.h"
#include "procs.h"
#include "tide.h"

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], TIDE_PROC_CHILD_ARG) == 0) return tide__proc_child_main();
  tide__proc_in_host = 1;                     /* process mode starts this binary again */
  lua_State *L = lua_newstate(tide__state_alloc, NULL);   /* (small blocks in an arena: alloc_cache.h) */
  if (L == NULL) {
    fprintf(stderr, "tide: cannot create a Lua state (out of memory)\n");
    return 1;
  }
  luaL_openlibs(L);
  int status = 1;
  if (tide_open(L, NULL) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    goto done;
  }
  lua_settop(L, 0);
  lua_pushcfunction(L, tide__traceback);
  lua_getglobal(L, "require");
  lua_pushstring(L, "tide.cli.main");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_remove(L, -2);                          /* the tide.cli table */
  lua_createtable(L, argc, 0);
  for (int i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  if (lua_pcall(L, 1, 1, 1) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
  } else {
    status = (int)lua_tointeger(L, -1);
  }
done:
  if (tide_close(L) != 0) {
    fprintf(stderr, "tide: internal error: libuv handles left open at exit\n");
    if (status == 0) status = 70;
  }
  lua_close(L);
  return status;
}
