-- spec/observe_cli_spec.lua — the command line of the observe layer: --log-format json on
-- tide run and tide worker, --metrics on both, --web on a worker, tide web's options.
local H = spec_helper
local cjson = require "cjson"
local TIDE = H.build .. "/tide"

local function sleep(s) os.execute("sleep " .. s) end

--- Every line of `text` as a decoded JSON object (raises on a line that is not one).
local function json_lines(text)
  local list = {}
  for line in text:gmatch("[^\n]+") do
    local ok, v = pcall(cjson.decode, line)
    assert(ok and type(v) == "table", "not a JSON line: " .. line)
    list[#list + 1] = v
  end
  return list
end

local function find(events, name)
  for _, e in ipairs(events) do if e.event == name then return e end end
end

--- Starts a command in the background with its output in `out`; returns its pid.
local function start(cmd, out)
  local _, pid = H.sh(("%s > %s 2>&1 & echo $!"):format(cmd, out))
  return tonumber(pid)
end

local function wait_for(file, pattern)
  for _ = 1, 200 do
    local text = H.file_bytes(file)
    local m = text:match(pattern)
    if m then return m, text end
    sleep(0.05)
  end
  error("never printed " .. pattern .. ": " .. H.file_bytes(file))
end

--- Sends SIGTERM and waits for the exit; returns the exit status of `wait`.
local function stop(pid)
  H.sh("kill -TERM " .. pid)
  for _ = 1, 200 do
    if H.sh("kill -0 " .. pid) ~= 0 then return end
    sleep(0.05)
  end
  H.sh("kill -KILL " .. pid)
  error("process " .. pid .. " did not stop on SIGTERM")
end

describe("the observe command line", function()
  local dir, tide              -- tide(cmd, store, rest): the exit status, stdout and stderr of `tide CMD ...`
  setup(function()
    dir = H.tempdir()
    tide = H.cli(dir)
  end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  it("tide run --log-format json writes errors and the script's failure as JSON lines", function()
    local script = H.write_file(dir, "fail.lua", [[
      local tide = require "tide"
      local t = tide.spawn{ run = function() end, handle_result = function() error("in the callback") end }
      t:await()
      tide.sleep(1)
      error("the script fails")
    ]])
    local status, out, err = tide("run", nil, "--log-format json " .. script)
    assert.equal(1, status)
    assert.equal("", out)
    local events = json_lines(err)
    local cb = assert(find(events, "callback_error"), err)
    assert.equal("error", cb.level)
    assert.matches("in the callback", cb.error)
    assert.equal("number", type(cb.task))
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", cb.time)
    local failed = assert(find(events, "script_failed"), err)
    assert.matches("the script fails", failed.error)
    assert.matches("stack traceback", failed.traceback)
    -- the default stays human-readable
    local _, _, human = tide("run", nil, script)
    assert.matches("^tide: error in handle_result of tide.Task %d+", human)
  end)

  it("tide worker --log-format json writes each failed attempt with its job, queue, attempt and traceback", function()
    local store = "sqlite:" .. dir .. "/jobs.db"
    local work = H.write_file(dir, "work.lua", [[
      return { orders = { fulfill = function(args) if args.n == 2 then error("card declined") end end } }
    ]])
    for n = 1, 3 do
      local st, out = H.sh(("%s enqueue --store %s --max-attempts 1 orders fulfill '{\"n\":%d}'"):format(TIDE, store, n))
      assert.equal(0, st, out)
    end
    local status, _, err = tide("worker", store, "--drain --log-format json " .. work)
    assert.equal(0, status, err)
    local events = json_lines(err)
    local started = assert(find(events, "worker_started"), err)
    assert.same({ default = 10 }, started.queues)
    local f = assert(find(events, "job_failed"), err)
    assert.same({ "error", 2, "default", "orders", "fulfill", 1, 1, false },
                { f.level, f.job, f.queue, f.target, f.method, f.attempt, f.max_attempts, f.will_retry })
    assert.matches("card declined", f.error)
    assert.matches("stack traceback", f.traceback)
    local stopped = assert(find(events, "worker_stopped"), err)
    assert.same({ 2, 1 }, { stopped.completed, stopped.discarded })
  end)

  it("tide run --metrics serves the script's metrics while it runs", function()
    local port = 29000 + math.random(0, 3700)             -- (below the kernel's local ports: spec/run.sh)
    local script = H.write_file(dir, "scrape.lua", [[
      local tide = require "tide"
      local t = tide.spawn{ mode = "thread", args = { arg[1] }, run = function(url)
        local f = io.popen("env -u LD_PRELOAD curl -s " .. url)
        local s = f:read("*a")
        f:close()
        return s
      end }
      local _, text = t:await()
      io.write(text)
    ]])
    local status, out, err = tide("run", nil, ("--metrics 127.0.0.1:%d %s http://127.0.0.1:%d/metrics")
      :format(port, script, port))
    assert.equal(0, status, err)
    assert.matches("\ntide_tasks_live %d+\n", out)
    assert.matches("# TYPE tide_tasks_total counter", out, 1, true)
    local bad = tide("run", nil, "--metrics nowhere " .. script)
    assert.equal(2, bad)
  end)

  it("tide worker --web and --metrics serve the dashboard and the metrics until SIGTERM", function()
    local store = "sqlite:" .. dir .. "/worker-web.db"
    assert.equal(0, (H.sh(("%s enqueue --store %s orders fulfill '{}' --delay 1h"):format(TIDE, store))))
    local out = dir .. "/worker.out"
    local pid = start(("%s worker --store %s --web 127.0.0.1:0 --metrics 127.0.0.1:0 --token the-worker-token"):format(TIDE, store), out)
    local ok, err = pcall(function()
      local url = wait_for(out, "dashboard at (http://%S+)")
      local murl = wait_for(out, "metrics at (http://%S+)")
      assert.matches("%?token=the%-worker%-token$", url)
      local _, page = H.sh("env -u LD_PRELOAD curl -s -H 'Authorization: Bearer the-worker-token' " .. url:gsub("%?.*", "") .. "jobs")
      assert.matches("orders%.fulfill", page)
      assert.matches("scheduled", page)
      local _, text = H.sh("env -u LD_PRELOAD curl -s " .. murl)
      assert.matches('tide_jobs{queue="default",status="scheduled"} 1', text, 1, true)
      assert.matches("tide_workers 1\n", text, 1, true)
    end)
    stop(pid)
    assert(ok, err)
    assert.matches("stopped after", H.file_bytes(out))
  end)

  it("tide web warns about a non-loopback address without --token, and checks its options", function()
    local store = "sqlite:" .. dir .. "/web.db"
    assert.equal(0, (H.sh(("%s enqueue --store %s orders fulfill '{}'"):format(TIDE, store))))
    local out = dir .. "/web.out"
    local pid = start(("%s web --store %s --listen 0.0.0.0:0"):format(TIDE, store), out)
    local ok, err = pcall(wait_for, out, "warning: the dashboard listens on 0%.0%.0%.0:%d+")
    stop(pid)
    assert(ok, err)
    assert.matches("http://0%.0%.0%.0:%d+/%?token=%x+", H.file_bytes(out))
    local status, _, e = tide("web", store, "--listen nope")
    assert.equal(2, status)
    assert.matches("bad %-%-listen %(HOST:PORT like 127%.0%.0%.1:8080 expected, got 'nope'%)", e)
    status, _, e = tide("web", store, "--token short")
    assert.equal(2, status)
    assert.matches("bad %-%-token", e)
    status, _, e = tide("web", "sqlite:" .. dir .. "/missing.db")
    assert.equal(1, status)
    assert.matches("no such file", e)
  end)
end)
