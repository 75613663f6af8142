-- spec/crash_spec.lua — durable jobs survive SIGKILL: none lost, reruns only where a kill fell.
--
-- 5,000 jobs go into a SQLite store up front (most due at once, 1,000
-- scheduled over the first 3 s, random priorities).  Worker processes
-- (spec/fixtures/crash_worker.lua: lease 500 ms, heartbeat 100 ms, 4 jobs
-- at a time, most taking 5-23 ms, 1% outliving the lease) work through
-- them, one or two alive at once, and one is killed with SIGKILL a random
-- 20-300 ms after the last kill; a fresh one takes its place, until 60 were
-- killed, at least 50 of them after they had opened the store and started
-- their tide.worker.  Each job appends "id pid attempt wallclock_ms" (a
-- line padded to 64 bytes) to an effects file when it does its work.  Then
-- a fresh worker drains the
-- store, and the spec checks, job by job:
--
--   * every job is completed (none lost, none discarded, none executing),
--     and the store's counts add up; work was still left when the last
--     worker was killed, so every kill fell on a worker with work to do;
--   * every job did its work at least once, the last time in the attempt
--     that completed it;
--   * a job did its work more than once only where a kill fell between its
--     effect and its completion being recorded: every effect but the last
--     comes from a pid this spec SIGKILLed, written before that kill, in an
--     attempt that the store then closed with "lease expired: worker <that
--     worker's id> stopped heartbeating", and the next effect came after;
--   * every failed attempt in the store is such a lease expiry, one per
--     extra attempt, and each was rescued after its worker was killed (a
--     lease that expired while its worker lived, or one of the final
--     worker, would show up here);
--   * no worker printed anything but its first line; a job's attempts only
--     go up; every effect names a known job and a pid of this spec.
--
-- Prints what happened: kills, jobs run more than once, extra attempts.
-- CRASH_SEED=n replays the spec's random choices (not the timing).
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

local TIDE = H.build .. "/tide"
local WORKER = "spec/fixtures/crash_worker.lua"

local JOBS, SCHEDULED, SPREAD = 5000, 1000, 3000   -- SCHEDULED of them due over SPREAD ms
local KILLS, KILLS_WORKING = 60, 50
local MAX_ROUNDS = 400

local read_file = H.file_bytes

-- ===== the worker processes

--- Starts a worker whose shell parent waits for it: closing the pipe then
--- reaps both, so a killed worker never lingers as a zombie.
local function start_worker(dir, n)
  local w = { log = ("%s/worker-%d.log"):format(dir, n) }
  w.pipe = assert(io.popen(("%s run %s %s/jobs.db %s/effects > %s 2>&1 & echo $!; exec 2>/dev/null; wait $!")
    :format(TIDE, WORKER, dir, dir, w.log)))
  w.pid = tonumber(w.pipe:read("*l"))
  assert(w.pid, "no pid for worker " .. n)
  return w
end

--- SIGKILLs a worker and waits until it is gone.  Returns { sent = ms,
--- gone = ms, pid =, id = its worker id } (wall clock) and whether it had
--- started its tide.worker (its log has the "worker pid= id=" line, written
--- before its worker could claim a job).
local function kill_worker(w)
  local sent = core.wallclock()
  local status, out = H.sh("kill -KILL " .. w.pid)
  w.pipe:close()
  local gone = core.wallclock()
  local log = read_file(w.log)
  assert(status == 0, ("worker %d was gone before its kill (%s); its output:\n%s"):format(w.pid, out, log))
  local started, id = log:match("^worker pid=(%d+) id=(%S+)\n")
  assert(started == nil or tonumber(started) == w.pid,
         ("worker log names pid %s, $! was %d"):format(tostring(started), w.pid))
  local rest = log:gsub("^worker pid=[^\n]*\n", "")
  assert(rest == "", ("worker %d printed:\n%s"):format(w.pid, rest))
  return { sent = sent, gone = gone, pid = w.pid, id = id }, started ~= nil
end

-- ===== reading what happened

--- The effects file -> { [id] = { { pid =, attempt =, at = ms }, ... in file order } }, line count.
local function read_effects(path)
  local by_id, lines = {}, 0
  for line in io.lines(path) do
    lines = lines + 1
    local id, pid, attempt, at = line:match("^(%d+) (%d+) (%d+) (%d+) *$")   -- (padded: crash_worker.lua)
    assert(#line == 63, ("effects line %d is not 64 bytes: %q"):format(lines, line))
    assert(id, ("effects line %d is malformed: %q"):format(lines, line))
    id = tonumber(id)
    local list = by_id[id]
    if not list then list = {}; by_id[id] = list end
    list[#list + 1] = { pid = tonumber(pid), attempt = tonumber(attempt), at = tonumber(at) }
  end
  return by_id, lines
end

--- A job's errors -> { [attempt] = { pid =, at = ms } }; each must be a
--- lease of a killed worker (by its worker id), rescued after the kill.
local function expiries(job, killed_id)
  local by_attempt = {}
  assert.equal(job.attempt - 1, #job.errors, "job " .. job.id .. ": failed attempts")
  for k, e in ipairs(job.errors) do
    assert.equal(k, e.attempt, "job " .. job.id .. ": attempts of its errors")
    local id = e.error:match("^lease expired: worker (%S+) stopped heartbeating$")
    assert(id, ("job %d, attempt %d failed otherwise: %s"):format(job.id, k, e.error))
    local kill = killed_id[id]
    assert(kill, ("job %d: the lease of worker %s, never killed, expired"):format(job.id, id))
    local at = e.at
    assert(at >= kill.sent, ("job %d: the lease of worker %s expired at %d, while it lived (killed at %d)")
      :format(job.id, id, at, kill.sent))
    by_attempt[k] = { pid = kill.pid, at = at }
  end
  return by_attempt
end

--- Checks a job's effects against its row; returns how many it did more than once.
local function check_effects(job, fx, expired, killed, final_pid)
  local id = job.id
  assert(fx, "job " .. id .. " completed without doing its work")
  local last = fx[#fx]
  assert.equal(job.attempt, last.attempt, "job " .. id .. ": the attempt of its last effect")
  assert(killed[last.pid] or last.pid == final_pid, ("job %d: effect by unknown pid %d"):format(id, last.pid))
  for k = 1, #fx - 1 do
    local e, kill = fx[k], killed[fx[k].pid]
    assert(kill, ("job %d did its work twice, but worker %d was not killed"):format(id, e.pid))
    assert(e.at <= kill.gone, ("job %d: effect at %d, after its worker died"):format(id, e.at))
    local x = expired[e.attempt]
    assert(x and x.pid == e.pid, ("job %d: attempt %d did its work in worker %d, whose lease did not expire")
      :format(id, e.attempt, e.pid))
    assert(fx[k + 1].attempt > e.attempt, "job " .. id .. ": attempts went down")
    assert(fx[k + 1].at >= x.at, ("job %d ran again at %d, before its lease was rescued at %d")
      :format(id, fx[k + 1].at, x.at))
  end
  return #fx - 1
end

describe("durable jobs under SIGKILL", function()
  local dir

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    H.sh_ok("mkdir -p " .. dir)
  end)

  after_each(function()
    os.execute("rm -rf " .. dir)
    H.assert_idle()
  end)

  it("loses no job and runs one twice only where a kill fell between its effect and its record", function()
    local seed = tonumber(os.getenv("CRASH_SEED")) or (os.time() * 1000 + math.floor(tide.now())) % 2^31
    math.randomseed(seed)
    local t_start = tide.now()
    local url = "sqlite:" .. dir .. "/jobs.db"

    -- 1. the jobs, all committed before any worker starts
    local q = tide.queue.open(url)
    local list = {}
    for i = 1, JOBS do
      list[i] = { target = "crash", method = "work", args = { n = i }, max_attempts = 1000,
                  priority = math.random(0, 3),
                  delay = i % (JOBS / SCHEDULED) == 0 and math.random(1, SPREAD) or nil }
    end
    local ids, inserted = q:enqueue_many(list)
    q:close()
    assert.equal(JOBS, inserted)
    local all_due_at = tide.now() + SPREAD

    -- 2. kill workers at random moments, one or two alive at once
    local killed, killed_id, kills, kills_working, rounds, started = {}, {}, 0, 0, 0, 0
    local left
    local function kill(w)
      local k, working = kill_worker(w)
      killed[w.pid] = k
      if k.id then killed_id[k.id] = k end
      kills = kills + 1
      if working then kills_working = kills_working + 1 end
    end
    local status, err = tide.run(function()
      local live = {}
      while kills < KILLS or kills_working < KILLS_WORKING do
        rounds = rounds + 1
        assert(rounds <= MAX_ROUNDS, ("after %d rounds only %d of %d kills hit a started worker")
          :format(MAX_ROUNDS, kills_working, kills))
        local want = math.random() < 0.3 and 2 or 1
        while #live < want do
          started = started + 1
          live[#live + 1] = start_worker(dir, started)
        end
        tide.sleep(math.random(20, 300))
        kill(table.remove(live, math.random(#live)))
      end
      for _, w in ipairs(live) do kill(w) end     -- the last one standing dies too
      local q2 = tide.queue.open(url)
      local st = q2:stats()
      q2:close()
      left = st.total - st.completed
      while tide.now() < all_due_at do tide.sleep(50) end   -- drain() ignores jobs not yet due
    end)
    assert.equal("ok", status, tostring(err))
    local t_killed = tide.now()
    assert.is_true(left > 0, "the workers finished every job before the kills ended")

    -- 3. a fresh worker runs the store to the end
    local dstatus, out = H.sh(("timeout 120 %s run %s %s/jobs.db %s/effects drain"):format(TIDE, WORKER, dir, dir))
    assert.equal(0, dstatus, out)
    local final_pid = tonumber(out:match("^worker pid=(%d+) "))
    assert(final_pid and not killed[final_pid], "final worker: " .. out)
    local drained = out:match("^worker pid=[^\n]*\ndrained ([^\n]*)\n$")
    assert(drained, "the final worker printed more than its report:\n" .. out)
    assert.matches("write_errors=0 ", drained)
    local t_drained = tide.now()

    -- 4. the store: every job completed, the counts add up
    q = tide.queue.open(url)
    local st = q:stats()
    assert.equal(JOBS, st.total)
    assert.equal(JOBS, st.completed)
    assert.equal(0, st.executing)
    local sum = 0
    for _, s in ipairs(require("tide.jobs.job").STATUSES) do sum = sum + st[s] end
    assert.equal(st.total, sum)

    -- 5. job by job, the store against the effects
    local effects, lines = read_effects(dir .. "/effects")
    local known = {}
    local twice, extra_effects, reclaimed, extra_attempts = 0, 0, 0, 0
    for i, id in ipairs(ids) do
      known[id] = true
      local job = q:job(id)
      assert(job, "job " .. id .. " lost")
      assert.equal("completed", job.status, "job " .. id)
      assert.equal(i, job.args.n)
      local extra = check_effects(job, effects[id], expiries(job, killed_id), killed, final_pid)
      if extra > 0 then twice, extra_effects = twice + 1, extra_effects + extra end
      if job.attempt > 1 then reclaimed, extra_attempts = reclaimed + 1, extra_attempts + job.attempt - 1 end
    end
    q:close()
    for id in pairs(effects) do assert(known[id], "effect of unknown job " .. id) end
    assert.equal(JOBS + extra_effects, lines)
    assert.is_true(kills >= KILLS and kills_working >= KILLS_WORKING)

    print(("\n# crash: %d jobs; %d workers SIGKILLed (%d after they had started; %d rounds), "
           .. "%d jobs left when the last died;\n# %d jobs did their work more than once (%d extra effects); "
           .. "%d were claimed more than once (%d extra attempts);\n# final worker: %s;\n"
           .. "# %.1f s enqueueing and killing, %.1f s draining, seed %d")
      :format(JOBS, kills, kills_working, rounds, left, twice, extra_effects, reclaimed, extra_attempts,
              drained, (t_killed - t_start) / 1000, (t_drained - t_killed) / 1000, seed))
  end)
end)
