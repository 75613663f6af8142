--- tide — supervised tasks, timers, retries and pools on an event loop.
--
-- This file is the public face: it checks arguments and hands the work to
-- tide.sched (the engine).  See README.md for the guide.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local thread = require "tide.engine.thread"

local type, error, ipairs, setmetatable, getmetatable = type, error, ipairs, setmetatable, getmetatable
local new_task, start = S.new_task, S.start
local arg_error, opt_error, is_ms = check.arg_error, check.opt_error, check.is_ms

local tide = { _VERSION = "tide 0.1.0" }

local config = { grace = 5000, signals = true }

-- ===== tasks

local make_task = require("tide.engine.task").make_task

--- Spawns a task: `tide.spawn(fn, ...)` or `tide.spawn{ run = fn, ... }`.
--- Returns at once; the task starts on the next tick.
function tide.spawn(spec, ...)
  local t = make_task("tide.spawn", "coroutine", spec, ...)
  start(t)
  return t
end

-- ===== time

--- Suspends the current task for `ms` milliseconds (0: let others run).
tide.sleep = S.sleep

--- Monotonic time in milliseconds (fractional), for measuring intervals.
tide.now = core.now

local Timer = {}
local Timer_mt = { __index = Timer, __tostring = function(tm)
  return ("tide.Timer (%s)"):format(tm.key and "pending" or "stopped")
end }
--- on_finish of a timer's task (internal, so no protected call per run):
--- a failure goes to the error sink, as nobody awaits these tasks.
local function timer_finished(t)
  local status = t:status()
  if status == "error" then log.report("timer callback", t.value, t.traceback)
  elseif status == "timeout" then log.report("timer callback", t.value) end
end

--- The task of a timer: fn(timer).  (No argument table per run: the timer
--- rides in the task's options.)
local function run_timer()
  local tm = S.current()._opt.tm
  return tm.fn(tm)
end

local function fire(tm)
  tm.key = false
  if tm.every then tm.key = S.timer(tm.ms, fire, tm) end
  start(new_task(run_timer, { timer = false, tm = tm, on_finish = timer_finished }))
end

local function new_timer(fname, ms, fn, every)
  if not is_ms(ms, every) then
    arg_error(fname, 1, every and "positive number of ms" or "non-negative number of ms", ms, 3)
  end
  if type(fn) ~= "function" then arg_error(fname, 2, "function", fn, 3) end
  if S.shutting_down() then error(fname .. ": the loop is shutting down", 3) end
  local tm = setmetatable({ ms = ms, fn = fn, every = every, key = false }, Timer_mt)
  tm.key = S.timer(ms, fire, tm)
  return tm
end

--- Runs fn(timer) as a task once, `ms` from now.  Returns a timer.
function tide.after(ms, fn)
  local tm = new_timer("tide.after", ms, fn, false)   -- not a tail call: errors blame the caller
  return tm
end

--- Runs fn(timer) as a task every `ms` until timer:stop().
function tide.every(ms, fn)
  local tm = new_timer("tide.every", ms, fn, true)
  return tm
end

--- Stops the timer; true when it was still pending.
function Timer.stop(tm)
  if getmetatable(tm) ~= Timer_mt then
    error(("timer:stop: bad self (timer expected, got %s)"):format(check.describe(tm)), 2)
  end
  if not tm.key then return false end
  S.untimer(tm.key)
  tm.key = false
  return true
end

S.on_shutdown(function()
  for _, tm in ipairs(S.timers_of(fire)) do Timer.stop(tm) end
end)

-- ===== the loop

local host = require "tide.engine.host"
host.config = config

--- Runs fn(...) as the root task and drives the loop until no work is left.
--- Returns the root task's status and value(s), as task:await does.
function tide.run(fn, ...)
  if type(fn) ~= "function" then arg_error("tide.run", 1, "function", fn) end
  if core.running() then
    error("tide.run: the loop is already running (tide.run is for a plain host; inside a task, spawn and await)", 2)
  end
  local root = tide.spawn(fn, ...)
  host.loop()
  return S.results(root)
end

--- Starts a graceful shutdown: nothing new starts, running tasks get
--- `grace_ms` (default: configure's grace, 5000) and are then cancelled.
function tide.shutdown(grace_ms)
  if grace_ms ~= nil and not is_ms(grace_ms) then
    arg_error("tide.shutdown", 1, "non-negative number of ms", grace_ms)
  end
  S.shutdown(grace_ms or config.grace)
end

local CONFIG_KEYS = { grace = true, on_error = true, signals = true, threads = true,
                      thread_init = true, thread_memory = true, thread_stop_wait = true }

local function configure_threads(opts)
  local c = thread.config
  local fname = "tide.configure"
  if opts.threads ~= nil and not check.is_count(opts.threads, 1) then
    opt_error(fname, "threads", "integer >= 1", opts.threads, 3)
  end
  if opts.thread_init ~= nil and type(opts.thread_init) ~= "string" then
    opt_error(fname, "thread_init", "module name", opts.thread_init, 3)
  end
  if opts.thread_memory ~= nil and not check.is_count(opts.thread_memory) then
    opt_error(fname, "thread_memory", "integer number of MB (0: no limit)", opts.thread_memory, 3)
  end
  if opts.thread_stop_wait ~= nil and not is_ms(opts.thread_stop_wait) then
    opt_error(fname, "thread_stop_wait", "non-negative number of ms", opts.thread_stop_wait, 3)
  end
  if thread.started() and (opts.threads or opts.thread_init or opts.thread_memory) then
    error(fname .. ": threads, thread_init and thread_memory must be set before the first thread task", 3)
  end
  c.threads = opts.threads or c.threads
  c.init = opts.thread_init or c.init
  c.memory_mb = opts.thread_memory or c.memory_mb
  c.stop_wait = opts.thread_stop_wait or c.stop_wait
end

--- Sets process-wide options: grace (ms), on_error (sink), signals (bool);
--- for thread mode: threads (count), thread_init (module each thread
--- requires), thread_memory (MB per thread state), thread_stop_wait (ms a
--- thread gets to stop before it is quarantined).
function tide.configure(opts)
  if type(opts) ~= "table" then arg_error("tide.configure", 1, "table", opts) end
  check.known("tide.configure", opts, CONFIG_KEYS)
  configure_threads(opts)
  if opts.grace ~= nil and not is_ms(opts.grace) then
    opt_error("tide.configure", "grace", "non-negative number of ms", opts.grace)
  end
  if opts.on_error ~= nil and type(opts.on_error) ~= "function" then
    opt_error("tide.configure", "on_error", "function", opts.on_error)
  end
  if opts.signals ~= nil and type(opts.signals) ~= "boolean" then
    opt_error("tide.configure", "signals", "boolean", opts.signals)
  end
  if opts.grace ~= nil then config.grace = opts.grace end
  if opts.signals ~= nil then config.signals = opts.signals end
  if opts.on_error ~= nil then log.set_sink(opts.on_error) end
end

--- Counters: tasks by outcome, live tasks, timers, handles, callback errors.
function tide.stats()
  local st = S.stats
  local active, timers, timer_bytes = core.stats()
  return {
    spawned = st.spawned, ok = st.ok, error = st.error, timeout = st.timeout,
    cancelled = st.cancelled, retries = st.retries, live = S.live_count(),
    timers = timers, timer_bytes = timer_bytes, active_handles = active,
    callback_errors = log.errors, threads = thread.stats(),
  }
end

--- The task running now, or nil outside tasks.
tide.current = S.current

tide.pool = require("tide.engine.pool").new
tide.supervisor = require("tide.supervision.supervisor").new
tide.consumer = require("tide.supervision.consumer").new
tide.sources = { memory = require("tide.supervision.sources.memory").memory,
                 rabbitmq = require("tide.supervision.sources.rabbitmq").rabbitmq }
tide.flow = require("tide.flow.run").new
tide.queue = { open = require("tide.jobs.queue").open }
tide.worker = require("tide.jobs.worker").new

return tide
