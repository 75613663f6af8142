-- spec/hooks_spec.lua — hooks on a task's end are lists: every one runs, in order, each protected.
local tide = require "tide"
local S = require "tide.engine.sched"
local H = spec_helper

describe("hooks on a task's end", function()
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("run every on_finish hook in the order added, exactly once, even when one raises", function()
    H.quiet_errors()
    local calls = {}
    tide.run(function()
      local t = tide.spawn(function() tide.sleep(5) return "done" end)
      S.on_finish(t, function(task) calls[#calls + 1] = "a:" .. task:status() end)
      S.on_finish(t, function() error("boom in a hook") end)
      S.on_finish(t, function(task) calls[#calls + 1] = "c:" .. tostring(task.value) end)
      assert.equal("ok", (t:await()))
    end)
    assert.same({ "a:ok", "c:done" }, calls)
    assert.equal(1, H.reported)
  end)

  it("keep the tick going when a hook raises: the other tasks of the tick still end", function()
    H.quiet_errors()
    local ended = 0
    tide.run(function()
      local tasks = {}
      for i = 1, 50 do
        local t = tide.spawn(function() return i end)
        if i % 7 == 0 then S.on_finish(t, function() error("hook " .. i) end) end
        S.on_finish(t, function() ended = ended + 1 end)
        tasks[i] = t
      end
      for _, t in ipairs(tasks) do assert.equal("ok", (t:await())) end
    end)
    assert.equal(50, ended)
    assert.equal(7, H.reported)
  end)

  it("run on_attempt_end hooks once per attempt, and not after they were removed", function()
    local seen = {}
    local kept, removed = function(t) seen[#seen + 1] = "kept " .. t.attempts end, function() seen[#seen + 1] = "removed" end
    tide.run(function()
      local t = tide.spawn{ retry = { max_attempts = 3, base = 1 }, run = function()
        local me = tide.current()
        S.on_attempt_end(me, kept)
        S.on_attempt_end(me, removed)
        S.off_attempt_end(me, removed)
        if me.attempts < 3 then error("again") end
      end }
      assert.equal("ok", (t:await()))
    end)
    assert.same({ "kept 1", "kept 2", "kept 3" }, seen)
  end)

  it("let a pool slot and a consumer both clean up after the same task", function()
    local src = tide.sources.memory{ prefetch = 5, messages = { 1, 2, 3, 4, 5, 6, 7, 8 } }
    local c = tide.consumer{ source = src, concurrency = 5, handler = { run = function() tide.sleep(1000) end } }
    local p = tide.pool{ concurrency = 1 }
    tide.run(function()
      local t = p:submit(function() return c:run() end)
      tide.sleep(50)
      assert.equal(5, src:stats().unacked)
      t:cancel("stop it")
      assert.equal(0, src:stats().unacked)                  -- the consumer's hook nacked what it held
      assert.equal(0, p:stats().running)                     -- and the pool's freed the slot
      assert.equal(8, src:stats().queued)
    end)
  end)
end)
