--- tide.jobs.job — what a job is, in one place: its statuses and the names it carries.
--
-- Statuses, in the order a job meets them:
--   available   due now, waiting for a worker
--   scheduled   due later (run_at in the future)
--   executing   claimed by a worker, under a lease
--   retryable   an attempt failed; due again at run_at
--   completed   finished: its method returned          } finished: never
--   discarded   finished: its last attempt failed      } run again unless
--   cancelled   finished: cancelled by hand            } retried by hand
--   expired     finished: it must no longer run        }
--
-- Names: a queue or a target is "letters, digits, _ . -" starting with a
-- letter or _ ("orders", "app.mail"); a method is a Lua identifier.
--
-- Ranges, the same on every store (PostgreSQL's integer columns hold no
-- more): priority -2^31..2^31-1, max_attempts 1..2^31-1, times 1970..9999
-- (tide.jobs.time).  An idempotency key is text: valid UTF-8 without NUL.
local json = require "tide.jobs.json"
local time = require "tide.jobs.time"

local type, format = type, string.format

local M = {}

M.STATUSES = { "available", "scheduled", "executing", "retryable",
               "completed", "discarded", "cancelled", "expired" }
M.FINISHED = { "completed", "discarded", "cancelled", "expired" }
M.WAITING = { "available", "scheduled", "retryable" }     -- not yet claimed

local function set(list)
  local s = {}
  for i = 1, #list do s[list[i]] = true end
  return s
end
M.is_status = set(M.STATUSES)
M.is_finished = set(M.FINISHED)

M.NAME = "^[%a_][%w_.%-]*$"          -- queues and targets
M.METHOD = "^[%a_][%w_]*$"
M.NAME_EXPECTED = "name (letters, digits, _ . -)"

-- Bounds, the same on every store: PostgreSQL's btree indexes refuse an
-- entry over 2704 bytes (its 1/3 page), so a queue name or a key that
-- SQLite took failed there with "index row size ... exceeds btree version 4
-- maximum" (SQLSTATE 54000), naming neither the function nor the option.
-- The widest index entry, (queue, partition_key, priority, run_at, id),
-- stays below that with a name of MAX_NAME and a key of MAX_KEY bytes.
M.MAX_NAME = 200          -- queues, targets, methods (as schedules' names)
M.MAX_KEY = 2000          -- idempotency keys, partition keys, unique keys (bytes)

--- Why a name option is too long ("at most 200 bytes, got 5000"), or nil.
function M.name_length_problem(s)
  if type(s) == "string" and #s > M.MAX_NAME then
    return format("at most %d bytes, got %d", M.MAX_NAME, #s)
  end
end

-- Names seen valid (a pattern match per job is slow: it does not compile).
local good, ngood = {}, 0

local function matches(s, pattern)
  if good[s] == pattern then return true end
  if type(s) ~= "string" or #s > M.MAX_NAME or not s:match(pattern) then return false end
  if ngood > 10000 then good, ngood = {}, 0 end
  good[s], ngood = pattern, ngood + 1
  return true
end

--- True for a valid queue or target name.
function M.is_name(s) return matches(s, M.NAME) end

--- True for a valid method name.
function M.is_method(s) return matches(s, M.METHOD) end

-- ===== ranges

M.INT_MAX = 2 ^ 31 - 1
M.PRIORITY_EXPECTED = "integer from -2147483648 to 2147483647 (lower runs first)"
M.MAX_ATTEMPTS_EXPECTED = "integer from 1 to 2147483647"

local function int_in(v, lo, hi) return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi end

function M.is_priority(v) return int_in(v, -M.INT_MAX - 1, M.INT_MAX) end
function M.is_max_attempts(v) return int_in(v, 1, M.INT_MAX) end

--- Why `s` cannot be an idempotency key, or nil.
--- True for a job cancelled, expired or failed by hand while it ran, which
--- its worker has not stopped yet: it keeps its lease, and its slot, until
--- then (the stores' predicate: tide.jobs.store.common's STOPPING).
function M.is_stopping(row) return row.lease_owner ~= nil and row.status ~= "executing" end

--- Why such a job cannot run again yet: "job 7 is cancelled and still
--- stopping on worker host:12:1".
function M.stopping_why(row)
  return ("job %d is %s and still stopping on worker %s"):format(row.id, tostring(row.status), tostring(row.lease_owner))
end

function M.key_problem(s)
  if type(s) ~= "string" or s == "" then return "non-empty string expected" end
  if #s > M.MAX_KEY then return format("%d bytes, at most %d", #s, M.MAX_KEY) end
  local nul = s:find("\0", 1, true)
  if nul then return format("a NUL byte at byte %d: keys are text", nul) end
  local bad = json.utf8_error(s)
  if bad then return format("invalid UTF-8 at byte %d", bad) end
end

-- ===== paths into args ("args.account", "$.account", "args.items[0].sku")

M.PATH_EXPECTED = 'path into args, like "args.account" or "$.customer.id"'

--- The steps of a path into args (names, and 1-based indexes for [n]), or nil.
function M.parse_path(s)
  if type(s) ~= "string" then return nil end
  local rest = s:match("^args(.*)$") or s:match("^%$(.*)$")
  if not rest or rest == "" then return nil end
  local steps = {}
  while rest ~= "" do
    local name, after = rest:match("^%.([%a_][%w_]*)(.*)$")
    if name then
      steps[#steps + 1] = name
    else
      local n
      n, after = rest:match("^%[(%d+)%](.*)$")
      if not n then return nil end
      steps[#steps + 1] = tonumber(n) + 1
    end
    rest = after
  end
  return steps
end

--- The value at `steps` inside args (nil when a step is missing).
function M.at_path(args, steps)
  local v = args
  for i = 1, #steps do
    if type(v) ~= "table" then return nil end
    v = v[steps[i]]
  end
  return v
end

--- A value as a partition key (text), or nil and what it was: strings as
--- they are, integers without a decimal point, booleans as true/false;
--- nil or JSON null: no key.
function M.key_text(v)
  local tv = type(v)
  if tv == "string" then return v end
  if tv == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return nil, "number " .. tostring(v) end
    return v % 1 == 0 and math.abs(v) < 2 ^ 53 and format("%d", v) or format("%.17g", v)
  end
  if tv == "boolean" then return tostring(v) end
  if v == nil or v == json.null then return nil end
  return nil, tv
end

-- ===== rates ("100/min", "50/s", "10/5s")

local PER = { s = 1000, sec = 1000, second = 1000, min = 60000, minute = 60000, m = 60000,
              h = 3600000, hour = 3600000, d = 86400000, day = 86400000 }
M.RATE_EXPECTED = 'rate like "100/min", "50/s" or "10/5s"'

--- "100/min" -> 100, 60000 (a count and a period in ms); nil when malformed.
function M.parse_rate(s, duration)
  if type(s) ~= "string" then return nil end
  local n, per = s:match("^%s*(%d+)%s*/%s*(%S+)%s*$")
  n = tonumber(n)
  if not n or n < 1 or n > M.INT_MAX then return nil end
  local ms = PER[per] or duration(per)
  if not ms or ms < 1 or ms % 1 ~= 0 or ms > 366 * 86400000 then return nil end
  return n, ms
end

-- ===== rows as stores keep them

local ROW_FIELDS = {  -- field -> the check a sound row passes, and what it expects
  id = { function(v) return int_in(v, 1, 2 ^ 53) end, "job id" },
  queue = { M.is_name, "queue name" }, target = { M.is_name, "target name" },
  method = { M.is_method, "method name" },
  status = { function(v) return M.is_status[v] end, "status" },
  priority = { M.is_priority, "integer" }, attempt = { function(v) return int_in(v, 0, M.INT_MAX) end, "integer" },
  max_attempts = { M.is_max_attempts, "integer >= 1" },
  run_at = { time.is_ms, "time in ms" }, inserted_at = { time.is_ms, "time in ms" },
  attempted_at = { time.is_ms, "time in ms" }, completed_at = { time.is_ms, "time in ms" },
  lease_expires = { time.is_ms, "time in ms" },
}
local ROW_ORDER = { "id", "queue", "target", "method", "status", "priority", "attempt", "max_attempts",
                    "run_at", "inserted_at", "attempted_at", "completed_at", "lease_expires" }

--- What is wrong with a row read from a store (edited by hand, say), as
--- 'run_at is string "abc", time in ms expected'; or nil.  Fields a row
--- lacks (a claim returns some) are not checked: the tables' NOT NULL
--- constraints keep the required ones.
function M.row_problem(row)
  for i = 1, #ROW_ORDER do
    local k = ROW_ORDER[i]
    local v = row[k]
    if v ~= nil and not ROW_FIELDS[k][1](v) then
      local got = type(v) == "string" and format("string %q", #v > 40 and v:sub(1, 40) .. "..." or v)
                  or type(v) == "number" and format("number %.17g", v) or type(v)
      return format("%s is %s, %s expected", k, got, ROW_FIELDS[k][2])
    end
  end
end

return M
