--- tide.watchdog — reports a loop held too long by one call (see src/watchdog.h).
--
-- A coroutine task that never yields holds the loop thread.  The C core's
-- watchdog thread notices a call into Lua that has run `watchdog` ms
-- (default 1000) and has the loop thread run a one-shot debug hook, which
-- calls `stalled` below inside the code that holds the loop: it names the
-- task (or callback) and where it is, once per stall, to the error sink.
-- Hooks do not run inside JIT-compiled code or C functions: such a stall is
-- reported when the call ends, without a name.  After SIGINT or SIGTERM and
-- the grace period, a loop still blocked ends the process (130 or 143).
local core = require "tide.core"
local S = require "tide.engine.sched"
local log = require "tide.engine.log"
local fields = require "tide.engine.fields"
local OPT, ID = fields.OPT, fields.ID
local check = require "tide.engine.check"

local fire = require "tide.engine.fire"

local traceback, getinfo = debug.traceback, debug.getinfo

local M = { config = { stall = 1000 } }

--- Where the timer callback on this stack was defined: the function just
--- above tide.engine.fire's run (a tide.every's callback is tail-called
--- from there, and takes that frame), or nil when fire.run is not on it.
local function callback_place()
  for level = 2, 1000 do
    local info = getinfo(level, "f")
    if not info then return nil end
    if info.func == fire.run then
      local cb = getinfo(level - 1, "S")
      if cb.what == "C" then return "a C function" end
      return ("function at %s:%d"):format(cb.short_src, cb.linedefined)
    end
  end
end

--- The line that names what runs now: a task, a callback or the engine.
--- A timer's callback that has no task is named as one: S.current() would
--- make it a task (fire.promote), from inside this hook.
local function running_now()
  local callback = S.in_callback()
  local what
  if callback then
    what = callback
  elseif fire.callback() then
    what = ("a timer callback (%s)"):format(callback_place() or "an unknown function")
  elseif S.current() then
    local t = S.current()
    local o = t[OPT]
    local name = o and o.name
    what = ("task %d%s"):format(t[ID], name and (" '" .. name .. "'") or "")
    if o and o.report == fire.REPORT then    -- a timer callback's, made when it waited
      what = ("%s (a timer callback, %s)"):format(what, callback_place() or "an unknown function")
    end
    -- A task that runs the work of several owners in turn (a flow's
    -- worker) says which it runs now (o.describe): the stall is that one's.
    local describe = o and o.describe
    if describe then
      local ok, doing = pcall(describe, t)
      if ok and doing then what = ("'%s' (on %s)"):format(doing, what) end
    end
  else
    what = "tide's engine"
  end
  return what
end

--- The first place in a traceback that is not tide's own or C.
local function user_place(tb)
  local first
  for place in tb:gmatch("\n%s*([^\n]-:%d+):") do
    if not place:find("^lua/tide/") then return place end
    first = first or place
  end
  return first or "an unknown place"
end

--- Called by the core (from its hook, or after the call ended): `ms` the
--- loop has been held, `hooked` true when this runs inside the code that
--- holds it.  Returns the line for the exit message.
local function stalled(ms, hooked)
  local line
  if hooked then
    local tb = traceback("", 3)            -- 1: here, 2: the C trampoline, 3: the code held
    local where = user_place(tb)
    line = ("the loop has not turned for %d ms; running now: %s, at %s"):format(ms, running_now(), where)
    log.warn("the watchdog", line, "stall: " .. line .. tb)
  else
    line = ("the loop did not turn for %d ms, in code no hook reached (JIT-compiled code or a C function)")
      :format(ms)
    log.warn("the watchdog", line, "stall: " .. line)
  end
  return line
end
core.set_stall_reporter(stalled)

--- Checks the watchdog option of tide.configure (errors name `fname` at `level`).
function M.check(fname, opts, level)
  local ms = opts.watchdog
  if ms ~= nil and not check.is_ms(ms) then
    check.opt_error(fname, "watchdog", "non-negative number of ms (0: off)", ms, (level or 2) + 1)
  end
end

--- Applies it (after M.check).
function M.apply(opts)
  local ms = opts.watchdog
  if ms == nil then return end
  M.config.stall = ms
  core.watchdog(ms)
end

return M
