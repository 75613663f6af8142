-- spec/review_rclock_spec.lua — a hostile review of 88b45af (the PostgreSQL store's times on the server's clock).
--
-- 1. Broken at 88b45af: a worker's clock stepped (NTP) after its store
--    measured its distance from the server's.  Store:now() was the wall
--    clock plus that offset, so the step went straight into every time
--    the worker wrote until the next measure (up to 60 s later): a worker
--    60 s ahead stepped back wrote leases that had run out already (its
--    flow_done hook was rescued and ran twice), and one 60 s behind stepped
--    forward delayed its retries by 60 s.  Store:now() now counts from the
--    server's time on the monotonic clock.
-- 2. Broken at 88b45af: a loop busy for 1 s while the measure's answer
--    waited put 500 ms into every time written.  A measure whose round
--    trip took over 50 ms is no longer taken.
-- 3. The re-measure inside Store:acquire on paths that could go wrong: a
--    task cancelled mid-measure, a backend killed before it (passed).
local tide = require "tide"
local H = spec_helper

local PG = os.getenv("TIDE_PG_URL")
local LIBFAKETIME = H.libfaketime()
local SERVER_NOW = "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS now"

package.path = "spec/fixtures/?.lua;" .. package.path


if not PG or (os.getenv("SANITIZE") or "") ~= "" then
  describe("review 88b45af", function() pending("needs PostgreSQL") end)
  return
end


describe("review 88b45af: the re-measure in Store:acquire", function()
  local q

  before_each(function() q = tide.queue.open(H.stores()[2].fresh(), { pool = 1 }) end)
  after_each(function()
    q:close()
    H.stores()[2].reset()
    H.assert_idle()
  end)

  it("survives a task cancelled while its acquire measures the clock", function()
    local Conn = require("tide.jobs.store.pg_conn").Conn
    local orig = Conn.query
    Conn.query = function(self, sql, ...)         -- a slow server answering the measure
      if sql:find("AS now", 1, true) then orig(self, "SELECT pg_sleep(0.3)") end
      return orig(self, sql, ...)
    end
    local ok, err = pcall(H.run, function()
      q._store.clock.measured = -math.huge
      local t = tide.spawn{ timeout = 100, run = function()
        return q:transaction(function(tx) return tx:enqueue{ target = "x", method = "y" } end)
      end }
      local other = tide.spawn(function() return q:enqueue{ target = "x", method = "z" } end)
      local st = t:await()
      assert.equal("timeout", st)
      local ost, id = other:await()
      assert.equal("ok", ost, tostring(id))
      local list = q:list{}
      assert.equal(1, #list)
      assert.equal("z", list[1].method)
      assert.equal(0, q:stats().pool.busy)
      local server = tonumber(H.sql(q, SERVER_NOW)[1].now)
      assert.is_true(math.abs(q:now() - server) < 1000)
    end)
    Conn.query = orig
    assert(ok, err)
  end)

  it("keeps the offset when the loop is busy while the measure's answer waits", function()
    local ok, err = pcall(H.run, function()
      q._store.clock.measured = -math.huge
      local a = tide.spawn(function() return q:job(1) end)       -- acquires: measures
      local b = tide.spawn(function()                            -- a job that holds the loop 1 s
        local t0 = require("tide.core").wallclock(true)
        while require("tide.core").wallclock(true) - t0 < 1000 do end
      end)
      a:await(); b:await()
      local server = tonumber(H.sql(q, SERVER_NOW)[1].now)
      local off = q:now() - server                     -- (client and server on one machine: about 0)
      assert(math.abs(off) < 100, ("q:now() is %d ms off the server's clock: the stall went into it"):format(off))
    end)
    assert(ok, err)
  end)

  -- Broken at 88b45af: the measure's estimate of the server's clock was
  -- 1-2 ms ahead here (client and server on one machine: true offset 0;
  -- the server's ms rounded, the client's truncated, the reply's path).  A
  -- job due "now" was then due a little later on the server's clock: the
  -- claim its enqueue wakes found nothing due, and the job waited for the
  -- poll (12 of 40 jobs at 2 ms).  The estimate is now never ahead.
  it("starts a job enqueued for now at once: the store's clock is never ahead of the server's", function()
    local function server() return tonumber(H.sql(q, SERVER_NOW)[1].now) end
    local ok, err = pcall(H.run, function()
      local started = {}
      local w = tide.worker{ queue = q, concurrency = 2, poll = 1000,
                             targets = { lat = { go = function(args) started[args[1]] = tide.now() end } } }
      tide.sleep(200)
      local slow, ahead = {}, {}
      for i = 1, 40 do
        q._store.clock.measured = -math.huge           -- measured again by the enqueue's acquire
        local t0 = tide.now()
        q:enqueue{ target = "lat", method = "go", args = { i } }
        H.wait_for(function() return started[i] end, 3000, 1)
        if not started[i] or started[i] - t0 > 200 then slow[#slow + 1] = i end
        local mine = q:now()
        if mine > server() then ahead[#ahead + 1] = i end
        tide.sleep(5)
      end
      w:stop(); w:wait()
      assert.equal(0, #slow, #slow .. " of 40 jobs enqueued for now waited for the poll (1 s)")
      assert.equal(0, #ahead, "q:now() was ahead of the server's clock " .. #ahead .. " times in 40")
    end)
    assert(ok, err)
  end)

  -- A flow step is released in the transaction that completes its last
  -- dependency, and stamped queued_at then; the dependencies completed
  -- before may have been stamped by other processes, each with its own
  -- reading of the server's clock (behind it by up to a round trip).  A
  -- reading behind by more than the time between two completions stamped
  -- the release before the completion it follows.  The release is now
  -- stamped no earlier than the server's own clock after its lock waits.
  it("never stamps a flow step's release before the completion of a dependency another worker made", function()
    _G.DFLOW_ORDER = 0
    local ok, err = pcall(H.run, function()
      local a = tide.worker{ queue = q, concurrency = 4, poll = 20 }
      local run = q:enqueue_flow("dflow_order", {})
      assert.is_true(H.wait_for(function()
        local by = {}
        for _, st in ipairs(q:flow_run(run).steps) do by[st.name] = st end
        return by.first.status == "ok" and _G.DFLOW_ORDER == 1
      end, 5000), "the first steps did not run")
      a:stop(); a:wait()
      -- Another worker, its reading of the server's clock well behind (as a
      -- reading a long round trip ago could be), completes `retried`.
      local q2 = tide.queue.open(PG)
      q2._store.clock.server = q2._store.clock.server - 60000
      q2._store.clock.measured = math.huge           -- (no measure to put it right during the test)
      local b = tide.worker{ queue = q2, concurrency = 4, poll = 20 }
      assert.is_true(H.wait_for(function() return q:flow_run(run).status == "ok" end, 5000), "the flow did not end")
      b:stop(); b:wait()
      q2:close()
      local by = {}
      for _, st in ipairs(q:flow_run(run).steps) do by[st.name] = st end
      assert(by.last.queued_at >= by.first.completed_at, ("'last' queued %d ms before 'first' completed")
        :format(by.first.completed_at - by.last.queued_at))
    end)
    assert(ok, err)
  end)

  it("measures again on a connection whose backend was killed, and the caller's statement runs", function()
    local ok, err = pcall(H.run, function()
      q:enqueue{ target = "x", method = "y" }
      local admin = require("tide.jobs.store.postgres").connect(PG)
      admin:query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        .. "AND datname = current_database() AND backend_type = 'client backend'")
      admin:close()
      tide.sleep(100)
      q._store.clock.measured = -math.huge
      assert.equal(1, #q:list{})
      assert.is_true(q._store.clock.measured > 0)
    end)
    assert(ok, err)
  end)
end)

if not LIBFAKETIME then
  describe("review 88b45af: a clock stepped", function() pending("needs libfaketime") end)
  return
end

describe("review 88b45af: a worker's clock stepped after its store measured it", function()
  local bed, q, clockfile

  before_each(function()
    bed = H.skew_bed()
    q, clockfile = bed.q, bed.dir .. "/clock"
  end)

  after_each(function()
    bed:close()
    H.assert_idle()
  end)

  local function set_clock(spec)
    local f = assert(io.open(clockfile, "w"))
    f:write(spec, "\n")
    f:close()
  end

  --- Starts `tide worker` whose wall clock reads $clockfile (re-read at every read of the clock).
  local function worker(args)
    bed:worker(("LD_PRELOAD=%s FAKETIME_TIMESTAMP_FILE=%s FAKETIME_NO_CACHE=1 FAKETIME_DONT_FAKE_MONOTONIC=1")
      :format(LIBFAKETIME, clockfile), args)
  end

  --- Starts a worker with its clock at `from` ("+60s"); once it has read
  --- the server's clock and claimed a job, steps its clock to the right
  --- time (as NTP would).  Inside a task.
  local function stepped_worker(from, args)
    set_clock(from)
    worker(args)
    local probe = q:enqueue{ target = "skew", method = "fail_once", max_attempts = 1 }
    assert.is_true(H.wait_for(function() return q:job(probe).status ~= "available" end, 10000), "worker never claimed")
    set_clock("+0s")
    tide.sleep(200)
  end

  it("keeps the hook's lease of a worker 60 s ahead whose clock is then stepped back", function()
    H.run(function()
      stepped_worker("+60s", "--concurrency 4 --lease 20000")
      -- A worker of another queue, with the right clock, rescuing every 50 ms
      -- (started first: the flow's steps are quick).
      local rescuer = tide.worker{ queue = q, queues = { nothing_here = 1 }, rescue_every = 50, poll = 50 }
      tide.sleep(200)
      local run = q:enqueue_flow("skew_flow", {})
      assert.is_true(H.wait_for(function() return q:flow_run(run).status == "ok" end, 15000),
        "the flow did not end within 15 s")
      assert.is_true(H.wait_for(function() return bed:lines("hook") > 0 end, 5000), "the flow_done hook never ran")
      local hook = H.sql(q, "SELECT id, lease_expires, attempted_at, inserted_at, status FROM tide_jobs WHERE method = 'hook'")[1]
      local what = hook and ("hook job: inserted %+d ms, attempted %+d ms, lease ends %+d ms from the server's now")
        :format(hook.inserted_at - q:now(), (hook.attempted_at or 0) - q:now(), (hook.lease_expires or 0) - q:now())
      tide.sleep(2500)
      rescuer:stop()
      rescuer:wait()
      assert.equal(0, rescuer:info().rescued or 0, what)
      assert.equal(1, bed:lines("hook"))
    end)
  end)

  it("makes the retries of a worker 60 s behind whose clock is then stepped forward due on time", function()
    H.run(function()
      stepped_worker("-60s", "--concurrency 1 --lease 5000")
      local id = q:enqueue{ target = "skew", method = "fail_once" }
      assert.is_true(H.wait_for(function() return q:job(id).status == "completed" end, 15000),
        ("the failed job's retry did not run within 15 s: %s, due in %.1f s"):format(q:job(id).status,
          (q:job(id).run_at - q:now()) / 1000))
    end)
  end)
end)
