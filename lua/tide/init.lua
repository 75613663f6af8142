--- tide — supervised tasks, timers, retries, pools, supervision, flows and durable jobs on an event loop.
--
-- This file is the public face and nothing else: it gathers the API from
-- the layers below (engine, flow, supervision, jobs).  Nothing inside the
-- library requires it; see README.md for the guide and its vocabulary.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local config = require "tide.engine.config"
local host = require "tide.engine.host"
local log = require "tide.engine.log"
local task = require "tide.engine.task"
local thread = require "tide.engine.thread"
local process = require "tide.engine.process"
local timer = require "tide.engine.timer"
local runq = require "tide.engine.runq"
require "tide.engine.finalizers"         -- a __gc that raises is reported, not rethrown

local type, error = type, error
local arg_error, is_ms = check.arg_error, check.is_ms

local tide = { _VERSION = "tide 0.1.0" }

-- ===== tasks and time

tide.spawn = task.spawn
tide.sleep = S.sleep         -- suspends the current task for ms (0: let others run)
tide.now = core.now          -- monotonic ms (fractional), for measuring intervals
tide.after = timer.after
tide.every = timer.every
tide.current = S.current_handle   -- the task running now, or nil outside tasks

-- ===== the loop

--- Runs fn(...) as the root task and drives the loop until no work is left.
--- Returns the root task's status and value(s), as task:await does.
function tide.run(fn, ...)
  if type(fn) ~= "function" then arg_error("tide.run", 1, "function", fn) end
  local why = runq.unusable()                -- this copy retired, the loop closed
  if why then error("tide.run: " .. why, 2) end
  if core.running() then
    error("tide.run: the loop is already running (tide.run is for a plain host; inside a task, spawn and await)", 2)
  end
  local root = task.spawn(fn, ...)
  S.options(root).heard = true            -- its outcome is what tide.run returns
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

tide.configure = config.configure
tide.testing = require "tide.engine.testing"

--- Counters: tasks by outcome, live tasks, timers, handles, callback errors.
function tide.stats()
  local st = S.stats
  local active, timers, timer_bytes = core.stats()
  local kept, cap, hits, small, small_cap, anchors, arena = core.alloc_cache()
  return {
    spawned = st.spawned, ok = st.ok, error = st.error, timeout = st.timeout,
    cancelled = st.cancelled, retries = st.retries, live = S.live_count(),
    timers = timers, timer_bytes = timer_bytes, active_handles = active,
    callback_errors = log.errors, threads = thread.stats(), processes = process.stats(),
    alloc_cache = { kept = kept, cap = cap, hits = hits, small = small, small_cap = small_cap,
                    anchors = anchors, arena = arena },
  }
end

-- ===== the layers above the engine

tide.pool = require("tide.engine.pool").new
tide.supervisor = require("tide.supervision.supervisor").new
tide.consumer = require("tide.supervision.consumer").new
tide.sources = { memory = require("tide.supervision.sources.memory").new,
                 rabbitmq = require("tide.supervision.sources.rabbitmq").new }
tide.flow = require("tide.flow.run").new
tide.queue = { open = require("tide.jobs.queue").open }
do                           -- the JSON of jobs: exact numbers, arrays kept arrays, strict input
  local json = require "tide.jobs.json"
  tide.json = { encode = json.encode, decode = json.decode, array = json.array, null = json.null }
end
tide.worker = require("tide.jobs.worker").new
local metrics = require "tide.observe.metrics"
tide.metrics = { serve = metrics.serve, render = metrics.render }
local web = require "tide.observe.web"
tide.web = { serve = web.serve, handler = web.handler }

return tide
