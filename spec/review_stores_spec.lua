-- spec/review_stores_spec.lua — review of the stores' speed work (h16, h19, h21c):
-- prepared statements on PostgreSQL when the session changes under them,
-- and whatever else the review found.  Each test names what a user does.
local tide = require "tide"
local sql = spec_helper.sql                -- sql(q, stmt, ...): rows, in a transaction of q

for _, store in ipairs(spec_helper.stores()) do
describe("review: tide.queue on " .. store.name, function()
  local path, q, url

  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
  end)

  after_each(function()
    if q then q:close(); q = nil end
    store.reset(path)
    spec_helper.assert_idle()
  end)

  if store.name == "postgres" then
    describe("prepared statements when the session changes under them", function()
      before_each(function()
        q = tide.queue.open(url, { pool = 1 })          -- (one connection: sql(q, ) runs on tide's session)
        q:enqueue{ target = "t", method = "m" }         -- tide_insert prepared
      end)

      it("enqueues again after DEALLOCATE ALL ran on its connection", function()
        sql(q, "DEALLOCATE ALL")
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m" })
        assert.is_true(ok, id)
        assert.equal("available", q:job(id).status)
      end)

      it("enqueues again after a column of the result changed type (cached plan must not change result type)", function()
        sql(q, "ALTER TABLE tide_jobs ALTER COLUMN id TYPE numeric")
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m" })
        assert.is_true(ok, id)
        assert.equal(2, q:stats().total)
      end)

      it("prepares again when its statement's name was taken on the session (as a transaction pooler gives)", function()
        sql(q, "PREPARE tide_by_key(text) AS SELECT 0::bigint AS id")
        q:enqueue{ target = "t", method = "m", idempotency_key = "k" }
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m", idempotency_key = "k" })
        assert.is_true(ok, id)
        assert.equal(2, id)
      end)

      it("fails the transaction in which its statements were deallocated, and works in the next one", function()
        local ok, err = pcall(q.transaction, q, function(tx)
          tx:exec("DEALLOCATE ALL")
          tx:enqueue{ target = "t", method = "m" }
        end)
        assert.is_false(ok)
        assert.matches("tide_insert", tostring(err))
        local id = q:transaction(function(tx) return tx:enqueue{ target = "t", method = "m" } end)
        assert.equal("available", q:job(id).status)
        assert.equal(2, q:stats().total)
      end)
    end)

    -- A pooler in transaction mode cannot keep a session's prepared
    -- statements: with prepare = false (or ?prepare=false) tide sends each
    -- statement unprepared, on the pool's connections and the worker's.
    describe("without prepared statements (prepare = false)", function()
      local function prepared_here()
        return tonumber(sql(q, "SELECT count(*) AS n FROM pg_prepared_statements")[1].n)
      end
      --- Statements prepared on one of a worker's own stores (one connection).
      local function prepared_on(store)
        local session = store:acquire("spec")
        local ok, n = pcall(function()
          return tonumber(session.c:query("SELECT count(*) AS n FROM pg_prepared_statements").rows[1].n)
        end)
        store:release(session, not ok)
        assert(ok, n)
        return n
      end
      --- Enqueues 3 jobs (one by one, with a key, in a batch) and has a worker
      --- do them; returns how many ran and the statements prepared on the
      --- worker's claim and outcome connections.
      local function work()
        q:enqueue{ target = "t", method = "m", idempotency_key = "k1" }
        q:enqueue_many{ { target = "t", method = "m" }, { target = "t", method = "m", idempotency_key = "k2" } }
        local done, on_worker = 0, nil
        spec_helper.run(function()
          local w = tide.worker{ queue = q, concurrency = 2, targets = { t = { m = function() done = done + 1 end } } }
          w:drain{ stop = false }
          on_worker = prepared_on(w.claim_store) + prepared_on(w.store)
          w:stop()
          w:wait()
        end)
        return done, on_worker
      end

      it("prepares its hot statements by default (the check below can fail)", function()
        q = tide.queue.open(url, { pool = 1 })
        local done, on_worker = work()
        assert.equal(3, done)
        assert.is_true(prepared_here() > 0)
        assert.is_true(on_worker > 0)
      end)

      it("sends every statement unprepared with prepare = false or ?prepare=false, and works the same", function()
        for _, open in ipairs{ function() return tide.queue.open(url, { pool = 1, prepare = false }) end,
                               function() return tide.queue.open(url .. (url:find("?", 1, true) and "&" or "?")
                                                                   .. "prepare=false&pool=1") end } do
          q = open()
          sql(q, "DELETE FROM tide_jobs")
          assert.same({ 3, 0 }, { work() })
          assert.equal(0, prepared_here())
          assert.same({ 3, 3 }, { q:stats().total, q:stats().completed })
          q:close(); q = nil
        end
      end)

      it("refuses a prepare that is not a boolean, and prepare on SQLite", function()
        spec_helper.error_cases("spec/review_stores_spec.lua", {
          { function() tide.queue.open(url, { prepare = "no" }) end,
            "tide.queue.open: bad option 'prepare' (boolean expected, got string \"no\")" },
          { function() tide.queue.open(url .. (url:find("?", 1, true) and "&" or "?") .. "prepare=0") end,
            ("tide.queue.open: bad store URL %q (prepare=0: true or false expected)")
              :format(url .. (url:find("?", 1, true) and "&" or "?") .. "prepare=0") },
          { function() tide.queue.open(url .. (url:find("?", 1, true) and "&" or "?") .. "pool=x") end,
            ("tide.queue.open: bad store URL %q (pool=x: a number expected)")
              :format(url .. (url:find("?", 1, true) and "&" or "?") .. "pool=x") },
          { function() tide.queue.open("sqlite::memory:", { prepare = false }) end,
            "tide.queue.open: bad option 'prepare' (PostgreSQL only: SQLite keeps its statements in the process)" },
        })
      end)
    end)
  end
end)
end

-- The per-key indexes became partial (keyed jobs only: SQLite migration 6,
-- PostgreSQL migration 4).  A query reads a partial index only when the
-- planner can prove the index's predicate from the query's WHERE.
describe("review: the limited claim still reads the per-key index", function()
  -- Measured before the fix: 200,000 keyed jobs waiting in a limited queue
  -- (50 keys), a limited claim of 20 took 3.1 ms of CPU on main and 60.9 ms
  -- with migration 6: it walked the whole keyed backlog in tide_jobs_due
  -- looking for jobs without a key, at every claim.
  it("on SQLite: each key's first jobs through tide_jobs_key_due, the jobs without a key through an index of their own", function()
    local path = os.tmpname()
    os.remove(path)
    local q = tide.queue.open("sqlite:" .. path)
    q:close()
    local core = require "tide.core"
    local db = assert(core.sqlite_open(path, "plan", 0))
    local st = db:prepare("EXPLAIN QUERY PLAN " .. require("tide.jobs.store.sqlite").SQL.claim_limited)
    local rows = st:rows(1, "o", 3, "keyed", 10, 2)
    st:finalize()
    db:close()
    for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(path .. suffix) end
    local plan = {}
    for i, r in ipairs(rows) do plan[i] = r.detail end
    plan = table.concat(plan, "\n")
    assert.truthy(plan:find("USING INDEX tide_jobs_key_due (queue=? AND partition_key=?)", 1, true), plan)
    -- tide_jobs_due holds every waiting job: reading it here means walking the keyed ones
    assert.falsy(plan:find("INDEX tide_jobs_due ", 1, true), plan)
  end)
end)
