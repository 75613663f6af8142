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
