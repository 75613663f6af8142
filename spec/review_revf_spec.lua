-- spec/review_revf_spec.lua — a hostile review of durable flows, per-key limits and dead letters: one test per defect found.
--
-- The flows are modules given through package.preload (a durable flow is
-- named by its module); every test runs on SQLite, and on PostgreSQL when
-- TIDE_PG_URL is set.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

package.path = "spec/fixtures/?.lua;" .. package.path     -- (revf_mod, for the steps run in a process)

_G.REVF = { n = 0, most = 0 }

--- A hook that notes how many hooks run at once.
local function busy_hook()
  local d = _G.REVF
  d.n = d.n + 1
  if d.n > d.most then d.most = d.n end
  require("tide").sleep(100)
  d.n = d.n - 1
end

package.preload.revf_hooks = function()
  return { name = "revf_hooks", fail = "continue", tasks = {
    a = { run = function() error("a fails", 0) end },
  }, on = { task_error = busy_hook, flow_done = busy_hook } }
end

package.preload.revf_process = function()
  return { name = "revf_process", tasks = {
    a = { mode = "process", run = "revf_mod.pid" },
    fan = { mode = "process", each = "revf_mod.pid", items = function() return { 1, 2 } end },
  } }
end

package.preload.revf_holes = function()
  return { name = "revf_holes", fail = "continue", tasks = {
    hole = { each = function(x) return x end, items = function() return { 1, nil, 3 } end },
    map = { each = function(x) return x end, items = function() return { a = 1 } end },
    list = { each = function(x) return x end, items = function() return { 1, 2 } end },
  } }
end

package.preload.revf_bytes = function()
  return { name = "revf_bytes", fail = "continue", tasks = {
    nul = { run = function() error("a\0b", 0) end },
    latin1 = { run = function() error("caf\233", 0) end },
  }, on = { task_error = function() end } }
end

--- A step that notes how many steps of its run's account run at once.
local function keyed_step(ctx)
  local d = _G.REVF
  local k = d.keys[ctx.input.account] or { n = 0, most = 0 }
  d.keys[ctx.input.account] = k
  k.n, d.n = k.n + 1, d.n + 1
  if k.n > k.most then k.most = k.n end
  if d.n > d.most then d.most = d.n end
  require("tide").sleep(60)
  k.n, d.n = k.n - 1, d.n - 1
end

package.preload.revf_keyed = function()
  return { name = "revf_keyed", tasks = {
    a = { run = keyed_step }, b = { run = keyed_step }, c = { run = keyed_step },
    fan = { each = function(_, ctx) return keyed_step(ctx) end, items = function() return { 1, 2 } end },
    last = { after = { "a", "b", "c", "fan" }, run = keyed_step },
  } }
end

package.preload.revf_one = function()
  return { name = "revf_one", tasks = { a = { run = function() return "a" end } } }
end

for _, store in ipairs(H.stores()) do
describe("review revf: durable flows on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)
  before_each(function() _G.REVF = { n = 0, most = 0 } end)

  -- Broken: run ids and q:flow_runs' limit and before were checked as
  -- integers >= 1 only (q:job bounds its id at 2^53, as a double holds it
  -- exactly): PostgreSQL's bigint refused 1e300 and 2^60 with a store
  -- error naming no function ("invalid input syntax for type bigint"), and
  -- a limit of 1e300 became LIMIT -9223372036854775808, which SQLite took
  -- for no limit at all and PostgreSQL refused.
  it("refuses run ids beyond 2^53 and a limit beyond 2^31 - 1, naming the function", function()
    local ID = "run id (integer from 1 to 2^53) expected"
    H.error_cases("spec/review_revf_spec.lua", {
      { function() q:flow_run(1e300) end, "q:flow_run: bad argument #1 (" .. ID .. ", got number 1e+300)" },
      { function() q:cancel_flow(2 ^ 60) end,
        "q:cancel_flow: bad argument #1 (" .. ID .. ", got number 1.1529215046068e+18)" },
      { function() q:retry_flow(1e300) end, "q:retry_flow: bad argument #1 (" .. ID .. ", got number 1e+300)" },
      { function() q:flow_runs{ limit = 1e300 } end,
        "q:flow_runs: bad option 'limit' (integer from 1 to 2147483647 expected, got number 1e+300)" },
      { function() q:flow_runs{ before = 1e300 } end,
        "q:flow_runs: bad option 'before' (" .. ID .. ", got number 1e+300)" },
    })
    assert.is_nil(q:flow_run(2 ^ 53))
    assert.same({}, q:flow_runs{ limit = 2147483647, before = 2 ^ 53 })
  end)

  -- Broken: the outcome write took a flow job's args as a flow wrote
  -- them.  A job of target tide.jobs.flowstep whose args.run was 1.5, or
  -- args.step a table (a row no flow wrote: enqueued by hand, or edited),
  -- made the store refuse the whole outcome batch ("invalid input syntax
  -- for type bigint" on PostgreSQL, "cannot bind parameter 2" on both),
  -- again at every try: the other jobs of the batch, a real flow's step
  -- among them, were never recorded (their leases ran out, and they ran
  -- again, and again).
  it("does not let a flow job with an odd run id in its args poison the outcome write", function()
    H.run(function()
      local id = q:enqueue_flow("revf_one", {})
      local odd = q:enqueue{ target = "tide.jobs.flowstep", method = "step", max_attempts = 1,
                             args = { run = id + 0.5, flow = "revf_one", step = "a" } }
      local odd2 = q:enqueue{ target = "tide.jobs.flowstep", method = "item", max_attempts = 1,
                              args = { run = id, flow = "revf_one", step = {}, index = 1 } }
      local plain = q:enqueue{ target = "t", method = "m" }
      local w = tide.worker{ queue = q, poll = 20, heartbeat = 50, targets = { t = { m = function() end } } }
      w:drain{ stop = true, within = 3000 }
      assert.equal(0, w.stats.write_errors, tostring(w.last_error))
      assert.equal("ok", q:flow_run(id).status)
      assert.equal("completed", q:job(plain).status)
      assert.equal("completed", q:job(odd).status)
      assert.equal("discarded", q:job(odd2).status)        -- (not a flow's: its step is no name)
    end)
  end)

  -- Broken: a durable step with mode = "process" ran in the worker's own
  -- Lua state when it had no timeout (only "thread" was sent away), so
  -- the isolation it asked for (a crash or a memory limit stays in a
  -- child) was silently dropped; and an `each` named by module
  -- ("mod.fn", as process and thread modes allow) in process mode was
  -- refused as "a nested flow".
  it("runs a step with mode = 'process' in a child process, timeout or not", function()
    H.run(function()
      local id = q:enqueue_flow("revf_process", {})
      local w = tide.worker{ queue = q, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 5000 }
      local run = q:flow_run(id)
      assert.equal("ok", run.status, tostring(run.error))
      local by = {}
      for _, s in ipairs(run.steps) do by[s.name] = s end
      assert.is_number(by.a.result)
      assert.are_not.equal(core.pid(), by.a.result)
      assert.are_not.equal(core.pid(), by.fan.result[1])
    end)
  end)

  -- Broken: a step's error went into the store as it came: one with
  -- invalid UTF-8 ("caf\233", Latin-1) made the task_error hook's event
  -- fail to encode, on every store, and one with a NUL byte made
  -- PostgreSQL refuse the row (text and jsonb hold no NUL): the outcome
  -- write failed at every try, and the run stayed running for ever.  The
  -- text is kept as every store can hold it (U+FFFD for each bad byte).
  it("fails a step whose error holds a NUL byte or invalid UTF-8, on every store alike", function()
    H.run(function()
      local id = q:enqueue_flow("revf_bytes", {})
      local w = tide.worker{ queue = q, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 3000 }
      assert.equal(0, w.stats.write_errors, tostring(w.last_error))
      local run = q:flow_run(id)
      assert.equal("error", run.status)
      local by = {}
      for _, s in ipairs(run.steps) do by[s.name] = s end
      assert.equal("a\239\191\189b", by.nul.error)
      assert.equal("caf\239\191\189", by.latin1.error)
    end)
  end)

  -- Broken (the review's design question, made a check): items with a
  -- hole ({ 1, nil, 3 }) or given as a map ({ a = 1 }) were cut short
  -- without a word: one item, or none and an "ok" step.
  it("fails a step whose items are not a list, naming the hole or the key", function()
    H.run(function()
      local id = q:enqueue_flow("revf_holes", {})
      local w = tide.worker{ queue = q, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 3000 }
      local by = {}
      for _, st in ipairs(q:flow_run(id).steps) do by[st.name] = st end
      assert.equal("error", by.hole.status)
      assert.matches("items must be a list (it has a hole at 2)", by.hole.error, 1, true)
      assert.equal("error", by.map.status)
      assert.matches('items must be a list (it has the key string "a")', by.map.error, 1, true)
      assert.equal("ok", by.list.status)
    end)
  end)

  -- Broken: the hook jobs of a change (task_error, flow_done) were leased
  -- at once to the worker writing it whatever its free slots: with
  -- queues = { default = 1 }, a failing step's task_error and the run's
  -- flow_done hooks ran together, two jobs of the queue at once on a
  -- worker allowed one (and on a queue with limits (q:declare), past the
  -- limit every worker obeys).  They now take a free slot as released
  -- steps do, else wait for a claim.
  it("runs a flow's hook jobs within the worker's slots", function()
    H.run(function()
      local id = q:enqueue_flow("revf_hooks", {})
      local w = tide.worker{ queue = q, queues = { default = 1 }, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 5000 }
      assert.equal("error", q:flow_run(id).status)
      assert.equal(1, _G.REVF.most)
    end)
  end)

  -- Broken: a flow's jobs carried no partition key, so a queue's per-key
  -- limits never held for them: with per_key = { concurrency = 1 }, the
  -- steps of one account's runs ran 3 at once.  A run's key is now its
  -- queue's partition of its input, and every job of the run has it.
  it("holds a declared queue's per-key limits for the jobs of a flow, by the partition of its input", function()
    q:declare("acct", { partition = "args.account", per_key = { concurrency = 1 } })
    _G.REVF.keys = {}
    local ids = {}
    H.run(function()
      ids[1] = q:enqueue_flow("revf_keyed", { account = "ada" }, { queue = "acct" })
      ids[2] = q:enqueue_flow("revf_keyed", { account = "ada" }, { queue = "acct" })
      q:transaction(function(tx) ids[3] = tx:enqueue_flow("revf_keyed", { account = "bob" }, { queue = "acct" }) end)
      local w = tide.worker{ queue = q, queues = { acct = 10 }, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 15000 }
    end)
    assert.equal(1, _G.REVF.keys.ada.most)
    assert.equal(1, _G.REVF.keys.bob.most)
    assert.equal(2, _G.REVF.most)                  -- (the two accounts did not wait for each other)
    for i, id in ipairs(ids) do
      local run = q:flow_run(id)
      assert.equal("ok", run.status, "run " .. i)
      assert.equal(i < 3 and "ada" or "bob", run.partition_key)
      for _, step in ipairs(run.steps) do
        if step.job then assert.equal(run.partition_key, q:job(step.job).partition_key, step.name) end
      end
    end
  end)

  it("refuses a flow whose input the queue's partition cannot key, naming the call", function()
    q:declare("acct", { partition = function(args) return args.account end })
    assert.error_matches(function() q:enqueue_flow("revf_keyed", { account = { 1 } }, { queue = "acct" }) end,
      "q:enqueue_flow: the partition of queue 'acct' gave")
    assert.error_matches(function() q:enqueue_flow("revf_keyed", 5, { queue = "acct" }) end,
      "q:enqueue_flow: the partition function of queue 'acct' failed")
    assert.same({}, q:flow_runs())
  end)

  it("runs a flow's hook jobs within a declared concurrency", function()
    q:declare("lim", { concurrency = 1 })
    H.run(function()
      local id = q:enqueue_flow("revf_hooks", {}, { queue = "lim" })
      local w = tide.worker{ queue = q, queues = { lim = 4 }, poll = 20, heartbeat = 50 }
      w:drain{ stop = true, within = 5000 }
      assert.equal("error", q:flow_run(id).status)
      assert.equal(1, _G.REVF.most)
    end)
  end)
end)

describe("review revf: dead letters on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)

  -- Broken: an attempt's error went into the job's errors with its NUL
  -- bytes as \u0000, which PostgreSQL's jsonb refuses ("unsupported
  -- Unicode escape sequence"): a job that raised error("a\0b") made the
  -- whole outcome batch fail at every try, so neither it nor the jobs
  -- written with it were ever recorded (each ran again after its lease),
  -- and q:fail(id, "r\0s") raised that store error.  SQLite kept the NUL:
  -- now both keep U+FFFD, as for invalid UTF-8.
  it("keeps the error of an attempt that raised a NUL byte, and of q:fail with one", function()
    H.run(function()
      local a = q:enqueue{ target = "t", method = "nul", max_attempts = 1 }
      local c = q:enqueue{ target = "t", method = "ok" }
      local w = tide.worker{ queue = q, poll = 20, heartbeat = 50, targets = { t = {
        nul = function() error("a\0b", 0) end, ok = function() end } } }
      w:drain{ stop = true, within = 3000 }
      assert.equal(0, w.stats.write_errors, tostring(w.last_error))
      local job = q:job(a)
      assert.equal("discarded", job.status)
      assert.equal("a\239\191\189b", job.errors[1].error)
      assert.equal("completed", q:job(c).status)
      -- the dead letter runs again with its data, and keeps its errors
      local d = q:enqueue{ target = "t", method = "ok", args = { keep = "x\0y" } }
      assert.is_true(q:fail(d, "r\0s"))
      assert.equal("r\239\191\189s", q:job(d).errors[1].error)
      assert.is_true(q:retry(d))
      local w2 = tide.worker{ queue = q, poll = 20, heartbeat = 50, targets = { t = { ok = function(args)
        assert(args.keep == "x\0y") end } } }
      w2:drain{ stop = true, within = 3000 }
      job = q:job(d)
      assert.equal("completed", job.status)
      assert.same({ keep = "x\0y" }, job.args)
      assert.equal(1, #job.errors)
    end)
  end)
end)

describe("review revf: per-key limits on " .. store.name, function()
  local q
  H.fresh_queue_each(store, function(new) q = new end)

  -- Broken: a key's rate counted the jobs whose attempted_at fell in the
  -- window, and a retry overwrites attempted_at: with "3/s", a job that
  -- failed at once and was claimed again 40 ms later took its first
  -- start out of the count, so a third and a fourth job of the key were
  -- claimed within the same second (4 starts: 0, 0, 40, 300 ms).  A job
  -- tried before is now claimed only once its last start has left the
  -- window, so that no start it made is forgotten while it still counts.
  it("counts a retried job's earlier start in its key's rate", function()
    q:declare("r", { partition = "args.key", per_key = { rate = "3/s" } })
    local starts = {}
    H.run(function()
      local w = tide.worker{ queue = q, queues = { r = 4 }, poll = 20, heartbeat = 100,
        retry = { base = 30, max = 30, jitter = false }, targets = { t = { m = function(args, job)
          starts[#starts + 1] = core.wallclock()
          if args.fail and job.attempt == 1 then error("the first attempt fails", 0) end
        end } } }
      q:enqueue{ queue = "r", target = "t", method = "m", args = { key = "x", fail = true } }
      q:enqueue{ queue = "r", target = "t", method = "m", args = { key = "x" } }
      tide.sleep(300)
      for _ = 1, 2 do q:enqueue{ queue = "r", target = "t", method = "m", args = { key = "x" } } end
      assert.is_true(H.wait_for(function() return #starts == 5 end, 5000))
      w:stop()
      w:wait()
    end)
    table.sort(starts)
    -- (the method starts a little after its claim: 900 ms of starts hold
    -- at most the rate's 3, whatever the claims' own instants)
    for i = 1, #starts - 3 do
      assert(starts[i + 3] - starts[i] > 900, ("4 starts of key x within %.0f ms (rate 3/s)"):format(starts[i + 3] - starts[i]))
    end
  end)
end)
end
