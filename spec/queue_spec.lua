-- spec/queue_spec.lua — tide.queue: the job store's contract (enqueue, transactions,
-- idempotence, inspection, hand changes, encryption, bad input), run against every store.
local tide = require "tide"
local core = require "tide.core"

local file_bytes = spec_helper.file_bytes
local sql = spec_helper.sql                -- sql(q, stmt, ...): rows, in a transaction of q

for _, store in ipairs(spec_helper.stores()) do
describe("tide.queue on " .. store.name, function()
  local path, q

  local url
  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
    q = tide.queue.open(url)
  end)

  after_each(function()
    q:close()
    store.reset(path)
    spec_helper.assert_idle()
  end)

  describe("opening", function()
    it("creates the job tables and opens them again with the jobs kept", function()
      local id = q:enqueue{ target = "orders", method = "fulfill" }
      q:close()
      q = tide.queue.open(url)
      assert.equal("available", q:job(id).status)
      assert.equal(require("tide.jobs.store." .. store.name).VERSION, sql(q, "SELECT version FROM tide_schema")[1].version)
    end)

    if store.name == "sqlite" then
      it("runs in WAL mode with synchronous=NORMAL, or FULL when asked", function()
        assert.equal("WAL, synchronous=NORMAL", q.durability)
        assert.equal("wal", sql(q, "PRAGMA journal_mode")[1].journal_mode)
        local q2 = tide.queue.open(url, { synchronous = "full" })
        assert.equal("WAL, synchronous=FULL", q2.durability)
        q2:close()
      end)
    else
      it("states the server's durability setting", function()
        assert.equal("PostgreSQL, synchronous_commit=on", q.durability)
      end)
    end

    it("refuses job tables of a newer schema version, and a tide_jobs table it did not create", function()
      sql(q, "UPDATE tide_schema SET version = 99")
      q:close()
      local ok, err = pcall(tide.queue.open, url)
      assert.is_false(ok)
      assert.truthy(err:find("tide.queue.open: " .. url .. ": the job tables are at schema version 99, "
                             .. "newer than this tide knows (" .. require("tide.jobs.store." .. store.name).VERSION .. "); upgrade tide", 1, true), err)
      url = store.fresh(path)
      q = tide.queue.open(url)
      sql(q, "DROP TABLE tide_jobs")
      sql(q, "DROP TABLE tide_schema")
      sql(q, "CREATE TABLE tide_jobs (x INTEGER)")
      q:close()
      ok, err = pcall(tide.queue.open, url)
      assert.is_false(ok)
      assert.truthy(err:find("a table tide_jobs exists that tide did not create", 1, true), err)
      url = store.fresh(path)
      q = tide.queue.open(url)
    end)

    if store.name == "sqlite" then it("refuses a file that is not a database, naming the store and the SQLite code", function()
      local bad = os.tmpname()
      local f = io.open(bad, "wb")
      f:write(("this is not a database\n"):rep(100))
      f:close()
      local ok, err = pcall(tide.queue.open, "sqlite:" .. bad)
      os.remove(bad)
      assert.is_false(ok)
      assert.truthy(err:find("tide.queue.open: sqlite:" .. bad .. ": file is not a database (SQLITE_NOTADB)", 1, true), err)
    end) end
  end)

  describe("q:enqueue", function()
    it("stores a job with its defaults and returns its id", function()
      local before = q:now()                   -- (the store's clock: on PostgreSQL the server's)
      local id, inserted = q:enqueue{ target = "orders", method = "fulfill", args = { id = 7, items = { "a", "b" } } }
      assert.is_true(inserted)
      local j = q:job(id)
      assert.same({ id = 7, items = { "a", "b" } }, j.args)
      assert.equal("default", j.queue)
      assert.equal("available", j.status)
      assert.equal(0, j.priority)
      assert.equal(0, j.attempt)
      assert.equal(20, j.max_attempts)
      assert.is_true(j.run_at >= before and j.run_at <= q:now())
      assert.equal(j.run_at, j.inserted_at)
      assert.same({}, j.errors)
    end)

    it("schedules a job for later with run_at (ms or ISO 8601) or delay (ms)", function()
      local id1 = q:enqueue{ target = "t", method = "m", run_at = "2030-01-02T03:04:05Z" }
      local id2 = q:enqueue{ target = "t", method = "m", run_at = "2030-01-02T05:04:05.5+02:00" }
      local id3 = q:enqueue{ target = "t", method = "m", run_at = 1893553445000 }
      local id4 = q:enqueue{ target = "t", method = "m", delay = 60000 }
      assert.equal(1893553445000, q:job(id1).run_at)
      assert.equal(1893553445500, q:job(id2).run_at)
      assert.equal(1893553445000, q:job(id3).run_at)
      for _, id in ipairs{ id1, id2, id3, id4 } do assert.equal("scheduled", q:job(id).status) end
      local j4 = q:job(id4)
      assert.equal(j4.inserted_at + 60000, j4.run_at)
      assert.equal("available", q:job(q:enqueue{ target = "t", method = "m", run_at = 1e11 }).status)
    end)

    it("inserts nothing for a second enqueue with the same idempotency key, and returns the first job", function()
      local id1, new1 = q:enqueue{ target = "orders", method = "fulfill", args = { 1 }, idempotency_key = "order-7" }
      local id2, new2 = q:enqueue{ target = "orders", method = "other", args = { 2 }, idempotency_key = "order-7" }
      assert.is_true(new1)
      assert.is_false(new2)
      assert.equal(id1, id2)
      assert.equal(1, q:stats().total)
      assert.equal("fulfill", q:job(id1).method)
    end)

    it("keeps nil args as nil and JSON-encodes nested values", function()
      assert.is_nil(q:job(q:enqueue{ target = "t", method = "m" }).args)
      local v = { s = "x\0y", n = 1.5, b = false, list = { 1, 2, { deep = true } }, empty = {} }
      assert.same(v, q:job(q:enqueue{ target = "t", method = "m", args = v }).args)
    end)
  end)

  describe("job data", function()
    local json = require "tide.jobs.json"

    it("comes back exactly: every number, empty arrays, NUL bytes, on this store as on the others", function()
      local v = { n = 123456789012345, big = 1700000000123456, max = 2 ^ 53 - 1, sum = 0.1 + 0.2,
                  tiny = 5e-324, neg0 = -0.0, huge = 1e300, list = json.array(), nested = { a = json.array() },
                  s = "ab\0cd", t = "tab\there", u = "é€😀", null = json.null, arr = json.array{ 1, json.null, 3 } }
      local back = q:job(q:enqueue{ target = "t", method = "m", args = v }).args
      assert(spec_helper.exact(v, back))
      assert.equal("[]", json.encode(q:job(q:enqueue{ target = "t", method = "m", args = json.decode("[]") }).args))
      assert.equal('{"a":[]}', json.encode(q:job(q:enqueue{ target = "t", method = "m", args = json.decode('{"a":[]}') }).args))
    end)

    it("brings back 100,000 random values exactly through enqueue and q:job (seeded)", function()
      local seed = tonumber(os.getenv("JOBDATA_SEED")) or os.time()
      math.randomseed(seed)
      local ffi = require "ffi"
      local u = ffi.new("union { double d; uint32_t w[2]; }")
      local leaves = 0
      local function number()
        local r = math.random(4)
        if r == 1 then                           -- any finite double (never the exponent of inf/nan)
          local hi = math.random(0, 2 ^ 32 - 1)
          while bit.band(bit.rshift(hi, 20), 0x7FF) == 0x7FF do hi = math.random(0, 2 ^ 32 - 1) end
          u.w[0], u.w[1] = math.random(0, 2 ^ 32 - 1), hi
          return u.d
        elseif r == 2 then return (math.random() * 2 - 1) * 2 ^ math.random(0, 53)   -- fractions
        elseif r == 3 then return math.floor((math.random() * 2 - 1) * 2 ^ math.random(0, 53))  -- integers
        end
        return ({ 0, -0.0, 2 ^ 53, -(2 ^ 53), 2 ^ 53 - 1, 0.1, 1e-300, 1e300 })[math.random(8)]
      end
      local CPS = { 0, 9, 10, 31, 34, 47, 92, 127, 128, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF, 0xE9, 0x20AC, 0x1F600 }
      local function utf8(cp)
        if cp < 0x80 then return string.char(cp) end
        if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
        if cp < 0x10000 then return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64) end
        return string.char(0xF0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
                           0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
      end
      local function str()
        local out = {}
        for i = 1, math.random(0, 8) do
          out[i] = math.random(3) == 1 and utf8(CPS[math.random(#CPS)]) or string.char(math.random(32, 126))
        end
        return table.concat(out)
      end
      local value
      local function container(depth)
        local n = math.random(0, 6)
        if math.random(2) == 1 then
          local t = json.array()
          for i = 1, n do t[i] = value(depth + 1) end
          return t
        end
        local t = {}
        for _ = 1, n do t[str()] = value(depth + 1) end
        return t
      end
      function value(depth)
        local r = math.random(10)
        if depth < 4 and r <= 3 then return container(depth) end
        leaves = leaves + 1
        if r <= 7 then return number() end
        if r <= 9 then return str() end
        return ({ true, false, json.null })[math.random(3)]
      end
      local jobs = {}
      while leaves < 100000 do
        local args = json.array()
        for i = 1, 100 do args[i] = value(0) end
        jobs[#jobs + 1] = { target = "t", method = "m", args = args }
      end
      local ids = {}
      for i = 1, #jobs, 250 do
        local got = q:enqueue_many({ unpack(jobs, i, math.min(i + 249, #jobs)) })
        for _, id in ipairs(got) do ids[#ids + 1] = id end
      end
      for i, j in ipairs(jobs) do
        local same, why = spec_helper.exact(j.args, q:job(ids[i]).args, "args")
        assert(same, ("seed %d, job %d: %s"):format(seed, i, tostring(why)))
      end
    end)

    it("refuses invalid UTF-8 in args, keys and idempotence keys, and NUL in keys, naming the path", function()
      local bad = function(j) return function() q:enqueue(j) end end
      spec_helper.error_cases("spec/queue_spec.lua", {
        { bad{ target = "t", method = "m", args = { name = "ab\255cd" } }, "q:enqueue: bad option 'args' (args.name: invalid UTF-8 at byte 3)" },
        { bad{ target = "t", method = "m", args = { ["k\192"] = 1 } }, "q:enqueue: bad option 'args' (args: a key: invalid UTF-8 at byte 2)" },
        { bad{ target = "t", method = "m", idempotency_key = "k\237\160\128" },
          "q:enqueue: bad option 'idempotency_key' (invalid UTF-8 at byte 2)" },
        { bad{ target = "t", method = "m", idempotency_key = "a\0b" },
          "q:enqueue: bad option 'idempotency_key' (a NUL byte at byte 2: keys are text)" },
      })
      assert.equal(0, q:stats().total)
    end)

    -- Broken before: a user's job with a tick's key took the tick, and the
    -- schedule's own job for it was never enqueued.
    it("keeps idempotency keys beginning 'schedule:' for schedules' ticks, on every enqueue", function()
      local key = "schedule:nightly@2026-12-05T02:00:00.000Z"
      local why = "bad option 'idempotency_key' (keys beginning 'schedule:' are the ticks of schedules)"
      spec_helper.error_cases("spec/queue_spec.lua", {
        { function() q:enqueue{ target = "t", method = "m", idempotency_key = key } end, "q:enqueue: " .. why },
        { function() q:enqueue{ target = "t", method = "m", idempotency_key = "schedule:" } end, "q:enqueue: " .. why },
        { function() q:enqueue_many{ { target = "t", method = "m" }, { target = "t", method = "m", idempotency_key = key } } end,
          "q:enqueue_many: job 2: " .. why },
        { function() q:transaction(function(tx) tx:enqueue{ target = "t", method = "m", idempotency_key = key } end) end,
          "tx:enqueue: " .. why },
      })
      assert.equal(0, q:stats().total)
      local id, inserted = q:enqueue{ target = "t", method = "m", idempotency_key = "Schedule:mine" }
      assert.is_true(inserted and id ~= nil)                -- only the exact prefix is kept
    end)
  end)

  describe("ids and ranges", function()
    it("never gives an id twice, even after the newest jobs were pruned", function()
      local a = q:enqueue{ target = "t", method = "m" }
      local b = q:enqueue{ target = "t", method = "m" }
      q:cancel(b)
      assert.equal(1, q:prune{ older_than = 0 })
      local c = q:enqueue{ target = "t", method = "m" }
      assert.is_true(c > b, ("id %d given again after %d was pruned"):format(c, b))
      local ids = q:enqueue_many{ { target = "t", method = "m" }, { target = "t", method = "m" } }
      assert.is_true(ids[1] > c and ids[2] > ids[1])
      assert.is_true(a < b)
    end)

    if store.name == "sqlite" then
      it("migrates tables of version 1: ids go on from the highest, the jobs kept", function()
        q:close()
        store.reset(path)
        local core = require "tide.core"
        local db = assert(core.sqlite_open(path, "setup", 1000))
        db:exec("CREATE TABLE tide_schema (version INTEGER NOT NULL); INSERT INTO tide_schema VALUES (1);")
        db:exec(require("tide.jobs.store.sqlite").MIGRATIONS[1])
        db:exec("INSERT INTO tide_jobs (id, queue, target, method, status, max_attempts, run_at, inserted_at, completed_at) "
                .. "VALUES (7, 'default', 't', 'm', 'available', 20, 0, 0, NULL), (9, 'default', 't', 'm', 'cancelled', 20, 0, 0, 0)")
        db:close()
        q = tide.queue.open(url)
        assert.equal(require("tide.jobs.store.sqlite").VERSION, sql(q, "SELECT version FROM tide_schema")[1].version)
        assert.equal("available", q:job(7).status)
        q:prune{ older_than = 0 }
        assert.is_nil(q:job(9))
        assert.equal(10, (q:enqueue{ target = "t", method = "m" }))
      end)

      it("inserts a job leased to a worker when insert_many is given its lease, and rescues it after", function()
        local session = q._store:acquire("spec")
        local ok, err = pcall(function()
          session:begin()
          local ids = session:insert_many{
            { queue = "default", target = "t", method = "m", args = "[1]", priority = 3, max_attempts = 5,
              run_at = 1000, inserted_at = 1000, lease_owner = "w1", lease_expires = 2000 },
            { queue = "default", target = "t", method = "m", args = "[2]", status = "available", priority = 0,
              max_attempts = 5, run_at = 1000, inserted_at = 1000 } }
          session:commit()
          local a, b = session:get(ids[1]), session:get(ids[2])
          assert.same({ "executing", 1, 1000, "w1", 2000, "[1]", 3, 5 }, { a.status, a.attempt, a.attempted_at,
            a.lease_owner, a.lease_expires, a.args, a.priority, a.max_attempts })
          assert.same({ "available", 0 }, { b.status, b.attempt })
          session:begin()
          assert.equal(1, session:rescue(2001))
          session:commit()
          assert.equal("available", session:get(ids[1]).status)
        end)
        q._store:release(session, not ok)
        assert(ok, err)
      end)

      it("gives each job of insert_many its own id, in order, across its many-row statements and keyed jobs", function()
        -- Jobs without keys go in up to 64 to a statement (64 + 32 + ...),
        -- their ids worked out from the last one's: a wrong sum would hand
        -- a job another's id.  The newest job pruned first: ids go on past it.
        local pruned = q:enqueue{ target = "t", method = "m" }
        q:cancel(pruned)
        q:prune{ older_than = 0 }
        assert.is_nil(q:job(pruned))
        local existing = q:enqueue{ target = "t", method = "m", idempotence_key = "k-old" }
        local session = q._store:acquire("spec")
        local ok, err = pcall(function()
          local list = {}
          for i = 1, 203 do
            local j = { queue = "default", target = "t", method = "m", args = "[" .. i .. "]", status = "available",
                        priority = i % 3, max_attempts = 5, run_at = 1000 + i, inserted_at = 1000 }
            if i % 5 == 0 then j.lease_owner, j.lease_expires = "w1", 5000 + i end
            if i == 71 or i == 72 or i == 141 then j.idempotence_key = "k-" .. i end
            if i == 151 then j.idempotence_key = "k-old" end
            list[i] = j
          end
          session:begin()
          local ids, inserted = session:insert_many(list)
          session:commit()
          local last = pruned
          for i = 1, 203 do
            if i == 151 then
              assert.same({ existing, false }, { ids[i], inserted[i] })
            else
              assert.is_true(inserted[i])
              assert.is_true(ids[i] > last, "job " .. i .. ": id " .. tostring(ids[i]) .. " after " .. last)
              last = ids[i]
              local r = session:get(ids[i])
              assert.same({ "[" .. i .. "]", i % 3, 1000 + i }, { r.args, r.priority, r.run_at })
              if i % 5 == 0 then
                assert.same({ "executing", 1, 1000, "w1", 5000 + i }, { r.status, r.attempt, r.attempted_at,
                  r.lease_owner, r.lease_expires })
              else
                assert.same({ "available", 0 }, { r.status, r.attempt })
                assert.is_nil(r.lease_owner)
              end
            end
          end
        end)
        q._store:release(session, not ok)
        assert(ok, err)
      end)

      it("records the completions of a batch together, and writes exactly those still leased at their attempt", function()
        -- Completions go in by statements of up to 64 guarded jobs; one
        -- whose lease was lost makes its statement change fewer rows, and
        -- the statement is undone and its jobs written one by one.  Stale
        -- entries sit in the 64-job statement and the 4-job one; the
        -- 32-job one is all fresh; a job listed twice goes one by one.
        local list = {}
        for i = 1, 101 do list[i] = { target = "t", method = "m", args = { i } } end
        q:enqueue_many(list)
        local id = q:enqueue{ target = "t", method = "m", queue = "other" }
        local session = q._store:acquire("spec")
        local ok, err = pcall(function()
          local t = math.floor(require("tide.core").wallclock()) + 1000
          local rows = session:claim("default", 101, "w1", t, t + 60000)
          assert.equal(101, #rows)
          table.sort(rows, function(a, b) return a.id < b.id end)
          local stale = { [rows[3].id] = "attempt", [rows[40].id] = "owner", [rows[99].id] = "cancelled" }
          session:begin()
          session:exec("UPDATE tide_jobs SET lease_owner = 'w2' WHERE id = ?", rows[40].id)
          session:exec("UPDATE tide_jobs SET status = 'cancelled', lease_owner = NULL WHERE id = ?", rows[99].id)
          session:commit()
          local entries = {}
          for i, r in ipairs(rows) do
            entries[i] = { id = r.id, attempt = stale[r.id] == "attempt" and r.attempt + 1 or r.attempt, kind = "completed" }
          end
          local written = session:record(entries, "w1", 2000)
          for _, r in ipairs(rows) do
            local now = session:get(r.id)
            if stale[r.id] then
              assert.is_nil(written[r.id], "job " .. r.id .. " (" .. stale[r.id] .. ") written")
              assert.equal(stale[r.id] == "cancelled" and "cancelled" or "executing", now.status)
            else
              assert.is_true(written[r.id], "job " .. r.id .. " not written")
              assert.same({ "completed", 2000 }, { now.status, now.completed_at })
              assert.is_nil(now.lease_owner)
            end
          end
          -- The same job twice in one batch: in order, one by one (the
          -- completion first, so the retry after it finds nothing leased).
          local r = session:claim("other", 1, "w1", t, t + 60000)[1]
          assert.equal(id, r.id)
          written = session:record({ { id = id, attempt = r.attempt, kind = "completed" },
                                     { id = id, attempt = r.attempt, kind = "retry", run_at = 5000,
                                       error = '{"error":"x"}' } }, "w1", 4000)
          assert.same({ [id] = true }, written)
          assert.equal("completed", session:get(id).status)
        end)
        q._store:release(session, not ok)
        assert(ok, err)
      end)

      -- Until version 5, tide_schedules was created at every open outside
      -- the numbered migrations: a file of version 4 may have it (with rows)
      -- or not (made before schedules existed).
      for _, with_schedules in ipairs{ true, false } do
        it("migrates tables of version 4 " .. (with_schedules and "with" or "without")
           .. " the tide_schedules the old open made, its rows kept", function()
          q:close()
          store.reset(path)
          local core = require "tide.core"
          local M = require("tide.jobs.store.sqlite").MIGRATIONS
          local db = assert(core.sqlite_open(path, "setup", 1000))
          db:exec("CREATE TABLE tide_schema (version INTEGER NOT NULL); INSERT INTO tide_schema VALUES (4);")
          for v = 1, 4 do db:exec(M[v]) end
          if with_schedules then
            db:exec([[CREATE TABLE IF NOT EXISTS tide_schedules (
              name TEXT PRIMARY KEY, cron TEXT NOT NULL, timezone TEXT NOT NULL, target TEXT NOT NULL,
              method TEXT NOT NULL, queue TEXT NOT NULL, last_tick INTEGER, seen_at INTEGER NOT NULL, seen_by TEXT)]])
            db:exec("INSERT INTO tide_schedules VALUES ('nightly', '0 3 * * *', 'UTC', 't', 'm', 'default', 42, 7, 'w1')")
          end
          db:exec("INSERT INTO tide_jobs (id, queue, target, method, status, max_attempts, run_at, inserted_at) "
                  .. "VALUES (5, 'default', 't', 'm', 'available', 20, 0, 0)")
          db:close()
          q = tide.queue.open(url)
          assert.equal(require("tide.jobs.store.sqlite").VERSION, sql(q, "SELECT version FROM tide_schema")[1].version)
          assert.equal("available", q:job(5).status)
          -- (6: the per-key indexes hold keyed jobs only)
          local idx = sql(q, "SELECT sql FROM sqlite_master WHERE name IN ('tide_jobs_key_due', 'tide_jobs_key_running')")
          assert.equal(2, #idx)
          for _, r in ipairs(idx) do assert.truthy(r.sql:find("WHERE partition_key IS NOT NULL AND", 1, true), r.sql) end
          local rows = sql(q, "SELECT name, last_tick, seen_by FROM tide_schedules")
          if with_schedules then
            assert.same({ { name = "nightly", last_tick = 42, seen_by = "w1" } }, rows)
          else
            assert.same({}, rows)
          end
          q:close()
          q = tide.queue.open(url)             -- and opens again at the new version
          assert.equal(6, (q:enqueue{ target = "t", method = "m" }))
        end)
      end
    end

    it("refuses times and numbers no store can hold, the same on every store", function()
      local bad = function(j) j.target, j.method = "t", "m"; return function() q:enqueue(j) end end
      local T = "UTC time from 1970 to 9999 (ms since the epoch, or ISO 8601 like \"2026-11-23T15:04:05Z\") expected"
      spec_helper.error_cases("spec/queue_spec.lua", {
        { bad{ run_at = 1e300 }, "q:enqueue: bad option 'run_at' (" .. T .. ", got number 1e+300)" },
        { bad{ run_at = -1 }, "q:enqueue: bad option 'run_at' (" .. T .. ", got number -1)" },
        { bad{ run_at = "2030-02-29T00:00:00Z" }, "q:enqueue: bad option 'run_at' (" .. T .. ", got string \"2030-02-29T00:00:00Z\")" },
        { bad{ run_at = "2030-01-01T00:00:00+25:00" }, "q:enqueue: bad option 'run_at' (" .. T .. ", got string \"2030-01-01T00:00:00+25:00\")" },
        { bad{ priority = 1e12 }, "q:enqueue: bad option 'priority' (integer from -2147483648 to 2147483647 (lower runs first) expected, got number 1000000000000)" },
        { bad{ max_attempts = 1e12 }, "q:enqueue: bad option 'max_attempts' (integer from 1 to 2147483647 expected, got number 1000000000000)" },
        { bad{ delay = 1e300 }, "q:enqueue: bad option 'delay' (non-negative number of ms, due before the year 10000 expected, got number 1e+300)" },
      })
      local id = q:enqueue{ target = "t", method = "m", run_at = "2032-02-29T00:00:00Z", priority = -2 ^ 31, max_attempts = 2 ^ 31 - 1 }
      local j = q:job(id)
      assert.same({ 1961625600000, -2 ^ 31, 2 ^ 31 - 1 }, { j.run_at, j.priority, j.max_attempts })
      assert.equal(1, q:stats().total)
    end)
  end)

  if store.name == "sqlite" then
    describe("another process's write lock", function()
      --- Starts a process that holds the database's write lock for `ms`;
      --- returns once it holds it, and a function that waits for its end.
      local function hold_lock(ms)
        local dir = spec_helper.tempdir()
        local mark = dir .. "/locked"
        local script = spec_helper.write_file(dir, "hold.lua", ([[
          local core = require "tide.core"
          local db = assert(core.sqlite_open(%q, "holder", 5000))
          db:exec("BEGIN IMMEDIATE")
          db:exec("INSERT INTO tide_schema (version) SELECT version FROM tide_schema WHERE 0")
          io.open(%q, "w"):close()
          os.execute("sleep %g")
          db:exec("COMMIT")
        ]]):format(path, mark, ms / 1000))
        local p = io.popen(("%s/tide run %s 2>&1"):format(spec_helper.build, script))
        local deadline = os.time() + 10
        while not io.open(mark) do
          assert(os.time() < deadline, "the lock holder did not start")
          os.execute("sleep 0.01")
        end
        return function() local out = p:read("*a"); p:close(); os.execute("rm -rf " .. dir); return out end
      end

      it("is waited for without blocking the loop: timers keep their pace", function()
        local done = hold_lock(600)
        local gap, took, id = 0, nil, nil
        local status, err = tide.run(function()
          local running = true
          local ticker = tide.spawn(function()
            local last = tide.now()
            while running do
              tide.sleep(10)
              local now = tide.now()
              if now - last > gap then gap = now - last end
              last = now
            end
          end)
          tide.sleep(30)                         -- the ticker is ticking
          local t0 = tide.now()
          id = q:enqueue{ target = "t", method = "m" }
          took = tide.now() - t0
          tide.sleep(30)
          running = false
          ticker:await()
        end)
        assert.equal("", done())
        print(("\n# an enqueue waited %.0f ms for another process's lock; the longest gap between 10 ms ticks: %.0f ms")
          :format(took, gap))
        assert(status == "ok", tostring(err))
        assert.is_true(took >= 300, "the enqueue did not wait for the lock: " .. took .. " ms")
        assert.is_true(gap < 200, ("a timer waited %d ms while the enqueue waited %d ms for the lock"):format(gap, took))
        assert.equal("available", q:job(id).status)
      end)

      it("fails with SQLITE_BUSY after busy_timeout, naming the wait", function()
        q:close()
        q = tide.queue.open(url, { busy_timeout = 100 })
        local done = hold_lock(800)
        local status, ok, err = tide.run(function() return pcall(q.enqueue, q, { target = "t", method = "m" }) end)
        done()
        assert.same({ "ok", false }, { status, ok })
        assert.matches("database is locked %(SQLITE_BUSY%) %(waited %d+ ms for another connection's lock%)$", tostring(err))
      end)
    end)
  end

  describe("q:enqueue_many", function()
    it("inserts a batch in one transaction and returns ids in order and the count inserted", function()
      q:enqueue{ target = "t", method = "m", idempotency_key = "k2" }
      local list = {}
      for i = 1, 500 do list[i] = { target = "t", method = "m", args = { i = i }, idempotency_key = "k" .. i } end
      local ids, n = q:enqueue_many(list)
      assert.equal(500, #ids)
      assert.equal(499, n)
      assert.equal(500, q:stats().total)
      assert.equal(7, q:job(ids[7]).args.i)
      assert.is_nil(q:job(ids[2]).args)          -- k2 existed: its job is the earlier one
    end)

    it("gives each job of batches without keys its own id, while other tasks insert at the same time", function()
      -- (PostgreSQL: such a batch draws its ids, then sends its rows by
      -- COPY with them, per 5,000 rows; concurrent inserts on other
      -- connections draw from the same sequence meanwhile)
      local json = require "tide.jobs.json"
      local lists, got = {}, {}
      local status, err = tide.run(function()
        local tasks = {}
        for t = 1, 3 do
          lists[t] = {}
          for i = 1, 5003 do lists[t][i] = { target = "t", method = "m", args = { t = t, i = i } } end
          if t == 2 then lists[t][4999].queue = "other"; lists[t][5002].priority = 7 end
          tasks[t] = tide.spawn(function()
            local ids, n = q:enqueue_many(lists[t])
            got[t] = { ids = ids, n = n }
          end)
        end
        tasks[4] = tide.spawn(function()                       -- single inserts in between
          for i = 1, 50 do q:enqueue{ target = "t", method = "m", args = { t = 4, i = i } } end
        end)
        for _, task in ipairs(tasks) do task:await() end
      end)
      assert.equal("ok", status, tostring(err))
      local by_id = {}
      for _, r in ipairs(sql(q, "SELECT id, args, queue, priority FROM tide_jobs")) do by_id[r.id] = r end
      local all = 0
      for t = 1, 3 do
        assert.equal(5003, got[t].n)
        assert.equal(5003, #got[t].ids)
        for i, id in ipairs(got[t].ids) do
          local r = by_id[id]
          local a = r and r.args and json.decode(r.args)
          assert.same({ i = i, t = t }, a, ("task %d job %d got id %s"):format(t, i, tostring(id)))
          all = all + 1
        end
      end
      assert.equal(3 * 5003, all)
      assert.same({ "other", 0 }, { by_id[got[2].ids[4999]].queue, by_id[got[2].ids[4999]].priority })
      assert.same({ "default", 7 }, { by_id[got[2].ids[5002]].queue, by_id[got[2].ids[5002]].priority })
      assert.equal(3 * 5003 + 50, q:stats().total)
    end)

    it("gives a key repeated inside the batch (across its statements) or found in the table the existing id", function()
      local old = q:enqueue{ target = "t", method = "m", idempotency_key = "old" }
      local run_at = math.floor(core.wallclock()) + 3600000
      local list = {}
      for i = 1, 5100 do list[i] = { target = "t", method = "m", args = { i = i } } end
      list[5].idempotency_key, list[9].idempotency_key = "a", "a"     -- one statement
      list[5050].idempotency_key = "a"                                 -- the next (5,000 rows a statement on PostgreSQL)
      list[100].idempotency_key = "old"                                -- in the table
      list[7].idempotency_key, list[5099].idempotency_key = "b", "b"
      -- jobs of every option, mixed with plain ones
      local args3 = { s = "a\0b é", n = 0.1, big = 2 ^ 53, neg = -0.0, empty = setmetatable({}, require("tide.jobs.json").array_mt) }
      list[3] = { target = "t", method = "m", queue = "mail", priority = -3, max_attempts = 2, delay = 60000, args = args3 }
      list[4] = { target = "u", method = "v", run_at = run_at }
      local ids, n = q:enqueue_many(list)
      assert.equal(5100, #ids)
      assert.equal(5100 - 4, n)
      assert.equal(ids[5], ids[9])
      assert.equal(ids[5], ids[5050])
      assert.equal(ids[7], ids[5099])
      assert.equal(old, ids[100])
      local seen = {}
      for i, id in ipairs(ids) do
        if i ~= 9 and i ~= 5050 and i ~= 5099 and i ~= 100 then
          assert.is_nil(seen[id], "id " .. id .. " given twice"); seen[id] = true
        end
      end
      assert.equal(5101 - 4, q:stats().total)
      assert.equal(5, q:job(ids[5]).args.i)
      local j3 = q:job(ids[3])
      assert.same({ "mail", -3, 2, "scheduled" }, { j3.queue, j3.priority, j3.max_attempts, j3.status })
      assert.is_true(spec_helper.exact(j3.args, args3))
      local j4 = q:job(ids[4])
      assert.same({ "u", "v", run_at, "scheduled", "default" }, { j4.target, j4.method, j4.run_at, j4.status, j4.queue })
      assert.is_nil(j4.args)
      -- a batch with a unique job (inserted one by one) keeps the keys the same way
      local uids, un = q:enqueue_many{ { target = "t", method = "m", unique = { period = "1h" }, args = { u = 1 } },
                                       { target = "t", method = "m", idempotency_key = "a" },
                                       { target = "t", method = "m", unique = { period = "1h" }, args = { u = 1 } } }
      assert.same({ 1, ids[5], uids[1] }, { un, uids[2], uids[3] })
      assert.same({ u = 1 }, q:job(uids[1]).args)
      -- the same inside a transaction, against a row it inserted itself
      local tids, tn = q:transaction(function(tx)
        local first = tx:enqueue{ target = "t", method = "m", idempotency_key = "t1" }
        local got, k = tx:enqueue_many{ { target = "t", method = "m", idempotency_key = "t1" },
                                         { target = "t", method = "m", idempotency_key = "t2" },
                                         { target = "t", method = "m", idempotency_key = "t2" } }
        assert.equal(first, got[1])
        return got, k
      end)
      assert.equal(1, tn)
      assert.equal(tids[2], tids[3])
      assert.equal("t2", q:job(tids[2]).idempotency_key)
    end)

    if store.name == "postgres" then
      it("prepares its statements once per connection, and again on the next one after the server ended it", function()
        q:close()
        q = tide.queue.open(url, { pool = 1 })                         -- (one connection: sql(q, ) sees the same session)
        local function prepared()
          local names = {}
          for _, r in ipairs(sql(q, "SELECT name FROM pg_prepared_statements ORDER BY name")) do names[#names + 1] = r.name end
          return table.concat(names, ",")
        end
        local a = q:enqueue{ target = "t", method = "m" }
        q:enqueue_many{ { target = "t", method = "m" }, { target = "t", method = "m" } }
        assert.equal("tide_draw_ids,tide_insert", prepared())   -- (the batch's rows go by COPY)
        local pid = sql(q, "SELECT pg_backend_pid() AS pid")[1].pid
        local admin = require("tide.jobs.store.postgres").connect(url)
        admin:query("SELECT pg_terminate_backend($1)", pid)
        for _ = 1, 200 do                                                -- (until the server has closed it)
          if admin:query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid).rows[1].n == 0 then break end
          os.execute("sleep 0.01")
        end
        admin:close()
        os.execute("sleep 0.02")
        local b = q:enqueue{ target = "t", method = "m" }               -- a new session: prepared again
        assert.is_true(b > a)
        assert.is_not.equal(pid, sql(q, "SELECT pg_backend_pid() AS pid")[1].pid)
        assert.equal("tide_insert", prepared())
        assert.equal(4, q:stats().total)
      end)

      it("does not take a Parse that failed for a prepared statement", function()
        q:close()
        q = tide.queue.open(url, { pool = 1 })
        -- The transaction is aborted when tx:enqueue's Parse goes out: it fails.
        local ok, err = pcall(q.transaction, q, function(tx)
          pcall(tx.exec, tx, "SELECT no_such_column FROM tide_jobs")
          tx:enqueue{ target = "t", method = "m" }
        end)
        assert.is_false(ok)
        assert.matches("current transaction is aborted", tostring(err))
        local id = q:enqueue{ target = "t", method = "m" }              -- prepared now, not "does not exist"
        assert.equal("available", q:job(id).status)
        assert.equal(1, q:stats().total)
      end)
    end

    it("brings back texts that COPY must escape, encrypted bytes and every number exactly", function()
      local json = require "tide.jobs.json"
      local texts = { "a\tb", "c\nd", "e\\f", "g\rh", "\\N", "\\.", "x\"y", "é€😀", "\\\\t", "", "\\x41", "a\0b" }
      local list = {}
      for i = 1, 1200 do
        list[i] = { target = "t", method = "m", args = { s = texts[i % #texts + 1], n = i + 0.25, big = 2 ^ 53 - i,
                                                         list = json.array(), t = { texts[(i + 5) % #texts + 1] } } }
      end
      list[600].args = nil
      local ids, n = q:enqueue_many(list)
      assert.equal(1200, n)
      for i = 1, 1200 do
        local got = q:job(ids[i]).args
        if i == 600 then assert.is_nil(got) else assert(spec_helper.exact(list[i].args, got), "job " .. i) end
      end
      local q2 = tide.queue.open(url, { encryptor = {
        encrypt = function(s) return "\0\t\n\\\r" .. s .. "\255\\." end,
        decrypt = function(b) assert(b:sub(1, 5) == "\0\t\n\\\r" and b:sub(-3) == "\255\\.", "bytes changed"); return b:sub(6, -4) end } })
      local eids = q2:enqueue_many{ { target = "t", method = "m", args = { "z\0z\t" } }, { target = "t", method = "m" } }
      assert.same({ { "z\0z\t" }, nil }, { q2:job(eids[1]).args, q2:job(eids[2]).args })
      q2:close()
    end)

    if store.name == "postgres" then
      it("gives each job its own id when the ids drawn for a batch are not contiguous", function()
        -- (a sequence stepping by 3 stands for other sessions' draws
        -- between the batch's: the ids come back as a list)
        sql(q, "ALTER SEQUENCE tide_jobs_id_seq INCREMENT BY 3")
        local list = {}
        for i = 1, 5003 do list[i] = { target = "t", method = "m", args = { i = i } } end
        local ids, n = q:enqueue_many(list)
        assert.equal(5003, n)
        for i = 1, 5003 do
          if i > 1 then assert.equal(ids[i - 1] + 3, ids[i]) end
          assert.equal(i, q:job(ids[i]).args.i)
        end
      end)

      it("leaves nothing of a batch the server refuses halfway, and its connection serves the next one", function()
        q:close()
        q = tide.queue.open(url, { pool = 1 })
        sql(q, "ALTER TABLE tide_jobs ADD CONSTRAINT no_bad CHECK (method <> 'bad')")
        local list = {}
        for i = 1, 7000 do list[i] = { target = "t", method = i == 6500 and "bad" or "m", args = { i = i } } end
        local ok, err = pcall(q.enqueue_many, q, list)
        assert.is_false(ok)
        assert.matches('violates check constraint "no_bad" %(SQLSTATE 23514%)', tostring(err))
        assert.equal(0, q:stats().total)
        list[6500].method = "m"
        local ids, n = q:enqueue_many(list)
        assert.same({ 7000, 7000, 6500 }, { n, #ids, q:job(ids[6500]).args.i })
        -- inside the caller's transaction: its own row goes with the batch
        ok = pcall(q.transaction, q, function(tx)
          tx:enqueue{ target = "t", method = "m", args = { mine = true } }
          list[1].method = "bad"
          tx:enqueue_many(list)
        end)
        assert.is_false(ok)
        assert.equal(7000, q:stats().total)
      end)

      it("runs a connection's setup alone, before a first COPY, inside a transaction or not, or a failing first statement", function()
        local pg_conn = require "tide.jobs.store.pg_conn"
        sql(q, "DROP TABLE IF EXISTS copied")
        sql(q, "CREATE TABLE copied (n integer, app text DEFAULT current_setting('application_name'))")
        spec_helper.run(function()
          local c = pg_conn.new(url, "copy spec", "SET application_name = 'tide_copy_setup'")
          c:begin()                                          -- (its BEGIN waits for the first statement)
          local res = c:copy("COPY copied (n) FROM STDIN", function(put) put("1\n2\n"); put("3\n") end)
          assert.equal(3, res.changes)
          c:finish("ROLLBACK")
          assert.equal(0, c:query("SELECT count(*) AS n FROM copied").rows[1].n)
          res = c:copy("COPY copied (n) FROM STDIN", function(put) put("4\n") end)
          assert.same({ { n = 4, app = "tide_copy_setup" } }, c:query("SELECT n, app FROM copied").rows)
          local ok, err = pcall(c.copy, c, "COPY copied (n) FROM STDIN", function(put) put("5\n"); error("bad data", 0) end)
          assert.same({ false, "bad data" }, { ok, err })
          ok, err = pcall(c.copy, c, "COPY copied (n) FROM STDIN", function(put) put("six\n") end)
          assert.is_false(ok)
          assert.matches("invalid input syntax for type integer.*%(SQLSTATE 22P02%)", err)
          assert.equal(1, c:query("SELECT count(*) AS n FROM copied").rows[1].n)   -- and it serves on
          c:close()
          -- a first statement that fails leaves the setup in place too
          c = pg_conn.new(url, "copy spec", "SET application_name = 'tide_copy_setup'")
          assert.is_false((pcall(c.query, c, "SELECT 1 / 0")))
          assert.equal("tide_copy_setup", c:query("SHOW application_name").rows[1].application_name)
          c:close()
        end)
        sql(q, "DROP TABLE copied")
      end)

      it("leaves nothing of a batch whose task times out while its rows are sent", function()
        local list = {}
        for i = 1, 40000 do list[i] = { target = "t", method = "m", args = { i = i, pad = ("x"):rep(200) } } end
        local status = spec_helper.run(function()
          local t = tide.spawn{ run = function() return q:enqueue_many(list) end, timeout = 40 }
          return (t:await())
        end)
        assert.equal("timeout", status)
        assert.equal(0, q:stats().total)
        local ids, n = q:enqueue_many{ { target = "t", method = "m" } }   -- the pool serves again
        assert.same({ 1, "available" }, { n, q:job(ids[1]).status })
      end)
    end

    it("inserts nothing when one job of the batch is bad, and names it", function()
      local ok, err = pcall(q.enqueue_many, q, { { target = "t", method = "m" }, { target = "t", method = "m", args = { f = print } } })
      assert.is_false(ok)
      assert.truthy(err:find("q:enqueue_many: job 2: bad option 'args' (args.f: function cannot be encoded as JSON)", 1, true), err)
      assert.equal(0, q:stats().total)
    end)
  end)

  describe("q:transaction", function()
    before_each(function()
      sql(q, "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL)")
    end)

    it("commits the caller's rows and the job together", function()
      local id, job = q:transaction(function(tx)
        local n = tx:exec("INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)", 7, "ada", 120.5)
        assert.equal(1, n)
        return 7, tx:enqueue{ target = "orders", method = "fulfill", args = { order = 7 } }
      end)
      assert.equal(7, id)
      assert.same({ order = 7 }, q:job(job).args)
      q:transaction(function(tx)
        assert.same({ { id = 7, customer = "ada", total = 120.5 } }, tx:query("SELECT * FROM orders"))
      end)
    end)

    it("lets a transaction in flight at q:close() end, then closes its connection", function()
      local function connections()           -- the server's sessions on this database but q's own
        return q:transaction(function(tx)
          return tx:query("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()")[1].n
        end)
      end
      local q2
      local result, late, before, after
      spec_helper.run(function()
        before = store.name == "postgres" and connections()
        q2 = tide.queue.open(url)
        local t = tide.spawn(function()
          return q2:transaction(function(tx)
            tx:enqueue{ target = "t", method = "m" }
            tide.sleep(30)
            return "committed"
          end)
        end)
        local t2 = tide.spawn(function()
          return q2:transaction(function(tx)
            tide.sleep(30)
            tx:enqueue{ target = "t", method = "late" }
          end)
        end)
        tide.sleep(10)
        q2:close()
        result, late = { t:await() }, { t2:await() }
        if store.name == "postgres" then         -- the loop still runs (its end closes every socket)
          local t0 = tide.now()                  -- a closed session's backend leaves the server soon after
          repeat after = connections(); tide.sleep(10) until after == before or tide.now() - t0 > 2000
        end
      end)
      assert.same({ "ok", "committed" }, result)
      assert.equal("error", late[1])                  -- SQLite: it waited for the one connection
      assert.matches(store.name == "postgres" and "tx:enqueue: the queue is closed"
                     or "q:transaction: sqlite:[^:]*: the store is closed", late[2])
      assert.equal(1, q:stats().total)
      if store.name == "postgres" then
        assert.equal(before, after)
      else                                     -- the write lock is free: a new store takes it at once
        local q3 = tide.queue.open(url, { busy_timeout = 100 })
        q3:enqueue{ target = "t", method = "after" }
        q3:close()
      end
    end)

    it("closes the connection of a transaction (outside tasks) whose own function closed the queue", function()
      local function connections()
        return q:transaction(function(tx)
          return tx:query("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()")[1].n
        end)
      end
      local before = store.name == "postgres" and connections()
      local q2 = tide.queue.open(url)
      assert.equal("kept", q2:transaction(function(tx)
        tx:enqueue{ target = "t", method = "m" }
        q2:close()
        return "kept"
      end))
      assert.equal(1, q:stats().total)
      if store.name == "postgres" then               -- a closed session's backend leaves the server soon after
        local deadline, now = os.time() + 3, connections()
        while now ~= before and os.time() < deadline do os.execute("sleep 0.02"); now = connections() end
        assert.equal(before, now)
      else
        local q3 = tide.queue.open(url, { busy_timeout = 100 })
        q3:enqueue{ target = "t", method = "after" }
        q3:close()
      end
    end)

    it("rolls back the rows and the job when the function raises, and raises the error again", function()
      local ok, err = pcall(q.transaction, q, function(tx)
        tx:exec("INSERT INTO orders (id, customer) VALUES (?, ?)", 8, "bob")
        tx:enqueue{ target = "orders", method = "fulfill", args = { order = 8 } }
        error("payment declined")
      end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("payment declined", 1, true))
      assert.equal(0, q:stats().total)
      q:transaction(function(tx) assert.same({}, tx:query("SELECT * FROM orders")) end)
    end)

    it("binds parameters, never interpolates them", function()
      local evil = "x'); DROP TABLE orders; --"
      q:transaction(function(tx) tx:exec("INSERT INTO orders (id, customer) VALUES (?, ?)", 1, evil) end)
      q:transaction(function(tx)
        assert.equal(evil, tx:query("SELECT customer FROM orders")[1].customer)
      end)
    end)

    it("nests as a savepoint: an inner failure rolls back only the inner part", function()
      q:transaction(function(tx)
        tx:enqueue{ target = "t", method = "outer" }
        local ok = pcall(q.transaction, q, function(inner)
          inner:enqueue{ target = "t", method = "inner" }
          error("inner fails")
        end)
        assert.is_false(ok)
      end)
      local jobs = q:list{}
      assert.equal(1, #jobs)
      assert.equal("outer", jobs[1].method)
    end)

    if store.name == "sqlite" then
      it("holds the store for the task inside it: another task's enqueue waits for the commit", function()
        local order = {}
        spec_helper.run(function()
          local t1 = tide.spawn(function()
            q:transaction(function(tx)
              tx:enqueue{ target = "t", method = "first" }
              order[#order + 1] = "tx open"
              tide.sleep(30)
              order[#order + 1] = "tx commits"
            end)
          end)
          local t2 = tide.spawn(function()
            tide.sleep(5)
            q:enqueue{ target = "t", method = "second" }
            order[#order + 1] = "second enqueued"
          end)
          assert.equal("ok", (t1:await()))
          assert.equal("ok", (t2:await()))
        end)
        assert.same({ "tx open", "tx commits", "second enqueued" }, order)
        assert.equal(2, q:stats().total)
      end)

      it("gives code outside tasks a clear error while a task holds the store", function()
        local err
        spec_helper.run(function()
          local t = tide.spawn(function() q:transaction(function() tide.sleep(20) end) end)
          tide.spawn{ run = function() tide.sleep(5) end, handle_result = function()
            local ok, e = pcall(q.enqueue, q, { target = "t", method = "m" })   -- a callback cannot wait
            err = not ok and e
          end }
          t:await()
        end)
        assert.equal("q:enqueue: " .. url .. ": 1 connection busy, and this call is outside a task, where it "
                     .. "cannot wait for one (call it from a task)", err)
      end)
    else
      it("gives another task's statements a connection of their own: they neither wait nor join the transaction", function()
        local order = {}
        spec_helper.run(function()
          local t1 = tide.spawn(function()
            pcall(q.transaction, q, function(tx)
              tx:enqueue{ target = "t", method = "first" }
              order[#order + 1] = "tx open"
              tide.sleep(500)        -- long enough for a new connection on a loaded machine
              order[#order + 1] = "tx rolls back"
              error("no")
            end)
          end)
          local t2 = tide.spawn(function()
            tide.sleep(5)
            q:enqueue{ target = "t", method = "second" }
            order[#order + 1] = "second enqueued"
          end)
          assert.equal("ok", (t1:await()))
          assert.equal("ok", (t2:await()))
        end)
        assert.same({ "tx open", "second enqueued", "tx rolls back" }, order)
        local jobs = q:list{}
        assert.equal(1, #jobs)
        assert.equal("second", jobs[1].method)
      end)
    end
  end)

  describe("inspecting and changing jobs", function()
    it("lists newest first, filtered by status and queue, with a limit and paging", function()
      for i = 1, 5 do q:enqueue{ target = "t", method = "m", queue = i % 2 == 0 and "even" or "odd", args = { i } } end
      q:enqueue{ target = "t", method = "m", delay = 60000 }
      local all = q:list{}
      assert.equal(6, #all)
      assert.is_true(all[1].id > all[2].id)
      assert.equal(2, #q:list{ queue = "even" })
      assert.equal(1, #q:list{ status = "scheduled" })
      local page1 = q:list{ limit = 4 }
      local page2 = q:list{ limit = 4, before = page1[4].id }
      assert.equal(4, #page1)
      assert.equal(2, #page2)
      assert.is_nil(q:job(9999))
    end)

    it("counts jobs by status and queue", function()
      q:enqueue{ target = "t", method = "m" }
      q:enqueue{ target = "t", method = "m", queue = "mail" }
      q:enqueue{ target = "t", method = "m", queue = "mail", delay = 60000 }
      local st = q:stats()
      assert.equal(3, st.total)
      assert.equal(2, st.available)
      assert.equal(1, st.scheduled)
      assert.equal(0, st.completed)
      assert.same({ available = 1, scheduled = 1 }, st.queues.mail)
    end)

    it("cancels, expires, fails and retries, and says why not when it cannot", function()
      local a = q:enqueue{ target = "t", method = "m" }
      local b = q:enqueue{ target = "t", method = "m" }
      local c = q:enqueue{ target = "t", method = "m" }
      assert.is_true(q:cancel(a))
      assert.equal("cancelled", q:job(a).status)
      assert.is_not_nil(q:job(a).completed_at)
      local ok, err = q:cancel(a)
      assert.is_nil(ok)
      assert.equal(("job %d is cancelled"):format(a), err)
      assert.is_true(q:expire(b))
      assert.equal("expired", q:job(b).status)
      assert.is_true(q:fail(c, "customer gone"))
      local jc = q:job(c)
      assert.equal("discarded", jc.status)
      assert.equal("customer gone", jc.errors[1].error)
      ok, err = q:retry(9999)
      assert.is_nil(ok)
      assert.equal("job 9999 not found", err)
      assert.is_true(q:retry(c))
      assert.equal("available", q:job(c).status)
      assert.is_nil(q:job(c).completed_at)
      ok, err = q:retry(c)
      assert.is_nil(ok)
      assert.equal(("job %d is available"):format(c), err)
    end)

    it("prunes finished jobs older than the given age, and only those", function()
      local a = q:enqueue{ target = "t", method = "m" }
      local b = q:enqueue{ target = "t", method = "m" }
      q:enqueue{ target = "t", method = "m" }
      q:cancel(a)
      q:fail(b)
      assert.equal(0, q:prune{ older_than = "1h" })
      assert.equal(1, q:prune{ older_than = 0, statuses = { "cancelled" } })
      assert.equal(1, q:prune{ older_than = 0 })
      assert.equal(1, q:stats().total)
      assert.equal(1, q:stats().available)
    end)
  end)

  describe("encryption", function()
    -- A toy cipher (XOR with a key stream) stands in for a real one: the
    -- spec is about where the plaintext goes, not about cryptography.
    local function xor(s, key)
      local out = {}
      for i = 1, #s do out[i] = string.char(bit.bxor(s:byte(i), key:byte((i - 1) % #key + 1))) end
      return table.concat(out)
    end
    local enc = { encrypt = function(s) return "v1:" .. xor(s, "k3y!") end,
                  decrypt = function(s) return xor(s:sub(4), "k3y!") end }

    it("stores args only encrypted: the plaintext is nowhere in the database files", function()
      q:close()
      q = tide.queue.open(url, { encryptor = enc })
      local secret = "4111-1111-1111-1111 card of ada lovelace"
      local id = q:enqueue{ target = "billing", method = "charge", args = { card = secret } }
      q:enqueue_many{ { target = "billing", method = "charge", args = { card = secret .. " 2" } } }
      q:transaction(function(tx) tx:enqueue{ target = "billing", method = "charge", args = { card = secret } } end)
      local j = q:job(id)
      assert.same({ card = secret }, j.args)
      assert.is_true(j.encrypted)
      local stored = {}                          -- every stored column, as the database has it
      for _, row in ipairs(sql(q, "SELECT * FROM tide_jobs")) do
        for _, v in pairs(row) do stored[#stored + 1] = tostring(v) end
      end
      stored = table.concat(stored, "\n")
      if store.name == "sqlite" then stored = stored .. file_bytes(path) .. file_bytes(path .. "-wal") end
      assert.is_true(#stored > 0)
      assert.is_nil(stored:find(secret, 1, true))
      assert.is_nil(stored:find("4111-1111", 1, true))
      q:close()
      q = tide.queue.open(url)           -- no encryptor: the args stay closed
      local jc = q:job(id)
      assert.is_nil(jc.args)
      assert.equal("args are encrypted and this queue has no encryptor", jc.args_error)
    end)
  end)

  describe("bad input", function()
    it("raises clear errors that name the function, the option and what was expected", function()
      local bad = function(j) return function() q:enqueue(j) end end
      local sparse = { [1] = 1, [50] = 5 }
      spec_helper.error_cases("spec/queue_spec.lua", {
        { function() tide.queue.open(42) end, "tide.queue.open: bad argument #1 (store URL string expected, got number 42)" },
        { function() tide.queue.open("jobs.db") end, 'tide.queue.open: bad store URL "jobs.db" (expected sqlite:PATH or postgres://...)' },
        { function() tide.queue.open("mysql://x") end, "tide.queue.open: unknown store 'mysql' in \"mysql://x\" (expected sqlite:PATH or postgres://...)" },
        { function() tide.queue.open("sqlite:") end, 'tide.queue.open: bad store URL "sqlite:" (the file path is missing)' },
        { function() tide.queue.open("sqlite:x.db", { encrypt = true }) end, "tide.queue.open: unknown option 'encrypt'" },
        { function() tide.queue.open("sqlite:x.db", { encryptor = {} }) end,
          "tide.queue.open: bad option 'encryptor' (table with encrypt and decrypt functions expected, got table)" },
        { function() tide.queue.open("sqlite:x.db", { synchronous = "fast" }) end,
          "tide.queue.open: bad option 'synchronous' ('full', 'normal' or 'off' expected, got string \"fast\")" },
        { bad(nil), "q:enqueue: bad argument #1 (job table expected, got nil)" },
        { bad{ target = "t", method = "m", retries = 3 }, "q:enqueue: unknown option 'retries'" },
        { bad{ method = "m" }, "q:enqueue: bad option 'target' (module name (like \"orders\" or \"app.mail\") expected, got nil)" },
        { bad{ target = "t", method = "a b" }, "q:enqueue: bad option 'method' (function name expected, got string \"a b\")" },
        { bad{ target = "t", method = "m", args = { items = { 1, { cb = print } } } },
          "q:enqueue: bad option 'args' (args.items[2].cb: function cannot be encoded as JSON)" },
        { bad{ target = "t", method = "m", args = { x = math.huge } }, "q:enqueue: bad option 'args' (args.x: inf is not a JSON number)" },
        { bad{ target = "t", method = "m", args = { [true] = 1 } },
          "q:enqueue: bad option 'args' (args: key boolean in a table with other keys (JSON objects have string keys, arrays keys 1..n))" },
        { bad{ target = "t", method = "m", args = sparse }, "q:enqueue: bad option 'args' (args: sparse array (keys 1..n expected, got 2 values up to key 50))" },
        { bad{ target = "t", method = "m", run_at = "tomorrow" },
          "q:enqueue: bad option 'run_at' (UTC time from 1970 to 9999 (ms since the epoch, or ISO 8601 like \"2026-11-23T15:04:05Z\") expected, got string \"tomorrow\")" },
        { bad{ target = "t", method = "m", run_at = "2026-02-30T00:00:00Z" },
          "q:enqueue: bad option 'run_at' (UTC time from 1970 to 9999 (ms since the epoch, or ISO 8601 like \"2026-11-23T15:04:05Z\") expected, got string \"2026-02-30T00:00:00Z\")" },
        { bad{ target = "t", method = "m", run_at = 1, delay = 5 }, "q:enqueue: give run_at or delay, not both" },
        { bad{ target = "t", method = "m", priority = 1.5 }, "q:enqueue: bad option 'priority' (integer from -2147483648 to 2147483647 (lower runs first) expected, got number 1.5)" },
        { bad{ target = "t", method = "m", max_attempts = 0 }, "q:enqueue: bad option 'max_attempts' (integer from 1 to 2147483647 expected, got number 0)" },
        { bad{ target = "t", method = "m", idempotency_key = "" }, "q:enqueue: bad option 'idempotency_key' (non-empty string expected, got string \"\")" },
        { bad{ target = "t", method = "m", queue = "a queue" }, "q:enqueue: bad option 'queue' (queue name (letters, digits, _ . -) expected, got string \"a queue\")" },
        { function() q:job("7") end, "q:job: bad argument #1 (job id (integer from 1 to 2^53) expected, got string \"7\")" },
        { function() q:list{ status = "done" } end,
          "q:list: bad option 'status' ('available', 'cancelled', 'completed', 'discarded', 'executing', 'expired', 'retryable' or 'scheduled' expected, got string \"done\")" },
        { function() q:prune{ older_than = "soon" } end, "q:prune: bad option 'older_than' (duration (ms, or like \"7d\", \"12h\") expected, got string \"soon\")" },
        { function() q:transaction("nope") end, "q:transaction: bad argument #1 (function expected, got string \"nope\")" },
        { function() q.enqueue({}, {}) end, "q:enqueue: bad self (queue expected, got table); call it as q:enqueue(...)" },
      })
      assert.equal(0, q:stats().total)
    end)

    it("names the store and the SQLite code when the caller's SQL fails", function()
      local ok, err = pcall(q.transaction, q, function(tx) tx:exec("INSERT INTO nowhere VALUES (1)") end)
      assert.is_false(ok)
      local expected = store.name == "sqlite" and url .. ": no such table: nowhere (SQLITE_ERROR)"
                       or url .. ': relation "nowhere" does not exist (SQLSTATE 42P01)'
      assert.truthy(err:find(expected, 1, true), err)
    end)

    it("answers huge spans and ids the same on every store", function()
      local id = q:enqueue{ target = "t", method = "m" }
      assert.equal(0, q:prune{ older_than = 1e300 })              -- nothing is older than that
      assert.equal(0, q:prune{ older_than = "99999999999999999999d" })
      assert.equal(1, q:recent(5, 1e300).default.available.n)     -- as the store holds it
      assert.equal(1, #q:list{ before = 2 ^ 53 })
      assert.is_nil(q:job(2 ^ 53))
      spec_helper.error_cases("spec/queue_spec.lua", {
        { function() q:job(1e300) end, "q:job: bad argument #1 (job id (integer from 1 to 2^53) expected, got number 1e+300)" },
        { function() q:cancel(2 ^ 60) end, "q:cancel: bad argument #1 (job id (integer from 1 to 2^53) expected, got number 1.1529215046068e+18)" },
        { function() q:list{ before = 1e300 } end, "q:list: bad option 'before' (job id (integer from 1 to 2^53) expected, got number 1e+300)" },
      })
      assert.equal("available", q:job(id).status)
    end)

    it("refuses calls on a closed queue", function()
      q:close()
      spec_helper.error_like("q:enqueue: the queue is closed", function() q:enqueue{ target = "t", method = "m" } end)
      q = tide.queue.open(url)
    end)
  end)
end)
end
