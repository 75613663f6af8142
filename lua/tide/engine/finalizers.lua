--- tide.finalizers — a __gc finalizer that raises is caught and reported, on every LuaJIT.
--
-- Lua 5.1, and LuaJIT releases before 2023-04 (Debian 12's among them),
-- rethrow a finalizer's error from whatever allocation ran the collector
-- step that called it: unrelated code fails, and when that point is the
-- exit of a JIT-compiled trace, that LuaJIT crashes (a segmentation fault,
-- in plain Lua: spec/finalizer_spec.lua shows it).  Newer LuaJIT prints such
-- an error and goes on.  So tide wraps the finalizers that Lua code sets
-- through the two ways it has to make them:
--   - newproxy(true): the first __gc stored into the new metatable;
--   - ffi.gc(cdata, fn).
-- A wrapped finalizer runs protected and its error goes to the error sink
-- ("a __gc finalizer").  Finalizers set otherwise (debug.setmetatable, C
-- modules) are not wrapped: the engine survives their errors (see
-- tide.engine.sched, "interruptions"), but LuaJIT's crash at a trace exit
-- only a newer LuaJIT avoids.
local log = require "tide.engine.log"

local xpcall, rawset, type, setmetatable, getmetatable = xpcall, rawset, type, setmetatable, getmetatable
local traceback = debug.traceback

local M = {}

-- The finalizer runs with the collector stopped (LuaJIT's rule), so this
-- allocates without running another finalizer; the sink is called protected.
local function report(err)
  log.report("a __gc finalizer", err, err)
end

--- fn, wrapped: runs protected; its error is reported.
local function protect(fn)
  return function(o)
    local ok, err = xpcall(fn, traceback, o)
    if not ok then pcall(report, err) end
  end
end
M.protect = protect

local guard = { __newindex = function(mt, k, v)
  if k == "__gc" and type(v) == "function" then v = protect(v) end
  rawset(mt, k, v)
end }

local raw_newproxy = newproxy
if raw_newproxy then
  _G.newproxy = function(arg)
    local p = raw_newproxy(arg)
    if arg == true then setmetatable(getmetatable(p), guard) end
    return p
  end
end

local ok, ffi = pcall(require, "ffi")
if ok then
  local raw_gc = ffi.gc
  ffi.gc = function(cdata, fn)
    if type(fn) == "function" then fn = protect(fn) end
    return raw_gc(cdata, fn)
  end
end
return M
