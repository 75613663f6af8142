--- tide.jobs.store.postgres — the job store on PostgreSQL, for workers on many machines.
--
-- The same methods as tide.jobs.store.sqlite (see the list there), over the
-- connections of tide.jobs.store.pg_conn (libpq, non-blocking, on the loop).
-- A store is a pool of connections (`pool`, default 10): a transaction holds
-- one from BEGIN to COMMIT, a statement outside transactions takes any free
-- one, and waiters are served first come, first served, for at most
-- `pool_timeout` ms.  Workers use stores of their own (worker_store: one
-- connection for outcomes and leases, one for claims, whose commits skip
-- the WAL flush) and one more connection that LISTENs, so that an
-- enqueue on any machine wakes idle workers at once: none of them is
-- taken from the application's pool.
--
-- A transaction's BEGIN goes with its first statement, in one pipeline
-- (tide.jobs.store.pg_conn): a transaction of one statement costs two
-- round trips (BEGIN + statement, COMMIT), not three.
--
-- The statements that run most (the claim, the heartbeat, the inserts) are
-- prepared once per connection (pg_conn's Conn:prepared), so the server
-- plans them once; a statement whose good plan depends on how many ids it
-- gets (the outcome write) is not: its generic plan was a trap (see
-- Session:record).
--
-- Every time is the server's, so machines never argue about time: the
-- statements that compare times (a job due, a lease run out) read the
-- server's clock, and the times a process writes to be compared with them
-- (run_at, a lease's end, a retry's) come from Store:now: the server's
-- time read when the store opened, and again about once a minute, counted
-- on since on this process's monotonic clock (tide.jobs.store.pg_clock).
-- A producer whose clock runs ahead would otherwise delay its jobs, and a
-- worker behind the server would write leases that have run out already
-- (spec/pg_clock_spec.lua).
local core = require "tide.core"
local common = require "tide.jobs.store.common"
local job = require "tide.jobs.job"
local pg_clock = require "tide.jobs.store.pg_clock"
local pg_conn = require "tide.jobs.store.pg_conn"
local pool = require "tide.jobs.store.pool"
local schema = require "tide.jobs.store.pg_schema"
local many = require "tide.jobs.store.pg_many"

local type, error, ipairs, tostring, concat = type, error, ipairs, tostring, table.concat
local setmetatable, format, pcall, min = setmetatable, string.format, pcall, math.min

local M = {}

local Store = {}
Store.__index = Store
Store.waits = true             -- each statement waits for the network (tide.jobs.transaction, not_in_c_call)
local Session = {}
Session.__index = Session
Session.dialect = "postgres"

local WAITING = "status IN " .. common.status_list(job.WAITING)
local TERMINAL_SQL = common.status_list(job.FINISHED)
local STOPPING = common.STOPPING      -- (see the SQLite store)
-- The server's clock, read when the statement runs (not when it was queued
-- behind a connect): the one every machine's times are compared on.
local NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
local GUARD = "WHERE id = $1 AND status = 'executing' AND lease_owner = $2 AND attempt = $3"
local ADD_ERROR = "coalesce(errors, '[]'::jsonb) || jsonb_build_array($5::jsonb)"

local MIGRATIONS, SCHEDULES_TABLE = schema.MIGRATIONS, schema.SCHEDULES_TABLE
M.VERSION = schema.VERSION

local SQL = {
  insert = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at, partition_key)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (idempotence_key) WHERE idempotence_key IS NOT NULL DO NOTHING RETURNING id]],
  by_key = "SELECT id FROM tide_jobs WHERE idempotence_key = $1",
  states = "SELECT id, status, lease_owner, attempt FROM tide_jobs WHERE id = ANY($1::bigint[])",
  -- (a queue with limits claims nothing here: see the SQLite store)
  claim = [[WITH due AS (SELECT id FROM tide_jobs WHERE queue = $3 AND ]] .. WAITING .. [[
      AND run_at <= ]] .. NOW .. [[ AND NOT EXISTS (SELECT 1 FROM tide_queues WHERE name = $3
        AND (concurrency IS NOT NULL OR key_concurrency IS NOT NULL OR rate_limit IS NOT NULL))
      ORDER BY priority, run_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)
    UPDATE tide_jobs j SET status = 'executing', attempt = j.attempt + 1, attempted_at = ]] .. NOW .. [[,
      lease_owner = $2, lease_expires = ]] .. NOW .. [[ + $1
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.queue, j.target, j.method, j.args, j.args_enc, j.priority, j.attempt,
      j.max_attempts, j.run_at, j.inserted_at, j.idempotence_key, j.partition_key]],
  -- With limits (q:declare): the SQLite store's claim_limited says how.  It
  -- runs after pg_advisory_xact_lock on the queue, in a transaction of its
  -- own, so that its snapshot (taken once the lock is held) counts every
  -- claim committed before it: claims of a limited queue take turns.
  claim_limited = [[WITH RECURSIVE keys(k) AS (
        (SELECT partition_key FROM tide_jobs WHERE queue = $3 AND ]] .. WAITING .. [[
          AND partition_key IS NOT NULL ORDER BY partition_key LIMIT 1)
        UNION ALL
        SELECT (SELECT partition_key FROM tide_jobs WHERE queue = $3 AND ]] .. WAITING .. [[
          AND partition_key > keys.k ORDER BY partition_key LIMIT 1) FROM keys WHERE keys.k IS NOT NULL),
      lim AS (SELECT concurrency, key_concurrency, rate_limit, rate_period
        FROM tide_queues WHERE name = $3),
      picked AS (
        SELECT p.* FROM keys CROSS JOIN LATERAL (SELECT id, partition_key, priority, run_at FROM tide_jobs
          WHERE queue = $3 AND partition_key = keys.k AND ]] .. WAITING .. [[ AND run_at <= ]] .. NOW .. [[
            -- (tried before: only once its last start left the rate's window, see the SQLite store's RATE_LEFT)
            AND coalesce(attempted_at <= (extract(epoch from statement_timestamp()) * 1000)::bigint
                         - (SELECT rate_period FROM lim WHERE rate_limit IS NOT NULL), true)
          ORDER BY priority, run_at, id LIMIT $5) p
        UNION ALL
        (SELECT id, partition_key, priority, run_at FROM tide_jobs
          WHERE queue = $3 AND partition_key IS NULL AND ]] .. WAITING .. [[ AND run_at <= ]] .. NOW .. [[
          ORDER BY priority, run_at, id LIMIT $4)),
      cand AS (SELECT id, partition_key, priority, run_at,
          row_number() OVER (PARTITION BY partition_key ORDER BY priority, run_at, id) AS rk FROM picked),
      busy AS (SELECT partition_key, count(*) AS n FROM (
          SELECT partition_key FROM tide_jobs
          WHERE status = 'executing' AND queue = $3 AND partition_key IS NOT NULL
          UNION ALL
          SELECT partition_key FROM tide_jobs
          WHERE ]] .. STOPPING .. [[ AND queue = $3 AND partition_key IS NOT NULL) b GROUP BY partition_key),
      -- (the statement's start, a stable time the index can use: a little
      -- earlier than the claim's own, so the window counted is a little
      -- wider, never narrower)
      recent AS (SELECT partition_key, count(*) AS n FROM tide_jobs
        WHERE queue = $3 AND partition_key IS NOT NULL
          AND attempted_at > (extract(epoch from statement_timestamp()) * 1000)::bigint
                             - (SELECT rate_period FROM lim) GROUP BY partition_key),
      pick AS (SELECT c.id FROM cand c
          LEFT JOIN busy b ON b.partition_key = c.partition_key
          LEFT JOIN recent r ON r.partition_key = c.partition_key
          LEFT JOIN lim l ON true
        WHERE c.partition_key IS NULL OR (
          (l.key_concurrency IS NULL OR c.rk <= l.key_concurrency - coalesce(b.n, 0))
          AND (l.rate_limit IS NULL OR c.rk <= l.rate_limit - coalesce(r.n, 0)))
        ORDER BY c.priority, c.run_at, c.id
        LIMIT greatest(0, least($4, coalesce((SELECT concurrency FROM lim)
          - (SELECT count(*) FROM tide_jobs WHERE status = 'executing' AND queue = $3)
          - (SELECT count(*) FROM tide_jobs WHERE ]] .. STOPPING .. [[ AND queue = $3), $4)))),
      due AS (SELECT id FROM tide_jobs WHERE id IN (SELECT id FROM pick) FOR UPDATE SKIP LOCKED)
    UPDATE tide_jobs j SET status = 'executing', attempt = j.attempt + 1, attempted_at = ]] .. NOW .. [[,
      lease_owner = $2, lease_expires = ]] .. NOW .. [[ + $1
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.queue, j.target, j.method, j.args, j.args_enc, j.priority, j.attempt,
      j.max_attempts, j.run_at, j.inserted_at, j.idempotence_key, j.partition_key]],
  -- In how many ms the first rate window of queue $1 ($2: its length) can
  -- reopen: the oldest start of a keyed job in the window leaves it then.
  rate_reopen = [[SELECT min(attempted_at) + $2 - ]] .. NOW .. [[ AS ms FROM tide_jobs
    WHERE queue = $1 AND partition_key IS NOT NULL AND attempted_at > ]] .. NOW .. [[ - $2]],
  queue_lock = "SELECT pg_advisory_xact_lock(7370602, hashtext($1))",
  unique_lock = "SELECT pg_advisory_xact_lock(7370603, hashtext($1))",
  limits = "SELECT * FROM tide_queues WHERE name = $1",
  declare = [[INSERT INTO tide_queues (name, concurrency, partition, key_concurrency, rate_limit, rate_period,
      updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (name) DO UPDATE SET concurrency = $2, partition = $3, key_concurrency = $4, rate_limit = $5,
      rate_period = $6, updated_at = $7]],
  -- Row locks are taken in id order (the CTEs), by every statement that may
  -- meet another's rows (outcomes, heartbeats of the same worker on its
  -- second connection): so they wait for each other, never deadlock.
  lock_ids = "SELECT id FROM tide_jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
  completed_many = [[WITH locked AS (SELECT id FROM tide_jobs WHERE id = ANY($3::bigint[]) ORDER BY id FOR UPDATE)
    UPDATE tide_jobs j SET status = 'completed', completed_at = $1,
      lease_owner = NULL, lease_expires = NULL
    FROM unnest($3::bigint[], $4::integer[]) AS d(id, attempt), locked
    WHERE j.id = d.id AND j.id = locked.id AND j.attempt = d.attempt AND j.status = 'executing'
      AND j.lease_owner = $2 RETURNING j.id]],
  retry = "UPDATE tide_jobs SET status = 'retryable', run_at = $4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  discard = "UPDATE tide_jobs SET status = 'discarded', completed_at = $4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  release = "UPDATE tide_jobs SET status = 'available', attempt = attempt - 1, run_at = $4, "
    .. "errors = CASE WHEN $5::jsonb IS NULL THEN errors ELSE " .. ADD_ERROR .. " END, "
    .. "lease_owner = NULL, lease_expires = NULL " .. GUARD,
  heartbeat = "WITH locked AS (SELECT id FROM tide_jobs WHERE id = ANY($3::bigint[]) AND lease_owner = $1 "
    .. "AND status = 'executing' ORDER BY id FOR UPDATE) "
    .. "UPDATE tide_jobs j SET lease_expires = " .. NOW .. " + $2 FROM locked "
    .. "WHERE j.id = locked.id AND j.lease_owner = $1 AND j.status = 'executing' RETURNING j.id",
  rescue = [[UPDATE tide_jobs SET
      status = CASE WHEN attempt >= max_attempts THEN 'discarded' ELSE 'available' END,
      completed_at = CASE WHEN attempt >= max_attempts THEN ]] .. NOW .. [[ END,
      run_at = ]] .. NOW .. [[, lease_owner = NULL, lease_expires = NULL,
      errors = coalesce(errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object('attempt', attempt,
        'at', ]] .. NOW .. [[, 'error', 'lease expired: worker ' || lease_owner || ' stopped heartbeating'))
    WHERE id IN (SELECT id FROM tide_jobs WHERE status = 'executing' AND lease_expires < ]] .. NOW .. [[
      FOR UPDATE SKIP LOCKED)      -- rows a worker is writing now are its own (and no deadlock)
    RETURNING id, status, queue, target, method, attempt, max_attempts, priority, run_at, inserted_at,
      idempotence_key]],
  get = "SELECT * FROM tide_jobs WHERE id = $1",
  -- (A running job keeps its lease: see the SQLite store's STOPPING.)
  cancel = "UPDATE tide_jobs SET status = 'cancelled', completed_at = $2 "
    .. "WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  expire = "UPDATE tide_jobs SET status = 'expired', completed_at = $2 "
    .. "WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  fail = "UPDATE tide_jobs SET status = 'discarded', completed_at = $2, "
    .. "errors = coalesce(errors, '[]'::jsonb) || jsonb_build_array($3::jsonb) "
    .. "WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  unlease = "UPDATE tide_jobs SET lease_owner = NULL, lease_expires = NULL "
    .. "WHERE id = ANY($2::bigint[]) AND (id, attempt) IN (SELECT * FROM unnest($2::bigint[], $3::integer[])) "
    .. "AND lease_owner = $1 AND status <> 'executing'",
  rescue_stopping = "UPDATE tide_jobs SET lease_owner = NULL, lease_expires = NULL WHERE " .. STOPPING
    .. " AND lease_expires < " .. NOW,
  retry_now = "UPDATE tide_jobs SET status = 'available', run_at = $2, completed_at = NULL, "
    .. "max_attempts = greatest(max_attempts, attempt + 1) "
    .. "WHERE id = $1 AND status NOT IN ('executing', 'available') AND lease_owner IS NULL",
  stats = "SELECT queue, status, count(*) AS n FROM tide_jobs GROUP BY queue, status",
  backlog = "SELECT queue, status, count(*) AS n FROM tide_jobs WHERE " .. WAITING .. " GROUP BY queue, status "
    .. "UNION ALL SELECT queue, 'executing', count(*) FROM tide_jobs WHERE status = 'executing' GROUP BY queue",
  recent = "SELECT queue, status, count(*) AS n, count(*) FILTER (WHERE completed_at >= $1) AS recent "
    .. "FROM (SELECT queue, status, completed_at FROM tide_jobs ORDER BY id DESC LIMIT $2) r GROUP BY queue, status",
  -- n: the jobs running; stopping: those cancelled, expired or failed by
  -- hand that their worker has not yet stopped (STOPPING): leases too.
  -- Each half through its partial index.
  leases = "SELECT owner, queue, sum(n)::bigint AS n, sum(stopping)::bigint AS stopping, max(lease_expires) AS lease_expires, "
    .. "max(attempted_at) AS attempted_at FROM ("
    .. "SELECT lease_owner AS owner, queue, 1 AS n, 0 AS stopping, lease_expires, attempted_at FROM tide_jobs "
    .. "WHERE status = 'executing' UNION ALL "
    .. "SELECT lease_owner, queue, 0, 1, lease_expires, attempted_at FROM tide_jobs WHERE " .. STOPPING
    .. ") l GROUP BY owner, queue",
  -- How many of queues $1 have a job due by $2 or executing: a draining
  -- worker asks every 20 ms while it has nothing running.  Each look stops
  -- at its first row, in its partial index's order (an ORDER BY that the
  -- index gives for free keeps the planner on it when the statistics, made
  -- before a run, say every row is due: a count over both conditions
  -- scanned the whole table, 14-26 ms a call at 20,000 rows, 0.4 s of the
  -- server's time in a 1.3 s run of 4 workers, pg_stat_statements).
  pending = [[SELECT count(*) AS n FROM unnest($1::text[]) AS u(name)
    WHERE (SELECT id FROM tide_jobs WHERE queue = u.name AND ]] .. WAITING .. [[ AND run_at <= $2
             ORDER BY priority, run_at, id LIMIT 1) IS NOT NULL
       OR (SELECT id FROM tide_jobs WHERE status = 'executing' AND queue = u.name
             ORDER BY partition_key LIMIT 1) IS NOT NULL]],
  schedule_register = [[INSERT INTO tide_schedules (name, cron, timezone, target, method, queue, seen_at, seen_by)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
      target = excluded.target, method = excluded.method, queue = excluded.queue,
      seen_at = excluded.seen_at, seen_by = excluded.seen_by
    RETURNING last_tick]],
  schedule_advance = [[UPDATE tide_schedules SET last_tick = greatest(coalesce(last_tick, $2), $2),
      seen_at = $3, seen_by = $4 WHERE name = $1]],
  schedules = "SELECT * FROM tide_schedules ORDER BY name",
}


M.SQL = SQL                                  -- (for EXPLAIN in benchmarks and specs)

local function migrate(c, name)
  c:query("BEGIN")
  local ok, err = pcall(function()
    c:query("SELECT pg_advisory_xact_lock(7370601)")    -- one migrator at a time
    c:query("CREATE TABLE IF NOT EXISTS tide_schema (version integer NOT NULL)")
    local rows = c:query("SELECT version FROM tide_schema").rows
    local version = rows[1] and rows[1].version or 0
    common.check_version(name, version, #MIGRATIONS, version == 0 and
      #c:query("SELECT 1 FROM pg_tables WHERE tablename = 'tide_jobs' AND schemaname = current_schema()").rows > 0)
    for v = version + 1, #MIGRATIONS do
      for _, stmt in ipairs(MIGRATIONS[v]) do c:query(stmt) end
    end
    c:query(SCHEDULES_TABLE)
    if not rows[1] then c:query("INSERT INTO tide_schema (version) VALUES ($1)", #MIGRATIONS)
    else c:query("UPDATE tide_schema SET version = $1", #MIGRATIONS) end
  end)
  if not ok then
    pcall(c.query, c, "ROLLBACK")
    error(err, 0)
  end
  c:query("COMMIT")
end

-- ===== the server's clock (tide.jobs.store.pg_clock)

--- The server's time now, in whole UTC ms, as this process can tell it.
function Store:now() return pg_clock.now(self.clock) end
function Session:now() return pg_clock.now(self.clock) end

--- A store of `size` connections to `url` (each runs `setup` first), on `clock`.
local function new_store(url, name, size, timeout, setup, prepare, clock)
  local s = setmetatable({ url = url, name = name, size = size, timeout = timeout, prepare = prepare,
                           clock = clock }, Store)
  s.pool = pool.new{ name = name, size = size, timeout = timeout,
                     open = function()
                       return setmetatable({ c = pg_conn.new(url, name, setup, prepare), clock = clock }, Session)
                     end,
                     reset = function(session) session.c:reset() end,
                     close = function(session) session.c:close() end }
  return s
end

--- Opens the store at `url` (postgres://...), creating or migrating the
--- tables.  opts: pool (connections, default 10), pool_timeout (ms a
--- statement waits for one, default 5000), prepare (false: no prepared
--- statements, on the pool's connections nor on its workers').
function M.open(url, name, opts)
  local s = new_store(url, pg_conn.safe_name(name), opts.pool or 10, opts.pool_timeout or 5000, nil,
                      opts.prepare ~= false, pg_clock.new())
  local session = s.pool:acquire("tide.queue.open")
  local ok, err = pcall(function()
    migrate(session.c, s.name)
    pg_clock.measure(s.clock, session.c)
    s.durability = "PostgreSQL, synchronous_commit="
      .. session.c:query("SHOW synchronous_commit").rows[1].synchronous_commit
  end)
  s.pool:release(session, not ok, pool.holder())
  if not ok then s.pool:close(); error(err, 0) end
  s.spare = session                         -- (see Store:worker_store)
  return s
end

function Store:acquire(fname, timeout)
  self.spare = nil                          -- (used since the opening: the pool's to keep)
  local session = self.pool:acquire(fname, timeout)
  pg_clock.refresh(self.clock, session.c)
  return session
end
function Store:release(session, broken, holder) return self.pool:release(session, broken, holder) end
function Store:available() return self.pool:available() end
function Store:stats_pool() return self.pool:stats() end

--- A store of its own for a worker: one connection, outside the
--- application's pool (a worker's statements never wait for the
--- application's, nor take its connections).
---
--- purpose "claims": the claimer's, whose commits do not wait for the WAL
--- flush (synchronous_commit off, on that connection only).  A claim lost
--- in a server crash is harmless: its jobs are available again and run
--- (at least once, as ever); and WAL is written in order, so once anything
--- that the claimed job did later is durable (its own transaction, its
--- outcome: written on another connection, synchronously), so is the
--- claim.  It saves a WAL flush per claim (the claimer's round trip on a
--- loaded server: 17-20 ms of flush waits against ~1 ms of execution,
--- measured with 20 jobs at a time that commit their own transactions).
---
--- The first store of purpose nil adopts the connection that opening this
--- store used, when nothing used it since (a caller's SET would have stayed
--- with it; the pool keeps the statements it prepared): a worker process,
--- `tide worker`, then starts one backend fewer (each costs the server ~30
--- ms of CPU to start here, more than the work of 600 no-op jobs).
function Store:worker_store(purpose)
  local s = new_store(self.url, self.name, 1, nil,
                      purpose == "claims" and "SET synchronous_commit = off" or nil, self.prepare, self.clock)
  s.durability = self.durability
  local spare = self.spare
  if purpose == nil and spare then
    self.spare = nil
    if self.pool:remove_free(spare) then s.pool:adopt(spare) end
  end
  return s
end

--- Calls fn(queue) when a job becomes available (on any machine); fn(nil)
--- after the listening connection was lost (wake everything).
function Store:listen(fn)
  local c = pg_conn.new(self.url, self.name)
  c.on_notify = fn
  self.listener = c
  local ok, err = pcall(c.listen, c, "tide_jobs")
  if not ok then c:relisten(); return nil, err end
  return true
end

function Store:unlisten()
  local c = self.listener
  if c then c.on_notify = false; c:close(); self.listener = nil end
end

function Store:close()
  self:unlisten()
  self.pool:close()
end

-- ===== transactions

-- (BEGIN goes with the transaction's first statement: pg_conn's Conn:begin)
function Session:begin() self.c:begin() end
function Session:commit() self.c:finish("COMMIT") end
function Session:rollback() self.c:finish("ROLLBACK") end
function Session:failed() return self.c:failed() end
function Session:savepoint(n) self.c:query("SAVEPOINT tide_" .. n) end
function Session:release(n) self.c:query("RELEASE SAVEPOINT tide_" .. n) end
function Session:rollback_to(n)
  self.c:recovered()                          -- (the savepoint precedes any failure: it could not be made after)
  self.c:query("ROLLBACK TO SAVEPOINT tide_" .. n)
  self.c:query("RELEASE SAVEPOINT tide_" .. n)
end

-- ===== the caller's own SQL: ? placeholders become $1..$n (outside quotes
-- and comments), so the same statements run on SQLite and PostgreSQL.

local placeholders = setmetatable({}, { __mode = "k" })

local function numbered(sql)
  if not sql:find("?", 1, true) then return sql end
  local out, n, i, len = {}, 0, 1, #sql
  while i <= len do
    local ch = sql:sub(i, i)
    if ch == "'" or ch == '"' then
      local j = i + 1
      while j <= len do
        if sql:sub(j, j) == ch then
          if sql:sub(j + 1, j + 1) == ch then j = j + 1 else break end
        end
        j = j + 1
      end
      out[#out + 1] = sql:sub(i, j)
      i = j + 1
    elseif ch == "-" and sql:sub(i + 1, i + 1) == "-" then
      local j = sql:find("\n", i, true) or len
      out[#out + 1] = sql:sub(i, j)
      i = j + 1
    elseif ch == "?" then
      n = n + 1
      out[#out + 1] = "$" .. n
      i = i + 1
    else
      out[#out + 1] = ch
      i = i + 1
    end
  end
  return concat(out)
end
M.numbered = numbered

M.numbered = numbered

local cache, ncache = {}, 0
local function user_sql(sql)
  local s = cache[sql]
  if not s then
    if ncache >= 1000 then cache, ncache = {}, 0 end
    s = numbered(sql)
    cache[sql], ncache = s, ncache + 1
  end
  return s
end

function Session:exec(sql, ...) return self.c:query(user_sql(sql), ...).changes end
function Session:query(sql, ...) return self.c:query(user_sql(sql), ...).rows or {} end

-- ===== jobs

local hex = many.hex

--- Runs fn() inside a transaction: the caller's, or one of its own.
local function in_tx(c, fn)
  if c.tx then return fn() end
  c:begin()
  local ok, a, b = pcall(fn)
  if ok then
    local committed, err = pcall(c.finish, c, "COMMIT")
    if not committed then ok, a = false, err end
  end
  if not ok then pcall(c.finish, c, "ROLLBACK") end
  c.tx = false
  if not ok then error(a, 0) end
  return a, b
end

--- A job with a unique key (see the SQLite store): the look-up and the
--- insert run under a transaction-scoped advisory lock on the key, so
--- that of two racing enqueues the second waits, then sees the first's row.
local function insert_unique(self, j, enc)
  local c = self.c
  local match = common.unique_match(j.unique_states)
  return in_tx(c, function()
    c:query(SQL.unique_lock, j.unique_key)
    local old = c:query("SELECT id FROM tide_jobs WHERE unique_key = $1 AND inserted_at > $2::bigint - $3::bigint "
      .. "AND " .. match .. " ORDER BY id DESC LIMIT 1", j.unique_key, j.inserted_at, j.unique_period).rows[1]
    if old then return old.id, false end
    local rows = c:query([[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
        max_attempts, run_at, inserted_at, partition_key, unique_key)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id]], j.queue, j.target, j.method,
      j.args, enc, j.status, j.priority, j.max_attempts, j.run_at, j.inserted_at, j.partition_key, j.unique_key).rows
    return rows[1].id, true
  end)
end

function Session:insert(j)
  local enc = j.args_enc and "\\x" .. hex(j.args_enc)
  if j.unique_key then return insert_unique(self, j, enc) end
  -- The job that has the key may be gone between the INSERT that met it
  -- and the SELECT that reads its id (q:prune, in another transaction):
  -- then the INSERT goes again.  (The SELECT found nothing, and
  -- `rows[1].id` raised "attempt to index a nil value".)
  for _ = 1, 3 do
    local rows = self.c:prepared("tide_insert", SQL.insert, j.queue, j.target, j.method, j.args, enc, j.status,
      j.priority, j.max_attempts, j.run_at, j.idempotence_key, j.inserted_at, j.partition_key).rows
    if rows[1] then return rows[1].id, true end
    local found = self.c:prepared("tide_by_key", SQL.by_key, j.idempotence_key).rows[1]
    if found then return found.id, false end
  end
  error(format("%s: the job with idempotency key %q was gone before its id could be read, three times "
    .. "(pruned meanwhile?)", self.c.name, j.idempotence_key), 0)
end

--- Inserts the list (inside the caller's transaction); returns their ids
--- and inserted flags, in order (tide.jobs.store.pg_many: by COPY, or one
--- statement per batch with keys).
function Session:insert_many(list)
  for i = 1, #list do
    if list[i].unique_key then              -- each its own look-up under its lock
      local ids, inserted = {}, {}
      for k = 1, #list do ids[k], inserted[k] = self:insert(list[k]) end
      return ids, inserted
    end
  end
  return many.insert_many(self.c, list)
end

local LIMITS_TTL = 1000                     -- ms: see the SQLite store's `limited`
local limited_cap

local function limited(self, name)
  local cache = self.limited
  if not cache then cache = {}; self.limited = cache end
  local now_ms, c = core.now(), cache[name]
  if c and now_ms - c.at < LIMITS_TTL then return c.row end
  local r = self.c:query(SQL.limits, name).rows[1]
  if r and not (r.concurrency or r.key_concurrency or r.rate_limit) then r = nil end
  cache[name] = { at = now_ms, row = r or false }
  return r or false
end

--- The most jobs of one key a claim of n could take (the limits cached).
limited_cap = function(self, name, n)
  local r = limited(self, name)
  return min(n, r and r.key_concurrency or n, r and r.rate_limit or n)
end

--- Claims up to n due jobs; returns them, true when the queue has limits,
--- and in how many ms a rate window reopens when one may have held jobs
--- back (see the SQLite store's).
function Session:claim(queue, n, owner, now, lease_until)
  local c = self.c
  local cached = self.limited and self.limited[queue]
  local fresh = cached and core.now() - cached.at < LIMITS_TTL
  if not (fresh and cached.row) then
    local rows = c:prepared("tide_claim", SQL.claim, lease_until - now, owner, queue, n).rows
    if #rows > 0 or fresh then return common.start_order(rows), false end
  end
  if not limited(self, queue) then return {}, false end   -- nothing claimed: because of limits?
  local rows = in_tx(c, function()
    c:query(SQL.queue_lock, queue)
    return c:query(SQL.claim_limited, lease_until - now, owner, queue, n, limited_cap(self, queue, n)).rows
  end)
  local r, reopen = limited(self, queue), nil
  if #rows < n and r and r.rate_limit then reopen = c:query(SQL.rate_reopen, queue, r.rate_period).rows[1].ms end
  return common.start_order(rows), true, reopen
end

function Session:declare(r)
  self.c:query(SQL.declare, r.name, r.concurrency, r.partition, r.key_concurrency, r.rate_limit, r.rate_period,
    r.updated_at)
  if self.limited then self.limited[r.name] = nil end
end

function Session:queue_limits(name) return self.c:query(SQL.limits, name).rows[1] end

local function by_id(a, b) return a.id < b.id end

--- Writes outcomes (see the SQLite store); returns the set of ids written.
function Session:record(entries, owner, now, hooks)
  local c = self.c
  local ids, attempts, others, all = {}, {}, {}, {}
  for i, e in ipairs(entries) do
    all[i] = format("%d", e.id)
    if e.kind == "completed" then
      ids[#ids + 1], attempts[#attempts + 1] = format("%d", e.id), format("%d", e.attempt)
    else
      others[#others + 1] = e
    end
  end
  local written = {}
  local function completed()
    if #ids > 0 then
      -- (not prepared: its generic plan, made for 10 ids, joins the locked
      -- rows by a nested loop; at 700 ids a call took 400 ms, the custom
      -- plan a hash join of a few ms — pg_stat_statements, 5,000 jobs)
      local rows = c:query(SQL.completed_many, now, owner, "{" .. concat(ids, ",") .. "}",
                           "{" .. concat(attempts, ",") .. "}").rows
      for _, r in ipairs(rows) do written[r.id] = true end
    end
  end
  if #others == 0 and not hooks then completed(); return written end   -- one statement: atomic by itself
  table.sort(others, by_id)
  local ok, err = pcall(function()
    c:begin()
    if hooks and hooks.before then hooks.before(self) end   -- (flow runs: locked before jobs)
    c:query(SQL.lock_ids, "{" .. concat(all, ",") .. "}")   -- all its rows, in id order, first
    completed()
    for _, e in ipairs(others) do
      local at = e.kind == "discard" and now or e.run_at or now
      if c:query(SQL[e.kind], e.id, owner, e.attempt, at, e.error).changes > 0 then written[e.id] = true end
    end
    if hooks and hooks.after then hooks.after(self, written) end
    c:finish("COMMIT")
  end)
  if not ok then
    pcall(c.finish, c, "ROLLBACK")
    c.tx = false
    error(err, 0)
  end
  return written
end

function Session:heartbeat(owner, lease_until, ids)
  local set, list = {}, {}
  for i, id in ipairs(ids) do list[i] = format("%d", id) end
  local lease = lease_until - self:now()
  for _, r in ipairs(self.c:prepared("tide_heartbeat", SQL.heartbeat, owner, lease, "{" .. concat(list, ",") .. "}").rows) do
    set[r.id] = true
  end
  return set
end

--- (See the SQLite store.)
function Session:unlease(owner, stopped)
  local ids, attempts = {}, {}
  for i, j in ipairs(stopped) do ids[i], attempts[i] = format("%d", j.id), format("%d", j.attempt) end
  return self.c:query(SQL.unlease, owner, "{" .. concat(ids, ",") .. "}", "{" .. concat(attempts, ",") .. "}").changes
end

function Session:rescue()
  self.c:query(SQL.rescue_stopping)
  local list = self.c:query(SQL.rescue).rows
  local dead = {}
  for _, r in ipairs(list) do if r.status == "discarded" then dead[#dead + 1] = r end end
  return #list, dead
end

--- Locks the rows of flow runs `ids` (sorted) until the transaction ends,
--- and returns them: every change to a run takes its row first, shared
--- (FOR KEY SHARE) when it decides nothing for the run as a whole
--- (tide.jobs.flows says which, and why this cannot deadlock).
function Session:lock_flow_runs(ids, shared)
  if #ids == 0 then return {} end
  local list = {}
  for i, id in ipairs(ids) do list[i] = format("%d", id) end
  return self.c:query("SELECT id, flow, status, fail, queue, priority, input, partition_key FROM tide_flow_runs "
    .. "WHERE id = ANY($1::bigint[]) ORDER BY id FOR " .. (shared and "KEY SHARE" or "UPDATE"),
    "{" .. concat(list, ",") .. "}").rows
end

function Session:get(id) return self.c:query(SQL.get, id).rows[1] end

function Session:states(ids)
  local out, list = {}, {}
  for i, id in ipairs(ids) do list[i] = format("%d", id) end
  for _, r in ipairs(self.c:query(SQL.states, "{" .. concat(list, ",") .. "}").rows) do out[r.id] = r end
  return out
end

function Session:list(f)
  local where, params = {}, {}
  if f.status then params[#params + 1] = f.status; where[#where + 1] = "status = $" .. #params end
  if f.queue then params[#params + 1] = f.queue; where[#where + 1] = "queue = $" .. #params end
  if f.target then params[#params + 1] = f.target; where[#where + 1] = "target = $" .. #params end
  if f.before then params[#params + 1] = f.before; where[#where + 1] = "id < $" .. #params end
  local sql = "SELECT * FROM tide_jobs"
    .. (#where > 0 and " WHERE " .. concat(where, " AND ") or "")
    .. " ORDER BY id DESC LIMIT " .. format("%d", f.limit)
  return self.c:query(sql, unpack(params)).rows
end

function Session:change(op, id, now, err)
  if op == "fail" then return self.c:query(SQL.fail, id, now, err).changes > 0 end
  return self.c:query(SQL[op], id, now).changes > 0
end

function Session:stats() return common.group_stats(self.c:query(SQL.stats).rows) end
function Session:backlog() return common.group_stats(self.c:query(SQL.backlog).rows) end
function Session:recent(since, limit) return self.c:query(SQL.recent, since, limit).rows end
function Session:leases() return self.c:query(SQL.leases).rows end

function Session:prune(before, statuses)
  return self.c:query("DELETE FROM tide_jobs WHERE status IN " .. common.status_list(statuses)
    .. " AND completed_at <= $1 AND lease_owner IS NULL", before).changes   -- (not a job still stopping)
end

--- 0 when no job of `queues` is due by `now` or executing; else how many
--- of them have one (not how many jobs: a drain needs only the zero).
function Session:pending(queues, now)
  return self.c:query(SQL.pending, many.text_array(queues, #queues), now).rows[1].n
end

-- ===== changing many jobs (see the SQLite store)

local BULK_SET = {
  retry_now = "status = 'available', run_at = $2, completed_at = NULL, "
    .. "max_attempts = greatest(max_attempts, attempt + 1)",
  cancel = "status = 'cancelled', completed_at = $2",
  fail = "status = 'discarded', completed_at = $2, errors = coalesce(errors, '[]'::jsonb) || jsonb_build_array($8::jsonb)",
}

--- (Rows are locked in id order, as every statement of the store locks
--- them, and waited for: a job a worker writes now is changed after it.)
function Session:bulk(op, f, after, limit, now, err)
  local sql = "UPDATE tide_jobs SET " .. BULK_SET[op] .. " WHERE id IN (SELECT id FROM tide_jobs WHERE id > $1 "
    .. (op == "retry_now" and "AND lease_owner IS NULL " or "")
    .. "AND status = $3" .. (f.queue and " AND queue = $4" or " AND $4::text IS NULL")
    .. (f.since and (" AND %s >= $5"):format(f.since_col) or " AND $5::bigint IS NULL")
    .. (f.target and " AND target = $7" or " AND $7::text IS NULL")
    .. " ORDER BY id LIMIT $6 FOR UPDATE) RETURNING id, queue"
  local list
  if op == "fail" then
    list = self.c:query(sql, after, now, f.status, f.queue, f.since, limit, f.target, err).rows
  else
    list = self.c:query(sql, after, now, f.status, f.queue, f.since, limit, f.target).rows
  end
  table.sort(list, function(a, b) return a.id < b.id end)
  return list
end

-- ===== schedules (tide.jobs.schedules; see the SQLite store)

function Session:schedule_register(s, now, worker)
  local row = self.c:query(SQL.schedule_register, s.name, s.cron_text, s.timezone, s.target, s.method, s.queue,
                           now, worker).rows[1]
  return row and row.last_tick or nil
end

function Session:schedule_advance(name, tick, now, worker)
  self.c:query(SQL.schedule_advance, name, tick, now, worker)
end

function Session:schedules() return self.c:query(SQL.schedules).rows end

--- A bare connection (for tools and specs): c:query(sql, ...) -> result, c:close().
function M.connect(url)
  return pg_conn.new(url, pg_conn.safe_name(url))
end

return M
