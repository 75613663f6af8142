--- tide.engine.fire — timers' fires: a callback runs on a runner, and is a task only if it waits.
--
-- A timer's fire appends (fn, timer) to the fires' queue here, and the
-- entry (ENTRY, FIRE) to the run queue, in the order of the fires; it makes
-- no task: a runner that reaches an ENTRY takes the oldest fire and calls
-- fn(timer) as it would run a task's function, with the scheduler's
-- `current` nil and this module's `firing_co` set.  (The entries are all
-- the same table, and each takes the next fire: a timer's handle need not
-- be a table the run queue can read, nor hold its callback.)  Most
-- callbacks return without waiting, and nothing more happens (a callback
-- that raises goes to the error sink as "timer callback", as nobody awaits
-- it).  A callback that needs its task (it waits, yields, or asks for it:
-- tide.current(), S.current()) gets one there, M.promote(): a running task
-- whose coroutine is the runner, with the shared options that report its
-- failure as "timer callback"; from then on it is a task like any other
-- (its end goes through the door; a shutdown cancels it).  Why: a task per fire (a table, the live list, the
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
--   - The fires' queue q_fn/q_tm[head+1 .. tail] holds the fires not yet
--     run, oldest first, and the run queue holds one ENTRY for each of them
--     (an entry is queued after its fire, and a fire is taken only by an
--     entry's run).
--   - firing_co is the runner running a timer's callback that has no task
--     yet (firing_fn is that callback), or nil; a promotion, a return, an
--     error or a bare yield clears it.
--   - unrun is an entry taken off the run queue whose runner is not resumed
--     yet, or nil: an error that interrupts the tick then queues it again
--     (M.repair), so no fire is lost.
local runq = require "tide.engine.runq"
local log = require "tide.engine.log"
local fields = require "tide.engine.fields"
local CO, OPT, STATE, ATTEMPTS = fields.CO, fields.OPT, fields.STATE, fields.ATTEMPTS

local pcall = pcall
local push = runq.push

local M = {}

M.FIRE = 0                    -- the coroutine slot of a fire's entry (attempt numbers start at 1)
local FIRE = M.FIRE
M.REPORT = "timer callback"  -- what a promoted callback's task is reported as
local OPTIONS = { shared = true, report = M.REPORT }   -- a promoted callback's task options
-- What the run queue holds for each fire: the run queue reads an entry's
-- slots CO (an attempt that ended is stale; FIRE never is) and OPT.
local ENTRY = { [CO] = FIRE, [OPT] = false }

local q_fn, q_tm, head, tail = {}, {}, 0, 0
local SPARE_MAX = 16384      -- a queue drained from longer than this is made anew (a burst's arrays go)

local firing_fn, firing_co = nil, nil
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

-- The slots are written before the count (an allocation may raise: see
-- runq.push).
local function enqueue(fn, tm)
  local n = tail + 1
  q_fn[n] = fn
  q_tm[n] = tm
  tail = n
end

local function report_engine(err)
  pcall(log.report, "tide's engine (an error raised while a timer fired, as by a __gc finalizer)", err, err)
end

--- Queues a run of fn(tm) (tm: a timer's handle, tide.engine.timer).
--- Nothing new starts during a shutdown.
function M.fire(fn, tm)
  if shutting_down() then return end
  -- The timer's key has popped: a queueing that raises (it may grow an
  -- array, and an allocation may run a finalizer that raises) would lose
  -- the fire.  It is done again, and the error goes to the error sink.
  local ok, err = pcall(enqueue, fn, tm)
  if not ok then enqueue(fn, tm); report_engine(err) end
  ok, err = pcall(push, ENTRY, FIRE)
  if not ok then push(ENTRY, FIRE); report_engine(err) end
end

--- The runner running a callback that has no task yet, or nil.
function M.runner() return firing_co end

--- The callback running now without a task, or nil (tide.watchdog names
--- it: asking the scheduler for the current task would make one).
function M.callback() return firing_fn end

--- The callback running on runner co gets its task (a running task whose
--- coroutine is co), which is returned.  Allocates: may raise, and then the
--- fire stays as it was.
function M.promote()
  local t = new_task(firing_fn, OPTIONS)
  local co = firing_co
  firing_fn, firing_co = nil, nil
  t[STATE], t[ATTEMPTS], t[CO] = "running", 1, co
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
  firing_fn, firing_co = nil, nil
  pcall(log.report, "tide's engine", "a timer callback that yielded could not be given a task (out of memory): it is abandoned")
  return nil
end

--- The tick took fire entry e off the run queue; its runner is not resumed yet.
function M.taken(e) unrun = e end

--- The fire taken last is being resumed on its runner.
function M.resumed() unrun = nil end

--- An error interrupted the tick while it held fire entry e: queued again
--- if its runner never ran (its fire is still queued here).
function M.repair(e)
  if unrun == e then unrun = nil; push(ENTRY, FIRE) end
end

--- A new tick: no callback runs.
function M.reset() firing_fn, firing_co = nil, nil end

--- Runs the oldest queued fire on runner co (for an entry of the run
--- queue).  Returns when the callback returned: if it got its task
--- meanwhile, that task's attempt returned (the scheduler hears it).
local function returned(co, ...)
  if firing_co == co then firing_fn, firing_co = nil, nil
  else task_returned(co, ...) end
end

function M.run(_, co)
  local i = head + 1
  if i > tail then return end              -- (an entry whose fire is gone: none is queued without one)
  local fn, tm = q_fn[i], q_tm[i]
  if i < tail then
    q_fn[i], q_tm[i], head = nil, nil, i
  else                                     -- drained: start again at the front
    if i > SPARE_MAX then q_fn, q_tm = {}, {}   -- (a burst's arrays go; allocates: before any change)
    else q_fn[i], q_tm[i] = nil, nil end
    head, tail = 0, 0
  end
  firing_fn, firing_co = fn, co
  return returned(co, fn(tm))
end

--- A fire's callback raised before it had a task: reported, as its task's
--- would be (protected: the traceback and the report allocate).
local function report(co, err)
  local tb
  err, tb = error_trace(co, err)
  log.report(OPTIONS.report, err, tb)
end

function M.failed(co, err)
  firing_fn, firing_co = nil, nil
  pcall(report, co, err)
end

return M
