-- spec/thread_spec.lua — thread mode: OS threads with their own LuaJIT states.
local tide = require "tide"

package.path = "spec/fixtures/?.lua;" .. package.path
tide.configure{ threads = 2, thread_init = "thread_init", thread_memory = 64, thread_stop_wait = 100 }


describe("thread mode", function()
  after_each(function()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().threads.in_flight)
  end)

  it("runs a function without upvalues, with its arguments, returning every value", function()
    spec_helper.run(function()
      local t = tide.spawn{ mode = "thread", args = { 20, 22, "s", { deep = { 1, 2 } } },
                            run = function(a, b, s, tbl) return a + b, s:upper(), tbl.deep[2], nil end }
      local status, sum, up, two, none = t:await()
      assert.same({ "ok", 42, "S", 2 }, { status, sum, up, two })
      assert.is_nil(none)
    end)
  end)

  it("resolves \"module.function\" with require inside the thread", function()
    spec_helper.run(function()
      assert.same({ "ok", 5 }, { tide.spawn{ mode = "thread", run = "thread_mod.add", args = { 2, 3 } }:await() })
    end)
  end)

  it("loads thread_init once per thread", function()
    spec_helper.run(function()
      local ts = {}
      for i = 1, 8 do ts[i] = tide.spawn{ mode = "thread", run = "thread_mod.init_count" } end
      for i = 1, 8 do assert.same({ "ok", 1 }, { ts[i]:await() }) end
    end)
  end)

  it("gives the thread a tide of its own: now, sleep, check, log, thread", function()
    spec_helper.run(function()
      local s, kinds = tide.spawn{ mode = "thread", run = function()
        local tide = require "tide"
        local t0 = tide.now()
        tide.sleep(5)
        tide.check()
        return type(tide.now) .. type(tide.sleep) .. type(tide.log) .. type(tide.thread) .. tostring(tide.now() - t0 >= 5)
      end }:await()
      assert.equal("ok", s)
      assert.equal("functionfunctionfunctionnumbertrue", kinds)
    end)
  end)

  it("brings back errors with their value and the thread's traceback", function()
    spec_helper.run(function()
      local t = tide.spawn{ mode = "thread", run = function()
        local function inner() error({ code = 7, msg = "bad row" }) end
        inner()
      end }
      local status, value = t:await()
      assert.equal("error", status)
      assert.same({ code = 7, msg = "bad row" }, value)
      assert.matches("in function 'inner'", t.traceback)
      local t2 = tide.spawn{ mode = "thread", run = function() error("plain message") end }
      local _, msg = t2:await()
      assert.matches("plain message$", msg)
      assert.matches("^.-plain message\nstack traceback:", t2.traceback)
    end)
  end)

  it("fails a task whose results cannot cross, naming the path", function()
    spec_helper.run(function()
      local status, msg = tide.spawn{ mode = "thread", run = function() return 1, { f = print } end }:await()
      assert.equal("error", status)
      assert.equal("results[2].f: functions cannot cross to a thread", msg)
    end)
  end)

  it("turns running out of memory in a thread into an error outcome, and the thread goes on", function()
    spec_helper.run(function()
      local status, msg = tide.spawn{ mode = "thread", run = function()
        local t = {}
        for i = 1, 1e9 do t[i] = ("x"):rep(1000) .. i end
      end }:await()
      assert.equal("error", status)
      assert.matches("not enough memory", msg)
      for _ = 1, 4 do
        assert.same({ "ok", 4 }, { tide.spawn{ mode = "thread", run = "thread_mod.add", args = { 2, 2 } }:await() })
      end
    end)
  end)

  it("delivers timeout at the deadline and stops a thread that checks (no quarantine)", function()
    local before = tide.stats().threads.quarantined
    spec_helper.run(function()
      local t0 = tide.now()
      local status = tide.spawn{ mode = "thread", timeout = 30,
                                 run = function() require("tide").sleep(10000) end }:await()
      assert.equal("timeout", status)
      assert.is_true(tide.now() - t0 < 1000)
      tide.sleep(150)
      assert.same({ "ok", 1 }, { tide.spawn{ mode = "thread", run = "thread_mod.init_count" }:await() })
    end)
    assert.equal(before, tide.stats().threads.quarantined)
  end)

  it("keeps exactly one outcome under a random fault mix", function()
    math.randomseed(11)
    local calls, expect = {}, {}
    spec_helper.run(function()
      local ts = {}
      for i = 1, 400 do
        local kind = math.random(5)
        expect[i] = ({ "ok", "error", "timeout", "cancelled", "ok" })[kind]
        ts[i] = tide.spawn{
          mode = "thread", args = { kind },
          run = function(k)
            local tide = require "tide"
            if k == 2 then error("planned") end
            if k == 3 or k == 4 then tide.sleep(2000) end
            if k == 5 then tide.sleep(1) end
            return k
          end,
          timeout = (kind == 3) and 20 or nil,
          retry = (kind == 2) and { max_attempts = 2, base = 1 } or nil,
          handle_result = function(s) calls[i] = (calls[i] or 0) + 1; assert(s == expect[i], s) end,
        }
        if kind == 4 then tide.spawn(function() tide.sleep(math.random(0, 20)); ts[i]:cancel() end) end
      end
      for i = 1, 400 do assert.equal(expect[i], (ts[i]:await())) end
    end)
    for i = 1, 400 do assert.equal(1, calls[i]) end
  end)

  -- Jobs whose attempts end (timeout, cancel) around the time they finish
  -- leave late results in flight while new jobs take the freed slots of
  -- thread.lua's table of jobs out: each result must reach its own task or
  -- nobody, and each task get one outcome.
  it("gives each result to its own task while late results race with reused slots", function()
    local seed = os.time()
    math.randomseed(seed)
    local N = 1500
    local heard, ts, results = {}, {}, {}
    local function job(i, ms)
      local t = require "tide"
      if ms > 0 then t.sleep(ms) end
      return i, -i
    end
    spec_helper.run(function()
      for round = 0, 2 do                    -- later rounds reuse the slots the first freed
        for i = round * N / 3 + 1, (round + 1) * N / 3 do
          local ms = math.random(1, 6)
          ts[i] = tide.spawn{ mode = "thread", run = job, args = { i, ms },
                              timeout = math.random(2) == 1 and ms + math.random(0, 2) or nil,
                              handle_result = function() heard[i] = (heard[i] or 0) + 1 end }
          if math.random(4) == 1 then
            tide.spawn(function() tide.sleep(math.random(0, 6)); ts[i]:cancel() end)
          end
        end
        -- Hold the loop while jobs finish: timers run before deliveries in
        -- a loop iteration, so attempts time out with their results waiting.
        local t0 = tide.now()
        while tide.now() - t0 < 8 do end
        tide.sleep(math.random(0, 4))
      end
      for i = 1, N do ts[i]:await() end
      tide.sleep(50)                         -- late results arrive, and must change nothing
      for i = 1, N do results[i] = { ts[i]:await() } end
    end)
    local n = { ok = 0, timeout = 0, cancelled = 0 }
    for i = 1, N do
      local status, a, b = unpack(results[i], 1, 3)
      assert(n[status], ("seed %d: task %d ended %s: %s"):format(seed, i, status, tostring(a)))
      n[status] = n[status] + 1
      if status == "ok" then
        assert(a == i and b == -i, ("seed %d: task %d got the results of another (%s, %s)"):format(seed, i, a, b))
      end
      assert(heard[i] == 1, ("seed %d: task %d heard %s times"):format(seed, i, tostring(heard[i])))
    end
    assert.is_true(n.ok > 0 and n.timeout > 0 and n.cancelled > 0, ("ok %d, timeout %d, cancelled %d")
      :format(n.ok, n.timeout, n.cancelled))
  end)

  -- A job's memory comes from the pool's slab in blocks of 256, 512 and
  -- 1024 bytes, or from malloc past that (src/slab.h), and is reused from
  -- job to job: jobs of every size, many in flight, ending every way
  -- (results, errors, timeouts, cancels), each must get back its own bytes,
  -- and an ended job's block must never be handed out while a thread still
  -- runs it.
  it("keeps each job's bytes its own across the job memory's sizes, with errors, timeouts and cancels", function()
    local seed = os.time()
    math.randomseed(seed)
    local N = 3000
    local small = function(s, ms, fail)             -- a short function: its bytecode is small
      if ms > 0 then require("tide").sleep(ms) end
      if fail then error("job failed: " .. s:sub(1, 12), 0) end
      return s, #s
    end
    local big = function(s, ms, fail)               -- the same, with longer bytecode
      local t = require "tide"
      local a, b, c, d, e = 1, 2, 3, 4, 5
      a, b, c, d, e = a + b * c, b - c * d, c + d * e, d - e * a, e + a * b
      a, b, c, d, e = a + b * c, b - c * d, c + d * e, d - e * a, e + a * b
      a, b, c, d, e = a + b * c, b - c * d, c + d * e, d - e * a, e + a * b
      if ms > 0 then t.sleep(ms) end
      if fail then error("job failed: " .. s:sub(1, 12), 0) end
      assert(a + b + c + d + e ~= 0.5)
      return s, #s
    end
    local heard, ts, kinds, payload, results = {}, {}, {}, {}, {}
    local sizes = { 0, 1, 40, 63, 64, 65, 100, 180, 300, 330, 700, 800, 900, 1500, 5000 }
    spec_helper.run(function()
      for round = 0, 2 do
        for i = round * N / 3 + 1, (round + 1) * N / 3 do
          local len = sizes[math.random(#sizes)] + math.random(0, 3)
          local s = (("%06d:"):format(i) .. string.rep(string.char(i % 251), len)):sub(1, math.max(len, 7))
          local kind = math.random(8)              -- 1 error, 2 timeout, 3 cancel, else ok
          kinds[i], payload[i] = kind, s
          ts[i] = tide.spawn{ mode = "thread", run = (i % 2 == 0) and small or big,
                              args = { s, (kind == 2 or kind == 3) and math.random(1, 5) or 0, kind == 1 },
                              timeout = kind == 2 and 1 or nil,
                              handle_result = function() heard[i] = (heard[i] or 0) + 1 end }
          if kind == 3 then tide.spawn(function() tide.sleep(math.random(0, 3)); ts[i]:cancel() end) end
        end
        tide.sleep(math.random(0, 3))             -- the next round's jobs reuse freed blocks
      end
      for i = 1, N do ts[i]:await() end
      tide.sleep(30)                               -- stopped jobs come back, and change nothing
      for i = 1, N do results[i] = { ts[i]:await() } end
    end)
    local n = { ok = 0, error = 0, timeout = 0, cancelled = 0 }
    for i = 1, N do
      local status, a, b = unpack(results[i], 1, 3)
      local where = ("seed %d: task %d (kind %d, %d bytes)"):format(seed, i, kinds[i], #payload[i])
      assert(n[status], where .. " ended " .. status)
      n[status] = n[status] + 1
      if status == "ok" then
        assert(kinds[i] >= 2, where .. " should not have ended ok")
        assert(a == payload[i] and b == #payload[i], where .. " got bytes that are not its own")
      elseif status == "error" then
        assert(kinds[i] == 1, where .. " failed: " .. tostring(a))
        assert(a == "job failed: " .. payload[i]:sub(1, 12), where .. " got another's error: " .. tostring(a))
        assert(ts[i].traceback:match("stack traceback:"), where .. " has no traceback")
      else
        assert(kinds[i] == 2 or kinds[i] == 3, where .. " ended " .. status)
      end
      assert(heard[i] == 1, where .. " heard " .. tostring(heard[i]) .. " times")
    end
    assert.is_true(n.ok > 0 and n.error > 0 and n.timeout > 0 and n.cancelled > 0,
      ("ok %d, error %d, timeout %d, cancelled %d"):format(n.ok, n.error, n.timeout, n.cancelled))
  end)

  -- Whether two jobs run twice as fast depends on the machine's free cores
  -- (bench/threads.lua measures it); what tide controls is that they run at
  -- the same time, on two threads: their spans overlap.
  it("runs CPU-bound work in parallel on two threads", function()
    local function burn()
      local t = require "tide"
      local start, x = t.now(), 0
      for i = 1, 3e7 do x = x + i % 7 end
      return t.thread, start, t.now()
    end
    spec_helper.run(function()
      tide.spawn{ mode = "thread", run = burn }:await()           -- warm both paths
      local a = tide.spawn{ mode = "thread", run = burn }
      local b = tide.spawn{ mode = "thread", run = burn }
      local _, ta, a0, a1 = a:await()
      local _, tb, b0, b1 = b:await()
      assert.are_not.equal(ta, tb)
      -- one thread would run them one after the other: no overlap at all
      local overlap = math.min(a1, b1) - math.max(a0, b0)
      assert.is_true(overlap > 0,
        ("thread %d ran %.0f-%.0f ms, thread %d %.0f-%.0f ms"):format(ta, 0, a1 - a0, tb, b0 - a0, b1 - a0))
    end)
  end)

  it("reports threads in tide.stats", function()
    local st = tide.stats().threads
    assert.equal(2, st.size)
    assert.equal(2, st.idle)
    assert.equal(0, st.busy)
    assert.equal(0, st.queued)
  end)

  it("refuses what cannot cross, at the caller's line", function()
    local up = 1
    local cases = {
      { function() tide.spawn{ mode = "thread", run = function() return up end } end,
        "tide.spawn: bad option 'run' (a function with upvalues cannot cross to a thread: upvalue 'up')" },
      { function() tide.spawn{ mode = "thread", run = print } end,
        "tide.spawn: bad option 'run' (a C function cannot cross to a thread; name it as \"module.function\")" },
      { function() tide.spawn{ mode = "thread", run = "nodot" } end,
        "tide.spawn: bad option 'run' (\"module.function\" expected, got string \"nodot\")" },
      { function() tide.spawn{ mode = "thread", run = 5 } end,
        "tide.spawn: bad option 'run' (function or \"module.function\" expected, got number 5)" },
      { function() tide.spawn{ mode = "thread", run = "m.f", args = { 1, { cb = print } } } end,
        "tide.spawn: args[2].cb: functions cannot cross to a thread" },
      { function() tide.spawn{ mode = "thread", run = "m.f", args = { coroutine.create(print) } } end,
        "tide.spawn: args[1]: coroutines cannot cross to a thread" },
      { function() local t = {}; t.self = t; tide.spawn{ mode = "thread", run = "m.f", args = { t } } end,
        "tide.spawn: args[1].self: cycle (table refers to itself)" },
      { function() tide.pool{ mode = "thread" }:submit(function() return up end) end,
        "pool:submit: bad option 'run' (a function with upvalues cannot cross to a thread: upvalue 'up')" },
      { function() tide.configure{ threads = 0 } end,
        "tide.configure: bad option 'threads' (integer from 1 to 1024 expected, got number 0)" },
      { function() tide.configure{ threads = 4 } end,
        "tide.configure: threads, thread_init and thread_memory must be set before the first thread task" },
      -- (taken, then every thread task failed: "bad argument #1 to 'thread_start' (memory_limit out of range)")
      { function() tide.configure{ thread_memory = 1e9 } end,
        "tide.configure: bad option 'thread_memory' (integer number of MB from 0 (no limit) to 16777216 expected, "
        .. "got number 1000000000)" },
    }
    spec_helper.error_cases("spec/thread_spec.lua", cases)
    assert.equal(0, tide.stats().live)
  end)

  it("fails a task whose module function does not exist, clearly", function()
    spec_helper.run(function()
      local s, msg = tide.spawn{ mode = "thread", run = "thread_mod.nope" }:await()
      assert.equal("error", s)
      assert.matches("'thread_mod.nope': the module has no function 'nope'", msg)
    end)
  end)

  it("runs a thread pool: submit with the pool's mode", function()
    spec_helper.run(function()
      local p = tide.pool{ concurrency = 3, mode = "thread" }
      for i = 1, 30 do p:submit(function(x) return x * x end, i) end
      local st = p:drain()
      assert.equal(30, st.ok)
    end)
  end)
end)
