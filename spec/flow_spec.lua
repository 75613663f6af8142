-- spec/flow_spec.lua — flows: order, parallelism, fan-out and fan-in, conditions, limits, retries,
-- timeouts, failure policies, cancel (nested too), hooks, validation, pictures.
local tide = require "tide"
local H = spec_helper

local function run(fn)
  local status, err = tide.run(fn)
  assert(status == "ok", tostring(err))
end

local quiet, loud = spec_helper.quiet_errors, spec_helper.loud_errors

describe("tide.flow", function()
  after_each(function()
    loud()
    spec_helper.assert_idle()
  end)

  it("never starts a task before its dependencies, and overlaps independent ones", function()
    local log, at = {}, {}
    run(function()
      local function step(name, ms)
        return function() at[name] = { tide.now() }; tide.sleep(ms); log[#log + 1] = name; at[name][2] = tide.now() end
      end
      local f = tide.flow{ name = "diamond", tasks = {
        a = { run = step("a", 5) },
        b = { after = "a", run = step("b", 30) },
        c = { after = "a", run = step("c", 30) },
        d = { after = { "b", "c" }, run = step("d", 1) },
      } }
      local status, report = f:run()
      assert.equal("ok", status)
      for _, name in ipairs{ "a", "b", "c", "d" } do assert.equal("ok", report.tasks[name].status) end
    end)
    assert.equal("a", log[1])
    assert.equal("d", log[4])
    assert.is_true(at.b[1] >= at.a[2] and at.c[1] >= at.a[2])
    assert.is_true(at.d[1] >= at.b[2] and at.d[1] >= at.c[2])
    assert.is_true(at.c[1] < at.b[2] and at.b[1] < at.c[2], "b and c did not overlap")
  end)

  it("passes the input and earlier results in ctx, and returns each task's value", function()
    run(function()
      local f = tide.flow{ tasks = {
        a = { run = function(ctx) return ctx.input * 2 end },
        b = { after = "a", run = function(ctx) return ctx.results.a + 1, ctx.task, ctx.flow end },
      } }
      local status, report = f:run(20)
      assert.equal("ok", status)
      assert.equal(40, report.tasks.a.value)
      assert.equal(41, report.tasks.b.value)
      assert.is_number(report.tasks.b.duration)
      assert.equal(1, report.tasks.b.attempts)
    end)
  end)

  it("fans out children in item order, never more than concurrency at once", function()
    local running, peak = 0, 0
    run(function()
      local f = tide.flow{ tasks = {
        list = { run = function() local t = {} for i = 1, 40 do t[i] = i end return t end },
        square = { after = "list", concurrency = 4,
                   items = function(ctx) return ctx.results.list end,
                   each = function(x)
                     running = running + 1; peak = math.max(peak, running)
                     tide.sleep(math.random(0, 3))
                     running = running - 1
                     return x * x
                   end },
      } }
      local status, report = f:run()
      assert.equal("ok", status)
      assert.equal(40, #report.tasks.square.value)
      for i = 1, 40 do assert.equal(i * i, report.tasks.square.value[i]) end
      assert.same({ total = 40, ok = 40, error = 0, timeout = 0, cancelled = 0, running = 0 }, report.tasks.square.children)
    end)
    assert.equal(4, peak)
  end)

  it("takes a fan-out task's items from its own run when it has one", function()
    run(function()
      local f = tide.flow{ tasks = { t = { run = function() return { "a", "b" } end, each = function(s) return s:upper() end } } }
      local _, report = f:run()
      assert.same({ "A", "B" }, report.tasks.t.value)
    end)
  end)

  it("skips a task whose condition is false, and what depends on it", function()
    run(function()
      local f = tide.flow{ tasks = {
        a = { run = function() return 1 end },
        b = { after = "a", when = function(ctx) return ctx.results.a > 5 end, run = function() error("ran") end },
        c = { after = "b", run = function() error("ran") end },
        d = { after = "a", run = function() return "d" end },
      } }
      local status, report = f:run()
      assert.equal("ok", status)
      assert.equal("skipped", report.tasks.b.status)
      assert.equal("skipped", report.tasks.c.status)
      assert.equal("ok", report.tasks.d.status)
    end)
  end)

  it("retries a task and its children, and times them out", function()
    quiet()
    local tries = 0
    run(function()
      local f = tide.flow{ tasks = {
        flaky = { retry = { max_attempts = 3, base = 1 }, run = function() tries = tries + 1; if tries < 3 then error("flaky") end return "ok" end },
        slow = { timeout = 10, run = function() tide.sleep(1000) end },
        kids = { timeout = 10, retry = { max_attempts = 2, base = 1 }, exit_on_error = false,
                 items = function() return { 1, 50, 2 } end,
                 each = function(ms) tide.sleep(ms) return ms end },
      }, fail = "continue" }
      local status, report = f:run()
      assert.equal("error", status)
      assert.equal("ok", report.tasks.flaky.status)
      assert.equal(3, report.tasks.flaky.attempts)
      assert.equal("timeout", report.tasks.slow.status)
      assert.equal("ok", report.tasks.kids.status)
      assert.same({ total = 3, ok = 2, error = 0, timeout = 1, cancelled = 0, running = 0 }, report.tasks.kids.children)
      assert.equal(1, report.tasks.kids.value[1])
      assert.is_nil(report.tasks.kids.value[2])
    end)
  end)

  it("fails a fan-out task on its first failed child when exit_on_error (the default)", function()
    quiet()
    run(function()
      local f = tide.flow{ tasks = { t = { items = function() return { 1, 2, 3, 4, 5, 6 } end, concurrency = 2,
        each = function(x) tide.sleep(x); if x == 2 then error("bad item") end return x end } } }
      local status, report = f:run()
      assert.equal("error", status)
      assert.equal("error", report.tasks.t.status)
      assert.matches("child 2 ended in error: .*bad item", report.tasks.t.error)
      assert.is_true(report.tasks.t.children.ok < 6)
    end)
  end)

  it("stops everything at the first failure with fail = 'stop'", function()
    quiet()
    run(function()
      local f = tide.flow{ fail = "stop", tasks = {
        boom = { run = function() tide.sleep(2) error("boom") end },
        long = { run = function() tide.sleep(1000) end },
        later = { after = "long", run = function() end },
      } }
      local t0 = tide.now()
      local status, report = f:run()
      assert.equal("error", status)
      assert.is_true(tide.now() - t0 < 500)
      assert.equal("error", report.tasks.boom.status)
      assert.equal("cancelled", report.tasks.long.status)
      assert.equal("cancelled", report.tasks.later.status)
    end)
  end)

  it("skips only what depends on a failure with fail = 'continue'", function()
    quiet()
    run(function()
      local f = tide.flow{ fail = "continue", tasks = {
        boom = { run = function() error("boom") end },
        after_boom = { after = "boom", run = function() end },
        other = { run = function() tide.sleep(5) return "fine" end },
      } }
      local status, report = f:run()
      assert.equal("error", status)
      assert.equal("skipped", report.tasks.after_boom.status)
      assert.equal("ok", report.tasks.other.status)
    end)
  end)

  it("times out a whole flow", function()
    run(function()
      local f = tide.flow{ timeout = 20, tasks = { a = { run = function() tide.sleep(1000) end } } }
      local status, report = f:run()
      assert.equal("timeout", status)
      assert.equal("cancelled", report.tasks.a.status)
    end)
  end)

  it("cancels a running flow, nested flows and children included", function()
    local inner_task
    run(function()
      local inner = tide.flow{ name = "inner", tasks = {
        deep = { run = function() inner_task = tide.current(); tide.sleep(100000) end } } }
      local outer = tide.flow{ name = "outer", tasks = {
        nested = { flow = inner },
        kids = { items = function() return { 1, 2, 3 } end, each = function() tide.sleep(100000) end },
      } }
      local h = outer:start()
      tide.sleep(10)
      h:cancel("operator")
      local status, report = h:await()
      assert.equal("cancelled", status)
      assert.equal("cancelled", report.tasks.nested.status)
      assert.equal("cancelled", report.tasks.kids.status)
    end)
    assert.equal("cancelled", inner_task:status())
  end)

  it("uses a flow as a task, and as the work of each child", function()
    run(function()
      local double = tide.flow{ name = "double", tasks = { x = { run = function(ctx) return ctx.input * 2 end } } }
      local f = tide.flow{ tasks = {
        one = { flow = double },
        many = { items = function() return { 1, 2, 3 } end, each = double },
      } }
      local status, report = f:run(21)
      assert.equal("ok", status)
      assert.equal(42, report.tasks.one.value.x)
      assert.same({ 2, 4, 6 }, { report.tasks.many.value[1].x, report.tasks.many.value[2].x, report.tasks.many.value[3].x })
    end)
  end)

  it("runs a task in thread mode", function()
    run(function()
      local f = tide.flow{ tasks = { t = { mode = "thread", run = function(ctx) return ctx.input + 1 end } } }
      local status, report = f:run(41)
      assert.equal("ok", status)
      assert.equal(42, report.tasks.t.value)
    end)
  end)

  it("sends a thread-mode child only its item and the flow's input, and a thread task only its dependencies' results", function()
    run(function()
      local f = tide.flow{ tasks = {
        big = { run = function() return { fn = function() end, blob = ("x"):rep(1e6) } end },
        small = { run = function() return 5 end },
        kids = { after = { "big", "small" }, mode = "thread", items = function() return { 1, 2, 3 } end,
                 each = function(item, ctx)
                   return { item = item, input = ctx.input, results = ctx.results ~= nil, task = ctx.task }
                 end },
        sum = { after = "small", mode = "thread",
                run = function(ctx)
                  local n = 0
                  for _ in pairs(ctx.results) do n = n + 1 end
                  return { small = ctx.results.small, seen = n, big = ctx.results.big ~= nil }
                end },
      } }
      local status, report = f:run("in")
      assert.equal("ok", status, tostring(report.tasks.kids.error) .. " " .. tostring(report.tasks.sum.error))
      assert.same({ item = 2, input = "in", results = false, task = "kids" }, report.tasks.kids.value[2])
      assert.same({ small = 5, seen = 1, big = false }, report.tasks.sum.value)
    end)
  end)

  it("keeps the dependencies it was defined with: the caller's after list changed later changes nothing", function()
    run(function()
      local deps = { "a" }
      local f = tide.flow{ tasks = {
        a = { run = function() return 1 end },
        b = { run = function() return 2 end },
        c = { after = deps, mode = "thread", run = function(ctx) return { a = ctx.results.a, b = ctx.results.b } end },
      } }
      deps[1] = "b"                                   -- after the definition: not the flow's any more
      deps[2] = "nowhere"
      local dependencies = require("tide.flow.define").dependencies
      assert.same({ "a" }, dependencies(f, f.nodes.c))
      local status, report = f:run()
      assert.equal("ok", status, tostring(report.tasks.c.error))
      assert.same({ a = 1 }, report.tasks.c.value)    -- what crossed to the thread: a's result only
    end)
  end)

  it("fires task_run_done when a task's own run ended, before its children start and end", function()
    local seen = {}
    run(function()
      local f = tide.flow{
        on = { task_run_done = function(ev) seen[#seen + 1] = "run_done " .. ev.task .. " " .. tostring(ev.value) end,
               child_done = function(ev) seen[#seen + 1] = "child " .. ev.index end,
               task_done = function(ev) seen[#seen + 1] = "done " .. ev.task end },
        tasks = {
          list = { run = function() return { 10, 20 } end, each = function(x) return x end, concurrency = 1 },
          plain = { after = "list", run = function() return "p" end },
        } }
      assert.equal("ok", (f:run()))
    end)
    assert.equal("run_done list table", seen[1]:gsub("table: 0x%x+", "table"))
    assert.same({ "child 1", "child 2", "done list", "run_done plain p", "done plain" }, { unpack(seen, 2) })
    run(function()                             -- a run cancelled from the hook ends, children never start
      local h, started = nil, 0
      local f = tide.flow{ on = { task_run_done = function() h:cancel("from the hook") end }, tasks = {
        list = { run = function() return { 1, 2 } end, each = function() started = started + 1 end },
        after_it = { after = "list", run = function() started = started + 1 end } } }
      h = f:start()
      local status, report = h:await(2000)
      assert.equal("cancelled", status)
      assert.equal("cancelled", report.tasks.list.status)
      assert.equal("cancelled", report.tasks.after_it.status)
      assert.equal(0, started)
    end)
  end)

  it("cancels flows nested 2,000 deep without overflowing the stack", function()
    local inner_status
    run(function()
      local innermost = tide.flow{ name = "f0", tasks = { work = { run = function() tide.sleep(60000) end } } }
      local f = innermost
      for i = 1, 2000 do f = tide.flow{ name = "f" .. i, tasks = { inner = { flow = f } } } end
      local h = f:start()
      tide.sleep(100)                          -- every level is running
      assert.equal("cancelled", innermost.last_report == nil and "cancelled" or "ran")
      local t0 = tide.now()
      h:cancel("enough")
      local status = h:await(5000)
      inner_status = status
      assert.is_true(tide.now() - t0 < 5000)
    end)
    assert.equal("cancelled", inner_status)
  end)

  it("fires every hook the right number of times, and contains a failing hook", function()
    quiet()
    local counts = {}
    local function count(name) return function() counts[name] = (counts[name] or 0) + 1 end end
    local on = {}
    for _, h in ipairs{ "flow_start", "task_start", "task_run_done", "task_done", "task_error", "task_timeout",
                        "task_retry", "task_skipped", "child_done", "flow_done" } do on[h] = count(h) end
    local n = 0
    on.task_done = function() counts.task_done = (counts.task_done or 0) + 1; error("hook broke") end
    local errors0 = tide.stats().callback_errors
    run(function()
      local f = tide.flow{ fail = "continue", on = on, tasks = {
        a = { run = function() return 1 end },
        r = { retry = { max_attempts = 2, base = 1 }, run = function() n = n + 1; if n < 2 then error("again") end end },
        t = { timeout = 5, run = function() tide.sleep(100) end },
        bad = { run = function() error("x") end },
        dep = { after = "bad", run = function() end },
        kids = { items = function() return { 1, 2, 3 } end, each = function(x) return x end },
      } }
      f:run()
    end)
    assert.same({ flow_start = 1, task_start = 5, task_run_done = 3, task_done = 3, task_error = 1,
                  task_timeout = 1, task_retry = 1, task_skipped = 1, child_done = 3, flow_done = 1 }, counts)
    assert.equal(errors0 + 3, tide.stats().callback_errors)
  end)

  it("survives deep graphs that end at once (10,000 skipped or empty tasks)", function()
    run(function()
      local skipped, empty = {}, {}
      for i = 1, 10000 do
        local after = i > 1 and ("n%05d"):format(i - 1) or nil
        skipped[("n%05d"):format(i)] = { after = after, run = function() end,
                                        when = i == 1 and function() return false end or nil }
        empty[("n%05d"):format(i)] = { after = after, items = function() return {} end, each = function() end }
      end
      local s1, r1 = tide.flow{ tasks = skipped }:run()
      assert.equal("ok", s1)
      assert.equal("skipped", r1.tasks.n10000.status)
      local s2, r2 = tide.flow{ tasks = empty }:run()
      assert.equal("ok", s2)
      assert.equal("ok", r2.tasks.n10000.status)
    end)
  end)

  it("stops the run of an attempt that timed out before the retry starts another", function()
    local ticks = {}
    run(function()
      local attempt = 0
      local inner = tide.flow{ name = "inner", tasks = { t = { run = function()
        attempt = attempt + 1
        local mine = attempt
        for i = 1, 6 do tide.sleep(10); ticks[#ticks + 1] = mine .. "@" .. i end
      end } } }
      local outer = tide.flow{ tasks = { n = { flow = inner, timeout = 25, retry = { max_attempts = 2, base = 1 } } } }
      outer:run()
    end)
    for _, t in ipairs(ticks) do
      if t:match("^1@") then assert.is_true(tonumber(t:match("@(%d)")) <= 2, "attempt 1 went on: " .. table.concat(ticks, " ")) end
    end
  end)

  it("fails a task that cannot cross to a thread, instead of hanging", function()
    run(function()
      local f = tide.flow{ tasks = {
        a = { run = function() return function() end end },
        b = { after = "a", mode = "thread", run = function(ctx) return 1 end },
      } }
      local status, report = f:run()
      assert.equal("error", status)
      assert.equal("error", report.tasks.b.status)
      assert.matches("functions cannot cross to a thread", report.tasks.b.error)
    end)
  end)

  it("cancels cleanly from inside a condition, and before the run starts", function()
    run(function()
      local h
      local f = tide.flow{ tasks = { a = { run = function() return 1 end },
        b = { after = "a", when = function() h:cancel(); return true end, run = function() error("ran") end } } }
      h = f:start()
      local status, report = h:await()
      assert.equal("cancelled", status)
      assert.equal("cancelled", report.tasks.b.status)
      local done = 0
      local g = tide.flow{ on = { flow_done = function() done = done + 1 end }, tasks = { x = { run = function() end } } }
      local h2 = g:start()
      h2:cancel()
      local s2, r2 = h2:await()
      assert.equal("cancelled", s2)
      assert.equal("cancelled", r2.tasks.x.status)
      assert.equal(1, done)
    end)
  end)

  -- Simple nodes (a `run` function, no timeout, retry, mode or nested flow)
  -- run without a task of their own, in the run's workers: these attack what
  -- a task per node gave.
  describe("simple nodes, run by the run's workers", function()
    it("never hold back the others when one waits, and overlap when several wait", function()
      local order, at = {}, {}
      run(function()
        local function slow(name)
          return function() at[name] = { tide.now() }; tide.sleep(40); order[#order + 1] = name; at[name][2] = tide.now() end
        end
        local tasks = { slow = { run = slow("slow") }, slow2 = { run = slow("slow2") } }
        for i = 1, 100 do
          tasks["q" .. i] = { after = i > 1 and ("q" .. (i - 1)) or nil, run = function() order[#order + 1] = "q" .. i; return i end }
        end
        local status, report = tide.flow{ tasks = tasks }:run()
        assert.equal("ok", status)
        assert.equal(100, report.tasks.q100.value)
      end)
      assert.equal(102, #order)
      assert.equal("q100", order[100])             -- the chain ran while both slow ones slept
      assert.same({ slow = true, slow2 = true }, { [order[101]] = true, [order[102]] = true })
      assert.is_true(at.slow[1] < at.slow2[2] and at.slow2[1] < at.slow[2], "the two waits did not overlap")
    end)

    it("keep the flow's concurrency while they wait", function()
      local running, peak = 0, 0
      run(function()
        local tasks = {}
        for i = 1, 20 do
          tasks["t" .. i] = { run = function()
            running = running + 1; peak = math.max(peak, running)
            tide.sleep(math.random(0, 3))
            running = running - 1
          end }
        end
        assert.equal("ok", (tide.flow{ concurrency = 3, tasks = tasks }:run()))
      end)
      assert.equal(3, peak)
    end)

    it("record an error, skip what depends on it, and run the rest (fail = 'continue')", function()
      run(function()
        local f = tide.flow{ fail = "continue", tasks = {
          a = { run = function() return 1 end },
          bad = { after = "a", run = function() error("bad node") end },
          dep = { after = "bad", run = function() error("ran") end },
          waits = { after = "a", run = function() tide.sleep(5); error("late failure") end },
          fine = { after = "a", run = function(ctx) return ctx.results.a + 1 end },
        } }
        local status, report = f:run()
        assert.equal("error", status)
        assert.matches("bad node", report.tasks.bad.error)
        assert.matches("late failure", report.tasks.waits.error)
        assert.equal("skipped", report.tasks.dep.status)
        assert.equal("dependency 'bad' error", report.tasks.dep.reason)
        assert.equal(2, report.tasks.fine.value)
        assert.equal(1, report.tasks.bad.attempts)
      end)
    end)

    it("stop at a node that times out, and the waiting ones with it (fail = 'stop')", function()
      local after_sleep = 0
      run(function()
        local f = tide.flow{ tasks = {
          limited = { timeout = 10, run = function() tide.sleep(1000) end },
          waits = { run = function() tide.sleep(200); after_sleep = after_sleep + 1 end },
          quick = { run = function() return "q" end },
          later = { after = "waits", run = function() after_sleep = after_sleep + 1 end },
        } }
        local status, report = f:run()
        assert.equal("error", status)
        assert.equal("timeout", report.tasks.limited.status)
        assert.equal("cancelled", report.tasks.waits.status)
        assert.equal("cancelled", report.tasks.later.status)
        assert.equal("ok", report.tasks.quick.status)
        tide.sleep(250)                          -- the cancelled node's code never goes on
      end)
      assert.equal(0, after_sleep)
    end)

    it("give every node exactly one outcome when the run is cancelled while some wait and others are queued", function()
      local outcomes, went_on = {}, 0
      local function note(ev) outcomes[ev.task] = (outcomes[ev.task] or 0) + 1 end
      run(function()
        local tasks = {}
        for i = 1, 50 do
          tasks["w" .. i] = { run = function() tide.sleep(i % 3 == 0 and 1000 or 0); went_on = went_on + 1 end }
          tasks["d" .. i] = { after = "w" .. i, run = function() end }
        end
        local f = tide.flow{ concurrency = 10, tasks = tasks,
                             on = { task_done = note, task_error = note, task_timeout = note } }
        local h = f:start()
        tide.sleep(30)
        h:cancel("enough")
        local status, report = h:await()
        assert.equal("cancelled", status)
        local n, cancelled = 0, 0
        for name, r in pairs(report.tasks) do
          n = n + 1
          assert.is_true(r.status == "ok" or r.status == "cancelled", name .. ": " .. r.status)
          if r.status == "cancelled" then cancelled = cancelled + 1 end
          if r.status == "ok" then assert.equal(1, outcomes[name], name) else assert.is_nil(outcomes[name], name) end
        end
        assert.equal(100, n)
        assert.is_true(cancelled > 0)
        local before = went_on
        tide.sleep(50)
        assert.equal(before, went_on)           -- no cancelled node went on after its wait
      end)
    end)

    it("stop the run when a node cancels its own worker (tide.current())", function()
      local ran_after = false
      run(function()
        local f = tide.flow{ tasks = {
          a = { run = function() tide.current():cancel("by itself"); ran_after = true end },
          b = { after = "a", run = function() ran_after = true end },
          other = { run = function() tide.sleep(1000) end },
        } }
        local status, report = f:run()
        assert.equal("cancelled", status)
        assert.equal("cancelled", report.tasks.a.status)
        assert.equal("cancelled", report.tasks.b.status)
        assert.equal("cancelled", report.tasks.other.status)
      end)
      assert.is_false(ran_after)
    end)

    it("run a 100,000-node layered graph, every node once, each result handed to its dependents", function()
      run(function()
        local tasks, width, calls = {}, 1000, 0
        for l = 1, 100 do
          for w = 1, width do
            local deps = l > 1 and { ("l%d_%d"):format(l - 1, w), ("l%d_%d"):format(l - 1, w % width + 1) } or nil
            tasks[("l%d_%d"):format(l, w)] = { after = deps, run = function(ctx)
              calls = calls + 1
              if not deps then return 1 end
              return ctx.results[deps[1]] + ctx.results[deps[2]]
            end }
          end
        end
        local status, report = tide.flow{ name = "big", tasks = tasks }:run()
        assert.equal("ok", status)
        local n = 0
        for _, r in pairs(report.tasks) do n = n + 1; assert.equal("ok", r.status) end
        assert.equal(100000, n)
        assert.equal(100000, calls)
        assert.equal(2 ^ 99, report.tasks.l100_7.value)
      end)
    end)

    it("let the loop fire timers during a long run of nodes that never wait", function()
      local done, seen_at = 0, nil
      run(function()
        local tasks = {}
        for i = 1, 50000 do tasks["n" .. i] = { run = function() done = done + 1 end } end
        local f = tide.flow{ tasks = tasks }
        tide.after(0, function() seen_at = done end)
        assert.equal("ok", (f:run()))
      end)
      assert.is_number(seen_at)
      assert.is_true(seen_at < 50000, "the timer fired only after the run: " .. tostring(seen_at))
    end)
  end)

  describe("simple children, run by their node's crew", function()
    it("give every child exactly one outcome when a sibling fails, and no cancelled child's code goes on", function()
      local went_on, outcomes = 0, {}
      run(function()
        quiet()
        local f = tide.flow{ on = { child_done = function(ev) outcomes[ev.index] = (outcomes[ev.index] or 0) + 1 end },
          tasks = { t = { items = function() local t = {} for i = 1, 60 do t[i] = i end return t end,
                          concurrency = 8, each = function(x)
                            if x == 20 then error("bad item") end
                            if x % 3 == 0 then tide.sleep(math.random(1, 5)); went_on = went_on + 1 end
                            return x
                          end } } }
        local status, report = f:run()
        assert.equal("error", status)
        assert.matches("child 20 ended in error: .*bad item", report.tasks.t.error)
        local c = report.tasks.t.children
        assert.equal(0, c.running)
        assert.equal(1, c.error)
        assert.is_true(c.cancelled > 0, "no waiting sibling was cancelled")
        local n = 0
        for k, count in pairs(outcomes) do n = n + 1; assert.equal(1, count, "child " .. k) end
        assert.equal(c.ok + c.error + c.cancelled, n)
        local before = went_on
        tide.sleep(20)
        assert.equal(before, went_on)
      end)
    end)

    it("give every child exactly one outcome when the run is cancelled while some wait", function()
      local outcomes, went_on = {}, 0
      run(function()
        local f = tide.flow{ on = { child_done = function(ev) outcomes[ev.index] = (outcomes[ev.index] or 0) + 1 end },
          tasks = { t = { items = function() local t = {} for i = 1, 500 do t[i] = i end return t end,
                          concurrency = 5, each = function(x)
                            if x % 7 == 0 then tide.sleep(1000); went_on = went_on + 1 end
                            return x
                          end } } }
        local h = f:start()
        tide.sleep(5)
        h:cancel("operator")
        local status, report = h:await()
        assert.equal("cancelled", status)
        assert.equal("cancelled", report.tasks.t.status)
        local c = report.tasks.t.children
        assert.equal(0, c.running)
        assert.is_true(c.cancelled >= 1 and c.cancelled <= 5)
        local n = 0
        for k, count in pairs(outcomes) do n = n + 1; assert.equal(1, count, "child " .. k) end
        assert.equal(c.ok + c.cancelled, n)
        tide.sleep(20)
      end)
      assert.equal(0, went_on)
    end)

    it("cancel only the child that cancels tide.current(), and run the others", function()
      local handle
      run(function()
        local f = tide.flow{ tasks = { t = { items = function() return { 1, 2, 3, 4, 5, 6 } end, concurrency = 2,
          each = function(x)
            if x == 3 then handle = tide.current(); handle:cancel("by itself"); error("not reached") end
            return x * 2
          end } } }
        local status, report = f:run()
        assert.equal("ok", status)
        local v = report.tasks.t.value
        assert.same({ 2, 4, nil, 8, 10, 12 }, { v[1], v[2], v[3], v[4], v[5], v[6] })
        assert.same({ total = 6, ok = 5, error = 0, timeout = 0, cancelled = 1, running = 0 }, report.tasks.t.children)
      end)
      assert.equal("cancelled", handle:status())
    end)

    it("never hand one child's task handle to another child's work", function()
      local handles, kept = {}, nil
      run(function()
        local f = tide.flow{ tasks = { t = { items = function() local t = {} for i = 1, 50 do t[i] = i end return t end,
          concurrency = 3, each = function(x)
            local me = tide.current()
            if x == 1 then kept = me end
            handles[x] = me
            if x % 10 == 0 then tide.sleep(1) end
            return x
          end } } }
        assert.equal("ok", (f:run()))
        assert.equal("ok", (kept:await(1000)))             -- the handle kept finishes, as a child's task would
      end)
      for x = 2, 50 do assert.are_not.equal(kept, handles[x], "child " .. x .. " ran in child 1's task") end
    end)

    it("run every child with exit_on_error = false, through failures, waits and a child_done hook that raises", function()
      local heard = 0
      run(function()
        quiet()
        local f = tide.flow{ on = { child_done = function(ev)
            heard = heard + 1
            if ev.index % 10 == 0 then error("hook fails at " .. ev.index) end
          end },
          tasks = { t = { items = function() local t = {} for i = 1, 40 do t[i] = i end return t end,
                          concurrency = 3, exit_on_error = false, each = function(x)
                            if x % 4 == 0 then tide.sleep(1) end
                            if x % 5 == 0 then error("child " .. x) end
                            return x
                          end } } }
        local status, report = f:run()
        assert.equal("ok", status)
        assert.same({ total = 40, ok = 32, error = 8, timeout = 0, cancelled = 0, running = 0 }, report.tasks.t.children)
        local v = report.tasks.t.value
        for x = 1, 40 do assert.equal(x % 5 ~= 0 and x or nil, v[x]) end
      end)
      assert.equal(40, heard)
    end)

    it("run 100,000 children in item order, and let the loop fire timers meanwhile", function()
      local seen_at, done = nil, 0
      run(function()
        local items = {}
        for i = 1, 100000 do items[i] = i end
        local f = tide.flow{ tasks = { t = { items = function() return items end, concurrency = 1000,
          each = function(x) done = done + 1; return x + 1 end } } }
        tide.after(0, function() seen_at = done end)
        local status, report = f:run()
        assert.equal("ok", status)
        local v = report.tasks.t.value
        assert.equal(100000, #v)
        for i = 1, 100000 do if v[i] ~= i + 1 then error("child " .. i .. " gave " .. tostring(v[i])) end end
      end)
      assert.is_number(seen_at)
      assert.is_true(seen_at < 100000, "the timer fired only after the children: " .. tostring(seen_at))
    end)
  end)

  -- ctx, report entries and nodes are made from tables of constants, then
  -- filled (a speed-up): a nil stored that way must leave no key behind, and
  -- no table may be shared between nodes or runs.
  -- A flow's workers, node tasks and fan-out crews are tasks that refer to
  -- their run: once finished, none may keep it alive.
  for _, shape in ipairs{ "simple nodes", "a task per node", "fan-out children" } do
    it("run again and again inside one task, keeps none of the earlier runs (" .. shape .. ")", function()
      run(function()
        local tasks = {}
        for i = 1, 2000 do
          local node = { run = function() return { i } end, after = i > 1 and { "n" .. (i - 1) } or nil }
          if shape == "a task per node" then node.timeout = 60000 end
          tasks["n" .. i] = node
        end
        if shape == "fan-out children" then
          tasks = { list = { run = function() local xs = {} for i = 1, 4000 do xs[i] = i end return xs end },
                    each = { after = { "list" }, items = function(ctx) return ctx.results.list end,
                             each = function(x) return { x } end, concurrency = 4 } }
        end
        local f = tide.flow{ name = "again", tasks = tasks }
        local function heap() collectgarbage(); collectgarbage(); return collectgarbage("count") end
        for _ = 1, 10 do assert.equal("ok", (f:run())) end
        local after10, most = heap(), 0
        for r = 1, 80 do
          assert.equal("ok", (f:run()))
          if r % 4 == 0 then most = math.max(most, heap()) end
        end
        -- a run of 2,000 nodes is ~730 KB; 60 runs kept were ~44 MB
        assert.is_true(most - after10 < 2048, ("the heap grew by up to %.0f KB over 80 runs"):format(most - after10))
      end)
    end)
  end

  -- A handle kept (tide.current() inside a node or a child) is a finished
  -- task held for long: its options must not keep the run either.  A
  -- child's task kept its fan_done (a closure over the run), a node's
  -- task its on_retry (the flow's task_retry hook, a closure over the run).
  for _, shape in ipairs{ "fan-out children as tasks", "a task per node, with a task_retry hook" } do
    it("keeps none of the earlier runs when the handles of their finished tasks are kept (" .. shape .. ")", function()
      run(function()
        local kept, tasks, on = {}, nil, nil
        if shape == "fan-out children as tasks" then
          tasks = { list = { run = function() local xs = {} for i = 1, 2000 do xs[i] = i end return xs end },
                    each = { after = { "list" }, items = function(ctx) return ctx.results.list end, timeout = 60000,
                             each = function(x) if x == 1 then kept[#kept + 1] = tide.current() end return { x } end,
                             concurrency = 4 } }
        else
          tasks, on = {}, { task_retry = function() end }
          for i = 1, 500 do
            tasks["n" .. i] = { run = function() if i == 1 then kept[#kept + 1] = tide.current() end return { i } end,
                                after = i > 1 and { "n" .. (i - 1) } or nil, retry = { max_attempts = 2 } }
          end
        end
        local f = tide.flow{ name = "kept", tasks = tasks, on = on }
        local function heap() collectgarbage(); collectgarbage(); return collectgarbage("count") end
        for _ = 1, 4 do assert.equal("ok", (f:run())) end
        local before, most = heap(), 0
        for r = 1, 40 do
          local st, rep = f:run()
          if st ~= "ok" then
            local why = {}
            for name, e in pairs(f.last_report and f.last_report.tasks or {}) do
              if e.status ~= "ok" then why[#why + 1] = name .. ": " .. tostring(e.status) .. " " .. tostring(e.error) end
            end
            error("run " .. r .. ": " .. tostring(st) .. " " .. tostring(rep) .. " | " .. table.concat(why, "; "))
          end
          if r % 4 == 0 then most = math.max(most, heap()) end
        end
        assert.equal(44, #kept)
        -- a run is ~200 KB; 40 handles without their runs are ~20 KB
        assert.is_true(most - before < 1024, ("the heap grew by up to %.0f KB over 40 runs"):format(most - before))
      end)
    end)
  end

  -- A node (or child) of a thread or process mode is spawned through the
  -- task specs, which start the task at once; its flow hooks were added
  -- after.  Started during a shutdown's grace (its dependency ended then),
  -- the task ended at once, before it had them: the node never ended, nor
  -- its run (no flow_done; the caller's await waited until the grace ran out).
  for _, mode in ipairs{ "thread", "process" } do
    it("ends the run when a " .. mode .. "-mode node starts during a shutdown's grace", function()
      local flow_done, awaited
      local status = tide.run(function()
        local f = tide.flow{ name = "grace", tasks = {
          a = { run = function() tide.sleep(20) return 1 end, timeout = 5000 },
          b = { after = { "a" }, mode = mode, run = function() return 2 end },
          c = { after = { "a" }, mode = mode, items = function() return { 1, 2 } end, each = function(x) return x end },
        }, on = { flow_done = function(ev) flow_done = ev.status end } }
        local h = f:start()
        tide.sleep(5)
        tide.shutdown(5000)
        local t0 = tide.now()
        awaited = { h:await() }
        awaited.ms = tide.now() - t0
      end)
      assert.equal("ok", status)
      assert.equal("cancelled", flow_done)
      assert.equal("cancelled", awaited[1])
      assert.is_true(awaited.ms < 2000, awaited.ms .. " ms")
      assert.equal("cancelled", awaited[2].tasks.b.status)
      -- c, when it started before b stopped the run: its children are
      -- cancelled, which fails no fan-out (as for coroutine-mode children)
      local c = awaited[2].tasks.c
      assert.is_true(c.status == "cancelled" or c.status == "ok" and c.children.cancelled == 2, c.status)
      if c.children then assert.equal(0, c.children.running) end
    end)
  end

  -- A simple child that cancels its crew member from a nested coroutine
  -- goes on running (the member stops at its next wait); the member's end
  -- gives the child its outcome (cancelled), and the member, once the
  -- child's code returned, gave it a second one (ok): 4 outcomes of 3
  -- children, running -1.
  it("ends a child once when it cancels its crew member from a nested coroutine", function()
    local ends, status, rep = {}, nil, nil
    run(function()
      local f = tide.flow{ name = "crew", tasks = {
        list = { run = function() return { 1, 2, 3 } end },
        each = { after = { "list" }, items = function(ctx) return ctx.results.list end, concurrency = 1,
                 each = function(x)
                   if x == 2 then coroutine.wrap(function() tide.current():cancel("by itself") end)() end
                   return x
                 end } },
        on = { child_done = function(ev) ends[#ends + 1] = ev.index .. " " .. ev.status end } }
      status, rep = f:run()
    end)
    assert.same({ "1 ok", "2 cancelled", "3 ok" }, ends)     -- as children run as tasks end
    assert.equal("ok", status)
    local each = rep.tasks.each
    assert.same({ total = 3, ok = 2, cancelled = 1, error = 0, timeout = 0, running = 0 }, each.children)
    assert.same({ 1, nil, 3 }, each.value)
  end)

  -- Attacks the hooks that let go of a run at a task's end (workers,
  -- crews, node tasks, children as tasks): random flows whose nodes and
  -- children raise, wait, time out, retry, nest a flow, cancel their own
  -- task (directly or from a nested coroutine) or keep its handle, while
  -- the run is cancelled from outside or times out.  Every node and child
  -- ends once, every kept handle is finished, and nothing in the engine or
  -- the flow fails on a field dropped at a task's end.
  it("ends every node and child once in random flows that fail, retry, time out and are cancelled", function()
    local seed = tonumber(os.getenv("SPEC_SEED")) or os.time()
    math.randomseed(seed)
    local R = math.random
    local kept, broken, twice, statuses = {}, {}, {}, {}
    local errors_before = tide.stats().callback_errors
    local inner = tide.flow{ name = "inner", tasks = {
      a = { run = function() tide.sleep(R(0, 3)); if R(4) == 1 then error("inner fails", 0) end return 1 end },
      b = { after = { "a" }, run = function() return 2 end, timeout = 5 } } }
    local function body(tag)
      local r = R(12)
      if r == 1 then error("boom " .. tag, 0)
      elseif r == 2 then kept[#kept + 1] = tide.current()
      elseif r == 3 then tide.sleep(R(0, 8))
      elseif r == 4 then coroutine.wrap(function() tide.current():cancel("nested " .. tag) end)()
      elseif r == 5 then tide.current():cancel("self " .. tag)
      elseif r == 6 then local h = tide.current(); tide.sleep(R(0, 3)); kept[#kept + 1] = h
      end
      return { tag }
    end
    local function items() return { 1, 2, 3, 4, 5 } end
    run(function()
      for r = 1, 60 do
        local tasks, names, ended = {}, {}, {}
        local function once(key) if ended[key] then twice[#twice + 1] = key end; ended[key] = true end
        for i = 1, R(3, 10) do
          local name = "n" .. i
          local node, kind = {}, R(6)
          if kind <= 2 or kind == 6 then node.run = function() return body(name) end end
          if kind == 2 then node.timeout = R(2, 6) end
          if kind == 2 or kind == 6 then node.retry = { max_attempts = 2, base = 1 } end
          if kind == 3 or kind == 4 then
            node.run, node.each, node.concurrency = items, function(x) return body(name .. "." .. x) end, R(1, 3)
          end
          if kind == 4 then node.timeout = R(2, 6); if R(2) == 1 then node.retry = { max_attempts = 2, base = 1 } end end
          if kind == 5 then node.flow = inner end
          if R(3) == 1 then node.exit_on_error = true end
          if #names > 0 and R(3) > 1 then node.after = { names[R(#names)] } end
          tasks[name], names[#names + 1] = node, name
        end
        local f = tide.flow{ name = "random" .. r, tasks = tasks, fail = R(2) == 1 and "continue" or "stop",
                             timeout = R(4) == 1 and R(3, 20) or nil,
                             on = { task_retry = function() end,
                                    task_done = function(ev) once(ev.task) end,
                                    task_error = function(ev) once(ev.task) end,
                                    task_timeout = function(ev) once(ev.task) end,
                                    child_done = function(ev) once(ev.task .. "#" .. ev.index) end } }
        local h = f:start()
        if R(4) == 1 then tide.sleep(R(0, 6)); h:cancel("from outside") end
        local s, rep = h:await()
        statuses[s] = true
        for name, e in pairs(rep.tasks) do
          local msg = tostring(e.error or e.reason or "")
          if msg:find("attempt to", 1, true) then broken[#broken + 1] = name .. ": " .. msg end
        end
      end
      tide.sleep(20)
    end)
    local where = " (SPEC_SEED=" .. seed .. ")"
    assert.same({}, twice, "a node or child ended twice" .. where .. " " .. table.concat(twice, " "))
    assert.same({}, broken, "the engine failed on a dropped field" .. where)
    local terminal = { ok = true, error = true, timeout = true, cancelled = true }
    for _, t in ipairs(kept) do assert.is_true(terminal[t:status()], t:status() .. where) end
    for s in pairs(statuses) do assert.is_true(s == "ok" or s == "error" or s == "cancelled" or s == "timeout", s .. where) end
    assert.equal(0, tide.stats().callback_errors - errors_before, "errors in callbacks" .. where)
  end)

  describe("tables made per node", function()
    local function keys(t)
      local ks = {}
      for k in pairs(t) do ks[#ks + 1] = k end
      table.sort(ks)
      return table.concat(ks, " ")
    end

    it("give each report entry exactly the fields its node's outcome has, however it ended", function()
      run(function()
        quiet()
        local tries = 0
        local f = tide.flow{ fail = "continue", tasks = {
          none = { run = function() end },
          falsy = { run = function() return false end },
          bad = { run = function() error("bad node") end },
          dep = { after = "bad", run = function() return 1 end },
          again = { retry = { attempts = 2, base = 1 }, run = function()
            tries = tries + 1
            if tries == 1 then error("once") end
            return "second"
          end },
          fan = { items = function() return { 1, 2 } end, each = function(x) return x * 10 end },
          no = { when = function() return false end, run = function() return 1 end },
        } }
        local status, report = f:run()
        assert.equal("error", status)
        local t = report.tasks
        assert.equal("attempts duration started status", keys(t.none))
        assert.equal("attempts duration started status value", keys(t.falsy))
        assert.is_false(t.falsy.value)
        assert.equal("attempts duration error started status", keys(t.bad))
        assert.matches("bad node", t.bad.error)
        assert.equal("attempts duration reason started status", keys(t.dep))
        assert.same({ "skipped", 0, false, false, "dependency 'bad' error" },
                    { t.dep.status, t.dep.attempts, t.dep.started, t.dep.duration, t.dep.reason })
        assert.equal("attempts duration started status value", keys(t.again))
        assert.same({ "ok", 2, "second" }, { t.again.status, t.again.attempts, t.again.value })
        assert.equal("attempts children duration started status value", keys(t.fan))
        assert.same({ 10, 20 }, t.fan.value)
        assert.equal(2, t.fan.children.ok)
        assert.equal("attempts duration reason started status", keys(t.no))
        assert.equal("condition false", t.no.reason)
        assert.equal("attempts duration started status value", keys(t.again))
        for name, r in pairs(t) do                -- never one table for two nodes
          for other, r2 in pairs(t) do assert.is_true(name == other or r ~= r2, name .. " shares " .. other) end
          if r.started then assert.is_number(r.duration) end
        end
      end)
    end)

    it("give the nodes that never started an entry of their own when a run is stopped", function()
      run(function()
        local f = tide.flow{ tasks = {
          first = { run = function() tide.sleep(5); error("stop here") end },
          second = { after = "first", run = function() return 1 end },
          beside = { run = function() tide.sleep(1000) end },
        } }
        quiet()
        local status, report = f:run()
        assert.equal("error", status)
        assert.equal("attempts duration started status", keys(report.tasks.second))
        assert.same({ "cancelled", 0, false, false },
                    { report.tasks.second.status, report.tasks.second.attempts, report.tasks.second.started,
                      report.tasks.second.duration })
        assert.equal("attempts duration error started status", keys(report.tasks.beside))
        assert.equal("cancelled", report.tasks.beside.status)
        local again = f:run()                      -- a second run makes tables of its own
        assert.equal("error", again)
        assert.are_not.equal(report.tasks.second, f.last_report.tasks.second)
      end)
    end)

    it("give each node a ctx of its own, holding exactly input, results, flow and task", function()
      local seen = {}
      run(function()
        local function look(ctx)
          seen[ctx.task] = { keys = keys(ctx), flow = ctx.flow, extra = ctx.extra, input = ctx.input }
          ctx.extra, ctx.task = "left by " .. ctx.task, "changed"
          return ctx
        end
        local f = tide.flow{ name = "ctxs", tasks = { a = { run = look }, b = { after = "a", run = look },
                                                     c = { after = "a", run = look } } }
        local _, report = f:run()
        assert.equal("flow results task", seen.a.keys)              -- no input: no key
        assert.equal("flow results task", seen.b.keys)
        assert.is_nil(seen.b.extra)
        assert.equal("ctxs", seen.c.flow)
        assert.are_not.equal(report.tasks.a.value, report.tasks.b.value)
        _, report = f:run(false)                                    -- false is an input
        assert.equal("flow input results task", seen.a.keys)
        assert.is_false(seen.c.input)
      end)
    end)

    it("link a dependency named twice once per naming, and a node with 2,000 dependents", function()
      local runs = {}
      run(function()
        local tasks = { hub = { run = function() return 1 end },
                        twice = { after = { "hub", "hub" }, run = function() runs.twice = (runs.twice or 0) + 1 end } }
        for i = 1, 2000 do
          tasks["d" .. i] = { after = "hub", run = function(ctx) runs[ctx.task] = (runs[ctx.task] or 0) + ctx.results.hub end }
        end
        local f = tide.flow{ tasks = tasks }
        local dependents = require("tide.flow.define").dependents
        assert.equal(2002, #dependents(f, f.nodes.hub))              -- "twice" is there twice, as before
        assert.equal(0, #dependents(f, f.nodes.d7))
        assert.equal("ok", (f:run()))
      end)
      local n = 0
      for _, c in pairs(runs) do n = n + 1; assert.equal(1, c) end
      assert.equal(2001, n)
    end)
  end)

  it("skips a dependent that names a failed dependency twice once, and its own dependents after it", function()
    local skipped, calls = {}, {}
    local function call(name) calls[name] = (calls[name] or 0) + 1 end
    local report
    run(function()
      local f = tide.flow{ fail = "continue", tasks = {
        a = { run = function() call("a"); return 1 end },
        bad = { run = function() call("bad"); error("bad: fails", 0) end },
        b = { after = { "a", "a" }, run = function(ctx) call("b"); return ctx.results.a + 1 end },
        c = { after = { "bad", "bad", "b" }, run = function() call("c") end },
        d = { after = { "c", "c" }, run = function() call("d") end },
        self = { after = { "d" }, run = function() call("self") end },
      }, on = { task_skipped = function(ev) skipped[#skipped + 1] = ev.task .. ": " .. ev.reason end } }
      local status
      status, report = f:run()
      assert.equal("error", status)
    end)
    table.sort(skipped)
    assert.same({ "c: dependency 'bad' error", "d: dependency 'c' skipped", "self: dependency 'd' skipped" }, skipped)
    assert.same({ a = 1, b = 1, bad = 1 }, calls)
    assert.equal(2, report.tasks.b.value)
    assert.equal("skipped", report.tasks.self.status)
  end)

  it("names the cycle and the unknown dependency in a large graph, whatever order the tasks come in", function()
    local f = function() end
    local tasks = {}
    for i = 1, 5000 do tasks[("t%04d"):format(i)] = { run = f, after = i > 1 and ("t%04d"):format(i - 1) or nil } end
    tasks.t0001.after = "t3000"
    local ring = {}
    for i = 1, 3000 do ring[i] = ("t%04d"):format(i) end
    ring[3001] = "t0001"
    H.error_cases("spec/flow_spec.lua", {
      { function() tide.flow{ name = "big", tasks = tasks } end,
        "tide.flow: flow 'big': cycle " .. table.concat(ring, " -> ") },
    })
    tasks.t0001.after = nil
    tasks.t2500.after = { "t2499", "nope" }
    tasks.t4000.after = "nada"
    H.error_cases("spec/flow_spec.lua", {
      { function() tide.flow{ name = "big", tasks = tasks } end,
        "tide.flow: flow 'big': task 't2500' depends on unknown task 'nope'" },
    })
  end)

  it("rejects bad definitions, naming the flow, the task and the field", function()
    local f = function() end
    H.error_cases("spec/flow_spec.lua", {
      { function() tide.flow{ name = "etl", tasks = { parse = { run = f, after = "store" }, store = { run = f, after = "parse" } } } end,
        "tide.flow: flow 'etl': cycle parse -> store -> parse" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f, after = "b" }, b = { run = f, after = "c" }, c = { run = f, after = "a" } } } end,
        "tide.flow: flow 'etl': cycle a -> c -> b -> a" },
      { function() tide.flow{ name = "etl", tasks = { store = { run = f, after = "prase" } } } end,
        "tide.flow: flow 'etl': task 'store' depends on unknown task 'prase'" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f, retires = 3 } } } end,
        "tide.flow: flow 'etl': task 'a': unknown field 'retires'" },
      { function() tide.flow{ name = "etl", tasks = { a = { after = {} } } } end,
        "tide.flow: flow 'etl': task 'a': needs 'run', 'each' or 'flow'" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = 5 } } } end,
        "tide.flow: flow 'etl': task 'a': bad field 'run' (function expected, got number 5)" },
      { function() tide.flow{ name = "etl", tasks = { a = { each = f, concurrency = 0 } } } end,
        "tide.flow: flow 'etl': task 'a': bad field 'concurrency' (integer >= 1 expected, got number 0)" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f, timeout = -1 } } } end,
        "tide.flow: flow 'etl': task 'a': bad field 'timeout' (positive number of ms expected, got number -1)" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f, when = true } } } end,
        "tide.flow: flow 'etl': task 'a': bad field 'when' (function expected, got boolean)" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f, items = f } } } end,
        "tide.flow: flow 'etl': task 'a': 'items' without 'each'" },
      { function() tide.flow{ name = "etl", tasks = {} } end,
        "tide.flow: bad option 'tasks' (non-empty table of tasks expected, got table)" },
      { function() tide.flow{ name = "etl", fail = "halt", tasks = { a = { run = f } } } end,
        "tide.flow: bad option 'fail' ('stop' or 'continue' expected, got string \"halt\")" },
      { function() tide.flow{ name = "etl", on = { task_end = f }, tasks = { a = { run = f } } } end,
        "tide.flow: flow 'etl': unknown hook 'task_end'" },
      { function() tide.flow{ name = "etl", tasks = { a = { flow = tide.flow{ tasks = { x = { run = f } } }, run = f } } } end,
        "tide.flow: flow 'etl': task 'a': 'flow' cannot go with 'run'" },
      { function() tide.flow{ name = "etl", tasks = { a = { mode = "thread", each = tide.flow{ tasks = { x = { run = f } } } } } } end,
        "tide.flow: flow 'etl': task 'a': a flow as 'each' runs on the loop, not in thread mode" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f } }, taks = {} } end,
        "tide.flow: unknown option 'taks'" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f } } }:graph("png") end,
        "flow:graph: bad argument #1 ('dot' or 'mermaid' expected, got string \"png\")" },
      { function() tide.flow{ name = "etl", tasks = { a = { run = f } } }:run() end,
        "flow:run: called outside a task (use flow:start, or run it inside tide.run)" },
    })
  end)

  it("draws DOT and Mermaid, coloured by status after a run", function()
    local f = tide.flow{ name = "etl", tasks = {
      fetch = { run = function() return 1 end },
      parse = { after = "fetch", items = function() return {} end, each = function() end },
    } }
    local dot = f:graph("dot")
    assert.matches('digraph "etl" {', dot, 1, true)
    assert.matches('"fetch" -> "parse";', dot, 1, true)
    assert.matches('"parse" [label="parse (each)"];', dot, 1, true)
    local mermaid = f:graph("mermaid")
    assert.matches("flowchart LR", mermaid, 1, true)
    assert.matches("n1 --> n2", mermaid, 1, true)
    run(function() f:run() end)
    assert.matches('"fetch" [label="fetch — ok", fillcolor="#b7e4c7"];', f:graph("dot"), 1, true)
    assert.matches("class n1 ok", f:graph("mermaid"), 1, true)
  end)

  it("prints the flows of a script with `tide graph`, without running them", function()
    local path = os.tmpname()
    local fh = io.open(path, "w")
    fh:write([[
      local tide = require "tide"
      local f = tide.flow{ name = "g", tasks = { a = { run = function() os.exit(3) end }, b = { after = "a", run = print } } }
      f:run()
      os.exit(4)
    ]])
    fh:close()
    local status, out = H.sh(H.build .. "/tide graph --format mermaid " .. path)
    os.remove(path)
    assert.equal(0, status)
    assert.equal('flowchart LR\n  n1["a"]\n  n2["b"]\n  n1 --> n2\n', out)
  end)
end)

-- Items with a hole ({ 1, nil, 3 }) or given as a map ({ a = 1 }) were cut
-- short without a word: one item, or none and an "ok" node.
describe("tide.flow items", function()
  it("fails a node whose items are not a list, naming the hole or the key", function()
    local res
    run(function()
      local f = tide.flow{ name = "holes", fail = "continue", tasks = {
        hole = { each = function(x) return x end, items = function() return { 1, nil, 3 } end },
        map = { each = function(x) return x end, items = function() return { a = 1 } end },
        list = { each = function(x) return x end, items = function() return { 1, 2 } end },
      } }
      local _, r = f:run()
      res = r
    end)
    assert.equal("error", res.tasks.hole.status)
    assert.matches("items must be a list (it has a hole at 2)", tostring(res.tasks.hole.error), 1, true)
    assert.equal("error", res.tasks.map.status)
    assert.matches('items must be a list (it has the key string "a")', tostring(res.tasks.map.error), 1, true)
    assert.equal("ok", res.tasks.list.status)
    assert.same({ 1, 2 }, res.tasks.list.value)
  end)
end)
