--- tide.jobs.claimer — a worker's claimer task per queue: takes due jobs under a lease and starts them.
--
-- One claimer task per queue of a tide.worker takes up to `batch` due jobs
-- (priority, then run_at) in one statement that marks them executing
-- under a lease held by the worker, and starts a task for each.  It
-- claims again when slots free (under a backlog, a few at once: see
-- "gathering" below), after `poll` ms, and when a job may have
-- come (a commit in this process, LISTEN/NOTIFY on PostgreSQL, a watch on
-- the -wal file on SQLite); it backs off while the store fails.
local core = require "tide.core"
local S = require "tide.engine.sched"
local log = require "tide.engine.log"
local queue = require "tide.jobs.queue"
local outcomes = require "tide.jobs.outcomes"

local pcall = pcall
local min, max = math.min, math.max
local record = outcomes.record

local M = {}

-- ===== gathering: one claim for the slots of many jobs
--
-- Under a backlog, a slot freed by a job that ended was claimed at once,
-- one job a claim: with jobs ending one at a time (their own transactions
-- queued on a small pool) that was a claim statement, a round trip and a
-- server commit per job, on the critical path of the jobs still waiting
-- for the pool (bench/pg, own transactions: 2.1 commits a job).  So while
-- the last claim found more than it could take (qs.more) and jobs still
-- run, a claim waits until a quarter of the slots (or a whole batch) are
-- free, at most GATHER_MS: 1.3 commits a job, 10-25% more jobs/s at pools
-- of 1, 5 and 20 (bench/RESULTS.md).  An idle worker, or one with most
-- slots free, claims at once: no latency is added where it shows.  SQLite
-- claims in this process: at once.
--
-- A freed slot waits at most a quarter of the time a job of the queue held
-- its slot lately (qs.held, a moving average kept by tide.jobs.worker),
-- so the wait costs a slot at most a fifth of its jobs: while most slots
-- hold long jobs and the few left run short ones, waiting GATHER_MS for
-- slots that do not free cost those short jobs 8-13x their throughput
-- (spec/review_claims_spec.lua).  Jobs that queue for a pool hold their
-- slots long, and still gather.
M.GATHER_MS = 10

--- Waits (at most GATHER_MS, and a quarter of qs.held) until enough slots
--- of qs are free to be worth a claim; returns the free slots.
local function gather(w, qs, free)
  local window = min(M.GATHER_MS, qs.held / 4)
  if window < 1 then return free end          -- (the loop's poll wakes in whole ms: it would wait one)
  local deadline = core.now() + window
  while free * 4 < qs.limit and free < w.batch and qs.running > 0 and w.state == "running" do
    local left = deadline - core.now()
    if left <= 0 then break end
    S.wait_for(qs, "tide.worker", left)       -- a freed slot notifies qs (tide.jobs.worker)
    free = qs.limit - qs.running - qs.reserved
  end
  return free
end

local function claim_rows(session, name, want, owner, now, lease_until)
  return session:claim(name, want, owner, now, lease_until)
end

--- Claims up to `want` due jobs of queue `name` and starts them; returns
--- how many, or nil after a store failure (reported).
local function claim(w, name, want, worker)
  if w.state ~= "running" then return 0 end
  local now = w.store:now()
  local ok, rows, limited, reopen = pcall(queue.worker_call, w.q, w.claim_store, "tide.worker", claim_rows, name, want,
                                          w.id, now, now + w.lease)
  if not ok then
    log.report("worker " .. w.id .. ": claiming from queue " .. name, rows)
    worker.store_errors.claim = worker.store_errors.claim + 1
    w.claim_error = rows
    return nil
  end
  if w.state ~= "running" then               -- stopped while the claim was under way
    for i = 1, #rows do
      local row = rows[i]
      w.count(w, row.queue, "claimed")
      record(w, { kind = "release", outcome = "released", id = row.id, attempt = row.attempt,
                  run_at = w.store:now(), job = worker.job_info(row) })
    end
    return 0
  end
  w.queues[name].limited = limited or false
  -- A rate held jobs back: claim again when its window reopens (no
  -- outcome nor enqueue may come to wake the claimer before the poll).
  if reopen and reopen < w.poll then worker.wake_later(w, name, max(0, reopen)) end
  for i = 1, #rows do worker.start_job(w, rows[i]) end
  return #rows
end

--- Waits for a reason to claim again (a slot freed, an enqueue, the poll
--- interval): unless one came while the last claim was under way.
local function idle_wait(w, qs, ms)
  if qs.kicked then qs.kicked = false; return end
  S.wait_for(qs, "tide.worker", ms)
  qs.kicked = false
end

--- The claimer task of queue `name` of worker w (see tide.jobs.worker's
--- top): claims while slots are free, waits for a reason otherwise.
--- `worker` gives what it needs of tide.jobs.worker: start_job(w, row),
--- job_info(row), wake_later(w, name, ms), failed_loop(w, name, failures,
--- cap, err), loop_ok(w, name), and store_errors (the process's counts).
function M.run(w, name, worker)
  local qs = w.queues[name]
  local failures = 0
  while w.state == "running" do
    local free = qs.limit - qs.running - qs.reserved   -- (reserved: see tide.jobs.outcomes)
    if free > 0 and qs.more and not w.claim_store.sync then
      free = gather(w, qs, free)
      -- A stop that came while it gathered notified qs once, and that wait
      -- took it: claiming (nothing) and then waiting would wait a poll.
      if w.state ~= "running" then break end
    end
    if free > 0 then
      local want = min(free, w.batch)
      qs.kicked = false                       -- what this claim sees needs no second look
      local n = claim(w, name, want, worker)
      if n == nil then                        -- the store failed: back off, then try again
        failures = failures + 1
        qs.more = false
        S.wait_for(qs, "tide.worker", worker.failed_loop(w, "claim", failures, w.poll, w.claim_error))
      else
        if failures > 0 then failures = 0; worker.loop_ok(w, "claim") end
        qs.more = n == want
        if not qs.more then idle_wait(w, qs, w.poll) end
      end
    else
      -- (slots reserved for a durable flow's steps while an outcome is
      -- written: tide.jobs.outcomes wakes it when the write ends)
      qs.starved = qs.reserved > 0
      idle_wait(w, qs, w.poll)
      qs.starved = false
    end
  end
end

return M
