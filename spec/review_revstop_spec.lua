-- spec/review_revstop_spec.lua — review of "a job stopped by hand while it
-- runs keeps its lease until its worker has stopped it" (spec/stopping_spec):
-- the paths where that lease was not given up, or given up for the wrong
-- attempt.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

for _, store in ipairs(H.stores()) do
describe("review: a stopping job's lease, on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)

  local function lease_of(id) return q:job(id).lease_owner end

  -- Broken before: drain{ stop = false } looked at the worker's running
  -- jobs and pending outcomes only; the lease of the job it had just stopped
  -- was still held (its key's slot too) when it returned, and q:retry of
  -- that job said "still stopping".
  it("w:drain{ stop = false } returns once the lease of a job it stopped is given up", function()
    H.run(function()
      local started = {}
      local w = tide.worker{ queue = q, queues = { default = 2 }, poll = 10, heartbeat = 50,
        targets = { t = { long = function(_, job) started[job.id] = true; while true do tide.sleep(5) end end } } }
      -- (an unlease that waits a while for the store: the worker's call
      -- with (owner, ids) for arguments)
      local queue = require "tide.jobs.queue"
      local worker_call = queue.worker_call
      queue.worker_call = function(q_, s, fname, fn, ...)
        local n, a2 = select("#", ...), select(2, ...)
        if n == 2 and type(a2) == "table" then tide.sleep(200) end
        return worker_call(q_, s, fname, fn, ...)
      end
      local ok, err = pcall(function()
        local a = q:enqueue{ target = "t", method = "long" }
        assert.is_true(H.wait_for(function() return started[a] end, 3000))
        assert.is_true(q:cancel(a))
        w:drain{ stop = false }
        assert.is_nil(lease_of(a))
        assert.is_true(q:retry(a))
      end)
      queue.worker_call = worker_call
      w:stop()
      w:wait()
      assert(ok, err)
    end)
  end)

  -- Broken before: one failed unlease statement dropped the ids, so the
  -- key's slot stayed held until the lease ran out (30 s by default) and a
  -- rescue gave it up.
  it("gives a stopped job's lease up once the store answers again, not when the lease runs out", function()
    q:declare("k", { partition = "args.key", per_key = { concurrency = 1 } })
    H.run(function()
      local started = {}
      local w = tide.worker{ queue = q, queues = { k = 2 }, poll = 10, heartbeat = 50, lease = 30000,
        targets = { t = {
          long = function(_, job) started[job.id] = core.now(); while true do tide.sleep(5) end end,
          quick = function(_, job) started[job.id] = core.now() end } } }
      local session = w.lease_store:acquire("spec")
      local Session = getmetatable(session).__index
      w.lease_store:release(session)
      local unlease, fails = Session.unlease, 0
      Session.unlease = function(...)
        if fails < 2 then fails = fails + 1; error("store down (spec)") end
        return unlease(...)
      end
      local errors = require("tide.jobs.worker").totals.store_errors
      local unlease_errors, heartbeat_errors = errors.unlease or 0, errors.heartbeat
      local ok, err = pcall(function()
        local a = q:enqueue{ queue = "k", target = "t", method = "long", args = { key = "x" } }
        assert.is_true(H.wait_for(function() return started[a] ~= nil end, 3000))
        local b = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "x" } }
        assert.is_true(q:cancel(a))
        assert.is_true(H.wait_for(function() return started[b] ~= nil end, 3000))
        assert.equal(2, fails)
        assert.is_nil(lease_of(a))
        -- counted as what failed (tide_job_store_errors_total{operation="unlease"}), not as heartbeats
        assert.equal(unlease_errors + 2, errors.unlease)
        assert.equal(heartbeat_errors, errors.heartbeat)
      end)
      Session.unlease = unlease
      w:stop()
      w:wait()
      assert(ok, err)
    end)
  end)
  it("a stopping worker whose store keeps refusing the unlease gives up after a few tries, and stops", function()
    H.run(function()
      local started = {}
      local w = tide.worker{ queue = q, queues = { default = 2 }, poll = 10, heartbeat = 50, lease = 30000,
        targets = { t = { long = function(_, job) started[job.id] = true; while true do tide.sleep(5) end end } } }
      local session = w.lease_store:acquire("spec")
      local Session = getmetatable(session).__index
      w.lease_store:release(session)
      local unlease, tries = Session.unlease, 0
      Session.unlease = function() tries = tries + 1; error("store down (spec)") end
      local ok, err = pcall(function()
        local a = q:enqueue{ target = "t", method = "long" }
        assert.is_true(H.wait_for(function() return started[a] end, 3000))
        assert.is_true(q:cancel(a))
        assert.is_true(H.wait_for(function() return tries > 0 end, 3000))
        local t0 = tide.now()
        w:stop()
        w:wait()
        assert.is_true(tide.now() - t0 < 5000, ("stopped after %d ms"):format(tide.now() - t0))
        assert.is_true(tries <= 7, tries)
        assert.equal(w.id, lease_of(a))        -- left to run out
      end)
      Session.unlease = unlease
      if w.state ~= "stopped" then w:stop(); w:wait() end
      assert(ok, err)
    end)
  end)

  -- Broken before: the unlease matched the row by id and owner only.  A
  -- stopped attempt whose lease ran out (the store was down) was rescued,
  -- retried by hand and claimed again by the same worker, then cancelled
  -- again: the first attempt's late unlease gave up the second's lease
  -- while it still ran, and the next job of its key started beside it.
  it("gives up the lease of the attempt stopped, never a later attempt's", function()
    local id = q:enqueue{ target = "t", method = "m" }
    q:transaction(function(tx)
      tx:exec("UPDATE tide_jobs SET status = 'cancelled', completed_at = ?, attempt = 2, "
        .. "lease_owner = 'w:1:1', lease_expires = ? WHERE id = ?", core.wallclock(), core.wallclock() + 60000, id)
    end)
    H.run(function()
      local queue = require "tide.jobs.queue"
      local s = queue.worker_store(q)
      local session = s:acquire("spec")
      local ok, n1, n2 = pcall(function()
        return session:unlease("w:1:1", { { id = id, attempt = 1 } }),   -- a stale attempt: nothing
               session:unlease("w:9:9", { { id = id, attempt = 2 } })    -- another worker: nothing
      end)
      s:release(session)
      assert(ok, n1)
      assert.equal(0, n1)
      assert.equal(0, n2)
      assert.equal("w:1:1", lease_of(id))
      session = s:acquire("spec")
      local n3
      ok, n3 = pcall(session.unlease, session, "w:1:1", { { id = id, attempt = 2 } })
      s:release(session)
      if not queue.shares_store(q, s) then s:close() end
      assert(ok, n3)
      assert.equal(1, n3)
      assert.is_nil(lease_of(id))
    end)
  end)
  -- Broken before: q:retry_flow of a run cancelled while a step ran
  -- released that step again at once, while the cancelled attempt still
  -- ran on its worker (and held its lease) until the worker's next
  -- heartbeat: the step ran twice at once.  q:retry says "still stopping"
  -- for such a job; so does q:retry_flow for its run now.
  it("q:retry_flow refuses a run whose cancelled step is still stopping", function()
    package.path = "spec/fixtures/?.lua;" .. package.path
    _G.DFLOW = { calls = {}, slow = 5000, fixed = true }
    H.run(function()
      local id = q:enqueue_flow("dflow_continue", {})
      local w = tide.worker{ queue = q, poll = 20, concurrency = 10, heartbeat = 400 }
      -- The cancelled step stays "stopping" until the test lets its unlease
      -- through: the worker, in this same process, could otherwise stop it
      -- and give up its lease during q:retry_flow's own statements (a
      -- failure on a loaded machine).
      local session = w.lease_store:acquire("spec")
      local Session = getmetatable(session).__index
      w.lease_store:release(session)
      local unlease, hold = Session.unlease, true
      Session.unlease = function(...)
        while hold do tide.sleep(5) end
        return unlease(...)
      end
      local ok_, err_ = pcall(function()
        assert.is_true(H.wait_for(function() return (_G.DFLOW.calls.slow or 0) > 0 end, 5000))
        local slow_job
        for _, st in ipairs(q:flow_run(id).steps) do if st.name == "slow" then slow_job = st.job end end
        assert.is_true(q:cancel_flow(id))
        assert.equal(w.id, lease_of(slow_job))
        local ok, why = q:retry_flow(id)
        assert.is_nil(ok)
        -- (the slow step, or another step or item cancelled while it ran)
        local stopping = tonumber(why:match(("^run %d: its job (%%d+) is cancelled and still stopping on worker "):format(id)
                                            .. w.id:gsub("%p", "%%%0") .. "$"))
        assert.is_number(stopping, why)
        hold = false
        assert.is_true(H.wait_for(function() return lease_of(slow_job) == nil end, 3000))
      end)
      hold = false
      Session.unlease = unlease
      assert(ok_, err_)
      _G.DFLOW.slow = 1
      assert.is_true(H.wait_for(function() return q:retry_flow(id) end, 3000))
      w:drain{ stop = true }
      assert.equal("ok", q:flow_run(id).status)
      assert.equal(2, _G.DFLOW.calls.slow)
    end)
    _G.DFLOW = nil
  end)
  -- Broken before: q:leases (and the web page of workers) counted the
  -- executing jobs only: a worker holding the lease, and the key's slot, of
  -- a job it had not yet stopped was not listed.
  it("q:leases lists the leases of jobs still stopping", function()
    H.run(function()
      local started = {}
      local w = tide.worker{ queue = q, queues = { default = 2 }, poll = 10, heartbeat = 1000,
        targets = { t = { long = function(_, job) started[job.id] = true; while true do tide.sleep(5) end end } } }
      local a = q:enqueue{ target = "t", method = "long" }
      assert.is_true(H.wait_for(function() return started[a] end, 3000))
      local l = q:leases()
      assert.equal(1, #l)
      assert.equal(w.id, l[1].owner)
      assert.equal(1, l[1].n)
      assert.equal(0, l[1].stopping)
      assert.is_true(q:cancel(a))
      l = q:leases()
      assert.equal(1, #l)
      assert.equal(w.id, l[1].owner)
      assert.equal("default", l[1].queue)
      assert.equal(0, l[1].n)
      assert.equal(1, l[1].stopping)
      assert.is_number(l[1].lease_expires)
      w:stop()
      w:wait()
      assert.same({}, q:leases())
    end)
  end)
  -- The index of stopping jobs (SQLite migration 7, PostgreSQL 6) on a
  -- database of the version before, holding a running job: made, and the
  -- job's lease kept.  (Broken before: spec/pg_schema_spec's version-4
  -- database, its tide_schema set back by hand, met "relation
  -- tide_jobs_stopping already exists".)
  it("upgrades a database of the version before: the index made, a running job's lease kept", function()
    local id = q:enqueue{ target = "t", method = "m" }
    local pg = store.name == "postgres"
    local schema = require(pg and "tide.jobs.store.pg_schema" or "tide.jobs.store.sqlite_schema")
    local VERSION = pg and 6 or 7             -- (the index's migration: later ones run again too)
    q:transaction(function(tx)
      tx:exec("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'w:1:1', lease_expires = ? "
        .. "WHERE id = ?", core.wallclock() + 60000, id)
      tx:exec("DROP INDEX tide_jobs_stopping")
      tx:exec("UPDATE tide_schema SET version = " .. (VERSION - 1))
    end)
    local q2 = tide.queue.open(q.name)
    local ok, err = pcall(function()
      local idx = q2:transaction(function(tx)
        return tx:query(pg and "SELECT count(*) AS n FROM pg_indexes WHERE indexname = 'tide_jobs_stopping'"
                        or "SELECT count(*) AS n FROM sqlite_master WHERE name = 'tide_jobs_stopping'")[1].n
      end)
      assert.equal(1, tonumber(idx))
      assert.equal(schema.VERSION, tonumber(q2:transaction(function(tx)
        return tx:query("SELECT version FROM tide_schema")[1].version end)))
      assert.equal("w:1:1", q2:job(id).lease_owner)
      assert.equal("executing", q2:job(id).status)
    end)
    q2:close()
    assert(ok, err)
    -- set back by hand with the index still there: taken again, not refused
    q:transaction(function(tx) tx:exec("UPDATE tide_schema SET version = " .. (VERSION - 1)) end)
    q2 = tide.queue.open(q.name)
    q2:close()
  end)
end)
end
