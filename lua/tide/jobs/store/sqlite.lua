--- tide.jobs.store.sqlite — the job store on SQLite (the embedded default).
--
-- A store driver is the one place that knows SQL.  tide.queue (the public
-- API) and tide.worker call only the methods below, so another engine is
-- another file with the same methods:
--
--   store:begin() :commit() :rollback()      a write transaction (IMMEDIATE)
--   store:savepoint(n) :release(n) :rollback_to(n)   nested transactions
--   store:exec(sql, ...) -> changes   store:query(sql, ...) -> rows   (user SQL)
--   store:insert(job) -> id, inserted  (false: the idempotence key existed)
--   store:claim(queue, n, owner, now, lease_until) -> rows, marked executing
--   store:record(entries, owner, now)  outcomes of claimed jobs, one transaction
--   store:heartbeat(owner, until, ids) -> { id = true } of those still leased
--   store:rescue(now) -> count of expired leases made available (or discarded)
--   store:get(id)  store:list(filter)  store:change(op, id, now, err)
--   store:stats()  store:prune(before, statuses)  store:pending(queues, now)
--   store:close()
--
-- Times are integers: UTC milliseconds since the Unix epoch.  Every method
-- is synchronous here (SQLite runs in-process); a networked driver may yield.
local core = require "tide.core"
local common = require "tide.jobs.store.common"
local job = require "tide.jobs.job"

local type, error, ipairs, tostring, concat, sort = type, error, ipairs, tostring, table.concat, table.sort

local M = {}

local Store = {}
Store.__index = Store

-- ===== schema and migrations
--
-- tide_schema holds one row: the version of the job tables.  Migration i
-- takes the tables from version i-1 to i; they run in one transaction at
-- open, so a crash mid-way leaves the old version intact.  The user's own
-- tables may live in the same file (that is the point of transactional
-- enqueue), so tide never touches PRAGMA user_version.

local MIGRATIONS = {
  [[
  CREATE TABLE tide_jobs (
    id              INTEGER PRIMARY KEY,
    queue           TEXT    NOT NULL,
    target          TEXT    NOT NULL,
    method          TEXT    NOT NULL,
    args            TEXT,              -- JSON; NULL when encrypted
    args_enc        BLOB,              -- the encryptor's output
    status          TEXT    NOT NULL,
    priority        INTEGER NOT NULL DEFAULT 0,
    attempt         INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    run_at          INTEGER NOT NULL,
    attempted_at    INTEGER,
    completed_at    INTEGER,           -- when it reached a terminal status
    errors          TEXT,              -- JSON array: one entry per failed attempt
    idempotence_key TEXT,
    lease_owner     TEXT,
    lease_expires   INTEGER,
    inserted_at     INTEGER NOT NULL
  );
  CREATE UNIQUE INDEX tide_jobs_key ON tide_jobs (idempotence_key)
    WHERE idempotence_key IS NOT NULL;
  -- Only waiting jobs are in this index: claiming reads it in order, and a
  -- job leaves it when claimed, so it stays as small as the backlog.  (ORs,
  -- not IN: SQLite builds a temporary table for an IN list each time it
  -- tests a row against the index, which made every UPDATE of a status
  -- cost a millisecond.)
  CREATE INDEX tide_jobs_due ON tide_jobs (queue, priority, run_at, id)
    WHERE (status = 'available' OR status = 'scheduled' OR status = 'retryable');
  CREATE INDEX tide_jobs_leased ON tide_jobs (lease_expires) WHERE status = 'executing';
  ]],
}
M.VERSION = #MIGRATIONS

-- (WAITING is the predicate of the tide_jobs_due index, written the same
-- way, so that SQLite sees that a claim can use the index.)
local WAITING = common.any_of(job.WAITING)
local NOT_TERMINAL = common.none_of(job.FINISHED)
local GUARD = "WHERE id = ?1 AND status = 'executing' AND lease_owner = ?2 AND attempt = ?3"
local ADD_ERROR = "json_insert(coalesce(errors, '[]'), '$[#]', json(?5))"

local SQL = {
  -- Two inserts: a job without a key needs neither the upsert nor RETURNING,
  -- which together halve SQLite's insert rate.
  insert = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10)]],
  insert_key = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
    ON CONFLICT (idempotence_key) WHERE idempotence_key IS NOT NULL DO NOTHING
    RETURNING id]],
  by_key = "SELECT id FROM tide_jobs WHERE idempotence_key = ?1",
  claim = [[UPDATE tide_jobs SET status = 'executing', attempt = attempt + 1, attempted_at = ?1,
      lease_owner = ?2, lease_expires = ?3
    WHERE id IN (SELECT id FROM tide_jobs WHERE queue = ?4 AND ]] .. WAITING .. [[
      AND run_at <= ?1 ORDER BY priority, run_at, id LIMIT ?5)
    RETURNING id, queue, target, method, args, args_enc, priority, attempt, max_attempts,
      run_at, inserted_at, idempotence_key]],
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
      errors = json_insert(coalesce(errors, '[]'), '$[#]', json_object('attempt', attempt,
        'at', ?1, 'error', 'lease expired: worker ' || lease_owner || ' stopped heartbeating'))
    WHERE status = 'executing' AND lease_expires < ?1]],
  get = "SELECT * FROM tide_jobs WHERE id = ?1",
  cancel = "UPDATE tide_jobs SET status = 'cancelled', completed_at = ?2, lease_owner = NULL, "
    .. "lease_expires = NULL WHERE id = ?1 AND " .. NOT_TERMINAL,
  expire = "UPDATE tide_jobs SET status = 'expired', completed_at = ?2, lease_owner = NULL, "
    .. "lease_expires = NULL WHERE id = ?1 AND " .. NOT_TERMINAL,
  fail = "UPDATE tide_jobs SET status = 'discarded', completed_at = ?2, lease_owner = NULL, "
    .. "lease_expires = NULL, errors = json_insert(coalesce(errors, '[]'), '$[#]', json(?3)) "
    .. "WHERE id = ?1 AND " .. NOT_TERMINAL,
  retry_now = "UPDATE tide_jobs SET status = 'available', run_at = ?2, completed_at = NULL, "
    .. "max_attempts = max(max_attempts, attempt + 1) "
    .. "WHERE id = ?1 AND status <> 'executing' AND status <> 'available'",
  stats = "SELECT queue, status, count(*) AS n FROM tide_jobs GROUP BY queue, status",
  -- Through the partial indexes only: the cost follows the backlog, not the table.
  backlog = "SELECT queue, status, count(*) AS n FROM tide_jobs WHERE " .. WAITING .. " GROUP BY queue, status",
  backlog_executing = "SELECT queue, 'executing' AS status, count(*) AS n FROM tide_jobs "
    .. "WHERE status = 'executing' GROUP BY queue",
  -- The newest ?2 jobs by id (the primary key): a bounded read however big the table.
  recent = "SELECT queue, status, count(*) AS n, sum(CASE WHEN completed_at >= ?1 THEN 1 ELSE 0 END) AS recent "
    .. "FROM (SELECT queue, status, completed_at FROM tide_jobs ORDER BY id DESC LIMIT ?2) GROUP BY queue, status",
  leases = "SELECT lease_owner AS owner, queue, count(*) AS n, max(lease_expires) AS lease_expires, "
    .. "max(attempted_at) AS attempted_at FROM tide_jobs WHERE status = 'executing' GROUP BY lease_owner, queue",
  -- Two counts, each through a partial index (one query with an OR of both
  -- scans the whole table: 166 ms at a million finished jobs).
  pending_due = "SELECT count(*) AS n FROM tide_jobs WHERE queue = ?1 AND " .. WAITING .. " AND run_at <= ?2",
  pending_executing = "SELECT count(*) AS n FROM tide_jobs WHERE status = 'executing' AND queue = ?1",
}

-- ===== opening

local function migrate(s)
  local db = s.db
  db:exec("BEGIN IMMEDIATE")
  local ok, err = pcall(function()
    db:exec("CREATE TABLE IF NOT EXISTS tide_schema (version INTEGER NOT NULL)")
    local row = db:prepare("SELECT version FROM tide_schema"):first()
    local version = row and row.version or 0
    common.check_version(s.name, version, #MIGRATIONS, version == 0 and
      db:prepare("SELECT 1 FROM sqlite_master WHERE name = 'tide_jobs'"):first() ~= nil)
    for v = version + 1, #MIGRATIONS do db:exec(MIGRATIONS[v]) end
    if row == nil then
      db:exec("INSERT INTO tide_schema (version) VALUES (" .. #MIGRATIONS .. ")")
    elseif version < #MIGRATIONS then
      db:exec("UPDATE tide_schema SET version = " .. #MIGRATIONS)
    end
  end)
  if not ok then
    db:exec("ROLLBACK")
    error(err, 0)
  end
  db:exec("COMMIT")
end

local SYNC = { normal = "NORMAL", full = "FULL", off = "OFF" }

--- Opens (creating or migrating) the job tables in the SQLite file `path`.
--- `name` ("sqlite:jobs.db") starts every error message.  Raises on failure.
function M.open(path, name, opts)
  local db, err = core.sqlite_open(path, name, opts.busy_timeout or 5000)
  if not db then error(err, 0) end
  local s = setmetatable({ db = db, name = name, path = path, stmts = {}, user = {}, nuser = 0 }, Store)
  local ok, e = pcall(function()
    db:exec("PRAGMA journal_mode = WAL")
    db:exec("PRAGMA synchronous = " .. SYNC[opts.synchronous or "normal"])
    migrate(s)
  end)
  if not ok then db:close(); error(e, 0) end
  s.durability = "WAL, synchronous=" .. SYNC[opts.synchronous or "normal"]
  return s
end

--- The prepared statement for one of the SQL above (prepared on first use).
local function stmt(s, key)
  local st = s.stmts[key]
  if not st then st = s.db:prepare(SQL[key]); s.stmts[key] = st end
  return st
end

function Store:close()
  if not self.db then return end
  for _, st in pairs(self.stmts) do st:finalize() end
  for _, st in pairs(self.user) do st:finalize() end
  self.db:close()
  self.db = nil
end

-- ===== transactions

function Store:begin() self.db:exec("BEGIN IMMEDIATE") end
function Store:commit() self.db:exec("COMMIT") end
function Store:rollback() if self.db:in_transaction() then self.db:exec("ROLLBACK") end end
function Store:savepoint(n) self.db:exec("SAVEPOINT tide_" .. n) end
function Store:release(n) self.db:exec("RELEASE tide_" .. n) end
function Store:rollback_to(n) self.db:exec("ROLLBACK TO tide_" .. n .. "; RELEASE tide_" .. n) end

--- The task inside a transaction ended without finishing it: roll it back.
function Store:abandon() pcall(self.rollback, self) end

--- Whether a statement can run now without waiting (always: SQLite is in-process).
function Store:idle() return true end

--- The store a worker uses: this one (a second connection to the same file
--- would wait for this one's write lock by blocking the loop).
function Store:worker_store() return self end

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

function Store:exec(sql, ...) return user_stmt(self, sql):run(...) end
function Store:query(sql, ...) return user_stmt(self, sql):rows(...) end

-- ===== jobs

--- job: queue, target, method, args (JSON text) or args_enc, status,
--- priority, max_attempts, run_at, idempotence_key, inserted_at.
function Store:insert(j)
  if j.idempotence_key == nil then
    stmt(self, "insert"):run(j.queue, j.target, j.method, j.args, j.args_enc, j.status,
      j.priority, j.max_attempts, j.run_at, j.inserted_at)
    return self.db:last_id(), true
  end
  local row = stmt(self, "insert_key"):first(j.queue, j.target, j.method, j.args, j.args_enc, j.status,
    j.priority, j.max_attempts, j.run_at, j.idempotence_key, j.inserted_at)
  if row then return row.id, true end
  return stmt(self, "by_key"):first(j.idempotence_key).id, false
end

function Store:claim(queue, n, owner, now, lease_until)
  local rows = stmt(self, "claim"):rows(now, owner, lease_until, queue, n)
  return common.start_order(rows)
end

--- Each entry: { id, attempt, kind = "completed" | "retry" | "discard" |
--- "release", run_at, error = JSON text or nil }.  Entries whose job is no
--- longer leased to `owner` at that attempt change nothing.
function Store:record(entries, owner, now)
  local db = self.db
  local own = not db:in_transaction()
  if own then db:exec("BEGIN IMMEDIATE") end
  local ok, err = pcall(function()
    for i = 1, #entries do
      local e = entries[i]
      local kind = e.kind
      local at = kind == "completed" and now or kind == "discard" and now or e.run_at or now
      stmt(self, kind):run(e.id, owner, e.attempt, at, e.error)
    end
  end)
  if not ok then
    if own then db:exec("ROLLBACK") end
    error(err, 0)
  end
  if own then db:exec("COMMIT") end
end

function Store:heartbeat(owner, lease_until, ids)
  local set, list = {}, {}
  for i, id in ipairs(ids) do list[i] = ("%d"):format(id) end
  for _, id in ipairs(stmt(self, "heartbeat"):column(owner, lease_until, "[" .. concat(list, ",") .. "]")) do
    set[id] = true
  end
  return set
end

function Store:rescue(now) return stmt(self, "rescue"):run(now) end

function Store:get(id) return stmt(self, "get"):first(id) end

--- filter: status, queue, limit, before (an id: list older jobs, for paging).
function Store:list(f)
  local where, params = {}, {}
  if f.status then where[#where + 1] = "status = ?"; params[#params + 1] = f.status end
  if f.queue then where[#where + 1] = "queue = ?"; params[#params + 1] = f.queue end
  if f.target then where[#where + 1] = "target = ?"; params[#params + 1] = f.target end
  if f.before then where[#where + 1] = "id < ?"; params[#params + 1] = f.before end
  local sql = "SELECT * FROM tide_jobs" .. (#where > 0 and " WHERE " .. concat(where, " AND ") or "")
    .. " ORDER BY id DESC LIMIT " .. tostring(f.limit)
  return user_stmt(self, sql):rows(unpack(params))
end

--- op: "cancel" | "expire" | "fail" | "retry_now".  true when the job changed.
function Store:change(op, id, now, err)
  return stmt(self, op):run(id, now, err) > 0
end

--- { [queue] = { [status] = count } }
function Store:stats() return common.group_stats(stmt(self, "stats"):rows()) end

--- Like stats, for the waiting and executing statuses only (partial indexes).
function Store:backlog()
  local rows = stmt(self, "backlog"):rows()
  for _, r in ipairs(stmt(self, "backlog_executing"):rows()) do rows[#rows + 1] = r end
  return common.group_stats(rows)
end

--- Rows { queue, status, n, recent } over the newest `limit` jobs; `recent`
--- counts those that finished at `since` (ms) or later.
function Store:recent(since, limit) return stmt(self, "recent"):rows(since, limit) end

--- Rows { owner, queue, n, lease_expires, attempted_at }: who holds leases.
function Store:leases() return stmt(self, "leases"):rows() end

function Store:prune(before, statuses)
  return user_stmt(self, "DELETE FROM tide_jobs WHERE status IN " .. common.status_list(statuses)
    .. " AND completed_at <= ?1"):run(before)
end

--- How many jobs of `queues` are due or executing (anywhere): 0 means a
--- draining worker is done.
function Store:pending(queues, now)
  local n = 0
  for _, queue in ipairs(queues) do
    n = n + stmt(self, "pending_due"):first(queue, now).n + stmt(self, "pending_executing"):first(queue).n
  end
  return n
end

return M
