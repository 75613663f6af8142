-- task_runner.lua — non-blocking submission to a bounded pool, results as they arrive.
--
-- 2,000 jobs are submitted to a tide.pool of size 50.  pool:submit returns a
-- task at once (no job has started when the submitting loop ends, and the
-- whole loop takes a few milliseconds); the pool runs at most 50 of them at a
-- time, queueing the rest; each outcome reaches its handle_result as soon as
-- it is known, in completion order, not submission order.  A few jobs fail
-- or hang on purpose, to show that errors and timeouts are outcomes like any
-- other and free their slot.  pool:drain() waits for the lot.
--
-- Checks (exit 1 when one fails): concurrency reached 50 and never exceeded
-- it, every handle_result ran exactly once, the outcome counts match what the
-- jobs were built to do, and drain's stats agree.
--
-- Run: build/tide run examples/task_runner.lua      (about half a second)
local tide = require "tide"

local N, SIZE, TIMEOUT = 2000, 50, 200
local SAMPLE = 250                     -- print every SAMPLE-th result

math.randomseed(7)

local running, max_running, started = 0, 0, 0
local arrived, seen = 0, {}
local by_status = { ok = 0, error = 0, timeout = 0, cancelled = 0 }
local bad_values = 0

-- Job i: most sleep a little and return i*i; every 61st raises, every 97th
-- hangs past its timeout.
local function kind_of(i)
  if i % 97 == 0 then return "hangs" elseif i % 61 == 0 then return "fails" end
  return "works"
end

local function job(i, ms)
  started = started + 1
  running = running + 1
  if running > max_running then max_running = running end
  if kind_of(i) == "hangs" then tide.sleep(10 * TIMEOUT) end
  tide.sleep(ms)
  if kind_of(i) == "fails" then
    running = running - 1
    error(("job %d failed"):format(i))
  end
  running = running - 1
  return i * i
end

local t0 = tide.now()

local function on_result(status, value, task)
  arrived = arrived + 1
  by_status[status] = by_status[status] + 1
  local i = task.job
  seen[i] = (seen[i] or 0) + 1
  if status == "timeout" then running = running - 1 end   -- its coroutine was dropped mid-sleep
  if status == "ok" and value ~= i * i then bad_values = bad_values + 1 end
  if arrived % SAMPLE == 0 then
    print(("  result %4d at %4.0f ms: job %4d %-7s %s"):format(
      arrived, tide.now() - t0, i, status, status == "ok" and value or tostring(value):match("[^\n]*")))
  end
end

local pool = tide.pool{ concurrency = SIZE, queue_limit = N }

-- ===== submission: returns at once

local s0 = tide.now()
for i = 1, N do
  local t = assert(pool:submit{ name = "job " .. i, run = job, args = { i, math.random(2, 15) },
                                timeout = TIMEOUT, handle_result = on_result })
  t.job = i
end
local submit_ms = tide.now() - s0
local started_during_submit = started
print(("submitted %d jobs in %.2f ms (%.2f us each); %d started meanwhile; pool: %s")
  :format(N, submit_ms, submit_ms * 1000 / N, started_during_submit, tostring(pool)))

-- ===== results arrive while we wait

local stats = pool:drain()
local elapsed = tide.now() - t0

local want = { works = 0, fails = 0, hangs = 0 }
for i = 1, N do want[kind_of(i)] = want[kind_of(i)] + 1 end

print(("done in %.0f ms: ok %d, error %d, timeout %d, cancelled %d; max concurrency %d of %d")
  :format(elapsed, by_status.ok, by_status.error, by_status.timeout, by_status.cancelled,
          max_running, SIZE))

local failures = {}
local function check(cond, msg, ...)
  if not cond then failures[#failures + 1] = msg:format(...) end
end

local once = 0
for i = 1, N do if seen[i] == 1 then once = once + 1 end end
check(started_during_submit == 0, "%d jobs ran inside submit (it should only queue)", started_during_submit)
check(submit_ms < 250, "submitting took %.1f ms", submit_ms)
check(max_running <= SIZE, "concurrency reached %d, over the limit %d", max_running, SIZE)
check(max_running == SIZE, "concurrency peaked at %d, never reached %d", max_running, SIZE)
check(arrived == N and once == N, "%d results for %d jobs (%d exactly once)", arrived, N, once)
check(by_status.ok == want.works, "ok %d, expected %d", by_status.ok, want.works)
check(by_status.error == want.fails, "error %d, expected %d", by_status.error, want.fails)
check(by_status.timeout == want.hangs, "timeout %d, expected %d", by_status.timeout, want.hangs)
check(bad_values == 0, "%d wrong results", bad_values)
check(running == 0, "%d jobs still counted as running", running)
check(stats.ok == by_status.ok and stats.error == by_status.error and stats.timeout == by_status.timeout
      and stats.cancelled == 0 and stats.submitted == N and stats.running == 0 and stats.waiting == 0,
      "drain stats disagree: ok %d error %d timeout %d cancelled %d submitted %d running %d waiting %d",
      stats.ok, stats.error, stats.timeout, stats.cancelled, stats.submitted, stats.running, stats.waiting)

if #failures > 0 then
  io.stderr:write("task_runner: FAILED\n  ", table.concat(failures, "\n  "), "\n")
  os.exit(1)
end
print("ok: submit returned at once, at most " .. SIZE .. " ran at a time, every result arrived once")
