-- bench/cg/workload.lua — one workload of N units, for counting instructions under callgrind.
--
--   valgrind --tool=callgrind --separate-threads=yes luajit bench/cg/workload.lua WORKLOAD N
--
-- bench/cg/run.sh runs it at two sizes and prints the instructions per unit of
-- the loop thread (the difference over the difference in N: start-up and
-- the pool's threads do not count).  Workloads: spawn, spawn_opt, await_child, sleep, sleep_fn,
-- after, after_stop, thread, flow_tasks, flow_define, flow_run, flow_each (one task
-- fanned out into N trivial children, 1,000 at once), dflow (a durable flow: N
-- no-op steps in layers of 100, each after 2 of the layer before, run by
-- one worker in the process on a fresh SQLite file), codec (one round trip of
-- bench/threads.lua's 1 MB table of records through tide's own codec,
-- encode_unordered and decode, as process hand-offs make it: run it at small
-- sizes, `sh bench/cg/run.sh codec 1 5`; codec_encode and codec_decode, each
-- half alone), codec_local (the same through encode_local and decode_local,
-- as thread hand-offs make it).
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

function W.spawn_opt()                  -- an option table: tasks with handle_result
  local ts, heard = {}, 0
  local function hr() heard = heard + 1 end
  for i = 1, N do ts[i] = tide.spawn{ run = noop, handle_result = hr } end
  for i = 1, N do ts[i]:await() end
end

function W.sleep_fn()                   -- as bench/peers.lua's: a function without arguments
  local ts = {}
  local function sleeper() tide.sleep(1) end
  for i = 1, N do ts[i] = tide.spawn(sleeper) end
  for i = 1, N do ts[i]:await() end
end

function W.await_child()                -- each task awaits a child not yet run: both wait-side fields set
  local ts = {}
  local function parent() return tide.spawn(noop):await() end
  for i = 1, N do ts[i] = tide.spawn(parent) end
  for i = 1, N do ts[i]:await() end
end

function W.after_stop()                 -- created and stopped, never fired: subtract it from after
  local tms = {}
  local function cb() end
  for i = 1, N do tms[i] = tide.after(1000 + i % 100, cb) end
  for i = 1, N do tms[i]:stop() end
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

local records, records_bytes                -- the codec workloads' table, and its encoding
function W.codec()
  local core = require "tide.core"
  for _ = 1, N do core.decode(core.encode_unordered(records)) end
end
function W.codec_local()                    -- as threads hand values over (codec.h)
  local core = require "tide.core"
  for _ = 1, N do core.decode_local(core.encode_local(records)) end
end
function W.codec_encode()
  local encode_unordered = require("tide.core").encode_unordered
  for _ = 1, N do encode_unordered(records) end
end
function W.codec_decode()
  local decode = require("tide.core").decode
  for _ = 1, N do decode(records_bytes) end
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

local each_flow
function W.flow_each()
  assert(each_flow:run() == "ok")
end

local dflow_dir
function W.dflow()
  local q = tide.queue.open("sqlite:" .. dflow_dir .. "/jobs.db")
  local w = tide.worker{ queue = q, concurrency = 100, poll = 1000 }
  local id = q:enqueue_flow("cg_dflow", {})
  local function status()
    return q:transaction(function(tx)
      return tx:query("SELECT status FROM tide_flow_runs WHERE id = ?", id)[1].status
    end)
  end
  while status() == "running" do tide.sleep(20) end
  w:stop()
  w:wait()
  assert(status() == "ok")
  q:close()
end

if workload:match("^codec") then
  package.path = "bench/lib/?.lua;" .. package.path
  records = require("common").records()
  records_bytes = require("tide.core").encode_unordered(records)
elseif workload == "thread" then
  tide.configure{ threads = 2 }
  tide.run(function() tide.spawn{ mode = "thread", run = noop }:await() end)   -- start the pool
elseif workload == "dflow" then
  dflow_dir = os.tmpname()
  os.remove(dflow_dir)
  assert(os.execute("mkdir -p " .. dflow_dir) == 0)
  package.path = dflow_dir .. "/?.lua;" .. package.path
  local f = assert(io.open(dflow_dir .. "/cg_dflow.lua", "w"))
  f:write(([[
local W, L = 100, %d
local tasks = {}
local function noop() return true end
for l = 1, L do
  for i = 1, W do
    local deps
    if l > 1 then deps = { ("s%%d_%%d"):format(l - 1, i), ("s%%d_%%d"):format(l - 1, i %% W + 1) } end
    tasks[("s%%d_%%d"):format(l, i)] = { after = deps, run = noop }
  end
end
return { name = "cg_dflow", tasks = tasks }
]]):format(math.ceil(N / 100)))
  f:close()
elseif workload == "flow_run" then
  flow = tide.flow{ name = "layered", tasks = layered_tasks() }
elseif workload == "flow_each" then
  local items = {}
  for i = 1, N do items[i] = i end
  each_flow = tide.flow{ name = "children", tasks = {
    t = { items = function() return items end, each = noop, concurrency = 1000 } } }
end
assert(W[workload], "bench/cg/workload.lua: unknown workload " .. tostring(workload))
local status, err = tide.run(W[workload])
if dflow_dir then os.execute("rm -rf " .. dflow_dir) end
assert(status == "ok", tostring(err))
