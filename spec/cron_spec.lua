-- spec/cron_spec.lua — tide.jobs.cron and tide.jobs.tz: parsing, zones read from tzdata, ticks across clock changes.
--
-- The zones are checked against GNU `date` (its own tzdata reader, glibc's):
-- offsets at random instants from 1901 to 2242, and every tick of several
-- schedules over two days around each clock change of 2026 and 2045 (2045:
-- past the files' table, where the POSIX rule of the footer rules) in zones
-- with one-hour, half-hour and midnight changes, both hemispheres.  The
-- expected ticks are built from `date`'s wall time of every minute, with the
-- rule cron.lua documents written again here by brute force: a fixed-time
-- schedule runs at the first instant of a wall time, and a wall time the
-- clocks jumped over runs at the instant the jump ends; an interval schedule
-- runs at every instant whose wall time matches.
local cron = require "tide.jobs.cron"
local tz = require "tide.jobs.tz"
local time = require "tide.jobs.time"

local ZONES = { "America/New_York", "Europe/London", "Australia/Sydney", "Australia/Lord_Howe",
                "Pacific/Chatham", "America/Santiago", "America/Nuuk", "Asia/Kolkata", "Europe/Dublin" }

--- Runs `date -f` over UTC seconds `ts` in `zone`; returns its output lines.
local function date_lines(zone, ts, fmt)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  for _, t in ipairs(ts) do f:write("@", string.format("%d", t), "\n") end
  f:close()
  local p = assert(io.popen(("TZ=%s date -f %s '+%s'"):format(zone, path, fmt)))
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  os.remove(path)
  assert(#out == #ts, "date printed " .. #out .. " lines for " .. #ts .. " times")
  return out
end

describe("tide.jobs.cron parsing", function()
  it("names the field, the item and what was expected", function()
    local cases = {
      { "0 25 * * *", "bad hour field '25' in \"0 25 * * *\": '25' is not a value from 0-23" },
      { "* * *", "\"* * *\" has 3 fields (5 expected: minute hour day-of-month month day-of-week; or 6, seconds first)" },
      { "@reboot", "unknown alias \"@reboot\" in \"@reboot\" (@yearly, @annually, @monthly, @weekly, @daily, "
                   .. "@midnight or @hourly expected)" },
      { "0 0 30 2 *", "bad day-of-month field '30' in \"0 0 30 2 *\": no month given has such a day (it would never run)" },
      { "0 0 L * *", "bad day-of-month field 'L' in \"0 0 L * *\": 'L' is not standard cron (L, W, # and ? are not supported)" },
      { "1-0 * * * *", "bad minute field '1-0' in \"1-0 * * * *\": range '1-0' starts after its end" },
      { "*/0 * * * *", "bad minute field '*/0' in \"*/0 * * * *\": step '0' is not an integer >= 1" },
      { "0 0 * * MON-XYZ", "bad day-of-week field 'MON-XYZ' in \"0 0 * * MON-XYZ\": range 'MON-XYZ' is not two values from 0-7 or names" },
      { "0 0 * 13 *", "bad month field '13' in \"0 0 * 13 *\": '13' is not a value from 1-12 or JAN-DEC" },
      { "60 * * * * *", "bad seconds field '60' in \"60 * * * * *\": '60' is not a value from 0-59" },
      { "1,,2 * * * *", "bad minute field '1,,2' in \"1,,2 * * * *\": an empty item" },
    }
    for _, case in ipairs(cases) do
      local c, err = cron.try_parse(case[1])
      assert.is_nil(c)
      assert.equal(case[2], err)
    end
    assert.has_error(function() cron.parse("* * *", nil, "tide.worker: schedules[1].cron") end,
      "tide.worker: schedules[1].cron: \"* * *\" has 3 fields (5 expected: minute hour day-of-month month "
      .. "day-of-week; or 6, seconds first)")
  end)

  it("refuses an unknown zone, and a name that could leave the zone directory", function()
    local c, err = cron.try_parse("* * * * *", "Mars/Olympus")
    assert.is_nil(c)
    assert.equal("unknown time zone \"Mars/Olympus\" (no file " .. tz.dir() .. "/Mars/Olympus: an IANA name like "
                 .. "\"Europe/Paris\" expected; is the tzdata package installed?)", err)
    for _, name in ipairs{ "../../etc/passwd", "/etc/passwd", "", "Europe/../../x" } do
      local z, why = tz.zone(name)
      assert.is_nil(z)
      assert.matches("^bad time zone name", why)
    end
    local z, why = tz.zone("posixrules/../..")
    assert.is_nil(z)
    assert.truthy(why)
  end)

  it("refuses a TZif file cut short, or whose offsets are beyond RFC 8536's (a tick would take years to find)", function()
    --- A version 1 TZif file: one transition at 1e9 s from offset 0 to `off` (seconds east of UTC).
    local function u32(v) v = v % 2^32; return string.char(math.floor(v / 2^24) % 256, math.floor(v / 2^16) % 256,
                                                           math.floor(v / 2^8) % 256, v % 256) end
    local function tzif(off)
      return "TZif\0" .. ("\0"):rep(15) .. u32(0) .. u32(0) .. u32(0) .. u32(1) .. u32(2) .. u32(4)
        .. u32(1e9) .. "\1" .. u32(0) .. "\0\0" .. u32(off) .. "\1\2" .. "A\0B\0"
    end
    local z = assert(tz.parse("Fine", tzif(93599)))
    assert.equal(93599, (z:offset(1e9)))
    for _, off in ipairs{ 200 * 86400, -90000, 93600, -2^31 } do
      local bad, why = tz.parse("Hostile", tzif(off))
      assert.is_nil(bad)
      assert.equal(("local time type 1 has an offset of %d s (more than -25 h and less than 26 h expected)")
                   :format(off), why)
    end
    local bytes = tzif(3600)
    for n = 0, #bytes - 1 do
      local cut, why = tz.parse("Cut", bytes:sub(1, n))
      assert.is_nil(cut)
      assert.is_string(why)
    end
  end)

  it("reads aliases, names, steps, lists and the optional seconds field", function()
    local ticks = spec_helper.cron_ticks
    assert.same(ticks("0 0 1 1 *", "2026-05-01T00:00:00Z", 2), ticks("@yearly", "2026-05-01T00:00:00Z", 2))
    assert.same(ticks("@annually", "2026-05-01T00:00:00Z", 2), ticks("@yearly", "2026-05-01T00:00:00Z", 2))
    assert.same(ticks("@midnight", "2026-05-01T00:00:00Z", 2), ticks("@daily", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-06-01T00:00:00Z", "2026-07-01T00:00:00Z" }, ticks("@monthly", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-05-03T00:00:00Z", "2026-05-10T00:00:00Z" }, ticks("@weekly", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-05-01T01:00:00Z", "2026-05-01T02:00:00Z" }, ticks("@hourly", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-05-01T00:00:20Z", "2026-05-01T00:00:40Z", "2026-05-01T00:01:00Z" },
                ticks("*/20 * * * * *", "2026-05-01T00:00:00Z", 3))
    assert.same({ "2026-05-01T00:00:01Z", "2026-05-01T00:00:02Z" }, ticks("* * * * * *", "2026-05-01T00:00:00Z", 2))
    -- 2026-05-01 is a Friday; Friday, then Monday to Friday
    assert.same({ "2026-05-01T09:00:00Z", "2026-05-04T09:00:00Z" }, ticks("0 9 * * mon-FRI", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-05-03T09:00:00Z", "2026-05-10T09:00:00Z" }, ticks("0 9 * * 7", "2026-05-01T00:00:00Z", 2))
    -- both day fields restricted: either matches (the 15th, or a Monday)
    assert.same({ "2026-05-04T00:00:00Z", "2026-05-11T00:00:00Z", "2026-05-15T00:00:00Z", "2026-05-18T00:00:00Z" },
                ticks("0 0 15 * MON", "2026-05-01T00:00:00Z", 4))
    -- a day field written */S counts as * (Vixie cron): only the other one restricts
    assert.same({ "2026-05-04T00:00:00Z", "2026-05-11T00:00:00Z" }, ticks("0 0 */1 * MON", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z" }, ticks("0 0 29 FEB *", "2026-05-01T00:00:00Z", 2))
    assert.same({ "2026-05-01T00:10:00Z", "2026-05-01T00:40:00Z", "2026-05-01T01:10:00Z" },
                ticks("10/30 * * * *", "2026-05-01T00:00:00Z", 3))
    assert.same({ "2026-05-01T01:05:00Z", "2026-05-01T01:07:00Z", "2026-05-01T03:05:00Z" },
                ticks("5-7/2 1-3/2 * * *", "2026-05-01T00:00:00Z", 3))
    -- in a zone: 09:00 in Paris is 07:00 UTC in summer
    assert.same({ "2026-05-01T07:00:00Z" }, ticks("0 9 * * *", "2026-05-01T00:00:00Z", 1, "Europe/Paris"))
    -- none before the year 10000
    assert.is_nil(cron.parse("0 0 1 1 *"):next(time.parse_iso("9999-06-01T00:00:00Z")))
  end)
end)

describe("tide.jobs.tz against GNU date", function()
  local seed = tonumber(os.getenv("CRON_SEED")) or os.time()
  it("gives the offset date gives at random instants from 1901 to 2242 (seed " .. seed .. ")", function()
    math.randomseed(seed)
    for _, name in ipairs(ZONES) do
      local z = assert(tz.zone(name))
      local ts = {}
      for i = 1, 1500 do
        ts[i] = i % 2 == 0 and math.random(-2 ^ 31, 2 ^ 33) or math.random(1.7e9, 2.6e9)
      end
      local lines = date_lines(name, ts, "%z")
      for i, t in ipairs(ts) do
        local sign, hh, mm = lines[i]:match("^([+-])(%d%d)(%d%d)$")
        local want = (tonumber(hh) * 3600 + tonumber(mm) * 60) * (sign == "-" and -1 or 1)
        local off = z:offset(t)
        local mine = off >= 0 and off - off % 60 or -((-off) - (-off) % 60)   -- (date cuts seconds of LMT)
        if mine ~= want then
          error(("%s at %d (%s): date says %s, tz says %d s (seed %d)"):format(name, t, os.date("!%c", t),
                lines[i], off, seed))
        end
      end
    end
  end)
end)

describe("tide.jobs.cron ticks across clock changes, checked against GNU date", function()
  local EXPRS = { "30 2 * * *", "0 * * * *", "*/15 * * * *", "30 1 * * *", "0 0 * * *", "15,45 0-3 * * *",
                  "0 2 * * 0", "@hourly", "* 2 * * *", "45 2 * * *", "0 1,2,3 * * *" }

  --- The windows to look at: two days around each change in 2026 and in 2045.
  local function windows(z)
    local out = {}
    for _, year in ipairs{ 2026, 2045 } do
      local a = time.days_from_civil(year, 1, 1) * 86400
      local b = time.days_from_civil(year + 1, 1, 1) * 86400
      for _, tr in ipairs(z:transitions(a, b)) do
        local t = tr[1] - tr[1] % 60
        out[#out + 1] = { t - 86400, t + 86400 }
      end
    end
    if #out == 0 then out[1] = { 1780000020, 1780000020 + 2 * 86400 } end
    return out
  end

  --- The wall time of each minute of the window, as date prints it: "y m d H M".
  local function walls(zone, w)
    local ts = {}
    for t = w[1], w[2], 60 do ts[#ts + 1] = t end
    local lines = date_lines(zone, ts, "%Y %m %d %H %M")
    local out = {}
    for i, line in ipairs(lines) do
      local y, m, d, h, mi = line:match("^(%d+) (%d+) (%d+) (%d+) (%d+)$")
      y, m, d, h, mi = tonumber(y), tonumber(m), tonumber(d), tonumber(h), tonumber(mi)
      out[i] = { t = ts[i], y = y, m = m, d = d, h = h, mi = mi,
                 wall = time.days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 }
    end
    return out
  end

  --- The schedule's fields, matched as cron.lua's header says (written again here).
  local function matches(c, y, m, d, h, mi)
    local s = c.sets
    local dow = (time.days_from_civil(y, m, d) + 4) % 7
    local dom_ok, dow_ok = s[4][d] == true, s[6][dow] == true
    local day
    if c.dom_star and c.dow_star then day = true
    elseif c.dom_star then day = dow_ok
    elseif c.dow_star then day = dom_ok
    else day = dom_ok or dow_ok end
    return s[1][0] and s[2][mi] and s[3][h] and s[5][m] and day or false
  end

  --- Expected ticks in the window (after its first minute), by brute force over date's wall times.
  local function expected(c, ws)
    local out, seen = {}, {}
    for i, x in ipairs(ws) do
      local first = not seen[x.wall]
      seen[x.wall] = true
      if i > 1 then
        local prev = ws[i - 1]
        local jumped = false
        if not c.interval then                  -- wall minutes the clocks skipped
          for wall = prev.wall + 60, x.wall - 60, 60 do
            local days = math.floor(wall / 86400)
            local y, m, d = time.civil_from_days(days)
            local rest = wall - days * 86400
            if matches(c, y, m, d, math.floor(rest / 3600), math.floor(rest / 60) % 60) then jumped = true end
          end
        end
        if (matches(c, x.y, x.m, x.d, x.h, x.mi) and (c.interval or first)) or jumped then out[#out + 1] = x.t end
      end
    end
    return out
  end

  for _, zone in ipairs(ZONES) do
    it("gives the ticks date's wall times give in " .. zone, function()
      local z = assert(tz.zone(zone))
      local checked = 0
      for _, w in ipairs(windows(z)) do
        local ws = walls(zone, w)
        for _, expr in ipairs(EXPRS) do
          local c = cron.parse(expr, zone)
          local want = expected(c, ws)
          local got, t = {}, c:next(w[1] * 1000)
          while t and t <= w[2] * 1000 do got[#got + 1] = t / 1000; t = c:next(t) end
          if #got ~= #want then
            local a, b = {}, {}
            for i = 1, #want do a[i] = time.iso(want[i] * 1000) end
            for i = 1, #got do b[i] = time.iso(got[i] * 1000) end
            error(("%s %q from %s: expected %d ticks, got %d\n  expected %s\n  got      %s"):format(zone, expr,
              time.iso(w[1] * 1000), #want, #got, table.concat(a, " "), table.concat(b, " ")))
          end
          for i = 1, #want do
            if got[i] ~= want[i] then
              error(("%s %q: tick %d: expected %s, got %s"):format(zone, expr, i, time.iso(want[i] * 1000),
                time.iso(got[i] * 1000)))
            end
          end
          checked = checked + #want
        end
      end
      assert.is_true(checked > 100)
    end)
  end

  it("keeps a per-second schedule ticking every second through a fall-back in New York", function()
    local c = cron.parse("* * * * * *", "America/New_York")
    -- 2026-11-01 06:00:00Z is 01:00 EST, a second after 01:59:59 EDT
    local from = time.parse_iso("2026-11-01T05:59:50Z")
    local t, n = from, 0
    for _ = 1, 20 do
      local nt = c:next(t)
      assert.equal(t + 1000, nt)
      t, n = nt, n + 1
    end
    assert.equal(20, n)
    -- and jumps over nothing at the spring-forward instant (2026-03-08 07:00:00Z)
    t = time.parse_iso("2026-03-08T06:59:58Z")
    assert.same({ t + 1000, t + 2000, t + 3000 }, { c:next(t), c:next(t + 1000), c:next(t + 2000) })
  end)
end)
