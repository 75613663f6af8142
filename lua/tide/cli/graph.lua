--- tide.cli.graph — `tide graph`: the flows a script defines, drawn without running them.
--
-- The script runs as the root task until its first flow:run or flow:start;
-- that run does not start (the loop shuts down instead), and every flow
-- defined so far is printed.
local H = require "tide.engine.host"
local S = require "tide.engine.sched"
local VALUE = require("tide.engine.fields").VALUE   -- (t.value: a user may write that name onto a task)
local flow = require "tide.flow.run"
local options = require "tide.cli.options"

local setmetatable, tostring, ipairs = setmetatable, tostring, ipairs
local io_stdout, io_stderr = io.stdout, io.stderr

local M = {}

M.USAGE = [=[
Usage: tide graph [--format dot|mermaid] SCRIPT [ARGS...]

Runs SCRIPT until its first flow:run or flow:start, then prints every flow it
defined, as Graphviz DOT (the default) or Mermaid, instead of running it.

Options:
  --format FORMAT   dot or mermaid (default dot)
  -h, --help        show this help

Exit status: 0; 1 when SCRIPT fails or defines no flow; 2 for bad options.
]=]

local FORMATS = { dot = true, mermaid = true }
local OPTS = {
  ["--format"] = { key = "format", meta = "FORMAT", conv = function(s) return FORMATS[s] and s or nil end,
                   expected = "dot or mermaid" },
  ["--help"] = options.opt.help, ["-h"] = options.opt.help,
}

local STOP = setmetatable({}, { __tostring = function() return "tide graph: stop here" end })

--- tide graph [--format dot|mermaid] SCRIPT [ARGS...]
function M.main(argv, i)
  local prog = "tide graph"
  local opts, pos = options.parse(argv, i, OPTS, true)
  if not opts then return options.usage_error(prog, pos, M.USAGE) end
  if opts.help then io_stdout:write(M.USAGE); return 0 end
  local script = pos[1]
  if script == nil then return options.usage_error(prog, "missing SCRIPT", M.USAGE) end
  local defined = {}
  flow.on_define(function(f) defined[#defined + 1] = f end)
  flow.before_run(function()
    S.shutdown(0, "tide graph")              -- nothing else of the script runs
    return STOP
  end)
  local t, err = H.spawn_file(script, { select(2, unpack(pos)) })
  if not t then return options.fail(prog, err) end
  H.loop()
  if t:status() ~= "ok" and t[VALUE] ~= STOP then
    return options.fail(prog, t.traceback or tostring(t[VALUE]))
  end
  if #defined == 0 then return options.fail(prog, script .. " defines no flow") end
  for _, f in ipairs(defined) do io_stdout:write(f:graph(opts.format or "dot")) end
  return 0
end

return M
