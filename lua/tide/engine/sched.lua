--- tide.engine.sched — the engine: the task lifecycle with its one door, waits, and the tick.
--
-- (Below it: tide.engine.runq, the run queue, the timers' handlers and the
-- virtual clock; tide.engine.fire, timers' callbacks run without a task;
-- tide.engine.hooks, a task's options and hook lists; tide.engine.unheard,
-- failures nobody heard; tide.engine.shutdown, a graceful shutdown.)
--
-- A task is a table with a state (its fields are numbered slots, t[STATE]:
-- tide.engine.fields):
--   "pending"   created, not started (waiting for a pool slot)
--   "running"   an attempt is under way: its coroutine is runnable or waiting
--   "retrying"  between attempts, waiting out the backoff
--   terminal    "ok", "error", "timeout", "cancelled"
--
-- Invariants kept here:
--   - A task moves to a terminal state only through finish() (the door), once.
--   - t[CO] is the coroutine (a runner) of the current attempt, the
--     attempt's number before its first resume, or false; a run-queue entry
--     (t, co) is stale unless t[CO] == co, so a timed-out or cancelled
--     attempt is never resumed.
--   - t[WAITING] is the token of the wait the task is suspended in; true once
--     it was woken and until it resumes; false outside waits.  A wake-up with
--     another token is stale and ignored.
--   - t[WAIT_TIMER] and t[OPT].timer are keys of pending timers that belong
--     to the task (its current wait; its attempt's deadline or its backoff),
--     or nil/false.
--   - The options a task rarely has (timeout, retry, hooks, pool) live in
--     t[OPT] (false when none, maybe a shared template: see hooks.lua), so
--     the hot path reads one field for them all.
--   - Hooks on a task's end are lists (S.on_finish, S.on_attempt_end), run
--     in the order added, each call protected: no module replaces or chains
--     another's hook.
local core = require "tide.core"
local log = require "tide.engine.log"
local retry = require "tide.engine.retry"
local check = require "tide.engine.check"
local runq = require "tide.engine.runq"
local unheard = require "tide.engine.unheard"
local hooks = require "tide.engine.hooks"
local fire = require "tide.engine.fire"
local shutdown = require "tide.engine.shutdown"
local fields = require "tide.engine.fields"
local live = require "tide.engine.live"

local co_create, co_resume, co_yield, co_status = coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local type = type
local co_running = coroutine.running
local unpack, select, pcall, xpcall, error = unpack, select, pcall, xpcall, error
local tostring, traceback, pairs = tostring, debug.traceback, pairs
local setmetatable, getmetatable = setmetatable, getmetatable
local push, timer, untimer, take_first = runq.push, runq.timer, runq.untimer, runq.take_first
local is_ms = check.is_ms
-- A task's fields: slots of its array part (tide.engine.fields).
local ID, ATTEMPTS, VALUE, STATE = fields.ID, fields.ATTEMPTS, fields.VALUE, fields.STATE
local FN, CO, OPT, WAITING, WAIT_TIMER = fields.FN, fields.CO, fields.OPT, fields.WAITING, fields.WAIT_TIMER
local VALUES, WAITERS, AWAITING = fields.VALUES, fields.WAITERS, fields.AWAITING

local S = {}

local TERMINAL = live.TERMINAL
S.TERMINAL = TERMINAL

-- Yielded by tide's waiting primitives.  Any other yield from a task is a
-- plain "let the others run": the task goes to the back of the run queue.
local WAIT = setmetatable({}, { __tostring = function() return "tide.WAIT" end })

local current = nil          -- the task whose coroutine is being resumed
-- (A timer's callback may run on a runner without a task: then current is
-- nil and fire.runner() is that runner; promote() makes its task.)
local FIRE, fire_runner, promote, promote_now = fire.FIRE, fire.runner, fire.promote, fire.promote_now
local in_callback = nil      -- the name of the user callback running now, if any
local next_id = 0
-- The tasks that may still be live: tide.engine.live.
local live_add, live_remove, live_count, live_tick = live.add, live.remove, live.count, live.tick

local stats = { spawned = 0, ok = 0, error = 0, timeout = 0, cancelled = 0, retries = 0 }
S.stats = stats
-- Outcomes of thread-mode tasks (those with a thread payload), part of the
-- above: the rest ran as coroutines.  (tide_tasks_total{mode=...})
local thread_stats = { ok = 0, error = 0, timeout = 0, cancelled = 0 }
S.thread_stats = thread_stats
local process_stats = { ok = 0, error = 0, timeout = 0, cancelled = 0 }   -- and process-mode ones
S.process_stats = process_stats

local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  return ok and s or "(error object with a failing __tostring)"
end

-- ===== errors that carry their own traceback
--
-- Work that ran elsewhere (a thread, a child process) fails with a
-- traceback taken there; raised as a traced error, it becomes the task's
-- traceback instead of one taken of the coroutine that waited for it.

local Traced_mt = { __tostring = function(e) return safe_tostring(e.value) end }

function S.traced_error(value, trace)
  return setmetatable({ value = value, traceback = trace }, Traced_mt)
end

-- ===== hooks on a task's end: lists, each call protected (tide.engine.hooks)

local own_options, add_hook, remove_hook = hooks.own_options, hooks.add, hooks.remove

-- A hook runs inside the door, in whatever task or callback ended t: it
-- may not wait (a wait would suspend that other task half-way through
-- ending t, and a cancel of it then would leave t never ended).  While
-- hooks run, in_callback names them, so a wait raises "cannot wait inside
-- a task's on_finish hook"; the name is a constant (no string per call).
local HOOK_NAMES = { on_finish = "a task's on_finish hook", on_attempt_end = "a task's on_attempt_end hook" }

local function run_hooks(what, t, h)
  local saved = in_callback
  in_callback = HOOK_NAMES[what]
  hooks.call(what, t, h)
  in_callback = saved
end

--- Calls fn(...) protected, where waiting is refused (a wait raises "cannot
--- wait inside `what`"): for callbacks that run inside another task's end
--- (flow hooks, a consumer's handle_result).  Returns xpcall's results.
function S.protected(what, fn, ...)
  local saved = in_callback
  in_callback = what
  local ok, err = xpcall(fn, traceback, ...)
  in_callback = saved
  return ok, err
end

--- As S.protected, with pcall's results (the error value as raised, no
--- traceback): for user functions whose error becomes an outcome (a flow
--- task's `when` and `items`).
function S.guarded(what, fn, ...)
  local saved = in_callback
  in_callback = what
  local ok, v = pcall(fn, ...)
  in_callback = saved
  return ok, v
end

--- Adds fn(t), run once when t reaches its outcome (inside the door, after
--- its awaiters are woken and before handle_result).  For tide's modules:
--- what they must do however a task ends (free a slot, nack a delivery).
function S.on_finish(t, fn) add_hook(t, "on_finish", fn) end

--- Adds fn(t), run once when the current attempt of t ends, however it
--- ends (returns, raises, times out, is cancelled): what the attempt started
--- must stop with it.  Cleared when the attempt ends.
function S.on_attempt_end(t, fn) add_hook(t, "on_attempt_end", fn) end

--- Removes a hook added with S.on_attempt_end (its work ended in time).
function S.off_attempt_end(t, fn) remove_hook(t, "on_attempt_end", fn) end

-- ===== the run queue and timers (tide.engine.runq)

S.timer, S.untimer, S.timers_of = timer, untimer, runq.timers_of

-- ===== waiting and waking

local token = 0
-- The last wait a task yielded in (its task, token and bound): what the
-- scheduler arms once the yield reaches it (after_resume), kept here for
-- repair() when an error interrupted the tick in between.
local yield_t, yield_tok, yield_ms = nil, nil, nil

--- Starts a wait for the current task; returns it and the wait's token.
--- `fname` names the public function for the error raised outside a task.
local function cannot_wait(fname, t, level)
  if runq.retired then error(fname .. ": " .. runq.RETIRED, level + 1) end
  if t and TERMINAL[t[STATE]] and not in_callback then
    error(("%s: task %d has ended (%s); its code stops here"):format(fname, t[ID], t[STATE]), level + 1)
  end
  if in_callback then
    error(("%s: cannot wait inside %s (spawn a task for work that waits)"):format(fname, in_callback), level + 1)
  elseif t == nil then
    error(fname .. ": called outside a task (start one with tide.run or tide.spawn)", level + 1)
  end
  error(fname .. ": cannot wait inside a nested coroutine, only in the task's own", level + 1)
end

-- Is the code running now that of runner `co` itself, or of a coroutine
-- it resumed?  (tide.engine.own_runner: without a C call on co's stack.)
local own_runner = require "tide.engine.own_runner"

local NESTED = ": cannot wait inside a nested coroutine, only in the task's own"
local IN_C_CALL = ": cannot wait inside a C call (a __gc finalizer, a debug hook, a function a C function calls)"
S.IN_C_CALL = IN_C_CALL                  -- (for a refusal that must come before the wait: pg_conn's)

--- The slow path of the wait checks: the task that may wait here (a timer
--- callback running without a task becomes one), or an error.
local function waiting_task(fname, level)
  local firing_co = current == nil and not in_callback and fire_runner()
  if firing_co then
    local can, own = own_runner(firing_co)
    if can then current = promote(); return current end
    error(fname .. (own and IN_C_CALL or NESTED), level + 1)
  end
  local t = current
  if t and not in_callback and not TERMINAL[t[STATE]] and select(2, own_runner(t[CO])) then
    error(fname .. IN_C_CALL, level + 1)
  end
  cannot_wait(fname, t, level + 1)
end

--- Raises, as wait_begin would, where the code running now cannot wait
--- (for a check made before the wait another function begins).
function S.check_wait(fname, level)
  local t = current
  if in_callback or t == nil or not own_runner(t[CO]) then waiting_task(fname, level + 1) end
end

local function wait_begin(fname, level)
  local t = current
  if in_callback or t == nil or not own_runner(t[CO]) then t = waiting_task(fname, level + 1) end
  token = token + 1
  t[WAITING] = token
  return t, token
end
S.wait_begin = wait_begin

local function wake(t, tok)
  if t[WAITING] == tok then
    t[WAITING] = true
    push(t, t[CO])
  end
end
S.wake = wake

local drop_wait_timer

local function wait_timer_fired(t, tok)
  t[WAIT_TIMER] = false
  wake(t, tok)
end

--- A wait that returns with its timer pending was not resumed by the
--- scheduler (which cancels it first, run_task), but by code holding the
--- task's runner (another task's coroutine.resume): the timer is cancelled
--- here, or the loop would run until it fires.  Never on the usual path.
function drop_wait_timer(t)
  local key = t[WAIT_TIMER]
  t[WAIT_TIMER] = false
  untimer(key)
end

--- Suspends the current task (after wait_begin) until woken; `ms` (optional)
--- bounds the wait.  The scheduler arms the wait's timer once the task has
--- yielded, and cancels it before resuming a task woken otherwise
--- (after_resume, run_task): the timer's functions are C functions, which
--- must not run on the task's stack (see own_runner).
local function wait_end(t, tok, ms)
  yield_t, yield_tok, yield_ms = t, tok, ms
  co_yield(WAIT, ms)
  t[WAITING] = false
  if t[WAIT_TIMER] then drop_wait_timer(t) end   -- resumed by another than the scheduler
end
S.wait_end = wait_end

--- tide.sleep: wait_begin and wait_end written out in one flat function,
--- because every frame below a yield stays on the task's stack while it
--- sleeps.
function S.sleep(ms)
  if not is_ms(ms) then check.arg_error("tide.sleep", 1, "non-negative number of ms", ms) end
  local t = current
  if in_callback or t == nil or not own_runner(t[CO]) then t = waiting_task("tide.sleep", 2) end
  local tok = token + 1
  token, t[WAITING] = tok, tok
  yield_t, yield_tok, yield_ms = t, tok, ms
  co_yield(WAIT, ms)
  t[WAITING] = false
  if t[WAIT_TIMER] then drop_wait_timer(t) end   -- resumed by another than the scheduler
end

--- Appends the current task to a list of waiters (flat pairs task, token).
function S.add_waiter(list, t, tok)
  local n = #list
  list[n + 1], list[n + 2] = t, tok
end

--- Removes task t from a list of waiters (after its wait timed out).
function S.remove_waiter(list, t)
  for i = 1, #list, 2 do
    if list[i] == t then
      table.remove(list, i)
      table.remove(list, i)
      return
    end
  end
end

--- One task waits on `holder` (a table: its field `waiting` is the slot)
--- until S.notify(holder) or `ms` pass; `fname` names the caller in errors.
--- The supervisor's mailbox, a consumer's window and a flow run use it.
function S.wait_for(holder, fname, ms)
  local t, tok = wait_begin(fname, 2)
  holder.waiting = { t, tok }
  wait_end(t, tok, ms)
  holder.waiting = false
end

function S.notify(holder)
  local w = holder.waiting
  if w then holder.waiting = false; wake(w[1], w[2]) end
end

function S.wake_all(list)
  for i = 1, #list, 2 do wake(list[i], list[i + 1]) end
end

--- The task running now, or nil.  A timer callback that runs without a
--- task gets one here: asking for it makes it (see "timers' fires").
local function current_task()
  if current == nil and not in_callback and fire_runner() then current = promote() end
  return current
end
S.current = current_task

--- tide.current(): the task running now, or nil.  A task whose options
--- hold `seen = false` runs the work of several owners in turn (a flow's
--- worker runs node after node): handing its handle out marks it (seen =
--- true), so that it retires after the work in hand, and a handle kept
--- never reaches the next owner's work.  tide's own modules call
--- S.current, which marks nothing.
function S.current_handle()
  local t = current_task()
  if t then
    local o = t[OPT]
    if o and o.seen == false then o.seen = true end
  end
  return t
end

--- The name of the callback running now ("handle_result", ...), or nil.
function S.in_callback() return in_callback end

--- True inside a task's own coroutine (where it may wait), not in a
--- nested coroutine or a callback.
function S.in_task()
  local t = current
  if t == nil then return not in_callback and fire_runner() ~= nil and co_running() == fire_runner() end
  return not in_callback and co_running() == t[CO]
end

--- The state of a task ("pending", "running", "retrying", or terminal).
function S.state(t) return t[STATE] end

--- How the attempt that is ending ended, for an on_attempt_end hook:
--- "ok", "error", "timeout" or "cancelled", whether the task is retried
--- ("retrying" comes after the hooks) or finished.
function S.attempt_outcome(t)
  local s = t[STATE]
  if TERMINAL[s] then return s end
  local o = t[OPT]
  return o and o.attempt_status or s
end

--- Stands for t's current attempt (its coroutine), or false between
--- attempts: an attempt that ended never comes back, so a saved value
--- that no longer equals S.attempt_of(t) means "that attempt is over".
function S.attempt_of(t) return t[CO] end
S.now = core.now

-- ===== runners: coroutines reused from one task to the next
--
-- A runner runs new tasks back to back, without going back to the tick
-- between them: when a task's function returns, the runner ends its attempt
-- (the door) itself, then takes the next entry of the batch under way if it
-- is another attempt's first run (runq.take_first), and so on; with none,
-- it yields DONE to the tick and waits, idle, to be given a task.  When a
-- task waits (or yields), the runner is that task's own until it returns;
-- the tick takes a fresh runner for the next new task.  Only a runner that
-- yielded DONE goes back to the idle list: one whose task raised is dead,
-- and one whose task was abandoned while suspended (timeout, cancel) is
-- never resumed again.  Why: a resume and a yield per task cut LuaJIT's
-- traces short, so a trivial task ran ~5,000 instructions, nearly all in
-- the interpreter (callgrind); run back to back, the loop of returns stays
-- in the runner.  Invariant: `current` is the task whose code the runner
-- runs, or nil while the runner is inside the door.

local DONE = setmetatable({}, { __tostring = function() return "tide.DONE" end })
local MAX_IDLE = 256
local idle, nidle = {}, 0

-- ===== attempts

local settle

--- Ends the current attempt: its coroutine, deadline and wait are dropped.
local function end_attempt(t)
  local o = t[OPT]
  if o then
    local key = o.timer
    if key then o.timer = false; untimer(key) end
    local hooks = o.on_attempt_end           -- what this attempt started must stop
    if hooks then o.on_attempt_end = nil; run_hooks("on_attempt_end", t, hooks) end
  end
  if t[WAITING] then                           -- waiting, or woken and not yet resumed
    local key = t[WAIT_TIMER]
    if key then t[WAIT_TIMER] = false; untimer(key) end
    local target = t[AWAITING]
    if target then
      t[AWAITING] = nil
      if target[WAITERS] then S.remove_waiter(target[WAITERS], t) end
    end
    t[WAITING] = false
  end
  t[CO] = false
end

local function attempt_timed_out(t, attempt)
  local o = t[OPT]
  if t[STATE] == "running" and t[ATTEMPTS] == attempt then
    local msg = ("task %d timed out after %g ms"):format(t[ID], o.timeout)   -- allocates: first
    o.timer = false
    return settle(t, "timeout", msg)
  end
  o.timer = false
end

--- Starts an attempt.  Until its first resume takes a runner, t[CO] holds
--- the attempt's number, so a queued attempt holds no coroutine.
local function start_attempt(t)
  t[STATE] = "running"
  local attempt = t[ATTEMPTS] + 1
  t[ATTEMPTS], t[CO] = attempt, attempt
  local o = t[OPT]
  if o and o.timeout then o.timer = timer(o.timeout, attempt_timed_out, t, attempt) end
  push(t, attempt)
end

local function backoff_over(t)
  t[OPT].timer = false
  if t[STATE] == "retrying" then start_attempt(t) end
end

-- ===== failures nobody heard (tide.engine.unheard)

local note_unheard = unheard.note
S.report_unheard = unheard.report_all

-- ===== the door

--- Calls a user callback protected, outside any task: it cannot wait (its
--- caller may be another task, or the loop itself); a failure goes to the
--- error sink as `what` of t.
local function report_callback(what, t, err)
  log.report(what .. " of " .. tostring(t), err, err)
end

local function callback(what, t, fn, ...)
  local saved_current, saved_in = current, in_callback
  current, in_callback = nil, what
  local ok, err = xpcall(fn, traceback, ...)
  current, in_callback = saved_current, saved_in
  if not ok then pcall(report_callback, what, t, err) end   -- reporting allocates: protected too
end

--- THE ONE DOOR to a terminal state.
---
--- Every way a task can end — its function returns or raises, its last
--- attempt times out, it is cancelled, the loop shuts down, or it stalls with
--- nothing left that could wake it — calls finish(), and finish() lets each
--- task through once: only here does the state become terminal, the outcome
--- get recorded, the awaiters get woken and handle_result get called.  A
--- second call for the same task returns false and changes nothing.
local finishing = 0          -- depth of finish() calls under way

local function finish(t, status, ...)
  if TERMINAL[t[STATE]] then return false end
  local n = select("#", ...)
  local values = n > 1 and { n = n, ... } or nil   -- allocates: before anything changes
  finishing = finishing + 1
  -- The door shuts before any hook runs: an on_attempt_end hook that ends
  -- t again (a flow hook cancelling its own run) is refused above, and the
  -- hooks see how the task ended.
  t[STATE] = status
  local value = ...
  t[VALUE] = value
  if values then t[VALUES] = values end
  local nlive = live_remove(t)
  stats[status] = stats[status] + 1
  end_attempt(t)
  local w = t[WAITERS]
  if w then t[WAITERS] = nil; S.wake_all(w) end
  local o = t[OPT]
  if o then
    if o.thread then thread_stats[status] = thread_stats[status] + 1
    elseif o.process then process_stats[status] = process_stats[status] + 1 end
    local hooks = o.on_finish
    if hooks then run_hooks("on_finish", t, hooks) end
    if o.handle_result then callback("handle_result", t, o.handle_result, status, t[VALUE], t) end
  end
  if status == "error" or status == "timeout" then
    if o and o.report then                 -- reported at once, under this name (a timer's callback)
      pcall(log.report, o.report, t[VALUE], status == "error" and t.traceback or nil)
    elseif not w and not (o and (o.handle_result or o.heard)) then
      pcall(note_unheard, t)               -- allocates after the state changed: protected
    end
  end
  -- What only its attempts needed goes (a finished task may stay on
  -- `live` for a while, and its caller may keep its handle for long): its
  -- function, arguments and on_retry hook, and what they hold (a flow's
  -- task_retry hook is a closure over its run).
  t[FN] = false
  if o and not o.shared then
    if o.args then o.args = false end
    if o.on_retry then o.on_retry = false end
  end
  if nlive == 0 and shutdown.shutting then shutdown.end_grace() end
  finishing = finishing - 1
  return true
end
S.finish = finish

--- An attempt ended with `status`: retry when the policy says so, else finish.
--- A task ended meanwhile (by its error's __tostring, a finalizer) stays so.
function settle(t, status, ...)
  if TERMINAL[t[STATE]] then return end
  local o = t[OPT]
  local p = o and o.retry
  if p and p.on[status] and t[ATTEMPTS] < p.attempts and not shutdown.shutting then
    o.attempt_status = status                -- (for its on_attempt_end hooks: S.attempt_outcome)
    end_attempt(t)
    t[STATE] = "retrying"
    stats.retries = stats.retries + 1
    if o.on_retry then
      if o.on_retry_positional then callback("on_retry", t, o.on_retry, t[ATTEMPTS], status, (...))
      else callback("on_retry", t, o.on_retry, { task = t, attempt = t[ATTEMPTS], status = status, error = (...) }) end
    end
    if t[STATE] == "retrying" then      -- the hook may have cancelled it
      o.timer = timer(retry.delay(p, t[ATTEMPTS]), backoff_over, t)   -- the deadline's slot is free
    end
    return
  end
  finish(t, status, ...)
end

-- ===== running tasks

local ending = nil            -- the task a runner is ending (in the door), or nil

--- The attempt of t (run by runner co) returned: it ends here, in the runner.
local function returned(t, co, ...)
  current, ending = nil, t
  if t[CO] == co then                       -- else it ended while it ran
    if not t[OPT] then finish(t, "ok", ...)  -- no retry policy to ask
    else settle(t, "ok", ...) end
  end
  ending = nil
end

--- A task that takes a runner of its own (not a direct task), or a timer's fire.
local function needs_runner(t)
  local o = t[OPT]
  return not (o and o.direct)
end

-- ===== timers' fires (tide.engine.fire): a callback runs on a runner, and is a task only if it waits

fire.init{
  new_task = function(fn, opt) return S.new_task(fn, opt) end,
  task_returned = function(co, ...) return returned(current, co, ...) end,
  shutting_down = function() return shutdown.shutting end,
  promoted = shutdown.promoted,
  error_trace = function(co, err)
    if getmetatable(err) == Traced_mt then return err.value, err.traceback end
    return err, traceback(co, safe_tostring(err))
  end,
}
S.fire = fire.fire

local fire_run, fire_failed = fire.run, fire.failed

local function run_fire(tm, co)
  current, in_callback = nil, nil
  return fire_run(tm, co)                  -- a tail call: no frame of its own below a callback's wait
end

-- Not a vararg function: a vararg frame takes more stack slots, and a task
-- that waits keeps every frame below its yield (see S.sleep).
--
-- Each task starts outside any callback: a callback that yielded from a
-- nested coroutine of the task before (a handle_result run by a cancel
-- inside coroutine.wrap) never came back to restore in_callback, and the
-- next task of the batch would inherit it (its waits refused, its bare
-- yields resumed for ever by after_resume).
local function runner_loop(t)
  local co = co_running()
  while true do
    if t[CO] == FIRE then run_fire(t, co)
    else
      current, in_callback = t, nil
      local args = t[OPT] and t[OPT].args
      if args then returned(t, co, t[FN](unpack(args, 1, args.n)))
      else returned(t, co, t[FN]()) end
    end
    t = take_first(needs_runner)           -- the next new task (or fire) of the batch, if it is one
    if t then
      if t[CO] ~= FIRE then t[CO] = co end
    else
      t = co_yield(DONE)
    end
  end
end

--- Arms the timer of the wait task t yielded in (it bounds the wait by
--- `ms`), unless the wait is over already.  Made from the scheduler's
--- stack, not the task's (see own_runner).  The timer must be armed, or the
--- task would never wake: an arming that raises (an allocation running a
--- finalizer that raises, reported) is tried again, as each finalizer runs
--- once; memory running out again and again fails the task instead.
--- The report runs the error sink (user code), which may end or wake t:
--- then the wait is over, and t is not settled again (a task ended
--- meanwhile and settled with a retry policy left its terminal state).
local ARM_TRIES = 100
local function arm_wait(t, ms)
  local tok = t[WAITING]
  if tok == true or not tok then return end   -- woken, or ended, before it yielded
  local err
  for _ = 1, ARM_TRIES do
    local armed, key = pcall(timer, ms, wait_timer_fired, t, tok)
    if armed then t[WAIT_TIMER] = key; return end
    err = key
    pcall(log.report, "tide's engine (an error raised while a wait's timer was armed, as by a __gc finalizer)", err, err)
    if t[WAITING] ~= tok then return end        -- ended or woken by the report's sink
  end
  t.traceback = "its wait's timer could not be armed: " .. safe_tostring(err)
  settle(t, "error", err)
end

local function after_resume(co, ok, first, ms)
  -- Still inside a callback or hook: the task yielded from there (a bare
  -- coroutine.yield; tide's waits raise there).  It goes on at once: the
  -- door it is inside must finish, and a task that waited there could be
  -- stopped half-way through another task's end.
  if in_callback ~= nil and ok and co_status(co) == "suspended" then
    return after_resume(co, co_resume(co))
  end
  local t = current                         -- the task the runner was running, if any
  current, in_callback = nil, nil
  if ok then
    if first == DONE then                  -- idle: its tasks ended inside it
      if nidle < MAX_IDLE then nidle = nidle + 1; idle[nidle] = co end
      return
    end
    if t == nil and fire_runner() == co then t = promote_now() end   -- a fire's callback yielded bare
    if t and t[CO] == co then
      if first ~= WAIT then push(t, co)    -- a bare yield: run again later
      elseif ms then arm_wait(t, ms) end   -- a wait with a bound
    end
    return
  end
  local err = first                        -- raised: the runner is dead
  if t == nil and fire_runner() == co then return fire_failed(co, err) end
  if t == nil then                         -- raised in the door (a __gc finalizer's error)
    t, ending, finishing = ending, nil, 0
    if t and t[CO] == co and t[STATE] == "running" then   -- before the door shut: it fails with the error
      t.traceback = "an error interrupted tide's engine while this task ended: " .. safe_tostring(err)
      return settle(t, "error", err)
    end
    return log.report("tide's engine (an error raised inside a task's end, as by a __gc finalizer)", err, err)
  end
  if t[CO] ~= co then return end            -- it ended while it ran
  local tb
  if getmetatable(err) == Traced_mt then tb, err = err.traceback, err.value
  else tb = traceback(co, safe_tostring(err)) end   -- runs the error's __tostring: it may end t
  if t[CO] ~= co then return end
  t.traceback = tb
  return settle(t, "error", err)
end

local function run_task(t, co)
  current, in_callback = t, nil             -- a callback that yielded never leaks its state
  if type(co) == "number" then             -- the attempt's first resume (or a fire): take a runner
    local o = t[OPT]
    if o and o.direct then                  -- no coroutine (see "direct tasks")
      o.direct(t)
      current = nil                         -- no code of t runs past it: left set, code outside
      return                                -- any task took t for its own (spec/review_r1_spec.lua)
    end
    if co == FIRE then current = nil; fire.taken(t) end
    if nidle > 0 then
      co, idle[nidle], nidle = idle[nidle], nil, nidle - 1
    else
      co = co_create(runner_loop)           -- allocates: may raise (see "interruptions")
    end
    if t[CO] == FIRE then fire.resumed() else t[CO] = co end
    return after_resume(co, co_resume(co, t))
  end
  local key = t[WAIT_TIMER]                 -- woken before its wait's timer fired: cancelled here
  if key then t[WAIT_TIMER] = false; untimer(key) end
  return after_resume(co, co_resume(co))
end

-- ===== direct tasks: work done elsewhere, without a coroutine
--
-- A task whose options hold `direct` (a thread task: its work runs on
-- another thread, nothing of it waits on the loop) takes no runner: each
-- time its attempt is run from the run queue, direct(t) is called instead
-- of a resume -- the first time to start the work, and again after
-- S.ready(t), once the work came back, to settle the attempt (S.settle).
-- Meanwhile t[CO] keeps the attempt's number, so an attempt that ended
-- (timeout, cancel) is never run again; its on_attempt_end hook gives the
-- work up, so that nothing calls S.ready for it later.

--- Queues the current attempt of direct task t to run again (its work came back).
function S.ready(t)
  local co = t[CO]
  if co then push(t, co) end
end

--- Ends the current attempt of t with `status` (a direct task's work came back).
S.settle = settle

-- ===== the virtual clock (tide.engine.testing starts it; its state and steps are in tide.engine.runq)

--- Steps the virtual clock once the run queue is empty; true when there is
--- more to do (a tick must follow).
local function step_virtual()
  local more, t, tok = runq.step_virtual()
  if more then return true end
  if t then wake(t, tok) end               -- the test that advanced it
  return runq.count() > 0                  -- the caller, woken, runs next tick
end

S.advancing = runq.advancing            -- (tide.engine.testing starts it: clock:advance)

-- Resumes per tick at most (about): past it, the loop polls for I/O and
-- fires timers before running more.  Work that becomes runnable during a
-- tick runs in the same tick, so a chain of tasks costs no loop iteration
-- per link.
local RUN_BUDGET = 20000

-- ===== interruptions
--
-- An error can interrupt the engine itself, between two resumes: LuaJIT
-- before 2023-04 rethrows a __gc finalizer's error from whatever allocation
-- ran the collector step, and the engine allocates (a runner, a traceback,
-- a message).  The tick runs protected, and keeps what it was doing where
-- an interrupted tick can find it: the batch it was running (its entries
-- not yet run stay in it) and the task in hand.  The next tick repairs that
-- task and finishes the batch first; the error goes to the error sink.

--- The task in hand when an error interrupted the tick: put it back where a
--- task in its state must be.  Its first resume not yet made: queued again;
--- waiting: left to its wake-up; ended or between attempts: left alone;
--- else it ran and its outcome was lost after it: it fails with the error.
local function repair(t, err)
  if t[CO] == FIRE then return fire.repair(t) end    -- a fire: run it if it never ran
  if t[STATE] ~= "running" then return end
  local co = t[CO]
  if co == false then return end
  if type(co) == "number" then return push(t, co) end
  -- Waiting: left to its wake-up.  Not when its runner is dead: a wait
  -- that raised between its start and its yield (an allocation running a
  -- finalizer that raises, in task:await) leaves t[WAITING] set, and the task
  -- raised later; its end was interrupted (the traceback allocates).  The
  -- error may have come between its yield and the arming of its wait's
  -- timer (the resume's results, copied to the scheduler's stack, may grow
  -- it: an allocation): then the timer is armed now.  Left unarmed, the
  -- task stalled for ever (1 run in ~150 of review_r21sl's storm).
  local waiting = t[WAITING]
  if waiting and co_status(co) ~= "dead" then
    if waiting == yield_tok and yield_t == t and yield_ms and not t[WAIT_TIMER] then arm_wait(t, yield_ms) end
    return
  end
  err = err or "an error interrupted tide's engine"
  local tb = "an error interrupted tide's engine after this task ran: " .. safe_tostring(err)
  t.traceback = tb
  settle(t, "error", err)
end

local interrupted_by = nil                          -- the error that stopped the last tick

local function tick_body()
  current, in_callback, finishing = nil, nil, 0
  fire.reset()
  local t = runq.interrupted()
  if t then repair(t, interrupted_by); runq.repaired() end   -- interrupted again: repaired again
  interrupted_by = nil
  if unheard.pending() then unheard.flush() end
  local more_timers = runq.fire_due()
  runq.run(run_task, RUN_BUDGET)
  if runq.advancing() and runq.count() == 0 and not more_timers then
    runq.set_in_tick(false)                         -- what it wakes kicks the loop
    return step_virtual()
  end
  return runq.count() > 0 or more_timers
end

--- One tick: fires due timers, then resumes runnable tasks, batch after
--- batch, until none is left or the budget is spent.  Returns true when
--- tasks are runnable (or timers due) still.  An error that interrupts it
--- is reported, and the next tick repairs and goes on (see above).
function S.tick()
  live_tick()                                       -- (a write of the live list an error interrupted: let go)
  runq.set_in_tick(true)
  local ok, more = pcall(tick_body)
  runq.set_in_tick(false)
  if ok then return more end
  interrupted_by = more
  current, in_callback, finishing = nil, nil, 0
  log.report("tide's engine (an error raised outside any task, as by a __gc finalizer)", more, more)
  return true
end

-- ===== the lifecycle's public face

local Task = {}
S.Task = Task
S.Task_mt = { __index = fields.index(Task), __tostring = function(t)   -- t.id, t.attempts, t.value, the methods
  local name = t[OPT] and t[OPT].name
  return ("tide.Task %d%s (%s)"):format(t[ID], name and (" '" .. name .. "'") or "", t[STATE])
end }
local Task_mt = S.Task_mt

--- Creates a task (state "pending") that runs fn; `opt` holds its rarer
--- options (args, timeout, retry, handle_result, on_retry, name, and a
--- first on_finish hook), or is nil.  Validated by the caller.
function S.new_task(fn, opt)
  if runq.retired then runq.refuse() end
  next_id = next_id + 1
  -- The fields are slots 0..8 of the array part, made with the table in
  -- one block from a constant template (tide.engine.fields: the slots in
  -- this order, and why the last is false, not nil).
  local t = setmetatable({ [0] = 0, 0, nil, "pending", false, false, false, false, false }, Task_mt)
  t[ID], t[FN], t[OPT] = next_id, fn, opt or false
  live_add(t)
  stats.spawned = stats.spawned + 1
  return t
end

--- Starts a pending task's first attempt (or cancels it during a shutdown).
function S.start(t)
  if shutdown.shutting then return finish(t, "cancelled", "shutdown") end
  start_attempt(t)
end

--- Cancels a live task; a task that cancels itself stops at once.
function S.cancel(t, reason)
  if TERMINAL[t[STATE]] then
    return nil, ("task %d already finished (%s)"):format(t[ID], t[STATE])
  end
  local co = t[CO]
  finish(t, "cancelled", reason == nil and "cancelled" or reason)
  -- A task that cancels itself stops here, unless the cancel comes from
  -- inside another task's finish or a callback: then it stops at its next
  -- wait (its coroutine is no longer its attempt's, so it is never resumed).
  if co and co_running() == co and current == t and not in_callback and finishing == 0 then
    co_yield(WAIT)
  end
  return true
end

--- The task's rarely used options, its own (made, or copied from a shared
--- template, on first use): callers may change them.
S.options = own_options

function S.results(t)
  local v = t[VALUES]
  if v then return t[STATE], unpack(v, 1, v.n) end
  return t[STATE], t[VALUE]
end

-- ===== shutdown and the end of the loop (tide.engine.shutdown)

S.live_count = live_count

-- A second copy of tide's engine no longer ticks this one: a live task of
-- it (waiting for an HTTP request, a broker's message, another task) woken
-- later would sit in a run queue nobody runs, never to get its outcome.
runq.add_busy(function()
  local nlive = live_count()
  if nlive > 0 then return ("%d task(s) live"):format(nlive) end
end, true)

shutdown.init{ finish = finish, live_tasks = live.tasks, live_count = live_count }
S.on_shutdown, S.shutdown, S.reap, S.reset = shutdown.on_shutdown, shutdown.shutdown, shutdown.reap, shutdown.reset
function S.shutting_down() return shutdown.shutting end

return S
