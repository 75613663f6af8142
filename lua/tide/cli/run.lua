--- tide.cli.run — `tide run`: a script as the root task, until no work is left.
local H = require "tide.engine.host"
local core = require "tide.core"
local options = require "tide.cli.options"
local progress = require "tide.cli.progress"
local tide = require "tide"
local logs = require "tide.observe.logs"
local fields = require "tide.engine.fields"

local io_stdout = io.stdout

local M = {}

M.USAGE = [=[
Usage: tide run [OPTIONS] SCRIPT [ARGS...]

Runs SCRIPT as the root task: it may tide.sleep and await at top level.  The
script sees its arguments in `arg` (arg[0] is the script) and in `...`, as
under luajit.  The process exits when no work is left.

Options (before SCRIPT; what follows SCRIPT is the script's):
  --grace MS     time running tasks get to finish on SIGINT/SIGTERM (default
                 5000); a number of ms, or 500ms, 30s, 5m, 2h, 1d
  --quiet        no progress line (it shows only when stderr is a terminal)
  --metrics ADDR serve Prometheus metrics at http://ADDR/metrics while the
                 script runs (ADDR is HOST:PORT, like 127.0.0.1:9464)
  --log-format FORMAT
                 human (the default) or json: errors and the script's failure
                 as one JSON object per line on stderr
  -h, --help     show this help

Exit status: 0; 1 when the script failed; 2 for bad options; 130/143 after
SIGINT/SIGTERM.
]=]

local o = options.opt
local W = require("tide.cli.web").opt
local OPTS = { ["--grace"] = o.grace, ["--quiet"] = o.quiet, ["--help"] = o.help, ["-h"] = o.help,
               ["--metrics"] = W.metrics, ["--log-format"] = W.log_format }

--- After the loop, as H.run does, with the root task's failure as a JSON line.
local function json_exit_status()
  local root = H.root
  if H.signal then return 128 + H.signal end
  if root == nil or root:status() == "ok" then return 0 end
  logs.event("error", "script_failed", { task = root[fields.ID], error = tostring(root[fields.VALUE]), traceback = root.traceback })
  return 1
end

--- tide run [OPTIONS] SCRIPT [ARGS...]
function M.main(argv, i)
  local prog = "tide run"
  local opts, pos = options.parse(argv, i, OPTS, true)
  if not opts then return options.usage_error(prog, pos, M.USAGE) end
  if opts.help then io_stdout:write(M.USAGE); return 0 end
  if pos[1] == nil then return options.usage_error(prog, "missing SCRIPT", M.USAGE) end
  if opts.grace then tide.configure{ grace = opts.grace } end
  local json = opts.log_format == "json"
  if json then logs.use_json() end
  local l
  if opts.metrics then
    local lerr
    l, lerr = require("tide.cli.web").listen(prog, { metrics = opts.metrics })
    if not l then return options.fail(prog, lerr) end
  end
  local t, err = H.spawn_file(pos[1], { select(2, unpack(pos)) })
  if not t then return options.fail(prog, err) end
  if not opts.quiet and not json and core.isatty(2) then progress.enable() end
  local code
  if json then H.loop(); code = json_exit_status() else code = H.run() end
  for _, srv in ipairs(l and l.servers or {}) do srv:close() end
  return code
end

return M
