--- tide.cli.main — the `tide` command line: the commands and their help.
local options = require "tide.cli.options"
local tide = require "tide"

local io_stdout = io.stdout

local M = {}

local USAGE = [=[
Usage: tide COMMAND [ARGS...]

Commands:
  run [OPTIONS] SCRIPT [ARGS...]   run an orchestrator script as the root task
  worker [OPTIONS] [SCRIPT [ARGS...]]
                                   perform durable jobs with the targets SCRIPT returns
  enqueue [OPTIONS] TARGET METHOD [JSON_ARGS]
                                   add a durable job
  jobs [OPTIONS] COMMAND [ARGS]    list, show, retry, cancel, expire, fail, stats, schedules, prune
  flows [OPTIONS] COMMAND [ARGS]   durable flow runs: list, show, graph, cancel, retry
  web [OPTIONS]                    serve the dashboard of a job store in the browser
  graph [--format dot|mermaid] SCRIPT [ARGS...]
                                   print the flows SCRIPT defines, without running them
  help [COMMAND]                   show this help, or a command's
  version                          print the version

`tide COMMAND --help` shows a command's options.  worker, enqueue, jobs, flows
and web use the job store given by --store URL, else $TIDE_STORE, else sqlite:tide.db.

Options:
  -h, --help      show this help
  -v, --version   print the version
]=]

--- Each command: (argv, i) -> exit status, loaded when used.
local COMMANDS = {
  run = function(argv, i) return require("tide.cli.run").main(argv, i) end,
  graph = function(argv, i) return require("tide.cli.graph").main(argv, i) end,
  worker = function(argv, i) return require("tide.cli.worker").main(argv, i) end,
  enqueue = function(argv, i) return require("tide.cli.jobs").enqueue(argv, i) end,
  jobs = function(argv, i) return require("tide.cli.jobs").jobs(argv, i) end,
  flows = function(argv, i) return require("tide.cli.flows").main(argv, i) end,
  web = function(argv, i) return require("tide.cli.web").main(argv, i) end,
}

--- tide help [COMMAND]
local function help(topic)
  if topic == nil then io_stdout:write(USAGE); return 0 end
  if not COMMANDS[topic] then return options.usage_error("tide", "help: no command '" .. topic .. "'", USAGE) end
  return COMMANDS[topic]({ topic, "--help" }, 2)
end

--- Runs the command line `argv` (argv[1] is the command); returns the exit status.
function M.main(argv)
  local cmd = argv[1]
  if cmd == nil then return options.usage_error("tide", "missing COMMAND", USAGE) end
  if cmd == "-h" or cmd == "--help" then
    io_stdout:write(USAGE)
    return 0
  elseif cmd == "help" then
    return help(argv[2])
  elseif cmd == "-v" or cmd == "--version" or cmd == "version" then
    local v = require("tide.core").versions()
    io_stdout:write(tide._VERSION, " (", jit.version, ")\n",
                    ("built with LuaJIT %s, libuv %s, SQLite %s, libpq %s\n")
                      :format(v.luajit:gsub("^LuaJIT ", ""), v.libuv, v.sqlite, v.libpq))
    return 0
  elseif COMMANDS[cmd] then
    return COMMANDS[cmd](argv, 2)
  end
  return options.usage_error("tide", "unknown command '" .. cmd .. "'", USAGE)
end

return M
