-- spec/pg_workers_spec.lua — worker processes on one PostgreSQL store: exactly once, SIGKILL, server restarts.
--
-- Real `tide worker --store $TIDE_PG_URL --quiet ... spec/pg/targets.lua DIR`
-- processes work through 20,000 jobs; each job appends "id pid attempt" to
-- DIR/effects.<pid> (outside the database, so a server restart cannot
-- touch it).  Then the store and the effects are checked job by job:
--
--   1. 4 workers (--drain), no kills: every job completed in one attempt
--      with exactly one effect; every worker did a share of the work.
--   2. 4 workers (lease 1.5 s) while 30 of them are SIGKILLed, one after
--      every 500 jobs or so, each picked at random among the live workers
--      that hold executing jobs at that moment, and replaced: every job
--      completed, every job did its work, and a job did it more than once
--      only in attempts of killed workers (each failed attempt in the
--      store is the lease expiry of a killed worker).
--   3. 4 workers (lease 8 s) through a `spec/pg.sh restart` and a 1.5 s
--      outage (spec/pg/server.sh down, up): the same 4 processes keep
--      running, reconnect and do every job exactly once; an enqueue while
--      the server is down fails at once with an error naming the store,
--      and the same queue object enqueues again once it is back.
--
-- So that the workers cannot run out of work before the kills and outages
-- are over, however fast they are, the jobs of 2 and 3 are enqueued for an
-- hour later and made due by the spec (an UPDATE of run_at): most of them
-- spread over 6 s, the last few thousand only once the kills or outages
-- are over.  Each test prints what happened.  Needs TIDE_PG_URL and
-- TIDE_PG_DIR (spec/run.sh starts the server); leaves that server running.
--
-- PGW_SEED=n replays the random choices (not the timing); PGW_LEASE=ms
-- changes test 2's lease (1500: short, so that killed workers' jobs are
-- rescued soon, and long enough for a live worker's heartbeat on a loaded
-- machine: at 500 ms and load 13, one came late and its job ran twice);
-- PGW_KEEP=1 keeps the effects, a timeline of the workers (pid, started,
-- killed: wall clock ms) and the tables of a failed test for a look (run
-- that test alone, with --filter).
local tide = require "tide"
local H = spec_helper

local wallclock = require("tide.core").wallclock

local TIDE = H.build .. "/tide"
local URL, PGDIR = os.getenv("TIDE_PG_URL"), os.getenv("TIDE_PG_DIR")
local TARGETS = "spec/pg/targets.lua"

local JOBS, WORKERS, KILLS = 20000, 4, 30
local HOUR = 3600 * 1000

if not (URL and PGDIR) then
  describe("tide worker on PostgreSQL", function()
    pending("needs a PostgreSQL server (TIDE_PG_URL and TIDE_PG_DIR, as spec/run.sh sets)")
  end)
  return
end

local sh_ok = H.sh_ok

--- Runs spec/pg.sh or spec/pg/server.sh on the suite's server.  (Without
--- the sanitizers' LD_PRELOAD of `make sanitize`: postgres hangs under it.)
local function server(script, cmd)
  return sh_ok(("env -u LD_PRELOAD sh %s %s '%s'"):format(script, cmd, PGDIR))
end

local function fresh_tables()
  local c = require("tide.jobs.store.postgres").connect(URL)
  c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_queues, tide_schedules, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
  c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
  c:close()
end

local NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"

--- Makes jobs lo..hi (ids) due one after another over `spread` ms from
--- now, by the server's clock (the one leases use).
local function release(admin, lo, hi, spread)
  admin:query(("UPDATE tide_jobs SET run_at = %s + (id - %d) * %d / %d WHERE id BETWEEN %d AND %d")
    :format(NOW_MS, lo, spread, hi - lo + 1, lo, hi))
end

--- { [pid] = jobs of the default queue it holds executing }, how many
--- are due but not claimed, how many completed.
local function progress(admin)
  local rows = admin:query("SELECT CASE status WHEN 'executing' THEN lease_owner WHEN 'completed' THEN "
    .. "'completed' ELSE 'due' END AS k, count(*) AS n FROM tide_jobs WHERE queue = 'default' AND "
    .. "(status IN ('executing', 'completed') OR run_at <= " .. NOW_MS .. ") GROUP BY 1").rows
  local by_pid, due, completed = {}, 0, 0
  for _, r in ipairs(rows) do
    if r.k == "due" then due = r.n
    elseif r.k == "completed" then completed = r.n
    else by_pid[assert(tonumber(r.k:match("^[^:]*:(%d+):")), r.k)] = r.n end
  end
  return by_pid, due, completed
end

local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")
local SIGKILL, SIGTERM = 9, 15

--- Enqueues JOBS jobs in batches of 1000; returns their ids.
local function enqueue_all(q, delay)
  local ids, list = {}, {}
  for i = 1, JOBS do
    list[#list + 1] = { target = "pgw", method = "work", args = { n = i }, max_attempts = 1000, delay = delay }
    if #list == 1000 or i == JOBS then
      local got, n = q:enqueue_many(list)
      assert.equal(#list, n)
      for _, id in ipairs(got) do ids[#ids + 1] = id end
      list = {}
    end
  end
  return ids
end

-- ===== the worker processes

local dir, procs

--- Starts `tide worker` in the background; its shell parent waits for it
--- and writes its exit status to a file.  Returns { pid, n, log, ... }.
local function start_worker(options)
  local w = { n = #procs + 1 }
  w.log = ("%s/worker-%d.log"):format(dir, w.n)
  w.status_file = ("%s/worker-%d.status"):format(dir, w.n)
  w.pipe = assert(io.popen(("%s worker --store %s --quiet %s %s %s > %s 2>&1 & echo $!; "
                            .. "exec 2>/dev/null; wait $!; echo $? > %s")
    :format(TIDE, URL, options, TARGETS, dir, w.log, w.status_file)))
  w.pid = tonumber(w.pipe:read("*l"))
  assert(w.pid, "no pid for worker " .. w.n)
  w.effects = ("%s/effects.%d"):format(dir, w.pid)
  w.started = wallclock()
  procs[#procs + 1] = w
  return w
end

--- Its exit status, or nil while it runs.
local function exit_status(w)
  return tonumber(H.file_bytes(w.status_file):match("^(%d+)\n$"))
end

--- Reaps the shell parent (it has written the status, or is about to).
local function reap(w)
  if w.pipe then w.pipe:close(); w.pipe = nil end
  return exit_status(w)
end

--- Waits (in a task) until every worker in `list` has exited; their statuses.
local function wait_exit(list, ms, what)
  local deadline = tide.now() + ms
  while true do
    local all = true
    for _, w in ipairs(list) do
      if not exit_status(w) then all = false end
    end
    if all then break end
    assert(tide.now() < deadline, ("%s: workers still running after %d ms"):format(what, ms))
    tide.sleep(20)
  end
  for _, w in ipairs(list) do reap(w) end
end

local function assert_exit(w, expected)
  local st = exit_status(w)
  assert(st == expected, ("worker %d (pid %d) exited %s, %d expected; its output:\n%s")
    :format(w.n, w.pid, tostring(st), expected, H.file_bytes(w.log)))
end

local function assert_silent(w)
  local out = H.file_bytes(w.log)
  assert(out == "", ("worker %d (pid %d) printed:\n%s"):format(w.n, w.pid, out))
end

--- Checks that a worker printed nothing but failed statements on the
--- store (one line each, libpq's details indented); counts them by kind
--- ("claiming", "heartbeat", ...) into `kinds`.
local function store_errors(w, kinds)
  local prefix = "tide: error in worker "
  local store = ": " .. URL .. ": "
  for line in H.file_bytes(w.log):gmatch("[^\n]+") do
    if line:sub(1, 1) ~= "\t" then
      local at = line:find(store, 1, true)
      local what = at and line:sub(1, #prefix) == prefix and line:sub(#prefix + 1, at - 1):match("^%S+: (.*)$")
      assert(what, ("worker %d (pid %d) printed: %s"):format(w.n, w.pid, line))
      what = what:match("^%a+")
      kinds[what] = (kinds[what] or 0) + 1
    end
  end
end

-- ===== reading what happened

--- Every worker's effects -> { [id] = { { pid =, attempt = }, ... } }, count.
local function read_effects()
  local by_id, n = {}, 0
  for _, w in ipairs(procs) do
    local f = io.open(w.effects, "r")
    if f then
      for line in f:lines() do
        n = n + 1
        local id, pid, attempt, at = line:match("^(%d+) (%d+) (%d+) (%d+)$")
        assert(id, ("%s: malformed effect %q"):format(w.effects, line))
        assert.equal(w.pid, tonumber(pid), w.effects)
        id = tonumber(id)
        local list = by_id[id]
        if not list then list = {}; by_id[id] = list end
        list[#list + 1] = { pid = w.pid, attempt = tonumber(attempt), at = tonumber(at) }
      end
      f:close()
    end
  end
  for _, list in pairs(by_id) do
    table.sort(list, function(a, b) return a.attempt < b.attempt end)
  end
  return by_id, n
end

--- The default queue's jobs -> { [id] = job }; checks that they are exactly `ids`.
local function jobs_of(q, ids)
  local list = q:list{ queue = "default", limit = JOBS + 1 }
  assert.equal(#ids, #list)
  local by_id = {}
  for _, job in ipairs(list) do by_id[job.id] = job end
  for _, id in ipairs(ids) do assert(by_id[id], "job " .. id .. " lost") end
  return by_id
end

--- The stats of the default queue, every status present.
local function counts(q)
  local st = q:stats().queues.default or {}
  local out = { total = 0 }
  for _, s in ipairs(require("tide.jobs.job").STATUSES) do
    out[s] = st[s] or 0
    out.total = out.total + out[s]
  end
  return out
end

--- Waits (in a task) until every job of the default queue is completed and
--- none is executing; the store may be unreachable meanwhile.
local function wait_completed(q, ms)
  local deadline, st = tide.now() + ms, nil
  while true do
    local ok, c = pcall(counts, q)
    if ok then
      st = c
      if c.completed == JOBS and c.executing == 0 then return c end
    end
    assert(tide.now() < deadline, ("jobs not all completed after %d ms: %s"):format(ms,
      st and require("cjson").encode(st) or tostring(c)))
    tide.sleep(50)
  end
end

--- Waits until `n` jobs are completed.
local function wait_progress(q, n, ms)
  local deadline = tide.now() + ms
  while true do
    local ok, c = pcall(counts, q)
    if ok and c.completed >= n then return c end
    assert(tide.now() < deadline, ("fewer than %d jobs completed after %d ms"):format(n, ms))
    tide.sleep(20)
  end
end

local function distribution()
  local effects_of = {}
  for _, w in ipairs(procs) do
    local n = 0
    local f = io.open(w.effects, "r")
    if f then
      for _ in f:lines() do n = n + 1 end
      f:close()
    end
    effects_of[#effects_of + 1] = n
  end
  return effects_of
end

local function run(fn)
  local status, err = tide.run(fn)
  assert(status == "ok", tostring(err))
end

describe("tide worker processes on one PostgreSQL store", function()
  local seed

  before_each(function()
    seed = tonumber(os.getenv("PGW_SEED")) or (os.time() * 1000 + math.floor(tide.now())) % 2^31
    math.randomseed(seed)
    dir = os.tmpname()
    os.remove(dir)
    sh_ok("mkdir -p " .. dir)
    procs = {}
    fresh_tables()
  end)

  after_each(function()
    for _, w in ipairs(procs) do
      if w.pipe then
        ffi.C.kill(w.pid, SIGKILL)
        reap(w)
      end
    end
    -- the server stays up for the specs after this one, whatever happened
    server("spec/pg/server.sh", "up")
    if os.getenv("PGW_KEEP") then
      local f = assert(io.open(dir .. "/timeline", "w"))
      for _, w in ipairs(procs) do f:write(("%d started %d killed %s\n"):format(w.pid, w.started, tostring(w.killed))) end
      f:close()
      print("\n# kept " .. dir)
      return
    end
    os.execute("rm -rf " .. dir)
    fresh_tables()
    H.assert_idle()
  end)

  it("complete 20,000 jobs, each exactly once, shared among 4 workers", function()
    local t0 = tide.now()
    local q = tide.queue.open(URL)
    local ids = enqueue_all(q)
    local t_enqueued = tide.now()
    run(function()
      for _ = 1, WORKERS do start_worker("--drain --lease 5000 --poll 100 --concurrency 16") end
      wait_exit(procs, 120000, "--drain")
    end)
    local t_done = tide.now()
    for _, w in ipairs(procs) do assert_exit(w, 0); assert_silent(w) end

    local st = counts(q)
    assert.equal(JOBS, st.total)
    assert.equal(JOBS, st.completed)
    local jobs = jobs_of(q, ids)
    q:close()
    local effects, lines = read_effects()
    assert.equal(JOBS, lines)
    for _, id in ipairs(ids) do
      local job, fx = jobs[id], effects[id]
      assert.equal("completed", job.status, "job " .. id)
      assert.equal(1, job.attempt, "job " .. id .. ": attempts")
      assert.equal(0, #job.errors, "job " .. id .. ": errors")
      assert(fx, "job " .. id .. " completed without doing its work")
      assert(#fx == 1, ("job %d did its work %d times"):format(id, #fx))
      assert.equal(1, fx[1].attempt)
    end
    local dist = distribution()
    for i, n in ipairs(dist) do assert(n > 0, ("worker %d did no job: %s"):format(i, table.concat(dist, " "))) end
    print(("\n# pg workers: %d jobs, %d workers, 0 killed, 0 duplicates; jobs per worker %s;"
           .. "\n# %.1f s enqueueing, %.1f s working"):format(JOBS, #procs, table.concat(dist, "/"),
           (t_enqueued - t0) / 1000, (t_done - t_enqueued) / 1000))
  end)

  it("lose no job when 30 working workers are SIGKILLed and replaced", function()
    local RESERVE, STEP = 2000, 500   -- jobs held back until the kills are over; jobs done between kills
    local t0 = tide.now()
    local q = tide.queue.open(URL)
    local ids = enqueue_all(q, HOUR)
    local t_enqueued = tide.now()
    local admin = require("tide.jobs.store.postgres").connect(URL)
    local options = ("--lease %d --poll 100 --concurrency 16"):format(tonumber(os.getenv("PGW_LEASE")) or 1500)
    local killed, kills, extra_slices, held, left, t_killed = {}, 0, 0, 0, nil, nil
    run(function()
      local live, released = {}, JOBS - RESERVE
      for i = 1, WORKERS do live[i] = start_worker(options) end
      release(admin, ids[1], ids[released], 6000)
      while kills < KILLS do
        -- the victim, once another STEP jobs or so are done: a live worker
        -- holding executing jobs right now
        local threshold = kills * STEP + math.random(0, STEP / 2)
        local deadline, victim = tide.now() + 60000, nil
        while not victim do
          local busy, due, completed = progress(admin)
          if completed >= threshold then
            local candidates = {}
            for i, w in ipairs(live) do
              if busy[w.pid] then candidates[#candidates + 1] = i end
            end
            if #candidates > 0 then
              victim = table.remove(live, candidates[math.random(#candidates)])
              held = held + busy[victim.pid]
            elseif due == 0 then             -- they did all that was due: make more due
              assert(released + STEP < JOBS, ("the workers did %d jobs before kill %d"):format(completed, kills + 1))
              release(admin, ids[released + 1], ids[released + STEP], 100)
              released, extra_slices = released + STEP, extra_slices + 1
            end
          end
          if not victim then
            assert(tide.now() < deadline, ("no progress or no busy worker for 60 s before kill %d"):format(kills + 1))
            tide.sleep(20)
          end
        end
        assert(ffi.C.kill(victim.pid, SIGKILL) == 0, "kill failed")
        victim.killed = wallclock()
        reap(victim)
        assert_exit(victim, 128 + SIGKILL)
        killed[victim.pid] = victim.killed
        kills = kills + 1
        live[#live + 1] = start_worker(options)
      end
      left, t_killed = JOBS - counts(q).completed, tide.now()
      release(admin, ids[released + 1], ids[JOBS], 0)
      wait_completed(q, 120000)
      for _, w in ipairs(live) do ffi.C.kill(w.pid, SIGTERM) end
      wait_exit(live, 30000, "SIGTERM")
      for _, w in ipairs(live) do assert_exit(w, 0) end
    end)
    admin:close()
    local t_done = tide.now()
    assert(left > 0, "the workers had done every job before the last kill")
    for _, w in ipairs(procs) do assert_silent(w) end

    local st = counts(q)
    assert.equal(JOBS, st.total)
    assert.equal(JOBS, st.completed)
    local jobs = jobs_of(q, ids)
    q:close()
    local effects, lines = read_effects()
    local twice, extra, reclaimed = 0, 0, 0
    for _, id in ipairs(ids) do
      local job, fx = jobs[id], effects[id]
      assert.equal("completed", job.status, "job " .. id)
      assert(fx, "job " .. id .. " completed without doing its work")
      -- the last effect is the attempt that completed the job
      assert.equal(job.attempt, fx[#fx].attempt, "job " .. id .. ": the attempt of its last effect")
      for k = 1, #fx - 1 do
        assert(killed[fx[k].pid], ("job %d did its work twice, but worker %d was not killed; its failed attempts: %s")
          :format(id, fx[k].pid, require("cjson").encode(job.errors)))
        assert(fx[k].attempt < fx[k + 1].attempt, ("job %d: two effects in attempt %d"):format(id, fx[k].attempt))
      end
      -- every failed attempt is the lease of a killed worker, expired
      assert.equal(job.attempt - 1, #job.errors, "job " .. id .. ": failed attempts")
      for _, e in ipairs(job.errors) do
        local pid = tonumber(e.error:match("^lease expired: worker [^:]*:(%d+):%x+ stopped heartbeating$"))
        assert(pid, ("job %d, attempt %d failed otherwise: %s"):format(id, e.attempt, e.error))
        assert(killed[pid], ("job %d: the lease of worker %d expired, but it was not killed"):format(id, pid))
      end
      if #fx > 1 then twice, extra = twice + 1, extra + #fx - 1 end
      if job.attempt > 1 then reclaimed = reclaimed + 1 end
    end
    assert.equal(JOBS + extra, lines)
    print(("\n# pg workers: %d jobs, %d workers at a time, %d processes, %d SIGKILLed holding %d executing "
           .. "jobs in all (%d extra slices made due); %d jobs left at the last kill;\n# %d jobs did their work "
           .. "more than once (%d extra effects), %d were claimed more than once;\n# %.1f s enqueueing, "
           .. "%.1f s killing, %.1f s finishing, seed %d")
      :format(JOBS, WORKERS, #procs, kills, held, extra_slices, left, twice, extra, reclaimed,
              (t_enqueued - t0) / 1000, (t_killed - t_enqueued) / 1000, (t_done - t_killed) / 1000, seed))
  end)

  it("keep running through server restarts and do every job once; enqueue fails while it is down", function()
    local RESERVE, OUTAGE = 6000, 1500    -- jobs held back until the server is back; ms down
    local t0 = tide.now()
    local q = tide.queue.open(URL)
    local ids = enqueue_all(q, HOUR)
    local t_enqueued = tide.now()
    local probes = { tried = 0, ok = 0, failed = 0, messages = {} }

    --- q:enqueue in a task of its own (so that a hang shows as a timeout):
    --- true, id or false, message.
    local function probe()
      probes.tried = probes.tried + 1
      local t = tide.spawn{ timeout = 20000, run = function()
        return { pcall(q.enqueue, q, { target = "pgw", method = "work", queue = "probe" }) }
      end }
      local status, r = t:await()
      assert(status == "ok", "q:enqueue did not return: " .. status .. " " .. tostring(r))
      if r[1] then
        probes.ok = probes.ok + 1
      else
        probes.failed = probes.failed + 1
        assert.equal("string", type(r[2]))
        assert(r[2]:sub(1, #URL + 2) == URL .. ": ", "the error does not name the store: " .. r[2])
        local m = r[2]:sub(#URL + 3):match("^[^\n]*"):gsub('^connection to server at "[^"]*", port %d+ failed: ',
                                                         "cannot connect: ")
        probes.messages[m] = true
      end
      return r[1], r[2]
    end

    local function assert_alive(list, when)
      for _, w in ipairs(list) do
        assert(exit_status(w) == nil, ("worker %d exited (%s) %s; its output:\n%s")
          :format(w.n, tostring(exit_status(w)), when, H.file_bytes(w.log)))
      end
    end

    --- A statement of the spec's own, on a connection of its own.
    local function admin(fn)
      local c = require("tide.jobs.store.postgres").connect(URL)
      local ok, err = pcall(fn, c)
      c:close()
      assert(ok, err)
    end

    --- The counts, trying again while the connection is stale.
    local function counts_now()
      for _ = 1, 10 do
        local ok, st = pcall(counts, q)
        if ok then return st end
        tide.sleep(100)
      end
      return counts(q)
    end

    local restart_probes, before_up, after_up, at1, at2
    run(function()
      for _ = 1, WORKERS do start_worker("--lease 8000 --poll 100 --concurrency 16") end
      admin(function(c) release(c, ids[1], ids[JOBS - RESERVE], 6000) end)
      wait_progress(q, 1000, 60000)

      -- 1. spec/pg.sh restart (-m fast), in the background, enqueueing meanwhile
      at1 = counts_now()
      local mark = dir .. "/restarted"
      os.execute(("(env -u LD_PRELOAD sh spec/pg.sh restart '%s' > %s.log 2>&1; echo $? > %s) &")
        :format(PGDIR, mark, mark))
      local deadline = tide.now() + 60000
      while H.file_bytes(mark) == "" do
        assert(tide.now() < deadline, "spec/pg.sh restart did not end")
        probe()
        tide.sleep(10)
      end
      assert(H.file_bytes(mark) == "0\n", "spec/pg.sh restart failed: " .. H.file_bytes(mark .. ".log"))
      restart_probes = { tried = probes.tried, failed = probes.failed }
      assert_alive(procs, "across spec/pg.sh restart")
      wait_progress(q, counts_now().completed + 500, 60000)     -- they reconnected

      -- 2. the server down for OUTAGE ms: enqueue fails at once; the workers wait
      at2 = counts_now()
      server("spec/pg/server.sh", "down")
      local t_down = tide.now()
      -- (the first fails on the connection the server closed; the next
      -- cannot connect)
      for i = 1, 2 do
        local ok, err = probe()
        assert(not ok, "q:enqueue succeeded while the server was down")
        if i == 2 then assert.matches("Connection refused", err) end
      end
      assert(tide.now() - t_down < 10000, "q:enqueue took more than 10 s to fail")
      while tide.now() - t_down < OUTAGE do tide.sleep(50) end
      assert_alive(procs, "while the server was down")
      before_up = distribution()
      server("spec/pg/server.sh", "up")
      local ok2, id = probe()
      assert(ok2, "q:enqueue after the server came back: " .. tostring(id))
      assert.equal("number", type(id))

      admin(function(c) release(c, ids[JOBS - RESERVE + 1], ids[JOBS], 2000) end)
      wait_completed(q, 120000)
      after_up = distribution()
      assert_alive(procs, "at the end")
      for _, w in ipairs(procs) do ffi.C.kill(w.pid, SIGTERM) end
      wait_exit(procs, 30000, "SIGTERM")
    end)
    local t_done = tide.now()
    for i, w in ipairs(procs) do
      assert(after_up[i] > before_up[i], ("worker %d did no job after the server came back"):format(w.n))
    end

    local st = counts(q)
    assert.equal(JOBS, st.total)
    assert.equal(JOBS, st.completed)
    local jobs = jobs_of(q, ids)
    local probe_rows = q:stats().queues.probe.available
    q:close()
    assert(probe_rows >= probes.ok and probe_rows <= probes.tried,
           ("%d probe jobs stored, %d enqueues succeeded of %d"):format(probe_rows, probes.ok, probes.tried))
    local effects, lines = read_effects()
    assert.equal(JOBS, lines)
    local reclaimed = 0
    for _, id in ipairs(ids) do
      local job, fx = jobs[id], effects[id]
      assert.equal("completed", job.status, "job " .. id)
      assert(fx, "job " .. id .. " completed without doing its work")
      assert(#fx == 1, ("job %d did its work %d times"):format(id, #fx))
      assert.equal(job.attempt, fx[1].attempt, "job " .. id .. ": the attempt of its effect")
      -- an attempt that never ran: claimed by a statement whose answer the restart cut off
      assert.equal(job.attempt - 1, #job.errors, "job " .. id .. ": failed attempts")
      for _, e in ipairs(job.errors) do
        assert.matches("^lease expired: worker ", e.error)
      end
      if job.attempt > 1 then reclaimed = reclaimed + 1 end
    end
    local messages = {}
    for m in pairs(probes.messages) do messages[#messages + 1] = m end
    table.sort(messages)
    local kinds, logged = {}, {}
    for _, w in ipairs(procs) do store_errors(w, kinds) end
    for k in pairs(kinds) do logged[#logged + 1] = k end
    table.sort(logged)
    for i, k in ipairs(logged) do logged[i] = ("%d %s"):format(kinds[k], k) end
    print(("\n# pg workers: %d jobs, %d workers (the same processes throughout), 0 duplicates; "
           .. "at the restart %d jobs left, %d executing; at the outage %d left, %d executing;"
           .. "\n# %d claimed more than once; "
           .. "enqueues: %d tried (%d during spec/pg.sh restart, %d failed), %d failed in all: %s;"
           .. "\n# the workers logged failed statements: %s; %.1f s enqueueing, %.1f s working")
      :format(JOBS, #procs, JOBS - at1.completed, at1.executing, JOBS - at2.completed, at2.executing,
              reclaimed, probes.tried, restart_probes.tried, restart_probes.failed, probes.failed,
              table.concat(messages, " | "), table.concat(logged, ", "),
              (t_enqueued - t0) / 1000, (t_done - t_enqueued) / 1000))
    -- Every outcome was written (above), so SIGTERM was a clean stop: exit 0.
    for _, w in ipairs(procs) do
      local status = exit_status(w)
      assert(status == 0, ("worker %d (pid %d) exited %s after SIGTERM, though every outcome was written")
        :format(w.n, w.pid, tostring(status)))
    end
  end)
end)
