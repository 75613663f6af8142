-- spec/task_spec.lua — tide.spawn and the task methods (coroutine mode).
local tide = require "tide"
local H = spec_helper

describe("tide.spawn", function()
  after_each(function()
    local st = tide.stats()
    assert.equal(0, st.live, "tasks left live")
    assert.equal(0, st.active_handles, "handles left active")
  end)

  it("runs a function with its arguments and delivers ok with every returned value", function()
    local root_status, status, a, b, c = tide.run(function()
      return tide.spawn(function(x, y) return x + y, "two", nil end, 1, 2):await()
    end)
    assert.equal("ok", root_status)
    assert.equal("ok", status)
    assert.equal(3, a)
    assert.equal("two", b)
    assert.is_nil(c)
  end)

  it("keeps nil holes in args given as an option table", function()
    local _, _, n, third = tide.run(function()
      return tide.spawn{ run = function(...) return select("#", ...), (select(3, ...)) end,
                         args = { n = 3, nil, nil, "z" } }:await()
    end)
    assert.equal(3, n)
    assert.equal("z", third)
  end)

  it("returns at once: the task starts on a later tick", function()
    local started = false
    H.run(function()
      local t = tide.spawn(function() started = true end)
      assert.is_false(started)
      assert.equal("running", t:status())
      t:await()
      assert.is_true(started)
    end)
  end)

  it("delivers error with the original value and the traceback of where it was raised", function()
    local err_obj = { code = 42 }
    local t
    local status, value = tide.run(function()
      t = tide.spawn(function()
        local function deep() error(err_obj) end
        deep()
      end)
      return t:await()
    end)
    assert.equal("ok", status)
    assert.equal("error", value)
    assert.equal(err_obj, t.value)
    assert.matches("in function 'deep'", t.traceback)
    assert.matches("task_spec.lua:%d+", t.traceback)
  end)

  it("calls handle_result exactly once with status, value and the task", function()
    local calls = {}
    H.run(function()
      tide.spawn{ run = function() return "v" end,
                  handle_result = function(s, v, task) calls[#calls + 1] = { s, v, task } end }
    end)
    assert.equal(1, #calls)
    assert.equal("ok", calls[1][1])
    assert.equal("v", calls[1][2])
    assert.equal("ok", calls[1][3]:status())
  end)

  it("contains an error raised inside handle_result: logged with traceback, counted, not fatal", function()
    local reported = {}
    tide.configure{ on_error = function(where, err, tb) reported[#reported + 1] = { where, err, tb } end }
    local before = tide.stats().callback_errors
    local sibling
    local status = tide.run(function()
      tide.spawn{ run = function() end, handle_result = function() error("bad callback") end }
      sibling = tide.spawn(function() tide.sleep(5) return "still fine" end)
      tide.sleep(10)
    end)
    tide.configure{ on_error = false and nil or function(where, err, tb) io.stderr:write(tb or tostring(err)) end }
    assert.equal("ok", status)
    assert.equal("ok", sibling:status())
    assert.equal(before + 1, tide.stats().callback_errors)
    assert.equal(1, #reported)
    assert.matches("^handle_result of tide.Task %d+", reported[1][1])
    assert.matches("bad callback", reported[1][3])
    assert.matches("stack traceback", reported[1][3])
  end)

  it("runs handle_result outside any task: it cannot wait, and never suspends a canceller", function()
    local reported
    tide.configure{ on_error = function(where, err) reported = where .. ": " .. tostring(err) end }
    local canceller_went_on = false
    H.run(function()
      local b = tide.spawn{ run = function() tide.sleep(1000) end,
                            handle_result = function() tide.sleep(100) end }
      local a = tide.spawn{ timeout = 50, run = function() b:cancel(); canceller_went_on = true end }
      assert.equal("ok", (a:await()))
    end)
    tide.configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err)) end }
    assert.is_true(canceller_went_on)
    assert.matches("^handle_result of tide.Task %d+ %(cancelled%): .*tide.sleep: cannot wait inside handle_result %(spawn a task for work that waits%)", reported)
  end)

  it("keeps a task that is cancelled from a callback running under it, and nothing leaks", function()
    local T, root_slept
    H.run(function()
      local X = tide.spawn{ run = function() tide.sleep(1000) end,
                            handle_result = function() T:cancel("from X's handle_result") end }
      T = tide.spawn(function() tide.sleep(1); X:cancel() end)
      assert.same({ "cancelled", "from X's handle_result" }, { T:await() })
      tide.sleep(5)                            -- no callback state leaked into the loop
      root_slept = true
    end)
    assert.is_true(root_slept)
  end)

  it("isolates failures: a failing task never takes down its caller or siblings", function()
    local results = {}
    local status = tide.run(function()
      local ts = {}
      for i = 1, 20 do
        ts[i] = tide.spawn(function() tide.sleep(i % 3) if i % 2 == 0 then error("e" .. i) end return i end)
      end
      for i = 1, 20 do results[i] = ts[i]:await() end
    end)
    assert.equal("ok", status)
    for i = 1, 20 do assert.equal(i % 2 == 0 and "error" or "ok", results[i]) end
  end)

  it("times out at the deadline even while the task waits, and never resumes it", function()
    local resumed_after = false
    local t0, elapsed
    local status, value = tide.run(function()
      t0 = tide.now()
      local t = tide.spawn{ run = function() tide.sleep(10000); resumed_after = true end, timeout = 30 }
      local s, v = t:await()
      elapsed = tide.now() - t0
      return s, v
    end)
    assert.equal("ok", status)
    assert.equal("timeout", value)
    assert.is_false(resumed_after)
    assert.is_true(elapsed >= 29 and elapsed < 500, "elapsed " .. elapsed)
    assert.equal(0, tide.stats().timers, "the sleeping timer was not cancelled")
  end)

  it("cancels a waiting task with a reason, once; cancelling again says it finished", function()
    local seen = {}
    H.run(function()
      local t = tide.spawn{ run = function() tide.sleep(10000) end,
                            handle_result = function(s, v) seen[#seen + 1] = s .. ":" .. v end }
      tide.sleep(1)
      assert.is_true(t:cancel("operator"))
      local ok, msg = t:cancel("again")
      assert.is_nil(ok)
      assert.equal(("task %d already finished (cancelled)"):format(t.id), msg)
      local s, v = t:await()
      assert.equal("cancelled", s)
      assert.equal("operator", v)
    end)
    assert.same({ "cancelled:operator" }, seen)
  end)

  it("cancels a task that has not started yet", function()
    local ran = false
    H.run(function()
      local t = tide.spawn(function() ran = true end)
      t:cancel()
      assert.equal("cancelled", t:status())
      assert.equal("cancelled", t.value)
    end)
    assert.is_false(ran)
  end)

  it("stops a task that cancels itself at once", function()
    local after = false
    local t
    H.run(function()
      t = tide.spawn(function() tide.current():cancel("self"); after = true end)
    end)
    assert.is_false(after)
    assert.equal("cancelled", t:status())
    assert.equal("self", t.value)
  end)

  it("wakes every awaiter with the same outcome", function()
    local got = {}
    H.run(function()
      local target = tide.spawn(function() tide.sleep(5) return "x" end)
      local ws = {}
      for i = 1, 5 do ws[i] = tide.spawn(function() local s, v = target:await(); got[i] = s .. v end) end
      for i = 1, 5 do ws[i]:await() end
    end)
    assert.same({ "okx", "okx", "okx", "okx", "okx" }, got)
  end)

  it("returns nil, 'timeout' when await's own limit passes, and the task goes on", function()
    H.run(function()
      local t = tide.spawn(function() tide.sleep(40) return "late" end)
      local s, v = t:await(5)
      assert.is_nil(s)
      assert.equal("timeout", v)
      assert.same({ "ok", "late" }, { t:await() })
      assert.equal(0, #(t[require("tide.engine.fields").WAITERS] or {}))
    end)
  end)

  it("treats a bare coroutine.yield as letting the others run", function()
    local order = {}
    H.run(function()
      local a = tide.spawn(function() order[#order + 1] = "a1"; coroutine.yield(); order[#order + 1] = "a2" end)
      local b = tide.spawn(function() order[#order + 1] = "b1" end)
      a:await(); b:await()
    end)
    assert.same({ "a1", "b1", "a2" }, order)
  end)

  it("lets a task wait across pcall", function()
    local status, ok, v = tide.run(function()
      return pcall(function() tide.sleep(1) return "through pcall" end)
    end)
    assert.equal("ok", status)
    assert.is_true(ok)
    assert.equal("through pcall", v)
  end)

  it("cancels what can never be woken when the loop runs out of work", function()
    local t
    local status, value = tide.run(function()
      local parent = tide.current()
      t = tide.spawn(function() parent:await() end)   -- waits for the root ...
      return t:await()                                 -- ... which waits for it
    end)
    assert.equal("cancelled", status)
    assert.matches("^stalled", value)
    assert.equal("cancelled", t:status())
  end)

  it("leaves the task table's plain names to the user", function()
    local status = tide.run(function()
      local t = tide.spawn(function() tide.sleep(5) return "done" end)
      t.job, t.wait, t.timer, t.co, t.opt, t.state, t.fn = 1, 2, 3, 4, 5, 6, 7
      assert.same({ "ok", "done" }, { t:await() })
      local c = tide.spawn(function() tide.sleep(1000) end)
      c.job, c.wait = 1, 2
      c:cancel()
      assert.equal("cancelled", c:status())
    end)
    assert.equal("ok", status)
  end)

  it("reads t.id, t.attempts and t.value as fields, through every state, beside the methods", function()
    -- A task's fields are slots of its array part (tide.engine.fields): the
    -- public ones are read through its metatable, the methods too.
    local seen = {}
    H.run(function()
      local t = tide.spawn{ run = function() tide.sleep(1); return false, "second" end }
      seen.spawned = { t.attempts, t.value, type(t.id), type(t.await) }   -- its attempt started
      tide.sleep(0)
      seen.asleep = { t:status(), t.attempts, t.value }
      assert.same({ "ok", false, "second" }, { t:await() })
      seen.ended = { t.attempts, t.value, t.traceback }
      local n = 0
      local r = tide.spawn{ run = function() n = n + 1; if n < 3 then error("again " .. n, 0) end end,
                            retry = { max_attempts = 3, base = 1 } }
      assert.same({ "ok" }, { r:await() })
      seen.retried = { r.attempts, r.value }
      local e = tide.spawn(function() error({ code = 7 }) end)
      assert.equal("error", (e:await()))
      seen.failed = { e.value.code, type(e.traceback), e.attempts }
      local c = tide.spawn(function() end)
      c:cancel("never ran")
      seen.cancelled = { c.attempts, c.value, c:status() }
      seen.ids = { t.id < r.id, r.id < e.id, e.id < c.id }
      seen.unknown = { t.nothing, t[100], t.Id }
    end)
    assert.same({ 1, nil, "number", "function" }, seen.spawned)
    assert.same({ "running", 1, nil }, seen.asleep)
    assert.same({ 1, false, nil }, seen.ended)
    assert.same({ 3, nil }, seen.retried)
    assert.same({ 7, "string", 1 }, seen.failed)
    assert.same({ 1, "never ran", "cancelled" }, seen.cancelled)
    assert.same({ true, true, true }, seen.ids)
    assert.same({}, seen.unknown)
  end)

  it("names the task in tostring", function()
    H.run(function()
      local t = tide.spawn{ run = function() end, name = "fetch" }
      assert.matches("^tide.Task %d+ 'fetch' %(running%)$", tostring(t))
      t:await()
    end)
  end)

  it("keeps one number per task for ids, increasing", function()
    H.run(function()
      local a, b = tide.spawn(function() end), tide.spawn(function() end)
      assert.equal(a.id + 1, b.id)
    end)
  end)

  it("refuses tide.run inside a running loop", function()
    local _, err = tide.run(function() return select(2, pcall(tide.run, function() end)) end)
    assert.matches("tide.run: the loop is already running", err)
  end)

  it("reports an error from await outside any task", function()
    local t
    H.run(function() t = tide.spawn(function() end) end)
    H.error_like("task:await: called outside a task (start one with tide.run or tide.spawn)",
                 function() t:await() end)
  end)

  -- An attempt that raised is settled after its traceback is taken, and
  -- taking it runs the error's __tostring: user code, which may end the
  -- task.  With a retry policy, the settle put the cancelled task back to
  -- "retrying": it ran again (its function gone since it ended, or before
  -- that, its body again) and reached a second and third outcome.
  it("delivers exactly one outcome when the error's __tostring cancels the task before its retry", function()
    local outcomes, runs, t = {}, 0, nil
    local err = setmetatable({}, { __tostring = function()
      if t:status() == "running" then t:cancel("from __tostring") end
      return "boom"
    end })
    H.run(function()
      t = tide.spawn{ run = function() runs = runs + 1; error(err) end,
                      retry = { max_attempts = 3, base = 1 },
                      handle_result = function(status, value) outcomes[#outcomes + 1] = { status, value } end }
      tide.sleep(30)
      assert.equal(1, tide.stats().live)              -- this one only
    end)
    assert.same({ { "cancelled", "from __tostring" } }, outcomes)
    assert.equal(1, runs)
    assert.same({ "cancelled", "from __tostring" }, { t:status(), t.value })
    assert.is_nil(t.traceback)
  end)

  -- The engine lists every task that may be live (for a shutdown); a
  -- finished task left on that list kept whatever it referenced (its
  -- function, arguments and value) until 1,024 more tasks were spawned:
  -- a flow run 400 times inside one task kept all 400 runs.
  describe("a finished task whose handle is dropped", function()
    local function big() local t = {} for i = 1, 1000 do t[i] = { i } end return t end
    -- A JIT trace recorded through the runner's call of a task function
    -- made once specializes on that closure and keeps it as a constant
    -- until the trace goes (LuaJIT's own, bounded by its trace count; CI
    -- met it once). The traces are flushed first, so that what is
    -- checked is what tide keeps.
    local function collect() jit.flush(); collectgarbage(); collectgarbage() end

    it("keeps nothing alive once it ended, its value, function and arguments included", function()
      local weak = setmetatable({}, { __mode = "v" })
      local function start()                          -- (nothing of it left in the caller's slots)
        local arg, upvalue = big(), big()
        weak.arg, weak.upvalue = arg, upvalue
        tide.spawn(function(a)
          local v = big()
          weak.value = v
          return v, #a + #upvalue
        end, arg)
      end
      H.run(function()
        start()
        tide.sleep(5)
        collect()
        assert.is_nil(weak.value, "its value kept")
        assert.is_nil(weak.arg, "its argument kept")
        assert.is_nil(weak.upvalue, "its function kept")
      end)
    end)

    it("is let go at the next spawns once the finished tasks behind a live one outnumber the live ones", function()
      local weak = setmetatable({}, { __mode = "v" })
      H.run(function()
        tide.spawn(function() local v = big(); weak.value = v; return v end)
        local younger = tide.spawn(function() tide.sleep(100) end)
        tide.sleep(5)
        collectgarbage(); collectgarbage()
        assert.is_table(weak.value)                   -- behind a live task: kept for now
        local ts = {}
        for i = 1, 200 do ts[i] = tide.spawn(function() tide.sleep(1) end) end
        local last = tide.spawn(function() tide.sleep(50) end)   -- so they end behind a live task too
        for i = 1, 200 do ts[i]:await() end
        ts = nil
        tide.spawn(function() end)                    -- a spawn compacts the list
        collect()
        assert.is_nil(weak.value, "its value kept after 200 more tasks ended and a spawn")
        younger:await()
        last:await()
      end)
    end)
  end)

  -- An attack on the door and the list of live tasks (13764bf: a finished
  -- task leaves the list at once when it is the youngest, the list is
  -- compacted at spawns, and a task's function and arguments go at its end): random tasks that
  -- raise (one with an error whose __tostring cancels its own task), wait,
  -- retry, time out, spawn more, cancel or await others (some stall for
  -- ever), cancel themselves from a nested coroutine, leave finalizers that
  -- cancel and spawn at any allocation, and handle_result callbacks that
  -- cancel and spawn; the run then stalls or shuts down.
  -- Every task must reach exactly one outcome, and none be left live.
  for _, ending in ipairs{ "stall", "shutdown" } do
    it("gives every task exactly one outcome among random tasks that end each other (then " .. ending .. ")", function()
      local seed = tonumber(os.getenv("SPEC_SEED")) or os.time()
      math.randomseed(seed)
      local R = math.random
      local outcomes, all, over = {}, {}, false
      local spawn
      local function body(depth)
        local r = R(16)
        if r == 1 then error("boom")
        elseif r == 2 then tide.sleep(R(0, 5))
        elseif r == 3 and depth < 3 then for _ = 1, R(1, 4) do spawn(depth + 1) end
        elseif r == 4 then local t = all[R(#all)]; if t then t:cancel("random") end
        elseif r == 5 then local t = all[R(#all)]; if t then t:await(R(0, 3)) end
        elseif r == 6 then coroutine.wrap(function() tide.current():cancel("nested") end)(); tide.sleep(1)
        elseif r == 7 then tide.sleep(R(1, 3)); coroutine.yield()
        elseif r == 10 or r == 11 then                  -- a finalizer that cancels and spawns, at any allocation
          local p = newproxy(true)
          getmetatable(p).__gc = function()
            if over then return end
            local o = all[R(#all)]; if o then o:cancel("from a finalizer") end
            if R(3) == 1 then spawn(depth + 1) end
          end
          p = nil
          if r == 11 then collectgarbage("step", 0) end
        elseif r == 8 then local t = all[R(#all)]; if t then t:await() end   -- may stall for ever
        elseif r == 9 then
          local me = tide.current()
          error(setmetatable({}, { __tostring = function()
            if me:status() == "running" then me:cancel("from __tostring") end
            return "x"
          end }))
        end
        return depth
      end
      function spawn(depth)
        local spec = { run = body, args = { depth } }
        if R(3) == 1 then spec.retry = { max_attempts = R(1, 3), base = 1 } end
        if R(4) == 1 then spec.timeout = R(1, 6) end
        spec.handle_result = function(_, _, t)
          outcomes[t] = (outcomes[t] or 0) + 1
          if R(6) == 1 then local o = all[R(#all)]; if o then o:cancel("from handle_result") end end
          if R(8) == 1 and depth < 3 then spawn(depth + 1) end
        end
        local ok, t = pcall(tide.spawn, spec)            -- (refused once the run is over)
        if ok then all[#all + 1] = t end
      end
      tide.run(function()
        for _ = 1, 300 do spawn(0); if R(20) == 1 then tide.sleep(R(0, 2)) end end
        if ending == "shutdown" then tide.sleep(R(1, 5)); tide.shutdown(R(0, 5)) end
        tide.sleep(R(0, 5))
      end)
      over = true                                       -- (a task spawned now would wait for the next run)
      local where = " (SPEC_SEED=" .. seed .. ")"
      local terminal, missing, twice = { ok = true, error = true, timeout = true, cancelled = true }, 0, 0
      for _, t in ipairs(all) do
        local n = outcomes[t] or 0
        if n == 0 then missing = missing + 1 elseif n > 1 then twice = twice + 1 end
        assert.is_true(terminal[t:status()], t:status() .. where)
      end
      assert.is_true(#all > 300, #all .. " tasks" .. where)
      assert.equal(0, missing, "tasks without an outcome" .. where)
      assert.equal(0, twice, "tasks with two outcomes or more" .. where)
      assert.equal(0, tide.stats().live, "tasks left live" .. where)
    end)
  end
end)
