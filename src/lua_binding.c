/* lua_binding.c — what every binding file does the same way when it opens: its userdata types, its
 * binding userdata (anchored in the registry, the upvalue of its functions), its callbacks kept in the
 * registry.  Declared in bindings.h. */
#include <lauxlib.h>

#include "bindings.h"

void tide__new_type(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                    lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  if (gc) { lua_pushcfunction(L, gc); lua_setfield(L, -2, "__gc"); }
  if (tostring) { lua_pushcfunction(L, tostring); lua_setfield(L, -2, "__tostring"); }
  lua_pop(L, 1);
}

void tide__publish_binding(lua_State *L, const char *mt, lua_CFunction gc, const char *key,
                           const luaL_Reg *funcs) {
  luaL_newmetatable(L, mt);
  if (gc) { lua_pushcfunction(L, gc); lua_setfield(L, -2, "__gc"); }
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, key);
  luaL_openlib(L, NULL, funcs, 1);                 /* pops the userdata: the upvalue */
}

void tide__keep_function(lua_State *L, int idx, int *ref) {
  luaL_checktype(L, idx, LUA_TFUNCTION);
  lua_pushvalue(L, idx);
  int r = luaL_ref(L, LUA_REGISTRYINDEX);          /* may raise: *ref still holds the old one */
  luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = r;
}
