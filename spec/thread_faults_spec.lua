-- spec/thread_faults_spec.lua — a thread task cannot take the process down; thread settings are checked.
--
-- Each scenario that used to end the process (exit 1 with no message, or
-- "PANIC: unprotected error") runs in a child process of its own.
local tide = require "tide"
local H = spec_helper

local dir
setup(function()
  dir = H.tempdir()
  H.write_file(dir, "fill_memory.lua", [[
    -- Fills the state to its last bytes, and keeps what it made.  In the
    -- interpreter: LuaJIT 2.1 of 2022 crashes on an out-of-memory error
    -- raised inside compiled code (fixed upstream in 2023-06).
    jit.off()
    _G.hoard = {}
    local n = 0
    for _, size in ipairs{ 100000, 10000, 1000, 100, 10, 1 } do
      pcall(function() while true do n = n + 1; _G.hoard[n] = string.rep("x", size) .. n end end)
    end
    error("full")
  ]])
  H.write_file(dir, "raise_table.lua", [[error({ code = 7 })]])
end)
teardown(function() os.execute("rm -rf " .. dir) end)

--- A script that runs `body` (it sees `tide` and `dir`) as a tide.run root
--- task, then prints "done".
local function script(body)
  return ([[
    local tide = require "tide"
    local dir = %q
    package.path = dir .. "/?.lua;" .. package.path
    local ok, err = pcall(tide.run, function() %s end)
    if not ok then print("tide.run raised: " .. tostring(err)) end
    print("done")
  ]]):format(dir, body)
end

describe("thread mode, hostile", function()
  after_each(function() H.assert_idle() end)

  it("fails every task of a thread whose thread_init fills its memory limit, and goes on", function()
    local status, out = H.run_lua(dir, "init_oom.lua", script([[
      tide.configure{ threads = 1, thread_memory = 16, thread_init = "fill_memory" }
      for i = 1, 3 do
        local s, v = tide.spawn{ mode = "thread", run = function() return 1 end }:await()
        print("task", s, v)
      end
    ]]))
    assert.equal(0, status, out)
    local _, n = out:gsub("task\terror\tthread_init 'fill_memory' failed: [^\n]*", "")
    assert.equal(3, n, out)
    assert.matches("\ndone\n", out)
  end)

  it("survives a failed job that leaves garbage whose finalizer raises", function()
    local status, out = H.run_lua(dir, "leftover.lua", script([[
      tide.configure{ threads = 1 }
      local function fail_leaving_a_bomb()
        local mt = { __gc = function() error("raised by a finalizer") end }
        _G.keep = nil
        debug.setmetatable(newproxy(false), mt)           -- unreachable at once
        local guarded = newproxy(true)
        getmetatable(guarded).__gc = function() error("raised by a guarded finalizer") end
        error("the job fails")
      end
      print("first", tide.spawn{ mode = "thread", run = fail_leaving_a_bomb }:await())
      print("collect", tide.spawn{ mode = "thread", run = function() collectgarbage() collectgarbage() return "collected" end }:await())
      for i = 1, 5 do
        local s, v = tide.spawn{ mode = "thread", run = function(x) return x * 2 end, args = { i } }:await()
        print("next", s, v)
      end
    ]]))
    assert.equal(0, status, out)
    assert.matches("first\terror\t[^\n]*the job fails", out)
    -- The raw finalizer's error lands where the collector ran it (in the job
    -- that collects); the guarded one's goes to the thread's stderr.
    assert.matches("collect\t%a+", out)
    assert.matches("error in a __gc finalizer: [^\n]*raised by a guarded finalizer", out)
    local _, n = out:gsub("next\tok\t%d+", "")
    assert.equal(5, n, out)
  end)

  it("names a thread_init error that is not a string", function()
    local status, out = H.run_lua(dir, "init_table.lua", script([[
      tide.configure{ threads = 1, thread_init = "raise_table" }
      print(tide.spawn{ mode = "thread", run = function() return 1 end }:await())
    ]]))
    assert.equal(0, status, out)
    assert.matches("error\tthread_init 'raise_table' failed: %(error object is a table value%)", out)
  end)

  it("stops a thread task even after an earlier job on its thread replaced the debug hook", function()
    tide.configure{ threads = 1, thread_stop_wait = 2000 }
    local status, err = tide.run(function()
      assert.equal("ok", (tide.spawn{ mode = "thread", run = function() debug.sethook() return 1 end }:await()))
      local spin = function() jit.off() local x = 0 while true do x = x + 1 end end
      local t0 = tide.now()
      assert.equal("timeout", (tide.spawn{ mode = "thread", run = spin, timeout = 50 }:await()))
      tide.sleep(200)
      local st = tide.stats().threads
      assert.equal(0, st.quarantined, "the spinning job was stopped, not quarantined")
      assert.equal(0, st.busy)
      assert.is_true(tide.now() - t0 < 1500)
    end)
    assert.equal("ok", status, err)            -- an assertion inside the root task fails it
  end)

  it("refuses thread settings beyond the limit at the call", function()
    spec_helper.error_cases("spec/thread_faults_spec.lua", {
      { function() tide.configure{ threads = 2000 } end,
        "tide.configure: bad option 'threads' (integer from 1 to 1024 expected, got number 2000)" },
      { function() tide.configure{ threads = -1 } end,
        "tide.configure: bad option 'threads' (integer from 1 to 1024 expected, got number -1)" },
      { function() tide.spawn{ mode = "thread", run = "m.f", args = { n = -1 } } end,
        "tide.spawn: bad option 'args.n' (non-negative integer expected, got number -1)" },
      { function() tide.spawn{ run = print, args = { n = 1.5 } } end,
        "tide.spawn: bad option 'args.n' (non-negative integer expected, got number 1.5)" },
    })
  end)

  it("refuses a TIDE_THREADS that is not a thread count at the start, naming the limit", function()
    for _, bad in ipairs{ "5000", "0", "-1", "abc", "2.5" } do
      local status, out = H.sh(("TIDE_THREADS=%s %s/tide run /dev/null"):format(bad, H.build))
      assert.equal(1, status, out)
      assert.matches(("TIDE_THREADS must be an integer from 1 to 1024 %%(got \"%s\"%%)"):format(bad:gsub("%p", "%%%0")), out)
    end
    local status, out = H.run_lua(dir, "env_ok.lua", script([[
      print("threads", tide.spawn{ mode = "thread", run = "thread_mod.whoami" }:await())
    ]]), 60, "TIDE_THREADS=3")
    assert.equal(0, status, out)
    assert.matches("threads\tok\t%d", out)
  end)
end)
