--- tide.flow.run — flows run in memory (tide.flow): fan-out children, fan-in, conditions, limits, retries, hooks.
--
-- A flow is defined once (validated by tide.flow.define: unknown fields,
-- unknown dependencies and cycles are errors) and run any number of times.  A run is
-- driven by the outcomes of its tasks: each node's outcome (its on_finish) decides what
-- starts next, so scheduling costs no extra resume per node; the run's own
-- task only waits for the end.
--
-- Node statuses: "ok", "error", "timeout", "skipped", "cancelled".  A node
-- runs when every dependency is "ok"; when one of them did not end "ok", the
-- node is "skipped".  fail = "stop": the first failure cancels the rest of
-- the run; fail = "continue": only what depends on the failure is skipped.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local define = require("tide.flow.define").define
local task = require "tide.engine.task"

local type, pairs, ipairs, error, tostring, setmetatable, getmetatable, pcall =
  type, pairs, ipairs, error, tostring, setmetatable, getmetatable, pcall
local sort, concat = table.sort, table.concat
local table_new = require "table.new"
local opt_error = check.opt_error

local M = {}
local Flow = {}
local Flow_mt = { __index = Flow, __tostring = function(f) return ("tide.Flow '%s'"):format(f.name) end }
M.Flow_mt = Flow_mt

local before_run, on_define = {}, {}

--- fn(flow) runs for every flow defined from now on (protected).
function M.on_define(fn) on_define[#on_define + 1] = fn end

--- fn(flow) runs before every run of a flow (protected); when it returns a
--- value, the run does not start and that value is raised instead.  (`tide
--- graph` uses both to collect flows without running them.)
function M.before_run(fn) before_run[#before_run + 1] = fn end

local function is_flow(v) return getmetatable(v) == Flow_mt end

--- tide.flow{ name =, concurrency =, fail = "stop" | "continue", timeout =, tasks = {...}, on = {...} }
function M.new(opts)
  local f = setmetatable(define("tide.flow", opts, is_flow), Flow_mt)
  for i = 1, #on_define do log.protect("flow on_define hook", on_define[i], f) end
  return f
end

-- ===== running

local active = {}           -- runs in progress

--- Calls hook `name` with the event table `ev` (callers build ev only when
--- run.flow.on[name] is set, so a flow without hooks allocates nothing).
--- A hook runs wherever its event happened, often inside another task's
--- end (a node's outcome, a cancel), so it may not wait: a wait raises
--- "cannot wait inside flow hook NAME", reported like any error in a hook.
local HOOK_NAMES = setmetatable({}, { __index = function(names, name)
  local s = "flow hook " .. name
  names[name] = s
  return s
end })

local function hook(run, name, ev)
  local fn = run.flow.on[name]
  if not fn then return end
  ev.flow = run.flow.name
  local ok, err = S.protected(HOOK_NAMES[name], fn, ev)
  if not ok then log.report(("flow '%s' hook %s"):format(run.flow.name, name), err, err) end
end

local function ctx_for(run, node)
  return { input = run.input, results = run.results, flow = run.flow.name, task = node.name }
end

--- What crosses to a thread-mode task: the input and the results of its own
--- dependencies only (not the whole run's: every byte is copied, and one
--- earlier result that cannot cross would fail every thread task after it).
local function thread_ctx(run, node)
  local results = {}
  for _, dep in ipairs(node.after) do results[dep] = run.results[dep] end
  return { input = run.input, results = results, flow = run.flow.name, task = node.name }
end

--- What crosses to a thread-mode child: its item travels beside this, so
--- only the input and the names.
local function thread_child_ctx(run, node)
  return { input = run.input, flow = run.flow.name, task = node.name }
end

--- Spawns a task for the flow without the public checks (the flow checked
--- its spec when it was defined): fn(args...) with `opt` (args, timeout,
--- retry policy, on_finish, ...).  Thread mode and nested flows take
--- the spawn of task specs, which prepares what crosses to a thread.
local function spawn(node, name, fn, opt)
  if node.mode == "thread" or node.mode == "process" then
    local t = task.spawn{ run = fn, args = opt.args, mode = node.mode, timeout = opt.timeout, retry = node.retry,
                          name = name, handle_result = opt.handle_result, on_retry = opt.on_retry }
    local o = S.options(t)
    for k, v in pairs(opt) do
      if k == "on_finish" then S.on_finish(t, v)
      elseif o[k] == nil then o[k] = v end                             -- flow_run, fan_index, ...
    end
    return t
  end
  opt.name = name
  local t = S.new_task(fn, opt)
  S.start(t)
  return t
end

local start_ready, node_finished -- forward

--- Queues a node whose dependencies are all done (a FIFO: head and tail).
local function push_ready(run, node)
  run.ready_tail = run.ready_tail + 1
  run.ready[run.ready_tail] = node
end

-- For metrics: finished runs by status, and their steps by status.
M.counts = { runs = {}, steps = {} }

--- The end of the run: every node has a status.
local function finish_run(run, status)
  if run.done then return end
  run.done = true
  local runs, steps = M.counts.runs, M.counts.steps
  runs[status] = (runs[status] or 0) + 1
  for _, r in pairs(run.report.tasks) do steps[r.status] = (steps[r.status] or 0) + 1 end
  run.report.status = status
  run.report.duration = S.now() - run.t0
  if run.timer then S.untimer(run.timer); run.timer = nil end
  active[run] = nil
  hook(run, "flow_done", { status = status, report = run.report })
  run.flow.last_report = run.report
  S.notify(run)
end

local function count_open(run)
  return run.open == 0
end

-- Cancels go through one worklist instead of recursing: cancelling a node
-- that runs a nested flow stops that flow's run inside the cancel, which
-- cancels the next level inside that, and so on; a flow nested 2,000 deep
-- would overflow the stack.  The first caller drains the list; a cancel
-- asked for meanwhile is appended and done by the same loop.
local cancels, ncancels, draining = {}, 0, false

local function drain_cancels()
  local i, me, mine = 1, S.current(), nil
  while i <= ncancels do
    local t, why = cancels[i], cancels[i + 1]
    cancels[i], cancels[i + 1] = nil, nil
    i = i + 2
    if t == me then mine = why                 -- cancelling itself stops the caller: last
    elseif not S.TERMINAL[S.state(t)] then t:cancel(why) end
  end
  return mine
end

local function cancel_soon(t, why)
  cancels[ncancels + 1], cancels[ncancels + 2] = t, why
  ncancels = ncancels + 2
  if draining then return end
  draining = true
  local ok, mine = pcall(drain_cancels)
  cancels, ncancels, draining = {}, 0, false
  if not ok then error(mine, 0) end
  local me = S.current()
  if mine ~= nil and not S.TERMINAL[S.state(me)] then me:cancel(mine) end
end

--- Cancels everything still running or waiting, with `status` for the run.
local function stop_run(run, status, why)
  if run.stopping then return end
  run.stopping, run.stop_status = true, status
  for _, name in ipairs(run.flow.order) do
    local r = run.report.tasks[name]
    if r.status == "pending" then
      r.status = "cancelled"
      run.open = run.open - 1
    end
  end
  for _, name in ipairs(run.flow.order) do
    local st = run.state[name]
    if st and st.task and not S.TERMINAL[S.state(st.task)] then cancel_soon(st.task, why) end
    if st and st.children then
      for _, c in pairs(st.children) do
        if not S.TERMINAL[S.state(c)] then cancel_soon(c, why) end
      end
    end
  end
  if count_open(run) then finish_run(run, status) end
end

--- Skips a node and, iteratively (graphs can be deep), what depends on it.
local function skip(run, node, why)
  local stack = { node, why }
  while #stack > 0 do
    local reason, n = stack[#stack], stack[#stack - 1]
    stack[#stack], stack[#stack - 1] = nil, nil
    local r = run.report.tasks[n.name]
    if r.status == "pending" then
      r.status, r.reason = "skipped", reason
      run.open = run.open - 1
      if run.flow.on.task_skipped then hook(run, "task_skipped", { task = n.name, reason = reason }) end
      local because = "dependency '" .. n.name .. "' skipped"
      for _, d in ipairs(n.dependents) do stack[#stack + 1] = d; stack[#stack + 1] = because end
    end
  end
end

--- Records a node's end and starts what it unblocks.
function node_finished(run, node, status, value, err)
  local r = run.report.tasks[node.name]
  if r.status ~= "running" then return end
  r.status = status
  r.duration = S.now() - (r.started or run.t0)
  run.running = run.running - 1
  run.open = run.open - 1
  if status == "ok" then
    r.value = value
    run.results[node.name] = value
    if run.flow.on.task_done then hook(run, "task_done", { task = node.name, value = value }) end
  else
    r.error = err
    if status ~= "cancelled" then run.failed = run.failed + 1 end
    if status == "timeout" then hook(run, "task_timeout", { task = node.name, error = err })
    elseif status == "error" then hook(run, "task_error", { task = node.name, error = err }) end
  end
  if run.stopping then
    if count_open(run) then finish_run(run, run.stop_status) end
    return
  end
  if status == "cancelled" then             -- not by us (a shutdown, the task itself): the run goes too
    return stop_run(run, "cancelled", ("flow '%s' stopped: task '%s' was cancelled"):format(run.flow.name, node.name))
  end
  if status ~= "ok" and run.flow.fail == "stop" then
    return stop_run(run, "error", ("flow '%s' stopped: task '%s' %s"):format(run.flow.name, node.name, status))
  end
  for _, d in ipairs(node.dependents) do
    if status ~= "ok" then
      skip(run, d, "dependency '" .. node.name .. "' " .. status)
    else
      local left = run.waiting_deps[d.name] - 1
      run.waiting_deps[d.name] = left
      if left == 0 then push_ready(run, d) end
    end
  end
  start_ready(run)
  if count_open(run) then finish_run(run, run.failed > 0 and "error" or "ok") end
end

local function outcome_status(status)
  if status == "ok" or status == "timeout" or status == "cancelled" then return status end
  return "error"
end

-- ===== children (fan-out)

-- Children and nodes report through an on_finish hook given when their
-- task is created (one function for all: what it needs rides in the task's
-- options, so no closure is made per task).
local function child_finished(t)
  local o = S.options(t)
  o.fan_done(o.fan_index, S.state(t), t.value)
end

--- Runs node's children over `items`, at most `concurrency` at once; the
--- node's value is their values in item order.
local function fan_out(run, node, items)
  local st = run.state[node.name]
  local r = run.report.tasks[node.name]
  local n = #items
  local counts = { total = n, ok = 0, error = 0, timeout = 0, cancelled = 0, running = 0 }
  r.children = counts
  run.children_total = run.children_total + n
  local values, next_i, failed_err = {}, 1, nil
  st.children = {}
  local each = node.each
  local remote = node.mode == "thread" or node.mode == "process"
  local ctx = remote and thread_child_ctx(run, node) or ctx_for(run, node)   -- shared by the children
  local function settle_node()
    if counts.running > 0 or (next_i <= n and not run.stopping) then return end
    if run.stopping then return node_finished(run, node, "cancelled", nil, "flow stopped") end
    if failed_err and node.exit_on_error then return node_finished(run, node, "error", nil, failed_err) end
    node_finished(run, node, "ok", values)
  end
  local launch
  local function child_done(i, status, value)
    st.children[i] = nil
    counts.running = counts.running - 1
    run.children_done = run.children_done + 1
    local s = outcome_status(status)
    counts[s] = counts[s] + 1
    if s == "ok" then values[i] = value end
    if run.flow.on.child_done then hook(run, "child_done", { task = node.name, index = i, status = s, value = value }) end
    if s ~= "ok" and not failed_err and s ~= "cancelled" then
      failed_err = ("child %d ended in %s: %s"):format(i, s, tostring(value))
      if node.exit_on_error then
        next_i = n + 1                      -- start no more; stop the running ones
        for _, c in pairs(st.children) do c:cancel("a sibling failed") end
      end
    end
    if r.status == "running" then launch() end
    settle_node()
  end
  function launch()
    while next_i <= n and counts.running < node.concurrency and not run.stopping do
      local i = next_i
      next_i = i + 1
      counts.running = counts.running + 1
      local item = items[i]
      local fn, args = each, { n = 2, item, ctx }
      if is_flow(each) then fn, args = M.run_as_task, { n = 2, each, item } end
      local opt = { args = args, timeout = node.timeout, retry = node.policy,
                    on_finish = child_finished, heard = true, fan_done = child_done, fan_index = i }
      if not remote then
        st.children[i] = spawn(node, node.task_name, fn, opt)
      else
        local ok, t = pcall(spawn, node, node.task_name, fn, opt)   -- what cannot cross fails the child
        if ok then st.children[i] = t else child_done(i, "error", t) end
      end
    end
  end
  launch()
  settle_node()
end

-- ===== nodes

--- A node's run ended: fan out (each), or record the node's end.
local function node_ran(run, node, ctx, status, value, task)
  local r = run.report.tasks[node.name]
  r.attempts = task and task.attempts or r.attempts
  local s = outcome_status(status)
  if s ~= "ok" then return node_finished(run, node, s, nil, value) end
  if run.flow.on.task_run_done then
    hook(run, "task_run_done", { task = node.name, value = value })
    if run.stopping then return node_finished(run, node, "cancelled", nil, "flow stopped") end
  end
  if node.each then
    local items = value
    if node.items then
      local remote = node.mode == "thread" or node.mode == "process"
      local ok, its = pcall(node.items, remote and ctx_for(run, node) or ctx)
      if not ok then return node_finished(run, node, "error", nil, its) end
      items = its
    end
    if type(items) ~= "table" then
      return node_finished(run, node, "error", nil,
        ("task '%s': items must be a list, got %s"):format(node.name, check.describe(items)))
    end
    return fan_out(run, node, items)
  end
  node_finished(run, node, "ok", value)
end

local function node_result(task)
  local o = S.options(task)
  node_ran(o.flow_run, o.flow_node, o.args[1], S.state(task), task.value, task)
end

-- Not inside start_node: a closure there would make every return from it
-- close upvalues, which LuaJIT 2.1 cannot compile.
local function retry_hook(run, node)
  return function(ev)
    hook(run, "task_retry", { task = node.name, attempt = ev.attempt, status = ev.status, error = ev.error })
  end
end

--- True when the node may still start: a hook or a condition may have
--- stopped the run (or the node) while it ran.
local function still_pending(run, r)
  return not run.stopping and r.status == "pending"
end

local function start_node(run, node)
  local r = run.report.tasks[node.name]
  local ctx = ctx_for(run, node)
  if node.when then
    local ok, go = pcall(node.when, ctx)
    if not still_pending(run, r) then return end
    if not ok then
      log.report(("flow '%s' task '%s' when"):format(run.flow.name, node.name), go)
      r.status, r.started, run.running = "running", S.now(), run.running + 1
      return node_finished(run, node, "error", nil, go)
    end
    if not go then return skip(run, node, "condition false") end
  end
  local st = {}
  run.state[node.name] = st
  r.status, r.started = "running", S.now()
  run.running = run.running + 1
  if run.flow.on.task_start then
    r.status = "pending"                     -- so that a stop from the hook sees it as not started
    hook(run, "task_start", { task = node.name })
    if not still_pending(run, r) then run.running = run.running - 1; return end
    r.status = "running"
  end
  if node.run == nil and node.flow == nil then return node_ran(run, node, ctx, "ok", nil, nil) end  -- each with items()
  local on_retry = run.flow.on.task_retry and retry_hook(run, node) or nil
  local remote = node.mode == "thread" or node.mode == "process"
  if remote then ctx = thread_ctx(run, node) end
  local opt = { args = { n = 1, ctx }, timeout = node.timeout, retry = node.policy, on_retry = on_retry,
                on_finish = node_result, heard = true, flow_run = run, flow_node = node }
  if node.flow then
    opt.args, opt.name = { n = 2, node.flow, run.input }, node.task_name
    local t = S.new_task(M.run_as_task, opt)
    S.start(t)
    st.task = t
    return
  end
  if not remote then st.task = spawn(node, node.task_name, node.run, opt); return end
  local ok, t = pcall(spawn, node, node.task_name, node.run, opt)   -- what cannot cross fails the node
  if not ok then return node_finished(run, node, "error", nil, t) end
  st.task = t
end

--- Starts ready nodes within the flow's limit.  Not re-entered: a node that
--- ends at once (skipped, empty items) queues its dependents for this loop
--- instead of recursing, so deep graphs cannot overflow the stack.
function start_ready(run)
  if run.starting then return end
  run.starting = true
  local ready = run.ready
  while run.ready_head <= run.ready_tail and run.running < run.flow.concurrency and not run.stopping do
    local node = ready[run.ready_head]
    ready[run.ready_head], run.ready_head = nil, run.ready_head + 1
    start_node(run, node)
  end
  run.starting = false
end

local function new_run(f, input)
  local n = #f.order
  -- Tables keyed by task name are sized for every task up front: grown one
  -- key at a time, 100,000 names cost more in rehashing than in running.
  local report = { flow = f.name, status = "running", tasks = table_new(0, n) }
  local run = { flow = f, input = input, results = table_new(0, n), report = report, state = table_new(0, n),
                waiting_deps = table_new(0, n), ready = table_new(n, 0), ready_head = 1, ready_tail = 0,
                running = 0, open = n, failed = 0,
                children_total = 0, children_done = 0, t0 = S.now(), done = false }
  for _, name in ipairs(f.order) do
    local node = f.nodes[name]
    report.tasks[name] = { status = "pending", attempts = 0, started = false, duration = false }
    run.waiting_deps[name] = #node.after
    if #node.after == 0 then push_ready(run, node) end
  end
  return run
end

--- The task of a run: starts the roots, then waits for the end.
local function drive(f, input, handle)
  local run = handle.run or new_run(f, input)
  handle.run = run
  -- However the attempt driving the run ends (cancelled, timed out and
  -- retried, its caller gone), the run stops with it: nested flows and
  -- children too.
  local me = S.current()
  local function stop_with_attempt(t)
    if not run.done then
      stop_run(run, S.state(t) == "cancelled" and "cancelled" or "error", "flow cancelled")
    end
  end
  S.on_attempt_end(me, stop_with_attempt)
  active[run] = true
  hook(run, "flow_start", { input = input })
  if f.timeout then
    run.timer = S.timer(f.timeout, function()
      run.timer = nil
      stop_run(run, "timeout", ("flow '%s' timed out after %g ms"):format(f.name, f.timeout))
    end)
  end
  start_ready(run)
  if run.open == 0 then finish_run(run, "ok") end
  while not run.done do S.wait_for(run, "flow:run") end
  S.off_attempt_end(me, stop_with_attempt)
  return run.report.status, run.report
end

local function check_self(fname, f)
  if not is_flow(f) then error(("%s: bad self (flow expected, got %s)"):format(fname, check.describe(f)), 3) end
end

--- Runs the before_run hooks; raises what one of them returns.
local function may_run(f)
  for i = 1, #before_run do
    local ok, stop = pcall(before_run[i], f)
    if not ok then log.report("flow before_run hook", stop)
    elseif stop ~= nil then error(stop, 0) end
  end
end

--- Starts a run; returns a handle with :await() -> status, report and :cancel(reason).
function Flow.start(f, input)
  check_self("flow:start", f)
  may_run(f)
  local handle = setmetatable({ flow = f, run = new_run(f, input) }, M.Handle_mt)
  handle.task = task.spawn{ run = drive, args = { n = 3, f, input, handle }, name = "flow " .. f.name }
  return handle
end

--- Runs the flow in the calling task and waits: status ("ok", "error",
--- "cancelled", "timeout"), report.  Cancelling the caller cancels the run.
function Flow.run(f, input)
  check_self("flow:run", f)
  may_run(f)
  if S.current() == nil then error("flow:run: called outside a task (use flow:start, or run it inside tide.run)", 2) end
  local status, report = drive(f, input, {})
  return status, report
end

--- A nested flow as a task: ok with its report's results, or an error.
function M.run_as_task(f, input)
  local status, report = f:run(input)
  if status ~= "ok" then error(("nested flow '%s' %s"):format(f.name, status), 0) end
  local values = {}
  for name, r in pairs(report.tasks) do values[name] = r.value end
  return values
end

local Handle = {}
M.Handle_mt = { __index = Handle }

local function check_handle(fname, h)
  if getmetatable(h) ~= M.Handle_mt then
    error(("%s: bad self (flow run expected, got %s); call it as %s(...)"):format(fname, check.describe(h), fname), 3)
  end
end

function Handle.await(h, ms)
  check_handle("run:await", h)
  if ms ~= nil and not check.is_ms(ms) then check.arg_error("run:await", 1, "non-negative number of ms", ms) end
  local s, a, b = h.task:await(ms)
  if s == nil then return nil, a end           -- await's own timeout
  if s == "ok" then return a, b end
  local run = h.run                            -- cancelled before it started: every node too
  if not run.done then
    run.stopping, run.stop_status = true, s
    for _, r in pairs(run.report.tasks) do if r.status == "pending" then r.status = "cancelled" end end
    run.open = 0
    finish_run(run, s)
  end
  return s, run.report
end

function Handle.cancel(h, reason)
  check_handle("run:cancel", h)
  return h.task:cancel(reason or "flow cancelled")
end

-- ===== runs in progress (for a progress line, metrics)

--- The runs in progress, each as { flow =, tasks_done =, tasks =,
--- children_done =, children =, running =, failed = }, by flow name.
function M.runs()
  local list = {}
  for run in pairs(active) do
    list[#list + 1] = { flow = run.flow.name, tasks_done = #run.flow.order - run.open,
                        tasks = #run.flow.order, children_done = run.children_done,
                        children = run.children_total, running = run.running, failed = run.failed }
  end
  sort(list, function(a, b) return a.flow < b.flow end)
  return list
end

-- ===== pictures (drawn by tide.flow.graph)

--- The graph as DOT or Mermaid text; with a report (or after a run), nodes
--- are coloured by status.
function Flow.graph(f, format, report)
  check_self("flow:graph", f)
  format = format or "dot"
  if format ~= "dot" and format ~= "mermaid" then
    check.arg_error("flow:graph", 1, "'dot' or 'mermaid'", format)
  end
  local text = require("tide.flow.graph").draw(f, format, report or f.last_report)
  return text
end

return M
