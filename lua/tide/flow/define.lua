--- tide.flow.define — a flow's definition: its options checked, its tasks validated, cycles found.
--
-- Shared by every way a flow runs: the definition says what the tasks are
-- and how they depend on each other, never how a run goes.  Validation
-- happens once, when the flow is defined: unknown fields, unknown
-- dependencies and cycles are errors that name the flow, the task and the
-- field.
local check = require "tide.engine.check"
local retry = require "tide.engine.retry"

local type, pairs, ipairs, error, tostring, next, rawget, rawset, setmetatable =
  type, pairs, ipairs, error, tostring, next, rawget, rawset, setmetatable
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

local function bad(fname, fdesc, name, key, expected, v, level)
  task_error(level or 5, fname, fdesc, name, "bad field '%s' (%s expected, got %s)", key, expected, check.describe(v))
end

--- check.renamed for a task's field, its prefix ("tasks.NAME.") made only
--- when the old name is there.
local function renamed(fname, spec, old, new, name)
  if spec[old] == nil then return spec[new] end
  return check.renamed(fname, spec, old, new, 6, "tasks." .. name .. ".")
end

-- The `after` of every node without dependencies (shared: never changed).
local NONE = {}

--- A task's rarer fields (anything but `run` and `after`), checked and set on its node.
local function check_rare(fname, fdesc, name, spec, is_flow, node)
  local is_thread = spec.mode == "thread" or spec.mode == "process"   -- runs elsewhere: crosses as bytes
  if spec.each ~= nil and type(spec.each) ~= "function" and not is_flow(spec.each)
     and not (is_thread and type(spec.each) == "string") then
    bad(fname, fdesc, name, "each", "function or flow", spec.each, 6)
  end
  if spec.flow ~= nil then
    if not is_flow(spec.flow) then bad(fname, fdesc, name, "flow", "flow", spec.flow, 6) end
    for _, k in ipairs(NOT_WITH_FLOW) do
      if spec[k] ~= nil then task_error(5, fname, fdesc, name, "'flow' cannot go with '%s'", k) end
    end
  end
  if is_thread and is_flow(spec.each) then
    task_error(5, fname, fdesc, name, "a flow as 'each' runs on the loop, not in %s mode", spec.mode)
  end
  for _, k in ipairs(FUNCTION_KEYS) do
    if spec[k] ~= nil and type(spec[k]) ~= "function" then bad(fname, fdesc, name, k, "function", spec[k], 6) end
  end
  if spec.items ~= nil and spec.each == nil then
    task_error(5, fname, fdesc, name, "'items' without 'each'")
  end
  if spec.timeout ~= nil and not check.is_ms(spec.timeout, true) then
    bad(fname, fdesc, name, "timeout", "positive number of ms", spec.timeout, 6)
  end
  local concurrency = renamed(fname, spec, "max_concurrency", "concurrency", name)
  if concurrency ~= nil and not check.is_count(concurrency, 1) then
    bad(fname, fdesc, name, "concurrency", "integer >= 1", concurrency, 6)
  end
  local exit_on_error = renamed(fname, spec, "exit_on_failed", "exit_on_error", name)
  if exit_on_error ~= nil and type(exit_on_error) ~= "boolean" then
    bad(fname, fdesc, name, "exit_on_error", "boolean", exit_on_error, 6)
  end
  if spec.mode ~= nil and spec.mode ~= "coroutine" and spec.mode ~= "thread" and spec.mode ~= "process" then
    bad(fname, fdesc, name, "mode", "'coroutine', 'thread' or 'process'", spec.mode, 6)
  end
  node.each, node.items, node.flow, node.when, node.timeout, node.mode = spec.each, spec.items, spec.flow,
    spec.when, spec.timeout, spec.mode
  if spec.retry ~= nil then
    node.retry = spec.retry
    node.policy = retry.policy(("%s: %s: task '%s'"):format(fname, fdesc, name), spec.retry, 5)
  end
  node.concurrency, node.exit_on_error = concurrency or 10, exit_on_error ~= false
end

--- Checks one task's spec and returns its node: { name, index, run, after,
--- and the rarer fields when given (each, items, flow, when, retry, policy,
--- timeout, mode, concurrency, exit_on_error) }.  Most tasks have only
--- `run` and `after`: their node is made at its final size.
local function check_task(fname, fdesc, name, spec, is_flow)
  if type(spec) ~= "table" then
    task_error(4, fname, fdesc, name, "task spec table expected, got %s", check.describe(spec))
  end
  local rare = false
  for k in pairs(spec) do
    if not TASK_KEYS[k] then task_error(4, fname, fdesc, name, "unknown field '%s'", tostring(k)) end
    if k ~= "run" and k ~= "after" then rare = true end
  end
  local run = spec.run
  if run == nil and spec.each == nil and spec.flow == nil then
    task_error(4, fname, fdesc, name, "needs 'run', 'each' or 'flow'")
  end
  if run ~= nil and type(run) ~= "function"
     and not ((spec.mode == "thread" or spec.mode == "process") and type(run) == "string") then
    bad(fname, fdesc, name, "run", "function", run)
  end
  local after = spec.after
  if after == nil then after = NONE
  elseif type(after) == "string" then after = { after }
  elseif type(after) ~= "table" then bad(fname, fdesc, name, "after", "task name or list of names", after)
  else                                       -- (# would drop what follows a hole, and a map's names, silently)
    local why = check.not_a_list(after)
    if why then task_error(4, fname, fdesc, name, "bad field 'after' (a list of task names expected: %s)", why) end
  end
  -- Made from constants, then filled: `{ k = v }` with variable values
  -- compiles to one lj_tab_newkey per key, which rehashed the new table
  -- (callgrind); a slot holding a constant is stored into directly.
  local node = { name = false, index = 0, run = false, after = false }
  node.name, node.run, node.after = name, run, after
  if rare then check_rare(fname, fdesc, name, spec, is_flow, node) end
  return node
end

--- Finds a cycle, if any: returns the list of names around it.  Iterative
--- (a chain of 100,000 tasks must not overflow the stack): peel off the
--- tasks whose dependencies are all peeled (Kahn); whatever is left lies on
--- or behind a cycle, and walking its remaining dependencies from the first
--- name left finds one.
--- `left` and `queue` are scratch arrays of at least #list slots (the
--- caller's, done with: two fewer arrays to make, and to fault in cold).
local function find_cycle(index_of, list, ndeps, dep_first, dep_idx, left, queue)
  local n_all = #list
  local nq, head = 0, 1                    -- left, queue: by node index
  for i = 1, n_all do
    local n = ndeps[i]
    left[i] = n
    if n == 0 then nq = nq + 1; queue[nq] = i end
  end
  while head <= nq do
    local i = queue[head]
    head = head + 1
    for j = dep_first[i], dep_first[i + 1] - 1 do
      local d = dep_idx[j]
      local l = left[d] - 1
      left[d] = l
      if l == 0 then nq = nq + 1; queue[nq] = d end
    end
  end
  if nq == n_all then return nil end
  local start                              -- the first name left: the same message whatever the numbering
  for i = 1, n_all do
    if left[i] > 0 and (start == nil or list[i].name < start) then start = list[i].name end
  end
  local seen, path, name = {}, {}, start
  while not seen[name] do                  -- follow unpeeled dependencies until one repeats
    seen[name] = #path + 1
    path[#path + 1] = name
    for _, dep in ipairs(list[index_of[name]].after) do
      if left[index_of[dep]] > 0 then name = dep; break end
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

--- Raises the error for the first task (by name) that depends on an unknown one.
local function unknown_dependency(fname, fdesc, index_of, list)
  local names = {}
  for i = 1, #list do names[i] = list[i].name end
  sort(names)
  for _, tname in ipairs(names) do
    for _, dep in ipairs(list[index_of[tname]].after) do
      if index_of[dep] == nil then
        error(("%s: %s: task '%s' depends on unknown task '%s'"):format(fname, fdesc, tname, tostring(dep)), 4)
      end
    end
  end
end

--- The names of a definition's tasks, sorted: made on first use and kept.
--- Not when the flow is defined: sorting 100,000 names takes 0.6 µs per
--- name, more than everything else defining them does, and only pictures,
--- durable runs and errors need the order.
function M.order(def)
  local order = rawget(def, "order")
  if order then return order end
  local list = def.list
  order = table_new(#list, 0)
  for i = 1, #list do order[i] = list[i].name end
  sort(order)
  rawset(def, "order", order)
  return order
end

--- The names of the tasks `node` depends on in definition `def`, as it was
--- defined, in a new list (a name given twice is there twice).
function M.dependencies(def, node)
  local first, edges, list = def.dep_of_first, def.dep_of, def.list
  local out = {}
  for e = first[node.index], first[node.index + 1] - 1 do out[#out + 1] = list[edges[e]].name end
  return out
end

--- The nodes that depend on `node` in definition `def`, in a new list (for
--- what is not hot: a run walks def.dep_idx itself).
function M.dependents(def, node)
  local first, idx, list = def.dep_first, def.dep_idx, def.list
  local out = {}
  for e = first[node.index], first[node.index + 1] - 1 do out[#out + 1] = list[idx[e]] end
  return out
end

--- The keys of t, in a new list.  A loop of next() calls, not pairs():
--- twice in CI, Debian 12's LuaJIT (2.1.0~beta3+git20220320) ended the
--- pairs() loop that numbered the tasks early, inside M.define, and a
--- definition lost tasks ("task 'n4' depends on unknown task 'n2'", a nil
--- node at the linking): the symptom of LuaJIT issue #827 (a pairs() loop
--- whose trace is blacklisted stops after one key; fixed upstream in April
--- 2022), a bug of the compiled ITERN bytecode that next() does not use
--- (check.not_a_list says more).  It was interpreted since (jit.off), for
--- ~0.03 us a key.
local function keys_of(t)
  local out, n, k = {}, 0, next(t)
  while k ~= nil do
    n = n + 1
    out[n] = k
    k = next(t, k)
  end
  return out
end

--- def.nodes: name -> node, read through the definition's index_of (no
--- table of its own: see M.define).  Not for pairs(): walk def.list.
local function nodes_of(index_of, list)
  return setmetatable({}, { __index = function(_, name)
    local i = index_of[name]
    if i ~= nil then return list[i] end
  end })
end

local Definition_mt = { __index = function(def, k) if k == "order" then return M.order(def) end end }

--- Validates a flow's options (tide.flow's: name, concurrency, fail,
--- timeout, tasks, on) and returns its definition: { name, nodes (name ->
--- node, read only, not for pairs()), index_of (name -> index), list (the
--- nodes by index), ndeps (their numbers of dependencies,
--- by index), dep_first and dep_idx (the dependents of the node of index i
--- are dep_idx[dep_first[i] .. dep_first[i + 1] - 1], see M.dependents),
--- dep_of_first and dep_of (its dependencies, the same way: M.dependencies),
--- roots (the nodes without dependencies, by name), order (the names,
--- sorted: made when first read), fail, timeout, concurrency, on }.  A node's index is its place in
--- `list`; a run keeps its state in arrays by that index.
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
  local tasks = opts.tasks
  if type(tasks) ~= "table" or next(tasks) == nil then
    opt_error(fname, "tasks", "non-empty table of tasks", tasks, 3)
  end
  -- One pass checks the tasks and numbers them; one more links them.  The
  -- tables are sized first: grown one key at a time, 100,000 names cost
  -- more in rehashing than in checking.
  local names = keys_of(tasks)
  local n = #names
  -- index_of: name -> index, the one table by name.  Through a table of
  -- nodes by name (nodes[name].index), each dependency was two cache misses
  -- on a 100,000-node graph (its hash slot, then its node), and defining it
  -- took a fifth longer; both tables, a tenth more pages to fault in a cold
  -- process.  def.nodes finds a node through it (nodes_of).
  local list, index_of = table_new(n, 0), table_new(0, n)
  local i = 0
  for j = 1, n do
    local tname = names[j]
    local spec = tasks[tname]
    if type(tname) ~= "string" then error(("%s: %s: task names must be strings, got %s"):format(fname, fdesc, check.describe(tname)), 3) end
    local node = check_task(fname, fdesc, tname, spec, is_flow)
    i = i + 1
    node.index = i
    list[i], index_of[tname] = node, i
  end
  -- Linking resolves each dependency once (edges: the dependencies' indexes,
  -- in order), then lists every node's dependents in one array.
  -- ndeps: each node's number of dependencies, by index (kept: a run starts
  -- from it without reading every node's `after` again).
  local roots, count, edges, ne, ndeps = {}, table_new(n, 0), table_new(2 * n, 0), 0, table_new(n, 0)
  for j = 1, n do count[j] = 0 end
  for j = 1, n do
    local node = list[j]
    local after = node.after
    local na = #after
    ndeps[j] = na
    if na == 0 then roots[#roots + 1] = node.name end
    for k = 1, na do
      local d = index_of[after[k]]
      if d == nil then unknown_dependency(fname, fdesc, index_of, list) end
      count[d] = count[d] + 1
      ne = ne + 1
      edges[ne] = d
    end
  end
  -- The dependents of node j are dep_idx[dep_first[j] .. dep_first[j + 1] - 1]
  -- (indexes, in the order of the nodes that depend on it).  A table of
  -- dependents per node was 100,000 tables to make, collect and reach
  -- through each node: defining a 100,000-node layered graph took a third
  -- less time without them (bench/flow.lua).
  local dep_first, dep_idx = table_new(n + 1, 0), table_new(ne, 0)
  local at = 1
  for j = 1, n do
    local c = count[j]
    dep_first[j], count[j] = at, at
    at = at + c
  end
  dep_first[n + 1] = at
  local e = 0
  for j = 1, n do
    for _ = 1, ndeps[j] do
      e = e + 1
      local d = edges[e]
      local c = count[d]
      count[d] = c + 1
      dep_idx[c] = j
    end
  end
  -- The dependencies of node j, as the definition saw them: edges[dep_of_first[j]
  -- .. dep_of_first[j + 1] - 1] (the caller's `after` lists stay theirs to change).
  local dep_of_first = table_new(n + 1, 0)
  at = 1
  for j = 1, n do dep_of_first[j] = at; at = at + ndeps[j] end
  dep_of_first[n + 1] = at
  local cycle = find_cycle(index_of, list, ndeps, dep_first, dep_idx, count, names)   -- (both done with)
  if cycle then error(("%s: %s: cycle %s"):format(fname, fdesc, concat(cycle, " -> ")), 3) end
  sort(roots)                               -- a run starts them in name order
  for j = 1, #roots do roots[j] = list[index_of[roots[j]]] end
  return setmetatable({ name = name, nodes = nodes_of(index_of, list), index_of = index_of, list = list,
                        ndeps = ndeps, roots = roots,
                        dep_first = dep_first, dep_idx = dep_idx, dep_of = edges, dep_of_first = dep_of_first,
                        fail = opts.fail or "stop", timeout = opts.timeout, concurrency = concurrency or math.huge,
                        on = on }, Definition_mt)
end


M.HOOKS = HOOKS

return M
