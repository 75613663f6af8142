-- spec/consumer_spec.lua — ack-safe consumers: every delivery acked or nacked exactly once, no zombie node.
local tide = require "tide"

local quiet, loud = spec_helper.quiet_errors, spec_helper.loud_errors

--- Every tag the source handed out was settled exactly once, and nothing is held.
local function assert_promise(src)
  local seen = {}
  for _, e in ipairs(src.log) do
    local tag = e[1]
    assert(not seen[tag], "tag " .. tag .. " settled twice")
    seen[tag] = e[2]
  end
  for tag = 1, src.next_tag do assert(seen[tag], "tag " .. tag .. " never settled") end
  assert.equal(0, src.violations)
  assert.equal(0, src:stats().unacked)
end

local function wait_for(cond, ms)
  local t0 = tide.now()
  while not cond() do
    if tide.now() - t0 > ms then return false end
    tide.sleep(2)
  end
  return true
end

describe("tide.consumer", function()
  after_each(function()
    loud()
    spec_helper.assert_idle()
  end)

  it("acks what succeeds and nacks what fails, times out or is cancelled", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 5, messages = { "ok", "fail", "hang", "ok", "ok" } }
    tide.run(function()
      local c = tide.consumer{ source = src, prefetch = 5, requeue = false,
        handler = { timeout = 20, run = function(body)
          if body == "fail" then error("no") elseif body == "hang" then tide.sleep(1000) end
        end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.acked + src.nacked == 5 end, 2000))
      t:cancel()
    end)
    assert.equal(3, src.acked)
    assert.equal(2, src.nacked)
    assert_promise(src)
  end)

  it("nacks what it held when it crashes, so a restart starts with an empty window", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 4 }
    for i = 1, 4 do src:publish(i) end
    local c = tide.consumer{ source = src, prefetch = 4, handler = { run = function() tide.sleep(100000) end } }
    tide.run(function()
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.unacked == 4 end, 1000))
      t:cancel("crash")                                 -- the consumer dies holding 4
      assert.equal(0, src.unacked)
      assert.equal(4, src.nacked)
      assert.equal(4, src.queued)                       -- requeued
    end)
    assert_promise(src)
  end)

  it("never becomes a zombie node: an outage beyond the supervisor's intensity, then recovery", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 10 }
    for i = 1, 300 do src:publish(i) end
    local outage, processed_after = true, 0
    local c = tide.consumer{ source = src, prefetch = 10, poll = 5,
      handler = { timeout = 50, run = function()
        if outage then error("third party down") end
        tide.sleep(1)
        processed_after = processed_after + 1
      end } }
    local sup = tide.supervisor{ name = "top", intensity = 3, period = 1000, cooldown = { base = 20, max = 80 },
      children = { { id = "consumer", shutdown = 100, start = function(ctx)
        if outage then tide.sleep(2); error("consumer crashed: broker channel lost") end
        return c:run(ctx)
      end } } }
    local drain_ms
    tide.run(function()
      sup:start()
      assert.is_true(wait_for(function() return sup.gave_up >= 3 end, 5000), "the supervisor never gave up")
      outage = false
      local t0 = tide.now()
      assert.is_true(wait_for(function() return src.acked == 300 end, 5000), "not drained: " .. src.acked)
      drain_ms = tide.now() - t0
      -- new deliveries after recovery are processed at the normal rate
      for i = 1, 100 do src:publish(1000 + i) end
      t0 = tide.now()
      assert.is_true(wait_for(function() return src.acked == 400 end, 2000))
      local rate_ms = tide.now() - t0
      assert.is_true(rate_ms < 1000, "100 new deliveries took " .. rate_ms .. " ms")
      sup:stop()
      sup.task:await()
    end)
    assert.is_true(sup.gave_up >= 3)
    assert.equal(400, src.acked)
    assert.equal(400, processed_after)
    assert.is_true(drain_ms < 5000)
    assert_promise(src)
  end)

  it("keeps the promise through a random storm of crashes and kills over 5,000 deliveries", function()
    quiet()
    math.randomseed(5)
    local N = 5000
    local src = tide.sources.memory{ prefetch = 10 }
    for i = 1, N do src:publish(i) end
    local done = {}
    local c = tide.consumer{ source = src, prefetch = 10, poll = 2,
      handler = { timeout = 10, run = function(body)
        local r = math.random()
        if r < 0.10 then error("handler crash")
        elseif r < 0.15 then tide.sleep(50)                 -- past its timeout
        elseif r < 0.5 then tide.sleep(math.random(0, 2)) end
        done[body] = (done[body] or 0) + 1
      end } }
    local sub = tide.supervisor{ name = "sub", intensity = 50, period = 100, children = {
      { id = "consumer", shutdown = 20, start = function(ctx)
        if math.random() < 0.05 then error("consumer crash at start") end
        return c:run(ctx)
      end } } }
    local top = tide.supervisor{ name = "top", intensity = 1000, period = 1000, cooldown = { base = 1, max = 5 },
      children = { { id = "sub", start = sub, shutdown = 50 } } }
    tide.run(function()
      top:start()
      local deadline = tide.now() + 60000
      while src.acked < N and tide.now() < deadline do
        tide.sleep(math.random(1, 10))
        local r = math.random()
        local kids = sub:which_children()
        local consumer_task = kids[1] and kids[1].task
        if r < 0.15 and consumer_task and consumer_task:status() == "running" then
          consumer_task:cancel("random kill")               -- a consumer crash
        elseif r < 0.20 and sub.task and sub.task:status() == "running" then
          sub.task:cancel("random kill")                    -- a supervisor killed
        elseif r < 0.25 then
          sub:restart_child("consumer")
        end
      end
      top:stop()
      top.task:await()
    end)
    assert.equal(N, src.acked)
    for i = 1, N do assert(done[i] and done[i] >= 1, "message " .. i .. " never processed") end
    assert.is_true(src.nacked > 100, "the storm nacked only " .. src.nacked)
    assert_promise(src)
  end)

  it("gives back what an earlier attempt held when it runs under a retry", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 4 }
    for i = 1, 12 do src:publish(i) end
    local fetches = 0
    local real_fetch = src.fetch
    src.fetch = function(self, n)
      fetches = fetches + 1
      if fetches == 2 then error("connection lost") end
      return real_fetch(self, n)
    end
    local c = tide.consumer{ source = src, prefetch = 8, poll = 2,
                             handler = { run = function() tide.sleep(5) end } }
    tide.run(function()
      local t = tide.spawn{ retry = { attempts = 3, base = 1 }, run = function() return c:run() end }
      assert.is_true(wait_for(function() return src.acked + src.nacked >= 12 and src.queued == 0 and src.unacked == 0 end, 2000))
      t:cancel()
    end)
    assert_promise(src)
  end)

  it("stops taking deliveries when the loop shuts down", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 4 }
    for i = 1, 8 do src:publish(i) end
    local c = tide.consumer{ source = src, prefetch = 4, poll = 2, handler = { run = function() tide.sleep(1000) end } }
    local t0 = tide.now()
    tide.run(function()
      tide.spawn(function() return c:run() end)
      tide.sleep(10)
      tide.shutdown(100)
    end)
    assert.is_true(tide.now() - t0 < 2000)
    assert_promise(src)
  end)

  it("drops a delivery whose handler cannot start, and goes on with the others", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 4, messages = { "a", "b", function() end, "d" } }
    local c = tide.consumer{ source = src, prefetch = 4, poll = 5,
                             handler = { mode = "thread", run = function(body) return body end } }
    tide.run(function()
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.acked == 3 and src.nacked == 1 end, 2000))
      t:cancel()
    end)
    assert.equal(0, src.queued)
    assert_promise(src)
  end)

  it("rejects bad options", function()
    local src = tide.sources.memory{}
    local cases = {
      { function() tide.consumer{ prefetch = 1 } end, "tide.consumer: bad option 'source' (source with fetch, ack and nack expected, got nil)" },
      { function() tide.consumer{ source = src, prefetch = 0, handler = { run = print } } end, "tide.consumer: bad option 'prefetch' (integer >= 1 expected, got number 0)" },
      { function() tide.consumer{ source = src } end, "tide.consumer: bad option 'handler' (table expected, got nil)" },
      { function() tide.consumer{ source = src, handler = {} } end, "tide.consumer: bad option 'handler.run' (function expected, got nil)" },
      { function() tide.consumer{ source = src, handler = { run = print, tmeout = 5 } } end, "tide.consumer: unknown option 'handler.tmeout'" },
      { function() tide.sources.memory{ prefetch = -1 } end, "tide.sources.memory: bad option 'prefetch' (integer >= 1 expected, got number -1)" },
    }
    spec_helper.error_cases("spec/consumer_spec.lua", cases)
  end)
end)
