-- bench/core.lua — the core's hot paths against the goals in DESIGN.md.
--
--   1. spawn to outcome: 1,000,000 trivial tasks, ns per task (goal <= 400 ns),
--      beside bare coroutine.create + resume for the same count;
--   2. memory of an idle task: 100,000 tasks asleep at once, bytes per task
--      (goal <= 1 KB), each repetition in a fresh luajit process so that
--      tables grown by an earlier run do not hide their cost;
--   3. timers: 1,000,000 tide.after timers with random delays in 0..100 ms,
--      created and fired, total seconds (goal < 2 s).
-- Each is measured 3 times; the best and the median are printed.
--
-- Run from the repository root: LUA_CPATH="build/?.so;;" luajit bench/core.lua
-- (bench/run.sh does).  `luajit bench/core.lua mem` runs one memory sample.
local tide = require "tide"

local now, collect, gc_count = tide.now, collectgarbage, function() return collectgarbage("count") end
local sort, floor = table.sort, math.floor

local REPEATS = 3
local SPAWN_N, BATCH = 1000000, 10000
local IDLE_N, IDLE_SLEEP = 100000, 10000   -- they are cancelled once measured
local TIMER_N, TIMER_SPAN = 1000000, 100

-- ===== helpers

local function best_median(xs)
  local s = {}
  for i = 1, #xs do s[i] = xs[i] end
  sort(s)
  return s[1], s[floor((#s + 1) / 2)]
end

local function verdict(ok) return ok and "ok" or "MISSED" end

local function fail(msg)
  io.stderr:write("bench/core.lua: ", msg, "\n")
  os.exit(1)
end

--- Runs fn as tide's root task and returns its value; a failure aborts.
local function in_tide(fn)
  local status, value = tide.run(fn)
  if status ~= "ok" then fail("root task ended " .. status .. ": " .. tostring(value)) end
  return value
end

-- ===== 1. spawn to outcome

local function trivial() end

--- ms from the first spawn until all SPAWN_N outcomes are delivered.
local function spawn_once()
  collect(); collect()
  return in_tide(function()
    local ok0 = tide.stats().ok
    local t0 = now()
    local last
    for _ = 1, SPAWN_N / BATCH do
      for _ = 1, BATCH do last = tide.spawn(trivial) end
      tide.sleep(0)                      -- let the batch run
    end
    local status = last:await()
    local elapsed = now() - t0
    local done = tide.stats().ok - ok0
    if status ~= "ok" or done ~= SPAWN_N then
      fail(("spawn: %d of %d tasks ended ok (last: %s)"):format(done, SPAWN_N, tostring(status)))
    end
    return elapsed
  end)
end

--- ms for SPAWN_N bare coroutine.create(f) + coroutine.resume(co).
local function bare_once()
  collect(); collect()
  local create, resume = coroutine.create, coroutine.resume
  local t0 = now()
  for _ = 1, SPAWN_N do
    local co = create(trivial)
    resume(co)
  end
  return now() - t0
end

local function bench_spawn()
  local ts, bs = {}, {}
  for i = 1, REPEATS do
    ts[i] = spawn_once() * 1e6 / SPAWN_N       -- ns per task
    bs[i] = bare_once() * 1e6 / SPAWN_N
  end
  local tb, tm = best_median(ts)
  local bb, bm = best_median(bs)
  print(("spawn to outcome, %d trivial tasks: %.0f ns/task best, %.0f median; goal <= 400 ns [%s]")
    :format(SPAWN_N, tb, tm, verdict(tb <= 400)))
  print(("  bare coroutine.create + resume: %.0f ns best, %.0f median; tide/bare = %.1fx (best/best)")
    :format(bb, bm, tb / bb))
  return { ns = tb, ns_median = tm, bare = bb, bare_median = bm }
end

-- ===== 2. memory of an idle task

local function sleeper() tide.sleep(IDLE_SLEEP) end

--- Bytes per task with IDLE_N tasks asleep, measured in this (fresh) process.
local function mem_sample()
  return in_tide(function()
    collect(); collect()
    local kb0, tb0 = gc_count(), tide.stats().timer_bytes
    local done0 = tide.stats().ok
    local t0 = now()
    for _ = 1, IDLE_N do tide.spawn(sleeper) end
    tide.sleep(0)                          -- every task runs up to its sleep
    tide.sleep(0)
    collect(); collect()
    local st = tide.stats()
    local kb1, tb1 = gc_count(), st.timer_bytes
    if st.live - 1 ~= IDLE_N or st.timers ~= IDLE_N or st.ok ~= done0 or now() - t0 >= IDLE_SLEEP then
      fail(("mem: expected %d sleeping tasks, found %d live, %d timers, %d done")
        :format(IDLE_N, st.live - 1, st.timers, st.ok - done0))
    end
    local per_task = ((kb1 - kb0) * 1024 + (tb1 - tb0)) / IDLE_N
    tide.shutdown(0)                       -- cancel them all rather than wait
    return per_task
  end)
end

local function shell_quote(s) return "'" .. s:gsub("'", [['\'']]) .. "'" end

local function bench_mem()
  local interp = arg and arg[-1] or "luajit"
  local script = arg and arg[0] or "bench/core.lua"
  local xs = {}
  for i = 1, REPEATS do
    local p = assert(io.popen(shell_quote(interp) .. " " .. shell_quote(script) .. " mem"))
    local out = p:read("*a")
    p:close()
    xs[i] = tonumber(out:match("bytes_per_task=([%d%.]+)"))
    if not xs[i] then fail("mem: the child process printed no figure: " .. out) end
  end
  local b, m = best_median(xs)
  print(("memory of an idle task, %d asleep at once: %.0f bytes/task best, %.0f median; goal <= 1024 bytes [%s]")
    :format(IDLE_N, b, m, verdict(b <= 1024)))
  return { bytes = b, bytes_median = m }
end

-- ===== 3. timers

--- ms from the first tide.after until all TIMER_N callbacks have run; also
--- ms spent creating them and the Lua heap in MB once all fired (before a GC).
local function timers_once()
  collect(); collect()
  local random = math.random
  math.randomseed(1)
  return in_tide(function()
    local fired = 0
    local function cb() fired = fired + 1 end
    local t0 = now()
    for _ = 1, TIMER_N do tide.after(random() * TIMER_SPAN, cb) end
    local created = now() - t0
    while fired < TIMER_N do
      tide.sleep(1)
      if now() - t0 > 60000 then fail(("timers: %d of %d fired after 60 s"):format(fired, TIMER_N)) end
    end
    return { total = now() - t0, create = created, heap = gc_count() / 1024 }
  end)
end

local function bench_timers()
  local xs, runs = {}, {}
  for i = 1, REPEATS do
    runs[i] = timers_once()
    xs[i] = runs[i].total / 1000
  end
  local b, m = best_median(xs)
  local best
  for i = 1, REPEATS do if xs[i] == b then best = runs[i] end end
  print(("timers, %d tide.after (0..%d ms) created and fired: %.2f s best, %.2f median; goal < 2 s [%s]")
    :format(TIMER_N, TIMER_SPAN, b, m, verdict(b < 2)))
  print(("  best run: %.2f s creating, %.2f s firing; Lua heap once all fired, before a GC: %.0f MB")
    :format(best.create / 1000, (best.total - best.create) / 1000, best.heap))
  return { s = b, s_median = m }
end

-- ===== main

if arg and arg[1] == "mem" then
  print(("bytes_per_task=%.1f"):format(mem_sample()))
  return
end

local wall0, cpu0 = now(), os.clock()
bench_spawn()
bench_mem()
bench_timers()
local st = tide.stats()
if st.live ~= 0 or st.timers ~= 0 or st.callback_errors ~= 0 then
  fail(("left behind: %d live tasks, %d timers, %d callback errors"):format(st.live, st.timers, st.callback_errors))
end
print(("(bench/core.lua: %.1f s wall, %.1f s CPU)"):format((now() - wall0) / 1000, os.clock() - cpu0))
