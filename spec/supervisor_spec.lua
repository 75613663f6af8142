-- spec/supervisor_spec.lua — supervision trees: strategies, restart types, intensity, operations.
local tide = require "tide"

local events
local function child(id, behaviour)
  return { id = id, shutdown = 50, start = function(ctx)
    events[#events + 1] = "start " .. id
    local ok, err = pcall(function()
      while not ctx:stopping() do
        tide.sleep(1)
        local b = behaviour and behaviour(id)
        if b == "crash" then error(id .. " crashed") end
        if b == "exit" then return end
      end
    end)
    events[#events + 1] = "stop " .. id
    if not ok then error(err, 0) end
  end }
end

-- Runs fn(sup-maker) inside tide.run, with errors from the sink collected.
local reports
local function run(fn)
  reports = {}
  tide.configure{ on_error = function(where, err) reports[#reports + 1] = where .. ": " .. tostring(err) end }
  -- A failed assertion shuts the loop down: a supervisor left running
  -- (one that gave up restarts after its cool-down) would keep it alive for
  -- ever (the suite hung 15 minutes after a timing failure under load).
  local status, err = tide.run(function()
    local ok, e = xpcall(fn, debug.traceback)
    if not ok then tide.shutdown(0); error(e, 0) end
  end)
  tide.configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err), "\n") end }
  assert(status == "ok", tostring(err))
end

local function reports_matching(text)
  local out = {}
  for _, r in ipairs(reports) do if r:find(text, 1, true) then out[#out + 1] = r end end
  return out
end

local function crash_once(target)
  local done = false
  return function(id)
    if id == target and not done then done = true; return "crash" end
  end
end

local function starts_and_stops(list)
  local out = {}
  for _, e in ipairs(list) do out[#out + 1] = e end
  return out
end

describe("tide.supervisor", function()
  before_each(function() events = {} end)
  after_each(function()
    spec_helper.assert_idle()
  end)

  local function scenario(strategy)
    run(function()
      local behaviour = crash_once("b")
      local sup = tide.supervisor{ strategy = strategy, children = {
        child("a", behaviour), child("b", behaviour), child("c", behaviour) } }
      sup:start()
      tide.sleep(30)
      sup:stop()
      sup.task:await()
    end)
    return starts_and_stops(events)
  end

  it("one_for_one restarts the crashed child alone", function()
    assert.same({ "start a", "start b", "start c", "stop b", "start b",
                  "stop c", "stop b", "stop a" }, scenario("one_for_one"))
  end)

  it("one_for_all stops the others last-started first, then starts all in order", function()
    assert.same({ "start a", "start b", "start c", "stop b", "stop c", "stop a",
                  "start a", "start b", "start c", "stop c", "stop b", "stop a" }, scenario("one_for_all"))
  end)

  it("rest_for_one restarts the crashed child and those started after it", function()
    assert.same({ "start a", "start b", "start c", "stop b", "stop c",
                  "start b", "start c", "stop c", "stop b", "stop a" }, scenario("rest_for_one"))
  end)

  it("follows the restart types: permanent, transient, temporary", function()
    local counts = {}
    run(function()
      local function spec(id, restart, outcome)
        return { id = id, restart = restart, shutdown = 10, start = function()
          counts[id] = (counts[id] or 0) + 1
          tide.sleep(2)
          if counts[id] <= 2 then
            if outcome == "error" then error("x") end
            return
          end
          tide.sleep(100000)
        end }
      end
      local sup = tide.supervisor{ intensity = 20, children = {
        spec("perm_ok", "permanent", "ok"), spec("trans_ok", "transient", "ok"),
        spec("trans_err", "transient", "error"), spec("temp_err", "temporary", "error") } }
      sup:start()
      tide.sleep(40)
      sup:stop()
      sup.task:await()
    end)
    assert.equal(3, counts.perm_ok)      -- restarted after each normal exit
    assert.equal(1, counts.trans_ok)     -- a normal exit is final
    assert.equal(3, counts.trans_err)    -- restarted after each error
    assert.equal(1, counts.temp_err)     -- never restarted
  end)

  it("counts restarts within the period only", function()
    run(function()
      local n = 0
      local sup = tide.supervisor{ intensity = 2, period = 30, children = {
        { id = "flaky", start = function() n = n + 1; tide.sleep(20); error("flaky") end } } }
      sup:start()
      tide.sleep(150)                    -- ~7 crashes, never more than 2 within 30 ms
      assert.equal(0, sup.gave_up)
      assert.is_true(n >= 5)
      sup:stop()
      sup.task:await()
    end)
  end)

  it("reports each child that ends other than ok, with its error, traceback and what follows", function()
    local seen = {}
    run(function()
      tide.configure{ on_error = function(where, err, tb) seen[#seen + 1] = { where, tostring(err), tb } end }
      local function fails_once(id)
        local failed = false
        return function()
          if not failed then failed = true; tide.sleep(1); error(id .. " broke") end
          tide.sleep(100000)
        end
      end
      local sup = tide.supervisor{ name = "top", intensity = 10, children = {
        { id = "p", shutdown = 10, start = fails_once("p") },
        { id = "t", restart = "temporary", start = fails_once("t") },
        { id = "fine", restart = "transient", start = function() tide.sleep(1) end },
        { id = "long", shutdown = 10, start = function() tide.sleep(100000) end } } }
      sup:start()
      local t0 = tide.now()
      while #seen < 2 and tide.now() - t0 < 2000 do tide.sleep(5) end
      tide.sleep(20)
      sup:stop()                                  -- the children it stops are not reported
      sup.task:await()
    end)
    table.sort(seen, function(a, b) return a[1] < b[1] end)
    assert.equal(2, #seen)
    assert.equal("supervisor 'top': child 'p' ended error (restarting)", seen[1][1])
    assert.matches("p broke", seen[1][2])
    assert.matches("stack traceback", seen[1][3] or "")
    assert.equal("supervisor 'top': child 't' ended error (temporary: not restarted)", seen[2][1])
    assert.matches("t broke", seen[2][2])
  end)

  it("escalates past its intensity: a nested supervisor gives up and its parent restarts it", function()
    local sub_starts = 0
    run(function()
      local sub = tide.supervisor{ name = "sub", intensity = 2, period = 1000, children = {
        { id = "bad", start = function() sub_starts = sub_starts + 1; tide.sleep(1); error("bad") end } } }
      local top = tide.supervisor{ name = "top", intensity = 1, period = 10000,
        on_give_up = function() return "stop" end,
        children = { { id = "sub", start = sub } } }
      top:start()
      local status, err = top.task:await(2000)
      assert.equal("error", status)
      assert.matches("supervisor 'top' gave up", err)
      assert.equal(2, sub.gave_up)        -- sub gave up twice: once per run the top allowed
      assert.equal(6, sub_starts)         -- 3 starts (1 + intensity 2) per run of sub
    end)
    local gave_up = reports_matching("gave up")
    assert.matches("supervisor 'sub' gave up: more than 2 restarts in 1000 ms", gave_up[1] or "")
  end)

  it("does not leave a dead node: the top supervisor cools down and starts again", function()
    local starts, healthy = 0, false
    run(function()
      local sup = tide.supervisor{ name = "top", intensity = 1, period = 1000, cooldown = { base = 10, max = 40 },
        children = { { id = "c", shutdown = 10, start = function()
          starts = starts + 1
          if starts < 7 then tide.sleep(1); error("outage") end
          healthy = true
          tide.sleep(100000)
        end } } }
      sup:start()
      local t0 = tide.now()
      while not healthy and tide.now() - t0 < 3000 do tide.sleep(5) end
      assert.is_true(healthy)
      assert.equal(3, sup.gave_up)        -- 2 starts per run: runs 1-3 gave up, run 4 recovered
      sup:stop()
      sup.task:await()
    end)
    assert.equal(3, #reports_matching("starting again in"))   -- each give-up logged
    assert.equal(6, #reports_matching("child 'c' ended error"))  -- and each crash
    assert.equal(9, #reports)
  end)

  it("stops at once when told to during its cool-down, starting nothing", function()
    local starts, elapsed, status = 0
    run(function()
      local sup = tide.supervisor{ name = "top", intensity = 1, period = 1000, cooldown = { base = 2000, max = 2000 },
        children = { { id = "c", start = function() starts = starts + 1; error("boom") end } } }
      sup:start()
      tide.sleep(50)
      assert.equal("cooling down", sup.state)
      local t0 = tide.now()
      sup:stop()
      status = sup.task:await(5000)
      elapsed = tide.now() - t0
    end)
    assert.equal("ok", status)
    assert.equal(2, starts)
    assert.is_true(elapsed < 500, "stop took " .. elapsed .. " ms")
  end)

  it("operates on children: which_children, terminate, restart, start_child", function()
    run(function()
      local sup = tide.supervisor{ children = { child("a"), child("b") } }
      sup:start()
      tide.sleep(5)
      local kids = sup:which_children()
      assert.same({ "a", "b" }, { kids[1].id, kids[2].id })
      assert.same({ "running", "running" }, { kids[1].status, kids[2].status })
      assert.is_true(sup:terminate_child("a"))
      tide.sleep(60)
      assert.equal("stopped", sup:which_children()[1].status)
      assert.is_true(sup:restart_child("a"))
      assert.is_true(sup:start_child(child("c")))
      tide.sleep(60)
      local st = {}
      for _, k in ipairs(sup:which_children()) do st[#st + 1] = k.id .. "=" .. k.status end
      assert.same({ "a=running", "b=running", "c=running" }, st)
      sup:stop()
      assert.equal("ok", (sup.task:await()))
      local ok, msg = sup:stop()
      assert.is_nil(ok)
      assert.equal("supervisor:stop: 'supervisor' is not running", msg)
    end)
    assert.same({ "start a", "start b", "stop a", "start a", "start c", "stop c", "stop b", "stop a" }, events)
  end)

  it("gives a stopping child its shutdown time, then cancels it", function()
    local outcome = {}
    run(function()
      local sup = tide.supervisor{ children = {
        { id = "polite", shutdown = 200, start = function(ctx) while not ctx:stopping() do tide.sleep(2) end return "bye" end },
        { id = "stubborn", shutdown = 20, start = function() tide.sleep(100000) end },
      } }
      sup:start()
      tide.sleep(5)
      local kids = sup:which_children()
      local polite, stubborn = kids[1].task, kids[2].task
      local t0 = tide.now()
      sup:stop()
      sup.task:await()
      outcome.elapsed = tide.now() - t0
      outcome.polite = { polite:await() }
      outcome.stubborn = { stubborn:status() }
    end)
    assert.same({ "ok", "bye" }, outcome.polite)
    assert.same({ "cancelled" }, outcome.stubborn)
    assert.is_true(outcome.elapsed >= 19 and outcome.elapsed < 500, "took " .. outcome.elapsed)
  end)

  it("stops its children when its own task is cancelled", function()
    local kid
    run(function()
      local sup = tide.supervisor{ children = { child("a") } }
      sup:start()
      tide.sleep(5)
      kid = sup:which_children()[1].task
      sup.task:cancel("killed")
      tide.sleep(1)
    end)
    assert.equal("cancelled", kid:status())
  end)

  it("restarts a nested supervisor cleanly (no stale stop in its mailbox)", function()
    local starts = 0
    run(function()
      local inner = tide.supervisor{ name = "inner", children = {
        { id = "w", start = function(ctx) starts = starts + 1; while not ctx:stopping() do tide.sleep(5) end end } } }
      local top = tide.supervisor{ name = "top", children = {
        { id = "inner", start = inner, shutdown = 0, restart = "transient" } } }
      top:start()
      tide.sleep(20)
      top:restart_child("inner")
      tide.sleep(50)
      assert.equal("running", top:which_children()[1].status)
      assert.equal("running", inner.state)
      top:stop()
      top.task:await()
    end)
    assert.equal(2, starts)
  end)

  it("restarts with one_for_all only what ran, and never a temporary child", function()
    local a_starts, b_starts = 0, 0
    run(function()
      local crashed = false
      local sup = tide.supervisor{ strategy = "one_for_all", children = {
        { id = "a", shutdown = 10, start = function()
            a_starts = a_starts + 1
            tide.sleep(5)
            if not crashed then crashed = true; error("a crashed") end
            tide.sleep(100000)
          end },
        { id = "b", restart = "temporary", start = function() b_starts = b_starts + 1 end },
      } }
      sup:start()
      tide.sleep(30)
      sup:stop()
      sup.task:await()
    end)
    assert.equal(2, a_starts)
    assert.equal(1, b_starts)
  end)

  it("stops during a graceful shutdown instead of restarting what it ends", function()
    local starts, gave_up = 0, 0
    local t0 = tide.now()
    run(function()
      local sup = tide.supervisor{ intensity = 3, on_give_up = function() gave_up = gave_up + 1 end,
        children = { { id = "w", start = function() starts = starts + 1; tide.sleep(50) end } } }
      sup:start()
      tide.sleep(10)
      tide.shutdown(1000)
    end)
    assert.equal(1, starts)
    assert.equal(0, gave_up)
    assert.is_true(tide.now() - t0 < 800)
  end)

  it("rejects bad specs with clear messages", function()
    local f = function() end
    local cases = {
      { function() tide.supervisor(5) end, "tide.supervisor: bad argument #1 (table expected, got number 5)" },
      { function() tide.supervisor{ strategy = "all" } end, "tide.supervisor: bad option 'strategy' ('one_for_all', 'one_for_one' or 'rest_for_one' expected, got string \"all\")" },
      { function() tide.supervisor{ intensity = -1 } end, "tide.supervisor: bad option 'intensity' (integer >= 0 expected, got number -1)" },
      { function() tide.supervisor{ period = 0 } end, "tide.supervisor: bad option 'period' (positive number of ms expected, got number 0)" },
      { function() tide.supervisor{ childs = {} } end, "tide.supervisor: unknown option 'childs'" },
      { function() tide.supervisor{ children = { { id = "a" } } } end, "tide.supervisor: bad option 'children[1].start' (function or supervisor expected, got nil)" },
      { function() tide.supervisor{ children = { { id = "a", start = f, restart = "always" } } } end, "tide.supervisor: bad option 'children[1].restart' ('permanent', 'temporary' or 'transient' expected, got string \"always\")" },
      { function() tide.supervisor{ children = { { start = f } } } end, "tide.supervisor: bad option 'children[1].id' (string or number expected, got nil)" },
      { function() tide.supervisor{ children = { { id = 1, start = f, bogus = 1 } } } end, "tide.supervisor: unknown option 'children[1].bogus'" },
      { function() tide.supervisor{ children = { { id = 1, start = f }, { id = 1, start = f } } } end, "tide.supervisor: duplicate child id '1'" },
      { function() tide.supervisor{ cooldown = 5 } end, "tide.supervisor: bad option 'cooldown' (table { base = ms, max = ms } expected, got number 5)" },
      { function() tide.supervisor{ cooldown = { bse = 10 } } end, "tide.supervisor: unknown option 'cooldown.bse'" },
      { function() tide.supervisor{ cooldown = { base = -1 } } end, "tide.supervisor: bad option 'cooldown.base' (non-negative number of ms expected, got number -1)" },
      { function() tide.supervisor{ cooldown = { base = 100, max = 50 } } end, "tide.supervisor: bad option 'cooldown.max' (number of ms >= base expected, got number 50)" },
      { function() tide.supervisor{ cooldown = { max = "1s" } } end, "tide.supervisor: bad option 'cooldown.max' (number of ms >= base expected, got string \"1s\")" },
    }
    spec_helper.error_cases("spec/supervisor_spec.lua", cases)
  end)

  it("handles commands given right after start, in order, none dropped", function()
    run(function()
      local sup = tide.supervisor{ children = { child("a") } }
      sup:start()
      assert.is_true(sup:stop())                -- before the supervisor's task ever ran
      local status, value = sup:await(2000)
      assert.equal("ok", status)
      assert.equal("stopped", value)
      assert.equal("stopped", sup.state)
      assert.same({ "start a", "stop a" }, events)

      events = {}
      local sup2 = tide.supervisor{ children = { child("a") } }
      sup2:start()
      assert.is_true(sup2:start_child(child("b")))
      assert.is_true(sup2:terminate_child("a"))
      assert.is_true(sup2:start_child(child("c")))
      tide.sleep(80)
      local st = {}
      for _, k in ipairs(sup2:which_children()) do st[#st + 1] = k.id .. "=" .. k.status end
      assert.same({ "a=stopped", "b=running", "c=running" }, st)
      sup2:stop()
      assert.equal("ok", (sup2:await()))
    end)
  end)

  it("refuses a duplicate child id at the call, even before the first one started", function()
    run(function()
      local sup = tide.supervisor{ children = {} }
      sup:start()
      assert.is_true(sup:start_child(child("x")))
      local ok, err = pcall(sup.start_child, sup, child("x"))
      assert.is_false(ok)
      assert.matches("supervisor:start_child: duplicate child id 'x'$", err)
      tide.sleep(20)
      sup:stop()
      assert.equal("ok", (sup:await()))
      for _, k in ipairs(sup:which_children()) do assert.equal("stopped", k.status) end
      assert.equal(1, #sup:which_children())
    end)
    local starts = 0
    for _, e in ipairs(events) do if e == "start x" then starts = starts + 1 end end
    assert.equal(1, starts)
  end)

  it("deletes a child's spec (stopping it first), after which its id is free again", function()
    run(function()
      local sup = tide.supervisor{ children = { child("a"), child("b") } }
      sup:start()
      tide.sleep(5)
      assert.is_true(sup:delete_child("a"))
      local ok, err = sup:delete_child("zz")
      assert.is_nil(ok)
      assert.equal("supervisor:delete_child: no child 'zz'", err)
      tide.sleep(80)
      assert.same({ "b" }, { sup:which_children()[1].id, sup:which_children()[2] })
      assert.is_true(sup:start_child(child("a")))
      tide.sleep(20)
      assert.equal("running", sup:which_children()[2].status)
      sup:stop()
      assert.equal("ok", (sup:await()))
    end)
  end)

  it("awaits its end with an optional timeout", function()
    run(function()
      local sup = tide.supervisor{ children = { child("a") } }
      sup:start()
      assert.same({ nil, "timeout" }, { sup:await(20) })
      sup:stop()
      assert.same({ "ok", "stopped" }, { sup:await(1000) })
      assert.same({ "ok", "stopped" }, { sup:await() })       -- again: the same outcome
    end)
    spec_helper.error_cases("spec/supervisor_spec.lua", {
      { function() tide.supervisor{}:await("x") end, "supervisor:await: bad argument #1 (non-negative number of ms expected, got string \"x\")" },
    })
    local ok, err = tide.supervisor{}:await()
    assert.is_nil(ok)
    assert.equal("supervisor:await: 'supervisor' was never started", err)
  end)
end)
