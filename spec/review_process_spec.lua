-- spec/review_process_spec.lua — a hostile review of process mode: jobs that break the channel to their parent, children killed from outside at any moment, timeouts racing results, huge results.
local tide = require "tide"
local ffi = require "ffi"

package.path = "spec/fixtures/?.lua;" .. package.path
pcall(ffi.cdef, "int kill(int pid, int sig);")
tide.configure{ processes = 2, process_stop_wait = 50 }

local run = spec_helper.run

local function pool_ready()
  tide.spawn{ mode = "process", run = function() end }:await()
  return spec_helper.wait_for(function()
    local st = tide.stats().processes
    return st.size == 2 and st.starting == 0 and st.spare == "idle"
  end, 10000)
end

describe("process mode, attacked", function()
  before_each(function() spec_helper.quiet_errors() end)
  after_each(function()
    spec_helper.loud_errors()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().processes.busy)
  end)

  it("fails a job that wrote a few stray bytes on fd 3 and then returned, instead of waiting for ever", function()
    run(function()
      assert.is_true(pool_ready())
      -- No timeout: the outcome must come from the parent noticing the
      -- broken channel, not from a deadline.  Text (a log line sent to the
      -- wrong descriptor) and two bytes that make a plausible length.
      for _, bytes in ipairs{ "hello from the job\n", "xy" } do
        local t = tide.spawn{ mode = "process", args = { bytes }, run = function(b)
          local ffi = require "ffi"
          pcall(ffi.cdef, "long write(int, const void *, unsigned long);")
          ffi.C.write(3, b, #b)
          return "answered"
        end }
        local status, msg = t:await(3000)
        if status == nil then t:cancel() end
        assert.equal("error", status, ("%q: no outcome within 3 s (%s)"):format(bytes, tostring(msg)))
        assert.matches("^process %d+ killed by SIGKILL", msg)
      end
      assert.is_true(pool_ready(), "the pool is back to its size")
    end)
  end)

  -- The type check catches text and most stray bytes, not a header written
  -- on purpose: the id of a 'done' frame is checked as soon as it arrives.
  it("fails a job that wrote a plausible frame header on fd 3 (length 100, type 'D') and returned", function()
    run(function()
      assert.is_true(pool_ready())
      local t = tide.spawn{ mode = "process", run = function()
        local ffi = require "ffi"
        pcall(ffi.cdef, "long write(int, const void *, unsigned long);")
        ffi.C.write(3, "\100\0\0\0D", 5)
        return "answered"
      end }
      local status, msg = t:await(3000)
      if status == nil then t:cancel() end
      assert.equal("error", status, tostring(msg))
      assert.matches("^process %d+ killed by SIGKILL", msg)
      assert.is_true(pool_ready())
    end)
  end)

  it("fails a job that closed fd 3 (its child can no longer answer)", function()
    run(function()
      assert.is_true(pool_ready())
      local t = tide.spawn{ mode = "process", run = function()
        local ffi = require "ffi"
        pcall(ffi.cdef, "int close(int);")
        ffi.C.close(3)
        return "answered"
      end }
      local status, msg = t:await(3000)
      if status == nil then t:cancel() end
      assert.equal("error", status, tostring(msg))
      assert.matches("^process %d+ ", msg)
      assert.is_true(pool_ready())
    end)
  end)

  it("gives every task exactly one outcome while busy children are SIGKILLed from outside, with jobs sent ahead", function()
    tide.configure{ process_prefetch = 4 }
    local ok, err = pcall(run, function()
      assert.is_true(pool_ready())
      local outcomes, by_status = {}, {}
      local ts = {}
      for i = 1, 300 do
        ts[i] = tide.spawn{ mode = "process", args = { i }, run = function(k)
          require("tide").sleep(k % 5)
          return k
        end, handle_result = function(status, value, task)
          outcomes[task] = (outcomes[task] or 0) + 1
          by_status[status] = (by_status[status] or 0) + 1
        end }
      end
      local kills = 0
      while kills < 6 do
        tide.sleep(40)
        local busy = {}
        for _, t in ipairs(ts) do
          local pid = require("tide.engine.process").pid_of(t)
          if pid then busy[#busy + 1] = pid end
        end
        if #busy == 0 then break end
        ffi.C.kill(busy[math.random(#busy)], 9)
        kills = kills + 1
      end
      for i, t in ipairs(ts) do
        local status, value = t:await(10000)
        assert.truthy(status, ("task %d: no outcome"):format(i))
        if status == "ok" then assert.equal(i, value)
        else
          assert.equal("error", status, tostring(value))
          assert.matches("^process %d+ killed by SIGKILL", value)
        end
      end
      for i, t in ipairs(ts) do assert.equal(1, outcomes[t], ("task %d: handle_result count"):format(i)) end
      assert.is_true((by_status.ok or 0) >= 300 - kills, "a kill failed more than the job it interrupted")
      assert.is_true(pool_ready(), "the pool is back to its size")
    end)
    tide.configure{ process_prefetch = 1 }
    if not ok then error(err, 0) end
  end)

  it("settles timeouts racing their results exactly once, the late results dropped", function()
    tide.configure{ process_prefetch = 2 }
    local ok, err = pcall(run, function()
      assert.is_true(pool_ready())
      local seen, ts = {}, {}
      for i = 1, 120 do
        ts[i] = tide.spawn{ mode = "process", timeout = 15, args = { 10 + i % 10 }, run = function(ms)
          require("tide").sleep(ms)
          return ms
        end, handle_result = function(status, _, task) seen[task] = (seen[task] or 0) + 1 end }
      end
      local n = { ok = 0, timeout = 0 }
      for i, t in ipairs(ts) do
        local status, value = t:await(20000)
        assert.truthy(status == "ok" or status == "timeout", ("task %d: %s %s"):format(i, tostring(status), tostring(value)))
        n[status] = n[status] + 1
        if status == "ok" then assert.equal(10 + i % 10, value) end
      end
      for i, t in ipairs(ts) do assert.equal(1, seen[t], ("task %d: handle_result count"):format(i)) end
      assert.is_true(n.timeout > 0, "no timeout raced a result")
      assert.same({ "ok", 7 }, { tide.spawn{ mode = "process", args = { 7 }, run = function(x) return x end }:await() })
    end)
    tide.configure{ process_prefetch = 1 }
    if not ok then error(err, 0) end
  end)

  it("kills a child that stopped itself (SIGSTOP: deaf to the stop request) at its timeout", function()
    run(function()
      assert.is_true(pool_ready())
      local t = tide.spawn{ mode = "process", timeout = 100, run = function()
        os.execute("kill -STOP " .. require("tide").process)
        return "woke"
      end }
      assert.equal("timeout", (t:await(3000)))
      assert.is_true(spec_helper.wait_for(function() return tide.stats().processes.busy == 0 end, 2000), "the stopped child was never killed")
      assert.is_true(pool_ready())
    end)
  end)

  it("carries a 32 MB binary argument there and a 48 MB binary result back, exactly", function()
    run(function()
      local parts = {}
      for i = 0, 255 do parts[#parts + 1] = string.char(255 - i) end
      local arg = table.concat(parts):rep(32 * 4096)
      local t = tide.spawn{ mode = "process", args = { arg }, run = function(a)
        local parts = {}
        for i = 0, 255 do parts[#parts + 1] = string.char(i) end
        return (table.concat(parts):rep(48 * 4096)), #a, a:sub(1, 2), a:sub(-2)
      end }
      local status, value, n, head, tail = t:await(20000)
      assert.equal("ok", status, tostring(value))
      assert.same({ 32 * 1024 * 1024, "\255\254", "\1\0" }, { n, head, tail })
      assert.equal(48 * 1024 * 1024, #value)
      assert.equal("\0\1\2", value:sub(1, 3))
      assert.equal("\253\254\255", value:sub(-3))
    end)
  end)

  it("gives a retried task one outcome when each attempt's child dies, and keeps the pool", function()
    run(function()
      assert.is_true(pool_ready())
      local reported, retries = 0, 0
      local t = tide.spawn{ mode = "process", retry = { attempts = 3, base = 1 }, run = function() os.exit(4) end,
                            on_retry = function() retries = retries + 1 end,
                            handle_result = function() reported = reported + 1 end }
      local status, msg = t:await(10000)
      assert.equal("error", status)
      assert.matches("^process %d+ exited with status 4", msg)
      assert.equal(3, t.attempts)
      assert.same({ 1, 2 }, { reported, retries })
      assert.is_true(pool_ready(), "the pool took three deaths of ready children for children that cannot start")
      assert.same({ "ok", 5 }, { tide.spawn{ mode = "process", args = { 5 }, run = function(x) return x end }:await() })
    end)
  end)
end)

describe("process mode, its spare killed while it starts", function()
  -- In a process of its own: a slow process_init (300 ms) keeps each new
  -- spare "starting" long enough to be killed there for sure.
  it("still runs a new task on the pool's busy child, instead of failing it as if no child could start", function()
    local dir = spec_helper.tempdir()
    spec_helper.write_file(dir, "slow_init.lua", "os.execute('sleep 0.3')\n")
    local status, out = spec_helper.run_lua(dir, "spare.lua", ([[
package.path = %q .. "/?.lua;" .. package.path
local tide = require "tide"
local ffi = require "ffi"
ffi.cdef "int kill(int pid, int sig); int getpid(void);"
tide.configure{ processes = 1, process_init = "slow_init", on_error = function() end }
local function spare_pid(working)
  local p = io.popen("env -u LD_PRELOAD pgrep -x luajit -P " .. ffi.C.getpid())   -- not popen's own sh
  local pid
  for line in p:lines() do if tonumber(line) ~= working then pid = tonumber(line) end end
  p:close()
  return pid
end
tide.run(function()
  tide.spawn{ mode = "process", run = function() end }:await()
  while tide.stats().processes.spare ~= "idle" do tide.sleep(10) end
  local working = require("tide.engine.process").pids()[1]
  local long = tide.spawn{ mode = "process", run = function() require("tide").sleep(2500); return "done" end }
  tide.sleep(20)
  for k = 1, 4 do                   -- the ready spare, then three spares while they start
    local pid
    repeat tide.sleep(5); pid = spare_pid(working) until pid
    ffi.C.kill(pid, 9)
    repeat tide.sleep(5) until spare_pid(working) ~= pid or k == 4
  end
  tide.sleep(50)
  local t = tide.spawn{ mode = "process", run = function() return "ran" end }
  print("NEW", t:await(8000))
  print("LONG", long:await())
end)
]]):format(dir), 60)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.matches("LONG\tok\tdone", out)
    assert.matches("NEW\tok\tran", out)
  end)

  it("still fails tasks at once when no child can start (a process_init that exits)", function()
    local dir = spec_helper.tempdir()
    spec_helper.write_file(dir, "dying_init.lua", "os.exit(3)\n")
    local status, out = spec_helper.run_lua(dir, "dying.lua", ([[
package.path = %q .. "/?.lua;" .. package.path
local tide = require "tide"
tide.configure{ processes = 1, process_init = "dying_init", on_error = function() end }
tide.run(function()
  local t = tide.spawn{ mode = "process", run = function() return "ran" end }
  print("FIRST", t:await(8000))
  t = tide.spawn{ mode = "process", run = function() return "ran" end }
  print("SECOND", t:await(8000))
end)
]]):format(dir), 60)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.matches("FIRST\terror\ttide: the process pool cannot start its processes: process %d+ exited with status 3", out)
    assert.matches("SECOND\terror\ttide: the process pool cannot start its processes: ", out)
  end)
end)

describe("process mode, a child that floods its stderr", function()
  -- Was a defect: procs.c's take_stderr forwarded each chunk with a
  -- blocking fwrite(stderr) on the loop thread; 4 MB written by a job to a
  -- stderr pipe read only after 3 s stopped every timer, task and I/O of
  -- the parent for 2.9 s (for ever if the reader is stuck).  Now what the
  -- parent's fd 2 does not take at once is held back and the child's
  -- stderr is not read meanwhile: the child waits, the parent does not.
  it("does not stop the parent's loop while the parent's own stderr is drained late: the child waits", function()
    local dir = spec_helper.tempdir()
    spec_helper.write_file(dir, "flood.lua", [[
local tide = require "tide"
tide.configure{ processes = 1 }
tide.run(function()
  tide.spawn{ mode = "process", run = function() end }:await()
  local gap, last, stop = 0, tide.now(), false
  local ticker = tide.spawn(function()
    while not stop do tide.sleep(10); local n = tide.now(); if n - last > gap then gap = n - last end; last = n end
  end)
  local t = tide.spawn{ mode = "process", run = function()
    local line = ("x"):rep(1023) .. "\n"
    for _ = 1, 4096 do io.stderr:write(line) end
    return "done"
  end }
  print("task", t:await(20000))
  stop = true
  ticker:await()
  print(("GAP %d"):format(gap))
end)
]])
    local status, out = spec_helper.sh(("cd %s && ( LUA_CPATH='%s/?.so;;' timeout 60 luajit %s/flood.lua 2>&1 1>&3 "
      .. "| (sleep 3; cat > /dev/null) ) 3>&1"):format(os.getenv("PWD") or ".", spec_helper.build, dir))
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    local gap = tonumber(out:match("GAP (%d+)"))
    assert.truthy(gap, out)
    assert.is_true(gap < 500, ("the parent's loop stood still for %d ms"):format(gap))
  end)
end)
