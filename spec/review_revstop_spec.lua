-- spec/review_revstop_spec.lua — review of "a job stopped by hand while it
-- runs keeps its lease until its worker has stopped it" (spec/stopping_spec):
-- the paths where that lease was not given up, or given up for the wrong
-- attempt.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

for _, store in ipairs(H.stores()) do
describe("review: a stopping job's lease, on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)

  local function lease_of(id) return q:job(id).lease_owner end

  -- Broken before: drain{ stop = false } looked at the worker's running
  -- jobs and pending outcomes only; the lease of the job it had just stopped
  -- was still held (its key's slot too) when it returned, and q:retry of
  -- that job said "still stopping".
  it("w:drain{ stop = false } returns once the lease of a job it stopped is given up", function()
    H.run(function()
      local started = {}
      local w = tide.worker{ queue = q, queues = { default = 2 }, poll = 10, heartbeat = 50,
        targets = { t = { long = function(_, job) started[job.id] = true; while true do tide.sleep(5) end end } } }
      -- (an unlease that waits a while for the store: the worker's call
      -- with (owner, ids) for arguments)
      local queue = require "tide.jobs.queue"
      local worker_call = queue.worker_call
      queue.worker_call = function(q_, s, fname, fn, ...)
        local n, a2 = select("#", ...), select(2, ...)
        if n == 2 and type(a2) == "table" then tide.sleep(200) end
        return worker_call(q_, s, fname, fn, ...)
      end
      local ok, err = pcall(function()
        local a = q:enqueue{ target = "t", method = "long" }
        assert.is_true(H.wait_for(function() return started[a] end, 3000))
        assert.is_true(q:cancel(a))
        w:drain{ stop = false }
        assert.is_nil(lease_of(a))
        assert.is_true(q:retry(a))
      end)
      queue.worker_call = worker_call
      w:stop()
      w:wait()
      assert(ok, err)
    end)
  end)
end)
end
