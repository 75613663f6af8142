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
