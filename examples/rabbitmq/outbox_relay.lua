-- examples/rabbitmq/outbox_relay.lua — the transactional outbox relayed to RabbitMQ: order placed →
-- job in the same transaction → published with a confirm → consumed by a supervised consumer.
--
--   tide run examples/rabbitmq/outbox_relay.lua amqp://user:pass@127.0.0.1:5672/
--   (or set TIDE_AMQP_URL; `make test` runs it on its throwaway broker)
--
-- Placing an order writes the order row and a durable job in one SQLite
-- transaction: a rolled-back order publishes nothing, a committed one is
-- published even if the first try fails.  The job publishes the order event
-- and returns only once the broker confirmed it holds the message (here the
-- connection is cut under the first two publishes: those jobs fail and are
-- retried; the consumer on the same connection fails too, and its
-- supervisor restarts it).  A supervised tide.consumer ships each order, idempotently (the
-- shipment row is keyed by the order), so a redelivery never ships twice.
-- Exits 1 when a committed order was not shipped exactly once, or anything
-- else was.
local tide = require "tide"
local cjson = require "cjson"

local URL = arg[1] or os.getenv("TIDE_AMQP_URL")
if not URL then
  io.stderr:write("usage: tide run examples/rabbitmq/outbox_relay.lua amqp://user:pass@host:port/vhost\n")
  os.exit(2)
end
local ORDERS = 20

local path = os.tmpname()
local q = tide.queue.open("sqlite:" .. path)
q:transaction(function(tx)
  tx:exec("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total REAL NOT NULL)")
  tx:exec("CREATE TABLE shipments (order_id INTEGER PRIMARY KEY, shipped_at INTEGER NOT NULL)")
end)

local queue = "orders-placed-" .. os.time()
local events = tide.sources.rabbitmq{ url = URL, queue = queue, prefetch = 10, declare = { durable = true } }

-- ===== placing orders: the order and its relay job commit together

local function place_order(id, card_ok)
  return pcall(q.transaction, q, function(tx)
    tx:exec("INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)", id, "customer-" .. id, 10 * id)
    tx:enqueue{ target = "relay", method = "order_placed", args = { order = id },
                idempotency_key = "order-placed-" .. id, max_attempts = 5 }
    if not card_ok then error("card declined", 0) end
  end)
end

local committed = {}
for id = 1, ORDERS do
  local ok = place_order(id, id % 7 ~= 0)                 -- orders 7 and 14 are declined
  if ok then committed[#committed + 1] = id end
end
print(("%d orders placed, %d rolled back (no row, no job)"):format(#committed, ORDERS - #committed))

-- ===== the relay: a durable job that publishes with a confirm

local cuts = 2
local relay = {
  order_placed = function(args)
    if cuts > 0 then                    -- the connection is cut while the first two publishes wait
      cuts = cuts - 1
      tide.spawn(function()               -- once the message is out and its confirm awaited
        local t0 = tide.now()
        repeat
          local ch = events.pub_ch
          if ch and not ch.lost and next(ch.unconfirmed) then return ch.conn:close() end
          tide.sleep(1)
        until tide.now() - t0 > 1000
      end)
    end
    events:publish(cjson.encode{ order = args.order }, { message_id = "order-placed-" .. args.order,
                                                         content_type = "application/json" })
  end,
}

-- ===== the consumer: ships each order once

local shipped_events = 0
local consumer = tide.consumer{ source = events, handler = { timeout = 5000, run = function(body)
  local order = cjson.decode(body).order
  q:transaction(function(tx)
    tx:exec("INSERT INTO shipments (order_id, shipped_at) VALUES (?, ?) ON CONFLICT DO NOTHING", order, os.time())
  end)
  shipped_events = shipped_events + 1
end } }
local sup = tide.supervisor{ name = "shipping", intensity = 5, period = 1000,
  children = { { id = "consumer", start = function(ctx) return consumer:run(ctx) end, shutdown = 2000 } } }
sup:start()

local w = tide.worker{ queue = q, concurrency = 4, targets = { relay = relay },
                       retry = { backoff = "fixed", base = 50 } }
local st = w:drain{ stop = true, within = 10000 }
print(("relay: %d jobs completed, %d retried after a lost connection, %d discarded")
  :format(st.completed, st.retried, st.discarded))

local t0 = tide.now()
while shipped_events < #committed and tide.now() - t0 < 10000 do tide.sleep(20) end
sup:stop()
sup.task:await(5000)

-- ===== the promise: every committed order shipped exactly once, nothing else

local shipments, left
q:transaction(function(tx) shipments = tx:query("SELECT order_id FROM shipments ORDER BY order_id") end)
left = events:queue_info().messages
events:delete_queue()
events:close()
q:close()
for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(path .. suffix) end

local ok = #shipments == #committed and left == 0 and st.completed == #committed and st.discarded == 0
for i, row in ipairs(shipments) do ok = ok and row.order_id == committed[i] end
ok = ok and st.retried >= 1
print(("shipped %d orders from %d deliveries (the others: publishes retried after the cut, redeliveries to the"
  .. " restarted consumer); queue left with %d messages"):format(#shipments, shipped_events, left))
if not ok then
  print("FAILED: committed orders and shipments differ")
  os.exit(1)
end
print("ok: every committed order was published with a confirm and shipped exactly once; declined orders left nothing")
