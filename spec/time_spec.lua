-- spec/time_spec.lua — tide.sleep, tide.now, tide.after, tide.every: they fire on time.
local tide = require "tide"

-- Timers never fire early; they may fire late by at most this much (ms).
-- Generous, so that a loaded CI machine under sanitizers passes.
local LATE = 60

describe("time", function()
  after_each(function()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().timers)
  end)

  it("tide.now is monotonic milliseconds", function()
    local a = tide.now()
    local b = tide.now()
    assert.is_true(b >= a)
    assert.is_number(a)
  end)

  it("tide.sleep waits at least the time asked, and not much more", function()
    spec_helper.run(function()
      for _, ms in ipairs({ 0, 1, 10, 50 }) do
        local t0 = tide.now()
        tide.sleep(ms)
        local dt = tide.now() - t0
        assert.is_true(dt >= ms - 0.001, ("slept %.3f for %d"):format(dt, ms))
        assert.is_true(dt < ms + LATE, ("slept %.3f for %d"):format(dt, ms))
      end
    end)
  end)

  it("wakes sleepers in deadline order, ties in the order they slept", function()
    local order = {}
    spec_helper.run(function()
      for _, d in ipairs({ 30, 10, 20, 10, 0 }) do
        tide.spawn(function() tide.sleep(d); order[#order + 1] = d end)
      end
    end)
    assert.same({ 0, 10, 10, 20, 30 }, order)
  end)

  it("tide.sleep(0) lets sockets be served: a request is answered while 100 tasks loop on it", function()
    -- libuv 1.44 keeps running its timer phase while a callback re-arms a
    -- 0 ms timer, and never gets to poll sockets: a request used to wait
    -- until the looping tasks stopped (3 s here).
    local http = require "tide.engine.http"
    local rounds, took, body = 0, nil, nil
    local status, err = tide.run(function()
      local srv = assert(http.serve{ handler = function() return 200, {}, "served" end })
      local done = false
      local t0 = tide.now()
      for _ = 1, 100 do
        tide.spawn(function()
          while not done and tide.now() - t0 < 3000 do tide.sleep(0); rounds = rounds + 1 end
        end)
      end
      local client = tide.spawn{ mode = "thread", args = { srv:url("/") }, run = function(url)
        local f = io.popen("env -u LD_PRELOAD curl -s -m 5 -w ' %{time_total}' '" .. url .. "'")
        local s = f:read("*a")
        f:close()
        return s
      end }
      local ok, out = client:await()
      done = true
      assert.equal("ok", ok, tostring(out))
      body, took = out:match("^(%S+) ([%d.]+)$")
      srv:close()
    end)
    assert.equal("ok", status, tostring(err))
    assert.equal("served", body)
    assert.is_true(tonumber(took) < 0.5, "answered after " .. tostring(took) .. " s")
    assert.is_true(rounds >= 100, "the looping tasks ran " .. rounds .. " rounds")
  end)

  it("tide.after runs its function once as a task, on time, and passes the timer", function()
    local fired, at, got
    spec_helper.run(function()
      local t0 = tide.now()
      local tm = tide.after(20, function(timer) fired = (fired or 0) + 1; at = tide.now() - t0; got = timer; tide.sleep(1) end)
      assert.equal(tostring(tm), "tide.Timer (pending)")
      tide.sleep(40)
      assert.equal(tm, got)
      assert.same({ nil, "timer:stop: the timer is not pending (it fired, or was stopped)" }, { tm:stop() })
    end)
    assert.equal(1, fired)
    assert.is_true(at >= 20 and at < 20 + LATE, "fired at " .. at)
  end)

  it("tide.every repeats until stopped", function()
    local times = {}
    spec_helper.run(function()
      local t0 = tide.now()
      tide.every(10, function(timer)
        times[#times + 1] = tide.now() - t0
        if #times == 5 then assert.is_true(timer:stop()) end
      end)
    end)
    assert.equal(5, #times)
    for i = 1, 5 do
      assert.is_true(times[i] >= 10 * i - 0.5, "fire " .. i .. " at " .. times[i])
      assert.is_true(times[i] < 10 * i + LATE * 2, "fire " .. i .. " at " .. times[i])
    end
  end)

  it("gives nil and a message for a timer asked for while the loop shuts down", function()
    spec_helper.run(function()
      tide.shutdown(100)
      assert.same({ nil, "tide.after: the loop is shutting down" }, { tide.after(1, function() end) })
      assert.same({ nil, "tide.every: the loop is shutting down" }, { tide.every(1, function() end) })
    end)
  end)

  it("a stopped timer never fires and does not keep the loop alive", function()
    local fired = false
    local t0 = tide.now()
    spec_helper.run(function()
      local tm = tide.after(5000, function() fired = true end)
      assert.is_true(tm:stop())
      assert.same({ nil, "timer:stop: the timer is not pending (it fired, or was stopped)" }, { tm:stop() })
    end)
    assert.is_false(fired)
    assert.is_true(tide.now() - t0 < 1000)
  end)

  it("reports an error in a timer callback to the error sink, not the loop", function()
    local seen
    tide.configure{ on_error = function(where, err) seen = where .. ": " .. tostring(err) end }
    local status = tide.run(function() tide.after(1, function() error("tick failed") end); tide.sleep(10) end)
    tide.configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err)) end }
    assert.equal("ok", status)
    assert.matches("^timer callback: .*tick failed", seen)
  end)

  it("keeps a hook added to one timer task's options to that task (the options are a shared template)", function()
    local S = require "tide.engine.sched"
    local seen = {}
    spec_helper.run(function()
      tide.after(1, function()
        S.on_attempt_end(S.current(), function() seen[#seen + 1] = "A's hook" end)
        tide.sleep(20)
        seen[#seen + 1] = "A done"
      end)
      tide.after(5, function() seen[#seen + 1] = "B" end)   -- ends while A sleeps
    end)
    assert.same({ "B", "A done", "A's hook" }, seen)
  end)

  it("fires 10,000 timers with random delays in deadline order", function()
    -- A timer's deadline lies in [lo, hi]: now() before and after starting
    -- it, plus its delay.  Fired in deadline order, every timer's hi is at
    -- least the largest lo fired before it.
    local max_lo, out_of_order, n = -math.huge, 0, 0
    spec_helper.run(function()
      for _ = 1, 10000 do
        local d = math.random(0, 20)
        local lo = tide.now() + d
        local hi
        tide.after(d, function()
          n = n + 1
          if hi < max_lo then out_of_order = out_of_order + 1 end
          if lo > max_lo then max_lo = lo end
        end)
        hi = tide.now() + d
      end
    end)
    assert.equal(10000, n)
    assert.equal(0, out_of_order)
  end)

end)

describe("a pending timer", function()
  after_each(function() spec_helper.assert_idle() end)

  it("holds under 100 bytes of Lua heap, its handle kept (100,000 pending)", function()
    -- A million pending timers are a workload of issue 21: each byte here is
    -- a megabyte there, marked on every collector cycle.  (Its handle is an
    -- FFI struct of 16 bytes; its key's three slots 24 more, and the slot
    -- array's room to grow.  A 4-key table made it 190 bytes, 8 slots 285.)
    local per
    spec_helper.run(function()
      local cb, list = function() end, {}
      for i = 1, 1000 do list[i] = tide.after(60000, cb) end   -- the arrays grown once
      for i = 1, 1000 do list[i]:stop() end
      collectgarbage(); collectgarbage()
      local before, n = collectgarbage("count"), 100000
      for i = 1, n do list[i] = tide.after(60000, cb) end
      collectgarbage(); collectgarbage()
      per = (collectgarbage("count") - before) * 1024 / n
      for i = 1, n do list[i]:stop() end
    end)
    assert.is_true(per < 100, ("%.0f bytes per pending timer"):format(per))
    assert.is_true(per > 40, ("%.0f bytes per pending timer: the measure is broken (the slots alone are 24)"):format(per))
  end)
end)
