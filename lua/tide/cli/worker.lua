--- tide.cli.worker — `tide worker`: performs durable jobs until SIGINT/SIGTERM, or until drained.
--
-- The root task awaits SCRIPT (when given; the table it returns is the
-- targets), starts a tide.worker and waits for it.  A signal stops the
-- worker through its own shutdown hook: claiming stops, running jobs get
-- the grace period, jobs still running then are released.  The exit status
-- says whether every outcome was written (0) or not (1).
local H = require "tide.engine.host"
local S = require "tide.engine.sched"
local config = require "tide.engine.config"
local core = require "tide.core"
local job = require "tide.jobs.job"
local options = require "tide.cli.options"
local store = require "tide.cli.store"
local tide = require "tide"
local logs = require "tide.observe.logs"

local type, tostring, ipairs, pairs, pcall = type, tostring, ipairs, pairs, pcall
local concat, sort = table.concat, table.sort
local io_stdout, io_stderr = io.stdout, io.stderr

local M = {}

local PROG = "tide worker"

-- After --grace, the jobs still running are cancelled and their leases
-- released; the loop waits up to this long more for those writes (on a
-- loaded machine a write can take longer than a short grace), and the
-- process exits as soon as they are done.
local RELEASE_WINDOW = 2000

M.USAGE = [=[
Usage: tide worker [OPTIONS] [SCRIPT [ARGS...]]

Takes durable jobs from the store and runs TARGET.METHOD(args, job) for each,
until SIGINT/SIGTERM (or, with --drain, until no job is due or executing).
SCRIPT, when given, runs first as the root task (it sees ARGS in `arg` and
`...`); the table it returns maps target names to tables of methods.  Other
targets are required by name, SCRIPT's directory first on package.path.
Options come before SCRIPT; what follows SCRIPT is the script's.

Options:
  --store URL          job store: sqlite:PATH or postgres://[USER@]HOST[:PORT]/DB
                       (default $TIDE_STORE, else sqlite:tide.db)
  --queue NAME[=N]     take jobs from queue NAME, N at a time (repeatable;
                       default: the queue "default")
  --concurrency N      jobs at a time for each queue given without =N (default 10)
  --lease MS           how long a claimed job is leased; running jobs' leases
                       are extended (default 30000, at least 100)
  --poll MS            how often to look for due jobs (default 1000)
  --grace MS           time running jobs get to finish on SIGINT/SIGTERM
                       (default 5000); jobs still running then are cancelled
                       and released (the releases get up to 2 s more)
  --schedule FILE      run the cron schedules FILE returns (repeatable): a Lua
                       file that returns a list of { cron =, target =, method =,
                       args =, timezone =, catch_up =, queue =, name = }; one
                       job per tick whatever the number of workers
  --drain              exit once no job of these queues is due or executing
  --give-up MS         with --drain: stop and exit 1 once the store has kept
                       failing this long (claims, writes, ...; default 60s)
  --quiet              print nothing but errors (no start line, failed
                       attempts, status line or summary)
  --log-format FORMAT  human (the default) or json: one JSON object per line
                       (time, level, event, job, queue, attempt, error, ...)
  --metrics ADDR       serve Prometheus metrics at http://ADDR/metrics
                       (HOST:PORT, like 127.0.0.1:9464)
  --web ADDR           serve the dashboard of the store at http://ADDR/
                       (its address with the token is printed at start)
  --token TOKEN        the dashboard's access token (default: a random one)
  -h, --help           show this help

MS options take a number of ms, or 500ms, 30s, 5m, 2h, 1d.  The summary
counts what the store took: an attempt whose job was cancelled in the store
meanwhile counts as cancelled, one whose lease had passed to another worker
as lost.  Exit status: 0 after --drain or a clean stop on SIGINT/SIGTERM; 1
when the store cannot be opened, SCRIPT fails, an outcome could not be
written, or --drain gave up on a failing store; 2 for bad options.
]=]

-- ===== options

--- "NAME" or "NAME=N" -> { name, n or false }; N as --concurrency takes it.
local function queue_opt(s)
  local qname, text = s:match("^([^=]+)=(.*)$")
  local n = text and options.opt.concurrency.conv(text)
  if text and not n then return nil end
  qname = qname or s
  if not job.is_name(qname) then return nil end
  return { name = qname, n = n or false }
end

local W = require("tide.cli.web").opt
local o = options.opt
local OPTS = {
  ["--metrics"] = W.metrics, ["--web"] = W.web, ["--token"] = W.token, ["--log-format"] = W.log_format,
  ["--store"] = o.store, ["--concurrency"] = o.concurrency, ["--lease"] = o.lease,
  ["--poll"] = o.poll, ["--grace"] = o.grace, ["--drain"] = o.drain, ["--quiet"] = o.quiet,
  ["--give-up"] = o.give_up,
  ["--schedule"] = { key = "schedule_files", meta = "FILE", many = true, conv = function(s) return s end,
                     expected = "file" },
  ["--help"] = o.help, ["-h"] = o.help,
  ["--queue"] = { key = "queues", meta = "NAME[=N]", many = true, conv = queue_opt,
                  expected = "NAME or NAME=N (a queue name, N an integer >= 1)" },
}

--- The schedules of the --schedule files, checked; or nil and a message.
--- A file is Lua that returns a list of schedule tables; it runs with no
--- globals but the table library and string functions (it is data).
local function schedule_files(files)
  local all = {}
  for _, path in ipairs(files or {}) do
    local chunk, err = loadfile(path)
    if not chunk then return nil, ("--schedule %s: %s"):format(path, err) end
    setfenv(chunk, { string = string, table = table, math = math, os = { getenv = os.getenv } })
    local ok, list = pcall(chunk)
    if not ok then return nil, ("--schedule %s: %s"):format(path, tostring(list)) end
    if type(list) ~= "table" then
      return nil, ("--schedule %s returned %s, not a list of schedules"):format(path, type(list))
    end
    for _, s in ipairs(list) do all[#all + 1] = s end
    local fine, why = pcall(require("tide.jobs.schedules").check, "--schedule " .. path, list)
    if not fine then return nil, tostring(why) end
  end
  if #all == 0 then return nil end
  local fine, why = pcall(require("tide.jobs.schedules").check, "--schedule", all)
  if not fine then return nil, tostring(why) end
  return all
end

--- { name = concurrency } from --queue and --concurrency; or nil and a message.
local function queues_of(opts)
  local n = opts.concurrency or 10
  if not opts.queues then return { default = n } end
  local out = {}
  for _, q in ipairs(opts.queues) do
    if out[q.name] then return nil, ("--queue %s given twice"):format(q.name) end
    out[q.name] = q.n or n
  end
  return out
end

local function queues_text(queues)
  local list = {}
  for qname, n in pairs(queues) do list[#list + 1] = qname .. "=" .. n end
  sort(list)
  return concat(list, " ")
end

-- ===== what the worker says on stderr

--- Writes a line to stderr, above the status line when it shows; with
--- --log-format json, the event and its fields as a JSON line instead.
local function say(run, line, level, event, fields)
  if run.opts.log_format == "json" and event then return logs.event(level, event, fields) end
  io_stderr:write(run.live and "\r\27[K" or "", line, "\n")
end

--- on_outcome for the worker: one line per failed attempt, and for each
--- attempt the store did not take as this worker saw it (with
--- --log-format json, one event each).
local function outcome_line(run)
  return function(ev)
    local job, outcome, err, trace = ev.job, ev.outcome, ev.error, ev.traceback
    local head = ("%s: job %d (%s.%s) attempt %d/%d"):format(PROG, job.id, job.target, job.method,
                                                          job.attempt, job.max_attempts)
    local why = (tostring(err):match("^[^\n]*"))
    local fields = { job = job.id, queue = job.queue, target = job.target, method = job.method,
                     attempt = job.attempt, max_attempts = job.max_attempts, outcome = outcome }
    if outcome == "retried" or outcome == "discarded" then
      fields.will_retry, fields.error, fields.traceback = outcome == "retried", tostring(err), trace
      say(run, ("%s failed, %s: %s"):format(head, outcome == "discarded" and "discarded" or "will retry", why),
          outcome == "discarded" and "error" or "warn", "job_failed", fields)
    elseif outcome == "lost" then
      say(run, ("%s: not recorded, its lease had passed to another worker"):format(head), "warn", "job_lost", fields)
    elseif outcome == "cancelled" then
      say(run, ("%s: not recorded, the job was cancelled or expired in the store"):format(head), "warn",
          "job_cancelled", fields)
    elseif outcome == "unwritten" then
      say(run, ("%s: its outcome could not be written (the lease will run out and it will run again)")
        :format(head), "error", "job_unwritten", fields)
    end
  end
end

--- Redraws the status line: jobs/s since the last redraw, running, counts.
local function status_line(run)
  local info, now = run.w:info(), tide.now()
  local done = info.completed + info.retried + info.discarded
  local rate = (done - run.last_done) * 1000 / math.max(now - run.last_at, 1)
  run.last_done, run.last_at = done, now
  io_stderr:write(("\r\27[K%s: %.1f jobs/s, %d running, %d completed, %d retried, %d discarded")
    :format(PROG, rate, info.running, info.completed, info.retried, info.discarded))
end

local function summary(run)
  local info = run.w:info()
  local extra = {}
  for _, k in ipairs{ "cancelled", "lost", "rescued", "write_errors", "unwritten" } do
    if info[k] > 0 then extra[#extra + 1] = (", %d %s"):format(info[k], (k:gsub("_", " "))) end
  end
  local secs = (tide.now() - run.t0) / 1000
  return ("%s %s: stopped after %.1f s: %d completed, %d retried, %d discarded, %d released%s")
    :format(PROG, info.id, secs, info.completed, info.retried, info.discarded, info.released, concat(extra)),
    { worker = info.id, seconds = secs, claimed = info.claimed, completed = info.completed, retried = info.retried,
      discarded = info.discarded, released = info.released, cancelled = info.cancelled, rescued = info.rescued,
      write_errors = info.write_errors, unwritten = info.unwritten }
end

-- ===== the root task

--- Awaits SCRIPT; returns its targets (a table or nil), or nil and why not.
local function script_targets(run)
  local t = run.script
  local status, value = t:await()
  if status ~= "ok" then return nil, t.traceback or tostring(value) end
  if value ~= nil and type(value) ~= "table" then
    return nil, ("%s returned %s, not a table of targets (name -> table of methods)")
      :format(run.script_path, type(value))
  end
  return value or {}
end

local function start_worker(run, targets)
  local opts = run.opts
  local ok, w = pcall(tide.worker, {
    queue = run.q, queues = run.queues, targets = targets, lease = opts.lease, schedules = run.schedules,
    poll = opts.poll, grace = run.grace, give_up = opts.give_up,
    on_outcome = not opts.quiet and outcome_line(run) or nil,
  })
  if not ok then
    return nil, ("the targets %s returned: %s"):format(run.script_path or "SCRIPT",
                                                      (tostring(w):gsub("^tide%.worker: ", "")))
  end
  if not w then return nil end               -- a signal came first: nothing started
  -- A signal while tide.worker waited for the store (PostgreSQL connects)
  -- came before the worker's own shutdown hook: stop it here.
  if S.shutting_down() then w:stop() end
  return w
end

local function main(run)
  local targets, w, err = {}, nil, nil
  if run.script then targets, err = script_targets(run) end
  if targets and not S.shutting_down() then w, err = start_worker(run, targets) end
  if not w then                          -- (no error: a signal came first)
    if err then run.failed = err; S.shutdown(0, "tide worker: failed to start") end
    return
  end
  run.w, run.t0, run.last_at, run.last_done = w, tide.now(), tide.now(), 0
  if not run.opts.quiet then
    local function stopping(reason)
      if H.signal then
        local n = w:info().running
        say(run, ("%s %s: %s: stopping; %d running job%s get%s %d ms"):format(PROG, w.id, reason,
            n, n == 1 and "" or "s", n == 1 and "s" or "", run.grace), "info", "worker_stopping",
            { worker = w.id, reason = reason, running = n, grace_ms = run.grace })
      end
    end
    local sched = ""
    if run.schedules then
      local names = {}
      for i, s in ipairs(run.schedules) do names[i] = s.name or (s.target .. "." .. s.method) end
      sched = ", schedules " .. concat(names, " ")
    end
    say(run, ("%s %s: %s, queues %s, lease %d ms%s"):format(PROG, w.id, run.q.name,
        queues_text(run.queues), w.lease, sched), "info", "worker_started",
        { worker = w.id, store = run.q.name, queues = run.queues, lease_ms = w.lease })
    -- A signal that came while tide.worker waited for the store (PostgreSQL
    -- connects and LISTENs; its claimer may have started jobs meanwhile)
    -- found no hook here yet: say it now.
    if S.shutting_down() then stopping(H.signal and ("shutdown (SIG%s)"):format(H.signal == 15 and "TERM"
                                       or H.signal == 2 and "INT" or tostring(H.signal)) or "shutdown")
    else S.on_shutdown(stopping) end
    if core.isatty(2) and run.opts.log_format ~= "json" then
      run.live = true
      run.timer = tide.every(1000, function() status_line(run) end)
    end
  end
  if run.opts.drain then
    w:drain{ stop = true }
    S.shutdown(config.grace, "tide worker: drained")   -- tasks SCRIPT left running
  else
    w:wait()
  end
end

--- After the loop: the summary and the exit status.
local function finish(run)
  if run.timer then run.timer:stop() end
  if run.live then io_stderr:write("\r\27[K") end
  run.live = false
  local w = run.w
  if w and not run.opts.quiet then
    local line, fields = summary(run)
    say(run, line, "info", "worker_stopped", fields)
  end
  for _, srv in ipairs(run.servers or {}) do srv:close() end
  run.q:close()
  if run.failed then return options.fail(PROG, run.failed) end
  if not w then                                   -- the loop stopped before the worker started
    if H.signal then return 128 + H.signal end
    return options.fail(PROG, "the loop shut down before the worker started")
  end
  local info = w:info()                           -- (after w:wait(): every outcome written, or counted)
  if info.gave_up then return options.fail(PROG, "gave up: " .. info.gave_up) end
  return (info.running == 0 and info.unwritten == 0) and 0 or 1
end

--- Prepends SCRIPT's directory to package.path: require finds the modules beside it.
local function add_script_dir(path)
  local dir = path:match("^(.*/)[^/]*$") or "./"
  package.path = dir .. "?.lua;" .. dir .. "?/init.lua;" .. package.path
end

--- tide worker [OPTIONS] [SCRIPT [ARGS...]]
function M.main(argv, i)
  local opts, pos = options.parse(argv, i, OPTS, true)
  if not opts then return options.usage_error(PROG, pos, M.USAGE) end
  if opts.help then io_stdout:write(M.USAGE); return 0 end
  local queues, qerr = queues_of(opts)
  if not queues then return options.usage_error(PROG, qerr, M.USAGE) end
  local url, uerr = store.url(opts)
  if not url then return options.usage_error(PROG, uerr, M.USAGE) end
  local scheds, serr = schedule_files(opts.schedule_files)
  if serr then io_stderr:write(PROG, ": ", serr, "\n"); return 2 end
  local q, status = store.open(PROG, url, false)
  if not q then return status end
  local grace = opts.grace or config.grace      -- the jobs'; the loop's adds the release window
  tide.configure{ grace = grace + RELEASE_WINDOW }
  if opts.log_format == "json" then logs.use_json() end
  local run = { q = q, opts = opts, queues = queues, live = false, schedules = scheds, grace = grace }
  if opts.metrics or opts.web then
    local l, lerr = require("tide.cli.web").listen(PROG, { metrics = opts.metrics, web = opts.web,
                                                           token = opts.token, queue = q })
    if not l then q:close(); return options.fail(PROG, lerr) end
    run.servers = l.servers
    if l.web_url then
      say(run, ("%s: dashboard at %s"):format(PROG, l.web_url), "info", "dashboard", { url = l.web_url })
    end
    if l.metrics and not opts.quiet then
      say(run, ("%s: metrics at %s"):format(PROG, l.metrics:url("/metrics")), "info", "metrics",
          { url = l.metrics:url("/metrics") })
    end
  end
  if pos[1] then
    run.script_path = pos[1]
    add_script_dir(pos[1])
    local err
    run.script, err = H.spawn_file(pos[1], { select(2, unpack(pos)) })
    if not run.script then q:close(); return options.fail(PROG, err) end
  end
  tide.spawn{ run = main, args = { run }, name = "tide worker" }
  H.loop()
  return finish(run)
end

return M
