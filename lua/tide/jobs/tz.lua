--- tide.jobs.tz — IANA time zones from the system's tzdata (TZif files, RFC 8536), read in Lua.
--
--   local zone, err = tz.zone("Europe/Paris")     -- nil, err for an unknown zone
--   zone:offset(utc_s)     -> seconds east of UTC at that instant, abbreviation
--   zone:instants(local_s) -> the UTC instants whose wall time is local_s:
--                             none (a gap: clocks jumped over it), one, or
--                             two (an overlap: clocks went back), in order
--   zone:gap_end(local_s)  -> for a wall time in a gap, the instant the gap ends
--
-- Times are integer seconds.  A "wall time" (local_s) is the local date and
-- time counted as if it were UTC: days_from_civil(y, m, d) * 86400 + h * 3600
-- + mi * 60 + s.
--
-- Why Lua and not the C library: localtime_r and mktime read the zone from
-- the process-wide TZ variable (setenv is not thread-safe, and tide runs
-- threads), and mktime guesses in gaps and overlaps.  A TZif file is a table
-- of transitions and a POSIX TZ rule for the times after its last one
-- (files built "slim" stop in 2007 for New York, "fat" ones in 2037): both
-- are read here, so every year to 9999 has its transitions.
--
-- The files are looked up under $TZDIR, else /usr/share/zoneinfo (Debian's
-- tzdata package).  A zone is read once per process and kept.
local time = require "tide.jobs.time"

local ipairs, byte, sub, floor, type, tonumber, format = ipairs, string.byte, string.sub, math.floor, type, tonumber, string.format
local sort, setmetatable, getenv, io_open = table.sort, setmetatable, os.getenv, io.open
local days_from_civil, civil_from_days = time.days_from_civil, time.civil_from_days

local M = {}

local Zone = {}
local Zone_mt = { __index = Zone, __tostring = function(z) return "tide.tz.Zone (" .. z.name .. ")" end }

-- ===== reading a TZif file

local function u32(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function i32(s, i)
  local v = u32(s, i)
  return v >= 2147483648 and v - 4294967296 or v
end

-- (exact for every time a TZif file holds: they are below 2^53, or -2^59)
local function i64(s, i)
  local hi, lo = i32(s, i), u32(s, i + 4)
  return hi * 4294967296 + lo
end

--- Parses the header at byte `at`: the counts, or nil.
local function header(s, at)
  if sub(s, at, at + 3) ~= "TZif" or #s < at + 43 then return nil end
  local h = { version = byte(s, at + 4) }
  local names = { "isutcnt", "isstdcnt", "leapcnt", "timecnt", "typecnt", "charcnt" }
  for k = 1, 6 do h[names[k]] = u32(s, at + 20 + (k - 1) * 4) end
  return h
end

--- The size of a data block of header h with `tsize`-byte times.
local function block_size(h, tsize)
  return h.timecnt * tsize + h.timecnt + h.typecnt * 6 + h.charcnt + h.leapcnt * (tsize + 4)
         + h.isstdcnt + h.isutcnt
end

--- Reads the data block at `at` (after header h) -> times, offsets after each, the first type's offset.
local function data(s, h, at, tsize)
  local times, idx, types, abbrs = {}, {}, {}, {}
  local p = at
  for k = 1, h.timecnt do times[k] = tsize == 8 and i64(s, p) or i32(s, p); p = p + tsize end
  for k = 1, h.timecnt do idx[k] = byte(s, p); p = p + 1 end
  local chars_at = p + h.typecnt * 6
  for k = 0, h.typecnt - 1 do
    local utoff, desig = i32(s, p), byte(s, p + 5)
    -- RFC 8536's range: every search for a wall time's instants looks
    -- this far around it (SPAN); a file with offsets of months would
    -- make a per-second schedule walk months of wall seconds per tick.
    if utoff < -89999 or utoff > 93599 then
      return nil, format("local time type %d has an offset of %d s (more than -25 h and less than 26 h expected)",
                         k, utoff)
    end
    local e = s:find("\0", chars_at + desig, true) or chars_at + h.charcnt
    types[k] = utoff
    abbrs[k] = sub(s, chars_at + desig, e - 1)
    p = p + 6
  end
  local offs, names = {}, {}
  for k = 1, h.timecnt do
    if types[idx[k]] == nil then return nil, "a transition names a type the file lacks" end
    offs[k], names[k] = types[idx[k]], abbrs[idx[k]]
  end
  return { times = times, offs = offs, names = names, first = types[0] or 0, first_name = abbrs[0] or "" }
end

-- ===== the POSIX TZ rule of the footer ("EST5EDT,M3.2.0,M11.1.0")

--- Reads "[+-]hh[:mm[:ss]]" at position i of s -> seconds, next position.
local function hms(s, i, max_h)
  local sign, h, rest = s:match("^([+-]?)(%d+)()", i)
  if not sign then return nil end
  h = tonumber(h)
  if h > max_h then return nil end
  local secs, j = h * 3600, rest
  local m, after = s:match("^:(%d%d?)()", j)
  if m then
    secs, j = secs + tonumber(m) * 60, after
    local sec, after2 = s:match("^:(%d%d?)()", j)
    if sec then secs, j = secs + tonumber(sec), after2 end
  end
  return sign == "-" and -secs or secs, j
end

--- A zone name ("EST" or "<-03>") at i -> the name, next position.
local function tz_name(s, i)
  local quoted, after = s:match("^<([%w+-]+)>()", i)
  if quoted then return quoted, after end
  local plain, after2 = s:match("^(%a%a%a+)()", i)
  return plain, after2
end

--- A rule's date ("M3.2.0", "J60", "59") and optional "/time" at i -> rule, next position.
local function rule_date(s, i)
  local r, j
  local m, w, d, after = s:match("^M(%d+)%.(%d)%.(%d)()", i)
  if m then
    r, j = { kind = "M", m = tonumber(m), w = tonumber(w), d = tonumber(d) }, after
    if r.m < 1 or r.m > 12 or r.w < 1 or r.w > 5 or r.d > 6 then return nil end
  else
    local jn, after2 = s:match("^J(%d+)()", i)
    if jn then
      r, j = { kind = "J", n = tonumber(jn) }, after2
      if r.n < 1 or r.n > 365 then return nil end
    else
      local n, after3 = s:match("^(%d+)()", i)
      if not n then return nil end
      r, j = { kind = "n", n = tonumber(n) }, after3
      if r.n > 365 then return nil end
    end
  end
  r.time = 7200
  if sub(s, j, j) == "/" then
    r.time, j = hms(s, j + 1, 167)
    if not r.time then return nil end
  end
  return r, j
end

--- Parses a POSIX TZ string -> { std, dst, std_name, dst_name, start, stop } (offsets east of UTC), or nil.
local function posix(s)
  local std_name, i = tz_name(s, 1)
  if not std_name then return nil end
  local off
  off, i = hms(s, i, 24)
  if not off then return nil end
  local r = { std = -off, std_name = std_name }
  if i > #s then return r end
  r.dst_name, i = tz_name(s, i)
  if not r.dst_name then return nil end
  r.dst = r.std + 3600
  if i <= #s and sub(s, i, i) ~= "," then
    off, i = hms(s, i, 24)
    if not off then return nil end
    r.dst = -off
  end
  if i > #s then s, i = s .. ",M3.2.0,M11.1.0", i end   -- POSIX's default rule
  if sub(s, i, i) ~= "," then return nil end
  r.start, i = rule_date(s, i + 1)
  if not r.start or sub(s, i, i) ~= "," then return nil end
  r.stop, i = rule_date(s, i + 1)
  if not r.stop or i <= #s then return nil end
  return r
end

local function leap(y) return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) end

--- The day (days since the epoch) a rule date falls on in year y.
local function rule_day(r, y)
  if r.kind == "J" then                      -- 1..365, February 29 never counted
    local n = r.n
    if leap(y) and n >= 60 then n = n + 1 end
    return days_from_civil(y, 1, 1) + n - 1
  elseif r.kind == "n" then                  -- 0..365, February 29 counted
    return days_from_civil(y, 1, 1) + r.n
  end
  local first = days_from_civil(y, r.m, 1)
  local wday = (first + 4) % 7               -- 1970-01-01 was a Thursday (4)
  local day = first + (r.d - wday) % 7 + (r.w - 1) * 7
  local next_month = r.m == 12 and days_from_civil(y + 1, 1, 1) or days_from_civil(y, r.m + 1, 1)
  while day >= next_month do day = day - 7 end  -- week 5: the last such day of the month
  return day
end

--- The footer's transitions in year y: { t, off } pairs (UTC seconds, offset after).
local function rule_transitions(r, y)
  -- The start's time is in standard time, the end's in daylight time.
  local start = rule_day(r.start, y) * 86400 + r.start.time - r.std
  local stop = rule_day(r.stop, y) * 86400 + r.stop.time - r.dst
  return { { start, r.dst, r.dst_name }, { stop, r.std, r.std_name } }
end

-- ===== zones

local function year_of(t) return (civil_from_days(floor(t / 86400))) end

--- The footer's transitions in years y1..y2, in order.
function Zone:rule_years(y1, y2)
  local list = {}
  for y = y1, y2 do
    local c = self.year_cache[y]
    if not c then c = rule_transitions(self.rule, y); self.year_cache[y] = c end
    list[#list + 1], list[#list + 2] = c[1], c[2]
  end
  sort(list, function(a, b) return a[1] < b[1] end)
  return list
end

--- Seconds east of UTC at UTC instant t, and the zone's abbreviation then.
function Zone:offset(t)
  local times = self.times
  local n = #times
  if n > 0 and t < times[1] then return self.first, self.first_name end
  if n == 0 or t >= times[n] then
    local r = self.rule
    if not r then
      if n == 0 then return self.first, self.first_name end
      return self.offs[n], self.names[n]
    end
    if not r.dst then return r.std, r.std_name end
    local y = year_of(t)
    local list = self:rule_years(y - 1, y + 1)
    local off, name = r.std, r.std_name
    for k = 1, #list do
      if list[k][1] <= t then off, name = list[k][2], list[k][3] else break end
    end
    -- (after the table's last transition, before the rule's first: the table's)
    if n > 0 and list[1][1] > t then return self.offs[n], self.names[n] end
    return off, name
  end
  local lo, hi = 1, n                        -- the last transition at or before t
  while lo < hi do
    local mid = floor((lo + hi + 1) / 2)
    if times[mid] <= t then lo = mid else hi = mid - 1 end
  end
  return self.offs[lo], self.names[lo]
end

--- The instants in (a, b] at which the offset changes: { t, before, after }, in order.
function Zone:transitions(a, b)
  local cand, times, n = {}, self.times, #self.times
  local lo, hi = 1, n + 1                    -- the first transition after a
  while lo < hi do
    local mid = floor((lo + hi) / 2)
    if times[mid] > a then hi = mid else lo = mid + 1 end
  end
  for k = lo, n do
    local t = times[k]
    if t > b then break end
    cand[#cand + 1] = t
  end
  if self.rule and self.rule.dst and (n == 0 or b >= times[n]) then
    for _, tr in ipairs(self:rule_years(year_of(a) - 1, year_of(b) + 1)) do
      if tr[1] > a and tr[1] <= b and (n == 0 or tr[1] > times[n]) then cand[#cand + 1] = tr[1] end
    end
  end
  sort(cand)
  local out = {}
  for _, t in ipairs(cand) do
    local before, after = self:offset(t - 1), self:offset(t)
    if before ~= after and (#out == 0 or out[#out][1] ~= t) then out[#out + 1] = { t, before, after } end
  end
  return out
end

local SPAN = 100000                          -- more than any offset (26 h): a wall time's instants lie within

--- The smallest and largest offsets in force over UTC (a, b].
function Zone:offset_range(a, b)
  local lo = self:offset(a)
  local hi = lo
  for _, tr in ipairs(self:transitions(a, b)) do
    if tr[3] < lo then lo = tr[3] end
    if tr[3] > hi then hi = tr[3] end
  end
  return lo, hi
end

--- The UTC instants whose wall time is `l` (0, 1 or 2 of them, in order).
function Zone:instants(l)
  local offs = { (self:offset(l - SPAN)) }
  for _, tr in ipairs(self:transitions(l - 2 * SPAN, l + 2 * SPAN)) do offs[#offs + 1] = tr[3] end
  local found, seen = {}, {}
  for _, o in ipairs(offs) do
    local u = l - o
    if not seen[u] and self:offset(u) == o then seen[u] = true; found[#found + 1] = u end
  end
  sort(found)
  return found
end

--- For a wall time `l` in a gap (no instant has it): the instant the gap ends
--- (the transition that jumped over it); nil when `l` is not in a gap.
function Zone:gap_end(l)
  for _, tr in ipairs(self:transitions(l - 2 * SPAN, l + 2 * SPAN)) do
    local t, before, after = tr[1], tr[2], tr[3]
    if after > before and t + before <= l and l < t + after then return t end
  end
end

--- The wall time of UTC instant t -> y, mo, d, h, mi, s, offset.
function Zone:civil(t)
  local off = self:offset(t)
  local l = t + off
  local days = floor(l / 86400)
  local rest = l - days * 86400
  local y, mo, d = civil_from_days(days)
  return y, mo, d, floor(rest / 3600), floor(rest / 60) % 60, rest % 60, off
end

-- ===== loading

local cache = {}

local UTC = setmetatable({ name = "UTC", times = {}, offs = {}, names = {}, first = 0, first_name = "UTC",
                           year_cache = {} }, Zone_mt)

--- The directory of the zone files.
function M.dir() return getenv("TZDIR") or "/usr/share/zoneinfo" end

--- Parses the bytes of a TZif file -> zone, or nil and why not.
function M.parse(name, s)
  local h = header(s, 1)
  if not h then return nil, "not a TZif file" end
  local tsize, at = 4, 45
  if h.version >= 50 then                    -- '2' or later: skip to the 64-bit block
    local h2 = header(s, 45 + block_size(h, 4))
    if not h2 then return nil, "a version 2+ TZif file without its second header" end
    h, tsize, at = h2, 8, 45 + block_size(h, 4) + 44
  end
  if #s < at + block_size(h, tsize) - 1 then return nil, "the TZif file is cut short" end
  local z, err = data(s, h, at, tsize)
  if not z then return nil, err end
  z.name, z.year_cache = name, {}
  if tsize == 8 then
    local footer = s:match("^\n([^\n]*)\n", at + block_size(h, tsize))
    if footer and footer ~= "" then
      z.rule = posix(footer)
      if not z.rule then return nil, format("its POSIX TZ rule %q is not understood", footer) end
    end
  end
  return setmetatable(z, Zone_mt)
end

--- A zone by IANA name ("America/New_York", "UTC"), read from the tzdata
--- files; nil and why not for a name that is not a zone.
function M.zone(name)
  if type(name) ~= "string" then return nil, "a zone name must be a string" end
  local z = cache[name]
  if z then return z end
  if name == "UTC" or name == "Etc/UTC" or name == "Z" then return UTC end
  if name == "" or name:find("%.%.") or name:match("^/") or not name:match("^[%w_+%-/]+$") then
    return nil, format("bad time zone name %q (an IANA name like \"Europe/Paris\" expected)", name)
  end
  local path = M.dir() .. "/" .. name
  local fh = io_open(path, "rb")
  if not fh then
    return nil, format("unknown time zone %q (no file %s: an IANA name like \"Europe/Paris\" expected; "
                       .. "is the tzdata package installed?)", name, path)
  end
  local s = fh:read("*a")
  fh:close()
  local zone, err = M.parse(name, s or "")
  if not zone then return nil, format("time zone %q: %s: %s", name, path, err) end
  cache[name] = zone
  return zone
end

M.posix = posix

return M
