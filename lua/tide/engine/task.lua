--- tide.engine.task — task specs (shared by tide.spawn and pool:submit), spawning, and the task methods.
local S = require "tide.engine.sched"
local runq = require "tide.engine.runq"
local check = require "tide.engine.check"
local retry = require "tide.engine.retry"
local fields = require "tide.engine.fields"
local STATE, WAITERS, AWAITING = fields.STATE, fields.WAITERS, fields.AWAITING
local unheard = require "tide.engine.unheard"
local thread = require "tide.engine.thread"
local process = require "tide.engine.process"

local type, select, error, getmetatable, unpack = type, select, error, getmetatable, unpack
local maxn = table.maxn
local new_task, TERMINAL, results = S.new_task, S.TERMINAL, S.results
local arg_error, opt_error, is_ms = check.arg_error, check.opt_error, check.is_ms

local M = {}

local SPAWN_KEYS = check.options("tide.spawn", {
  run = true, args = true, mode = true, timeout = true, name = true, retry = true,
  handle_result = true, on_retry = true
})
local MODES = { coroutine = true, thread = true, process = true }
-- What unpack can give a task's function: LuaJIT refuses 7,999 and more
-- values ("too many results to unpack", which escaped from tide.spawn
-- naming neither the function nor the option: spec/review_r1_spec.lua).
local MAX_ARGS = 7000
M.MODES = MODES

local function opt_function(fname, spec, key)
  local v = spec[key]
  if v ~= nil and type(v) ~= "function" then opt_error(fname, key, "function", v, 5) end
  return v
end

local function check_mode(fname, mode, level)
  if mode == nil or MODES[mode] then return end
  opt_error(fname, "mode", "'coroutine', 'thread' or 'process'", mode, level + 1)
end
M.check_mode = check_mode

local function thread_task(fname, run, args, level, roomy)
  local payload = thread.payload(fname, run, args, level + 1)
  return new_task(false, thread.options(payload, roomy))
end

local function process_task(fname, run, args, level)
  local payload = process.payload(fname, run, args, level + 1)
  local t = new_task(process.proxy, nil)
  S.options(t).process = payload
  return t
end

--- Checks an option table given to `fname` (with `nextra` arguments after
--- it), all but what crosses to a thread or process; returns the mode, the
--- arguments (copied), the retry policy, handle_result and on_retry.
--- Errors blame the caller of the caller of the caller (the user's line).
local function check_spec(fname, default_mode, spec, nextra)
  if nextra > 0 then
    error(fname .. ": extra arguments after an option table (pass them as 'args')", 4)
  end
  check.known(fname, spec, SPAWN_KEYS, nil, 4)
  check_mode(fname, spec.mode, 4)
  local mode = spec.mode or default_mode
  local run = spec.run
  if mode == "thread" or mode == "process" then
    if type(run) ~= "function" and type(run) ~= "string" then
      opt_error(fname, "run", "function or \"module.function\"", run, 4)
    end
  elseif type(run) ~= "function" then
    opt_error(fname, "run", "function", run, 4)
  end
  local args = spec.args
  if args ~= nil then
    if type(args) ~= "table" then opt_error(fname, "args", "table", args, 4) end
    if args.n ~= nil and not check.is_count(args.n) then
      opt_error(fname, "args.n", "non-negative integer", args.n, 4)
    end
    if args.n ~= nil and args.n > MAX_ARGS then opt_error(fname, "args.n", "at most " .. MAX_ARGS, args.n, 4) end
    local n = args.n or maxn(args)
    if n > MAX_ARGS then
      error(("%s: bad option 'args' (at most %d arguments expected, got %d)"):format(fname, MAX_ARGS, n), 4)
    end
    args = { n = n, unpack(args, 1, n) }
  end
  if spec.timeout ~= nil and not is_ms(spec.timeout, true) then
    opt_error(fname, "timeout", "positive number of ms", spec.timeout, 4)
  end
  if spec.name ~= nil and type(spec.name) ~= "string" then opt_error(fname, "name", "string", spec.name, 4) end
  local policy = spec.retry ~= nil and retry.policy(fname, spec.retry, 4) or nil
  local handle_result = opt_function(fname, spec, "handle_result")
  local on_retry = opt_function(fname, spec, "on_retry")
  return mode, args, policy, handle_result, on_retry
end

--- Checks `spec, ...` as make_task would, without making a task (a pool
--- that refuses it for being full still refuses misuse first), what crosses
--- to a thread or a process included (the function and its arguments, given
--- plainly or in an option table); errors blame the caller of `fname`.
function M.check_spec(fname, default_mode, spec, ...)
  local kind = type(spec)
  local mode, run, args
  if kind == "function" then
    local n = select("#", ...)
    mode, run, args = default_mode, spec, n > 0 and { n = n, ... } or nil
  else
    if kind ~= "table" then arg_error(fname, 1, "function or table", spec, 3) end
    mode, args = check_spec(fname, default_mode, spec, select("#", ...))
    run = spec.run
  end
  if mode == "thread" then thread.payload(fname, run, args, 3)
  elseif mode == "process" then process.payload(fname, run, args, 3) end
end

--- Builds a pending task from `fn, ...` or an option table (shared by
--- tide.spawn and pool:submit, whose `mode` is the default); errors name
--- `fname` and the user's line.
local function make_task(fname, default_mode, spec, ...)
  local kind = type(spec)
  if kind == "function" then
    local n = select("#", ...)
    local args = n > 0 and { n = n, ... } or nil
    if default_mode == "thread" then             -- a thread pool's: room for its slot and hook
      local t = thread_task(fname, spec, args, 3, true)   -- not a tail call: errors blame the caller
      return t
    elseif default_mode == "process" then
      local t = process_task(fname, spec, args, 3)
      return t
    end
    return new_task(spec, args and { args = args })
  elseif kind ~= "table" then
    arg_error(fname, 1, "function or table", spec, 3)
  end
  -- Everything is checked before the task exists: a bad spec leaves no task behind.
  local mode, args, policy, handle_result, on_retry = check_spec(fname, default_mode, spec, select("#", ...))
  local run = spec.run
  local t
  if mode == "thread" then   -- roomy: the options below go in without a rehash
    t = thread_task(fname, run, args, 3, default_mode ~= "coroutine" or spec.timeout ~= nil or spec.name ~= nil
                    or policy or handle_result or on_retry)
  elseif mode == "process" then t = process_task(fname, run, args, 3)
  else t = new_task(run, args and { args = args }) end
  local o = S.options(t)
  -- Only the options given: a nil stored under a key the table lacks still
  -- makes a slot for it (5 such stores grew the table twice per spawn).
  if spec.name ~= nil then o.name = spec.name end
  if spec.timeout ~= nil then o.timeout = spec.timeout end
  if policy then o.retry = policy end
  if handle_result then o.handle_result = handle_result end
  if on_retry then o.on_retry = on_retry end
  if on_retry and check.positional_hook(fname, "on_retry", on_retry, 3) then o.on_retry_positional = true end
  return t
end
M.make_task = make_task

--- Spawns a task: `spawn(fn, ...)` or `spawn{ run = fn, ... }` (tide.spawn
--- is this function; tide's own modules call it directly).  Returns at
--- once; the task starts on the next tick.
function M.spawn(spec, ...)
  -- (outside a tick only, a C call: the loop may have been closed)
  if runq.retired or not runq.in_tick() and runq.unusable() then error("tide.spawn: " .. runq.unusable(), 2) end
  local t = make_task("tide.spawn", "coroutine", spec, ...)
  S.start(t)
  return t
end

local Task = S.Task

local function check_task(fname, t)
  if getmetatable(t) ~= S.Task_mt then
    error(("%s: bad self (task expected, got %s); call it as task:%s(...)")
      :format(fname, check.describe(t), fname:match("[:.](%w+)$")), 3)
  end
end

--- Waits for the task's outcome: returns status, value (all its values when
--- it returned several).  With `timeout_ms`, returns nil, "timeout" when the
--- task has not finished by then (the task itself goes on).
function Task.await(t, timeout_ms)
  check_task("task:await", t)
  if timeout_ms ~= nil and not is_ms(timeout_ms) then
    arg_error("task:await", 1, "non-negative number of ms", timeout_ms)
  end
  local me = S.current()
  if me == t then error("task:await: a task cannot await itself", 2) end
  if me == nil and TERMINAL[S.state(t)] then    -- refused as a wait would be (a callback, the main chunk)
    S.check_wait("task:await", 2)              -- (raises)
  end
  if TERMINAL[t[STATE]] then unheard.hear(t); return results(t) end
  local w, tok = S.wait_begin("task:await", 2)
  if not t[WAITERS] then t[WAITERS] = {} end
  S.add_waiter(t[WAITERS], w, tok)
  w[AWAITING] = t                       -- so that an end of w's attempt takes it off the list
  S.wait_end(w, tok, timeout_ms)
  w[AWAITING] = nil
  if not TERMINAL[t[STATE]] then
    if t[WAITERS] then S.remove_waiter(t[WAITERS], w) end
    return nil, "timeout"
  end
  return results(t)
end

--- Raises, naming `fname`, where t:await() would refuse to wait (outside a
--- task, in a callback, in a nested coroutine, in t itself): for the
--- handles built on a task (run:await, supervisor:await), whose errors
--- blame their caller's line (`level`, as error()'s) and name themselves.
function M.check_await(fname, t, level)
  local me = S.current()
  if me == t then error(fname .. ": a task cannot await itself", level + 1) end
  if me == nil or not TERMINAL[t[STATE]] then S.check_wait(fname, level + 1) end   -- (as Task.await)
end

--- Cancels the task: its outcome is `cancelled` with `reason` (default
--- "cancelled").  Returns true, or nil and a message when it already finished.
function Task.cancel(t, reason)
  check_task("task:cancel", t)
  return S.cancel(t, reason)
end

--- "pending", "running", "retrying", or the terminal status.
function Task.status(t)
  check_task("task:status", t)
  return S.state(t)
end

return M
