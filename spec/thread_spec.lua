-- spec/thread_spec.lua — thread mode: OS threads with their own LuaJIT states.
local tide = require "tide"

package.path = "spec/fixtures/?.lua;" .. package.path
tide.configure{ threads = 2, thread_init = "thread_init", thread_memory = 64, thread_stop_wait = 100 }

local function run(fn) return select(2, assert(tide.run(fn))) end

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

  it("runs CPU-bound work in parallel on two threads", function()
    -- Each burn says when it ran (CLOCK_MONOTONIC, the same for every
    -- thread).  On one thread the second would start after the first ended;
    -- on two they overlap, however loaded the machine is.  (How much faster
    -- two are than one is a benchmark's question: bench/threads.lua.)
    local function burn()
      local ffi = require "ffi"
      pcall(ffi.cdef, "struct tide_ts { long s, ns; }; int clock_gettime(int, struct tide_ts *);")
      local ts = ffi.new("struct tide_ts")
      local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.s) * 1e3 + tonumber(ts.ns) / 1e6 end
      local started, x = now(), 0
      for i = 1, 3e7 do x = x + i % 7 end
      return { started, now(), x }
    end
    spec_helper.run(function()
      local a = tide.spawn{ mode = "thread", run = burn }
      local b = tide.spawn{ mode = "thread", run = burn }
      local sa, ra = a:await()
      local sb, rb = b:await()
      assert.equal("ok", sa, tostring(ra))
      assert.equal("ok", sb, tostring(rb))
      assert.equal(ra[3], rb[3])
      local overlap = math.min(ra[2], rb[2]) - math.max(ra[1], rb[1])
      assert.is_true(overlap > 0, ("a ran %.1f-%.1f ms, b %.1f-%.1f ms: one after the other"):format(ra[1], ra[2], rb[1], rb[2]))
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
