--- tide.cli.options — the command line's one option parser, its value checks and its exit codes.
--
-- Every command returns its exit status (EXIT): 0 done; 1 the world said no
-- (the store cannot be opened, "job 7 is completed"); 2 the command line is
-- wrong (the message names the option or argument, then the usage
-- follows).  Failures go to stderr as one line starting with the command's
-- name ("tide jobs: job 7 not found"); nothing here raises to the host.
local check = require "tide.engine.check"
local job = require "tide.jobs.job"
local time = require "tide.jobs.time"

local tostring, tonumber, concat = tostring, tonumber, table.concat
local io_stderr = io.stderr

local M = {}

M.EXIT = { ok = 0, failed = 1, usage = 2 }

-- ===== option values: each conversion returns the value, or nil when `s` is bad

local MAX_INT, MAX_MS = 2 ^ 53, 1e12
M.MAX_INT = MAX_INT

--- The integer decimal `s` spells ([+-]digits), when a double holds it
--- exactly; else nil (2^53 + 1 would read as 2^53: a command given job
--- 9007199254740993 acted on job 9007199254740992).
local function exact_integer(s)
  local sign, digits = s:match("^([+-]?)0*(%d+)$")
  if not digits or #digits > 16 then return nil end
  local n = tonumber(digits)
  if ("%.0f"):format(n) ~= digits then return nil end
  return sign == "-" and -n or n
end
M.exact_integer = exact_integer

local function integer(min, max)
  return function(s)
    local n = exact_integer(s)
    if n and n >= min and n <= (max or MAX_INT) then return n end
  end
end

--- "500ms", "30s", "5m", "2h", "7d" or a bare number of ms -> ms.
local function duration(s)
  local ms = check.duration(s)
  if ms and ms <= MAX_MS then return ms end
end

local function positive_duration(s)
  local ms = duration(s)
  if ms and ms > 0 then return ms end
end

local function name(s) return job.is_name(s) and s or nil end
local function key(s) return not job.key_problem(s) and s or nil end
local function status(s) return job.is_status[s] and s or nil end
local function store_url(s) return s:match("^%a[%w+.-]*:.") and s or nil end
M.is_store_url = store_url

--- A UTC time: ISO 8601 or ms since the epoch (seconds below 1e11, as
--- before), 1970..9999 -> ms (checked as the queue checks run_at:
--- tide.jobs.time).
local function utc_time(s)
  return (time.run_at_ms(s))
end

local DURATION = "duration: ms, or like 500ms, 30s, 5m, 2h, 7d"
M.STORE_URL = "store URL like sqlite:PATH or postgres://HOST/DB"

--- Option specs: key (in the parsed table), meta (the value's name in
--- messages; none for a flag), conv, expected (for "bad --x (... expected)").
M.opt = {
  store = { key = "store", meta = "URL", conv = store_url, expected = M.STORE_URL },
  json = { key = "json" },
  help = { key = "help" },
  quiet = { key = "quiet" },
  drain = { key = "drain" },
  queue = { key = "queue", meta = "NAME", conv = name, expected = "queue " .. job.NAME_EXPECTED },
  -- (a list asks the store for one more than --limit, to know of a next
  -- page; the store takes at most 2^31 - 1)
  limit = { key = "limit", meta = "N", conv = integer(1, job.INT_MAX - 1), expected = "integer from 1 to 2147483646" },
  before = { key = "before", meta = "ID", conv = integer(1), expected = "job id (integer >= 1)" },
  status = { key = "status", meta = "STATUS", conv = status, expected = "one of " .. concat(job.STATUSES, ", ") },
  older_than = { key = "older_than", meta = "DURATION", conv = duration, expected = DURATION },
  run_at = { key = "run_at", meta = "TIME", conv = utc_time,
             expected = "UTC time from 1970 to 9999 like 2026-11-23T15:04:05Z, or ms since the epoch" },
  delay = { key = "delay", meta = "DURATION", conv = duration, expected = DURATION },
  key = { key = "key", meta = "KEY", conv = key, expected = "non-empty text (valid UTF-8, no NUL)" },
  priority = { key = "priority", meta = "N", conv = integer(-job.INT_MAX - 1, job.INT_MAX),
               expected = job.PRIORITY_EXPECTED },
  max_attempts = { key = "max_attempts", meta = "N", conv = integer(1, job.INT_MAX),
                   expected = job.MAX_ATTEMPTS_EXPECTED },
  concurrency = { key = "concurrency", meta = "N", conv = integer(1), expected = "integer >= 1" },
  -- A lease shorter than the loop's hiccups is lost to the worker's own
  -- rescuer between heartbeats (lease / 3): with --lease 30 (meant as
  -- seconds), a 200 ms job that never failed ran 20 times and was discarded.
  lease = { key = "lease", meta = "MS", conv = function(s) local ms = duration(s); return ms and ms >= 100 and ms or nil end,
            expected = "duration of at least 100 ms (a number is ms: 30s for 30 seconds)" },
  poll = { key = "poll", meta = "MS", conv = positive_duration, expected = "positive " .. DURATION },
  grace = { key = "grace", meta = "MS", conv = duration, expected = DURATION },
  give_up = { key = "give_up", meta = "MS", conv = positive_duration, expected = "positive " .. DURATION },
}

-- ===== parsing a command line

local function is_option(a)
  return a:match("^%-%-.") ~= nil or (a:match("^%-%a$") ~= nil)
end

--- Stores the value of option `spec` given as `oname`; nil and a message when it is bad.
local function take(opts, spec, oname, value)
  if spec.meta == nil then
    if value ~= nil then return nil, ("%s takes no value"):format(oname) end
    opts[spec.key] = true
    return true
  end
  if value == nil then return nil, ("%s needs a value (%s)"):format(oname, spec.meta) end
  -- A second value is refused, not taken over the first: `tide jobs cancel
  -- --status available --queue a --queue b` meant both queues, or one.
  if not spec.many and opts[spec.key] ~= nil then return nil, ("%s given twice (one value expected)"):format(oname) end
  local v = spec.conv(value)
  if v == nil then return nil, ("bad %s (%s expected, got '%s')"):format(oname, spec.expected, value) end
  if spec.many then
    local list = opts[spec.key] or {}
    list[#list + 1] = v
    opts[spec.key] = list
  else
    opts[spec.key] = v
  end
  return true
end

--- Parses argv[i..] against `specs` ({ ["--name"] = spec }).  Options may
--- come anywhere, unless `stop` (the first positional ends them, and the
--- rest belong to it); "--" ends them; "--name=value" works too.  Returns
--- opts (with opts.given: the option names in order) and the positionals,
--- or nil and a message.
function M.parse(argv, i, specs, stop)
  local opts, pos = { given = {} }, {}
  while i <= #argv do
    local a = argv[i]
    if a == "--" or (not is_option(a) and stop) then
      for j = a == "--" and i + 1 or i, #argv do pos[#pos + 1] = argv[j] end
      break
    elseif is_option(a) then
      local oname, value = a:match("^(%-%-[^=]+)=(.*)$")
      oname = oname or a
      local spec = specs[oname]
      if not spec then return nil, ("unknown option '%s'"):format(oname) end
      if spec.meta and value == nil then i = i + 1; value = argv[i] end
      local ok, err = take(opts, spec, oname, value)
      if not ok then return nil, err end
      opts.given[#opts.given + 1] = oname
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

--- Writes "PROG: msg", a blank line and `usage` to stderr; returns 2.
function M.usage_error(prog, msg, usage)
  io_stderr:write(prog, ": ", msg, "\n\n", usage)
  return 2
end

--- Writes "PROG: msg" to stderr; returns 1.
function M.fail(prog, msg)
  io_stderr:write(prog, ": ", tostring(msg), "\n")
  return 1
end

M.integer, M.duration = integer, duration

return M
