--- tide.jobs.store.sqlite — the job store on SQLite (the embedded default).
--
-- A store driver is the one place that knows SQL.  tide.queue and
-- tide.worker call only these methods, so another engine is another file
-- with the same methods:
--
--   store:acquire(fname[, timeout]) -> session   store:release(session, broken)
--   store:worker_store([purpose])   store:stats_pool()   store:close()   store.name, .durability
--
--   session:begin() :commit() :rollback()      a write transaction (IMMEDIATE)
--   session:savepoint(n) :release(n) :rollback_to(n)   nested transactions
--   session:exec(sql, ...) -> changes   session:query(sql, ...) -> rows   (user SQL)
--   session:insert(job) -> id, inserted  (false: the idempotence key existed,
--                          or a job with its unique key inside the period)
--   session:insert_many(jobs) -> ids, inserted flags (one transaction is the caller's)
--                          (a job with lease_owner and lease_expires, and no keys,
--                          goes in executing, attempt 1, leased to that worker)
--   session:claim(queue, n, owner, now, lease_until) -> rows, marked executing,
--                          and true when the queue has limits (tide_queues)
--   session:declare(limits)  :queue_limits(name)   the limits of a queue (q:declare)
--   store:listen(fn)  :unlisten(fn)   fn(queue or nil) when another connection
--                          (process, machine) may have made a job due
--   session:record(entries, owner, now) -> { [id] = true } of the entries written
--   session:heartbeat(owner, until, ids) -> { id = true } of those still leased
--   session:rescue(now) -> count of expired leases made available (or discarded)
--   session:get(id)  :list(filter)  :change(op, id, now, err)  :states(ids)
--   session:stats()  :backlog()  :recent(since, limit)  :leases()
--   session:prune(before, statuses)  :pending(queues, now)
--
-- Times are integers: UTC milliseconds since the Unix epoch.  SQLite runs
-- in this process: a statement never waits for the network.  It may wait
-- for another process's write lock, and never on the loop thread: the
-- connection's own busy timeout is 0, and a statement that finds the
-- database locked is tried again from a timer (1, 2, 4 ... 50 ms apart)
-- while the task that runs it waits and the loop goes on, for at most
-- busy_timeout ms (default 5000).  Code outside tasks, with the loop not
-- running (a plain script), has nobody to let run: it waits in SQLite.
local core = require "tide.core"
local common = require "tide.jobs.store.common"
local job = require "tide.jobs.job"
local pool = require "tide.jobs.store.pool"
local S = require "tide.engine.sched"
local schema = require "tide.jobs.store.sqlite_schema"
local many = require "tide.jobs.store.sqlite_many"

local type, error, ipairs, pairs, tostring, pcall = type, error, ipairs, pairs, tostring, pcall
local concat, min, format = table.concat, math.min, string.format
local setmetatable = setmetatable

local M = {}

M.VERSION, M.MIGRATIONS = schema.VERSION, schema.MIGRATIONS

local Store = {}
Store.__index = Store
local Session = {}
Session.__index = Session
Session.dialect = "sqlite"

-- ===== statements (the tables and their indexes: tide.jobs.store.sqlite_schema)

-- (WAITING is the predicate of the tide_jobs_due index, written the same
-- way, so that SQLite sees that a claim can use the index.)
local WAITING = common.any_of(job.WAITING)
local NOT_TERMINAL = common.none_of(job.FINISHED)
-- A job stopping: cancelled, expired or failed by hand while it ran, and
-- still leased to its worker until the worker has stopped it (the
-- predicate of tide_jobs_stopping).  It holds its slot until then: its
-- queue's and key's limits count it as running.
local STOPPING = common.STOPPING
local GUARD = "WHERE id = ?1 AND status = 'executing' AND lease_owner = ?2 AND attempt = ?3"
-- A job's errors so far, as a JSON array to append to.  The column is
-- text: one written by hand as something else than a JSON array made
-- json_insert fail the whole statement, and with it the outcomes of every
-- job recorded beside that one (they stayed executing, the batch retried
-- for ever).  Such text is kept, as the list's first entry.
local ERRORS = "(CASE WHEN errors IS NULL THEN '[]' WHEN NOT json_valid(errors) THEN json_array(errors) "
  .. "WHEN json_type(errors) = 'array' THEN errors ELSE json_array(json(errors)) END)"
local ADD_ERROR = "json_insert(" .. ERRORS .. ", '$[#]', json(?5))"

-- A queue with limits claims nothing through the plain claim (so that a
-- worker that has not yet heard of the limits cannot break them).
local HAS_LIMITS = "(SELECT 1 FROM tide_queues WHERE name = ?4 AND (concurrency IS NOT NULL "
  .. "OR key_concurrency IS NOT NULL OR rate_limit IS NOT NULL))"

-- A job tried before (a retry, a release) waits until its last start has
-- left its key's rate window: a claim overwrites attempted_at, and the
-- rate counts starts by it (a retry 40 ms after its first start took that
-- start out of the count, and a fourth job of "3/s" ran in the second).
local RATE_LEFT = "coalesce(attempted_at <= ?1 - (SELECT rate_period FROM tide_queues WHERE name = ?4 "
  .. "AND rate_limit IS NOT NULL), 1)"

local SQL = {
  -- Two inserts: a job without a key needs neither the upsert nor RETURNING,
  -- which together halve SQLite's insert rate.
  insert = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at, partition_key)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10, ?11)]],
  insert_key = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at, partition_key)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
    ON CONFLICT (idempotence_key) WHERE idempotence_key IS NOT NULL DO NOTHING
    RETURNING id]],
  -- A job leased at once to the worker inserting it (a durable flow's
  -- released step, started after the commit): one write, no claim.
  insert_leased = [[INSERT INTO tide_jobs (queue, target, method, args, status, priority, max_attempts, run_at,
      inserted_at, attempt, attempted_at, lease_owner, lease_expires)
    VALUES (?1, ?2, ?3, ?4, 'executing', ?5, ?6, ?7, ?8, 1, ?8, ?9, ?10)]],
  by_key = "SELECT id FROM tide_jobs WHERE idempotence_key = ?1",
  -- A run_at that is not an integer (a row written by hand) never compares
  -- as due: such rows are claimed too, so that the worker fails them with
  -- the reason, instead of leaving them waiting for ever.
  claim = [[UPDATE tide_jobs SET status = 'executing', attempt = attempt + 1, attempted_at = ?1,
      lease_owner = ?2, lease_expires = ?3
    WHERE id IN (SELECT id FROM tide_jobs WHERE queue = ?4 AND ]] .. WAITING .. [[
      AND (run_at <= ?1 OR typeof(run_at) <> 'integer') AND NOT EXISTS ]] .. HAS_LIMITS .. [[
      ORDER BY priority, run_at, id LIMIT ?5)
    RETURNING id, queue, target, method, args, args_enc, priority, attempt, max_attempts,
      run_at, inserted_at, idempotence_key, partition_key]],
  -- With limits (q:declare), read from tide_queues by the statement itself,
  -- so every worker obeys the same ones at the same instant.  `keys` walks
  -- the keys that have waiting jobs (one index seek per key, whatever the
  -- backlog); `cand` takes the first ?6 due jobs of each (RATE_LEFT; ?6: the most a
  -- key could be given, min of the claim and its limits), and the first
  -- ?5 due jobs without a key; they are ranked within their key, and a key
  -- keeps only as many as its free slots (key_concurrency less those
  -- executing) and what is left of its rate (rate_limit less those started
  -- in the window); the queue as many as its global concurrency leaves.
  -- Keys past their limits are skipped, not waited for: the others' jobs
  -- are claimed in the same statement.  SQLite runs one writer at a time,
  -- so the counts cannot go stale before the UPDATE is done.
  claim_limited = [[UPDATE tide_jobs SET status = 'executing', attempt = attempt + 1, attempted_at = ?1,
      lease_owner = ?2, lease_expires = ?3
    WHERE id IN (
      WITH RECURSIVE keys(k) AS (
          SELECT (SELECT min(partition_key) FROM tide_jobs WHERE queue = ?4 AND ]] .. WAITING .. [[
                    AND partition_key IS NOT NULL)
          UNION ALL
          SELECT (SELECT min(partition_key) FROM tide_jobs WHERE queue = ?4 AND ]] .. WAITING .. [[
                    AND partition_key > keys.k)
          FROM keys WHERE keys.k IS NOT NULL),
        cand AS (
          SELECT j.id, j.partition_key, j.priority, j.run_at FROM keys, tide_jobs j
          WHERE keys.k IS NOT NULL AND j.id IN (SELECT id FROM tide_jobs
            WHERE queue = ?4 AND partition_key = keys.k AND ]] .. WAITING .. [[
              AND (run_at <= ?1 OR typeof(run_at) <> 'integer') AND ]] .. RATE_LEFT .. [[
              ORDER BY priority, run_at, id LIMIT ?6)
          UNION ALL
          SELECT * FROM (SELECT id, partition_key, priority, run_at FROM tide_jobs
            WHERE queue = ?4 AND partition_key IS NULL AND ]] .. WAITING .. [[
              AND (run_at <= ?1 OR typeof(run_at) <> 'integer') ORDER BY priority, run_at, id LIMIT ?5)),
        ranked AS (SELECT id, partition_key, priority, run_at,
            row_number() OVER (PARTITION BY partition_key ORDER BY priority, run_at, id) AS rk FROM cand),
        busy AS (SELECT partition_key, count(*) AS n FROM (
            SELECT partition_key FROM tide_jobs
            WHERE status = 'executing' AND queue = ?4 AND partition_key IS NOT NULL
            UNION ALL
            SELECT partition_key FROM tide_jobs
            WHERE ]] .. STOPPING .. [[ AND queue = ?4 AND partition_key IS NOT NULL) GROUP BY partition_key),
        recent AS (SELECT partition_key, count(*) AS n FROM tide_jobs
          WHERE queue = ?4 AND partition_key IS NOT NULL
            AND attempted_at > ?1 - (SELECT rate_period FROM tide_queues WHERE name = ?4) GROUP BY partition_key)
      SELECT c.id FROM ranked c
        LEFT JOIN busy b ON b.partition_key = c.partition_key
        LEFT JOIN recent r ON r.partition_key = c.partition_key
        LEFT JOIN tide_queues l ON l.name = ?4
      WHERE c.partition_key IS NULL OR (
        (l.key_concurrency IS NULL OR c.rk <= l.key_concurrency - coalesce(b.n, 0))
        AND (l.rate_limit IS NULL OR c.rk <= l.rate_limit - coalesce(r.n, 0)))
      ORDER BY c.priority, c.run_at, c.id
      LIMIT max(0, min(?5, coalesce((SELECT concurrency FROM tide_queues WHERE name = ?4)
        - (SELECT count(*) FROM tide_jobs WHERE status = 'executing' AND queue = ?4)
        - (SELECT count(*) FROM tide_jobs WHERE ]] .. STOPPING .. [[ AND queue = ?4), ?5))))
    RETURNING id, queue, target, method, args, args_enc, priority, attempt, max_attempts,
      run_at, inserted_at, idempotence_key, partition_key]],
  -- The oldest start of a keyed job in the rate's window (?2: now less the
  -- window): no key's window reopens before it leaves the window.
  rate_oldest = [[SELECT min(attempted_at) AS at FROM tide_jobs
    WHERE queue = ?1 AND partition_key IS NOT NULL AND attempted_at > ?2]],
  limits = "SELECT * FROM tide_queues WHERE name = ?1",
  declare = [[INSERT INTO tide_queues (name, concurrency, partition, key_concurrency, rate_limit, rate_period,
      updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (name) DO UPDATE SET concurrency = ?2, partition = ?3, key_concurrency = ?4, rate_limit = ?5,
      rate_period = ?6, updated_at = ?7]],
  completed = "UPDATE tide_jobs SET status = 'completed', completed_at = ?4, lease_owner = NULL, "
    .. "lease_expires = NULL " .. GUARD,
  retry = "UPDATE tide_jobs SET status = 'retryable', run_at = ?4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  discard = "UPDATE tide_jobs SET status = 'discarded', completed_at = ?4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  release = "UPDATE tide_jobs SET status = 'available', attempt = attempt - 1, run_at = ?4, "
    .. "errors = CASE WHEN ?5 IS NULL THEN errors ELSE " .. ADD_ERROR .. " END, "
    .. "lease_owner = NULL, lease_expires = NULL " .. GUARD,
  heartbeat = "UPDATE tide_jobs SET lease_expires = ?2 WHERE id IN (SELECT value FROM json_each(?3)) "
    .. "AND lease_owner = ?1 AND status = 'executing' RETURNING id",
  rescue = [[UPDATE tide_jobs SET
      status = CASE WHEN attempt >= max_attempts THEN 'discarded' ELSE 'available' END,
      completed_at = CASE WHEN attempt >= max_attempts THEN ?1 END,
      run_at = ?1, lease_owner = NULL, lease_expires = NULL,
      errors = json_insert(]] .. ERRORS .. [[, '$[#]', json_object('attempt', attempt,
        'at', ?1, 'error', 'lease expired: worker ' || lease_owner || ' stopped heartbeating'))
    WHERE status = 'executing' AND lease_expires < ?1
    RETURNING id, status, queue, target, method, attempt, max_attempts, priority, run_at, inserted_at,
      idempotence_key]],
  get = "SELECT * FROM tide_jobs WHERE id = ?1",
  states = "SELECT id, status, lease_owner, attempt FROM tide_jobs WHERE id IN (SELECT value FROM json_each(?1))",
  -- (A running job keeps its lease: see STOPPING.)
  cancel = "UPDATE tide_jobs SET status = 'cancelled', completed_at = ?2 WHERE id = ?1 AND " .. NOT_TERMINAL,
  expire = "UPDATE tide_jobs SET status = 'expired', completed_at = ?2 WHERE id = ?1 AND " .. NOT_TERMINAL,
  fail = "UPDATE tide_jobs SET status = 'discarded', completed_at = ?2, "
    .. "errors = json_insert(" .. ERRORS .. ", '$[#]', json(?3)) WHERE id = ?1 AND " .. NOT_TERMINAL,
  -- The leases of jobs among ?2 ([[id, attempt], ...]) that this worker
  -- (?1) has stopped, at that attempt: a later attempt of the same job
  -- (rescued once the stopped one's lease ran out, retried, claimed again
  -- by this worker) keeps its own.
  unlease = "UPDATE tide_jobs SET lease_owner = NULL, lease_expires = NULL "
    .. "WHERE (id, attempt) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
    .. "FROM json_each(?2)) AND lease_owner = ?1 AND status <> 'executing'",
  -- Leases of stopping jobs whose worker died before it stopped them.
  rescue_stopping = "UPDATE tide_jobs SET lease_owner = NULL, lease_expires = NULL WHERE " .. STOPPING
    .. " AND lease_expires < ?1",
  retry_now = "UPDATE tide_jobs SET status = 'available', run_at = ?2, completed_at = NULL, "
    .. "max_attempts = max(max_attempts, attempt + 1) "
    .. "WHERE id = ?1 AND status <> 'executing' AND status <> 'available' AND lease_owner IS NULL",
  stats = "SELECT queue, status, count(*) AS n FROM tide_jobs GROUP BY queue, status",
  -- Through the partial indexes only: the cost follows the backlog, not the table.
  backlog = "SELECT queue, status, count(*) AS n FROM tide_jobs WHERE " .. WAITING .. " GROUP BY queue, status",
  backlog_executing = "SELECT queue, 'executing' AS status, count(*) AS n FROM tide_jobs "
    .. "WHERE status = 'executing' GROUP BY queue",
  -- The newest ?2 jobs by id (the primary key): a bounded read however big the table.
  recent = "SELECT queue, status, count(*) AS n, sum(CASE WHEN completed_at >= ?1 THEN 1 ELSE 0 END) AS recent "
    .. "FROM (SELECT queue, status, completed_at FROM tide_jobs ORDER BY id DESC LIMIT ?2) GROUP BY queue, status",
  -- n: the jobs running; stopping: those cancelled, expired or failed by
  -- hand that their worker has not yet stopped (STOPPING): leases too.
  -- Each half through its partial index.
  leases = "SELECT owner, queue, sum(n) AS n, sum(stopping) AS stopping, max(lease_expires) AS lease_expires, "
    .. "max(attempted_at) AS attempted_at FROM ("
    .. "SELECT lease_owner AS owner, queue, 1 AS n, 0 AS stopping, lease_expires, attempted_at FROM tide_jobs "
    .. "WHERE status = 'executing' UNION ALL "
    .. "SELECT lease_owner, queue, 0, 1, lease_expires, attempted_at FROM tide_jobs WHERE " .. STOPPING
    .. ") l GROUP BY owner, queue",
  -- Two counts, each through a partial index (one query with an OR of both
  -- scans the whole table: 166 ms at a million finished jobs).
  pending_due = "SELECT count(*) AS n FROM tide_jobs WHERE queue = ?1 AND " .. WAITING .. " AND run_at <= ?2",
  pending_executing = "SELECT count(*) AS n FROM tide_jobs WHERE status = 'executing' AND queue = ?1",
  schedule_register = [[INSERT INTO tide_schedules (name, cron, timezone, target, method, queue, seen_at, seen_by)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
    ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
      target = excluded.target, method = excluded.method, queue = excluded.queue,
      seen_at = excluded.seen_at, seen_by = excluded.seen_by
    RETURNING last_tick]],
  schedule_advance = [[UPDATE tide_schedules SET last_tick = CASE WHEN last_tick IS NULL OR last_tick < ?2
      THEN ?2 ELSE last_tick END, seen_at = ?3, seen_by = ?4 WHERE name = ?1]],
  schedules = "SELECT * FROM tide_schedules ORDER BY name",
}

M.SQL = SQL                                  -- (for EXPLAIN in benchmarks and specs)

-- ===== waiting for another process's lock, never on the loop thread

local BUSY_FIRST, BUSY_MAX = 1, 50          -- ms between tries: doubling up to this

local function is_busy(err) return type(err) == "string" and err:find("(SQLITE_BUSY)", 1, true) ~= nil end

--- Says what a READONLY error means: SQLite writes PATH-wal and PATH-shm
--- beside the database, so a directory it cannot create files in makes
--- even a writable file read-only.
local function explain(s, err)
  if type(err) ~= "string" or not err:find("(SQLITE_READONLY", 1, true) then return err end
  local dir = s.path:match("^(.*)/[^/]*$") or "."
  local probe = ("%s/.tide-probe-%d"):format(dir, core.pid())
  local fh = io.open(probe, "w")
  if fh then
    fh:close()
    os.remove(probe)
    return err .. " (the file itself, or its -wal or -shm file, cannot be written: check their permissions)"
  end
  return err .. (" (the directory %s is not writable: SQLite needs to create %s-wal and %s-shm there; "
    .. "make the directory writable, or create them while it is)"):format(dir, s.path, s.path)
end

--- Raises `err`, a statement's failure; inside the caller's transaction it
--- aborts that transaction first.
local function failed(s, err)
  if s.in_tx and not s.aborted then                          -- (tide.jobs.store.common: as on PostgreSQL)
    -- (some failures roll the whole transaction back: an OR ROLLBACK
    -- conflict, RAISE(ROLLBACK) in a trigger, a full disk; no savepoint
    -- is left to go back to: see Session:rollback_to)
    if s.db and not s.db:in_transaction() then err = err .. " (SQLite rolled the whole transaction back)" end
    s.aborted = err
  end
  error(err, 0)
end

--- Runs fn(...) (statements on s); a "database is locked" is tried again as
--- the header says.  Returns fn's first three results.
local function locked(s, fn, ...)
  if not s.db then error(s.name .. ": the store is closed", 0) end
  if s.aborted then error(common.aborted(s.name, s.aborted), 0) end
  local ok, a, b, c = pcall(fn, ...)
  if ok then return a, b, c end
  if not is_busy(a) then failed(s, explain(s, a)) end
  local waited, delay = 0, BUSY_FIRST
  while true do
    if S.in_task() then
      if waited >= s.busy_timeout then
        failed(s, ("%s (waited %d ms for another connection's lock)"):format(a, waited))
      end
      S.sleep(delay)
      waited, delay = waited + delay, min(delay * 2, BUSY_MAX)
      ok, a, b, c = pcall(fn, ...)
    elseif not core.running() then          -- a plain script: nothing else would run meanwhile
      s.db:busy_timeout(s.busy_timeout)
      ok, a, b, c = pcall(fn, ...)
      s.db:busy_timeout(0)
      if not ok and is_busy(a) then failed(s, ("%s (waited %d ms for another connection's lock)")
        :format(a, s.busy_timeout)) end
    else
      failed(s, a .. " (called outside a task while the loop runs, where it cannot wait for the lock: "
             .. "call it from a task)")
    end
    if ok then return a, b, c end
    if not is_busy(a) then failed(s, explain(s, a)) end
  end
end

-- ===== opening


local SYNC = { normal = "NORMAL", full = "FULL", off = "OFF" }

--- Opens (creating or migrating) the job tables in the SQLite file `path`.
--- `name` ("sqlite:jobs.db") starts every error message.  Raises on failure.
function M.open(path, name, opts)
  local db, err = core.sqlite_open(path, name, 0)
  if not db then error(err, 0) end
  local s = setmetatable({ db = db, name = name, path = path, stmts = {}, user = {}, nuser = 0,
                           in_tx = false, aborted = false, busy_timeout = opts.busy_timeout or 5000 }, Session)
  local ok, e = pcall(locked, s, function()
    db:exec("PRAGMA journal_mode = WAL")
    db:exec("PRAGMA synchronous = " .. SYNC[opts.synchronous or "normal"])
    schema.migrate(s.db, s.name)
  end)
  if not ok then db:close(); error(e, 0) end
  local store = setmetatable({ name = name, session = s, sync = true, listeners = {}, events = 0, wakes = 0,
                               durability = "WAL, synchronous=" .. SYNC[opts.synchronous or "normal"] }, Store)
  store.pool = pool.new{ name = name, size = 1, timeout = opts.pool_timeout or 5000,
                         open = function() return s end,
                         reset = function(c) pcall(c.rollback, c) end,
                         close = function(c) c:close() end }
  return store
end

-- ===== the store: one connection, held by one task at a time

--- The store's time now, in UTC ms: this machine's, as every process that
--- opens the file runs on it.  (PostgreSQL's store tells the server's.)
function Store:now() return core.wallclock() end
function Session:now() return core.wallclock() end

function Store:acquire(fname, timeout) return self.pool:acquire(fname, timeout) end
function Store:release(session, broken, holder) return self.pool:release(session, broken, holder) end
function Store:available() return self.pool:available() end
function Store:stats_pool() return self.pool:stats() end

--- The store a worker uses: this one, through the same pool (a second
--- connection to the same file would only wait for this one's write lock).
function Store:worker_store() return self end

-- ===== hearing other processes' commits: tide.jobs.store.sqlite_wake
-- (watch_wal, listen, unlisten, wake_stats)
require("tide.jobs.store.sqlite_wake").install(Store)

--- Closes the connection now, or when its holder gives it back (the
--- pool closes it then): a transaction under way ends first.
function Store:close()
  if not self.session then return end
  self:unlisten()
  self.pool:close()
  if not self.pool.all[self.session] then self.session:close() end   -- not held (or never handed out)
  self.session = nil
end

--- The prepared statement for one of the SQL above (prepared on first use).
local function stmt(s, key)
  local st = s.stmts[key]
  if not st then st = s.db:prepare(SQL[key]); s.stmts[key] = st end
  return st
end

--- Rolls back what is open, finalizes the statements and closes (idempotent).
--- (A statement left unfinalized keeps the connection, and a transaction
--- with it, alive until the collector finds it: the write lock with it.)
function Session:close()
  if not self.db then return end
  if self.db:in_transaction() then pcall(self.db.exec, self.db, "ROLLBACK") end
  for _, st in pairs(self.stmts) do st:finalize() end
  for _, st in pairs(self.user) do st:finalize() end
  self.db:close()
  self.db = nil
end

-- ===== transactions

local function exec(db, sql) return db:exec(sql) end

-- A failed statement aborts the transaction, as on PostgreSQL (see
-- tide.jobs.store.common): SQLite itself undoes the statement alone and
-- goes on, which committed the rest of what the caller had meant whole.
function Session:begin()
  locked(self, exec, self.db, "BEGIN IMMEDIATE")
  self.in_tx, self.aborted = true, false
end
function Session:commit()
  if self.aborted then error(common.rolled_back(self.name, self.aborted), 0) end
  locked(self, exec, self.db, "COMMIT")
  self.in_tx = false
end
function Session:rollback()
  self.in_tx, self.aborted = false, false
  if self.db and self.db:in_transaction() then self.db:exec("ROLLBACK") end
end
function Session:failed() return self.aborted end
local function refuse_aborted(s) if s.aborted then error(common.aborted(s.name, s.aborted), 0) end end
function Session:savepoint(n) refuse_aborted(self); self.db:exec("SAVEPOINT tide_" .. n) end
function Session:release(n) refuse_aborted(self); self.db:exec("RELEASE tide_" .. n) end
function Session:rollback_to(n)
  if self.in_tx and not self.db:in_transaction() then
    -- SQLite rolled the whole transaction back (see failed): what follows
    -- would run outside any transaction, each statement committed at once.
    self.aborted = self.aborted or "SQLite rolled the whole transaction back"
    error(common.aborted(self.name, self.aborted), 0)
  end
  self.aborted = false                        -- (the savepoint precedes any failure: it could not be made after)
  self.db:exec("ROLLBACK TO tide_" .. n .. "; RELEASE tide_" .. n)
end

-- ===== the caller's own SQL (statements cached by text, at most USER_MAX)

local USER_MAX = 100

local function user_stmt(s, sql)
  local st = s.user[sql]
  if st then return st end
  if s.nuser >= USER_MAX then
    for _, old in pairs(s.user) do old:finalize() end
    s.user, s.nuser = {}, 0
  end
  st = s.db:prepare(sql)
  s.user[sql], s.nuser = st, s.nuser + 1
  return st
end

--- The caller's statement, given at least the parameters it takes: SQLite
--- bound the missing ones as NULL, where PostgreSQL refuses the statement
--- ("bind message supplies 1 parameters, but prepared statement requires
--- 2"), so the same tx:exec wrote a NULL on one store and failed on the other.
local function user_checked(s, sql, n)
  local st = user_stmt(s, sql)
  local want = st:params()
  if n < want then
    error(("%s: %d parameter%s given, the statement takes %d"):format(s.name, n, n == 1 and "" or "s",
          want), 0)
  end
  return st
end

local function user_run(s, sql, ...) return user_checked(s, sql, select("#", ...)):run(...) end
local function user_rows(s, sql, ...) return user_checked(s, sql, select("#", ...)):rows(...) end

function Session:exec(sql, ...) return (locked(self, user_run, self, sql, ...)) end
function Session:query(sql, ...) return (locked(self, user_rows, self, sql, ...)) end

-- ===== jobs

--- job: queue, target, method, args (JSON text) or args_enc, status,
--- priority, max_attempts, run_at, idempotence_key, inserted_at.
--- The statements of a unique insert for one set of states (cached by it).
local function unique_stmts(s, states)
  local key = "unique:" .. concat(states, ",")
  local pair = s.stmts[key]
  if pair then return pair end
  local match = common.unique_match(states)
  pair = {
    -- One statement: SQLite takes the write lock before it reads, so no
    -- other connection can insert the duplicate in between.
    insert = s.db:prepare([[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
        max_attempts, run_at, inserted_at, partition_key, unique_key)
      SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12
      WHERE NOT EXISTS (SELECT 1 FROM tide_jobs WHERE unique_key = ?12 AND inserted_at > ?10 - ?13
                        AND ]] .. match .. [[)
      RETURNING id]]),
    existing = s.db:prepare("SELECT id FROM tide_jobs WHERE unique_key = ?1 AND inserted_at > ?2 - ?3 "
      .. "AND " .. match .. " ORDER BY id DESC LIMIT 1"),
    finalize = function(self) self.insert:finalize(); self.existing:finalize() end,
  }
  s.stmts[key] = pair
  return pair
end

--- A job with a unique key: inserted unless a job with that key, in one of
--- the states, was inserted within the period; then that job's id, false.
local function insert_unique(s, j)
  local st = unique_stmts(s, j.unique_states)
  local db = s.db
  local own = not db:in_transaction()
  if own then db:exec("BEGIN IMMEDIATE") end   -- the look-up sees the same table as the insert
  local ok, id, inserted = pcall(function()
    local row = st.insert:first(j.queue, j.target, j.method, j.args, j.args_enc, j.status, j.priority,
      j.max_attempts, j.run_at, j.inserted_at, j.partition_key, j.unique_key, j.unique_period)
    if row then return row.id, true end
    return st.existing:first(j.unique_key, j.inserted_at, j.unique_period).id, false
  end)
  if not ok then
    if own then pcall(db.exec, db, "ROLLBACK") end
    error(id, 0)
  end
  if own then db:exec("COMMIT") end
  return id, inserted
end

--- The id of the row the last INSERT put in; an error when it put in none
--- (a user's trigger that ignored it: last_id would name an older row).
local function inserted_id(s)
  if s.db:changes() ~= 1 then error("tide_jobs: the job's row did not go in (a trigger ignored it?)", 0) end
  return s.db:last_id(), true
end

local function insert(s, j)
  if j.lease_owner ~= nil then
    stmt(s, "insert_leased"):run(j.queue, j.target, j.method, j.args, j.priority, j.max_attempts, j.run_at,
      j.inserted_at, j.lease_owner, j.lease_expires)
    return inserted_id(s)
  end
  if j.unique_key ~= nil then return insert_unique(s, j) end
  if j.idempotence_key == nil then
    stmt(s, "insert"):run(j.queue, j.target, j.method, j.args, j.args_enc, j.status,
      j.priority, j.max_attempts, j.run_at, j.inserted_at, j.partition_key)
    return inserted_id(s)
  end
  local row = stmt(s, "insert_key"):first(j.queue, j.target, j.method, j.args, j.args_enc, j.status,
    j.priority, j.max_attempts, j.run_at, j.idempotence_key, j.inserted_at, j.partition_key)
  if row then return row.id, true end
  return stmt(s, "by_key"):first(j.idempotence_key).id, false
end

function Session:insert(j) return locked(self, insert, self, j) end

--- Inserts a list (inside the caller's transaction); returns their ids and
--- inserted flags, in order.  Runs of jobs without keys go in many to a
--- statement (tide.jobs.store.sqlite_many); a job with a key, by insert.
function Session:insert_many(list) return many.insert_many(self, list, insert) end

--- The limits of queue `name` (its tide_queues row), or false: read at
--- most once a LIMITS_TTL ms per connection.  Only the choice of statement
--- depends on it: the plain claim takes nothing from a queue with limits,
--- and the limited one reads them itself; so a declaration is obeyed at
--- once, and obeyed by claims within LIMITS_TTL ms.
local LIMITS_TTL = 1000

local function limited(s, name, now_ms)
  local cache = s.limited
  if not cache then cache = {}; s.limited = cache end
  local c = cache[name]
  if c and now_ms - c.at < LIMITS_TTL then return c.row end
  local r = stmt(s, "limits"):first(name)
  if r and not (r.concurrency or r.key_concurrency or r.rate_limit) then r = false end
  cache[name] = { at = now_ms, row = r or false }
  return r or false
end
M.limited = limited

--- The most jobs of one key a claim of n could take (the limits cached).
local function per_key_cap(r, n)
  return min(n, r.key_concurrency or n, r.rate_limit or n)
end

local function claim(s, queue, n, owner, now, lease_until)
  local c = s.limited and s.limited[queue]
  local fresh = c and core.now() - c.at < LIMITS_TTL
  if not (fresh and c.row) then
    local rows = stmt(s, "claim"):rows(now, owner, lease_until, queue, n)
    if #rows > 0 or fresh then return rows, false end
  end
  local r = limited(s, queue, core.now())     -- nothing claimed: because of limits?
  if not r then return {}, false end
  local rows = stmt(s, "claim_limited"):rows(now, owner, lease_until, queue, n, per_key_cap(r, n))
  local reopen
  if #rows < n and r.rate_limit then
    local oldest = stmt(s, "rate_oldest"):first(queue, now - r.rate_period).at
      if oldest then reopen = oldest + r.rate_period - now end
  end
  return rows, true, reopen
end

--- Claims up to n due jobs; returns them (in start order), true when the
--- queue has limits (a worker then claims again after each outcome it
--- writes), and, when a rate may have held jobs back, in how many ms the
--- first of its windows reopens (nothing else would wake the worker then).
function Session:claim(queue, n, owner, now, lease_until)
  local rows, yes, reopen = locked(self, claim, self, queue, n, owner, now, lease_until)
  return common.start_order(rows), yes, reopen
end

local function declare(s, r)
  stmt(s, "declare"):run(r.name, r.concurrency, r.partition, r.key_concurrency, r.rate_limit, r.rate_period,
    r.updated_at)
  if s.limited then s.limited[r.name] = nil end
end

function Session:declare(r) return locked(self, declare, self, r) end
local function queue_limits(s, name) return stmt(s, "limits"):first(name) end
function Session:queue_limits(name) return (locked(self, queue_limits, self, name)) end

local function complete_one(s, e, owner, now, written)
  if stmt(s, "completed"):run(e.id, owner, e.attempt, now) > 0 then written[e.id] = true end
end

--- Each entry: { id, attempt, kind = "completed" | "retry" | "discard" |
--- "release", run_at, error = JSON text or nil }.  Entries whose job is no
--- longer leased to `owner` at that attempt change nothing; returns the set
--- of ids written.  The completions go together (sqlite_many).
local function record(s, entries, owner, now, hooks)
  local db = s.db
  local own = not db:in_transaction()
  if own then db:exec("BEGIN IMMEDIATE") end
  local written = {}
  local ok, err = pcall(function()
    if hooks and hooks.before then hooks.before(s) end
    -- Completions together when no job appears twice (else in order, one by one).
    local done, seen, twice = {}, {}, false
    for i = 1, #entries do
      local e = entries[i]
      if seen[e.id] then twice = true end
      seen[e.id] = true
      if e.kind == "completed" then done[#done + 1] = e end
    end
    if twice then done = {} end
    for i = 1, #entries do
      local e = entries[i]
      local kind = e.kind
      if twice or kind ~= "completed" then
        local at = kind == "completed" and now or kind == "discard" and now or e.run_at or now
        if stmt(s, kind):run(e.id, owner, e.attempt, at, e.error) > 0 then written[e.id] = true end
      end
    end
    many.complete_many(s, done, owner, now, written, complete_one)
    if hooks and hooks.after then hooks.after(s, written) end
  end)
  if not ok then
    if own then db:exec("ROLLBACK") end
    error(err, 0)
  end
  if own then db:exec("COMMIT") end
  return written
end

--- hooks (optional): { before = fn(session), after = fn(session, written) },
--- called inside the same transaction (durable flows release dependents there).
function Session:record(entries, owner, now, hooks) return (locked(self, record, self, entries, owner, now, hooks)) end

local function id_list(ids)
  local list = {}
  for i, id in ipairs(ids) do list[i] = format("%d", id) end
  return "[" .. concat(list, ",") .. "]"
end

local function heartbeat(s, owner, lease_until, ids)
  local set = {}
  for _, id in ipairs(stmt(s, "heartbeat"):column(owner, lease_until, id_list(ids))) do set[id] = true end
  return set
end

function Session:heartbeat(owner, lease_until, ids) return (locked(self, heartbeat, self, owner, lease_until, ids)) end

local function run(s, key, ...) return stmt(s, key):run(...) end
local function first(s, key, ...) return stmt(s, key):first(...) end
local function rows(s, key, ...) return stmt(s, key):rows(...) end

local function attempt_list(stopped)
  local list = {}
  for i, j in ipairs(stopped) do list[i] = format("[%d,%d]", j.id, j.attempt) end
  return "[" .. concat(list, ",") .. "]"
end

--- Gives up the leases of the jobs `stopped` ({ { id, attempt }, ... })
--- that worker `owner` has stopped at that attempt after they were
--- cancelled, expired or failed by hand (STOPPING); returns how many.
function Session:unlease(owner, stopped)
  return (locked(self, run, self, "unlease", owner, attempt_list(stopped)))
end

local function rescue_all(s, now)
  stmt(s, "rescue_stopping"):run(now)
  return stmt(s, "rescue"):rows(now)
end

--- Makes jobs whose lease expired available again, or discarded after their
--- last attempt; returns how many, and the rows of those discarded.  The
--- leases of stopping jobs that expired are given up too (not counted).
function Session:rescue(now)
  local list = locked(self, rescue_all, self, now)
  local dead = {}
  for _, r in ipairs(list) do if r.status == "discarded" then dead[#dead + 1] = r end end
  return #list, dead
end
function Session:get(id) return (locked(self, first, self, "get", id)) end

--- { [id] = { status, lease_owner, attempt } } of the jobs among `ids` that exist.
function Session:states(ids)
  local out = {}
  for _, r in ipairs(locked(self, rows, self, "states", id_list(ids))) do out[r.id] = r end
  return out
end

--- filter: status, queue, limit, before (an id: list older jobs, for paging).
function Session:list(f)
  local where, params = {}, {}
  if f.status then where[#where + 1] = "status = ?"; params[#params + 1] = f.status end
  if f.queue then where[#where + 1] = "queue = ?"; params[#params + 1] = f.queue end
  if f.target then where[#where + 1] = "target = ?"; params[#params + 1] = f.target end
  if f.before then where[#where + 1] = "id < ?"; params[#params + 1] = f.before end
  local sql = "SELECT * FROM tide_jobs" .. (#where > 0 and " WHERE " .. concat(where, " AND ") or "")
    .. " ORDER BY id DESC LIMIT " .. tostring(f.limit)
  return (locked(self, user_rows, self, sql, unpack(params)))
end

--- op: "cancel" | "expire" | "fail" | "retry_now".  true when the job changed.
function Session:change(op, id, now, err)
  return locked(self, run, self, op, id, now, err) > 0
end

--- { [queue] = { [status] = count } }
function Session:stats() return common.group_stats(locked(self, rows, self, "stats")) end

--- Like stats, for the waiting and executing statuses only (partial indexes).
local function backlog(s)
  local r = stmt(s, "backlog"):rows()
  for _, x in ipairs(stmt(s, "backlog_executing"):rows()) do r[#r + 1] = x end
  return r
end
function Session:backlog() return common.group_stats(locked(self, backlog, self)) end

--- Rows { queue, status, n, recent } over the newest `limit` jobs; `recent`
--- counts those that finished at `since` (ms) or later.
function Session:recent(since, limit) return (locked(self, rows, self, "recent", since, limit)) end

--- Rows { owner, queue, n, lease_expires, attempted_at }: who holds leases.
function Session:leases() return (locked(self, rows, self, "leases")) end

function Session:prune(before, statuses)
  return (locked(self, user_run, self, "DELETE FROM tide_jobs WHERE status IN " .. common.status_list(statuses)
    .. " AND completed_at <= ?1 AND lease_owner IS NULL", before))   -- (not a job still stopping)
end

--- How many jobs of `queues` are due or executing (anywhere): 0 means a
--- draining worker is done.
local function pending(s, queues, now)
  local n = 0
  for _, queue in ipairs(queues) do
    n = n + stmt(s, "pending_due"):first(queue, now).n + stmt(s, "pending_executing"):first(queue).n
  end
  return n
end

function Session:pending(queues, now) return (locked(self, pending, self, queues, now)) end

-- ===== changing many jobs (q:retry_all, q:cancel_all)

local BULK_SET = {
  retry_now = "status = 'available', run_at = ?2, completed_at = NULL, max_attempts = max(max_attempts, attempt + 1)",
  cancel = "status = 'cancelled', completed_at = ?2",
  fail = "status = 'discarded', completed_at = ?2, errors = json_insert(" .. ERRORS .. ", '$[#]', json(?8))",
}

--- Applies op ("retry_now", "cancel" or "fail": `err` the error entry,
--- JSON) to the next `limit` jobs after id `after` that match f (status,
--- queue, target, since: ms, since_col) in one statement (its own short
--- write transaction; inside a caller's q:transaction, a statement of
--- that transaction); returns the rows changed:
--- { id, queue }, in id order.
function Session:bulk(op, f, after, limit, now, err)
  local sql = "UPDATE tide_jobs SET " .. BULK_SET[op] .. " WHERE id IN (SELECT id FROM tide_jobs WHERE id > ?1 "
    .. (op == "retry_now" and "AND lease_owner IS NULL " or "")
    .. "AND status = ?3" .. (f.queue and " AND queue = ?4" or "") .. (f.since and (" AND %s >= ?5"):format(f.since_col) or "")
    .. (f.target and " AND target = ?7" or "")
    .. " ORDER BY id LIMIT ?6) RETURNING id, queue"
  local list = locked(self, user_rows, self, sql, after, now, f.status, f.queue, f.since, limit, f.target, err)
  table.sort(list, function(a, b) return a.id < b.id end)
  return list
end

-- ===== schedules (tide.jobs.schedules)

--- Records schedule `s` (name, cron, timezone, target, method, queue) as
--- run by `worker`; returns its latest tick enqueued (ms), or nil for a new one.
function Session:schedule_register(s, now, worker)
  local row = locked(self, first, self, "schedule_register", s.name, s.cron_text, s.timezone, s.target, s.method,
                     s.queue, now, worker)
  return row and row.last_tick or nil
end

--- Notes that the ticks of schedule `name` up to `tick` (ms) are enqueued.
function Session:schedule_advance(name, tick, now, worker)
  locked(self, run, self, "schedule_advance", name, tick, now, worker)
end

--- Every schedule row, by name.
function Session:schedules() return (locked(self, rows, self, "schedules")) end

return M
