--- tide.jobs.cron — cron expressions: parsing, and the next tick in an IANA time zone.
--
--   local c = cron.parse("*/5 * * * *")             -- raises on a bad expression
--   local c, err = cron.try_parse("0 9 * * MON-FRI", "Europe/Paris")
--   c:next(after_ms) -> the first tick after `after_ms` (UTC ms), or nil
--
-- Expressions: five fields (minute hour day-of-month month day-of-week) or
-- six (seconds first); each field a list of `*`, `N`, `A-B`, `*/S`, `A-B/S`
-- or `A/S` (from A to the end, every S); months JAN-DEC and days SUN-SAT by
-- name too (7 is Sunday as well as 0); the aliases @yearly (@annually),
-- @monthly, @weekly, @daily (@midnight) and @hourly.  As in Vixie cron: when
-- both day fields are restricted, a day matches either; when one starts
-- with `*` (`*` or `*/S`), a day must match both ("0 0 */2 * MON": the
-- Mondays with an odd date).
--
-- Ticks fall on wall-clock times in the schedule's zone.  Where the clocks
-- change, tide does what Vixie cron (and cronie) document:
--   - a schedule "at a particular time" (no `*` in its seconds, minute or
--     hour field: "30 2 * * *") runs once a day whatever happens: a time
--     the clocks jump over (02:30 on a spring-forward night) runs at the
--     instant the gap ends (03:00 new time), once however many of its
--     times fell in the gap; a time that happens twice (01:30 on a
--     fall-back night) runs at the first of the two only;
--   - a schedule with `*` or `*/S` in its seconds, minute or hour field
--     ("*/15 * * * *", @hourly, a per-second "* * * * * *") follows the
--     clock as it is: wall times in a gap do not exist and are not run,
--     wall times that happen twice are run both times.
-- So a fixed-time job is never lost nor doubled by a clock change, and an
-- interval job keeps its rhythm in elapsed time.  Ticks are whole seconds.
local time = require "tide.jobs.time"
local tz = require "tide.jobs.tz"

local type, error, tostring, tonumber, ipairs, setmetatable = type, error, tostring, tonumber, ipairs, setmetatable
local floor, format, concat = math.floor, string.format, table.concat
local days_from_civil, civil_from_days = time.days_from_civil, time.civil_from_days

local M = {}

local Cron = {}
local Cron_mt = { __index = Cron, __tostring = function(c)
  return ("tide.cron (%s, %s)"):format(c.expr, c.zone.name)
end }

local ALIASES = {
  ["@yearly"] = "0 0 1 1 *", ["@annually"] = "0 0 1 1 *", ["@monthly"] = "0 0 1 * *",
  ["@weekly"] = "0 0 * * 0", ["@daily"] = "0 0 * * *", ["@midnight"] = "0 0 * * *",
  ["@hourly"] = "0 * * * *",
}

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9, oct = 10,
                 nov = 11, dec = 12 }
local DAYS = { sun = 0, mon = 1, tue = 2, wed = 3, thu = 4, fri = 5, sat = 6 }

-- The fields, in the order of a six-field expression.
local FIELDS = {
  { name = "seconds", lo = 0, hi = 59 },
  { name = "minute", lo = 0, hi = 59 },
  { name = "hour", lo = 0, hi = 23 },
  { name = "day-of-month", lo = 1, hi = 31 },
  { name = "month", lo = 1, hi = 12, names = MONTHS },
  { name = "day-of-week", lo = 0, hi = 7, names = DAYS },
}

-- ===== parsing

--- One value of field f ("5", "MON") -> number, or nil.
local function value(f, s)
  local n = s:match("^%d+$") and tonumber(s)
  if not n and f.names then n = f.names[s:lower()] end
  if n and n >= f.lo and n <= f.hi then return n end
end

--- Parses field f's text -> set { [v] = true } (nil and why not).
local function field(f, text)
  local set, any = {}, false
  for item in (text .. ","):gmatch("([^,]*),") do
    local range, step = item:match("^([^/]+)/(.+)$")
    range = range or item
    local s
    if step then
      s = step:match("^%d+$") and tonumber(step)
      if not s or s < 1 then return nil, format("step '%s' is not an integer >= 1", step) end
    end
    local a, b
    if range == "*" then
      a, b = f.lo, f.hi
      if f.name == "day-of-week" then b = 6 end
    else
      local x, y = range:match("^([^-]+)%-(.+)$")
      if x then
        a, b = value(f, x), value(f, y)
        if not a or not b then
          return nil, format("range '%s' is not two values from %d-%d%s", range, f.lo, f.hi,
                             f.names and " or names" or "")
        end
        if a > b then return nil, format("range '%s' starts after its end", range) end
      else
        a = value(f, range)
        if not a then
          if item == "" then return nil, "an empty item" end
          if range:match("^[LW#?]") or range:match("[LW#]$") or range:find("#", 1, true) then
            return nil, format("'%s' is not standard cron (L, W, # and ? are not supported)", range)
          end
          return nil, format("'%s' is not a value from %d-%d%s", range, f.lo, f.hi,
                             f.names and (f.name == "month" and " or JAN-DEC" or " or SUN-SAT") or "")
        end
        b = s and (f.name == "day-of-week" and 6 or f.hi) or a
      end
    end
    for v = a, b, s or 1 do set[f.name == "day-of-week" and v % 7 or v] = true; any = true end
  end
  if not any then return nil, "no value" end
  return set
end

local DAYS_IN = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }   -- (February: in a leap year)

--- Parses `expr` in zone `zone_name` (default "UTC") -> cron, or nil and a
--- message that names the field ("bad hour field '25' in \"0 25 * * *\"
--- (bad value '25' (0-23 expected))").
function M.try_parse(expr, zone_name)
  if type(expr) ~= "string" then return nil, format("cron expression string expected, got %s", type(expr)) end
  local text = expr:match("^%s*(.-)%s*$")
  if text:sub(1, 1) == "@" then
    local alias = ALIASES[text:lower()]
    if not alias then
      return nil, format("unknown alias %q in %q (@yearly, @annually, @monthly, @weekly, @daily, @midnight "
                         .. "or @hourly expected)", text, expr)
    end
    text = alias
  end
  local parts = {}
  for p in text:gmatch("%S+") do parts[#parts + 1] = p end
  if #parts ~= 5 and #parts ~= 6 then
    return nil, format("%q has %d field%s (5 expected: minute hour day-of-month month day-of-week; "
                       .. "or 6, seconds first)", expr, #parts, #parts == 1 and "" or "s")
  end
  if #parts == 5 then table.insert(parts, 1, "0") end
  local c = { expr = expr, sets = {}, texts = parts }
  for i, f in ipairs(FIELDS) do
    local set, why = field(f, parts[i])
    if not set then return nil, format("bad %s field '%s' in %q: %s", f.name, parts[i], expr, why) end
    c.sets[i] = set
  end
  -- Vixie cron's rule: a day field written with a leading * is "any".
  c.dom_star, c.dow_star = parts[4]:sub(1, 1) == "*", parts[6]:sub(1, 1) == "*"
  c.interval = parts[1]:sub(1, 1) == "*" or parts[2]:sub(1, 1) == "*" or parts[3]:sub(1, 1) == "*"
  if c.dow_star or not c.dom_star then      -- the day-of-month must exist in some month given
    local fine = false
    for m = 1, 12 do
      if c.sets[5][m] then
        for d = 1, DAYS_IN[m] do if c.sets[4][d] then fine = true end end
      end
    end
    if not fine and c.dow_star then
      return nil, format("bad day-of-month field '%s' in %q: no month given has such a day (it would never run)",
                         parts[4], expr)
    end
  end
  local zone, err = tz.zone(zone_name or "UTC")
  if not zone then return nil, err end
  c.zone = zone
  return setmetatable(c, Cron_mt)
end

--- Like try_parse, raising "fname: ..." at `level` instead.
function M.parse(expr, zone_name, fname, level)
  local c, err = M.try_parse(expr, zone_name)
  if not c then error((fname or "tide.cron") .. ": " .. err, (level or 1) + 1) end
  return c
end

-- ===== matching wall times

local function leap(y) return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) end

local function month_days(y, m) return m == 2 and (leap(y) and 29 or 28) or DAYS_IN[m] end

--- Whether day d of y-m is one of the schedule's days.
local function day_matches(c, y, m, d)
  local dom = c.sets[4][d] == true
  local dow = c.sets[6][(days_from_civil(y, m, d) + 4) % 7] == true
  if c.dom_star or c.dow_star then return dom and dow end   -- (a `*` field holds every day)
  return dom or dow
end

--- The first value >= v in set (lo..hi), or nil.
local function first_from(set, v, hi)
  for x = v, hi do if set[x] then return x end end
end

-- Every expression try_parse accepts has a tick within one Gregorian cycle
-- (400 years); the rarest, Feb 29 on a given weekday ("0 0 29 2 */7"), can
-- be 40 years apart (2088, then 2128: 2100 is not a leap year).
local LIMIT_YEARS = 400

--- The first matching wall time >= l (wall seconds), or nil within LIMIT_YEARS.
function Cron:next_wall(l)
  local days = floor(l / 86400)
  local rest = l - days * 86400
  local y, m, d = civil_from_days(days)
  local h, mi, s = floor(rest / 3600), floor(rest / 60) % 60, rest % 60
  local sets, stop = self.sets, y + LIMIT_YEARS
  while y <= stop do
    local nm = first_from(sets[5], m, 12)
    if not nm then y, m, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
    elseif nm ~= m then m, d, h, mi, s = nm, 1, 0, 0, 0
    elseif d > month_days(y, m) or not day_matches(self, y, m, d) then
      d, h, mi, s = d + 1, 0, 0, 0
      if d > month_days(y, m) then d, m = 1, m + 1; if m > 12 then y, m = y + 1, 1 end end
    else
      local nh = first_from(sets[3], h, 23)
      if not nh then h, mi, s = 24, 0, 0
      elseif nh ~= h then h, mi, s = nh, 0, 0
      else
        local nmi = first_from(sets[2], mi, 59)
        if not nmi then h, mi, s = h + 1, 0, 0
        elseif nmi ~= mi then mi, s = nmi, 0
        else
          local ns = first_from(sets[1], s, 59)
          if ns then return days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 + ns end
          mi, s = mi + 1, 0
        end
        if mi > 59 then h, mi = h + 1, 0 end
      end
      if h > 23 then
        h, d = 0, d + 1
        if d > month_days(y, m) then d, m = 1, m + 1; if m > 12 then y, m = y + 1, 1 end end
      end
    end
  end
end

--- The first tick after UTC second `after` (an integer), or nil.
function Cron:next_second(after)
  local zone = self.zone
  local near = after + 2 * 86400
  local lo, hi_near = zone:offset_range(after, near)
  local hi = zone.max_offset
  if not hi then
    hi = -math.huge
    for _, o in ipairs(zone.offs) do if o > hi then hi = o end end
    if zone.first > hi then hi = zone.first end
    if zone.rule then hi = math.max(hi, zone.rule.std, zone.rule.dst or zone.rule.std) end
    zone.max_offset = hi
  end
  -- Wall times come in order, instants not quite (an overlap maps a later
  -- wall time to an earlier instant): go on until no later wall time can
  -- give an instant before the best found, i.e. l - (the largest offset in
  -- force up to it) > best.  Within two days that is the offsets in force
  -- near `after` (a per-second schedule would otherwise look an hour
  -- ahead, the size of a clock change, at every tick).
  -- An interval schedule whose wall times all fall in gaps has no tick:
  -- after 400 years (the calendar and a zone's rule repeat then) there is
  -- none to find.
  local best
  local l = self:next_wall(after + lo)
  local stop = after + LIMIT_YEARS * 366 * 86400
  while l and l <= stop and not (best and l - (best <= near and hi_near or hi) > best) do
    local us = zone:instants(l)
    if #us == 0 then
      local t = zone:gap_end(l)
      if not self.interval then
        if t and t > after and (not best or t < best) then best = t end
      elseif t then
        l = t + zone:offset(t) - 1             -- not run in a gap: skip its wall times at once
      end
    else
      for k = 1, self.interval and #us or 1 do
        local u = us[k]
        if u > after and (not best or u < best) then best = u end
      end
    end
    l = self:next_wall(l + 1)
  end
  return best
end

--- The first tick after `after_ms` (UTC ms since the epoch), in ms; nil
--- when there is none before the year 10000.
function Cron:next(after_ms)
  local t = self:next_second(floor(after_ms / 1000))
  if t and t * 1000 <= time.MAX_MS then return t * 1000 end
end

--- The ticks in (from_ms, to_ms], at most `limit`; a second result true when more were left out.
function Cron:between(from_ms, to_ms, limit)
  local out, t = {}, self:next(from_ms)
  while t and t <= to_ms do
    if #out >= limit then return out, true end
    out[#out + 1] = t
    t = self:next(t)
  end
  return out, false
end

function Cron:describe() return concat(self.texts, " ") end

M.FIELDS = FIELDS
return M
