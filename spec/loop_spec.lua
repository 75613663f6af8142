-- spec/loop_spec.lua — the loop: ticks, kicks from outside tasks, and a clean close.
local tide = require "tide"
local H = spec_helper

local LUAJIT_TIDE = ("LUA_CPATH='%s/?.so;;' luajit -e "):format(H.build)

describe("the loop", function()
  it("leaves no handle active and no timer pending after a run", function()
    H.run(function()
      tide.after(1, function() end)
      local tm = tide.every(5, function() end)
      tide.spawn{ run = function() tide.sleep(1000) end, timeout = 2 }
      tide.sleep(3)
      tm:stop()
    end)
    local st = tide.stats()
    assert.equal(0, st.active_handles)
    assert.equal(0, st.timers)
    assert.equal(0, st.live)
  end)

  it("runs tasks spawned outside any task once the loop runs", function()
    local t = tide.spawn(function() return "spawned before run" end)
    local _, _, v = tide.run(function() return t:await() end)
    assert.equal("spawned before run", v)
  end)

  it("runs again after a shutdown", function()
    local first = tide.run(function() tide.shutdown(0); tide.sleep(1000) end)
    assert.equal("cancelled", first)
    assert.equal("ok", (tide.run(function() tide.sleep(1) end)))
  end)

  it("cancels new tasks during a shutdown, delivering their outcome", function()
    local seen
    H.run(function()
      tide.shutdown(50)
      tide.spawn{ run = function() end, handle_result = function(s, v) seen = s .. ":" .. v end }
    end)
    assert.equal("cancelled:shutdown", seen)
  end)

  it("closes cleanly: uv_loop_close finds nothing left open", function()
    local status, out = H.sh(LUAJIT_TIDE .. [['
      local tide = require "tide"
      tide.run(function()
        tide.after(1, function() end)
        local p = tide.pool{ concurrency = 2 }
        for i = 1, 10 do p:submit(tide.sleep, i) end
        p:drain()
      end)
      print("close:", require("tide.core").close())
      print("again:", require("tide.core").close())
    ']])
    assert.equal(0, status, out)
    assert.equal("close:\t0\nagain:\t0\n", out)
  end)

  it("says so when used after close", function()
    local status, out = H.sh(LUAJIT_TIDE .. [['
      local tide = require "tide"
      require("tide.core").close()
      print(pcall(tide.run, function() end))
    ']])
    assert.equal(0, status, out)
    assert.equal("false\ttide.run: the loop is closed\n", out)   -- (through pcall: no caller's line)
  end)
end)

-- A batch of the run queue ran whole in one tick, however long: 100,000 thread tasks spawned at
-- once were 100,000 submits without the loop turning (0.4 s idle, over a second under load: the
-- watchdog's stall in bench/threads.lua), and here 4,000 tasks of 0.25 ms each held it a second.
-- A batch is now cut after a slice of time, the loop polls, and its rest runs first at the next
-- tick, in order (timers due meanwhile fire after it, as before, and are not popped while it
-- waits); what its tasks spawned still runs after all of it.  The watchdog, at 400 ms, sees the loop turn.
describe("a long batch of tasks", function()
  it("lets the loop turn between slices, keeping the order of its tasks", function()
    local N, T = 4000, 30000
    local order, child_at, stalls, fired, most = {}, nil, {}, 0, 0
    local runq = require "tide.engine.runq"
    tide.configure{ watchdog = 400, on_error = function(where, err) stalls[#stalls + 1] = where .. ": " .. tostring(err) end }
    local ok, err = pcall(H.run, function()
      local ts = {}
      for _ = 1, T do tide.after(0, function() fired = fired + 1 end) end   -- due during the batch
      for i = 1, N do
        ts[i] = tide.spawn(function()
          order[#order + 1] = i
          if runq.count() > most then most = runq.count() end
          if i == 10 then tide.spawn(function() child_at = #order end) end
          local t0 = tide.now()
          while tide.now() - t0 < 0.25 do end      -- 0.25 ms each: a second for the batch
        end)
      end
      for i = 1, N do ts[i]:await() end
      while fired < T do tide.sleep(1) end
    end)
    tide.configure{ watchdog = 30000 }
    H.loud_errors()
    assert(ok, err)
    for i = 1, N do assert.equal(i, order[i]) end
    assert.equal(N, child_at, "the task spawned inside the batch ran before the batch's rest")
    assert.same({}, stalls)
    -- the timers due meanwhile are not popped while the batch's rest waits (10,000 a tick were)
    assert.is_true(most <= N + 10000, ("%d entries queued at once"):format(most))
  end)
end)
