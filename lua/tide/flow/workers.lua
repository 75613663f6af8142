--- tide.flow.workers — the simple nodes of an in-memory flow, run by the run's own worker tasks.
--
-- A task per node costs the engine about 4,000 instructions (callgrind: a
-- trivial task spawned and finished), more than everything else a node
-- costs.  So a simple node (tide.flow.run's is_simple: a `run` function, no timeout,
-- retry, mode or nested flow) is queued for a worker: a task of the run's
-- own that takes queued nodes one after the other and calls each
-- protected, on its own coroutine.  A flow of trivial nodes runs in one or
-- two workers.  What a node's own task gave, a worker keeps:
--   - A node that waits holds only its worker.  Before a worker calls a node
--     while others are queued, it makes sure another worker will run (the
--     relay: an idle one, or a new one), so a node that waits never holds
--     back the ones queued behind it.
--   - A stop cancels the worker that holds a running node (holder[i]); the
--     worker's on_finish gives that node its outcome, as a task's would.  A
--     worker cancelled by anything else (a shutdown, a node cancelling
--     tide.current()) cancels its node, which stops the run.
--   - run.looping is the worker whose loop runs now (outside a node's code),
--     or false: a node queued meanwhile is taken by that loop; queued at
--     any other time, it wakes a worker.
--   - A worker that ran POLL_EVERY nodes without waiting sleeps 0 ms, so
--     the loop polls I/O and fires timers during a long flow; meanwhile
--     (run.polling) no other worker takes queued nodes, or the relays it
--     started would run them all within the same tick.
--   - Inside a simple node, tide.current() is its worker; a worker whose
--     handle went out that way (o.seen) retires after that node, so the
--     handle, kept, finds a finished task, as a node's own task would be,
--     and never the nodes run after it.
--
-- A run's fields that are the workers' own (made with the run, in one
-- table): queue, q_head, q_tail, looping, relay, polling, idle, nidle.
local S = require "tide.engine.sched"
local VALUE = require("tide.engine.fields").VALUE   -- (t.value: a user may write that name onto a task)

local M = {}

-- What the workers need from the run (tide.flow.run gives them: M.attach):
-- ctx_for(run, node), node_ran(run, i, ctx, status, value, attempts),
-- node_finished(run, i, status, value, err), stop_run(run, status, why),
-- engine_failed(run, who, err), task_name(flow, node).
local ctx_for, node_ran, node_finished, stop_run, engine_failed, task_name

function M.attach(ops)
  ctx_for, node_ran, node_finished, stop_run, engine_failed, task_name =
    ops.ctx_for, ops.node_ran, ops.node_finished, ops.stop_run, ops.engine_failed, ops.task_name
end

local POLL_EVERY = 1000

--- What a worker runs now, for the watchdog's "running now": the name of
--- the node in its hands ("flow/node", as its own task would be named), or
--- nil between nodes.  Asked only when a stall is reported: no cost per node.
--- A worker that ended inside a node's code (cancelled from a nested
--- coroutine, it runs on until its next wait) no longer holds its run: its
--- end left the node's name (o.flow_node).
local function worker_doing(t)
  local o = S.options(t)
  local i, run = o.flow_index, o.flow_run
  if i and run then return task_name(run.flow, run.flow.list[i]) end
  if i then return o.flow_node end
end

local function worker_ended(t)
  local o = S.options(t)
  local run, i = o.flow_run, o.flow_index
  if run.looping == t then run.looping = false end
  if run.relay == t then run.relay = false end
  if run.polling == t then run.polling = false end
  if i and run.holder[i] == t then           -- it ended inside node i's code
    local status = S.state(t)
    node_finished(run, i, status == "cancelled" and "cancelled" or "error", nil, t[VALUE])
  elseif S.state(t) == "error" then
    engine_failed(run, "worker", t[VALUE])
  elseif not run.stopping and not run.done and S.state(t) ~= "ok" then
    stop_run(run, "cancelled", ("flow '%s' stopped: its worker was %s"):format(run.flow.name, S.state(t)))
  end
  if i then o.flow_node = task_name(run.flow, run.flow.list[i]) end   -- for worker_doing
  o.flow_run = false                         -- a finished task keeps no run alive
end

local worker

--- Makes sure a worker will take the queued nodes: wakes an idle one, or starts one.
local function relay(run)
  if run.relay or run.stopping then return end
  local n = run.nidle
  if n > 0 then
    local t, tok = run.idle[2 * n - 1], run.idle[2 * n]
    run.idle[2 * n - 1], run.idle[2 * n], run.nidle = nil, nil, n - 1
    run.relay = t
    S.wake(t, tok)
    return
  end
  local t = S.new_task(worker, { args = { n = 1, run }, on_finish = worker_ended, heard = true,
                                 name = "flow " .. run.flow.name .. " worker", flow_run = run, flow_index = false,
                                 describe = worker_doing, seen = false })
  run.relay = t
  S.start(t)
end

--- Queues simple node i (already "running") for a worker.
function M.queue(run, i)
  local tail = run.q_tail + 1
  run.queue[tail], run.q_tail = i, tail
  if not run.looping then relay(run) end
end

--- Calls node i's code in worker `me` (options `o`), and records how it ended.
local function run_simple(run, i, me, o)
  local node = run.flow.list[i]
  local ctx = ctx_for(run, node)
  run.holder[i], o.flow_index, run.looping = me, i, false
  run.attempts[i] = 1                            -- (a stop while it runs reports the attempt too)
  local ok, value = pcall(node.run, ctx)
  if run.holder[i] ~= me then return false end   -- ended while it ran (cancelled): so did this worker
  run.holder[i], run.looping = false, me
  node_ran(run, i, ctx, ok and "ok" or "error", value, 1)
  o.flow_index = false
  return true
end

--- A worker's task: runs queued nodes until none is left, then idles until
--- relay() wakes it or the run ends.
function worker(run)
  local me = S.current()
  local o = S.options(me)
  local q, st = run.queue, run.status
  local since_poll = 0
  while not run.done do
    if run.relay == me then run.relay = false end
    run.looping = me
    while run.q_head <= run.q_tail and not run.stopping and not run.polling do
      local head = run.q_head
      local i = q[head]
      q[head], run.q_head = nil, head + 1
      if st[i] == "running" then
        if run.q_head <= run.q_tail then relay(run) end     -- if this one waits, another takes the rest
        if not run_simple(run, i, me, o) then return end
        if o.seen then                                     -- its handle went out inside that node: retire
          run.looping = false
          if run.q_head <= run.q_tail then relay(run) end
          return
        end
        since_poll = since_poll + 1
        if since_poll >= POLL_EVERY then
          since_poll = 0
          run.looping, run.polling = false, me
          S.sleep(0)
          run.looping, run.polling = me, false
        end
      end
    end
    run.looping = false
    if run.done or run.stopping then break end
    local _, tok = S.wait_begin("flow worker", 1)          -- idle until relay() or the run's end
    local n = run.nidle + 1
    run.idle[2 * n - 1], run.idle[2 * n], run.nidle = me, tok, n
    S.wait_end(me, tok)
  end
end

--- Wakes the idle workers of a run that ended, so that they end too.
function M.dismiss(run)
  local idle = run.idle
  for k = 1, 2 * run.nidle, 2 do S.wake(idle[k], idle[k + 1]) end
  run.nidle = 0
end

--- Gives the nodes queued and not called yet their outcome (cancelled) when the run stops.
function M.drop_queued(run)
  local q, st, holder = run.queue, run.status, run.holder
  for k = run.q_head, run.q_tail do
    local i = q[k]
    q[k] = nil
    if st[i] == "running" and not holder[i] then node_finished(run, i, "cancelled", nil, "flow stopped") end
  end
  run.q_head, run.q_tail = 1, 0
end

return M
