--- tide.jobs.outcomes — how a worker writes its jobs' outcomes, and counts only what the store took.
--
-- Each attempt that ends becomes an entry { id, attempt, kind, outcome,
-- run_at, error, job, err }: kind is the store's ("completed", "retry",
-- "discard", "release"); outcome is what it means ("completed", "retried",
-- "discarded", "released").  The flusher task writes the entries of a tick
-- in one transaction.  The store says which entries it applied: an entry
-- changes nothing when its job is no longer leased to this worker at that
-- attempt.  So the counts and the hook see the truth (Promise: the worker
-- tells the truth):
--
--   written                  the entry's outcome, counted and reported
--   not written, job cancelled or expired in the store meanwhile
--                            "cancelled" (its method may have finished:
--                            the store's word wins)
--   not written, otherwise   "lost": the lease had passed to another
--                            worker (this one stalled past it), which
--                            runs or ran the job again
--   never written (the store kept failing, the worker stopped)
--                            "unwritten": the lease runs out and the job
--                            runs again; `tide worker` exits 1
--
-- w.on_outcome{ job, outcome, error, traceback } hears each, once (`tide
-- worker` prints from it), and w.on_discard{ job, error, traceback, worker }
-- each job the store took as discarded; they run outside any task and
-- cannot wait.
local S = require "tide.engine.sched"
local log = require "tide.engine.log"
local core = require "tide.core"
local queue = require "tide.jobs.queue"
local flows = require "tide.jobs.flows"

local ipairs, pairs, pcall, min = ipairs, pairs, pcall, math.min

local M = {}

--- Tells w.on_outcome of a job's outcome: one event table, or (a hook of
--- two parameters or more, its old form) four arguments.
function M.heard(w, id, job, outcome, err, trace)
  local hook = w.on_outcome
  if not hook then return end
  if w.old_outcome then
    log.protect("on_outcome of job " .. id, hook, job, outcome, err, trace)
  else
    log.protect("on_outcome of job " .. id, hook, { job = job, outcome = outcome, error = err, traceback = trace })
  end
end

--- Tells w.on_outcome about one entry's fate, and counts it.
local function settle(w, e, outcome)
  w.count(w, e.job and e.job.queue or "?", outcome)   -- the worker's stats and the metrics' totals
  M.heard(w, e.id, e.job, outcome, e.err, e.trace)
  if outcome == "discarded" and w.on_discard then
    log.protect("on_discard of job " .. e.id, w.on_discard, { job = e.job, error = e.err, traceback = e.trace,
                                                              worker = w.id })
  end
end

--- The transaction hooks for entries whose target applies its own
--- changes inside the outcome write (durable flows: e.after_record); the
--- post-commit work they return lands in box.post.
local function tx_hooks(entries, owner, now, lease, box)
  local apply, list
  for _, e in ipairs(entries) do
    if e.after_record then apply = e.after_record; list = list or {}; list[#list + 1] = e end
  end
  if not apply then return nil end
  local runs
  return {
    before = function(s) runs = flows.lock_runs(s, list) end,
    after = function(s, written)
      local mine = {}
      for _, e in ipairs(list) do if written[e.id] then mine[#mine + 1] = e end end
      box.post = #mine > 0 and apply(s, mine, now, owner, lease, runs, box.take) or nil
    end,
  }
end

local function record_batch(session, entries, owner, now, lease, box)
  local written = session:record(entries, owner, now, tx_hooks(entries, owner, now, lease, box))
  local unapplied = {}
  for _, e in ipairs(entries) do
    if not written[e.id] then unapplied[#unapplied + 1] = e.id end
  end
  return written, #unapplied > 0 and session:states(unapplied) or nil
end

--- The free slots of the queues (without limits) of the durable flow
--- entries of a running worker's batch: the steps a flow change may lease
--- to it at once (tide.jobs.flows' release), reserved from those queues'
--- claimers until the write ends.
local function reserve(w, entries)
  if w.state ~= "running" then return nil end
  local take
  for i = 1, #entries do                     -- (a run's steps are all in its queue)
    local e = entries[i]
    local name = e.after_record and e.job and e.job.queue
    local qs = name and w.queues[name]
    if qs and not qs.limited and qs.reserved == 0 and qs.limit - qs.running > 0 then
      take = take or {}
      take[name] = qs.limit - qs.running
      qs.reserved = take[name]
    end
  end
  return take
end

local function unreserve(w)
  for _, qs in pairs(w.queues) do
    qs.reserved = 0
    if qs.starved then S.notify(qs) end       -- its claimer found no free slot while they were reserved
  end
end

--- After a commit that changed durable flows: start the steps and hook
--- jobs leased to this worker in the write (or hand them back, if it
--- stopped meanwhile), and wake the claimers of the queues that got jobs.
local function after_commit(w, post)
  for _, row in ipairs(post.rows) do
    if w.state == "running" and w.queues[row.queue] then
      w.start_row(row)
    else
      w.count(w, row.queue, "claimed")
      M.record(w, { kind = "release", outcome = "released", id = row.id, attempt = row.attempt,
                    run_at = w.store:now(), job = { id = row.id, queue = row.queue, target = row.target,
                                                  method = row.method, attempt = row.attempt } })
    end
  end
  queue.notify(w.q, post.queues)
end

--- Job `id`'s attempt `attempt`, cancelled, expired or failed by hand
--- while it ran here, has stopped: its lease, which kept its slot
--- (tide.jobs.store.common's STOPPING), is given up by the worker's
--- heartbeat task (for that attempt only).
function M.stopped(w, id, attempt)
  local list = w.unlease
  list[#list + 1] = { id = id, attempt = attempt }
  S.notify(w.beat)
end

--- Writes `entries` now; true when the store took the batch (each entry
--- then settled), false after a failure (reported; the entries untouched).
local function write(w, entries)
  local box = { take = reserve(w, entries) }
  local ok, written, states = pcall(queue.worker_call, w.q, w.store, "tide.worker", record_batch,
                                    entries, w.id, w.store:now(), w.lease, box)
  if box.take then unreserve(w) end
  if not ok then
    -- Tried again by the flusher; if never written, the leases run out and
    -- the jobs run again (counted as unwritten).
    log.report("worker " .. w.id .. ": recording " .. #entries .. " outcomes", written)
    w.record_error()
    w.stats.write_errors = w.stats.write_errors + 1
    w.last_error = written
    return false
  end
  if box.post then after_commit(w, box.post) end
  for _, e in ipairs(entries) do
    if written[e.id] then
      settle(w, e, e.outcome)
    else
      local now = states and states[e.id]
      local status = now and now.status
      if now and now.lease_owner == w.id and status ~= "executing" and now.attempt == e.attempt then
        M.stopped(w, e.id, e.attempt)         -- cancelled by hand while it ran: its lease held its slot
      end
      settle(w, e, (status == "cancelled" or status == "expired") and "cancelled" or "lost")
    end
  end
  if w.on_written then w.on_written(entries) end
  return true
end
M.write = write

--- Entries that will never be written.
local function give_up(w, entries)
  for _, e in ipairs(entries) do settle(w, e, "unwritten") end
end
M.give_up = give_up

--- Whether the worker can write from where it is now, without waiting:
--- only a synchronous store (SQLite) with its connection free, and only
--- when the caller is not a task's code that must not block (hooks run
--- inside the scheduler's door).
local function can_write_now(w)
  return queue.is_open(w.q) and w.store.sync and w.store:available()
end

--- Queues an entry for the flusher.  Once the flusher is gone (cancelled
--- at the end of a shutdown's grace period) it writes the entry at once
--- when it can; otherwise the job's lease runs out and it runs again: never
--- lost, at worst run twice.
function M.record(w, e)
  if S.TERMINAL[S.state(w.flusher_task)] then
    if not (can_write_now(w) and write(w, { e })) then give_up(w, { e }) end
    return
  end
  local p = w.pending
  p[#p + 1] = e
  S.notify(w.flusher)
end

-- ===== gathering: one commit for the outcomes of many jobs
--
-- On a store over the network (PostgreSQL) each write is a commit, and a
-- commit waits for a WAL flush: jobs that end one at a time (their own
-- transactions queue on a small pool) made one write each, 1.7-1.8 WAL
-- flushes per job with the job's own commit (pg_stat_wal), and the job's
-- COMMIT waited behind the outcome's flush.  So a small batch waits up to
-- GATHER_MS for more while jobs still run: the slots are freed when the
-- jobs end, not when their outcomes are written, so claiming goes on; the
-- heartbeat keeps the waiting entries' leases.  A stopping worker, a
-- worker with nothing running (a drain's last outcomes) and SQLite (a
-- write in this process) write at once; so does an outcome of a queue with
-- limits (q:declare): its job holds its slot in the store (the limited
-- claim counts executing rows) until the write, and short jobs behind long
-- ones ran 3-5x slower (spec/review_claims_spec.lua).
M.GATHER_MS = 10

local function slots(w)
  local n = 0
  for _, qs in pairs(w.queues) do n = n + qs.limit end
  return n
end

--- Whether an entry waiting is of a queue with limits.
local function holds_limited(w)
  local p = w.pending
  for i = 1, #p do
    local qs = p[i].job and w.queues[p[i].job.queue]
    if qs and qs.limited then return true end
  end
  return false
end

local function gather(w)
  if w.store.sync then return end
  local enough = slots(w) / 2
  local deadline = core.now() + M.GATHER_MS
  while #w.pending < enough and w.nrunning > 0 and w.state == "running" and not holds_limited(w) do
    local left = deadline - core.now()
    if left <= 0 then return end
    S.wait_for(w.flusher, "tide.worker", left)
  end
end

--- The flusher task: writes what is pending, backing off while the store
--- fails (50 ms doubling up to 2 s); a stopping worker gives up after 10
--- failed tries (at once, when a drain gave up on the store), a running one
--- keeps trying (w.failing.write says since when).
function M.flusher(w)
  local failures = 0
  -- Cancelled (the end of a shutdown's grace) while a batch was being
  -- written, or while entries waited (gathered, or after a failure): write
  -- them at once if the store allows, as record() does.
  S.on_attempt_end(S.current(), function()
    local p = w.writing or {}
    w.writing = nil
    for i = 1, #w.pending do p[#p + 1] = w.pending[i] end
    w.pending = {}
    if #p > 0 and not (can_write_now(w) and write(w, p)) then give_up(w, p) end
  end)
  while true do
    if #w.pending > 0 and failures == 0 then gather(w) end
    local p = w.pending
    if #p > 0 then
      w.pending = {}
      w.writing = p
      local written = write(w, p)
      w.writing = nil
      if written then
        failures = 0
        w.failing.write = nil
      elseif w.state == "running" or (failures < 10 and not w.stats.gave_up) then
        failures = failures + 1
        w.failing.write = w.failing.write or core.now()
        for i = 1, #w.pending do p[#p + 1] = w.pending[i] end
        w.pending = p
        S.wait_for(w.flusher, "tide.worker", min(50 * 2 ^ failures, 2000))
      else
        give_up(w, p)
      end
    elseif w.state ~= "running" and w.nrunning == 0 then
      S.notify(w.beat)                        -- nothing left to keep leased
      return
    else
      S.wait_for(w.flusher, "tide.worker")
    end
  end
end

return M
