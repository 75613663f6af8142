--- tide.jobs.store.sqlite_schema — the SQLite job store's tables: its numbered migrations.
--
-- tide_schema holds one row: the version of the job tables.  Migration i
-- takes the tables from version i-1 to i; they run in one transaction at
-- open, so a crash mid-way leaves the old version intact.  The user's own
-- tables may live in the same file (that is the point of transactional
-- enqueue), so tide never touches PRAGMA user_version.
local common = require "tide.jobs.store.common"

local error, pcall = error, pcall

local M = {}

local COLUMNS = [[
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
    inserted_at     INTEGER NOT NULL]]
local COLUMN_LIST = "id, queue, target, method, args, args_enc, status, priority, attempt, max_attempts, "
  .. "run_at, attempted_at, completed_at, errors, idempotence_key, lease_owner, lease_expires, inserted_at"

local INDEXES = [[
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
]]

local function first_once(db, sql)
  local st = db:prepare(sql)
  local ok, row = pcall(st.first, st)
  st:finalize()
  if not ok then error(row, 0) end
  return row
end

local MIGRATIONS = {
  -- 1: the job table
  "CREATE TABLE tide_jobs (\n    id              INTEGER PRIMARY KEY,\n" .. COLUMNS .. "\n  );\n" .. INDEXES,
  -- 2: ids are never used twice, even after the newest jobs were pruned
  -- (AUTOINCREMENT keeps the highest id ever given in sqlite_sequence; a
  -- table from version 1 starts from the highest id it holds).  SQLite
  -- cannot add AUTOINCREMENT to a table: the rows move to a new one.
  "CREATE TABLE tide_jobs_v2 (\n    id              INTEGER PRIMARY KEY AUTOINCREMENT,\n" .. COLUMNS .. "\n  );\n"
    .. "INSERT INTO tide_jobs_v2 (" .. COLUMN_LIST .. ") SELECT " .. COLUMN_LIST .. " FROM tide_jobs;\n"
    .. "DROP TABLE tide_jobs;\nALTER TABLE tide_jobs_v2 RENAME TO tide_jobs;\n" .. INDEXES,
  -- 3: per-key limits and uniqueness over time (issue 20): a job's
  -- partition key and unique key; the queues' limits, read by every claim.
  [[ALTER TABLE tide_jobs ADD COLUMN partition_key TEXT;
  ALTER TABLE tide_jobs ADD COLUMN unique_key TEXT;
  CREATE TABLE IF NOT EXISTS tide_queues (   -- (kept if tide_jobs was dropped by hand)
    name            TEXT PRIMARY KEY,
    concurrency     INTEGER,           -- executing at once, all workers together
    partition       TEXT,              -- "function" or the path into args (for people)
    key_concurrency INTEGER,           -- executing at once per partition key
    rate_limit      INTEGER,           -- started per key in any window of rate_period ms
    rate_period     INTEGER,
    updated_at      INTEGER NOT NULL
  );
  -- Starts of keyed jobs by time: a rate counts the window's starts only.
  CREATE INDEX tide_jobs_started ON tide_jobs (queue, attempted_at) WHERE partition_key IS NOT NULL;
  -- Waiting jobs by key: a limited claim visits each key and takes the
  -- first few of each, whatever the backlog of the busiest.
  CREATE INDEX tide_jobs_key_due ON tide_jobs (queue, partition_key, priority, run_at, id)
    WHERE (status = 'available' OR status = 'scheduled' OR status = 'retryable');
  -- Executing jobs by key: what a limited claim counts against the limits.
  CREATE INDEX tide_jobs_key_running ON tide_jobs (queue, partition_key) WHERE status = 'executing';
  CREATE INDEX tide_jobs_unique ON tide_jobs (unique_key, inserted_at) WHERE unique_key IS NOT NULL;
  ]],
  -- 4: durable flows (tide.jobs.flows): runs, their steps, the items of
  -- their `each` steps.  Every step or item that runs is a job of
  -- tide_jobs (job_id); results and inputs are JSON text, kept as written.
  -- (IF NOT EXISTS: tables left by a tide_schema dropped by hand, as specs
  -- do to start afresh, are taken as they are, like tide_schedules.)
  [[CREATE TABLE IF NOT EXISTS tide_flow_runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    flow            TEXT    NOT NULL,   -- the definition's module name
    status          TEXT    NOT NULL,   -- running, ok, error, cancelled
    fail            TEXT    NOT NULL,   -- stop, continue
    queue           TEXT    NOT NULL,
    priority        INTEGER NOT NULL DEFAULT 0,
    input           TEXT    NOT NULL,   -- JSON
    idempotency_key TEXT    UNIQUE,
    open_steps      INTEGER NOT NULL,   -- steps not yet finished
    failed_steps    INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    inserted_at     INTEGER NOT NULL,
    completed_at    INTEGER
  );
  CREATE INDEX IF NOT EXISTS tide_flow_runs_status ON tide_flow_runs (status, id);
  CREATE TABLE IF NOT EXISTS tide_flow_steps (
    run_id          INTEGER NOT NULL,
    name            TEXT    NOT NULL,
    status          TEXT    NOT NULL,   -- waiting, queued, fanout, ok, error, timeout, skipped, cancelled
    waiting         INTEGER NOT NULL,   -- dependencies not yet ok
    deps            TEXT    NOT NULL,   -- JSON array of names
    dependents      TEXT    NOT NULL,   -- JSON array of names
    each            INTEGER NOT NULL DEFAULT 0,
    concurrency     INTEGER,
    job_id          INTEGER,
    failures        INTEGER NOT NULL DEFAULT 0,
    max_failures    INTEGER NOT NULL,
    items_total     INTEGER,
    items_done      INTEGER,
    result          TEXT,               -- JSON
    error           TEXT,
    traceback       TEXT,
    reason          TEXT,
    queued_at       INTEGER,
    completed_at    INTEGER,
    PRIMARY KEY (run_id, name)
  );
  CREATE INDEX IF NOT EXISTS tide_flow_steps_open ON tide_flow_steps (job_id) WHERE status = 'queued';
  CREATE TABLE IF NOT EXISTS tide_flow_items (
    run_id          INTEGER NOT NULL,
    step            TEXT    NOT NULL,
    idx             INTEGER NOT NULL,
    status          TEXT    NOT NULL,   -- waiting, queued, ok, error, timeout, cancelled
    item            TEXT    NOT NULL,   -- JSON
    job_id          INTEGER,
    failures        INTEGER NOT NULL DEFAULT 0,
    result          TEXT,
    error           TEXT,
    traceback       TEXT,
    completed_at    INTEGER,
    PRIMARY KEY (run_id, step, idx)
  );
  CREATE INDEX IF NOT EXISTS tide_flow_items_open ON tide_flow_items (job_id) WHERE status = 'queued';
]],
  -- 5: the schedules workers run (tide.jobs.schedules): one row per
  -- schedule name, with the latest tick enqueued.  (Until this migration
  -- the table was created when missing at every open, outside the numbered
  -- migrations: a file of version 4 may have it already, with rows, hence
  -- IF NOT EXISTS.)
  [[CREATE TABLE IF NOT EXISTS tide_schedules (
    name      TEXT PRIMARY KEY,
    cron      TEXT NOT NULL,
    timezone  TEXT NOT NULL,
    target    TEXT NOT NULL,
    method    TEXT NOT NULL,
    queue     TEXT NOT NULL,
    last_tick INTEGER,                 -- ms: the latest tick enqueued
    seen_at   INTEGER NOT NULL,        -- ms: when a worker last registered or advanced it
    seen_by   TEXT
  )]],
  -- 6: the per-key indexes of migration 3 hold keyed jobs only.  They held
  -- every waiting and every executing job, so each job without a key (a
  -- durable flow's step above all) paid two more index writes at each
  -- change of status for indexes only keyed claims read (their statements
  -- all say partition_key IS NOT NULL, or = a key, which implies it).
  -- Counts of executing jobs by queue now read tide_jobs_leased: as many
  -- rows as the workers' slots.  One statement does read the jobs without
  -- a key: the limited claim takes a limited queue's unkeyed jobs too
  -- (partition_key IS NULL), and without tide_jobs_nokey_due (PostgreSQL
  -- has had it since its migration 2) it walked tide_jobs_due through the
  -- queue's whole keyed backlog at every claim (200,000 keyed jobs waiting:
  -- 3.1 -> 60.9 ms of CPU per claim).  So a waiting job without a key is
  -- in two indexes, as before; an executing one, in tide_jobs_leased only.
  [[DROP INDEX tide_jobs_key_due;
  CREATE INDEX tide_jobs_key_due ON tide_jobs (queue, partition_key, priority, run_at, id)
    WHERE partition_key IS NOT NULL AND (status = 'available' OR status = 'scheduled' OR status = 'retryable');
  CREATE INDEX tide_jobs_nokey_due ON tide_jobs (queue, priority, run_at, id)
    WHERE partition_key IS NULL AND (status = 'available' OR status = 'scheduled' OR status = 'retryable');
  DROP INDEX tide_jobs_key_running;
  CREATE INDEX tide_jobs_key_running ON tide_jobs (queue, partition_key)
    WHERE partition_key IS NOT NULL AND status = 'executing';
  ]],
  -- 7: jobs stopping (tide.jobs.store.common's STOPPING).  A job cancelled,
  -- expired or failed by hand while it runs keeps its lease until its
  -- worker has stopped it: the limits count it, so that the next job of its
  -- key does not start beside it.  As few rows as the workers' slots.
  -- (IF NOT EXISTS: a database whose tide_schema was set back by hand.)
  [[CREATE INDEX IF NOT EXISTS tide_jobs_stopping ON tide_jobs (queue, partition_key)
    WHERE lease_owner IS NOT NULL AND status <> 'executing';
  ]],
  -- 8: a durable flow run's partition key (its queue's partition of its
  -- input, when the queue is declared with one), given to every job of the
  -- run, so that the queue's per-key limits hold for flows too.  A
  -- function: SQLite's ADD COLUMN has no IF NOT EXISTS, and a database
  -- whose tide_schema was set back by hand has the column already.
  function(db)
    if first_once(db, "SELECT 1 FROM pragma_table_info('tide_flow_runs') WHERE name = 'partition_key'") == nil then
      db:exec("ALTER TABLE tide_flow_runs ADD COLUMN partition_key TEXT")
    end
  end,
}
M.VERSION = #MIGRATIONS
M.MIGRATIONS = MIGRATIONS

-- ===== migrating at open

--- The first row of a one-off statement, finalized at once (not left to
--- the collector: an unfinalized statement keeps a closed connection alive).

--- Creates the job tables in connection `db`, or takes them from the
--- version in tide_schema to M.VERSION, in one transaction.  `name`
--- ("sqlite:jobs.db") starts the error raised for tables it cannot take.
function M.migrate(db, name)
  db:exec("BEGIN IMMEDIATE")
  local ok, err = pcall(function()
    db:exec("CREATE TABLE IF NOT EXISTS tide_schema (version INTEGER NOT NULL)")
    local row = first_once(db, "SELECT version FROM tide_schema")
    local version = row and row.version or 0
    common.check_version(name, version, #MIGRATIONS, version == 0 and
      first_once(db, "SELECT 1 FROM sqlite_master WHERE name = 'tide_jobs'") ~= nil)
    for v = version + 1, #MIGRATIONS do
      local m = MIGRATIONS[v]                   -- SQL, or a function(db) for what SQL cannot say
      if type(m) == "function" then m(db) else db:exec(m) end
    end
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

return M
