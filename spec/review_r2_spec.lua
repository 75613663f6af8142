-- spec/review_r2_spec.lua — review r2: the durable jobs' public surface on
-- both stores (queue and transaction functions, job data, keys, the
-- command line).  Each test names what a user does, and a comment says
-- what was broken before its fix.
local tide = require "tide"

--- fn(q) as a task with a deadline: a statement that hangs fails the test
--- (as a timeout) instead of hanging the spec run.
local function in_task(fn, ...)
  local args = { n = select("#", ...), ... }
  return spec_helper.run(function()
    local t = tide.spawn{ run = function() return fn(unpack(args, 1, args.n)) end, timeout = 5000 }
    return t:await()
  end)
end

for _, store in ipairs(spec_helper.stores()) do
describe("review r2: tide.queue on " .. store.name, function()
  local path, q, url

  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
    q = tide.queue.open(url)
  end)

  after_each(function()
    if q then q:close(); q = nil end
    store.reset(path)
    spec_helper.assert_idle()
  end)

  -- Broken: on PostgreSQL the first statement of a transaction goes in one
  -- pipeline with its BEGIN; a parameter the binding refused (a table, a
  -- function, cdata) or a NUL in the SQL raised after the BEGIN was queued
  -- and before the Sync, so the transaction's next statement waited for
  -- ever (outside a task, the process hung in poll).
  it("refuses a bad parameter of tx:exec, naming it, and the transaction goes on", function()
    local cases = {
      { function(tx) return tx:exec("SELECT ?", {}) end,
        "tx:exec: bad argument #2 (nil, boolean, number or string (parameter 1) expected, got table)" },
      { function(tx) return tx:query("SELECT ?, ?", 1, print) end,
        "tx:query: bad argument #3 (nil, boolean, number or string (parameter 2) expected, got function)" },
      { function(tx) return tx:exec("SELECT ?", 1LL) end,
        "tx:exec: bad argument #2 (nil, boolean, number or string (parameter 1) expected, got cdata)" },
      { function(tx) return tx:exec("SELECT 1\0 x") end,
        "tx:exec: bad argument #1 (SQL text expected, got a string with a NUL byte at byte 9)" },
    }
    for i, case in ipairs(cases) do
      local status, v = in_task(function()
        return q:transaction(function(tx)
          local ok, err = pcall(case[1], tx)
          assert(not ok, "case " .. i .. " did not fail")
          local msg = tostring(err):match("^[^:]+:%d+: (.*)$") or tostring(err)
          assert(msg == case[2], ("case %d: %s"):format(i, tostring(err)))
          tx:exec("CREATE TABLE IF NOT EXISTS orders (id integer)")
          tx:exec("INSERT INTO orders VALUES (?)", i)
          return tx:query("SELECT count(*) AS n FROM orders")[1].n
        end)
      end)
      assert.equal("ok", status, tostring(v))
      assert.equal(i, tonumber(v))
    end
  end)

  -- Broken: SQLite ran the SQL up to a NUL byte and dropped the rest unseen
  -- (its "more SQL follows" check stopped at the NUL too): tx:exec("SELECT
  -- 1\0; DROP TABLE orders") returned as if all had run.
  it("refuses SQL with a NUL byte in tx:exec and tx:query, running none of it", function()
    q:transaction(function(tx) tx:exec("CREATE TABLE orders (id integer)") end)
    local ok, err = pcall(q.transaction, q, function(tx) return tx:exec("INSERT INTO orders VALUES (1)\0; DROP TABLE orders") end)
    assert.is_false(ok)
    assert.matches("tx:exec: bad argument #1 %(SQL text expected, got a string with a NUL byte at byte 30%)", tostring(err))
    ok, err = pcall(q.transaction, q, function(tx) return tx:query("SELECT 1 AS x\0 UNION SELECT 2") end)
    assert.is_false(ok)
    assert.matches("tx:query: bad argument #1", tostring(err))
    assert.equal(0, tonumber(spec_helper.sql(q, "SELECT count(*) AS n FROM orders")[1].n))
  end)
end)
end

for _, store in ipairs(spec_helper.stores()) do
describe("review r2: bounds of names and keys on " .. store.name, function()
  local q
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  -- Broken: SQLite took any length, and PostgreSQL refused a long queue
  -- name, idempotency key, partition key or unique key with its index's
  -- error ("index row size 3016 exceeds btree version 4 maximum 2704 for
  -- index "tide_jobs_key"", SQLSTATE 54000), naming neither the function
  -- nor the option; the stores disagreed on what a job may be.
  it("refuses names over 200 bytes and keys over 2000 bytes on every store, naming the option", function()
    local function rnd(n)                    -- (incompressible: PostgreSQL compresses a repeated letter)
      local t = {}
      for i = 1, n do t[i] = string.char(97 + (i * 7919 + math.floor(i / 26) * 31) % 26) end
      return table.concat(t)
    end
    local function fails(j, msg)
      local ok, err = pcall(q.enqueue, q, j)
      assert.is_false(ok, msg)
      assert.matches(msg, tostring(err), 1, true)
    end
    fails({ target = "t", method = "m", queue = "q" .. rnd(200) },
          "q:enqueue: bad option 'queue' (at most 200 bytes, got 201)")
    fails({ target = "t" .. rnd(200), method = "m" }, "q:enqueue: bad option 'target' (at most 200 bytes, got 201)")
    fails({ target = "t", method = "m" .. rnd(200) }, "q:enqueue: bad option 'method' (at most 200 bytes, got 201)")
    fails({ target = "t", method = "m", idempotency_key = rnd(2001) },
          "q:enqueue: bad option 'idempotency_key' (2001 bytes, at most 2000)")
    fails({ target = "t", method = "m", args = { s = rnd(3000) }, unique = { period = "1h" } },
          "q:enqueue: bad option 'unique.keys' (the job's unique key is")
    q:declare("p", { partition = "args.a", per_key = { concurrency = 1 } })
    fails({ target = "t", method = "m", queue = "p", args = { a = rnd(2001) } },
          "q:enqueue: the partition key of queue 'p' is bad (2001 bytes, at most 2000)")
    local ok, err = pcall(q.declare, q, "q" .. rnd(200), {})
    assert.is_false(ok)
    assert.matches("q:declare: bad argument #1 (queue name: at most 200 bytes, got 201)", tostring(err), 1, true)
    ok, err = pcall(q.enqueue_many, q, { { target = "t", method = "m" }, { target = "t", method = "m", idempotency_key = rnd(2001) } })
    assert.is_false(ok)
    assert.matches("q:enqueue_many: job 2: bad option 'idempotency_key' (2001 bytes, at most 2000)", tostring(err), 1, true)
    assert.equal(0, q:stats().total)
    -- at the bounds, every store takes them, together in the widest index entry
    local qname = "q" .. rnd(199)
    q:declare(qname, { partition = "args.a", per_key = { concurrency = 1 } })
    local id, inserted = q:enqueue{ target = "t" .. rnd(199), method = "m" .. rnd(199), queue = qname,
                                    args = { a = rnd(2000) }, idempotency_key = rnd(2000) }
    assert.is_true(inserted)
    assert.equal(2000, #q:job(id).partition_key)
    local text = string.rep("é", 900)        -- (1800 bytes, with the rest of the unique key below 2000)
    local uid, uins = q:enqueue{ target = "t", method = "m", args = text, unique = { period = "1h" } }
    assert.is_true(uins)
    assert.same({ uid, false }, { q:enqueue{ target = "t", method = "m", args = text, unique = { period = "1h" } } })
  end)

  -- Broken: q:limits("a\0") (or invalid UTF-8) reached PostgreSQL, which
  -- refused it with its own error (SQLSTATE 22021), where SQLite said nil.
  it("refuses a queue name q:declare would refuse in q:limits, naming it", function()
    for _, name in ipairs{ "a\0", "\255", "a b" } do
      local ok, err = pcall(q.limits, q, name)
      assert.is_false(ok)
      assert.matches("q:limits: bad argument #1 (queue name (letters, digits, _ . -) expected, got string", tostring(err), 1, true)
    end
    assert.is_nil(q:limits("nosuch"))
  end)

  -- Broken: q:list{ queue = "a\0b" } (or invalid UTF-8) reached PostgreSQL,
  -- which refused it with its own error (SQLSTATE 22021) and, inside
  -- q:transaction, aborted the caller's transaction; SQLite listed nothing.
  it("refuses a list filter with a NUL byte or invalid UTF-8, naming it, and the transaction goes on", function()
    q:enqueue{ target = "t", method = "m" }
    local n = q:transaction(function()
      for _, case in ipairs{ { queue = "a\0b" }, { target = "\255" } } do
        local ok, err = pcall(q.list, q, case)
        assert.is_false(ok)
        assert.matches("q:list: bad option '%a+' %(string %(valid UTF%-8, no NUL%) expected, got string", tostring(err))
      end
      return #q:list()
    end)
    assert.equal(1, n)
  end)
end)
end

for _, store in ipairs(spec_helper.stores()) do
describe("review r2: lists and URLs on " .. store.name, function()
  local q
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  -- Broken: q:enqueue_many and tx:enqueue_many read list[1..#list] only: a
  -- job under a name, or past a hole, was left out without a word
  -- (enqueue_many{ a = job } returned {}, 0), so a caller's job was lost.
  it("refuses a list of jobs with keys other than 1..n, inserting none of them", function()
    local j = { target = "t", method = "m" }
    local cases = {
      { { a = j }, "q:enqueue_many: bad argument #1 (list of job tables expected, got a table with key \"a\", past its 0 jobs)" },
      { { j, j, [4] = j, [5] = j, [6] = j, [20] = j }, nil },
      { { j, [1.5] = j }, "q:enqueue_many: bad argument #1 (list of job tables expected, got a table with key number 1.5, past its 1 jobs)" },
    }
    for i, case in ipairs(cases) do
      local ok, err = pcall(q.enqueue_many, q, case[1])
      assert.is_false(ok, "case " .. i)
      if case[2] then assert.matches(case[2], tostring(err), 1, true)
      else assert.matches("q:enqueue_many: bad argument #1 (list of job tables expected, got a table with key", tostring(err), 1, true) end
    end
    local ok, err = pcall(q.transaction, q, function(tx) return tx:enqueue_many{ j, extra = j } end)
    assert.is_false(ok)
    assert.matches("tx:enqueue_many: bad argument #1 (list of job tables expected, got a table with key \"extra\", past its 1 jobs)", tostring(err), 1, true)
    assert.equal(0, q:stats().total)
  end)

  -- Broken: a URL with a NUL byte opened the file named by its part before
  -- the NUL (libsqlite3 and libpq read C strings): "sqlite:DIR/a.db\0x"
  -- opened DIR/a.db, another store than the one asked for.
  it("refuses a store URL with a NUL byte, opening nothing", function()
    local dir = spec_helper.tempdir()
    local ok, err = pcall(tide.queue.open, "sqlite:" .. dir .. "/a.db\0.bak")
    assert.is_false(ok)
    assert.matches("tide.queue.open: bad argument #1 (store URL expected, got a string with a NUL byte at byte "
                   .. (#dir + 13) .. ")", tostring(err), 1, true)
    assert.is_nil(io.open(dir .. "/a.db"))
    os.execute("rm -rf " .. dir)
  end)
end)
end

for _, store in ipairs(spec_helper.stores()) do
describe("review r2: tide.worker's options on " .. store.name, function()
  local q
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  -- Broken: queues = { ["a\0"] = 1 } (or invalid UTF-8, or a name no job
  -- can have) and lease = 0.5 were taken; on PostgreSQL every claim then
  -- failed ("invalid byte sequence for encoding "UTF8"", "invalid input
  -- syntax for type bigint: "0.5"") and the worker backed off for ever,
  -- while on SQLite it ran (a fractional lease stored as a real).
  it("refuses queue names no job can have and a fractional lease, naming the option", function()
    local targets = { t = { m = function() end } }
    local cases = {
      { { queues = { ["a\0"] = 1 } }, "tide.worker: bad option 'queues' (queue names (letters, digits, _ . -, at most 200 bytes) expected, got string \"a\\0\")" },
      { { queues = { ["\255"] = 1 } }, "tide.worker: bad option 'queues' (queue names (letters, digits, _ . -, at most 200 bytes) expected, got string \"\255\")" },
      { { queues = { ["a b"] = 1 } }, "tide.worker: bad option 'queues' (queue names (letters, digits, _ . -, at most 200 bytes) expected, got string \"a b\")" },
      { { lease = 0.5 }, "tide.worker: bad option 'lease' (whole number of ms (a lease's end is stored in whole ms) expected, got number 0.5)" },
    }
    for i, case in ipairs(cases) do
      local opts = case[1]
      opts.queue, opts.targets = q, targets
      local ok, err = pcall(tide.worker, opts)
      assert.is_false(ok, "case " .. i)
      assert.matches(case[2], tostring(err), 1, true)
    end
  end)
end)
end

describe("review r2: enqueue's unique option and its args", function()
  local path, q

  before_each(function()
    path = os.tmpname()
    q = tide.queue.open("sqlite:" .. path)
  end)

  after_each(function()
    q:close()
    os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
    spec_helper.assert_idle()
  end)

  -- Broken: unique = { period = 0.5 } was taken as a positive period and
  -- kept in whole ms as 0, under which no job is ever a duplicate; a hole
  -- in unique.states or unique.keys ended the list there (ipairs), so
  -- { "available", nil, "bogus" } was taken and "bogus" never checked.
  it("refuses a unique period below 1 ms and lists with holes", function()
    local function fails(u, msg)
      local ok, err = pcall(q.enqueue, q, { target = "t", method = "m", args = { a = 1 }, unique = u })
      assert.is_false(ok, msg)
      assert.matches(msg, tostring(err), 1, true)
    end
    fails({ period = 0.5 }, "q:enqueue: bad option 'unique.period' (positive duration below 8000 years")
    fails({ period = "1h", states = { "available", nil, "bogus" } },
          "q:enqueue: bad option 'unique.states' (a list expected, got a ")      -- (# may stop at 1 or 3)
    fails({ period = "1h", keys = { "args.a", x = "args.b" } },
          "q:enqueue: bad option 'unique.keys' (a list expected, got a table with key string \"x\" past its 1 entries)")
    assert.equal(0, q:stats().total)
  end)

  -- Broken: args that hold themselves were refused with their path, 1000
  -- steps long (args.self.self...: a message of 5 KB).
  it("names a cycle in args with a short path", function()
    local t = {}; t.self = t
    local ok, err = pcall(q.enqueue, q, { target = "t", method = "m", args = t })
    assert.is_false(ok)
    assert.matches("q:enqueue: bad option 'args' (args.self.self", tostring(err), 1, true)
    assert.matches("...: nested too deep (more than 1000 levels: a cycle?))", tostring(err), 1, true)
    assert.is_true(#tostring(err) < 300, #tostring(err))
  end)
end)

for _, store in ipairs(spec_helper.stores()) do
describe("review r2: tx:exec's parameters on " .. store.name, function()
  local path, q

  before_each(function()
    path = os.tmpname()
    q = tide.queue.open(store.fresh(path))
    q:transaction(function(tx) tx:exec("CREATE TABLE orders (id integer, note text)") end)
  end)

  after_each(function()
    if q then q:close(); q = nil end
    store.reset(path)
    spec_helper.assert_idle()
  end)

  -- Broken: SQLite bound the parameters a call left out as NULL, where
  -- PostgreSQL refuses the statement: tx:exec("INSERT ... (?, ?)", 7)
  -- wrote a row with a NULL note on one store and failed on the other.
  it("refuses fewer parameters than the statement takes, writing nothing", function()
    local ok, err = pcall(q.transaction, q, function(tx) return tx:exec("INSERT INTO orders VALUES (?, ?)", 7) end)
    assert.is_false(ok)
    if store.name == "sqlite" then
      assert.matches("1 parameter given, the statement takes 2", tostring(err), 1, true)
    end
    assert.equal(0, tonumber(spec_helper.sql(q, "SELECT count(*) AS n FROM orders")[1].n))
    -- a nil given is a parameter (NULL)
    assert.equal(1, q:transaction(function(tx) return tx:exec("INSERT INTO orders VALUES (?, ?)", 7, nil) end))
  end)
end)
end

if os.getenv("TIDE_PG_URL") then
describe("review r2: idempotency keys on postgres", function()
  local store = spec_helper.stores()[2]
  local q
  spec_helper.fresh_queue_each(store, function(new) q = new end)

  -- Broken: an enqueue whose key met a job in its INSERT (ON CONFLICT DO
  -- NOTHING) read that job's id in a second statement; a job pruned by
  -- another transaction in between made it raise "attempt to index a nil
  -- value" (q:enqueue), or return a hole among the ids as a job not
  -- inserted (q:enqueue_many).  The window is simulated here by a row
  -- security policy that hides the key's job (its id) from SELECT only.
  it("never answers a hole or a Lua error when the key's job vanishes between its INSERT and SELECT", function()
    local id = q:enqueue{ target = "t", method = "m", idempotency_key = "hidden" }
    -- (a role of its own: the spec server's tide is a superuser, whom no policy holds)
    spec_helper.sql(q, "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tide_r2') THEN "
                       .. "CREATE ROLE tide_r2 LOGIN; END IF; END $$")
    spec_helper.sql(q, "GRANT ALL ON SCHEMA public TO tide_r2")
    spec_helper.sql(q, "GRANT ALL ON ALL TABLES IN SCHEMA public TO tide_r2")
    spec_helper.sql(q, "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO tide_r2")
    spec_helper.sql(q, "ALTER TABLE tide_jobs ENABLE ROW LEVEL SECURITY")
    spec_helper.sql(q, "CREATE POLICY r2_sel ON tide_jobs FOR SELECT USING (id <> " .. id .. ")")
    spec_helper.sql(q, "CREATE POLICY r2_ins ON tide_jobs FOR INSERT WITH CHECK (true)")
    spec_helper.sql(q, "CREATE POLICY r2_upd ON tide_jobs FOR UPDATE USING (true)")
    spec_helper.sql(q, "CREATE POLICY r2_del ON tide_jobs FOR DELETE USING (true)")
    local owner = q
    q = tide.queue.open((os.getenv("TIDE_PG_URL"):gsub("//tide@", "//tide_r2@")))
    local ok, err = pcall(q.enqueue, q, { target = "t", method = "m", idempotency_key = "hidden" })
    assert.is_false(ok)
    assert.matches("the job with idempotency key \"hidden\" was gone before its id could be read", tostring(err), 1, true)
    local ids
    ok, err = pcall(function()
      ids = q:enqueue_many{ { target = "t", method = "m", idempotency_key = "other" },
                            { target = "t", method = "m", idempotency_key = "hidden" } }
    end)
    assert.is_false(ok, ids and ("ids: " .. tostring(ids[1]) .. ", " .. tostring(ids[2])))
    assert.matches("the job with idempotency key \"hidden\" was gone before its id could be read", tostring(err), 1, true)
    q:close()
    q = owner
    spec_helper.sql(q, "ALTER TABLE tide_jobs DISABLE ROW LEVEL SECURITY")
    assert.equal(1, q:stats().total)        -- ("other" was taken back with the list)
    assert.equal(id, q:job(id).id)
  end)
end)
end
