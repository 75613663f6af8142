-- spec/review_r21sl_spec.lua — the review of h21sl (waits without a C call on the task's stack): what broke.
--
-- Attacked: waits tried from inside a C call on the task's own stack (a
-- __gc finalizer run by the task's allocation, table.sort's comparator,
-- xpcall's handler, a debug hook), which pass the check (own_runner is at
-- level 1 of the runner) but cannot yield; a wait's timer whose arming
-- fails while the error sink ends the task; a runner resumed by another
-- task; a finalizer storm around awaits, nested coroutines and generators;
-- a debug hook's error inside the wait check; core.caller_is's arguments.
local tide = require "tide"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

local C_CALL = "cannot wait inside a C call (a __gc finalizer, a debug hook, a function a C function calls)"

describe("review r21sl: a wait", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- A finalizer that waits runs inside the allocation of the task's own
  -- await, between wait_begin and the yield: its wait passed the check,
  -- took a new token, and failed to yield; the await then yielded with a
  -- token that was no longer the task's, and was never woken (h21sl: every
  -- such task stalled, the root cancelled as "stalled"; main: the stale
  -- sleep's timer woke the await early, nil, "timeout" without a bound).
  it("is woken by what it waits for when a __gc finalizer tries to wait inside it", function()
    local status, out = H.run_lua(dir, "gc_waits.lua", [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local fin = {}
      local mt = { __gc = function()
        local ok, e = pcall(tide.sleep, 1)
        local k = ok and "slept" or tostring(e):gsub("^.-:%d+: ", "")
        fin[k] = (fin[k] or 0) + 1
      end }
      collectgarbage("setpause", 10)
      local N, bad, what = 2000, 0, nil
      local st, n = tide.run(function()
        local ts = {}
        for i = 1, N do
          ts[i] = tide.spawn(function(k)
            for _ = 1, 3 do
              debug.setmetatable(newproxy(false), mt)
              local other = ts[k - 1]
              if other then
                local s, v = other:await()
                if s ~= "ok" or v ~= k - 1 then bad = bad + 1; what = tostring(s) .. " " .. tostring(v) end
              else
                tide.sleep(1)
              end
            end
            return k
          end, i)
        end
        for i = 1, N do ts[i]:await() end
        return N
      end)
      mt.__gc = nil
      print(("run %s %s bad %d %s"):format(tostring(st), tostring(n), bad, tostring(what)))
      for k, v in pairs(fin) do print("finalizer's wait: " .. k) end
    ]], 240)
    assert.equal(0, status, out)
    assert.matches("run ok 2000 bad 0 nil", out, 1, true)
    assert.not_matches("finalizer's wait: slept", out, 1, true)
  end)

  it("from inside a C call on the task's stack gets a clear error, and the task's waits go on", function()
    local got = H.run(function()
      local got = {}
      local function note(ok, err) got[#got + 1] = ok and "no error" or tostring(err) end
      local other = tide.spawn(function() tide.sleep(5); return "other" end)
      note(pcall(table.sort, { 3, 2, 1 }, function(a, b) tide.sleep(1); return a < b end))
      note(pcall(table.sort, { 3, 2, 1 }, function(a, b) other:await(); return a < b end))
      local hok, herr = xpcall(function() error("boom") end, function(e)
        local ok, err = pcall(tide.sleep, 1)
        return ok and "no error" or tostring(err)
      end)
      got[#got + 1] = herr
      local hooked
      debug.sethook(function()
        debug.sethook()
        local ok, err = pcall(tide.sleep, 1)
        hooked = ok and "no error" or tostring(err)
      end, "l")
      local x = 1
      x = x + 1
      debug.sethook()
      got[#got + 1] = hooked
      debug.setmetatable(newproxy(false), { __gc = function()
        local ok, err = pcall(tide.sleep, 1)
        got[#got + 1] = ok and "no error" or tostring(err)
      end })
      collectgarbage(); collectgarbage()
      -- the task's own waits: woken by what they wait for, not before
      local t0 = tide.now()
      got.await = { other:await() }
      tide.sleep(20)
      got.slept = tide.now() - t0 >= 20
      return got
    end)
    assert.equal(5, #got, table.concat(got, "\n"))
    assert.matches("tide.sleep: " .. C_CALL, got[1], 1, true)
    assert.matches("task:await: " .. C_CALL, got[2], 1, true)
    for i = 3, 5 do assert.matches("tide.sleep: " .. C_CALL, got[i], 1, true) end
    assert.same({ "ok", "other" }, got.await)
    assert.is_true(got.slept)
  end)

  -- arm_wait reported each failure to the error sink and then settled the
  -- task with "error" without asking whether it was still in that wait:
  -- a task ended meanwhile (the sink cancelled it) was settled again, and
  -- with a retry policy it left its terminal state for "retrying" and ran
  -- a second attempt: two outcomes, two handle_result calls.
  it("whose timer cannot be armed ends its task once, when the task is ended meanwhile", function()
    local runq = require "tide.engine.runq"
    local idx, real
    for i = 1, 60 do                         -- (runq.timer calls try_timer, which starts it)
      local name, v = debug.getupvalue(runq.try_timer, i)
      if name == "timer_start" then idx, real = i, v; break end
    end
    assert.is_not_nil(idx)
    local fail, victim = 0, nil
    debug.setupvalue(runq.try_timer, idx, function(ms)
      if fail > 0 then fail = fail - 1; error("tide: out of memory for timers") end
      return real(ms)
    end)
    tide.configure{ on_error = function(where)
      if victim and tostring(where):find("wait's timer", 1, true) and victim:status() == "running" then
        victim:cancel("by the sink")
      end
    end }
    local outcomes = {}
    local ok, err = pcall(H.run, function()
      victim = tide.spawn{ run = function() tide.sleep(5); return "slept" end,
                           retry = { max_attempts = 3, base = 1 },
                           handle_result = function(s, v) outcomes[#outcomes + 1] = s .. " " .. tostring(v) end }
      fail = 100                             -- every try of its arming fails
      coroutine.yield()                      -- the victim runs and sleeps
      fail = 0
      tide.sleep(30)
    end)
    debug.setupvalue(runq.try_timer, idx, real)
    assert.is_true(ok, err)
    assert.same({ "cancelled by the sink" }, outcomes)
    assert.equal("cancelled", victim:status())
    assert.equal(1, victim.attempts)
  end)

  -- The scheduler cancels a wait's timer before it resumes the task; a
  -- runner resumed by anything else (another task holding it) comes out of
  -- its wait with the timer still pending.  On main the wait cancelled it
  -- itself: the loop ended at once; on h21sl it runs until the stale timer
  -- fires (here 3 s; a long sleep holds the process for its whole length).
  it("leaves no timer pending when the task's runner is resumed by another task", function()
    local t0 = os.time()
    local a
    local ok, err = pcall(H.run, function()
      local co
      a = tide.spawn(function() co = coroutine.running(); tide.sleep(3000); coroutine.yield(); return "a" end)
      tide.sleep(1)
      local b = tide.spawn(function() return coroutine.resume(co) end)
      assert.same({ "ok", true }, { b:await() })
    end)
    assert.is_true(ok, err)
    assert.equal("cancelled", a:status())     -- nothing left that could wake it
    assert.is_true(os.time() - t0 <= 1, "the loop waited for the stale timer")
  end)
end)

describe("review r21sl: a finalizer storm", function()
  -- A raising finalizer in task:await, between the wait's start and its
  -- yield, leaves t._wait set; when the task later raised and its end was
  -- interrupted by another such error (the traceback allocates), repair()
  -- took it for a waiting task and left it with a dead runner: it stalled,
  -- and so did its awaiters (main too).  Rounds, as the collector's timing
  -- decides which run hits it (2 runs in 3 on h21sl).
  it("leaves no task with a dead runner to stall", function()
    local script = [[
      jit.off()
      local tide = require "tide"
      tide.configure{ on_error = function() end }
      local mt = { __gc = function() error("boom in gc") end }
      local quiet = function() end   -- made now: a closure made at the end could run a finalizer that raises
      local armed = true
      local function bomb() if armed then debug.setmetatable(newproxy(false), mt) end end
      collectgarbage("setpause", 10)
      local N, seen, stalled = 5000, {}, 0
      local st, v = tide.run(function()
        local ts = {}
        for i = 1, N do
          local ok repeat ok = pcall(function()
            ts[i] = tide.spawn{ run = function(k)
                bomb(); tide.sleep(k % 3); bomb()
                local other = ts[(k * 7) % N + 1]
                if other and other ~= tide.current() then pcall(other.await, other, k % 4) end
                bomb()
                pcall(coroutine.wrap(function() bomb(); tide.sleep(1) end))
                local g = coroutine.wrap(function() for j = 1, 2 do bomb(); coroutine.yield(j) end end)
                g(); tide.sleep(0); g()
                return k
              end, args = { i },
              handle_result = function(s, v)
                seen[i] = (seen[i] or 0) + 1
                if tostring(v):find("stalled", 1, true) then stalled = stalled + 1 end
              end }
          end) until ok
        end
        for i = 1, #ts do repeat until pcall(ts[i].await, ts[i]) end
        armed = false
        mt.__gc = quiet
        return #ts
      end)
      local once = 0
      for i = 1, N do if seen[i] == 1 then once = once + 1 end end
      print(("root %s %s once %d stalled %d"):format(tostring(st), tostring(v), once, stalled))
    ]]
    for round = 1, 4 do
      local status, out = H.run_lua(dir, "storm.lua", script, 300)
      assert.equal(0, status, out)
      assert.matches("root ok 5000 once 5000 stalled 0", out, 1, true)
    end
  end)
end)

describe("review r21sl: the wait check", function()
  after_each(function() debug.sethook(); H.assert_idle() end)

  -- A hook's error raised in the checker coroutine, outside its pcall,
  -- ended it: own_runner then fell back to coroutine.running() for every
  -- later wait (the C call on the task's stack the branch removed), and the
  -- hook's error was lost (an instruction-limit hook failed to stop the
  -- code it meant to stop).
  it("raises a debug hook's error raised inside it as the wait's own, and goes on checking", function()
    local got = H.run(function()
      local me, raised = coroutine.running(), false
      debug.sethook(function()
        if not raised and coroutine.running() ~= me then raised = true; debug.sethook(); error("the hook's error", 0) end
      end, "l")
      local ok, err = pcall(tide.sleep, 1)
      debug.sethook()
      local got = { raised = raised, first = ok and "no error" or tostring(err) }
      got.sleep = pcall(tide.sleep, 1)
      got.nested = select(2, pcall(coroutine.wrap(function() tide.sleep(1) end)))
      got.sort = select(2, pcall(table.sort, { 3, 2, 1 }, function(a, b) tide.sleep(1); return a < b end))
      return got
    end)
    assert.is_true(got.raised)
    assert.equal("the hook's error", got.first)
    assert.is_true(got.sleep)
    assert.matches("tide.sleep: cannot wait inside a nested coroutine", got.nested, 1, true)
    assert.matches("tide.sleep: " .. C_CALL, got.sort, 1, true)
  end)
end)

describe("review r21sl: core.caller_is", function()
  local core = require "tide.core"
  it("checks its arguments", function()
    local co = coroutine.create(function() coroutine.yield() end)
    coroutine.resume(co)
    -- with one argument the function pushed from co's stack was compared with itself: true
    H.error_like("(function expected, got no value)", core.caller_is, co)
    H.error_like("(thread expected, got nil)", core.caller_is, nil, print)
    H.error_like("(thread expected, got number)", core.caller_is, 1, print)
    assert.is_false((core.caller_is(co, print)))
  end)
end)
