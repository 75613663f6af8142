--- tide.flow.crew — the simple children of a flow task, run by a crew of the task's own.
--
-- Simple children (`each` a function, without timeout, retry or mode) run
-- in a crew: up to `concurrency` tasks of their node, each taking the next
-- item and calling `each` on it, protected, until none is left.  A task per
-- child cost 18,000 instructions (bench/cg flow_each).  What a task per
-- child gave, the crew keeps:
--   - A child that waits holds only its member: at most `concurrency`
--     children run at once, and the others go on.
--   - fan.kids[k] is the member running child k.  A stop or a failed
--     sibling cancels it; its end (member_ended) gives child k its outcome,
--     as a child's own task would, and is replaced while items are left.  A
--     member cancelled between children (a shutdown) stops the run, as a
--     worker's end does.
--   - A member whose handle went out (tide.current()) retires after that
--     child, so a kept handle never reaches another child's work.
--   - POLL_EVERY children called without a wait, the member that counts
--     the last one sleeps 0 ms so that the loop polls and fires timers;
--     while it sleeps (fan.polling) the other members wait too.
--
-- A fan-out's state (`fan`, made by tide.flow.run's fan_out): run, i (the
-- node's index), node, items, n (their count), ctx (shared by the
-- children), name (the tasks' name), kids (child index -> the member
-- running it), counts (the report's children counts), next_i (the next
-- item to take), crew (members alive), since and polling (see above), and
-- the fan-out's own functions: child_done(k, status, value), settle() and
-- launch(); shut (the first child a shutdown cancelled, or false);
-- stop_run and engine_failed (tide.flow.run's).
local S = require "tide.engine.sched"
local VALUE = require("tide.engine.fields").VALUE   -- (t.value: a user may write that name onto a task)

local M = {}

local POLL_EVERY = 1000

local function member_ended(t)
  local o = S.options(t)
  local fan, k = o.fan, o.fan_index
  fan.crew = fan.crew - 1
  if fan.polling == t then fan.polling = false end
  o.fan = false                              -- a finished task keeps no run alive
  if k and fan.kids[k] == t then             -- it ended inside child k's code
    o.fan_index = false
    return fan.child_done(k, S.state(t) == "cancelled" and "cancelled" or "error", t[VALUE])
  end
  local run, status = fan.run, S.state(t)
  if status == "error" then
    fan.engine_failed(run, "crew member of task '" .. fan.node.name .. "'", t[VALUE])
  elseif status ~= "ok" and not run.stopping and run.status[fan.i] == "running" then
    -- Cancelled between children (a shutdown): as a worker's end, it stops
    -- the run.  A new member would be cancelled as it starts, again and again.
    fan.stop_run(run, "cancelled", ("flow '%s' stopped: a crew member of task '%s' was %s")
      :format(run.flow.name, fan.node.name, status))
  elseif run.status[fan.i] == "running" then
    fan.launch()
  end
  fan.settle()
end

--- A crew member's task: calls `each` on the next item until none is left.
local function member(fan)
  local me = S.current()
  local o = S.options(me)
  local run, i, items, each, ctx, kids, counts = fan.run, fan.i, fan.items, fan.node.each, fan.ctx, fan.kids,
    fan.counts
  while fan.next_i <= fan.n and not run.stopping and run.status[i] == "running" do
    if fan.polling then
      S.sleep(0)
    else
      local k = fan.next_i
      fan.next_i = k + 1
      counts.running = counts.running + 1
      kids[k], o.fan_index = me, k
      local ok, value = pcall(each, items[k], ctx)
      if kids[k] ~= me then return end                -- ended while it ran (cancelled): member_ended gave k its outcome
      o.fan_index = false
      fan.child_done(k, ok and "ok" or "error", value)
      if o.seen then return end                       -- its handle went out inside that child: retire
      local since = fan.since + 1
      fan.since = since
      if since >= POLL_EVERY then
        fan.since, fan.polling = 0, me
        S.sleep(0)
        if fan.polling == me then fan.polling = false end
      end
    end
  end
end

--- Starts crew members while items are left and the node's concurrency allows.
function M.launch(fan)
  local run = fan.run
  while fan.crew < fan.node.concurrency and fan.crew < fan.n - fan.next_i + 1 and not run.stopping do
    fan.crew = fan.crew + 1
    local opt = { args = false, on_finish = false, heard = true, name = false, fan = false,  -- see ctx_for
                  fan_index = false, seen = false }
    opt.args, opt.on_finish, opt.name, opt.fan = { n = 1, fan }, member_ended, fan.name, fan
    S.start(S.new_task(member, opt))
  end
end

return M
