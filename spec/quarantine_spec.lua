-- spec/quarantine_spec.lua — threads that cannot be stopped are quarantined and replaced.
-- (Its own file, so its own process: the stuck thread spins until the process exits.)
local tide = require "tide"

tide.configure{ threads = 2, thread_stop_wait = 50 }

-- A task is quarantined only when its thread runs it when the stop comes:
-- one whose timeout ran out before its thread took it stops at its first
-- instructions (a loaded machine starts threads late).  So each test first
-- has its threads run a task, and the timeouts leave room for a late wake-up.
local function warm(n)
  local ts = {}
  for i = 1, n do ts[i] = tide.spawn{ mode = "thread", run = function() return 1 end } end
  for i = 1, n do assert.equal("ok", (ts[i]:await())) end
end

describe("quarantine", function()
  after_each(function()
    spec_helper.assert_idle()
  end)

  it("times out `while true do end`, replaces its thread, and keeps the capacity", function()
    spec_helper.run(function()
      warm(2)
      local t0 = tide.now()
      local status = tide.spawn{ mode = "thread", timeout = 200, run = function() while true do end end }:await()
      assert.equal("timeout", status)
      assert.is_true(tide.now() - t0 < 1000)
      tide.sleep(150)                        -- past thread_stop_wait: quarantined by now
      local st = tide.stats().threads
      assert.equal(1, st.quarantined)
      assert.equal(1, st.replaced)
      assert.equal(2, st.size)
      -- a batch of 2 tasks that each hold their thread for 200 ms runs on two
      -- threads (with one missing, both would run on the same one, in turn)
      local a = tide.spawn{ mode = "thread", run = function() require("tide").sleep(200) return require("tide").thread end }
      local b = tide.spawn{ mode = "thread", run = function() require("tide").sleep(200) return require("tide").thread end }
      local _, ta = a:await()
      local _, tb = b:await()
      assert.are_not.equal(ta, tb)
    end)
  end)

  it("drops the late result of a thread blocked in C, and delivers one outcome", function()
    local outcomes = {}
    spec_helper.run(function()
      warm(2)
      local t = tide.spawn{ mode = "thread", timeout = 200,
                            run = function() os.execute("sleep 0.5") return "late" end,
                            handle_result = function(s, v) outcomes[#outcomes + 1] = s end }
      assert.equal("timeout", (t:await()))
      tide.sleep(500)                        -- the late result arrives, and is dropped
      assert.equal("timeout", t:status())
      assert.same({ "ok", 3 }, { tide.spawn{ mode = "thread", run = function() return 3 end }:await() })
    end)
    assert.same({ "timeout" }, outcomes)
    local st = tide.stats().threads
    assert.equal(2, st.quarantined)
    assert.equal(2, st.size)
    assert.equal(0, st.in_flight)
  end)

  it("keeps tide's library loaded for a quarantined thread, which runs in its code until the process ends", function()
    -- lua_close (busted's os.exit(code, true)) unloads the C modules; a
    -- stuck thread would then jump into unmapped code.  The child unloads
    -- tide.so the way lua_close does, and looks whether it is still mapped.
    local dir = spec_helper.tempdir()
    local status, out = spec_helper.run_lua(dir, "unload.lua", [[
      local tide = require "tide"
      tide.configure{ threads = 1, thread_stop_wait = 20 }
      local st, err = tide.run(function()
        assert(tide.spawn{ mode = "thread", run = function() return 1 end }:await() == "ok")   -- (warm)
        local got, why = tide.spawn{ mode = "thread", timeout = 200, run = function() while true do end end }:await()
        assert(got == "timeout", ("the task ended %s (%s), not timeout"):format(tostring(got), tostring(why)))
        while tide.stats().threads.quarantined == 0 do tide.sleep(10) end
      end)
      assert(st == "ok", ("the root ended %s: %s"):format(tostring(st), tostring(err)))
      local reg, n = debug.getregistry(), 0
      for k in pairs(reg) do
        if type(k) == "string" and k:match("^LOADLIB: .*tide%.so$") then reg[k] = nil; n = n + 1 end
      end
      assert(n == 1, "no LOADLIB entry for tide.so")
      package.loaded["tide.core"] = nil
      collectgarbage(); collectgarbage()               -- its __gc: dlclose
      local maps = io.open("/proc/self/maps"):read("*a")
      print(maps:find("tide.so", 1, true) and "still mapped" or "unmapped")
      io.stdout:flush()
      os.execute("sleep 0.1")                          -- the stuck thread runs on meanwhile
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.matches("still mapped", out)
  end)
end)
