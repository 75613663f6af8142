-- spec/consumer_spec.lua — the consumer contract, run against both sources: every delivery acked or nacked exactly once, no zombie node.
--
-- One spec, two sources: tide.sources.memory (a stand-in) and
-- tide.sources.rabbitmq on the throwaway broker spec/run.sh starts
-- (TIDE_AMQP_URL).  Without that variable the RabbitMQ half fails: it is
-- never skipped.  Each source is wrapped by a spy that records every
-- delivery fetched and every settle, so the promise is checked the same way
-- on both: each delivery settled once, or (RabbitMQ) its channel was lost
-- and the broker gave it back; then the broker's side is checked (what is
-- left in the queue, no channel closed for a bad tag).
local tide = require "tide"

local quiet, loud = spec_helper.quiet_errors, spec_helper.loud_errors
local URL = os.getenv("TIDE_AMQP_URL")

--- spec_helper.wait_for, polling every 2 ms.
local function wait_for(cond, ms) return spec_helper.wait_for(cond, ms, 2) end

--- Wraps fetch, ack and nack to record deliveries and settles.
local function spy(src)
  local rec = { fetched = {}, settled = {}, stale = 0, twice = 0 }
  local fetch, ack, nack = src.fetch, src.ack, src.nack
  src.fetch = function(self, n, ms)
    local batch = fetch(self, n, ms)
    for _, d in ipairs(batch) do rec.fetched[#rec.fetched + 1] = d end
    return batch
  end
  local function settle(real, what)
    return function(self, d, ...)
      if rec.settled[d] then rec.twice = rec.twice + 1 end
      local sent = real(self, d, ...)
      rec.settled[d] = sent == false and "stale" or what
      if sent == false then rec.stale = rec.stale + 1 end
      return sent
    end
  end
  src.ack, src.nack = settle(ack, "ack"), settle(nack, "nack")
  src._rec = rec
  return src
end

-- ===== the two sources behind one face

local kinds = {}

kinds[1] = {
  name = "memory",
  new = function(prefetch) return spy(tide.sources.memory{ prefetch = prefetch }) end,
  publish = function(src, bodies) for _, b in ipairs(bodies) do src:publish(b) end end,
  acked = function(src) return src.acked end,
  nacked = function(src) return src.nacked end,
  ready = function(src) return src.queued end,
  --- The promise, from the memory source's own log: every tag settled once.
  check = function(src) spec_helper.settled_once(src) end,
  close = function() end,
}

kinds[2] = {
  name = "rabbitmq",
  new = function(prefetch)
    spec_helper.amqp_node()
    local src = tide.sources.rabbitmq{ url = URL, queue = spec_helper.qname("contract"),
                                       prefetch = prefetch, declare = { durable = false } }
    src:declare_queue()
    return spy(src)
  end,
  publish = function(src, bodies)
    local tasks = {}
    for k = 1, 8 do                                 -- 8 publishers: confirms overlap
      tasks[k] = tide.spawn(function()
        for i = k, #bodies, 8 do src:publish(bodies[i], { persistent = false }) end
      end)
    end
    for _, t in ipairs(tasks) do
      local st, err = t:await()
      assert(st == "ok", tostring(err))
    end
  end,
  acked = function(src) return src.stats.acked end,
  nacked = function(src) return src.stats.nacked end,
  ready = function(src) return src:queue_info().messages end,
  check = function(src)
    assert.equal(0, src.stats.precondition_failed, "a channel was closed for a bad tag: " .. tostring(src.stats.last_close))
  end,
  close = function(src)
    pcall(src.delete_queue, src)
    src:close()
  end,
}

--- The spy's side of the promise, for both sources.
local function assert_settled(src)
  local rec = src._rec
  assert.equal(0, rec.twice, "a delivery was settled twice")
  for i, d in ipairs(rec.fetched) do
    local s = rec.settled[d]
    assert(s or (d._ch and d._ch.lost), ("delivery %d (tag %s) was never settled, and its channel lives"):format(i, tostring(d.tag)))
  end
end

local function bodies(n, from)
  local list = {}
  for i = 1, n do list[i] = tostring((from or 0) + i) end
  return list
end

for _, K in ipairs(kinds) do
describe("tide.consumer on the " .. K.name .. " source", function()
  local src
  after_each(function()
    loud()
    if src then
      local s = src
      src = nil
      spec_helper.run(function() K.close(s) end)
    end
    spec_helper.assert_idle()
  end)

  it("acks what succeeds and nacks what fails, times out or is cancelled", function()
    quiet()
    spec_helper.run(function()
      src = K.new(5)
      K.publish(src, { "ok", "fail", "hang", "ok", "ok" })
      local c = tide.consumer{ source = src, concurrency = 5, requeue = false,
        handler = { timeout = 20, run = function(body)
          if body == "fail" then error("no") elseif body == "hang" then tide.sleep(1000) end
        end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return K.acked(src) + K.nacked(src) == 5 end, 3000))
      t:cancel()
      assert.equal(3, K.acked(src))
      assert.equal(2, K.nacked(src))
      assert.equal(0, K.ready(src))
      K.check(src)
    end)
    assert_settled(src)
  end)

  it("nacks what it held when it crashes, so a restart starts with an empty window", function()
    quiet()
    spec_helper.run(function()
      src = K.new(4)
      K.publish(src, bodies(4))
      local c = tide.consumer{ source = src, concurrency = 4, handler = { run = function() tide.sleep(100000) end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return #src._rec.fetched == 4 end, 3000))
      t:cancel("crash")                                 -- the consumer dies holding 4
      assert.equal(4, K.nacked(src))
      assert.is_true(wait_for(function() return K.ready(src) == 4 end, 3000), "not requeued")
      K.check(src)
    end)
    assert_settled(src)
  end)

  it("never becomes a zombie node: an outage beyond the supervisor's intensity, then recovery", function()
    quiet()
    local outage, processed_after = true, 0
    local sup, drain_ms
    spec_helper.run(function()
      src = K.new(10)
      K.publish(src, bodies(300))
      local c = tide.consumer{ source = src, concurrency = 10, poll = 5,
        handler = { timeout = 50, run = function()
          if outage then error("third party down") end
          tide.sleep(1)
          processed_after = processed_after + 1
        end } }
      sup = tide.supervisor{ name = "top", intensity = 3, period = 1000, cooldown = { base = 20, max = 80 },
        children = { { id = "consumer", shutdown = 100, start = function(ctx)
          if outage then tide.sleep(2); error("consumer crashed: broker channel lost") end
          return c:run(ctx)
        end } } }
      sup:start()
      assert.is_true(wait_for(function() return sup.gave_up >= 3 end, 5000), "the supervisor never gave up")
      outage = false
      local t0 = tide.now()
      assert.is_true(wait_for(function() return K.acked(src) == 300 end, 8000), "not drained: " .. K.acked(src))
      drain_ms = tide.now() - t0
      K.publish(src, bodies(100, 1000))                 -- new deliveries after recovery: the normal rate
      t0 = tide.now()
      assert.is_true(wait_for(function() return K.acked(src) == 400 end, 3000))
      local rate_ms = tide.now() - t0
      assert.is_true(rate_ms < 2000, "100 new deliveries took " .. rate_ms .. " ms")
      sup:stop()
      sup.task:await()
      assert.equal(0, K.ready(src))
      K.check(src)
    end)
    assert.is_true(sup.gave_up >= 3)
    assert.equal(400, K.acked(src))
    assert.equal(400, processed_after)
    assert.is_true(drain_ms < 8000)
    assert_settled(src)
  end)

  it("keeps the promise through a random storm of crashes and kills", function()
    quiet()
    local seed = tonumber(os.getenv("CONSUMER_SEED")) or 5
    math.randomseed(seed)
    local N = K.name == "memory" and 5000 or 2000
    local done = {}
    spec_helper.run(function()
      src = K.new(10)
      K.publish(src, bodies(N))
      local c = tide.consumer{ source = src, concurrency = 10, poll = 2,
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
      top:start()
      local deadline = tide.now() + 60000
      while K.acked(src) < N and tide.now() < deadline do
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
      assert.equal(0, K.ready(src))
      K.check(src)
    end)
    assert.equal(N, K.acked(src), "seed " .. seed)
    for i = 1, N do assert(done[tostring(i)], "message " .. i .. " never processed (seed " .. seed .. ")") end
    assert.is_true(K.nacked(src) > 100, "the storm nacked only " .. K.nacked(src))
    assert_settled(src)
  end)

  it("gives back what an earlier attempt held when it runs under a retry", function()
    quiet()
    local done = {}
    spec_helper.run(function()
      src = K.new(4)
      K.publish(src, bodies(12))
      local fetches = 0
      local real_fetch = src.fetch
      src.fetch = function(self, n, ms)
        fetches = fetches + 1
        if fetches == 2 then error("connection lost") end
        return real_fetch(self, n, ms)
      end
      local c = tide.consumer{ source = src, concurrency = 4, poll = 2,
                               handler = { run = function(body) tide.sleep(5); done[body] = true end } }
      local t = tide.spawn{ retry = { max_attempts = 3, base = 1 }, run = function() return c:run() end }
      assert.is_true(wait_for(function()
        for i = 1, 12 do if not done[tostring(i)] then return false end end
        return true
      end, 3000))
      assert.is_true(wait_for(function() return K.acked(src) >= 12 end, 3000))
      t:cancel()
      assert.equal(0, K.ready(src))
      K.check(src)
    end)
    assert_settled(src)
  end)

  it("stops taking deliveries when the loop shuts down", function()
    quiet()
    spec_helper.run(function()
      src = K.new(4)
      K.publish(src, bodies(8))
    end)
    local c = tide.consumer{ source = src, concurrency = 4, poll = 2, handler = { run = function() tide.sleep(1000) end } }
    local t0 = tide.now()
    spec_helper.run(function()
      tide.spawn(function() return c:run() end)
      tide.sleep(30)
      tide.shutdown(100)
    end)
    assert.is_true(tide.now() - t0 < 2000)
    spec_helper.run(function()
      assert.is_true(wait_for(function() return K.ready(src) == 8 end, 3000), "not all given back")
      K.check(src)
    end)
    assert_settled(src)
  end)

  it("lets handle_result choose per delivery: requeue, drop or ack", function()
    quiet()
    local seen, redelivered = {}, {}
    spec_helper.run(function()
      src = K.new(4)
      K.publish(src, { "a", "b", "c", "d" })
      local c = tide.consumer{ source = src, concurrency = 4, requeue = false,
        handler = {
          run = function(body, d)
            seen[body] = (seen[body] or 0) + 1
            if d.redelivered then redelivered[body] = true end
            if body ~= "a" and not d.redelivered then error("fails the first time") end
          end,
          handle_result = function(status, _, _, d)
            if d.body == "b" and status == "error" then return "requeue" end
            if d.body == "c" then return "drop" end
            if d.body == "d" then return "ack" end
          end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return K.acked(src) == 3 and K.nacked(src) == 2 end, 3000),
        "acked " .. K.acked(src) .. ", nacked " .. K.nacked(src))
      t:cancel()
      assert.equal(0, K.ready(src))
      K.check(src)
    end)
    assert.same({ a = 1, b = 2, c = 1, d = 1 }, seen)
    assert.same({ b = true }, redelivered)
    assert_settled(src)
  end)

  it("refuses a second concurrent run of one consumer, and leaves the first one's handlers alone", function()
    quiet()
    local finished = 0
    spec_helper.run(function()
      src = K.new(3)
      K.publish(src, bodies(3))
      local c = tide.consumer{ source = src, concurrency = 3, handler = { run = function()
        tide.sleep(100)
        finished = finished + 1
      end } }
      local first = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return c.in_flight == 3 end, 3000))
      local second = tide.spawn(function() return c:run() end)
      local st, err = second:await()
      assert.equal("error", st)
      assert.matches("consumer:run: consumer 'consumer' is already running in task " .. first.id, err, 1, true)
      assert.is_true(wait_for(function() return finished == 3 and K.acked(src) == 3 end, 3000))
      first:cancel()
      local third = tide.spawn(function() return c:run() end)   -- the first run ended: allowed
      tide.sleep(20)
      assert.equal("running", third:status())
      third:cancel()
      K.check(src)
    end)
    assert_settled(src)
  end)

  it("checks its handler when created: a wrong option raises at the caller's line and nothing is consumed", function()
    spec_helper.run(function()
      src = K.new(5)
      K.publish(src, bodies(5))
    end)
    local captured = 1
    local cases = {
      { function() tide.consumer{ source = src, handler = { run = print, timeout = "5s" } } end,
        "tide.consumer: bad option 'handler.timeout' (positive number of ms expected, got string \"5s\")" },
      { function() tide.consumer{ source = src, handler = { mode = "thread", run = function() return captured end } } end,
        "tide.consumer: bad option 'handler.run' (a function with upvalues cannot cross to a thread: upvalue 'captured')" },
      { function() tide.consumer{ source = src, handler = { run = print, mode = "fork" } } end,
        "tide.consumer: bad option 'handler.mode' ('coroutine', 'thread' or 'process' expected, got string \"fork\")" },
      { function() tide.consumer{ source = src, handler = { run = print, retry = { base = -1 } } } end,
        "tide.consumer: bad option 'handler.retry.base' (non-negative number of ms expected, got number -1)" },
      { function() tide.consumer{ source = src, handler = { run = print, retry = { tries = 2 } } } end,
        "tide.consumer: unknown option 'handler.retry.tries'" },
      { function() tide.consumer{ source = src, handler = { run = print, handle_result = 1 } } end,
        "tide.consumer: bad option 'handler.handle_result' (function expected, got number 1)" },
      { function() tide.consumer{ source = src, requeue = "no", handler = { run = print } } end,
        "tide.consumer: bad option 'requeue' (boolean expected, got string \"no\")" },
    }
    spec_helper.error_cases("spec/consumer_spec.lua", cases)
    spec_helper.run(function()
      assert.equal(5, K.ready(src))
      assert.equal(0, #src._rec.fetched)
    end)
  end)

  if K.name == "memory" then
    it("drops a delivery whose handler cannot start, and goes on with the others", function()
      quiet()
      src = spy(tide.sources.memory{ prefetch = 4, messages = { "a", "b", function() end, "d" } })
      local c = tide.consumer{ source = src, concurrency = 4, poll = 5,
                               handler = { mode = "thread", run = function(body) return body end } }
      spec_helper.run(function()
        local t = tide.spawn(function() return c:run() end)
        assert.is_true(wait_for(function() return src.acked == 3 and src.nacked == 1 end, 2000))
        t:cancel()
      end)
      assert.equal(0, src.queued)
      K.check(src)
      assert_settled(src)
    end)
  end
end)
end

describe("tide.consumer options", function()
  it("rejects bad options", function()
    local src = tide.sources.memory{}
    local cases = {
      { function() tide.consumer{ concurrency = 1 } end, "tide.consumer: bad option 'source' (source with fetch, ack and nack expected, got nil)" },
      { function() tide.consumer{ source = src, concurrency = 0, handler = { run = print } } end, "tide.consumer: bad option 'concurrency' (integer >= 1 expected, got number 0)" },
      { function() tide.consumer{ source = src } end, "tide.consumer: bad option 'handler' (table expected, got nil)" },
      { function() tide.consumer{ source = src, handler = {} } end, "tide.consumer: bad option 'handler.run' (function expected, got nil)" },
      { function() tide.consumer{ source = src, handler = { run = print, tmeout = 5 } } end, "tide.consumer: unknown option 'handler.tmeout'" },
      { function() tide.sources.memory{ prefetch = -1 } end, "tide.sources.memory: bad option 'prefetch' (integer >= 1 expected, got number -1)" },
    }
    spec_helper.error_cases("spec/consumer_spec.lua", cases)
  end)
end)

describe("tide.consumer's handle_result", function()
  after_each(function() loud() end)

  it("cannot wait (it runs inside its handler's end): the wait raises naming it, and the delivery still settles", function()
    local errs = {}
    tide.configure{ on_error = function(_, err)
      if tostring(err):find("cannot wait", 1, true) then errs[#errs + 1] = tostring(err) end
    end }
    local src = tide.sources.memory{ prefetch = 2, messages = { "a", "b" } }
    spec_helper.run(function()
      local c = tide.consumer{ source = src, concurrency = 2, requeue = false, handler = {
        run = function(body) if body == "b" then error("b fails") end end,
        handle_result = function() tide.sleep(5); return "drop" end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.acked + src.nacked == 2 end, 3000))
      t:cancel()
    end)
    assert.equal(1, src.acked)                    -- settled as the status says, not as the hook meant
    assert.equal(1, src.nacked)
    assert.equal(0, src.queued)                   -- b dropped, as requeue = false says
    assert.equal(2, #errs, table.concat(errs, "\n"))
    for _, e in ipairs(errs) do
      assert.truthy(e:find("tide.sleep: cannot wait inside handle_result", 1, true), e)
    end
  end)
end)

describe("tide.consumer's counts when the source cannot settle", function()
  after_each(function() loud() end)

  it("counts an ack or nack the source refused as a settle error, not as an ack or nack", function()
    quiet()
    local src = tide.sources.memory{ prefetch = 4, messages = { "ok1", "ok2", "bad" } }
    local ack, nack = src.ack, src.nack
    src.ack = function(self, d)                     -- the broker's channel is gone: the first ack raises
      if d.body == "ok1" then error("channel closed") end
      return ack(self, d)
    end
    src.nack = function(self, d, requeue)
      if d.body == "bad" then error("channel closed") end
      return nack(self, d, requeue)
    end
    local settled = 0
    spec_helper.run(function()
      local c = tide.consumer{ source = src, name = "settle-errors", concurrency = 3, handler = {
        run = function(body) if body == "bad" then error("fails") end end,
        handle_result = function() settled = settled + 1 end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return settled == 3 end, 3000))
      t:cancel()
    end)
    local tot = require("tide.supervision.consumer").totals["settle-errors"]
    assert.equal(3, tot.delivered)
    assert.equal(1, tot.acked)                      -- ok2: the only ack the source took
    assert.equal(0, tot.nacked)
    assert.equal(2, tot.settle_errors)              -- ok1's ack and bad's nack raised
    local m = require("tide.observe.metrics").render()
    assert.truthy(m:find('tide_consumer_settle_errors_total{consumer="settle-errors"} 2', 1, true), m)
    assert.truthy(m:find('tide_consumer_acks_total{consumer="settle-errors"} 1', 1, true))
  end)
end)
