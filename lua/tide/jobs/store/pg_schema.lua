--- tide.jobs.store.pg_schema — the PostgreSQL job store's tables: its numbered migrations,
--- and the schedules' table made when missing at every open.
local common = require "tide.jobs.store.common"
local job = require "tide.jobs.job"

local M = {}

local WAITING = "status IN " .. common.status_list(job.WAITING)

local MIGRATIONS = {
  {
    [[CREATE TABLE tide_jobs (
      id              bigserial PRIMARY KEY,
      queue           text    NOT NULL,
      target          text    NOT NULL,
      method          text    NOT NULL,
      args            text,
      args_enc        bytea,
      status          text    NOT NULL,
      priority        integer NOT NULL DEFAULT 0,
      attempt         integer NOT NULL DEFAULT 0,
      max_attempts    integer NOT NULL,
      run_at          bigint  NOT NULL,
      attempted_at    bigint,
      completed_at    bigint,
      errors          jsonb,
      idempotence_key text,
      lease_owner     text,
      lease_expires   bigint,
      inserted_at     bigint  NOT NULL)]],
    [[CREATE UNIQUE INDEX tide_jobs_key ON tide_jobs (idempotence_key) WHERE idempotence_key IS NOT NULL]],
    [[CREATE INDEX tide_jobs_due ON tide_jobs (queue, priority, run_at, id) WHERE ]] .. WAITING,
    [[CREATE INDEX tide_jobs_leased ON tide_jobs (lease_expires) WHERE status = 'executing']],
    [[CREATE OR REPLACE FUNCTION tide_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM pg_notify('tide_jobs', NEW.queue); RETURN NULL; END $$]],
    [[CREATE TRIGGER tide_jobs_notify AFTER INSERT OR UPDATE OF status ON tide_jobs
      FOR EACH ROW WHEN (NEW.status = 'available') EXECUTE FUNCTION tide_jobs_notify()]],
  },
  -- 2: per-key limits and uniqueness over time (issue 20); see the SQLite store.
  {
    [[ALTER TABLE tide_jobs ADD COLUMN partition_key text, ADD COLUMN unique_key text]],
    [[CREATE TABLE IF NOT EXISTS tide_queues (
      name            text PRIMARY KEY,
      concurrency     integer,
      partition       text,
      key_concurrency integer,
      rate_limit      integer,
      rate_period     bigint,
      updated_at      bigint NOT NULL)]],
    [[CREATE INDEX tide_jobs_started ON tide_jobs (queue, attempted_at) WHERE partition_key IS NOT NULL]],
    [[CREATE INDEX tide_jobs_unique ON tide_jobs (unique_key, inserted_at) WHERE unique_key IS NOT NULL]],
    [[CREATE INDEX tide_jobs_key_due ON tide_jobs (queue, partition_key, priority, run_at, id) WHERE ]] .. WAITING,
    [[CREATE INDEX tide_jobs_key_running ON tide_jobs (queue, partition_key) WHERE status = 'executing']],
    [[CREATE INDEX tide_jobs_nokey_due ON tide_jobs (queue, priority, run_at, id)
      WHERE partition_key IS NULL AND ]] .. WAITING,
  },
  -- 3: durable flows (see the SQLite store's migration 4: the same tables)
  {
    [[CREATE TABLE IF NOT EXISTS tide_flow_runs (
      id              bigserial PRIMARY KEY,
      flow            text    NOT NULL,
      status          text    NOT NULL,
      fail            text    NOT NULL,
      queue           text    NOT NULL,
      priority        integer NOT NULL DEFAULT 0,
      input           text    NOT NULL,
      idempotency_key text    UNIQUE,
      open_steps      integer NOT NULL,
      failed_steps    integer NOT NULL DEFAULT 0,
      error           text,
      inserted_at     bigint  NOT NULL,
      completed_at    bigint)]],
    [[CREATE INDEX IF NOT EXISTS tide_flow_runs_status ON tide_flow_runs (status, id)]],
    [[CREATE TABLE IF NOT EXISTS tide_flow_steps (
      run_id          bigint  NOT NULL,
      name            text    NOT NULL,
      status          text    NOT NULL,
      waiting         integer NOT NULL,
      deps            text    NOT NULL,
      dependents      text    NOT NULL,
      each            integer NOT NULL DEFAULT 0,
      concurrency     integer,
      job_id          bigint,
      failures        integer NOT NULL DEFAULT 0,
      max_failures    integer NOT NULL,
      items_total     integer,
      items_done      integer,
      result          text,
      error           text,
      traceback       text,
      reason          text,
      queued_at       bigint,
      completed_at    bigint,
      PRIMARY KEY (run_id, name))]],
    [[CREATE INDEX IF NOT EXISTS tide_flow_steps_open ON tide_flow_steps (job_id) WHERE status = 'queued']],
    [[CREATE TABLE IF NOT EXISTS tide_flow_items (
      run_id          bigint  NOT NULL,
      step            text    NOT NULL,
      idx             integer NOT NULL,
      status          text    NOT NULL,
      item            text    NOT NULL,
      job_id          bigint,
      failures        integer NOT NULL DEFAULT 0,
      result          text,
      error           text,
      traceback       text,
      completed_at    bigint,
      PRIMARY KEY (run_id, step, idx))]],
    [[CREATE INDEX IF NOT EXISTS tide_flow_items_open ON tide_flow_items (job_id) WHERE status = 'queued']],
  },
  -- 4: enqueue at the server's speed (issue 16).  An INSERT notifies once
  -- per statement and queue, from the rows it inserted (a row trigger ran
  -- PL/pgSQL and pg_notify for each row of a batch: 15-20% of a 5,000-row
  -- INSERT's execution, EXPLAIN ANALYZE); an UPDATE that makes a job
  -- available still notifies per row.  And jobs without a partition key
  -- leave tide_jobs_key_due, which only the limited claim reads for keyed
  -- jobs (its equality on partition_key implies the index's predicate):
  -- one index entry fewer per plain job.
  {
    [[CREATE OR REPLACE FUNCTION tide_jobs_notify_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM pg_notify('tide_jobs', q) FROM (SELECT DISTINCT queue AS q FROM tide_inserted
          WHERE status = 'available') s;
        RETURN NULL;
      END $$]],
    [[DROP TRIGGER tide_jobs_notify ON tide_jobs]],
    [[CREATE TRIGGER tide_jobs_notify AFTER UPDATE OF status ON tide_jobs
      FOR EACH ROW WHEN (NEW.status = 'available') EXECUTE FUNCTION tide_jobs_notify()]],
    [[CREATE TRIGGER tide_jobs_notify_insert AFTER INSERT ON tide_jobs REFERENCING NEW TABLE AS tide_inserted
      FOR EACH STATEMENT EXECUTE FUNCTION tide_jobs_notify_inserted()]],
    [[DROP INDEX tide_jobs_key_due]],
    [[CREATE INDEX tide_jobs_key_due ON tide_jobs (queue, partition_key, priority, run_at, id)
      WHERE partition_key IS NOT NULL AND ]] .. WAITING,
  },
  -- 5: one index entry fewer per claim (issue 16).  tide_jobs_leased held
  -- every executing job by lease_expires, for the rescue alone; the rescue
  -- now reads tide_jobs_key_running, which holds the same rows (status =
  -- 'executing': at most the workers' slots, however big the table), and
  -- checks each lease.  A claim wrote 5 WAL records a job and writes 4
  -- (pg_stat_statements), and a heartbeat, which changes lease_expires
  -- alone, no longer touches an index (it may be a HOT update).  DROP
  -- INDEX, not CONCURRENTLY: the migration runs in one transaction, and a
  -- drop holds its lock only for the catalog change (no scan of the
  -- table), which waits for the statements under way and no longer.
  {
    [[DROP INDEX IF EXISTS tide_jobs_leased]],
  },
  -- 6: jobs stopping (see the SQLite store's migration 7).
  {
    [[CREATE INDEX IF NOT EXISTS tide_jobs_stopping ON tide_jobs (queue, partition_key)
      WHERE lease_owner IS NOT NULL AND status <> 'executing']],
  },
  -- 7: a durable flow run's partition key (see the SQLite store's migration 8).
  {
    [[ALTER TABLE tide_flow_runs ADD COLUMN IF NOT EXISTS partition_key text]],
  },
}
M.MIGRATIONS, M.VERSION = MIGRATIONS, #MIGRATIONS

-- The schedules workers run (see the SQLite store): created when missing at
-- every open, under the migration lock, apart from the numbered migrations.
M.SCHEDULES_TABLE = [[CREATE TABLE IF NOT EXISTS tide_schedules (
    name      text PRIMARY KEY,
    cron      text NOT NULL,
    timezone  text NOT NULL,
    target    text NOT NULL,
    method    text NOT NULL,
    queue     text NOT NULL,
    last_tick bigint,
    seen_at   bigint NOT NULL,
    seen_by   text)]]

return M
