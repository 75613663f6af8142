-- bench/amqp.lua — consuming from RabbitMQ: tide.consumer against Node's amqplib on the same broker, in the same run.
--
-- Starts a throwaway node (spec/rabbitmq.sh, a temporary directory, a free
-- loopback port), then, REPEATS times, alternating the two clients so a
-- noisy machine hits both: fills a queue with N small messages (16 bytes,
-- published by tide with confirms), and has one client consume and ack
-- them all with prefetch 100, each as a process of its own:
--   tide:    build/tide run bench/amqp/consume.lua (a tide.consumer: every
--            delivery runs as a task and is acked on its outcome);
--   amqplib: node bench/peers/amqplib_consume.js (a consume callback that acks).
-- Reports messages consumed and acked per second and the client's CPU
-- (user + system, getrusage / process.cpuUsage) per message; best and
-- median.  Goal (issue 17): at least amqplib's rate at no more than half its
-- client CPU.  amqplib comes from npm (`npm install --prefix bench/peers`);
-- without node or amqplib the baseline says "not installed" and tide runs alone.
-- Environment: TIDE_BENCH_AMQP_N (default 100000), TIDE_BENCH_AMQP_REPEATS (3),
-- TIDE_BENCH_AMQP_PORT (the node's AMQP port; it also takes the next two for
-- Erlang's distribution and epmd; default: one drawn from 40000-59999),
-- TIDE_BENCH_AMQP_BASE (another build directory, say of the commit before a
-- change: its tide runs as a third client, "tide@base", in the same rounds).
local tide = require "tide"
local cjson = require "cjson"
package.path = "bench/lib/?.lua;" .. package.path
local lib = require "common"
local sh, loadavg = lib.sh, lib.loadavg

-- The driver waits for its clients with blocking popen calls (they are what
-- is measured, the loop has nothing else to do): no stall reports for those.
tide.configure{ watchdog = 0 }

local BUILD = os.getenv("BUILD") or "build"
local N = tonumber(os.getenv("TIDE_BENCH_AMQP_N") or "100000")
local REPEATS = tonumber(os.getenv("TIDE_BENCH_AMQP_REPEATS") or "3")
local PREFETCH = 100
local BODY = ("x"):rep(16)

local dir = os.tmpname()
os.remove(dir)
local port = tonumber(os.getenv("TIDE_BENCH_AMQP_PORT") or "") or 40000 + math.floor(tide.now()) % 20000
local status, url = sh(("sh spec/rabbitmq.sh start %s/node %d"):format(dir, port))
if status ~= 0 then
  io.stderr:write("bench/amqp: cannot start RabbitMQ:\n", url, "\n")
  os.exit(1)
end
url = url:match("(amqp://%S+)")
local function stop_broker() sh(("sh spec/rabbitmq.sh stop %s/node; rm -rf %s"):format(dir, dir)) end

local have_node = sh("node --version") == 0
local have_amqplib = io.open("bench/peers/node_modules/amqplib/package.json") ~= nil
local baseline = have_node and have_amqplib

local BASE = os.getenv("TIDE_BENCH_AMQP_BASE")
local clients = {
  { name = "tide", cmd = function(q) return ("%s/tide run bench/amqp/consume.lua %s %s %d %d"):format(BUILD, url, q, N, PREFETCH) end },
}
if baseline then
  clients[#clients + 1] = { name = "amqplib", cmd = function(q) return ("node bench/peers/amqplib_consume.js %s %s %d %d"):format(url, q, N, PREFETCH) end }
end
if BASE then
  clients[#clients + 1] = { name = "tide@base", cmd = function(q) return ("%s/tide run bench/amqp/consume.lua %s %s %d %d"):format(BASE, url, q, N, PREFETCH) end }
end

local results = { tide = {}, amqplib = {}, ["tide@base"] = {} }
print(("load average before: %s"):format(loadavg()))
local st, err = tide.run(function()
  local n = 0
  for round = 1, REPEATS do
    for _, client in ipairs(clients) do
      n = n + 1
      local q = "bench-" .. n
      local src = lib.fill_queue(tide, url, q, N, BODY)
      local code, out = sh(client.cmd(q))     -- the loop waits: nothing else runs meanwhile
      local line = out:match("({.-})%s*$")
      assert(code == 0 and line, client.name .. " failed:\n" .. out)
      local r = cjson.decode(line)
      tide.sleep(100)
      local left = src:queue_info().messages
      assert(left == 0, ("%s left %d messages in the queue"):format(client.name, left))
      src:delete_queue()
      src:close()
      local list = results[client.name]
      list[#list + 1] = { rate = N / r.ms * 1000, cpu_us = r.cpu_ms * 1000 / N }
      print(("  round %d %-8s %8.0f msg/s  %6.2f µs CPU/msg   (load average %s)")
        :format(round, client.name, N / r.ms * 1000, r.cpu_ms * 1000 / N, loadavg()))
    end
  end
end)
stop_broker()
if st ~= "ok" then
  io.stderr:write("bench/amqp: ", tostring(err), "\n")
  os.exit(1)
end

print(("load average after: %s"):format(loadavg()))

local function best_median(list, key, better)
  local v = {}
  for i, r in ipairs(list) do v[i] = r[key] end
  table.sort(v, better)
  return v[1], v[math.floor((#v + 1) / 2)]
end

print(("\nconsume and ack %d messages of %d bytes, prefetch %d, one client process each (best / median of %d):")
  :format(N, #BODY, PREFETCH, REPEATS))
local tr, trm = best_median(results.tide, "rate", function(a, b) return a > b end)
local tc, tcm = best_median(results.tide, "cpu_us", function(a, b) return a < b end)
print(("  tide      %8.0f / %8.0f msg/s   %6.2f / %6.2f µs CPU per message"):format(tr, trm, tc, tcm))
if not baseline then
  print(("  amqplib   not installed (%s): npm install --prefix bench/peers"):format(have_node and "no bench/peers/node_modules/amqplib" or "no node"))
  return
end
if BASE then
  local br, brm = best_median(results["tide@base"], "rate", function(a, b) return a > b end)
  local bc, bcm = best_median(results["tide@base"], "cpu_us", function(a, b) return a < b end)
  print(("  tide@base %8.0f / %8.0f msg/s   %6.2f / %6.2f µs CPU per message   (%s)"):format(br, brm, bc, bcm, BASE))
  print(("  tide / tide@base: CPU per message %.2fx (best), %.2fx (median)"):format(tc / bc, tcm / bcm))
end
local ar, arm = best_median(results.amqplib, "rate", function(a, b) return a > b end)
local ac, acm = best_median(results.amqplib, "cpu_us", function(a, b) return a < b end)
print(("  amqplib   %8.0f / %8.0f msg/s   %6.2f / %6.2f µs CPU per message"):format(ar, arm, ac, acm))
print(("  tide / amqplib: rate %.2fx, CPU per message %.2fx (goal: rate >= 1x, CPU <= 0.5x: %s)")
  :format(tr / ar, tc / ac, (tr >= ar and tc <= ac / 2) and "met" or "not met"))
