-- spec/dead_letters_spec.lua — jobs that used their attempts: kept with every error, heard, counted, retried in bulk.
--
-- The same tests on SQLite and on PostgreSQL (TIDE_PG_URL, as spec/run.sh sets):
--   1. a job that fails its 3 attempts is discarded with the 3 errors in
--      order; on_discard hears it once, with the job and the error; the
--      metrics' discard counter counts it;
--   2. a job whose worker died in its last attempt is discarded by another
--      worker's rescuer, which tells on_discard; q:retry_all and
--      q:cancel_all check their filter, naming the option;
--   3. 100,000 discarded jobs of one queue retried by `tide jobs retry
--      --status discarded --queue dead` while two worker processes run
--      them and another queue's jobs, one enqueued every 5 ms by the spec
--      and each enqueue timed (a write: a long lock would hold it): all
--      100,000 run again and complete, the other queue's dead letters are
--      left alone, no enqueue waits a second;
--   4. `tide jobs retry|cancel --status ...` print how many.
local tide = require "tide"
local H = spec_helper
local worker_mod = require "tide.jobs.worker"

local TIDE = H.build .. "/tide"
local BULK = tonumber(os.getenv("DEAD_JOBS")) or 100000

for _, store in ipairs(H.stores()) do
  describe("dead letters on " .. store.name, function()
    local dir, url
    before_each(function()
      dir = H.tempdir()
      url = store.fresh(dir .. "/jobs.db")
    end)
    after_each(function()
      store.reset(dir .. "/jobs.db")
      os.execute("rm -rf " .. dir)
      H.assert_idle()
    end)

    it("keeps every attempt's error, tells on_discard once and counts the discard", function()
      local heard, job
      local before = (worker_mod.totals.queues.mail or { discarded = 0 }).discarded
      H.run(function()
        local q = tide.queue.open(url)
        heard = {}
        local w = tide.worker{ queue = q, queues = { mail = 2 },
          retry = { base = 5, max = 5, jitter = false },
          on_discard = function(ev) heard[#heard + 1] = ev end,
          targets = { pay = { charge = function(_, j) error("card declined " .. j.attempt, 0) end } } }
        local id = q:enqueue{ target = "pay", method = "charge", queue = "mail", max_attempts = 3, args = { n = 1 } }
        local deadline = tide.now() + 10000
        repeat tide.sleep(5) until q:job(id).status == "discarded" or tide.now() > deadline
        tide.sleep(20)
        w:stop(); w:wait()
        job = q:job(id)
        q:close()
      end)
      assert.equal("discarded", job.status)
      assert.equal(3, #job.errors)
      for i, e in ipairs(job.errors) do
        assert.equal(i, e.attempt)
        assert.equal("card declined " .. i, e.error)
      end
      assert.equal(1, #heard)
      assert.equal(job.id, heard[1].job.id)
      assert.equal(3, heard[1].job.attempt)
      assert.equal("card declined 3", heard[1].error)
      assert.matches("^[^:]+:%d+:%x+$", heard[1].worker)
      assert.equal(before + 1, worker_mod.totals.queues.mail.discarded)
      local text = require("tide.observe.metrics").render()
      assert.matches('tide_job_discards_total{queue="mail"} ' .. (before + 1), text, 1, true)
    end)

    it("discards a job whose worker died in its last attempt, and tells on_discard", function()
      local heard, job = {}, nil
      H.run(function()
        local q = tide.queue.open(url)
        local id = q:enqueue{ target = "pay", method = "charge", queue = "mail", max_attempts = 1 }
        q:transaction(function(tx)   -- claimed by a worker that died: its lease ran out long ago
          tx:exec("UPDATE tide_jobs SET status = 'executing', attempt = 1, lease_owner = 'gone:1:1', "
                  .. "lease_expires = 1000 WHERE id = ?", id)
        end)
        local w = tide.worker{ queue = q, queues = { mail = 1 }, on_discard = function(ev) heard[#heard + 1] = ev end }
        local deadline = tide.now() + 5000
        repeat tide.sleep(5) until q:job(id).status ~= "executing" or tide.now() > deadline
        w:stop(); w:wait()
        job = q:job(id)
        q:close()
      end)
      assert.equal("discarded", job.status)
      assert.equal(1, #job.errors)
      assert.equal("lease expired: worker gone:1:1 stopped heartbeating", job.errors[1].error)
      assert.equal(1, #heard)
      assert.same({ job.id, "mail", "pay", "charge", 1 }, { heard[1].job.id, heard[1].job.queue, heard[1].job.target,
                                                           heard[1].job.method, heard[1].job.attempt })
      assert.equal("lease expired: its worker stopped heartbeating during the last attempt", heard[1].error)
    end)

    it("checks the filter of q:retry_all and q:cancel_all", function()
      H.run(function()
        local q = tide.queue.open(url)
        H.error_cases("spec/dead_letters_spec.lua", {
          { function() q:retry_all() end, "q:retry_all: bad argument #1 (filter table { status =, queue =, since = } expected, got nil)" },
          { function() q:retry_all{} end, "q:retry_all: bad option 'status' ('cancelled', 'completed', 'discarded', 'expired', "
            .. "'retryable' or 'scheduled' expected, got nil)" },
          { function() q:retry_all{ status = "executing" } end, "q:retry_all: bad option 'status' ('cancelled', 'completed', "
            .. "'discarded', 'expired', 'retryable' or 'scheduled' expected, got string \"executing\")" },
          { function() q:cancel_all{ status = "discarded" } end, "q:cancel_all: bad option 'status' ('available', "
            .. "'executing', 'retryable' or 'scheduled' expected, got string \"discarded\")" },
          { function() q:retry_all{ status = "discarded", since = "yesterday" } end, "q:retry_all: bad option 'since' "
            .. "(UTC time from 1970 to 9999 (ms since the epoch, or ISO 8601 like \"2026-11-23T15:04:05Z\") expected, "
            .. "got string \"yesterday\")" },
          { function() q:retry_all{ status = "discarded", queue = 5 } end, "q:retry_all: bad option 'queue' (queue name "
            .. "(letters, digits, _ . -) expected, got number 5)" },
          { function() q:retry_all{ status = "discarded", batch = 0 } end, "q:retry_all: bad option 'batch' (integer from 1 "
            .. "to 2147483647 expected, got number 0)" },
          -- (SQLite took it; PostgreSQL's bigint did not)
          { function() q:retry_all{ status = "discarded", batch = 2^60 } end, "q:retry_all: bad option 'batch' (integer "
            .. "from 1 to 2147483647 expected, got number 1.1529215046068e+18)" },
          { function() q:retry_all{ status = "discarded", limit = 5 } end, "q:retry_all: unknown option 'limit'" },
          { function() q:fail_all{ status = "completed" } end, "q:fail_all: bad option 'status' ('available', "
            .. "'executing', 'retryable' or 'scheduled' expected, got string \"completed\")" },
          { function() q:fail_all({ status = "available" }, 5) end, "q:fail_all: bad argument #2 (string or nil expected, "
            .. "got number 5)" },
          { function() q:cancel_all{ status = "available", target = true } end, "q:cancel_all: bad option 'target' "
            .. "(string expected, got boolean)" },
          { function() q:retry_all{ status = "discarded", max = -1 } end, "q:retry_all: bad option 'max' "
            .. "(integer >= 0 expected, got number -1)" },
        })
        q:close()
      end)
    end)

    -- The dashboard's bulk buttons act on a queue, a status and a target:
    -- q:fail_all discards as q:fail does, and every bulk method takes the
    -- target and a most.
    it("fails, cancels and retries in bulk by target, up to a most", function()
      local got
      H.run(function()
        local q = tide.queue.open(url)
        local ids = {}
        for i = 1, 7 do
          ids[i] = q:enqueue{ target = i <= 5 and "pay" or "mail", method = "m", queue = "q", run_at = 4102444800000 }
        end
        got = {
          failed = q:fail_all({ status = "scheduled", target = "pay", max = 3, batch = 2 }, "bad batch"),
          again = q:fail_all{ status = "scheduled", target = "nobody" },
          cancelled = q:cancel_all{ status = "scheduled", target = "mail" },
          retried = q:retry_all{ status = "discarded", target = "pay", max = 1 },
          none = q:retry_all{ status = "cancelled", max = 0 },
        }
        got.jobs = {}
        for i, id in ipairs(ids) do local j = q:job(id); got.jobs[i] = { j.status, j.errors and #j.errors or 0 } end
        got.error = q:job(ids[2]).errors[1]
        q:close()
      end)
      assert.same({ 3, 0, 2, 1, 0 }, { got.failed, got.again, got.cancelled, got.retried, got.none })
      assert.same({ { "available", 1 }, { "discarded", 1 }, { "discarded", 1 }, { "scheduled", 0 }, { "scheduled", 0 },
                    { "cancelled", 0 }, { "cancelled", 0 } }, got.jobs)
      assert.equal("bad batch", got.error.error)
      assert.is_number(got.error.at)
    end)

    -- The bulk scenario runs in the plain build only: ASan adds nothing to
    -- it (the bindings it drives run under the sanitizers in the tests
    -- above and in queue_spec) and slows 100,000 jobs past its bounds.
    local bulk_it = (os.getenv("SANITIZE") or "") ~= "" and pending or it
    bulk_it("retries " .. BULK .. " discarded jobs in bulk while workers run, holding no long lock", function()
      local tfile = H.write_file(dir, "targets.lua", "return { t = { ok = function() end, live = function() end } }")
      local r = {}
      H.run(function()
        local q = tide.queue.open(url)
        -- BULK dead letters in queue "dead", 1000 in queue "other"
        local now = require("tide.core").wallclock()
        local list = {}
        for i = 1, BULK + 1000 do
          list[#list + 1] = { target = "t", method = "ok", queue = i <= BULK and "dead" or "other", args = { n = i },
                              max_attempts = 2, delay = 3600000 }
          if #list == 5000 then q:enqueue_many(list); list = {} end
        end
        if #list > 0 then q:enqueue_many(list) end
        q:transaction(function(tx)
          tx:exec("UPDATE tide_jobs SET status = 'discarded', attempt = 2, completed_at = ?, "
                  .. "errors = '[{\"attempt\":1,\"error\":\"boom\"},{\"attempt\":2,\"error\":\"boom\"}]'", now)
        end)
        -- two worker processes take both queues; this process enqueues a
        -- live job every 5 ms and times each enqueue (a write: a long lock
        -- would hold it); `tide jobs retry` runs in a third process
        local pipes = {}
        for n = 1, 2 do
          pipes[n] = assert(io.popen(("%s worker --store '%s' --quiet --poll 50 --queue dead=20 --queue live=2 %s "
            .. "> %s/worker-%d.log 2>&1 & echo $!; exec 2>/dev/null; wait $!"):format(TIDE, url, tfile, dir, n)))
          pipes[n] = { pipe = pipes[n], pid = tonumber(pipes[n]:read("*l")) }
        end
        local status_file = dir .. "/retry.status"
        tide.sleep(300)
        local t0 = tide.now()
        os.execute(("(%s jobs --store '%s' retry --status discarded --queue dead > %s/retry.out 2>&1; echo $? > %s) &")
          :format(TIDE, url, dir, status_file))
        r.fed, r.enqueue_max = 0, 0
        local deadline = t0 + 240000
        while tide.now() < deadline do
          local s0 = tide.now()
          q:enqueue{ target = "t", method = "live", queue = "live" }
          r.fed = r.fed + 1
          r.enqueue_max = math.max(r.enqueue_max, tide.now() - s0)
          if not r.bulk_ms and H.file_bytes(status_file) ~= "" then r.bulk_ms = tide.now() - t0 end
          if r.fed % 20 == 0 and r.bulk_ms then
            local st = q:stats()
            if (st.queues.dead.completed or 0) == BULK then break end
          end
          tide.sleep(5)
        end
        r.all_ms = tide.now() - t0
        local wait_live = tide.now()                      -- the last live jobs (the workers ran the bulk too)
        repeat
          tide.sleep(100)
          local live = q:stats().queues.live
        until (live.completed or 0) == r.fed or tide.now() - wait_live > 60000
        local ffi = require "ffi"
        pcall(ffi.cdef, "int kill(int pid, int sig);")
        for _, p in ipairs(pipes) do ffi.C.kill(p.pid, 15) end
        for _, p in ipairs(pipes) do p.pipe:close() end
        local st = q:stats()
        r.dead, r.other, r.live = st.queues.dead, st.queues.other, st.queues.live
        r.sample = q:list{ queue = "dead", limit = 1 }[1]
        q:close()
      end)
      assert.equal("0\n", H.file_bytes(dir .. "/retry.status"))
      assert.equal(BULK .. " discarded jobs of queue dead will run again\n", H.file_bytes(dir .. "/retry.out"))
      assert.same({ completed = BULK }, r.dead)
      assert.same({ discarded = 1000 }, r.other)
      assert.same({ completed = r.fed }, r.live)
      assert.equal(3, r.sample.attempt)                -- one more attempt than it had; its errors kept
      assert.equal(3, r.sample.max_attempts)
      assert.equal(2, #r.sample.errors)
      -- no enqueue waited a second, however long the bulk retry took
      assert.is_true(r.enqueue_max < 1000, ("an enqueue waited %d ms"):format(r.enqueue_max))
      print(("\n# dead letters on %s: %d retried by `tide jobs retry` in %d ms while 2 worker processes ran; all "
             .. "completed again after %d ms; %d live jobs enqueued meanwhile, the slowest enqueue %d ms")
        :format(store.name, BULK, r.bulk_ms or -1, r.all_ms, r.fed, r.enqueue_max))
    end)

    it("retries and cancels by status on the command line, printing how many", function()
      H.run(function()
        local q = tide.queue.open(url)
        for i = 1, 5 do
          local id = q:enqueue{ target = "t", method = "ok", queue = i <= 3 and "mail" or "sms" }
          q:fail(id, "bounced")
        end
        q:enqueue{ target = "t", method = "ok", queue = "mail", delay = 60000 }
        q:close()
      end)
      local function jobs(args)
        return H.sh(("%s jobs --store '%s' %s"):format(TIDE, url, args))
      end
      local status, out = jobs("retry --status discarded --queue mail")
      assert.same({ 0, "3 discarded jobs of queue mail will run again\n" }, { status, out })
      status, out = jobs("retry --status discarded --json")
      assert.same({ 0, '{"retried":2}\n' }, { status, out })
      status, out = jobs("cancel --status scheduled --since 2020-01-01T00:00:00Z")
      assert.same({ 0, "1 scheduled job since 2020-01-01T00:00:00Z cancelled\n" }, { status, out })
      status, out = jobs("cancel --status completed")
      assert.equal(2, status)
      assert.matches("^tide jobs: cancel: a job that is completed cannot be cancelled %(%-%-status available, "
                     .. "scheduled, executing, retryable expected%)\n", out)
      status, out = jobs("retry --queue mail")
      assert.equal(2, status)
      assert.matches("^tide jobs: retry: %-%-queue, %-%-target and %-%-since choose among the jobs of a %-%-status\n", out)
    end)
  end)
end
