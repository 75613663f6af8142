-- bench/amqp/consume.lua — tide's side of bench/amqp.lua: a tide.consumer takes and acks N messages.
--
--   build/tide run bench/amqp/consume.lua URL QUEUE N PREFETCH
--
-- tide.sources.rabbitmq with basic.qos PREFETCH, each delivery run as a task
-- (a no-op handler) and acked on its outcome.  Prints one JSON line:
-- { "n": N, "ms": wall time from the consumer's start to the N-th outcome,
--   "cpu_ms": user + system CPU of this process over the same span }.
local tide = require "tide"
local ffi = require "ffi"

ffi.cdef[[
struct tide_timeval { long tv_sec; long tv_usec; };
struct tide_rusage { struct tide_timeval ru_utime, ru_stime; long ru_rest[14]; };
int getrusage(int who, struct tide_rusage *usage);
]]
local function cpu_ms()
  local ru = ffi.new("struct tide_rusage")
  ffi.C.getrusage(0, ru)
  return (tonumber(ru.ru_utime.tv_sec) + tonumber(ru.ru_stime.tv_sec)) * 1000
       + (tonumber(ru.ru_utime.tv_usec) + tonumber(ru.ru_stime.tv_usec)) / 1000
end

local url, queue, n, prefetch = ...
local N, PREFETCH = tonumber(n), tonumber(prefetch)
local src = tide.sources.rabbitmq{ url = url, queue = queue, prefetch = PREFETCH }
src:queue_info()                                   -- connected before the clock starts
local got = 0
local c = tide.consumer{ source = src, concurrency = PREFETCH, handler = { run = function() got = got + 1 end } }
local cpu0, t0 = cpu_ms(), tide.now()
local t = tide.spawn(function() return c:run() end)
while got < N do tide.sleep(2) end
local ms, cpu = tide.now() - t0, cpu_ms() - cpu0
tide.sleep(20)                                     -- the last acks leave
t:cancel()
src:close()
print(('{"n": %d, "ms": %.1f, "cpu_ms": %.1f}'):format(N, ms, cpu))
