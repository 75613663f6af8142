-- spec/limits_spec.lua — per-key limits and uniqueness over time, across processes, on every store.
--
-- 1. Limits: 4 worker processes drain three queues declared with q:declare:
--    "pk" (partition "args.key", per_key.concurrency = 2; a busy key "a"
--    of 100 jobs of 50 ms, keys "b" and "c" of 10 jobs each), "rate"
--    (per_key.rate = "50/s"; 150 quick jobs of key "d") and "glob"
--    (concurrency = 3 across all workers).  Each job writes its start and
--    end (the monotonic clock, which processes share) to its process's
--    file; then every instant is checked (never more than 2 of a key, 3 of
--    "glob"; and those limits were reached), every sliding window of the
--    rate (on the claims' own times, attempted_at), and that the busy key
--    held no job of the others back for more than a claim interval (the
--    poll, 1 s: a job of b or c starts within it of the moment a slot of
--    its key was free), where key a alone needs 2.5 s.
-- 2. Uniqueness: 8 processes enqueue the same 20 accounts at the same
--    instant with unique = { period = "1h", keys = { "args.account" } }:
--    exactly one job per account, every process got its id, one of them
--    with true.  Then they hammer for 1.5 s with a period of 200 ms: no
--    two jobs of an account were inserted less than 200 ms apart.
--
-- LIMITS_KEEP=1 keeps the directory (the processes' files) for a look.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

local WORKER = [[
local tide = require "tide"
local core = require "tide.core"
local url, dir, n = ...
local out = assert(io.open(dir .. "/times." .. n, "w"))
local function note(what, job, key)
  out:write(what, " ", job.id, " ", key, " ", string.format("%.3f", core.now()), "\n")
end
local st = tide.run(function()
  local q = tide.queue.open(url)
  local w = tide.worker{ queue = q, queues = { pk = 6, rate = 10, glob = 4 }, targets = { t = {
    work = function(args, job)
      note("S", job, args.key)
      tide.sleep(args.ms)
      note("E", job, args.key)
    end } } }
  w:drain{ stop = true }
  q:close()
end)
out:close()
local f = assert(io.open(dir .. "/done." .. n, "w")); f:write(tostring(st)); f:close()
]]

local RACER = [[
local tide = require "tide"
local core = require "tide.core"
local url, dir, n, go = ...
local out = assert(io.open(dir .. "/ids." .. n, "w"))
local status, err = tide.run(function()
  local q = tide.queue.open(url)
  while core.now() < tonumber(go) do tide.sleep(1) end
  for acct = 1, 20 do
    local id, inserted = q:enqueue{ target = "t", method = "m", args = { account = acct, from = n },
                                    unique = { period = "1h", keys = { "args.account" } } }
    out:write("1 ", acct, " ", id, " ", tostring(inserted), "\n")
  end
  local t0 = core.now()
  while core.now() - t0 < 1500 do
    for acct = 1, 5 do
      local id, inserted = q:enqueue{ queue = "short", target = "t", method = "m", args = { account = acct },
                                      unique = { period = 200, keys = { "args.account" } } }
      out:write("2 ", acct, " ", id, " ", tostring(inserted), "\n")
    end
    tide.sleep(math.random(0, 3))
  end
  q:close()
end)
assert(status == "ok", tostring(err))
out:close()
local f = assert(io.open(dir .. "/done." .. n, "w")); f:write("ok"); f:close()
]]

local function read(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- Starts `n` processes of `script` (args: url, dir, i, extra); waits
--- (inside a task) until each wrote dir/done.i.
local function processes(dir, url, name, script, n, extra, timeout_s)
  H.write_file(dir, name, script)
  for i = 1, n do
    os.execute(("cd %s && LUA_CPATH='%s/?.so;;' timeout %d luajit %s/%s '%s' %s %d %s > %s/log.%d 2>&1 &")
      :format(os.getenv("PWD") or ".", H.build, timeout_s, dir, name, url, dir, i, extra or "", dir, i))
  end
  local t0 = core.now()
  for i = 1, n do
    while not read(dir .. "/done." .. i) do
      if core.now() - t0 > timeout_s * 1000 then
        error(("process %d did not finish in %d s: %s"):format(i, timeout_s, tostring(read(dir .. "/log." .. i))))
      end
      tide.sleep(50)
    end
  end
end

--- The most intervals { s, e } open at one instant (an end before a start at the same time).
local function most_at_once(list)
  local ev = {}
  for _, iv in ipairs(list) do ev[#ev + 1] = { iv.s, 1 }; ev[#ev + 1] = { iv.e, -1 } end
  table.sort(ev, function(x, y) if x[1] ~= y[1] then return x[1] < y[1] end return x[2] < y[2] end)
  local n, most = 0, 0
  for _, e in ipairs(ev) do n = n + e[2]; if n > most then most = n end end
  return most
end

for _, store in ipairs(H.stores()) do
describe("q:declare and unique on " .. store.name, function()
  local q, path
  before_each(function()
    path = os.tmpname()
    q = tide.queue.open(store.fresh(path))
  end)
  after_each(function()
    q:close()
    store.reset(path)
    os.remove(path)
    H.assert_idle()
  end)

  it("stores the limits for every worker, and the partition key with each job", function()
    assert.is_nil(q:limits("mail"))
    assert.is_true(q:declare("mail", { concurrency = 10, partition = "args.customer.id",
                                        per_key = { concurrency = 2, rate = "100/min" } }))
    assert.same({ concurrency = 10, partition = "args.customer.id",
                  per_key = { concurrency = 2, rate = { limit = 100, period = 60000 } } }, q:limits("mail"))
    local a = q:enqueue{ queue = "mail", target = "t", method = "m", args = { customer = { id = 7 } } }
    local b = q:enqueue{ queue = "mail", target = "t", method = "m", args = { customer = {} } }
    local c = q:enqueue{ target = "t", method = "m", args = { customer = { id = 7 } } }   -- another queue
    assert.equal("7", q:job(a).partition_key)
    assert.is_nil(q:job(b).partition_key)               -- no key: limited by concurrency only
    assert.is_nil(q:job(c).partition_key)
    q:declare("mail", { partition = function(args) return args.customer.id and args.customer.id * 2 end })
    assert.same({ partition = "function" }, q:limits("mail"))   -- declared again: replaced
    local d = q:enqueue{ queue = "mail", target = "t", method = "m", args = { customer = { id = 1.5 } } }
    assert.equal("3", q:job(d).partition_key)
  end)

  it("holds a worker that started before the declaration to the limits at once", function()
    local running, most, ran = 0, 0, 0
    H.run(function()
      local w = tide.worker{ queue = q, queues = { late = 5 }, poll = 50, targets = { t = { m = function()
        running = running + 1
        most = math.max(most, running)
        tide.sleep(20)
        running = running - 1
        ran = ran + 1
      end } } }
      tide.sleep(100)                                   -- it has claimed: it knows the queue as unlimited
      q:declare("late", { concurrency = 1 })
      for _ = 1, 5 do q:enqueue{ queue = "late", target = "t", method = "m" } end
      local t0 = core.now()
      while ran < 5 and core.now() - t0 < 10000 do tide.sleep(10) end
      w:stop()
      w:wait()
    end)
    assert.equal(5, ran)
    assert.equal(1, most)
  end)

  it("claims a job its key's rate held back when the rate's window reopens, not at the next poll", function()
    q:declare("r", { partition = "args.key", per_key = { rate = "2/s" } })
    local ids = {}
    for i = 1, 4 do ids[i] = q:enqueue{ queue = "r", target = "t", method = "m", args = { key = "a", i = i } } end
    local starts = {}
    H.run(function()
      local w = tide.worker{ queue = q, queues = { r = 4 }, poll = 10000, targets = { t = { m = function()
        starts[#starts + 1] = core.now()
      end } } }
      local t0 = core.now()
      while #starts < 4 and core.now() - t0 < 6000 do tide.sleep(10) end
      w:stop()
      w:wait()
    end)
    assert.equal(4, #starts)
    -- The claims' own times (attempted_at, which the rate counts): the
    -- window reopens 1000 ms after the first two were claimed; the poll is
    -- 10 s, and without a wake-up the third waited for it.
    local claimed = {}
    for i = 1, 4 do claimed[i] = q:job(ids[i]).attempted_at end
    table.sort(claimed)
    local waited = claimed[3] - claimed[1]
    assert.is_true(waited >= 1000, "the rate let a third job be claimed " .. waited .. " ms after the first")
    assert.is_true(waited < 3000, "the third job was claimed " .. waited .. " ms after the first (window: 1000 ms)")
  end)

  it("returns the existing job and false for a duplicate inside the period, and a new one outside it", function()
    local u = { period = "1h", keys = { "args.account" } }
    local id, inserted = q:enqueue{ target = "t", method = "m", args = { account = 1, n = 1 }, unique = u }
    assert.is_true(inserted)
    assert.same({ id, false }, { q:enqueue{ target = "t", method = "m", args = { account = 1, n = 2 }, unique = u } })
    assert.is_true(select(2, q:enqueue{ target = "t", method = "m", args = { account = 2 }, unique = u }))
    assert.is_true(select(2, q:enqueue{ target = "t", method = "other", args = { account = 1 }, unique = u }))
    assert.is_true(select(2, q:enqueue{ queue = "q2", target = "t", method = "m", args = { account = 1 }, unique = u }))
    -- keys default to the whole args, compared as values (key order does not matter)
    local w = { period = 60000 }
    local x = q:enqueue{ target = "t", method = "m", args = { a = 1, b = { 2, 3 } }, unique = w }
    assert.same({ x, false }, { q:enqueue{ target = "t", method = "m", args = { b = { 2, 3 }, a = 1 }, unique = w } })
    assert.is_true(select(2, q:enqueue{ target = "t", method = "m", args = { a = 1, b = { 3, 2 } }, unique = w }))
    -- only jobs in `states` count: a cancelled one does not
    local s = { period = "1h", states = { "available", "scheduled" } }
    local y = q:enqueue{ target = "t", method = "s", unique = s }
    assert.is_true(q:cancel(y))
    local z, fresh = q:enqueue{ target = "t", method = "s", unique = s }
    assert.is_true(fresh)
    assert.are_not.equal(y, z)
    -- the period: a job older than it does not count
    local p = { period = 30 }
    local first = q:enqueue{ target = "t", method = "p", unique = p }
    assert.same({ first, false }, { q:enqueue{ target = "t", method = "p", unique = p } })
    local t0 = core.now()
    while core.now() - t0 < 40 do end
    assert.is_true(select(2, q:enqueue{ target = "t", method = "p", unique = p }))
    -- in a batch, and inside a transaction
    local ids, n = q:enqueue_many{ { target = "t", method = "b", unique = p }, { target = "t", method = "b", unique = p } }
    assert.equal(1, n)
    assert.equal(ids[1], ids[2])
    q:transaction(function(tx)
      local i1 = tx:enqueue{ target = "t", method = "x", unique = u, args = { account = 9 } }
      assert.same({ i1, false }, { tx:enqueue{ target = "t", method = "x", unique = u, args = { account = 9 } } })
    end)
  end)

  it("refuses bad options, naming the function, the option and what was expected", function()
    H.error_cases("spec/limits_spec.lua", {
      { function() q:declare(7, {}) end,
        "q:declare: bad argument #1 (queue name (letters, digits, _ . -) expected, got number 7)" },
      { function() q:declare("mail") end, "q:declare: bad argument #2 (table of queue options expected, got nil)" },
      { function() q:declare("mail", { size = 2 }) end, "q:declare: unknown option 'size'" },
      { function() q:declare("mail", { concurrency = 0 }) end,
        "q:declare: bad option 'concurrency' (integer from 1 to 2147483647 expected, got number 0)" },
      { function() q:declare("mail", { partition = "account" }) end,
        "q:declare: bad option 'partition' (function(args) or path into args, like \"args.account\" or "
        .. "\"$.customer.id\" expected, got string \"account\")" },
      { function() q:declare("mail", { per_key = { concurrency = 2 } }) end,
        "q:declare: per_key needs a partition (a function(args) or a path into args, like \"args.account\")" },
      { function() q:declare("mail", { partition = "$.a", per_key = { rate = "100/fortnight" } }) end,
        "q:declare: bad option 'per_key.rate' (rate like \"100/min\", \"50/s\" or \"10/5s\" expected, "
        .. "got string \"100/fortnight\")" },
      { function() q:declare("mail", { partition = "$.a", per_key = { limit = 2 } }) end,
        "q:declare: unknown option 'per_key.limit'" },
      { function() q:enqueue{ target = "t", method = "m", unique = { period = "1h" }, idempotency_key = "k" } end,
        "q:enqueue: give idempotency_key or unique, not both" },
      { function() q:enqueue{ target = "t", method = "m", unique = { states = { "available" } } } end,
        "q:enqueue: bad option 'unique.period' (positive duration below 8000 years (ms, or like \"1h\", \"30s\") "
        .. "expected, got nil)" },
      -- (SQLite took it; PostgreSQL's bigint did not)
      { function() q:enqueue{ target = "t", method = "m", unique = { period = 1e300 } } end,
        "q:enqueue: bad option 'unique.period' (positive duration below 8000 years (ms, or like \"1h\", \"30s\") "
        .. "expected, got number 1e+300)" },
      { function() q:enqueue{ target = "t", method = "m", unique = { period = 10, states = { "running" } } } end,
        "q:enqueue: bad option 'unique.states[1]' (" .. require("tide.engine.check").choices(require("tide.jobs.job").is_status)
        .. " expected, got string \"running\")" },
      { function() q:enqueue{ target = "t", method = "m", unique = { period = 10, keys = { "account" } } } end,
        "q:enqueue: bad option 'unique.keys[1]' (\"args\" or path into args, like \"args.account\" or "
        .. "\"$.customer.id\" expected, got string \"account\")" },
      { function() q:enqueue{ target = "t", method = "m", unique = { period = 10, every = 2 } } end,
        "q:enqueue: unknown option 'unique.every'" },
    })
    q:declare("p", { partition = function(args) return args end })
    H.error_cases("spec/limits_spec.lua", {
      { function() q:enqueue{ queue = "p", target = "t", method = "m", args = {} } end,
        "q:enqueue: the partition of queue 'p' gave table (string, number, boolean or nil expected)" },
    })
    q:declare("p", { partition = function() error("no account", 0) end })
    H.error_cases("spec/limits_spec.lua", {
      { function() q:enqueue{ queue = "p", target = "t", method = "m", args = {} } end,
        "q:enqueue: the partition function of queue 'p' failed: no account" },
    })
  end)
end)

describe("limits and uniqueness across processes on " .. store.name, function()
  local dir, url, path
  before_each(function()
    dir = H.tempdir()
    path = dir .. "/jobs.db"
    url = store.fresh(path)
  end)
  after_each(function()
    store.reset(path)
    if os.getenv("LIMITS_KEEP") then print("kept " .. dir) else os.execute("rm -rf " .. dir) end
    H.assert_idle()
  end)

  it("never runs more than per_key.concurrency of a key, nor more than the rate, nor holds other keys back", function()
    local q = tide.queue.open(url)
    q:declare("pk", { partition = "args.key", per_key = { concurrency = 2 } })
    q:declare("rate", { partition = function(args) return args.key end, per_key = { rate = "50/s" } })
    q:declare("glob", { concurrency = 3 })
    local list = {}
    for _ = 1, 100 do list[#list + 1] = { queue = "pk", target = "t", method = "work", args = { key = "a", ms = 50 } } end
    for _, k in ipairs{ "b", "c" } do
      for _ = 1, 10 do list[#list + 1] = { queue = "pk", target = "t", method = "work", args = { key = k, ms = 30 } } end
    end
    for _ = 1, 150 do list[#list + 1] = { queue = "rate", target = "t", method = "work", args = { key = "d", ms = 1 } } end
    for _ = 1, 30 do list[#list + 1] = { queue = "glob", target = "t", method = "work", args = { key = "g", ms = 30 } } end
    q:enqueue_many(list)
    H.run(function() processes(dir, url, "worker.lua", WORKER, 4, nil, 120) end)
    -- every job completed, in one attempt
    local by_id, rows = {}, q:list{ limit = 1000 }
    assert.equal(#list, #rows)
    for _, j in ipairs(rows) do
      assert.equal("completed", j.status)
      assert.equal(1, j.attempt)
      by_id[j.id] = j
    end
    -- the processes' own records
    local iv, keys = {}, {}
    for i = 1, 4 do
      assert.equal("ok", read(dir .. "/done." .. i), read(dir .. "/log." .. i))
      for what, id, key, t in read(dir .. "/times." .. i):gmatch("(%a) (%d+) (%a) (%S+)\n") do
        id, t = tonumber(id), tonumber(t)
        local r = iv[id] or { key = key }
        iv[id] = r
        if what == "S" then r.s = t else r.e = t end
        assert.equal(by_id[id].partition_key or "g", key)
      end
    end
    for id, r in pairs(iv) do
      assert(r.s and r.e, "job " .. id .. " has no start or end")
      keys[r.key] = keys[r.key] or {}
      table.insert(keys[r.key], r)
    end
    -- every instant: at most 2 of a key (and 2 reached), at most 3 of glob
    for _, k in ipairs{ "a", "b", "c" } do
      assert.equal(k == "a" and 100 or 10, #keys[k])
      assert.equal(2, most_at_once(keys[k]), "key " .. k)
    end
    assert.equal(3, most_at_once(keys.g), "queue glob (concurrency 3 across 4 workers of 4)")
    -- every sliding window of 1 s: at most 50 starts of key d (the claims' times)
    local starts = {}
    for _, j in ipairs(rows) do if j.queue == "rate" then starts[#starts + 1] = j.attempted_at end end
    table.sort(starts)
    assert.equal(150, #starts)
    local lo = 1
    for hi = 1, #starts do
      while starts[lo] <= starts[hi] - 1000 do lo = lo + 1 end
      assert(hi - lo + 1 <= 50, ("%d starts of key d within 1 s, ending at %.0f"):format(hi - lo + 1, starts[hi]))
    end
    assert(starts[#starts] - starts[1] > 2000, "150 starts at 50/s took only " .. (starts[#starts] - starts[1]) .. " ms")
    -- the busy key held nobody back: key a needs 2.5 s; a job of b or c
    -- starts within a claim interval of its key having a free slot
    local first = math.huge
    for _, r in pairs(iv) do first = math.min(first, r.s) end
    local a_span = 0
    for _, r in ipairs(keys.a) do a_span = math.max(a_span, r.e - first) end
    assert(a_span > 2500, "key a took only " .. a_span .. " ms")
    for _, k in ipairs{ "b", "c" } do
      local s, e = {}, {}
      for _, r in ipairs(keys[k]) do s[#s + 1] = r.s; e[#e + 1] = r.e end
      table.sort(s); table.sort(e)
      for i = 1, #s do
        local free = i <= 2 and first or e[i - 2]       -- the (i-2)th end freed the slot the ith takes
        assert(s[i] - free <= 1000, ("job %d of key %s started %.0f ms after its slot was free"):format(i, k, s[i] - free))
      end
    end
    q:close()
  end)

  it("keeps exactly one job per key and window when 8 processes race", function()
    local q = tide.queue.open(url)
    H.run(function() processes(dir, url, "racer.lua", RACER, 8, string.format("%.0f", core.now() + 3000), 60) end)
    local phase1, phase2 = {}, {}
    for i = 1, 8 do
      for p, acct, id, inserted in read(dir .. "/ids." .. i):gmatch("(%d) (%d+) (%d+) (%a+)\n") do
        local t = p == "1" and phase1 or phase2
        acct = tonumber(acct)
        t[acct] = t[acct] or { ids = {}, inserted = {} }
        t[acct].ids[tonumber(id)] = true
        if inserted == "true" then t[acct].inserted[#t[acct].inserted + 1] = tonumber(id) end
      end
    end
    local rows = q:list{ queue = "default", limit = 1000 }
    assert.equal(20, #rows)                             -- exactly one job per account
    for acct = 1, 20 do
      local n = 0
      for _ in pairs(phase1[acct].ids) do n = n + 1 end
      assert.equal(1, n, "account " .. acct .. ": the processes got different ids")
      assert.equal(1, #phase1[acct].inserted, "account " .. acct .. ": inserted by more than one process")
    end
    local by_acct = {}
    for _, j in ipairs(q:list{ queue = "short", limit = 10000 }) do
      local a = j.args.account
      by_acct[a] = by_acct[a] or {}
      table.insert(by_acct[a], j.inserted_at)
    end
    for acct = 1, 5 do
      local t = by_acct[acct]
      table.sort(t)
      assert(#t >= 3, "account " .. acct .. ": only " .. #t .. " jobs in 1.5 s with a period of 200 ms")
      for i = 2, #t do
        assert(t[i] - t[i - 1] >= 200, ("account %d: two jobs %.0f ms apart"):format(acct, t[i] - t[i - 1]))
      end
      assert.equal(#t, #phase2[acct].inserted)          -- each inserted job was reported inserted once
    end
    q:close()
  end)
end)
end
