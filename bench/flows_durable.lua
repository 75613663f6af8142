-- bench/flows_durable.lua — durable flows: steps per second through a layered DAG, and dependent-start latency.
--
--   1. throughput: a 10,000-step layered DAG of no-op steps (100 layers of
--      100; each step after 2 steps of the layer before), one run, timed by
--      the store itself: from the run's insert to its completion (both
--      written by tide).  On SQLite with one worker in this process
--      (concurrency 100; goal >= 20,000 steps/s), then 3 `tide worker`
--      processes; on PostgreSQL (when BENCH_PG_URL is set, or a throwaway
--      server can be started with spec/pg.sh) with 1 and 4 processes.
--   2. dependent-start latency, one worker in this process, SQLite: a chain
--      of 500 no-op steps; from the end of a step's function to the first
--      line of its dependent's (the completion written with the dependent's
--      release in one transaction, the claim, the start): p50 and p99
--      (goal p50 < 2 ms).
-- Each throughput is measured 3 times (a fresh store each); best and median.
-- Run from the repository root: LUA_CPATH="build/?.so;;" luajit bench/flows_durable.lua
-- (BENCH_LAYERS=n: n layers instead of 100; BENCH_REPEATS=n; BENCH_PG_URL=url:
-- that server instead of a throwaway one; BENCH_NO_SQLITE=1: PostgreSQL only;
-- BENCH_ONLY=sqlite1,sqlite3,pg1,pg4,graphile1,graphile4,latency: those measurements only)
--   3. the same DAG on graphile-worker (bench/pg/graphile_chain.js), the
--      PostgreSQL peer, with 1 and 4 processes, on the same server.
local tide = require "tide"
tide.configure{ watchdog = 0 }                 -- the driver waits for its processes with blocking calls
local core = require "tide.core"

local BUILD = os.getenv("BUILD") or "build"
local TIDE = BUILD .. "/tide"
local WIDTH, LAYERS, CHAIN = 100, tonumber(os.getenv("BENCH_LAYERS")) or 100, 500
local REPEATS = tonumber(os.getenv("BENCH_REPEATS")) or 3

local dir = os.getenv("TMPDIR") or "/tmp"
dir = dir .. "/tide-bench-flows." .. core.pid()
assert(os.execute("mkdir -p " .. dir) == 0)
package.path = dir .. "/?.lua;" .. package.path

local function write(name, text)
  local f = assert(io.open(dir .. "/" .. name, "w"))
  f:write(text)
  f:close()
end

-- The flows, as modules every process requires by name.
write("bench_layered.lua", ([[
local W, L = %d, %d
local tasks = {}
local function noop() return true end
for l = 1, L do
  for i = 1, W do
    local deps = nil
    if l > 1 then
      local a, b = ("s%%d_%%d"):format(l - 1, i), ("s%%d_%%d"):format(l - 1, i %% W + 1)
      deps = { a, b }
    end
    tasks[("s%%d_%%d"):format(l, i)] = { after = deps, run = noop }
  end
end
return { name = "bench_layered", tasks = tasks }
]]):format(WIDTH, LAYERS))
write("bench_chain.lua", ([[
local N = %d
local tasks = {}
local now = require("tide.core").now
_G.BENCH_CHAIN = _G.BENCH_CHAIN or { started = {}, ended = {} }
for i = 1, N do
  local name = "c" .. i
  tasks[name] = { after = i > 1 and ("c" .. (i - 1)) or nil, run = function()
    local b = _G.BENCH_CHAIN
    b.started[i] = now()
    b.ended[i] = now()
    return i
  end }
end
return { name = "bench_chain", tasks = tasks }
]]):format(CHAIN))
write("targets.lua", "return {}\n")

local function best_median(xs)
  table.sort(xs, function(a, b) return a > b end)
  return xs[1], xs[math.floor((#xs + 1) / 2)]
end

local function fresh_sqlite(n)
  local path = ("%s/flows%d.db"):format(dir, n)
  for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
  return "sqlite:" .. path
end

local function drop_pg(url)
  local c = require("tide.jobs.store.postgres").connect(url)
  c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
  c:query("DROP FUNCTION IF EXISTS tide_jobs_notify() CASCADE")
  c:close()
end

--- The run's status, cheaply (q:flow_run reads all 10,000 steps).
local function status_of(q, id)
  return q:transaction(function(tx)
    return tx:query("SELECT status FROM tide_flow_runs WHERE id = ?", id)[1].status
  end)
end

--- The run's steps per second, by the store's own times.
local function rate_of(q, id)
  local r = q:transaction(function(tx)
    return tx:query("SELECT status, error, inserted_at, completed_at FROM tide_flow_runs WHERE id = ?", id)[1]
  end)
  assert(r.status == "ok", "run " .. id .. " ended " .. tostring(r.status) .. ": " .. tostring(r.error))
  local secs = (r.completed_at - r.inserted_at) / 1000
  return WIDTH * LAYERS / secs, secs
end

--- One run with a worker in this process.
local function in_process(url)
  local rate, secs
  tide.run(function()
    local q = tide.queue.open(url)
    local w = tide.worker{ queue = q, concurrency = 100, poll = 1000 }
    local id = q:enqueue_flow("bench_layered", {})
    local deadline = tide.now() + 120000
    while status_of(q, id) == "running" do
      assert(tide.now() < deadline, "the run did not finish in 120 s")
      tide.sleep(200)
    end
    w:stop()
    w:wait()
    rate, secs = rate_of(q, id)
    q:close()
  end)
  return rate, secs
end

local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")

--- One run with `n` worker processes.
local function processes(url, n)
  local procs = {}
  for i = 1, n do
    local p = assert(io.popen(("%s worker --store '%s' --quiet --concurrency 100 --poll 50 %s/targets.lua "
      .. "> %s/worker%d.log 2>&1 & echo $!; exec 2>/dev/null; wait $!"):format(TIDE, url, dir, dir, i)))
    procs[i] = { pipe = p, pid = tonumber(p:read("*l")) }
  end
  local rate, secs
  local st, err = tide.run(function()
    local q = tide.queue.open(url)
    tide.sleep(300)                          -- the workers open the store and start claiming
    local id = q:enqueue_flow("bench_layered", {})
    local deadline = tide.now() + 180000
    while true do
      local ok, st = pcall(status_of, q, id)
      if ok and st ~= "running" then break end
      assert(tide.now() < deadline, "the run did not finish in 180 s")
      tide.sleep(200)
    end
    rate, secs = rate_of(q, id)
    q:close()
  end)
  for _, p in ipairs(procs) do ffi.C.kill(p.pid, 15) end
  for _, p in ipairs(procs) do p.pipe:close() end
  assert(st == "ok", tostring(err))
  return rate, secs
end

-- The same DAG on graphile-worker (bench/pg/graphile_chain.js: each step's
-- job releases its dependents in a transaction of its own), with `n`
-- processes of 100 jobs at a time each, or fewer so that their pools (a
-- connection per job) stay within 160 of the server's 200 connections (4
-- processes: 40 each); graphile-worker from NODE_PATH, or where
-- bench/pg/bench.lua installs it (build/bench-node).
local NODE_PATH = os.getenv("NODE_PATH") or (BUILD .. "/bench-node/node_modules")
local function graphile(url, n)
  local js = ("NODE_PATH=%s NO_LOG_SUCCESS=1 node bench/pg/graphile_chain.js"):format(NODE_PATH)
  assert(os.execute(("%s setup '%s' tide_bench_chain %d %d >>%s/graphile.log 2>&1")
    :format(js, url, WIDTH, LAYERS, dir)) == 0, "graphile_chain.js setup failed (see graphile.log)")
  local cmd = {}
  for i = 1, n do
    cmd[i] = ("%s work '%s' tide_bench_chain concurrency:%d >>%s/graphile.log 2>&1 &")
      :format(js, url, math.min(100, math.floor(160 / n)), dir)
  end
  assert(os.execute(table.concat(cmd, " ") .. " wait") == 0)
  local p = io.popen(("%s rate '%s' tide_bench_chain 2>>%s/graphile.log"):format(js, url, dir))
  local rate = tonumber((p:read("*l") or ""):match("^%S+"))
  p:close()
  assert(rate, "graphile_chain.js rate failed (see graphile.log)")
  return rate
end
local graphile_ok = os.execute(("NODE_PATH=%s node -e 'require(\"graphile-worker\")' >/dev/null 2>&1")
  :format(NODE_PATH)) == 0

local only = os.getenv("BENCH_ONLY")
local function wanted(what) return not only or (("," .. only .. ","):find("," .. what .. ",", 1, true)) ~= nil end

local function measure(what, label, fn)
  if not wanted(what) then return end
  if what:find("^graphile") and not graphile_ok then
    print(("%-44s skipped: node or graphile-worker not found (NODE_PATH=%s)"):format(label, NODE_PATH))
    return
  end
  local rates = {}
  for i = 1, REPEATS do rates[i] = fn(i) end
  local best, median = best_median(rates)
  print(("%-44s best %8.0f steps/s   median %8.0f steps/s"):format(label, best, median))
end

io.stdout:setvbuf("line")
print(("%d-step layered DAG (%d layers of %d, each step after 2 of the layer before), no-op steps")
  :format(WIDTH * LAYERS, LAYERS, WIDTH))
if not os.getenv("BENCH_NO_SQLITE") then        -- (BENCH_NO_SQLITE=1: PostgreSQL only)
  measure("sqlite1", "SQLite, 1 worker (this process)", function(i) return in_process(fresh_sqlite(i)) end)
  measure("sqlite3", "SQLite, 3 worker processes", function(i) return processes(fresh_sqlite(10 + i), 3) end)
end

-- PostgreSQL: BENCH_PG_URL, or a throwaway server on a free port.
local pg_url, pg_dir = os.getenv("BENCH_PG_URL"), nil
if not (wanted("pg1") or wanted("pg4") or wanted("graphile1") or wanted("graphile4")) then pg_url = nil
elseif not pg_url and os.execute("ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1") == 0 then
  pg_dir = dir .. "/pg"
  os.execute("mkdir -p " .. pg_dir .. " && chmod 755 " .. dir .. " " .. pg_dir)
  local p = io.popen(("sh spec/pg.sh start %s/cluster %d -c max_connections=200 2>&1"):format(pg_dir, 24000 + core.pid() % 5000))
  pg_url = p:read("*a"):match("(postgres://%S+)")
  p:close()
end
if pg_url then
  local sync = (function()
    local c = require("tide.jobs.store.postgres").connect(pg_url)
    local v = c:query("SHOW synchronous_commit").rows[1].synchronous_commit
    local f = c:query("SHOW fsync").rows[1].fsync
    c:close()
    return ("synchronous_commit=%s, fsync=%s"):format(v, f)
  end)()
  print("PostgreSQL: " .. sync)
  measure("pg1", "PostgreSQL, 1 worker process", function() drop_pg(pg_url); return processes(pg_url, 1) end)
  measure("pg4", "PostgreSQL, 4 worker processes", function() drop_pg(pg_url); return processes(pg_url, 4) end)
  measure("graphile1", "graphile-worker chain, 1 process", function() return graphile(pg_url, 1) end)
  measure("graphile4", "graphile-worker chain, 4 processes", function() return graphile(pg_url, 4) end)
  if pg_dir then os.execute(("sh spec/pg.sh stop %s/cluster"):format(pg_dir)) end
else
  print("PostgreSQL: skipped (not installed, and no BENCH_PG_URL)")
end

-- ===== latency
if wanted("latency") then
  local lat = {}
  tide.run(function()
    local q = tide.queue.open(fresh_sqlite(99))
    local w = tide.worker{ queue = q, concurrency = 10, poll = 1000 }
    local id = q:enqueue_flow("bench_chain", {})
    while status_of(q, id) == "running" do tide.sleep(50) end
    w:stop()
    w:wait()
    q:close()
    local b = _G.BENCH_CHAIN
    for i = 2, CHAIN do lat[#lat + 1] = b.started[i] - b.ended[i - 1] end
  end)
  table.sort(lat)
  print(("dependent-start latency, chain of %d steps, 1 worker in this process, SQLite: p50 %.2f ms, p99 %.2f ms")
    :format(CHAIN, lat[math.floor(#lat * 0.5)], lat[math.floor(#lat * 0.99)]))
end

os.execute("rm -rf " .. dir)
