--- tide.engine.testing — tide.testing: a virtual clock for users' specs, and the checks to run after each test.
--
--   local testing = tide.testing          -- (tide: the module the script required)
--   before_each(testing.before_each)      -- errors sent to the sink are collected
--   after_each(testing.after_each)        -- no task left, no handle open, no error unseen
--
--   it("retries with backoff", function()
--     local clock = testing.clock()       -- tide.now() stops moving by itself
--     tide.run(function()
--       local t = tide.spawn{ run = flaky, retry = { max_attempts = 10, base = 1000, max = 600000 } }
--       clock:advance(3600000)             -- an hour passes in milliseconds of real time
--       assert.equal("ok", t:status())
--     end)
--   end)
--
-- clock:advance(ms) moves time forward by ms: every timer due in that span
-- fires in deadline order (timeouts, retry backoffs, tide.after/every,
-- supervisor cool-downs, a worker's polls, leases and schedules: they all
-- run on the engine's timers), and the tasks each one wakes run before time
-- moves on.  Inside a task, advance waits while the rest of the program
-- runs; outside any task it drives the loop itself.  Real I/O (SQLite,
-- PostgreSQL, thread tasks) goes on in real time: a thread's result arrives
-- when it arrives.  The wall clock (durable jobs' run_at) moves with the
-- virtual one; PostgreSQL leases are timed by the server's own clock and
-- do not.
local core = require "tide.core"
local S = require "tide.engine.sched"
local runq = require "tide.engine.runq"
local check = require "tide.engine.check"
local log = require "tide.engine.log"

local type, error, setmetatable, getmetatable, concat = type, error, setmetatable, getmetatable, table.concat

local M = {}

local Clock = {}
local Clock_mt = { __index = Clock, __tostring = function(c)
  return ("tide.testing.clock (%s, at %g ms)"):format(c.on and "virtual" or "stopped", core.now())
end }

local current_clock = nil

local function check_clock(fname, c)
  if getmetatable(c) ~= Clock_mt then
    error(("%s: bad self (clock expected, got %s)"):format(fname, check.describe(c)), 3)
  end
  if not c.on then error(fname .. ": this clock was stopped (tide.testing.clock() starts another)", 3) end
end

--- Switches the loop to virtual time and returns the clock (the same one
--- while it is on).
function M.clock()
  if current_clock then return current_clock end
  core.clock_virtual(true)
  current_clock = setmetatable({ on = true, started = core.now() }, Clock_mt)
  return current_clock
end

--- Drives the loop from outside any task until the advance is done.
local function drive(fname)
  if core.running() then
    error(fname .. ": called from a callback while the loop runs (call it from a task, or from outside the loop)", 4)
  end
  core.kick()
  local spins = 0
  while S.advancing() do
    core.run(true)
    spins = spins + 1
    if spins > 1e7 then error(fname .. ": the loop would not settle (a task that never waits?)", 4) end
  end
end

--- Starts advancing the virtual clock to `target` (ms, tide.now's scale),
--- or through every timer up to it when `until_idle`.  Inside a task, the
--- task waits until it is done (true: the caller must drive the loop).
local function advance(target, until_idle, fname)
  if runq.advancing() then error(fname .. ": the clock is already advancing", 3) end
  if not S.in_task() then
    runq.advance(target, until_idle)
    return true
  end
  local t, tok = S.wait_begin(fname, 3)
  runq.advance(target, until_idle, t, tok)
  core.kick()
  S.wait_end(t, tok)
end

--- Moves time forward by `ms`, firing what falls due in order.  Returns
--- the virtual time (tide.now()) afterwards.
function Clock.advance(c, ms)
  check_clock("clock:advance", c)
  if not check.is_ms(ms) then check.arg_error("clock:advance", 1, "non-negative number of ms", ms) end
  if advance(core.now() + ms, false, "clock:advance") then drive("clock:advance") end
  return core.now()
end

--- Fires every pending timer in order, and what they wake, until none is
--- left within `max_ms` (default: one day of virtual time, which also stops
--- a tide.every that never ends).  Returns the virtual ms that passed.
function Clock.run_until_idle(c, max_ms)
  check_clock("clock:run_until_idle", c)
  if max_ms ~= nil and not check.is_ms(max_ms) then
    check.arg_error("clock:run_until_idle", 1, "non-negative number of ms", max_ms)
  end
  local t0 = core.now()
  if advance(t0 + (max_ms or 86400000), true, "clock:run_until_idle") then drive("clock:run_until_idle") end
  return core.now() - t0
end

--- The virtual time now (tide.now()).
function Clock.now(c)
  check_clock("clock:now", c)
  return core.now()
end

--- Back to the real clock (timers already due fire at once).
function Clock.stop(c)
  if getmetatable(c) ~= Clock_mt then check_clock("clock:stop", c) end
  if not c.on then return false end
  c.on = false
  current_clock = nil
  core.clock_virtual(false)
  return true
end

-- ===== checks around each test

local collected = nil        -- errors sent to the sink during the current test
local saved_sink = nil

--- Call in before_each: errors that reach the sink are collected (and
--- checked by after_each) instead of printed.
function M.before_each()
  collected = {}
  saved_sink = log.sink
  log.set_sink(function(where, err, tb) collected[#collected + 1] = { where = where, err = err, traceback = tb } end)
end

--- The errors the sink received since before_each, and forgets them (a
--- test that expects errors takes them, so after_each does not fail).
function M.errors()
  local list = collected or {}
  if collected then collected = {} end
  return list
end

--- Call in after_each: stops a virtual clock, then raises when a task is
--- still live, a handle of tide's is still open, or an error reached the
--- sink that the test did not take with testing.errors().
function M.after_each()
  if current_clock then current_clock:stop() end
  local errs = collected or {}
  collected = nil
  if saved_sink then log.set_sink(saved_sink ~= log.default_sink and saved_sink or nil); saved_sink = nil end
  local problems = {}
  local live = S.live_count()
  if live > 0 then problems[#problems + 1] = ("%d task%s still live"):format(live, live == 1 and "" or "s") end
  local active = core.stats()
  if active > 0 then problems[#problems + 1] = ("%d handle%s of tide's still active"):format(active, active == 1 and "" or "s") end
  for i = 1, #errs do
    problems[#problems + 1] = ("error sent to the sink: %s: %s"):format(errs[i].where, type(errs[i].err) == "string"
      and errs[i].err or check.describe(errs[i].err))
  end
  if #problems > 0 then error("tide.testing: " .. concat(problems, "; "), 2) end
end

return M
