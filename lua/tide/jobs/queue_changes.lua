--- tide.jobs.queue_changes — the queue's methods that change jobs: by hand, one at a time
--- (q:retry, q:cancel, q:expire, q:fail), in batches (q:retry_all,
--- q:cancel_all, q:fail_all), and q:prune.  tide.jobs.queue installs them on its
--- queues, with its own checks; the statements are the stores'.
local check = require "tide.engine.check"
local S = require "tide.engine.sched"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local time = require "tide.jobs.time"
local pool = require "tide.jobs.store.pool"
local transaction_mod = require "tide.jobs.transaction"

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local in_task, isyieldable = S.in_task, coroutine.isyieldable
local arg_error, opt_error = check.arg_error, check.opt_error
local holder = pool.holder
local with_session, notify, inserted_into = transaction_mod.with_session, transaction_mod.notify,
                                            transaction_mod.inserted_into
local not_in_finalizer = transaction_mod.not_in_finalizer

local M = {}

local check_q, check_id, ago   -- (set by install: tide.jobs.queue's)
local Queue = {}               -- the methods, copied onto the queue's by install

-- ===== changing jobs by hand

local function change_row(session, op, id, err)
  local now = session:now()
  if type(err) == "function" then err = err(now) end  -- (q:fail's entry, stamped on the store's clock)
  local changed = session:change(op, id, now, err)
  return changed, session:get(id)
end

--- Applies op to job id; true, or nil and why not ("job 7 not found",
--- "job 7 is completed").
local function change(q, fname, op, id, err)
  check_q(fname, q)
  check_id(fname, id)
  local changed, row = with_session(q, fname, change_row, op, id, err)
  if changed then
    if op == "retry_now" and row then inserted_into(q, q._txs[holder()], row.queue) end
    return true
  end
  if not row then return nil, ("job %d not found"):format(id) end
  if job.is_stopping(row) then
    return nil, job.stopping_why(row)
  end
  return nil, ("job %d is %s"):format(id, tostring(row.status))
end

--- Makes a job run again now (from any status but executing and available).
function Queue:retry(id) return change(self, "q:retry", "retry_now", id) end
--- Cancels a job that has not finished; a running attempt is stopped at the worker's next heartbeat.
function Queue:cancel(id) return change(self, "q:cancel", "cancel", id) end
--- Marks a job expired: it must no longer run.
function Queue:expire(id) return change(self, "q:expire", "expire", id) end

--- Fails a job for good (discarded), recording `reason`.
function Queue:fail(id, reason)
  not_in_finalizer("q:fail", 2)                -- (before the encode below: see not_in_finalizer)
  if reason ~= nil and type(reason) ~= "string" then arg_error("q:fail", 2, "string or nil", reason) end
  local text = json.text(reason or "failed by hand")
  return change(self, "q:fail", "fail", id, function(now) return json.try_encode({ at = now, error = text }, nil, true) end)
end

-- ===== changing many jobs at once, in batches

local BULK_KEYS = check.options("q:retry_all", { status = true, queue = true, target = true, since = true,
                                                batch = true, max = true })
check.options("q:cancel_all", BULK_KEYS)
check.options("q:fail_all", BULK_KEYS)
local BULK_FROM = {
  retry_now = { "scheduled", "retryable", "completed", "discarded", "cancelled", "expired" },
  cancel = { "available", "scheduled", "retryable", "executing" },
  fail = { "available", "scheduled", "retryable", "executing" },
}

local function bulk_rows(session, op, f, after, limit, err_of)
  local now = session:now()
  return session:bulk(op, f, after, limit, now, err_of and err_of(now))
end

--- Applies op to every job that matches filter f, BATCH jobs per statement
--- (each its own short transaction: workers claim and write between two,
--- and the loop turns between two when the caller is a task's own code),
--- in id order, up to f.max; returns how many changed.  err_of(now): the
--- error entry a failed job gets (op "fail").
local function bulk(q, fname, op, f, err_of)
  check_q(fname, q)
  if type(f) ~= "table" then arg_error(fname, 1, "filter table { status =, queue =, since = }", f, 3) end
  check.known(fname, f, BULK_KEYS, nil, 3)
  local from = {}
  for _, st in ipairs(BULK_FROM[op]) do from[st] = true end
  if not from[f.status] then opt_error(fname, "status", check.choices(from), f.status, 3) end
  if f.queue ~= nil and not job.is_name(f.queue) then opt_error(fname, "queue", "queue " .. job.NAME_EXPECTED, f.queue, 3) end
  if f.target ~= nil and type(f.target) ~= "string" then opt_error(fname, "target", "string", f.target, 3) end
  if f.max ~= nil and not check.is_count(f.max, 0) then opt_error(fname, "max", "integer >= 0", f.max, 3) end
  local since
  if f.since ~= nil then
    since = time.run_at_ms(f.since)
    if not since then opt_error(fname, "since", time.EXPECTED, f.since, 3) end
  end
  if f.batch ~= nil and not (check.is_count(f.batch, 1) and f.batch <= 2147483647) then
    opt_error(fname, "batch", "integer from 1 to 2147483647", f.batch, 3)
  end
  local filter = { status = f.status, queue = f.queue, target = f.target, since = since,
                   since_col = job.is_finished[f.status] and "completed_at" or "inserted_at" }
  local total, after, limit, max = 0, 0, f.batch or 1000, f.max or math.huge
  while total < max do
    local rows = with_session(q, fname, bulk_rows, op, filter, after, math.min(limit, max - total), err_of)
    if #rows == 0 then return total end
    total, after = total + #rows, rows[#rows].id
    if op == "retry_now" then
      local queues = {}
      for _, r in ipairs(rows) do queues[r.queue] = true end
      local st = q._txs[holder()]
      if st then for name in pairs(queues) do st.touched[name] = true end else notify(q, queues) end
    end
    -- The loop turns between batches (the rest of the process goes on)
    -- where the caller can wait: not inside a C call (a gsub or sort
    -- callback), where a SQLite store works without waiting and must go on.
    if in_task() and isyieldable() then S.sleep(0) end
  end
  return total
end

--- Makes every job of a status run again now, in batches: filter = { status
--- (required: scheduled, retryable, completed, discarded, cancelled or
--- expired), queue, target, since (a UTC time: jobs that finished then or
--- later; for waiting statuses, that were enqueued then or later), batch
--- (jobs per statement, 1000), max (jobs changed at most) }.  Returns how many.  Like q:retry, a job that
--- used its attempts gets one more; its errors are kept.
function Queue:retry_all(f)
  local n = bulk(self, "q:retry_all", "retry_now", f)   -- (not a tail call: errors blame the caller)
  return n
end

--- Cancels every job of a status (available, scheduled, retryable or
--- executing: a running attempt stops at its worker's next heartbeat), in
--- batches; the filter as q:retry_all's.  Returns how many.
function Queue:cancel_all(f)
  local n = bulk(self, "q:cancel_all", "cancel", f)
  return n
end

--- Fails by hand (discarded, `reason` added to its errors, as q:fail) every
--- job of a status (available, scheduled, retryable or executing: a running
--- attempt stops at its worker's next heartbeat), in batches; the filter as
--- q:retry_all's.  Returns how many.
function Queue:fail_all(f, reason)
  if reason ~= nil and type(reason) ~= "string" then arg_error("q:fail_all", 2, "string or nil", reason) end
  local text = json.text(reason or "failed by hand")
  local n = bulk(self, "q:fail_all", "fail", f,
                 function(now) return json.try_encode({ at = now, error = text }, nil, true) end)
  return n
end

-- ===== pruning

local PRUNE_KEYS = check.options("q:prune", { older_than = true, statuses = true })

local function prune_rows(session, before, statuses) return session:prune(before, statuses) end

--- Deletes finished jobs (completed, discarded, cancelled, expired: or the
--- `statuses` given) that finished more than older_than ago (ms, or "7d").
--- Returns how many were deleted.  Ids are never given out again.
function Queue:prune(opts)
  check_q("q:prune", self)
  if type(opts) ~= "table" then arg_error("q:prune", 1, "table", opts) end
  check.known("q:prune", opts, PRUNE_KEYS)
  local ms = check.duration(opts.older_than)
  if not ms then opt_error("q:prune", "older_than", "duration (ms, or like \"7d\", \"12h\")", opts.older_than) end
  local statuses = opts.statuses or job.FINISHED
  if type(statuses) ~= "table" or #statuses == 0 then
    opt_error("q:prune", "statuses", "list of finished statuses", statuses)
  end
  for i, st in ipairs(statuses) do
    if not job.is_finished[st] then
      opt_error("q:prune", "statuses[" .. i .. "]", "'completed', 'discarded', 'cancelled' or 'expired'", st)
    end
  end
  return (with_session(self, "q:prune", prune_rows, ago(self, ms), statuses))
end


--- Copies the methods onto `target` (tide.jobs.queue's Queue), with the
--- queue's checks: deps = { check_q, check_id, ago }.
function M.install(target, deps)
  check_q, check_id, ago = deps.check_q, deps.check_id, deps.ago
  for name, fn in pairs(Queue) do target[name] = fn end
end

return M
