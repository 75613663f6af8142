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
local OPT = require("tide.engine.fields").OPT

local type, error, tostring, tonumber = type, error, tostring, tonumber
local table_new = require "table.new"
local string_dump, getupvalue, getinfo, traceback = string.dump, debug.getupvalue, debug.getinfo, debug.traceback

-- Values that stay in this process cross by LuaJIT's serializer when they
-- hold tables (tide's codec behind it: codec.h, the _local functions);
-- those that go to a process, by tide's codec alone.
local encode_local, encode_unordered = core.encode_local, core.encode_unordered
local decode_local, decode_list_local = core.decode_local, core.decode_list_local
local MAX = core.thread_max                 -- threads a pool may have (1024)

local M = {
  config = { threads = nil, init = nil, memory_mb = 0, stop_wait = 100 },
  running = nil,                             -- once the pool started: its threads, init, memory_mb
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
  if opts.thread_init ~= nil and (type(opts.thread_init) ~= "string" or opts.thread_init == "") then
    check.opt_error(fname, "thread_init", "module name", opts.thread_init, level)
  end
  if opts.thread_memory ~= nil and not (check.is_count(opts.thread_memory) and opts.thread_memory <= M.MAX_MB) then
    check.opt_error(fname, "thread_memory", "integer number of MB from 0 (no limit) to " .. M.MAX_MB, opts.thread_memory,
                    level)
  end
  if opts.thread_stop_wait ~= nil and not check.is_ms(opts.thread_stop_wait) then
    check.opt_error(fname, "thread_stop_wait", "non-negative number of ms", opts.thread_stop_wait, level)
  end
  local c, r = M.config, M.running
  -- Once the pool runs, only a change is refused: a script run again in the
  -- same Lua state (a host's, a second tide.run) that sets the same values
  -- again failed at its first line.
  if r and (opts.threads ~= nil and opts.threads ~= r.threads or opts.thread_init ~= nil and opts.thread_init ~= r.init
            or opts.thread_memory ~= nil and opts.thread_memory ~= r.memory_mb) then
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

-- ===== the jobs out on threads
--
-- A job's id grows for ever (the pool finds jobs by it), but the tables
-- here are indexed by a slot, a small number reused from job to job, which
-- rides with the job through the pool (its tag) and comes back with its
-- result: a table keyed by the ids themselves is a queue-like hash that
-- LuaJIT rehashes every few inserts once it is nearly full (measured in
-- plain LuaJIT: 3.2 us per insert at 8,000 in flight, 5.4 us at 16,000,
-- against 0.1 us at 100), and that was a thread task's dearest step.
-- A slot is taken by submit and given back exactly once: by the delivery
-- of its job's result, or by abandon (the attempt ended first); both take
-- the slot out of the task's `thread_job` (the delivery puts what came back
-- there, abandon false), so neither finds it again.
local next_job = 0
-- slot -> the task waiting (false when free) and the id of its job; a free
-- slot's id entry holds minus the next free slot (0: none), so the free
-- list costs no array of its own (at 100,000 in flight, 1 MB and ~250
-- first-touch page faults less: bench/RESULTS.md).  A late result's id
-- never matches a free slot's entry (ids are positive).
local slot_task, slot_id = {}, {}
local free_slot, nslots = 0, 0              -- the first free slot (0: none), slots made

--- Takes a free slot for task t's job `id`.  May allocate (a new slot):
--- raises then with nothing taken.
local function take_slot(t, id)
  local slot = free_slot
  if slot == 0 then
    slot = nslots + 1
    slot_id[slot] = id                       -- grows both arrays before anything is taken
    slot_task[slot] = t
    nslots = slot
    return slot
  end
  free_slot = -slot_id[slot]
  slot_task[slot], slot_id[slot] = t, id
  return slot
end

--- Gives a slot back (allocates nothing: both arrays have the slot already).
local function give_slot(slot)
  slot_task[slot], slot_id[slot] = false, -free_slot
  free_slot = slot
end

--- One finished job: its task's attempt is queued to settle it, with what
--- came back in `thread_job` (M.options).  It allocates nothing but the run
--- queue's growth (and, for an error, the pair of its bytes and trace),
--- and changes nothing before: when an allocation raises (a finalizer's
--- error), the delivery is tried again from the start.
local function deliver(id, slot, ok, bytes, trace)
  local t = slot_task[slot]
  if not t or slot_id[slot] ~= id then return end   -- a late result: its attempt ended
  local back = bytes
  if not ok then back = { bytes, trace or true } end
  S.ready(t)
  t[OPT].thread_job = back
  give_slot(slot)
end

--- Called by the loop once per batch of finished jobs (lua_threads.c):
--- `list` holds id, tag (the slot), ok, bytes, trace (false when none) for
--- each of the n jobs; list[0] counts those delivered, so that after an
--- error the loop knows which one to try again.
local function on_done(list, n)
  for i = 1, n do
    local j = 5 * i
    deliver(list[j - 4], list[j - 3], list[j - 2], list[j - 1], list[j])
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
  M.running = { threads = n, init = c.init, memory_mb = c.memory_mb }   -- what configure may no longer change
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
    if not run:match("^[%a_][%w_.]*%.[%a_][%w_]*$") or run:find("..", 1, true) then
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
  local ok, bytes = pcall(dest == "a thread" and encode_local or encode_unordered, args, "args")
  if not ok then
    local msg = tostring(bytes):gsub("^[^:]*:%d+: ", ""):gsub("to a thread$", "to " .. dest)
    error(fname .. ": " .. msg, level)
  end
  return { fn, is_name, bytes }
end

local function quarantine_if_stuck(id)
  core.thread_quarantine(id)
end

--- The attempt that waited for the job in `slot` ended early: give up on the job.
local function abandon(slot)
  local id = slot_id[slot]
  give_slot(slot)
  if not started then return end
  if core.thread_cancel(id) == 2 then        -- running: asked to stop
    S.timer(M.config.stop_wait, quarantine_if_stuck, id)
  end
end

--- The attempt-end hook of a thread task while its job is out (one
--- function for all: the job's slot rides in the task's options).  A
--- result that came back and was not settled yet is dropped with it.
local function abandon_hook(t)
  local o = S.options(t)
  local job = o.thread_job
  o.thread_job = false
  if type(job) == "number" then abandon(job) end
end

--- Submits t's job; returns its slot.  Raises with nothing left behind.
local function submit(t, o)
  if not started then start() end
  local id = next_job + 1
  local slot = take_slot(t, id)
  local p = o.thread
  local ok, err = pcall(core.thread_submit, id, slot, p[1], p[2], p[3])
  if not ok then give_slot(slot); error(err, 0) end
  next_job = id
  return slot
end

--- Settles t's attempt with the values decoded from its results, when the
--- decoding went through (`done`); else with its error.
local function settle_results(t, done, ...)
  if done then return S.settle(t, "ok", ...) end
  local err = ...
  t.traceback = traceback("thread task: cannot decode its results: " .. tostring(err))
  return S.settle(t, "error", err)
end

--- The job came back (`back`: its results' bytes, or the pair of its
--- error's bytes and trace): settle the attempt with them.
local function settle(t, o, back)
  o.thread_job = false
  S.off_attempt_end(t, abandon_hook)
  -- Protected: an error that interrupts the decoding (a finalizer's, at an
  -- allocation) fails this attempt, as it would fail a coroutine task.
  -- The results come as a list: their values, never a table of them.
  if type(back) == "string" then return settle_results(t, pcall(decode_list_local, back)) end
  local bytes, failed = back[1], back[2]
  local done, value, err = pcall(decode_local, bytes)
  if not done then
    t.traceback = traceback(tostring(value))
    return S.settle(t, "error", value)
  end
  t.traceback = failed ~= true and failed or nil
  if err then value = "thread task: cannot decode its error: " .. err end
  return S.settle(t, "error", value)
end

--- The options of a new thread task that runs `payload`: every field its
--- attempts use is there from the start (false while unset): four keys, a
--- hash part of 4, 160 bytes; `roomy` (the task has options of its own to
--- store: a timeout and its timer, handle_result...) makes a hash part of
--- 8 at once, 256 bytes, which growing by rehash would cost ~400
--- instructions per task (callgrind).  `thread_job` says where the attempt's job
--- is: false (not out), its slot (a number: out on a thread), the bytes of
--- its results (a string) or the pair { bytes, traceback or true } of its
--- error, until the attempt settles.  Every thread task in flight holds
--- this table: at 100,000 in flight, each 96 bytes less is ~2,300 fewer
--- first-touch page faults (bench/RESULTS.md, issue 21).
--- The table is made from constants, then filled: LuaJIT's bytecode (tide's
--- modules are compiled to it) keeps in a constructor's template only the
--- keys of constant values, so `{ thread = payload }` would add the key
--- at run time (lj_tab_newkey, a rehash once the template is full).
function M.options(payload, roomy)
  local o
  if roomy then
    o = table_new(0, 8)
    o.thread_job, o.on_attempt_end = false, false
  else
    o = { thread = false, direct = false, thread_job = false, on_attempt_end = false }
  end
  o.thread, o.direct = payload, M.direct
  return o
end

--- The `direct` function of every thread task (sched.lua, "direct tasks"):
--- run from the run queue, without a coroutine, to submit the attempt's job,
--- and again once the job came back.
function M.direct(t)
  local o = t[OPT]
  local job = o.thread_job
  if job then
    if type(job) == "number" then return end   -- out on a thread still
    return settle(t, o, job)                   -- came back
  end
  local ok, slot = pcall(submit, t, o)
  if not ok then
    t.traceback = traceback(tostring(slot))
    return S.settle(t, "error", slot)
  end
  o.thread_job = slot
  S.on_attempt_end(t, abandon_hook)
end

return M
