--- tide.cli.jobs — `tide enqueue` and `tide jobs`: add, list, show and change durable jobs.
local job = require "tide.jobs.job"
local json_lib = require "tide.jobs.json"
local options = require "tide.cli.options"
local print = require "tide.cli.print"
local store = require "tide.cli.store"

local tostring, ipairs, pairs, pcall = tostring, ipairs, pairs, pcall
local concat, sort = table.concat, table.sort
local io_stdout, io_stderr = io.stdout, io.stderr
local json, json_object, json_array = print.json, print.json_object, print.json_array
local iso, iso_s, cell, print_table = print.iso, print.iso_s, print.cell, print.table
local STATUSES, MAX_INT = job.STATUSES, options.MAX_INT

local M = {}

local function job_json(j)
  local errors = {}
  for i, e in ipairs(j.errors) do
    errors[i] = json_object{ { "attempt", json(e.attempt) }, { "at", json(iso(e.at)) },
                             { "error", json(e.error) }, { "traceback", json(e.traceback) } }
  end
  local fields = {}
  for _, k in ipairs{ "id", "queue", "target", "method", "status", "priority", "attempt",
                      "max_attempts" } do
    fields[#fields + 1] = { k, json(j[k]) }
  end
  for _, k in ipairs{ "run_at", "inserted_at", "attempted_at", "completed_at" } do
    fields[#fields + 1] = { k, json(iso(j[k])) }
  end
  fields[#fields + 1] = { "idempotency_key", json(j.idempotency_key) }
  fields[#fields + 1] = { "lease_owner", json(j.lease_owner) }
  fields[#fields + 1] = { "lease_expires", json(iso(j.lease_expires)) }
  fields[#fields + 1] = { "encrypted", json(j.encrypted or false) }
  fields[#fields + 1] = { "args", json(j.args) }
  if j.args_error then fields[#fields + 1] = { "args_error", json(j.args_error) } end
  if j.corrupt then fields[#fields + 1] = { "corrupt", json(j.corrupt) } end
  fields[#fields + 1] = { "errors", json_array(errors) }
  return json_object(fields)
end

-- ===== tide enqueue

M.ENQUEUE_USAGE = [=[
Usage: tide enqueue [OPTIONS] TARGET METHOD [JSON_ARGS]

Adds a durable job: a worker will call TARGET.METHOD(args, job), where args
is JSON_ARGS decoded (JSON; default null).  Options may come before or after
the arguments; -- ends them.

Options:
  --store URL         job store: sqlite:PATH or postgres://[USER@]HOST[:PORT]/DB
                      (default $TIDE_STORE, else sqlite:tide.db)
  --queue NAME        queue (default "default")
  --run-at TIME       run at this UTC time: 2026-11-23T15:04:05Z,
                      "2026-11-23 16:04:05+01:00", or ms since the epoch
  --delay DURATION    run after this long: 500ms, 30s, 5m, 2h, 7d (a number is ms)
  --key KEY           idempotency key: a second enqueue with the same key adds
                      nothing and names the existing job
  --priority N        lower runs first (default 0)
  --max-attempts N    attempts before the job is discarded (default 20)
  --json              print {"id":N,"inserted":true|false}
  -h, --help          show this help

Example:
  tide enqueue orders fulfill '{"order":7}' --key order-7 --delay 10s

Exit status: 0 (also when the key existed), 1 when the store fails, 2 for
bad arguments.
]=]

local o = options.opt
local ENQUEUE_OPTS = {
  ["--store"] = o.store, ["--queue"] = o.queue, ["--run-at"] = o.run_at, ["--delay"] = o.delay,
  ["--key"] = o.key, ["--priority"] = o.priority, ["--max-attempts"] = o.max_attempts,
  ["--json"] = o.json, ["--help"] = o.help, ["-h"] = o.help,
}

--- The job spec from the parsed command line; or nil and a message.
local function enqueue_spec(opts, pos)
  local target, method, args = pos[1], pos[2], pos[3]
  if target == nil then return nil, "missing TARGET" end
  if method == nil then return nil, "missing METHOD" end
  if pos[4] ~= nil then return nil, ("unexpected argument '%s' (JSON_ARGS is one argument: quote it)"):format(pos[4]) end
  if not job.is_name(target) then
    return nil, ("bad TARGET (module name like orders or app.mail expected, got '%s')"):format(target)
  end
  if not job.is_method(method) then
    return nil, ("bad METHOD (function name expected, got '%s')"):format(method)
  end
  if opts.run_at and opts.delay then return nil, "give --run-at or --delay, not both" end
  if args ~= nil then
    local v, err = json_lib.decode(args)
    if err then return nil, ("bad JSON_ARGS (%s)"):format((err:gsub("^.-:%d+: ", ""))) end
    local fine, why = pcall(json_lib.encode, v == nil and json_lib.null or v)   -- (1e999 decodes to inf)
    if not fine then return nil, ("bad JSON_ARGS (%s)"):format(tostring(why)) end
    args = v
  end
  return { target = target, method = method, args = args, queue = opts.queue, run_at = opts.run_at,
           delay = opts.delay, priority = opts.priority, max_attempts = opts.max_attempts,
           idempotency_key = opts.key }
end

--- What `tide enqueue` says about job `id`.
local function enqueued_line(q, spec, id, inserted)
  if not inserted then
    return ("job %d already has key '%s': nothing enqueued"):format(id, spec.idempotency_key)
  end
  local j = q:job(id)
  local when = j.status == "scheduled" and "scheduled for " .. iso_s(j.run_at) or j.status
  return ("enqueued job %d (%s.%s, queue %s, %s)"):format(id, j.target, j.method, j.queue, when)
end

--- tide enqueue [OPTIONS] TARGET METHOD [JSON_ARGS]
function M.enqueue(argv, i)
  local prog, usage = "tide enqueue", M.ENQUEUE_USAGE
  local opts, pos = options.parse(argv, i, ENQUEUE_OPTS)
  if not opts then return options.usage_error(prog, pos, usage) end
  if opts.help then io_stdout:write(usage); return 0 end
  local spec, err = enqueue_spec(opts, pos)
  if not spec then return options.usage_error(prog, err, usage) end
  local url, uerr = store.url(opts)
  if not url then return options.usage_error(prog, uerr, usage) end
  local q, status = store.open(prog, url, false)
  if not q then return status end
  local ok, id, inserted = pcall(q.enqueue, q, spec)
  if ok then
    local line
    if opts.json then
      ok, line = true, json_object{ { "id", json(id) }, { "inserted", json(inserted) } }
    else
      ok, line = pcall(enqueued_line, q, spec, id, inserted)
    end
    if ok then io_stdout:write(line, "\n") end
    id = line
  end
  q:close()
  if not ok then return options.fail(prog, id) end
  return 0
end

-- ===== tide jobs

M.JOBS_USAGE = ([=[
Usage: tide jobs [--store URL] [--json] COMMAND [ARGS]

Commands:
  list [--status S] [--queue Q] [--limit N] [--before ID]
                        jobs, newest first (at most 100 unless --limit)
  show ID               every field of a job: args, and each failed attempt
                        with its error and traceback
  retry ID              run it again now (from any status but executing
                        and available)
  retry --status S [--queue Q] [--target T] [--since TIME]
                        run again every job of status S (discarded: the dead
                        letters; also scheduled, retryable, completed,
                        cancelled, expired), of queue Q and target T, that
                        finished at TIME or later; in batches of 1000, each
                        its own short transaction (workers go on between
                        them); prints how many
  cancel ID             it will not run (again); a running attempt stops at
                        its worker's next heartbeat
  cancel --status S [--queue Q] [--target T] [--since TIME]
                        cancel every job of status S (available, scheduled,
                        retryable, executing) of queue Q and target T
                        enqueued at TIME or later, in batches; prints how many
  expire ID             mark it expired: it must no longer run
  fail ID [REASON]      discard it, recording REASON
  fail --status S [--queue Q] [--target T] [--since TIME] [REASON]
                        discard every job of status S (as cancel), recording
                        REASON (words; a first one that is a number is
                        refused, as an ID), in batches; prints how many
  stats                 how many jobs per queue and status
  schedules [--next N]  the cron schedules workers run (registered when a
                        worker starts), each with its next N run times
                        (default 3) and the latest tick enqueued
  prune --older-than DURATION
                        delete jobs that finished (completed, discarded,
                        cancelled, expired) longer ago than DURATION (7d, 12h)

Options (anywhere on the line):
  --store URL     job store: sqlite:PATH or postgres://[USER@]HOST[:PORT]/DB
                  (default $TIDE_STORE, else sqlite:tide.db)
  --json          print JSON instead of text: list an array of jobs, show a
                  job, stats the counts, the others {"id":N,"status":S} or
                  {"deleted":N}; times are ISO 8601 UTC strings
  -h, --help      show this help

Statuses: %s.
Exit status: 0; 1 when the store cannot be opened or the job cannot be
changed ("job 7 is completed"); 2 for bad arguments.
]=]):format(concat(STATUSES, ", "))

local JOBS_OPTS = {
  ["--store"] = o.store, ["--json"] = o.json, ["--help"] = o.help, ["-h"] = o.help,
  ["--status"] = o.status, ["--queue"] = o.queue, ["--limit"] = o.limit, ["--before"] = o.before,
  ["--older-than"] = o.older_than,
  ["--since"] = { key = "since", meta = "TIME", conv = o.run_at.conv,
                  expected = "UTC time like 2026-11-23T15:04:05Z, or ms since the epoch" },
  ["--next"] = { key = "next", meta = "N", conv = options.integer(1, 1000), expected = "integer from 1 to 1000" },
  ["--target"] = { key = "target", meta = "MODULE", conv = function(v) return v ~= "" and v or nil end,
                   expected = "target module name" },
}
local GLOBAL_OPTS = { ["--store"] = true, ["--json"] = true, ["--help"] = true, ["-h"] = true }

--- Each command: the options it takes, how many positionals (min, max;
--- max nil = any), and its function(q, opts, args) -> exit status.
local COMMANDS = {}

local function job_id(s)
  local id = s and s:match("^%d+$") and options.exact_integer(s)
  if id and id >= 1 and id <= MAX_INT then return id end
end

--- `list`: an aligned table, or a JSON array.
function COMMANDS.list(q, opts)
  local limit = opts.limit or 100
  local jobs = q:list{ status = opts.status, queue = opts.queue, limit = limit + 1,
                       before = opts.before }
  local more = jobs[limit + 1] ~= nil               -- (one more than shown: is there a next page?)
  jobs[limit + 1] = nil
  if opts.json then
    local items = {}
    for i, j in ipairs(jobs) do items[i] = job_json(j) end
    io_stdout:write(json_array(items), "\n")
    return 0
  end
  if #jobs == 0 then io_stdout:write("no jobs\n"); return 0 end
  local rows = {}
  for i, j in ipairs(jobs) do
    local last = j.errors[#j.errors]
    local stopping = job.is_stopping(j)
    rows[i] = { tostring(j.id), cell(j.queue or "?", 30), cell(tostring(j.target) .. "." .. tostring(j.method), 40),
                j.corrupt and "corrupt" or stopping and j.status .. " (stopping)" or j.status,
                tostring(j.attempt or "?") .. "/" .. tostring(j.max_attempts or "?"),
                iso_s(j.run_at), j.corrupt and cell("corrupt row: " .. j.corrupt, 60) or last and cell(last.error, 60) or "" }
  end
  print_table({ "ID", "QUEUE", "JOB", "STATUS", "ATTEMPT", "RUN AT", "LAST ERROR" }, rows,
              { true, [5] = true })
  if more then
    io_stderr:write(("(more jobs: --before %d for the next page, or a --limit above %d)\n")
      :format(jobs[#jobs].id, limit))
  end
  return 0
end
COMMANDS.list_opts = { ["--status"] = true, ["--queue"] = true, ["--limit"] = true, ["--before"] = true }

--- Writes `text` indented by `pad`, line by line.
local function indented(pad, text)
  for line in (tostring(text) .. "\n"):gmatch("(.-)\n") do io_stdout:write(pad, line, "\n") end
end

local function show_text(j)
  local args = j.args_error and "(" .. j.args_error .. ")" or json(j.args)
  local fields = {
    { "id", j.id }, { "queue", j.queue }, { "target", j.target }, { "method", j.method },
    { "status", j.status }, { "attempt", tostring(j.attempt or "?") .. "/" .. tostring(j.max_attempts or "?") },
    { "priority", j.priority }, { "idempotency_key", j.idempotency_key },
    { "run_at", iso(j.run_at) }, { "inserted_at", iso(j.inserted_at) },
    { "attempted_at", iso(j.attempted_at) }, { "completed_at", iso(j.completed_at) },
    { "lease_owner", j.lease_owner }, { "lease_expires", iso(j.lease_expires) },
    { "encrypted", j.encrypted and "yes" or "no" }, { "args", args }, { "errors", #j.errors },
  }
  if j.corrupt then table.insert(fields, 6, { "corrupt", j.corrupt }) end
  for _, f in ipairs(fields) do
    io_stdout:write(("%-16s %s\n"):format(f[1] .. ":", f[2] == nil and "-" or tostring(f[2])))
  end
  for i, e in ipairs(j.errors) do
    io_stdout:write(("  #%d  attempt %s at %s\n"):format(i, tostring(e.attempt or "-"), iso(e.at) or "-"))
    local msg, tb = tostring(e.error), e.traceback
    indented("      ", msg)
    if tb then                               -- (a traceback starts with the message: once is enough)
      indented("      ", tb:sub(1, #msg) == msg and tb:sub(#msg + 1):gsub("^\n", "") or tb)
    end
  end
end

--- `show ID`: "key: value" lines, or the job as JSON.
function COMMANDS.show(q, opts, args)
  local id = args[1]
  local j = q:job(id)
  if not j then return options.fail("tide jobs", ("job %d not found"):format(id)) end
  if opts.json then io_stdout:write(job_json(j), "\n") else show_text(j) end
  return 0
end

local DONE = {
  retry = function(j) return ("job %d will run again now (%s)"):format(j.id, j.status) end,
  cancel = function(j, before)
    return ("job %d cancelled%s"):format(j.id, before == "executing"
      and " (its running attempt stops at its worker's next heartbeat)" or "")
  end,
  expire = function(j) return ("job %d expired"):format(j.id) end,
  fail = function(j)
    local last = j.errors[#j.errors]
    return ("job %d discarded (%s)"):format(j.id, last and tostring(last.error) or "failed by hand")
  end,
}

local BULK_DONE = { retry = "will run again", cancel = "cancelled", fail = "discarded" }
local BULK_KEY = { retry = "retried", cancel = "cancelled", fail = "discarded" }

--- retry and cancel --status S: change every job that matches, in batches; say how many.
local function change_all(cmd, q, opts, reason)
  local n = q[cmd .. "_all"](q, { status = opts.status, queue = opts.queue, target = opts.target, since = opts.since },
                             reason)
  if opts.json then
    io_stdout:write(json_object{ { BULK_KEY[cmd], json(n) } }, "\n")
  else
    io_stdout:write(("%d %s job%s%s%s%s %s\n"):format(n, opts.status, n == 1 and "" or "s",
      opts.queue and " of queue " .. opts.queue or "", opts.target and " with target " .. opts.target or "",
      opts.since and " since " .. iso_s(opts.since) or "", BULK_DONE[cmd]))
  end
  return 0
end

--- retry, cancel, expire and fail: change job `id`, then say so.
local function change(cmd)
  return function(q, opts, args)
    if opts.status then return change_all(cmd, q, opts, #args > 0 and concat(args, " ") or nil) end
    local id = args[1]
    local before = q:job(id)
    local reason = #args > 1 and concat(args, " ", 2) or nil
    local ok, why = q[cmd](q, id, reason)
    if not ok then return options.fail("tide jobs", why) end
    local j = q:job(id)
    if opts.json then
      io_stdout:write(json_object{ { "id", json(id) }, { "status", json(j.status) } }, "\n")
    else
      io_stdout:write(DONE[cmd](j, before and before.status), "\n")
    end
    return 0
  end
end
COMMANDS.retry, COMMANDS.cancel, COMMANDS.expire, COMMANDS.fail =
  change("retry"), change("cancel"), change("expire"), change("fail")
COMMANDS.retry_opts = { ["--status"] = true, ["--queue"] = true, ["--target"] = true, ["--since"] = true }
COMMANDS.cancel_opts, COMMANDS.fail_opts = COMMANDS.retry_opts, COMMANDS.retry_opts
local BULK_FROM = {
  retry = { scheduled = true, retryable = true, completed = true, discarded = true, cancelled = true, expired = true },
  cancel = { available = true, scheduled = true, retryable = true, executing = true },
  fail = { available = true, scheduled = true, retryable = true, executing = true },
}

--- { status = n } -> a JSON object, statuses in lifecycle order.
local function counts_json(counts)
  local fields = {}
  for _, s in ipairs(STATUSES) do
    if counts[s] then fields[#fields + 1] = { s, json(counts[s]) } end
  end
  return json_object(fields)
end

--- `stats`: a table of queues by status (columns of statuses no job has are
--- left out) with totals; or the counts as JSON.
function COMMANDS.stats(q, opts)
  local st = q:stats()
  if opts.json then
    local queues = {}
    for qname, counts in pairs(st.queues) do queues[#queues + 1] = { qname, counts_json(counts) } end
    sort(queues, function(a, b) return a[1] < b[1] end)
    local fields = { { "total", json(st.total) } }
    for _, s in ipairs(STATUSES) do fields[#fields + 1] = { s, json(st[s]) } end
    fields[#fields + 1] = { "queues", json_object(queues) }
    local p = st.pool
    fields[#fields + 1] = { "pool", json_object{ { "size", json(p.size) }, { "open", json(p.open) },
                                                 { "busy", json(p.busy) }, { "waiting", json(p.waiting) } } }
    io_stdout:write(json_object(fields), "\n")
    return 0
  end
  local p = st.pool
  local pool_line = ("pool: %d connection%s, %d open, %d busy, %d waiting (this process's)\n")
    :format(p.size, p.size == 1 and "" or "s", p.open, p.busy, p.waiting)
  if st.total == 0 then io_stdout:write("no jobs\n", pool_line); return 0 end
  local cols = {}
  for _, s in ipairs(STATUSES) do if st[s] > 0 then cols[#cols + 1] = s end end
  local names = {}
  for qname in pairs(st.queues) do names[#names + 1] = qname end
  sort(names)
  local headers, right, rows = { "QUEUE" }, {}, {}
  for c, s in ipairs(cols) do headers[c + 1], right[c + 1] = s:upper(), true end
  headers[#headers + 1], right[#cols + 2] = "TOTAL", true
  local function row(label, counts)
    local r, total = { label }, 0
    for c, s in ipairs(cols) do r[c + 1] = tostring(counts[s] or 0); total = total + (counts[s] or 0) end
    r[#cols + 2] = tostring(total)
    rows[#rows + 1] = r
  end
  for _, qname in ipairs(names) do row(qname, st.queues[qname]) end
  row("total", st)
  print_table(headers, rows, right)
  io_stdout:write(pool_line)
  return 0
end

--- `schedules`: each registered schedule with its next run times.
function COMMANDS.schedules(q, opts)
  local cron = require "tide.jobs.cron"
  local now_ms = q:now()
  local list = q:schedules()
  local n = opts.next or 3
  local function next_runs(s)
    local c, err = cron.try_parse(s.cron, s.timezone)
    if not c then return nil, err end
    local out, t = {}, now_ms
    for i = 1, n do
      t = c:next(t)
      if not t then break end
      out[i] = t
    end
    return out
  end
  if opts.json then
    local items = {}
    for i, s in ipairs(list) do
      local runs, err = next_runs(s)
      local times = {}
      for k, t in ipairs(runs or {}) do times[k] = json(iso_s(t)) end
      local fields = {}
      for _, k in ipairs{ "name", "cron", "timezone", "target", "method", "queue" } do fields[#fields + 1] = { k, json(s[k]) } end
      fields[#fields + 1] = { "last_tick", json(s.last_tick and iso_s(s.last_tick)) }
      fields[#fields + 1] = { "next", json_array(times) }
      if err then fields[#fields + 1] = { "error", json(err) } end
      fields[#fields + 1] = { "seen_at", json(s.seen_at and iso(s.seen_at)) }
      fields[#fields + 1] = { "seen_by", json(s.seen_by) }
      items[i] = json_object(fields)
    end
    io_stdout:write(json_array(items), "\n")
    return 0
  end
  if #list == 0 then
    io_stdout:write("no schedules (a worker registers its schedules when it starts)\n")
    return 0
  end
  local rows = {}
  for i, s in ipairs(list) do
    local runs, err = next_runs(s)
    local times = {}
    for k, t in ipairs(runs or {}) do times[k] = iso_s(t) end
    rows[i] = { cell(s.name, 40), s.cron, s.timezone, cell(s.target .. "." .. s.method, 40), s.queue,
                iso_s(s.last_tick), err and cell(err, 60) or concat(times, " ") }
  end
  print_table({ "NAME", "CRON", "TIMEZONE", "JOB", "QUEUE", "LAST TICK", "NEXT RUNS (UTC)" }, rows, {})
  return 0
end
COMMANDS.schedules_opts = { ["--next"] = true }

--- `prune --older-than DURATION`: how many finished jobs were deleted.
function COMMANDS.prune(q, opts)
  local n = q:prune{ older_than = opts.older_than }
  if opts.json then
    io_stdout:write(json_object{ { "deleted", json(n) } }, "\n")
  else
    local before = iso_s(q:now() - opts.older_than)
    io_stdout:write(("deleted %d job%s that finished before %s\n"):format(n, n == 1 and "" or "s", before))
  end
  return 0
end
COMMANDS.prune_opts = { ["--older-than"] = true }

--- name -> { positionals: min, max (nil: any), needs an ID }
local SHAPES = {
  list = { 0, 0 }, stats = { 0, 0 }, prune = { 0, 0 }, schedules = { 0, 0 }, show = { 1, 1, true },
  retry = { 1, 1, true }, cancel = { 1, 1, true }, expire = { 1, 1, true }, fail = { 1, nil, true },
}

--- Checks the command's options and arguments; nil and a message when wrong.
local function check_command(cmd, opts, args)
  local own = COMMANDS[cmd .. "_opts"] or {}
  for _, oname in ipairs(opts.given) do
    if not GLOBAL_OPTS[oname] and not own[oname] then
      return nil, ("%s is not an option of '%s'"):format(oname, cmd)
    end
  end
  local shape = SHAPES[cmd]
  if BULK_FROM[cmd] and (opts.status or opts.queue or opts.target or opts.since) then
    if not opts.status then return nil, cmd .. ": --queue, --target and --since choose among the jobs of a --status" end
    -- (fail's words are its reason, but an ID first was meant as one job:
    -- taken for the reason, it discarded every job of the status)
    if args[1] ~= nil and (cmd ~= "fail" or job_id(args[1])) then
      return nil, ("%s: give an ID or --status, not both%s"):format(cmd,
        cmd == "fail" and " (a REASON cannot start with a number)" or "")
    end
    if not BULK_FROM[cmd][opts.status] then
      local ok = {}
      for _, st in ipairs(STATUSES) do if BULK_FROM[cmd][st] then ok[#ok + 1] = st end end
      return nil, ("%s: a job that is %s cannot be %s (--status %s expected)"):format(cmd, opts.status,
        BULK_KEY[cmd], concat(ok, ", "))
    end
    return true
  end
  if shape[3] then
    if args[1] == nil then return nil, cmd .. ": missing ID" end
    local id = job_id(args[1])
    if not id then return nil, ("%s: bad ID (job id, an integer >= 1 expected, got '%s')"):format(cmd, args[1]) end
    args[1] = id
  end
  if shape[2] and #args > shape[2] then return nil, ("%s: unexpected argument '%s'"):format(cmd, args[shape[2] + 1]) end
  if cmd == "prune" and not opts.older_than then return nil, "prune: missing --older-than DURATION" end
  return true
end

--- tide jobs [--store URL] [--json] COMMAND [ARGS]
function M.jobs(argv, i)
  local prog, usage = "tide jobs", M.JOBS_USAGE
  local opts, pos = options.parse(argv, i, JOBS_OPTS)
  if not opts then return options.usage_error(prog, pos, usage) end
  if opts.help then io_stdout:write(usage); return 0 end
  local cmd = table.remove(pos, 1)
  if cmd == nil then return options.usage_error(prog, "missing COMMAND", usage) end
  if not SHAPES[cmd] then return options.usage_error(prog, ("unknown command '%s'"):format(cmd), usage) end
  local ok, err = check_command(cmd, opts, pos)
  if not ok then return options.usage_error(prog, err, usage) end
  return store.with(prog, opts, usage, COMMANDS[cmd], opts, pos)
end

return M
