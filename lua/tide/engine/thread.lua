--- tide.engine.thread — thread-mode tasks: a job on the thread pool, settled on the loop without a coroutine.
--
-- A thread task is an ordinary task run "direct" (tide.engine.sched): its
-- attempt submits the job (function and arguments as bytes), and when the
-- job comes back it settles the attempt with the decoded results or error.
-- So timeouts, cancel, retries, handle_result and await work as for
-- coroutine tasks.  When an attempt ends
-- early (timeout, cancel, shutdown), its attempt-end hook abandons the job:
-- it is dropped from the queue, or its thread is asked to stop; a thread
-- still on it after `stop_wait` ms (JIT-compiled code runs no hooks) is
-- quarantined and replaced, and its late result is dropped.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"

local type, error, tostring, tonumber = type, error, tostring, tonumber
local string_dump, getupvalue, getinfo, traceback = string.dump, debug.getupvalue, debug.getinfo, debug.traceback

local decode_list = core.decode_list
local encode_unordered = core.encode_unordered   -- the pairs in walk order: a value that only crosses (codec.h)
local MAX = core.thread_max                 -- threads a pool may have (1024)

local M = {
  config = { threads = nil, init = nil, memory_mb = 0, stop_wait = 100 },
  MAX_MB = 16777216,                         -- thread_memory, process_memory: 16 TB (the C side takes below 1e15 bytes)
  MAX = MAX,
}

--- The thread count TIDE_THREADS asks for, or nil when unset; raises when it
--- is set to anything but an integer from 1 to MAX.
local function env_threads()
  local text = os.getenv("TIDE_THREADS")
  if text == nil or text == "" then return nil end
  local n = tonumber(text)
  if not check.is_count(n, 1) or n > MAX then
    error(("tide: TIDE_THREADS must be an integer from 1 to %d (got %q)"):format(MAX, text), 0)
  end
  return n
end

-- Checked when tide is loaded: a bad value is refused at the start, not by
-- every thread task later.
env_threads()

--- Checks the thread settings of tide.configure (`opts`), then applies them;
--- errors name `fname` at `level` (default: the caller of fname).
function M.configure(fname, opts, level)
  level = (level or 2) + 1
  if opts.threads ~= nil and not (check.is_count(opts.threads, 1) and opts.threads <= MAX) then
    check.opt_error(fname, "threads", "integer from 1 to " .. MAX, opts.threads, level)
  end
  if opts.thread_init ~= nil and type(opts.thread_init) ~= "string" then
    check.opt_error(fname, "thread_init", "module name", opts.thread_init, level)
  end
  if opts.thread_memory ~= nil and not (check.is_count(opts.thread_memory) and opts.thread_memory <= M.MAX_MB) then
    check.opt_error(fname, "thread_memory", "integer number of MB from 0 (no limit) to " .. M.MAX_MB, opts.thread_memory,
                    level)
  end
  if opts.thread_stop_wait ~= nil and not check.is_ms(opts.thread_stop_wait) then
    check.opt_error(fname, "thread_stop_wait", "non-negative number of ms", opts.thread_stop_wait, level)
  end
  local c = M.config
  if M.started() and (opts.threads or opts.thread_init or opts.thread_memory) then
    error(fname .. ": threads, thread_init and thread_memory must be set before the first thread task", level)
  end
  c.threads = opts.threads or c.threads
  c.init = opts.thread_init or c.init
  c.memory_mb = opts.thread_memory or c.memory_mb
  c.stop_wait = opts.thread_stop_wait or c.stop_wait
end

local next_job = 0
local waiting = {}                          -- job id -> the task whose attempt waits for it
local dumped = setmetatable({}, { __mode = "k" })   -- function -> bytecode
local no_args = setmetatable({}, { __mode = "k" })  -- function -> its payload without arguments
local NO_ARGS = core.encode({ n = 0 })

--- One finished job: its task's attempt is queued to settle it.  It
--- allocates nothing (the task's options have the fields already) and
--- changes nothing before its last allocation (the run queue may grow):
--- when an allocation raises (a finalizer's error), the delivery is tried
--- again from the start.
local function deliver(id, ok, bytes, trace)
  local t = waiting[id]
  if t == nil then return end               -- a late result: its attempt ended
  local o = t._opt
  o.thread_ok, o.thread_bytes, o.thread_trace = ok, bytes, trace or nil
  S.ready(t)
  waiting[id] = nil
end

--- Called by the loop once per batch of finished jobs (lua_threads.c):
--- `list` holds id, ok, bytes, trace (false when none) for each of the n
--- jobs; list[0] counts those delivered, so that after an error the loop
--- knows which one to try again.
local function on_done(list, n)
  for i = 1, n do
    local j = 4 * i
    deliver(list[j - 3], list[j - 2], list[j - 1], list[j])
    list[0] = i
  end
end

local started = false

local function start()
  local c = M.config
  local cpus = core.cpu_count()
  local n = c.threads or env_threads() or (cpus < MAX and cpus or MAX)
  local ok, err = core.thread_start({
    threads = n, path = package.path, cpath = package.cpath, init = c.init,
    memory_limit = c.memory_mb * 1024 * 1024,
  }, on_done)
  if not ok then error("tide: cannot start the thread pool: " .. tostring(err), 0) end
  started = true
end

function M.started() return started end

function M.stats()
  if not started then
    return { size = 0, busy = 0, idle = 0, quarantined = 0, replaced = 0, panicked = 0, queued = 0, in_flight = 0 }
  end
  return core.thread_stats()
end

--- Checks what a thread task runs and with what; returns the job payload
--- { fn bytes, is_name, args bytes }.  Errors name `fname` at `level`, and
--- `dest` where the values go ("a thread", or "a process" for process mode).
function M.payload(fname, run, args, level, dest)
  level = level + 1
  dest = dest or "a thread"
  local fn, is_name
  if type(run) == "string" then
    if not run:match("^[%a_][%w_.]*%.[%a_][%w_]*$") then
      error(("%s: bad option 'run' (\"module.function\" expected, got string %q)"):format(fname, run), level)
    end
    fn, is_name = run, true
  elseif dumped[run] then
    if args == nil then return no_args[run] end   -- checked and dumped before: shared
    fn, is_name = dumped[run], false
  else
    if getinfo(run, "S").what == "C" then
      error(("%s: bad option 'run' (a C function cannot cross to %s; name it as \"module.function\")")
        :format(fname, dest), level)
    end
    local up = getupvalue(run, 1)
    if up then
      error(("%s: bad option 'run' (a function with upvalues cannot cross to %s: upvalue '%s')")
        :format(fname, dest, up), level)
    end
    fn = string_dump(run)
    dumped[run], no_args[run] = fn, { fn, false, NO_ARGS }
    is_name = false
  end
  if args == nil then return { fn, is_name, NO_ARGS } end
  local ok, bytes = pcall(encode_unordered, args, "args")
  if not ok then
    local msg = tostring(bytes):gsub("^[^:]*:%d+: ", ""):gsub("to a thread$", "to " .. dest)
    error(fname .. ": " .. msg, level)
  end
  return { fn, is_name, bytes }
end

local function quarantine_if_stuck(id)
  core.thread_quarantine(id)
end

--- The attempt that waited for job `id` ended early: give up on the job.
local function abandon(id)
  waiting[id] = nil
  if not started then return end
  if core.thread_cancel(id) == 2 then        -- running: asked to stop
    S.timer(M.config.stop_wait, quarantine_if_stuck, id)
  end
end

--- The attempt-end hook of a thread task while its job is out (one
--- function for all: the job's id rides in the task's options).
local function abandon_hook(t)
  local o = S.options(t)
  local id = o.thread_job
  o.thread_bytes = false
  if id then o.thread_job = false; abandon(id) end
end

local function submit(t, o)
  if not started then start() end
  next_job = next_job + 1
  local p = o.thread
  core.thread_submit(next_job, p[1], p[2], p[3])
  waiting[next_job] = t                     -- may grow: raises inside the pcall
  return next_job
end

--- Settles t's attempt with the values decoded from its results, when the
--- decoding went through (`done`); else with its error.
local function settle_results(t, done, ...)
  if done then return S.settle(t, "ok", ...) end
  local err = ...
  t.traceback = traceback("thread task: cannot decode its results: " .. tostring(err))
  return S.settle(t, "error", err)
end

--- The job came back: settle the attempt with its results or its error.
local function settle(t, o, bytes)
  o.thread_job, o.thread_bytes = false, false
  S.off_attempt_end(t, abandon_hook)
  -- Protected: an error that interrupts the decoding (a finalizer's, at an
  -- allocation) fails this attempt, as it would fail a coroutine task.
  -- The results come as a list: their values, never a table of them.
  if o.thread_ok then return settle_results(t, pcall(decode_list, bytes)) end
  local done, value, err = pcall(core.decode, bytes)
  if not done then
    t.traceback = traceback(tostring(value))
    return S.settle(t, "error", value)
  end
  t.traceback = o.thread_trace
  if err then value = "thread task: cannot decode its error: " .. err end
  return S.settle(t, "error", value)
end

--- The options of a new thread task that runs `payload`: every field its
--- attempts use is there from the start (false while unset), so that the
--- table never grows.  That includes the ones tide.spawn's option table
--- sets (name ... on_retry), nil or not: LuaJIT makes a key even to store
--- nil in it, and a full table rehashes for each such key (4 rehashes per
--- task, a third of its instructions on the loop, before they were here).
function M.options(payload)
  return { thread = payload, direct = M.direct, thread_job = false, thread_ok = false,
           thread_bytes = false, thread_trace = false, on_attempt_end = false,
           name = false, timeout = false, retry = false, handle_result = false, on_retry = false }
end

--- The `direct` function of every thread task (sched.lua, "direct tasks"):
--- run from the run queue, without a coroutine, to submit the attempt's job,
--- and again once the job came back.
function M.direct(t)
  local o = t._opt
  local bytes = o.thread_bytes
  if bytes then return settle(t, o, bytes) end
  if o.thread_job then return end          -- out on a thread still
  local ok, id = pcall(submit, t, o)
  if not ok then
    t.traceback = traceback(tostring(id))
    return S.settle(t, "error", id)
  end
  o.thread_job = id
  S.on_attempt_end(t, abandon_hook)
end

return M
