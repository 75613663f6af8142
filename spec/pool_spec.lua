-- spec/pool_spec.lua — tide.pool: non-blocking submit, bounded concurrency, queue limit, drain.
local tide = require "tide"

describe("tide.pool", function()
  after_each(function()
    spec_helper.assert_idle()
  end)

  it("runs at most `size` tasks at once, and does reach it", function()
    local running, max_running, done = 0, 0, 0
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 4 }
      for _ = 1, 40 do
        p:submit(function()
          running = running + 1
          if running > max_running then max_running = running end
          tide.sleep(math.random(1, 3))
          running = running - 1
          done = done + 1
        end)
      end
      local st = p:drain()
      assert.equal(40, st.ok)
      assert.equal(0, st.running)
    end)
    assert.equal(4, max_running)
    assert.equal(40, done)
  end)

  it("returns tasks at once, in submission order for the queue", function()
    local order = {}
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 1 }
      local t0 = tide.now()
      local tasks = {}
      for i = 1, 5 do tasks[i] = p:submit(function() order[#order + 1] = i; tide.sleep(1) end) end
      assert.is_true(tide.now() - t0 < 50)
      assert.equal("running", tasks[1]:status())
      assert.equal("pending", tasks[5]:status())
      p:drain()
    end)
    assert.same({ 1, 2, 3, 4, 5 }, order)
  end)

  it("fails with 'queue full' past queue_limit, and recovers when the queue drains", function()
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 2, queue_limit = 3 }
      for _ = 1, 5 do assert.is_table(p:submit(tide.sleep, 5)) end
      local t, err = p:submit(tide.sleep, 5)
      assert.is_nil(t)
      assert.equal("pool:submit: queue full (3 waiting, queue_limit 3)", err)
      p:drain()
      assert.is_table(p:submit(tide.sleep, 1))
      p:drain()
    end)
  end)

  it("frees a slot when a task fails, times out or is cancelled", function()
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 1 }
      local a = p:submit{ run = function() tide.sleep(1000) end, timeout = 5 }
      local b = p:submit(function() error("x") end)
      local c = p:submit(function() tide.sleep(1000) end)
      local d = p:submit(function() return "d ran" end)
      tide.sleep(20)
      c:cancel()
      local st = p:drain()
      assert.same({ "timeout", "error", "cancelled", "ok" }, { a:status(), b:status(), c:status(), d:status() })
      assert.equal(1, st.ok)
      assert.equal(1, st.error)
      assert.equal(1, st.timeout)
      assert.equal(1, st.cancelled)
    end)
  end)

  it("cancels a queued task without running it, and without using a slot", function()
    local ran = false
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 1 }
      p:submit(tide.sleep, 5)
      local queued = p:submit(function() ran = true end)
      assert.is_true(queued:cancel())
      assert.equal(0, p:stats().waiting)
      p:drain()
    end)
    assert.is_false(ran)
  end)

  it("keeps nothing of tasks cancelled while queued: submit and cancel in a loop holds no memory", function()
    local held
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 1 }
      local long = p:submit(function() tide.sleep(100000) end)
      local order = {}
      local kept = p:submit(function() order[#order + 1] = "kept" end)
      collectgarbage(); collectgarbage()
      local before = collectgarbage("count")
      for _ = 1, 50000 do p:submit(function() end):cancel() end
      local last = p:submit(function() order[#order + 1] = "last" end)
      collectgarbage(); collectgarbage()
      held = collectgarbage("count") - before
      assert.equal(2, p:stats().waiting)
      long:cancel()
      kept:await()
      last:await()
      assert.same({ "kept", "last" }, order)               -- the queue's order survives
    end)
    assert.is_true(held < 2000, ("%.0f KB held"):format(held))
  end)

  it("keeps the slot through retries", function()
    local running, max_running = 0, 0
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 2 }
      for _ = 1, 6 do
        p:submit{ run = function()
            running = running + 1
            max_running = math.max(max_running, running)
            tide.sleep(1)
            running = running - 1
            error("again")
          end, retry = { max_attempts = 3, base = 1 } }
      end
      local st = p:drain()
      assert.equal(6, st.error)
    end)
    assert.equal(2, max_running)
  end)

  it("drain returns nil, 'timeout' when its limit passes", function()
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 1 }
      p:submit(tide.sleep, 50)
      local st, err = p:drain(5)
      assert.is_nil(st)
      assert.equal("timeout", err)
      assert.is_table(p:drain())
    end)
  end)

  it("describes itself", function()
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 3, name = "io" }
      p:submit(tide.sleep, 1)
      assert.equal("tide.Pool 'io' (1/3 running, 0 waiting)", tostring(p))
      p:drain()
    end)
  end)
end)
