--- tide.engine.runq — the run queue and the timer glue under the scheduler (tide.engine.sched).
--
-- No task lifecycle here: sched decides what a task's entry means and how
-- an interrupted one is repaired; this module only keeps the entries and
-- the timers' handlers, and walks the batches.
--
-- Invariants kept here:
--   - An entry is a pair (task, coroutine or attempt number), in rq_t/rq_c
--     at the same index; rq_n counts them, and is written after the slots.
--   - The queue is swapped out whole when a batch starts (cur_*): entries
--     pushed while a batch runs go to the next batch, of the same tick.
--   - unit_t is the task whose entry the batch is running now, or nil: an
--     error that interrupts the tick leaves it there for sched to repair.
--   - A pending timer's key has its handler and two arguments in
--     t_fn/t_obj/t_arg; a fired or cancelled one has none.
local core = require "tide.core"

local timer_start, timer_cancel, pop, kick = core.timer_start, core.timer_cancel, core.pop, core.kick
local pairs, type = pairs, type

local M = {}

-- ===== the run queue: (task, coroutine) pairs, swapped out whole each batch

local rq_t, rq_c, rq_n = {}, {}, 0
local spare_t, spare_c = {}, {}
local SPARE_MAX = 16384      -- a batch larger than this does not keep its arrays as the spare pair
local in_tick = false        -- a tick is running: what is pushed runs in it, no kick needed

-- The slots are written before the count, one by one: a slot may grow its
-- table, an allocation may raise (a finalizer's error), and a multiple
-- assignment is done right to left: the count first, leaving a hole.
function M.push(t, co)
  local n = rq_n + 1
  rq_t[n] = t
  rq_c[n] = co
  rq_n = n
  if n == 1 and not in_tick then kick() end
end

--- Entries waiting for the next batch.
function M.count() return rq_n end

--- Says whether a tick is running (pushes made outside one kick the loop).
function M.set_in_tick(on) in_tick = on end

local cur_t, cur_c, cur_n, cur_i = nil, nil, 0, 0   -- the batch under way
local unit_t = nil                                  -- the task being run in it

--- The task in hand when an error interrupted the last tick, or nil.
function M.interrupted() return unit_t end

--- Forgets it (sched repaired it).
function M.repaired() unit_t = nil end

--- Runs run(t, co) for each entry whose task still has that attempt
--- (t._co == co; others are stale), batch after batch, until the queue is
--- empty or `budget` entries were taken.  An interrupted batch (an error
--- raised out of run) is finished first by the next call.
function M.run(run, budget)
  local done = 0
  while true do
    local ts, cs, n, i = cur_t, cur_c, cur_n, cur_i
    if i >= n then                                  -- the batch is done: take the next one
      if ts then
        -- A burst's arrays go (a million tasks spawned at once would keep
        -- 16 MB); made before anything changes, as an allocation may raise.
        if n > SPARE_MAX then ts, cs = {}, {} end
        spare_t, spare_c, cur_t = ts, cs, nil
      end
      if rq_n == 0 or done >= budget then return end
      ts, cs, n, i = rq_t, rq_c, rq_n, 0
      cur_t, cur_c, cur_n = ts, cs, n
      rq_t, rq_c, rq_n = spare_t, spare_c, 0
      done = done + n
    end
    while i < n do
      i = i + 1
      local t, co = ts[i], cs[i]
      ts[i], cs[i] = nil, nil
      if t._co == co then
        cur_i, unit_t = i, t
        run(t, co)
        i = cur_i                                 -- a runner may have taken the entries after it
      end
    end
    cur_i, unit_t = i, nil
  end
end

--- For a runner that ended its task: takes the next entry of the batch
--- under way if it is an attempt's first run (its coroutine slot holds the
--- attempt's number, and the task is still on that attempt) of a task that
--- `fits`, and returns the task, which becomes unit_t.  nil when the next
--- entry is anything else (the tick runs it, or drops it if stale).  No
--- loop here: a loop inside the runner's loop would stop LuaJIT from
--- compiling the runner's ("inner loop in root trace").
function M.take_first(fits)
  local i = cur_i + 1
  if i > cur_n then return nil end
  local t, co = cur_t[i], cur_c[i]
  if type(co) ~= "number" or t._co ~= co or not fits(t) then return nil end
  cur_t[i], cur_c[i] = nil, nil
  cur_i, unit_t = i, t
  return t
end

-- ===== timers: the heap lives in C; per key, a handler and its two arguments

local t_fn, t_obj, t_arg = {}, {}, {}

--- Calls fn(obj, arg) in `ms`; returns the timer's key.
function M.timer(ms, fn, obj, arg)
  local key = timer_start(ms)
  t_fn[key], t_obj[key], t_arg[key] = fn, obj, arg
  return key
end

--- Cancels a pending timer (a key that fired or was cancelled: harmless).
function M.untimer(key)
  timer_cancel(key)
  t_fn[key], t_obj[key], t_arg[key] = nil, nil, nil
end

--- The objects of the pending timers whose handler is `fn`.
function M.timers_of(fn)
  local list = {}
  for key, f in pairs(t_fn) do
    if f == fn then list[#list + 1] = t_obj[key] end
  end
  return list
end

-- At most this many timers fire per tick, so a flood of due timers (each
-- may start a task) is spread over ticks, with I/O polled between them.
local FIRE_BUDGET = 10000

--- Fires due timers; true when some are still due (the budget ran out).
function M.fire_due()
  for _ = 1, FIRE_BUDGET do
    local key = pop()
    if not key then return false end
    local fn, obj, arg = t_fn[key], t_obj[key], t_arg[key]
    t_fn[key], t_obj[key], t_arg[key] = nil, nil, nil
    fn(obj, arg)
  end
  return true
end

-- ===== the virtual clock (tide.testing)
--
-- While a test advances the virtual clock, the tick steps it: each time no
-- task is runnable, time jumps to the next timer's deadline (if it is
-- within the target), so every timer in the span fires in order and the
-- tasks it wakes run before time moves on; at the end, time is set to the
-- target and the waiting test (task, token) is woken.

local advancing = false      -- { target = ms, until_idle = bool, task, tok } while a test advances

function M.advancing() return advancing ~= false end

--- Starts advancing to `target`; `task, tok`: the wait to wake at the end (or nil).
function M.advance(target, until_idle, task, tok)
  advancing = { target = target, until_idle = until_idle, task = task, tok = tok }
end

--- One step: true when a timer became due (fire it, then step again); else
--- the clock is at the target: false, and the wait to wake.
function M.step_virtual()
  local a = advancing
  if core.clock_step(a.target, a.until_idle) then return true end   -- at the next timer: fire it
  advancing = false
  return false, a.task, a.tok
end

return M
