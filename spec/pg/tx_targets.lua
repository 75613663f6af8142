-- spec/pg/tx_targets.lua — the target of the worker processes that spec/pg_tx_kill_spec.lua kills.
--
--   tide worker --store URL --quiet [options] spec/pg/tx_targets.lua URL
--
-- txw.work records its effect the way the README asks jobs to: a row
-- inserted in a transaction of its own (q:transaction, from this process's
-- pool), "job_id attempt pid at".  It waits 0-3 ms before and 0-2 ms after,
-- so that a kill can fall before the effect (its transaction rolls back with
-- the connection), between the effect's commit and the job's completion
-- being recorded (the one window for a second effect), or after.
local tide = require "tide"
local core = require "tide.core"

local url = ...
assert(type(url) == "string", "usage: spec/pg/tx_targets.lua URL")
local q = tide.queue.open(url)
local pid = core.pid()
math.randomseed(pid * 7919 + core.wallclock() % 100000)

local function work(_, job)
  tide.sleep(math.random(0, 3))
  q:transaction(function(tx)
    tx:exec("INSERT INTO effects (job_id, attempt, pid, at) VALUES (?, ?, ?, ?)",
            job.id, job.attempt, pid, math.floor(core.wallclock()))
  end)
  tide.sleep(math.random(0, 2))
end

return { txw = { work = work } }
