--- tide.engine.runq — the run queue and the timer glue under the scheduler (tide.engine.sched).
--
-- No task lifecycle here: sched decides what a task's entry means and how
-- an interrupted one is repaired; this module only keeps the entries and
-- the timers' handlers, and walks the batches.
--
-- Invariants kept here:
--   - An entry is a pair (task, coroutine or attempt number), in rq_t/rq_c
--     at the same index; rq_n counts them, and is written before the slots
--     (an entry left empty is skipped).
--   - The queue is swapped out whole when a batch starts (cur_*): entries
--     pushed while a batch runs go to the next batch, of the same tick
--     unless the batch ran past SLICE_MS (its rest runs first next tick).
--   - unit_t is the task whose entry the batch is running now, or nil: an
--     error that interrupts the tick leaves it there for sched to repair.
--   - A pending timer's key k has its handler and two arguments in
--     slots[3k-2 .. 3k]; a fired or cancelled one has none, except the key
--     fire_due() popped and has not read yet.  `changes` counts the timers
--     started and stopped: the slots are copied into a new array only if
--     none was meanwhile.
--
-- Code may run in the middle of a function here, and call it again: the
-- collector runs __gc finalizers at an allocation and, with the JIT on, at
-- any exit of a compiled trace while it finalizes (a guard that fails
-- between two stores, or in a copy's loop), and a finalizer may spawn a task
-- (a push) or start a timer.  So a write of several steps is done in an
-- order that such a nested call cannot undo: each push takes its slot
-- before it fills it, a copy of the slots checks `changes`, a timer's slots
-- are emptied before its key is freed, and a timer never takes a key whose
-- slots are not empty.
local core = require "tide.core"
local CO = require("tide.engine.fields").CO

local timer_start, timer_cancel, pop, kick = core.timer_start, core.timer_cancel, core.pop, core.kick
local type, error, pcall, rawequal = type, error, pcall, rawequal

local M = {}

-- ===== the run queue: (task, coroutine) pairs, swapped out whole each batch

local rq_t, rq_c, rq_n = {}, {}, 0
local spare_t, spare_c = {}, {}
local SPARE_MAX = 16384      -- a batch larger than this does not keep its arrays as the spare pair
local in_tick = false        -- a tick is running: what is pushed runs in it, no kick needed

-- The slot is taken (the count written) before it is filled: a store that
-- grows an array may exit a trace, where a finalizer may push too, and a
-- push that read the count before it took the same slot (gc_storm: a task
-- spawned by a finalizer, or the wake-up pushed, never ran; "stalled").
-- Nothing runs between the count's read and its write (no allocation, no
-- guard that can fail).  A store that raises (out of memory) leaves the
-- entry empty, and run() skips it.
function M.push(t, co)
  local n = rq_n + 1
  rq_n = n
  rq_t[n] = t
  rq_c[n] = co
  if n == 1 and not in_tick then kick() end
end

local cur_t, cur_c, cur_n, cur_i = nil, nil, 0, 0   -- the batch under way
local unit_t = nil                                  -- the task being run in it

--- Entries waiting: for the next batch, and those of a batch cut short.
function M.count() return rq_n + cur_n - cur_i end

--- Says whether a tick is running (pushes made outside one kick the loop).
function M.set_in_tick(on) in_tick = on end

--- True while a tick runs (the loop is open then).
function M.in_tick() return in_tick end

--- The task in hand when an error interrupted the last tick, or nil.
function M.interrupted() return unit_t end

--- Forgets it (sched repaired it).
function M.repaired() unit_t = nil end

-- A batch is cut after SLICE_MS: the rest runs at the next tick, after the
-- loop polled I/O (results of thread jobs, sockets, signals).  Before, a
-- batch ran whole in one tick, whatever its size: 100,000 thread tasks
-- spawned at once were 100,000 submits in one tick, 0.4 s on an idle
-- machine and over a second under load, a stall the watchdog reported
-- (bench/threads.lua).  The clock is read every CHECK_EVERY entries
-- (a runner taking entries itself, take_first, stops there too); at 256, no
-- change to bench/cg spawn within its noise (1,954 against 1,981).
local SLICE_MS = 20
local CHECK_EVERY = 256
local check_at = 0           -- the batch's index at which run() reads the clock next
local now = core.now

--- Runs run(t, co) for each entry whose task still has that attempt
--- (t[CO] == co; others are stale), batch after batch, until the queue is
--- empty, `budget` entries were taken or SLICE_MS passed.  A batch cut
--- short, or interrupted (an error raised out of run), is finished first by
--- the next call (M.count() counts what is left of it).
function M.run(run, budget)
  local done = 0
  local t0 = now()
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
    check_at = i + CHECK_EVERY
    while i < n do
      if i >= check_at then
        if now() - t0 >= SLICE_MS then cur_i, unit_t = i, nil; return end   -- the rest: next tick
        check_at = i + CHECK_EVERY
      end
      i = i + 1
      local t, co = ts[i], cs[i]
      ts[i], cs[i] = nil, nil
      if t ~= nil and t[CO] == co then              -- (empty: a push raised, M.push)
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
  if i > cur_n or i > check_at then return nil end   -- (at check_at: back to run(), to read the clock)
  local t, co = cur_t[i], cur_c[i]
  if type(co) ~= "number" or t[CO] ~= co or not fits(t) then return nil end
  cur_t[i], cur_c[i] = nil, nil
  cur_i, unit_t = i, t
  return t
end

-- ===== timers: the heap lives in C; per key, a handler and its two arguments
--
-- A key's handler and arguments are three consecutive slots of one array
-- (3k-2, 3k-1, 3k): firing a timer among a million pending reads one cache
-- line, not three arrays.  The array is made at its full size (table.new)
-- and replaced by one twice as large when a key passes it (by a small one
-- after a burst: "a burst's memory given back", below), so a nil
-- argument is a hole in its array part, never a key of its hash part: with
-- arrays grown by assignment, storing a nil argument past the array's end
-- made a key, and the hash part of an array of nils was rehashed every few
-- timers (callgrind: ~390 instructions a timer).
--
-- The C calls go through LuaJIT's FFI when it is there and the JIT is on
-- (tide.core's timer_ffi): compiled into the caller's trace, ~300
-- instructions fewer each than the classic API's stitching (bench/cg after).

local slots, cap = nil, 0            -- slots[3k-2 .. 3k]: key k's handler, obj, arg
local changes = 0                    -- timers started and stopped (see the header)
local new_table = (function()
  local ok, tnew = pcall(require, "table.new")
  return ok and tnew or function() return {} end
end)()
M.new_table = new_table

-- A timer started or stopped during the copy (by a finalizer: see the
-- header) would be lost, its slots written into the array being replaced,
-- or into a third one made by a nested grow: then the copy is made again
-- (each finalizer runs once: this ends).  gc_storm lost timers so:
-- timeouts and tide.after timers that finalizers started as they spawned
-- tasks, which then ended ok instead of timed out or cancelled.
local function grow(key)
  repeat
    local seen = changes
    local n = cap > 0 and cap or 64
    while n < key do n = n * 2 end
    local new = new_table(3 * n, 0)
    for i = 1, 3 * cap do new[i] = slots[i] end
    if changes == seen then slots, cap, changes = new, n, seen + 1 end
  until key <= cap
end
grow(1)

local timer_pop = pop
do
  -- Only with the JIT on when tide is loaded: the interpreter makes an FFI
  -- call dearer than a classic one (bench/cg after with the JIT off: 6,800
  -- instructions a timer with the classic calls, 8,900 through the FFI).
  local ok, ffi = pcall(require, "ffi")
  local fns = core.timer_ffi
  local jit_on = jit and jit.status and jit.status()
  if ok and fns and jit_on then
    local ud = fns.loop
    local start = ffi.cast("double (*)(void *, double)", fns.start)
    local cancel = ffi.cast("double (*)(void *, double)", fns.cancel)
    local c_pop = ffi.cast("double (*)(void *, int)", fns.pop)
    timer_start = function(ms) return start(ud, ms) end     -- a key, or -1, -2 (as core.timer_start)
    timer_cancel = function(key) cancel(ud, key) end        -- closed: no timer can fire, nothing to do
    timer_pop = function(first)
      local key = c_pop(ud, first and 1 or 0)
      if key > 0 then return key end
      if key == -2 then error("tide: the loop is closed", 0) end   -- (inside a tick: cannot be)
      return nil
    end
  end
end

-- ===== one engine per tide.core
--
-- tide.core is loaded once per process and its loop runs one engine's tick
-- (tide.engine.host hands it the handlers).  A second copy of tide's Lua
-- modules (package.loaded cleared, tide required again) takes the loop
-- over, which it may only while the first has nothing pending: the timers'
-- keys are shared in C, and a first copy's timer would fire into slots the
-- second does not have, its stale handle cancel a key the second reused.
-- The first copy is then retired: its timers and tasks raise.

local RETIRED = "this copy of tide's engine was replaced by a second one loaded beside it "
  .. "(package.loaded cleared and tide required again); use the newer copy"
M.RETIRED = RETIRED          -- for the public functions' errors: "tide.after: " .. RETIRED
M.retired = false

--- Raises the retired copy's error (for tide's own calls: a public
--- function raises M.RETIRED in its own name, at its caller).
function M.refuse() error("tide: " .. RETIRED, 0) end

--- Why tide cannot be used at all now (this copy retired, the loop closed),
--- or nil.  Not for hot paths: a C call.
function M.unusable()
  if M.retired then return RETIRED end
  if core.closed() then return "the loop is closed" end
  return nil
end

local probes, last_probes = {}, {}   -- fn() -> what a module above has pending, in words, or nil

--- Adds fn to what busy() asks: a module whose work a second copy would
--- take over (the process pool's events go to the newest copy's handler).
--- `last`: asked after the others (the catch-all of live tasks).
function M.add_busy(fn, last)
  local list = last and last_probes or probes
  list[#list + 1] = fn
end

--- What the engine has pending, said in words, or nil.
local function busy()
  local n = 0
  for i = 1, 3 * cap, 3 do if slots[i] ~= nil then n = n + 1 end end
  if n > 0 then return ("%d timer(s) pending"):format(n) end
  if rq_n > 0 then return ("%d task(s) runnable"):format(rq_n) end
  -- The thread pool is tide.core's, shared: the second copy takes its
  -- deliveries over, so a first copy's job in flight would be delivered to
  -- a copy that does not know it (spec/review_r1_spec.lua).
  local in_flight = core.thread_stats().in_flight
  if in_flight > 0 then return ("%d thread task(s) in flight"):format(in_flight) end
  for i = 1, #probes do
    local what = probes[i]()
    if what then return what end
  end
  for i = 1, #last_probes do
    local what = last_probes[i]()
    if what then return what end
  end
end

do
  local first = rawget(core, "_engine")
  if first then
    local what = first.busy()
    if what then
      error("tide: a second copy of tide's engine was loaded (package.loaded cleared and tide "
        .. "required again) while the first has " .. what .. "; keep one copy", 0)
    end
    first.retire()
  end
  core._engine = { busy = busy, retire = function() M.retired = true end }
end

local START_FAILED = { [-1] = "out of memory for timers", [-2] = "the loop is closed" }

--- Calls fn(obj, arg) in `ms`: returns the timer's key, or nil and why not
--- (this copy retired, the loop closed, out of memory), which a public
--- function raises in its own name, blaming its caller (tide.after).  A
--- finalizer's error raised by an allocation here is raised as it is.
local function try_timer(ms, fn, obj, arg)
  if M.retired then return nil, RETIRED end
  local key = timer_start(ms)
  if key <= 0 then return nil, START_FAILED[key] end
  if key <= cap and slots[3 * key - 2] ~= nil then
    -- The key fire_due() just popped (the last freed is handed out first),
    -- its slots not read yet: a finalizer run in between starts this timer.
    -- Written over, the popped timer was lost (and this one ran at once).
    -- This timer takes another key, and gives that one back.
    local other = timer_start(ms)
    timer_cancel(key)
    if other <= 0 then return nil, START_FAILED[other] end
    key = other
  end
  if key > cap then
    local ok, err = pcall(grow, key)           -- allocates: may raise (a finalizer's error)
    if not ok then timer_cancel(key); error(err, 0) end
  end
  local i = 3 * key
  slots[i - 2], slots[i - 1], slots[i] = fn, obj, arg
  changes = changes + 1
  return key
end
M.try_timer = try_timer

--- The same for tide's own timers (a wait's, a stop wait's): raises.
function M.timer(ms, fn, obj, arg)
  local key, why = try_timer(ms, fn, obj, arg)
  if key then return key end
  error("tide: " .. why, 2)
end

--- Cancels a pending timer (a key that fired or was cancelled: harmless).
--- The slots are emptied first: freed, the key may be taken at once by a
--- timer that a finalizer starts (see try_timer).
function M.untimer(key)
  if key <= cap then
    local i = 3 * key
    slots[i - 2], slots[i - 1], slots[i] = nil, nil, nil
    changes = changes + 1
  end
  timer_cancel(key)
end

--- True when timer `key` is pending and was made for `obj` (a key is
--- reused once its timer fired or was cancelled: a saved key alone cannot
--- tell its own timer from a later one).
local function pending(key, obj)
  return key >= 1 and key <= cap and rawequal(slots[3 * key - 1], obj)
end
M.pending = pending

--- The argument of timer `key` if it is pending and made for `obj`, else nil.
function M.arg_of(key, obj)
  if not pending(key, obj) then return nil end
  return slots[3 * key]
end

--- Cancels timer `key` if it is pending and made for `obj`: true, or false
--- when it fired, was cancelled, or its key now names another timer.
function M.untimer_of(key, obj)
  if not pending(key, obj) then return false end
  M.untimer(key)
  return true
end

--- The objects of the pending timers whose handler is `fn`.
function M.timers_of(fn)
  local list = {}
  for i = 1, 3 * cap, 3 do
    if slots[i] == fn then list[#list + 1] = slots[i + 1] end
  end
  return list
end

-- ===== a burst's memory given back
--
-- A million timers fired leave a 24 MB slots array here (and 32 MB in the
-- C heap): once few timers have stayed pending for SHRINK_AFTER ms, the C
-- heap compacts its keys (tide__timers_compact: new timers take low keys,
-- a high key is not reused once freed, so a periodic timer pending on one
-- moves down at its next start) and both arrays shrink to fit the highest
-- key still in use.  Not at once: a burst that follows another (the
-- benchmark's warm runs) finds the arrays still there.  Checked at the end
-- of each pass of fires, only while the array is large.
local SHRINK_MIN = 16384     -- keys: an array this small (384 KB) is kept
local SHRINK_AFTER = 1000    -- ms of few pending timers before the arrays shrink
local few_since = nil        -- when the pending timers became few (< 1/8 of cap), or nil
local timer_count, timer_compact = core.timer_count, core.timer_compact

local function shrink_check()
  if timer_count() * 8 >= cap then few_since = nil; return end
  local t = now()
  if not few_since then few_since = t; return end
  if t - few_since < SHRINK_AFTER then return end
  local n = timer_compact()                -- every pending key is <= n
  if n * 8 >= cap then return end          -- high keys still pending: later (they are not reused)
  local c = 64
  while c < 2 * n do c = c * 2 end
  local seen = changes
  local new = new_table(3 * c, 0)          -- allocates first: may raise (a finalizer's), changing nothing
  for i = 1, 3 * n do new[i] = slots[i] end
  if changes ~= seen then return end       -- timers started or stopped meanwhile (see grow): later
  slots, cap, few_since, changes = new, c, nil, seen + 1
end

-- At most this many timers fire per tick, so a flood of due timers (each
-- may start a task) is spread over ticks, with I/O polled between them.
local FIRE_BUDGET = 10000

--- Fires the timers due when it starts (a pass: a timer started by a fire,
--- as a tide.every is, waits for the next pass, so each fires at most once
--- in one); true when some are still due (the budget ran out).  None while
--- a batch cut short (SLICE_MS) has entries left: what fires would run
--- after them anyway, and popping FIRE_BUDGET a tick while a slice runs
--- far fewer grew the run queue to every due timer (a million under
--- callgrind, whose slowness cut every batch).
function M.fire_due()
  if cur_i < cur_n then return true end
  local first = true
  for _ = 1, FIRE_BUDGET do
    local key = timer_pop(first)
    if not key then
      if cap > SHRINK_MIN then shrink_check() end
      return false
    end
    first = false
    local i = 3 * key
    local fn, obj, arg = slots[i - 2], slots[i - 1], slots[i]
    slots[i - 2], slots[i - 1], slots[i] = nil, nil, nil
    if fn then fn(obj, arg) end                   -- (none: its slots were never filled)
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
