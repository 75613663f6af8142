-- bench/amqp/fill.lua — declares a non-durable queue and fills it with N messages of 16 bytes (published with confirms).
--
--   build/tide run bench/amqp/fill.lua URL QUEUE N
--
-- Used by bench/amqp/cg.sh; bench/amqp.lua fills its queues with the same bench/lib/common.lua function.
local tide = require "tide"

package.path = "bench/lib/?.lua;" .. package.path
local lib = require "common"

local url, queue, n = ...
lib.fill_queue(tide, url, queue, tonumber(n), ("x"):rep(16)):close()
