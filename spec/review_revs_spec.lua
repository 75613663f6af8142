-- spec/review_revs_spec.lua — a hostile review of schedules, cron and supervision: one test per defect found.
local tide = require "tide"
local cron = require "tide.jobs.cron"
local time = require "tide.jobs.time"

local ticks = spec_helper.cron_ticks

describe("review revs: cron day fields", function()
  -- Broken: a day field written `*/S` was taken for `*` whenever the other
  -- day field was a star too, so "0 0 */2 * *" ran every day and
  -- "0 0 * * */2" every day of the week; and with the other field
  -- restricted, the step was dropped ("*/2 MON" ran every Monday).  Vixie
  -- cron (and cronie) match both day fields (AND) when either starts with
  -- `*`, either of them (OR) only when both are restricted.
  it("keeps the step of a */S day field (Vixie: AND when either field starts with *)", function()
    -- 2026-05-01 is a Friday
    assert.same({ "2026-05-03T00:00:00Z", "2026-05-05T00:00:00Z", "2026-05-07T00:00:00Z" },
                ticks("0 0 */2 * *", "2026-05-01T00:00:00Z", 3))
    assert.same({ "2026-05-02T00:00:00Z", "2026-05-03T00:00:00Z", "2026-05-05T00:00:00Z" },
                ticks("0 0 * * */2", "2026-05-01T00:00:00Z", 3))   -- Sat, Sun, Tue (0, 2, 4, 6)
    -- odd-numbered days that are Mondays: May 11, May 25, June 1
    assert.same({ "2026-05-11T00:00:00Z", "2026-05-25T00:00:00Z", "2026-06-01T00:00:00Z" },
                ticks("0 0 */2 * MON", "2026-05-01T00:00:00Z", 3))
    -- still OR when both are restricted, and a plain * still leaves the other alone
    assert.same({ "2026-05-04T00:00:00Z", "2026-05-11T00:00:00Z", "2026-05-15T00:00:00Z" },
                ticks("0 0 15 * MON", "2026-05-01T00:00:00Z", 3))
    assert.same({ "2026-05-04T00:00:00Z", "2026-05-11T00:00:00Z" }, ticks("0 0 * * MON", "2026-05-01T00:00:00Z", 2))
    -- the rarest such day: Feb 29 on a Sunday, 40 years apart across 2100
    -- (the search gave up after 30 years and the schedule never ran again)
    assert.same({ "2088-02-29T00:00:00Z", "2128-02-29T00:00:00Z" }, ticks("0 0 29 2 */7", "2080-01-01T00:00:00Z", 2))
  end)
end)

describe("review revs: tide.consumer", function()
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
  end)

  -- Broken: a consumer made with requeue = false (drop what fails) that
  -- ended while holding deliveries (cancelled, crashed, restarted by its
  -- supervisor) nacked them without requeue: messages that never failed
  -- were lost.  The promise (consumer.lua's header) is that a run that
  -- ends gives back what it holds, nacked with requeue.
  it("gives back what it holds when its run ends, even with requeue = false", function()
    spec_helper.quiet_errors()
    local src
    spec_helper.run(function()
      src = tide.sources.memory{ prefetch = 4 }
      for i = 1, 4 do src:publish("m" .. i) end
      local c = tide.consumer{ source = src, concurrency = 4, requeue = false,
                               handler = { run = function() tide.sleep(100000) end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(spec_helper.wait_for(function() return c.in_flight == 4 end, 2000))
      t:cancel("crash")
      assert.equal(4, src.nacked)
      assert.equal(4, src.queued)                  -- all four back in the queue, none lost
    end)
    spec_helper.settled_once(src)
  end)
end)

describe("review revs: tide.supervisor", function()
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
  end)

  -- Broken: `children` was read with ipairs only, so children given as a
  -- map ({ consumer = {...} }) or after a hole ({ a, nil, c }) were dropped
  -- without a word: a supervisor of nothing.
  it("refuses children that are not a list, or a list with holes", function()
    local f = function() end
    spec_helper.error_cases("spec/review_revs_spec.lua", {
      { function() tide.supervisor{ children = { consumer = { id = "c", start = f } } } end,
        "tide.supervisor: bad option 'children' (a list expected, it has the key consumer)" },
      { function() tide.supervisor{ children = { { id = "a", start = f }, nil, { id = "c", start = f } } } end,
        "tide.supervisor: bad option 'children[2]' (child spec table expected, got nil)" },
    })
  end)

  -- Broken: right after sup:start() (its task starts the children on the
  -- next tick), which_children said every child was "stopped" and the
  -- supervisor's state was "stopped": a caller checking its start saw a
  -- failure that was not one.  It is "starting", its children "pending".
  it("reports a supervisor just started as starting, and its children as pending", function()
    spec_helper.run(function()
      local sup = tide.supervisor{ name = "s", children = { { id = "a", start = function(ctx)
        while not ctx:stopping() do tide.sleep(1) end
      end } } }
      sup:start()
      assert.equal("starting", sup.state)
      assert.equal("pending", sup:which_children()[1].status)
      tide.sleep(5)
      assert.equal("running", sup.state)
      assert.equal("running", sup:which_children()[1].status)
      sup:stop()
      assert.equal("ok", (sup:await(1000)))
      assert.equal("stopped", sup.state)
      assert.equal("stopped", sup:which_children()[1].status)
    end)
  end)
end)

describe("review revs: supervisor child args", function()
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
  end)

  -- Broken: a child's args were counted with #args (tide.spawn counts them
  -- with args.n or table.maxn): { "a", nil, "c" } reached start as ctx,
  -- "a" alone; and a bad args.n was not checked at the call but raised
  -- inside the supervisor, which gave up over it.
  it("passes every argument, nils included, and checks args.n at the call", function()
    local got
    spec_helper.run(function()
      local sup = tide.supervisor{ children = { { id = "a", args = { "a", nil, "c" }, restart = "temporary",
        start = function(ctx, ...) got = { n = select("#", ...), ... } end } } }
      sup:start()
      tide.sleep(10)
      sup:stop()
      sup:await()
    end)
    assert.same({ n = 3, "a", nil, "c" }, got)
    spec_helper.error_cases("spec/review_revs_spec.lua", {
      { function() tide.supervisor{ children = { { id = "a", start = print, args = { n = "x" } } } } end,
        "tide.supervisor: bad option 'children[1].args.n' (non-negative integer expected, got string \"x\")" },
    })
  end)
end)

describe("review revs: a supervisor runs once at a time", function()
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
  end)

  local function idle_child(id)
    return { id = id, shutdown = 50, start = function(ctx) while not ctx:stopping() do tide.sleep(2) end end }
  end

  -- Broken: sup:start() refuses a supervisor that runs, but a parent did
  -- not: a running supervisor given as a child (or as two children, or as
  -- its own child through start_child) was started a second time over the
  -- same state.  The first run was orphaned (sup.task pointed at the new
  -- one: sup:stop() never reached it, and it ran until the loop's end);
  -- a supervisor made its own child never stopped at all.
  it("is refused as a child while it runs, at the caller's line", function()
    spec_helper.run(function()
      local inner = tide.supervisor{ name = "inner", children = { idle_child("a") } }
      inner:start()
      tide.sleep(5)
      local outer = tide.supervisor{ name = "outer", children = { { id = "i", start = inner } } }
      local twice = tide.supervisor{ name = "twice", children = { { id = "x", start = outer }, { id = "y", start = outer } } }
      spec_helper.error_cases("spec/review_revs_spec.lua", {
        { function() outer:start() end,
          "supervisor:start: child 'i' is supervisor 'inner', which is already running (a supervisor runs once at a time)" },
        { function() twice:start() end,
          "supervisor:start: children 'x' and 'y' are both supervisor 'outer' (a supervisor runs once at a time)" },
        { function() inner:start_child{ id = "me", start = inner } end,
          "supervisor:start_child: child 'me' is supervisor 'inner', which is already running (a supervisor runs once at a time)" },
      })
      assert.is_nil(outer.task)
      assert.equal("running", inner:which_children()[1].status)
      assert.is_true(inner:stop())
      assert.same({ "ok", "stopped" }, { inner:await(2000) })
    end)
  end)
end)

describe("review revs: cron in a zone whose clock change falls on a fixed date", function()
  -- Broken: Cron:next looped for ever (the loop and every task with it)
  -- when every wall time an interval schedule names falls in a clock gap:
  -- "* 0 21 3 *" in a zone whose rule jumps from 00:00 to 01:00 every
  -- March 21 (Asia/Tehran's rule until tzdata 2022b: "J79/24").  Interval
  -- schedules do not run in a gap; the search went on through every later
  -- year, never finding a tick and never stopping.  Now it skips a gap in
  -- one step and stops after 400 years (the calendar and a zone's rule
  -- repeat then): nil, like any schedule with no tick.
  it("finds no tick (and returns) for an interval schedule whose wall times all fall in a gap", function()
    local dir = os.tmpname(); os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/Test") == 0)
    local script = [[
      io.stdout:setvbuf("no")
      local function u32(v) return string.char(math.floor(v / 2^24) % 256, math.floor(v / 2^16) % 256,
                                               math.floor(v / 2^8) % 256, v % 256) end
      local function header() return "TZif2" .. ("\0"):rep(15) .. u32(0) .. u32(0) .. u32(0) .. u32(0) .. u32(1) .. u32(4) end
      local block = u32(12600) .. "\0\0" .. "ABC\0"       -- one type (+03:30), no transitions: the rule rules
      local f = assert(io.open(arg[1] .. "/Test/Tehran", "wb"))
      f:write(header(), block, header(), block, "\n<+0330>-3:30<+0430>,J79/24,J263/24\n")
      f:close()
      require "tide"
      local cron, time = require "tide.jobs.cron", require "tide.jobs.time"
      local from = time.parse_iso("2026-01-01T00:00:00Z")
      -- a fixed time in the gap runs when the gap ends (00:00 +03:30 = 01:00 +04:30)
      print(time.iso(cron.parse("30 0 21 3 *", "Test/Tehran"):next(from)))
      print(tostring((cron.parse("* 0 21 3 *", "Test/Tehran"):next(from))))
      print(tostring((cron.parse("* * 0 21 3 *", "Test/Tehran"):next(from))))
      -- an interval schedule with a wall time out of the gap runs then (01:00 +04:30)
      print(time.iso(cron.parse("*/30 0-1 21 3 *", "Test/Tehran"):next(from)))
    ]]
    local f = assert(io.open(dir .. "/gap.lua", "w")); f:write(script); f:close()
    local status, out = spec_helper.sh(("TZDIR=%s timeout 20 env LUA_CPATH='%s/?.so;;' luajit %s/gap.lua %s")
      :format(dir, spec_helper.build, dir, dir))
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.equal("2026-03-20T20:30:00Z\nnil\nnil\n2026-03-20T20:30:00Z\n", out)
  end)
end)

describe("review revs: schedules options", function()
  -- Broken: tide.worker's `schedules` was read with ipairs after a check
  -- against #list, which a hole can fool: { a, nil, c } passed and c was
  -- dropped without a word (never scheduled).
  it("refuses a list of schedules with a hole", function()
    local schedules = require "tide.jobs.schedules"
    local a = { cron = "* * * * *", target = "reports", method = "a" }
    local c = { cron = "0 * * * *", target = "reports", method = "c" }
    spec_helper.error_cases("spec/review_revs_spec.lua", {
      { function() schedules.check("tide.worker", { a, nil, c }) end,
        "tide.worker: bad option 'schedules[2]' (table expected, got nil)" },
    })
  end)
end)

describe("review revs: the scheduler and the wall clock", function()
  local testing = tide.testing
  local dir
  before_each(function()
    testing.before_each()
    dir = os.tmpname(); os.remove(dir); assert(os.execute("mkdir -p " .. dir) == 0)
  end)
  after_each(function()
    testing.after_each()
    os.execute("rm -rf " .. dir)
  end)

  -- Broken: the scheduler slept until the next tick on the monotonic clock
  -- (one timer for the whole wait, up to a day for a daily schedule) while
  -- ticks are wall times.  Where the two part — a suspended VM or laptop
  -- (CLOCK_MONOTONIC stands still during a suspend), an NTP step — the tick
  -- came as late as the clocks had parted: a daily 00:00 job resumed at
  -- 08:00 after a night's suspend ran at 16:00.  The wait is now at most a
  -- minute, so a tick is enqueued within a minute of its wall time.
  it("enqueues a tick within a minute when the wall clock jumps past it", function()
    local clock = testing.clock()
    local wallclock = require("tide.core").wallclock
    local skew = 1893499200000 - wallclock()   -- 2030-01-01T12:00:00Z: the next midnight is twelve hours away
    local before, after
    local ok, err = pcall(spec_helper.run, function()
      local q = tide.queue.open("sqlite:" .. dir .. "/jobs.db")
      -- The store's clock, which the scheduler reads (its workers share the
      -- queue's store on SQLite), runs on the skewed wall clock.
      q._store.now = function() return wallclock() + skew end
      local w = tide.worker{ queue = q, queues = { idle = 1 },
                             schedules = { { cron = "0 0 * * *", target = "beat", method = "tick", catch_up = false } } }
      clock:advance(1000)                    -- registered: it waits for midnight
      before = #q:list{}
      skew = skew + 12 * 3600 * 1000         -- the wall clock jumps past midnight; tide.now() does not
      clock:advance(61000)
      local jobs = q:list{}
      after = { #jobs, jobs[1] and jobs[1].idempotency_key }
      w:stop(); w:wait(); q:close()
    end)
    clock:stop()
    assert(ok, err)
    assert.equal(0, before)
    assert.same({ 1, "schedule:beat.tick@2030-01-02T00:00:00Z" }, after)
  end)
end)

describe("review revs: tide.consumer and a faulty source", function()
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
  end)

  --- A source whose first fetch returns `batch`, then nothing.
  local function source(batch)
    local s = { acks = 0, nacks = 0, n = 0 }
    function s.fetch() s.n = s.n + 1; if s.n == 1 then return batch end; tide.sleep(2); return {} end
    function s.ack() s.acks = s.acks + 1 end
    function s.nack() s.nacks = s.nacks + 1 end
    return s
  end

  -- Broken: a delivery a source returned twice (in one batch, or again
  -- while its handler ran) was counted in flight twice and settled once:
  -- the count never came back to 0, so the consumer's window shrank for
  -- good (prefetch such faults and it fetched nothing more: a zombie node)
  -- and a graceful stop waited for ever.  Now the second copy is reported
  -- and skipped: the delivery runs and settles once.
  it("runs and settles once a delivery its source returned twice, and still stops", function()
    spec_helper.quiet_errors()
    spec_helper.run(function()
      local d = { tag = 1, body = "x" }
      local src = source({ d, d })
      local ran = 0
      local c = tide.consumer{ source = src, concurrency = 4, handler = { run = function() ran = ran + 1 end } }
      local stop = false
      local t = tide.spawn(function() return c:run({ stopping = function() return stop end }) end)
      tide.sleep(30)
      stop = true
      assert.same({ "ok", "stopped" }, { t:await(1000) })
      assert.equal(1, ran)
      assert.equal(1, src.acks)
      assert.equal(0, c.in_flight)
      assert.equal(1, spec_helper.reported)
    end)
  end)

  -- Broken: a fetch that returned something else than a list ended the run
  -- with "attempt to get length of local 'batch' (a nil value)", an error
  -- inside tide that names neither the source nor what was expected.
  it("names the source's fault when fetch returns no list", function()
    spec_helper.quiet_errors()
    spec_helper.run(function()
      local src = source(nil)
      local c = tide.consumer{ source = src, handler = { run = function() end } }
      local t = tide.spawn(function() return c:run() end)
      local st, err = t:await(1000)
      assert.equal("error", st)
      assert.matches("consumer:run: consumer 'consumer': source:fetch returned nil (a list of deliveries expected)", err, 1, true)
    end)
  end)

  -- Broken: a batch refused for one bad item left its good deliveries
  -- unsettled: neither acked nor nacked, to a source (or a broker) that
  -- waits for one or the other.  They are now nacked with requeue, once
  -- each, before the run ends with the source's fault.
  it("gives back with requeue the good deliveries of a batch it refuses", function()
    spec_helper.quiet_errors()
    spec_helper.run(function()
      local d1, d2 = { tag = 1, body = "x" }, { tag = 2, body = "y" }
      local src = source({ d1, 42, d2 })
      local given = {}
      function src.nack(_, d, requeue) given[#given + 1] = { d.tag, requeue } end
      local ran = 0
      local c = tide.consumer{ source = src, requeue = false, handler = { run = function() ran = ran + 1 end } }
      local t = tide.spawn(function() return c:run() end)
      local st, err = t:await(1000)
      assert.equal("error", st)
      assert.matches("source:fetch returned a list whose item 2 is number 42 (a list of deliveries expected)", err, 1, true)
      table.sort(given, function(a, b) return a[1] < b[1] end)
      assert.same({ { 1, true }, { 2, true } }, given)
      assert.equal(0, ran)
      assert.equal(0, src.acks)
      assert.equal(0, c.in_flight)
    end)
  end)
end)

local PG_URL = os.getenv("TIDE_PG_URL")
if PG_URL then
describe("review revs: schedules on PostgreSQL", function()
  local testing = tide.testing
  after_each(testing.after_each)
  before_each(function()
    testing.before_each()
    local c = require("tide.jobs.store.postgres").connect(PG_URL)
    c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_schedules, tide_queues, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
    c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
    c:close()
  end)

  -- Broken: each worker's scheduler enqueued its schedules' ticks and
  -- advanced their rows in the order of its own list, taking the rows' and
  -- the keys' locks in that order: two workers whose lists were in another
  -- order (two --schedule files given the other way round, a rolling
  -- deploy that reorders the list) deadlocked.  PostgreSQL broke each
  -- deadlock after a second (deadlock_timeout), an error was reported and
  -- the ticks of both came late.  Now every worker takes them by name.
  it("does not deadlock two workers whose schedule lists are in another order", function()
    local count = {}
    spec_helper.run(function()
      local list, rev = {}, {}
      for i = 1, 6 do list[i] = { name = "s" .. i, cron = "* * * * * *", target = "beat", method = "tick" } end
      for i = 1, 6 do rev[i] = list[7 - i] end
      local ws = {}
      for k = 1, 4 do
        local q = tide.queue.open(PG_URL)
        ws[k] = { q = q, w = tide.worker{ queue = q, queues = { idle = 1 }, schedules = k % 2 == 0 and rev or list } }
      end
      tide.sleep(5000)
      for _, x in ipairs(ws) do x.w:stop(); x.w:wait() end
      for _, j in ipairs(ws[1].q:list{ limit = 1000 }) do
        count[j.idempotency_key] = (count[j.idempotency_key] or 0) + 1
      end
      for _, x in ipairs(ws) do x.q:close() end
    end)
    local errors = testing.errors()
    local deadlocks = 0
    for _, e in ipairs(errors) do if tostring(e.err):find("deadlock", 1, true) then deadlocks = deadlocks + 1 end end
    for key, n in pairs(count) do assert.equal(1, n, key) end
    assert.equal(0, deadlocks, "deadlocks reported")
    assert.equal(0, #errors)
  end)
end)
end
