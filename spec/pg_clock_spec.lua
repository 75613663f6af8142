-- spec/pg_clock_spec.lua — on PostgreSQL, machines whose clocks disagree with the server's.
--
-- Workers and producers on several machines share one server, and their
-- clocks are never quite the same.  Every time the store compares (a job
-- due, a lease run out) is the server's, so every time written to be
-- compared must be too: a producer whose clock runs ahead must not delay
-- its jobs, a worker whose clock runs ahead must not delay its retries and
-- released flow steps, and one whose clock runs behind must not write
-- leases that have already run out (another worker's rescue then takes the
-- job back and it runs twice).  Each test runs `tide` processes under
-- libfaketime with the wall clock 60 s off (the monotonic clock left
-- alone).  Multi-process: skipped by `make sanitize`.
local tide = require "tide"
local H = spec_helper

local TIDE = H.build .. "/tide"
local PG = os.getenv("TIDE_PG_URL")
local SKEW = 60000

package.path = "spec/fixtures/?.lua;" .. package.path

-- libfaketime preloaded by hand: the faketime command forks, and a signal
-- to its pid would not reach the worker.
local LIBFAKETIME = H.libfaketime()

if not PG or (os.getenv("SANITIZE") or "") ~= "" or not LIBFAKETIME then
  describe("clocks that disagree with PostgreSQL's", function()
    pending("needs spec/run.sh's PostgreSQL and faketime (and is skipped by make sanitize)")
  end)
  return
end

--- The command prefix that runs a process with its wall clock `ms` off.
local function skewed(ms)
  return ("LD_PRELOAD=%s FAKETIME='%+ds' FAKETIME_DONT_FAKE_MONOTONIC=1"):format(LIBFAKETIME, ms / 1000)
end

describe("clocks that disagree with PostgreSQL's", function()
  local bed, q

  before_each(function()
    bed = H.skew_bed()
    q = bed.q
  end)

  after_each(function()
    bed:close()
    H.assert_idle()
  end)

  local function server_now()
    return tonumber(H.sql(q, "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS now")[1].now)
  end

  --- Starts `tide worker` with its clock off by `ms`.
  local function worker(ms, args) bed:worker(skewed(ms), args) end

  it("makes a producer's jobs due by the server's clock, not by the producer's", function()
    local script = H.write_file(bed.dir, "producer.lua", [[
      local tide = require "tide"
      local q = tide.queue.open(os.getenv("SKEW_URL"))
      local job = { target = "skew", method = "fail_once" }
      local ids = { (q:enqueue(job)), (q:enqueue{ target = "skew", method = "fail_once", delay = 5000 }) }
      for _, id in ipairs(q:enqueue_many{ job, job }) do ids[#ids + 1] = id end
      ids[#ids + 1] = q:transaction(function(tx) return (tx:enqueue(job)) end)
      print(table.concat(ids, " "))
      q:close()
    ]])
    local before = server_now()
    local p = assert(io.popen(("SKEW_URL='%s' %s timeout 60 %s run %s 2>&1"):format(PG, skewed(SKEW), TIDE, script)))
    local out = p:read("*a")
    p:close()
    local after = server_now()
    local ids = {}
    for id in out:gmatch("%d+") do ids[#ids + 1] = tonumber(id) end
    assert.equal(5, #ids, out)
    for i, id in ipairs(ids) do
      local delay = i == 2 and 5000 or 0
      local run_at = q:job(id).run_at
      assert(run_at >= before + delay - 1000 and run_at <= after + delay + 1000,
        ("job %d (of %d) is due %.1f s after the server's time of its enqueue (%d ms of delay asked)")
          :format(i, #ids, (run_at - after) / 1000, delay))
    end
  end)

  it("makes a worker's retries and released flow steps due by the server's clock", function()
    local id = q:enqueue{ target = "skew", method = "fail_once" }
    local run = q:enqueue_flow("skew_flow", {})
    worker(SKEW, "--concurrency 1 --lease 5000")
    H.run(function()
      assert.is_true(H.wait_for(function() return q:job(id).status == "completed" end, 15000),
        "the failed job's retry did not run within 15 s: " .. q:job(id).status)
      assert.is_true(H.wait_for(function() return q:flow_run(run).status == "ok" end, 15000),
        "the flow did not end within 15 s: " .. q:flow_run(run).status .. ", " .. bed:lines("item") .. " of 6 items run")
    end)
  end)

  it("keeps the lease a worker behind the server's clock gives a hook it starts itself", function()
    local run = q:enqueue_flow("skew_flow", {})
    worker(-SKEW, "--concurrency 4 --lease 20000")
    H.run(function()
      -- A worker of another queue, with the right clock, rescuing every 50 ms:
      -- a lease written as already run out is taken back at once.
      local rescuer = tide.worker{ queue = q, queues = { nothing_here = 1 }, rescue_every = 50, poll = 50 }
      assert.is_true(H.wait_for(function() return q:flow_run(run).status == "ok" end, 15000),
        "the flow did not end within 15 s")
      assert.is_true(H.wait_for(function() return bed:lines("hook") > 0 end, 5000), "the flow_done hook never ran")
      tide.sleep(2500)                                 -- the hook takes 2 s: a second start would show by now
      rescuer:stop()
      rescuer:wait()
      assert.equal(1, bed:lines("hook"))
      assert.equal(0, rescuer:info().rescued or 0)
    end)
  end)
end)
