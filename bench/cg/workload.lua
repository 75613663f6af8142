-- bench/cg/workload.lua — one workload of N units, for counting instructions under callgrind.
--
--   valgrind --tool=callgrind --separate-threads=yes luajit bench/cg/workload.lua WORKLOAD N
--
-- bench/cg/run.sh runs it at two sizes and prints the instructions per unit of
-- the loop thread (the difference over the difference in N: start-up and
-- the pool's threads do not count).  Workloads: spawn, sleep, after,
-- thread, flow_tasks, flow_define, flow_run.
local tide = require "tide"
tide.configure{ watchdog = 0 }

local workload, N = arg[1], tonumber(arg[2])
local noop = function() return 1 end

local W = {}

function W.spawn()
  local ts = {}
  for i = 1, N do ts[i] = tide.spawn(noop) end
  for i = 1, N do ts[i]:await() end
end

function W.sleep()
  local ts = {}
  for i = 1, N do ts[i] = tide.spawn(tide.sleep, 1) end
  for i = 1, N do ts[i]:await() end
end

function W.after()
  local fired = 0
  local function cb() fired = fired + 1 end
  for i = 1, N do tide.after(i % 100, cb) end
  while fired < N do tide.sleep(5) end
end

-- Awaited once all are done, so that the count does not depend on how the
-- threads were scheduled against the loop (which awaits found their task
-- finished already).
function W.thread()
  local ts = {}
  for i = 1, N do ts[i] = tide.spawn{ mode = "thread", run = noop } end
  while ts[N]:status() ~= "ok" do tide.sleep(1) end
  for i = 1, N do ts[i]:await() end
end

local function layered_tasks()
  math.randomseed(3)
  local width = 100
  local tasks = {}
  for l = 1, N / width do
    for w = 1, width do
      local deps = {}
      if l > 1 then
        for _ = 1, math.random(1, 3) do deps[#deps + 1] = ("l%d_%d"):format(l - 1, math.random(1, width)) end
      end
      tasks[("l%d_%d"):format(l, w)] = { after = deps, run = noop }
    end
  end
  return tasks
end

function W.flow_tasks()                 -- the graph's table alone: subtract it from flow_define
  layered_tasks()
end

function W.flow_define()
  local tasks = layered_tasks()
  tide.flow{ name = "layered", tasks = tasks }
end

local flow
function W.flow_run()
  assert(flow:run() == "ok")
end

if workload == "thread" then
  tide.configure{ threads = 2 }
  tide.run(function() tide.spawn{ mode = "thread", run = noop }:await() end)   -- start the pool
elseif workload == "flow_run" then
  flow = tide.flow{ name = "layered", tasks = layered_tasks() }
end
assert(W[workload], "bench/cg/workload.lua: unknown workload " .. tostring(workload))
local status, err = tide.run(W[workload])
assert(status == "ok", tostring(err))
