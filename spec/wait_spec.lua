-- spec/wait_spec.lua — a task's waits (sched.lua, "waiting and waking"): who may wait, and the wait's timer.
--
-- The wait check makes no C call on the task's stack (own_runner asks a
-- coroutine of tide's own), and the scheduler, not the task, arms a wait's
-- timer after the task yielded and cancels it before resuming a task woken
-- otherwise.  Attacked here: waits from coroutines the task made (however
-- deep, however resumed, by another task), many tasks waking each other
-- and timing out at each wait, tasks cancelled asleep or woken and not yet
-- resumed on reused runners, raising finalizers around the arming, and
-- what a sleeping task holds.
local tide = require "tide"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

local NESTED = "cannot wait inside a nested coroutine, only in the task's own"

describe("a wait", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  it("is refused in a coroutine the task made, however deep or resumed, and the task goes on", function()
    local errs, after = H.run(function()
      local errs = {}
      local function try(fn) local ok, err = pcall(fn); errs[#errs + 1] = ok and "no error" or tostring(err) end
      local other = tide.spawn(function() tide.sleep(5); return "other" end)
      try(function() coroutine.wrap(function() tide.sleep(1) end)() end)
      try(function() local ok, err = coroutine.resume(coroutine.create(function() tide.sleep(1) end)); error(err, 0) end)
      try(function() coroutine.wrap(function() coroutine.wrap(function() tide.sleep(1) end)() end)() end)
      try(function()
        local ok, _, err = pcall(coroutine.resume, coroutine.create(function() tide.sleep(1) end))
        error(err, 0)
      end)
      -- the nested function's first local a table, as own_runner's is
      try(function() coroutine.wrap(function(own) tide.sleep(1) end)({}) end)
      try(function() coroutine.wrap(function() other:await() end)() end)
      try(function() coroutine.wrap(function() other:await(1) end)() end)
      -- a coroutine made by this task, resumed by another task
      local co = coroutine.create(function() tide.sleep(1) end)
      local by_other = tide.spawn(function() local ok, err = coroutine.resume(co); error(err, 0) end)
      local st, err = by_other:await()
      errs[#errs + 1] = st .. ": " .. tostring(err)
      tide.sleep(1)                          -- its own waits still work
      local s2, v2 = other:await()
      return errs, { s2, v2 }
    end)
    assert.equal(8, #errs)
    for i = 1, 5 do assert.matches("tide.sleep: " .. NESTED, errs[i], 1, true) end
    for i = 6, 7 do assert.matches("task:await: " .. NESTED, errs[i], 1, true) end
    assert.matches("^error: .*tide.sleep: " .. NESTED:gsub("%p", "%%%0"), errs[8])
    assert.same({ "ok", "other" }, after)
  end)

  it("lets the task wait between the steps of a generator it made, inside pcall and xpcall", function()
    local got = H.run(function()
      local got = {}
      local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
      for _ = 1, 3 do
        local v = gen()                        -- suspended again in its yield while the task waits
        tide.sleep(1)
        assert(pcall(tide.sleep, 0))
        assert(xpcall(function() tide.sleep(1) end, debug.traceback))
        got[#got + 1] = v
      end
      local co = coroutine.create(function() coroutine.yield("first"); tide.sleep(1) end)
      got[#got + 1] = select(2, coroutine.resume(co))
      tide.sleep(1)
      local ok, err = coroutine.resume(co)   -- refused when it comes to its wait, after the task's
      got[#got + 1] = ok and "no error" or err
      return got
    end)
    assert.same({ 1, 2, 3, "first" }, { got[1], got[2], got[3], got[4] })
    assert.matches("tide.sleep: " .. NESTED, got[5], 1, true)
  end)

  it("wakes a waiter before its bound and leaves no timer behind; times out the others", function()
    local seed = os.time()
    math.randomseed(seed)
    local got = H.run(function()
      local targets, waiters = {}, {}
      for i = 1, 300 do targets[i] = tide.spawn(function() tide.sleep(math.random(0, 6)); return i end) end
      for i = 1, 300 do
        local bound = (i % 3 == 0) and 2 or 10000
        waiters[i] = tide.spawn(function() return targets[i]:await(bound) end)
      end
      local got = { ok = 0, timeout = 0, wrong = 0 }
      for i = 1, 300 do
        local _, s, v = waiters[i]:await()
        if s == "ok" and v == i then got.ok = got.ok + 1
        elseif s == nil and v == "timeout" and i % 3 == 0 then got.timeout = got.timeout + 1
        else got.wrong = got.wrong + 1 end
      end
      return got
    end)
    assert.equal(0, got.wrong, "seed " .. seed)
    assert.equal(300, got.ok + got.timeout, "seed " .. seed)
    assert.is_true(got.ok >= 200, "seed " .. seed)
  end)

  it("gives one outcome to each of many tasks that sleep, await, yield and cancel each other at every wait", function()
    local seed = os.time()
    math.randomseed(seed)
    local N = 1000
    local calls, ts = {}, {}
    H.run(function()
      for i = 1, N do
        calls[i] = 0
        ts[i] = tide.spawn{ run = function()
          for _ = 1, math.random(1, 4) do
            local r = math.random(1, 5)
            if r == 1 then tide.sleep(math.random(0, 3))
            elseif r == 2 then local o = ts[math.random(1, i)]; if o ~= tide.current() then o:await(math.random(0, 3)) end
            elseif r == 3 then coroutine.yield()
            elseif r == 4 then local o = ts[math.random(1, N)]; if o then o:cancel("by " .. i) end
            else tide.sleep(0) end
          end
          return i
        end, handle_result = function() calls[i] = calls[i] + 1 end }
      end
      for i = 1, N do ts[i]:await() end
    end)
    for i = 1, N do
      assert.equal(1, calls[i], "handle_result calls of task " .. i .. ", seed " .. seed)
      local s = ts[i]:status()
      assert.is_true(s == "ok" and ts[i].value == i or s == "cancelled", "task " .. i .. " " .. s .. ", seed " .. seed)
    end
  end)

  it("never resumes a task cancelled asleep, or woken and not yet resumed, on a reused runner", function()
    local log = {}
    H.run(function()
      -- trivial tasks first: their runners go idle, and the sleepers take them
      local warm = {}
      for i = 1, 20 do warm[i] = tide.spawn(function() return i end) end
      for i = 1, 20 do warm[i]:await() end
      local a, b
      -- a's and b's timers fire in one tick; a runs first and cancels b,
      -- woken and queued but not yet resumed
      a = tide.spawn(function() tide.sleep(3); log[#log + 1] = "a woke"; b:cancel("by a"); return "a" end)
      b = tide.spawn(function() tide.sleep(3); log[#log + 1] = "b woke"; return "b" end)
      local c = tide.spawn(function() tide.sleep(10000); log[#log + 1] = "c woke"; return "c" end)
      local d = tide.spawn(function() tide.sleep(10000); log[#log + 1] = "d woke" end)
      tide.sleep(1)
      c:cancel("asleep")
      assert.same({ "ok", "a" }, { a:await() })
      assert.same({ "cancelled", "by a" }, { b:await() })
      assert.same({ "cancelled", "asleep" }, { c:await() })
      -- the runners go on with new tasks, which sleep and wake
      local more = {}
      for i = 1, 20 do more[i] = tide.spawn(function() tide.sleep(1); return i * 2 end) end
      for i = 1, 20 do assert.same({ "ok", i * 2 }, { more[i]:await() }) end
      d:cancel()
      tide.sleep(5)
    end)
    assert.same({ "a woke" }, log)
  end)

  it("arms every wait's timer when raising finalizers interrupt the engine around it", function()
    local status, out = H.run_lua(dir, "arm.lua", [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local seen, wrong = {}, 0
      collectgarbage("setpause", 10)
      local _, n = tide.run(function()
        local ts = {}
        for i = 1, 20000 do
          local ok repeat ok = pcall(function()
            ts[i] = tide.spawn{ run = function(k) bomb(); tide.sleep(k % 5); bomb(); tide.sleep(1); return k end, args = { i },
                                handle_result = function(s, v)
                                  seen[i] = (seen[i] or 0) + 1
                                  if not (s == "ok" and v == i or s == "error" and tostring(v):find("boom in gc", 1, true)) then
                                    wrong = wrong + 1; io.stderr:write("unexpected outcome ", s, " ", tostring(v), "\n")
                                  end
                                end }
          end) until ok
        end
        for i = 1, #ts do repeat until pcall(ts[i].await, ts[i]) end
        storm.disarm()
        collectgarbage(); collectgarbage()
        return #ts
      end)
      local once = 0
      for _, c in pairs(seen) do if c == 1 then once = once + 1 end end
      print(("tasks %d once %d wrong %d live %d"):format(n or 0, once, wrong, tide.stats().live))
    ]], 240)
    assert.equal(0, status, out)
    assert.matches("tasks 20000 once 20000 wrong 0 live 0", out)
  end)

  it("keeps a waiting task's stack at LuaJIT's first size, with locals of its own below the wait", function()
    -- A C call from the task's stack (coroutine.running(), the timer's
    -- start) doubled a waiting runner's stack from 47 to 94 slots: 376
    -- bytes more per task, garbage once a collection shrinks it.  With the
    -- collector stopped, that garbage is counted here.
    local N = 5000
    local function sleeper()
      local a, b, c, d, e, f, g, h = 1, 2, 3, 4, 5, 6, 7, 8
      tide.sleep(60000)
      return a + b + c + d + e + f + g + h
    end
    local function awaiter(t) local x, y, z = 1, 2, 3; t:await(60000); return x + y + z end
    local per = H.run(function()
      local per = {}
      for _, w in ipairs{ "sleeper", "awaiter" } do
        collectgarbage(); collectgarbage()
        collectgarbage("stop")
        local k0, ts = collectgarbage("count"), {}
        if w == "awaiter" then
          ts[N + 1] = tide.spawn(sleeper)
          for i = 1, N do ts[i] = tide.spawn(awaiter, ts[N + 1]) end
        else
          for i = 1, N do ts[i] = tide.spawn(sleeper) end
        end
        tide.sleep(0); tide.sleep(0)
        per[w] = (collectgarbage("count") - k0) * 1024 / N
        collectgarbage("restart")
        for i = 1, #ts do ts[i]:cancel() end
      end
      return per
    end)
    -- ~700 and ~945 bytes here (~970 for the awaiter with the JIT off:
    -- the awaiter's argument list and options table, its place in the
    -- waiters' list); with the doubled stack ~1,080 and ~1,320; with a
    -- task's fields as keys of its hash part (256 bytes a task, not 136:
    -- tide.engine.fields) ~820 and ~1,210.  The bounds leave less than a
    -- hash part (48 bytes, for one key or two): a field stored as a key on
    -- every sleeping task fails here, as does a slot stored past the
    -- task's array part (72 bytes: the array moves out of the table's block).
    assert.is_true(per.sleeper < 740, ("%.0f bytes per sleeping task"):format(per.sleeper))
    assert.is_true(per.awaiter < 990, ("%.0f bytes per awaiting task"):format(per.awaiter))
  end)

end)
