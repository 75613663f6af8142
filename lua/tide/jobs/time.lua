--- tide.jobs.time — UTC times of durable jobs: ISO 8601 in and out (Promise 6: only run_at uses the wall clock).
local floor, tonumber = math.floor, tonumber

local M = {}

--- Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local DAYS_IN = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

--- "2026-11-23T15:04:05Z", "2026-11-23 15:04:05.250+01:00" or "2026-11-23"
--- (UTC unless an offset is given) -> ms since the epoch, or nil.
local function parse_iso(s)
  local y, mo, d, rest = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)(.*)$")
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo < 1 or mo > 12 or d < 1 or d > DAYS_IN[mo] then return nil end
  local h, mi, sec, frac, zone = 0, 0, 0, "", "Z"
  if rest ~= "" then
    h, mi, sec, frac, zone = rest:match("^[T ](%d%d):(%d%d):(%d%d)(%.?%d*)(.*)$")
    if not h then return nil end
    h, mi, sec = tonumber(h), tonumber(mi), tonumber(sec)
    if h > 23 or mi > 59 or sec > 60 or frac == "." then return nil end
  end
  local offset = 0
  if zone ~= "Z" and zone ~= "" then
    local sign, oh, om = zone:match("^([+-])(%d%d):?(%d%d)$")
    if not sign then return nil end
    offset = (tonumber(oh) * 60 + tonumber(om)) * (sign == "-" and -1 or 1)
  end
  local secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + (mi - offset) * 60 + sec
  return floor((secs + (tonumber("0" .. frac) or 0)) * 1000 + 0.5)
end
M.parse_iso = parse_iso

--- ms since the epoch -> "2026-11-23T15:04:05.250Z".
function M.iso(ms)
  if ms == nil then return nil end
  local ts = floor(ms / 1000)
  local s = os.date("!%Y-%m-%dT%H:%M:%S", ts)
  local frac = ms - ts * 1000
  return frac > 0 and ("%s.%03dZ"):format(s, frac) or s .. "Z"
end

return M
