--- tide.engine.timer — tide.after and tide.every: callbacks run at a time, once or repeatedly.
--
-- A timer is a key in the engine's timer heap, whose slots (tide.engine.runq)
-- hold the handler below, the timer's handle and its callback.  When it
-- fires, its callback runs on one of the engine's runners (S.fire,
-- tide.engine.fire), and becomes a task of its own only if it waits (so it
-- may wait, at no cost to those that do not); a failure goes to the error
-- sink, as nobody awaits these callbacks.  A shutdown stops every timer.
--
-- The handle is a small FFI struct (its key, and the period of a
-- tide.every), not a table: with a million timers pending, each handle is
-- an object the collector marks on every cycle, and a struct is marked
-- without being traversed, in 16 bytes instead of a 4-key table's 160
-- (1,000,000 kept: 0.15 s against 0.63 s of CPU to make them).  Without
-- the FFI, or when this module is loaded a second time (a struct's
-- metatable is set once per process), it is a table with the same fields.
--
-- Invariants kept here:
--   - A timer is pending exactly when the slots of its key hold its handle
--     (runq.pending): a key is reused once its timer fired or was stopped,
--     so a handle kept after that never touches the timer now on its key.
--   - tm.key is the key of the timer's latest start (tide.every starts it
--     again, under a new key, each time it fires).
local S = require "tide.engine.sched"
local runq = require "tide.engine.runq"
local check = require "tide.engine.check"

local type, error, ipairs, setmetatable, getmetatable, pcall = type, error, ipairs, setmetatable, getmetatable, pcall
local arg_error, is_ms = check.arg_error, check.is_ms
local timer, try_timer, pending = runq.timer, runq.try_timer, runq.pending
local untimer_of, arg_of, fire = runq.untimer_of, runq.arg_of, S.fire

local M = {}

local Timer = {}
local Timer_mt = { __index = Timer, __tostring = function(tm)
  return ("tide.Timer (%s)"):format(pending(tm.key, tm) and "pending" or "stopped")
end }
M.Timer = Timer              -- the methods (a struct's getmetatable says only "ffi")

local new_handle, is_timer
do
  local ok, ffi = pcall(require, "ffi")
  local ct
  if ok and pcall(ffi.cdef, "struct tide_timer { double key; double every; };") then
    ok, ct = pcall(ffi.metatype, "struct tide_timer", Timer_mt)
  end
  if ok and ct then
    local istype = ffi.istype
    new_handle = ct
    is_timer = function(v) return istype(ct, v) end
  else
    new_handle = function() return setmetatable({ key = 0, every = 0 }, Timer_mt) end
    is_timer = function(v) return getmetatable(v) == Timer_mt end
  end
end

-- The handlers a timer's key holds: (handler, handle, callback).
local function after_fired(tm, fn)
  fire(fn, tm)
end

-- Started again at once, it takes back the key that just fired (the heap
-- hands out the last freed key first, and nothing starts a timer between
-- the pop and its handler), or a lower one (key 1 when it was the only
-- timer; a low free key while the heap compacts its keys after a burst,
-- runq): its slots exist, so this allocates nothing and cannot be stopped
-- half-way by a finalizer's error.
--
-- Missed runs are skipped, not caught up: started again inside a pass of
-- the timers' fires, it is not due in that pass (runq.fire_due fires what
-- was due when the pass began), so a period shorter than a tick runs once
-- a tick, after the tick's other fires, never back to back (before, up to
-- 10,000 fires of it queued in one pass).  A run that waits (a task) does
-- not hold the next one back: runs may overlap, as ticks go on.
--
-- Its fire runs the callback only if the timer is still pending when the
-- fire's turn comes (every_run): a stop() that said true meanwhile (from a
-- callback that ran before it in the tick) leaves the queued fire unrun.
-- The callback is read from the key's slots; a tail call, so no frame of
-- its own stays below a callback that waits.
local function every_run(tm)
  local fn = arg_of(tm.key, tm)
  if fn then return fn(tm) end
end

local function every_fired(tm, fn)
  tm.key = timer(tm.every, every_fired, tm, fn)
  fire(every_run, tm)
end

local function new_timer(fname, ms, fn, every)
  if not is_ms(ms, every) then
    arg_error(fname, 1, every and "positive number of ms" or "non-negative number of ms", ms, 3)
  end
  if type(fn) ~= "function" then arg_error(fname, 2, "function", fn, 3) end
  if S.shutting_down() then return nil, fname .. ": the loop is shutting down" end
  local tm = new_handle()                    -- allocates first: a timer is never left without its handle
  local key, why
  if every then
    tm.every = ms
    key, why = try_timer(ms, every_fired, tm, fn)
  else
    key, why = try_timer(ms, after_fired, tm, fn)
  end
  if not key then error(fname .. ": " .. why, 3) end   -- the loop closed, this copy retired
  tm.key = key
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
  if not is_timer(tm) then
    error(("timer:stop: bad self (timer expected, got %s)"):format(check.describe(tm)), 2)
  end
  if not untimer_of(tm.key, tm) then return nil, "timer:stop: the timer is not pending (it fired, or was stopped)" end
  return true
end

S.on_shutdown(function()
  for _, tm in ipairs(runq.timers_of(after_fired)) do Timer.stop(tm) end
  for _, tm in ipairs(runq.timers_of(every_fired)) do Timer.stop(tm) end
end)

return M
