--- tide.jobs.flowstep — the job target of durable flows: runs one step, one item or one hook.
--
-- A worker finds it by name, as any target (the jobs of tide.jobs.flows
-- name it).  Each method requires the flow's module by name, so a step runs
-- on any machine whose package.path finds the flow.  A method returns what
-- the outcome write hands to tide.jobs.flows.apply: { kind = "ok", json =
-- result } (encoded here: a result JSON cannot hold fails the attempt),
-- { kind = "skipped" } for `when` false, { kind = "items", items = { JSON
-- text, ... } } for an `each` step's items.
local flows = require "tide.jobs.flows"
local json = require "tide.jobs.json"
local task = require "tide.engine.task"
local check = require "tide.engine.check"

local type, error, tostring, select, ipairs, pcall = type, error, tostring, select, ipairs, pcall

local M = { methods = {} }

local function node_of(args)
  if type(args) ~= "table" or type(args.flow) ~= "string" or type(args.step) ~= "string" then
    error("not a durable flow job (args lack flow and step)", 0)
  end
  local def = flows.definition(args.flow, "flow step")
  local node = def.nodes[args.step]
  if not node then error(("flow '%s' has no task '%s' (was the definition changed?)"):format(args.flow, args.step), 0) end
  return def, node
end

--- What a message calls the step (or its item `index`): built only for a
--- message or a task's name, not for each step that runs.
local function what_of(def, node, index)
  if index then return ("flow '%s' step '%s' item %d"):format(def.name, node.name, index) end
  return ("flow '%s' step '%s'"):format(def.name, node.name)
end

--- fn(...) with the node's timeout and mode: a task of its own when either
--- is set (so that a timeout stops it, and a thread or process mode runs it
--- there), else called here.
local function call(def, node, index, fn, ...)
  if not node.timeout and (node.mode == nil or node.mode == "coroutine") then return fn(...) end
  local what = what_of(def, node, index)
  local t = task.spawn{ run = fn, args = { n = select("#", ...), ... }, timeout = node.timeout, mode = node.mode,
                        name = what }
  local status, value = t:await()
  if status == "ok" then return value end
  if status == "timeout" then error(("timeout: %s ran longer than %g ms"):format(what, node.timeout), 0) end
  error(t.traceback or value, 0)
end

local function encode(def, node, index, v)
  local text, err = json.try_encode(v, "result")
  if not text then
    error(("%s: its result cannot be stored as JSON: %s"):format(what_of(def, node, index), tostring(err)), 0)
  end
  return text
end

--- A step: `when`, then `run`; for `each`, the items.
function M.methods.step(args)
  local def, node = node_of(args)
  local ctx = { input = args.input, results = args.results or {}, flow = def.name, task = node.name, run = args.run }
  if node.when and not node.when(ctx) then return { kind = "skipped", reason = "condition false" } end
  local value
  if node.run ~= nil then value = call(def, node, nil, node.run, ctx) end
  if not node.each then return { kind = "ok", json = encode(def, node, nil, value) } end
  local items = value
  if node.items then items = node.items(ctx) end
  if type(items) ~= "table" then
    error(("%s: items must be a list, got %s"):format(what_of(def, node), type(items)), 0)
  end
  local why = check.not_a_list(items)
  if why then error(("%s: items must be a list (%s)"):format(what_of(def, node), why), 0) end
  local list = {}
  for i, item in ipairs(items) do list[i] = encode(def, node, i, item) end
  return { kind = "items", items = list }
end

--- One item of an `each` step: each(item, ctx).
function M.methods.item(args)
  local def, node = node_of(args)
  local ctx = { input = args.input, flow = def.name, task = node.name, run = args.run, index = args.index }
  local index = args.index or 0
  return { kind = "ok", json = encode(def, node, index, call(def, node, index, node.each, args.item, ctx)) }
end

--- A hook of the flow (flow_done, task_error), with its event table.
function M.methods.hook(args)
  local def = flows.definition(args.flow, "flow hook")
  local fn = def.on[args.hook]
  if not fn then return { kind = "none" } end
  local ev = type(args.event) == "table" and args.event or {}
  ev.flow = def.name
  fn(ev)
  return { kind = "none" }
end

-- ===== for the worker (tide.jobs.worker): options beside the methods

--- The backoff between a step's failed attempts: its retry policy.
function M.retry_for(args)
  local ok, def, node = pcall(node_of, args)
  if ok and node then return node.policy end
end

--- Applies the outcomes of this target's jobs inside their outcome write.
M.after_record = flows.apply

return M
