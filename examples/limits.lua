-- examples/limits.lua — per-key limits and uniqueness over time: at most 2 mails of one
-- customer at once and 5 a second, whoever sends them, without holding other customers
-- back; and one reminder per customer and hour, however often it is asked for.
--
--   tide run examples/limits.lua
local tide = require "tide"

local path = os.tmpname()
local q = tide.queue.open("sqlite:" .. path)

-- The limits go into the store: every worker, in any process, obeys them.
q:declare("mail", { partition = "args.customer", per_key = { concurrency = 2, rate = "5/s" } })

for n = 1, 8 do q:enqueue{ queue = "mail", target = "mail", method = "send", args = { customer = "ada", n = n } } end
for n = 1, 2 do q:enqueue{ queue = "mail", target = "mail", method = "send", args = { customer = "bob", n = n } } end

local reminder = { target = "mail", method = "remind", args = { customer = "ada" },
                   unique = { period = "1h", keys = { "args.customer" } } }
local first, inserted = q:enqueue(reminder)
local again, inserted_again = q:enqueue(reminder)
print(("reminder: job %d (inserted: %s); asked again: job %d (inserted: %s)")
  :format(first, tostring(inserted), again, tostring(inserted_again)))

local t0 = tide.now()
local running, most, starts = {}, {}, {}
local w = tide.worker{ queue = q, queues = { mail = 10, default = 1 }, targets = { mail = {
  send = function(args)
    local c = args.customer
    running[c] = (running[c] or 0) + 1
    most[c] = math.max(most[c] or 0, running[c])
    starts[#starts + 1] = { c = c, at = tide.now() - t0 }
    print(("%5.0f ms  %s #%d starts (%d of %s's running)"):format(tide.now() - t0, c, args.n, running[c], c))
    tide.sleep(100)
    running[c] = running[c] - 1
  end,
  remind = function() end,
} } }
w:drain{ stop = true }
local jobs = q:list{ limit = 100 }
q:close()
for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(path .. suffix) end

assert(first == again and inserted and not inserted_again, "one reminder")
assert(#jobs == 11, "10 mails and 1 reminder")
assert(most.ada == 2 and most.bob == 2, "at most 2 of a customer at once, and 2 reached")
local last_ada, last_bob = 0, 0
for _, s in ipairs(starts) do
  if s.c == "ada" then last_ada = math.max(last_ada, s.at) else last_bob = math.max(last_bob, s.at) end
end
assert(last_ada >= 1000, "ada's 8 mails at 5 a second take more than a second")
assert(last_bob < 500, "bob was not held back behind ada")
print(("ada's 8 mails over %.1f s, never more than 2 at once; bob's 2 started at once"):format(last_ada / 1000))
