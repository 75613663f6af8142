-- spec/watchdog_spec.lua — the stall watchdog: a task that holds the loop is named; a blocked loop obeys SIGTERM.
--
-- Each case runs `tide run` on a script of its own: the watchdog's thread,
-- its signals and its exit belong to that process.
local H = spec_helper
local TIDE = H.build .. "/tide"

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

local function script(name, text) return H.write_file(dir, name, text) end

--- Runs `tide run` on the script; when `sig` is given, sends it once the
--- script wrote its ready file.  Returns the exit status, the output and
--- the seconds from the signal (or the start) to the exit.
local function run(path, sig, opts)
  local ready = path .. ".ready"
  local cmd
  if sig then
    cmd = ("%s run %s %s %s > %s.out 2>&1 & pid=$!; " ..
           "n=0; while [ ! -s %s ] && [ $n -lt 1000 ]; do sleep 0.02; n=$((n+1)); done; " ..
           "t0=$(date +%%s.%%N); kill -%s $pid; wait $pid; st=$?; t1=$(date +%%s.%%N); " ..
           "cat %s.out; echo \"exit=$st\"; echo \"took=$(echo \"$t1 - $t0\" | bc)\"")
      :format(TIDE, opts or "", path, ready, path, ready, sig, path)
  else
    cmd = ("t0=$(date +%%s.%%N); %s run %s %s %s; st=$?; t1=$(date +%%s.%%N); " ..
           "echo \"exit=$st\"; echo \"took=$(echo \"$t1 - $t0\" | bc)\"")
      :format(TIDE, opts or "", path, ready)
  end
  local _, out = H.sh("timeout 60 sh -c '" .. cmd .. "'")
  return tonumber(out:match("exit=(%d+)")), out, tonumber(out:match("took=([%d.]+)"))
end

describe("the watchdog", function()
  it("names the task that holds the loop, and where, once", function()
    local path = script("spin.lua", H.SPIN_SCRIPT .. [[
      local t = tide.spawn{ name = "spinner", run = function() spin(1500) return "spun" end }
      print("outcome", t:await())
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("outcome\tok\tspun", out)
    local _, reports = out:gsub("tide: error in the watchdog:", "")
    assert.equal(1, reports, out)
    assert.matches("the loop has not turned for %d+ ms; running now: task %d+ 'spinner', at [^\n]*spin%.lua:5", out)
  end)

  -- A timer's callback runs without a task unless it waits (tide.engine.fire): the watchdog
  -- named a "task N" that did not exist, as asking the scheduler for the task running now
  -- made one (from inside the debug hook).  It names the callback, and where it was defined.
  it("names a timer callback that holds the loop as one, and makes no task for it", function()
    local path = script("timer_spin.lua", H.SPIN_SCRIPT .. [[
      local live = {}
      tide.after(10, function()
        spin(1500)
        live[#live + 1] = tide.stats().live
      end)
      tide.sleep(1700)
      print("live in the callback", live[1])
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("live in the callback\t1\n", out)  -- the root task only: the callback has none
    local _, reports = out:gsub("tide: error in the watchdog:", "")
    assert.equal(1, reports, out)
    assert.matches("running now: a timer callback %(function at [^\n]*timer_spin%.lua:9%), at [^\n]*timer_spin%.lua:5", out)
    assert.is_nil(out:find("running now: task", 1, true), out)
  end)

  it("names a tide.every's callback by its own function, not tide's wrapper around it", function()
    local path = script("every_spin.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 300 }
      local function spin(ms)
        local t0 = tide.now()
        while tide.now() - t0 < ms do end
      end
      jit.off(spin)
      tide.every(10, function(tm)
        tm:stop()
        spin(800)
      end)
      tide.sleep(1000)
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("running now: a timer callback %(function at [^\n]*every_spin%.lua:8%), at [^\n]*every_spin%.lua:5", out)
  end)

  it("says a task is a timer callback's when the callback got one (it waited)", function()
    local path = script("timer_task_spin.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 300 }
      local function spin(ms)
        local t0 = tide.now()
        while tide.now() - t0 < ms do end
      end
      jit.off(spin)
      tide.after(10, function()
        tide.sleep(1)
        spin(1500)
      end)
      tide.sleep(1700)
      print("done")
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("running now: task %d+ %(a timer callback, function at [^\n]*timer_task_spin%.lua:8%), at [^\n]*timer_task_spin%.lua:5", out)
  end)

  it("names a task that held the loop inside a C function, when it comes back", function()
    local path = script("sleeper.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 300 }
      local t = tide.spawn{ name = "sleeper", run = function() os.execute("sleep 1") return "woke" end }
      print("outcome", t:await())
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("outcome\tok\twoke", out)
    assert.matches("the loop has not turned for %d+ ms; running now: task %d+ 'sleeper'", out)
  end)

  it("stays quiet while the loop turns, however busy", function()
    local path = script("busy.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 300 }
      local t0, n = tide.now(), 0
      while tide.now() - t0 < 1500 do
        local ts = {}
        for i = 1, 200 do ts[i] = tide.spawn(function() tide.sleep(0) return i end) end
        for i = 1, 200 do ts[i]:await() end
        n = n + 200
      end
      print("ran", n)
    ]])
    local status, out = run(path)
    assert.equal(0, status, out)
    assert.matches("ran\t%d+", out)
    assert.is_nil(out:find("watchdog", 1, true), out)
  end)

  local BLOCKED = [[
    local tide = require "tide"
    tide.configure{ watchdog = 200 }
    tide.spawn(function()
      local fh = io.open(arg[1], "w"); fh:write("ready"); fh:close()
      local x = 0
      while true do x = x + 1 end          -- compiled: no hook ever runs here
    end)
  ]]

  it("ends a loop still blocked a grace period after SIGTERM, with status 143", function()
    local status, out, took = run(script("blocked_term.lua", BLOCKED), "TERM", "--grace 300")
    assert.equal(143, status, out)
    assert.matches("tide: SIGTERM [%d.]+ s ago, and the loop is still blocked", out)
    assert.matches("exiting with status 143", out)
    assert.is_true(took ~= nil and took < 10, "took " .. tostring(took))
  end)

  it("ends a loop still blocked a grace period after SIGINT, with status 130", function()
    local status, out = run(script("blocked_int.lua", BLOCKED), "INT", "--grace 300")
    assert.equal(130, status, out)
    assert.matches("tide: SIGINT [%d.]+ s ago, and the loop is still blocked", out)
  end)

  it("takes a huge finite grace as a very long one, not as none", function()
    local path = script("huge_grace.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 200, grace = 1e300 }
      tide.run(function()
        local fh = io.open(arg[1], "w"); fh:write("ready"); fh:close()
        local x = 0
        while true do x = x + 1 end
      end)
    ]])
    local ready = path .. ".ready"
    local _, out = H.sh(("cd %s && LUA_CPATH='%s/?.so;;' luajit %s %s > %s.out 2>&1 & pid=$!; " ..
      "n=0; while [ ! -s %s ] && [ $n -lt 1000 ]; do sleep 0.02; n=$((n+1)); done; " ..
      "kill -TERM $pid; sleep 1; if kill -0 $pid 2>/dev/null; then echo alive; kill -KILL $pid; fi; wait $pid; cat %s.out")
      :format(os.getenv("PWD"), H.build, path, ready, path, ready, path))
    assert.matches("^alive", out)
    assert.is_nil(out:find("exiting with status", 1, true), out)
  end)

  it("leaves a loop that turns to its graceful shutdown", function()
    local path = script("graceful.lua", [[
      local tide = require "tide"
      tide.configure{ watchdog = 200 }
      tide.spawn{ run = function() tide.sleep(60000) end,
                  handle_result = function(s, v) print("outcome", s, v) end }
      tide.sleep(10)
      local fh = io.open(arg[1], "w"); fh:write("ready"); fh:close()
      tide.sleep(60000)
    ]])
    local status, out = run(path, "TERM", "--grace 300")
    assert.equal(143, status, out)
    assert.matches("outcome\tcancelled\tshutdown %(SIGTERM%)", out)
    assert.is_nil(out:find("still blocked", 1, true), out)
  end)

  it("checks its option", function()
    local tide = require "tide"
    H.error_cases("spec/watchdog_spec.lua", {
      { function() tide.configure{ watchdog = -1 } end,
        "tide.configure: bad option 'watchdog' (non-negative number of ms (0: off) expected, got number -1)" },
      { function() tide.configure{ watchdog = "1s" } end,
        "tide.configure: bad option 'watchdog' (non-negative number of ms (0: off) expected, got string \"1s\")" },
    })
  end)
end)
