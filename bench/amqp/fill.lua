-- bench/amqp/fill.lua — declares a non-durable queue and fills it with N messages of 16 bytes (published with confirms).
--
--   build/tide run bench/amqp/fill.lua URL QUEUE N
--
-- Used by bench/amqp/cg.sh; bench/amqp.lua fills its queues the same way.
local tide = require "tide"

local url, queue, n = ...
local N = tonumber(n)
local BODY = ("x"):rep(16)
local src = tide.sources.rabbitmq{ url = url, queue = queue, declare = { durable = false } }
src:declare_queue()
local tasks = {}
for k = 1, 200 do
  tasks[k] = tide.spawn(function()
    for _ = k, N, 200 do src:publish(BODY, { persistent = false }) end
  end)
end
for _, t in ipairs(tasks) do
  local s, e = t:await()
  assert(s == "ok", tostring(e))
end
assert(src:queue_info().messages >= N, "the queue was not filled")
src:close()
