-- spec/unheard_spec.lua — a task that fails with nobody to hear it is reported once to the error sink
-- (like asyncio's "exception was never retrieved"): when the loop ends, or when the task is collected.
local tide = require "tide"
local H = spec_helper

local reports
local function collect()
  reports = {}
  tide.configure{ on_error = function(where, err) reports[#reports + 1] = where .. ": " .. tostring(err) end }
end

describe("a failure nobody heard", function()
  before_each(collect)
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("is reported once when the loop ends, naming the task and the error", function()
    H.run(function()
      tide.spawn{ name = "lonely", run = function() error("nobody listens", 0) end }
      tide.spawn{ timeout = 5, run = function() tide.sleep(1000) end }
      tide.sleep(20)
    end)
    assert.equal(2, #reports)
    table.sort(reports)
    assert.matches("^task %d+ 'lonely' failed %(error%) and nobody heard it: nobody listens$", reports[1])
    assert.matches("^task %d+ failed %(timeout%) and nobody heard it: task %d+ timed out after 5 ms$", reports[2])
    H.run(function() end)                 -- not reported again
    assert.equal(2, #reports)
  end)

  it("is not reported for tide.run's root task: tide.run returns its outcome to the caller", function()
    local status, err = tide.run(function() error("the caller hears this", 0) end)
    assert.equal("error", status)
    assert.equal("the caller hears this", err)
    status, err = tide.run(function() tide.spawn(function() error("this one nobody hears", 0) end) end)
    assert.equal("ok", status)
    assert.equal(1, #reports)
    assert.matches("failed %(error%) and nobody heard it: this one nobody hears$", reports[1])
  end)

  it("is not reported when it was awaited, even after the fact, or had a handle_result", function()
    H.run(function()
      local t = tide.spawn(function() error("heard later") end)
      tide.spawn{ run = function() error("handled") end, handle_result = function() end }
      tide.spawn(function() end)                -- fine: nothing to hear
      tide.spawn(function() return nil, "an ok task that returns an error value is ok" end)
      tide.sleep(10)
      assert.equal("error", (t:await()))
    end)
    assert.same({}, reports)
  end)

  it("is reported for a pool task nobody awaited, but not for flow nodes or jobs' tasks", function()
    H.run(function()
      local p = tide.pool{ concurrency = 2 }
      p:submit(function() error("in the pool", 0) end)
      local f = tide.flow{ fail = "continue", tasks = { a = { run = function() error("in a flow") end },
                                                        b = { items = function() return { 1 } end, each = function() error("child") end } } }
      f:run()
      p:drain()
    end)
    assert.equal(1, #reports)
    assert.matches("failed %(error%) and nobody heard it: in the pool$", reports[1])
  end)

  it("is reported when the task is collected, while the loop still runs", function()
    local seen_at
    H.run(function()
      do tide.spawn(function() error("collected", 0) end) end
      tide.sleep(5)
      for _ = 1, 5 do                         -- a busy process: finished tasks leave the engine's lists
        local batch = {}
        for i = 1, 1000 do batch[i] = tide.spawn(function() end) end
        for i = 1, 1000 do batch[i]:await() end
      end
      for _ = 1, 3 do collectgarbage("collect"); tide.sleep(1) end
      seen_at = #reports
      tide.sleep(5)
    end)
    assert.equal(1, seen_at)
    assert.equal(1, #reports)
    assert.matches("nobody heard it: collected$", reports[1])
  end)
end)
