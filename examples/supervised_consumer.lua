-- supervised_consumer.lua — a consumer under a supervisor rides out an outage and is no zombie node.
--
-- A tide.consumer takes deliveries from a broker (here tide.sources.memory,
-- prefetch 10) and runs each as a task that acks on success and nacks (with
-- requeue) otherwise.  It runs as the one child of a top supervisor
-- (one_for_one, at most 3 restarts per second).
--
-- Midway, a third party goes down for 600 ms: every handler fails, and the
-- broker connection is lost too (the source's fetch raises), so the consumer
-- crashes on every start.  That exceeds the supervisor's intensity several
-- times: each time the top supervisor gives up, stops its child, cools down
-- (50, 100, 200, 400 ms) and starts again, instead of leaving a dead node.
-- A consumer that ends for any reason nacks what it still holds, so no
-- delivery is lost in its prefetch window.  Messages keep being published
-- during the whole run.
--
-- After the outage the node must recover: every message published (before,
-- during and after the outage) ends acked exactly once, nothing is left
-- unacked, no delivery was settled twice or with an unknown tag, and new
-- deliveries were processed after the outage.  The error sink is quieted:
-- it only counts its reports (one per give-up is expected, and one per
-- exit of the consumer: the supervisor logs each child that fails).  Any
-- broken check exits 1.
--
-- Run: build/tide run examples/supervised_consumer.lua      (about 1.3 s)
local tide = require "tide"

local INITIAL, PREFETCH = 1000, 10                -- messages published up front; deliveries in flight
local EXTRA_BATCHES, BATCH, EVERY = 40, 5, 25     -- then 5 more every 25 ms for 1 s
local OUTAGE_AT, OUTAGE_MS = 200, 600             -- the outage: from 200 ms, for 600 ms
local DEADLINE = 5000                             -- ms to drain after the outage before giving up

math.randomseed(20261124)

-- ===== the error sink: count, don't print

local reports = {}                                -- where -> count
tide.configure{ on_error = function(where)
  reports[where] = (reports[where] or 0) + 1
end }

-- ===== the broker and the third party

local src = tide.sources.memory{ prefetch = PREFETCH }
local published, published_at = 0, {}             -- body -> ms (relative to t0) it was published
local t0 = tide.now()
local function publish()
  published = published + 1
  local body = "msg-" .. published
  published_at[body] = tide.now() - t0
  src:publish(body)
end
for _ = 1, INITIAL do publish() end

local third_party_down = false
local outage_ended = nil                          -- tide.now() when the outage ended

--- The handler: a short call to the third party, which fails while it is down.
local function handle(body)
  tide.sleep(math.random(1, 6))
  if third_party_down then error(body .. ": third party unavailable (503)", 0) end
  return body
end

-- ===== the consumer under its supervisor

local outcomes = { ok = 0, error = 0, timeout = 0, cancelled = 0 }
local acks_of = {}                                -- body -> handler successes (each acked)
local ok_after_outage = 0                         -- successes of deliveries started after the outage

local consumer = tide.consumer{
  source = src, concurrency = PREFETCH, name = "orders",
  handler = {
    run = handle, timeout = 200,
    handle_result = function(status, _, _, d)
      outcomes[status] = outcomes[status] + 1
      if status == "ok" then
        acks_of[d.body] = (acks_of[d.body] or 0) + 1
        if outage_ended and d.started and d.started >= outage_ended then
          ok_after_outage = ok_after_outage + 1
        end
      end
    end,
  },
}

-- Wrap the source's fetch only to stamp when each delivery was taken.
local fetch = src.fetch
src.fetch = function(self, n)
  local batch = fetch(self, n)
  local now = tide.now()
  for i = 1, #batch do batch[i].started = now end
  return batch
end

local starts = 0                                  -- calls of the child's start function
local sup = tide.supervisor{
  name = "top", strategy = "one_for_one", intensity = 3, period = 1000,
  cooldown = { base = 50, max = 400 },
  children = { { id = "orders", restart = "permanent", shutdown = 1000,
                 start = function(ctx) starts = starts + 1; return consumer:run(ctx) end } },
}
sup:start()

-- More messages arrive during the whole run, outage included.
local publisher = tide.spawn(function()
  for _ = 1, EXTRA_BATCHES do
    tide.sleep(EVERY)
    for _ = 1, BATCH do publish() end
  end
end)

-- ===== the outage

tide.sleep(OUTAGE_AT)
local before = src:stats()
third_party_down, src.outage = true, true
tide.sleep(OUTAGE_MS)
third_party_down, src.outage = false, false
outage_ended = tide.now()
local gave_up_in_outage, state_at_end = sup.gave_up, sup.state
local delivered_at_end = src.delivered

-- ===== drain: wait until every message published is acked

publisher:await()
local total = published
while src.acked < total and tide.now() - outage_ended < DEADLINE do tide.sleep(5) end
local drain_ms = tide.now() - outage_ended
local elapsed = tide.now() - t0
local final = src:stats()

sup:stop()
local sup_status = sup.task:await(3000)

-- ===== tally and checks

local expected_where = "supervisor " .. sup.name
local exit_prefix = ("supervisor '%s': child 'orders' ended "):format(sup.name)
local restarting, exhausted = exit_prefix .. "error (restarting)", exit_prefix .. "error (restarts exhausted: giving up)"
local sink_total, unexpected = 0, {}
for where, n in pairs(reports) do
  sink_total = sink_total + n
  if where ~= expected_where and where ~= restarting and where ~= exhausted then
    unexpected[#unexpected + 1] = ("%s (%d)"):format(where, n)
  end
end
local exits = (reports[restarting] or 0) + (reports[exhausted] or 0)

print(("source: %d messages (%d up front, %d during the run), prefetch %d, done in %.0f ms")
  :format(total, INITIAL, total - INITIAL, PREFETCH, elapsed))
print(("delivered %d, acked %d, nacked %d (before the outage: %d acked, %d nacked)")
  :format(final.delivered, final.acked, final.nacked, before.acked, before.nacked))
print(("handler outcomes: ok %d, error %d, timeout %d, cancelled %d")
  :format(outcomes.ok, outcomes.error, outcomes.timeout, outcomes.cancelled))
print(("outage of %d ms: supervisor gave up %d times (state at its end: %s), consumer started %d times (%d restarts)")
  :format(OUTAGE_MS, gave_up_in_outage, state_at_end, starts, starts - 1))
print(("after the outage: %d deliveries, %d processed ok; drained in %.0f ms")
  :format(final.delivered - delivered_at_end, ok_after_outage, drain_ms))
print(("error sink: %d reports (%d from the supervisor giving up; %d exits of the consumer, %d of them giving up)")
  :format(sink_total, reports[expected_where] or 0, exits, reports[exhausted] or 0))

local failures = {}
local function check(cond, msg, ...)
  if not cond then failures[#failures + 1] = msg:format(...) end
end

local acked_once, twice, late_published, late_acked = 0, 0, 0, 0
for i = 1, total do
  local body = "msg-" .. i
  local n = acks_of[body] or 0
  if n == 1 then acked_once = acked_once + 1 elseif n > 1 then twice = twice + 1 end
  if published_at[body] >= OUTAGE_AT + OUTAGE_MS then
    late_published = late_published + 1
    if n >= 1 then late_acked = late_acked + 1 end
  end
end

check(final.acked == total, "acked %d of %d messages within %d ms of the outage's end",
      final.acked, total, DEADLINE)
check(acked_once == total, "%d of %d messages acked exactly once", acked_once, total)
check(twice == 0, "%d messages were processed ok more than once", twice)
check(final.unacked == 0, "%d deliveries still unacked (prefetch window leaked)", final.unacked)
check(final.queued == 0, "%d messages still queued", final.queued)
check(src.violations == 0, "%d settlements of an unknown or settled tag", src.violations)
check(final.acked + final.nacked == final.delivered, "delivered %d but settled %d",
      final.delivered, final.acked + final.nacked)
check(gave_up_in_outage >= 3, "the supervisor gave up only %d times during the outage", gave_up_in_outage)
check(sup.gave_up == gave_up_in_outage, "the supervisor gave up %d times after the outage",
      sup.gave_up - gave_up_in_outage)
check(final.delivered > delivered_at_end, "no delivery after the outage (zombie node)")
check(ok_after_outage > 0, "nothing processed after the outage (zombie node)")
check(late_published > 0 and late_acked == late_published,
      "%d of %d messages published after the outage were acked", late_acked, late_published)
check(#unexpected == 0, "unexpected error reports: %s", table.concat(unexpected, ", "))
check((reports[expected_where] or 0) == sup.gave_up, "%d give-up reports for %d give-ups",
      reports[expected_where] or 0, sup.gave_up)
check((reports[exhausted] or 0) == sup.gave_up, "%d exits logged as giving up for %d give-ups",
      reports[exhausted] or 0, sup.gave_up)
check(exits == starts - 1, "%d exits of the consumer logged for %d starts after the first", exits, starts - 1)
check(sup_status == "ok", "the supervisor did not stop (%s)", tostring(sup_status))
local st = tide.stats()
check(st.live == 1, "%d tasks still live besides this script", st.live - 1)
check(st.timers == 0, "%d timers still pending", st.timers)

if #failures > 0 then
  io.stderr:write("supervised_consumer: FAILED\n  ", table.concat(failures, "\n  "), "\n")
  os.exit(1)
end
print("ok: every message acked exactly once, nothing unacked, no violation, work resumed after the outage")
