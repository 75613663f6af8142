--- tide.finalizers — a __gc finalizer that raises is caught and reported, on every LuaJIT.
--
-- Lua 5.1, and LuaJIT releases before 2023-04 (Debian 12's among them),
-- rethrow a finalizer's error from whatever allocation ran the collector
-- step that called it: unrelated code fails, and when that point is the
-- exit of a JIT-compiled trace, that LuaJIT crashes (a segmentation fault,
-- in plain Lua: spec/finalizer_spec.lua shows it).  Newer LuaJIT prints such
-- an error and goes on.  So tide wraps the finalizers that Lua code sets
-- through the three ways it has to make them:
--   - newproxy(true): the first __gc stored into the new metatable;
--   - ffi.gc(cdata, fn);
--   - ffi.metatype(ct, mt): the __gc that mt holds then (replaced in mt by
--     its wrapped self; LuaJIT reads it at each ffi.new of a struct).
-- A wrapped finalizer, run by the collector, runs protected and its error goes to the error sink
-- ("a __gc finalizer").  Finalizers set otherwise (debug.setmetatable, C
-- modules) are not wrapped: the engine survives their errors (see
-- tide.engine.sched, "interruptions"), but LuaJIT's crash at a trace exit
-- only a newer LuaJIT avoids.
--
-- M.running() tells whether a wrapped finalizer is running now: tide's job
-- store calls refuse to run inside one (tide.jobs.queue, check_q), before
-- they touch anything.  The collector runs a finalizer amid whatever code
-- allocated: that code may be in the middle of a statement on the store's
-- one connection, or inside its own transaction, which the finalizer's
-- statement would join (and vanish with, if it rolled back), and a statement
-- cannot wait for the network there (no yield crosses the collector's C
-- call).  And a finalizer cannot be trusted to walk tables: on LuaJIT before
-- 2023-08 (Debian 12's; fixed upstream by "Ensure forward progress on trace
-- exit to BC_ITERN"), a pairs() or next() loop that was JIT-compiled for
-- other tables, run inside a finalizer, may never end: a guard of its trace
-- fails, the trace exits back to its own loop head, and only a side trace
-- (which LuaJIT never records inside a finalizer) would get past it, so the
-- process spins inside LuaJIT, where no hook or profiler sees it
-- (spec/finalizer_spec.lua, "finalizers and the job store").  Store calls
-- check first, before any such loop (encoding a job's args is one).  A
-- finalizer of your own should only release things, or hand work to a task:
-- tide.spawn(function() ... end).
local log = require "tide.engine.log"

local xpcall, rawset, rawget, type, setmetatable, getmetatable = xpcall, rawset, rawget, type, setmetatable,
                                                                 getmetatable
local tostring, pcall, getinfo, concat = tostring, pcall, debug.getinfo, table.concat

local M = {}

-- The finalizer runs with the collector stopped (LuaJIT's rule), so this
-- allocates without running another finalizer; the sink is called protected.
local function report(err)
  log.report("a __gc finalizer", err, err)
end

-- The finalizer's error with a traceback of its own frames only, down to
-- the xpcall that runs it: below is whatever code the collector stopped,
-- and with the JIT on that may be a compiled trace's exit (LuaJIT runs
-- finalizers there too), whose frame is only half restored: walked by
-- debug.traceback, it crashed LuaJIT 2.1 (a SEGV in luaL_traceback,
-- gc_storm under ASan: ~1 run in 15, none in 60 without it).
local function own_traceback(err)
  local ok, msg = pcall(tostring, err)
  local lines = { ok and msg or "(error object with a failing __tostring)", "stack traceback (the finalizer's frames):" }
  for level = 2, 22 do
    local info = getinfo(level, "Slf")
    if info == nil or info.func == xpcall then break end
    lines[#lines + 1] = ("\t%s:%d"):format(info.short_src, info.currentline)
  end
  return concat(lines, "\n")
end

-- Wrapped finalizers running now (0 or 1: the collector starts no other
-- while one runs, but a count stays right whatever LuaJIT does).
local running = 0

--- True while a wrapped finalizer runs (see the header).
function M.running() return running > 0 end

local isyieldable = coroutine.isyieldable

--- fn, wrapped: where the collector calls it (it cannot yield there), it
--- runs protected, its error is reported, and it counts as a finalizer
--- (M.running).  A task may call the same function itself (a handle's
--- explicit close, read back from the metatable): that call is fn's own,
--- its errors raised to the caller; counted, it would stay counted across
--- a wait in it, and every other task's store calls would be refused.
local function protect(fn)
  return function(o)
    if isyieldable() then return fn(o) end
    running = running + 1
    local ok, err = xpcall(fn, own_traceback, o)
    running = running - 1
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
  local raw_metatype = ffi.metatype
  ffi.metatype = function(ct, mt)
    if type(mt) == "table" then
      local fn = rawget(mt, "__gc")
      if type(fn) == "function" then rawset(mt, "__gc", protect(fn)) end
    end
    return raw_metatype(ct, mt)
  end
end
return M
