-- spec/review_timers_spec.lua — review of branch h21e (a timer's fire makes no task unless its
-- callback waits): attacks the promotion of a fire's callback to a task (sched.lua, promote)
-- when the allocation of that task is interrupted by a raising __gc finalizer (LuaJIT 2.1
-- beta3 rethrows a finalizer's error from whatever allocation ran the collector step).
--
-- On main a timer callback was a task from the start: asking for it (tide.current()) or
-- yielding allocated nothing, so these cases could not lose it.
local tide = require "tide"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

describe("review h21e: a timer callback whose promotion to a task is interrupted", function()
  it("still gets its task from tide.current() after a raise, and its return is no engine error", function()
    -- Attacks promote() called from tide.current(): it clears firing/firing_co before
    -- S.new_task allocates; a raise there leaves the callback with no task and no way to get
    -- one (tide.current() returns nil from then on), and run_fire calls returned(nil, co).
    local status, out = H.run_lua(dir, "promote_current.lua", [[
      jit.off()
      local tide = require "tide"
      local engine_bugs = 0
      tide.configure{ on_error = function(w, e)
        if not tostring(e):find("boom in gc") then engine_bugs = engine_bugs + 1 end
      end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local N = 20000
      local got, lost = 0, 0
      local function cb()
        pcall(bomb); pcall(bomb)
        local ok, t
        repeat ok, t = pcall(tide.current) until ok
        if t == nil then lost = lost + 1 else got = got + 1 end
      end
      local function arm(k) tide.after(k % 3, cb) end
      collectgarbage("setpause", 10)
      tide.run(function()
        local k = 1
        while k <= N do if pcall(arm, k) then k = k + 1 end end
        repeat until pcall(tide.sleep, 50)
        storm.disarm()           -- before the loop's end, which allocates too (as runner_spec does)
      end)
      collectgarbage()
      print(("got %d nil %d engine_bugs %d live %d"):format(got, lost, engine_bugs, tide.stats().live))
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("got %d+ nil 0 engine_bugs 0 live 0", out)
  end)

  it("resumes every callback that yielded bare, even when making its task raised", function()
    -- Attacks after_resume's promote() (a fire's callback yielded bare): S.new_task raises
    -- outside any pcall, the tick is interrupted with firing cleared, repair() finds
    -- fire_unrun unset and does nothing: the callback stays suspended for ever, with no task,
    -- no outcome and no report of its own.
    local status, out = H.run_lua(dir, "promote_yield.lua", [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local storm = require "gc_storm"
      local bomb = storm.bomb
      local N = 20000
      local yielded, resumed = 0, 0
      local function cb()
        pcall(bomb); pcall(bomb)
        yielded = yielded + 1
        coroutine.yield()
        resumed = resumed + 1
      end
      local function arm(k) tide.after(k % 3, cb) end
      collectgarbage("setpause", 10)
      tide.run(function()
        local k = 1
        while k <= N do if pcall(arm, k) then k = k + 1 end end
        repeat until pcall(tide.sleep, 50)
        storm.disarm()           -- before the loop's end, which allocates too (as runner_spec does)
      end)
      collectgarbage()
      print(("yielded %d never resumed %d live %d"):format(yielded, yielded - resumed, tide.stats().live))
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("yielded %d+ never resumed 0 live 0", out)
  end)
end)

describe("review h21e: a timer callback that became a task", function()
  after_each(function() H.assert_idle() end)

  it("ends with the values its callback returned, seen by an awaiter of its handle", function()
    -- Attacks run_fire (sched.lua): it calls tm.fn(tm) and drops the results, then ends the
    -- promoted task with returned(current, co) and no values: the task's outcome is
    -- ok, nil instead of ok, 1, 2 (on main a timer's task ended with what its callback returned).
    local got = H.run(function()
      local h = {}
      tide.after(0, function() h.waited = tide.current(); tide.sleep(1); return 1, 2 end)
      tide.after(0, function() h.asked = tide.current(); return "three" end)
      tide.sleep(10)
      return { waited = { h.waited:await() }, asked = { h.asked:await() }, value = h.waited.value }
    end)
    assert.same({ "ok", 1, 2 }, got.waited)
    assert.same({ "ok", "three" }, got.asked)
    assert.equal(1, got.value)
  end)
end)
