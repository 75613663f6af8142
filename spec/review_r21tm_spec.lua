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
  -- and tide required again: both copies share the C timer heap, each has its own slots.
  -- A timer made with the first copy's tide.after while the second copy drives the loop is
  -- popped by the second copy, which finds no slots for its key: the fire is dropped without
  -- a word (before h21tm: an engine error was reported), the first copy's handle stays
  -- "pending" forever, and its stop() cancels in C whatever timer took the key since — here
  -- a sleeping task's, which then never wakes.
  it("never loses a fire silently, nor lets a stale handle cancel the other copy's timer", function()
    local dir = H.tempdir()
    local status, out = H.run_lua(dir, "twice.lua", [[
      local tide1 = require "tide"
      for k in pairs(package.loaded) do
        if k:match("^tide") and k ~= "tide.core" then package.loaded[k] = nil end
      end
      local tide2 = require "tide"
      assert(tide2 ~= tide1, "not a second copy: this case attacks nothing")
      local reports, fired, woke = 0, false, false
      tide2.configure{ on_error = function() reports = reports + 1 end }
      local st = tide2.run(function()
        local old = tide1.after(1, function() fired = true end)
        tide2.sleep(10)
        local sleeper = tide2.spawn(function() tide2.sleep(20); woke = true end)
        tide2.sleep(1)
        old:stop()
        sleeper:await(500)
        tide2.shutdown(0)
      end)
      print(st, "fired or reported", fired or reports > 0, "sleeper woke", woke)
    ]], 30)
    os.execute("rm -rf " .. dir)
    assert.equal(0, status, out)
    assert.equal("ok\tfired or reported\ttrue\tsleeper woke\ttrue\n", out)
  end)
end)
