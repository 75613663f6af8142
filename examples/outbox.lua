-- examples/outbox.lua — the transactional outbox: an order and the job that fulfils it
-- are written in one transaction, so a rolled-back order never ships and a committed
-- one always does, even if the worker fails on the way.
--
--   tide run examples/outbox.lua
local tide = require "tide"

local path = os.tmpname()                       -- SQLite, the embedded default store
local q = tide.queue.open("sqlite:" .. path)

q:transaction(function(tx)
  tx:exec("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total REAL NOT NULL)")
  tx:exec("CREATE TABLE shipments (order_id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL)")
end)

--- Places an order and enqueues its fulfilment, all or nothing.
local function place_order(id, customer, total, card_ok)
  return pcall(q.transaction, q, function(tx)
    tx:exec("INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)", id, customer, total)
    local job = tx:enqueue{ target = "orders", method = "fulfill", args = { order = id },
                            idempotency_key = "fulfil-order-" .. id, max_attempts = 5 }
    if not card_ok then error("card declined", 0) end
    return job
  end)
end

-- The fulfilment: the warehouse is busy the first time.  The shipment row is
-- keyed by order, so even a second run of the job (after a crash between the
-- effect and its completion being recorded) ships once.
local orders = {
  fulfill = function(args, job)
    if job.attempt == 1 then error("warehouse busy, try again", 0) end
    q:transaction(function(tx)
      tx:exec("INSERT INTO shipments (order_id, job_id) VALUES (?, ?) ON CONFLICT DO NOTHING", args.order, job.id)
    end)
    print(("  shipped order %d (job %d, attempt %d)"):format(args.order, job.id, job.attempt))
  end,
}

local ok, job = place_order(1, "ada", 120.00, true)
assert(ok, job)
print(("order 1 placed; fulfilment job %d enqueued in the same transaction"):format(job))
local ok2, err = place_order(2, "bob", 80.00, false)
assert(not ok2)
print(("order 2 rolled back (%s): no order row, no job"):format(err))

local w = tide.worker{ queue = q, concurrency = 4, targets = { orders = orders },
                       retry = { backoff = "fixed", base = 20 } }
local st = w:drain{ stop = true, within = 1000 }
print(("worker done: %d completed, %d retried, %d discarded"):format(st.completed, st.retried, st.discarded))

-- Check the promise: exactly one fulfilment, for the order that committed.
local shipments, order_rows
q:transaction(function(tx)
  shipments = tx:query("SELECT order_id, job_id FROM shipments")
  order_rows = tx:query("SELECT id FROM orders ORDER BY id")
end)
local jobs = q:list{}
q:close()
for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(path .. suffix) end

assert(#order_rows == 1 and order_rows[1].id == 1, "exactly order 1 exists")
assert(#jobs == 1 and jobs[1].status == "completed", "exactly one job, completed")
assert(#shipments == 1 and shipments[1].order_id == 1 and shipments[1].job_id == job, "exactly one fulfilment")
assert(jobs[1].attempt == 2 and jobs[1].errors[1].error == "warehouse busy, try again")
print(("exactly one fulfilment: order 1 by job %d after %d attempts; order 2 left nothing behind")
  :format(job, jobs[1].attempt))
