--- tide.engine.retry — retry policies: validation and backoff delays.
local check = require "tide.engine.check"
local random, min = math.random, math.min

local M = {}

local BACKOFF = { fixed = true, linear = true, exponential = true }
local ON = { error = true, timeout = true }
local KEYS = check.options("retry", {
  max_attempts = true, attempts = true, backoff = true, base = true, max = true, jitter = true,
  on = true
}, { attempts = "max_attempts" })

local function bad(fname, key, expected, v, level, prefix)
  check.opt_error(fname, (prefix or "") .. "retry." .. key, expected, v, level + 1)
end

local function parse_on(fname, on, level, prefix)
  if on == nil then return { error = true, timeout = true } end
  if type(on) ~= "table" then bad(fname, "on", "list of statuses", on, level + 1, prefix) end
  local set = {}
  for i, status in ipairs(on) do
    if not ON[status] then
      bad(fname, "on[" .. i .. "]", check.choices(ON), status, level + 1, prefix)
    end
    set[status] = true
  end
  return set
end

--- Validates a `retry` option table; returns the normalized policy.
--- `level` points error messages at the user's call; `prefix` (optional)
--- names where the table sits ("handler." for 'handler.retry.base').
function M.policy(fname, r, level, prefix)
  level = (level or 2) + 1
  local pre = prefix or ""
  if type(r) ~= "table" then check.opt_error(fname, pre .. "retry", "table", r, level) end
  check.known(fname, r, KEYS, pre .. "retry.", level)
  local given = check.renamed(fname, r, "attempts", "max_attempts", level, pre .. "retry.")
  local p = {                -- (p.attempts: max_attempts, under the engine's own name)
    attempts = given or 3, backoff = r.backoff or "exponential",
    base = r.base or 100, max = r.max or 10000, jitter = r.jitter or false,
  }
  if not check.is_count(p.attempts, 1) then bad(fname, "max_attempts", "integer >= 1", given, level, prefix) end
  if not BACKOFF[p.backoff] then bad(fname, "backoff", check.choices(BACKOFF), r.backoff, level, prefix) end
  if not check.is_ms(p.base) then bad(fname, "base", "non-negative number of ms", r.base, level, prefix) end
  if not check.is_ms(p.max) or p.max < p.base then
    bad(fname, "max", "number of ms >= base", r.max, level, prefix)
  end
  if type(p.jitter) ~= "boolean" then bad(fname, "jitter", "boolean", r.jitter, level, prefix) end
  p.on = parse_on(fname, r.on, level, prefix)
  return p
end

--- The delay in ms before the attempt after `attempt` (1 = the first failed).
--- Jitter keeps at least half the delay ("equal jitter"), so a retry storm
--- spreads out without ever retrying at once.
function M.delay(p, attempt)
  local d
  if p.backoff == "fixed" then
    d = p.base
  elseif p.backoff == "linear" then
    d = p.base * attempt
  else
    d = p.base * 2 ^ (attempt - 1)
  end
  d = min(d, p.max)
  if p.jitter then d = d / 2 + random() * d / 2 end
  return d
end

return M
