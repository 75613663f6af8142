-- spec/quarantine_spec.lua — threads that cannot be stopped are quarantined and replaced.
-- (Its own file, so its own process: the stuck thread spins until the process exits.)
local tide = require "tide"

tide.configure{ threads = 2, thread_stop_wait = 50 }

describe("quarantine", function()
  after_each(function()
    spec_helper.assert_idle()
  end)

  it("times out `while true do end`, replaces its thread, and keeps the capacity", function()
    spec_helper.run(function()
      local t0 = tide.now()
      local status = tide.spawn{ mode = "thread", timeout = 50, run = function() while true do end end }:await()
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
      local t = tide.spawn{ mode = "thread", timeout = 30,
                            run = function() os.execute("sleep 0.3") return "late" end,
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
end)
