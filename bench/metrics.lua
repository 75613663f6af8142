-- bench/metrics.lua — what a Prometheus scrape costs the loop, with 100,000 live tasks.
--
-- 1. render: tide.metrics.render() alone, in-process, with no other task
--    and with 100,000 tasks asleep (the baseline is the same call with none).
-- 2. scrape: GET /metrics over HTTP from a client process (python3, keep-
--    alive, one request at a time); the loop's time per scrape is the
--    server process's CPU time over the scrapes divided by their number
--    (the loop is otherwise idle: the sleeping tasks wake in an hour).  It
--    includes everything the loop does for a scrape: reading and parsing
--    the request, the handler's task, rendering, writing, the collector.
--    Baseline in the same run: GET /ping, a handler that returns "ok".
-- 3. the job gauges' sample: q:backlog() on a SQLite store with 100,000
--    waiting jobs among 200,000 (what the sampler reads at most every 5 s).
-- Best of 3 runs, median beside it.
local tide = require "tide"
local http = require "tide.engine.http"
local metrics = require "tide.observe.metrics"

local LIVE = 100000
local SCRAPES = 2000

local function stats(list)
  table.sort(list)
  return list[1], list[math.ceil(#list / 2)]
end

local function render_cost(n)
  local t0 = os.clock()
  for _ = 1, n do metrics.render() end
  return (os.clock() - t0) / n
end

--- CPU seconds of this process per request while a client makes `n` requests for `path`.
local function scrape_cost(srv, path, n)
  local client = ([[env -u LD_PRELOAD /usr/bin/python3 -c "
import http.client, time
c = http.client.HTTPConnection('127.0.0.1', %d)
lat = []
for i in range(%d):
    t = time.perf_counter(); c.request('GET', '%s'); r = c.getresponse(); body = r.read()
    assert r.status == 200, r.status
    lat.append(time.perf_counter() - t)
lat.sort()
print('%%.1f %%.1f %%d' %% (lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6, len(body)))
"]]):format(srv.port, n, path)
  local t0 = os.clock()
  local t = tide.spawn{ mode = "thread", args = { client }, run = function(cmd)
    local f = io.popen(cmd)
    local s = f:read("*a")
    f:close()
    return s
  end }
  local _, out = t:await()
  local cpu = (os.clock() - t0) / n
  local p50, p99, bytes = out:match("^(%S+) (%S+) (%d+)")
  assert(p50, "client failed: " .. tostring(out))
  return cpu, tonumber(p50), tonumber(p99), tonumber(bytes)
end

local function fmt_us(s) return ("%.1f µs"):format(s * 1e6) end

tide.run(function()
  -- 1. render alone
  local none, many = {}, {}
  for i = 1, 3 do none[i] = render_cost(2000) end
  local tasks = {}
  for i = 1, LIVE do tasks[i] = tide.spawn(function() tide.sleep(3600000) end) end
  tide.sleep(0)
  assert(tide.stats().live >= LIVE)
  for i = 1, 3 do many[i] = render_cost(2000) end
  local b0, m0 = stats(none)
  local b1, m1 = stats(many)
  print(("render, no other task:          best %s, median %s"):format(fmt_us(b0), fmt_us(m0)))
  print(("render, %d tasks live:      best %s, median %s  (%.2fx the baseline)"):format(LIVE, fmt_us(b1), fmt_us(m1), b1 / b0))

  -- 2. over HTTP, the 100,000 tasks still live
  local srv = assert(http.serve{ handler = function(req)
    if req.path == "/ping" then return 200, { ["content-type"] = "text/plain" }, "ok" end
    return metrics.handler{}(req)
  end })
  local scrape, ping, lat = {}, {}, {}
  for i = 1, 3 do
    local p50, p99, bytes
    scrape[i], p50, p99, bytes = scrape_cost(srv, "/metrics", SCRAPES)
    lat[i] = { p50, p99, bytes }
    ping[i] = scrape_cost(srv, "/ping", SCRAPES)
  end
  local sb, sm = stats(scrape)
  local pb, pm = stats(ping)
  print(("scrape /metrics, %d live:   loop time best %s, median %s per scrape (%d bytes; client p50 %.0f µs, p99 %.0f µs)")
    :format(LIVE, fmt_us(sb), fmt_us(sm), lat[1][3], lat[1][1], lat[1][2]))
  print(("GET /ping (baseline), same run: loop time best %s, median %s per request"):format(fmt_us(pb), fmt_us(pm)))
  srv:close()
  for i = 1, #tasks do tasks[i]:cancel() end
  tasks = nil
  collectgarbage()

  -- 3. the job gauges' sample on SQLite
  local path = os.tmpname()
  local q = tide.queue.open("sqlite:" .. path)
  local batch = {}
  for i = 1, 200000 do
    batch[#batch + 1] = { target = "t", method = "m", queue = i % 2 == 0 and "a" or "b" }
    if #batch == 10000 then q:enqueue_many(batch); batch = {} end
  end
  q._store.db:exec("UPDATE tide_jobs SET status = 'completed' WHERE id % 2 = 0")
  local reads = {}
  for i = 1, 5 do
    local t0 = tide.now()
    local b = q:backlog()
    reads[i] = tide.now() - t0
    assert(b.b.available == 100000)
  end
  local rb, rm = stats(reads)
  print(("q:backlog(), 100,000 waiting among 200,000 (SQLite): best %.1f ms, median %.1f ms "
         .. "(the sampler reads it at most every max(5 s, 50 x that))"):format(rb, rm))
  q:close()
  for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
end)
