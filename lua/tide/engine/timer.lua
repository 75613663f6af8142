--- tide.engine.timer — tide.after and tide.every: callbacks run at a time, once or repeatedly.
--
-- A timer is a key in the engine's timer heap.  When it fires, its callback
-- runs on one of the engine's runners (S.fire), and becomes a task of its
-- own only if it waits (so it may wait, at no cost to those that do not);
-- a failure goes to the error sink, as nobody awaits these callbacks.  A
-- shutdown stops every timer.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"

local type, error, ipairs, setmetatable, getmetatable = type, error, ipairs, setmetatable, getmetatable
local arg_error, is_ms = check.arg_error, check.is_ms

local M = {}

local Timer = { _opt = false }   -- what a timer's fire entry reads as a task's options
local Timer_mt = { __index = Timer, __tostring = function(tm)
  return ("tide.Timer (%s)"):format(tm.key and "pending" or "stopped")
end }

local function fire(tm)
  tm.key = false
  local every = tm.every
  if every then tm.key = S.timer(every, fire, tm) end
  S.fire(tm)
end

local function new_timer(fname, ms, fn, every)
  if not is_ms(ms, every) then
    arg_error(fname, 1, every and "positive number of ms" or "non-negative number of ms", ms, 3)
  end
  if type(fn) ~= "function" then arg_error(fname, 2, "function", fn, 3) end
  if S.shutting_down() then return nil, fname .. ": the loop is shutting down" end
  -- _co: the run queue's view of a fire's entry (see S.fire; its _opt is
  -- Timer's false).  Four keys, made with constants, then filled: LuaJIT's
  -- template of a table constructor holds only the keys whose values are
  -- constants (each other key made the table grow: a rehash per timer), and
  -- four fit a 4-slot hash: 160 bytes a timer against 256 for five or six,
  -- which a million pending timers and the collector's marks of them feel.
  local tm = setmetatable({ fn = false, every = false, key = false, _co = false }, Timer_mt)
  tm.fn = fn
  if every then tm.every = ms end
  tm.key = S.timer(ms, fire, tm)
  return tm
end

--- Runs fn(timer) once, `ms` from now (as a task if it waits).  Returns a timer.
--- During a shutdown: nil and a message (nothing new starts).
function M.after(ms, fn)
  local tm, err = new_timer("tide.after", ms, fn, false)   -- not a tail call: errors blame the caller
  return tm, err
end

--- Runs fn(timer) as a task every `ms` until timer:stop().
function M.every(ms, fn)
  local tm, err = new_timer("tide.every", ms, fn, true)
  return tm, err
end

--- Stops the timer: true, or nil and a message when it was not pending
--- (a tide.after that fired, a timer stopped before).
function Timer.stop(tm)
  if getmetatable(tm) ~= Timer_mt then
    error(("timer:stop: bad self (timer expected, got %s)"):format(check.describe(tm)), 2)
  end
  if not tm.key then return nil, "timer:stop: the timer is not pending (it fired, or was stopped)" end
  S.untimer(tm.key)
  tm.key = false
  return true
end

S.on_shutdown(function()
  for _, tm in ipairs(S.timers_of(fire)) do Timer.stop(tm) end
end)

return M
