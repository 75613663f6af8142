--- tide.engine.fire — timers' fires: a callback runs on a runner, and is a task only if it waits.
--
-- A timer's fire queues the entry (timer, FIRE) on the run queue, in the
-- order of the fires, and makes no task: a runner calls tm.fn(tm) as it
-- would run a task's function, with the scheduler's `current` nil and this
-- module's `firing` set.  Most callbacks return without waiting, and
-- nothing more happens (a callback that raises goes to the error sink as
-- "timer callback", as nobody awaits it).  A callback that needs its task
-- (it waits, yields, or asks for it: tide.current(), S.current()) gets one
-- there, M.promote(): a running task whose coroutine is the runner, with
-- the shared options that report its failure as "timer callback"; from
-- then on it is a task like any other (its end goes through the door; a
-- shutdown cancels it).  Why: a task per fire (a table, the live list, the
-- door) was most of the 6,700 instructions of a tide.after timer
-- (callgrind, bench/cg after).
--
-- The scheduler (tide.engine.sched) runs the runners and owns the tasks;
-- it gives this module, once (M.init), the few things a fire needs of it:
-- how to make a task, how a task's attempt returns, whether a shutdown is
-- under way, what to do when a task is made during one, and how to read an
-- error's traceback.
--
-- Invariants kept here:
--   - firing_co is the runner running a timer's callback that has no task
--     yet (firing is that timer), or nil; a promotion, a return, an error
--     or a bare yield clears it.
--   - unrun is a fire taken off the run queue whose runner is not resumed
--     yet, or nil: an error that interrupts the tick then queues it again
--     (M.repair), so no fire is lost.
local runq = require "tide.engine.runq"
local log = require "tide.engine.log"

local pcall = pcall
local push = runq.push

local M = {}

M.FIRE = 0                    -- the coroutine slot of a fire's entry (attempt numbers start at 1)
local FIRE = M.FIRE
local OPTIONS = { shared = true, report = "timer callback" }   -- a promoted callback's task options

local firing, firing_co = nil, nil
local unrun = nil

-- What the scheduler lends (M.init).
local new_task, task_returned, shutting_down, promoted, error_trace

--- Called once by the scheduler: `engine` holds new_task(fn, opt) -> task,
--- task_returned(co, ...) (the attempt run by runner co returned those
--- values), shutting_down() -> bool, promoted() (a task was made from a
--- callback: a shutdown's grace applies to it) and error_trace(co, err) ->
--- err, traceback.
function M.init(engine)
  new_task, task_returned = engine.new_task, engine.task_returned
  shutting_down, promoted, error_trace = engine.shutting_down, engine.promoted, engine.error_trace
end

--- Queues a run of tm.fn(tm) (tm: a table of tide.engine.timer, whose _co
--- the run queue reads).  Nothing new starts during a shutdown.
function M.fire(tm)
  if shutting_down() then return end
  tm._co = FIRE
  -- The timer's key has popped: a push that raises (it may grow the run
  -- queue, and an allocation may run a finalizer that raises) would lose
  -- the fire.  It is pushed again, and the error goes to the error sink.
  local ok, err = pcall(push, tm, FIRE)
  if not ok then
    push(tm, FIRE)
    pcall(log.report, "tide's engine (an error raised while a timer fired, as by a __gc finalizer)", err, err)
  end
end

--- The runner running a callback that has no task yet, or nil.
function M.runner() return firing_co end

--- The callback running on runner co gets its task (a running task whose
--- coroutine is co), which is returned.  Allocates: may raise, and then the
--- fire stays as it was.
function M.promote()
  local t = new_task(firing.fn, OPTIONS)
  local co = firing_co
  firing, firing_co = nil, nil
  t._state, t.attempts, t._co = "running", 1, co
  promoted(t)
  return t
end

--- M.promote() where no error may escape (a callback that yielded bare must
--- get its task, or it would stay suspended with no outcome): an allocation
--- that raises (a __gc finalizer's error, which LuaJIT rethrows from it) is
--- reported and tried again.  Each finalizer runs once, so this ends, however
--- many are pending; only memory running out, again and again, gives the
--- fire up (reported).
local OUT_OF_MEMORY_TRIES = 100
function M.promote_now()
  local oom = 0
  while oom < OUT_OF_MEMORY_TRIES do
    local made, t = pcall(M.promote)
    if made then return t end
    if t == "not enough memory" then oom = oom + 1 end
    pcall(log.report, "tide's engine (an error raised while a timer callback became a task, as by a __gc finalizer)", t, t)
  end
  firing, firing_co = nil, nil
  pcall(log.report, "tide's engine", "a timer callback that yielded could not be given a task (out of memory): it is abandoned")
  return nil
end

--- The tick took fire entry tm off the run queue; its runner is not resumed yet.
function M.taken(tm) unrun = tm end

--- The fire taken last is being resumed on its runner.
function M.resumed() unrun = nil end

--- An error interrupted the tick while it held fire entry tm: queued again
--- if its callback never ran.
function M.repair(tm)
  if unrun == tm then unrun = nil; push(tm, FIRE) end
end

--- A new tick: no callback runs.
function M.reset() firing, firing_co = nil, nil end

--- Runs a fire on runner co.  Returns when the callback returned: if it got
--- its task meanwhile, that task's attempt returned (the scheduler hears it).
local function returned(co, ...)
  if firing_co == co then firing, firing_co = nil, nil
  else task_returned(co, ...) end
end

function M.run(tm, co)
  firing, firing_co = tm, co
  return returned(co, tm.fn(tm))
end

--- A fire's callback raised before it had a task: reported, as its task's
--- would be (protected: the traceback and the report allocate).
local function report(co, err)
  local tb
  err, tb = error_trace(co, err)
  log.report(OPTIONS.report, err, tb)
end

function M.failed(co, err)
  firing, firing_co = nil, nil
  pcall(report, co, err)
end

return M
