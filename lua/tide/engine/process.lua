--- tide.engine.process — process-mode tasks: a job for a pool of child processes, awaited by a coroutine on the loop.
--
-- A process task is an ordinary task whose function is `proxy`, as a thread
-- task's is: it queues the job (function and arguments as codec bytes,
-- checked by thread mode's payload), waits, and returns the decoded
-- results or raises the decoded error.  Timeouts, cancel, retries,
-- handle_result and await work as for any task.  The children are
-- mechanism in C (src/procs.c, src/proc_child.c); the policy is here:
--
--   - The pool keeps `processes` children, started at the first process
--     task.  A child is "starting" until it says it is ready, then "idle" or
--     "busy".  Jobs wait in a FIFO for an idle child; with process_prefetch
--     n > 1, when no child is idle, busy children are also sent up to n jobs
--     each, which they run in order.
--   - When an attempt ends early (timeout, cancel, shutdown) its outcome is
--     already delivered; its job is dropped from the queue, or its child is
--     asked to stop (SIGUSR1 with the job's id: the job raises "cancelled" at
--     its next check, and the traceback of where it was comes back; a job
--     sent ahead is skipped when its turn comes) and, if the child still
--     runs that job `process_stop_wait` ms after it began to (or after the
--     request), it is SIGKILLed with its process group (at once during a
--     shutdown: the grace period was its stop wait).
--   - One spare child is kept started beside the pool's `processes`: a child
--     that dies for any reason is replaced by the spare at once (if the spare
--     is ready, the pool is whole again before the next tick), and a new
--     spare starts in the background.  The job the dead child was running
--     fails with "process PID killed by SIGSEGV" (or "exited with status
--     N") and the end of its stderr; the jobs sent behind it are queued
--     again, first.  Children that die before they are ready three times in
--     a row stop the replacing, and, unless a child of the pool is ready
--     (it takes them in turn), the queued jobs fail with the reason, until
--     the next task.
--   - Invariants: every job id in `jobs` is queued (rec.cid == nil) or sent
--     to the child rec.cid, in its list ch.sent[ch.sh .. ch.st], whose first
--     is ch.job, the one it runs; a waiting task is woken once, by the first
--     of its job's result, its child's death, or a failure to send it.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local thread = require "tide.engine.thread"

local type, error, tostring, unpack, pairs = type, error, tostring, unpack, pairs

local MAX = 1024                             -- children a pool may have
local MAX_MB = thread.MAX_MB                 -- process_memory, as thread_memory

local M = {
  config = { processes = nil, init = nil, memory_mb = 0, stop_wait = 100, prefetch = 1 },
  MAX = MAX,
}

--- Checks the process settings of tide.configure (`opts`), then applies
--- them; errors name `fname` at `level` (default: the caller of fname).
function M.configure(fname, opts, level)
  level = (level or 2) + 1
  if opts.processes ~= nil and not (check.is_count(opts.processes, 1) and opts.processes <= MAX) then
    check.opt_error(fname, "processes", "integer from 1 to " .. MAX, opts.processes, level)
  end
  if opts.process_init ~= nil and (type(opts.process_init) ~= "string" or opts.process_init == "") then
    check.opt_error(fname, "process_init", "module name", opts.process_init, level)
  end
  if opts.process_memory ~= nil and not (check.is_count(opts.process_memory) and opts.process_memory <= MAX_MB) then
    check.opt_error(fname, "process_memory", "integer number of MB from 0 (no limit) to " .. MAX_MB, opts.process_memory,
                    level)
  end
  if opts.process_stop_wait ~= nil and not check.is_ms(opts.process_stop_wait) then
    check.opt_error(fname, "process_stop_wait", "non-negative number of ms", opts.process_stop_wait, level)
  end
  if opts.process_prefetch ~= nil and not (check.is_count(opts.process_prefetch, 1) and opts.process_prefetch <= 64) then
    check.opt_error(fname, "process_prefetch", "integer from 1 to 64", opts.process_prefetch, level)
  end
  local c = M.config
  if M.started() and (opts.processes or opts.process_init or opts.process_memory) then
    error(fname .. ": processes, process_init and process_memory must be set before the first process task", level)
  end
  c.processes = opts.processes or c.processes
  c.init = opts.process_init or c.init
  c.memory_mb = opts.process_memory or c.memory_mb
  c.stop_wait = opts.process_stop_wait or c.stop_wait
  c.prefetch = opts.process_prefetch or c.prefetch
end

-- ===== the pool's state

local started = false
local size = 0                               -- children the pool keeps
local cmd_file, cmd_args                     -- how a child is started
local children = {}                          -- cid -> child record (the spare too)
local by_index, nworking = {}, 0             -- index (1..size) -> child record; how many
local spare = nil                            -- the child kept started to replace one at once
local idle, nidle = {}, 0                    -- stack of idle children (may hold stale ones)
local queue, qhead, qtail, nqueued = {}, 1, 0, 0
local jobs = {}                              -- job id -> { p, task, tok, cid, result, abandoned }

-- A second copy of tide's engine (package.loaded cleared, tide required
-- again) takes tide.core's process events over: a job of this copy queued
-- or out on a child then would never come back (its task was reaped as
-- stalled), so the second copy is refused meanwhile (spec/review_r1_spec.lua).
require("tide.engine.runq").add_busy(function()
  local n = 0
  for _ in pairs(jobs) do n = n + 1 end
  if n > 0 then return ("%d process task(s) in flight"):format(n) end
end)
local next_job = 0
local start_failures, broken = 0, nil        -- deaths before ready in a row; their reason
local counts = { killed = 0, replaced = 0, died = 0 }
local start_ms, replace_ms = nil, nil        -- the last child's spawn to ready; kill (or death) to replacement ready

function M.started() return started end

--- Starts a child for slot `index` of the pool (nil: the spare).
local function spawn_child(index)
  local c = M.config
  local cid, err = core.proc_spawn{
    file = cmd_file, args = cmd_args, index = index, path = package.path,
    cpath = package.cpath, init = c.init, memory_limit = c.memory_mb * 1024 * 1024,
  }
  if not cid then return nil, err end
  local ch = { cid = cid, pid = core.proc_pid(cid), index = index, state = "starting", job = nil,
               sent = {}, sh = 1, st = 0, spawned_at = core.now() }
  children[cid] = ch
  if index then by_index[index], nworking = ch, nworking + 1 else spare = ch end
  return ch
end

--- Starts the children missing from the pool (all of them, the first time).
local function fill()
  for i = 1, size do
    if by_index[i] == nil then
      local ch, err = spawn_child(i)
      if not ch then error("tide: cannot start a process for the pool: " .. tostring(err), 0) end
    end
  end
  if spare == nil then spawn_child(nil) end  -- no spare: replacements start from scratch
end

-- ===== delivering to the task that waits

local function deliver(rec, ok, bytes, trace)
  local t, tok = rec.task, rec.tok
  if not t then return end
  rec.task, rec.tok = nil, nil
  rec.result = { ok, bytes, trace }
  S.wake(t, tok)
end

local function fail(rec, msg)
  deliver(rec, false, core.encode(msg), msg)
end

-- ===== dispatching jobs to idle children

--- Sends job `id` to child ch, behind what it has (ch.sent[ch.sh..ch.st],
--- in order; ch.job is the first, the one it runs).
local function send(ch, id, rec)
  local p = rec.p
  local ok, err = core.proc_submit(ch.cid, id, p[1], p[2], p[3])
  if not ok then                             -- the child is going: its exit event follows
    jobs[id] = nil
    return fail(rec, ("process %d: cannot send it the task: %s"):format(ch.pid, tostring(err)))
  end
  rec.cid = ch.cid
  ch.st = ch.st + 1
  ch.sent[ch.st] = id
  if ch.state ~= "busy" then
    ch.state, ch.job = "busy", id
    core.proc_ref(ch.cid, true)              -- work under way keeps the loop alive
  end
end

--- The next queued job's id and record, or nil.
local function pop_queued()
  while qhead <= qtail do                    -- skip the ids of jobs given up while queued
    local id = queue[qhead]
    queue[qhead], qhead = nil, qhead + 1
    local rec = jobs[id]
    if rec and rec.cid == nil then
      nqueued = nqueued - 1
      return id, rec
    end
  end
end

--- Gives queued jobs to idle children; then, with process_prefetch > 1 and
--- no child idle, sends busy children jobs ahead, up to that many each.
local function dispatch()
  while nqueued > 0 and nidle > 0 do
    local ch = idle[nidle]
    idle[nidle], nidle = nil, nidle - 1
    if ch.state == "idle" and children[ch.cid] == ch then
      local id, rec = pop_queued()
      if id then send(ch, id, rec) end
    end
  end
  local depth = M.config.prefetch
  if nqueued == 0 or depth == 1 then return end
  local more = true
  while more and nqueued > 0 do
    more = false
    for i = 1, size do
      local ch = by_index[i]
      if ch and ch.state == "busy" and not ch.killing and ch.st - ch.sh + 1 < depth then
        local id, rec = pop_queued()
        if not id then return end
        send(ch, id, rec)
        more = true
      end
    end
  end
end

local function make_idle(ch)
  ch.state, ch.job, ch.sh, ch.st = "idle", nil, 1, 0
  core.proc_ref(ch.cid, false)
  nidle = nidle + 1
  idle[nidle] = ch
end

-- ===== events from the children

--- Kills child ch if it still runs job `id` (given up on, and asked to stop).
local function kill_if_stuck(ch, id)
  if children[ch.cid] == ch and ch.job == id and not ch.killing then
    ch.killing, ch.killed_at = true, core.now()
    core.proc_kill(ch.cid)
  end
end


--- Fails every queued job with `msg` (the children cannot start).
local function fail_queued(msg)
  while qhead <= qtail do
    local id = queue[qhead]
    queue[qhead], qhead = nil, qhead + 1
    local rec = jobs[id]
    if rec and rec.cid == nil then jobs[id] = nil; fail(rec, msg) end
  end
  nqueued = 0
end

--- Whether a child of the pool is ready (idle or busy): it takes the queued
--- jobs in turn, whatever befalls the children that start (a spare killed
--- while it starts is no sign that none can).
local function any_ready()
  for i = 1, size do
    local ch = by_index[i]
    if ch and (ch.state == "idle" or ch.state == "busy") then return true end
  end
  return false
end

local function death_message(ch, status, signal, tail)
  local msg = signal and ("process %d killed by %s"):format(ch.pid, signal)
              or status and ("process %d exited with status %d"):format(ch.pid, status)
              or ("process %d is gone; its exit status was reaped by another waitpid (a SIGCHLD handler of "
                  .. "the host?)"):format(ch.pid)
  if tail ~= "" then msg = msg .. "; the end of its stderr:\n" .. tail end
  return msg
end

--- Puts the spare in slot `index` (of a child that died); true if it was ready.
local function promote(index, since)
  local ch = spare
  spare = nil
  ch.index, ch.replacing_since = index, since
  by_index[index], nworking = ch, nworking + 1
  counts.replaced = counts.replaced + 1
  if ch.state == "idle" then
    replace_ms = core.now() - since
    make_idle(ch)
  end
end

local function on_exit(ch, status, signal, tail)
  children[ch.cid] = nil
  if ch == spare then spare = nil
  elseif by_index[ch.index] == ch then by_index[ch.index], nworking = nil, nworking - 1 end
  if ch.killing then counts.killed = counts.killed + 1 else counts.died = counts.died + 1 end
  local msg = death_message(ch, status, signal, tail)
  local id = ch.job
  if id then
    local rec = jobs[id]
    jobs[id] = nil
    if rec then fail(rec, msg) end
  end
  for i = ch.st, ch.sh + 1, -1 do            -- sent ahead, never started: queued again, first
    local rid = ch.sent[i]
    local rec = jobs[rid]
    if rec and rec.task then
      rec.cid = nil
      qhead = qhead - 1
      queue[qhead] = rid
      nqueued = nqueued + 1
    else
      jobs[rid] = nil
    end
  end
  if ch.state == "starting" then
    start_failures = start_failures + 1
    if start_failures >= 3 then
      broken = "tide: the process pool cannot start its processes: " .. msg
      if not any_ready() then fail_queued(broken) end
      return
    end
  end
  if S.shutting_down() then return end      -- the next task fills the pool again
  local since = ch.killed_at or core.now()
  if ch.index and by_index[ch.index] == nil then
    if spare then
      promote(ch.index, since)
    else
      local fresh = spawn_child(ch.index)
      if fresh then counts.replaced = counts.replaced + 1; fresh.replacing_since = since end
    end
  end
  if spare == nil then spawn_child(nil) end
end

--- A shutdown began: nothing new starts, so the children without work (and
--- the spare) are killed and reaped now; busy ones are killed when their
--- tasks end (at the latest, the end of the grace period).  The next task
--- after the shutdown fills the pool again.
local function close_idle()
  local list = {}
  for _, ch in pairs(children) do
    if ch.state ~= "busy" then list[#list + 1] = ch end
  end
  for _, ch in ipairs(list) do
    children[ch.cid] = nil
    if ch == spare then spare = nil
    elseif by_index[ch.index] == ch then by_index[ch.index], nworking = nil, nworking - 1 end
    ch.state = "closed"
    core.proc_close(ch.cid)
  end
end

--- A stopped job's late result: its task moved on, but where the job was
--- stopped (the child's traceback) is worth keeping on it.
local function late_result(rec, ch, ok, trace)
  local t = rec.abandoned
  if t and not ok and trace and t.traceback == nil then
    t.traceback = ("stopped in process %d: %s"):format(ch.pid, trace)
  end
end

local function on_event(cid, kind, a, b, c, d)
  local ch = children[cid]
  if ch == nil then return end
  if kind == "done" then
    local rec = jobs[a]
    if ch.job == a then
      jobs[a] = nil
      if rec then
        if rec.task then deliver(rec, b, c, d) else late_result(rec, ch, b, d) end
      end
      ch.sent[ch.sh] = nil
      ch.sh = ch.sh + 1
      if ch.killing then                     -- the result came after its kill: no more work;
        ch.job = ch.sent[ch.sh]              -- its exit event ends what it was sent ahead
      elseif ch.sh > ch.st then
        make_idle(ch)
        if S.shutting_down() then close_idle() end
      else                                   -- it starts the next one it was sent
        local next_id = ch.sent[ch.sh]
        ch.job = next_id
        local nrec = jobs[next_id]
        if nrec and nrec.task == nil then    -- given up on while it waited there
          S.timer(M.config.stop_wait, kill_if_stuck, ch, next_id)
        end
      end
      dispatch()
    end
  elseif kind == "ready" then
    start_failures, broken = 0, nil
    local now = core.now()
    start_ms = now - ch.spawned_at
    if ch == spare then                      -- waits, out of the pool, for a child to replace
      ch.state = "idle"
      core.proc_ref(ch.cid, false)
      return
    end
    if ch.replacing_since then replace_ms = now - ch.replacing_since end
    make_idle(ch)
    dispatch()
  elseif kind == "exit" then
    on_exit(ch, a, b, c)
    dispatch()
  end
end

local function start()
  local c = M.config
  local why
  cmd_file, why = core.proc_command()
  if cmd_file == nil then                    -- a C host with tide linked in: the module, then
    local so = package.searchpath("tide", package.cpath)
    if so == nil then
      error("tide: process mode: " .. why .. "; it needs tide.so on package.cpath", 0)
    end
    cmd_file, why = core.proc_command(so)
  end
  cmd_args = why
  local cpus = core.cpu_count()
  size = c.processes or (cpus < MAX and cpus or MAX)
  core.proc_set_handler(on_event)
  S.on_shutdown(close_idle)
  started = true
end

-- ===== giving up on a job

--- The attempt that waited for job `id` ended early: give up on the job.
local function abandon(id, t)
  local rec = jobs[id]
  if rec == nil then return end
  rec.task, rec.tok = nil, nil
  if rec.cid == nil then                     -- still queued: forgotten (its id is skipped)
    jobs[id] = nil
    nqueued = nqueued - 1
    return
  end
  rec.abandoned = t
  local ch = children[rec.cid]
  if ch == nil then jobs[id] = nil; return end
  if S.shutting_down() then                  -- the grace period was its stop wait
    return kill_if_stuck(ch, id)
  end
  core.proc_stop(ch.cid, id)                 -- sent ahead: the child skips it when its turn comes
  if ch.job == id then S.timer(M.config.stop_wait, kill_if_stuck, ch, id) end
end

local function abandon_hook(t)
  local o = S.options(t)
  local id = o.process_job
  if id then o.process_job = false; abandon(id, t) end
end

-- ===== the task side

--- Checks what a process task runs and with what (as thread mode does);
--- returns the job payload.  Errors name `fname` at `level`.
function M.payload(fname, run, args, level)
  local p = thread.payload(fname, run, args, level + 1, "a process")
  return p                                   -- not a tail call: the levels count this frame
end

--- The function every process task runs (in a coroutine on the loop).
function M.proxy()
  if not started then start() end
  if nworking < size or spare == nil then fill() end
  local t = S.current()
  local o = S.options(t)
  next_job = next_job + 1
  local id = next_job
  local rec = { p = o.process }
  jobs[id] = rec
  qtail = qtail + 1
  queue[qtail] = id
  nqueued = nqueued + 1
  local _, tok = S.wait_begin("process task", 1)
  rec.task, rec.tok = t, tok
  o.process_job = id
  S.on_attempt_end(t, abandon_hook)
  if broken and not any_ready() then fail_queued(broken) else dispatch() end
  S.wait_end(t, tok)
  o.process_job = false
  S.off_attempt_end(t, abandon_hook)
  local r = rec.result
  local value, err = core.decode(r[2])
  if r[1] then
    if err then error("process task: cannot decode its results: " .. err, 0) end
    return unpack(value, 1, value.n)
  end
  error(S.traced_error(value, r[3]), 0)
end

--- tide.stats().processes: the pool's children by state, and what befell them.
function M.stats()
  local st = { size = nworking, busy = 0, idle = 0, starting = 0, queued = nqueued,
               spare = spare and spare.state or "none",
               killed = counts.killed, replaced = counts.replaced, died = counts.died,
               start_ms = start_ms, replace_ms = replace_ms }
  for _, ch in pairs(children) do
    if ch ~= spare then st[ch.state] = st[ch.state] + 1 end
  end
  return st
end

--- The pid of the child running task t's job now, or nil (for specs).
function M.pid_of(t)
  local o = S.options(t)
  local rec = o.process_job and jobs[o.process_job]
  local ch = rec and rec.cid and children[rec.cid]
  return ch and ch.pid
end

--- The pids of the pool's children, by index (for specs).
function M.pids()
  local list = {}
  for i = 1, size do
    local ch = by_index[i]
    if ch then list[#list + 1] = ch.pid end
  end
  return list
end

return M
