-- spec/pg_conn_spec.lua — a PostgreSQL connection's watch on the loop: armed from one statement to the next.
--
-- Between two statements a connection's watch stays armed (no epoll_ctl per
-- statement), unreferenced: these specs attack what that could break — a
-- loop kept alive by idle connections, a server that closes an idle
-- connection whose watch nobody waits on, tasks whose statements interleave
-- on many connections, a statement cut off by its task's timeout.
local H = require "spec.helper"
local tide = require "tide"
local pg = require "tide.jobs.store.postgres"
local pg_conn = require "tide.jobs.store.pg_conn"

local URL = os.getenv("TIDE_PG_URL")
if not URL then
  pending("tide.jobs.store.pg_conn needs a PostgreSQL server (TIDE_PG_URL, as spec/run.sh sets)")
  return
end

local function backend_pid(q)
  return q:transaction(function(tx) return tx:query("SELECT pg_backend_pid() AS pid")[1].pid end)
end

--- Ends backend `pid` and waits until its process is gone, and with it
--- its end of the socket (it leaves pg_stat_activity before that; the
--- server runs on this machine: spec/pg.sh).
local function terminate(pid)
  local admin = pg.connect(URL)
  admin:query("SELECT pg_terminate_backend($1)", pid)
  admin:close()
  for _ = 1, 500 do
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return end
    f:close()
    os.execute("sleep 0.01")
  end
  error("backend " .. pid .. " still there 5 s after pg_terminate_backend")
end

describe("tide.jobs.store.pg_conn", function()
  after_each(H.assert_idle)

  it("lets the loop end while idle connections keep their watches armed", function()
    local q
    local n = H.run(function()
      q = tide.queue.open(URL, { pool = 3 })
      local tasks = {}
      for i = 1, 3 do
        tasks[i] = tide.spawn(function() return q:transaction(function(tx) return tx:query("SELECT 1 AS one")[1].one end) end)
      end
      local sum = 0
      for i = 1, 3 do local _, v = tasks[i]:await(); sum = sum + v end
      return sum
    end)
    assert.equal(3, n)                        -- (H.run returned: no idle watch kept the loop running)
    q:close()
  end)

  it("notices an idle connection the server closed while its watch was armed, and connects again", function()
    local q = tide.queue.open(URL, { pool = 1 })
    H.run(function()
      local before = backend_pid(q)           -- the watch is armed now, nobody waits on it
      terminate(before)
      tide.sleep(20)                          -- the loop polls: the closed socket is reported to nobody
      local after = backend_pid(q)            -- a new session, not "connection lost"
      assert.is_not.equal(before, after)
      terminate(after)                        -- and once more, without the loop polling in between
      assert.is_not.equal(after, backend_pid(q))
    end)
    q:close()
  end)

  it("gives each of many interleaved tasks its own statements' results", function()
    local seed = os.time()
    math.randomseed(seed)
    local q = tide.queue.open(URL, { pool = 7 })
    local wrong = H.run(function()
      local tasks, bad = {}, 0
      for i = 1, 60 do
        tasks[i] = tide.spawn(function()
          for k = 1, 5 do
            local v = q:transaction(function(tx)
              local a = tx:query("SELECT $1::int AS v", i * 100 + k)[1].v
              if math.random() < 0.5 then tide.sleep(math.random(0, 3)) end
              return a + tx:query("SELECT $1::int AS v, pg_sleep($2)", 0, math.random(0, 2) / 1000)[1].v
            end)
            if v ~= i * 100 + k then bad = bad + 1 end
          end
        end)
      end
      for i = 1, 60 do
        local st, err = tasks[i]:await()
        assert(st == "ok", tostring(err) .. " (seed " .. seed .. ")")
      end
      return bad
    end)
    assert.equal(0, wrong, "seed " .. seed)
    q:close()
  end)

  it("refuses a statement from code a C call runs inside a task before sending it; the transaction goes on", function()
    -- An unwrapped finalizer (debug.setmetatable: tide wraps only newproxy's
    -- and ffi.gc's, and refuses store calls in those first thing) and a
    -- gsub callback run a statement in the task's transaction.  Neither can
    -- wait for its result: sent anyway, the result was left on the
    -- connection, and the transaction's next statement failed on it.
    local q = tide.queue.open(URL, { pool = 1 })
    local errs = {}
    local function try(tx, v)
      local ok, err = pcall(tx.exec, tx, "INSERT INTO pgc_fin VALUES ($1)", v)
      errs[#errs + 1] = ok and "sent" or err
    end
    local sum = H.run(function()
      return q:transaction(function(tx)
        tx:exec("CREATE TEMP TABLE pgc_fin (v int) ON COMMIT DROP")
        tx:exec("INSERT INTO pgc_fin VALUES (1)")
        debug.setmetatable(newproxy(false), { __gc = function() try(tx, 20) end })
        collectgarbage()
        collectgarbage()
        local _ = ("x"):gsub("x", function() try(tx, 300) end)
        tx:exec("INSERT INTO pgc_fin VALUES (4)")
        return tx:query("SELECT sum(v)::int AS s FROM pgc_fin")[1].s
      end)
    end)
    assert.equal(5, sum)
    assert.equal(2, #errs)
    for _, err in ipairs(errs) do
      -- (refused by tx:exec itself, naming it: tide.jobs.transaction, not_in_c_call)
      assert.equal("tx:exec: cannot wait inside a C call (a __gc finalizer, a debug hook, "
        .. "a function a C function calls)", err)
    end
    q:close()
  end)

  it("leaves a connection usable after a statement cut off by its task's timeout", function()
    local q = tide.queue.open(URL, { pool = 1 })
    H.run(function()
      local t = tide.spawn{ timeout = 30, run = function()
        q:transaction(function(tx) tx:query("SELECT pg_sleep(2)") end)
      end }
      local st = t:await()
      assert.equal("timeout", st)
      for i = 1, 3 do
        assert.equal(i, q:transaction(function(tx) return tx:query("SELECT $1::int AS v", i)[1].v end))
      end
    end)
    q:close()
  end)

  -- Broken before: a connect's timeout was a timer of the loop, so under
  -- tide.testing's virtual clock it ran out as soon as a test advanced 10
  -- virtual seconds, however little real time the connect had taken
  -- (schedules_spec's PostgreSQL test failed so now and then: "connection
  -- timed out after 10000 ms").  It counts real time now.
  it("connects under the virtual clock however far a test advances it meanwhile", function()
    local q = tide.queue.open(URL, { pool = 1 })
    local clock = tide.testing.clock()
    local ok, err = pcall(H.run, function()
      terminate(backend_pid(q))               -- the next statement connects again
      local t = tide.spawn(function() return backend_pid(q) end)
      clock:advance(60000)                    -- while the connect waits for the server
      local st, pid = t:await()
      assert.equal("ok", st, tostring(pid))
    end)
    clock:stop()
    q:close()
    assert(ok, err)
  end)

  it("gives up a connect the server never answers after CONNECT_TIMEOUT ms", function()
    -- A socket that listens and never accepts: the kernel completes the
    -- handshake, and the startup packet waits for an answer that never comes.
    local port = 24000 + math.random(0, 999)
    local listener = io.popen(("python3 -c \"import socket, time; s = socket.socket(); "
      .. "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', %d)); s.listen(8); "
      .. "print('up', flush=True); time.sleep(20)\" & echo $!"):format(port))
    local pid = listener:read("*l")
    assert.equal("up", listener:read("*l"))
    local saved = pg_conn.CONNECT_TIMEOUT
    pg_conn.CONNECT_TIMEOUT = 300
    local ok, err = pcall(H.run, function()
      local c = pg_conn.new(("postgres://tide@127.0.0.1:%d/postgres"):format(port), "silent")
      local t0 = tide.now()
      local qok, qerr = pcall(c.query, c, "SELECT 1")
      local took = tide.now() - t0
      c:close()
      assert.is_false(qok)
      assert.equal("silent: connection timed out after 300 ms", tostring(qerr))
      assert.is_true(took >= 290 and took < 3000, ("gave up after %d ms"):format(took))
    end)
    pg_conn.CONNECT_TIMEOUT = saved
    os.execute("kill " .. pid .. " 2>/dev/null")
    listener:close()
    assert(ok, err)
  end)

  -- The server answers an aborted transaction's COMMIT with ROLLBACK and
  -- no error.  The failed statement's error already refuses the COMMIT;
  -- this takes that away to attack the check of the COMMIT's own reply.
  it("never takes the reply ROLLBACK to a COMMIT for a commit, whatever aborted the transaction", function()
    local c = pg_conn.new(URL, "conn")
    local err
    H.run(function()
      c:query("CREATE TEMP TABLE kept (x integer)")
      c:begin()
      c:query("INSERT INTO kept VALUES (1)")
      assert.is_false((pcall(c.query, c, "SELECT 1 / 0")))
      assert.matches("division by zero", c:failed(), 1, true)
      c:recovered()                           -- (as if nothing here had seen it fail)
      local ok
      ok, err = pcall(c.finish, c, "COMMIT")
      assert.is_false(ok)
      c:finish("ROLLBACK")
      assert.equal(0, #c:query("SELECT * FROM kept").rows)
      c:begin()                               -- and a transaction that commits still does
      c:query("INSERT INTO kept VALUES (2)")
      c:finish("COMMIT")
      assert.same({ { x = 2 } }, c:query("SELECT * FROM kept").rows)
    end)
    c:close()
    assert.equal("conn: rolled back, not committed: a statement in the transaction failed (the server rolled "
      .. "it back at COMMIT); to go on after a statement that may fail, run it in a nested q:transaction "
      .. "(a savepoint)", err)
  end)

  -- The store's own transactions (postgres.lua's in_tx, record) end with
  -- pcall(c.finish, c, "ROLLBACK") and c.tx = false, whether or not that
  -- ROLLBACK got through.  A connection lost between the failed statement
  -- and its ROLLBACK kept the abort past the transaction: every later
  -- statement on that pooled (or worker's) connection raised "current
  -- transaction is aborted", for ever, instead of connecting again.
  -- A transaction on a new connection whose statement `sql` runs (ok: it
  -- succeeds), then the backend is ended and the ROLLBACK tried (then,
  -- when `untx`, c.tx cleared as in_tx and record do); the next statement
  -- must connect again and run.  Returns the connection, closed.
  local function rollback_lost(sql, ok, untx)
    local c = pg_conn.new(URL, "conn")
    local rolled, later_ok, later
    H.run(function()
      local pid = c:query("SELECT pg_backend_pid() AS pid").rows[1].pid
      c:begin()
      assert.equal(ok, (pcall(c.query, c, sql)))
      terminate(pid)
      rolled = pcall(c.finish, c, "ROLLBACK")
      if untx then c.tx = false end
      later_ok, later = pcall(c.query, c, "SELECT 2 AS two")
    end)
    c:close()
    assert.is_false(rolled)
    assert(later_ok, later)
    assert.equal(2, later.rows[1].two)
    return c
  end

  it("forgets a failed statement's abort once its transaction is over, even when the ROLLBACK was lost", function()
    assert.is_false(rollback_lost("SELECT 1 / 0", false, true):failed())
  end)

  -- A caller that ends its own transaction with pcall(session.rollback,
  -- session) and gives the connection back as it is (queue_flows.sweep,
  -- through worker_call: never "broken") left it inside a transaction when
  -- that ROLLBACK met a connection lost: every later statement on it raised
  -- "connection lost during a transaction", for ever, instead of
  -- connecting again.  The server rolls back a closed session's
  -- transaction: the ROLLBACK happened all the same.
  it("ends the transaction when its ROLLBACK finds the connection lost: the next statement connects again", function()
    rollback_lost("SELECT 1", true, false)
  end)
end)
