--- tide.cli — the `tide` command line.
local H = require "tide.engine.host"
local tide = require "tide"

local io_stdout, io_stderr = io.stdout, io.stderr

local M = {}

local USAGE = [=[
Usage: tide COMMAND [ARGS...]

Commands:
  run [OPTIONS] SCRIPT [ARGS...]   run an orchestrator script as the root task
  worker [OPTIONS] [SCRIPT [ARGS...]]
                                   perform durable jobs with the targets SCRIPT returns
  enqueue [OPTIONS] TARGET METHOD [JSON_ARGS]
                                   add a durable job
  jobs [OPTIONS] COMMAND [ARGS]    list, show, retry, cancel, expire, fail, stats, prune
  web [OPTIONS]                    serve the dashboard of a job store in the browser
  graph [--format dot|mermaid] SCRIPT [ARGS...]
                                   print the flows SCRIPT defines, without running them
  help [COMMAND]                   show this help, or a command's
  version                          print the version

Options for run:
  --grace MS     grace period for running tasks on SIGINT/SIGTERM (default 5000)
  --quiet        no progress line (it shows only when stderr is a terminal)
  --metrics ADDR serve Prometheus metrics at http://ADDR/metrics while the
                 script runs (ADDR is HOST:PORT, like 127.0.0.1:9464)
  --log-format human|json
                 json: errors as one JSON object per line on stderr
  --             end of options

worker, enqueue, jobs and web use the job store given by --store URL, else
$TIDE_STORE, else sqlite:tide.db; `tide COMMAND --help` lists their options.

The script sees its arguments in `arg` (arg[0] is the script) and in `...`,
as under luajit; it may tide.sleep and await at top level.  The process exits
when no work is left: 0, 1 when the script failed, 130/143 after SIGINT/SIGTERM.

Options:
  -h, --help      show this help
  -v, --version   print the version
]=]

local function usage_error(msg)
  io_stderr:write("tide: ", msg, "\n\n", USAGE)
  return 2
end

--- Spawns argv[i] as the root task with argv[i+1..] as its arguments.
--- Returns the task, or nil and the exit status (usage 2, load error 1).
local function spawn_script(cmd, argv, i)
  local script = argv[i]
  if script == nil then return nil, usage_error(cmd .. ": missing SCRIPT") end
  local args = {}
  for j = i + 1, #argv do args[#args + 1] = argv[j] end
  local t, err = H.spawn_file(script, args)
  if not t then
    io_stderr:write("tide: ", err, "\n")
    return nil, 1
  end
  return t
end

--- After the loop, as H.run does, with the root task's failure as a JSON line.
local function json_exit_status()
  local root = H.root
  if H.signal then return 128 + H.signal end
  if root == nil or root._state == "ok" then return 0 end
  require("tide.observe.logs").event("error", "script_failed", { task = root.id, error = tostring(root.value),
                                                                traceback = root.traceback })
  return 1
end

local function run(argv, i)
  local quiet, metrics, json = false, nil, false
  while argv[i] and argv[i]:sub(1, 2) == "--" do
    local opt = argv[i]
    if opt == "--" then i = i + 1; break
    elseif opt == "--quiet" then quiet, i = true, i + 1
    elseif opt == "--metrics" then
      if not require("tide.engine.http").parse_address(argv[i + 1]) then
        return usage_error("run: --metrics expects HOST:PORT (like 127.0.0.1:9464), got " .. tostring(argv[i + 1]))
      end
      metrics, i = argv[i + 1], i + 2
    elseif opt == "--log-format" then
      if argv[i + 1] ~= "json" and argv[i + 1] ~= "human" then
        return usage_error("run: --log-format expects human or json, got " .. tostring(argv[i + 1]))
      end
      json, i = argv[i + 1] == "json", i + 2
    elseif opt == "--grace" then
      local ms = tonumber(argv[i + 1])
      if not ms or ms < 0 or ms ~= ms or ms == math.huge then
        return usage_error("run: --grace expects a number of milliseconds >= 0, got " ..
                           tostring(argv[i + 1]))
      end
      tide.configure{ grace = ms }
      i = i + 2
    else
      return usage_error("run: unknown option '" .. opt .. "'")
    end
  end
  if json then require("tide.observe.logs").use_json() end
  local servers
  if metrics then
    local err
    servers, err = require("tide.cli.web").listen("tide run", { metrics = metrics })
    if not servers then io_stderr:write("tide run: ", err, "\n"); return 1 end
  end
  local t, status = spawn_script("run", argv, i)
  if not t then return status end
  require("tide.flow.run").progress = not quiet and not json and require("tide.core").isatty(2)
  local code
  if json then H.loop(); code = json_exit_status() else code = H.run() end
  for _, srv in ipairs(servers and servers.servers or {}) do srv:close() end
  return code
end

--- tide graph: runs the script until its first flow:run or flow:start, then
--- prints every flow it defined.
local function graph(argv, i)
  local format = "dot"
  if argv[i] == "--format" then
    format = argv[i + 1]
    if format ~= "dot" and format ~= "mermaid" then
      return usage_error("graph: --format expects dot or mermaid, got " .. tostring(format))
    end
    i = i + 2
  end
  local flow = require "tide.flow.run"
  flow.graph_only = true
  local t, status = spawn_script("graph", argv, i)
  if not t then return status end
  local script = argv[i]
  H.loop()
  if t:status() ~= "ok" and t.value ~= flow.GRAPH_STOP then
    io_stderr:write("tide: ", t.traceback or tostring(t.value), "\n")
    return 1
  end
  if #flow.defined == 0 then
    io_stderr:write("tide: graph: ", script, " defines no flow\n")
    return 1
  end
  for _, f in ipairs(flow.defined) do io_stdout:write(f:graph(format)) end
  return 0
end

--- The job commands, each (argv, i) -> exit status; loaded when used.
local JOB_COMMANDS = {
  worker = function(argv, i) return require("tide.cli.worker").main(argv, i) end,
  enqueue = function(argv, i) return require("tide.cli.jobs").enqueue(argv, i) end,
  jobs = function(argv, i) return require("tide.cli.jobs").jobs(argv, i) end,
  web = function(argv, i) return require("tide.cli.web").main(argv, i) end,
}

--- tide help [COMMAND]
local function help(topic)
  if topic == nil or topic == "run" or topic == "graph" then io_stdout:write(USAGE); return 0 end
  if not JOB_COMMANDS[topic] then return usage_error("help: no help for '" .. topic .. "'") end
  return JOB_COMMANDS[topic]({ topic, "--help" }, 2)
end

--- Runs the command line `argv` (argv[1] is the command); returns the exit status.
function M.main(argv)
  local cmd = argv[1]
  if cmd == nil then return usage_error("missing COMMAND") end
  if cmd == "-h" or cmd == "--help" then
    io_stdout:write(USAGE)
    return 0
  elseif cmd == "help" then
    return help(argv[2])
  elseif JOB_COMMANDS[cmd] then
    return JOB_COMMANDS[cmd](argv, 2)
  elseif cmd == "-v" or cmd == "--version" or cmd == "version" then
    io_stdout:write(tide._VERSION, " (", jit.version, ")\n")
    return 0
  elseif cmd == "run" then
    return run(argv, 2)
  elseif cmd == "graph" then
    return graph(argv, 2)
  end
  return usage_error("unknown command '" .. cmd .. "'")
end

return M
