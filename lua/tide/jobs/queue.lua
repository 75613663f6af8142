--- tide.jobs.queue — durable jobs: enqueue inside the caller's transaction, inspect, retry, cancel.
--
--   local q = tide.queue.open("sqlite:jobs.db", { encryptor = ... })
--   q:transaction(function(tx)
--     tx:exec("INSERT INTO orders (id, total) VALUES (?, ?)", 7, 120)
--     tx:enqueue{ target = "orders", method = "fulfill", args = { id = 7 } }
--   end)
--
-- The SQL lives in a store driver (tide.jobs.store.*); this file checks
-- arguments, encodes args (JSON, optionally encrypted), keeps the
-- connection to one task at a time while a transaction is open, and tells
-- workers in this process when a job was committed.  Misuse raises; a store
-- failure raises an error that names the store and the SQLite code.  Times
-- given and returned are UTC seconds since the Unix epoch (fractional).
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local time = require "tide.jobs.time"

local type, error, pairs, ipairs, tostring, select = type, error, pairs, ipairs, tostring, select
local setmetatable, pcall, co_running, floor = setmetatable, pcall, coroutine.running, math.floor
local arg_error, opt_error, describe = check.arg_error, check.opt_error, check.describe
local wallclock = core.wallclock

local M = {}

local Queue = {}
local Queue_mt = { __index = Queue, __tostring = function(q)
  return ("tide.Queue (%s%s)"):format(q.name, q._store and "" or ", closed")
end }
local Tx = {}
local Tx_mt = { __index = Tx, __tostring = function(tx) return ("tide.Transaction (%s)"):format(tx._q.name) end }


-- ===== times

local parse_iso = time.parse_iso

--- A run_at option -> ms since the epoch; raises naming the option.
local function run_at_ms(fname, v, level)
  if type(v) == "number" and check.finite(v) and v >= 0 then return floor(v * 1000 + 0.5) end
  if type(v) == "string" then
    local ms = parse_iso(v)
    if ms then return ms end
  end
  opt_error(fname, "run_at", "UTC time (seconds since the epoch, or ISO 8601 like "
            .. "\"2026-11-23T15:04:05Z\")", v, level + 1)
end

-- ===== opening

local DRIVERS = { sqlite = "tide.jobs.store.sqlite" }
local SYNC = { normal = true, full = true, off = true }
local OPEN_KEYS = { encryptor = true, busy_timeout = true, synchronous = true }

--- "sqlite:PATH" (or "sqlite://PATH") -> driver module, path.
local function parse_url(url)
  local scheme, rest = url:match("^(%a[%w+.-]*):(.*)$")
  if not scheme then
    error(("tide.queue.open: bad store URL %q (expected sqlite:PATH or postgres://...)"):format(url), 3)
  end
  scheme = scheme:lower()
  if scheme == "postgres" or scheme == "postgresql" then
    if not rest:match("^//.") then
      error(("tide.queue.open: bad store URL %q (expected postgres://[user[:password]@]host[:port]/database)")
        :format(url), 3)
    end
    return "tide.jobs.store.postgres", url
  end
  if not DRIVERS[scheme] then
    error(("tide.queue.open: unknown store '%s' in %q (expected sqlite:PATH or postgres://...)"):format(scheme, url), 3)
  end
  rest = rest:gsub("^//", "")
  if rest == "" then error(("tide.queue.open: bad store URL %q (the file path is missing)"):format(url), 3) end
  return DRIVERS[scheme], rest
end

--- Opens a job store: `url` is "sqlite:PATH" or "postgres://user@host/db"
--- (tables created and migrated as needed).  opts: encryptor = { encrypt = fn, decrypt = fn } (args are
--- stored only encrypted), busy_timeout (ms to wait for another process's
--- write lock, default 5000), synchronous ("normal", the default in WAL
--- mode: a crash of the process loses nothing, a power cut may lose the
--- last commits; "full": nothing is lost on power cut either).
function M.open(url, opts)
  if type(url) ~= "string" then arg_error("tide.queue.open", 1, "store URL string", url) end
  if opts ~= nil and type(opts) ~= "table" then arg_error("tide.queue.open", 2, "table or nil", opts) end
  opts = opts or {}
  check.known("tide.queue.open", opts, OPEN_KEYS)
  local enc = opts.encryptor
  if enc ~= nil and (type(enc) ~= "table" or type(enc.encrypt) ~= "function"
                     or type(enc.decrypt) ~= "function") then
    opt_error("tide.queue.open", "encryptor", "table with encrypt and decrypt functions", enc)
  end
  if opts.busy_timeout ~= nil and not check.is_ms(opts.busy_timeout) then
    opt_error("tide.queue.open", "busy_timeout", "non-negative number of ms", opts.busy_timeout)
  end
  if opts.synchronous ~= nil and not SYNC[opts.synchronous] then
    opt_error("tide.queue.open", "synchronous", check.choices(SYNC), opts.synchronous)
  end
  local driver, path = parse_url(url)
  local name = url
  local ok, store = pcall(require(driver).open, path, name, opts)
  if not ok then error("tide.queue.open: " .. tostring(store), 2) end
  return setmetatable({ name = store.name, durability = store.durability, _store = store, _enc = enc,
                        _owner = false, _depth = 0, _waiters = {}, _listeners = {},
                        _touched = false }, Queue_mt)
end

-- ===== one task at a time inside a transaction
--
-- SQLite runs on this thread, so a single statement never interleaves with
-- another task's.  A transaction can: its function may wait (tide.sleep,
-- an await) and let other tasks run.  While it is open the store belongs to
-- the task that opened it; other tasks wait their turn, and code outside
-- tasks (which cannot wait) gets an error.

local MAIN = {}                  -- the owner when no coroutine runs (a plain host)

local function check_q(fname, q)
  if type(q) ~= "table" or getmetatable(q) ~= Queue_mt then
    error(("%s: bad self (queue expected, got %s); call it as q:%s(...)")
      :format(fname, describe(q), fname:match("[:.](%w+)$")), 3)
  end
  if not q._store then error(fname .. ": the queue is closed", 3) end
end

--- Waits until no other task holds the store; returns the store.
local function acquire(q, fname)
  local me = co_running() or MAIN
  while q._owner and q._owner ~= me do
    if not S.in_task() then
      error(fname .. ": the store is inside another task's transaction (call it from a task, which waits its turn)", 3)
    end
    local t, tok = S.wait_begin(fname, 3)
    S.add_waiter(q._waiters, t, tok)
    S.wait_end(t, tok)
  end
  return q._store
end
M.acquire = acquire

local function notify(q, queues)
  for queue in pairs(queues) do
    for _, fn in ipairs(q._listeners) do fn(queue) end
  end
end

--- Frees the store from a transaction whose task ended inside it (timed
--- out, cancelled): the store rolls it back; tasks waiting for it go on.
local function abandon(q)
  if q._store then q._store:abandon() end
  q._owner, q._touched, q._depth = false, false, 0
  local waiters = q._waiters
  q._waiters = {}
  S.wake_all(waiters)
end

--- Runs fn(tx) in a transaction (a savepoint when nested); commits when it
--- returns, rolls back and re-raises when it raises.  Returns fn's results.
local function transaction(q, fname, fn, ...)
  local store = acquire(q, fname)
  local me = co_running() or MAIN
  local depth = q._depth + 1
  if depth == 1 then
    store:begin()
    q._owner, q._touched = me, {}
  else
    store:savepoint(depth)
  end
  q._depth = depth
  local t, abandon_hook = nil, nil
  if depth == 1 and S.in_task() then
    t = S.current()
    abandon_hook = function()              -- the task ended inside fn: undo, free the store
      if q._owner == me then abandon(q) end
    end
    S.on_attempt_end(t, abandon_hook)
  end
  local tx = setmetatable({ _q = q }, Tx_mt)
  local res = { pcall(fn, tx, ...) }
  if t then S.off_attempt_end(t, abandon_hook) end
  q._depth = depth - 1
  local ok, commit_err = true, nil
  if depth > 1 then
    if res[1] then store:release(depth) else store:rollback_to(depth) end
  elseif res[1] then
    ok, commit_err = pcall(store.commit, store)
    if not ok then pcall(store.rollback, store) end
  else
    pcall(store.rollback, store)
  end
  if depth == 1 then
    local touched = q._touched
    q._owner, q._touched = false, false
    local waiters = q._waiters
    q._waiters = {}
    S.wake_all(waiters)
    if res[1] and ok then notify(q, touched) end
  end
  if not ok then error(fname .. ": commit failed: " .. tostring(commit_err), 3) end
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, table.maxn(res))
end

--- Runs fn(tx, ...) inside one database transaction: tx:exec and tx:query
--- run your own SQL, tx:enqueue adds jobs; all commit together, or an error
--- rolls all back and is raised again.  Returns what fn returns.
function Queue:transaction(fn, ...)
  check_q("q:transaction", self)
  if type(fn) ~= "function" then arg_error("q:transaction", 1, "function", fn) end
  return transaction(self, "q:transaction", fn, ...)
end

-- ===== enqueue

local JOB_KEYS = { target = true, method = true, args = true, queue = true, run_at = true,
                   delay = true, priority = true, max_attempts = true, idempotence_key = true }

--- Checks an enqueue spec; returns the row to insert.
local function job_row(fname, q, j, now, level)
  level = level + 1
  if type(j) ~= "table" then arg_error(fname, 1, "job table", j, level) end
  check.known(fname, j, JOB_KEYS, nil, level)
  if not job.is_name(j.target) then
    opt_error(fname, "target", "module name (like \"orders\" or \"app.mail\")", j.target, level)
  end
  if not job.is_method(j.method) then
    opt_error(fname, "method", "function name", j.method, level)
  end
  if j.queue ~= nil and not job.is_name(j.queue) then
    opt_error(fname, "queue", "queue " .. job.NAME_EXPECTED, j.queue, level)
  end
  if j.priority ~= nil and (type(j.priority) ~= "number" or not check.is_count(math.abs(j.priority))) then
    opt_error(fname, "priority", "integer (lower runs first)", j.priority, level)
  end
  if j.max_attempts ~= nil and not check.is_count(j.max_attempts, 1) then
    opt_error(fname, "max_attempts", "integer >= 1", j.max_attempts, level)
  end
  if j.idempotence_key ~= nil and (type(j.idempotence_key) ~= "string" or j.idempotence_key == "") then
    opt_error(fname, "idempotence_key", "non-empty string", j.idempotence_key, level)
  end
  if j.delay ~= nil and not check.is_ms(j.delay) then
    opt_error(fname, "delay", "non-negative number of ms", j.delay, level)
  end
  if j.delay ~= nil and j.run_at ~= nil then error(fname .. ": give run_at or delay, not both", level) end
  local run_at = j.run_at ~= nil and run_at_ms(fname, j.run_at, level) or now + floor(j.delay or 0)
  local args_json = json.encode_option(fname, "args", j.args, level)
  local args, args_enc = args_json, nil
  if q._enc then
    local ok, blob = pcall(q._enc.encrypt, args_json)
    if not ok or type(blob) ~= "string" then
      error(("%s: encryptor.encrypt failed: %s"):format(fname, ok and ("returned " .. describe(blob)
            .. ", not a string") or tostring(blob)), level)
    end
    args, args_enc = nil, blob
  end
  return { queue = j.queue or "default", target = j.target, method = j.method, args = args,
           args_enc = args_enc, status = run_at > now and "scheduled" or "available",
           priority = j.priority or 0, max_attempts = j.max_attempts or 20, run_at = run_at,
           idempotence_key = j.idempotence_key, inserted_at = now }
end

local function insert(q, store, row)
  local id, inserted = store:insert(row)
  if inserted then
    if q._touched then q._touched[row.queue] = true else notify(q, { [row.queue] = true }) end
  end
  return id, inserted
end

--- Adds one job; returns its id and true, or the id of the job that already
--- has this idempotence_key and false (nothing inserted).
function Queue:enqueue(j)
  check_q("q:enqueue", self)
  local row = job_row("q:enqueue", self, j, wallclock(), 2)
  return insert(self, acquire(self, "q:enqueue"), row)
end

--- Adds a list of jobs in one transaction; returns their ids (in order) and
--- how many were inserted (the rest had existing idempotence keys).
function Queue:enqueue_many(list)
  check_q("q:enqueue_many", self)
  if type(list) ~= "table" then arg_error("q:enqueue_many", 1, "list of job tables", list) end
  local now, rows = wallclock(), {}
  for i = 1, #list do
    local ok, row = pcall(job_row, "q:enqueue_many", self, list[i], now, 1)
    if not ok then error((tostring(row):gsub("^q:enqueue_many: ", "q:enqueue_many: job " .. i .. ": ")), 2) end
    rows[i] = row
  end
  return transaction(self, "q:enqueue_many", function()
    local ids, n = {}, 0
    for i = 1, #rows do
      local id, inserted = insert(self, self._store, rows[i])
      ids[i] = id
      if inserted then n = n + 1 end
    end
    return ids, n
  end)
end

function Tx:enqueue(j)
  local q = self._q
  local row = job_row("tx:enqueue", q, j, wallclock(), 2)
  return insert(q, q._store, row)
end

function Tx:enqueue_many(list) return Queue.enqueue_many(self._q, list) end

--- Runs one statement of your own SQL with ? parameters bound (never
--- interpolated); returns the number of rows changed.
function Tx:exec(sql, ...)
  if type(sql) ~= "string" then arg_error("tx:exec", 1, "SQL string", sql) end
  return self._q._store:exec(sql, ...)
end

--- Runs a query of your own; returns its rows as { column = value } tables.
function Tx:query(sql, ...)
  if type(sql) ~= "string" then arg_error("tx:query", 1, "SQL string", sql) end
  return self._q._store:query(sql, ...)
end

-- ===== reading jobs

local function decode_args(q, row)
  local text = row.args
  if row.args_enc ~= nil then
    if not q._enc then return nil, "args are encrypted and this queue has no encryptor" end
    local ok, plain = pcall(q._enc.decrypt, row.args_enc)
    if not ok then return nil, "encryptor.decrypt failed: " .. tostring(plain) end
    if type(plain) ~= "string" then return nil, "encryptor.decrypt returned " .. describe(plain) end
    text = plain
  end
  if text == nil then return nil end
  local v, err = json.decode(text)
  if err then return nil, "args are not valid JSON: " .. err end
  return v
end
M.decode_args = decode_args

local function seconds(ms) return ms and ms / 1000 end

--- A stored row -> the job table users see (times in UTC seconds).
local function job_of(q, row)
  local args, err = decode_args(q, row)
  local errors = {}
  if row.errors then
    local list = json.decode(row.errors)
    if type(list) == "table" then
      for i, e in ipairs(list) do
        errors[i] = { attempt = e.attempt, at = seconds(e.at), error = e.error,
                      traceback = e.traceback ~= json.null and e.traceback or nil }
      end
    end
  end
  return {
    id = row.id, queue = row.queue, target = row.target, method = row.method,
    args = args, args_error = err, encrypted = row.args_enc ~= nil or nil,
    status = row.status, priority = row.priority, attempt = row.attempt,
    max_attempts = row.max_attempts, run_at = seconds(row.run_at),
    attempted_at = seconds(row.attempted_at), completed_at = seconds(row.completed_at),
    inserted_at = seconds(row.inserted_at), errors = errors,
    idempotence_key = row.idempotence_key, lease_owner = row.lease_owner,
    lease_expires = seconds(row.lease_expires),
  }
end
M.job_of = job_of

local function check_id(fname, id)
  if not check.is_count(id, 1) then arg_error(fname, 1, "job id (integer >= 1)", id, 3) end
end

--- The job with this id, or nil.
function Queue:job(id)
  check_q("q:job", self)
  check_id("q:job", id)
  local row = acquire(self, "q:job"):get(id)
  return row and job_of(self, row)
end

local LIST_KEYS = { status = true, queue = true, target = true, limit = true, before = true }

--- Jobs, newest first: filter by status, queue and target; limit (default
--- 100); before = id for the next page.
function Queue:list(f)
  check_q("q:list", self)
  if f ~= nil and type(f) ~= "table" then arg_error("q:list", 1, "table or nil", f) end
  f = f or {}
  check.known("q:list", f, LIST_KEYS)
  if f.status ~= nil and not job.is_status[f.status] then
    opt_error("q:list", "status", check.choices(job.is_status), f.status)
  end
  if f.queue ~= nil and type(f.queue) ~= "string" then opt_error("q:list", "queue", "string", f.queue) end
  if f.target ~= nil and type(f.target) ~= "string" then opt_error("q:list", "target", "string", f.target) end
  if f.limit ~= nil and not check.is_count(f.limit, 1) then opt_error("q:list", "limit", "integer >= 1", f.limit) end
  if f.before ~= nil and not check.is_count(f.before, 1) then opt_error("q:list", "before", "job id", f.before) end
  local rows = acquire(self, "q:list"):list{ status = f.status, queue = f.queue, target = f.target,
                                             limit = f.limit or 100, before = f.before }
  for i, row in ipairs(rows) do rows[i] = job_of(self, row) end
  return rows
end

-- ===== changing jobs by hand

--- Applies op to job id; true, or nil and why not ("job 7 not found",
--- "job 7 is completed").
local function change(q, fname, op, id, err)
  check_q(fname, q)
  check_id(fname, id)
  local store = acquire(q, fname)
  if store:change(op, id, wallclock(), err) then
    if op == "retry_now" then
      local row = store:get(id)
      if row and q._owner then q._touched[row.queue] = true
      elseif row then notify(q, { [row.queue] = true }) end
    end
    return true
  end
  local row = store:get(id)
  if not row then return nil, ("job %d not found"):format(id) end
  return nil, ("job %d is %s"):format(id, row.status)
end

--- Makes a job run again now (from any status but executing and available).
function Queue:retry(id) return change(self, "q:retry", "retry_now", id) end
--- Cancels a job that has not finished; a running attempt is stopped at the worker's next heartbeat.
function Queue:cancel(id) return change(self, "q:cancel", "cancel", id) end
--- Marks a job expired: it must no longer run.
function Queue:expire(id) return change(self, "q:expire", "expire", id) end

--- Fails a job for good (discarded), recording `reason`.
function Queue:fail(id, reason)
  if reason ~= nil and type(reason) ~= "string" then arg_error("q:fail", 2, "string or nil", reason) end
  local entry = json.encode{ at = wallclock(), error = reason or "failed by hand" }
  return change(self, "q:fail", "fail", id, entry)
end

--- Counts: { total =, <status> = n, queues = { [name] = { <status> = n } } }.
function Queue:stats()
  check_q("q:stats", self)
  local by_queue = acquire(self, "q:stats"):stats()
  local out = { total = 0, queues = by_queue }
  for _, status in ipairs(job.STATUSES) do out[status] = 0 end
  for _, counts in pairs(by_queue) do
    for status, n in pairs(counts) do
      out[status] = (out[status] or 0) + n
      out.total = out.total + n
    end
  end
  return out
end

--- Counts of the waiting and executing jobs only: { [queue] = { [status] = n } }.
--- Read through the partial indexes, so the cost follows the backlog and
--- not the table (finished jobs are never scanned): cheap enough to sample.
function Queue:backlog()
  check_q("q:backlog", self)
  return acquire(self, "q:backlog"):backlog()
end

--- Over the newest `limit` jobs (by id; default 10000, a bounded read):
--- { [queue] = { [status] = { n =, recent = } } }, `recent` counting jobs
--- that finished within the last `within` ms (default 60000); and true when
--- the store holds more jobs than were read.
function Queue:recent(limit, within)
  check_q("q:recent", self)
  if limit ~= nil and not check.is_count(limit, 1) then arg_error("q:recent", 1, "integer >= 1", limit) end
  if within ~= nil and not check.is_ms(within) then arg_error("q:recent", 2, "non-negative number of ms", within) end
  limit = limit or 10000
  local rows = acquire(self, "q:recent"):recent(wallclock() - (within or 60000), limit)
  local out, total = {}, 0
  for _, r in ipairs(rows) do
    local qt = out[r.queue]
    if not qt then qt = {}; out[r.queue] = qt end
    qt[r.status] = { n = r.n, recent = r.recent or 0 }
    total = total + r.n
  end
  return out, total >= limit
end

--- Who holds leases now: a list of { owner, queue, n, lease_expires,
--- attempted_at } (times in UTC seconds), one per worker and queue.
function Queue:leases()
  check_q("q:leases", self)
  local rows = acquire(self, "q:leases"):leases()
  for _, r in ipairs(rows) do
    r.lease_expires, r.attempted_at = seconds(r.lease_expires), seconds(r.attempted_at)
  end
  return rows
end

local PRUNE_KEYS = { older_than = true, statuses = true }

--- Deletes finished jobs (completed, discarded, cancelled, expired: or the
--- `statuses` given) that finished more than older_than ago (ms, or "7d").
--- Returns how many were deleted.
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
    if st ~= "completed" and st ~= "discarded" and st ~= "cancelled" and st ~= "expired" then
      opt_error("q:prune", "statuses[" .. i .. "]", "'completed', 'discarded', 'cancelled' or 'expired'", st)
    end
  end
  return acquire(self, "q:prune"):prune(wallclock() - ms, statuses)
end

--- Closes the store (idempotent).
function Queue:close()
  if self._store then self._store:close(); self._store = nil end
end

-- ===== for tide.worker

function M.is_queue(v) return getmetatable(v) == Queue_mt end
function M.is_open(q) return q._store ~= nil end
--- True while a task holds the store inside a transaction.
function M.in_transaction(q) return q._owner ~= false end
--- A store for a worker's own statements: a connection of its own where
--- the store has them (PostgreSQL), else the queue's (SQLite).
function M.worker_store(q) return q._store:worker_store() end
--- True when `store` is the queue's own (shared with its transactions).
function M.shares_store(q, store) return store == q._store end

--- fn(queue_name) runs after a commit that made a job of that queue due.
function M.listen(q, fn) q._listeners[#q._listeners + 1] = fn end
function M.unlisten(q, fn)
  for i, f in ipairs(q._listeners) do
    if f == fn then table.remove(q._listeners, i); return end
  end
end


return M
