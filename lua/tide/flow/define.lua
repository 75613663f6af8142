--- tide.flow.define — a flow's definition: its options checked, its tasks validated, cycles found.
--
-- Shared by every way a flow runs: the definition says what the tasks are
-- and how they depend on each other, never how a run goes.  Validation
-- happens once, when the flow is defined: unknown fields, unknown
-- dependencies and cycles are errors that name the flow, the task and the
-- field.
local check = require "tide.engine.check"
local retry = require "tide.engine.retry"

local type, pairs, ipairs, error, tostring, next = type, pairs, ipairs, error, tostring, next
local sort, concat = table.sort, table.concat
local table_new = require "table.new"
local opt_error = check.opt_error

local M = {}

-- max_concurrency, exit_on_failed and the hook task_failed are the old
-- names of concurrency, exit_on_error and task_error (README: Vocabulary):
-- still taken, with a warning, for one release.
local FLOW_KEYS = check.options("tide.flow", {
  name = true, concurrency = true, max_concurrency = true, fail = true, timeout = true,
  tasks = true, on = true
}, { max_concurrency = "concurrency" })
local TASK_KEYS = check.options("flow task", {
  run = true, each = true, items = true, after = true, when = true, retry = true, timeout = true,
  mode = true, concurrency = true, max_concurrency = true, exit_on_error = true,
  exit_on_failed = true, flow = true
}, { max_concurrency = "concurrency", exit_on_failed = "exit_on_error" })
local HOOKS = check.options("flow hooks", {
  flow_start = true, task_start = true, task_run_done = true, task_done = true, task_error = true,
  task_timeout = true, task_retry = true, task_skipped = true, child_done = true, flow_done = true,
  task_failed = true
}, { task_failed = "task_error" })
local OLD_HOOKS = { task_failed = "task_error" }
local FAILS = { stop = true, continue = true }


local FUNCTION_KEYS = { "items", "when" }
local NOT_WITH_FLOW = { "run", "each", "items", "mode" }

--- Raises "FNAME: flow 'F': task 'T': MSG" (the level blames the caller of
--- tide.flow).  The task's part of the message is made only here: a string
--- per task would be most of what checking a valid one costs.
local function task_error(level, fname, fdesc, name, msg, ...)
  error(("%s: %s: task '%s': " .. msg):format(fname, fdesc, name, ...), level + 1)
end

local function bad(fname, fdesc, name, key, expected, v)
  task_error(5, fname, fdesc, name, "bad field '%s' (%s expected, got %s)", key, expected, check.describe(v))
end

--- check.renamed for a task's field, its prefix ("tasks.NAME.") made only
--- when the old name is there.
local function renamed(fname, spec, old, new, name)
  if spec[old] == nil then return spec[new] end
  return check.renamed(fname, spec, old, new, 5, "tasks." .. name .. ".")
end

local function check_task(fname, fdesc, name, spec, is_flow)
  if type(spec) ~= "table" then
    task_error(4, fname, fdesc, name, "task spec table expected, got %s", check.describe(spec))
  end
  for k in pairs(spec) do
    if not TASK_KEYS[k] then task_error(4, fname, fdesc, name, "unknown field '%s'", tostring(k)) end
  end
  if spec.run == nil and spec.each == nil and spec.flow == nil then
    task_error(4, fname, fdesc, name, "needs 'run', 'each' or 'flow'")
  end
  local is_thread = spec.mode == "thread" or spec.mode == "process"   -- runs elsewhere: crosses as bytes
  if spec.run ~= nil and type(spec.run) ~= "function" and not (is_thread and type(spec.run) == "string") then
    bad(fname, fdesc, name, "run", "function", spec.run)
  end
  if spec.each ~= nil and type(spec.each) ~= "function" and not is_flow(spec.each)
     and not (is_thread and type(spec.each) == "string") then
    bad(fname, fdesc, name, "each", "function or flow", spec.each)
  end
  if spec.flow ~= nil then
    if not is_flow(spec.flow) then bad(fname, fdesc, name, "flow", "flow", spec.flow) end
    for _, k in ipairs(NOT_WITH_FLOW) do
      if spec[k] ~= nil then task_error(4, fname, fdesc, name, "'flow' cannot go with '%s'", k) end
    end
  end
  if is_thread and is_flow(spec.each) then
    task_error(4, fname, fdesc, name, "a flow as 'each' runs on the loop, not in %s mode", spec.mode)
  end
  for _, k in ipairs(FUNCTION_KEYS) do
    if spec[k] ~= nil and type(spec[k]) ~= "function" then bad(fname, fdesc, name, k, "function", spec[k]) end
  end
  if spec.items ~= nil and spec.each == nil then
    task_error(4, fname, fdesc, name, "'items' without 'each'")
  end
  if spec.timeout ~= nil and not check.is_ms(spec.timeout, true) then
    bad(fname, fdesc, name, "timeout", "positive number of ms", spec.timeout)
  end
  local concurrency = renamed(fname, spec, "max_concurrency", "concurrency", name)
  if concurrency ~= nil and not check.is_count(concurrency, 1) then
    bad(fname, fdesc, name, "concurrency", "integer >= 1", concurrency)
  end
  local exit_on_error = renamed(fname, spec, "exit_on_failed", "exit_on_error", name)
  if exit_on_error ~= nil and type(exit_on_error) ~= "boolean" then
    bad(fname, fdesc, name, "exit_on_error", "boolean", exit_on_error)
  end
  if spec.mode ~= nil and spec.mode ~= "coroutine" and spec.mode ~= "thread" and spec.mode ~= "process" then
    bad(fname, fdesc, name, "mode", "'coroutine', 'thread' or 'process'", spec.mode)
  end
  local after = spec.after
  if type(after) == "string" then after = { after } end
  if after ~= nil and type(after) ~= "table" then bad(fname, fdesc, name, "after", "task name or list of names", spec.after) end
  local policy = spec.retry ~= nil and retry.policy(("%s: %s: task '%s'"):format(fname, fdesc, name), spec.retry, 4) or nil
  return {
    name = name, run = spec.run, each = spec.each, items = spec.items, flow = spec.flow,
    after = after or {}, when = spec.when, retry = spec.retry, policy = policy, timeout = spec.timeout,
    mode = spec.mode, concurrency = concurrency or 10,
    exit_on_error = exit_on_error ~= false, dependents = {}, task_name = false, index = false,
  }
end

--- Finds a cycle, if any: returns the list of names around it.  Iterative
--- (a chain of 100,000 tasks must not overflow the stack): peel off the
--- tasks whose dependencies are all peeled (Kahn); whatever is left lies on
--- or behind a cycle, and walking its remaining dependencies finds one.
local function find_cycle(nodes, order)
  local n_all = #order
  local left, queue, nq, head = table_new(n_all, 0), table_new(n_all, 0), 0, 1   -- by node index
  for i = 1, n_all do
    local n = #nodes[order[i]].after
    left[i] = n
    if n == 0 then nq = nq + 1; queue[nq] = i end
  end
  while head <= nq do
    local dependents = nodes[order[queue[head]]].dependents
    head = head + 1
    for j = 1, #dependents do
      local d = dependents[j].index
      local l = left[d] - 1
      left[d] = l
      if l == 0 then nq = nq + 1; queue[nq] = d end
    end
  end
  if nq == n_all then return nil end
  local start
  for i = 1, n_all do if left[i] > 0 then start = order[i]; break end end
  local seen, path, name = {}, {}, start
  while not seen[name] do                  -- follow unpeeled dependencies until one repeats
    seen[name] = #path + 1
    path[#path + 1] = name
    for _, dep in ipairs(nodes[name].after) do
      if left[nodes[dep].index] > 0 then name = dep; break end
    end
  end
  local ring = {}
  for i = #path, seen[name], -1 do ring[#ring + 1] = path[i] end     -- in the order they would run
  local first = 1                                                    -- start at the first name, for stable messages
  for i = 2, #ring do if ring[i] < ring[first] then first = i end end
  local cycle = {}
  for i = 0, #ring do cycle[#cycle + 1] = ring[(first - 1 + i) % #ring + 1] end
  return cycle
end

--- Validates a flow's options (tide.flow's: name, concurrency, fail,
--- timeout, tasks, on) and returns its definition: { name, nodes (name ->
--- node), order (names, sorted), fail, timeout, concurrency, on }.
--- `is_flow(v)` says whether v may stand as a nested flow.  Errors name
--- `fname` and blame the caller of the caller.
function M.define(fname, opts, is_flow)
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts, 3) end
  check.known(fname, opts, FLOW_KEYS, nil, 3)
  local name = opts.name or "flow"
  if type(name) ~= "string" then opt_error(fname, "name", "string", opts.name, 3) end
  local fdesc = ("flow '%s'"):format(name)
  if opts.fail ~= nil and not FAILS[opts.fail] then opt_error(fname, "fail", "'stop' or 'continue'", opts.fail, 3) end
  if opts.timeout ~= nil and not check.is_ms(opts.timeout, true) then opt_error(fname, "timeout", "positive number of ms", opts.timeout, 3) end
  local concurrency = check.renamed(fname, opts, "max_concurrency", "concurrency", 3)
  if concurrency ~= nil and not check.is_count(concurrency, 1) then
    opt_error(fname, "concurrency", "integer >= 1", concurrency, 3)
  end
  local given = opts.on or {}
  if type(given) ~= "table" then opt_error(fname, "on", "table of hooks", given, 3) end
  local on = {}
  for k, v in pairs(given) do
    if OLD_HOOKS[k] then
      on[OLD_HOOKS[k]] = check.renamed(fname, given, k, OLD_HOOKS[k], 3, "on.")
    elseif not HOOKS[k] then
      error(("%s: %s: unknown hook '%s'"):format(fname, fdesc, tostring(k)), 3)
    else
      on[k] = v
    end
  end
  for k, v in pairs(on) do
    if type(v) ~= "function" then opt_error(fname, "on." .. k, "function", v, 3) end
  end
  if type(opts.tasks) ~= "table" or next(opts.tasks) == nil then
    opt_error(fname, "tasks", "non-empty table of tasks", opts.tasks, 3)
  end
  local nodes, order = {}, {}
  for tname, spec in pairs(opts.tasks) do
    if type(tname) ~= "string" then error(("%s: %s: task names must be strings, got %s"):format(fname, fdesc, check.describe(tname)), 3) end
    nodes[tname] = check_task(fname, fdesc, tname, spec, is_flow)
    order[#order + 1] = tname
  end
  sort(order)
  for _, tname in ipairs(order) do
    local n = nodes[tname]
    for _, dep in ipairs(n.after) do
      if nodes[dep] == nil then
        error(("%s: %s: task '%s' depends on unknown task '%s'"):format(fname, fdesc, tname, tostring(dep)), 3)
      end
      local dn = nodes[dep].dependents
      dn[#dn + 1] = n
    end
  end
  for i, tname in ipairs(order) do
    local n = nodes[tname]
    n.task_name, n.index = name .. "/" .. tname, i      -- index: the node's place in `order`
  end
  local cycle = find_cycle(nodes, order)
  if cycle then error(("%s: %s: cycle %s"):format(fname, fdesc, concat(cycle, " -> ")), 3) end
  return { name = name, nodes = nodes, order = order, fail = opts.fail or "stop",
           timeout = opts.timeout, concurrency = concurrency or math.huge, on = on }
end


M.HOOKS = HOOKS

return M
