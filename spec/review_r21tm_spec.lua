-- spec/review_r21tm_spec.lua — review of h21tm (timers as FFI handles, fires queued in
-- tide.engine.fire): a stopped timer's callback that still runs, and handles of one loaded copy
-- of tide used while another copy drives the loop.
local tide = require "tide"
local testing = tide.testing
local H = spec_helper

local NOT_PENDING = "timer:stop: the timer is not pending (it fired, or was stopped)"

describe("review r21tm: a tide.every stopped while a fire of it is queued", function()
  before_each(testing.before_each)
  after_each(testing.after_each)

  -- A and B are due at the same instant: the tick pops both (B is re-armed under a new key
  -- and its fire queued), then runs A's callback, which stops B.  stop() says true ("it was
  -- pending, it is stopped"), so B's callback must not run after it.
  it("from another callback of the same tick: stop() says true, and its callback never runs again", function()
    local clock = testing.clock()
    local after_stop, stopped = 0, nil
    H.run(function()
      local b
      tide.after(5, function() stopped = { b:stop() } end)
      b = tide.every(5, function() if stopped then after_stop = after_stop + 1 end end)
      clock:advance(7)
      assert.same({ nil, NOT_PENDING }, { b:stop() })
    end)
    assert.same({ true }, stopped)
    assert.equal(0, after_stop)
  end)

  -- A period shorter than a tick: the fire loop pops the re-armed key again and again in
  -- one pass (up to its budget), queueing a fire each time.  The callback stops its timer on
  -- its first run: stop() says true, and the fires queued behind it must not run.
  it("from its own callback while fires of it piled up: it runs once", function()
    local calls, first_stop = 0, nil
    H.run(function()
      tide.every(1e-9, function(tm)
        calls = calls + 1
        if calls == 1 then first_stop = { tm:stop() } end
      end)
      tide.sleep(10)
    end)
    assert.same({ true }, first_stop)
    assert.equal(1, calls)
  end)
end)

describe("review r21tm: a second copy of tide loaded beside the first", function()
  -- package.loaded cleared of tide's Lua modules (tide.core stays: it cannot be loaded again)
  -- and tide required again: both copies share tide.core's loop and its C timer heap, each
  -- had its own slots.  A timer made with the first copy's tide.after while the second drove
  -- the loop was popped by the second, which had no slots for its key: the fire was dropped
  -- without a word, the first copy's handle stayed "pending" for ever, and its stop()
  -- cancelled in C whatever timer took the key since (a sleeping task's, which never woke).
  -- Now the second copy takes the loop over and the first is retired: its timers and tasks
  -- raise a clear error; a second copy loaded while the first has timers pending is refused.
  local function clear()
    return [[
      local function clear()
        for k in pairs(package.loaded) do
          if k:match("^tide") and k ~= "tide.core" then package.loaded[k] = nil end
        end
      end
    ]]
  end

  it("retires the first copy: its timers and tasks raise, nothing of the second's is touched", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "twice.lua", clear() .. [[
      local tide1 = require "tide"
      clear()
      local tide2 = require "tide"
      assert(tide2 ~= tide1, "not a second copy: this case attacks nothing")
      local woke = false
      local st, err = tide2.run(function()
        local sleeper = tide2.spawn(function() tide2.sleep(20); woke = true end)
        local ok1, e1 = pcall(tide1.after, 1, function() end)
        local ok2, e2 = pcall(tide1.spawn, function() end)
        print(ok1, e1)
        print(ok2, e2)
        assert(sleeper:await(2000) == "ok")
      end)
      print(st, err, "sleeper woke", woke)
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    -- (each error names the public function; called through pcall, it has no caller's line)
    local retired = "this copy of tide's engine was replaced by a second one loaded beside it "
      .. "(package.loaded cleared and tide required again); use the newer copy"
    assert.equal(("false\ttide.after: %s\nfalse\ttide.spawn: %s\nok\tnil\tsleeper woke\ttrue\n"):format(retired, retired), out)
  end)

  it("refuses a second copy while the first has a timer pending, and the first goes on", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "twice_busy.lua", clear() .. [[
      local tide1 = require "tide"
      local fired = false
      local st = tide1.run(function()
        tide1.after(20, function() fired = true end)
        clear()
        local ok, err = pcall(require, "tide")
        print(ok, err)
        for k, v in pairs(package.loaded) do end
      end)
      print(st, "fired", fired)
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.matches("^false\ttide: a second copy of tide's engine was loaded %(package.loaded cleared and tide "
      .. "required again%) while the first has 1 timer%(s%) pending; keep one copy\n", out)
    assert.matches("\nok\tfired\ttrue\n$", out)
  end)
end)
