--- tide.jobs.store.pg_clock — a PostgreSQL store's reading of the server's clock.
--
-- Every time the PostgreSQL store compares is the server's (NOW in its
-- statements), so every time a process writes to be compared with it must
-- be too: a producer whose clock runs ahead would delay its jobs, and a
-- worker behind the server would write leases that have run out already
-- (spec/pg_clock_spec.lua).  A clock holds the server's time `server` (UTC
-- ms) as it was at `at` on this process's monotonic clock, and now()
-- counts on from there on the monotonic clock, so a step of this
-- machine's wall clock (NTP, by hand) changes nothing; a reading about
-- once a minute takes in the drift between the two machines' clocks.  The
-- stores of one tide.queue.open (its workers' stores too) share one clock.
local core = require "tide.core"

local pcall, tonumber, floor = pcall, tonumber, math.floor

local M = {}

local EVERY = 60000     -- ms between readings (the two machines' clocks tick at rates a little apart)
local RTT = 50          -- ms: a reading whose round trip took longer is not taken (its error is up to the round trip)
local RETRY = 1000      -- ms before reading again after one not taken

--- The server's clock in whole UTC ms, rounded down (never ahead of it), as SQL.
M.SERVER_MS = "floor(extract(epoch from clock_timestamp()) * 1000)::bigint"

--- A clock not read yet (M.measure reads it).
function M.new() return { measured = -math.huge } end

--- Reads the server's time on connection c (pg_conn).  The server read its
--- clock (whole ms, rounded down) somewhere inside the round trip, so at
--- its end (real time: the loop's virtual clock stands still during I/O)
--- the server's time was at least what it read: the estimate is never
--- ahead of the server, and behind it by at most the round trip.  (Ahead,
--- a job enqueued "for now" would not yet be due to the claim its enqueue
--- wakes, and would wait a poll.)  A round trip longer than RTT (the loop
--- busy while the answer waited, a slow server) is not taken, unless there
--- is no other yet; another reading follows soon.  Raises as c:query does.
function M.measure(clock, c)
  local before = core.now(true)
  local server = tonumber(c:query("SELECT " .. M.SERVER_MS .. " AS now").rows[1].now)
  local after = core.now(true)
  local slow = after - before > RTT
  clock.measured = core.now() - (slow and EVERY - RETRY or 0)
  if not (slow and clock.server) then clock.server, clock.at = server, after end
end

--- Reads the server's time on connection c when EVERY ms have passed
--- since the last reading (a store's acquire calls it).  A failure keeps
--- the last reading: the caller's own statement will meet what broke, and
--- say it.
function M.refresh(clock, c)
  if core.now() - clock.measured < EVERY then return end
  clock.measured = core.now()
  pcall(M.measure, clock, c)
end

--- The server's time now, in whole UTC ms, as this process can tell it
--- (never ahead of it).  Under tide.testing's virtual clock core.now() is
--- the virtual time: the store's times then move with it, as SQLite's do.
function M.now(clock) return floor(clock.server + (core.now() - clock.at)) end

return M
