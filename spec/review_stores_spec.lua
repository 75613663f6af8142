-- spec/review_stores_spec.lua — review of the stores' speed work (h16, h19, h21c):
-- prepared statements on PostgreSQL when the session changes under them,
-- and whatever else the review found.  Each test names what a user does.
local tide = require "tide"

for _, store in ipairs(spec_helper.stores()) do
describe("review: tide.queue on " .. store.name, function()
  local path, q, url

  before_each(function()
    path = os.tmpname()
    url = store.fresh(path)
  end)

  after_each(function()
    if q then q:close(); q = nil end
    store.reset(path)
    spec_helper.assert_idle()
  end)

  local function sql(stmt, ...)
    local args = { ... }
    return q:transaction(function(tx) return tx:query(stmt, unpack(args)) end)
  end

  if store.name == "postgres" then
    describe("prepared statements when the session changes under them", function()
      before_each(function()
        q = tide.queue.open(url, { pool = 1 })          -- (one connection: sql() runs on tide's session)
        q:enqueue{ target = "t", method = "m" }         -- tide_insert prepared
      end)

      it("enqueues again after DEALLOCATE ALL ran on its connection", function()
        sql("DEALLOCATE ALL")
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m" })
        assert.is_true(ok, id)
        assert.equal("available", q:job(id).status)
      end)

      it("enqueues again after a column of the result changed type (cached plan must not change result type)", function()
        sql("ALTER TABLE tide_jobs ALTER COLUMN id TYPE numeric")
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m" })
        assert.is_true(ok, id)
        assert.equal(2, q:stats().total)
      end)

      it("prepares again when its statement's name was taken on the session (as a transaction pooler gives)", function()
        sql("PREPARE tide_by_key(text) AS SELECT 0::bigint AS id")
        q:enqueue{ target = "t", method = "m", idempotency_key = "k" }
        local ok, id = pcall(q.enqueue, q, { target = "t", method = "m", idempotency_key = "k" })
        assert.is_true(ok, id)
        assert.equal(2, id)
      end)

      it("fails the transaction in which its statements were deallocated, and works in the next one", function()
        local ok, err = pcall(q.transaction, q, function(tx)
          tx:exec("DEALLOCATE ALL")
          tx:enqueue{ target = "t", method = "m" }
        end)
        assert.is_false(ok)
        assert.matches("tide_insert", tostring(err))
        local id = q:transaction(function(tx) return tx:enqueue{ target = "t", method = "m" } end)
        assert.equal("available", q:job(id).status)
        assert.equal(2, q:stats().total)
      end)
    end)
  end
end)
end
