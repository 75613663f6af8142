-- bench/pg/bench.lua — durable jobs on PostgreSQL: tide worker processes against graphile-worker.
--
--   1. floors: "SELECT 1" round trips and single-row autocommit UPDATEs (one
--      WAL flush each) from one connection;
--   2. throughput: N no-op jobs enqueued up front, then K = 1, 2, 4 worker
--      processes started; jobs/s from the start of the processes (and from
--      the first job's start) to the last job's durable completion.  tide:
--      `tide worker --drain` (the first attempted_at and last completed_at
--      in its table); graphile-worker, with its defaults and tuned: its
--      `runOnce`, which resolves once every completion is written (it
--      deletes completed jobs, so bench/pg/graphile.js reports the times);
--   3. latency: K idle workers listening; jobs enqueued one at a time from
--      this process, LAT_GAP ms apart; p50/p99 of (job started − enqueue
--      called) and of (job started − enqueue committed): the LISTEN/NOTIFY
--      wake path across processes.  The same for graphile-worker, in rounds
--      that alternate with tide's.
-- Each throughput figure is the best of 3 runs with the median beside it;
-- tide and graphile-worker runs alternate, so a noisy machine hits both.
--   4. enqueue: q:enqueue one at a time, q:enqueue_many batched, and a bare
--      multi-row INSERT of the same rows (the floor); graphile-worker's
--      addJob and addJobs (makeWorkerUtils) beside them;
--   5. jobs that insert a row in a transaction of their own, with the
--      jobs' pool at 1, 5 and 20 connections, against graphile-worker with
--      the same concurrency and maxPoolSize; and their ceiling: the same
--      transactions run by as many tasks of this process on the same pool,
--      without jobs (what a worker could reach at best).
-- The goals (issues 14 and 16): tide >= 5x graphile-worker's throughput with
-- its defaults; every row >= 3x graphile-worker; batched enqueue >= 50% of
-- the bare INSERT.
--
-- Run from the repository root against a server of your own (bench/run.sh
-- starts one with spec/pg.sh):
--   LUA_CPATH="build/?.so;;" luajit bench/pg/bench.lua postgres://tide@127.0.0.1:55434/postgres
-- Tables live in the schemas tide_bench and graphile_bench, dropped first
-- and at the end.  graphile-worker is installed from the npm registry into
-- build/bench-node when missing (its part is skipped if that fails).
-- Environment: TIDE_BENCH_PG_JOBS (N, default 20000), TIDE_BENCH_PG_CONCURRENCY
-- (tide worker --concurrency, a comma-separated list, default "200,50"; the
-- first is the one set against the goal), TIDE_BENCH_PG_PARTS (default
-- "floors,throughput,latency"), TIDE_BENCH_PG_REPEATS (runs of each throughput
-- and enqueue figure, default 3), BUILD (default build), NODE (default node).
local tide = require "tide"
tide.configure{ watchdog = 0 }                 -- the driver waits for its processes with blocking calls
local core = require "tide.core"
local pg = require "tide.jobs.store.postgres"
local ffi = require "ffi"

local floor, ceil, sort, concat, max = math.floor, math.ceil, table.sort, table.concat, math.max
local getenv = os.getenv

local URL = arg[1] or getenv("TIDE_BENCH_PG")
local BUILD = getenv("BUILD") or "build"
local NODE = getenv("NODE") or "node"
local N = tonumber(getenv("TIDE_BENCH_PG_JOBS") or "20000")
local CONCS = {}
for c in (getenv("TIDE_BENCH_PG_CONCURRENCY") or "200,50"):gmatch("%d+") do CONCS[#CONCS + 1] = tonumber(c) end
local PARTS = {}
for p in (getenv("TIDE_BENCH_PG_PARTS") or "floors,enqueue,owntx,throughput,latency"):gmatch("%a+") do PARTS[p] = true end
local KS = { 1, 2, 4 }
local REPEATS = tonumber(getenv("TIDE_BENCH_PG_REPEATS") or "3")
local LAT_ROUNDS, LAT_JOBS, LAT_GAP = 3, 100, 5   -- rounds, jobs per round, ms between enqueues
local GOAL = 5                          -- x graphile-worker with its defaults
-- graphile-worker tuned: as many jobs at a time as tide's first concurrency,
-- a local queue of as many (one statement fetches them), its default pool
-- of 10 connections, completions batched over 1 ms.
local TUNED = ("tuned:%d:%d:10"):format(CONCS[1], CONCS[1])
local TIDE_SCHEMA, GW_SCHEMA = "tide_bench", "graphile_bench"
local NODE_DIR = BUILD .. "/bench-node"
local TIDE_BIN = BUILD .. "/tide"

-- ===== helpers

local running = {}                      -- pid -> true: background workers to stop on a failure

local function fail(msg)
  io.stderr:write("bench/pg/bench.lua: ", msg, "\n")
  for pid in pairs(running) do os.execute("kill -TERM " .. pid .. " 2>/dev/null") end
  os.exit(1)
end

if not URL or not URL:match("^postgres") then
  fail("usage: luajit bench/pg/bench.lua postgres://USER@HOST:PORT/DB (or set $TIDE_BENCH_PG)")
end
if #CONCS == 0 then fail("TIDE_BENCH_PG_CONCURRENCY: expected numbers like 200,50") end

local function sh_quote(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

local function sh(cmd)
  local ok, how, code = os.execute(cmd)
  if type(ok) == "number" then return ok == 0 end      -- LuaJIT without 5.2 compat
  return ok and how == "exit" and code == 0
end

local function read_cmd(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } tide_bench_timespec;
  int clock_gettime(int clk, tide_bench_timespec *ts);
]]
local ts = ffi.new("tide_bench_timespec")
--- UTC wall time in µs (the clock the jobs stamp their start with).
local function wall_us()
  ffi.C.clock_gettime(0, ts)                -- CLOCK_REALTIME
  return tonumber(ts.tv_sec) * 1e6 + floor(tonumber(ts.tv_nsec) / 1000)
end

--- The highest and the median of xs (rates: higher is better).
local function best_median(xs)
  local s = {}
  for i = 1, #xs do s[i] = xs[i] end
  sort(s)
  return s[#s], s[floor((#s + 1) / 2)]
end

local function percentile(sorted, p) return sorted[max(1, ceil(p * #sorted))] end

--- The URL with `options=-csearch_path=SCHEMA` added (libpq URL syntax).
local function with_schema(url, schema)
  return url .. (url:find("?", 1, true) and "&" or "?") .. "options=-csearch_path%3D" .. schema
end

local TIDE_URL = with_schema(URL, TIDE_SCHEMA)

-- ===== processes

--- Starts `cmd` in the background; returns its pid.
local function spawn_bg(cmd)
  local pid = tonumber(read_cmd(cmd .. " & echo $!"))
  if not pid then fail("could not start: " .. cmd) end
  running[pid] = true
  return pid
end

local function alive(pid) return sh("kill -0 " .. pid .. " 2>/dev/null") end

local function stop_all(pids)
  for _, pid in ipairs(pids) do sh("kill -TERM " .. pid .. " 2>/dev/null") end
  local deadline = tide.now() + 10000
  for _, pid in ipairs(pids) do
    while alive(pid) do
      if tide.now() > deadline then sh("kill -KILL " .. pid .. " 2>/dev/null") break end
      tide.sleep(20)
    end
    running[pid] = nil
  end
end

--- Runs `cmd` K times at once and waits for all; true if all exited 0.
local function run_parallel(cmd, k, dir)
  local parts = {}
  for i = 1, k do parts[i] = ("(%s; echo $? > %s/rc.%d) &"):format(cmd, dir, i) end
  sh(concat(parts, " ") .. " wait")
  local ok = true
  for i = 1, k do
    local path = ("%s/rc.%d"):format(dir, i)
    local f = io.open(path)
    local rc = f and f:read("*n")
    if f then f:close() end
    os.remove(path)
    if rc ~= 0 then ok = false end
  end
  return ok
end

-- ===== the database

local db                                   -- a bare connection, autocommit

local function q1(sql, ...) return db:query(sql, ...).rows[1] end

local function exec_or_warn(sql)
  local ok, err = pcall(db.query, db, sql)
  if not ok then io.stderr:write("bench/pg/bench.lua: ", sql, ": ", tostring(err), "\n") end
end

-- ===== 1. floors

local function floors()
  local n = 2000
  local t0 = tide.now()
  for _ = 1, n do db:query("SELECT 1") end
  local select1 = n * 1000 / (tide.now() - t0)
  local tbl = TIDE_SCHEMA .. ".bench_floor"
  db:query("CREATE TABLE " .. tbl .. " (n bigint NOT NULL)")
  db:query("INSERT INTO " .. tbl .. " VALUES (0)")
  local m = 500
  t0 = tide.now()
  for _ = 1, m do db:query("UPDATE " .. tbl .. " SET n = n + 1") end
  local commits = m * 1000 / (tide.now() - t0)
  print(("floors, one connection: %.0f \"SELECT 1\" round trips/s; %.0f single-row UPDATE commits/s "
    .. "(a WAL flush each)"):format(select1, commits))
  -- What a job that commits its own row needs at least: one commit each.
  -- From n connections at once, the server flushes the WAL once for all
  -- the commits that wait together (group commit): the floor of the
  -- own-transaction rows at pool n.
  local cells = {}
  for _, n in ipairs{ 1, 5, 20 } do
    local conns, tasks, per = {}, {}, floor(1000 / n)
    for i = 1, n do conns[i] = pg.connect(URL); conns[i]:query("SELECT 1") end
    t0 = tide.now()
    for i = 1, n do
      tasks[i] = tide.spawn(function()
        for k = 1, per do conns[i]:query("INSERT INTO " .. tbl .. " VALUES ($1)", k) end
      end)
    end
    for i = 1, n do tasks[i]:await() end
    cells[#cells + 1] = ("%d connection%s %.0f"):format(n, n == 1 and "" or "s", n * per * 1000 / (tide.now() - t0))
    for i = 1, n do conns[i]:close() end
  end
  db:query("DROP TABLE " .. tbl)
  print("floors, single-row INSERT commits/s from n connections at once (group commit): " .. concat(cells, "; "))
end

-- ===== 2. throughput

local function noop_list(n)
  local list = {}
  for i = 1, n do list[i] = { target = "bench", method = "noop" } end
  return list
end

--- Empties tide's table and enqueues N no-op jobs; returns enqueue jobs/s.
local function tide_fill(q)
  db:query("TRUNCATE " .. TIDE_SCHEMA .. ".tide_jobs RESTART IDENTITY")
  local t0 = tide.now()
  local chunk = 5000
  for i = 1, N, chunk do q:enqueue_many(noop_list(math.min(chunk, N - i + 1))) end
  local rate = N * 1000 / (tide.now() - t0)
  db:query("VACUUM ANALYZE " .. TIDE_SCHEMA .. ".tide_jobs")
  exec_or_warn("CHECKPOINT")
  return rate
end

local function tide_run(q, conc, k, dir)
  local enq = tide_fill(q)
  local cmd = ("%s worker --store %s --concurrency %d --drain --quiet bench/pg/targets.lua 2>>%s/tide.log")
    :format(sh_quote(TIDE_BIN), sh_quote(TIDE_URL), conc, dir)
  local t0 = core.wallclock()
  local ok = run_parallel(cmd, k, dir)
  local exited = core.wallclock() - t0
  local r = q1("SELECT count(*) FILTER (WHERE status = 'completed') AS done, max(completed_at) AS last, "
               .. "min(attempted_at) AS first, count(*) FILTER (WHERE attempt > 1) AS again FROM "
               .. TIDE_SCHEMA .. ".tide_jobs")
  if not ok or r.done ~= N then
    fail(("tide, %d workers: %d of %d jobs completed (exit status %s; see %s/tide.log)")
      :format(k, r.done, N, ok and "0" or "non-zero", dir))
  end
  if r.again > 0 then
    io.stderr:write(("bench/pg/bench.lua: tide, %d workers: %d jobs ran more than once\n"):format(k, r.again))
  end
  return { rate = N * 1000 / (r.last - t0), steady = N * 1000 / (r.last - r.first),
           exit_rate = N * 1000 / exited, enqueue = enq }
end

local function gw_fill()
  db:query("DELETE FROM " .. GW_SCHEMA .. "._private_jobs")
  local t0 = tide.now()
  db:query(("SELECT count(%s.add_job('noop', '{}'::json)) FROM generate_series(1, $1)"):format(GW_SCHEMA), N)
  local rate = N * 1000 / (tide.now() - t0)
  db:query("VACUUM ANALYZE " .. GW_SCHEMA .. "._private_jobs")
  exec_or_warn("CHECKPOINT")
  return rate
end

local function node_cmd(args, dir)
  return ("NODE_PATH=%s NO_LOG_SUCCESS=1 %s bench/pg/graphile.js %s >>%s/graphile.log 2>&1")
    :format(sh_quote(NODE_DIR .. "/node_modules"), sh_quote(NODE), args, dir)
end

local function gw_run(config, k, dir)
  local enq = gw_fill()
  local cmd = node_cmd(("once %s %s %s %s/times"):format(sh_quote(URL), GW_SCHEMA, config, dir), dir)
  local t0 = core.wallclock()
  local ok = run_parallel(cmd, k, dir)
  local exited = core.wallclock() - t0
  local first, last = math.huge, t0 + exited                -- (without time files: its exit)
  local have_times = false
  for name in read_cmd("ls " .. sh_quote(dir)):gmatch("[^\n]+") do
    if name:match("^times%.%d+$") then
      for line in io.lines(dir .. "/" .. name) do
        local f, d = line:match("^(%d+) (%d+)$")
        if f then
          first = math.min(first, tonumber(f))
          last = have_times and max(last, tonumber(d)) or tonumber(d)
          have_times = true
        end
      end
      os.remove(dir .. "/" .. name)
    end
  end
  local left = q1("SELECT count(*) AS n FROM " .. GW_SCHEMA .. "._private_jobs").n
  if not ok or left ~= 0 then
    fail(("graphile-worker (%s), %d processes: %d of %d jobs left (see %s/graphile.log)")
      :format(config, k, left, N, dir))
  end
  return { rate = N * 1000 / (last - t0), steady = N * 1000 / (last - (have_times and first or t0)),
           exit_rate = N * 1000 / exited, enqueue = enq }
end

-- ===== 3. latency

--- Waits until `n` sessions run a statement like `pattern` (their LISTEN).
local function wait_listeners(pattern, n, pids)
  local deadline = tide.now() + 30000
  while q1("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE $1", pattern).n < n do
    for _, pid in ipairs(pids) do
      if not alive(pid) then fail("a worker exited before it listened (pid " .. pid .. ")") end
    end
    if tide.now() > deadline then fail("workers not listening after 30 s") end
    tide.sleep(20)
  end
  tide.sleep(300)                          -- and let their claimers settle into waiting
end

--- Reads and removes the stamp files DIR/stamps.<pid> into got[id] = { at, started }.
local function read_stamps(dir, got)
  for name in read_cmd("ls " .. sh_quote(dir)):gmatch("[^\n]+") do
    if name:match("^stamps%.%d+$") then
      for line in io.lines(dir .. "/" .. name) do
        local id, at, started = line:match("^(%d+) (%d+) (%d+)$")
        if id then got[tonumber(id)] = { tonumber(at), tonumber(started) } end
      end
    end
  end
end

--- Enqueues LAT_JOBS jobs with enqueue(at_string) -> id, LAT_GAP ms apart,
--- and waits for their stamps; adds them to acc.got[id] = { at, started }
--- and acc.committed[id] = µs.
local function measure_latency(enqueue, dir, what, acc)
  local ids = {}
  for i = 1, LAT_JOBS do
    local at = wall_us()
    local id = enqueue(("%.0f"):format(at))
    acc.committed[id], ids[i] = wall_us(), id
    tide.sleep(LAT_GAP)
  end
  local deadline, n = tide.now() + 30000, 0
  repeat
    tide.sleep(50)
    read_stamps(dir, acc.got)
    n = 0
    for _, id in ipairs(ids) do if acc.got[id] then n = n + 1 end end
  until n >= LAT_JOBS or tide.now() > deadline
  sh("rm -f " .. sh_quote(dir) .. "/stamps.*")
  if n < LAT_JOBS then fail(("%s: %d of %d jobs started within 30 s"):format(what, n, LAT_JOBS)) end
end

--- Sorted ms of fn(id, stamp) over all jobs.
local function spread(got, fn)
  local xs = {}
  for id, s in pairs(got) do xs[#xs + 1] = fn(id, s) end
  sort(xs)
  return xs
end

local function latency_text(name, acc)
  local a = spread(acc.got, function(_, s) return (s[2] - s[1]) / 1000 end)
  local b = spread(acc.got, function(id, s) return (s[2] - acc.committed[id]) / 1000 end)
  return ("%-18s p50 %5.2f p99 %6.2f (from commit: p50 %5.2f p99 %6.2f)")
    :format(name, percentile(a, 0.5), percentile(a, 0.99), percentile(b, 0.5), percentile(b, 0.99))
end

--- One round: K idle tide workers, LAT_JOBS jobs; adds to acc (and acc.claimed[id] = µs).
local function tide_latency(q, k, dir, acc)
  db:query("TRUNCATE " .. TIDE_SCHEMA .. ".tide_jobs")        -- ids go on from round to round
  local pids = {}
  for i = 1, k do
    pids[i] = spawn_bg(("TIDE_BENCH_STAMPS=%s/stamps %s worker --store %s --concurrency %d --quiet "
                        .. "bench/pg/targets.lua >/dev/null 2>>%s/tide.log")
      :format(sh_quote(dir), sh_quote(TIDE_BIN), sh_quote(TIDE_URL), CONCS[1], dir))
  end
  wait_listeners("LISTEN tide_jobs", k, pids)
  measure_latency(function(at)
    return (q:enqueue{ target = "bench", method = "stamp", args = { at = at } })
  end, dir, "tide latency", acc)
  stop_all(pids)
  -- where it goes: commit -> the claim statement (attempted_at, the
  -- server's clock in ms) -> the job's first instruction
  for _, r in ipairs(db:query("SELECT id, attempted_at FROM " .. TIDE_SCHEMA .. ".tide_jobs").rows) do
    acc.claimed[r.id] = r.attempted_at * 1000
  end
end

--- One round: K idle graphile-worker processes (defaults), LAT_JOBS jobs; adds to acc.
local function gw_latency(k, dir, acc)
  db:query("DELETE FROM " .. GW_SCHEMA .. "._private_jobs")
  local pids = {}
  for i = 1, k do
    pids[i] = spawn_bg(node_cmd(("run %s %s defaults %s/stamps"):format(sh_quote(URL), GW_SCHEMA, dir), dir))
  end
  wait_listeners("LISTEN \"jobs:insert\"%", k, pids)
  local sql = ("SELECT id FROM %s.add_job('stamp', json_build_object('at', $1::text))"):format(GW_SCHEMA)
  measure_latency(function(at) return q1(sql, at).id end, dir, "graphile-worker latency", acc)
  stop_all(pids)
end

-- ===== 4. enqueue: one at a time, batched, and the floor of a bare multi-row INSERT

local ENQ_ONE, ENQ_BATCH, ENQ_CHUNK = 2000, 20000, 5000

local function tide_table() return TIDE_SCHEMA .. ".tide_jobs" end

local function tide_enqueue_one(q)
  db:query("TRUNCATE " .. tide_table())
  local t0 = tide.now()
  for _ = 1, ENQ_ONE do q:enqueue{ target = "bench", method = "noop" } end
  return ENQ_ONE * 1000 / (tide.now() - t0)
end

local function tide_enqueue_batch(q)
  db:query("TRUNCATE " .. tide_table())
  local lists = {}
  for i = 1, ENQ_BATCH / ENQ_CHUNK do lists[i] = noop_list(ENQ_CHUNK) end
  local t0 = tide.now()
  for i = 1, #lists do q:enqueue_many(lists[i]) end
  local rate = ENQ_BATCH * 1000 / (tide.now() - t0)
  assert(q1("SELECT count(*) AS n FROM " .. tide_table()).n == ENQ_BATCH)
  return rate
end

--- The floor: the rows tide's enqueue_many writes (same table, same
--- columns, its NOTIFY trigger), as literals in one INSERT per 5,000,
--- sent through libpq by a bare connection.
local function bare_insert()
  db:query("TRUNCATE " .. tide_table())
  local now = floor(core.wallclock())
  local row = ("('default','bench','noop','null',NULL,'available',0,20,%d,NULL,%d)"):format(now, now)
  local sql = "INSERT INTO " .. tide_table() .. " (queue, target, method, args, args_enc, status, priority, "
    .. "max_attempts, run_at, idempotence_key, inserted_at) VALUES " .. (row .. ","):rep(ENQ_CHUNK - 1) .. row
  local t0 = tide.now()
  for _ = 1, ENQ_BATCH / ENQ_CHUNK do db:query(sql) end
  return ENQ_BATCH * 1000 / (tide.now() - t0)
end

--- The server's own floor for this table: rows made by the server itself
--- (generate_series), no client data at all.
local function server_insert()
  db:query("TRUNCATE " .. tide_table())
  local now = floor(core.wallclock())
  local t0 = tide.now()
  for _ = 1, ENQ_BATCH / ENQ_CHUNK do
    db:query("INSERT INTO " .. tide_table() .. " (queue, target, method, args, status, priority, max_attempts, "
      .. "run_at, inserted_at) SELECT 'default', 'bench', 'noop', 'null', 'available', 0, 20, $1, $1 "
      .. "FROM generate_series(1, $2)", now, ENQ_CHUNK)
  end
  return ENQ_BATCH * 1000 / (tide.now() - t0)
end

local function gw_enqueue(how, n, dir)
  db:query("DELETE FROM " .. GW_SCHEMA .. "._private_jobs")
  local out = read_cmd(("NODE_PATH=%s %s bench/pg/graphile.js enqueue %s %s %s %d 2>>%s/graphile.log")
    :format(sh_quote(NODE_DIR .. "/node_modules"), sh_quote(NODE), sh_quote(URL), GW_SCHEMA, how, n, dir))
  local ms = tonumber(out)
  if not ms then fail("graphile-worker enqueue " .. how .. " failed (see " .. dir .. "/graphile.log)") end
  return n * 1000 / ms
end

local function enqueue_part(q, gw_ok, dir)
  local rows = {
    { name = "tide q:enqueue, one at a time (a commit each)", run = function() return tide_enqueue_one(q) end },
    { name = "tide q:enqueue_many, 5,000 a call", run = function() return tide_enqueue_batch(q) end },
    { name = "bare multi-row INSERT, 5,000 a statement", run = bare_insert },
    { name = "(server floor: INSERT ... generate_series)", run = server_insert },
  }
  if gw_ok then
    rows[5] = { name = "graphile-worker addJob, one at a time", run = function() return gw_enqueue("one", ENQ_ONE, dir) end }
    rows[6] = { name = "graphile-worker addJobs, 5,000 a call", run = function() return gw_enqueue("batch", ENQ_BATCH, dir) end }
  end
  for _, r in ipairs(rows) do r.got = {} end
  for _ = 1, REPEATS do
    for _, r in ipairs(rows) do r.got[#r.got + 1] = r.run() end
  end
  print(("enqueue: %d jobs one at a time, %d batched; jobs/s, best of %d (median):"):format(ENQ_ONE, ENQ_BATCH, REPEATS))
  for _, r in ipairs(rows) do
    r.best, r.median = best_median(r.got)
    print(("  %-48s %8.0f (%8.0f)"):format(r.name, r.best, r.median))
  end
  local function ratio(a, b, goal, what)
    local x = rows[a].best / rows[b].best
    print(("  %-48s %8.2fx%s"):format(what, x, goal and (x >= goal and " ok" or " MISSED") or ""))
  end
  ratio(2, 3, 0.5, "batched / bare INSERT (goal >= 0.5x)")
  if gw_ok then
    ratio(1, 5, 3, "one at a time / graphile-worker (goal >= 3x)")
    ratio(2, 6, 3, "batched / graphile-worker (goal >= 3x)")
  end
end

-- ===== 5. jobs that do their own transaction, at pool sizes 1, 5, 20

local OWN_N, OWN_CONC, POOLS = 5000, 20, { 1, 5, 20 }

local function tide_owntx(q, pool, dir)
  db:query("TRUNCATE " .. tide_table())
  db:query("TRUNCATE " .. TIDE_SCHEMA .. ".bench_effects")
  for i = 1, OWN_N, ENQ_CHUNK do
    local list = {}
    for j = 1, math.min(ENQ_CHUNK, OWN_N - i + 1) do list[j] = { target = "bench", method = "owntx" } end
    q:enqueue_many(list)
  end
  exec_or_warn("CHECKPOINT")
  local cmd = ("TIDE_BENCH_OWNTX_URL=%s timeout 300 %s worker --store %s --concurrency %d --drain --quiet "
    .. "bench/pg/targets.lua 2>>%s/tide.log"):format(sh_quote(TIDE_URL .. "&pool=" .. pool), sh_quote(TIDE_BIN),
    sh_quote(TIDE_URL), OWN_CONC, dir)
  local t0 = core.wallclock()
  local ok = run_parallel(cmd, 1, dir)
  local r = q1("SELECT count(*) FILTER (WHERE status = 'completed') AS done, max(completed_at) AS last FROM " .. tide_table())
  local effects = q1("SELECT count(*) AS n FROM " .. TIDE_SCHEMA .. ".bench_effects").n
  if not ok or r.done ~= OWN_N or effects < OWN_N then
    fail(("tide own-transaction jobs, pool %d: %d of %d completed, %d effects (see %s/tide.log)"):format(pool, r.done, OWN_N, effects, dir))
  end
  return OWN_N * 1000 / (r.last - t0)
end

local function gw_owntx(pool, dir)
  db:query("DELETE FROM " .. GW_SCHEMA .. "._private_jobs")
  db:query("TRUNCATE " .. GW_SCHEMA .. ".bench_effects")
  db:query(("SELECT count(%s.add_job('owntx', '{}'::json)) FROM generate_series(1, $1)"):format(GW_SCHEMA), OWN_N)
  exec_or_warn("CHECKPOINT")
  local cmd = "timeout 300 env " .. node_cmd(("once %s %s tuned:%d:%d:%d %s/times"):format(sh_quote(URL), GW_SCHEMA,
    OWN_CONC, OWN_CONC, pool, dir), dir)
  local t0 = core.wallclock()
  local ok = run_parallel(cmd, 1, dir)
  local exited = core.wallclock() - t0
  os.execute("rm -f " .. sh_quote(dir) .. "/times.*")
  local left = q1("SELECT count(*) AS n FROM " .. GW_SCHEMA .. "._private_jobs").n
  if not ok or left ~= 0 then
    print(("  (graphile-worker, pool %d: exit %s, %d of %d jobs left after %.1f s: %s)"):format(pool,
      ok and "0" or "non-zero", left, OWN_N, exited / 1000,
      read_cmd("tail -c 300 " .. sh_quote(dir) .. "/graphile.log"):gsub("%s+", " ")))
    return 0
  end
  return OWN_N * 1000 / exited
end

--- The ceiling of the rows above at pool `pool`: the jobs' own
--- transactions alone (the same INSERT, OWN_CONC tasks of this process on
--- a pool of that size), without jobs to claim, run or record: a worker can
--- only be slower.  Transactions/s.
local function tide_owntx_floor(pool)
  db:query("TRUNCATE " .. TIDE_SCHEMA .. ".bench_effects")
  local own = tide.queue.open(TIDE_URL .. "&pool=" .. pool)
  own:stats()                                 -- (migrated and connected before the clock starts)
  local per, tasks = floor(OWN_N / OWN_CONC), {}
  local t0 = tide.now()
  for i = 1, OWN_CONC do
    tasks[i] = tide.spawn(function()
      for k = 1, per do
        own:transaction(function(tx) tx:exec("INSERT INTO bench_effects (job) VALUES (?)", i * per + k) end)
      end
    end)
  end
  for i = 1, OWN_CONC do
    local status, err = tasks[i]:await()
    if status ~= "ok" then fail("own-transaction floor: " .. tostring(err)) end
  end
  local rate = OWN_CONC * per * 1000 / (tide.now() - t0)
  own:close()
  return rate
end

local function owntx_part(q, gw_ok, dir)
  db:query("CREATE TABLE IF NOT EXISTS " .. TIDE_SCHEMA .. ".bench_effects (job bigint NOT NULL)")
  if gw_ok then db:query("CREATE TABLE IF NOT EXISTS " .. GW_SCHEMA .. ".bench_effects (job bigint NOT NULL)") end
  print(("jobs that insert a row in a transaction of their own: %d jobs, one worker process at %d jobs at a "
    .. "time, the jobs' pool of 1, 5, 20 connections; jobs/s to the last completion (graphile-worker: "
    .. "concurrency %d, maxPoolSize the same, until its runOnce returns), best of 2:"):format(OWN_N, OWN_CONC, OWN_CONC))
  for _, pool in ipairs(POOLS) do
    local t, g, f = {}, {}, {}
    for _ = 1, 2 do
      t[#t + 1] = tide_owntx(q, pool, dir)
      if gw_ok then g[#g + 1] = gw_owntx(pool, dir) end
      f[#f + 1] = tide_owntx_floor(pool)
    end
    local tb, fb = best_median(t), best_median(f)
    local line = ("  pool %2d: tide %7.0f"):format(pool, tb)
    local ceiling = ("           ceiling: the same transactions alone, no jobs: %7.0f/s"):format(fb)
    if gw_ok then
      local gb = best_median(g)
      if gb > 0 then
        line = line .. ("   graphile-worker %7.0f   %.1fx%s"):format(gb, tb / gb, tb / gb >= 3 and " ok" or " MISSED")
        ceiling = ceiling .. (" (%.1fx graphile-worker)"):format(fb / gb)
      else
        line = line .. "   graphile-worker did not finish (above)"
      end
    end
    print(line)
    print(ceiling)
  end
end

-- ===== graphile-worker

local function have_graphile()
  local f = io.open(NODE_DIR .. "/node_modules/graphile-worker/package.json")
  if f then f:close(); return true end
  if not sh(sh_quote(NODE) .. " --version >/dev/null 2>&1") or not sh("npm --version >/dev/null 2>&1") then
    return false, "node or npm not found"
  end
  print("(installing graphile-worker from the npm registry into " .. NODE_DIR .. ")")
  if not sh(("mkdir -p %s && npm install --prefix %s --no-audit --no-fund --silent graphile-worker >/dev/null 2>&1")
            :format(sh_quote(NODE_DIR), sh_quote(NODE_DIR))) then
    return false, "npm install graphile-worker failed"
  end
  return true
end

local function graphile_version()
  local f = io.open(NODE_DIR .. "/node_modules/graphile-worker/package.json")
  local v = f and f:read("*a"):match('"version"%s*:%s*"([^"]+)"')
  if f then f:close() end
  return v or "?"
end

-- ===== main

local function setup(dir)
  db = pg.connect(URL)
  local s = q1("SELECT current_setting('server_version') AS v, current_setting('fsync') AS fsync, "
    .. "current_setting('synchronous_commit') AS sc, current_setting('wal_sync_method') AS ws, "
    .. "current_setting('max_connections') AS mc")
  print(("server: PostgreSQL %s on this machine (loopback TCP), fsync=%s, synchronous_commit=%s, "
    .. "wal_sync_method=%s, max_connections=%s"):format(s.v, s.fsync, s.sc, s.ws, s.mc))
  db:query("DROP SCHEMA IF EXISTS " .. TIDE_SCHEMA .. " CASCADE")
  db:query("CREATE SCHEMA " .. TIDE_SCHEMA)
  local q = tide.queue.open(TIDE_URL)
  local gw_ok, gw_why = have_graphile()
  if gw_ok then
    db:query("DROP SCHEMA IF EXISTS " .. GW_SCHEMA .. " CASCADE")
    if not sh(node_cmd(("migrate %s %s"):format(sh_quote(URL), GW_SCHEMA), dir)) then
      gw_ok, gw_why = false, "its migration failed: " .. read_cmd("cat " .. sh_quote(dir) .. "/graphile.log")
    else
      print(("baseline: graphile-worker %s on node %s, its own schema on the same server; \"defaults\": "
        .. "1 job at a time per process, a pool of 10; \"%s\": %d jobs at a time, localQueue %d, "
        .. "pool 10, completeJobBatchDelay 1 ms; success lines off (NO_LOG_SUCCESS=1)")
        :format(graphile_version(), read_cmd(sh_quote(NODE) .. " --version"):gsub("%s+$", ""),
                TUNED, CONCS[1], CONCS[1]))
    end
  end
  if not gw_ok then print("baseline: graphile-worker unavailable (" .. gw_why .. "); tide's figures only") end
  return q, gw_ok
end

local function throughput(q, gw_ok, dir)
  local rows = {}                          -- { name, runs = { [k] = { results } } }
  for _, c in ipairs(CONCS) do
    rows[#rows + 1] = { name = "tide --concurrency " .. c, run = function(k) return tide_run(q, c, k, dir) end }
  end
  if gw_ok then
    rows[#rows + 1] = { name = "graphile-worker defaults", run = function(k) return gw_run("defaults", k, dir) end }
    rows[#rows + 1] = { name = "graphile-worker " .. TUNED, run = function(k) return gw_run(TUNED, k, dir) end }
  end
  for _, row in ipairs(rows) do row.runs = {}; for _, k in ipairs(KS) do row.runs[k] = {} end end
  for _ = 1, REPEATS do                    -- alternate: the machine's noise hits every row
    for _, k in ipairs(KS) do
      for _, row in ipairs(rows) do local rs = row.runs[k]; rs[#rs + 1] = row.run(k) end
    end
  end
  local function stat(row, k, field)
    local xs = {}
    for i, r in ipairs(row.runs[k]) do xs[i] = r[field] end
    return best_median(xs)
  end
  local function line(label, cells) print(("  %-36s %16s %16s %16s"):format(label, cells[1], cells[2], cells[3])) end
  --- One table: every row's best (median) of `field`, then tide's ratios to graphile-worker.
  local function tabulate(field, title, goal)
    print(title)
    line("", { "K=1", "K=2", "K=4" })
    for _, row in ipairs(rows) do
      local cells = {}
      for i, k in ipairs(KS) do cells[i] = ("%6.0f (%6.0f)"):format(stat(row, k, field)) end
      line(row.name, cells)
    end
    if not gw_ok then return end
    for i, base in ipairs{ rows[#CONCS + 1], rows[#CONCS + 2] } do
      local cells = {}
      for j, k in ipairs(KS) do
        local ratio = stat(rows[1], k, field) / stat(base, k, field)
        cells[j] = ("%.1fx%s"):format(ratio, (goal and i == 1) and (ratio >= GOAL and " ok" or " MISSED") or "")
      end
      line(i == 1 and ("first row / defaults" .. (goal and (" (goal >= %dx)"):format(GOAL) or ""))
           or "first row / tuned", cells)
    end
  end
  tabulate("rate", ("throughput, %d no-op jobs enqueued up front; jobs/s from the start of K worker processes "
    .. "to the last durable completion, best of %d (median):"):format(N, REPEATS), true)
  tabulate("steady", "the same runs, jobs/s from the first job's start to the last durable completion "
    .. "(without the processes' start-up):")
  tabulate("exit_rate", "the same runs, jobs/s from the start of the processes to their exit:")
  local enq = {}
  for _, k in ipairs(KS) do for _, r in ipairs(rows[1].runs[k]) do enq[#enq + 1] = r.enqueue end end
  local text = ("  enqueue of the %d jobs: tide q:enqueue_many (5,000 a transaction) %.0f jobs/s (median %.0f)")
    :format(N, best_median(enq))
  if gw_ok then
    enq = {}
    for _, k in ipairs(KS) do for _, r in ipairs(rows[#CONCS + 1].runs[k]) do enq[#enq + 1] = r.enqueue end end
    text = text .. ("; graphile-worker add_job, all in one SELECT: %.0f (%.0f)"):format(best_median(enq))
  end
  print(text)
end

local function latency(q, gw_ok, dir)
  print(("latency, %d rounds of %d jobs enqueued one at a time, %d ms apart, by another process (tide and "
    .. "graphile-worker rounds alternate); K idle workers listening; ms from the enqueue call (and from "
    .. "its commit) to the job's first instruction:"):format(LAT_ROUNDS, LAT_JOBS, LAT_GAP))
  for _, k in ipairs(KS) do
    local t = { got = {}, committed = {}, claimed = {} }
    local g = { got = {}, committed = {} }
    for _ = 1, LAT_ROUNDS do
      tide_latency(q, k, dir, t)
      if gw_ok then gw_latency(k, dir, g) end
    end
    local to_claim = spread(t.got, function(id) return (t.claimed[id] - t.committed[id]) / 1000 end)
    local to_start = spread(t.got, function(id, s) return (s[2] - t.claimed[id]) / 1000 end)
    print(("  K=%d  %s; p50 commit -> claim statement %.1f ms, claim -> job %.1f ms (server clock, ms steps)")
      :format(k, latency_text("tide", t), percentile(to_claim, 0.5), percentile(to_start, 0.5)))
    if gw_ok then print(("  K=%d  %s"):format(k, latency_text("graphile defaults", g))) end
  end
end

local function main()
  local dir = read_cmd("mktemp -d /tmp/tide-bench-pg.XXXXXX"):gsub("%s+$", "")
  local q, gw_ok = setup(dir)
  print()
  if PARTS.floors then floors() end
  if PARTS.enqueue then enqueue_part(q, gw_ok, dir) end
  if PARTS.owntx then owntx_part(q, gw_ok, dir) end
  if PARTS.throughput then throughput(q, gw_ok, dir) end
  if PARTS.latency then latency(q, gw_ok, dir) end
  q:close()
  db:query("DROP SCHEMA IF EXISTS " .. TIDE_SCHEMA .. " CASCADE")
  if gw_ok then db:query("DROP SCHEMA IF EXISTS " .. GW_SCHEMA .. " CASCADE") end
  db:close()
  sh("rm -rf " .. sh_quote(dir))
end

local function loadavg()
  local f = io.open("/proc/loadavg")
  local s = f and f:read("*l")
  if f then f:close() end
  return s and s:match("^(%S+ %S+ %S+)") or "unknown"
end

local t0, load0 = tide.now(), loadavg()
local status, err = tide.run(main)
if status ~= "ok" then fail("ended " .. tostring(status) .. ": " .. tostring(err)) end
print(("(bench/pg/bench.lua: %.1f s wall; load average %s at the start, %s at the end)")
  :format((tide.now() - t0) / 1000, load0, loadavg()))
