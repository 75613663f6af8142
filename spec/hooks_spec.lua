-- spec/hooks_spec.lua — hooks on a task's end are lists: every one runs, in order, each protected.
local tide = require "tide"
local S = require "tide.engine.sched"
local H = spec_helper

describe("hooks on a task's end", function()
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("run every on_finish hook in the order added, exactly once, even when one raises", function()
    H.quiet_errors()
    local calls = {}
    H.run(function()
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
    H.run(function()
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
    H.run(function()
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
    H.run(function()
      local t = p:submit(function() return c:run() end)
      tide.sleep(50)
      assert.equal(5, src:stats().unacked)
      t:cancel("stop it")
      assert.equal(0, src:stats().unacked)                  -- the consumer's hook nacked what it held
      assert.equal(0, p:stats().running)                     -- and the pool's freed the slot
      assert.equal(8, src:stats().queued)
    end)
  end)
  it("end a task once when one of its on_attempt_end hooks ends it again", function()
    local results, live_before = {}, nil
    H.run(function()
      live_before = tide.stats().live
      local t = tide.spawn{ run = function() tide.sleep(1000) end,
                            handle_result = function(s, v) results[#results + 1] = s .. ":" .. tostring(v) end }
      S.on_attempt_end(t, function(task) task:cancel("again") end)
      tide.sleep(1)
      assert.is_true(t:cancel("first"))
      assert.same({ "cancelled:first" }, results)
      assert.equal(live_before, tide.stats().live)
    end)
    assert.same({ "cancelled:first" }, results)
  end)

  it("show the terminal state to on_attempt_end hooks of a task's last attempt", function()
    local seen
    H.run(function()
      local t = tide.spawn(function() tide.sleep(1000) end)
      S.on_attempt_end(t, function(task) seen = task:status() end)
      tide.sleep(1)
      t:cancel("stop")
    end)
    assert.equal("cancelled", seen)
  end)

  it("refuse a wait inside on_finish and on_attempt_end hooks, naming the hook, and still deliver the outcome", function()
    H.quiet_errors()
    local errs = {}
    tide.configure{ on_error = function(_, err) errs[#errs + 1] = tostring(err) end }
    local got
    H.run(function()
      local t = tide.spawn(function() tide.sleep(1000) end)
      S.on_finish(t, function() tide.sleep(5) end)
      S.on_attempt_end(t, function() tide.sleep(5) end)
      tide.sleep(1)
      local canceller = tide.spawn(function() t:cancel("stop"); return "went on" end)
      got = { canceller:await(100) }
      assert.equal("cancelled", (t:await(100)))
    end)
    assert.same({ "ok", "went on" }, got)
    assert.equal(2, #errs)
    assert.truthy(errs[1]:find("tide.sleep: cannot wait inside a task's on_attempt_end hook", 1, true), errs[1])
    assert.truthy(errs[2]:find("tide.sleep: cannot wait inside a task's on_finish hook", 1, true), errs[2])
  end)

  it("let a hook's bare coroutine.yield return at once: the door it is inside still delivers the outcome", function()
    local heard, canceller
    H.run(function()
      local t = tide.spawn{ run = function() tide.sleep(1000) end,
                            handle_result = function(s, v) heard = s .. ":" .. tostring(v) end }
      -- enough yields to span many ticks, were each one a real yield
      S.on_finish(t, function() for _ = 1, 200000 do coroutine.yield() end end)
      tide.sleep(1)
      local c = tide.spawn{ timeout = 5, run = function() t:cancel("x"); return "went on" end }
      canceller = { c:await() }
    end)
    assert.equal("cancelled:x", heard)
    assert.same({ "ok", "went on" }, canceller)
  end)
end)

describe("flow hooks", function()
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("refuse to wait, naming the hook, and lose no outcome when the waiting hook runs inside a cancel", function()
    local errs = {}
    tide.configure{ on_error = function(_, err) errs[#errs + 1] = tostring(err) end }
    local done_status, cancel_took, later
    H.run(function()
      local f = tide.flow{ name = "f", tasks = { a = { run = function() tide.sleep(1000) end } },
                           on = { flow_done = function(ev) done_status = ev.status; tide.sleep(50) end } }
      local h = f:start()
      tide.sleep(5)
      -- the canceller times out before the hook's sleep would end
      local canceller = tide.spawn{ timeout = 10, run = function() h:cancel("x"); return "went on" end }
      assert.same({ "ok", "went on" }, { canceller:await(100) })
      local s, report = h:await(100)
      assert.equal("cancelled", s)
      assert.equal("cancelled", report.status)
      -- a later run that stops on a failure still cancels its other task
      local g = tide.flow{ name = "g", tasks = {
        a = { run = function() tide.sleep(5); error("boom") end },
        b = { run = function() tide.sleep(500); return "b" end } } }
      local gs, grep = g:run()
      later = { gs, grep.tasks.b.status }
    end)
    assert.equal("cancelled", done_status)
    assert.same({ "error", "cancelled" }, later)
    assert.equal(1, #errs)
    assert.truthy(errs[1]:find("tide.sleep: cannot wait inside flow hook flow_done", 1, true), errs[1])
  end)

  it("end the run's task once when a hook cancels the run again", function()
    H.quiet_errors()
    local h, delta
    H.run(function()
      local f = tide.flow{ name = "f", tasks = { a = { run = function() tide.sleep(1000) end } },
                           on = { flow_done = function() h:cancel("again") end } }
      h = f:start()
      tide.sleep(5)
      local before = tide.stats()
      h:cancel("x")
      delta = tide.stats().cancelled - before.cancelled
    end)
    assert.equal(2, delta)                                 -- the run's task and task a, once each
  end)

end)
