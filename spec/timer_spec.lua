-- spec/timer_spec.lua — a timer's handle (tide.engine.timer) and its fires (tide.engine.fire):
-- handles kept past their timer, keys reused, handles dropped while pending, stops from other
-- callbacks, fires in deadline order among tasks' wake-ups, and the same without the FFI.
--
-- A handle holds no callback and no state of its own but its key: a timer is pending exactly
-- when its key's slots hold its handle.  A key is reused by the next timer once its timer fired
-- or was stopped, so each case below that keeps a handle checks that the key was indeed reused
-- (else it would attack nothing).
local tide = require "tide"
local testing = tide.testing
local H = spec_helper

local NOT_PENDING = "timer:stop: the timer is not pending (it fired, or was stopped)"

describe("a timer's handle", function()
  after_each(function() H.assert_idle() end)

  it("kept past its fire, stopped later, never stops the timer that took its key", function()
    local fired_b = 0
    H.run(function()
      local a = tide.after(0, function() end)
      tide.sleep(5)                                     -- a fired (and the sleep's timer after it)
      local b, others = nil, {}
      for _ = 1, 64 do                                  -- the freed keys are taken again, latest first
        local tm = tide.after(5, function() fired_b = fired_b + 1 end)
        if tm.key == a.key then b = tm; break end
        others[#others + 1] = tm
      end
      for _, tm in ipairs(others) do assert.is_true(tm:stop()) end
      assert.is_truthy(b, "the key was not reused: this case attacks nothing")
      assert.equal("tide.Timer (stopped)", tostring(a))
      assert.equal("tide.Timer (pending)", tostring(b))
      assert.same({ nil, NOT_PENDING }, { a:stop() })
      assert.same({ nil, NOT_PENDING }, { a:stop() })   -- and again: idempotent
      assert.equal("tide.Timer (pending)", tostring(b))
      tide.sleep(20)
    end)
    assert.equal(1, fired_b)
  end)

  it("stopped, then stopped again after its key was reused, leaves the new timer alone", function()
    local fired = {}
    H.run(function()
      local a = tide.after(60000, function() fired[#fired + 1] = "a" end)
      assert.is_true(a:stop())
      local b = tide.after(1, function() fired[#fired + 1] = "b" end)
      local c = tide.every(2, function(tm) fired[#fired + 1] = "c"; tm:stop() end)
      assert.is_true(a.key == b.key or a.key == c.key, "the key was not reused: this case attacks nothing")
      assert.same({ nil, NOT_PENDING }, { a:stop() })
      tide.sleep(20)
      assert.same({ nil, NOT_PENDING }, { c:stop() })
    end)
    table.sort(fired)
    assert.same({ "b", "c" }, fired)
  end)

  it("of a tide.every, kept and stopped from outside after many fires, stops it at once", function()
    local n, stopped_at, keys = 0, nil, {}
    H.run(function()
      local tm = tide.every(1, function(t) n = n + 1; keys[t.key] = true end)
      local others = {}                                 -- timers started and stopped meanwhile: keys churn
      while n < 10 do
        for i = 1, 5 do others[i] = tide.after(1000, function() error("never") end) end
        tide.sleep(1)
        for i = 1, 5 do assert.is_true(others[i]:stop()) end
      end
      assert.is_true(tm:stop())
      stopped_at = n
      assert.same({ nil, NOT_PENDING }, { tm:stop() })
      tide.sleep(10)
    end)
    assert.is_true(n <= stopped_at + 1, ("fired %d times, stopped at %d"):format(n, stopped_at))
    -- started again under the key that just fired, whatever else churns: no allocation when
    -- it goes on, so no finalizer's error can stop it half-way (timer.lua, every_fired)
    local distinct = 0
    for _ in pairs(keys) do distinct = distinct + 1 end
    assert.equal(1, distinct)
  end)

  it("dropped while pending, and collected meanwhile, still fires, with a handle", function()
    local got = {}
    H.run(function()
      for i = 1, 200 do
        tide.after(i % 7, function(tm) got[#got + 1] = tostring(tm) end)   -- nobody keeps the handle
      end
      collectgarbage(); collectgarbage()
      tide.sleep(30)
      collectgarbage(); collectgarbage()
    end)
    assert.equal(200, #got)
    for i = 1, 200 do assert.equal("tide.Timer (stopped)", got[i]) end    -- a fired tide.after is not pending
  end)

  it("is the object the callback receives, and rejects a bad self", function()
    H.run(function()
      local got
      local tm = tide.after(0, function(t) got = t end)
      tide.sleep(5)
      assert.is_true(rawequal(tm, got))
      local keyed = { [tm] = true }
      assert.is_true(keyed[got])
    end)
    H.error_like("timer:stop: bad self (timer expected, got table)", function()
      local tm = tide.after(1, function() end); tm:stop(); tm.stop({ key = tm.key })
    end)
    H.error_like("timer:stop: bad self (timer expected, got number 1)", function()
      local tm = tide.after(1, function() end); tm:stop(); tm.stop(1)
    end)
  end)
end)

describe("timers stopped from other timers' callbacks", function()
  after_each(function() H.assert_idle() end)

  it("each timer fires exactly once or is stopped while pending, never both, never neither (seeded)", function()
    local seed = os.time()
    math.randomseed(seed)
    local N = 3000
    local handles, fired, stopped, late_stop = {}, {}, {}, 0
    H.run(function()
      for i = 1, N do
        handles[i] = tide.after(math.random(0, 30), function(tm)
          fired[i] = (fired[i] or 0) + 1
          assert(rawequal(tm, handles[i]), "a callback got another timer's handle")
          for _ = 1, math.random(0, 3) do                  -- stop some others, pending or not
            local j = math.random(1, N)
            if handles[j]:stop() then stopped[j] = (stopped[j] or 0) + 1 else late_stop = late_stop + 1 end
          end
          if i % 5 == 0 then
            local k = tide.after(60000, function() error("never") end)  -- churn: takes a freed key
            assert.is_true(k:stop())
          end
          if i % 11 == 0 then tide.sleep(1) end             -- some become tasks, mid-batch
        end)
      end
      tide.sleep(60)
    end)
    for i = 1, N do
      local f, s = fired[i] or 0, stopped[i] or 0
      assert(f + s == 1, ("seed %d: timer %d fired %d times and was stopped %d times"):format(seed, i, f, s))
    end
    assert.is_true(late_stop > 0, "no stop of a fired timer: this case attacks less than it says")
  end)
end)

describe("timers under a finalizer storm", function()
  it("made, kept and stopped while finalizers raise: each made timer fires once or is stopped", function()
    -- LuaJIT 2.1 of 2022 rethrows a __gc finalizer's error from whatever allocation ran the
    -- collector step: making a handle, growing the key slots (runq), queueing a fire (fire.lua)
    -- may raise.  A tide.after that raised must have started nothing (its caller, retrying,
    -- would get a second fire), and one that returned a handle must fire or stop exactly once.
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "storm.lua", [[
      local tide = require "tide"               -- loaded with the JIT on: the FFI calls, then
      jit.off()                                 -- run by the interpreter (a raise at a trace exit crashes LuaJIT 2.1 of 2022)
      tide.configure{ on_error = function() end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local N = 20000
      local entered, handles, stopped = {}, {}, 0
      for k = 1, N do entered[k], handles[k] = 0, false end   -- no table grows during the storm
      local function arm(k) return tide.after(k % 5, function() entered[k] = entered[k] + 1; bomb() end) end
      collectgarbage("setpause", 10)
      tide.run(function()
        for k = 1, N do                                        -- (this task's own allocations are
          local ok, tm                                         -- protected: it must not die)
          repeat ok, tm = pcall(arm, k) until ok               -- (its callback is made inside the pcall)
          handles[k] = tm
          pcall(bomb)
          if k % 2 == 0 then
            local tm1 = handles[k - 1]
            local done, was_pending = pcall(tm1.stop, tm1)
            if not done then error("timer:stop raised: " .. tostring(was_pending)) end
            if was_pending then entered[k - 1] = entered[k - 1] + 1; stopped = stopped + 1 end
          end
        end
        repeat until pcall(tide.sleep, 50)
        storm.disarm()
      end)
      local once, other = 0, 0
      for k = 1, N do if entered[k] == 1 then once = once + 1 else other = other + 1 end end
      print(("timers %d once %d other %d stopped>0 %s live %d"):format(N, once, other, tostring(stopped > 0), tide.stats().live))
    ]], 120)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.matches("timers 20000 once 20000 other 0 stopped>0 true live 0", out)
  end)
end)

describe("fires and tasks' wake-ups", function()
  before_each(testing.before_each)
  after_each(testing.after_each)

  it("run in deadline order, and ties in the order they were started (virtual clock)", function()
    local clock = testing.clock()
    local order = {}
    H.run(function()
      local expected = {}
      for d = 10, 1, -1 do                              -- started latest first; per deadline, a
        tide.after(d, function() order[#order + 1] = "after " .. d end)   -- sleep between two fires
        tide.spawn(function() tide.sleep(d); order[#order + 1] = "sleep " .. d end)
        coroutine.yield()                                -- the sleeper starts its sleep
        tide.after(d, function() order[#order + 1] = "after' " .. d end)
      end
      for d = 1, 10 do
        expected[#expected + 1] = "after " .. d
        expected[#expected + 1] = "sleep " .. d
        expected[#expected + 1] = "after' " .. d
      end
      clock:advance(20)
      assert.same(expected, order)
    end)
  end)
end)

describe("timers without the FFI", function()
  it("keep every promise with table handles and the classic C calls", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "noffi.lua", [[
      package.loaded.ffi = nil
      package.preload.ffi = function() error("no FFI in this build") end
      local tide = require "tide"
      local fired, n, got = {}, 0, nil
      local st = tide.run(function()
        local a = tide.after(0, function(tm) got = tm; fired[#fired + 1] = "a" end)
        assert(type(a) == "table" and tostring(a) == "tide.Timer (pending)", tostring(a))
        tide.sleep(5)
        assert(got == a, "the callback got another handle")
        local b, others = nil, {}
        repeat
          b = tide.after(5, function() fired[#fired + 1] = "b" end)
          others[#others + 1] = b
        until b.key == a.key or #others == 64
        assert(b.key == a.key, "the key was not reused")
        for i = 1, #others - 1 do assert(others[i]:stop() == true) end
        assert(a:stop() == nil and b:stop() == true and b:stop() == nil)
        local e = tide.every(1, function(tm) n = n + 1; if n == 3 then assert(tm:stop()) end end)
        tide.after(2, function() tide.sleep(1); fired[#fired + 1] = "waited" end)
        tide.sleep(30)
        assert(e:stop() == nil)
        local z = tide.after(1000, function() fired[#fired + 1] = "z" end)
        tide.shutdown(0)
        assert(tostring(z) == "tide.Timer (stopped)")
      end)
      print(st, table.concat(fired, ","), n)
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.equal("ok\ta,waited\t3\n", out)
  end)
end)

-- The timers' public functions (and tide.run, tide.spawn) used after tide.core.close(), or in a first copy of tide retired
-- by a second one (tide.engine.runq): each error names the function and blames the caller's
-- line, with and without the FFI (the FFI's errors named a line of runq.lua, the retired
-- copy's none at all, and neither the function).  A timer stopped after close says true: it
-- can no longer fire.
describe("timers after the loop closed, or in a retired copy", function()
  local CLOSED = [[
    local tide = require "tide"
    local function try(f) local ok, err = pcall(f); print(ok, err) end
    local pending = tide.after(60000, function() end)
    print("closed", require("tide.core").close() ~= nil)
    try(function() local tm = tide.after(1, print); return tm end)
    try(function() local tm = tide.every(1, print); return tm end)
    try(function() local ok = tide.sleep(1); return ok end)
    try(function() local st = tide.run(print); return st end)
    try(function() local t = tide.spawn(print); return t end)
    print("stop", pending:stop())
    print("again", pending:stop())
  ]]

  local function expected_closed(file)
    return table.concat({
      "closed\ttrue",
      "false\t" .. file .. ":5: tide.after: the loop is closed",
      "false\t" .. file .. ":6: tide.every: the loop is closed",
      "false\t" .. file .. ":7: tide.sleep: called outside a task (start one with tide.run or tide.spawn)",
      "false\t" .. file .. ":8: tide.run: the loop is closed",
      "false\t" .. file .. ":9: tide.spawn: the loop is closed",
      "stop\ttrue",
      "again\tnil\t" .. NOT_PENDING, "" }, "\n")
  end

  it("blame the caller and name the function once the loop is closed (FFI calls)", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "closed.lua", CLOSED, 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.equal(expected_closed(dir .. "/closed.lua"), out)
  end)

  it("blame the caller and name the function once the loop is closed (classic calls)", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "closed_joff.lua", "jit.off() " .. CLOSED, 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.equal(expected_closed(dir .. "/closed_joff.lua"), out)
  end)

  it("blame the caller and name the function in a retired copy", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "retired.lua", [[
      local function clear() for k in pairs(package.loaded) do if k:match("^tide") and k ~= "tide.core" then package.loaded[k] = nil end end end
      local function try(f) local ok, err = pcall(f); print(ok, err) end
      local tide1 = require "tide"
      local fired; tide1.run(function() fired = tide1.after(1, function() end) end)
      clear()
      local tide2 = require "tide"
      assert(tide2 ~= tide1, "not a second copy: this case attacks nothing")
      print(tide2.run(function()
        try(function() local tm = tide1.after(1, print); return tm end)
        try(function() local tm = tide1.every(1, print); return tm end)
        try(function() local ok = tide1.sleep(1); return ok end)
        try(function() local t = tide1.spawn(print); return t end)
        print("stop", fired:stop())
      end))
      try(function() local st = tide1.run(print); return st end)
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    local file, retired = dir .. "/retired.lua", "this copy of tide's engine was replaced by a second one "
      .. "loaded beside it (package.loaded cleared and tide required again); use the newer copy"
    assert.equal(table.concat({
      "false\t" .. file .. ":9: tide.after: " .. retired,
      "false\t" .. file .. ":10: tide.every: " .. retired,
      "false\t" .. file .. ":11: tide.sleep: " .. retired,
      "false\t" .. file .. ":12: tide.spawn: " .. retired,
      "stop\tnil\t" .. NOT_PENDING,
      "ok\tnil",
      "false\t" .. file .. ":15: tide.run: " .. retired, "" }, "\n"), out)
  end)
end)

-- A tide.every whose period is shorter than a pass of the timers' fires was started again, due
-- again and fired again inside that same pass, up to the 10,000 fires of a pass: its callback
-- then ran dozens of times in a row, back to back, to "catch up".  A pass now fires what was
-- due when it began: missed runs are skipped (coalesced into one), as Node's setInterval and
-- most schedulers do, and the tasks of the tick run between two runs.
describe("a tide.every shorter than a tick", function()
  before_each(testing.before_each)
  after_each(testing.after_each)

  it("runs at most once a tick: missed runs are skipped, never run back to back", function()
    local since, most, runs, sleeper_runs = 0, 0, 0, 0
    H.run(function()
      local stop = false
      local sleeper = tide.spawn(function()        -- runs once a tick (its 0 ms timer fires each pass)
        while not stop do since = 0; sleeper_runs = sleeper_runs + 1; tide.sleep(0) end
      end)
      local others = 0
      local tm = tide.every(0.0001, function()
        runs, since = runs + 1, since + 1
        if since > most then most = since end
        for _ = 1, 200 do tide.after(0, function() others = others + 1 end) end   -- long passes
      end)
      tide.sleep(50)
      stop = true
      assert.is_true(tm:stop())
      sleeper:await()
      tide.sleep(1)
    end)
    assert.is_true(runs > 10 and sleeper_runs > 10, ("ran %d times, the sleeper %d"):format(runs, sleeper_runs))
    -- between two runs of the sleeper (two ticks), at most one run in each tick
    assert.is_true(most <= 2, ("%d runs back to back between two ticks"):format(most))
  end)

  it("under the virtual clock, a period under a nanosecond still advances time (1 ns)", function()
    local clock = testing.clock()
    local runs = 0
    H.run(function()
      local tm = tide.every(1e-9, function(t)
        runs = runs + 1
        if runs == 1000 then t:stop() end           -- (0 ns: time stood still, and this never ended)
      end)
      clock:advance(0.0000105)                     -- 10.5 ns: 10 runs (exactly 10 ns would leave
                                                   -- the 10th run to the rounding of 10 sums)
      tm:stop()
    end)
    assert.equal(10, runs)
  end)

  it("keeps its rhythm when the clock advances exactly (virtual clock): one run per period", function()
    local clock = testing.clock()
    local at = {}
    H.run(function()
      local t0 = tide.now()
      local tm = tide.every(10, function() at[#at + 1] = tide.now() - t0 end)
      clock:advance(55)
      assert.is_true(tm:stop())
    end)
    assert.same({ 10, 20, 30, 40, 50 }, at)
  end)
end)

-- A burst of timers left its memory behind for ever: the slots array of runq (3 slots a key,
-- 24 MB after a million) and the C heap's arrays (32 MB) only grew.  Now, once few timers have
-- stayed pending for a second, the keys are compacted and both shrink, also while periodic
-- timers stay pending all along on the burst's highest keys (so the heap is never empty).
describe("a burst of timers", function()
  before_each(testing.before_each)
  after_each(testing.after_each)

  it("gives its memory back once it is over, while periodic timers and late ones stay pending", function()
    local clock = testing.clock()
    local N = 200000
    local fired, beats, beats2, late_fired, again = 0, 0, 0, {}, 0
    H.run(function()
      collectgarbage()
      local lua0, c0 = collectgarbage("count"), tide.stats().timer_bytes
      for i = 1, N do tide.after(1 + i % 50, function() fired = fired + 1 end) end
      local beat = tide.every(100, function() beats = beats + 1 end)       -- keys above the burst's
      local beat2 = tide.every(150, function() beats2 = beats2 + 1 end)
      local late = {}
      for i = 1, 10 do late[i] = tide.after(1500 + i, function(tm) late_fired[#late_fired + 1] = tm end) end
      clock:advance(60)
      assert.equal(N, fired)
      collectgarbage()
      local lua1, c1 = collectgarbage("count"), tide.stats().timer_bytes
      assert.is_true((lua1 - lua0) * 1024 > 3 * N * 8, "the burst's slots array is not there: this attacks nothing")
      assert.is_true(c1 - c0 > N * 16, "the burst's C heap is not there: this attacks nothing")
      clock:advance(3000)                        -- more than a second of few timers; the late ones fire
      collectgarbage()
      local lua2, c2 = collectgarbage("count"), tide.stats().timer_bytes
      assert.is_true((lua1 - lua2) * 1024 > 3 * N * 8, ("the slots array kept %d KB"):format(lua2 - lua0))
      assert.is_true(c2 < 64 * 1024, ("the C heap kept %d bytes"):format(c2))
      assert.equal(10, #late_fired)              -- each late timer fired once, with its own handle
      for i = 1, 10 do assert.equal(late[i], late_fired[i]) end
      assert.same({ 30, 20 }, { beats, beats2 })    -- (at 3060 ms)
      clock:advance(300)                         -- the periodic ones moved to low keys and go on
      assert.same({ 33, 22 }, { beats, beats2 })
      assert.is_true(beat.key < 64 and beat2.key < 64, ("keys %d and %d"):format(beat.key, beat2.key))
      assert.is_true(beat:stop() and beat2:stop())
      for _ = 1, N do tide.after(1, function() again = again + 1 end) end   -- and it grows again
      clock:advance(2)
    end)
    assert.equal(N, again)
  end)
end)
