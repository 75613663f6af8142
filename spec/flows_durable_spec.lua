-- spec/flows_durable_spec.lua — durable flows: each step a job, released inside the completion's transaction.
--
-- On every store (in-process workers, spec/fixtures/dflow_*.lua):
--   * a start inside a transaction that rolls back leaves no run and no job;
--     the same key twice is one run;
--   * fail = "stop" cancels everything not yet finished (a running step's
--     job too), fail = "continue" skips only what depends on the failure;
--   * retry after a fix runs only what failed, was cancelled or skipped;
--   * a dependency named twice releases its step once, and skips it once;
--   * an `each` runs at most `concurrency` items at once across workers,
--     and its result is the items' results in item order;
--   * bad arguments raise errors naming the function and the option.
-- Then the 1,000-step flow of spec/fixtures/dflow_big.lua on real worker
-- processes: on SQLite, 3 of them SIGKILLed 20 times at random (paced by
-- progress, so that every kill falls mid-run) and restarted; on
-- PostgreSQL, 4 of them (one on another form of the connection string),
-- SIGKILLed 10 times and the server restarted mid-run.  Each step appends
-- its start and end to a file of the test (see the fixture); the checks:
-- the run completes; every step that should run did, to its end, at least
-- once; no step started, nor was its job inserted, before every one of its
-- dependencies had completed (each edge checked: the first start of the
-- dependent against the first end of the dependency, and the store's
-- queued_at against completed_at); every start saw its dependencies'
-- stored results; the `each` of 500 items gave its results in item order.
-- DFLOW_SEED=n replays the kills' random choices (not the timing).  The
-- kill scenarios are skipped under `make sanitize` (see below).
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

package.path = "spec/fixtures/?.lua;" .. package.path

local wallclock = core.wallclock

for _, store in ipairs(H.stores()) do
describe("durable flows on " .. store.name, function()
  local path, url, q

  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
    q = tide.queue.open(url)
    _G.DFLOW = { calls = {} }
  end)

  after_each(function()
    q:close()
    store.reset(path)
    H.assert_idle()
  end)

  local function count(sql, ...)
    local args = { ... }
    return q:transaction(function(tx) return tx:query(sql, unpack(args)) end)[1].n
  end

  local function drain(opts)
    local w = tide.worker{ queue = q, poll = 20, heartbeat = 50, concurrency = opts and opts.concurrency or 10 }
    return w:drain{ stop = true, within = 1000 }
  end

  local function steps(run)
    local by = {}
    for _, s in ipairs(run.steps) do by[s.name] = s end
    return by
  end

  it("starts nothing when the transaction rolls back, and one run for one key", function()
    H.run(function()
      local ok, err = pcall(q.transaction, q, function(tx)
        tx:exec("CREATE TABLE IF NOT EXISTS orders (id INTEGER)")
        tx:enqueue_flow("dflow_continue", { day = 1 }, { key = "day-1" })
        error("business rule said no")
      end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("business rule said no", 1, true))
      assert.equal(0, count("SELECT count(*) AS n FROM tide_flow_runs"))
      assert.equal(0, count("SELECT count(*) AS n FROM tide_flow_steps"))
      assert.equal(0, q:stats().total)
      local id, inserted = q:transaction(function(tx)
        return tx:enqueue_flow("dflow_continue", { day = 1 }, { key = "day-1" })
      end)
      assert.is_true(inserted)
      local again, second = q:enqueue_flow("dflow_continue", { day = 2 }, { key = "day-1" })
      assert.equal(id, again)
      assert.is_false(second)
      assert.equal(1, count("SELECT count(*) AS n FROM tide_flow_runs"))
      assert.equal(1, q:stats().total)                 -- the root's job only
      assert.same({ day = 1 }, q:flow_run(id).input)
      assert.equal(1, #q:flow_runs())
    end)
  end)

  it("refuses a key held by a run of another flow, naming both, and starts nothing", function()
    H.run(function()
      local id = q:enqueue_flow("dflow_continue", { day = 1 }, { key = "day-7" })
      local ok, err = pcall(q.enqueue_flow, q, "dflow_stop", { n = 1 }, { key = "day-7" })
      assert.is_false(ok)
      assert.equal(("q:enqueue_flow: key \"day-7\" is held by run %d of flow 'dflow_continue', not of 'dflow_stop'")
        :format(id), err)
      ok, err = pcall(q.transaction, q, function(tx)
        tx:enqueue{ target = "nothing", method = "here" }
        tx:enqueue_flow("dflow_stop", { n = 1 }, { idempotency_key = "day-7" })
      end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("tx:enqueue_flow: key \"day-7\" is held by run " .. id, 1, true), err)
      assert.equal(1, count("SELECT count(*) AS n FROM tide_flow_runs"))
      assert.equal(1, q:stats().total)                 -- the first run's root job only
      local again, inserted = q:enqueue_flow("dflow_continue", { day = 2 }, { key = "day-7" })
      assert.equal(id, again)
      assert.is_false(inserted)
    end)
  end)

  it("fail = 'stop' cancels every step and job not yet finished, a running one too", function()
    H.run(function()
      _G.DFLOW.slow = 2000
      local id = q:enqueue_flow("dflow_stop", { n = 1 })
      local t0 = tide.now()
      local stats = drain()
      assert.is_true(tide.now() - t0 < 1800, "the running slow step kept the drain waiting")
      local run = q:flow_run(id)
      assert.equal("error", run.status)
      assert.truthy(run.error:find("step 'bad' error: ", 1, true), run.error)
      local s = steps(run)
      assert.equal("ok", s.a.status)
      assert.equal("error", s.bad.status)
      assert.equal(2, s.bad.attempts)                  -- its retry policy: 2 attempts
      assert.truthy(s.bad.error:find("bad: not fixed yet", 1, true))
      assert.equal("cancelled", s.later.status)
      assert.equal(2, _G.DFLOW.calls.bad)
      assert.is_nil(_G.DFLOW.calls.later)
      assert.equal(0, q:stats().executing + q:stats().available + q:stats().retryable)
      assert.equal(0, count("SELECT count(*) AS n FROM tide_flow_steps WHERE status IN ('waiting', 'queued', 'fanout')"))
      assert.is_true(stats.completed >= 1)
      assert.equal("error", _G.DFLOW.done[1].status)
      assert.equal("bad", _G.DFLOW.errors[1].task)
    end)
  end)

  it("fail = 'continue' skips only what depends on the failure; retry after a fix runs only that", function()
    H.run(function()
      local id = q:enqueue_flow("dflow_continue", {})
      drain()
      local run = q:flow_run(id)
      assert.equal("error", run.status)
      local s = steps(run)
      assert.equal("error", s.bad.status)
      assert.equal("skipped", s.later.status)
      assert.equal("dependency 'bad' error", s.later.reason)
      for _, name in ipairs{ "a", "slow", "other", "fan" } do assert.equal("ok", s[name].status, name) end
      assert.same({ 1, 4, 9, 16, 25, 36, 49, 64, 81, 100 }, s.fan.result)
      local kept = { a = s.a.job, slow = s.slow.job, other = s.other.job, fan = s.fan.job }
      local before = {}
      for k, v in pairs(_G.DFLOW.calls) do before[k] = v end
      -- not yet: a running or ok run cannot be retried
      _G.DFLOW.fixed = true
      assert.is_true(q:retry_flow(id))
      local ok, why = q:retry_flow(id)
      assert.is_nil(ok)
      assert.equal(("run %d is running"):format(id), why)
      drain()
      run = q:flow_run(id)
      assert.equal("ok", run.status)
      s = steps(run)
      assert.equal(2, s.bad.result)
      assert.same({ 2, "slow" }, s.later.result)
      for name, job in pairs(kept) do assert.equal(job, s[name].job, name .. " ran again") end
      assert.equal(before.a, _G.DFLOW.calls.a)
      assert.equal(before.slow, _G.DFLOW.calls.slow)
      assert.equal(before.bad + 1, _G.DFLOW.calls.bad)
      assert.equal(1, _G.DFLOW.calls.later)
      ok, why = q:retry_flow(id)
      assert.is_nil(ok)
      assert.equal(("run %d is ok: nothing to retry"):format(id), why)
      ok, why = q:cancel_flow(id)
      assert.equal(("run %d is ok"):format(id), why)
    end)
  end)

  it("a dependency named twice: the step runs once after it, and is skipped once when it fails", function()
    H.run(function()
      local id = q:enqueue_flow("dflow_twice", {})
      drain()
      local run = q:flow_run(id)
      assert.equal("error", run.status)
      local s = steps(run)
      assert.equal("ok", s.a.status)
      assert.equal("ok", s.b.status)
      assert.equal(2, s.b.result)
      assert.equal("error", s.bad.status)
      assert.equal("skipped", s.c.status)
      assert.equal("dependency 'bad' error", s.c.reason)
      assert.equal("skipped", s.d.status)
      assert.equal("dependency 'c' skipped", s.d.reason)
      assert.same({ a = 1, b = 1, bad = 1 }, _G.DFLOW.calls)
      assert.equal(0, count("SELECT count(*) AS n FROM tide_flow_steps WHERE status IN ('waiting', 'queued', 'fanout')"))
      assert.equal(0, q:stats().executing + q:stats().available + q:stats().retryable)
    end)
  end)

  it("cancels a run by hand, its queued and running jobs too", function()
    H.run(function()
      _G.DFLOW.slow = 5000
      _G.DFLOW.fixed = true
      local id = q:enqueue_flow("dflow_continue", {})
      local w = tide.worker{ queue = q, poll = 20, concurrency = 10, heartbeat = 50 }
      local deadline = tide.now() + 5000
      while (_G.DFLOW.calls.slow or 0) == 0 do
        assert(tide.now() < deadline, "slow never started")
        tide.sleep(10)
      end
      assert.is_true(q:cancel_flow(id))
      local run = q:flow_run(id)
      assert.equal("cancelled", run.status)
      assert.equal("cancelled", steps(run).slow.status)
      assert.equal("cancelled", steps(run).later.status)
      w:drain{ stop = true }
      assert.equal(0, q:stats().executing + q:stats().available)
      assert.is_nil(_G.DFLOW.calls.later)
      assert.equal("cancelled", _G.DFLOW.done[1].status)
    end)
  end)

  it("runs at most `concurrency` items of an each at once, across workers", function()
    H.run(function()
      _G.DFLOW.fixed = true
      _G.DFLOW.slow = 1
      local id = q:enqueue_flow("dflow_continue", {})
      local w1 = tide.worker{ queue = q, poll = 20, concurrency = 10 }
      local w2 = tide.worker{ queue = q, poll = 20, concurrency = 10 }
      local t = tide.spawn(function() return w2:drain{ stop = true } end)
      w1:drain{ stop = true }
      t:await()
      assert.equal("ok", q:flow_run(id).status)
      assert.equal(3, _G.DFLOW.max_running)
    end)
  end)

  it("refuses bad arguments, naming the function and the option", function()
    H.error_cases("spec/flows_durable_spec.lua", {
      { function() q:enqueue_flow(7) end, "q:enqueue_flow: bad flow name (module name like \"etl.daily\" expected, got number)" },
      { function() q:enqueue_flow("no_such_flow_module") end, "q:enqueue_flow: flow 'no_such_flow_module': require failed: module 'no_such_flow_module' not found" },
      { function() q:enqueue_flow("dflow_stop", {}, { color = 1 }) end, "q:enqueue_flow: unknown option 'color'" },
      { function() q:enqueue_flow("dflow_stop", {}, { key = "" }) end, "q:enqueue_flow: bad option 'key' (non-empty string expected)" },
      { function() q:enqueue_flow("dflow_stop", {}, { queue = "a b" }) end, "q:enqueue_flow: bad option 'queue' (queue name (letters, digits, _ . -) expected, got string \"a b\")" },
      { function() q:enqueue_flow("dflow_stop", { f = print }) end, "q:enqueue_flow: bad option 'input' (input.f: function cannot be encoded as JSON)" },
      { function() q:flow_run("x") end, "q:flow_run: bad argument #1 (run id (integer from 1 to 2^53) expected, got string \"x\")" },
      { function() q:flow_runs{ status = "done" } end, "q:flow_runs: bad option 'status' ('cancelled', 'error', 'ok' or 'running' expected, got string \"done\")" },
      { function() q:cancel_flow(0) end, "q:cancel_flow: bad argument #1 (run id (integer from 1 to 2^53) expected, got number 0)" },
    })
    local ok, why = q:cancel_flow(12345)
    assert.is_nil(ok)
    assert.equal("run 12345 not found", why)
    assert.is_nil(q:flow_run(12345))
  end)
end)
end

-- ===== the 1,000-step flow on worker processes that are killed

local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")
local SIGKILL, SIGTERM = 9, 15
local TIDE = H.build .. "/tide"

--- Starts `tide worker` on `store_url` in the background (its shell parent
--- waits for it and writes its exit status).
local function start_worker(dir, procs, store_url, extra)
  local w = { n = #procs + 1 }
  w.log = ("%s/worker-%d.log"):format(dir, w.n)
  w.status_file = ("%s/worker-%d.status"):format(dir, w.n)
  w.pipe = assert(io.popen(("DFLOW_DIR=%s %s worker --store '%s' --quiet --lease 1000 --poll 50 %s "
    .. "spec/fixtures/dflow_targets.lua > %s 2>&1 & echo $!; exec 2>/dev/null; wait $!; echo $? > %s")
    :format(dir, TIDE, store_url, extra or "--concurrency 4", w.log, w.status_file)))
  w.pid = tonumber(w.pipe:read("*l"))
  assert(w.pid, "no pid for worker " .. w.n)
  procs[#procs + 1] = w
  return w
end

local function reap(w)
  if w.pipe then w.pipe:close(); w.pipe = nil end
end

--- Every effect line of every process: starts[step] = { ms, ... },
--- ends[step] = { ms, ... }, bad = { lines }, items started and ended.
local function read_effects(dir)
  local starts, ends, bad, istart, iend = {}, {}, {}, {}, {}
  local p = io.popen("ls " .. dir)
  for name in p:lines() do
    if name:match("^effects%.") then
      for line in io.lines(dir .. "/" .. name) do
        local kind, what, ms, rest = line:match("^(%a) (%S+) (%d+)%s*(%S*)$")
        assert(kind, "malformed effect: " .. line)
        ms = tonumber(ms)
        local t = kind == "S" and starts or kind == "D" and ends or kind == "I" and istart or iend
        t[what] = t[what] or {}
        table.insert(t[what], ms)
        if rest == "BAD" then bad[#bad + 1] = line end
      end
    end
  end
  p:close()
  return starts, ends, bad, istart, iend
end

local function min_of(list)
  local m = math.huge
  for _, v in ipairs(list or {}) do if v < m then m = v end end
  return m
end

--- The checks of the header, on run `id` of `q`.
local function check_run(q, id, dir)
  local run = q:flow_run(id)
  assert.equal("ok", run.status, run.error)
  local def = require "dflow_big"
  -- which steps should be skipped: `when` false, and what depends on them
  local skip, order = {}, {}
  for name in pairs(def.tasks) do order[#order + 1] = name end
  table.sort(order)
  local changed = true
  while changed do
    changed = false
    for _, name in ipairs(order) do
      local t = def.tasks[name]
      local s = t.when ~= nil
      for _, d in ipairs(type(t.after) == "table" and t.after or { t.after }) do if skip[d] then s = true end end
      if s and not skip[name] then skip[name] = true; changed = true end
    end
  end
  local starts, ends, bad, istart, iend = read_effects(dir)
  assert.same({}, bad)
  local by, nskip, edges = {}, 0, 0
  for _, s in ipairs(run.steps) do by[s.name] = s end
  for _, name in ipairs(order) do
    local s = by[name]
    assert(s, "no step " .. name)
    if skip[name] then
      nskip = nskip + 1
      assert.equal("skipped", s.status, name)
    else
      assert.equal("ok", s.status, name)
      if name ~= "fan" then
        assert(ends[name], "step " .. name .. " never ran to its end")
        assert.same({ name = name }, s.result)
      end
      local t = def.tasks[name]
      for _, d in ipairs(type(t.after) == "table" and t.after or { t.after }) do
        edges = edges + 1
        local dep = by[d]
        assert(s.queued_at >= dep.completed_at, ("%s queued at %.3f before %s completed at %.3f")
          :format(name, s.queued_at, d, dep.completed_at))
        if name ~= "fan" and d ~= "fan" then
          assert(min_of(starts[name]) >= min_of(ends[d]), ("%s started at %d before %s first ended at %d")
            :format(name, min_of(starts[name]), d, min_of(ends[d])))
        end
      end
    end
  end
  local fan = by.fan.result
  assert.equal(500, #fan)
  for i = 1, 500 do
    assert.equal(i * 2, fan[i])
    assert(iend[tostring(i)], "item " .. i .. " never ran to its end")
    assert(min_of(istart[tostring(i)]) >= by.s0002.completed_at - 1, "item " .. i .. " started before s0002 ended")
  end
  assert(#(starts.flaky or {}) >= 3, "flaky did not fail twice before it succeeded")
  return nskip, edges
end

--- Drives `nworkers` worker processes through the big flow, SIGKILLing
--- one at random `kills` times (one each time `pace` more steps and items
--- finished), calling `at_half()` once half the work is done.
local function scenario(opts)
  local seed = tonumber(os.getenv("DFLOW_SEED")) or os.time()
  math.randomseed(seed)
  local dir = H.tempdir()
  os.remove(dir .. "/flaky")
  local q = tide.queue.open(opts.url)
  local procs, live = {}, {}
  local killed, t0 = 0, tide.now()
  local ok, err = pcall(function()
    H.run(function()
      local id = q:enqueue_flow("dflow_big", { seed = seed })
      for i = 1, opts.workers do live[i] = start_worker(dir, procs, opts.urls[i] or opts.url) end
      local half_done = false
      local function progress()
        return q:transaction(function(tx)
          return tx:query("SELECT (SELECT count(*) FROM tide_flow_steps WHERE run_id = ? AND status IN ('ok', 'skipped')) "
            .. "+ (SELECT count(*) FROM tide_flow_items WHERE run_id = ? AND status = 'ok') AS n", id, id)[1].n
        end)
      end
      local deadline = tide.now() + (opts.seconds or 240) * 1000
      while true do
        local okp, done = pcall(progress)
        if okp then
          if killed < opts.kills and done >= (killed + 1) * opts.pace then
            local i = math.random(#live)
            local w = live[i]
            assert(ffi.C.kill(w.pid, SIGKILL) == 0, "kill failed")
            reap(w)
            killed = killed + 1
            live[i] = start_worker(dir, procs, opts.urls[i] or opts.url)
          end
          if not half_done and opts.at_half and done >= 750 then half_done = true; opts.at_half() end
          local okr, run = pcall(q.flow_run, q, id)
          if okr and run.status ~= "running" then break end
        end
        assert(tide.now() < deadline, "the run did not finish in time (seed " .. seed .. ")")
        tide.sleep(killed < opts.kills and 10 or 100)
      end
      assert.equal(opts.kills, killed)
      local nskip, edges = check_run(q, id, dir)
      print(("# %s: %d workers, %d SIGKILLs, run ok in %.1f s; 1,000 steps (%d skipped), 500 items, %d edges "
        .. "checked (seed %d)"):format(opts.name, opts.workers, killed, (tide.now() - t0) / 1000, nskip, edges, seed))
    end)
  end)
  for _, w in ipairs(live) do ffi.C.kill(w.pid, SIGTERM) end
  for _, w in ipairs(procs) do reap(w) end
  q:close()
  if not ok then
    local logs = {}
    for _, w in ipairs(procs) do logs[#logs + 1] = ("worker %d:\n%s"):format(w.n, H.file_bytes(w.log)) end
    error(tostring(err) .. " (seed " .. seed .. ")\n" .. table.concat(logs, "\n"):sub(1, 4000), 0)
  end
  H.sh("rm -rf " .. dir)
end

-- The kill scenarios run in the plain build only: the C they reach (the
-- SQLite and libpq bindings, processes SIGKILLed, a server restarted) runs
-- under the sanitizers in crash_spec and pg_workers_spec, and ASan would
-- only slow 1,500 jobs on 3 or 4 processes past the time the test allows.
if (os.getenv("SANITIZE") or "") ~= "" then
  describe("a 1,000-step durable flow", function()
    pending("runs in the plain build only (see the comment above)")
  end)
  return
end

describe("a 1,000-step durable flow", function()
  after_each(function() H.assert_idle() end)

  it("completes on SQLite with 3 workers SIGKILLed 20 times, every edge released after its dependency", function()
    local path = os.tmpname()
    for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
    scenario{ name = "SQLite", url = "sqlite:" .. path, urls = {}, workers = 3, kills = 20, pace = 60 }
    for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
  end)

  local PG, PGDIR = os.getenv("TIDE_PG_URL"), os.getenv("TIDE_PG_DIR")
  if PG and PGDIR then
    it("completes on PostgreSQL with 4 workers (two URL forms) through SIGKILLs and a server restart", function()
      local c = require("tide.jobs.store.postgres").connect(PG)
      c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
      c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
      c:close()
      -- the same server as postgresql://...localhost...?pool=2
      local other = PG:gsub("^postgres://", "postgresql://"):gsub("@127%.0%.0%.1:", "@localhost:") .. "?pool=2"
      local restarted = false
      scenario{ name = "PostgreSQL", url = PG, urls = { [4] = other }, workers = 4, kills = 10, pace = 100,
                at_half = function()
                  local st, out = H.sh(("env -u LD_PRELOAD sh spec/pg.sh restart '%s'"):format(PGDIR))
                  assert(st == 0, out)
                  restarted = true
                end }
      assert.is_true(restarted)
    end)
  end
end)
