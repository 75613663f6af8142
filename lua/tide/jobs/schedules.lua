--- tide.jobs.schedules — cron schedules run by workers: one job per tick, however many workers run them.
--
--   tide.worker{ queue = q, schedules = {
--     { cron = "*/5 * * * *", target = "reports", method = "hourly", args = {},
--       timezone = "Europe/Paris", catch_up = "1h", name = "reports" } } }
--
-- Each worker that has a schedule runs a scheduler task.  At each tick it
-- enqueues the tick's job with the idempotency key "schedule:NAME@TICK"
-- (TICK in ISO 8601 UTC), in one transaction with an update of the
-- schedule's row in tide_schedules (the latest tick enqueued).  Every worker
-- tries every tick; the key's unique index lets exactly one insert through,
-- so a tick gets exactly one job whatever the number of workers, machines
-- or clocks, and a worker killed at any instant loses nothing the others
-- do not make up for.  A running worker never skips a tick: one that falls
-- behind (a store down for a while) enqueues every tick since, in order.
--
-- Catch-up.  A worker that starts finds the schedule's latest tick enqueued
-- in tide_schedules; ticks after it and before now were missed while no
-- worker ran.  catch_up says which of them are enqueued: by default only the
-- latest one; a duration ("1h", or ms): every missed tick younger than that;
-- false: none.  A schedule no worker ran before starts from now.  Jobs of
-- missed ticks have run_at = their tick.
--
-- The job's run_at is its tick; its args are the schedule's, the same at
-- every tick (the job's own run_at tells the method which tick it is).
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local cron = require "tide.jobs.cron"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local queue = require "tide.jobs.queue"
local time = require "tide.jobs.time"

local type, error, pairs, ipairs, tostring, pcall, format = type, error, pairs, ipairs, tostring, pcall, string.format
local min, max = math.min, math.max
local opt_error = check.opt_error

local M = {}

local KEYS = check.options("worker schedule", {
  name = true, cron = true, target = true, method = true, args = true, queue = true, timezone = true,
  catch_up = true, priority = true, max_attempts = true })

local CHUNK = 1000                          -- ticks per transaction
-- The longest the scheduler sleeps: ticks are wall times, its timers run on
-- the monotonic clock, and the two part (a suspend stops the monotonic
-- clock; NTP steps the wall clock): it looks at the wall clock again this often.
local MAX_WAIT = 60000
M.MAX_CATCH_UP = 10000                      -- missed ticks enqueued at most, the latest ones

-- ===== checking

--- Checks one schedule; returns its normalized form.
local function check_one(fname, i, s, level)
  local key = ("schedules[%d]"):format(i)
  if type(s) ~= "table" then opt_error(fname, key, "table", s, level + 1) end
  check.known(fname, s, KEYS, key .. ".", level + 1)
  if type(s.cron) ~= "string" then opt_error(fname, key .. ".cron", "cron expression string", s.cron, level + 1) end
  if s.timezone ~= nil and type(s.timezone) ~= "string" then
    opt_error(fname, key .. ".timezone", "IANA time zone name (like \"Europe/Paris\")", s.timezone, level + 1)
  end
  local c, err = cron.try_parse(s.cron, s.timezone or "UTC")
  if not c then
    error(format("%s: bad option '%s.%s' (%s)", fname, key, err:find("time zone", 1, true) and "timezone" or "cron",
                 err), level + 1)
  end
  if not job.is_name(s.target) then
    opt_error(fname, key .. ".target", "module name (like \"orders\" or \"app.mail\")", s.target, level + 1)
  end
  if not job.is_method(s.method) then opt_error(fname, key .. ".method", "function name", s.method, level + 1) end
  if s.queue ~= nil and not job.is_name(s.queue) then
    opt_error(fname, key .. ".queue", "queue " .. job.NAME_EXPECTED, s.queue, level + 1)
  end
  if s.priority ~= nil and not job.is_priority(s.priority) then
    opt_error(fname, key .. ".priority", job.PRIORITY_EXPECTED, s.priority, level + 1)
  end
  if s.max_attempts ~= nil and not job.is_max_attempts(s.max_attempts) then
    opt_error(fname, key .. ".max_attempts", job.MAX_ATTEMPTS_EXPECTED, s.max_attempts, level + 1)
  end
  local catch_up = s.catch_up
  if catch_up ~= nil and catch_up ~= false then
    catch_up = check.duration(catch_up)
    if not catch_up then
      opt_error(fname, key .. ".catch_up", "duration (ms, or like \"1h\"), or false", s.catch_up, level + 1)
    end
  end
  local name = s.name == nil and s.target .. "." .. s.method or s.name
  if type(name) ~= "string" or name == "" or #name > 200 or job.key_problem(name) then
    opt_error(fname, key .. ".name", "non-empty text of at most 200 bytes", s.name, level + 1)
  end
  json.encode_option(fname, key .. ".args", s.args, level + 1)
  return { name = name, cron = c, cron_text = s.cron, timezone = s.timezone or "UTC", target = s.target,
           method = s.method, args = s.args, queue = s.queue or "default", priority = s.priority,
           max_attempts = s.max_attempts, catch_up = catch_up }
end

--- Checks a list of schedules (tide.worker's `schedules`, a --schedule
--- file); returns them normalized.  Two with one name are an error.
function M.check(fname, list, level)
  level = (level or 1) + 1
  if type(list) ~= "table" then opt_error(fname, "schedules", "list of schedule tables", list, level) end
  local out, names, n = {}, {}, 0
  for k in pairs(list) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
      error(format("%s: bad option 'schedules' (a list expected, it has the key %s)", fname, tostring(k)), level)
    end
    if k > n then n = k end
  end
  for i = 1, n do                              -- (not ipairs: a hole would drop the schedules after it)
    local one = check_one(fname, i, list[i], level)
    if names[one.name] then
      error(format("%s: schedules[%d] and schedules[%d] are both named '%s' (give each a name)", fname,
                   names[one.name], i, one.name), level)
    end
    names[one.name] = i
    out[i] = one
  end
  return out
end

--- The idempotency key of schedule `s`'s tick `t` (ms).
function M.key(s, t) return queue.TICK_PREFIX .. s.name .. "@" .. time.iso(t) end

-- ===== catching up

--- The missed ticks in (last, now] that catch_up keeps: the latest one, or
--- those younger than the window (at most MAX_CATCH_UP, the latest).
--- Looks back in growing steps from now, so that the cost follows what is
--- kept, not how long no worker ran (a per-second schedule left for a
--- year would be 31 million ticks to walk).
function M.missed(s, last, now)
  if last == nil or s.catch_up == false or last >= now then return {} end
  local keep = s.catch_up and M.MAX_CATCH_UP or 1
  local oldest = s.catch_up and max(last, now - s.catch_up) or last
  local back = 60000
  while true do
    local from = max(oldest, now - back)
    local ticks, t = {}, s.cron:next(from)
    while t and t <= now do
      ticks[#ticks + 1] = t
      t = s.cron:next(t)
    end
    if #ticks >= keep or from == oldest then
      local out = {}
      for i = max(1, #ticks - keep + 1), #ticks do out[#out + 1] = ticks[i] end
      return out
    end
    back = back * 16
  end
end

-- ===== the scheduler task

--- Enqueues up to CHUNK of each schedule's pending ticks in one transaction;
--- returns how many were inserted (others had a job already).
local function enqueue_pending(w, list)
  local now = w.store:now()
  return w.q:transaction(function(tx)
    local session = queue.tx_session(tx)
    local inserted, done = 0, {}
    for _, s in ipairs(list) do
      local p = s.pending
      if #p > 0 then
        local n = min(#p, CHUNK)
        for k = 1, n do
          local t = p[k]
          local _, fresh = queue.enqueue_tick(tx, {
            target = s.target, method = s.method, args = s.args, queue = s.queue, run_at = t,
            priority = s.priority, max_attempts = s.max_attempts, idempotency_key = M.key(s, t) })
          if fresh then inserted = inserted + 1 end
        end
        session:schedule_advance(s.name, p[n], now, w.id)
        done[s] = n
      end
    end
    return inserted, done
  end)
end

--- Registers the schedules and computes their missed ticks (one transaction).
local function register(w, list)
  local now = w.store:now()
  w.q:transaction(function(tx)
    local session = queue.tx_session(tx)
    for _, s in ipairs(list) do
      s.last_tick = session:schedule_register(s, now, w.id)
      s.pending = M.missed(s, s.last_tick, now)
      s.next_at = s.cron:next(now)
    end
  end)
end

--- Runs store step fn(w, list) until it succeeds or the worker stops;
--- backs off while the store fails.  Returns fn's results, or nil.
local function persist(w, what, fn, list)
  local failures = 0
  while w.state == "running" do
    local ok, a, b = pcall(fn, w, list)
    if ok then
      if failures > 0 then w.failing.schedule = nil end
      return true, a, b
    end
    log.report("worker " .. w.id .. ": " .. what, a)
    failures = failures + 1
    w.last_error = a
    if not w.failing.schedule then w.failing.schedule = core.now() end
    S.wait_for(w.scheduler, "tide.worker", min(w.poll, 50 * 2 ^ min(failures - 1, 16)))
  end
end

--- The scheduler task of worker w (see the top of this file).
function M.run(w, list)
  -- Every worker locks the schedules' rows and keys in name order: in the
  -- order of its own list, two workers with lists in other orders deadlock.
  local by_name = {}
  for i, s in ipairs(list) do by_name[i] = s end
  table.sort(by_name, function(a, b) return a.name < b.name end)
  list = by_name
  if not persist(w, "registering schedules", register, list) then return end
  while w.state == "running" do
    local now, soonest, any = w.store:now(), nil, false
    for _, s in ipairs(list) do
      while s.next_at and s.next_at <= now and #s.pending < CHUNK do
        s.pending[#s.pending + 1] = s.next_at
        s.next_at = s.cron:next(s.next_at)
      end
      if #s.pending > 0 then any = true end
      if s.next_at and (not soonest or s.next_at < soonest) then soonest = s.next_at end
    end
    if any then
      local ok, inserted, done = persist(w, "enqueueing scheduled jobs", enqueue_pending, list)
      if not ok then break end
      w.stats.scheduled = w.stats.scheduled + inserted
      for s, n in pairs(done) do
        s.last_tick = s.pending[n]
        local rest = {}
        for k = n + 1, #s.pending do rest[#rest + 1] = s.pending[k] end
        s.pending = rest
      end
    elseif soonest then
      -- (+1: a timer may fire within its last millisecond; never spin)
      S.wait_for(w.scheduler, "tide.worker", min(MAX_WAIT, max(1, soonest - w.store:now() + 1)))
    else
      S.wait_for(w.scheduler, "tide.worker")   -- no tick before the year 10000: until stopped
    end
  end
end

--- For w:info(): each schedule's name, next tick and latest tick enqueued (UTC ms).
function M.info(list)
  local out = {}
  for i, s in ipairs(list) do
    out[i] = { name = s.name, cron = s.cron_text, timezone = s.timezone, next_at = s.next_at,
               last_tick = s.last_tick }
  end
  return out
end

return M
