-- spec/rabbitmq_spec.lua — tide.sources.rabbitmq on a real broker: options, connecting off the loop, tags that belong to a channel, poison messages, publishing with confirms through a broker restart.
--
-- Needs the throwaway node of spec/run.sh (TIDE_AMQP_URL, TIDE_AMQP_DIR);
-- without it every test fails, none is skipped.
local tide = require "tide"
local H = spec_helper

local URL, DIR = os.getenv("TIDE_AMQP_URL"), os.getenv("TIDE_AMQP_DIR")
local ffi = require "ffi"

--- Fails the test unless spec/run.sh started the node (URL and directory).
local function need_broker() H.amqp_node(true) end
local qname, wait_for, silent_listener = H.qname, H.wait_for, H.silent_listener

--- Runs `sh spec/rabbitmq.sh ARGS` on a thread, so the loop goes on
--- meanwhile.  A failure shows the script's last lines (the node's logs:
--- a restart that failed once in a sanitizer run left nothing to read).
local function node(args)
  local out = os.tmpname()
  local t = tide.spawn{ mode = "thread", args = { ("sh spec/rabbitmq.sh %s > %s 2>&1"):format(args, out) },
                        run = function(cmd) return os.execute(cmd) end }
  local st, rc = t:await()
  local f = io.open(out)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(out)
  assert(st == "ok" and rc == 0, ("spec/rabbitmq.sh %s failed: %s\n%s"):format(args, tostring(rc), text:sub(-3000)))
end

describe("tide.sources.rabbitmq", function()
  local reports
  before_each(function()
    reports = {}
    tide.configure{ on_error = function(where, err) reports[#reports + 1] = tostring(where) .. ": " .. tostring(err) end }
  end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  it("rejects bad options at the caller's line", function()
    local R = tide.sources.rabbitmq
    local cases = {
      { function() R() end, "tide.sources.rabbitmq: bad argument #1 (table expected, got nil)" },
      { function() R{ queue = "q" } end, "tide.sources.rabbitmq: bad option 'url' (string expected, got nil)" },
      { function() R{ url = "http://x" } end, "tide.sources.rabbitmq: bad option 'url' (amqp://user:pass@host:port/vhost expected)" },
      { function() R{ url = "amqps://h/" } end, "tide.sources.rabbitmq: bad option 'url' (amqps:// (TLS) is not supported; use amqp:// on a trusted network)" },
      { function() R{ url = "amqp://h:99999/" } end, "tide.sources.rabbitmq: bad option 'url' (bad port)" },
      { function() R{ url = "amqp://h/", qeue = "q" } end, "tide.sources.rabbitmq: unknown option 'qeue'" },
      { function() R{ url = "amqp://h/", prefetch = 0 } end, "tide.sources.rabbitmq: bad option 'prefetch' (integer from 1 to 65535 expected, got number 0)" },
      { function() R{ url = "amqp://h/", heartbeat = -1 } end, "tide.sources.rabbitmq: bad option 'heartbeat' (integer number of seconds (0: none) expected, got number -1)" },
      { function() R{ url = "amqp://h/", max_redeliveries = 1.5 } end, "tide.sources.rabbitmq: bad option 'max_redeliveries' (integer >= 0 expected, got number 1.5)" },
      { function() R{ url = "amqp://h/", declare = { type = "stream" } } end, "tide.sources.rabbitmq: bad option 'declare.type' ('classic' or 'quorum' expected, got string \"stream\")" },
      { function() R{ url = "amqp://h/", declare = { durble = true } } end, "tide.sources.rabbitmq: unknown option 'declare.durble'" },
      { function() R{ url = "amqp://h/", queue = ("q"):rep(256) } end, "tide.sources.rabbitmq: bad option 'queue' (string of at most 255 bytes expected, got string \"qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq...\")" },
    }
    H.error_cases("spec/rabbitmq_spec.lua", cases)
    local src = R{ url = "amqp://u%40x:p%3Aw@[::1]:5673/v%2Fh", queue = "q" }
    assert.same({ host = "::1", port = 5673, vhost = "v/h", user = "u@x", password = "p:w", name = "tide",
                  label = "rabbitmq [::1]:5673", heartbeat = 30, timeout = 10000 }, src.cfg)
    assert.equal("/", R{ url = "amqp://h" }.cfg.vhost)
    assert.equal("guest", R{ url = "amqp://h/" }.cfg.user)
    local pub_cases = {
      { function() src:publish(1) end, "source:publish: bad argument #1 (string expected, got number 1)" },
      { function() src:publish("x", { routng_key = "a" }) end, "source:publish: unknown option 'routng_key'" },
      { function() src:publish("x", { persistent = "yes" }) end, "source:publish: bad option 'persistent' (boolean expected, got string \"yes\")" },
      { function() src:publish("x", { priority = 300 }) end, "source:publish: bad option 'priority' (integer from 0 to 255 expected, got number 300)" },
      { function() src:publish("x", { timestamp = 1e300 }) end, "source:publish: bad option 'timestamp' (integer from 0 to 2^53 (seconds since the epoch) expected, got number 1e+300)" },
      { function() src.publish({}, "x") end, "source:publish: bad self (rabbitmq source expected, got table)" },
    }
    H.error_cases("spec/rabbitmq_spec.lua", pub_cases)
  end)

  it("says why it cannot connect: refused, bad credentials, no such vhost", function()
    need_broker()
    spec_helper.run(function()
      local function connect_error(url)
        local src = tide.sources.rabbitmq{ url = url, queue = "q", connect_timeout = 2000 }
        local ok, err = pcall(src.queue_info, src)
        assert.is_false(ok)
        return err
      end
      assert.matches("^rabbitmq 127.0.0.1:1: cannot connect: ", connect_error("amqp://tide:tide@127.0.0.1:1/"))
      assert.matches("403", connect_error(URL:gsub("tide:tide", "tide:wrong")))
      assert.matches("530 NOT_ALLOWED", connect_error(URL .. "nosuchvhost"))
    end)
  end)

  it("never blocks the loop while it connects: the handshake waits on a thread", function()
    need_broker()
    local max_gap, err = 0, nil
    spec_helper.run(function()
      -- A socket that listens and never accepts: the kernel completes the
      -- TCP handshake, nobody speaks AMQP, the login waits out its timeout.
      local silent, port = silent_listener()
      local src = tide.sources.rabbitmq{ url = ("amqp://tide:tide@127.0.0.1:%d/"):format(port), queue = "q",
                                         connect_timeout = 400 }
      local done = false
      local ticker = tide.spawn(function()
        local last = tide.now()
        while not done do
          tide.sleep(5)
          local now = tide.now()
          if now - last > max_gap then max_gap = now - last end
          last = now
        end
      end)
      local t0 = tide.now()
      local ok
      ok, err = pcall(src.queue_info, src)
      assert.is_false(ok)
      assert.is_true(tide.now() - t0 >= 350, "gave up after " .. (tide.now() - t0) .. " ms")
      done = true
      ticker:await()
      ffi.C.close(silent)
    end)
    assert.matches("login", err)
    assert.is_true(max_gap < 100, ("the loop stalled for %.0f ms"):format(max_gap))
  end)

  it("round-trips bodies, headers and properties, large bodies included", function()
    need_broker()
    local got = {}
    local big = ("0123456789abcdef"):rep(65536) .. "\0end"           -- 1 MB: many frames each way
    local headers = { id = 7, neg = -3, pi = 3.25, yes = true, no = false, s = "a\0b",
                      list = { 1, "two", { three = 3 } }, nested = { deeper = { deepest = "x" } } }
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("roundtrip"), declare = { durable = false } }
      src:publish("small\0body", { headers = headers, content_type = "text/plain", message_id = "m-1",
                                  correlation_id = "c-1", priority = 3, timestamp = 1700000000, app_id = "spec",
                                  persistent = false })
      src:publish(big)
      src:publish("")
      local c = tide.consumer{ source = src, handler = { run = function(body, d) got[#got + 1] = { body, d } end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return #got == 3 end, 5000))
      t:cancel()
      src:delete_queue()
      src:close()
    end)
    local d = got[1][2]
    assert.equal("small\0body", got[1][1])
    assert.same(headers, d.headers)
    assert.equal("text/plain", d.properties.content_type)
    assert.equal("m-1", d.properties.message_id)
    assert.equal("c-1", d.properties.correlation_id)
    assert.equal(3, d.properties.priority)
    assert.equal(1700000000, d.properties.timestamp)
    assert.equal(1, d.properties.delivery_mode)
    assert.is_false(d.redelivered)
    assert.equal(#big, #got[2][1])
    assert.is_true(got[2][1] == big)
    assert.equal(2, got[2][2].properties.delivery_mode)
    assert.equal("", got[3][1])
  end)

  it("never sends a late outcome on a new channel: deliveries of a lost connection come back redelivered", function()
    need_broker()
    local processed, redelivered, src = {}, {}, nil
    local closed = false
    spec_helper.run(function()
      src = tide.sources.rabbitmq{ url = URL, queue = qname("late"), prefetch = 5, declare = { durable = false } }
      for i = 1, 10 do src:publish(tostring(i), { persistent = false }) end
      local c = tide.consumer{ source = src, handler = { timeout = 30000, run = function(body, d)
        if d.redelivered then redelivered[body] = true end
        while not closed and not d.redelivered do tide.sleep(5) end   -- the first five outlive their connection
        processed[body] = (processed[body] or 0) + 1
      end } }
      local sup = tide.supervisor{ intensity = 10, period = 1000, cooldown = { base = 10, max = 50 },
        children = { { id = "c", start = function(ctx) return c:run(ctx) end, shutdown = 3000 } } }
      sup:start()
      assert.is_true(wait_for(function() return src.stats.delivered >= 5 end, 3000))
      node("ctl " .. DIR .. " close_all_connections 'closed by the spec'")
      closed = true
      assert.is_true(wait_for(function() return src.stats.acked == 10 end, 10000),
        "acked " .. src.stats.acked .. ", stale " .. src.stats.stale)
      assert.equal(0, src:queue_info().messages)
      sup:stop()
      sup.task:await(5000)
      src:delete_queue()
      src:close()
    end)
    assert.equal(5, src.stats.stale)                   -- the late five sent nothing
    assert.equal(0, src.stats.precondition_failed)
    local n_redelivered = 0
    for i = 1, 10 do
      assert(processed[tostring(i)], "message " .. i .. " never processed")
      if redelivered[tostring(i)] then n_redelivered = n_redelivered + 1 end
    end
    assert.equal(5, n_redelivered)
  end)

  it("leaves no consumer behind when a run is cancelled while it starts", function()
    need_broker()
    local info
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("cancel-start"), prefetch = 5, declare = { durable = false } }
      -- (declare: the run declares the queue too, one more wait to cancel in)
      src:declare_queue()
      for i = 1, 20 do src:publish(tostring(i), { persistent = false }) end
      local c = tide.consumer{ source = src, handler = { run = function() tide.sleep(1000) end } }
      -- Cancel each run while its channel waits for one of these replies.
      local waits = { "channel.open-ok", "basic.qos-ok", "queue.declare-ok", "basic.consume-ok" }
      local function waiting_for(what)
        for _, ch in pairs(src.conn and src.conn.channels or {}) do
          if ch.waiter and ch.waiter.expect == what then return true end
        end
      end
      src:queue_info()                       -- connected first
      for k = 1, 20 do
        local what = waits[k % #waits + 1]
        local t = tide.spawn(function() return c:run() end)
        local t0 = tide.now()
        repeat coroutine.yield() until waiting_for(what) or tide.now() - t0 > 1000
        assert(waiting_for(what), "never saw a run wait for " .. what)
        t:cancel("cancelled while starting")
      end
      assert.is_true(wait_for(function()
        info = src:queue_info()
        return info.consumers == 0 and info.messages == 20
      end, 3000), "an orphan consumer holds deliveries")
      src:delete_queue()
      src:close()
    end)
    assert.same({ consumers = 0, messages = 20 }, info)
  end)

  for _, qtype in ipairs{ "quorum", "classic" } do
    it(("dead-letters a poison message past max_redeliveries (%s queue: %s)"):format(qtype,
        qtype == "quorum" and "x-delivery-count" or "counted by the consumer"), function()
      need_broker()
      local runs, fine = 0, false
      local dlq_count
      spec_helper.run(function()
        local q = qname("poison-" .. qtype)
        local dlq = tide.sources.rabbitmq{ url = URL, queue = q .. "-dlq", declare = { durable = true } }
        dlq:declare_queue()
        local src = tide.sources.rabbitmq{ url = URL, queue = q, prefetch = 5, max_redeliveries = 2,
          declare = { durable = true, type = qtype, arguments = { ["x-dead-letter-exchange"] = "",
                                                                  ["x-dead-letter-routing-key"] = q .. "-dlq" } } }
        src:publish("poison")
        src:publish("fine")
        local c = tide.consumer{ source = src, handler = { run = function(body)
          if body == "poison" then runs = runs + 1; error("cannot parse") end
          fine = true
        end } }
        local t = tide.spawn(function() return c:run() end)
        assert.is_true(wait_for(function() return src.stats.dead_lettered == 1 and fine end, 5000))
        t:cancel()
        assert.is_true(wait_for(function() return dlq:queue_info().messages == 1 end, 3000))
        dlq_count = dlq:queue_info().messages
        assert.equal(0, src:queue_info().messages)
        src:delete_queue()
        dlq:delete_queue()
        src:close()
        dlq:close()
      end)
      assert.equal(3, runs)                            -- the first delivery and two redeliveries
      assert.equal(1, dlq_count)
      local said = false
      for _, r in ipairs(reports) do
        if r:find("more than max_redeliveries (2)", 1, true) then said = true end
      end
      assert(said, "the error sink did not say why: " .. table.concat(reports, "\n"))
    end)
  end

  it("settles outcomes that come out of order each exactly once: an ack with `multiple` never covers a delivery still running", function()
    -- 400 messages, prefetch 50, handlers that take 0-15 ms at random, so
    -- outcomes come in any order; by id, the first delivery is acked, nacked
    -- with requeue or dropped (dead-lettered).  Had an ack with `multiple`
    -- covered a delivery whose handler still ran, that delivery could not be
    -- requeued or dead-lettered afterwards (its nack would name an unknown
    -- tag and the broker would close the channel: PRECONDITION_FAILED).
    need_broker()
    local M = 400
    local seen, redelivered, dead = {}, {}, {}
    local src, dlq_bodies
    local function plan(id) return id % 5 == 0 and "requeue" or id % 7 == 0 and "drop" or "ack" end
    spec_helper.run(function()
      local q = qname("order")
      local dlq = tide.sources.rabbitmq{ url = URL, queue = q .. "-dlq", declare = { durable = false } }
      dlq:declare_queue()
      src = tide.sources.rabbitmq{ url = URL, queue = q, prefetch = 50,
        declare = { durable = false, arguments = { ["x-dead-letter-exchange"] = "",
                                                   ["x-dead-letter-routing-key"] = q .. "-dlq" } } }
      local pubs = {}
      for k = 1, 10 do
        pubs[k] = tide.spawn(function() for i = k, M, 10 do src:publish(tostring(i), { persistent = false }) end end)
      end
      for _, t in ipairs(pubs) do local st, e = t:await(); assert(st == "ok", tostring(e)) end
      math.randomseed(17)
      local c = tide.consumer{ source = src, handler = {
        run = function(body, d)
          tide.sleep(math.random(0, 15))
          seen[body] = (seen[body] or 0) + 1
          if d.redelivered then redelivered[body] = (redelivered[body] or 0) + 1 end
        end,
        handle_result = function(_, _, _, d)
          if d.redelivered then return "ack" end
          return plan(tonumber(d.body))
        end } }
      local t = tide.spawn(function() return c:run() end)
      local want = 0
      for id = 1, M do want = want + (plan(id) == "requeue" and 2 or 1) end
      assert.is_true(wait_for(function() return src.stats.acked + src.stats.nacked == want end, 20000),
        ("settled %d + %d of %d"):format(src.stats.acked, src.stats.nacked, want))
      t:cancel()                                       -- closes the channel: what it held unacked comes back
      tide.sleep(200)
      assert.equal(0, src:queue_info().messages)
      local drops = 0
      for id = 1, M do if plan(id) == "drop" then drops = drops + 1 end end
      dlq_bodies = {}
      local d = tide.consumer{ source = dlq, handler = { run = function(body) dlq_bodies[#dlq_bodies + 1] = body end } }
      local dt = tide.spawn(function() return d:run() end)
      assert.is_true(wait_for(function() return dlq.stats.acked == drops end, 5000),
        ("%d of %d dead letters"):format(dlq.stats.acked, drops))
      tide.sleep(100)
      dt:cancel()
      assert.equal(0, dlq:queue_info().messages)
      for _, b in ipairs(dlq_bodies) do dead[b] = (dead[b] or 0) + 1 end
      src:delete_queue()
      dlq:delete_queue()
      src:close()
      dlq:close()
    end)
    for id = 1, M do
      local b, p = tostring(id), plan(id)
      assert.equal(p == "requeue" and 2 or 1, seen[b], "handled " .. b)
      assert.equal(p == "requeue" and 1 or nil, redelivered[b], "redelivered " .. b)
      assert.equal(p == "drop" and 1 or nil, dead[b], "dead-lettered " .. b)
    end
    assert.equal(0, src.stats.precondition_failed)
    assert.equal(0, src.stats.broker_closes)
    assert.equal(0, src.stats.stale)
    -- Both kinds of ack were sent: in order (with `multiple`) and out of order.
    assert.is_true(src.stats.acked_multiple > 0, "no ack with multiple")
    assert.is_true(src.stats.acked_multiple < src.stats.acked, "no ack out of order")
  end)

  for _, mode in ipairs{ "coroutine", "thread" } do
    it("gives a " .. mode .. " handler delivery_count 0 on a first delivery and 1 on its redelivery", function()
      -- delivery_count is stored only when it is not 0 (a metatable gives
      -- 0): a thread handler's copy of the delivery must have it too.
      need_broker()
      local got = {}
      spec_helper.run(function()
        local src = tide.sources.rabbitmq{ url = URL, queue = qname("count-" .. mode), declare = { durable = false } }
        src:declare_queue()
        src:publish("m", { persistent = false })
        local c = tide.consumer{ source = src, handler = {
          mode = mode ~= "coroutine" and mode or nil,
          run = function(_, d) return d.delivery_count end,
          handle_result = function(status, value, _, d)
            got[#got + 1] = status .. ":" .. tostring(value)
            if not d.redelivered then return "requeue" end
            return "ack"
          end } }
        local t = tide.spawn(function() return c:run() end)
        assert.is_true(wait_for(function() return src.stats.acked == 1 end, 10000), "acked " .. src.stats.acked)
        t:cancel()
        src:delete_queue()
        src:close()
      end)
      assert.same({ "ok:0", "ok:1" }, got)
    end)
  end

  it("fails the consumer when its queue is deleted (basic.cancel from the broker)", function()
    need_broker()
    local status, err
    spec_helper.run(function()
      local q = qname("deleted")
      local src = tide.sources.rabbitmq{ url = URL, queue = q, declare = { durable = false } }
      local other = tide.sources.rabbitmq{ url = URL, queue = q }
      local c = tide.consumer{ source = src, handler = { run = function() end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.consume_ch and src.consume_ch.buffer and true end, 3000))
      tide.sleep(50)
      other:delete_queue()
      status, err = t:await(3000)
      src:close()
      other:close()
    end)
    assert.equal("error", status)
    assert.matches("consumer cancelled by the broker %(queue deleted%?%)", err)
  end)

  it("publishes again after a publisher channel was lost or abandoned while it opened", function()
    need_broker()
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("pubopen"), declare = { durable = false } }
      src:declare_queue()
      local function waiting_for(what)
        for _, ch in pairs(src.conn and src.conn.channels or {}) do
          if ch.waiter and ch.waiter.expect == what then return true end
        end
      end
      --- Yields until a channel waits for `what` (the loop goes on meanwhile).
      local function until_waiting(what)
        local t0 = tide.now()
        repeat coroutine.yield() until waiting_for(what) or tide.now() - t0 > 3000
        assert(waiting_for(what), "no channel ever waited for " .. what)
      end
      for _, what in ipairs{ "channel.open-ok", "confirm.select-ok" } do
        src.conn:close()                     -- each step starts without a publisher channel
        -- the connection is lost while the publisher's channel waits
        local t = tide.spawn(function() return src:publish("x") end)
        until_waiting(what)
        src.conn:close()
        local st, err = t:await(3000)
        assert.equal("error", st)
        assert.matches("connection closed", err)
        -- the publishing task is cancelled while its channel waits
        t = tide.spawn(function() return src:publish("x") end)
        until_waiting(what)
        t:cancel("abandoned")
        assert.is_true(src:publish("y"))
      end
      assert.equal(2, src:queue_info().messages)
      src:delete_queue()
      src:close()
    end)
  end)

  it("keeps an idle connection alive with heartbeats", function()
    need_broker()
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("idle"), heartbeat = 1, declare = { durable = false } }
      src:publish("before")
      local conn = src.conn
      tide.sleep(3500)                                  -- the broker closes after two silent intervals
      assert.is_false(conn.lost)
      src:publish("after")
      assert.equal(conn, src.conn)
      assert.equal(2, src:queue_info().messages)
      src:delete_queue()
      src:close()
    end)
  end)

  it("raises a clear error when the broker closes the publishing channel, then publishes again", function()
    need_broker()
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("pubfail"), declare = { durable = false } }
      local ok, err = pcall(src.publish, src, "x", { exchange = "no-such-exchange" })
      assert.is_false(ok)
      assert.matches("404 NOT_FOUND", err)
      assert.is_true(src:publish("y"))
      assert.equal(1, src:queue_info().messages)
      src:delete_queue()
      src:close()
    end)
  end)

  it("takes a connect_timeout past an int of ms (3e9, 1e300) as a long one", function()
    need_broker()
    spec_helper.run(function()
      for _, ms in ipairs{ 3e9, 1e300 } do
        local src = tide.sources.rabbitmq{ url = URL, queue = qname("longtimeout"), declare = { durable = false },
                                           connect_timeout = ms }
        assert.is_true(src:publish("x"))
        src:delete_queue()
        src:close()
      end
    end)
  end)

  it("refuses headers that cannot be sent without losing count of the confirms that follow", function()
    need_broker()
    spec_helper.run(function()
      local src = tide.sources.rabbitmq{ url = URL, queue = qname("pubheaders"), declare = { durable = false },
                                         confirm_timeout = 3000 }
      assert.is_true(src:publish("a"))
      local ok, err = pcall(src.publish, src, "b", { headers = { x = function() end } })
      assert.is_false(ok)
      assert.matches("source:publish: headers.x: function cannot be sent", err)
      local t0 = tide.now()
      assert.is_true(src:publish("c"))                 -- confirmed as itself, not taken for "b"
      assert.is_true(src:publish("d"))
      assert.is_true(tide.now() - t0 < 1000)
      assert.equal(3, src:queue_info().messages)
      src:delete_queue()
      src:close()
    end)
  end)

  it("refuses a publish where it cannot wait for the confirm, before anything is sent", function()
    need_broker()
    local src = tide.sources.rabbitmq{ url = URL, queue = qname("pubcallback"), declare = { durable = false } }
    local err
    spec_helper.run(function()
      assert.is_true(src:publish("a"))                 -- the publishing channel is open from here
      local t = tide.spawn{ run = function() return 1 end, handle_result = function()
        local ok, e = pcall(src.publish, src, "from a callback")
        err = ok and "published" or e
      end }
      t:await()
      tide.sleep(50)
      assert.equal(1, src:queue_info().messages)
      src:delete_queue()
      src:close()
    end)
    assert.matches("source:publish: cannot wait inside handle_result", err)
  end)

  it("publishes with confirms through a broker restart: none lost, none confirmed that the broker does not hold", function()
    need_broker()
    local seed = tonumber(os.getenv("RABBITMQ_SEED")) or os.time()
    math.randomseed(seed)
    local N, confirmed, failures, held, attempted = 0, {}, 0, {}, {}
    local restarted = false
    spec_helper.run(function()
      local q = qname("confirms")
      local src = tide.sources.rabbitmq{ url = URL, queue = q, declare = { durable = true }, connect_timeout = 1000,
                                         confirm_timeout = 5000 }
      src:declare_queue()
      local workers, after = {}, 0
      for w = 1, 4 do
        workers[w] = tide.spawn(function()
          -- ids w, w+4, ... until 200 were confirmed after the restart
          local i = w
          local deadline = tide.now() + 60000
          while not (restarted and after >= 200) do
            assert(tide.now() < deadline, "publishing did not recover within 60 s of the start")
            if i > N then N = i end
            attempted[i] = true
            while true do                               -- at least once: publish again until confirmed
              local ok = pcall(src.publish, src, tostring(i), { persistent = true })
              if ok then
                confirmed[i] = true
                if restarted then after = after + 1 end
                break
              end
              failures = failures + 1
              assert(tide.now() < deadline, "publishing did not recover within 60 s of the start")
              tide.sleep(50)
            end
            i = i + 4
            tide.sleep(math.random(0, 10))
          end
        end)
      end
      tide.sleep(300)
      node("down " .. DIR)
      tide.sleep(200)
      node("up " .. DIR)
      restarted = true
      for _, t in ipairs(workers) do
        local st, e = t:await()
        assert(st == "ok", tostring(e))
      end
      -- Read back everything the queue holds.
      local c = tide.consumer{ source = src, concurrency = 100, handler = { run = function(body)
        held[tonumber(body)] = (held[tonumber(body)] or 0) + 1
      end } }
      local t = tide.spawn(function() return c:run() end)
      tide.sleep(300)
      assert.is_true(wait_for(function() return src:queue_info().messages == 0 end, 5000))
      t:cancel()
      src:delete_queue()
      src:close()
    end)
    assert.is_true(failures > 0, "the restart failed no publish (seed " .. seed .. ")")
    local n = 0
    for i = 1, N do
      if attempted[i] then assert(confirmed[i], "message " .. i .. " was never confirmed (seed " .. seed .. ")") end
      if confirmed[i] then
        n = n + 1
        assert(held[i], "message " .. i .. " was confirmed and the broker does not hold it (seed " .. seed .. ")")
      end
    end
    assert.is_true(n >= 400, "only " .. n .. " messages were confirmed")
    for i in pairs(held) do assert(attempted[i], "the broker holds an unknown message " .. i) end
  end)
end)
