-- spec/transaction_spec.lua — transactions of many tasks never mix (Promise 7), on every store:
-- a session per transaction from before its first wait, tx handles valid only inside,
-- a pool with a bounded wait, broken connections discarded, NUL-safe parameters.
local tide = require "tide"

local function seeded()
  local seed = tonumber(os.getenv("TX_SEED")) or (os.time() * 1000 + math.floor(tide.now())) % 2 ^ 31
  math.randomseed(seed)
  return seed
end

for _, store in ipairs(spec_helper.stores()) do
describe("transactions on " .. store.name, function()
  local path, url, q
  local pg = store.name == "postgres"

  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
    q = tide.queue.open(url)
    q:transaction(function(tx)
      tx:exec("DROP TABLE IF EXISTS effects")
      tx:exec("CREATE TABLE effects (task INTEGER NOT NULL, step INTEGER NOT NULL, txid TEXT)")
    end)
  end)

  after_each(function()
    q:close()
    store.reset(path)
    os.remove(path)
    spec_helper.assert_idle()
  end)

  -- The transaction's own identity, from the server: statements of one
  -- transaction see the same (PostgreSQL); SQLite has one transaction at a time.
  local TXID = pg and "txid_current()::text" or "'one'"

  it("of 200 tasks that wait between their statements: each committed one whole, each rolled-back one gone", function()
    local seed = seeded()
    local N = 200
    local plan, ended = {}, {}
    for i = 1, N do
      local r = math.random(10)
      plan[i] = r <= 2 and "raise" or r == 3 and "timeout" or r == 4 and "await" or "sleep"
    end
    local status, err = tide.run(function()
      local tasks = {}
      for i = 1, N do
        tasks[i] = tide.spawn{ timeout = plan[i] == "timeout" and 5 or nil, run = function()
          q:transaction(function(tx)
            tx:exec("INSERT INTO effects (task, step, txid) VALUES (?, 1, " .. TXID .. ")", i)
            if plan[i] == "await" then
              tide.spawn(function() tide.sleep(math.random(0, 10)) end):await()
            else
              tide.sleep(plan[i] == "timeout" and 50 or math.random(0, 10))
            end
            tx:exec("INSERT INTO effects (task, step, txid) VALUES (?, 2, " .. TXID .. ")", i)
            tx:enqueue{ target = "t", method = "m", args = { task = i } }
            tide.sleep(math.random(0, 3))
            if plan[i] == "raise" then error("task " .. i .. " changes its mind") end
          end)
        end }
      end
      for i = 1, N do
        local st, v = tasks[i]:await()
        ended[i] = st == "error" and plan[i] ~= "raise" and ("error: " .. tostring(v)) or st
      end
    end)
    assert(status == "ok", ("seed %d: %s"):format(seed, tostring(err)))
    local rows = q:transaction(function(tx) return tx:query("SELECT task, step, txid FROM effects") end)
    local by_task, txids = {}, {}
    for _, r in ipairs(rows) do
      local t = by_task[r.task] or {}
      by_task[r.task] = t
      t[#t + 1] = r
    end
    local jobs = {}
    for _, j in ipairs(q:list{ limit = 1000 }) do jobs[j.args.task] = (jobs[j.args.task] or 0) + 1 end
    local committed = 0
    for i = 1, N do
      local mine = by_task[i] or {}
      local what = ("seed %d, task %d (%s, ended %s)"):format(seed, i, plan[i], tostring(ended[i]))
      if plan[i] == "sleep" or plan[i] == "await" then
        assert(ended[i] == "ok", what)
        assert(#mine == 2 and jobs[i] == 1, what .. (": %d rows, %s jobs"):format(#mine, tostring(jobs[i])))
        assert(mine[1].txid == mine[2].txid, what .. ": its statements ran in two transactions")
        if pg then
          assert(not txids[mine[1].txid], what .. ": shares a transaction with task " .. tostring(txids[mine[1].txid]))
          txids[mine[1].txid] = i
        end
        committed = committed + 1
      else
        assert(ended[i] == (plan[i] == "raise" and "error" or "timeout"), what)
        assert(#mine == 0 and jobs[i] == nil, what .. (": left %d rows, %s jobs"):format(#mine, tostring(jobs[i])))
      end
    end
    assert.equal(committed, q:stats().total)
    local p = q:stats().pool
    assert.same({ 0, 0 }, { p.busy, p.waiting })
  end)

  it("takes the connection before its first wait: a BEGIN under way is not joined by another task", function()
    -- Every task begins a transaction at once: on PostgreSQL each BEGIN is
    -- a round trip, during which the others run.
    local status, err = tide.run(function()
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = tide.spawn(function()
          return q:transaction(function(tx)
            tx:exec("INSERT INTO effects (task, step, txid) VALUES (?, 1, " .. TXID .. ")", i)
            local rows = tx:query("SELECT task FROM effects WHERE txid = " .. TXID)
            assert.equal(1, #rows)                -- nobody else's row in my transaction
            error("roll back " .. i)
          end)
        end)
      end
      for i = 1, 20 do assert.equal("error", (tasks[i]:await())) end
    end)
    assert(status == "ok", tostring(err))
    assert.same({}, q:transaction(function(tx) return tx:query("SELECT * FROM effects") end))
  end)

  it("refuses a tx handle once its transaction has ended, and in a task that does not own it", function()
    local saved, inner_saved
    q:transaction(function(tx)
      saved = tx
      q:transaction(function(inner) inner_saved = inner end)
      assert.equal(0, tx:exec("DELETE FROM effects"))   -- the outer one still works
    end)
    spec_helper.error_cases("spec/transaction_spec.lua", {
      { function() saved:enqueue{ target = "t", method = "m" } end, "tx:enqueue: this transaction has ended" },
      { function() saved:exec("DELETE FROM effects") end, "tx:exec: this transaction has ended" },
      { function() inner_saved:query("SELECT 1") end, "tx:query: this transaction has ended" },
      { function() saved:enqueue_many{} end, "tx:enqueue_many: this transaction has ended" },
    })
    local err
    local status = tide.run(function()
      local handed = {}
      local owner = tide.spawn(function()
        q:transaction(function(tx)
          handed.tx = tx
          tide.sleep(40)
          tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
        end)
      end)
      local thief = tide.spawn(function()
        while not handed.tx do tide.sleep(1) end
        local ok, e = pcall(handed.tx.exec, handed.tx, "INSERT INTO effects (task, step) VALUES (2, 2)")
        err = not ok and e
      end)
      thief:await()
      owner:await()
    end)
    assert.equal("ok", status)
    assert.matches("tx:exec: this transaction belongs to tide%.Task %d+ %(running%), not to the caller$", tostring(err))
    assert.equal(0, q:stats().total)
    local rows = q:transaction(function(tx) return tx:query("SELECT task FROM effects") end)
    assert.same({ { task = 1 } }, rows)
    assert.equal(0, #q:list{})
  end)

  it("makes a waiter give up with 'pool exhausted' after pool_timeout, and counts the pool in q:stats()", function()
    q:close()
    q = tide.queue.open(url, { pool = pg and 2 or nil, pool_timeout = 100 })
    local size = pg and 2 or 1
    local err, mid
    local status = tide.run(function()
      local holders = {}
      for i = 1, size do
        holders[i] = tide.spawn(function()
          q:transaction(function()
            tide.sleep(50)
            if i == 1 then mid = q:stats().pool end   -- (inside its transaction: on its own session)
            tide.sleep(250)
          end)
        end)
      end
      tide.sleep(20)
      local t0 = tide.now()
      local ok, e = pcall(q.enqueue, q, { target = "t", method = "m" })
      err = not ok and e
      assert.is_true(tide.now() - t0 >= 90)
      for _, t in ipairs(holders) do t:await() end
    end)
    assert.equal("ok", status)
    assert.equal(("q:enqueue: %s: pool exhausted: %d connection%s busy for 100 ms")
      :format(url, size, size == 1 and "" or "s"), err)
    assert.same({ size = size, open = size, busy = size, waiting = 1 }, mid)
    assert.same({ size = size, open = size, busy = 0, waiting = 0 }, q:stats().pool)
  end)

  it("binds strings with NUL bytes whole: exact where the column takes bytes, refused (never cut) where it takes text", function()
    local blob = pg and "bytea" or "BLOB"
    q:transaction(function(tx)
      tx:exec("DROP TABLE IF EXISTS bins")
      tx:exec("CREATE TABLE bins (b " .. blob .. ", t TEXT)")
      tx:exec("INSERT INTO bins (b) VALUES (?)", "ab\0cd\255")
    end)
    local got = q:transaction(function(tx) return tx:query("SELECT b FROM bins")[1].b end)
    assert.equal("ab\0cd\255", got)
    local ok, err = pcall(q.transaction, q, function(tx) tx:exec("INSERT INTO bins (t) VALUES (?)", "ab\0cd") end)
    if pg then
      assert.is_false(ok)
      assert.matches("invalid byte sequence for encoding \"UTF8\": 0x00 %(SQLSTATE 22021%)", err)
    else
      assert.is_true(ok, err)
      local t = q:transaction(function(tx) return tx:query("SELECT t FROM bins WHERE t IS NOT NULL")[1].t end)
      assert.equal("ab\0cd", t)
    end
  end)

  -- A failed statement aborts its transaction, on both stores as on
  -- PostgreSQL: the server had rolled such a transaction back at COMMIT
  -- while q:transaction reported it committed (its jobs silently gone),
  -- and SQLite went on and committed the rest.
  local function rows_and_jobs()
    local n = q:transaction(function(tx) return #tx:query("SELECT * FROM effects") end)
    return n, #q:list()
  end
  local ABORTED = "current transaction is aborted, commands ignored until end of transaction block"

  it("aborts on a failed statement: later ones refused, and a function that returns is told the commit failed", function()
    local later_ok, later_err, query_ok, query_err
    local ok, err = pcall(q.transaction, q, function(tx)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
      tx:enqueue{ target = "t", method = "m" }
      assert.is_false((pcall(tx.exec, tx, "INSERT INTO no_such_table VALUES (1)")))
      later_ok, later_err = pcall(tx.exec, tx, "INSERT INTO effects (task, step) VALUES (1, 2)")
      query_ok, query_err = pcall(tx.query, tx, "SELECT 1 AS one")
      return "done"
    end)
    assert.is_false(later_ok)
    assert.matches("^[^:]*:%d+: tx:exec: ", later_err)       -- names the function called (at the caller's line),
    assert.matches(ABORTED, later_err, 1, true)
    assert.matches("no_such_table", later_err, 1, true)      -- and the statement that failed first
    assert.is_false(query_ok)
    assert.matches("^[^:]*:%d+: tx:query: ", query_err)
    assert.matches(ABORTED, query_err, 1, true)
    assert.is_false(ok)
    assert.matches("q:transaction: commit failed: .*rolled back, not committed.*no_such_table", err)
    assert.same({ 0, 0 }, { rows_and_jobs() })
    -- the session serves the next transaction as if nothing happened
    q:transaction(function(tx) tx:exec("INSERT INTO effects (task, step) VALUES (2, 1)") end)
    assert.same({ 1, 0 }, { rows_and_jobs() })
  end)

  it("names the function that met the aborted transaction: q:enqueue, q:job and a nested q:transaction too", function()
    local errs = {}
    pcall(q.transaction, q, function(tx)
      pcall(tx.exec, tx, "INSERT INTO no_such_table VALUES (1)")
      errs[1] = select(2, pcall(q.enqueue, q, { target = "t", method = "m" }))
      errs[2] = select(2, pcall(q.job, q, 1))
      errs[3] = select(2, pcall(q.transaction, q, function() end))
      errs[4] = select(2, pcall(tx.enqueue, tx, { target = "t", method = "m" }))
    end)
    for i, fname in ipairs{ "q:enqueue", "q:job", "q:transaction", "tx:enqueue" } do
      local err = tostring(errs[i])
      assert.truthy(err:find(fname .. ": " .. url .. ": " .. ABORTED, 1, true) and err:find("no_such_table", 1, true), err)
    end
  end)

  it("refuses a statement of only blanks, comments and semicolons, which the stores took differently", function()
    local errs = {}
    q:transaction(function(tx)
      for _, sql in ipairs{ "", "  ", "-- c", "/* c */ ;", ";" } do
        errs[#errs + 1] = select(2, pcall(tx.exec, tx, sql))
      end
      errs[#errs + 1] = select(2, pcall(tx.query, tx, "-- c\n"))
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")     -- the transaction goes on
    end)
    for i, err in ipairs(errs) do
      assert.matches("^tx:%a+: bad argument #1 %(an SQL statement expected, got only blanks and comments%)",
                     tostring(err), nil, false, "statement " .. i)
    end
    assert.same({ 1, 0 }, { rows_and_jobs() })
  end)

  it("goes on after a failed statement inside a nested q:transaction (a savepoint), which alone is rolled back", function()
    local inner_ok, inner_err, quiet_ok, quiet_err
    q:transaction(function(tx)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
      -- the nested function raises: rolled back to its savepoint
      inner_ok, inner_err = pcall(q.transaction, q, function(tx2)
        tx2:exec("INSERT INTO effects (task, step) VALUES (1, 2)")
        tx2:exec("INSERT INTO no_such_table VALUES (1)")
      end)
      -- the nested function swallows its statement's error and returns:
      -- it cannot commit, so it raises, rolled back to its savepoint
      quiet_ok, quiet_err = pcall(q.transaction, q, function(tx2)
        tx2:exec("INSERT INTO effects (task, step) VALUES (1, 3)")
        pcall(tx2.exec, tx2, "INSERT INTO no_such_table VALUES (2)")
        return "swallowed"
      end)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 4)")
      tx:enqueue{ target = "t", method = "m" }
    end)
    assert.is_false(inner_ok)
    assert.matches("no_such_table", inner_err, 1, true)
    assert.is_false(quiet_ok)
    assert.matches("q:transaction: commit failed: .*rolled back, not committed.*no_such_table", quiet_err)
    local steps = q:transaction(function(tx) return tx:query("SELECT step FROM effects ORDER BY step") end)
    assert.same({ { step = 1 }, { step = 4 } }, steps)
    assert.equal(1, #q:list())
  end)

  it("refuses transaction control in tx:exec and tx:query: the transaction is q:transaction's to end", function()
    local refused = {}
    q:transaction(function(tx)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
      for _, sql in ipairs{ "COMMIT", "  rollback", "-- c\nEND", "/* c */ begin", "START TRANSACTION",
                            "SAVEPOINT x", "RELEASE SAVEPOINT x", "ROLLBACK TO SAVEPOINT x", "abort",
                            "commit;" } do
        local ok, err = pcall(tx.exec, tx, sql)
        refused[#refused + 1] = not ok and err:match("^tx:exec: bad argument #1 %(a statement other than "
          .. "BEGIN, COMMIT, ROLLBACK, SAVEPOINT or RELEASE expected") and true or (ok and "ran" or err)
      end
      local ok, err = pcall(tx.query, tx, "COMMIT")
      refused[#refused + 1] = not ok and err:match("^tx:query: bad argument #1") and true or (ok and "ran" or err)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 2)")
    end)
    for i, r in ipairs(refused) do assert.equal(true, r, "statement " .. i) end
    assert.same({ 2, 0 }, { rows_and_jobs() })
    -- names that only begin like a keyword still run
    q:transaction(function(tx)
      tx:exec("CREATE TABLE IF NOT EXISTS committed_things (x INTEGER)")
      tx:exec("DROP TABLE committed_things")
    end)
  end)

  -- What the first-word check missed, each of which ended the transaction
  -- under q:transaction's feet: an empty statement first (";COMMIT", both
  -- stores skip it and commit), a nested comment (PostgreSQL nests them,
  -- SQLite does not), a line comment ended by a CR (PostgreSQL), PREPARE TRANSACTION (PostgreSQL with
  -- max_prepared_transactions: the rows held in limbo, the statements after
  -- it committed one by one, q:transaction's commit reported).  And a name
  -- that only begins like a keyword was taken for it ("end1": END).
  it("refuses transaction control behind a leading ';', nested comments, and PREPARE TRANSACTION", function()
    local refused = {}
    q:transaction(function(tx)
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
      for _, sql in ipairs{ ";COMMIT", " ; ;\n commit", "/* a */;/* b */ END", "/* /* */ */ COMMIT",
                            "/* /* */ COMMIT", "PREPARE TRANSACTION 'x'", "prepare\n transaction 'x'",
                            "PREPARE /* c */ TRANSACTION 'x'", "-- c\rCOMMIT" } do
        local ok, err = pcall(tx.exec, tx, sql)
        refused[#refused + 1] = not ok and err:match("^tx:exec: bad argument #1 %(a statement other than "
          .. "BEGIN, COMMIT, ROLLBACK, SAVEPOINT or RELEASE expected") and true or (ok and "ran" or err)
      end
      tx:exec("INSERT INTO effects (task, step) VALUES (1, 2)")
    end)
    for i, r in ipairs(refused) do assert.equal(true, r, "statement " .. i) end
    assert.same({ 2, 0 }, { rows_and_jobs() })
    -- the store's own error for a name that is no keyword (in a savepoint: it aborts)
    local err
    q:transaction(function()
      err = select(2, pcall(q.transaction, q, function(tx2) tx2:exec("end1") end))
    end)
    assert.not_matches("bad argument", err, 1, true)
    assert.matches("syntax error", err, 1, true)
  end)

  if not pg then
    -- Some failures make SQLite roll the whole transaction back, not the
    -- statement alone (an OR ROLLBACK conflict, RAISE(ROLLBACK) in a
    -- trigger, a full disk): inside a nested q:transaction its ROLLBACK TO
    -- found no savepoint ("no such savepoint: tide_2"), cleared the abort,
    -- and the statements after it ran outside any transaction, each
    -- committed at once, while q:transaction reported "commit failed".
    it("refuses every statement after SQLite rolled the whole transaction back inside a nested q:transaction", function()
      local inner_ok, inner_err, later_ok, later_err
      local ok, err = pcall(q.transaction, q, function(tx)
        tx:exec("CREATE TABLE uniq (x INTEGER UNIQUE)")
        tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
        inner_ok, inner_err = pcall(q.transaction, q, function(tx2)
          tx2:exec("INSERT INTO uniq VALUES (1)")
          tx2:exec("INSERT OR ROLLBACK INTO uniq VALUES (1)")
        end)
        later_ok, later_err = pcall(tx.exec, tx, "INSERT INTO effects (task, step) VALUES (1, 2)")
        return "done"
      end)
      assert.is_false(inner_ok)
      assert.matches("UNIQUE constraint failed", inner_err, 1, true)
      assert.is_false(later_ok)
      assert.matches(ABORTED, later_err, 1, true)
      assert.matches("UNIQUE constraint failed", later_err, 1, true)
      assert.is_false(ok)
      assert.same({ 0, 0 }, { rows_and_jobs() })
      -- and the session serves the next transaction
      q:transaction(function(tx) tx:exec("INSERT INTO effects (task, step) VALUES (2, 1)") end)
      assert.same({ 1, 0 }, { rows_and_jobs() })
    end)
  end

  if pg then
    -- BEGIN is sent with a transaction's first statement, in one pipeline
    -- (tide.jobs.store.pg_conn): the statement must still run inside the
    -- transaction, an error in it must roll everything back, and the
    -- connection must serve the next transaction as if nothing happened.
    it("sends BEGIN with the first statement: an error there rolls all back, and the connection serves on", function()
      local one = tide.queue.open(url .. "?pool=1")
      local pids, errs = {}, {}
      local status, err = tide.run(function()
        pids[1] = one:transaction(function(tx) return tx:query("SELECT pg_backend_pid() AS pid")[1].pid end)
        -- 1. the first statement fails: nothing stays, the error is the statement's
        errs[1] = select(2, pcall(one.transaction, one, function(tx)
          tx:exec("INSERT INTO no_such_table (x) VALUES (1)")
        end))
        -- 2. the first statement runs inside the transaction: a failure caught
        -- after it leaves the transaction aborted (were it outside, in
        -- autocommit, the next statement would run and its row would stay)
        errs[2] = select(2, pcall(one.transaction, one, function(tx)
          tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
          errs[3] = select(2, pcall(tx.exec, tx, "INSERT INTO no_such_table (x) VALUES (1)"))
          tx:exec("INSERT INTO effects (task, step) VALUES (1, 2)")
        end))
        -- 3. the first statement fails and the error is caught in the
        -- transaction: the transaction had begun (aborted from there on)
        errs[4] = select(2, pcall(one.transaction, one, function(tx)
          pcall(tx.exec, tx, "SELECT 1 / 0")
          tx:exec("INSERT INTO effects (task, step) VALUES (2, 1)")
        end))
        -- 4. a transaction that runs no statement, and one that only reads
        one:transaction(function() end)
        assert.equal(2, one:transaction(function(tx) return tx:query("SELECT 2 AS n")[1].n end))
        -- 5. the same connection serves on, outside transactions and inside
        one:enqueue{ target = "t", method = "m" }
        one:transaction(function(tx) tx:exec("INSERT INTO effects (task, step) VALUES (3, 1)") end)
        pids[2] = one:transaction(function(tx) return tx:query("SELECT pg_backend_pid() AS pid")[1].pid end)
      end)
      one:close()
      assert(status == "ok", tostring(err))
      assert.matches('relation "no_such_table" does not exist %(SQLSTATE 42P01%)', tostring(errs[1]))
      assert.matches("SQLSTATE 42P01", tostring(errs[3]))
      assert.matches("current transaction is aborted.*SQLSTATE 25P02", tostring(errs[2]))
      assert.matches("current transaction is aborted.*SQLSTATE 25P02", tostring(errs[4]))
      assert.equal(pids[1], pids[2])            -- never reconnected: each failure left it clean
      local rows = q:transaction(function(tx) return tx:query("SELECT task, step FROM effects ORDER BY task") end)
      assert.same({ { task = 3, step = 1 } }, rows)
      assert.equal(1, q:stats().available)
    end)

    it("discards a connection broken mid-transaction: the transaction fails, no statement runs outside it", function()
      local admin = require("tide.jobs.store.postgres").connect(url)
      local errs = {}
      local status = tide.run(function()
        local ok, err = pcall(q.transaction, q, function(tx)
          tx:exec("INSERT INTO effects (task, step) VALUES (1, 1)")
          local pid = tx:query("SELECT pg_backend_pid() AS pid")[1].pid
          admin:query("SELECT pg_terminate_backend($1)", pid)
          tide.sleep(50)
          errs[1] = select(2, pcall(tx.exec, tx, "INSERT INTO effects (task, step) VALUES (1, 2)"))
          errs[2] = select(2, pcall(tx.exec, tx, "INSERT INTO effects (task, step) VALUES (1, 3)"))
        end)
        errs[3] = ok or err
        q:transaction(function(tx) tx:exec("INSERT INTO effects (task, step) VALUES (2, 1)") end)
      end)
      admin:close()
      assert.equal("ok", status)
      assert.matches("connection lost", errs[1])
      assert.equal(url .. ": connection lost during a transaction (the server rolled it back)", errs[2])
      assert.matches("commit failed", tostring(errs[3]))
      local rows = q:transaction(function(tx) return tx:query("SELECT task, step FROM effects") end)
      assert.same({ { task = 2, step = 1 } }, rows)
    end)

    -- The first statement of a transaction connects when the pool's
    -- connection was closed while idle.  A connect that failed failed the
    -- statement without aborting the transaction (the connection was gone,
    -- and with it the mark): the next statement connected, began the
    -- transaction without the first, and q:transaction committed it.
    it("aborts a transaction whose first statement failed to connect: the next ones refused, no commit", function()
      local admin = require("tide.jobs.store.postgres").connect(url)
      admin:query("DROP DATABASE IF EXISTS tide_first_connect")
      admin:query("CREATE DATABASE tide_first_connect")
      local one = tide.queue.open((url:gsub("/[^/?]*$", "/tide_first_connect")), { pool = 1 })
      local first, second, ok, err, rows
      local status, serr = tide.run(function()
        one:transaction(function(tx) tx:exec("CREATE TABLE kept (x INTEGER)") end)
        local pid = one:transaction(function(tx) return tx:query("SELECT pg_backend_pid() AS pid")[1].pid end)
        admin:query("ALTER DATABASE tide_first_connect WITH ALLOW_CONNECTIONS false")
        admin:query("SELECT pg_terminate_backend($1)", pid)
        tide.sleep(50)
        ok, err = pcall(one.transaction, one, function(tx)
          first = select(2, pcall(tx.exec, tx, "INSERT INTO kept VALUES (1)"))
          admin:query("ALTER DATABASE tide_first_connect WITH ALLOW_CONNECTIONS true")
          second = select(2, pcall(tx.exec, tx, "INSERT INTO kept VALUES (2)"))
          return "done"
        end)
        rows = one:transaction(function(tx) return tx:query("SELECT x FROM kept") end)
      end)
      one:close()
      admin:query("ALTER DATABASE tide_first_connect WITH ALLOW_CONNECTIONS true")
      admin:query("DROP DATABASE tide_first_connect WITH (FORCE)")
      admin:close()
      assert(status == "ok", tostring(serr))
      assert.matches("not currently accepting connections", tostring(first), 1, true)
      assert.matches("current transaction is aborted.*not currently accepting connections", tostring(second))
      assert.is_false(ok)
      assert.matches("q:transaction: commit failed: .*rolled back, not committed", tostring(err))
      assert.same({}, rows)
    end)
  end
end)
end

-- A worker's store of its own adopts the connection its queue's opening
-- used (tide.jobs.store.postgres): it leaves one pool for the other whole.
describe("a store's pool giving a free connection to another", function()
  local pool = require "tide.jobs.store.pool"
  local function new(size)
    local n = 0
    return pool.new{ name = "spec", size = size, timeout = 100,
                     open = function() n = n + 1; return { n = n } end, close = function() end }
  end

  it("moves it whole: out of one's free list and count, into the other's; never a held one", function()
    local a, b = new(3), new(1)
    local c1, c2, c3 = a:acquire("spec"), a:acquire("spec"), a:acquire("spec")
    a:release(c1); a:release(c2); a:release(c3)
    assert.is_true(a:remove_free(c1))            -- not the last of the free list
    assert.is_false(a:remove_free(c1))           -- gone already
    assert.same({ size = 3, open = 2, busy = 0, waiting = 0 }, a:stats())
    b:adopt(c1)
    assert.same({ size = 1, open = 1, busy = 0, waiting = 0 }, b:stats())
    assert.has_error(function() b:adopt(c2) end, "pool:adopt: spec: no room for one more connection (1 open of 1)")
    local got = {}
    for _ = 1, 3 do got[#got + 1] = a:acquire("spec") end   -- c2, c3 and a new one: never c1
    for _, c in ipairs(got) do assert.are_not.equal(c1, c) end
    assert.equal(c1, b:acquire("spec"))
    assert.is_false(a:remove_free(got[1]))        -- held
    a:close(); b:close()
  end)
end)
