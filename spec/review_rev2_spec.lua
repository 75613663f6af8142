-- spec/review_rev2_spec.lua — a hostile review of the day's changes (334bb0f..5e37406): bulk job changes, pools,
-- metrics on loopback, the command line: one test per defect found, each failing before its fix.
local tide = require "tide"
local H = spec_helper
local cjson = require "cjson"

describe("review rev2: pool:submit on a full thread or process pool", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: only a plain function was checked before "queue full"; its
  -- arguments, and an option table's run and args, were not: a full pool
  -- answered nil, "queue full" to a call a pool with room raised for.
  it("checks the arguments and an option table's run before answering queue full", function()
    H.run(function()
      local p = tide.pool{ concurrency = 1, queue_limit = 0, mode = "thread" }
      local busy = p:submit(function() local t0 = os.clock() while os.clock() - t0 < 0.2 do end end)
      local up = 1
      H.error_cases("spec/review_rev2_spec.lua", {
        { function() p:submit(function(x) return x end, function() end) end,
          "pool:submit: args[1]: functions cannot cross to a thread" },
        { function() p:submit{ run = function(x) return x end, args = { function() end } } end,
          "pool:submit: args[1]: functions cannot cross to a thread" },
        { function() p:submit{ run = function() return up end } end,
          "pool:submit: bad option 'run' (a function with upvalues cannot cross to a thread: upvalue 'up')" },
      })
      assert.same({ nil, "pool:submit: queue full (0 waiting, queue_limit 0)" },
                  { p:submit(function(x) return x end, 1) })
      assert.equal("ok", (busy:await()))
    end)
  end)
end)

describe("review rev2: metrics served by the command line", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: `tide run|worker|web --metrics 127.0.0.1:PORT` (tide.cli.web's
  -- listen) served the metrics with no token and no Host check: the DNS
  -- rebinding that tide.metrics.serve now refuses read them there.
  it("refuses a Host that does not name this machine, alone or beside the dashboard", function()
    local codes = {}
    H.run(function()
      local web = require "tide.cli.web"
      local q = tide.queue.open("sqlite::memory:")
      local alone = assert(web.listen("tide worker", { metrics = "127.0.0.1:0" }))
      local both = assert(web.listen("tide web", { web = "127.0.0.1:0", metrics = "127.0.0.1:0", queue = q }))
      local function code(srv, host)
        return (H.sh_on_thread(("env -u LD_PRELOAD curl -s -o /dev/null -w '%%{http_code}' -H 'Host: %s' '%s'")
          :format(host, srv:url("/metrics"))))
      end
      codes.alone_local = code(alone.metrics, "127.0.0.1")
      codes.alone_rebound = code(alone.metrics, "attacker.example")
      codes.both_local = code(both.metrics, "localhost")
      codes.both_rebound = code(both.metrics, "attacker.example")
      for _, l in ipairs{ alone, both } do for _, s in ipairs(l.servers) do s:close() end end
      q:close()
    end)
    assert.same({ alone_local = "200", alone_rebound = "403", both_local = "200", both_rebound = "403" }, codes)
  end)
end)

describe("review rev2: bulk changes from a task's code inside a C call (SQLite)", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: the loop's turn between batches (tide.sleep(0)) was taken
  -- whenever the caller was a task, even where it cannot wait (a gsub or
  -- sort callback): the first batch was committed, then the call raised
  -- "tide.sleep: cannot wait inside a C call".  A SQLite store needs no
  -- wait, and before the change the call worked there.
  it("changes every job, turning the loop only where it can", function()
    local got = {}
    H.run(function()
      local q = tide.queue.open("sqlite::memory:")
      for _ = 1, 5 do q:enqueue{ target = "t", method = "m", run_at = 4102444800000 } end
      local ok, n
      string.gsub("x", "x", function() ok, n = pcall(q.cancel_all, q, { status = "scheduled", batch = 2 }) end)
      got.ok, got.n = ok, n
      q:close()
    end)
    assert.same({ true, 5 }, { got.ok, got.n })
  end)
end)

describe("review rev2: tide jobs fail --status", function()
  local dir = H.tempdir()
  local tidecli = H.cli(dir)
  teardown(function() os.execute("rm -rf " .. dir) end)

  -- Broken: `tide jobs fail 2 --status scheduled` (an ID, and --status
  -- added by mistake) took "2" for the reason and discarded every
  -- scheduled job; retry and cancel refuse an ID beside --status.
  it("refuses an ID beside --status, changing nothing", function()
    local store = ("sqlite:%s/fail.db"):format(dir)
    for _ = 1, 3 do tidecli("enqueue", store, "--delay 1h pay m") end
    local status, out, err = tidecli("jobs", store, "fail 2 --status scheduled")
    assert.equal(2, status, out)
    assert.matches("^tide jobs: fail: give an ID or %-%-status, not both", err)
    assert.equal("", out)
    local _, list = tidecli("jobs", store, "list --json")
    for _, j in ipairs(cjson.decode(list)) do assert.equal("scheduled", j.status) end
    -- a reason in words still goes
    status, out, err = tidecli("jobs", store, "fail --status scheduled the card expired")
    assert.equal(0, status, err)
    assert.equal("3 scheduled jobs discarded\n", out)
  end)
end)

describe("review rev2: a fan-out whose child fails during a shutdown", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: during a shutdown's grace, a child that failed cancelled its
  -- siblings (exit_on_error), and those cancels were taken for the
  -- shutdown's: the node ended "cancelled: child 2 was cancelled:
  -- shutdown", the run cancelled, and the failure was lost.
  it("ends the node in error, naming the failed child, not as cancelled by the shutdown", function()
    local out = { children = {} }
    H.run(function()
      local f = tide.flow{ name = "f", tasks = {
        b = { items = function() return { 1, 2, 3 } end, timeout = 5000, concurrency = 3,
              each = function(x)
                if x == 1 then tide.sleep(50); error("boom", 0) end
                tide.sleep(1000)
                return x
              end },
      }, on = { flow_done = function(ev) out.status, out.report = ev.status, ev.report end,
                child_done = function(ev) out.children[ev.index] = ev.status end } }
      local t = tide.spawn(function() return f:run() end)
      tide.sleep(10)
      tide.shutdown(5000)
      t:await()
    end)
    assert.same({ "error", "cancelled", "cancelled" }, out.children)
    assert.equal("error", out.status)
    local b = out.report.tasks.b
    assert.equal("error", b.status)
    assert.equal("child 1 ended in error: boom", b.error)
  end)
end)

describe("review rev2: a supervisor giving up", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: f323cbb refused terminate_child and restart_child while the
  -- supervisor cools down, but not in the moment before, while it gives up
  -- (its children stopping, each given its shutdown time): they answered
  -- true and did nothing, and the terminated child started again with the
  -- others at the end of the cool-down.
  it("refuses terminate_child and restart_child, saying so", function()
    local got, starts = {}, { c = 0, d = 0 }
    H.run(function()
      local sup = tide.supervisor{ name = "top", intensity = 1, period = 1000, cooldown = { base = 100, max = 100 },
        children = {
          { id = "d", shutdown = 200, start = function() starts.d = starts.d + 1; while true do tide.sleep(5) end end },
          { id = "c", start = function() starts.c = starts.c + 1; tide.sleep(20); error("boom") end } } }
      sup:start()
      for _ = 1, 200 do tide.sleep(2); if sup.state == "giving up" then break end end
      got.state = sup.state
      got.terminate = { sup:terminate_child("d") }
      got.restart = { sup:restart_child("c") }
      sup:stop()
      sup:await(2000)
    end)
    assert.equal("giving up", got.state)
    assert.same({ nil, "supervisor:terminate_child: 'top' is giving up (its children are stopping, and all start "
                  .. "again with it)" }, got.terminate)
    assert.same({ nil, "supervisor:restart_child: 'top' is giving up (its children are stopping, and all start "
                  .. "again with it)" }, got.restart)
  end)
end)

describe("review rev2: a SQLite job row whose errors column is not a JSON array", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken (found by the review, fixed after): errors written by hand as
  -- text that is not JSON made json_insert fail the whole statement.  One
  -- such row failing an attempt blocked the outcomes of every job recorded
  -- with it (6 jobs stayed executing, the batch retried for ever), and the
  -- lease rescuer, q:fail and q:fail_all failed on it the same way.  The
  -- text is kept now, as the first entry of the errors list.
  it("records every outcome of the batch, keeping the text as the first error", function()
    local dir = H.tempdir()
    local got = {}
    H.run(function()
      local q = tide.queue.open("sqlite:" .. dir .. "/jobs.db")
      local ids = {}
      for i = 1, 6 do ids[i] = q:enqueue{ target = "t", method = i == 3 and "bad" or "ok", queue = "q", max_attempts = 2 } end
      local other = q:enqueue{ target = "t", method = "ok", queue = "idle" }
      local obj = q:enqueue{ target = "t", method = "ok", queue = "idle" }
      q:transaction(function(tx)
        tx:exec("UPDATE tide_jobs SET errors = 'not json' WHERE id IN (?, ?)", ids[3], other)
        tx:exec("UPDATE tide_jobs SET errors = '{\"a\":1}' WHERE id = ?", obj)
      end)
      local w = tide.worker{ queue = q, queues = { q = 6 }, poll = 10, retry = { base = 5, max = 5, jitter = false },
        targets = { t = { ok = function() end, bad = function() error("fails", 0) end } } }
      local deadline = tide.now() + 5000
      repeat tide.sleep(10) until q:job(ids[3]).status == "discarded" or tide.now() > deadline
      w:stop(); w:wait()
      for i, id in ipairs(ids) do got[i] = q:job(id).status end
      got.errors = q:job(ids[3]).errors
      got.failed = { q:fail(other, "by hand") }
      got.other = q:job(other).errors
      got.bulk = q:fail_all({ status = "available", queue = "idle" }, "in bulk")
      got.obj = q:job(obj).errors
      q:close()
    end)
    os.execute("rm -rf " .. dir)
    assert.same({ "completed", "completed", "discarded", "completed", "completed", "completed" },
                { got[1], got[2], got[3], got[4], got[5], got[6] })
    assert.equal(3, #got.errors)
    assert.equal("not json", got.errors[1].error)
    assert.same({ "fails", "fails" }, { got.errors[2].error, got.errors[3].error })
    assert.is_true(got.failed[1])
    assert.same({ "not json", "by hand" }, { got.other[1].error, got.other[2].error })
    assert.equal(1, got.bulk)
    assert.same({ '{"a":1}', "in bulk" }, { got.obj[1].error, got.obj[2].error })
  end)
end)
