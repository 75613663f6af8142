-- spec/review_r16_spec.lua — review of issue 16 on PostgreSQL: batches by COPY (h16e), outcomes gathered
-- and watches left armed (h16p).  Attacks: every byte, huge texts, concurrent batches with singles
-- between them, batches cut off at random instants, a server restarted mid-batch, an exhausted pool.
local tide = require "tide"
local json = require "tide.jobs.json"
local sql = spec_helper.sql                -- sql(q, stmt, ...): rows, in a transaction of q

local pg_store = spec_helper.stores()[2]
if not pg_store then
  describe("review r16 (PostgreSQL)", function()
    it("needs TIDE_PG_URL (spec/run.sh starts a server)", function() pending("no PostgreSQL server") end)
  end)
  return
end

--- Rows of a query as a table: { status = n } when it has columns status
--- and n, else the first row.
local function sql_rows(q, stmt, ...)
  local rows = sql(q, stmt, ...)
  if rows[1] and rows[1].status and rows[1].n then
    local out = {}
    for _, r in ipairs(rows) do out[r.status] = r.n end
    return out
  end
  return rows[1]
end

local SEED = tonumber(os.getenv("TIDE_SEED") or "") or os.time()

describe("review r16: enqueue_many by COPY", function()
  local url, q

  before_each(function()
    url = pg_store.fresh()
    q = tide.queue.open(url)
  end)

  after_each(function()
    if q then q:close() end
    pg_store.reset()
    spec_helper.assert_idle()
  end)

  local function count(where)
    return sql(q, "SELECT count(*) AS n FROM tide_jobs WHERE " .. (where or "true"))[1].n
  end

  it("brings back every text a single enqueue brings back, byte for byte, in args and partition keys", function()
    -- (invalid UTF-8 is refused by both paths with the same message; the
    -- rest must come back the same whichever path took it)
    q:declare("p", { partition = function(a) return a.k end })
    local texts = { "\\.", "\\.\n", "\n\\.\n", "\r\n\\.\r\n", "a\\", ("\\"):rep(7), "\\N", "\\\\N", "\\x41", "\\101",
                    "\t\t", "\\t", "end\\", "\\\r", "\0", "a\0b\0" }
    for b = 0, 127 do texts[#texts + 1] = string.char(b) .. "|" .. string.char(b) end
    texts[#texts + 1] = ("é€😀\t\\"):rep(1000)
    local many, singles = {}, {}
    for i, s in ipairs(texts) do
      -- (keys are text: no NUL; at most 2000 bytes, so the long text's key is
      -- its first 181 repeats of 11 bytes)
      local key = s:find("\0", 1, true) and "nul" .. i or #s > 2000 and s:sub(1, 11 * 181) or s
      many[i] = { target = "t", method = "m", queue = "p", args = { s = s, k = key, t = { s } } }
      singles[i] = q:enqueue(many[i])
    end
    local ids = q:enqueue_many(many)
    for i = 1, #texts do
      local a, b = q:job(singles[i]), q:job(ids[i])
      assert(spec_helper.exact(many[i].args, b.args), "args of text " .. i .. " changed")
      assert.equal(a.args and json.encode(a.args), json.encode(b.args), "text " .. i)
      local pa = sql(q, "SELECT partition_key AS k FROM tide_jobs WHERE id = $1", singles[i])[1].k
      local pb = sql(q, "SELECT partition_key AS k FROM tide_jobs WHERE id = $1", ids[i])[1].k
      assert.equal(many[i].args.k, pb, "partition key of text " .. i)
      assert.equal(pa, pb)
    end
    for b = 128, 255 do
      local bad = { target = "t", method = "m", args = { "x" .. string.char(b) } }
      local ok1, e1 = pcall(q.enqueue, q, bad)
      local ok2, e2 = pcall(q.enqueue_many, q, { bad })
      assert.same({ false, false }, { ok1, ok2 })
      assert.equal(tostring(e1):gsub("^q:enqueue: ", ""), (tostring(e2):gsub("^q:enqueue_many: job 1: ", "")))
    end
  end)

  it("brings back a 64 MB text in a batch exactly as a single enqueue does", function()
    local big = ("\\\t\n\r"):rep(4 * 1024 * 1024) .. ("z"):rep(48 * 1024 * 1024)
    local id1 = q:enqueue{ target = "t", method = "m", args = { big } }
    local ids = q:enqueue_many{ { target = "t", method = "m", args = { big } }, { target = "t", method = "m", args = { "tail" } } }
    local a, b = q:job(id1).args[1], q:job(ids[1]).args[1]
    assert.equal(#big, #b)
    assert.is_true(a == big and b == big)
    assert.equal("tail", q:job(ids[2]).args[1])
  end)

  it("gives each of three concurrent 5,003-job batches, and the singles between them, its own row", function()
    math.randomseed(SEED)
    local lists, got, singles = {}, {}, {}
    local status, err = tide.run(function()
      local tasks = {}
      for b = 1, 3 do
        local list = {}
        for i = 1, 5003 do list[i] = { target = "t", method = "m", args = { b = b, i = i } } end
        lists[b] = list
        tasks[#tasks + 1] = tide.spawn(function()
          tide.sleep(math.random(0, 3))
          if b == 2 then                     -- (one inside a transaction with rows of its own around it)
            got[b] = q:transaction(function(tx)
              local before = tx:enqueue{ target = "t", method = "m", args = { s = "before" } }
              singles[#singles + 1] = { before, "before" }
              local ids = tx:enqueue_many(list)
              local after = tx:enqueue{ target = "t", method = "m", args = { s = "after" } }
              singles[#singles + 1] = { after, "after" }
              return ids
            end)
          else
            got[b] = q:enqueue_many(list)
          end
        end)
      end
      for s = 1, 2 do
        tasks[#tasks + 1] = tide.spawn(function()
          for i = 1, 40 do
            local tag = "single " .. s .. "." .. i
            local id = q:enqueue{ target = "t", method = "m", args = { s = tag } }   -- (then the index: it yields)
            singles[#singles + 1] = { id, tag }
            tide.sleep(math.random(0, 1))
          end
        end)
      end
      for _, t in ipairs(tasks) do
        local st, e = t:await()
        assert(st == "ok", tostring(e))
      end
    end)
    assert.equal("ok", status, tostring(err))
    local byid = {}
    for _, r in ipairs(sql(q, "SELECT id, args FROM tide_jobs")) do byid[r.id] = json.decode(r.args) end
    local n = 0
    for b = 1, 3 do
      assert.equal(5003, #got[b])
      for i = 1, 5003 do
        local a = byid[got[b][i]]
        assert(a and a.b == b and a.i == i, ("seed %d: batch %d job %d got id %s, whose row is %s")
          :format(SEED, b, i, tostring(got[b][i]), a and json.encode(a) or "missing"))
        if i > 1 then assert(got[b][i] > got[b][i - 1], "seed " .. SEED .. ": ids of a batch out of its order") end
        n = n + 1
      end
    end
    for _, s in ipairs(singles) do
      assert.equal(s[2], byid[s[1]] and byid[s[1]].s)
      n = n + 1
    end
    assert.equal(n, count())
  end)

  it("leaves no part of a batch cut off at a random instant, and the pool's one connection serves after", function()
    math.randomseed(SEED)
    q:close()
    q = tide.queue.open(url, { pool = 1, pool_timeout = 20000 })
    local list = {}
    for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, pad = ("p\t\\"):rep(30) } } end
    local expect, in_doubt = 0, 0
    for round = 1, 12 do
      local how = round % 3                  -- 0: own batch; 1: in a transaction; 2: cancelled by another task
      local cut = math.random(1, 500)
      local warned = false
      tide.configure{ on_error = function(_, msg)
        if tostring(msg):find("while its COMMIT was in flight", 1, true) then warned = true end
      end }
      local status = spec_helper.run(function()
        local t = tide.spawn{ timeout = how ~= 2 and cut or nil, run = function()
          if how == 1 then
            return q:transaction(function(tx)
              tx:enqueue{ target = "t", method = "m", args = { round = round } }
              tx:enqueue_many(list)
              tx:enqueue{ target = "t", method = "m", args = { round = round } }
            end)
          end
          return q:enqueue_many(list)
        end }
        if how == 2 then tide.sleep(cut); t:cancel("cut") end
        return (t:await())
      end)
      spec_helper.loud_errors()
      local whole = expect + #list + (how == 1 and 2 or 0)
      local n = count()
      if status == "ok" then
        expect = whole
      elseif n == whole and warned then
        -- cut while its COMMIT was in flight: the server's to decide, whole
        expect, in_doubt = whole, in_doubt + 1
      end
      assert(n == expect, ("seed %d round %d (%s after %d ms): %d rows, %d expected")
        :format(SEED, round, status, cut, n, expect))
      -- the one connection serves the next batch and a single
      local ids = q:enqueue_many{ { target = "t", method = "m", args = { r = round } } }
      q:enqueue{ target = "t", method = "m", args = { r = round } }
      expect = expect + 2
      assert.equal(round, q:job(ids[1]).args.r)
      assert.same({ size = 1, open = 1, busy = 0, waiting = 0 }, q:stats().pool)
    end
    if in_doubt > 0 then print(("  %d of 12 cut while their COMMIT was in flight (committed whole)"):format(in_doubt)) end
  end)

  it("tells the error sink when a task is cut while its COMMIT is in flight: the server commits it whole, or not at all", function()
    -- A deferred trigger runs at COMMIT: the server holds the COMMIT 1 s
    -- (then, on the second table, refuses it), and the task is cut at 500 ms,
    -- long after its statements (a few ms, tens under ASan) were done.
    sql(q, [[CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN PERFORM pg_sleep(1);
                IF TG_TABLE_NAME = 'refused' THEN RAISE EXCEPTION 'refused at commit'; END IF;
                RETURN NULL; END $$]])
    for _, t in ipairs{ "slow", "refused" } do
      sql(q, "DROP TABLE IF EXISTS " .. t)
      sql(q, "CREATE TABLE " .. t .. " (n int)")
      sql(q, "CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON " .. t
          .. " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
    end
    q:close()
    q = tide.queue.open(url, { pool = 1 })
    local list = {}
    for i = 1, 200 do list[i] = { target = "t", method = "m", args = { i = i } } end
    for _, case in ipairs{ { "slow", "cancel", 202 }, { "slow", "timeout", 404 }, { "refused", "cancel", 404 } } do
      local tbl, how, rows = case[1], case[2], case[3]
      local warned = 0
      tide.configure{ on_error = function(where, msg)
        assert.matches("while its COMMIT was in flight: the server may have committed it", tostring(msg), 1, true)
        assert.matches("^postgres", where)
        warned = warned + 1
      end }
      local status = spec_helper.run(function()
        local t = tide.spawn{ timeout = how == "timeout" and 500 or nil, run = function()
          q:transaction(function(tx)
            tx:exec("INSERT INTO " .. tbl .. " VALUES (1)")
            tx:enqueue_many(list)
            tx:enqueue{ target = "t", method = "m" }
            tx:enqueue{ target = "t", method = "m" }
          end)
        end }
        if how == "cancel" then tide.sleep(500); t:cancel("cut") end
        return (t:await())
      end)
      spec_helper.loud_errors()
      assert.equal(how == "cancel" and "cancelled" or "timeout", status)
      assert.equal(1, warned)
      spec_helper.run(function() tide.sleep(700) end)   -- (the server is done with the COMMIT it was sent)
      assert.equal(rows, count(), tbl .. " " .. how)
      assert.equal(tbl == "slow" and rows / 202 or 0, sql(q, "SELECT count(*) AS n FROM " .. tbl)[1].n)
      assert.same({ size = 1, open = 1, busy = 0, waiting = 0 }, q:stats().pool)
    end
  end)

  it("keeps a failed batch in a savepoint out of the transaction that goes on and commits", function()
    sql(q, "ALTER TABLE tide_jobs ADD CONSTRAINT no_bad CHECK (method <> 'bad')")
    local list = {}
    for i = 1, 6000 do list[i] = { target = "t", method = i == 5999 and "bad" or "m", args = { i = i } } end
    local ok, err
    q:transaction(function(tx)
      tx:enqueue{ target = "t", method = "m", args = { mine = 1 } }
      ok, err = pcall(tx.enqueue_many, tx, list)
      tx:enqueue{ target = "t", method = "m", args = { mine = 2 } }
      list[5999].method = "m"
      tx:enqueue_many(list)
    end)
    assert.is_false(ok)
    assert.matches("no_bad", tostring(err))
    assert.equal(6002, count())
  end)

  it("leaves nothing of a batch whose server restarts under it, and enqueues again once it is back", function()
    local dir = os.getenv("TIDE_PG_DIR")
    if not dir then pending("needs TIDE_PG_DIR (spec/run.sh sets it)") return end
    local list = {}
    for i = 1, 30000 do list[i] = { target = "t", method = "m", args = { i = i, pad = ("r"):rep(300) } } end
    local done, failed = 0, 0
    local status, err = tide.run(function()
      local restarted = false
      local t = tide.spawn(function()
        while not restarted do
          local ok, e = pcall(q.enqueue_many, q, list)
          if ok then done = done + 1 else
            failed = failed + 1
            assert.matches("connection", tostring(e))
          end
        end
      end)
      tide.sleep(150)
      spec_helper.sh_on_thread("env -u LD_PRELOAD sh spec/pg.sh restart " .. dir .. " 2>&1")   -- (not under the sanitizers)
      restarted = true
      local st, e = t:await()
      assert(st == "ok", tostring(e))
    end)
    assert.equal("ok", status, tostring(err))
    io.stderr:write(("restart: %d batches done, %d cut off\n"):format(done, failed))
    assert.equal(done * #list, count())
    local ids = q:enqueue_many{ { target = "t", method = "m", args = { after = true } } }
    assert.is_true(q:job(ids[1]).args.after)
  end)

  it("tells a caller waiting for the pool's one connection while a COPY streams that it is exhausted", function()
    q:close()
    q = tide.queue.open(url, { pool = 1, pool_timeout = 30 })
    local list = {}
    for i = 1, 30000 do list[i] = { target = "t", method = "m", args = { i = i, pad = ("e"):rep(200) } } end
    local status, err = tide.run(function()
      local big = tide.spawn(function() return #q:enqueue_many(list) end)
      tide.sleep(5)
      local ok, e = pcall(q.enqueue, q, { target = "t", method = "m" })
      assert.is_false(ok)
      assert.matches("pool exhausted", tostring(e))
      local st, n = big:await()
      assert.same({ "ok", 30000 }, { st, n })
      q:enqueue{ target = "t", method = "m" }
    end)
    assert.equal("ok", status, tostring(err))
    assert.equal(30001, count())
  end)
end)

describe("review r16: a COPY statement of the user's own", function()
  -- (in a process of its own: the bug hangs the process, spinning)
  for _, stmt in ipairs{ "COPY tide_jobs (queue) FROM STDIN", "COPY (SELECT 1 AS one) TO STDOUT" } do
    it("fails with an error, never spins for ever, on tx:exec(\"" .. stmt .. "\")", function()
      pg_store.fresh()
      local dir = spec_helper.tempdir()
      local status, out = spec_helper.run_lua(dir, "copy.lua", ([[
        local tide = require "tide"
        local q = tide.queue.open(os.getenv("TIDE_PG_URL"), { pool = 1 })
        local ok, err = pcall(q.transaction, q, function(tx) return tx:exec(%q) end)
        print(ok, err)
        local id = q:enqueue{ target = "t", method = "m" }        -- the pool's one connection serves again
        print("after", q:job(id).status, q:stats().total)
        q:close()
      ]]):format(stmt), 20)
      os.execute("rm -rf " .. dir)
      pg_store.reset()
      assert.equal(0, status, out)
      assert.matches("^false\t[^\n]*COPY", out)
      assert.matches("after\tavailable\t1", out)
    end)
  end
end)

describe("review r16: finalizers that enqueue while a batch is checked and sent", function()
  -- (Was an open defect: the process hung for ever.  The cause was not in
  -- the store: each finalizer's q:enqueue encoded its args, and the pairs()
  -- loop of tide.jobs.json, compiled for the batch's args, met args of
  -- another shape inside a finalizer, where LuaJIT before 2023-08 exits the
  -- loop's trace back to its own head for ever: see the header of
  -- tide.engine.finalizers.  Store calls now refuse to run inside a
  -- finalizer, before they look at their arguments; spec/finalizer_spec.lua
  -- attacks the other store calls, on SQLite too.)
  it("gets an error in each finalizer, never hangs the process", function()
    pg_store.fresh()
    local dir = spec_helper.tempdir()
    local status, out = spec_helper.run_lua(dir, "gc.lua", [[
      local tide = require "tide"
      local q = tide.queue.open(os.getenv("TIDE_PG_URL"), { pool = 1 })
      local fired, failed, first = 0, 0, nil
      local status = tide.run(function()
        local list = {}
        for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, round = 1 } } end
        for _ = 1, 200 do
          local p = newproxy(true)
          getmetatable(p).__gc = function()
            fired = fired + 1
            local ok, err = pcall(q.enqueue, q, { target = "t", method = "m", args = { from = "gc" } })
            if not ok then failed = failed + 1; first = first or err end
          end
        end
        return #q:enqueue_many(list)
      end)
      print(status, fired, failed, q:stats().total)
      print(first)
      q:close()
    ]], 30)
    os.execute("rm -rf " .. dir)
    pg_store.reset()
    assert.equal(0, status, "exit " .. status .. " (124: hung): " .. out)
    local st, fired, failed, total = out:match("^(%a+)\t(%d+)\t(%d+)\t(%d+)\n")
    assert.equal("ok", st, out)
    assert.is_true(tonumber(fired) > 0, "no finalizer ran during the batch: " .. out)
    assert.equal(fired, failed, "a finalizer's enqueue did not fail: " .. out)
    assert.equal("6000", total, "the batch, and only the batch, is in: " .. out)
    assert.is_truthy(out:find("\nq:enqueue: cannot run inside a __gc finalizer (", 1, true), out)
  end)
end)

describe("review r16: outcomes gathered on PostgreSQL", function()
  local url, q

  before_each(function()
    url = pg_store.fresh()
    q = tide.queue.open(url)
    q:transaction(function(tx) tx:exec("CREATE TABLE r16_effects (job bigint NOT NULL)") end)
  end)

  after_each(function()
    q:transaction(function(tx) tx:exec("DROP TABLE IF EXISTS r16_effects") end)
    q:close()
    pg_store.reset()
    spec_helper.assert_idle()
  end)

  it("runs again every job whose outcome was gathered, not written, when its worker is SIGKILLed", function()
    local ids = {}
    for i = 1, 20 do ids[i] = q:enqueue{ target = "r16t", method = "quick", args = { i = i } } end
    local long = q:enqueue{ target = "r16t", method = "long" }
    -- The child gathers for a minute (one job keeps running, so the window
    -- stays open) and kills itself once all 20 outcomes wait in memory.
    local dir = spec_helper.tempdir()
    local status, out = spec_helper.run_lua(dir, "child.lua", [[
      local tide = require "tide"
      local ffi = require "ffi"
      ffi.cdef "int getpid(void); int kill(int pid, int sig);"
      require("tide.jobs.outcomes").GATHER_MS = 60000
      tide.run(function()
        local q = tide.queue.open(os.getenv("TIDE_PG_URL"))
        local t = { quick = function(_, job)
                      q:transaction(function(tx) tx:exec("INSERT INTO r16_effects (job) VALUES (?)", job.id) end)
                    end,
                    long = function() tide.sleep(60000) end }
        local w = tide.worker{ queue = q, concurrency = 50, lease = 1000, targets = { r16t = t } }
        for _ = 1, 2000 do
          tide.sleep(5)
          if #w.pending >= 20 then io.stdout:write("gathered\n"); io.stdout:flush(); ffi.C.kill(ffi.C.getpid(), 9) end
        end
        print("never gathered 20")
      end)
    ]], 60)
    os.execute("rm -rf " .. dir)
    assert.equal(137, status, out)
    assert.matches("gathered", out)
    local st = sql_rows(q, "SELECT status, count(*) AS n FROM tide_jobs GROUP BY status")
    assert.same({ executing = 21 }, st, "the outcomes were written before the kill: the window was missed")
    -- another worker: the leases run out, the jobs run again, each ends recorded
    local stats = spec_helper.run(function()
      local t = { quick = function(_, job)
                    q:transaction(function(tx) tx:exec("INSERT INTO r16_effects (job) VALUES (?)", job.id) end)
                  end,
                  long = function() end }
      local w = tide.worker{ queue = q, concurrency = 50, targets = { r16t = t } }
      return w:drain{ stop = true }
    end)
    assert.equal(21, stats.completed)
    for i = 1, 20 do
      assert.equal("completed", q:job(ids[i]).status)
      local n = sql_rows(q, "SELECT count(*) AS n FROM r16_effects WHERE job = $1", ids[i]).n
      assert.equal(2, n, "job " .. i .. " did its work " .. n .. " times")
    end
    assert.equal("completed", q:job(long).status)
  end)
end)
