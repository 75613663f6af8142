-- spec/cli_jobs_spec.lua — `tide enqueue`, `tide jobs` and `tide worker`, driven through the
-- real binary against temporary SQLite stores.
require "tide"                    -- (its modules, for H.stores() to empty a PostgreSQL store)
local H = spec_helper
local cjson = require "cjson"
local TIDE = H.build .. "/tide"

local dir = H.tempdir()

local nstores, neffects = 0, 0
--- A SQLite store no test has used yet.
local function fresh_store()
  nstores = nstores + 1
  return ("sqlite:%s/jobs%d.db"):format(dir, nstores)
end

local function write(name, text) return H.write_file(dir, name, text) end

local read = H.file_bytes

--- tide(cmd, store, rest): the exit status, stdout and stderr of `tide CMD --store STORE REST`;
--- tide_json(...): that command's JSON output (it must exit 0).
local tide, tide_json = H.cli(dir)

local function ids(jobs)
  local out = {}
  for i, j in ipairs(jobs) do out[i] = j.id end
  return out
end

teardown(function() os.execute("rm -rf " .. dir) end)

-- A worker script: targets that record their effects in the file arg[1].
local WORK = write("work.lua", [[
  local tide = require "tide"
  local effects = arg[1]
  local function note(s)
    local fh = assert(io.open(effects, "a")); fh:write(s, "\n"); fh:close()
  end
  return {
    orders = {
      fulfill = function(args, job) note(("fulfill %d %s"):format(job.id, tostring(args and args.order))) end,
      boom = function() error("card declined") end,
      slow = function(args, job)
        note("start " .. job.id)
        tide.sleep(args.ms)
        note("done " .. job.id)
      end,
    },
  }
]])

-- The commands run against each store under test (SQLite; PostgreSQL when
-- spec/run.sh started a server): fresh_store() empties it.
for _, st in ipairs(H.stores()) do
  describe("(" .. st.name .. ")", function()
    local function fresh_store()
      nstores = nstores + 1
      return st.fresh(("%s/jobs%d.db"):format(dir, nstores))
    end

    describe("tide enqueue", function()
      it("adds a job and says which, with its queue and status", function()
        local store = fresh_store()
        local status, out = tide("enqueue", store, [[orders fulfill '{"order":7}']])
        assert.equal(0, status)
        assert.equal("enqueued job 1 (orders.fulfill, queue default, available)\n", out)
        local j = tide_json("jobs", store, "show 1")
        assert.same({ order = 7 }, j.args)
        assert.equal("available", j.status)
        assert.equal(20, j.max_attempts)
      end)

      it("adds nothing for an idempotency key seen before, and names the existing job", function()
        local store = fresh_store()
        assert.equal(0, (tide("enqueue", store, "orders fulfill '{\"order\":7}' --key order-7")))
        local status, out = tide("enqueue", store, "orders fulfill '{\"order\":8}' --key order-7")
        assert.equal(0, status)
        assert.equal("job 1 already has key 'order-7': nothing enqueued\n", out)
        assert.same({ id = 1, inserted = false }, tide_json("enqueue", store, "orders fulfill --key order-7"))
        local second = tide_json("enqueue", store, "orders fulfill --key order-8")
        assert.is_true(second.inserted)
        assert.is_true(second.id > 1)              -- (PostgreSQL's ids may skip: ON CONFLICT spends one)
        local st = tide_json("jobs", store, "stats")
        assert.equal(2, st.total)
        assert.same({ order = 7 }, tide_json("jobs", store, "show 1").args)
      end)

      it("schedules with --run-at or --delay, and takes every option before or after the arguments", function()
        local store = fresh_store()
        local status, out = tide("enqueue", store, "--run-at 2030-01-01T00:00:00Z orders later")
        assert.equal(0, status)
        assert.equal("enqueued job 1 (orders.later, queue default, scheduled for 2030-01-01T00:00:00Z)\n", out)
        status, out = tide("enqueue", store, "mail send '[1,2]' --queue mail --delay 1h --priority -3 --max-attempts 2")
        assert.equal(0, status)
        assert.matches("^enqueued job 2 %(mail%.send, queue mail, scheduled for %d%d%d%d%-%d%d%-%d%dT[%d:]+Z%)\n$", out)
        local j1 = tide_json("jobs", store, "show 1")
        assert.equal("scheduled", j1.status)
        assert.equal("2030-01-01T00:00:00Z", j1.run_at)
        local j2 = tide_json("jobs", store, "show 2")
        assert.same({ "mail", "scheduled", -3, 2 }, { j2.queue, j2.status, j2.priority, j2.max_attempts })
        assert.same({ 1, 2 }, j2.args)
      end)
    end)

    describe("tide jobs", function()
      local store

      --- Three jobs: 1 and 3 available, 2 cancelled.
      before_each(function()
        store = fresh_store()
        for i = 1, 3 do tide("enqueue", store, ("orders fulfill '{\"order\":%d}'"):format(i)) end
        assert.equal(0, (tide("jobs", store, "cancel 2")))
      end)

      it("lists jobs newest first as an aligned table", function()
        local status, out = tide("jobs", store, "list")
        assert.equal(0, status)
        local lines = {}
        for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
        assert.equal(4, #lines)
        assert.matches("^ID  QUEUE    JOB             STATUS     ATTEMPT  RUN AT                LAST ERROR$", lines[1])
        assert.matches("^ 3  default  orders%.fulfill  available     0/20  %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", lines[2])
        assert.matches("^ 2  default  orders%.fulfill  cancelled     0/20  ", lines[3])
        assert.matches("^ 1  default  orders%.fulfill  available     0/20  ", lines[4])
      end)

      it("marks a job cancelled while it ran, which its worker has not stopped yet, as stopping", function()
        local q = require("tide").queue.open(store)
        q:transaction(function(tx)
          tx:exec("UPDATE tide_jobs SET attempt = 1, lease_owner = 'host:7:1', lease_expires = 1 WHERE id = 2")
        end)
        q:close()
        local status, out = tide("jobs", store, "list")
        assert.equal(0, status)
        assert.matches("\n 2  default  orders%.fulfill  cancelled %(stopping%)     1/20  ", out)
        assert.matches("\n 1  default  orders%.fulfill  available                0/20  ", out)
      end)

      it("lists as JSON, filtered by status and queue, limited, paged", function()
        assert.same({ 3, 2, 1 }, ids(tide_json("jobs", store, "list")))
        assert.same({ 3, 1 }, ids(tide_json("jobs", store, "list --status available")))
        assert.same({ 3 }, ids(tide_json("jobs", store, "list --limit 1")))
        assert.same({ 2, 1 }, ids(tide_json("jobs", store, "list --before 3")))
        assert.same({}, tide_json("jobs", store, "list --queue mail"))
        local status, out = tide("jobs", store, "list --queue mail")
        assert.equal(0, status)
        assert.equal("no jobs\n", out)
        local _, raw = tide("jobs", store, "list --queue mail --json")
        assert.equal("[]\n", raw)
        local j = tide_json("jobs", store, "list --status cancelled")[1]
        assert.same({ 2, "cancelled", "orders", "fulfill" }, { j.id, j.status, j.target, j.method })
        assert.same({}, j.errors)
        assert.same({ order = 2 }, j.args)
      end)

      it("shows every field of a job as key: value lines", function()
        local status, out = tide("jobs", store, "show 2")
        assert.equal(0, status)
        assert.matches("\nid: +2\n", "\n" .. out)
        assert.matches("\nstatus: +cancelled\n", out)
        assert.matches("\nattempt: +0/20\n", out)
        assert.matches("\nargs: +{\"order\":2}\n", out)
        assert.matches("\ncompleted_at: +%d%d%d%d%-[%d%-T:.]+Z\n", out)
        assert.matches("\nidempotency_key: +%-\n", out)
      end)

      it("retries, cancels, expires and fails jobs, and says so", function()
        local cases = {
          { "retry 2", "job 2 will run again now (available)\n" },
          { "cancel 1", "job 1 cancelled\n" },
          { "expire 2", "job 2 expired\n" },
          { "fail 3 customer went away", "job 3 discarded (customer went away)\n" },
        }
        for _, c in ipairs(cases) do
          local status, out = tide("jobs", store, c[1])
          assert.equal(0, status)
          assert.equal(c[2], out)
        end
        local statuses = {}
        for _, j in ipairs(tide_json("jobs", store, "list")) do statuses[j.id] = j.status end
        assert.same({ "cancelled", "expired", "discarded" }, statuses)
        local j3 = tide_json("jobs", store, "show 3")
        assert.equal("customer went away", j3.errors[1].error)
        assert.same({ id = 3, status = "available" }, tide_json("jobs", store, "retry 3"))
        assert.same({ id = 3, status = "cancelled" }, tide_json("jobs", store, "cancel 3"))
      end)

      it("refuses to change a job that is missing or finished: exit 1 and why", function()
        local status, out, err = tide("jobs", store, "cancel 2")
        assert.same({ 1, "", "tide jobs: job 2 is cancelled\n" }, { status, out, err })
        status, out, err = tide("jobs", store, "show 99")
        assert.same({ 1, "", "tide jobs: job 99 not found\n" }, { status, out, err })
        status, _, err = tide("jobs", store, "retry 99 --json")
        assert.same({ 1, "tide jobs: job 99 not found\n" }, { status, err })
        status, _, err = tide("jobs", store, "retry 1")
        assert.same({ 1, "tide jobs: job 1 is available\n" }, { status, err })
      end)

      it("counts jobs by queue and status, as a table and as JSON", function()
        tide("enqueue", store, "mail send --queue mail")
        local status, out = tide("jobs", store, "stats")
        assert.equal(0, status)
        assert.equal(table.concat({
          "QUEUE    AVAILABLE  CANCELLED  TOTAL",
          "default          2          1      3",
          "mail             1          0      1",
          "total            3          1      4",
          ("pool: %s, 1 open, 0 busy, 0 waiting (this process's)"):format(st.name == "sqlite" and "1 connection"
                                                                           or "10 connections"), "" }, "\n"), out)
        local st = tide_json("jobs", store, "stats")
        assert.same({ 4, 3, 1, 0 }, { st.total, st.available, st.cancelled, st.completed })
        assert.same({ default = { available = 2, cancelled = 1 }, mail = { available = 1 } }, st.queues)
      end)

      it("prunes jobs that finished longer ago than --older-than", function()
        assert.same({ deleted = 0 }, tide_json("jobs", store, "prune --older-than 7d"))
        os.execute("sleep 0.01")
        local status, out = tide("jobs", store, "prune --older-than 0")
        assert.equal(0, status)
        assert.matches("^deleted 1 job that finished before %d%d%d%d%-[%d%-T:]+Z\n$", out)
        assert.same({ 3, 1 }, ids(tide_json("jobs", store, "list")))
      end)
    end)

    describe("tide worker", function()
      local effects

      before_each(function()
        neffects = neffects + 1
        effects = dir .. "/effects-" .. neffects
      end)

      it("--drain runs every due job with the targets SCRIPT returns, then exits 0", function()
        local store = fresh_store()
        for i = 1, 5 do tide("enqueue", store, ("orders fulfill '{\"order\":%d}'"):format(i)) end
        tide("enqueue", store, "orders fulfill --delay 1h")               -- not due: left alone
        local status, out, err = tide("worker", store, "--drain " .. WORK .. " " .. effects)
        assert.equal(0, status)
        assert.equal("", out)
        assert.matches("^tide worker [^ ]+: [^ ]+, queues default=10, lease 30000 ms\n", err)
        assert.matches("stopped after [%d.]+ s: 5 completed, 0 retried, 0 discarded, 0 released\n$", err)
        local lines = {}
        for line in read(effects):gmatch("[^\n]+") do lines[#lines + 1] = line end
        table.sort(lines)
        assert.same({ "fulfill 1 1", "fulfill 2 2", "fulfill 3 3", "fulfill 4 4", "fulfill 5 5" }, lines)
        local st = tide_json("jobs", store, "stats")
        assert.same({ 5, 1, 0 }, { st.completed, st.scheduled, st.executing })
      end)

      it("takes only the queues given with --queue NAME=N, and requires targets found beside SCRIPT", function()
        local store = fresh_store()
        write("greeter.lua", [[return { hello = function(args) local fh = io.open(args.out, "a")
          fh:write("hello ", args.name, "\n") fh:close() end }]])
        local main = write("main.lua", "-- no targets returned: they are required by name\n")
        local args = cjson.encode{ out = effects, name = "mail" }
        tide("enqueue", store, "greeter hello '" .. args .. "' --queue mail")
        tide("enqueue", store, "greeter hello '" .. args .. "'")
        local status, out, err = tide("worker", store, "--queue mail=2 --drain --quiet " .. main)
        assert.same({ 0, "", "" }, { status, out, err })
        assert.equal("hello mail\n", read(effects))
        local st = tide_json("jobs", store, "stats")
        assert.same({ completed = 1 }, st.queues.mail)
        assert.same({ available = 1 }, st.queues.default)
      end)

      it("retries a job whose method raises, and discards it after its last attempt", function()
        local store = fresh_store()
        tide("enqueue", store, "orders boom --max-attempts 1")
        tide("enqueue", store, "orders boom --max-attempts 3")
        local status, _, err = tide("worker", store, "--drain " .. WORK .. " " .. effects)
        assert.equal(0, status)
        assert.matches("job 1 %(orders%.boom%) attempt 1/1 failed, discarded: .*work%.lua:%d+: card declined\n", err)
        assert.matches("job 2 %(orders%.boom%) attempt 1/3 failed, will retry: .*work%.lua:%d+: card declined\n", err)
        assert.matches("0 completed, 1 retried, 1 discarded, 0 released\n$", err)
        local j1, j2 = tide_json("jobs", store, "show 1"), tide_json("jobs", store, "show 2")
        assert.same({ "discarded", 1 }, { j1.status, #j1.errors })
        assert.same({ "retryable", 1, 1 }, { j2.status, j2.attempt, #j2.errors })
        assert.matches("card declined$", j2.errors[1].error)
        assert.matches("stack traceback:", j2.errors[1].traceback)
        local _, list = tide("jobs", store, "list --status retryable")
        assert.matches("\n 2  default  orders%.boom  retryable      1/3  [%dT:Z-]+  .*card declined\n", list)
        local _, show = tide("jobs", store, "show 1")
        assert.matches("\n  #1  attempt 1 at [%dT:.Z-]+\n      .*card declined\n      stack traceback:\n", show)
      end)

      --- Starts a worker in the background on a slow job, sends `sig` once the
      --- job started (and, given `before`, once that shell command returned),
      --- waits; returns the exit status and stderr.
      local function signal_worker(store, sig, opts, before)
        local ready = effects
        local cmd = ("TIDE_STORE= %s worker --store %s %s %s %s 2>%s/worker-err & pid=$!; " ..
                     "n=0; while ! grep -q start %s 2>/dev/null && [ $n -lt 250 ]; do sleep 0.02; n=$((n+1)); done; " ..
                     "%s kill -%s $pid; wait $pid; echo \"exit=$?\"")
          :format(TIDE, store, opts, WORK, effects, dir, ready, before and before .. ";" or "", sig)
        local _, out = H.sh(cmd)
        return tonumber(out:match("exit=(%d+)")), read(dir .. "/worker-err")
      end

      it("stops gracefully on SIGTERM: the running job finishes, nothing is left executing, exit 0", function()
        local store = fresh_store()
        tide("enqueue", store, "orders slow '{\"ms\":300}'")
        local status, err = signal_worker(store, "TERM", "--poll 50")
        assert.equal(0, status)
        assert.matches("shutdown %(SIGTERM%): stopping; 1 running job gets 5000 ms\n", err)
        assert.matches("1 completed, 0 retried, 0 discarded, 0 released\n$", err)
        assert.equal("start 1\ndone 1\n", read(effects))
        local st = tide_json("jobs", store, "stats")
        assert.same({ 1, 0 }, { st.completed, st.executing })
      end)

      it("releases a job that outlives --grace on SIGINT: available again, the attempt not counted", function()
        local store = fresh_store()
        tide("enqueue", store, "orders slow '{\"ms\":10000}'")
        local t0 = os.time()
        local status, err = signal_worker(store, "INT", "--grace 100")
        assert.equal(0, status, err)
        assert.is_true(os.time() - t0 < 5)
        assert.matches("0 completed, 0 retried, 0 discarded, 1 released\n$", err)
        local j = tide_json("jobs", store, "show 1")
        assert.same({ "available", 0 }, { j.status, j.attempt })
        assert.matches("^interrupted: ", j.errors[1].error)
      end)

      -- A short --grace is the jobs' time: the releases written after it
      -- get time of their own.  Here another transaction holds the job's
      -- row for 600 ms after the signal, so the release waits for it (with
      -- the grace split between jobs and releases, it was never written).
      it("releases a job after a short --grace even when the store takes 600 ms to take the write", function()
        local store = fresh_store()
        tide("enqueue", store, "orders slow '{\"ms\":10000}'")
        local locked = dir .. "/locked"
        os.remove(locked)
        local locker = write("locker.lua", [[
          local tide = require "tide"
          local q = tide.queue.open(arg[1])
          q:transaction(function(tx)
            tx:exec("UPDATE tide_jobs SET priority = priority WHERE id = 1")
            local fh = assert(io.open(arg[2], "w")); fh:write("locked\n"); fh:close()
            tide.sleep(600)
          end)
          q:close()
        ]])
        local before = ("(TIDE_STORE= %s run %s %s %s >%s/locker-out 2>&1 &); " ..
                        "n=0; while [ ! -s %s ] && [ $n -lt 250 ]; do sleep 0.02; n=$((n+1)); done")
          :format(TIDE, locker, store, locked, dir, locked)
        local t0 = os.time()
        local status, err = signal_worker(store, "INT", "--grace 100", before)
        assert.equal("locked\n", read(locked), read(dir .. "/locker-out"))
        assert.equal(0, status, err)
        assert.is_true(os.time() - t0 < 5)
        assert.matches("0 completed, 0 retried, 0 discarded, 1 released\n$", err)
        local j = tide_json("jobs", store, "show 1")
        assert.same({ "available", 0 }, { j.status, j.attempt })
      end)
    end)
  end)
end


describe("tide help and bad input", function()
  it("lists the job commands in tide --help, and each prints its own usage", function()
    local status, out = tide("--help")
    assert.equal(0, status)
    assert.matches("\n  worker %[OPTIONS%] %[SCRIPT %[ARGS%.%.%.%]%]\n", out)
    assert.matches("\n  enqueue %[OPTIONS%] TARGET METHOD %[JSON_ARGS%]\n", out)
    assert.matches("\n  jobs %[OPTIONS%] COMMAND", out)
    for _, c in ipairs{ { "worker --help", "worker" }, { "enqueue -h", "enqueue" },
                        { "jobs --help", "jobs" }, { "help jobs", "jobs" } } do
      status, out = tide(c[1])
      assert.equal(0, status)
      assert.matches("^Usage: tide " .. c[2] .. " ", out)
    end
  end)

  it("exits 2 for bad command lines and 1 for stores it cannot use, naming the problem", function()
    local store = fresh_store()
    tide("enqueue", store, "orders fulfill")
    local notdb = write("notdb.txt", ("not a database\n"):rep(100))
    local cases = {
      { "jobs", "sqlite:" .. notdb, "list", 1, "tide jobs: sqlite:.-notdb%.txt: file is not a database %(SQLITE_NOTADB%)\n" },
      { "enqueue", "sqlite:" .. notdb, "orders fulfill", 1, "tide enqueue: sqlite:.-notdb%.txt: file is not a database" },
      { "worker", "sqlite:" .. dir, "--drain", 1, "tide worker: sqlite:.-: unable to open database file %(SQLITE_CANTOPEN%)\n" },
      { "jobs", "sqlite:" .. dir .. "/missing.db", "list", 1, "tide jobs: sqlite:.-/missing%.db: no such file" },
      { "jobs", "mysql:x", "list", 1, "tide jobs: unknown store 'mysql'" },
      { "jobs", "nowhere", "list", 2, "tide jobs: bad %-%-store %(store URL like sqlite:PATH or postgres://HOST/DB expected, got 'nowhere'%)\n\nUsage: tide jobs" },
      { "enqueue", store, "orders fulfill '{\"order\":'", 2, "tide enqueue: bad JSON_ARGS %(unexpected end %(a value expected%) at character 10%)\n\nUsage: tide enqueue" },
      { "enqueue", store, "orders fulfill '[1e999]'", 2, "tide enqueue: bad JSON_ARGS %(" },
      { "enqueue", store, "orders", 2, "tide enqueue: missing METHOD\n" },
      { "enqueue", store, "'orders fulfill'", 2, "tide enqueue: missing METHOD\n" },
      { "enqueue", store, "'or ders' fulfill", 2, "tide enqueue: bad TARGET %(module name like orders or app%.mail expected, got 'or ders'%)\n" },
      { "enqueue", store, "orders fulfill --bogus", 2, "tide enqueue: unknown option '%-%-bogus'\n" },
      { "enqueue", store, "orders fulfill --run-at soon", 2, "tide enqueue: bad %-%-run%-at %(UTC time from 1970 to 9999 like" },
      { "enqueue", store, "orders fulfill --run-at 2030-02-29T00:00:00Z", 2, "tide enqueue: bad %-%-run%-at %(UTC time from 1970 to 9999 like .*got '2030%-02%-29T00:00:00Z'%)\n" },
      { "enqueue", store, "orders fulfill --run-at 2030-01-01T00:00:00+25:00", 2, "tide enqueue: bad %-%-run%-at %(UTC time" },
      { "enqueue", store, "orders fulfill --run-at 2030-01-01T00:00:60Z", 2, "tide enqueue: bad %-%-run%-at %(UTC time" },
      { "enqueue", store, "orders fulfill --run-at 999999999999999", 2, "tide enqueue: bad %-%-run%-at %(UTC time" },
      { "enqueue", store, "orders fulfill --priority 1000000000000", 2, "tide enqueue: bad %-%-priority %(integer from %-2147483648 to 2147483647 %(lower runs first%) expected, got '1000000000000'%)\n" },
      { "enqueue", store, "orders fulfill --max-attempts 1000000000000", 2, "tide enqueue: bad %-%-max%-attempts %(integer from 1 to 2147483647 expected, got '1000000000000'%)\n" },
      { "enqueue", store, "orders fulfill --key $(printf 'a\\377b')", 2, "tide enqueue: bad %-%-key %(non%-empty text %(valid UTF%-8, no NUL%) expected" },
      { "enqueue", store, "orders fulfill \"$(printf '[\\042\\377\\042]')\"", 2, "tide enqueue: bad JSON_ARGS %(invalid UTF%-8 at character 3%)\n" },
      { "enqueue", store, "orders fulfill '[1,]'", 2, "tide enqueue: bad JSON_ARGS %(unexpected character ']' %(a value expected%) at character 4%)\n" },
      { "enqueue", "sqlite::memory:", "orders fulfill", 2, "tide enqueue: sqlite::memory: is an in%-memory store: it would be gone when this command ends" },
      { "jobs", "sqlite:file::memory:?cache=shared", "list", 2, "tide jobs: sqlite:file::memory:%?cache=shared is an in%-memory store" },
      { "worker", "sqlite::memory:", "--drain", 2, "tide worker: sqlite::memory: is an in%-memory store" },
      { "enqueue", store, "orders fulfill --delay 1s --run-at 0", 2, "tide enqueue: give %-%-run%-at or %-%-delay, not both\n" },
      { "enqueue", store, "orders fulfill --max-attempts", 2, "tide enqueue: %-%-max%-attempts needs a value %(N%)\n" },
      { "jobs", store, "show abc", 2, "tide jobs: show: bad ID %(job id, an integer >= 1 expected, got 'abc'%)\n" },
      { "jobs", store, "retry 1.5", 2, "tide jobs: retry: bad ID %(job id, an integer >= 1 expected, got '1%.5'%)\n" },
      { "jobs", store, "cancel", 2, "tide jobs: cancel: missing ID\n" },
      { "jobs", store, "", 2, "tide jobs: missing COMMAND\n" },
      { "jobs", store, "frob", 2, "tide jobs: unknown command 'frob'\n" },
      { "jobs", store, "list --status failed", 2, "tide jobs: bad %-%-status %(one of available, scheduled, executing, retryable, completed, discarded, cancelled, expired expected, got 'failed'%)\n" },
      { "jobs", store, "list --limit x", 2, "tide jobs: bad %-%-limit %(integer from 1 to 2147483646 expected, got 'x'%)\n" },
      { "jobs", store, "stats --limit 3", 2, "tide jobs: %-%-limit is not an option of 'stats'\n" },
      { "jobs", store, "prune", 2, "tide jobs: prune: missing %-%-older%-than DURATION\n" },
      { "jobs", store, "prune --older-than soon", 2, "tide jobs: bad %-%-older%-than %(duration" },
      { "worker", store, "--concurrency 0", 2, "tide worker: bad %-%-concurrency %(integer >= 1 expected, got '0'%)\n" },
      { "worker", store, "--queue a=b", 2, "tide worker: bad %-%-queue %(NAME or NAME=N" },
      { "worker", store, "--lease", 2, "tide worker: %-%-lease needs a value %(MS%)\n" },
      { "worker", store, "--frob", 2, "tide worker: unknown option '%-%-frob'\n\nUsage: tide worker" },
      { "worker", store, "--drain " .. dir .. "/nope.lua", 1, "tide worker: cannot open .-nope%.lua" },
      { "worker", store, "--drain " .. write("five.lua", "return 5"), 1,
        "tide worker: .-five%.lua returned number, not a table of targets" },
      { "worker", store, "--drain " .. write("bad.lua", "return { orders = 5 }"), 1,
        "tide worker: the targets .-bad%.lua returned: bad option 'targets%.orders' %(table of methods, or { methods = {%.%.%.}, options } expected, got number 5%)\n" },
    }
    for i, c in ipairs(cases) do
      local status, out, err = tide(c[1], c[2], c[3])
      local what = ("case %d (tide %s %s): exit %s, stderr:\n%s"):format(i, c[1], c[3], tostring(status), err)
      assert(status == c[4], what)
      assert(err:match("^" .. c[5]), what)
      assert(not err:match("stack traceback"), what)
      assert.equal("", out)
    end
    assert.equal(1, tide_json("jobs", store, "stats").total)   -- nothing was enqueued by the bad lines
  end)

  it("reports a SCRIPT that fails with its traceback and exit 1", function()
    local status, _, err = tide("worker", fresh_store(), "--drain " .. write("fails.lua", "error('no config')"))
    assert.equal(1, status)
    assert.matches("^tide worker: .-fails%.lua:1: no config\nstack traceback:", err)
  end)
end)

describe("tide enqueue and JSON", function()
  local json = require "tide.jobs.json"

  it("takes exactly what JSON accepts: JSONTestSuite's test_parsing cases through tide enqueue", function()
    local cases = dofile("spec/data/json_parsing.lua")
    local store = fresh_store()
    local script, names = { "set +e" }, {}
    for i, c in ipairs(cases) do
      local kind = c[1]:sub(1, 1)
      -- (an argument holds no NUL byte and at most 128 KB)
      if (kind == "y" or kind == "n") and not c[2]:find("\0", 1, true) and #c[2] < 100000 then
        local f = write(("case%d.json"):format(i), c[2])
        names[#names + 1] = { i = i, name = c[1], kind = kind, input = c[2] }
        script[#script + 1] = ("a=$(cat %s; printf x); TIDE_STORE= %s enqueue --store %s --json t m \"${a%%x}\" "
          .. "> %s/out.%d 2> %s/err.%d; echo $? > %s/rc.%d"):format(f, TIDE, store, dir, i, dir, i, dir, i)
      end
    end
    local status, out = H.sh("sh " .. write("cases.sh", table.concat(script, "\n")))
    assert(status == 0, out)
    local ids, accepted, refused = {}, 0, 0
    for _, c in ipairs(names) do
      local rc = tonumber(read(("%s/rc.%d"):format(dir, c.i)))
      local err = read(("%s/err.%d"):format(dir, c.i))
      if c.kind == "y" then
        assert(rc == 0, ("%s refused (exit %s): %s"):format(c.name, tostring(rc), err))
        ids[cjson.decode(read(("%s/out.%d"):format(dir, c.i))).id] = c
        accepted = accepted + 1
      else
        assert(rc == 2, ("%s: exit %s, 2 expected (stderr: %s)"):format(c.name, tostring(rc), err))
        assert(err:match("^tide enqueue: bad JSON_ARGS %(.* at character %d+%)\n"), c.name .. ": " .. err)
        refused = refused + 1
      end
    end
    -- what was stored is what was given: every y_ case comes back exactly
    local listed = 0
    for _, j in ipairs(tide_json("jobs", store, "list --limit 1000")) do
      local c = ids[j.id]
      assert(c, "an unexpected job " .. j.id)
      local _, raw = tide("jobs", store, "show " .. j.id .. " --json")
      local args_text = raw:match('"args":(.*),"errors":%[%]}\n$')
      local got = json.decode(args_text)
      local want = json.decode(c.input)
      local same, why = H.exact(want, got)
      assert(same, c.name .. ": " .. tostring(why))
      listed = listed + 1
    end
    assert.equal(accepted, listed)
    print(("\n# JSONTestSuite through tide enqueue: %d y_ accepted and stored exactly, %d n_ refused "
           .. "(cases with a NUL byte or over 100 KB, which an argument cannot carry, are checked in spec/json_spec.lua)"):format(accepted, refused))
  end)

  it("keeps numbers and empty arrays exact from the command line to tide jobs show", function()
    local store = fresh_store()
    local given = '{"n":123456789012345,"big":1700000000123456,"max":9007199254740991,"sum":0.30000000000000004,"e":[],"a":{"b":[]}}'
    assert.equal(0, (tide("enqueue", store, "t m '" .. given .. "'")))
    local _, out = tide("jobs", store, "show 1 --json")
    local args_text = out:match('"args":(.*),"errors":%[%]}\n$')
    assert(H.exact(json.decode(given), json.decode(args_text)), args_text)
    local status, text = tide("jobs", store, "show 1")
    assert.equal(0, status)
    assert.matches('\nargs: +{.*"big":1700000000123456', text)
    assert.matches('"e":%[%]', text)
  end)

  it("accepts 29 February in a leap year, and the same times as the queue", function()
    local store = fresh_store()
    local status, out = tide("enqueue", store, "t m --run-at 2032-02-29T12:00:00+01:00")
    assert.equal(0, status)
    assert.equal("enqueued job 1 (t.m, queue default, scheduled for 2032-02-29T11:00:00Z)\n", out)
  end)

  it("shows a corrupt row as corrupt, and the worker fails that job alone with the reason", function()
    local store = fresh_store()
    for _ = 1, 3 do tide("enqueue", store, "orders fulfill '{\"order\":1}'") end
    local path = store:match("^sqlite:(.*)$")
    local q = require("tide").queue.open(store)
    q:transaction(function(tx) tx:exec("UPDATE tide_jobs SET run_at = 'abc' WHERE id = 2") end)
    q:close()
    local status, out = tide("jobs", store, "list")
    assert.equal(0, status)
    assert.matches('\n 2  default  orders%.fulfill  corrupt +0/20  %- +corrupt row: run_at is string "abc", time in ms expected\n', out)
    local j = tide_json("jobs", store, "show 2")
    assert.equal('run_at is string "abc", time in ms expected', j.corrupt)
    assert.equal(cjson.null, j.run_at)
    local effects = dir .. "/effects-corrupt"
    local wstatus, _, err = tide("worker", store, "--drain " .. WORK .. " " .. effects)
    assert.equal(0, wstatus, err)
    assert.matches('job 2 %(orders%.fulfill%) attempt 1/20 failed, discarded: corrupt job row: run_at is string "abc"', err)
    assert.matches("2 completed, 0 retried, 1 discarded", err)
    local st = tide_json("jobs", store, "stats")
    assert.same({ 2, 1, 0 }, { st.completed, st.discarded, st.available })
    local _ = path
  end)
end)

describe("tide worker on a store that keeps failing", function()
  it("backs off every failing loop, and --drain gives up with a clear message and exit 1", function()
    local store = fresh_store()
    for i = 1, 3 do tide("enqueue", store, ("orders fulfill '{\"order\":%d}'"):format(i)) end
    local q = require("tide").queue.open(store)
    q:transaction(function(tx)
      -- one job left executing by a dead worker (the rescuer must write), then every write fails
      tx:exec("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'ghost:1:0', lease_expires = 1 WHERE id = 1")
      tx:exec("CREATE TRIGGER broken BEFORE UPDATE ON tide_jobs BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    end)
    q:close()
    local t0 = os.time()
    local status, _, err = tide("worker", store, "--drain --give-up 1s --poll 200 " .. WORK .. " " .. dir .. "/effects-broken")
    local took = os.time() - t0
    assert.equal(1, status, err)
    assert.matches("\ntide worker: gave up: the store kept failing: %a+ failed for %d+ ms without a success "
                   .. "%(last error: .*disk I/O error", err)
    local kinds = {}
    for kind in err:gmatch("tide: error in worker [^:]+:[^:]+:[^:]+: (%a+)") do kinds[kind] = (kinds[kind] or 0) + 1 end
    assert.is_true((kinds.rescue or 0) >= 2, "the rescue never failed: " .. err)
    for kind, n in pairs(kinds) do
      assert(n <= 16, ("%d '%s' failures in about a second: no backoff"):format(n, kind))
    end
    assert.is_true(took <= 6, "took " .. took .. " s")
    local st = tide_json("jobs", store, "stats")
    assert.same({ 1, 2 }, { st.executing, st.available })
  end)

  local setpriv = os.execute("command -v setpriv >/dev/null 2>&1") == 0
  local root = select(2, H.sh("id -u")):match("^0%s") ~= nil
  it("says when SQLITE_READONLY comes from a directory it cannot create the -wal and -shm files in", function()
    if root and not setpriv then pending("needs setpriv to drop root"); return end
    local ro = dir .. "/readonly"
    os.execute("mkdir -p " .. ro)
    local store = "sqlite:" .. ro .. "/jobs.db"
    assert.equal(0, (tide("enqueue", store, "t m")))
    os.execute(("chmod 666 %s/jobs.db; chmod 755 %s"):format(ro, ro))
    if not root then os.execute("chmod 555 " .. ro) end
    local as = root and "setpriv --reuid=65534 --regid=65534 --clear-groups " or ""
    local status, out = H.sh(("%senv TIDE_STORE= %s enqueue --store %s t m"):format(as, TIDE, store))
    os.execute("chmod 755 " .. ro)
    assert.equal(1, status)
    assert.equal(("tide enqueue: %s: attempt to write a readonly database (SQLITE_READONLY_DIRECTORY) (the directory "
                  .. "%s is not writable: SQLite needs to create %s/jobs.db-wal and %s/jobs.db-shm there; make the "
                  .. "directory writable, or create them while it is)\n"):format(store, ro, ro, ro), out)
  end)
end)
