-- spec/pg_schema_spec.lua — the PostgreSQL store's numbered migrations on a
-- database that already holds jobs: an upgrade keeps every job and lease.
--
-- Migration 5 dropped tide_jobs_leased (one index entry fewer per claim):
-- the rescue reads tide_jobs_key_running instead, which holds the same
-- rows.  A database of version 4 with jobs under lease is upgraded in place;
-- a lease that ran out is rescued, a live one is left alone, and on a big
-- table of finished jobs the rescue still reads an index, not the table.
local tide = require "tide"
local pg = require "tide.jobs.store.postgres"

local URL = os.getenv("TIDE_PG_URL")
if not URL then
  describe("PostgreSQL migrations", function()
    pending("needs a PostgreSQL server (TIDE_PG_URL, as spec/run.sh sets)")
  end)
  return
end

local NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint"

local function fresh()
  local c = pg.connect(URL)
  c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_queues, tide_schedules, tide_flow_runs, "
    .. "tide_flow_steps, tide_flow_items CASCADE")
  c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
  c:close()
end

describe("PostgreSQL migration 5 (the rescue reads the executing jobs' index)", function()
  local c, q

  before_each(function() fresh(); c = pg.connect(URL) end)
  after_each(function()
    if q then q:close(); q = nil end
    c:close()
    fresh()
    spec_helper.assert_idle()
  end)

  local function status(id) return c:query("SELECT status FROM tide_jobs WHERE id = $1", id).rows[1].status end

  it("upgrades a version-4 database with jobs under lease: the expired lease is rescued, the live one kept", function()
    q = tide.queue.open(URL)
    local expired = q:enqueue{ target = "t", method = "m" }
    local live = q:enqueue{ target = "t", method = "m" }
    local waiting = q:enqueue{ target = "t", method = "m" }
    q:close(); q = nil
    -- what version 4 had: the index, and the jobs two workers leased
    c:query("CREATE INDEX tide_jobs_leased ON tide_jobs (lease_expires) WHERE status = 'executing'")
    c:query("DROP INDEX tide_jobs_stopping")                  -- (migration 6's)
    c:query("UPDATE tide_schema SET version = 4")
    c:query("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'gone:1:1', lease_expires = "
      .. NOW .. " - 1000 WHERE id = $1", expired)
    c:query("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'alive:2:2', lease_expires = "
      .. NOW .. " + 600000 WHERE id = $1", live)

    q = tide.queue.open(URL)
    assert.equal(pg.VERSION, c:query("SELECT version FROM tide_schema").rows[1].version)
    assert.is_true(pg.VERSION >= 5)
    assert.equal(0, #c:query("SELECT 1 FROM pg_indexes WHERE indexname = 'tide_jobs_leased'").rows)
    assert.equal(1, #c:query("SELECT 1 FROM pg_indexes WHERE indexname = 'tide_jobs_stopping'").rows)

    local s = pg.open(URL, "spec", {})
    local session = s:acquire("spec")
    local n = session:rescue()
    s:release(session, false)
    s:close()
    assert.equal(1, n)
    assert.equal("available", status(expired))
    assert.equal("executing", status(live))
    assert.equal("available", status(waiting))
    assert.equal("alive:2:2", c:query("SELECT lease_owner FROM tide_jobs WHERE id = $1", live).rows[1].lease_owner)
  end)

  it("rescues through tide_jobs_key_running on a big table of finished jobs, not by reading the table", function()
    q = tide.queue.open(URL)
    c:query([[INSERT INTO tide_jobs (queue, target, method, status, max_attempts, run_at, inserted_at, completed_at)
      SELECT 'default', 't', 'm', 'completed', 3, 0, 0, 0 FROM generate_series(1, 50000)]])
    c:query([[INSERT INTO tide_jobs (queue, target, method, status, attempt, max_attempts, run_at, inserted_at,
        lease_owner, lease_expires) SELECT 'default', 't', 'm', 'executing', 1, 3, 0, 0, 'w:1:1', ]] .. NOW
      .. [[ + 600000 FROM generate_series(1, 200)]])
    c:query("ANALYZE tide_jobs")
    c:query("BEGIN")
    local plan = {}
    for i, r in ipairs(c:query("EXPLAIN " .. pg.SQL.rescue).rows) do plan[i] = r["QUERY PLAN"] end
    c:query("ROLLBACK")
    plan = table.concat(plan, "\n")
    assert.truthy(plan:find("tide_jobs_key_running", 1, true), plan)
    assert.falsy(plan:find("Seq Scan", 1, true), plan)
  end)
end)
