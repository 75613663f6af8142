-- spec/pg/targets.lua — the targets of the worker processes that spec/pg_workers_spec.lua runs.
--
--   tide worker --store URL --quiet [options] spec/pg/targets.lua DIR
--
-- Its one target, pgw.work, waits 0-3 ms ("does the work"), appends the
-- effect "job_id pid attempt wallclock_ms" to DIR/effects.<pid> and
-- flushes it (one write(2) on an O_APPEND file: a SIGKILL loses nothing
-- already written and never leaves half a line), then waits 0-2 ms more,
-- so that a kill can fall before the effect, between the effect and the
-- completion being recorded, or after.
local tide = require "tide"
local core = require "tide.core"

local dir = ...
assert(type(dir) == "string", "usage: spec/pg/targets.lua DIR")
local pid = core.pid()
local effects = assert(io.open(("%s/effects.%d"):format(dir, pid), "a"))
math.randomseed(pid * 7919 + core.wallclock() % 100000)

local function work(args, job)
  tide.sleep(math.random(0, 3))
  effects:write(("%d %d %d %d\n"):format(job.id, pid, job.attempt, core.wallclock()))
  effects:flush()
  tide.sleep(math.random(0, 2))
  return args.n
end

return { pgw = { work = work } }
