-- bench/pg/targets.lua — the jobs of bench/pg/bench.lua, for `tide worker ... bench/pg/targets.lua`.
--
--   bench.noop    does nothing (the throughput runs);
--   bench.owntx   inserts a row in a transaction of its own (the pool runs);
--   bench.stamp   appends "id enqueued_us started_us" to $TIDE_BENCH_STAMPS.<pid>
--                 (the latency runs): the start time is read first thing in
--                 the job, in µs of UTC wall time, the same clock the enqueuer
--                 stamped args.at with (a string: JSON numbers keep 14 digits).
local ffi = require "ffi"

ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } tide_bench_timespec;
  int clock_gettime(int clk, tide_bench_timespec *ts);
]]
local ts = ffi.new("tide_bench_timespec")

local function wall_us()
  ffi.C.clock_gettime(0, ts)                -- CLOCK_REALTIME
  return tonumber(ts.tv_sec) * 1e6 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local stamps                                -- this process's file, opened at the first stamp

local function stamp(args, job)
  local started = wall_us()
  if not stamps then
    local base = assert(os.getenv("TIDE_BENCH_STAMPS"), "bench.stamp: $TIDE_BENCH_STAMPS is not set")
    stamps = assert(io.open(("%s.%d"):format(base, require("tide.core").pid()), "a"))
    stamps:setvbuf("line")
  end
  stamps:write(("%d %s %.0f\n"):format(job.id, args.at, started))
end

--- bench.owntx: inserts one row in a transaction of its own, on the queue
--- $TIDE_BENCH_OWNTX_URL (its ?pool=N is the pool the jobs share).  The
--- queue is opened here, when the worker loads this file, once: opened by
--- the first job instead, the 20 jobs that start together each opened one
--- (the open yields), 20 migrations in a row behind one advisory lock (2.7 s
--- of a 3,000-job run, measured).
local own_url = os.getenv("TIDE_BENCH_OWNTX_URL")
local own_q = own_url and require("tide").queue.open(own_url)
local function owntx(_, job)
  assert(own_q, "bench.owntx: TIDE_BENCH_OWNTX_URL is not set")
  own_q:transaction(function(tx) tx:exec("INSERT INTO bench_effects (job) VALUES (?)", job.id) end)
end

return { bench = { noop = function() end, stamp = stamp, owntx = owntx } }
