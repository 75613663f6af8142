-- spec/host_spec.lua — the `tide` binary: commands, exit statuses, errors, arg, signals.
local H = spec_helper
local TIDE = H.build .. "/tide"

local dir = H.tempdir()

local function script(name, text) return H.write_file(dir, name, text) end

describe("tide (host)", function()
  teardown(function() os.execute("rm -rf " .. dir) end)

  it("prints help and exits 0", function()
    local status, out = H.sh(TIDE .. " --help")
    assert.equal(0, status)
    assert.matches("Usage: tide COMMAND", out)
    assert.matches("run %[OPTIONS%] SCRIPT", out)
  end)

  it("prints its version", function()
    local status, out = H.sh(TIDE .. " --version")
    assert.equal(0, status)
    assert.matches("^tide 0%.1%.0 %(LuaJIT", out)
    assert.matches("\nbuilt with LuaJIT 2%.1[%w.-]*, libuv %d+%.%d+%.%d+, SQLite 3%.%d+%.%d+, libpq %d+%.%d+", out)
  end)

  it("rejects an unknown command with usage and exit status 2", function()
    local status, out = H.sh(TIDE .. " frobnicate")
    assert.equal(2, status)
    assert.matches("tide: unknown command 'frobnicate'", out)
    assert.matches("Usage:", out)
    assert.equal(2, (H.sh(TIDE)))
    assert.equal(2, (H.sh(TIDE .. " run")))
    assert.equal(2, (H.sh(TIDE .. " run --grace soon x.lua")))
    assert.equal(2, (H.sh(TIDE .. " run --bogus x.lua")))
  end)

  it("answers -h and --help with each command's own usage, also through tide help", function()
    for _, cmd in ipairs{ "run", "graph", "worker", "enqueue", "jobs" } do
      for _, form in ipairs{ " " .. cmd .. " -h", " " .. cmd .. " --help", " help " .. cmd } do
        local status, out = H.sh(TIDE .. form)
        assert.equal(0, status, form)
        assert.matches("^Usage: tide " .. cmd .. " ", out, nil, form)
      end
    end
    local status, out = H.sh(TIDE .. " help frob")
    assert.equal(2, status)
    assert.matches("^tide: help: no command 'frob'", out)
  end)

  it("takes --grace in the same forms as tide worker (5s, --grace=100)", function()
    local path = script("grace.lua", "print(require('tide.engine.config').grace)\n")
    for form, ms in pairs{ ["--grace 5s"] = "5000", ["--grace=100"] = "100", ["--grace 250ms"] = "250" } do
      local status, out = H.sh(("%s run %s %s"):format(TIDE, form, path))
      assert.equal(0, status, form)
      assert.equal(ms .. "\n", out, form)
    end
    local status, out = H.sh(TIDE .. " run --grace=-1 " .. path)
    assert.equal(2, status)
    assert.matches("^tide run: bad %-%-grace %(duration: ms, or like 500ms, 30s, 5m, 2h, 7d expected, got '%-1'%)", out)
  end)

  it("reports a missing script with exit status 1", function()
    local status, out = H.sh(TIDE .. " run " .. dir .. "/nope.lua")
    assert.equal(1, status)
    assert.matches("cannot open .*nope%.lua", out)
  end)

  it("reports a syntax error with file:line and exit status 1", function()
    local path = script("syntax.lua", "local x = 1\nlocal = 2\n")
    local status, out = H.sh(TIDE .. " run " .. path)
    assert.equal(1, status)
    assert.matches("syntax%.lua:2:", out)
  end)

  it("reports a runtime error with file:line, a traceback and exit status 1", function()
    local path = script("boom.lua", "local function f()\n  error('boom')\nend\nf()\n")
    local status, out = H.sh(TIDE .. " run " .. path)
    assert.equal(1, status)
    assert.matches("boom%.lua:2: boom", out)
    assert.matches("stack traceback:", out)
    assert.matches("in function 'f'", out)
  end)

  it("passes arguments as arg and ..., as luajit does", function()
    local path = script("args.lua", "print(arg[0], arg[1], arg[2], select('#', ...), ...)\n")
    local status, out = H.sh(TIDE .. " run " .. path .. " one two")
    assert.equal(0, status)
    assert.equal(path .. "\tone\ttwo\t2\tone\ttwo\n", out)
  end)

  it("runs the script as the root task and exits when no work is left", function()
    local path = script("root.lua", [[
      local tide = require "tide"
      local t = tide.spawn(function() tide.sleep(20) return 21 end)
      local _, v = t:await()
      tide.spawn(function() tide.sleep(30) print("background done") end)
      print("root done", v * 2)
    ]])
    local status, out = H.sh(TIDE .. " run " .. path)
    assert.equal(0, status)
    assert.equal("root done\t42\nbackground done\n", out)
  end)

  -- A script with 10 tasks that outlive the grace period and 5 that finish
  -- within it; each outcome is printed by handle_result.
  local SHUTDOWN = [[
    local tide = require "tide"
    for i = 1, 15 do
      tide.spawn{ run = function() tide.sleep(i <= 10 and 60000 or 50) end,
                  handle_result = function(s, v) io.write("outcome ", s, " ", tostring(v), "\n"); io.flush() end }
    end
    tide.sleep(1)
    local fh = io.open(arg[1], "w"); fh:write("ready"); fh:close()
    tide.sleep(60000)
  ]]

  local function run_and_signal(sig)
    local path = script("shutdown.lua", SHUTDOWN)
    local ready = dir .. "/ready-" .. sig
    local cmd = ("%s run --grace 300 %s %s > %s/out-%s & pid=$!; " ..
                 "n=0; while [ ! -s %s ] && [ $n -lt 500 ]; do sleep 0.02; n=$((n+1)); done; " ..
                 "kill -%s $pid; wait $pid; echo \"exit=$?\"; cat %s/out-%s")
      :format(TIDE, path, ready, dir, sig, ready, sig, dir, sig)
    local _, out = H.sh(cmd)
    return out
  end

  it("shuts down gracefully on SIGTERM: every outcome delivered, exit status 143", function()
    local out = run_and_signal("TERM")
    assert.matches("exit=143", out)
    local _, ok = out:gsub("outcome ok", "")
    local _, cancelled = out:gsub("outcome cancelled shutdown %(SIGTERM%)", "")
    assert.equal(5, ok)            -- finished within the grace period
    assert.equal(10, cancelled)    -- cancelled when it ended
  end)

  it("exits after SIGTERM even with a thread stuck in compiled code (abandoned)", function()
    local path = script("stuck.lua", [[
      local tide = require "tide"
      tide.configure{ threads = 1 }
      local t = tide.spawn{ mode = "thread", run = function() while true do end end,
                            handle_result = function(s) print("outcome", s) end }
      tide.sleep(50)
      local fh = io.open(arg[1], "w"); fh:write("ready"); fh:close()
      t:await()
    ]])
    local ready = dir .. "/ready-stuck"
    local cmd = ("%s run --grace 100 %s %s & pid=$!; " ..
                 "n=0; while [ ! -s %s ] && [ $n -lt 500 ]; do sleep 0.02; n=$((n+1)); done; " ..
                 "kill -TERM $pid; wait $pid; echo \"exit=$?\"")
      :format(TIDE, path, ready, ready)
    local t0 = os.time()
    local _, out = H.sh("timeout 20 sh -c '" .. cmd .. "'")
    assert.matches("outcome\tcancelled", out)
    assert.matches("exit=143", out)
    assert.is_true(os.time() - t0 < 10)
  end)

  it("shuts down gracefully on SIGINT with exit status 130", function()
    local out = run_and_signal("INT")
    assert.matches("exit=130", out)
    local _, n = out:gsub("outcome ", "")
    assert.equal(15, n)
  end)
end)
