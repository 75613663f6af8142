-- bench/threads.lua — thread mode: task round trip, CPU-bound speed-up, and the value codec vs lua-cjson.
-- Each figure is compared with a baseline measured in the same run.
local tide = require "tide"
local core = require "tide.core"
local cjson = require "cjson"

tide.configure{ threads = 2 }

local function best_of(n, fn)
  local best = math.huge
  for _ = 1, n do
    local t0 = tide.now()
    fn()
    best = math.min(best, tide.now() - t0)
  end
  return best
end

local noop = function() return 1 end

-- 1. round trip of a trivial thread task, spawn to outcome
tide.run(function()
  tide.spawn{ mode = "thread", run = noop }:await()          -- start the pool
  local N = 100000
  local many = best_of(3, function()
    local ts = {}
    for i = 1, N do ts[i] = tide.spawn{ mode = "thread", run = noop } end
    for i = 1, N do ts[i]:await() end
  end)
  local M = 2000
  local one = best_of(3, function()
    for _ = 1, M do tide.spawn{ mode = "thread", run = noop }:await() end
  end)
  local co = best_of(3, function()
    local ts = {}
    for i = 1, N do ts[i] = tide.spawn(noop) end
    for i = 1, N do ts[i]:await() end
  end)
  print(("thread task round trip, %d in flight: %.2f us/task (goal <= 5 us); coroutine task, same shape: %.2f us (ratio %.1fx)")
    :format(N, many / N * 1000, co / N * 1000, many / co))
  print(("thread task round trip, one at a time: %.1f us/task (latency: the wake-up of a sleeping thread)")
    :format(one / M * 1000))
end)

-- 2. CPU-bound work on 2 threads against 1
local function burn()
  local x = 0
  for i = 1, 5e7 do x = x + i % 7 end
  return x
end
tide.run(function()
  tide.spawn{ mode = "thread", run = burn }:await()
  local seq = best_of(3, function()
    for _ = 1, 4 do tide.spawn{ mode = "thread", run = burn }:await() end
  end)
  local par = best_of(3, function()
    local ts = {}
    for i = 1, 4 do ts[i] = tide.spawn{ mode = "thread", run = burn } end
    for i = 1, 4 do ts[i]:await() end
  end)
  print(("CPU-bound, 4 tasks: one at a time %.0f ms, on 2 threads %.0f ms: speed-up %.2fx (goal >= 1.8x)")
    :format(seq, par, seq / par))
end)

-- 3. the codec against lua-cjson on a ~1 MB nested table
local function make_table()
  local t = {}
  for i = 1, 6000 do
    t[i] = { id = i, name = "user" .. i, email = "user" .. i .. "@example.com", score = i * 1.5,
             active = i % 2 == 0, tags = { "alpha", "beta", "gamma" },
             address = { street = i .. " Main Street", city = "Springfield", zip = 10000 + i } }
  end
  return { users = t, meta = { count = #t, source = "bench" } }
end
local data = make_table()
local bytes = #core.encode(data)
local json_bytes = #cjson.encode(data)
local R = 20
local ours = best_of(3, function() for _ = 1, R do core.decode(core.encode(data)) end end) / R
local theirs = best_of(3, function() for _ = 1, R do cjson.decode(cjson.encode(data)) end end) / R
print(("codec encode+decode of a %.2f MB table (%.2f MB as JSON): %.2f ms; lua-cjson %.2f ms: %.2fx faster (goal >= 2x)")
  :format(bytes / 1e6, json_bytes / 1e6, ours, theirs, theirs / ours))
