--- tide.flow.run — flows run in memory (tide.flow): fan-out children, fan-in, conditions, limits, retries, hooks.
--
-- A flow is defined once (validated by tide.flow.define: unknown fields,
-- unknown dependencies and cycles are errors) and run any number of times.
-- A run is driven by the outcomes of its nodes: each node's end decides what
-- starts next, so scheduling costs no extra resume per node; the run's own
-- task only waits for the end.
--
-- Node statuses: "pending", "running", then one of "ok", "error",
-- "timeout", "skipped", "cancelled".  A node runs when every dependency is
-- "ok"; when one of them did not end "ok", the node is "skipped".  fail =
-- "stop": the first failure cancels the rest of the run; fail = "continue":
-- only what depends on the failure is skipped.
--
-- A run keeps its state in arrays by node index (the definition numbers
-- the nodes): status, dependencies left, start, attempts, the task that
-- holds a running node.  A node's report entry (report.tasks[name]) is
-- made when it gets its outcome; those of nodes that never ran, when the
-- run ends.  Invariants:
--   - A node leaves "running" only through node_finished, once: that is its
--     one outcome, whatever ends it (its code, its task, a stop, a cancel).
--   - run.open counts the nodes without an outcome; the run ends when it
--     reaches 0, through finish_run, once.
--   - holder[i] is the task running node i's code (its own task, or the
--     worker that called it), or false; a stop cancels it, and its end
--     gives node i its outcome if nothing did before.
local S = require "tide.engine.sched"
local fields = require "tide.engine.fields"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local definition = require "tide.flow.define"
local task = require "tide.engine.task"
local workers = require "tide.flow.workers"
local crew = require "tide.flow.crew"

local type, pairs, ipairs, error, tostring, setmetatable, getmetatable, pcall =
  type, pairs, ipairs, error, tostring, setmetatable, getmetatable, pcall
local sort = table.sort
local table_new = require "table.new"
local now, TERMINAL = S.now, S.TERMINAL
local define, define_order = definition.define, definition.order

local M = {}
local Flow = {}
local Flow_mt = { __tostring = function(f) return ("tide.Flow '%s'"):format(f.name) end,
                  __index = function(f, k)
                    local v = Flow[k]
                    if v == nil and k == "order" then return define_order(f) end   -- made when first read
                    return v
                  end }
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

--- What a task's `when` or `items` is called, for the error a wait there
--- raises.  They run wherever the node became ready, often inside another
--- task's end: a wait there would hold back the whole run's starts, could
--- not be stopped with the run, and raised or not depending on how the
--- dependency ran (its own task or a worker).  So they never wait.
local function condition_name(node, key)
  return ("the '%s' of flow task '%s'"):format(key, node.name)
end

--- tostring that cannot raise: an error object's __tostring is user code,
--- and a raise half-way through a child's end would lose the node's outcome.
local function safe_tostring(v)
  local ok, text = pcall(tostring, v)
  return ok and text or "(an error object whose __tostring failed)"
end

--- A node's ctx.  Made from a table of constants, then filled: LuaJIT
--- compiles `{ k = v }` with variable values as a copy of a template whose
--- slots are empty, then one lj_tab_newkey call per key, which rehashed
--- the new table (callgrind: 5 rehashes per node between this and the
--- report entry, about 2,400 instructions of a node's 7,800).  Slots that
--- hold a constant are stored into directly.  A nil stored this way
--- leaves no visible key: next() skips it.
local function ctx_for(run, node)
  local ctx = { input = false, results = false, flow = false, task = false }
  ctx.input, ctx.results, ctx.flow, ctx.task = run.input, run.results, run.flow.name, node.name
  return ctx
end

--- What crosses to a thread-mode task: the input and the results of its own
--- dependencies only (not the whole run's: every byte is copied, and one
--- earlier result that cannot cross would fail every thread task after it).
local function thread_ctx(run, node)
  local results = {}
  for _, dep in ipairs(definition.dependencies(run.flow, node)) do results[dep] = run.results[dep] end
  return { input = run.input, results = results, flow = run.flow.name, task = node.name }
end

--- What crosses to a thread-mode child: its item travels beside this, so
--- only the input and the names.
local function thread_child_ctx(run, node)
  return { input = run.input, flow = run.flow.name, task = node.name }
end

--- The name of a node's tasks ("flow/task"): made when first needed, and kept.
local function task_name(f, node)
  local name = node.task_name
  if not name then
    name = f.name .. "/" .. node.name
    node.task_name = name
  end
  return name
end

--- Spawns a task for the flow without the public checks (the flow checked
--- its spec when it was defined): fn(args...) with `opt` (args, timeout,
--- retry policy, on_finish, ...).  Thread mode and nested flows take
--- the spawn of task specs, which prepares what crosses to a thread.
local function spawn(node, name, fn, opt)
  if node.mode == "thread" or node.mode == "process" then
    -- Made pending, given the flow's options and hooks, then started: a
    -- task started at once (task.spawn) during a shutdown ends at once,
    -- before it had its on_finish, and its node (and run) never would.
    local t = task.make_task("tide.spawn", "coroutine", { run = fn, args = opt.args, mode = node.mode,
      timeout = opt.timeout, retry = node.retry, name = name, handle_result = opt.handle_result,
      on_retry = opt.on_retry })
    local o = S.options(t)
    for k, v in pairs(opt) do
      if k == "on_finish" then S.on_finish(t, v)
      elseif o[k] == nil then o[k] = v end                             -- flow_run, fan_index, ...
    end
    S.start(t)
    return t
  end
  opt.name = name
  local t = S.new_task(fn, opt)
  S.start(t)
  return t
end

local start_ready, node_finished -- forward
local queue_simple, dismiss_workers, drop_queued = workers.queue, workers.dismiss, workers.drop_queued

-- For metrics: finished runs by status, and their steps by status.
M.counts = { runs = {}, steps = {} }

--- Node i's report entry (status, attempts, started, duration, value, and
--- error, reason, children when it has them), kept by index and by name.
--- A node that ends through node_finished gets it there, while its node
--- and name are still in the cache: made in one pass at the run's end,
--- the entries of 10,000 nodes cost as much as the rest of the run did
--- (LuaJIT's profiler, 16% of the compiled code against 10% for
--- node_finished).  Only the fields a node has: storing nil under a new
--- key still makes the key in LuaJIT, by its slow path (an entry of 8
--- fields with 3 nil cost 3.6 times one of 5).
local function make_entry(run, i, name, status, duration, value, err)
  local r = { status = false, attempts = 0, started = false, duration = false, value = false }  -- see ctx_for
  r.status, r.attempts, r.started, r.duration, r.value = status, run.attempts[i] or 0, run.started[i] or false,
    duration, value
  if err ~= nil then r.error = err end
  local reason, children = run.reasons[i], run.children[i]
  if reason ~= nil then r.reason = reason end
  if children ~= nil then r.children = children end
  run.entry[i], run.tasks[name] = r, r
end

--- The entries of the nodes that did not end through node_finished
--- (skipped, cancelled before they started): made when the run ends.
local function last_entries(run)
  local list, entry, st = run.flow.list, run.entry, run.status
  for i = 1, #list do
    if not entry[i] then make_entry(run, i, list[i].name, st[i], false, nil, nil) end
  end
  return run.tasks
end

--- The end of the run: every node has its outcome.
local function finish_run(run, status)
  if run.done then return end
  run.done = true
  local runs, steps = M.counts.runs, M.counts.steps
  runs[status] = (runs[status] or 0) + 1
  local st = run.status
  for i = 1, #st do local s = st[i]; steps[s] = (steps[s] or 0) + 1 end
  local report = run.report
  report.tasks = last_entries(run)
  report.status = status
  report.duration = now() - run.t0
  if run.timer then S.untimer(run.timer); run.timer = nil end
  active[run] = nil
  dismiss_workers(run)
  hook(run, "flow_done", { status = status, report = report })
  run.flow.last_report = report
  S.notify(run)
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
    elseif not TERMINAL[S.state(t)] then t:cancel(why) end
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
  if mine ~= nil and not TERMINAL[S.state(me)] then me:cancel(mine) end
end

--- Cancels everything still running or waiting, with `status` for the run.
local function stop_run(run, status, why)
  if run.stopping then return end
  run.stopping, run.stop_status = true, status
  local st, holder, kids = run.status, run.holder, run.kids
  local n = #st
  for i = 1, n do
    if st[i] == "pending" then
      st[i] = "cancelled"
      run.open = run.open - 1
    end
  end
  drop_queued(run)                          -- queued for a worker, not called yet: nothing to stop but the node
  for i = 1, n do
    if st[i] == "running" then
      local t = holder[i]
      if t and not TERMINAL[S.state(t)] then cancel_soon(t, why) end
      local c = kids[i]
      if c then
        for _, ct in pairs(c) do
          if not TERMINAL[S.state(ct)] then cancel_soon(ct, why) end
        end
      end
    end
  end
  if run.open == 0 then finish_run(run, status) end
end

--- tide's own code failed in a task of the run (`who`: its worker, a crew
--- member), outside any task's code, which runs protected: the sink hears
--- of it, always (also when the run was stopping or had ended: the error
--- is a bug of tide's either way), the run ends in error unless it was
--- stopping already, and no node is left running with no task to end it
--- (one that was starting, say).
local function engine_failed(run, who, err)
  log.report(("flow '%s' %s"):format(run.flow.name, who), err)
  if run.done then return end
  local why = ("flow '%s' stopped: its %s failed"):format(run.flow.name, who)
  stop_run(run, "error", why)                -- (nothing when it is stopping: its outcome stands)
  local st, holder = run.status, run.holder
  for j = 1, #st do
    if st[j] == "running" and not holder[j] then node_finished(run, j, "error", nil, why) end
  end
end

--- Skips a node and, iteratively (graphs can be deep), what depends on it.
local function skip(run, i, why)
  local list, st = run.flow.list, run.status
  local dep_first, dep_idx = run.flow.dep_first, run.flow.dep_idx
  local stack = { i, why }
  while #stack > 0 do
    local reason, j = stack[#stack], stack[#stack - 1]
    stack[#stack], stack[#stack - 1] = nil, nil
    if st[j] == "pending" then
      local n = list[j]
      st[j], run.reasons[j] = "skipped", reason
      run.open = run.open - 1
      if run.flow.on.task_skipped then hook(run, "task_skipped", { task = n.name, reason = reason }) end
      local because = "dependency '" .. n.name .. "' skipped"
      for e = dep_first[j], dep_first[j + 1] - 1 do stack[#stack + 1] = dep_idx[e]; stack[#stack + 1] = because end
    end
  end
end

--- Records node i's outcome (once: see the invariants) and starts what it unblocks.
function node_finished(run, i, status, value, err)
  local st = run.status
  if st[i] ~= "running" then return end
  local t = now()
  local node = run.flow.list[i]
  st[i] = status
  run.holder[i] = false
  run.running = run.running - 1
  run.open = run.open - 1
  local started = run.started[i] or run.t0
  if status == "ok" then
    make_entry(run, i, node.name, status, t - started, value, nil)
    if value ~= nil then run.results[node.name] = value end
    if run.flow.on.task_done then hook(run, "task_done", { task = node.name, value = value }) end
  else
    make_entry(run, i, node.name, status, t - started, nil, err)
    if status ~= "cancelled" then run.failed = run.failed + 1 end
    if status == "timeout" then hook(run, "task_timeout", { task = node.name, error = err })
    elseif status == "error" then hook(run, "task_error", { task = node.name, error = err }) end
  end
  if run.stopping then
    if run.open == 0 then finish_run(run, run.stop_status) end
    return
  end
  if status == "cancelled" then             -- not by us (a shutdown, the task itself): the run goes too
    return stop_run(run, "cancelled", ("flow '%s' stopped: task '%s' was cancelled"):format(run.flow.name, node.name))
  end
  if status ~= "ok" and run.flow.fail == "stop" then
    return stop_run(run, "error", ("flow '%s' stopped: task '%s' %s"):format(run.flow.name, node.name, status))
  end
  local dep_first, dep_idx, deps_left, ready = run.flow.dep_first, run.flow.dep_idx, run.deps_left, run.ready
  for e = dep_first[i], dep_first[i + 1] - 1 do
    local d = dep_idx[e]
    if status ~= "ok" then
      skip(run, d, "dependency '" .. node.name .. "' " .. status)
    else
      local left = deps_left[d] - 1
      deps_left[d] = left
      if left == 0 then
        local tail = run.ready_tail + 1
        ready[tail] = d
        run.ready_tail = tail
      end
    end
  end
  start_ready(run, t)
  if run.open == 0 then finish_run(run, run.failed > 0 and "error" or "ok") end
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
  local done = o.fan_done
  o.fan_done = false                         -- a finished task keeps no run alive (a closure over it)
  done(o.fan_index, S.state(t), t[fields.VALUE])
end

--- Runs node i's children over `items`, at most `concurrency` at once; the
--- node's value is their values in item order.
local function fan_out(run, i, items)
  local node = run.flow.list[i]
  local n = #items
  local counts = { total = n, ok = 0, error = 0, timeout = 0, cancelled = 0, running = 0 }
  run.children[i] = counts
  run.children_total = run.children_total + n
  local values, failed_err = {}, nil
  local kids = {}
  run.kids[i] = kids
  local each = node.each
  local remote = node.mode == "thread" or node.mode == "process"
  local ctx = remote and thread_child_ctx(run, node) or ctx_for(run, node)   -- shared by the children
  local name = task_name(run.flow, node)
  -- The fan-out's state, shared with its crew (tide.flow.crew) when it has one.
  local fan = { run = run, i = i, node = node, items = items, n = n, ctx = ctx, name = name, kids = kids,
                counts = counts, next_i = 1, crew = 0, since = 0, polling = false,
                child_done = false, settle = false, launch = false, launching = false, stop_run = stop_run,
                engine_failed = engine_failed, shut = false }
  local function settle_node()
    if counts.running > 0 or (fan.next_i <= n and not run.stopping) then return end
    if run.stopping then return node_finished(run, i, "cancelled", nil, "flow stopped") end
    if fan.shut then return node_finished(run, i, "cancelled", nil, ("child %d was cancelled: shutdown"):format(fan.shut)) end
    if failed_err and node.exit_on_error then return node_finished(run, i, "error", nil, failed_err) end
    node_finished(run, i, "ok", values)
  end
  local launch
  local function child_done(k, status, value)
    kids[k] = nil
    counts.running = counts.running - 1
    run.children_done = run.children_done + 1
    local s = outcome_status(status)
    counts[s] = counts[s] + 1
    if s == "ok" then values[k] = value end
    if run.flow.on.child_done then hook(run, "child_done", { task = node.name, index = k, status = s, value = value }) end
    -- (a sibling's failure cancelled the others itself: those cancels are not the shutdown's)
    if s == "cancelled" and S.shutting_down() and not fan.shut and not (failed_err and node.exit_on_error) then
      fan.shut = k                          -- the node ends cancelled, once its other children had their grace
    elseif s ~= "ok" and not failed_err and s ~= "cancelled" then
      failed_err = ("child %d ended in %s: %s"):format(k, s, safe_tostring(value))
      if node.exit_on_error then
        fan.next_i = n + 1                  -- start no more; stop the running ones
        for _, c in pairs(kids) do c:cancel("a sibling failed") end
      end
    end
    if run.status[i] == "running" then launch() end
    settle_node()
  end
  local function launch_tasks()
    while fan.next_i <= n and counts.running < node.concurrency and not run.stopping do
      local k = fan.next_i
      fan.next_i = k + 1
      counts.running = counts.running + 1
      local item = items[k]
      local fn, args = each, { n = 2, item, ctx }
      if is_flow(each) then fn, args = M.run_as_task, { n = 2, each, item } end
      local opt = { args = false, timeout = false, retry = false, on_finish = false, heard = true,  -- see ctx_for
                    fan_done = false, fan_index = 0, name = false }
      opt.args, opt.timeout, opt.retry, opt.on_finish, opt.fan_done, opt.fan_index =
        args, node.timeout, node.policy, child_finished, child_done, k
      if not remote then
        kids[k] = spawn(node, name, fn, opt)
      else
        local ok, t = pcall(spawn, node, name, fn, opt)   -- what cannot cross fails the child
        if ok then kids[k] = t else child_done(k, "error", t) end
      end
    end
  end
  local start_more
  if type(each) == "function" and not remote and not node.timeout and not node.policy then
    start_more = function() crew.launch(fan) end
  else
    start_more = launch_tasks
  end
  -- Not re-entered: a child that ends as it starts (a shutdown cancels each
  -- new task at once) ends inside the launch, and its end launches again;
  -- nested once per item, 5,000 items overflowed the stack, and the node
  -- never got its outcome.  The loop in hand starts what its end allows.
  launch = function()
    if fan.launching then return end
    fan.launching = true
    start_more()
    fan.launching = false
  end
  fan.child_done, fan.settle, fan.launch = child_done, settle_node, launch
  launch()
  settle_node()
end

-- ===== nodes

--- Node i's own run ended: fan out (each), or record the node's end.
local function node_ran(run, i, ctx, status, value, attempts)
  local node = run.flow.list[i]
  run.attempts[i] = attempts
  local s = outcome_status(status)
  if s ~= "ok" then return node_finished(run, i, s, nil, value) end
  if run.flow.on.task_run_done then
    hook(run, "task_run_done", { task = node.name, value = value })
    if run.stopping then return node_finished(run, i, "cancelled", nil, "flow stopped") end
  end
  if node.each then
    local items = value
    if node.items then
      local remote = node.mode == "thread" or node.mode == "process"
      local ok, its = S.guarded(condition_name(node, "items"), node.items, remote and ctx_for(run, node) or ctx)
      if not ok then return node_finished(run, i, "error", nil, its) end
      items = its
    end
    if type(items) ~= "table" then
      return node_finished(run, i, "error", nil,
        ("task '%s': items must be a list, got %s"):format(node.name, check.describe(items)))
    end
    local why = check.not_a_list(items)
    if why then
      return node_finished(run, i, "error", nil, ("task '%s': items must be a list (%s)"):format(node.name, why))
    end
    return fan_out(run, i, items)
  end
  node_finished(run, i, "ok", value)
end

local function node_result(t)
  local o = S.options(t)
  local run = o.flow_run
  o.flow_run = false                         -- a finished task keeps no run alive
  node_ran(run, o.flow_index, o.args[1], S.state(t), t[fields.VALUE], t[fields.ATTEMPTS])
end

-- Not inside start_node: a closure there would make every return from it
-- close upvalues, which LuaJIT 2.1 cannot compile.
local function retry_hook(run, node)
  return function(ev)
    hook(run, "task_retry", { task = node.name, attempt = ev.attempt, status = ev.status, error = ev.error })
  end
end

--- True when node i may still start: a hook or a condition may have
--- stopped the run (or the node) while it ran.
local function still_pending(run, i)
  return not run.stopping and run.status[i] == "pending"
end

--- A node without timeout, retry, mode or nested flow, whose `run` is a
--- function: run by a worker (tide.flow.workers), without a task of its own.
local function is_simple(node)
  return not (node.timeout or node.policy or node.flow) and (node.mode == nil or node.mode == "coroutine")
    and node.run ~= nil
end

local function start_node(run, i, t)
  local node = run.flow.list[i]
  local st = run.status
  local ctx
  if node.when then
    ctx = ctx_for(run, node)
    local ok, go = S.guarded(condition_name(node, "when"), node.when, ctx)
    if not still_pending(run, i) then return end
    if not ok then
      log.report(("flow '%s' task '%s' when"):format(run.flow.name, node.name), go)
      st[i], run.started[i], run.running = "running", t, run.running + 1
      return node_finished(run, i, "error", nil, go)
    end
    if not go then return skip(run, i, "condition false") end
  end
  st[i], run.started[i] = "running", t
  run.running = run.running + 1
  if run.flow.on.task_start then
    st[i] = "pending"                        -- so that a stop from the hook sees it as not started
    hook(run, "task_start", { task = node.name })
    if not still_pending(run, i) then run.running = run.running - 1; return end
    st[i] = "running"
  end
  if node.run == nil and node.flow == nil then                       -- each with items()
    return node_ran(run, i, ctx or ctx_for(run, node), "ok", nil, 0)
  end
  if is_simple(node) then return queue_simple(run, i) end
  ctx = ctx or ctx_for(run, node)
  local on_retry = run.flow.on.task_retry and retry_hook(run, node) or nil
  local remote = node.mode == "thread" or node.mode == "process"
  if remote then ctx = thread_ctx(run, node) end
  local opt = { args = false, timeout = false, retry = false, on_retry = false, on_finish = false,  -- see ctx_for
                heard = true, flow_run = false, flow_index = 0, name = false }
  opt.args, opt.timeout, opt.retry, opt.on_retry, opt.on_finish, opt.flow_run, opt.flow_index =
    { n = 1, ctx }, node.timeout, node.policy, on_retry, node_result, run, i
  if node.flow then
    opt.args, opt.name = { n = 2, node.flow, run.input }, task_name(run.flow, node)
    local tk = S.new_task(M.run_as_task, opt)
    run.holder[i] = tk
    S.start(tk)
    return
  end
  if not remote then run.holder[i] = spawn(node, task_name(run.flow, node), node.run, opt); return end
  local ok, tk = pcall(spawn, node, task_name(run.flow, node), node.run, opt)   -- what cannot cross fails the node
  if not ok then return node_finished(run, i, "error", nil, tk) end
  run.holder[i] = tk
end

--- Starts ready nodes within the flow's limit (`t`: the time now).  Not
--- re-entered: a node that ends at once (skipped, empty items) queues its
--- dependents for this loop instead of recursing, so deep graphs cannot
--- overflow the stack.
function start_ready(run, t)
  if run.starting then return end
  run.starting = true
  local ready, limit = run.ready, run.flow.concurrency
  while run.ready_head <= run.ready_tail and run.running < limit and not run.stopping do
    local head = run.ready_head
    local i = ready[head]
    ready[head], run.ready_head = nil, head + 1
    start_node(run, i, t)
  end
  run.starting = false
end

-- ===== workers: simple nodes run without a task of their own (tide.flow.workers)

workers.attach{ ctx_for = ctx_for, node_ran = node_ran, node_finished = node_finished, stop_run = stop_run,
                engine_failed = engine_failed, task_name = task_name }

-- ===== a run

local function new_run(f, input)
  local list = f.list
  local n = #list
  local report = { flow = f.name, status = "running", tasks = false }
  local run = { flow = f, input = input, report = report, results = table_new(0, n),
                status = table_new(n, 0), deps_left = table_new(n, 0), holder = table_new(n, 0),
                started = table_new(n, 0), attempts = table_new(n, 0), entry = table_new(n, 0),
                tasks = table_new(0, n), reasons = {}, children = {}, kids = {},
                ready = table_new(n, 0), ready_head = 1, ready_tail = 0,
                queue = table_new(n, 0), q_head = 1, q_tail = 0, looping = false, relay = false, polling = false, idle = {}, nidle = 0,
                running = 0, open = n, failed = 0, starting = false, stopping = false,
                children_total = 0, children_done = 0, t0 = now(), done = false, timer = false,
                waiting = false }                   -- S.wait_for's slot
  local status, deps_left, holder, ndeps = run.status, run.deps_left, run.holder, f.ndeps
  for i = 1, n do
    status[i], deps_left[i], holder[i] = "pending", ndeps[i], false
  end
  local roots, ready = f.roots, run.ready
  for k = 1, #roots do ready[k] = roots[k].index end
  run.ready_tail = #roots
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
      local s = S.attempt_outcome(t)
      stop_run(run, (s == "cancelled" or s == "timeout") and s or "error", "flow cancelled")
    end
  end
  S.on_attempt_end(me, stop_with_attempt)
  active[run] = true
  hook(run, "flow_start", { input = input })
  if f.timeout and not run.done then        -- (the hook may have cancelled the run: no timer left behind)
    run.timer = S.timer(f.timeout, function()
      run.timer = nil
      stop_run(run, "timeout", ("flow '%s' timed out after %g ms"):format(f.name, f.timeout))
    end)
  end
  start_ready(run, now())
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
  task.check_await("run:await", h.task, 2)
  local s, a, b = h.task:await(ms)
  if s == nil then return nil, a end           -- await's own timeout
  if s == "ok" then return a, b end
  local run = h.run
  -- Its task ended after the run did (cancelled from flow_done): the run's outcome stands.
  if run.done then return run.report.status, run.report end
  run.stopping, run.stop_status = true, s      -- cancelled before it started: every node too
  local st = run.status
  for i = 1, #st do if st[i] == "pending" then st[i] = "cancelled" end end
  run.open = 0
  finish_run(run, s)
  return s, run.report
end

--- Cancels the run: true, or nil and a message when it already ended.
function Handle.cancel(h, reason)
  check_handle("run:cancel", h)
  local run = h.run
  if run.done then return nil, ("run:cancel: flow '%s' already finished (%s)"):format(h.flow.name, run.report.status) end
  return h.task:cancel(reason or "flow cancelled")
end

-- ===== runs in progress (for a progress line, metrics)

--- The runs in progress, each as { flow =, tasks_done =, tasks =,
--- children_done =, children =, running =, failed = }, by flow name.
function M.runs()
  local list = {}
  for run in pairs(active) do
    list[#list + 1] = { flow = run.flow.name, tasks_done = #run.flow.list - run.open,
                        tasks = #run.flow.list, children_done = run.children_done,
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
