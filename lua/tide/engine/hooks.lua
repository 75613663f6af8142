--- tide.engine.hooks — a task's rarer options (t[OPT]) and the hook lists kept in them.
--
-- The options a task rarely has (timeout, retry, hooks, pool) live in
-- t[OPT] (false when none).  Options marked `shared` are a template that
-- many tasks point to (a timer's tasks): copied into the task's own table
-- before any change.  A hook slot of t[OPT] holds nil (or false), one
-- function, or a list of them (most tasks with a hook have one: no list is
-- allocated for it); each call is protected, and one that raises is
-- reported to the error sink without stopping the others.
local log = require "tide.engine.log"
local OPT = require("tide.engine.fields").OPT

local type, pairs, pcall, xpcall, tostring = type, pairs, pcall, xpcall, tostring
local traceback = debug.traceback

local M = {}

--- The task's own options table, made (or copied from a shared template) when needed.
function M.own_options(t)
  local o = t[OPT]
  if not o then
    o = {}
    t[OPT] = o
  elseif o.shared then
    local copy = {}
    for k, v in pairs(o) do copy[k] = v end
    copy.shared = nil
    o = copy
    t[OPT] = o
  end
  return o
end
local own_options = M.own_options

--- Adds fn to the hook list in t's option `slot`.
function M.add(t, slot, fn)
  local o = own_options(t)
  local h = o[slot]
  if not h then o[slot] = fn                -- nil, or false: a slot kept free
  elseif type(h) == "function" then o[slot] = { h, fn }
  else h[#h + 1] = fn end
end

--- Removes fn from the hook list in t's option `slot` (absent: nothing).
function M.remove(t, slot, fn)
  local o = t[OPT]
  local h = o and o[slot]
  if h == fn then o[slot] = nil; return end
  if type(h) ~= "table" then return end
  for i = 1, #h do
    if h[i] == fn then table.remove(h, i); return end
  end
end

local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  return ok and s or "(error object with a failing __tostring)"
end

local function hook_failed(what, t, err)
  log.report(what .. " hook of " .. safe_tostring(t), err, err)
end

--- Calls each hook of `h` (a slot's value) with t, protected, in the order
--- added; `what` names the slot in the error sink's report.
function M.call(what, t, h)
  if type(h) == "function" then
    local ok, err = xpcall(h, traceback, t)
    if not ok then pcall(hook_failed, what, t, err) end   -- reporting allocates: protected too
  else
    for i = 1, #h do
      local ok, err = xpcall(h[i], traceback, t)
      if not ok then pcall(hook_failed, what, t, err) end
    end
  end
end

return M
