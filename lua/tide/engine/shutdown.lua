--- tide.engine.shutdown — a graceful shutdown, and the end of a loop that ran out of work.
--
-- A shutdown: nothing new starts; tasks not yet running (pending, or
-- between attempts) are cancelled at once; running ones get a grace
-- period, then are cancelled.  Tasks end only through the scheduler's door
-- (finish), which tide.engine.sched lends here once (M.init), with its
-- list of live tasks.
local core = require "tide.core"
local runq = require "tide.engine.runq"
local STATE = require("tide.engine.fields").STATE

local timer, untimer = runq.timer, runq.untimer

local M = {}

--- True once a shutdown began: nothing new starts (read by the door).
M.shutting = false

local finish, live_tasks, live_count       -- lent by tide.engine.sched
local grace_key = nil                       -- the timer that ends the grace period
local grace_end, grace_reason = 0, nil      -- when it ends (tide.now's scale), and why
local hooks = {}

--- engine: { finish(t, status, value), live_tasks() -> the live tasks,
--- oldest first (a copy), live_count() -> how many }.
function M.init(engine)
  finish, live_tasks, live_count = engine.finish, engine.live_tasks, engine.live_count
end

--- Finishes every live task as cancelled with `reason`; returns how many.
local function cancel_all(reason)
  local list = live_tasks()
  for i = 1, #list do finish(list[i], "cancelled", reason) end
  return #list
end

local function grace_over()
  grace_key = nil
  cancel_all(grace_reason)
end

--- Stops the grace period's timer (the last live task ended).
function M.end_grace()
  if grace_key then untimer(grace_key); grace_key = nil end
end

--- Arms the timer that ends the grace period (again, for a timer callback
--- that became a task during it: see M.promoted).
local function arm_grace()
  local ms = grace_end - core.now()
  grace_key = timer(ms > 0 and ms or 0, grace_over)
end

--- A timer's callback became a task: the grace applies to it too.
function M.promoted()
  if M.shutting and not grace_key then arm_grace() end
end

--- fn(reason, grace_ms) runs when a shutdown begins.
function M.on_shutdown(fn) hooks[#hooks + 1] = fn end

--- Starts a graceful shutdown.  Calling it again shortens the grace period
--- to the new value.
function M.shutdown(grace_ms, reason)
  reason = reason or "shutdown"
  if not M.shutting then
    M.shutting = true
    for i = 1, #hooks do hooks[i](reason, grace_ms) end
    for _, t in ipairs(live_tasks()) do
      if t[STATE] == "pending" or t[STATE] == "retrying" then finish(t, "cancelled", reason) end
    end
  end
  M.end_grace()
  grace_end, grace_reason = core.now() + grace_ms, reason
  if live_count() > 0 then arm_grace() end
end

--- After the loop ran out of work: tasks still live can never be woken, so
--- they are cancelled (their outcomes delivered) with `reason` (by default,
--- that they stalled).  Returns how many.
function M.reap(reason)
  return cancel_all(reason or "stalled: nothing left that could wake this task")
end

--- Forgets a finished shutdown, so the loop can be run again.
function M.reset()
  M.shutting = false
  M.end_grace()
end

return M
