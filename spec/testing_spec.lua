-- spec/testing_spec.lua — tide.testing: the virtual clock gives the real clock's outcomes in no time,
-- and the after-each checks catch what a test leaves behind.
local tide = require "tide"
local testing = tide.testing
local H = spec_helper

local dir = H.tempdir()

describe("tide.testing.clock", function()
  teardown(function() os.execute("rm -rf " .. dir) end)
  before_each(testing.before_each)
  after_each(testing.after_each)

  it("stops tide.now, and fires what falls due in order as time advances", function()
    local clock = testing.clock()
    local seen = {}
    H.run(function()
      local t0 = tide.now()
      tide.after(30, function() seen[#seen + 1] = "after 30 at " .. (tide.now() - t0) end)
      tide.spawn(function()
        tide.sleep(10)
        seen[#seen + 1] = "slept 10 at " .. (tide.now() - t0)
        tide.sleep(5)                               -- set while time advances: still in the span
        seen[#seen + 1] = "slept 15 at " .. (tide.now() - t0)
      end)
      local every = 0
      local tm = tide.every(7, function() every = every + 1 end)
      local before = tide.now()
      for _ = 1, 1000 do assert(tide.now() == before) end       -- does not move by itself
      assert.equal(t0 + 40, clock:advance(40))
      tm:stop()
      assert.equal(5, every)                                    -- at 7, 14, 21, 28, 35
      assert.equal(t0 + 40, tide.now())
    end)
    assert.same({ "slept 10 at 10", "slept 15 at 15", "after 30 at 30" }, seen)
  end)

  -- clock_step converted its target to nanoseconds by truncation: a
  -- target a hair under a whole nanosecond (most are, in binary) lost
  -- one, so advance(40) could land 1 ns short of t0 + 40 (CI met it once,
  -- at an uptime where it did), and many small advances drifted.
  it("advances by exactly what it is asked, with no drift over many small steps", function()
    local clock = testing.clock()
    H.run(function()
      local t0 = tide.now()
      for _ = 1, 1000 do clock:advance(0.1) end
      local drift = tide.now() - (t0 + 100)
      assert.is_true(math.abs(drift) < 1e-7, ("drifted by %.9f ms over 1,000 steps of 0.1 ms"):format(drift))
      local t1 = tide.now()
      assert.is_true(math.abs(clock:advance(40) - (t1 + 40)) < 1e-7)
    end)
  end)

  it("times out and retries on virtual time, with the real clock's outcome", function()
    local function scenario(clock)
      local attempts, status, value
      H.run(function()
        local t = tide.spawn{ timeout = 50, retry = { max_attempts = 4, base = 20, backoff = "exponential" },
          run = function()
            attempts = (attempts or 0) + 1
            if attempts < 4 then tide.sleep(1000) end          -- times out
            return "done after " .. attempts
          end }
        if clock then clock:advance(1000) end
        status, value = t:await()
      end)
      return status, value, attempts
    end
    local real = { scenario(nil) }
    local clock = testing.clock()
    local t0 = tide.now()
    local virtual = { scenario(clock) }
    assert.same(real, virtual)
    assert.same({ "ok", "done after 4", 4 }, virtual)
    -- (to the ns the loop counts in: at hours of uptime, a now of fractional
    -- ms plus 1000 comes back as 999.999999 ms later)
    assert.near(1000, tide.now() - t0, 1e-5)
  end)

  it("takes a worker with a flaky target through exponential backoff up to minutes, in milliseconds", function()
    local function scenario(clock, base, max, path)
      local gaps, job = {}, nil
      H.run(function()
        local q = tide.queue.open("sqlite:" .. path)
        local last
        local w = tide.worker{ queue = q, retry = { base = base, max = max, jitter = false },
          targets = { flaky = { go = function(_, j)
            local now = tide.now()
            if last then gaps[#gaps + 1] = now - last end
            last = now
            if j.attempt < 10 then error("not yet") end
          end } } }
        local id = q:enqueue{ target = "flaky", method = "go", max_attempts = 10 }
        if clock then
          clock:advance(40 * max)
        else
          repeat tide.sleep(10) until q:job(id).status == "completed" or q:job(id).status == "discarded"
        end
        job = q:job(id)
        w:stop()
        w:wait()
        q:close()
      end)
      return job, gaps
    end
    local real_job, real_gaps = scenario(nil, 4, 40, dir .. "/real.db")
    local clock = testing.clock()
    local virtual_job, virtual_gaps = scenario(clock, 4, 40, dir .. "/virtual.db")
    for _, j in ipairs{ real_job, virtual_job } do
      assert.equal("completed", j.status)
      assert.equal(10, j.attempt)
      assert.equal(9, #j.errors)
    end
    -- the backoff, plus the 1 ms the worker waits past a retry's due time before it claims
    local function assert_gaps(expected, gaps)
      assert.equal(#expected, #gaps)
      for i, ms in ipairs(expected) do
        -- (1e-6: tide.now() is ns / 1e6 in a double; the difference of two
        -- such readings 256 s apart can fall short by a rounding step)
        assert.is_true(gaps[i] >= ms - 1e-6 and gaps[i] <= ms + 1, ("gap %d: %.9f ms, backoff %g"):format(i, gaps[i], ms))
      end
    end
    assert.equal(9, #real_gaps)
    assert_gaps({ 4, 8, 16, 32, 40, 40, 40, 40, 40 }, virtual_gaps)
    for i, gap in ipairs(real_gaps) do assert.is_true(gap >= virtual_gaps[i] - 1, "real gap " .. i) end
    -- minutes of backoff (1 s doubling to 5 min, 8.5 min in all), in real milliseconds
    local started = os.clock()
    local long_job, long_gaps = scenario(clock, 1000, 300000, dir .. "/long.db")
    assert.equal("completed", long_job.status)
    assert_gaps({ 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000 }, long_gaps)
    assert.is_true(os.clock() - started < 5, "took " .. (os.clock() - started) .. " s of CPU")
  end)

  it("runs a supervisor storm past its intensity on virtual time, as on the real clock", function()
    local function scenario(clock)
      local events, t0 = {}, tide.now()
      H.run(function()
        local sup
        sup = tide.supervisor{ name = "storm", intensity = 2, period = 1000, cooldown = { base = 50, max = 200 },
          on_give_up = function()
            events[#events + 1] = "gave up"
            if #events > 16 then return "stop" end
          end,
          children = { { id = "c", start = function() events[#events + 1] = "start"; tide.sleep(10); error("crash") end } } }
        sup:start()
        if clock then clock:run_until_idle() end
        sup:await()
      end)
      testing.errors()                       -- the supervisor reports each give-up: expected here
      return events, tide.now() - t0
    end
    local real, real_ms = scenario(nil)
    local clock = testing.clock()
    local virtual, virtual_ms = scenario(clock)
    assert.same(real, virtual)
    assert.same({ "start", "start", "start", "gave up" }, { unpack(virtual, 1, 4) })
    -- 3 starts 10 ms apart, then cool-downs of 50, 100, 200, 200 ms between the five runs
    assert.equal(5 * 30 + 50 + 100 + 200 + 200, virtual_ms)
    assert.is_true(real_ms >= virtual_ms)
  end)

  it("makes scheduled jobs due as it advances: the wall clock moves with it", function()
    local clock = testing.clock()
    local ran
    H.run(function()
      local q = tide.queue.open("sqlite:" .. dir .. "/sched.db")
      local wallclock = require("tide.core").wallclock
      local w = tide.worker{ queue = q, targets = { t = { m = function() ran = wallclock() end } } }
      local id = q:enqueue{ target = "t", method = "m", delay = 3600000 }   -- in an hour
      -- (measured on the wall clock against the job's own due time: the
      -- wall clock also moves with real time, which the virtual tide.now
      -- does not, so "an hour after a tide.now taken before the enqueue"
      -- could come a fraction of a ms early)
      local due = q:job(id).run_at
      clock:advance(3599000)
      assert.is_nil(ran)
      clock:advance(2000)
      assert.is_true(ran ~= nil and ran >= due and ran - due <= 1100)
      w:stop(); w:wait(); q:close()
    end)
  end)

  it("advances from outside any task too, driving the loop itself", function()
    local clock = testing.clock()
    local fired = {}
    local t = tide.spawn(function() tide.sleep(500); fired[#fired + 1] = "task" end)
    tide.after(200, function() fired[#fired + 1] = "timer" end)
    clock:advance(300)
    assert.same({ "timer" }, fired)
    assert.near(200, clock:run_until_idle(), 1e-5)    -- from 300 to the task waking at 500 (to the ns)
    assert.same({ "timer", "task" }, fired)
    assert.equal("ok", t:status())
  end)

  it("advances by a huge finite span: everything pending fires, and the clock moves far ahead", function()
    local clock = testing.clock()
    local fired = {}
    local t0 = tide.now()
    tide.after(1000, function() fired[#fired + 1] = "1 s" end)
    tide.after(1e12, function() fired[#fired + 1] = "31 years" end)       -- the longest delay a timer takes
    local now = clock:advance(1e300)
    assert.same({ "1 s", "31 years" }, fired)
    assert.is_true(now - t0 >= 1e12, "the clock moved " .. (now - t0) .. " ms")
    clock:stop()
  end)

  it("checks its arguments", function()
    local clock = testing.clock()
    H.error_cases("spec/testing_spec.lua", {
      { function() clock:advance(-1) end, "clock:advance: bad argument #1 (non-negative number of ms expected, got number -1)" },
      { function() clock:run_until_idle("x") end, "clock:run_until_idle: bad argument #1 (non-negative number of ms expected, got string \"x\")" },
      { function() clock.advance({}, 1) end, "clock:advance: bad self (clock expected, got table)" },
    })
    clock:stop()
    H.error_cases("spec/testing_spec.lua", {
      { function() clock:advance(1) end, "clock:advance: this clock was stopped (tide.testing.clock() starts another)" },
    })
  end)
end)

describe("tide.testing.after_each", function()
  it("fails a test that left a task live, or an error nobody took", function()
    testing.before_each()
    local t = tide.spawn(function() tide.sleep(10) end)
    local ok, err = pcall(testing.after_each)
    assert.is_false(ok)
    assert.matches("tide.testing: 1 task still live", err)
    H.run(function() t:await() end)

    testing.before_each()
    H.run(function() tide.spawn(function() error("lost", 0) end) end)
    ok, err = pcall(testing.after_each)
    assert.is_false(ok)
    assert.matches("error sent to the sink: task %d+ failed %(error%) and nobody heard it: lost", err)

    testing.before_each()
    H.run(function() tide.spawn(function() error("expected", 0) end) end)
    assert.equal(1, #testing.errors())
    testing.after_each()                         -- taken: nothing left to complain about
  end)
end)
