--- tide.jobs.worker — performs durable jobs from a queue as supervised tide tasks.
--
--   local w = tide.worker{ queue = q, queues = { default = 10, mail = 2 },
--                          targets = { orders = { fulfill = function(args, job) ... end } } }
--
-- How a job moves (see tide.jobs.store.sqlite for the SQL):
--
--   claim    a claimer task per queue takes up to `batch` due jobs (priority,
--            then run_at) in one statement that marks them executing under a
--            lease held by this worker, and spawns a task for each.  It
--            claims again when a slot frees, after `poll` ms, and when a
--            job may have come: a commit in this process, LISTEN/NOTIFY on
--            PostgreSQL, a watch on the -wal file on SQLite (any process).
--   perform  target[method](args, job) runs as a tide task (timeout and mode
--            per target).  Its outcome is recorded by the flusher task, which
--            writes the outcomes of a tick (PostgreSQL: of <= 10 ms) in one commit: completed;
--            retryable at now + backoff; discarded after the last attempt
--            (tide.jobs.outcomes: counted only once the store took it).
--   lease    the heartbeat task extends the leases of running jobs; a job
--            cancelled or expired in the store meanwhile loses its lease,
--            and its task is cancelled.  The rescuer makes jobs whose lease
--            expired (their worker died) available again, on every worker.
--   stop     claimers stop, running jobs get the grace period, claimed jobs
--            that never started (or were cut short) are released: available
--            again, the attempt not counted.
--   failing  every loop that talks to the store (claim, write, heartbeat,
--            rescue, drain's count) backs off while the store fails, 50 ms
--            doubling up to its own period; w.failing[loop] holds since when
--            it fails, and a draining worker gives up once one has failed
--            for `give_up` ms (60 s) with nothing but failures.
--
-- Nothing durable depends on this process staying alive: an outcome not yet
-- written when the process dies leaves the job executing under a lease that
-- expires, and the rescuer runs it again.  So a job runs at least once; it
-- runs twice only when the process dies between its effect and the write.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local retry = require "tide.engine.retry"
local config = require "tide.engine.config"
local task = require "tide.engine.task"
local timer = require "tide.engine.timer"
local json = require "tide.jobs.json"
local job = require "tide.jobs.job"
local queue = require "tide.jobs.queue"
local outcomes = require "tide.jobs.outcomes"
local schedules = require "tide.jobs.schedules"
local claimer = require "tide.jobs.claimer"
local options = require "tide.jobs.worker_options"
local make_task, spawn = task.make_task, task.spawn
local histogram = require "tide.engine.histogram"
local fields = require "tide.engine.fields"

local type, error, pairs, ipairs, tostring, pcall, require = type, error, pairs, ipairs, tostring, pcall, require
local setmetatable, min, max, floor = setmetatable, math.min, math.max, math.floor
local wallclock, try_encode = core.wallclock, json.try_encode

--- An error entry as JSON: free text (messages, tracebacks) may hold any
--- bytes, so invalid UTF-8 and NUL become U+FFFD (PostgreSQL's jsonb would
--- refuse them, and every tool that prints it would print them).
local FREE_TEXT = { "error", "traceback" }
local function encode(entry)
  for _, k in ipairs(FREE_TEXT) do
    if type(entry[k]) == "string" then entry[k] = json.text(entry[k]) end
  end
  return (try_encode(entry, "error", true))
end
local TERMINAL = S.TERMINAL

local M = {}

-- ===== counters for metrics (tide.observe.metrics reads them)
--
-- Process-wide and by queue, so they outlive the workers that counted
-- them (a Prometheus counter never goes down): jobs claimed, and attempts
-- the store took as completed, retried (a failed attempt with attempts
-- left), discarded, released, cancelled in the store, lost to another
-- worker, or never written; how long attempts ran and how long due jobs
-- waited to start; store statements that failed, by operation.
M.totals = { queues = {}, rescued = 0,
             store_errors = { claim = 0, record = 0, heartbeat = 0, unlease = 0, rescue = 0 } }
M.live = setmetatable({}, { __mode = "k" })    -- workers not yet stopped

local function totals_of(name)
  name = tostring(name)
  local t = M.totals.queues[name]
  if not t then
    t = { claimed = 0, completed = 0, retried = 0, discarded = 0, released = 0, cancelled = 0, lost = 0,
          unwritten = 0, duration = histogram.new(histogram.DURATION), wait = histogram.new(histogram.WAIT) }
    M.totals.queues[name] = t
  end
  return t
end

--- Counts `key` for worker w and for the queue's process-wide totals.
local function count(w, queue_name, key)
  w.stats[key] = w.stats[key] + 1
  local t = totals_of(queue_name)
  t[key] = (t[key] or 0) + 1
end

local Worker = {}
local Worker_mt = { __index = Worker, __tostring = function(w)
  return ("tide.Worker %s (%s)"):format(w.id, w.state)
end }

-- The options, checked: tide.jobs.worker_options.
local check_opts, check_target, check_retry = options.check_opts, options.check_target, options.check_retry
local MIXED_OPTS = options.MIXED_OPTS

-- ===== targets

--- The target table named `name`: from `targets`, else require(name) (its
--- options checked as those of `targets` are, its retry policy taken).
--- Returns it, or nil and why not.
local function target_of(w, name)
  local t = w.targets[name]
  if t then return t end
  local cached = w.loaded[name]
  if cached ~= nil then return cached or nil, w.load_errors[name] end
  local ok, mod = pcall(require, name)
  local why
  if not ok or type(mod) ~= "table" then
    why = ok and ("module '%s' returned %s, not a table of methods"):format(name, type(mod))
          or ("unknown target '%s' (not in targets, and require failed: %s)")
             :format(name, (tostring(mod):match("^[^\n]*"):gsub(":$", "")))
  else
    ok, t = pcall(check_target, "target", name, mod, 1, false)
    if not ok then why = ("module '%s' has bad target options: %s"):format(name, (tostring(t):gsub("^target: ", ""))) end
  end
  if why then
    w.loaded[name], w.load_errors[name] = false, why
    return nil, why
  end
  w.loaded[name] = t
  return t
end

local function method_of(w, row)
  local t, err = target_of(w, row.target)
  if not t then return nil, err end
  local fn = t.methods[row.method]
  if (t.mixed and MIXED_OPTS[row.method]) or type(fn) ~= "function" then
    return nil, ("unknown method '%s' of target '%s'"):format(row.method, row.target)
  end
  return fn, t
end

-- ===== outcomes (written and counted by tide.jobs.outcomes)

local record = outcomes.record

--- Runs fn(session, ...) on one of the worker's stores; raises on failure.
local function call(w, store, fname, fn, ...)
  return queue.worker_call(w.q, store, fname, fn, ...)
end

--- Backs a failing loop off: 50 ms doubling up to `cap`; notes since when
--- it fails (w.failing[name]) and the error.  Returns the wait.
local function failed_loop(w, name, failures, cap, err)
  if not w.failing[name] then w.failing[name] = core.now() end
  w.last_error = err
  return min(cap, 50 * 2 ^ min(failures - 1, 16))
end

local function loop_ok(w, name) w.failing[name] = nil end

--- Wakes the queue's claimer after `ms` (a retry due before the next poll).
local function wake_later(w, name, ms)
  local qs = w.queues[name]
  local at = core.now() + ms
  if qs.wake_at and qs.wake_at <= at then return end
  if qs.wake_timer then qs.wake_timer:stop() end
  qs.wake_at = at
  qs.wake_timer = timer.after(ms + 1, function()
    qs.wake_at, qs.wake_timer = nil, nil
    S.notify(qs)
  end)
end

--- Calls on_error (the target's, else the worker's) with { job, error,
--- traceback }; a hook under its old name takes them as three arguments.
local function report_error(w, target, job, err, trace)
  local hook, old = w.on_error, w.old_hook
  if target and target.on_error then hook, old = target.on_error, target.old_hook end
  if not hook then return end
  if old then
    log.protect("handle_error of job " .. job.id, hook, job, err, trace)
  else
    log.protect("on_error of job " .. job.id, hook, { job = job, error = err, traceback = trace })
  end
end

--- A failed attempt: retry later, or discard after the last.
local function failed(w, rec, err, trace, target)
  local job, row = rec.job, rec.row
  local entry = { id = row.id, attempt = row.attempt, job = job, err = err, trace = trace,
                  error = encode{ attempt = row.attempt, at = w.store:now(), error = tostring(err),
                                  traceback = trace } }
  if row.attempt >= row.max_attempts then
    entry.kind, entry.outcome = "discard", "discarded"
  else
    local policy = target and target.retry_for and target.retry_for(rec.args)
                   or target and target.policy or w.retry
    local delay = floor(retry.delay(policy, row.attempt))
    entry.kind, entry.outcome = "retry", "retried"
    entry.run_at = w.store:now() + delay
    if delay < w.poll and w.state == "running" and not S.shutting_down() then wake_later(w, row.queue, delay) end
  end
  job.error = tostring(err)
  report_error(w, target, job, err, trace)
  if target and target.after_record then
    entry.after_record, entry.args, entry.method = target.after_record, rec.args, row.method
  end
  record(w, entry)
end

local function released(w, rec, started, reason)
  local row = rec.row
  record(w, { kind = "release", outcome = "released", id = row.id, attempt = row.attempt, run_at = w.store:now(),
              job = rec.job, err = reason,
              error = started and encode{ attempt = row.attempt, at = w.store:now(),
                                          error = "interrupted: " .. tostring(reason) } or nil })
end

local function slot_freed(w, rec)
  w.running[rec.row.id] = nil
  w.nrunning = w.nrunning - 1
  local qs = w.queues[rec.row.queue]
  qs.running = qs.running - 1
  qs.held = qs.held + (core.now() - rec.started - qs.held) * 0.125   -- (tide.jobs.claimer's gathering)
  if qs.more then S.notify(qs) end
  if w.nrunning == 0 then
    S.notify(w.idle)
    if w.state ~= "running" then S.notify(w.beat); S.notify(w.flusher) end
  end
end

local VALUE, ATTEMPTS = fields.VALUE, fields.ATTEMPTS

--- on_finish of a job's task (inside the scheduler's one door, so every
--- attempt's outcome is handled exactly once).  It reads the task's slots, not
--- t.value and t.attempts: a handler may write those names onto its task.
local function job_finished(t)
  local rec = S.options(t).job
  local w = rec.worker
  slot_freed(w, rec)
  if t[ATTEMPTS] > 0 then histogram.observe(rec.duration, (core.now() - rec.started) / 1000) end
  local status = S.state(t)
  if status == "ok" then
    local e = { kind = "completed", outcome = "completed", id = rec.row.id, attempt = rec.row.attempt,
                job = rec.job }
    local target = rec.target
    if target and target.after_record then   -- a durable flow's step: its result goes with the write
      e.after_record, e.args, e.method, e.value = target.after_record, rec.args, rec.row.method, t[VALUE]
    end
    record(w, e)
  elseif status == "cancelled" then
    if rec.gone then                          -- cancelled, expired or taken over in the store
      outcomes.stopped(w, rec.row.id, rec.row.attempt)
      count(w, rec.row.queue, rec.gone)
      outcomes.heard(w, rec.row.id, rec.job, rec.gone, t[VALUE])
    elseif w.state ~= "running" or S.shutting_down() then
      released(w, rec, t[ATTEMPTS] > 0, t[VALUE])
    else
      failed(w, rec, "cancelled: " .. tostring(t[VALUE]), nil, rec.target)
    end
  else
    failed(w, rec, t[VALUE], t.traceback, rec.target)
  end
end

-- ===== starting jobs

--- The job table a method gets (plain data, so it can cross to a thread).
local function job_info(row)
  return { id = row.id, queue = row.queue, target = row.target, method = row.method,
           attempt = row.attempt, max_attempts = row.max_attempts, priority = row.priority,
           run_at = type(row.run_at) == "number" and row.run_at or nil,
           inserted_at = type(row.inserted_at) == "number" and row.inserted_at or nil,
           idempotency_key = row.idempotence_key, partition_key = row.partition_key,
           idempotence_key = row.idempotence_key }          -- the old name, one release more
end

local function start_job(w, row)
  count(w, row.queue, "claimed")
  local rec = { worker = w, row = row, job = job_info(row), gone = false }
  local bad = job.row_problem(row)
  if bad or not w.queues[row.queue] then
    bad = "corrupt job row: " .. (bad or ("queue is %q, not one of this worker's"):format(tostring(row.queue)))
    log.report("worker " .. w.id .. ": job " .. tostring(row.id), bad)
    return record(w, { kind = "discard", outcome = "discarded", id = row.id, attempt = row.attempt,
                       job = rec.job, err = bad, error = encode{ at = w.store:now(), error = bad } })
  end
  local qs = w.queues[row.queue]
  w.running[row.id] = rec
  w.nrunning, qs.running = w.nrunning + 1, qs.running + 1
  local qt = totals_of(row.queue)
  histogram.observe(qt.wait, math.max(0, w.store:now() - row.run_at) / 1000)
  rec.started, rec.duration = core.now(), qt.duration
  local fn, target = method_of(w, row)
  local args, err
  if fn then args, err = queue.decode_args(w.q, row) end
  if not fn or err then
    slot_freed(w, rec)
    return failed(w, rec, fn and ("job %d: %s"):format(row.id, err) or target, nil, fn and target)
  end
  rec.target, rec.args = target, args
  local mode = target.mode
  -- Thread mode: a target given in `targets` sends the method itself (as
  -- bytecode: checked for upvalues when the worker started); one found by
  -- require is required again in the thread, by name.
  local run = fn
  if (mode == "thread" or mode == "process") and not target.inline then run = row.target .. "." .. row.method end
  local ok, t = pcall(make_task, "tide.worker", "coroutine", {
    run = run, args = { args, rec.job, n = 2 }, mode = mode, timeout = target.timeout or w.timeout,
    name = ("job %d %s.%s"):format(row.id, row.target, row.method),
  })
  if not ok then
    slot_freed(w, rec)
    return failed(w, rec, t, nil, target)
  end
  rec.task = t
  local o = S.options(t)
  o.job, o.heard = rec, true                   -- its outcome is written to the store
  S.on_finish(t, job_finished)
  S.start(t)
end

-- ===== the worker's own tasks (the claimers: tide.jobs.claimer)

--- What a claimer needs of this module (see tide.jobs.claimer's M.run).
local CLAIMER_NEEDS = { start_job = start_job, job_info = job_info, wake_later = wake_later,
                        failed_loop = failed_loop, loop_ok = loop_ok, store_errors = M.totals.store_errors }

local function heartbeat_rows(session, owner, lease_until, ids)
  return session:heartbeat(owner, lease_until, ids)
end

local function states_rows(session, ids) return session:states(ids) end

--- Jobs running here whose lease the store no longer gives this worker:
--- cancelled or expired by hand ("cancelled"), or rescued and taken by
--- another worker after this one stalled past the lease ("lost").  Their
--- tasks are cancelled; nothing is written for them.
local function gone_from_store(w, ids)
  local ok, states = pcall(call, w, w.lease_store, "tide.worker", states_rows, ids)
  for _, id in ipairs(ids) do
    local rec = w.running[id]
    if rec and rec.task then
      local st = ok and states[id] and states[id].status
      rec.gone = (not ok or st == "cancelled" or st == "expired" or st == "discarded" or st == nil)
                 and "cancelled" or "lost"
      rec.task:cancel(rec.gone == "lost" and ("job %d: its lease passed to another worker"):format(id)
                      or ("job %d was cancelled or expired in the store"):format(id))
    end
  end
end

local function unlease_rows(session, owner, ids) return session:unlease(owner, ids) end

--- Gives up the leases of the jobs stopped here; true, or false after a
--- failure (reported): they are kept to be tried again at the next beat,
--- as a stopped job's lease is never extended and holds its key's slot
--- until it runs out (the rescue gives it up then).
local function unlease(w)
  local ids = w.unlease
  w.unlease, w.unleasing = {}, true
  local ok, err = pcall(call, w, w.lease_store, "tide.worker", unlease_rows, w.id, ids)
  w.unleasing = false
  if not ok then
    log.report("worker " .. w.id .. ": giving up the leases of stopped jobs", err)
    M.totals.store_errors.unlease = M.totals.store_errors.unlease + 1
    for i = 1, #w.unlease do ids[#ids + 1] = w.unlease[i] end   -- (with those stopped meanwhile)
    w.unlease = ids
    w.last_error = err
  end
  S.notify(w.idle)                            -- (a drain waits for them)
  return ok
end

local function heartbeat(w)
  local failures, wait, unlease_failures = 0, w.heartbeat, 0
  while w.state == "running" or w.nrunning > 0 or #w.pending > 0 or w.writing or #w.unlease > 0 do
    if #w.unlease == 0 or unlease_failures > 0 then S.wait_for(w.beat, "tide.worker", wait) end
    wait = w.heartbeat
    if #w.unlease > 0 then
      if unlease(w) then
        if unlease_failures > 0 then unlease_failures = 0; loop_ok(w, "unlease") end
      else
        unlease_failures = unlease_failures + 1
        if w.state ~= "running" and (unlease_failures >= 5 or w.stats.gave_up) then
          -- A stopping worker gives up after 5 tries (~1.5 s, as its flusher
          -- does after 10): the leases run out, and a rescue gives them up.
          w.unlease, unlease_failures = {}, 0
          S.notify(w.idle)
        else
          wait = failed_loop(w, "unlease", unlease_failures, w.state == "running" and w.heartbeat
                             or min(w.heartbeat, 2000), w.last_error)
        end
      end
    end
    if w.nrunning > 0 or #w.pending > 0 or w.writing then
      -- The jobs running here, and those whose outcome waits to be written
      -- (the store may be down): an orphan's lease runs out, theirs not.
      local ids, asked = {}, {}
      for id, rec in pairs(w.running) do ids[#ids + 1] = id; asked[id] = rec end
      for _, list in ipairs{ w.pending, w.writing or {} } do
        for i = 1, #list do ids[#ids + 1] = list[i].id end
      end
      local ok, leased = pcall(call, w, w.lease_store, "tide.worker", heartbeat_rows, w.id,
                               w.store:now() + w.lease, ids)
      if not ok then
        log.report("worker " .. w.id .. ": heartbeat", leased)
        M.totals.store_errors.heartbeat = M.totals.store_errors.heartbeat + 1
        failures = failures + 1
        wait = min(wait, failed_loop(w, "heartbeat", failures, w.heartbeat, leased))
      else
        if failures > 0 then failures = 0; loop_ok(w, "heartbeat") end
        -- Only the jobs asked about: others were claimed while it ran.
        local gone = {}
        for id, rec in pairs(asked) do
          if not leased[id] and rec.task and w.running[id] == rec then gone[#gone + 1] = id end
        end
        if #gone > 0 then gone_from_store(w, gone) end
      end
    end
  end
end

local function rescue_rows(session, now) return session:rescue(now) end

--- Makes jobs whose lease expired available again; true, or false after a
--- failure (reported).
local function rescue(w, sweep)
  local ok, n, dead = pcall(call, w, w.lease_store, "tide.worker", rescue_rows, w.store:now())
  if not ok then
    log.report("worker " .. w.id .. ": rescue", n)
    M.totals.store_errors.rescue = M.totals.store_errors.rescue + 1
    w.last_error = n
    return false
  end
  if n > 0 then
    w.stats.rescued = w.stats.rescued + n
    M.totals.rescued = M.totals.rescued + n
    for _, qs in pairs(w.queues) do S.notify(qs) end
  end
  -- Jobs whose last attempt's worker died: discarded here, by this worker,
  -- so it counts them and tells on_discard (once: one rescuer's statement
  -- changed each row).
  for _, row in ipairs(dead or {}) do
    count(w, row.queue, "discarded")
    if w.on_discard then
      log.protect("on_discard of job " .. tostring(row.id), w.on_discard, { job = job_info(row), worker = w.id,
        error = "lease expired: its worker stopped heartbeating during the last attempt" })
    end
  end
  -- Durable flow steps whose jobs the rescue (or a hand) finished: by the
  -- rescuer every time, by a drain (which rescues every 20 ms) only after
  -- a rescue that changed jobs.
  if not sweep and n == 0 then return true end
  local fine, err = pcall(queue.sweep_flows, w.q, w.lease_store)
  if not fine then
    log.report("worker " .. w.id .. ": durable flows sweep", err)
    M.totals.store_errors.rescue = M.totals.store_errors.rescue + 1
    w.last_error = err
    return false
  end
  return true
end

local function rescuer(w)
  local failures = 0
  while w.state == "running" do
    local wait = w.rescue_every
    if rescue(w, true) then
      if failures > 0 then failures = 0; loop_ok(w, "rescue") end
    else
      failures = failures + 1
      wait = failed_loop(w, "rescue", failures, w.rescue_every, w.last_error)
    end
    -- (a stop that came while rescue() waited for the store found nobody
    -- to notify: look again before waiting, or it waits rescue_every)
    if w.state ~= "running" then break end
    S.wait_for(w.rescue_holder, "tide.worker", wait)
  end
end

-- ===== public

--- Starts a worker (see the top of this file).  Options: queue (required),
--- queues = { name = concurrency } or concurrency (the "default" queue),
--- targets, lease (ms, 30000), heartbeat (ms, lease/3), poll (ms, 1000),
--- rescue_every (ms, lease/2), batch (claims per statement, 100), timeout
--- (ms per attempt, none), retry (backoff between attempts), handle_error,
--- grace (ms running jobs get on stop, default: tide's grace), on_outcome
--- (fn(job, outcome, err) once the store settled an attempt: see
--- tide.jobs.outcomes), on_discard (fn(ev) once the store took a job's
--- discard after its last attempt: ev = { job, error, traceback, worker },
--- every attempt's error is in the store: q:job(ev.job.id).errors), give_up
--- (ms a draining worker goes on while a loop keeps failing, 60000),
--- schedules (cron schedules: see tide.jobs.schedules).
function M.new(opts)
  local checked = check_opts("tide.worker", opts)
  local queues = checked.queues
  if S.shutting_down() then return nil, "tide.worker: the loop is shutting down" end
  local scheds = checked.schedules
  local lease = opts.lease or 30000
  -- Outcomes, heartbeats and rescues go through one connection of the
  -- worker's own, so that they never wait behind a claim that waits for a
  -- server coming back; claims through another, whose commits need no WAL
  -- flush (the store's worker_store("claims") says why), so that claiming
  -- never waits behind an outcome's flush, nor pays one.  (A heartbeat on a
  -- connection apart from the outcomes' gained nothing: it locks the same
  -- rows, in the same id order, and waited for an outcome's row locks
  -- anyway; and each connection is a server backend, ~30 ms of the
  -- server's CPU to start.)  (SQLite: the queue's own connection for all,
  -- through its pool.)
  local own = queue.worker_store(opts.queue)
  local w = setmetatable({
    q = opts.queue, store = own, lease_store = own,
    claim_store = queue.worker_store(opts.queue, "claims"),
    targets = checked.targets, loaded = {}, load_errors = {},
    lease = lease, heartbeat = opts.heartbeat or lease / 3, poll = opts.poll or 1000,
    rescue_every = opts.rescue_every or lease / 2, batch = opts.batch or 100,
    timeout = opts.timeout, grace = opts.grace, on_error = checked.on_error, old_hook = checked.old_hook,
    on_outcome = checked.on_outcome, old_outcome = checked.old_outcome, on_discard = opts.on_discard,
    give_up = opts.give_up or 60000,
    retry = opts.retry and check_retry("tide.worker", "retry", opts.retry, 2)
            or check_retry("tide.worker", "retry", {}, 2),
    failing = {}, count = count,
    record_error = function() M.totals.store_errors.record = M.totals.store_errors.record + 1 end,
    -- host:pid:start time, so a later process that gets the same pid is
    -- another lease holder (it must not heartbeat a dead one's jobs).
    id = ("%s:%d:%x"):format(core.hostname(), core.pid(), (wallclock() * 16 + floor(core.now() * 16) % 16) % 2^40),
    state = "running", queues = {}, running = {}, nrunning = 0, pending = {}, unlease = {},
    flusher = { waiting = false }, beat = { waiting = false }, idle = { waiting = false },
    rescue_holder = { waiting = false }, scheduler = { waiting = false }, tasks = {}, schedules = scheds,
    stats = { claimed = 0, completed = 0, retried = 0, discarded = 0, released = 0,
              cancelled = 0, lost = 0, rescued = 0, write_errors = 0, unwritten = 0, scheduled = 0 },
  }, Worker_mt)
  M.live[w] = true
  -- On a shutdown of the loop, the worker stops its jobs a little before the
  -- loop's grace ends (up to a second, or half of it), so that the flusher
  -- can still write their releases; sooner when its own grace is shorter.
  -- (Hooked before anything below waits.)
  S.on_shutdown(function(_, grace)
    if w.state ~= "running" then return end
    local jobs_grace = grace and grace - math.min(grace / 2, 1000)
    if w.grace and (not jobs_grace or w.grace < jobs_grace) then jobs_grace = w.grace end
    w:stop(jobs_grace)
  end)
  for name, n in pairs(queues) do
    w.queues[name] = { limit = n, running = 0, reserved = 0, more = false, held = 0, starved = false, waiting = false }
    w.tasks[#w.tasks + 1] = spawn{ run = claimer.run, args = { w, name, CLAIMER_NEEDS }, name = "claimer " .. name }
  end
  w.flusher_task = spawn{ run = outcomes.flusher, args = { w }, name = "worker flusher" }
  w.tasks[#w.tasks + 1] = w.flusher_task
  w.tasks[#w.tasks + 1] = spawn{ run = heartbeat, args = { w }, name = "worker heartbeat" }
  w.tasks[#w.tasks + 1] = spawn{ run = rescuer, args = { w }, name = "worker rescuer" }
  -- A queue with limits (q:declare) may hold jobs back that a finished job
  -- lets through: once its outcome is in the store, claim again.
  w.on_written = function(entries)
    for i = 1, #entries do
      local qs = entries[i].job and w.queues[entries[i].job.queue]
      if qs and qs.limited then qs.kicked = true; S.notify(qs) end
    end
  end
  if scheds and #scheds > 0 then
    w.tasks[#w.tasks + 1] = spawn{ run = schedules.run, args = { w, scheds }, name = "worker scheduler" }
  end
  w.start_row = function(row)              -- a job the store leased to this worker (a flow's step or hook)
    if w.queues[row.queue] then start_job(w, row) end
  end
  w.on_enqueue = function(name)
    local qs = w.queues[name]
    if qs then qs.kicked = true; S.notify(qs) end
  end
  queue.listen(w.q, w.on_enqueue)
  if w.store.listen then                      -- other processes' and machines' enqueues
    w.on_store_wake = function(name)
      if name then return w.on_enqueue(name) end
      for queue_name in pairs(w.queues) do w.on_enqueue(queue_name) end
    end
    w.store:listen(w.on_store_wake)
  end
  if S.shutting_down() and w.state == "running" then w:stop() end   -- came while listen waited
  return w
end

--- Stops claiming; running jobs get `grace_ms` (default: the worker's
--- grace option, else tide's) and are then cancelled and released.  Returns
--- true at once (w:wait() waits for the end), or nil and why when the
--- worker was not running.
--- Raises "fname: bad self" at the method's caller unless w is a worker.
local function check_self(fname, w)
  if getmetatable(w) ~= Worker_mt then
    error(("%s: bad self (worker expected, got %s); call it as %s(...)"):format(fname, check.describe(w), fname), 3)
  end
end

function Worker:stop(grace_ms)
  check_self("worker:stop", self)
  if grace_ms ~= nil and not check.is_ms(grace_ms) then
    check.arg_error("worker:stop", 1, "non-negative number of ms", grace_ms)
  end
  if self.state ~= "running" then return nil, "worker:stop: the worker is " .. self.state end
  self.state = "stopping"
  queue.unlisten(self.q, self.on_enqueue)
  if self.store.unlisten then self.store:unlisten(self.on_store_wake) end
  for _, qs in pairs(self.queues) do
    if qs.wake_timer then qs.wake_timer:stop(); qs.wake_timer, qs.wake_at = nil, nil end
    qs.kicked = true                          -- a claim under way must not wait a poll after it
    S.notify(qs)
  end
  S.notify(self.rescue_holder)
  S.notify(self.scheduler)
  S.notify(self.flusher)
  S.notify(self.beat)
  local grace = grace_ms or self.grace or config.grace
  if self.nrunning > 0 then
    self.grace_timer = S.timer(grace, function()
      self.grace_timer = nil
      for _, rec in pairs(self.running) do
        if rec.task then rec.task:cancel("worker stopped") end
      end
    end)
  end
  return true
end

--- Waits (inside a task) until the worker has stopped and written every outcome.
function Worker:wait()
  check_self("worker:wait", self)
  for _, t in ipairs(self.tasks) do t:await() end
  if self.grace_timer then S.untimer(self.grace_timer); self.grace_timer = nil end
  if not queue.shares_store(self.q, self.store) then self.store:close() end
  if self.lease_store ~= self.store and not queue.shares_store(self.q, self.lease_store) then
    self.lease_store:close()
  end
  if not queue.shares_store(self.q, self.claim_store) then self.claim_store:close() end
  self.state = "stopped"
  M.live[self] = nil
  return self.stats
end

local function pending_rows(session, names, now) return session:pending(names, now) end

--- The loop that has failed the longest, and for how many ms; or nil.
local function longest_failure(w)
  local name, since
  for k, t in pairs(w.failing) do
    if not since or t < since then name, since = k, t end
  end
  if name then return name, core.now() - since end
end

local DRAIN_KEYS = check.options("w:drain", { within = true, stop = true })

--- Waits (inside a task) until no job of the worker's queues is due or
--- executing anywhere, and returns the worker's stats.  opts.stop: stop the
--- worker then (true; w:drain() without it stops too, as it did before
--- `stop` existed, with a warning), or keep it running (false), as
--- pool:drain does.  opts.within = ms: also wait for jobs (retries) due
--- within that time.  A store that keeps failing ends the drain too: once
--- one of the worker's loops has failed for `give_up` ms without a
--- success, the stats carry gave_up = "why" (and with stop, it stops).
function Worker:drain(opts)
  check_self("worker:drain", self)
  if opts ~= nil then
    if type(opts) ~= "table" then check.arg_error("worker:drain", 1, "nil or { stop = boolean, within = ms }", opts) end
    check.known("worker:drain", opts, DRAIN_KEYS)
    if opts.within ~= nil and not check.is_ms(opts.within) then
      check.opt_error("worker:drain", "within", "non-negative number of ms", opts.within)
    end
    if opts.stop ~= nil and type(opts.stop) ~= "boolean" then check.opt_error("worker:drain", "stop", "boolean", opts.stop) end
  end
  local stop = opts and opts.stop
  if stop == nil then
    check.deprecate("worker:drain: without { stop = ... } the worker stops once drained, as before; the next "
                    .. "release keeps it running, as pool:drain does: give { stop = true } or { stop = false }")
    stop = true
  end
  local within = opts and opts.within or 0
  local names = {}
  for name in pairs(self.queues) do names[#names + 1] = name end
  local failures, wait = 0, 20
  while self.state == "running" do
    local loop, ms = longest_failure(self)
    if loop and ms >= self.give_up then
      self.stats.gave_up = ("the store kept failing: %s failed for %d ms without a success (last error: %s)")
        :format(loop, ms, tostring(self.last_error or "see above"))
      break
    end
    wait = 20
    -- (and once the leases of the jobs it stopped are given up: they hold
    -- their keys' slots, and q:retry refuses them until then; a write under
    -- way may find more)
    if self.nrunning == 0 and #self.pending == 0 and not self.writing and #self.unlease == 0
       and not self.unleasing then
      local done
      if rescue(self) then
        local ok, n = pcall(call, self, self.lease_store, "worker:drain", pending_rows, names, self.store:now() + within)
        if ok then
          if failures > 0 then failures = 0; loop_ok(self, "drain") end
          done = n == 0 and self.nrunning == 0 and #self.pending == 0 and not self.writing and #self.unlease == 0
                 and not self.unleasing
        else
          log.report("worker " .. self.id .. ": counting what is left", n)
          self.last_error = n
        end
      end
      if done then break end
      if done == nil then
        failures = failures + 1
        wait = failed_loop(self, "drain", failures, 2000, self.last_error)
      end
    end
    S.wait_for(self.idle, "worker:drain", wait)
  end
  if not stop then
    local stats = {}
    for k, v in pairs(self.stats) do stats[k] = v end
    return stats
  end
  self:stop()
  return self:wait()
end

function Worker:info()
  check_self("worker:info", self)
  local out = { id = self.id, state = self.state, running = self.nrunning, lease = self.lease,
                poll = self.poll, store = self.store.name, queues = {} }
  for k, v in pairs(self.stats) do out[k] = v end
  for name, qs in pairs(self.queues) do out.queues[name] = { limit = qs.limit, running = qs.running } end
  if self.schedules then out.schedules = schedules.info(self.schedules) end
  return out
end

return M
