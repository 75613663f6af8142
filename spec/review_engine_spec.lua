-- spec/review_engine_spec.lua — a review's attacks on the runners (h21t) and the in-memory flows' workers (h21f).
--
-- Each case is a defect found by review: what a user does, and what must
-- happen.  The engine's cases spawn their tasks side by side, so that one
-- runner goes through them back to back (see spec/runner_spec.lua).
local tide = require "tide"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

describe("review: a runner", function()
  before_each(function() H.quiet_errors() end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  -- A handle_result runs inside whatever coroutine ended the task: here a
  -- coroutine.wrap of the task itself.  Its bare yield suspends that
  -- coroutine, which is never resumed, so the callback's state is never
  -- restored; the next task of the batch, run by the same runner, must not
  -- inherit it (it could not wait, and its bare yields looped for ever).
  it("starts the next task of the batch clean after a callback left suspended in a nested coroutine", function()
    local status, value, spins = H.run(function()
      local a
      a = tide.spawn{ run = function()
        coroutine.wrap(function() a:cancel("in wrap") end)()
        return "a"
      end, handle_result = function() coroutine.yield() end }
      local b = tide.spawn(function() tide.sleep(1); return "b slept" end)
      local n = 0
      local c = tide.spawn(function() for _ = 1, 3 do n = n + 1; coroutine.yield() end; return "c yielded" end)
      local s, v = b:await()
      c:await()
      return s, v, n
    end)
    assert.same({ "ok", "b slept" }, { status, value })
    assert.equal(3, spins)
  end)
end)

describe("review: tide.flow", function()
  before_each(function() H.quiet_errors() end)
  after_each(function()
    H.loud_errors()
    H.assert_idle()
  end)

  it("leaves no flow timer behind when its flow_start hook cancels the run", function()
    local t0 = tide.now()
    local status = H.run(function()
      local h
      local f = tide.flow{ name = "cancelled_at_start", timeout = 5000, tasks = { a = { run = function() return 1 end } },
        on = { flow_start = function() h:cancel("from flow_start") end } }
      h = f:start()
      return (h:await())
    end)
    assert.equal("cancelled", status)
    assert.is_true(tide.now() - t0 < 2500, "the loop ran on for the flow's timeout: " .. (tide.now() - t0) .. " ms")
  end)

  -- The node's failure message is made with tostring(value): an error
  -- object whose __tostring raises made child_done raise half-way, so the
  -- failure was lost (node "ok"), or the node never ended (flow hung).
  it("fails an each node whose child raises an error object with a failing __tostring", function()
    local weird = setmetatable({}, { __tostring = function() error("tostring refuses") end })
    local st, a_status, flow_status = H.run(function()
      local f = tide.flow{ name = "weird", tasks = {
        a = { each = function(item) if item == 2 then error(weird) end return item end,
              items = function() return { 1, 2 } end },
      } }
      local h = f:start()
      local s, rep = h:await(3000)
      if s == nil then h:cancel("hung"); h:await(); return "hung" end
      return "ended", rep.tasks.a.status, s
    end)
    assert.equal("ended", st)
    assert.equal("error", a_status)
    assert.equal("error", flow_status)
  end)

  -- A simple node runs on the run's worker: tide.current() inside it is
  -- that worker, which goes on to run other nodes.  A handle kept after
  -- the node ended (to stop "my work" later, a common watchdog pattern)
  -- must not reach the nodes that run after it: with a task per node it
  -- found the node's task finished.
  it("never lets a simple node's tide.current(), kept after the node ended, cancel a later node", function()
    local cancel_result, status, b_status = H.run(function()
      local got
      local f = tide.flow{ name = "keep", tasks = {
        a = { run = function()
                local me = tide.current()
                tide.spawn(function() tide.sleep(20); got = { me:cancel("a's own watchdog") } end)
                return "a"
              end },
        b = { after = "a", run = function() tide.sleep(60); return "b" end },
      } }
      local s, rep = f:run()
      return got, s, rep.tasks.b.status
    end)
    assert.is_nil(cancel_result[1])
    assert.equal("ok", status)
    assert.equal("ok", b_status)
  end)

  it("runs every node once when simple nodes take tide.current(), and each handle is finished when the next node runs", function()
    local runs, live_handles = {}, {}
    local status = H.run(function()
      local tasks, last = {}, nil
      for i = 1, 60 do
        local name = ("n%02d"):format(i)
        tasks[name] = { after = i > 1 and ("n%02d"):format(i - 1) or nil, run = function()
          runs[name] = (runs[name] or 0) + 1
          if last and last:status() == "running" then live_handles[#live_handles + 1] = name end
          last = nil
          if i % 3 == 0 then last = tide.current() end
          if i % 7 == 0 then tide.sleep(0) end
          return i
        end }
      end
      local f = tide.flow{ name = "handles", tasks = tasks }
      return (f:run())
    end)
    assert.equal("ok", status)
    assert.same({}, live_handles)
    for i = 1, 60 do assert.equal(1, runs[("n%02d"):format(i)]) end
  end)

  it("has the watchdog name the simple node that holds the loop, not only the run's worker", function()
    local path = H.write_file(dir, "spin_node.lua", H.SPIN_SCRIPT .. [[
      local f = tide.flow{ name = "etl", tasks = { parse = { run = function() spin(1500) return 1 end } } }
      print("flow", (f:run()))
    ]])
    local _, out = H.sh("timeout 60 " .. H.build .. "/tide run " .. path)
    assert.matches("flow\tok", out)
    assert.matches("running now: [^\n]*etl/parse", out)
  end)

  -- A node that cancels its worker from a nested coroutine goes on running
  -- (the worker stops at its next wait): the stall is still that node's.
  -- The worker's end drops its run (so that a finished task keeps none
  -- alive), and the watchdog's describe then failed on it, naming only the worker.
  it("has the watchdog name the simple node that holds the loop after it cancelled its own worker", function()
    local path = H.write_file(dir, "spin_cancelled_node.lua", H.SPIN_SCRIPT .. [[
      local f = tide.flow{ name = "etl", tasks = { parse = { run = function()
        coroutine.wrap(function() tide.current():cancel("by itself") end)()
        spin(1500)
        return 1
      end } } }
      print("flow", (f:run()))
    ]])
    local _, out = H.sh("timeout 60 " .. H.build .. "/tide run " .. path)
    assert.matches("flow\tcancelled", out)
    assert.matches("running now: 'etl/parse' %(on task %d+ 'flow etl worker'%)", out)
  end)
end)
