--- tide.cli.flows — `tide flows`: list, show, draw, cancel and retry durable flow runs.
local graph = require "tide.flow.graph"
local options = require "tide.cli.options"
local print = require "tide.cli.print"
local store = require "tide.cli.store"

local tostring, ipairs = tostring, ipairs
local concat, format = table.concat, string.format
local io_stdout, io_stderr = io.stdout, io.stderr
local json, json_object, json_array = print.json, print.json_object, print.json_array
local iso, iso_s, cell, print_table = print.iso, print.iso_s, print.cell, print.table
local MAX_INT = options.MAX_INT

local M = {}

M.USAGE = [=[
Usage: tide flows [--store URL] [--json] COMMAND [ARGS]

Durable flows: runs started with q:enqueue_flow / tx:enqueue_flow, whose
steps are jobs that `tide worker` runs.

Commands:
  list [--status S] [--flow NAME] [--limit N] [--before ID]
                        runs, newest first (at most 100 unless --limit)
  show RUN              the run and each step: status, attempts, duration,
                        what it waits for, its error with traceback
  graph RUN [--format dot|mermaid]
                        the run's graph coloured by status (default dot)
  cancel RUN            cancel a running run: its jobs not yet finished are
                        cancelled (running ones stop at their worker's next
                        heartbeat)
  retry RUN             run the failed, timed out, cancelled and skipped
                        steps of a finished run again; completed steps keep
                        their results

Options (anywhere on the line):
  --store URL     job store: sqlite:PATH or postgres://[USER@]HOST[:PORT]/DB
                  (default $TIDE_STORE, else sqlite:tide.db)
  --json          print JSON instead of text: list an array of runs, show a
                  run with its steps, cancel and retry {"id":N,"status":S};
                  times are ISO 8601 UTC strings, durations ms
  -h, --help      show this help

Run statuses: running, ok, error, cancelled.  Step statuses: pending,
queued, running, ok, error, timeout, skipped, cancelled.
Exit status: 0; 1 when the store cannot be opened or the run cannot be
changed ("run 7 is ok"); 2 for bad arguments.
]=]

local RUN_STATUS = { running = true, ok = true, error = true, cancelled = true }
local FORMATS = { dot = true, mermaid = true }
local o = options.opt
local OPTS = {
  ["--store"] = o.store, ["--json"] = o.json, ["--help"] = o.help, ["-h"] = o.help,
  ["--limit"] = o.limit, ["--before"] = { key = "before", meta = "ID", conv = options.integer(1),
                                          expected = "run id (integer >= 1)" },
  ["--status"] = { key = "status", meta = "STATUS", conv = function(s) return RUN_STATUS[s] and s or nil end,
                   expected = "one of running, ok, error, cancelled" },
  ["--flow"] = { key = "flow", meta = "NAME", conv = function(s) return s ~= "" and s or nil end,
                 expected = "flow module name" },
  ["--format"] = { key = "format", meta = "FORMAT", conv = function(s) return FORMATS[s] and s or nil end,
                   expected = "dot or mermaid" },
}
local GLOBAL = { ["--store"] = true, ["--json"] = true, ["--help"] = true, ["-h"] = true }
local OWN = { list = { ["--status"] = true, ["--flow"] = true, ["--limit"] = true, ["--before"] = true },
              graph = { ["--format"] = true } }
local NEEDS_RUN = { show = true, graph = true, cancel = true, retry = true, list = false }

-- ===== JSON

local function counts_json(c)
  local fields = {}
  for _, k in ipairs{ "total", "pending", "queued", "running", "ok", "error", "timeout", "skipped", "cancelled" } do
    if c and c[k] then fields[#fields + 1] = { k, json(c[k]) } end
  end
  return json_object(fields)
end

local function run_fields(r)
  return {
    { "id", json(r.id) }, { "flow", json(r.flow) }, { "status", json(r.status) }, { "key", json(r.key) },
    { "queue", json(r.queue) }, { "inserted_at", json(iso(r.inserted_at)) },
    { "completed_at", json(iso(r.completed_at)) }, { "duration_ms", json(r.duration) },
    { "error", json(r.error) },
  }
end

local function step_json(s)
  return json_object{
    { "name", json(s.name) }, { "status", json(s.status) }, { "after", json(s.after) },
    { "job", json(s.job) }, { "attempts", json(s.attempts) }, { "queued_at", json(iso(s.queued_at)) },
    { "started_at", json(iso(s.started_at)) }, { "completed_at", json(iso(s.completed_at)) },
    { "duration_ms", json(s.duration) }, { "items", s.items and json_object{ { "total", json(s.items.total) },
      { "done", json(s.items.done) } } or "null" }, { "result", s.result_json or "null" },
    { "reason", json(s.reason) }, { "error", json(s.error) }, { "traceback", json(s.traceback) },
  }
end

-- ===== commands

local function ms_text(ms)
  if not ms then return "-" end
  if ms < 1000 then return format("%d ms", ms) end
  if ms < 60000 then return format("%.1f s", ms / 1000) end
  return format("%dm%02ds", math.floor(ms / 60000), math.floor(ms % 60000 / 1000))
end

local COMMANDS = {}

function COMMANDS.list(q, opts)
  local limit = opts.limit or 100
  local runs = q:flow_runs{ status = opts.status, flow = opts.flow, limit = limit + 1, before = opts.before }
  local more = runs[limit + 1] ~= nil
  runs[limit + 1] = nil
  if opts.json then
    local items = {}
    for i, r in ipairs(runs) do
      local f = run_fields(r)
      f[#f + 1] = { "steps", counts_json(r.steps) }
      items[i] = json_object(f)
    end
    io_stdout:write(json_array(items), "\n")
    return 0
  end
  if #runs == 0 then io_stdout:write("no runs\n"); return 0 end
  local rows = {}
  for i, r in ipairs(runs) do
    local c = r.steps or {}
    local done = (c.ok or 0) + (c.skipped or 0)
    local bad = (c.error or 0) + (c.timeout or 0) + (c.cancelled or 0)
    rows[i] = { tostring(r.id), cell(r.flow, 30), r.status, ("%d/%d"):format(done, c.total or 0),
                tostring(bad), iso_s(r.inserted_at), ms_text(r.duration), cell(r.key or "", 24),
                cell(r.error or "", 50) }
  end
  print_table({ "ID", "FLOW", "STATUS", "DONE", "FAILED", "STARTED", "DURATION", "KEY", "ERROR" }, rows,
              { true, [4] = true, [5] = true, [7] = true })
  if more then
    io_stderr:write(("(more runs: --before %d for the next page, or a --limit above %d)\n"):format(runs[#runs].id, limit))
  end
  return 0
end

local function indented(pad, text)
  for line in (tostring(text) .. "\n"):gmatch("(.-)\n") do io_stdout:write(pad, line, "\n") end
end

local function show_text(r)
  local fields = {
    { "run", r.id }, { "flow", r.flow }, { "status", r.status }, { "key", r.key }, { "queue", r.queue },
    { "started", iso(r.inserted_at) }, { "finished", iso(r.completed_at) }, { "duration", ms_text(r.duration) },
    { "input", json(r.input) }, { "error", r.error },
  }
  for _, f in ipairs(fields) do
    io_stdout:write(("%-9s %s\n"):format(f[1] .. ":", f[2] == nil and "-" or tostring(f[2])))
  end
  io_stdout:write("\n")
  local rows = {}
  for i, s in ipairs(r.steps) do
    local note = s.error and cell(s.error, 50) or s.reason and cell(s.reason, 50)
                 or s.items and ("%d/%d items"):format(s.items.done, s.items.total) or ""
    rows[i] = { s.name, s.status, tostring(s.attempts), ms_text(s.duration),
                cell(#s.after > 0 and concat(s.after, ",") or "-", 30), note }
  end
  print_table({ "STEP", "STATUS", "ATTEMPTS", "DURATION", "AFTER", "NOTE" }, rows, { [3] = true, [4] = true })
  for _, s in ipairs(r.steps) do
    if s.error then
      io_stdout:write(("\nstep %s %s:\n"):format(s.name, s.status))
      local msg, tb = tostring(s.error), s.traceback
      indented("    ", msg)
      if tb then indented("    ", tb:sub(1, #msg) == msg and tb:sub(#msg + 1):gsub("^\n", "") or tb) end
    end
  end
end

function COMMANDS.show(q, opts, id)
  local r = q:flow_run(id)
  if not r then return options.fail("tide flows", ("run %d not found"):format(id)) end
  if opts.json then
    local f = run_fields(r)
    f[#f + 1] = { "input", json(r.input) }
    local steps = {}
    for i, s in ipairs(r.steps) do steps[i] = step_json(s) end
    f[#f + 1] = { "steps", json_array(steps) }
    io_stdout:write(json_object(f), "\n")
  else
    show_text(r)
  end
  return 0
end

--- The run as tide.flow.graph draws flows: { name, order, nodes } and a report.
function M.picture(r)
  local f = { name = r.flow .. " #" .. r.id, order = {}, nodes = {} }
  local report = { tasks = {} }
  for i, s in ipairs(r.steps) do
    f.order[i] = s.name
    f.nodes[s.name] = { name = s.name, after = s.after, each = s.each }
    report.tasks[s.name] = { status = s.status }
  end
  return f, report
end

function COMMANDS.graph(q, opts, id)
  local r = q:flow_run(id)
  if not r then return options.fail("tide flows", ("run %d not found"):format(id)) end
  local f, report = M.picture(r)
  local text = graph.draw(f, opts.format or "dot", report)
  if opts.json then
    io_stdout:write(json_object{ { "id", json(id) }, { "format", json(opts.format or "dot") },
                                 { "graph", json(text) } }, "\n")
  else
    io_stdout:write(text)
  end
  return 0
end

local function change(method, done)
  return function(q, opts, id)
    local ok, why = q[method](q, id)
    if not ok then return options.fail("tide flows", why) end
    local r = q:flow_run(id)
    if opts.json then
      io_stdout:write(json_object{ { "id", json(id) }, { "status", json(r.status) } }, "\n")
    else
      io_stdout:write(done(r), "\n")
    end
    return 0
  end
end
COMMANDS.cancel = change("cancel_flow", function(r)
  return ("run %d cancelled (running steps stop at their worker's next heartbeat)"):format(r.id)
end)
COMMANDS.retry = change("retry_flow", function(r)
  local n = 0
  for _, s in ipairs(r.steps) do if s.status ~= "ok" then n = n + 1 end end
  return ("run %d will run %d step%s again"):format(r.id, n, n == 1 and "" or "s")
end)

--- tide flows [--store URL] [--json] COMMAND [ARGS]
function M.main(argv, i)
  local prog, usage = "tide flows", M.USAGE
  local opts, pos = options.parse(argv, i, OPTS)
  if not opts then return options.usage_error(prog, pos, usage) end
  if opts.help then io_stdout:write(usage); return 0 end
  local cmd = table.remove(pos, 1)
  if cmd == nil then return options.usage_error(prog, "missing COMMAND", usage) end
  if NEEDS_RUN[cmd] == nil then return options.usage_error(prog, ("unknown command '%s'"):format(cmd), usage) end
  for _, oname in ipairs(opts.given) do
    if not GLOBAL[oname] and not (OWN[cmd] or {})[oname] then
      return options.usage_error(prog, ("%s is not an option of '%s'"):format(oname, cmd), usage)
    end
  end
  local id
  if NEEDS_RUN[cmd] then
    if pos[1] == nil then return options.usage_error(prog, cmd .. ": missing RUN", usage) end
    id = pos[1]:match("^%d+$") and options.exact_integer(pos[1])
    if not id or id < 1 or id > MAX_INT then
      return options.usage_error(prog, ("%s: bad RUN (run id, an integer >= 1 expected, got '%s')"):format(cmd, pos[1]), usage)
    end
    if pos[2] then return options.usage_error(prog, ("%s: unexpected argument '%s'"):format(cmd, pos[2]), usage) end
  elseif pos[1] then
    return options.usage_error(prog, ("%s: unexpected argument '%s'"):format(cmd, pos[1]), usage)
  end
  return store.with(prog, opts, usage, COMMANDS[cmd], opts, id)
end

return M
