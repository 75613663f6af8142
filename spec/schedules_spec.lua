-- spec/schedules_spec.lua — cron schedules on workers: exactly one job per tick, none missed while a worker ran.
--
-- The same tests on SQLite and on PostgreSQL (TIDE_PG_URL, as spec/run.sh sets):
--   1. options: every wrong schedule option is an error naming it;
--   2. five workers in one process on the virtual clock, a per-second
--      schedule, three virtual minutes: workers stopped and started all the
--      while (never all at once); every tick from the first to the last has
--      exactly one job, with run_at = its tick;
--   3. catch-up: ten minutes with no worker, then one starts: by default
--      only the latest missed tick is enqueued, with catch_up = "5m" the
--      ticks of the last five minutes, with false none;
--   4. five `tide worker --schedule FILE` processes for ~25 s of real time,
--      one SIGKILLed and replaced every 1.5 s or so: every tick from the
--      first to the last has exactly one job, and every job completed.
local tide = require "tide"
local testing = tide.testing
local H = spec_helper
local time = require "tide.jobs.time"

local TIDE = H.build .. "/tide"
local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")
local wallclock = require("tide.core").wallclock
local SECONDS = tonumber(os.getenv("SCHED_SECONDS")) or 24
local PG_URL = os.getenv("TIDE_PG_URL")

local function fresh_pg()
  local c = require("tide.jobs.store.postgres").connect(PG_URL)
  c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_schedules, tide_queues, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
  c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
  c:close()
end

local STORES = { { name = "SQLite" } }
if PG_URL then STORES[2] = { name = "PostgreSQL" } end

--- The jobs of schedule `name`: { [tick ms] = count }, the sorted ticks, and the rows.
local function ticks_of(q, name)
  local count, list, rows = {}, {}, {}
  local before
  repeat
    local page = q:list{ limit = 1000, before = before }
    for _, j in ipairs(page) do
      local key = j.idempotency_key or ""
      local iso = key:match("^schedule:" .. name:gsub("%p", "%%%0") .. "@(.+)$")
      if iso then
        local t = time.parse_iso(iso)
        -- run_at is the tick, or later for a job a stopping worker released
        -- (released jobs keep attempt 0: the release does not count it)
        assert.is_true(j.run_at >= t, "run_at is never before the tick")
        if not count[t] then list[#list + 1] = t end
        count[t] = (count[t] or 0) + 1
        rows[#rows + 1] = j
      end
      before = j.id
    end
  until #page < 1000
  table.sort(list)
  return count, list, rows
end

--- Checks that every second from the first tick to the last has exactly one job.
local function assert_every_second(count, list, what)
  assert.is_true(#list > 0, what .. ": no ticks")
  for t = list[1], list[#list], 1000 do
    if count[t] ~= 1 then
      error(("%s: tick %s has %d jobs (ticks %s .. %s)"):format(what, time.iso(t), count[t] or 0,
        time.iso(list[1]), time.iso(list[#list])), 2)
    end
  end
  assert.equal((list[#list] - list[1]) / 1000 + 1, #list)
end

for _, store in ipairs(STORES) do
  describe("schedules on " .. store.name, function()
    local dir, url
    before_each(function()
      testing.before_each()
      dir = os.tmpname(); os.remove(dir); assert(os.execute("mkdir -p " .. dir) == 0)
      if store.name == "PostgreSQL" then fresh_pg(); url = PG_URL else url = "sqlite:" .. dir .. "/jobs.db" end
    end)
    after_each(function()
      testing.after_each()
      os.execute("rm -rf " .. dir)
    end)

    it("checks every option of a schedule, naming it", function()
      H.run(function()
        local q = tide.queue.open(url)
        local function w(s) return function() tide.worker{ queue = q, schedules = s } end end
        local good = { cron = "* * * * *", target = "reports", method = "daily" }
        local function with(k, v)
          local s = {}
          for a, b in pairs(good) do s[a] = b end
          s[k] = v
          return { s }
        end
        H.error_cases("spec/schedules_spec.lua", {
          { w("x"), "tide.worker: bad option 'schedules' (list of schedule tables expected, got string \"x\")" },
          { w{ 5 }, "tide.worker: bad option 'schedules[1]' (table expected, got number 5)" },
          { w{ x = good }, "tide.worker: bad option 'schedules' (a list expected, it has the key x)" },
          { w(with("cron", "* * *")), "tide.worker: bad option 'schedules[1].cron' (\"* * *\" has 3 fields (5 "
            .. "expected: minute hour day-of-month month day-of-week; or 6, seconds first))" },
          { w(with("cron", "0 24 * * *")), "tide.worker: bad option 'schedules[1].cron' (bad hour field '24' in "
            .. "\"0 24 * * *\": '24' is not a value from 0-23)" },
          { w(with("cron", nil)), "tide.worker: bad option 'schedules[1].cron' (cron expression string expected, got nil)" },
          { w(with("timezone", "Europe/Atlantis")), "tide.worker: bad option 'schedules[1].timezone' (unknown time zone "
            .. "\"Europe/Atlantis\" (no file /usr/share/zoneinfo/Europe/Atlantis: an IANA name like \"Europe/Paris\" "
            .. "expected; is the tzdata package installed?))" },
          { w(with("target", "no way")), "tide.worker: bad option 'schedules[1].target' (module name (like \"orders\" "
            .. "or \"app.mail\") expected, got string \"no way\")" },
          { w(with("method", 7)), "tide.worker: bad option 'schedules[1].method' (function name expected, got number 7)" },
          { w(with("catch_up", "soon")), "tide.worker: bad option 'schedules[1].catch_up' (duration (ms, or like \"1h\"), "
            .. "or false expected, got string \"soon\")" },
          { w(with("queue", "")), "tide.worker: bad option 'schedules[1].queue' (queue name (letters, digits, _ . -) "
            .. "expected, got string \"\")" },
          { w(with("args", { f = print })), "tide.worker: bad option 'schedules[1].args' (schedules[1].args.f: "
            .. "function cannot be encoded as JSON)" },
          { w(with("every", 5)), "tide.worker: unknown option 'schedules[1].every'" },
          { w{ good, good }, "tide.worker: schedules[1] and schedules[2] are both named 'reports.daily' (give each a name)" },
        })
        q:close()
      end)
    end)

    it("keeps the latest missed ticks, however long no worker ran, in little time", function()
      local schedules = require "tide.jobs.schedules"
      local cron = require "tide.jobs.cron"
      local now = time.parse_iso("2026-06-01T12:00:00.500Z")
      local year_ago = now - 365 * 86400000
      local function s(catch_up) return { cron = cron.parse("* * * * * *"), catch_up = catch_up } end
      local t0 = os.clock()
      assert.same({ time.parse_iso("2026-06-01T12:00:00Z") }, schedules.missed(s(nil), year_ago, now))
      assert.same({}, schedules.missed(s(false), year_ago, now))
      local day = schedules.missed(s(86400000), year_ago, now)
      assert.equal(schedules.MAX_CATCH_UP, #day)
      assert.equal(time.parse_iso("2026-06-01T12:00:00Z"), day[#day])
      assert.equal(1000, day[2] - day[1])
      local five = schedules.missed(s(5000), year_ago, now)
      assert.equal(5, #five)
      assert.same({}, schedules.missed(s(nil), now - 200, now))   -- no tick since the last one
      assert.is_true(os.clock() - t0 < 5, "took " .. (os.clock() - t0) .. " s")
    end)

    it("gives exactly one job per tick to five workers stopped and started for three virtual minutes", function()
      local clock = testing.clock()
      local base = wallclock()                 -- (the virtual wall clock's start: in the message below)
      local count, list
      H.run(function()
        local q = tide.queue.open(url)
        local sched = { { cron = "* * * * * *", target = "beat", method = "tick", args = { n = 1 } } }
        local ran = 0
        local targets = { beat = { tick = function() ran = ran + 1 end } }
        local function start() return tide.worker{ queue = q, schedules = sched, targets = targets, poll = 200 } end
        local workers = {}
        for i = 1, 5 do workers[i] = start() end
        math.randomseed(7)
        for _ = 1, 180 do
          clock:advance(1000)
          local i = math.random(1, 5)            -- one of them stops; a new one takes its place
          if math.random() < 0.3 then
            workers[i]:stop()
            workers[i]:wait()
            workers[i] = start()
          end
        end
        for i = 1, 5 do workers[i]:stop(); workers[i]:wait() end
        count, list = ticks_of(q, "beat.tick")
        q:close()
      end)
      clock:stop()
      assert_every_second(count, list, "virtual")
      -- (a rare failure gave 179: which end lost its tick, against the start)
      assert.is_true(#list >= 180, ("ticks: %d, the first %d ms after the start (at .%03d s), the last %d ms after")
        :format(#list, list[1] - base, base % 1000, list[#list] - base))
    end)

    it("enqueues missed ticks as catch_up says when a worker starts again", function()
      local got = {}
      H.run(function()
        local q = tide.queue.open(url)
        local core = require "tide.core"
        local function round(name, catch_up)
          -- The schedule's row says its latest tick was ten minutes ago:
          -- no worker ran it since.
          local now = core.wallclock()
          local last = now - now % 10000 - 600000
          q:transaction(function(tx)
            tx:exec("INSERT INTO tide_schedules (name, cron, timezone, target, method, queue, last_tick, seen_at) "
                    .. "VALUES (?, '*/10 * * * * *', 'UTC', 'beat', 'tick', 'default', ?, ?)", name, last, last)
          end)
          local sched = { { name = name, cron = "*/10 * * * * *", target = "beat", method = "tick", catch_up = catch_up } }
          local w = tide.worker{ queue = q, schedules = sched, queues = { idle = 1 } }
          tide.sleep(300)
          w:stop(); w:wait()
          local _, list = ticks_of(q, name)
          got[name] = { list = list, start = now, last = last }
        end
        round("latest", nil)
        round("five", "5m")
        round("none", false)
        q:close()
      end)
      -- (a tick may fall while the worker ran: that one is not a missed one)
      local function missed(r)
        local out = {}
        for _, t in ipairs(r.list) do if t <= r.start then out[#out + 1] = t end end
        return out
      end
      -- by default, only the latest missed tick
      local l = missed(got.latest)
      assert.equal(1, #l)
      assert.is_true(l[1] > got.latest.start - 10000, "the latest: " .. time.iso(l[1]))
      -- catch_up = "5m": every tick of the last five minutes
      local f = missed(got.five)
      assert.equal(30, #f)
      assert.is_true(f[1] > got.five.start - 300000 and f[1] <= got.five.start - 290000)
      for i = 2, #f do assert.equal(10000, f[i] - f[i - 1]) end
      -- false: none
      assert.same({}, missed(got.none))
    end)

    it("gives exactly one job per tick to five worker processes SIGKILLed and replaced for " .. SECONDS .. " s", function()
      local sfile = H.write_file(dir, "sched.lua",
        'return { { cron = "* * * * * *", target = "beat", method = "tick", args = { n = 1 } } }')
      local tfile = H.write_file(dir, "targets.lua", 'return { beat = { tick = function() end } }')
      if store.name == "SQLite" then              -- (the tables exist before five processes race to make them)
        local q = tide.queue.open(url); q:close()
      end
      local procs, live = {}, {}
      local function start()
        local n = #procs + 1
        local p = assert(io.popen(("%s worker --store %s --quiet --lease 2000 --poll 200 --schedule %s %s "
          .. "> %s/worker-%d.log 2>&1 & echo $!; exec 2>/dev/null; wait $!"):format(TIDE, url, sfile, tfile, dir, n)))
        local w = { pipe = p, pid = assert(tonumber(p:read("*l"))), n = n }
        procs[n] = w
        live[#live + 1] = w
      end
      for _ = 1, 5 do start() end
      local seed = tonumber(os.getenv("SCHED_SEED")) or os.time()
      math.randomseed(seed)
      local t0 = wallclock()
      local kills = 0
      while wallclock() < t0 + SECONDS * 1000 do
        H.sh(("sleep %.2f"):format(1.2 + math.random() * 0.6))
        local k = math.random(1, #live)
        assert.equal(0, ffi.C.kill(live[k].pid, 9))
        table.remove(live, k)
        kills = kills + 1
        start()
      end
      local t_end = wallclock()
      for _, w in ipairs(live) do ffi.C.kill(w.pid, 15) end
      for _, w in ipairs(procs) do w.pipe:close() end
      -- the jobs the killed workers held come back when their 2 s leases run out
      local status, out = H.sh(("%s worker --store %s --quiet --lease 2000 --drain --queue default %s")
        :format(TIDE, url, tfile))
      assert.equal(0, status, out)
      local q = tide.queue.open(url)
      local count, list, rows = ticks_of(q, "beat.tick")
      q:close()
      assert_every_second(count, list, "seed " .. seed)
      -- every second while a worker ran: from the first worker's start to the last one's stop
      assert.is_true(list[1] <= t0 + 3000, "first tick " .. time.iso(list[1]) .. ", started " .. time.iso(t0))
      assert.is_true(list[#list] >= t_end - 1000, "last tick " .. time.iso(list[#list]) .. ", stopped " .. time.iso(t_end))
      local done = 0
      for _, j in ipairs(rows) do if j.status == "completed" then done = done + 1 end end
      assert.equal(#rows, done)
      print(("\n# schedules on %s: %d worker processes, %d SIGKILLed, %d ticks in %.1f s, each exactly one job, "
             .. "all completed (seed %d)"):format(store.name, #procs, kills, #list, (t_end - t0) / 1000, seed))
    end)
  end)
end
