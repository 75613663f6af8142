--- tide.cli.progress — `tide run`'s progress line: one line on stderr for the flows running now.
local S = require "tide.engine.sched"
local flow = require "tide.flow.run"

local concat = table.concat
local io_stderr = io.stderr

local M = {}

local printing = false      -- the line is showing (its timer runs)

--- A line per run in progress: tasks done/total, children done/total, running, failed.
function M.lines()
  local lines = {}
  for i, r in ipairs(flow.runs()) do
    lines[i] = ("flow %s: tasks %d/%d, children %d/%d, running %d, failed %d")
      :format(r.flow, r.tasks_done, r.tasks, r.children_done, r.children, r.running, r.failed)
  end
  return lines
end

local function redraw()
  local lines = M.lines()
  if #lines == 0 then                       -- no flow runs: clear the line and stop
    io_stderr:write("\r\27[K")
    printing = false
    return
  end
  io_stderr:write("\r\27[K", concat(lines, "  |  "))
  S.timer(200, redraw)
end

--- Shows the line whenever a flow runs, from now on (it clears itself when none runs).
function M.enable()
  flow.before_run(function()
    if not printing then
      printing = true
      S.timer(0, redraw)
    end
  end)
end

return M
