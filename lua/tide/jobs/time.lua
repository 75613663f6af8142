--- tide.jobs.time — UTC times of durable jobs: ISO 8601 in and out (Promise 6: only run_at uses the wall clock).
--
-- A job's times are integers: UTC milliseconds since the Unix epoch, from
-- 1970-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z (MIN_MS..MAX_MS), the
-- range every store and every tool can hold and print.  Checks live here
-- once, for the queue and the command line alike.
local floor, tonumber, type, format = math.floor, tonumber, type, string.format

local M = {}

M.MIN_MS = 0
M.MAX_MS = 253402300799999                 -- 9999-12-31T23:59:59.999Z
M.EXPECTED = 'UTC time from 1970 to 9999 (ms since the epoch, or ISO 8601 like "2026-11-23T15:04:05Z")'
-- Below this, a number is taken for seconds since the epoch (the unit
-- before ms, accepted one release more): 1e11 s is the year 5138, 1e11 ms
-- is 1973-03-03, so no time a user means can be read wrong.
M.SECONDS_BELOW = 1e11

--- Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

--- The date of a day since 1970-01-01 (the inverse, from the same source).
local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m, d
end

M.days_from_civil, M.civil_from_days = days_from_civil, civil_from_days

local DAYS_IN = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function leap(y) return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) end

local function in_range(ms) return ms >= M.MIN_MS and ms <= M.MAX_MS end

--- "2026-11-23T15:04:05Z", "2026-11-23 15:04:05.250+01:00" or "2026-11-23"
--- (UTC unless an offset is given, at most ±23:59) -> ms since the epoch,
--- or nil for anything else: a day the month does not have (2030-02-29), a
--- second past 59, a time outside 1970..9999.
local function parse_iso(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, rest = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)(.*)$")
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo < 1 or mo > 12 or d < 1 or d > (mo == 2 and leap(y) and 29 or DAYS_IN[mo]) then return nil end
  local h, mi, sec, frac, zone = 0, 0, 0, "", "Z"
  if rest ~= "" then
    h, mi, sec, frac, zone = rest:match("^[T ](%d%d):(%d%d):(%d%d)(%.?%d*)(.*)$")
    if not h then return nil end
    h, mi, sec = tonumber(h), tonumber(mi), tonumber(sec)
    if h > 23 or mi > 59 or sec > 59 or frac == "." then return nil end
  end
  local offset = 0
  if zone ~= "Z" and zone ~= "" then
    local sign, oh, om = zone:match("^([+-])(%d%d):?(%d%d)$")
    if not sign or tonumber(oh) > 23 or tonumber(om) > 59 then return nil end
    offset = (tonumber(oh) * 60 + tonumber(om)) * (sign == "-" and -1 or 1)
  end
  local secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + (mi - offset) * 60 + sec
  local ms = floor((secs + (tonumber("0" .. frac) or 0)) * 1000 + 0.5)
  if in_range(ms) then return ms end
end
M.parse_iso = parse_iso

--- A run_at as users give it — ms since the epoch (a number, or a string
--- of digits from the command line) or ISO 8601 — -> ms, or nil.  The
--- second result is true when the number was taken for seconds (below
--- SECONDS_BELOW: the old unit), for the caller to warn about.
function M.run_at_ms(v)
  if type(v) == "string" and v:match("^%d+%.?%d*$") then v = tonumber(v) end
  if type(v) == "number" then
    if v ~= v then return nil end
    local secs = v < M.SECONDS_BELOW
    local ms = floor((secs and v * 1000 or v) + 0.5)
    if in_range(ms) then return ms, secs end
    return nil
  end
  return parse_iso(v)
end

--- True for a stored time: an integer number of ms in range.
function M.is_ms(v)
  return type(v) == "number" and v % 1 == 0 and in_range(v)
end

--- ms since the epoch -> "2026-11-23T15:04:05.250Z" (no fraction when it is
--- whole); nil for nil or anything that is not a time in range.
function M.iso(ms)
  if type(ms) ~= "number" or ms ~= ms or not in_range(ms) then return nil end
  ms = floor(ms + 0.5)
  local secs = floor(ms / 1000)
  local frac = ms - secs * 1000
  local days = floor(secs / 86400)
  local rest = secs - days * 86400
  local y, mo, d = civil_from_days(days)
  local s = format("%04d-%02d-%02dT%02d:%02d:%02d", y, mo, d, floor(rest / 3600), floor(rest / 60) % 60, rest % 60)
  return frac > 0 and format("%s.%03dZ", s, frac) or s .. "Z"
end

return M
