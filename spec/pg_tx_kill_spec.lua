-- spec/pg_tx_kill_spec.lua — three `tide worker` processes whose jobs record their effect through
-- q:transaction, SIGKILLed 15 times on a PostgreSQL server with fsync on, then drained.
--
-- A server of its own (spec/pg.sh, PostgreSQL's default durability: fsync
-- and synchronous_commit on), 3,000 jobs of spec/pg/tx_targets.lua: each
-- inserts its effect row in a transaction of its own from the job, taken
-- from the worker's pool (issue 16: transactions from concurrent jobs must
-- never mix).  Three workers (lease 500 ms, 8 jobs at a time) run while 15
-- of them, each picked at random among the live ones that hold executing
-- jobs, are SIGKILLed after every 150 jobs or so and replaced; then one
-- `tide worker --drain` finishes.  The spec checks, job by job:
--
--   * every job is completed, and has its effect;
--   * the last effect of a job is from the attempt that completed it;
--   * a job has two effects only where a kill fell between its effect's
--     commit and its completion's record: every effect but the last comes
--     from a worker this spec killed;
--   * no worker printed anything (no failed statement: a mixed-up
--     transaction shows as one).
--
-- It prints how many jobs recorded their effect twice.  Long and
-- multi-process: skipped by `make sanitize` (ASan sees nothing here that
-- the shorter specs do not exercise).  PGTX_SEED=n replays the choices.
local tide = require "tide"
local H = spec_helper

local TIDE = H.build .. "/tide"
local TARGETS = "spec/pg/tx_targets.lua"
local JOBS, WORKERS, KILLS, STEP = 3000, 3, 15, 150

if not os.getenv("TIDE_PG_URL") or (os.getenv("SANITIZE") or "") ~= "" then
  describe("tide worker processes killed while their jobs commit effects", function()
    pending("needs spec/run.sh's PostgreSQL (and is skipped by make sanitize)")
  end)
  return
end

local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")

local function sh_ok(cmd)
  local status, out = H.sh(cmd)
  assert(status == 0, cmd .. " failed: " .. out)
  return out
end

describe("tide worker processes killed while their jobs commit effects", function()
  local dir, cluster, url, procs

  setup(function()
    dir = H.tempdir()
    sh_ok("chmod 755 " .. dir)
    cluster = dir .. "/cluster"
    local port = 26000 + math.floor(tide.now()) % 3000   -- (below the kernel's local ports: spec/run.sh)
    url = sh_ok(("env -u LD_PRELOAD sh spec/pg.sh start %s %d -c max_connections=100"):format(cluster, port)):match("^(%S+)")
  end)

  teardown(function()
    for _, w in ipairs(procs or {}) do
      if w.pipe then ffi.C.kill(w.pid, 9); w.pipe:close() end
    end
    os.execute(("env -u LD_PRELOAD sh spec/pg.sh stop %s >/dev/null 2>&1; rm -rf %s"):format(cluster, dir))
  end)

  local function start_worker(options)
    local w = { n = #procs + 1 }
    w.log = ("%s/worker-%d.log"):format(dir, w.n)
    w.pipe = assert(io.popen(("%s worker --store %s --quiet %s %s %s > %s 2>&1 & echo $!; exec 2>/dev/null; wait $!")
      :format(TIDE, url, options, TARGETS, url, w.log)))
    w.pid = tonumber(w.pipe:read("*l"))
    procs[#procs + 1] = w
    return w
  end

  it("lose no job and no effect under 15 SIGKILLs; effects twice only where a kill fell after one", function()
    local seed = tonumber(os.getenv("PGTX_SEED")) or (os.time() * 1000 + math.floor(tide.now())) % 2 ^ 31
    math.randomseed(seed)
    procs = {}
    local q = tide.queue.open(url)
    q:transaction(function(tx)
      tx:exec("CREATE TABLE effects (job_id bigint NOT NULL, attempt integer NOT NULL, pid integer NOT NULL, at bigint NOT NULL)")
    end)
    local list = {}
    for i = 1, JOBS do list[i] = { target = "txw", method = "work", max_attempts = 1000 } end
    local ids = q:enqueue_many(list)
    local admin = require("tide.jobs.store.postgres").connect(url)
    local killed, kills, t0 = {}, 0, tide.now()
    local status, err = tide.run(function()
      local live = {}
      local options = "--lease 500 --poll 100 --concurrency 8"
      for i = 1, WORKERS do live[i] = start_worker(options) end
      while kills < KILLS do
        local threshold = (kills + 1) * STEP - math.random(0, STEP / 2)
        local victim, deadline = nil, tide.now() + 60000
        while not victim do
          local rows = admin:query("SELECT lease_owner, count(*) AS n FROM tide_jobs WHERE status = 'executing' "
                                   .. "GROUP BY lease_owner").rows
          local busy = {}
          for _, r in ipairs(rows) do busy[tonumber(r.lease_owner:match("^[^:]*:(%d+):"))] = true end
          local done = admin:query("SELECT count(*) AS n FROM tide_jobs WHERE status = 'completed'").rows[1].n
          if done >= threshold then
            local candidates = {}
            for i, w in ipairs(live) do if busy[w.pid] then candidates[#candidates + 1] = i end end
            if #candidates > 0 then victim = table.remove(live, candidates[math.random(#candidates)]) end
          end
          if not victim then
            assert(done < JOBS, ("the workers did every job before kill %d"):format(kills + 1))
            assert(tide.now() < deadline, "no busy worker for 60 s")
            tide.sleep(5)
          end
        end
        assert(ffi.C.kill(victim.pid, 9) == 0)
        victim.pipe:close()
        victim.pipe = nil
        killed[victim.pid] = true
        kills = kills + 1
        live[#live + 1] = start_worker(options)
      end
      for _, w in ipairs(live) do ffi.C.kill(w.pid, 15) end
      for _, w in ipairs(live) do w.pipe:close(); w.pipe = nil end
      local drain = start_worker("--drain --lease 500 --poll 100 --concurrency 8")
      drain.pipe:close()
      drain.pipe = nil
    end)
    assert(status == "ok", ("seed %d: %s"):format(seed, tostring(err)))
    local took = tide.now() - t0
    for _, w in ipairs(procs) do
      local out = H.file_bytes(w.log)
      assert(out == "", ("worker %d (pid %d) printed:\n%s"):format(w.n, w.pid, out))
    end
    local st = q:stats()
    assert.same({ JOBS, JOBS }, { st.total, st.completed })
    local jobs = {}
    for _, j in ipairs(q:list{ limit = JOBS + 1 }) do jobs[j.id] = j end
    local effects = {}
    for _, e in ipairs(admin:query("SELECT job_id, attempt, pid FROM effects ORDER BY job_id, attempt").rows) do
      local l = effects[e.job_id] or {}
      effects[e.job_id] = l
      l[#l + 1] = e
    end
    admin:close()
    q:close()
    local twice, extra = 0, 0
    for _, id in ipairs(ids) do
      local fx = effects[id]
      assert(fx, ("seed %d: job %d completed without its effect"):format(seed, id))
      assert.equal(jobs[id].attempt, fx[#fx].attempt, "job " .. id .. ": the attempt of its last effect")
      for k = 1, #fx - 1 do
        assert(killed[fx[k].pid], ("seed %d: job %d has two effects, but worker %d was not killed"):format(seed, id, fx[k].pid))
      end
      if #fx > 1 then twice, extra = twice + 1, extra + #fx - 1 end
    end
    print(("\n# pg tx kills: %d jobs, %d workers, %d SIGKILLed and replaced, fsync on; %d jobs recorded their "
           .. "effect twice (%d extra), each after a kill between the effect's commit and the job's record; %.1f s, seed %d")
      :format(JOBS, WORKERS, kills, twice, extra, took / 1000, seed))
  end)
end)
