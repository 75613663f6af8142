-- bench/flow.lua — flow scheduling overhead per node on 100,000-node graphs (goal <= 1 us per node).
-- Baseline, in the same run: the same number of trivial tasks spawned and awaited
-- without a flow.  Overhead per node = (flow run - baseline) / nodes.
local tide = require "tide"

local N = 100000
local REPEATS = 3
local noop = function() end

local function best(times) table.sort(times); return times[1] end

local function wide()
  local tasks = { root = { run = noop } }
  for i = 1, N - 1 do tasks["n" .. i] = { after = "root", run = noop } end
  return tide.flow{ name = "wide", tasks = tasks }
end

local function chain()
  local tasks = { n1 = { run = noop } }
  for i = 2, N do tasks["n" .. i] = { after = "n" .. (i - 1), run = noop } end
  return tide.flow{ name = "chain", tasks = tasks }
end

local function layered()
  math.randomseed(3)
  local layers, width = 100, N / 100
  local tasks = {}
  for l = 1, layers do
    for w = 1, width do
      local deps = {}
      if l > 1 then
        for _ = 1, math.random(1, 3) do deps[#deps + 1] = ("l%d_%d"):format(l - 1, math.random(1, width)) end
      end
      tasks[("l%d_%d"):format(l, w)] = { after = deps, run = noop }
    end
  end
  return tide.flow{ name = "layered", tasks = tasks }
end

local function fanout_children()
  local items = {}
  for i = 1, N do items[i] = i end
  return tide.flow{ name = "children", tasks = {
    t = { items = function() return items end, each = noop, concurrency = 1000 } } }
end

local function baseline_ms()
  local times = {}
  for r = 1, REPEATS do
    tide.run(function()
      collectgarbage()
      local t0 = tide.now()
      local ts = {}
      for i = 1, N do ts[i] = tide.spawn(noop) end
      for i = 1, N do ts[i]:await() end
      times[r] = tide.now() - t0
    end)
  end
  return best(times)
end

local base = baseline_ms()
print(("baseline: %d trivial tasks spawned and awaited: %.1f ms (%.2f us/task)"):format(N, base, base / N * 1000))
for _, case in ipairs{ { "one wide fan-out", wide }, { "one long chain", chain },
                       { "random layered DAG (100 x 1000)", layered },
                       { "one task with 100,000 children", fanout_children } } do
  local t0 = tide.now()
  local f = case[2]()
  local define = tide.now() - t0
  local times = {}
  for r = 1, REPEATS do
    tide.run(function()
      collectgarbage()
      local t1 = tide.now()
      local status = f:run()
      assert(status == "ok", status)
      times[r] = tide.now() - t1
    end)
  end
  local run_ms = best(times)
  print(("%-32s define %6.0f ms, run %6.0f ms: %.2f us/node, overhead over the baseline %.2f us/node (goal <= 1 us)")
    :format(case[1], define, run_ms, run_ms / N * 1000, (run_ms - base) / N * 1000))
end
