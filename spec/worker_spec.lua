-- spec/worker_spec.lua — tide.worker: claiming, performing, retries, leases, rescue, stop.
local tide = require "tide"
local core = require "tide.core"

--- Runs fn as the root task; returns what it returns (a failed check stops the worker too).
local with_worker = spec_helper.run

--- Waits (10 s at most, else fails) until worker w runs n jobs at once.
local function until_running(w, n)
  local ok = spec_helper.wait_for(function() return w:info().running >= n end, 10000, 1)
  assert(ok, ("the %d jobs never ran at once"):format(n))
end
local q                          -- each test's queue on a fresh store (spec_helper.fresh_queue_each)

for _, store in ipairs(spec_helper.stores()) do
describe("tide.worker on " .. store.name, function()
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  it("performs due jobs with target.method(args, job) and records them completed", function()
    local seen = {}
    local targets = { orders = { fulfill = function(args, job) seen[#seen + 1] = { args.id, job.id, job.attempt } end } }
    local ids = {}
    for i = 1, 300 do ids[i] = q:enqueue{ target = "orders", method = "fulfill", args = { id = i } } end
    local st = with_worker(function()
      return tide.worker{ queue = q, concurrency = 20, targets = targets }:drain{ stop = true }
    end)
    assert.equal(300, #seen)
    assert.equal(300, st.completed)
    assert.equal(300, q:stats().completed)
    table.sort(seen, function(a, b) return a[1] < b[1] end)
    for i = 1, 300 do assert.same({ i, ids[i], 1 }, seen[i]) end
    local j = q:job(ids[1])
    assert.is_not_nil(j.completed_at)
    assert.is_nil(j.lease_owner)
  end)

  it("finds a target by require when it is not in targets", function()
    local mod = require "spec.fixtures.jobs_target"
    mod.calls = {}
    q:enqueue{ target = "spec.fixtures.jobs_target", method = "record", args = { x = 1 } }
    with_worker(function() tide.worker{ queue = q }:drain{ stop = true } end)
    assert.equal(1, #mod.calls)
    assert.same({ x = 1 }, mod.calls[1].args)
  end)

  it("runs a target's methods on threads when the target says mode = 'thread'", function()
    local out = os.tmpname()
    _G.MAIN_STATE_MARK = "main"
    for n = 1, 5 do q:enqueue{ target = "spec.fixtures.jobs_thread_target", method = "square", args = { n = n, out = out } } end
    with_worker(function() tide.worker{ queue = q }:drain{ stop = true } end)
    _G.MAIN_STATE_MARK = nil
    local f = io.open(out)
    local lines = {}
    for line in f:lines() do lines[#lines + 1] = line end
    f:close()
    os.remove(out)
    table.sort(lines)
    assert.equal(5, #lines)
    for _, line in ipairs(lines) do
      local id, sq, mark = line:match("^(%d+) (%d+) (%S+)$")
      assert.equal(q:job(tonumber(id)).args.n ^ 2, tonumber(sq))
      assert.equal("nil", mark)                 -- not the main state
    end
    assert.equal(5, q:stats().completed)
  end)

  it("starts jobs by priority, then run_at", function()
    local order = {}
    local t = { m = function(args) order[#order + 1] = args.name end }
    q:enqueue{ target = "t", method = "m", args = { name = "low" }, priority = 5 }
    q:enqueue{ target = "t", method = "m", args = { name = "old" }, run_at = "1971-01-01T00:00:00Z" }
    q:enqueue{ target = "t", method = "m", args = { name = "urgent" }, priority = -1 }
    q:enqueue{ target = "t", method = "m", args = { name = "normal" } }
    with_worker(function() tide.worker{ queue = q, concurrency = 1, targets = { t = t } }:drain{ stop = true } end)
    assert.same({ "urgent", "old", "normal", "low" }, order)
  end)

  it("keeps each queue within its concurrency, and reaches it", function()
    local running, max = { a = 0, b = 0 }, { a = 0, b = 0 }
    local t = { m = function(args)
      running[args.q] = running[args.q] + 1
      if running[args.q] > max[args.q] then max[args.q] = running[args.q] end
      tide.sleep(2)
      running[args.q] = running[args.q] - 1
    end }
    for i = 1, 60 do
      local name = i % 2 == 0 and "a" or "b"
      q:enqueue{ target = "t", method = "m", queue = name, args = { q = name } }
    end
    with_worker(function() tide.worker{ queue = q, queues = { a = 3, b = 5 }, targets = { t = t } }:drain{ stop = true } end)
    assert.same({ a = 3, b = 5 }, max)
    assert.equal(60, q:stats().completed)
  end)

  it("retries a failing job with backoff, records each error with its traceback, then discards it", function()
    local reported = {}
    local t = { methods = { m = function() error("no stock") end },
                on_error = function(ev) reported[#reported + 1] = { ev.job.attempt, ev.error } end }
    local id = q:enqueue{ target = "t", method = "m", max_attempts = 3 }
    local t0 = tide.now()
    local st = with_worker(function()
      local w = tide.worker{ queue = q, targets = { t = t }, retry = { backoff = "fixed", base = 40, jitter = false } }
      return w:drain{ stop = true, within = 1000 }
    end)
    assert.is_true(tide.now() - t0 >= 80)       -- two waits of 40 ms
    assert.equal(2, st.retried)
    assert.equal(1, st.discarded)
    local j = q:job(id)
    assert.equal("discarded", j.status)
    assert.equal(3, j.attempt)
    assert.equal(3, #j.errors)
    for i, e in ipairs(j.errors) do
      assert.equal(i, e.attempt)
      assert.truthy(e.error:find("no stock", 1, true))
      assert.truthy(e.traceback:find("stack traceback", 1, true))
    end
    assert.equal(3, #reported)
    assert.equal(3, reported[3][1])
  end)

  it("succeeds on a later attempt after failures", function()
    local t = { m = function(_, job) if job.attempt < 3 then error("flaky") end end }
    local id = q:enqueue{ target = "t", method = "m" }
    with_worker(function() tide.worker{ queue = q, targets = { t = t }, retry = { base = 1 } }:drain{ stop = true, within = 100 } end)
    local j = q:job(id)
    assert.equal("completed", j.status)
    assert.equal(3, j.attempt)
    assert.equal(2, #j.errors)
  end)

  it("times an attempt out with the target's timeout", function()
    local t = { timeout = 20, m = function() tide.sleep(5000) end }
    local id = q:enqueue{ target = "t", method = "m", max_attempts = 1 }
    with_worker(function() tide.worker{ queue = q, targets = { t = t } }:drain{ stop = true } end)
    local j = q:job(id)
    assert.equal("discarded", j.status)
    assert.truthy(j.errors[1].error:find("timed out after 20 ms", 1, true), j.errors[1].error)
  end)

  it("fails the attempt, not the worker, for an unknown target or method, bad args or a corrupt row", function()
    local done = 0
    local t = { m = function() done = done + 1 end }
    local a = q:enqueue{ target = "no_such_target", method = "m", max_attempts = 1 }
    local b = q:enqueue{ target = "t", method = "nope", max_attempts = 1 }
    local c = q:enqueue{ target = "t", method = "timeout", max_attempts = 1 }     -- an option, not a method
    local d = q:enqueue{ target = "t", method = "m", max_attempts = 1 }
    local e = q:enqueue{ target = "t", method = "m" }
    for _ = 1, 3 do q:enqueue{ target = "t", method = "m" } end
    local typed = store.name ~= "sqlite"        -- PostgreSQL's column types refuse such a row
    q:transaction(function(tx)
      tx:exec("UPDATE tide_jobs SET args = '{not json' WHERE id = ?", d)
      if not typed then tx:exec("UPDATE tide_jobs SET max_attempts = 'lots' WHERE id = ?", e) end
    end)
    with_worker(function() tide.worker{ queue = q, targets = { t = t } }:drain{ stop = true } end)
    assert.equal(typed and 4 or 3, done)
    local function err(id) return q:job(id).errors[1].error end
    assert.equal("discarded", q:job(a).status)
    assert.truthy(err(a):find("unknown target 'no_such_target' (not in targets, and require failed: module 'no_such_target' not found)", 1, true), err(a))
    assert.equal("unknown method 'nope' of target 't'", err(b))
    assert.equal("unknown method 'timeout' of target 't'", err(c))
    assert.truthy(err(d):find(("job %d: args are not valid JSON"):format(d), 1, true), err(d))
    if not typed then
      assert.equal("discarded", q:job(e).status)
      assert.equal('corrupt job row: max_attempts is string "lots", integer >= 1 expected', err(e))
      assert.equal(1, spec_helper.reported)     -- reported to the error sink, once
    end
    assert.equal(typed and 4 or 3, q:stats().completed)
  end)

  it("wakes at once for a job enqueued in the same process, long before the next poll", function()
    local started
    local t = { m = function() started = tide.now() end }
    local enqueued
    with_worker(function()
      local w = tide.worker{ queue = q, poll = 10000, targets = { t = t } }
      tide.sleep(20)
      enqueued = tide.now()
      q:enqueue{ target = "t", method = "m" }
      while not started and tide.now() - enqueued < 5000 do tide.sleep(5) end
      w:stop()
      w:wait()
    end)
    assert.is_not_nil(started)
    -- (a tenth of the poll interval: a generous margin for a loaded machine)
    assert.is_true(started - enqueued < 1000, "started after " .. tostring(started - enqueued) .. " ms")
  end)

  it("wakes for a job committed by a transaction, and not before the commit", function()
    local started, committed
    local t = { m = function() started = tide.now() end }
    with_worker(function()
      local w = tide.worker{ queue = q, poll = 10000, targets = { t = t } }
      q:transaction(function(tx)
        tx:enqueue{ target = "t", method = "m" }
        tide.sleep(30)
        assert.is_nil(started)
        committed = tide.now()
      end)
      while not started and tide.now() - committed < 5000 do tide.sleep(5) end
      w:stop()
      w:wait()
    end)
    -- (well before the 10 s poll: a generous margin for a loaded machine)
    assert.is_true(started >= committed and started - committed < 1000,
                   ("started %s ms after the commit"):format(tostring(started and started - committed)))
  end)

  it("drains only what is due now, unless asked to wait for jobs due soon", function()
    local id = q:enqueue{ target = "t", method = "m", delay = 400 }
    local t = { m = function() end }
    with_worker(function() tide.worker{ queue = q, targets = { t = t } }:drain{ stop = true } end)
    assert.equal("scheduled", q:job(id).status)
    with_worker(function() tide.worker{ queue = q, poll = 10, targets = { t = t } }:drain{ stop = true, within = 1000 } end)
    assert.equal("completed", q:job(id).status)
  end)

  it("runs a scheduled job when it is due", function()
    local ran_at
    local t = { m = function() ran_at = core.wallclock() end }
    local id = q:enqueue{ target = "t", method = "m", delay = 300 }
    local due = q:job(id).run_at
    with_worker(function()
      local w = tide.worker{ queue = q, poll = 20, targets = { t = t } }
      while core.wallclock() < due - 50 do tide.sleep(10) end
      assert.is_nil(ran_at)                      -- not before it is due (timed from the enqueue)
      while not ran_at and core.wallclock() < due + 2000 do tide.sleep(10) end
      w:stop()
      w:wait()
    end)
    assert.is_not_nil(ran_at)
    assert.is_true(ran_at >= q:job(id).run_at)
  end)

  it("cancels a running job's task when the job is cancelled in the store", function()
    local finished = false
    local t = { m = function() tide.sleep(2000); finished = true end }
    local id = q:enqueue{ target = "t", method = "m" }
    local st = with_worker(function()
      local w = tide.worker{ queue = q, heartbeat = 20, targets = { t = t } }
      while w:info().running < 1 do tide.sleep(1) end
      assert.is_true(q:cancel(id))
      -- a heartbeat (every 20 ms) finds it cancelled, long before its 2 s end
      local t0 = tide.now()
      while w:info().running > 0 and tide.now() - t0 < 1500 do tide.sleep(10) end
      assert.equal(0, w:info().running)
      w:stop()
      return w:wait()
    end)
    assert.is_false(finished)
    assert.equal(1, st.cancelled)
    assert.equal("cancelled", q:job(id).status)
  end)

  it("rescues a job whose lease expired (its worker died) and runs it again", function()
    local runs = 0
    local t = { m = function() runs = runs + 1 end }
    local id = q:enqueue{ target = "t", method = "m" }
    -- Another worker claimed it and died: executing, its lease run out.
    q:transaction(function(tx)
      tx:exec("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'ghost:1:000000', "
              .. "lease_expires = ? WHERE id = ?", core.wallclock() - 1, id)
    end)
    local st = with_worker(function() return tide.worker{ queue = q, targets = { t = t } }:drain{ stop = true } end)
    assert.equal(1, runs)
    assert.equal(1, st.rescued)
    local j = q:job(id)
    assert.equal("completed", j.status)
    assert.equal(2, j.attempt)
    assert.equal("lease expired: worker ghost:1:000000 stopped heartbeating", j.errors[1].error)
  end)

  it("leaves a job leased by a live worker alone, extending the lease while it runs", function()
    -- (a lease of 600 ms beats every 200: a loaded machine delays a beat by
    -- tens of ms, and a 60 ms lease then ran out under a live worker)
    local t = { m = function() tide.sleep(1500) end }
    local id = q:enqueue{ target = "t", method = "m" }
    with_worker(function()
      local w = tide.worker{ queue = q, lease = 600, heartbeat = 200, rescue_every = 100, targets = { t = t } }
      tide.sleep(1200)                          -- two leases long: only heartbeats keep it
      assert.equal("executing", q:job(id).status)
      assert.equal(0, w:info().rescued)
      w:drain{ stop = true }
    end)
    local j = q:job(id)
    assert.equal("completed", j.status)
    assert.equal(1, j.attempt)
    assert.same({}, j.errors)
  end)

  it("stops gracefully: running jobs get the grace period, then are released, not counted", function()
    -- The quick job ends only once the stop is under way: a quick job that
    -- ended before this task saw both running (a loaded machine delays a
    -- 1 ms sleep past 20 ms) left it waiting for ever.
    local stopping = false
    local t = { quick = function() while not stopping do tide.sleep(1) end; tide.sleep(5) end,
                slow = function() tide.sleep(5000) end }
    local quick = q:enqueue{ target = "t", method = "quick" }
    local slow = q:enqueue{ target = "t", method = "slow" }
    local st = with_worker(function()
      local w = tide.worker{ queue = q, targets = { t = t } }
      until_running(w, 2)
      stopping = true
      w:stop(1000)
      return w:wait()
    end)
    assert.equal(1, st.completed)
    assert.equal(1, st.released)
    assert.equal("completed", q:job(quick).status)
    local j = q:job(slow)
    assert.equal("available", j.status)
    assert.equal(0, j.attempt)
    assert.is_nil(j.lease_owner)
    assert.equal("interrupted: worker stopped", j.errors[1].error)
  end)

  it("releases claimed jobs on a shutdown of the loop, and records the ones that finish in the grace", function()
    local stopping = false                      -- (the quick ones end once all four ran: see above)
    local t = { quick = function() while not stopping do tide.sleep(1) end; tide.sleep(5) end,
                slow = function() tide.sleep(5000) end }
    for _ = 1, 3 do q:enqueue{ target = "t", method = "quick" } end
    local slow = q:enqueue{ target = "t", method = "slow" }
    spec_helper.run(function()
      local w = tide.worker{ queue = q, targets = { t = t } }
      until_running(w, 4)
      stopping = true
      tide.shutdown(1000)                       -- the quick ones finish; the slow one is released
    end)
    local st = q:stats()
    assert.equal(3, st.completed)
    assert.equal(1, st.available)
    assert.equal(0, st.executing)
    assert.equal(0, q:job(slow).attempt)
  end)

  it("uses the retry policy of a target it found by require", function()
    local id = q:enqueue{ target = "spec.fixtures.jobs_retry_target", method = "flaky" }
    with_worker(function() tide.worker{ queue = q, poll = 10 }:drain{ stop = true, within = 5000 } end)
    local j = q:job(id)
    assert.same({ "completed", 3 }, { j.status, j.attempt })
    -- the delay the worker chose after attempt 2 (its failure's time and
    -- the run_at it wrote come from the same clock reading, whatever the
    -- machine's load): the target's 5 ms, where the default waits 500 and more
    local delay = j.run_at - j.errors[2].at
    assert.is_true(delay >= 5 and delay < 50, ("attempt 3 was due %d ms after attempt 2 failed"):format(delay))
  end)

  -- JSON null and [] in a job's args reached a thread or process method as
  -- plain empty tables: it could not tell null from {}, and handed on, an
  -- empty array became an object.
  it("hands a thread or process method JSON null as tide's null and [] as an array", function()
    local seen = {}
    for _, mode in ipairs{ "thread", "process" } do
      local out = os.tmpname()
      local target = { mode = mode, methods = { look = function(args)
        local tide_here = require "tide"
        local f = assert(io.open(args.out, "w"))
        f:write(tostring(args.a), " ", tostring(rawequal(args.a, tide_here.null)), " ",
                tostring(rawequal(args.list[2], tide_here.null)), " ",
                tostring(getmetatable(args.empty) ~= nil and next(args.empty) == nil))
        f:close()
      end } }
      q:enqueue{ target = "t", method = "look", max_attempts = 1,
                 args = tide.json.decode(('{"a": null, "list": [1, null], "empty": [], "out": %q}'):format(out)) }
      local st = with_worker(function() return tide.worker{ queue = q, targets = { t = target } }:drain{ stop = true } end)
      assert.equal(1, st.completed)
      local f = assert(io.open(out))
      seen[mode] = f:read("*a")
      f:close()
      os.remove(out)
    end
    assert.same({ thread = "null true true true", process = "null true true true" }, seen)
  end)

  it("runs an inline thread-mode target's methods on threads, and refuses one with upvalues at start", function()
    local out = os.tmpname()
    local cpu = { mode = "thread", methods = { square = function(args, job)
      local f = assert(io.open(args.out, "a"))
      f:write(("%d %d %s\n"):format(job.id, args.n * args.n, tostring(rawget(_G, "MAIN_STATE_MARK"))))
      f:close()
    end } }
    _G.MAIN_STATE_MARK = "main"
    for n = 1, 3 do q:enqueue{ target = "cpu", method = "square", args = { n = n, out = out }, max_attempts = 1 } end
    local st = with_worker(function() return tide.worker{ queue = q, targets = { cpu = cpu } }:drain{ stop = true } end)
    _G.MAIN_STATE_MARK = nil
    local lines = {}
    for line in io.lines(out) do lines[#lines + 1] = line:match("^%d+ (%d+ %S+)$") end
    os.remove(out)
    table.sort(lines)
    assert.same({ "1 nil", "4 nil", "9 nil" }, lines)
    assert.equal(3, st.completed)
    local helper = function() end
    spec_helper.error_cases("spec/worker_spec.lua", {
      { function() tide.worker{ queue = q, targets = { cpu = { mode = "thread", methods = { m = function() return helper() end } } } } end,
        "tide.worker: targets.cpu.m: a thread-mode method crosses to a thread as bytecode, so it cannot have upvalues "
        .. "(it has 'helper'); make it self-contained, or put the target in a module" },
    })
  end)

  if store.name == "postgres" then
    it("runs jobs that do their own q:transaction side by side, one connection each from the pool", function()
      q:transaction(function(tx) tx:exec("CREATE TABLE IF NOT EXISTS own_effects (job bigint PRIMARY KEY)") end)
      local open, peak = 0, 0                 -- transactions open at once, inside their connections
      local t = { m = function(_, job)
        q:transaction(function(tx)
          open = open + 1
          peak = math.max(peak, open)
          tx:exec("INSERT INTO own_effects (job) VALUES (?)", job.id)
          tx:exec("SELECT pg_sleep(0.05)")        -- 50 ms inside the transaction
          open = open - 1
        end)
      end }
      for _ = 1, 40 do q:enqueue{ target = "t", method = "m" } end
      local st = with_worker(function() return tide.worker{ queue = q, concurrency = 20, targets = { t = t } }:drain{ stop = true } end)
      local n = q:transaction(function(tx) return tx:query("SELECT count(*) AS n FROM own_effects")[1].n end)
      q:transaction(function(tx) tx:exec("DROP TABLE own_effects") end)
      assert.same({ 40, 40 }, { st.completed, n })
      -- on one connection they would run one after the other (peak 1); the
      -- pool has 10, and 20 jobs run at once
      assert.is_true(peak >= 5, ("at most %d of 20 concurrent jobs were inside their transactions at once"):format(peak))
    end)

    it("gathers the outcomes of jobs that end one at a time into few commits, each job's once, also at a stop", function()
      local seed = os.time()
      math.randomseed(seed)
      local own = tide.queue.open(os.getenv("TIDE_PG_URL"), { pool = 1 })   -- the jobs queue on one connection
      own:transaction(function(tx)
        tx:exec("DROP TABLE IF EXISTS gathered_effects")
        tx:exec("CREATE TABLE gathered_effects (job bigint PRIMARY KEY)")
      end)
      local t = { m = function(_, job)
        own:transaction(function(tx)
          tx:exec("INSERT INTO gathered_effects (job) VALUES (?)", job.id)
          tx:exec("SELECT pg_sleep(0.003)")       -- ~3 ms each, one after the other
          if math.random() < 0.3 then tide.sleep(math.random(0, 3)) end
        end)
      end }
      local function run(n, stop_after)
        local heard, writes, written = {}, 0, 0
        for _ = 1, n do q:enqueue{ target = "t", method = "m" } end
        local st = with_worker(function()
          local w = tide.worker{ queue = q, concurrency = 20, targets = { t = t },
                                 on_outcome = function(ev) heard[#heard + 1] = ev end }
          w.on_written = function(entries) writes, written = writes + 1, written + #entries end
          if not stop_after then return w:drain{ stop = true } end
          while #heard < stop_after do tide.sleep(1) end
          w:stop(0)                           -- jobs gathered or running now: written, or released
          return w:wait()
        end)
        return st, heard, writes, written
      end
      -- (a window long against a job's ~4 ms, so that one write per job, or
      -- per two, as without gathering on a loaded machine, cannot pass)
      local outcomes = require "tide.jobs.outcomes"
      local window = outcomes.GATHER_MS
      outcomes.GATHER_MS = 100
      local ok, st, heard, writes, written = pcall(run, 60)
      outcomes.GATHER_MS = window
      assert(ok, st)
      assert.same({ 60, 60, 60 }, { st.completed, #heard, written }, "seed " .. seed)
      assert.is_true(writes <= 12, ("%d writes for 60 jobs that ended one at a time (seed %d)"):format(writes, seed))
      st, heard = run(60, 10)
      local by_id, counts = {}, {}
      for _, ev in ipairs(heard) do
        assert.is_nil(by_id[ev.job.id], "job " .. ev.job.id .. " heard twice (seed " .. seed .. ")")
        by_id[ev.job.id] = ev.outcome
        counts[ev.outcome] = (counts[ev.outcome] or 0) + 1
      end
      for id, outcome in pairs(by_id) do        -- the store says what each job's outcome said
        local status = q:job(id).status
        assert.equal(outcome == "completed" and "completed" or "available", status, ("job %d (seed %d)"):format(id, seed))
      end
      assert.same({ st.completed, st.released }, { counts.completed or 0, counts.released or 0 }, "seed " .. seed)
      assert.is_true((counts.completed or 0) >= 10, "seed " .. seed)
      local left = q:stats()
      assert.equal(120, left.total)
      assert.equal(0, left.executing or 0, "seed " .. seed)   -- nothing left leased: every claimed job settled
      own:transaction(function(tx) tx:exec("DROP TABLE gathered_effects") end)
      own:close()
    end)

    it("gathers the slots of jobs that end one at a time into few claims; an idle worker claims at once", function()
      local own = tide.queue.open(os.getenv("TIDE_PG_URL"), { pool = 1 })   -- the jobs queue on one connection
      local t = { m = function()
        own:transaction(function(tx) tx:exec("SELECT pg_sleep(0.003)") end)   -- ~4 ms each, one after the other
      end, first = function() end }
      local claimer = require "tide.jobs.claimer"
      local window = claimer.GATHER_MS
      claimer.GATHER_MS = 200        -- long against a job's ~4 ms: one claim per job, or per two, cannot pass
      local box = {}
      local ok, err = pcall(with_worker, function()
        local w = tide.worker{ queue = q, concurrency = 20, targets = { t = t } }
        local session = w.claim_store:acquire("spec")          -- to count the claims
        local Session = getmetatable(session).__index
        w.claim_store:release(session)
        local claim, claims = Session.claim, 0
        Session.claim = function(...) claims = claims + 1; return claim(...) end
        local ok2, err2 = pcall(function()
          for _ = 1, 80 do q:enqueue{ target = "t", method = "m" } end
          local before = claims
          while q:stats().completed ~= 80 do tide.sleep(5) end
          box.backlog = claims - before
          -- idle now: a job enqueued is claimed without waiting out the window
          tide.sleep(50)
          local at = tide.now()
          q:enqueue{ target = "t", method = "first" }
          while q:stats().completed ~= 81 do tide.sleep(1) end
          box.idle_ms = tide.now() - at
        end)
        Session.claim = claim
        w:stop()
        w:wait()
        assert(ok2, err2)
      end)
      claimer.GATHER_MS = window
      own:close()
      assert(ok, err)
      -- one claim a freed slot would be 61 claims (20, then 60 one by one)
      assert.is_true(box.backlog <= 20, ("%d claims for 80 jobs that ended one at a time"):format(box.backlog))
      assert.is_true(box.idle_ms < 150, ("an idle worker took %.0f ms to claim and run a job"):format(box.idle_ms))
    end)

    it("claims on a connection of its own whose commits skip the WAL flush; outcomes and leases keep it", function()
      local function sync_of(store)
        local session = store:acquire("spec")
        local ok, v = pcall(function() return session.c:query("SHOW synchronous_commit").rows[1].synchronous_commit end)
        store:release(session, not ok)
        assert(ok, v)
        return v
      end
      local seen
      with_worker(function()
        local w = tide.worker{ queue = q, concurrency = 2, targets = { t = { m = function() end } } }
        seen = { claims = sync_of(w.claim_store), outcomes = sync_of(w.store), leases = sync_of(w.lease_store),
                 queue = sync_of(q._store) }
        -- the claimer's connection claims: a job enqueued now is claimed through it
        q:enqueue{ target = "t", method = "m" }
        w:drain{ stop = true }
        seen.distinct = w.claim_store ~= w.store and w.claim_store ~= w.lease_store
      end)
      assert.same({ claims = "off", outcomes = "on", leases = "on", queue = "on", distinct = true }, seen)
      assert.equal(1, q:stats().completed)
    end)

    -- Each connection is a server backend (~30 ms of the server's CPU to
    -- start here): a worker takes the one the queue's opening used, when
    -- nothing used it since, rather than opening one more.
    it("adopts the idle connection the queue's opening used, never one a caller's SQL ran on", function()
      local function app_name(store)
        local session = store:acquire("spec")
        local ok, v = pcall(function() return session.c:query("SHOW application_name").rows[1].application_name end)
        store:release(session, not ok)
        assert(ok, v)
        return v
      end
      local function backends()
        local c = require("tide.jobs.store.postgres").connect(os.getenv("TIDE_PG_URL"))
        local n = c:query("SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend' "
          .. "AND pid <> pg_backend_pid() AND datname = current_database()").rows[1].n
        c:close()
        return n
      end
      local seen = {}
      for round, dirty in ipairs{ false, true } do
        q:close()
        q = tide.queue.open(os.getenv("TIDE_PG_URL"))
        if dirty then       -- a caller's SET stays with the connection: not one for the worker's writes
          q:transaction(function(tx) tx:exec("SET application_name = 'the caller''s'") end)
        end
        local before = backends()
        with_worker(function()
          local w = tide.worker{ queue = q, concurrency = 2, targets = { t = { m = function() end } } }
          w:drain{ stop = false }                 -- (nothing to do: it claims, rescues and listens)
          -- (q:stats() would run a statement: on a connection the pool opens)
          seen[round] = { more = backends() - before, pool = q._store:stats_pool(),
                          outcomes = app_name(w.store) == "the caller's", leases_on_outcomes = w.lease_store == w.store }
          w:stop()
          w:wait()
        end)
      end
      -- clean: the worker's store took the connection (the pool has none
      -- open), and the worker added its claims' connection and its LISTEN
      assert.same({ pool = { size = 10, open = 0, busy = 0, waiting = 0 }, outcomes = false,
                    leases_on_outcomes = true, more = 2 }, seen[1])
      -- used by a caller: left in the pool, the worker opened its own
      assert.same({ pool = { size = 10, open = 1, busy = 0, waiting = 0 }, outcomes = false,
                    leases_on_outcomes = true, more = 3 }, seen[2])
      -- the queue's pool opens another when a caller needs one; a worker works on
      q:close()
      q = tide.queue.open(os.getenv("TIDE_PG_URL"))
      local done = 0
      with_worker(function()
        local w = tide.worker{ queue = q, concurrency = 2, targets = { t = { m = function() done = done + 1 end } } }
        for _ = 1, 3 do q:enqueue{ target = "t", method = "m" } end
        assert.equal(1, q:transaction(function(tx) return tx:query("SELECT 1 AS one")[1].one end))
        w:drain{ stop = true }
      end)
      assert.equal(3, done)
      assert.equal(3, q:stats().completed)
    end)
  end

  describe("tells the truth about what the store took", function()
    --- Runs a worker until it drains, or (with `outcomes`) until it has
    --- settled that many attempts; returns its stats and what on_outcome heard.
    local function run_worker(targets, opts, outcomes)
      local seen = {}
      opts = opts or {}
      opts.queue, opts.targets = q, targets
      opts.on_outcome = function(ev) seen[#seen + 1] = ev.job.id .. " " .. ev.outcome end
      local st = with_worker(function()
        local w = tide.worker(opts)
        if not outcomes then return w:drain{ stop = true } end
        while #seen < outcomes do tide.sleep(5) end
        w:stop()
        return w:wait()
      end)
      return st, seen
    end

    it("counts an attempt whose lease passed to another worker as lost, not as retried", function()
      local id = q:enqueue{ target = "t", method = "m", max_attempts = 3 }
      local t = { m = function(_, job)
        q:transaction(function(tx)               -- another worker took the job over meanwhile
          tx:exec("UPDATE tide_jobs SET lease_owner = 'other:1:0', attempt = attempt + 1, lease_expires = ? WHERE id = ?",
                  math.floor(require("tide.core").wallclock()) + 60000, job.id)
        end)
        error("too late")
      end }
      local st, seen = run_worker({ t = t }, { heartbeat = 60000 }, 1)
      assert.same({ 0, 1, 0 }, { st.retried, st.lost, st.completed })
      assert.same({ id .. " lost" }, seen)
      local j = q:job(id)
      assert.same({ "executing", "other:1:0", 0 }, { j.status, j.lease_owner, #j.errors })
    end)

    it("counts a job cancelled in the store while its code ran without waiting as cancelled, not completed", function()
      local id = q:enqueue{ target = "t", method = "m" }
      local t = { m = function(_, job) q:cancel(job.id) end }   -- then returns, without a wait (no heartbeat)
      local st, seen = run_worker({ t = t })
      assert.same({ 0, 1 }, { st.completed, st.cancelled })
      assert.same({ id .. " cancelled" }, seen)
      assert.equal("cancelled", q:job(id).status)
    end)

    it("counts only the outcomes written when the store fails, and a draining worker gives up", function()
      for _ = 1, 20 do q:enqueue{ target = "t", method = "m" } end
      local fail_after = 10
      if store.name == "sqlite" then
        q:transaction(function(tx)
          tx:exec(("CREATE TRIGGER disk_full BEFORE UPDATE OF status ON tide_jobs WHEN NEW.status = 'completed' "
                   .. "AND OLD.id > %d BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"):format(fail_after))
        end)
      else
        q:transaction(function(tx)
          tx:exec("CREATE OR REPLACE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  .. "RAISE EXCEPTION 'could not extend file: No space left on device'; END $$")
          tx:exec(("CREATE TRIGGER disk_full BEFORE UPDATE OF status ON tide_jobs FOR EACH ROW WHEN (NEW.status = 'completed' "
                   .. "AND OLD.id > %d) EXECUTE FUNCTION disk_full()"):format(fail_after))
        end)
      end
      local t = { m = function(_, job) if job.id > fail_after then tide.sleep(50) end end }
      local t0 = tide.now()
      local st = run_worker({ t = t }, { give_up = 300 })
      local took = tide.now() - t0
      local counts = q:stats()
      assert.equal(counts.completed, st.completed)
      assert.equal(counts.executing, st.unwritten)
      assert.same({ 10, 10 }, { st.completed, st.unwritten })
      assert.matches("^the store kept failing: write failed for %d+ ms without a success", st.gave_up)
      assert.is_true(took < 5000, "it took " .. took .. " ms to give up")
      assert.is_true(st.write_errors <= 12, st.write_errors .. " failed writes: no backoff?")
    end)
  end)

  it("checks its options", function()
    spec_helper.error_cases("spec/worker_spec.lua", {
      { function() tide.worker() end, "tide.worker: bad argument #1 (table expected, got nil)" },
      { function() tide.worker{ queue = {} } end, "tide.worker: bad option 'queue' (queue (from tide.queue.open) expected, got table)" },
      { function() tide.worker{ queue = q, workers = 3 } end, "tide.worker: unknown option 'workers'" },
      { function() tide.worker{ queue = q, queues = { default = 0 } } end, "tide.worker: bad option 'queues.default' (integer >= 1 expected, got number 0)" },
      { function() tide.worker{ queue = q, queues = { a = 1 }, concurrency = 2 } end, "tide.worker: give queues or concurrency, not both" },
      { function() tide.worker{ queue = q, lease = -1 } end, "tide.worker: bad option 'lease' (positive number of ms expected, got number -1)" },
      { function() tide.worker{ queue = q, lease = 1e300 } end, "tide.worker: bad option 'lease' (positive number of ms up to 1e12 (a lease's end must be a time every store holds) expected, got number 1e+300)" },
      { function() tide.worker{ queue = q, targets = { t = { timeout = "1s", methods = {} } } } end,
        "tide.worker: bad option 'targets.t.timeout' (positive number of ms expected, got string \"1s\")" },
      { function() tide.worker{ queue = q, targets = { t = { mode = "fork", methods = {} } } } end,
        "tide.worker: bad option 'mode' ('coroutine', 'thread' or 'process' expected, got string \"fork\")" },
      { function() tide.worker{ queue = q, retry = { attempts = 3 } } end,
        "tide.worker: retry.attempts is not used here (each job's own max_attempts, given at enqueue, counts its attempts)" },
      { function() tide.worker{ queue = q, retry = { max_attempts = 3 } } end,
        "tide.worker: retry.max_attempts is not used here (each job's own max_attempts, given at enqueue, counts its attempts)" },
      { function() tide.worker{ queue = q, retry = { base = -5 } } end,
        "tide.worker: bad option 'retry.base' (non-negative number of ms expected, got number -5)" },
    })
  end)
end)
end
