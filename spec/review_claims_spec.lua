-- spec/review_claims_spec.lua — a hostile review of the claimer's gathering (tide.jobs.claimer, commit 89cedeb):
-- under a backlog, a freed slot waits up to GATHER_MS for a quarter of the slots before it claims (PostgreSQL).
-- Each spec attacks one way the wait could stall, starve or delay a worker.  Several widen the window
-- (claimer.GATHER_MS, as worker_spec's own gathering spec does) so that a wait the code should not make shows
-- as seconds, not as noise of a loaded machine.
local tide = require "tide"
local claimer = require "tide.jobs.claimer"

local with_worker = spec_helper.run
local q                          -- each test's queue on a fresh store (spec_helper.fresh_queue_each)

--- Runs fn with claimer.GATHER_MS set to ms; restores it however fn ends.
local function with_window(ms, fn)
  local saved = claimer.GATHER_MS
  claimer.GATHER_MS = ms
  local ok, err = pcall(fn)
  claimer.GATHER_MS = saved
  assert(ok, err)
end

local function wait_until(pred, ms, what)
  local deadline = tide.now() + ms
  while not pred() do
    if tide.now() > deadline then error("timed out waiting for " .. what, 2) end
    tide.sleep(2)
  end
end

for _, store in ipairs(spec_helper.stores()) do
if store.name == "postgres" then
describe("the claimer's gathering on " .. store.name, function()
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  -- A job that sleeps args.ms; `started`/`ended` count them.
  local started, ended
  local targets = { t = { m = function(args)
    started = started + 1
    tide.sleep(args.ms)
    ended = ended + 1
  end } }

  it("stops promptly when w:stop() comes while a claimer gathers (not a poll later)", function()
    started, ended = 0, 0
    -- 20 slots: 4 jobs of 1.5 s and 16 of 2.5 s claimed first; 20 more wait (a backlog: the claim took all 20).
    -- When the 4 end, 4 slots of 20 are free: the claimer gathers (up to a quarter of the 1.5 s they held
    -- their slots, as GATHER_MS is wide here).
    for _ = 1, 4 do q:enqueue{ target = "t", method = "m", args = { ms = 1500 }, priority = -2 } end
    for _ = 1, 16 do q:enqueue{ target = "t", method = "m", args = { ms = 2500 }, priority = -1 } end
    for _ = 1, 20 do q:enqueue{ target = "t", method = "m", args = { ms = 1 } } end
    local box = {}
    with_window(5000, function()
      with_worker(function()
        local w = tide.worker{ queue = q, concurrency = 20, poll = 8000, targets = targets }
        wait_until(function() return ended >= 4 end, 5000, "the first jobs")
        tide.sleep(20)                       -- the claimer now gathers: 4 slots free of 20, 16 running
        box.started = started                -- (and has not claimed)
        local at = tide.now()
        w:stop(3000)
        w:wait()
        box.ms = tide.now() - at
      end)
    end)
    assert.equal(20, box.started)
    -- the 16 jobs end ~1 s after the stop: the stop waits for them, not for the poll (8 s)
    assert.is_true(box.ms < 3000, ("w:stop() + w:wait() took %.0f ms"):format(box.ms))
    local st = q:stats()
    assert.equal(20, st.completed)
    assert.equal(20, st.available)
  end)

  it("does not hold a slot for the window when the other slots hold long jobs (short jobs keep flowing)", function()
    started, ended = 0, 0
    -- 18 of 20 slots hold jobs of 10 s; 60 short jobs go through the 2 slots left
    for _ = 1, 18 do q:enqueue{ target = "t", method = "m", args = { ms = 10000 }, priority = -1 } end
    for _ = 1, 60 do q:enqueue{ target = "t", method = "m", args = { ms = 0 } } end
    local box = {}
    with_window(100, function()
      with_worker(function()
        local w = tide.worker{ queue = q, concurrency = 20, targets = targets }
        local at = tide.now()
        local ok, err = pcall(wait_until, function() return ended >= 60 end, 8000, "the short jobs")
        box.ms = tide.now() - at
        w:stop(0)
        w:wait()
        assert(ok, err)
      end)
    end)
    -- claiming the moment a slot frees: 60 jobs in ~30 claims of ~2 ms; waiting the
    -- window each time, 30 x 100 ms
    assert.is_true(box.ms < 1500, ("60 short jobs took %.0f ms on the 2 free slots"):format(box.ms))
  end)

  it("never gathers on a queue of 1 to 4 slots, and one queue's gathering does not delay another's", function()
    started, ended = 0, 0
    local small_ends = {}
    local t2 = { t = targets.t, s = { m = function(args)
      tide.sleep(args.ms)
      small_ends[#small_ends + 1] = tide.now()
    end } }
    for n = 1, 4 do
      q:enqueue{ queue = "q" .. n, target = "s", method = "m", args = { ms = 0 } }
      -- each of these ends one at a time
      for i = 1, 5 do q:enqueue{ queue = "q" .. n, target = "s", method = "m", args = { ms = i } } end
    end
    -- a big queue under a backlog, its jobs ending one at a time: its claimer gathers meanwhile
    for i = 1, 40 do q:enqueue{ queue = "big", target = "t", method = "m", args = { ms = 20 + i } } end
    local box = {}
    with_window(3000, function()
      with_worker(function()
        local w = tide.worker{ queue = q, queues = { q1 = 1, q2 = 2, q3 = 3, q4 = 4, big = 20 }, targets = t2 }
        local at = tide.now()
        local ok, err = pcall(wait_until, function() return #small_ends >= 24 end, 3000, "the small queues' jobs")
        box.ms = tide.now() - at
        w:stop(0)
        w:wait()
        assert(ok, err)
      end)
    end)
    -- ~6 jobs of <= 5 ms one after the other per queue: well under the window
    assert.is_true(box.ms < 1500, ("the small queues took %.0f ms"):format(box.ms))
  end)

  it("claims a job enqueued into an idle queue at once, though the queue is still marked as under a backlog", function()
    started, ended = 0, 0
    -- The last claim took all it asked for (20 of 20, nothing left), so qs.more stays true; all end at once.
    for _ = 1, 20 do q:enqueue{ target = "t", method = "m", args = { ms = 5 } } end
    local box = {}
    with_window(3000, function()
      with_worker(function()
        local w = tide.worker{ queue = q, concurrency = 20, targets = targets }
        wait_until(function() return ended >= 20 end, 3000, "the first jobs")
        tide.sleep(50)
        local at = tide.now()
        q:enqueue{ target = "t", method = "m", args = { ms = 0 } }
        local ok, err = pcall(wait_until, function() return ended >= 21 end, 5000, "the late job")
        box.ms = tide.now() - at
        w:stop()
        w:wait()
        assert(ok, err)
      end)
    end)
    assert.is_true(box.ms < 1000, ("the job enqueued into an idle worker waited %.0f ms"):format(box.ms))
  end)

  it("drains a backlog of jobs that end one at a time and exits promptly after the last", function()
    started, ended = 0, 0
    for i = 1, 60 do q:enqueue{ target = "t", method = "m", args = { ms = (i % 7) * 3 } } end
    local box = {}
    with_window(50, function()
      with_worker(function()
        local last
        local w = tide.worker{ queue = q, concurrency = 20, poll = 10000, targets = targets,
                               on_outcome = function() last = tide.now() end }
        local st = w:drain{ stop = true }
        box.after = tide.now() - last
        box.st = st
      end)
    end)
    assert.equal(60, box.st.completed)
    assert.equal(60, q:stats().completed)
    assert.is_true(box.after < 1000, ("the drain ended %.0f ms after the last outcome"):format(box.after))
  end)

  it("keeps a queue with limits (q:declare) and one without flowing while both gather", function()
    started, ended = 0, 0
    q:declare("lim", { concurrency = 20, partition = "args.k", per_key = { concurrency = 8 } })
    for i = 1, 60 do
      q:enqueue{ queue = "lim", target = "t", method = "m", args = { ms = 10 + i % 9 * 4, k = "k" .. i % 3 } }
      q:enqueue{ target = "t", method = "m", args = { ms = 10 + i % 7 * 5 } }
    end
    local box = {}
    with_window(200, function()
      with_worker(function()
        local w = tide.worker{ queue = q, queues = { lim = 20, default = 20 }, poll = 10000, targets = targets }
        local at = tide.now()
        local ok, err = pcall(wait_until, function() return ended >= 120 end, 20000, "the jobs")
        box.ms = tide.now() - at
        w:stop()
        w:wait()
        assert(ok, err)
      end)
    end)
    -- 60 jobs of <= 42 ms on 20 slots a queue: a few hundred ms; a stall waits out the poll (10 s)
    assert.is_true(box.ms < 5000, ("120 jobs took %.0f ms"):format(box.ms))
    assert.equal(120, q:stats().completed)
  end)

  it("writes the outcome of a job of a queue with limits at once: its slot in the store is held until then", function()
    started, ended = 0, 0
    -- 18 of the queue's 20 slots (declared: the claim counts executing rows) hold jobs of 10 s; 60 short
    -- jobs go through the 2 left, each claimable only once the outcome before it is written
    q:declare("lim", { concurrency = 20 })
    for _ = 1, 18 do q:enqueue{ queue = "lim", target = "t", method = "m", args = { ms = 10000 }, priority = -1 } end
    for _ = 1, 60 do q:enqueue{ queue = "lim", target = "t", method = "m", args = { ms = 0 } } end
    local outcomes = require "tide.jobs.outcomes"
    local saved = outcomes.GATHER_MS
    outcomes.GATHER_MS = 100                 -- (wide: a wait per outcome shows as seconds)
    local box = {}
    local ok, err = pcall(with_worker, function()
      local w = tide.worker{ queue = q, queues = { lim = 20 }, targets = targets }
      local at = tide.now()
      local fine, why = pcall(wait_until, function() return ended >= 60 end, 15000, "the short jobs")
      box.ms = tide.now() - at
      w:stop(0)
      w:wait()
      assert(fine, why)
    end)
    outcomes.GATHER_MS = saved
    assert(ok, err)
    assert.is_true(box.ms < 2500, ("60 short jobs took %.0f ms on the 2 free slots"):format(box.ms))
  end)

  it("claims at once when the slots a durable flow's write reserved come free (not a poll later)", function()
    -- One slot: a one-step flow's job and plain jobs take turns on it.  While the step's outcome is written
    -- the slot is reserved for the steps the write may lease (tide.jobs.outcomes); a claimer that looked
    -- then found no free slot, and nothing woke it when the write ended: it waited out the poll.
    package.preload["review_claims_flow"] = function()
      return { name = "review_claims_flow", tasks = { a = { run = function() return 1 end } } }
    end
    started, ended = 0, 0
    for i = 1, 20 do
      q:enqueue_flow("review_claims_flow", { i = i })
      q:enqueue{ target = "t", method = "m", args = { ms = 2 } }
      q:enqueue{ target = "t", method = "m", args = { ms = 2 } }
    end
    local box = {}
    with_worker(function()
      local w = tide.worker{ queue = q, concurrency = 1, poll = 2000, targets = targets }
      local at = tide.now()
      box.st = w:drain{ stop = true }
      box.ms = tide.now() - at
    end)
    package.preload["review_claims_flow"], package.loaded["review_claims_flow"] = nil, nil
    assert.equal(60, box.st.completed)
    -- 60 jobs of <= 2 ms one after the other: well under a second; one stall is the poll (2 s)
    assert.is_true(box.ms < 1500, ("60 jobs on one slot took %.0f ms"):format(box.ms))
  end)
end)
end
end
