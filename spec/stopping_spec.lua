-- spec/stopping_spec.lua — a job cancelled, expired or failed by hand while it
-- runs keeps its slot until its worker has stopped it, on every store.
--
-- Broken before: q:cancel (and q:expire, q:fail, q:cancel_all, a flow that
-- stops) gave the job's lease up at once, while its worker ran it until its
-- next heartbeat noticed; the limits count leases, so the next job of a key
-- with concurrency 1 was claimed and ran beside it.  Now the lease stays
-- until the worker has stopped the task (or, if the worker died, until the
-- lease runs out and a rescue gives it up).
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

for _, store in ipairs(H.stores()) do
describe("a job stopped by hand while it runs, on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)

  local function job_row(id) return q:job(id) end

  it("keeps its key's slot until its worker has stopped it, then gives the lease up", function()
    q:declare("k", { partition = "args.key", per_key = { concurrency = 1 } })
    local started, ended = {}, {}
    H.run(function()
      -- A heartbeat far apart: the worker notices the cancel late, and the
      -- next job of the key must wait for it all that time.
      local w = tide.worker{ queue = q, queues = { k = 4 }, poll = 10, heartbeat = 300,
        on_outcome = function(ev) ended[ev.job.id] = core.now() end,
        targets = { t = {
          long = function(_, job) started[job.id] = core.now(); while true do tide.sleep(5) end end,
          quick = function(_, job) started[job.id] = core.now() end } } }
      local a = q:enqueue{ queue = "k", target = "t", method = "long", args = { key = "x" } }
      assert.is_true(H.wait_for(function() return started[a] ~= nil end, 3000))
      local b = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "x" } }
      local other = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "y" } }
      assert.is_true(q:cancel(a))
      local row = job_row(a)
      assert.equal("cancelled", row.status)
      assert.equal(w.id, row.lease_owner)                 -- still held: the worker has not stopped it yet
      local ok, why = q:retry(a)
      assert.is_nil(ok)
      assert.equal(("job %d is cancelled and still stopping on worker %s"):format(a, w.id), why)
      assert.is_true(H.wait_for(function() return started[b] ~= nil end, 5000))
      assert.is_not_nil(ended[a])
      assert.is_true(started[b] >= ended[a],
        ("job %d of key x started %.0f ms before the cancelled one stopped"):format(b, ended[a] - started[b]))
      assert.is_true(started[other] < ended[a])           -- another key was never held back
      assert.is_true(H.wait_for(function() return job_row(a).lease_owner == nil end, 3000))
      assert.equal("cancelled", job_row(a).status)
      assert.is_true(q:retry(a))                          -- stopped: it may run again
      w:stop()
      w:wait()
    end)
  end)

  it("counts a stopping job against its queue's concurrency too (q:expire, q:fail)", function()
    q:declare("g", { concurrency = 1 })
    local started, ended = {}, {}
    H.run(function()
      local w = tide.worker{ queue = q, queues = { g = 4 }, poll = 10, heartbeat = 300,
        on_outcome = function(ev) ended[ev.job.id] = core.now() end,
        targets = { t = {
          long = function(_, job) started[job.id] = core.now(); while true do tide.sleep(5) end end } } }
      local a = q:enqueue{ queue = "g", target = "t", method = "long" }
      assert.is_true(H.wait_for(function() return started[a] ~= nil end, 3000))
      local b = q:enqueue{ queue = "g", target = "t", method = "long" }
      assert.is_true(q:expire(a))
      assert.is_true(H.wait_for(function() return started[b] ~= nil end, 5000))
      assert.is_true(started[b] >= ended[a])
      local c = q:enqueue{ queue = "g", target = "t", method = "long" }
      assert.is_true(q:fail(b, "enough"))
      assert.is_true(H.wait_for(function() return started[c] ~= nil end, 5000))
      assert.is_true(started[c] >= ended[b])
      assert.equal("expired", job_row(a).status)
      assert.equal("discarded", job_row(b).status)
      assert.is_true(q:cancel_all{ status = "executing", queue = "g" } == 1)
      assert.is_true(H.wait_for(function() return ended[c] ~= nil and job_row(c).lease_owner == nil end, 3000))
      w:stop()
      w:wait()
    end)
  end)

  -- Broken before: `cancelled` is not among the default unique states, so
  -- the twin went in at once and ran beside the one still stopping.
  it("counts a stopping job as executing for uniqueness: its twin waits until it has stopped", function()
    local started, ended = {}, {}
    local unique = { period = "1h", keys = { "args.account" } }
    H.run(function()
      local w = tide.worker{ queue = q, queues = { u = 4 }, poll = 10, heartbeat = 300,
        on_outcome = function(ev) ended[ev.job.id] = core.now() end,
        targets = { t = {
          long = function(_, job) started[job.id] = core.now(); while true do tide.sleep(5) end end } } }
      local function enqueue(u)
        return q:enqueue{ queue = "u", target = "t", method = "long", args = { account = 7 }, unique = u }
      end
      local a = enqueue(unique)
      assert.is_true(H.wait_for(function() return started[a] ~= nil end, 3000))
      assert.is_true(q:cancel(a))
      assert.equal(w.id, job_row(a).lease_owner)          -- stopping: its worker has not noticed yet
      local again, inserted = enqueue(unique)
      assert.equal(a, again)                              -- the job of that key still runs
      assert.is_false(inserted)
      -- Without `executing` among the states, a job that runs does not count,
      -- stopping or not.
      local waiting = { period = "1h", keys = { "args.account" }, states = { "available", "scheduled" } }
      local b, b_inserted = enqueue(waiting)
      assert.is_true(b_inserted)
      assert.is_true(q:cancel(b))
      assert.is_true(H.wait_for(function() return job_row(a).lease_owner == nil end, 3000))
      assert.is_not_nil(ended[a])
      local c, c_inserted = enqueue(unique)                -- stopped: a cancelled job does not count
      assert.is_true(c_inserted)
      assert.is_true(c ~= a and c ~= b)
      assert.is_true(q:cancel(c))
      w:stop()
      w:wait()
    end)
  end)

  it("gives the slot back when the stopping job's worker died, once its lease ran out", function()
    q:declare("k", { partition = "args.key", per_key = { concurrency = 1 } })
    local started = {}
    H.run(function()
      local a = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "x" } }
      local expires = core.wallclock() + 400
      q:transaction(function(tx)
        tx:exec("UPDATE tide_jobs SET status = 'cancelled', completed_at = ?, attempt = 1, "
          .. "lease_owner = 'ghost:1:1', lease_expires = ? WHERE id = ?", core.wallclock(), expires, a)
      end)
      local b = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "x" } }
      local w = tide.worker{ queue = q, queues = { k = 4 }, poll = 10, heartbeat = 50, rescue_every = 50,
        targets = { t = { quick = function(_, job) started[job.id] = core.wallclock() end } } }
      assert.is_true(H.wait_for(function() return started[b] ~= nil end, 5000))
      assert.is_true(started[b] >= expires,
        ("job %d of key x started %.0f ms before the dead worker's lease ran out"):format(b, expires - started[b]))
      assert.is_nil(job_row(a).lease_owner)
      assert.equal("cancelled", job_row(a).status)
      assert.is_nil(started[a])
      w:stop()
      w:wait()
    end)
  end)
end)

describe("a stopping job whose worker process was killed -9, on " .. store.name, function()
  local TIDE = H.build .. "/tide"
  local ffi = require "ffi"
  pcall(ffi.cdef, "int kill(int pid, int sig);")

  it("keeps its key's slot until its lease ran out, then gives it back without running it again", function()
    local dir = H.tempdir()
    local url = store.fresh(dir .. "/jobs.db")
    local stamps = dir .. "/stamps"
    local targets = H.write_file(dir, "targets.lua", ([[
      local tide, core = require "tide", require "tide.core"
      local function stamp(what, job)
        local f = assert(io.open(%q, "a")); f:write(what, " ", job.id, " ", core.wallclock(), "\n"); f:close()
      end
      return { t = { long = function(_, job) stamp("S", job); tide.sleep(600000) end,
                     quick = function(_, job) stamp("S", job) end } }
    ]]):format(stamps))
    local function started()
      local out, f = {}, io.open(stamps)
      if f then
        for id, at in f:read("*a"):gmatch("S (%d+) (%d+)") do
          out[tonumber(id)] = out[tonumber(id)] or {}
          table.insert(out[tonumber(id)], tonumber(at))
        end
        f:close()
      end
      return out
    end
    local procs = {}
    local function worker()
      local p = assert(io.popen(("%s worker --store %s --quiet --queue k=4 --lease 1500 --poll 20 %s "
        .. "> %s/worker-%d.log 2>&1 & echo $!; exec 2>/dev/null; wait $!")
        :format(TIDE, url, targets, dir, #procs + 1)))
      procs[#procs + 1] = { pipe = p, pid = assert(tonumber(p:read("*l"))) }
      return procs[#procs]
    end
    local q = tide.queue.open(url)
    local ok, err = pcall(H.run, function()
      q:declare("k", { partition = "args.key", per_key = { concurrency = 1 } })
      local first = worker()
      local a = q:enqueue{ queue = "k", target = "t", method = "long", args = { key = "x" } }
      assert.is_true(H.wait_for(function() return started()[a] ~= nil end, 10000), "job a never started")
      assert.equal(0, ffi.C.kill(first.pid, 9))
      first.pipe:close(); first.pipe = nil
      assert.is_true(q:cancel(a))                    -- stopping, its worker dead: nobody will give the lease up
      local expires = q:job(a).lease_expires
      assert.is_not_nil(expires)
      local b = q:enqueue{ queue = "k", target = "t", method = "quick", args = { key = "x" } }
      worker()
      assert.is_true(H.wait_for(function() return started()[b] ~= nil end, 10000), "job b never started")
      local b_at = started()[b][1]
      assert(b_at >= expires - 5, ("job b of key x started %d ms before the dead worker's lease on a ran out")
        :format(expires - b_at))
      assert.equal(1, #started()[a])                 -- a was cancelled: the lease's end did not run it again
      assert.equal("cancelled", q:job(a).status)
      assert.is_true(H.wait_for(function() return q:job(a).lease_owner == nil end, 5000))
    end)
    for _, w in ipairs(procs) do
      if w.pipe then ffi.C.kill(w.pid, 15); w.pipe:close() end
    end
    q:close()
    store.reset(dir .. "/jobs.db")
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)
end)
end
