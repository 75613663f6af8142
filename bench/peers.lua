-- bench/peers.lua — tide against Node (and Python's asyncio and Elixir, when installed) on the
-- same workloads, in the same run: tide, peer, ratio.
--
-- Each workload runs in fresh processes for each side, alternated (3 a side
-- by default, TIDE_BENCH_PROCESSES): "cold" is the first run in a process,
-- "warm" the best of the next ones, and each side's figure the best of its
-- processes.  The Node scripts are in
-- bench/peers/ and run when `node` (or Debian's `nodejs`) is installed;
-- otherwise the peer column says "not installed"; so do those of asyncio
-- (python3) and Elixir (elixir: `make bench` installs it), in a second
-- table, one process each.  A ratio below 1 means
-- tide is faster.  The load average is printed before and after: on a
-- shared machine, figures taken under load are slower on both sides.
--
--   LUA_CPATH="build/?.so;;" luajit bench/peers.lua            (bench/run.sh peers)
--   luajit bench/peers.lua one WORKLOAD                         (one tide sample, JSON)
--   luajit bench/peers.lua mem [N]                              (bytes per sleeping task, N asleep)
local tide = require "tide"
tide.configure{ watchdog = 0 }              -- a batch of 100,000 spawns holds the loop for a while

local now = tide.now
local interp = arg and arg[-1] or "luajit"
local script = arg and arg[0] or "bench/peers.lua"
local noop = function() return 1 end

-- ===== tide's side of each workload: microseconds per unit

local TASKS_N, SLEEP_N, THREAD_N, DAG_N, TIMER_N = 200000, 100000, 100000, 10000, 1000000

local function per_unit(n, fn)
  collectgarbage(); collectgarbage()
  local t0 = now()
  fn()
  return (now() - t0) * 1000 / n
end

local function spawn_await(n, fn)
  local ts = {}
  for i = 1, n do ts[i] = tide.spawn(fn) end
  for i = 1, n do ts[i]:await() end
end

local function sleeper() tide.sleep(1) end

--- The DAG of bench/peers/dag.js: layers of 100, each node after 1-3 random
--- nodes of the layer before (the same generator, so the same graph).
local function dag_tasks(n)
  local seed = 3
  local function random(k) seed = (seed * 1103515245 + 12345) % 2147483648; return 1 + seed % k end
  local tasks, width = {}, 100
  for l = 0, n / width - 1 do
    for w = 0, width - 1 do
      local deps = {}
      if l > 0 then
        for _ = random(3), 1, -1 do deps[#deps + 1] = "n" .. ((l - 1) * width + random(width) - 1) end
      end
      tasks["n" .. (l * width + w)] = { after = deps, run = noop }
    end
  end
  return tasks
end

local W = {}

function W.tasks() return per_unit(TASKS_N, function() spawn_await(TASKS_N, noop) end) end
function W.sleep() return per_unit(SLEEP_N, function() spawn_await(SLEEP_N, sleeper) end) end

function W.threads()
  return per_unit(THREAD_N, function()
    local ts = {}
    for i = 1, THREAD_N do ts[i] = tide.spawn{ mode = "thread", run = noop } end
    for i = 1, THREAD_N do ts[i]:await() end
  end)
end

local define_us
function W.dag()
  local tasks = dag_tasks(DAG_N)
  local f
  define_us = per_unit(DAG_N, function() f = tide.flow{ name = "dag", tasks = tasks } end)
  return per_unit(DAG_N, function() assert(f:run() == "ok") end)
end

function W.timers()                        -- seconds for all of them
  local seed = 1
  local function random() seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 end
  return per_unit(TIMER_N, function()
    local fired = 0
    local function cb() fired = fired + 1 end
    for _ = 1, TIMER_N do tide.after(random() * 100, cb) end
    while fired < TIMER_N do tide.sleep(1) end
  end) * TIMER_N / 1e6
end

local WARM = { tasks = 3, sleep = 3, threads = 3, dag = 3, timers = 2 }

--- One process's figures for a workload: { cold =, warm = } (and the DAG's define).
local function sample(name)
  if name == "threads" then tide.configure{ threads = 2 } end
  local r = {}
  local function run_once()
    local status, v = tide.run(W[name])
    if status ~= "ok" then error(("bench/peers.lua: %s ended %s: %s"):format(name, status, tostring(v))) end
    return v
  end
  r.cold, r.define_cold = run_once(), define_us
  for _ = 1, WARM[name] do
    local v = run_once()
    if not r.warm or v < r.warm then r.warm = v end
    if define_us and (not r.define_warm or define_us < r.define_warm) then r.define_warm = define_us end
  end
  return r
end

--- Bytes per sleeping task, N of them asleep at once in this (fresh)
--- process: RSS (what the issue's goal counts) and Lua heap, after a full
--- collection, and the C timer heap's share.
local function memory(n)
  local function rss()
    local f = assert(io.open("/proc/self/statm"))
    local pages = tonumber(f:read("*l"):match("^%S+%s+(%S+)"))
    f:close()
    return pages * 4096
  end
  local function sleeper() tide.sleep(3600000) end
  local out
  local status, err = tide.run(function()
    collectgarbage(); collectgarbage()
    local r0, h0, tb0 = rss(), collectgarbage("count") * 1024, tide.stats().timer_bytes
    for _ = 1, n do tide.spawn(sleeper) end
    tide.sleep(0); tide.sleep(0)                 -- every task runs up to its sleep
    collectgarbage(); collectgarbage()
    local st = tide.stats()
    assert(st.live - 1 == n and st.timers >= n, "bench/peers.lua mem: the tasks are not all asleep")
    out = ("{\"rss\":%.1f,\"heap\":%.1f,\"timer_heap\":%.1f}"):format((rss() - r0) / n,
      (collectgarbage("count") * 1024 - h0) / n, (st.timer_bytes - tb0) / n)
    tide.shutdown(0)                             -- cancel them all rather than wait
  end)
  assert(status == "ok" or status == "cancelled", tostring(err))
  return out
end

if arg and arg[1] == "mem" then                 -- luajit bench/peers.lua mem [N]: bytes per sleeping task
  print(memory(tonumber(arg[2]) or 1000000))
  return
end

if arg and arg[1] == "one" then
  local r = sample(arg[2])
  print(("{\"cold\":%.6f,\"warm\":%.6f,\"define_cold\":%.6f,\"define_warm\":%.6f}")
    :format(r.cold, r.warm, r.define_cold or -1, r.define_warm or -1))
  return
end

-- ===== running both sides

local function shell_quote(s) return "'" .. s:gsub("'", [['\'']]) .. "'" end

local function read_json(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  local r = {}
  for k, v in out:gmatch('"([%w_]+)":(%-?[%d%.e%-]+)') do r[k] = tonumber(v) end
  if not r.warm then error("bench/peers.lua: no figures from `" .. cmd .. "`:\n" .. out) end
  return r
end

local function find_node()
  for _, name in ipairs{ "node", "nodejs" } do
    local p = io.popen("command -v " .. name .. " 2>/dev/null")
    local path = p:read("*l")
    p:close()
    if path and path ~= "" then return path end
  end
end

local function loadavg()
  local f = io.open("/proc/loadavg")
  if not f then return "unknown" end
  local s = f:read("*l"); f:close()
  return s:match("^(%S+ %S+ %S+)")
end

local node = find_node()

-- Each side's figures are the best of PROCESSES fresh processes, the two
-- sides alternated: the two cores of the VMs these figures come from differ
-- by 30-50% (both runtimes, pinned with taskset: Node 0.39 against 0.26 us a
-- task, tide 0.10-0.13 against 0.07), and one process a side compared
-- whichever cores the scheduler gave them.
local PROCESSES = tonumber(os.getenv("TIDE_BENCH_PROCESSES")) or 3

local function best_of(runs)
  local best = {}
  for _, r in ipairs(runs) do
    for k, v in pairs(r) do
      if v >= 0 and (best[k] == nil or v < best[k]) then best[k] = v end
    end
  end
  return best
end

--- Both sides of a workload: tide's figures and the peer's (nil when the
--- peer is not installed), each the best of PROCESSES processes.
local function both_sides(name, js)
  local tide_runs, peer_runs = {}, {}
  for i = 1, PROCESSES do
    tide_runs[i] = read_json(shell_quote(interp) .. " " .. shell_quote(script) .. " one " .. name)
    if node then peer_runs[i] = read_json(shell_quote(node) .. " " .. shell_quote("bench/peers/" .. js)) end
  end
  return best_of(tide_runs), node and best_of(peer_runs) or nil
end

print(("load average before: %s; Node: %s; each side the best of %d processes, alternated")
  :format(loadavg(), node or "not installed", PROCESSES))
print(("%-44s %9s %9s %9s %9s %7s %7s"):format("workload (unit)", "tide cold", "warm", "peer cold", "warm", "cold", "warm"))
local function row(label, t, p, key_cold, key_warm)
  key_cold, key_warm = key_cold or "cold", key_warm or "warm"
  if not p then
    print(("%-44s %9.2f %9.2f %19s"):format(label, t[key_cold], t[key_warm], "not installed"))
    return
  end
  print(("%-44s %9.2f %9.2f %9.2f %9.2f %7.2f %7.2f"):format(label, t[key_cold], t[key_warm],
    p[key_cold], p[key_warm], t[key_cold] / p[key_cold], t[key_warm] / p[key_warm]))
end

local WORKLOADS = {            -- name, label, Node's script, the figures' keys
  { "tasks", "200,000 trivial tasks in flight (us/task)", "tasks.js" },
  { "sleep", "100,000 tasks that sleep 1 ms (us/task)", "sleep.js" },
  { "timers", "1,000,000 timers, 0-100 ms (s, all)", "timers.js" },
  { "threads", "thread round trip, 100,000 in flight (us)", "threads.js" },
  { "dag", "10,000-node DAG, define (us/node)", "dag.js", "define_cold", "define_warm" },
  { "dag", "10,000-node DAG, run (us/node)", "dag.js" },
}
local tide_of = {}             -- workload -> tide's figures, for the other peers' table
for _, w in ipairs(WORKLOADS) do
  local name, label, js, kc, kw = w[1], w[2], w[3], w[4], w[5]
  if not tide_of[name] then tide_of[name] = { both_sides(name, js) } end
  local t, p = tide_of[name][1], tide_of[name][2]
  row(label, t, p, kc, kw)
end
print("(ratio = tide / peer: below 1, tide is faster; peers: async functions, setTimeout, a 2-worker")
print(" worker_threads pool with postMessage, a promise DAG whose define is building its node list)")

-- ===== the other peers: Python's asyncio and Elixir's processes, when installed

-- Far slower than Node on every workload, so one process each by default
-- (TIDE_BENCH_OTHER_PROCESSES), and the same tide figures as above.
local OTHER_PROCESSES = tonumber(os.getenv("TIDE_BENCH_OTHER_PROCESSES")) or 1
local function installed(name)
  local p = io.popen("command -v " .. name .. " 2>/dev/null")
  local path = p:read("*l")
  p:close()
  return path ~= nil and path ~= "" and path or nil
end
local OTHERS = {
  { label = "asyncio", exe = installed("/usr/bin/python3") or installed("python3"), script = "bench/peers/asyncio_peer.py",
    what = "Python's asyncio: create_task, asyncio.sleep, call_later, run_in_executor on 2 threads, a task DAG" },
  { label = "Elixir", exe = installed("elixir"), script = "bench/peers/elixir_peer.exs", no = { threads = true },
    what = "Elixir: Task.async/await, Process.sleep, Process.send_after, a process per DAG node" },
}
local function other_runs(o, name)
  if not o.exe or (o.no and o.no[name]) then return nil end
  local runs = {}
  for i = 1, OTHER_PROCESSES do
    runs[i] = read_json(shell_quote(o.exe) .. " " .. shell_quote(o.script) .. " " .. name)
  end
  return best_of(runs)
end
print()
print(("other peers, the best of %d process(es) each: tide's figures above, then each peer's, and tide / peer cold and warm")
  :format(OTHER_PROCESSES))
local head = ("%-44s %9s %9s"):format("workload (unit)", "tide cold", "warm")
for _, o in ipairs(OTHERS) do head = head .. (" | %-7s %7s %7s %7s %7s"):format(o.label, "cold", "warm", "cold", "warm") end
print(head)
local of = {}
for _, w in ipairs(WORKLOADS) do
  local name, label, kc, kw = w[1], w[2], w[4] or "cold", w[5] or "warm"
  local t = tide_of[name][1]
  local line = ("%-44s %9.2f %9.2f"):format(label, t[kc], t[kw])
  for k, o in ipairs(OTHERS) do
    of[k] = of[k] or {}
    if of[k][name] == nil then of[k][name] = other_runs(o, name) or false end
    local p = of[k][name]
    if not o.exe then line = line .. (" | %-39s"):format("not installed")
    elseif not p then line = line .. (" | %-39s"):format("(no such workload)")
    else line = line .. (" | %-7s %7.2f %7.2f %7.3f %7.3f"):format("", p[kc], p[kw], t[kc] / p[kc], t[kw] / p[kw]) end
  end
  print(line)
end
for _, o in ipairs(OTHERS) do print(("(%s%s)"):format(o.what, o.exe and "" or ": not installed")) end

-- ===== the control for a 2-thread speed-up: two plain luajit processes against one

local burn = [[local x = 0 for i = 1, 2e8 do x = x + i % 7 end]]
local function wall(cmd)
  local t0 = now()
  os.execute(cmd)
  return now() - t0
end
local one_cmd = shell_quote(interp) .. " -e " .. shell_quote(burn)
local t1 = wall(one_cmd)
local t2 = wall(one_cmd .. " & " .. one_cmd .. " & wait")
print(("control: one luajit process %.0f ms, two at once %.0f ms: 2-process speed-up %.2fx (2.00 = two free cores)")
  :format(t1, t2, 2 * t1 / t2))
print(("load average after: %s"):format(loadavg()))
