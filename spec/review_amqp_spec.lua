-- spec/review_amqp_spec.lua — a hostile review of the RabbitMQ consumer: frames a broker should never send, deliveries settled twice, bad arguments that must refuse before anything is consumed, frame-size edges.
--
-- The hostile-broker tests need python3 (spec/tools/fake_amqp.py) and run
-- the client in a process of its own, so a crash shows as a failed exit
-- status.  The others need the throwaway node of spec/run.sh (TIDE_AMQP_URL).
local tide = require "tide"
local H = spec_helper

local URL = os.getenv("TIDE_AMQP_URL")

local function qname(what) return H.qname("review-" .. what) end
local wait_for = H.wait_for

-- The client of a hostile broker: consumes from it until the consumer
-- fails, prints the bodies it handled and the consumer's outcome.
local CLIENT = [[
local tide = require "tide"
local port = assert(tonumber(os.getenv("FAKE_PORT")))
tide.configure{ on_error = function() end }
local src = tide.sources.rabbitmq{ url = "amqp://guest:guest@127.0.0.1:" .. port .. "/", queue = "q",
                                   heartbeat = tonumber(os.getenv("HEARTBEAT") or "0"), connect_timeout = 3000 }
local bodies = {}
local c = tide.consumer{ source = src, concurrency = 4,
                         handler = { run = function(body)
                           bodies[#bodies + 1] = body
                           if os.getenv("SLOW") then tide.sleep(tonumber(os.getenv("SLOW"))) end
                           return true
                         end, handle_result = function(status) print("RESULT " .. status) end } }
local want = tonumber(os.getenv("WANT") or "0")      -- bodies after which the client is done
local status, st, err = tide.run(function()
  local t = tide.spawn(function() return c:run() end)
  local t0 = tide.now()
  while tide.now() - t0 < 5000 do
    local st, err = t:await(20)
    if st then return st, err end
    if want > 0 and #bodies >= want then break end
  end
  t:cancel("client done")
  return "stopped", #bodies
end)
print("BODIES " .. table.concat(bodies, ","))
print("OUTCOME " .. tostring(st) .. " " .. tostring(err))
]]

--- Runs the client against fake_amqp.py in `mode`; its exit status and output.
local function against_fake(mode, want, env)
  local dir = H.tempdir()
  local portfile = dir .. "/port"
  assert(os.execute(("python3 spec/tools/fake_amqp.py %s %s > %s/fake.log 2>&1 &"):format(mode, portfile, dir)) == 0)
  local port
  for _ = 1, 200 do
    port = H.file_bytes(portfile)
    if port ~= "" then break end
    os.execute("sleep 0.05")
  end
  assert(port ~= "", "the fake broker did not start: " .. H.file_bytes(dir .. "/fake.log"))
  local status, out = H.run_lua(dir, "client.lua", CLIENT, 30, ("FAKE_PORT=%s WANT=%d %s"):format(port, want or 0, env or ""))
  os.execute("rm -rf " .. dir)
  return status, out
end

describe("tide.sources.rabbitmq against a hostile broker", function()
  -- Each: a mode of fake_amqp.py, what the consumer's failure must say.
  local cases = {
    { "class_header", "content header of class 10" },
    { "body_overrun", "an unexpected body frame" },
    { "stray_header", "an unexpected content header" },
    { "stray_body", "an unexpected body frame" },
    { "huge_frame", "protocol error" },
    { "bad_frame_end", "protocol error" },
    { "huge_body_size", "is larger than" },
    { "truncated_method", "protocol error" },
  }
  for _, case in ipairs(cases) do
    it("fails the consumer with a reason, never crashes, on " .. case[1], function()
      local status, out = against_fake(case[1])
      assert.equal(0, status, out)
      local outcome = out:match("OUTCOME ([^\n]*)")
      assert.truthy(outcome, out)
      assert.matches("^error ", outcome)
      assert.truthy(outcome:find(case[2], 1, true), outcome)
      if case[1] == "class_header" then assert.matches("BODIES ok\n", out) end
    end)
  end

  it("survives frames of random shapes (6 seeds): the client fails with a reason or goes on, never crashes", function()
    for seed = 1, 6 do
      local status, out = against_fake("random:" .. seed)
      assert.equal(0, status, ("seed %d: %s"):format(seed, out))
      assert.matches("OUTCOME ", out)
    end
  end)

  it("fails the consumer when a silent broker misses its heartbeats, a handler still running", function()
    local t0 = os.time()
    local status, out = against_fake("silent", 0, "HEARTBEAT=1 SLOW=4000")
    assert.equal(0, status, out)
    assert.matches("BODIES ok\n", out)
    assert.matches("OUTCOME error [^\n]*no heartbeat from the broker for 2 s", out)
    assert.is_true(os.time() - t0 < 12, "the loss took too long to notice")
    -- Its handler is cancelled with the run, and reported once.
    local _, results = out:gsub("RESULT ", "")
    assert.equal(1, results, out)
    assert.matches("RESULT cancelled\n", out)
  end)

  it("takes headers nested 4,000 deep, deliveries on a channel it never opened (interleaved too), a frame of an unknown type", function()
    local status, out = against_fake("deep_headers", 1)
    assert.equal(0, status, out)
    assert.matches("BODIES ok\n", out)
    for _, mode in ipairs{ "channel_65535", "unknown_frame_type" } do
      status, out = against_fake(mode, 1)
      assert.equal(0, status, out)
      assert.matches("BODIES ok\n", out)
    end
    status, out = against_fake("interleaved", 2)
    assert.equal(0, status, out)
    assert.matches("BODIES ok,ok2\n", out)
  end)
end)

describe("tide.sources.rabbitmq options, attacked", function()
  it("refuses declare.arguments that could never be sent, at the constructor", function()
    local R = tide.sources.rabbitmq
    local deep = {}
    local t = deep
    for _ = 1, 40 do t.a = {}; t = t.a end
    H.error_cases("spec/review_amqp_spec.lua", {
      { function() R{ url = "amqp://h/", declare = { arguments = { ["x-max-length"] = print } } } end,
        "tide.sources.rabbitmq: bad option 'declare.arguments.x-max-length' (string, number, boolean or table expected, got function)" },
      { function() R{ url = "amqp://h/", declare = { arguments = { a = { b = { coroutine.create(print) } } } } } end,
        "tide.sources.rabbitmq: bad option 'declare.arguments.a.b[1]' (string, number, boolean or table expected, got thread)" },
      { function() R{ url = "amqp://h/", declare = { arguments = { [true] = 1 } } } end,
        "tide.sources.rabbitmq: bad option 'declare.arguments' (table with string keys expected, got boolean key)" },
      { function() R{ url = "amqp://h/", declare = { arguments = deep } } end,
        "tide.sources.rabbitmq: bad option 'declare.arguments" .. (".a"):rep(32) .. "' (tables nested at most 32 deep expected, got deeper)" },
    })
    -- What can be sent is taken: strings, numbers, booleans, arrays, nested tables.
    local src = R{ url = "amqp://h/", declare = { arguments = { ["x-max-length"] = 10, ["x-tags"] = { "a", "b" },
                                                                 nested = { on = true } } } }
    assert.same({ ["x-max-length"] = 10, ["x-tags"] = { "a", "b" }, nested = { on = true } }, src.declare.arguments)
  end)

  it("refuses to settle what is not one of its deliveries, and methods called on something else", function()
    local R = tide.sources.rabbitmq
    -- Settling something that is not a delivery of this source says so.
    local src0 = R{ url = "amqp://h/", queue = "q" }
    H.error_cases("spec/review_amqp_spec.lua", {
      { function() src0:ack(nil) end, "source:ack: bad argument #1 (delivery of a rabbitmq source expected, got nil)" },
      { function() src0:nack({ tag = 1 }, true) end,
        "source:nack: bad argument #1 (delivery of a rabbitmq source expected, got table)" },
      { function() src0.ack({}, {}) end, "source:ack: bad self (rabbitmq source expected, got table)" },
      { function() src0.fetch(5, 1) end, "source:fetch: bad self (rabbitmq source expected, got number 5)" },
    })
  end)
end)

describe("tide.consumer on RabbitMQ, attacked", function()
  local AmqpConn = debug.getregistry()["tide.AmqpConn"]
  local next0 = AmqpConn and AmqpConn.__index.next
  before_each(function()
    assert(URL, "TIDE_AMQP_URL is not set: spec/run.sh starts a RabbitMQ node for this spec")
    H.quiet_errors()
  end)
  after_each(function()
    if next0 then AmqpConn.__index.next = next0 end
    H.loud_errors()
    H.assert_idle()
  end)

  --- A durable queue of its own, deleted at the end of fn(src).
  local function with_queue(what, opts, fn)
    opts.url, opts.queue, opts.declare = URL, qname(what), true
    local src = tide.sources.rabbitmq(opts)
    H.run(function()
      local ok, err = pcall(fn, src)
      pcall(src.delete_queue, src)
      src:close()
      if not ok then error(err, 0) end
    end)
  end

  it("gives a delivery back when reading its frame raises, instead of losing it with its slot", function()
    with_queue("unreadable", { prefetch = 5 }, function(src)
      for i = 1, 3 do src:publish("m" .. i) end
      -- The binding raises while it makes a delivery into Lua values (it
      -- did on a content header of another class; out of memory would too).
      local armed = true
      AmqpConn.__index.next = function(raw)
        local r = { next0(raw) }
        if armed and r[1] == "basic.deliver" then armed = false; error("not enough memory", 0) end
        return unpack(r, 1, table.maxn(r))
      end
      local seen = {}
      local c = tide.consumer{ source = src, handler = { run = function(body) seen[body] = (seen[body] or 0) + 1 end } }
      local t = tide.spawn(function() return c:run() end)
      local st, err = t:await(3000)
      if st == nil then t:cancel() end
      AmqpConn.__index.next = next0
      assert.equal("error", st, "the consumer went on with a delivery lost: " .. tostring(err))
      assert.truthy(tostring(err):find("not enough memory", 1, true), tostring(err))
      local again = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return seen.m1 and seen.m2 and seen.m3 end, 5000), "a message never came back")
      again:cancel()
      again:await()
      assert.is_true(wait_for(function() return src:queue_info().messages == 0 end, 3000))
    end)
  end)

  it("refuses a bad supervisor context at the call, before the source starts consuming", function()
    with_queue("badctx", { prefetch = 5 }, function(src)
      for i = 1, 3 do src:publish("m" .. i) end
      local c = tide.consumer{ source = src, handler = { run = function() end } }
      for _, case in ipairs{ { 5, "number 5" }, { {}, "table" }, { { stopping = true }, "table" } } do
        local ok, err = pcall(function() c:run(case[1]) end)
        assert.is_false(ok)
        assert.matches("^spec/review_amqp_spec.lua:%d+: consumer:run: bad argument #1 %(supervisor context "
          .. "%(a table with a stopping method%) or nil expected, got " .. case[2]:gsub("%p", "%%%0") .. "%)$", err)
      end
      -- Nothing was consumed: the next run is the first to see the messages.
      local redelivered = {}
      c = tide.consumer{ source = src, handler = { run = function(body, d) redelivered[body] = d.redelivered end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return redelivered.m1 ~= nil and redelivered.m2 ~= nil and redelivered.m3 ~= nil end, 3000))
      t:cancel()
      t:await()
      assert.same({ m1 = false, m2 = false, m3 = false }, redelivered)
    end)
  end)

  it("round-trips binary bodies whose sizes straddle the frame boundaries, and an empty one", function()
    with_queue("frames", { prefetch = 20 }, function(src)
      local conn = src:connection()
      local F = conn.raw:info().frame_max - 8              -- the body bytes of one frame
      local sizes = { 0, 1, F - 1, F, F + 1, 2 * F, 2 * F + 1, 3 * F - 1 }
      local function body(size, k)
        local t = {}
        for i = 1, size do t[i] = string.char((i * 7 + k) % 256) end
        return table.concat(t)
      end
      for k, size in ipairs(sizes) do src:publish(body(size, k), { message_id = tostring(k) }) end
      local got = {}
      local c = tide.consumer{ source = src, handler = { run = function(b, d) got[tonumber(d.properties.message_id)] = b end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return #got == #sizes end, 5000))
      t:cancel()
      t:await()
      for k, size in ipairs(sizes) do
        assert.equal(size, #got[k])
        assert.is_true(got[k] == body(size, k), ("body %d (%d bytes) differs"):format(k, size))
      end
    end)
  end)

  it("refuses a publish whose headers do not fit in a frame, leaving the connection and its consumer alone", function()
    with_queue("bighead", { prefetch = 10 }, function(src)
      for i = 1, 4 do src:publish("m" .. i) end
      local seen = {}
      local c = tide.consumer{ source = src, handler = { run = function(body)
        seen[body] = (seen[body] or 0) + 1
        tide.sleep(300)
      end } }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return seen.m4 ~= nil end, 3000))
      local ok, err = pcall(src.publish, src, "big", { headers = { big = ("x"):rep(200000) } })
      assert.is_false(ok)
      assert.matches("^source:publish: cannot encode the properties: ", tostring(err))
      assert.is_false(src.conn.lost, "the publish lost the connection: " .. tostring(src.conn.lost))
      assert.is_true(src:publish("after"), "a publish after it")
      assert.is_true(wait_for(function() return seen.after ~= nil end, 3000))
      tide.sleep(400)
      local st, e = t:await(1)
      t:cancel()
      t:await()
      assert.is_nil(st, "the consumer failed: " .. tostring(e))
      for body, count in pairs(seen) do assert.equal(1, count, body .. " handled twice") end
      assert.is_nil(seen.big)
    end)
  end)

  it("refuses a second consumer run on a source another run consumes, leaving the first one's channel alone", function()
    with_queue("shared", { prefetch = 10 }, function(src)
      for i = 1, 6 do src:publish("m" .. i) end
      local seen = {}
      local function handler() return { run = function(body) seen[body] = (seen[body] or 0) + 1; tide.sleep(200) end } end
      local a = tide.consumer{ source = src, name = "a", handler = handler() }
      local b = tide.consumer{ source = src, name = "b", handler = handler() }
      local ta = tide.spawn(function() return a:run() end)
      assert.is_true(wait_for(function() return seen.m6 ~= nil end, 3000))
      local tb = tide.spawn(function() return b:run() end)
      local st, err = tb:await(2000)
      if st == nil then tb:cancel() end
      assert.equal("error", st, "the second run went on: " .. tostring(err))
      assert.matches("consumer:run: rabbitmq review%-shared%-[%d-]+ is consumed by consumer 'a' in task %d+ %(one run at a time per source%)$", tostring(err))
      tide.sleep(300)                                 -- a's handlers settle on their channel
      local sa, ea = ta:await(1)
      ta:cancel()
      ta:await()
      assert.is_nil(sa, "the first run failed: " .. tostring(ea))
      assert.equal(0, src.stats.stale, "the first run's outcomes came after its channel was closed")
      for body, count in pairs(seen) do assert.equal(1, count, body .. " handled twice") end
    end)
  end)

  it("runs again after its run was stopped twice and its source stopped twice and closed", function()
    with_queue("again", { prefetch = 5 }, function(src)
      local seen = {}
      local c = tide.consumer{ source = src, handler = { run = function(body) seen[body] = (seen[body] or 0) + 1 end } }
      src:publish("one")
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return seen.one ~= nil end, 3000))
      t:cancel("first stop")
      t:cancel("second stop")                        -- a second stop is a no-op
      assert.equal("cancelled", (t:await()))
      src:stop()
      src:stop()
      local ok, err = pcall(src.fetch, src, 1, 0)      -- used after stop: says so
      assert.is_false(ok)
      assert.matches("not consuming %(call source:start first%)", tostring(err))
      src:close()
      src:publish("two")                               -- connects again
      t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return seen.two ~= nil end, 3000))
      t:cancel()
      t:await()
      assert.same({ one = 1, two = 1 }, seen)
      assert.equal(0, src.stats.precondition_failed)
      assert.is_true(wait_for(function() return src:queue_info().messages == 0 end, 3000))
    end)
  end)

  it("refuses a second settle of one delivery (handle_result acked it itself) without closing the channel", function()
    with_queue("twice", { prefetch = 10 }, function(src)
      src:publish("self")
      for i = 1, 5 do src:publish("slow" .. i) end
      local seen, refused = {}, 0
      local c = tide.consumer{ source = src, handler = {
        run = function(body) seen[body] = (seen[body] or 0) + 1; if body ~= "self" then tide.sleep(300) end end,
        handle_result = function(status, _, _, d)
          if d.body == "self" then src:ack(d) end    -- then the consumer settles it again
        end } }
      tide.configure{ on_error = function(where, e)
        if tostring(e):find("settled already", 1, true) then refused = refused + 1 end
      end }
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function()
        for i = 1, 5 do if not seen["slow" .. i] then return false end end
        return true
      end, 3000))
      tide.sleep(600)                                 -- the slow ones settle
      local st, err = t:await(1)
      t:cancel()
      t:await()
      assert.is_nil(st, "the consumer failed: " .. tostring(err))
      assert.equal(0, src.stats.precondition_failed, tostring(src.stats.last_close))
      for body, count in pairs(seen) do assert.equal(1, count, body .. " handled twice") end
      assert.equal(1, refused, "the second settle was not refused")
      assert.is_true(wait_for(function() return src:queue_info().messages == 0 end, 3000))
    end)
  end)
end)

describe("tide.sources.rabbitmq connects, attacked", function()
  -- Was a defect: each TCP connect and login ran on libuv's shared
  -- threadpool (uv_queue_work, 4 threads), so four connects to a broker
  -- that never answers made a connect to a healthy broker wait their whole
  -- connect_timeout (measured: 2960 ms with 3000), and one with a shorter
  -- timeout failed with "no answer from the broker".  Each connect now has
  -- a thread of its own (lua_amqp.c).
  it("a connect to a healthy broker does not wait behind four connects to a broker that never answers", function()
    assert(URL, "TIDE_AMQP_URL is not set: spec/run.sh starts a RabbitMQ node for this spec")
    local ffi = require "ffi"
    pcall(ffi.cdef, [[
      int socket(int domain, int type, int protocol);
      int listen(int fd, int backlog);
      int close(int fd);
      struct tide_review_sockaddr_in { uint16_t family; uint16_t port; uint32_t addr; char zero[8]; };
      int bind(int fd, const struct tide_review_sockaddr_in *a, unsigned len);
      int getsockname(int fd, struct tide_review_sockaddr_in *a, unsigned *len);
    ]])
    local fd = ffi.C.socket(2, 1, 0)
    local a = ffi.new("struct tide_review_sockaddr_in", { family = 2, port = 0, addr = 0x0100007f })
    assert(fd >= 0 and ffi.C.bind(fd, a, 16) == 0 and ffi.C.listen(fd, 8) == 0, "cannot listen")
    local len = ffi.new("unsigned[1]", 16)
    assert(ffi.C.getsockname(fd, a, len) == 0)
    local port = bit.bor(bit.lshift(bit.band(a.port, 0xff), 8), bit.rshift(a.port, 8))
    local ok, err = pcall(H.run, function()
      local dead = {}
      for i = 1, 4 do
        dead[i] = tide.spawn(function()
          local s = tide.sources.rabbitmq{ url = "amqp://u:p@127.0.0.1:" .. port .. "/", queue = "q", connect_timeout = 3000 }
          pcall(s.queue_info, s)
        end)
      end
      tide.sleep(50)
      local good = tide.sources.rabbitmq{ url = URL, queue = "q", connect_timeout = 3000 }
      local t0 = tide.now()
      local conn = good:connection()
      local took = tide.now() - t0
      good:close()
      for i = 1, 4 do dead[i]:await() end
      assert.truthy(conn)
      assert.is_true(took < 1000, ("the healthy broker's connect waited %d ms behind the dead ones"):format(took))
    end)
    ffi.C.close(fd)
    if not ok then error(err, 0) end
  end)
end)

-- Connects run on detached threads (lua_amqp.c) and hand their result to
-- the loop through the binding's `finished` list and an async handle.  These
-- end the loop, the process or the run while connects are still in flight
-- to a broker that answers late (fake_amqp.py slow:MS), and close the loop
-- or raise from the very callback that delivers a connect.  Each runs in a
-- process of its own: a crash, a sanitizer's report or a hang shows in its
-- exit status and output.
describe("tide.sources.rabbitmq connects in flight when the loop, the run or the process ends, attacked", function()
  --- A fake_amqp.py slow:`ms` broker: its port and a function that stops it.
  local function slow_broker(ms)
    local dir = H.tempdir()
    assert(os.execute(("python3 spec/tools/fake_amqp.py slow:%d %s/port > %s/fake.log 2>&1 & echo $! > %s/pid")
      :format(ms, dir, dir, dir)) == 0)
    local port
    for _ = 1, 200 do
      port = H.file_bytes(dir .. "/port")
      if port ~= "" then break end
      os.execute("sleep 0.05")
    end
    assert(port ~= "", "the fake broker did not start: " .. H.file_bytes(dir .. "/fake.log"))
    return port, function()
      os.execute(("kill %s 2>/dev/null; rm -rf %s"):format(H.file_bytes(dir .. "/pid"):match("%d+"), dir))
    end
  end

  --- No sanitizer report, no Lua error but those expected, in a process's output.
  local function clean(out)
    assert.is_nil(out:find("AddressSanitizer", 1, true), out)
    assert.is_nil(out:find("runtime error", 1, true), out)
    assert.is_nil(out:find("internal error", 1, true), out)
  end

  -- Three tasks connect to a broker that answers after 3 s; the script then
  -- ends in one of four ways.  Nobody waits for those connects any more.
  local SCRIPT = [[
io.stdout:setvbuf("line")
local tide = require "tide"
tide.configure{ grace = 300 }               -- after SIGTERM: then the connecting tasks are cancelled
local port = assert(os.getenv("FAKE_PORT"))
local ts = {}
for i = 1, 3 do
  ts[i] = tide.spawn(function()
    local s = tide.sources.rabbitmq{ url = "amqp://u:p@127.0.0.1:" .. port .. "/", queue = "q", connect_timeout = 8000 }
    return s:connection()
  end)
end
tide.sleep(200)
local how = os.getenv("HOW")
print("ENDING " .. how)
if how == "cancel" then for i = 1, 3 do ts[i]:cancel("not wanted") end
elseif how == "shutdown" then tide.shutdown(0)
elseif how == "raise" then error("the script fails")
elseif how == "exit" then os.exit(3)
elseif how == "signal" then tide.sleep(60000) end
]]

  it("lets `tide run` end at once with its usual status when the script ends while connects are in flight", function()
    local port, stop = slow_broker(3000)
    local dir = H.tempdir()
    local script = H.write_file(dir, "script.lua", SCRIPT)
    local tide_bin = H.build .. "/tide"
    local ok, err = pcall(function()
      -- How the script ends, the status `tide run` must exit with, and
      -- whether it must exit before the broker answers: after a raise the
      -- connecting tasks are still live work, and the run waits for them.
      for _, case in ipairs{ { "cancel", 0, true }, { "shutdown", 0, true }, { "raise", 1, false }, { "exit", 3, true },
                             { "signal", 143, true } } do
        local cmd = ("FAKE_PORT=%s HOW=%s timeout 30 %s run %s"):format(port, case[1], tide_bin, script)
        if case[1] == "signal" then                   -- SIGTERM once the script says it is ending
          cmd = ("(%s > %s/out 2>&1 & pid=$!; for i in $(seq 400); do grep -q ENDING %s/out && break; sleep 0.05; done; "
            .. "kill -TERM $pid; wait $pid; st=$?; cat %s/out; exit $st)"):format(cmd, dir, dir, dir)
        end
        local t0 = tide.now()
        local status, out = H.sh(cmd)
        local took = tide.now() - t0
        clean(out)
        assert.matches("ENDING " .. case[1], out)
        assert.equal(case[2], status, case[1] .. ": " .. out)
        -- The broker answers after 3 s: a run that waited for it held the
        -- process for connects nobody wanted.
        if case[3] then
          assert.is_true(took < 2500, ("%s: `tide run` took %d ms: it waited for the connects in flight"):format(case[1], took))
        end
      end
    end)
    stop()
    os.execute("rm -rf " .. dir)
    if not ok then error(err, 0) end
  end)

  it("lets a host close the loop with connects in flight, then live on while their threads finish", function()
    local slow_port, stop_slow = slow_broker(1500)
    local dir = H.tempdir()
    local ok, err = pcall(function()
      local status, out = H.run_lua(dir, "host.lua", [[
local tide = require "tide"
local core = require "tide.core"
local port = assert(os.getenv("FAKE_PORT"))
local t0 = tide.now()
local st = tide.run(function()
  local ts = {}
  -- these connect when the broker answers (1.5 s), after the loop closed;
  -- these give up before it answers (timeout 300 ms: at most about 600)
  for i, timeout in ipairs{ 8000, 8000, 300, 300 } do
    ts[i] = tide.spawn(function()
      local s = tide.sources.rabbitmq{ url = "amqp://u:p@127.0.0.1:" .. port .. "/", queue = "q", connect_timeout = timeout }
      return s:connection()
    end)
  end
  tide.sleep(100)
  for i = 1, #ts do ts[i]:cancel("not wanted") end
end)
print("RUN " .. st .. " " .. (tide.now() - t0 < 1000 and "prompt" or ("after " .. (tide.now() - t0) .. " ms")))
print("CLOSE " .. tostring(core.close()))
os.execute("sleep 2.5")                     -- the threads finish on a closed loop
collectgarbage()
collectgarbage()
print("LIVED ON")
]], 60, "FAKE_PORT=" .. slow_port)
      clean(out)
      assert.equal(0, status, out)
      assert.equal("RUN ok prompt\nCLOSE 0\nLIVED ON\n", out)
    end)
    stop_slow()
    os.execute("rm -rf " .. dir)
    if not ok then error(err, 0) end
  end)

  -- Four connects through the binding itself, its ready callback replaced:
  -- two to a broker that answers at once, two to one that answers after
  -- 1.5 s.  The first ready callback raises, stops the runtime, or closes
  -- the loop, while the others are still pending.
  local READY = [[
local tide = require "tide"
local core = require "tide.core"
local fast, slow = tonumber(os.getenv("FAST_PORT")), tonumber(os.getenv("SLOW_PORT"))
local how = os.getenv("HOW")
local calls, reported = {}, 0
tide.configure{ on_error = function(where, e) reported = reported + 1; print("REPORTED " .. tostring(e):match("[^\n]*")) end }
core.amqp_on_ready(function(id, kind, raw, err)
  if kind ~= "open" then return end
  calls[#calls + 1] = id
  print("READY " .. id .. " " .. tostring(raw ~= nil) .. " " .. tostring(err))
  if #calls > 1 then if raw then raw:close() end return end
  if how == "raise" then error("the ready callback fails")
  elseif how == "shutdown" then tide.shutdown(0)
  elseif how == "close" then local ok, e = pcall(core.close); print("CLOSE IN CALLBACK " .. tostring(ok) .. " " .. tostring(e)) end
end)
local function cfg(port) return { host = "127.0.0.1", port = port, vhost = "/", user = "u", password = "p",
                                  name = "n", heartbeat = 0, timeout = 5000 } end
print("RUN " .. tide.run(function()
  core.amqp_connect(1, cfg(fast)); core.amqp_connect(2, cfg(fast))
  core.amqp_connect(3, cfg(slow)); core.amqp_connect(4, cfg(slow))
  tide.sleep(3000)
end))
table.sort(calls)
print("CALLS " .. table.concat(calls, ","))
print("REPORTS " .. reported)
print("CLOSE " .. tostring(core.close()))
]]

  it("delivers every other connect once when a ready callback raises, stops the runtime or closes the loop", function()
    local fast_port, stop_fast = slow_broker(0)
    local slow_port, stop_slow = slow_broker(1500)
    local dir = H.tempdir()
    local ok, err = pcall(function()
      for _, how in ipairs{ "raise", "shutdown", "close" } do
        local status, out = H.run_lua(dir, "ready.lua", READY, 60,
          ("FAST_PORT=%s SLOW_PORT=%s HOW=%s"):format(fast_port, slow_port, how))
        clean(out)
        assert.equal(0, status, how .. ": " .. out)
        assert.matches("CLOSE 0\n$", out)
        if how == "raise" then
          assert.matches("REPORTED [^\n]*the ready callback fails\n", out)
          assert.matches("RUN ok\nCALLS 1,2,3,4\nREPORTS 1\n", out)
        elseif how == "shutdown" then
          -- The run ends at once; connects that come later are not
          -- delivered, and none twice.
          assert.matches("RUN cancelled\nCALLS [%d,]+\nREPORTS 0\n", out)
          local seen = {}
          for id in out:match("CALLS ([%d,]+)"):gmatch("%d") do
            assert.is_nil(seen[id], "connect " .. id .. " delivered twice: " .. out)
            seen[id] = true
          end
          assert.is_true(seen["1"] or seen["2"], out)
        else
          -- Closing the loop from inside its own callback is refused: it
          -- would free what that very call runs on.
          assert.matches("CLOSE IN CALLBACK false [^\n]*the loop is running", out)
          assert.matches("RUN ok\nCALLS 1,2,3,4\nREPORTS 0\n", out)
        end
      end
    end)
    stop_fast()
    stop_slow()
    os.execute("rm -rf " .. dir)
    if not ok then error(err, 0) end
  end)
end)

describe("tide.consumer on the memory source, attacked", function()
  before_each(function() H.quiet_errors() end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  local settled_once = H.settled_once      -- every tag delivered settled exactly once

  for _, mode in ipairs{ "thread", "process" } do
    it("settles and reports each delivery once when the loop shuts down under " .. mode .. "-mode handlers", function()
      local src = tide.sources.memory{ prefetch = 4, messages = { "0", "1", "2", "3", "4", "5" } }
      local reported = {}
      local c = tide.consumer{ source = src, concurrency = 4, handler = { mode = mode, timeout = 5000,
        run = function(body) require("tide").sleep(body == "0" and 0 or 3000); return body end,
        handle_result = function(status, _, _, d) reported[d.tag] = (reported[d.tag] or 0) + 1 end } }
      local t0 = tide.now()
      H.run(function()
        tide.spawn(function() return c:run() end)
        tide.sleep(400)
        tide.shutdown(100)
      end)
      assert.is_true(tide.now() - t0 < 2500, "the shutdown waited for the handlers")
      local seen = settled_once(src)
      for tag = 1, src.next_tag do assert.equal(1, reported[tag], ("tag %d: handle_result count"):format(tag)) end
      local acked = 0
      for _, what in pairs(seen) do if what == "ack" then acked = acked + 1 end end
      assert.equal(6 - acked, src.queued, "what was not acked went back to the queue")
    end)
  end

  it("reports a delivery whose handler cannot start to handle_result, once, before it is dropped", function()
    local src = tide.sources.memory{ prefetch = 4, messages = { "a", function() end, "c" } }
    local reports = {}
    local c = tide.consumer{ source = src, concurrency = 4, handler = { mode = "thread", run = function(body) return body end,
      handle_result = function(status, value, task, d)
        reports[#reports + 1] = { status, tostring(value), task == nil, d.tag }
      end } }
    H.run(function()
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(wait_for(function() return src.acked == 2 and src.nacked == 1 end, 3000))
      t:cancel()
      t:await()
    end)
    local seen = settled_once(src)
    assert.equal("nack", seen[2])
    assert.equal(0, src.queued, "the delivery that cannot start was requeued: it would come back for ever")
    table.sort(reports, function(x, y) return x[4] < y[4] end)
    assert.equal(3, #reports, "every delivery reaches handle_result once")
    assert.same({ "ok", "a", false, 1 }, reports[1])
    assert.equal("error", reports[2][1])
    assert.matches("functions cannot cross to a thread", reports[2][2])
    assert.is_true(reports[2][3], "no task: it never started")
    assert.same({ "ok", "c", false, 3 }, reports[3])
  end)

  it("acks a delivery that succeeded even when its handle_result ended the consumer's run", function()
    local src = tide.sources.memory{ prefetch = 4, messages = { "stop", "slow1", "slow2" } }
    local run_task
    local reported = {}
    local c = tide.consumer{ source = src, concurrency = 4, handler = {
      run = function(body) if body ~= "stop" then tide.sleep(1000) end return body end,
      handle_result = function(status, value, _, d)
        reported[d.body] = status
        if d.body == "stop" then run_task:cancel("stop from handle_result") end
        return status == "ok" and "ack" or nil
      end } }
    H.run(function()
      run_task = tide.spawn(function() return c:run() end)
      assert.equal("cancelled", (run_task:await(3000)))
    end)
    local seen = settled_once(src)
    assert.same({ stop = "ok", slow1 = "cancelled", slow2 = "cancelled" }, reported)
    assert.same({ "ack", "nack", "nack" }, seen, "the delivery that succeeded (tag 1) was requeued")
  end)
end)
