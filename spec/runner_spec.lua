-- spec/runner_spec.lua — the engine's runners: new tasks run back to back in one coroutine (sched.lua, runq.take_first).
--
-- Each case spawns its tasks at once, so that they sit side by side in one
-- batch of the run queue and one runner goes through them without going
-- back to the tick: the paths attacked are a task that waits, yields,
-- raises, is cancelled or cancels others while it or its neighbours are
-- on that runner.
local tide = require "tide"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

--- Spawns every function of `fns` at once, each with a handle_result that
--- counts its calls; returns the tasks and the counts (by index).
local function spawn_all(fns, extra)
  local ts, calls = {}, {}
  for i = 1, #fns do
    calls[i] = 0
    ts[i] = tide.spawn{ run = fns[i], args = { i },
                        handle_result = function(status, value, t)
                          calls[i] = calls[i] + 1
                          if extra then extra(i, status, value, t) end
                        end }
  end
  return ts, calls
end

describe("a runner", function()
  before_each(function() H.quiet_errors() end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  it("delivers one outcome to each task of a batch that returns, waits, yields, raises, returns values", function()
    local function boom() error("boom at the third") end
    local ts, calls = H.run(function()
      local ts, calls = spawn_all{
        function(i) return i end,
        function(i) tide.sleep(1); return i end,
        function(i) coroutine.yield(); coroutine.yield("not WAIT"); return i end,
        function() boom() end,
        function(i) return i, "and", nil, "more" end,
        function(i) tide.sleep(0); tide.sleep(2); return i end,
        function(i) return i end,
      }
      for i = 1, #ts do ts[i]:await() end
      return ts, calls
    end)
    for i = 1, #ts do assert.equal(1, calls[i], "handle_result calls of task " .. i) end
    assert.same({ "ok", 1 }, { ts[1]:status(), ts[1].value })
    assert.same({ "ok", 2 }, { ts[2]:status(), ts[2].value })
    assert.same({ "ok", 3 }, { ts[3]:status(), ts[3].value })
    assert.equal("error", ts[4]:status())
    assert.matches("boom at the third", ts[4].value)
    assert.matches("in %a* ?function 'boom'", ts[4].traceback)
    assert.matches("runner_spec.lua:%d+", ts[4].traceback)
    local _, _, a, b, c, d = pcall(function() return H.run(function() return ts[5]:await() end) end)
    assert.same({ 5, "and", nil, "more" }, { a, b, c, d })
    assert.same({ "ok", 6 }, { ts[6]:status(), ts[6].value })
    assert.same({ "ok", 7 }, { ts[7]:status(), ts[7].value })
  end)

  it("keeps a returned false, and no value for nothing returned, after a wait or none", function()
    local got = H.run(function()
      local ts = {
        tide.spawn(function() tide.sleep(1) end),
        tide.spawn(function() tide.sleep(1); return false end),
        tide.spawn(function() return nil end),
        tide.spawn(function() return false end),
        tide.spawn(function() tide.sleep(1); return nil, "second" end),
      }
      local got = {}
      for i = 1, #ts do got[i] = { n = select("#", ts[i]:await()), ts[i]:await() } end
      return got
    end)
    assert.same({ n = 2, "ok", nil }, got[1])
    assert.same({ n = 2, "ok", false }, got[2])
    assert.same({ n = 2, "ok", nil }, got[3])
    assert.same({ n = 2, "ok", false }, got[4])
    assert.same({ n = 3, "ok", nil, "second" }, got[5])
  end)

  it("never starts a task cancelled by the task before it in the batch", function()
    local ran = {}
    local ts, calls = H.run(function()
      local ts, calls
      ts, calls = spawn_all{
        function() ts[2]:cancel("by the first"); ts[4]:cancel("also by the first") end,
        function() ran[2] = true end,
        function() ran[3] = true end,
        function() ran[4] = true end,
      }
      for i = 1, #ts do ts[i]:await() end
      return ts, calls
    end)
    assert.is_nil(ran[2]); assert.is_nil(ran[4])
    assert.is_true(ran[3])
    assert.same({ "cancelled", "by the first" }, { ts[2]:status(), ts[2].value })
    assert.same({ "cancelled", "also by the first" }, { ts[4]:status(), ts[4].value })
    assert.equal("ok", ts[1]:status()); assert.equal("ok", ts[3]:status())
    for i = 1, 4 do assert.equal(1, calls[i]) end
  end)

  it("stops a task that cancels itself on the runner, and goes on with the next", function()
    local after_cancel, next_ran = false, false
    local ts, calls = H.run(function()
      local ts, calls
      ts, calls = spawn_all{
        function() ts[1]:cancel("myself"); after_cancel = true end,
        function() next_ran = true; return "next" end,
      }
      for i = 1, #ts do ts[i]:await() end
      return ts, calls
    end)
    assert.is_false(after_cancel)
    assert.is_true(next_ran)
    assert.same({ "cancelled", "myself" }, { ts[1]:status(), ts[1].value })
    assert.same({ "ok", "next" }, { ts[2]:status(), ts[2].value })
    assert.same({ 1, 1 }, calls)
  end)

  it("takes a cancel from handle_result of the task before: of a task not started, one asleep, itself", function()
    local ran3, woke4 = false, false
    local ts, calls = H.run(function()
      local ts, calls
      local sleeper = tide.spawn(function() tide.sleep(10000); woke4 = true end)
      tide.sleep(0)                          -- the sleeper is asleep before the batch runs
      ts, calls = spawn_all({
        function() return "first" end,
        function() return "second" end,
        function() ran3 = true end,
      }, function(i, _, _, t)
        if i == 1 then
          assert(ts[3]:cancel("from handle_result"))
          assert(sleeper:cancel("from handle_result"))
          local ok, err = t:cancel("again")  -- its own outcome is already out
          assert(ok == nil and err:match("already finished"))
        elseif i == 2 then
          assert.is_nil((ts[3]:cancel("twice")))
        end
      end)
      for i = 1, #ts do ts[i]:await() end
      sleeper:await()
      return ts, calls, sleeper
    end)
    assert.is_false(ran3); assert.is_false(woke4)
    assert.same({ "cancelled", "from handle_result" }, { ts[3]:status(), ts[3].value })
    assert.same({ 1, 1, 1 }, calls)
  end)

  it("goes on when handle_result yields bare inside the runner", function()
    local order = {}
    local ts, calls = H.run(function()
      local ts, calls = spawn_all({
        function() order[#order + 1] = 1 end,
        function() order[#order + 1] = 2 end,
      }, function(i) coroutine.yield(); order[#order + 1] = "hr" .. i end)
      for i = 1, #ts do ts[i]:await() end
      return ts, calls
    end)
    assert.same({ 1, "hr1", 2, "hr2" }, order)
    assert.same({ 1, 1 }, calls)
    assert.equal("ok", ts[1]:status()); assert.equal("ok", ts[2]:status())
  end)

  it("refuses a wait inside handle_result run by the runner, and goes on", function()
    local ts, calls = H.run(function()
      local ts, calls = spawn_all({ function() end, function() return 2 end }, function(i)
        if i == 1 then tide.sleep(1) end
      end)
      for i = 1, #ts do ts[i]:await() end
      return ts, calls
    end)
    assert.equal(1, H.reported)               -- "cannot wait inside handle_result", to the error sink
    assert.same({ 1, 1 }, calls)
    assert.same({ "ok", 2 }, { ts[2]:status(), ts[2].value })
  end)

  it("runs nested spawns made inside a runner, and a tree of them, each exactly once", function()
    local runs, outcomes, n = 0, 0, 0
    local function node(depth)
      runs = runs + 1
      if depth < 6 then
        for _ = 1, 3 do
          n = n + 1
          tide.spawn{ run = node, args = { depth + 1 }, handle_result = function() outcomes = outcomes + 1 end }
        end
        if depth % 2 == 0 then tide.sleep(0) end
      end
    end
    H.run(function()
      n = 1
      tide.spawn{ run = node, args = { 0 }, handle_result = function() outcomes = outcomes + 1 end }
      while outcomes < n do tide.sleep(1) end
    end)
    assert.equal(1093, n)                      -- 1 + 3 + ... + 3^6
    assert.equal(n, runs)
    assert.equal(n, outcomes)
  end)

  it("times out a task of the batch while it waits, and another that never yields back", function()
    local ts = H.run(function()
      local a = tide.spawn{ run = function() tide.sleep(1000) end, timeout = 20 }
      local b = tide.spawn{ run = function() while true do coroutine.yield() end end, timeout = 20 }
      local c = tide.spawn(function() return "c" end)
      a:await(); b:await(); c:await()
      return { a, b, c }
    end)
    assert.equal("timeout", ts[1]:status())
    assert.equal("timeout", ts[2]:status())
    assert.same({ "ok", "c" }, { ts[3]:status(), ts[3].value })
  end)

  it("runs a timer callback that waits beside ones that return and one that raises", function()
    local log = {}
    H.run(function()
      tide.after(0, function() log[#log + 1] = "a" end)
      tide.after(0, function() tide.sleep(5); log[#log + 1] = "waited" end)
      tide.after(0, function() error("a timer's own error") end)
      tide.after(0, function() log[#log + 1] = "d" end)
      tide.sleep(30)
    end)
    table.sort(log)
    assert.same({ "a", "d", "waited" }, log)
    assert.equal(1, H.reported)               -- the raising callback, as "timer callback"
  end)

  it("gives one outcome to each task when raising finalizers interrupt the runner inside a task's end", function()
    -- Finalizers set with debug.setmetatable are not wrapped: their errors
    -- reach the engine from whatever allocation ran the collector step.
    -- Tasks that return two values allocate in the door (finish), which
    -- the runner runs between two tasks.
    local status, out = H.run_lua(dir, "door.lua", [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local seen, wrong, total = {}, 0, 0
      local function record(k)
        return function(s, v)
          seen[k] = (seen[k] or 0) + 1
          if not (s == "ok" or (s == "error" and tostring(v):find("boom in gc", 1, true))) then
            wrong = wrong + 1; io.stderr:write("unexpected outcome ", s, " ", tostring(v), "\n")
          end
        end
      end
      collectgarbage("setpause", 10)
      local _, n = tide.run(function()
        local ts = {}
        for i = 1, 20000 do
          ts[i] = tide.spawn{ run = function(k) bomb(); bomb(); return k, { k } end, args = { i },
                              handle_result = record(i) }
        end
        for i = 1, #ts do repeat until pcall(ts[i].await, ts[i]) end   -- the root's allocations may raise too
        storm.disarm()           -- disarm what is left (see finalizer_spec.lua)
        collectgarbage(); collectgarbage()
        return #ts
      end)
      local once = 0
      for _, c in pairs(seen) do if c == 1 then once = once + 1 end end
      print(("tasks %d once %d wrong %d live %d"):format(n or 0, once, wrong, tide.stats().live))
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("tasks 20000 once 20000 wrong 0 live 0", out)
  end)
end)

-- A timer's fire makes no task: a runner calls the callback, which becomes
-- a task only when it needs one (it waits, yields, or asks for itself).
-- Attacked here: callbacks side by side in one batch that return, raise,
-- wait then raise, cancel themselves, yield bare, stop their own timer,
-- wait in a nested coroutine, and a shutdown that meets a callback before
-- and after it became a task.
describe("a timer's fire", function()
  local reports
  before_each(function()
    reports = {}
    tide.configure{ on_error = function(where, err, tb)
      reports[#reports + 1] = { where = where, err = tostring(err), tb = tb or "" }
    end }
  end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  it("runs callbacks that return in the order they fired, and makes no task for them", function()
    local order, spawned, ok0, ok1
    H.run(function()
      local s0 = tide.stats().spawned
      ok0 = tide.stats().ok
      for i = 1, 5 do tide.after(0, function(tm) order[#order + 1] = i; assert(getmetatable(tm)) end) end
      tide.after(1, function() order[#order + 1] = "later" end)
      order = {}
      tide.sleep(20)
      spawned, ok1 = tide.stats().spawned - s0, tide.stats().ok
    end)
    assert.same({ 1, 2, 3, 4, 5, "later" }, order)
    assert.equal(0, spawned)
    assert.equal(ok0, ok1)
    assert.same({}, reports)
  end)

  it("reports each raising callback once, as a timer callback, and goes on with the next of the batch", function()
    local ran = {}
    H.run(function()
      tide.after(0, function() ran[#ran + 1] = 1 end)
      tide.after(0, function() local function bad_callback() error("raised before any wait") end bad_callback() end)
      tide.after(0, function() ran[#ran + 1] = 3 end)
      tide.after(0, function() error({ code = 7 }) end)         -- not a string
      tide.after(0, function() tide.sleep(2); error("raised after a wait") end)
      tide.after(0, function() ran[#ran + 1] = 6 end)
      tide.sleep(30)
    end)
    assert.same({ 1, 3, 6 }, ran)
    assert.equal(3, #reports)
    for _, r in ipairs(reports) do assert.equal("timer callback", r.where) end
    assert.matches("raised before any wait", reports[1].err)
    assert.matches("in %a* ?function 'bad_callback'", reports[1].tb)
    assert.matches("runner_spec.lua:%d+", reports[1].tb)
    assert.matches("^table", reports[2].err)
    assert.matches("raised after a wait", reports[3].err)
    assert.matches("runner_spec.lua:%d+", reports[3].tb)
  end)

  it("gives a callback that waits, yields or asks for itself a task with exactly one outcome", function()
    local tasks, after_yield, awaited = {}, false, nil
    H.run(function()
      tide.after(0, function() tasks.sleeper = tide.current(); tide.sleep(3) end)
      tide.after(0, function() tasks.asker = tide.current() end)
      tide.after(0, function() coroutine.yield(); coroutine.yield("not WAIT"); after_yield = true end)
      tide.after(0, function()
        local t = tide.spawn(function() tide.sleep(1); return "child" end)
        awaited = { t:await() }
      end)
      tide.sleep(30)
    end)
    assert.equal("ok", tasks.sleeper:status())
    assert.equal("ok", tasks.asker:status())
    assert.is_true(after_yield)
    assert.same({ "ok", "child" }, awaited)
    assert.same({}, reports)
  end)

  it("stops a callback that cancels itself, before and after it waited, and reports nothing", function()
    local reached, t1, t2 = {}, nil, nil
    H.run(function()
      tide.after(0, function() t1 = tide.current(); t1:cancel("myself"); reached[#reached + 1] = "past 1" end)
      tide.after(0, function()
        tide.sleep(1)
        t2 = tide.current(); t2:cancel("after a wait"); reached[#reached + 1] = "past 2"
      end)
      tide.after(0, function() reached[#reached + 1] = "third" end)
      tide.sleep(20)
    end)
    assert.same({ "third" }, reached)
    assert.same({ "cancelled", "myself" }, { t1:status(), t1.value })
    assert.same({ "cancelled", "after a wait" }, { t2:status(), t2.value })
    assert.same({}, reports)
  end)

  it("stops its own timer from inside the callback, before and after a wait", function()
    -- A fire already queued when stop() is called still runs (at most one:
    -- a loop slowed by the machine's load may fire once more in the tick).
    local fires, fires_w, again, stopped_at = 0, 0, nil, nil
    H.run(function()
      tide.every(1, function(tm) fires = fires + 1; if fires == 3 then assert(tm:stop()) end end)
      tide.every(1, function(tm)
        fires_w = fires_w + 1
        tide.sleep(1)
        if fires_w >= 2 and tostring(tm) == "tide.Timer (pending)" then assert(tm:stop()); stopped_at = fires_w end
      end)
      tide.after(0, function(tm) again = { tm:stop() } end)
      tide.sleep(40)
    end)
    assert.is_true(fires == 3 or fires == 4, "every fired " .. fires)
    assert.is_true(fires_w >= 2 and fires_w <= stopped_at + 1, ("waiting every fired %d, stopped at %d"):format(fires_w, stopped_at))
    assert.same({ nil, "timer:stop: the timer is not pending (it fired, or was stopped)" }, again)
    assert.same({}, reports)
  end)

  it("refuses a wait in a nested coroutine of a callback, naming it, and the callback goes on", function()
    local err, went_on
    H.run(function()
      tide.after(0, function()
        local co = coroutine.create(function() tide.sleep(1) end)
        local _, e = coroutine.resume(co)
        err, went_on = e, true
      end)
      tide.sleep(10)
    end)
    assert.matches("tide.sleep: cannot wait inside a nested coroutine, only in the task's own", err)
    assert.is_true(went_on)
    assert.same({}, reports)
  end)

  it("cancels a callback that became a task during a shutdown begun before it ran, at the end of the grace", function()
    local t0, woke, t = tide.now(), false, nil
    tide.run(function()
      tide.after(0, function() tide.shutdown(30) end)        -- no task live when it begins
      tide.after(0, function() t = tide.current(); tide.sleep(10000); woke = true end)
    end)
    assert.is_false(woke)
    assert.same({ "cancelled", "shutdown" }, { t:status(), t.value })
    assert.is_true(tide.now() - t0 < 2000, "the grace ended the loop")
    assert.same({}, reports)
  end)

  it("runs each callback once when raising finalizers interrupt the engine around the fires", function()
    -- As in "gives one outcome to each task ..." above: finalizers whose
    -- errors reach whatever allocation ran the collector step, here the
    -- runners taken for the fires and the callbacks' own allocations.
    local status, out = H.run_lua(dir, "fires.lua", [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local N = 20000
      local entered = {}
      for k = 1, N do entered[k] = 0 end
      collectgarbage("setpause", 10)
      tide.run(function()
        for k = 1, N do
          local ok repeat ok = pcall(tide.after, k % 7, function()
            entered[k] = entered[k] + 1
            bomb(); bomb()
            if k % 3 == 0 then tide.sleep(1) end
          end) until ok
        end
        repeat until pcall(tide.sleep, 50)
        storm.disarm()
      end)
      local once, more = 0, 0
      for k = 1, N do
        if entered[k] == 1 then once = once + 1 elseif entered[k] > 1 then more = more + 1 end
      end
      print(("fires %d once %d more %d live %d"):format(N, once, more, tide.stats().live))
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("fires 20000 once 20000 more 0 live 0", out)
  end)

  it("runs 2,000 random callbacks each exactly once, through returns, raises, waits and cancels", function()
    local seed = os.time()
    math.randomseed(seed)
    local entered, finished, raised, n = {}, 0, 0, 2000
    H.run(function()
      for k = 1, n do
        local kind = math.random(1, 5)
        tide.after(math.random(0, 5), function()
          entered[k] = (entered[k] or 0) + 1
          if kind == 2 then raised = raised + 1; error("kind 2") end
          if kind == 3 then tide.sleep(math.random(0, 3)) end
          if kind == 4 then coroutine.yield() end
          if kind == 5 then
            if math.random() < 0.5 then tide.sleep(0) end
            tide.current():cancel("kind 5")
          end
          finished = finished + 1
        end)
      end
      tide.sleep(60)
    end)
    local twice = 0
    for k = 1, n do if entered[k] ~= 1 then twice = twice + 1 end end
    assert.equal(0, twice, "callbacks not entered exactly once (seed " .. seed .. ")")
    assert.equal(raised, #reports, "seed " .. seed)
  end)
end)
