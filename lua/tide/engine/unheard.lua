--- tide.engine.unheard — failures nobody heard: noted when a task fails, reported when nobody will hear them.
--
-- A task that fails (error or timeout) with no handle_result, no awaiter,
-- and no module of tide's that takes its outcome (o.heard: flow nodes,
-- jobs) would be lost silently.  (A task with o.report, a timer's, has its
-- failure reported at once, named o.report.)  It is noted here; an await that
-- comes later hears it.  What is still unheard is reported once to the
-- error sink: when the loop ends, or when the task is collected (its
-- finalizer only queues the report: a finalizer runs at any allocation,
-- where calling the sink is not safe; the next tick delivers it).
local log = require "tide.engine.log"
local fields = require "tide.engine.fields"
local OPT, STATE, ID, VALUE = fields.OPT, fields.STATE, fields.ID, fields.VALUE

local setmetatable, getmetatable, newproxy, pairs = setmetatable, getmetatable, newproxy, pairs

local M = {}

local unheard = setmetatable({}, { __mode = "k" })   -- task -> its report record
local collected = {}                                 -- records of collected tasks, to report

local function unheard_text(t)
  local name = t[OPT] and t[OPT].name
  return ("task %d%s failed (%s) and nobody heard it"):format(t[ID], name and (" '" .. name .. "'") or "", t[STATE])
end

--- Notes that t failed and nobody heard it (yet).
function M.note(t)
  local rec = { where = unheard_text(t), err = t[VALUE], tb = t.traceback, done = false }
  local proxy = newproxy(true)
  getmetatable(proxy).__gc = function()
    if not rec.done then rec.done = true; collected[#collected + 1] = rec end
  end
  rec.proxy = proxy                       -- lives as long as the record, which the task keys
  unheard[t] = rec
end

--- The task's failure was heard (awaited after the fact).
function M.hear(t)
  local rec = unheard[t]
  if rec then rec.done = true; unheard[t] = nil end
end

--- True when collected tasks' failures wait to be reported.
function M.pending() return collected[1] ~= nil end

--- Reports the failures of collected tasks (from the tick: a safe place).
function M.flush()
  local list = collected
  collected = {}
  for i = 1, #list do log.report(list[i].where, list[i].err, list[i].tb) end
end

--- Reports every failure nobody heard (the loop ended: nobody will).
function M.report_all()
  M.flush()
  local list = {}
  for t, rec in pairs(unheard) do list[#list + 1] = { t[ID], rec } end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  for i = 1, #list do
    local rec = list[i][2]
    rec.done = true
    log.report(rec.where, rec.err, rec.tb)
  end
  unheard = setmetatable({}, { __mode = "k" })
end

return M
