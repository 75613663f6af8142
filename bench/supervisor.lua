-- bench/supervisor.lua — a supervisor whose children all crash at once:
-- CPU time until every child runs again, per child, for 2,000 children
-- (the baseline) and for 8,000 and 20,000 (one_for_one, intensity high
-- enough that it never gives up).  Per child the cost should stay flat: a
-- ratio well above 1 against the baseline means something costs more per
-- event with more children (the mailbox was a list popped from its front).
--   luajit bench/supervisor.lua          (bench/run.sh supervisor)
local tide = require "tide"
tide.configure{ on_error = function() end }   -- 20,000 crashes, each reported

local function restart_all(n)
  local per_child
  tide.run(function()
    local kids, go, started, back = {}, false, {}, 0
    for i = 1, n do
      kids[i] = { id = i, shutdown = 0, start = function()
        if started[i] then back = back + 1; tide.sleep(1e9) end
        started[i] = true
        while not go do tide.sleep(5) end
        error("crash")
      end }
    end
    local sup = tide.supervisor{ name = "big", intensity = 10 * n, period = 60000, children = kids }
    sup:start()
    tide.sleep(50)
    local t0 = os.clock()
    go = true
    local deadline = tide.now() + 120000
    repeat tide.sleep(1) until back == n or tide.now() > deadline
    assert(back == n, "not every child ran again")
    per_child = (os.clock() - t0) * 1e6 / n
    sup:stop()
    sup:await(60000)
  end)
  return per_child
end

local base = restart_all(2000)
print(("%6d children crash at once: %6.1f us CPU a child until all run again (baseline)"):format(2000, base))
for _, n in ipairs{ 8000, 20000 } do
  local us = restart_all(n)
  print(("%6d children crash at once: %6.1f us CPU a child until all run again, %.2fx the baseline"):format(n, us, us / base))
end
