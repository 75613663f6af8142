/* lua_exercise.h — for the allocator tests: run(L, code), and a chunk that allocates and frees in every way LuaJIT does. */
#ifndef TIDE_LUA_EXERCISE_H
#define TIDE_LUA_EXERCISE_H

#include <stdio.h>

#include <lauxlib.h>

/* Runs a chunk; 0 (with its error printed as a TAP comment) when it fails. */
static int run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != 0) {
    printf("# %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}


/* Every way LuaJIT allocates and frees (ffi cdata of fixed, variable and
 * large alignment, finalized cdata, long strings, string.buffer, deep
 * coroutine stacks, the string table and a hash part growing and
 * shrinking, traces compiled and flushed). */
static const char *EXERCISE =
  "local ffi = require 'ffi'\n"
  "pcall(ffi.cdef, 'typedef struct { double x, y; } ac_pt; typedef struct { int n; double v[?]; } ac_vls; '"
  "  .. 'typedef struct { int x __attribute__((aligned(64))); } ac_al;')\n"
  "local keep, finalized = {}, 0\n"
  "for i = 1, 20000 do\n"
  "  local p = ffi.new('ac_pt', i, i)\n"
  "  local a = ffi.new('double[?]', i % 300 + 1)\n"
  "  local v = ffi.new('ac_vls', i % 100 + 1)\n"
  "  local al = ffi.new('ac_al')\n"
  "  local g = ffi.gc(ffi.new('int[4]'), function(c) finalized = finalized + 1 end)\n"
  "  local s = string.rep('x', i % 1000) .. i\n"
  "  keep[i % 100 + 1] = { p, a, v, al, g, s }\n"
  "end\n"
  "local big = string.rep('y', 3000000) .. 'z'\n"
  "local has_buf, buffer = pcall(require, 'string.buffer')\n"
  "if has_buf then\n"
  "  local b = buffer.new() for i = 1, 100000 do b:put(i, ',') end\n"
  "  local s = b:tostring() b:reset() b:put(s) b:set(big) b:put('more') b:free()\n"
  "  for i = 1, 1000 do local e = buffer.encode({ i, tostring(i), { i } }) assert(buffer.decode(e)[1] == i) end\n"
  "end\n"
  "local function deep(n) if n == 0 then return 0 end return 1 + deep(n - 1) end\n"
  "for i = 1, 5 do local co = coroutine.wrap(function() return deep(20000) end) assert(co() == 20000) end\n"
  "local t = {} for i = 1, 300000 do t['k' .. i] = i end\n"
  "for i = 1, 300000 do t['k' .. i] = nil end\n"
  "local arr = {} for i = 1, 300000 do arr[i] = i end for i = 300000, 1, -1 do arr[i] = nil end\n"
  "t, big, keep, arr = nil collectgarbage() collectgarbage()\n"
  "jit.flush()\n"
  "assert(finalized > 0)\n";

#endif
