-- bench/schedules.lua — the cost of a schedule's next tick (tide.jobs.cron with a tide.jobs.tz zone).
--
--   1. c:next over a year of ticks for a few expressions and zones, ns per
--      tick; baseline: the same number of os.date("!*t", t) calls (the C
--      library's gmtime: one civil-date conversion, the least a tick needs);
--   2. reading a zone's TZif file (first use; cached after).
-- A worker computes a schedule's next tick once per tick: these figures
-- say what a per-second schedule costs a core (ns per tick / 1e9).
--
-- Run from the repository root: LUA_CPATH="build/?.so;;" luajit bench/schedules.lua
package.path = "lua/?.lua;" .. package.path
local cron = require "tide.jobs.cron"
local tz = require "tide.jobs.tz"
local time = require "tide.jobs.time"

local clock = os.clock
local function best_of(n, fn)
  local best, all = math.huge, {}
  for i = 1, n do
    local t0 = clock()
    local work = fn()
    local dt = (clock() - t0) / work
    all[i] = dt
    if dt < best then best = dt end
  end
  table.sort(all)
  return best, all[math.ceil(n / 2)]
end

local from = time.parse_iso("2026-01-01T00:00:00Z")
local CASES = {
  { "* * * * * *", "America/New_York", 200000 },      -- per second, two days and more
  { "*/15 * * * *", "Europe/Paris", 35040 },          -- a year of quarter hours, both clock changes
  { "30 2 * * *", "America/New_York", 365 },          -- daily at a time the spring-forward night skips
  { "0 9 * * MON-FRI", "Australia/Lord_Howe", 261 },
  { "@hourly", "UTC", 8760 },
}
local base = best_of(3, function()
  local t = from / 1000
  for _ = 1, 200000 do os.date("!*t", t); t = t + 1 end
  return 200000
end)
print(("baseline: os.date(\"!*t\") %.0f ns per call"):format(base * 1e9))
for _, c in ipairs(CASES) do
  local expr, zone, n = c[1], c[2], c[3]
  local sch = cron.parse(expr, zone)
  local b, m = best_of(3, function()
    local t = from
    for _ = 1, n do t = sch:next(t) end
    return n
  end)
  print(("%-18s %-22s %7d ticks: %6.0f ns per tick (median %6.0f), %.1fx gmtime"):format(expr, zone, n, b * 1e9,
    m * 1e9, b / base))
end
local names = { "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "America/Sao_Paulo" }
local t0 = clock()
for _, name in ipairs(names) do assert(tz.zone(name)) end
print(("reading %d zone files: %.0f us each"):format(#names, (clock() - t0) / #names * 1e6))
