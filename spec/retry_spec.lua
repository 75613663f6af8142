-- spec/retry_spec.lua — retries: attempts, backoff delays, on_retry, what is retried.
local tide = require "tide"
local retry = require "tide.engine.retry"

local LATE = 60

-- Runs a task that fails `fails` times, recording when each attempt started.
local function attempts_at(policy, fails)
  local starts, hooks = {}, {}
  local t
  spec_helper.run(function()
    local t0 = tide.now()
    t = tide.spawn{
      run = function()
        starts[#starts + 1] = tide.now() - t0
        if #starts <= fails then error("fail " .. #starts) end
        return "done"
      end,
      retry = policy,
      on_retry = function(ev) hooks[#hooks + 1] = { ev.attempt, ev.status, ev.error } end,
    }
    t:await()
  end)
  return t, starts, hooks
end

describe("retry", function()
  after_each(function()
    spec_helper.assert_idle()
  end)

  it("computes fixed, linear and exponential delays, capped at max", function()
    local p = retry.policy("t", { backoff = "fixed", base = 10 })
    assert.same({ 10, 10, 10 }, { retry.delay(p, 1), retry.delay(p, 2), retry.delay(p, 3) })
    p = retry.policy("t", { backoff = "linear", base = 10, max = 25 })
    assert.same({ 10, 20, 25 }, { retry.delay(p, 1), retry.delay(p, 2), retry.delay(p, 3) })
    p = retry.policy("t", { backoff = "exponential", base = 10, max = 1000 })
    assert.same({ 10, 20, 40, 80 }, { retry.delay(p, 1), retry.delay(p, 2), retry.delay(p, 3), retry.delay(p, 4) })
  end)

  it("keeps jittered delays between half and all of the delay", function()
    local p = retry.policy("t", { backoff = "exponential", base = 100, jitter = true, max = 100000 })
    for attempt = 1, 6 do
      local full = 100 * 2 ^ (attempt - 1)
      for _ = 1, 200 do
        local d = retry.delay(p, attempt)
        assert.is_true(d >= full / 2 and d <= full, ("attempt %d delay %f"):format(attempt, d))
      end
    end
  end)

  it("retries until success; handle_result sees only the final outcome", function()
    local calls = {}
    local t
    spec_helper.run(function()
      t = tide.spawn{ run = function() if #calls == 0 and (t.attempts < 3) then error("not yet") end return "ok!" end,
                      retry = { max_attempts = 5, base = 1 },
                      handle_result = function(s, v) calls[#calls + 1] = s .. ":" .. v end }
    end)
    assert.same({ "ok:ok!" }, calls)
    assert.equal(3, t.attempts)
  end)

  it("waits the backoff between attempts (exponential, base 20)", function()
    local t, starts, hooks = attempts_at({ max_attempts = 4, backoff = "exponential", base = 20 }, 3)
    assert.equal("ok", t:status())
    assert.equal(4, #starts)
    local expect = { 20, 40, 80 }
    for i = 1, 3 do
      local gap = starts[i + 1] - starts[i]
      assert.is_true(gap >= expect[i] - 0.5 and gap < expect[i] + LATE, ("gap %d: %.1f"):format(i, gap))
    end
    assert.equal(3, #hooks)
    assert.same({ 1, "error" }, { hooks[1][1], hooks[1][2] })
    assert.matches("fail 1", hooks[1][3])
  end)

  it("gives up after the last attempt with the last error", function()
    local t, starts = attempts_at({ max_attempts = 3, backoff = "fixed", base = 1 }, 10)
    assert.equal("error", t:status())
    assert.equal(3, t.attempts)
    assert.equal(3, #starts)
    assert.matches("fail 3", t.value)
  end)

  it("retries timeouts by default, each attempt with its own deadline", function()
    local n = 0
    local t
    spec_helper.run(function()
      t = tide.spawn{ run = function() n = n + 1; if n < 3 then tide.sleep(1000) end return n end,
                      timeout = 10, retry = { max_attempts = 3, base = 1 } }
      t:await()
    end)
    assert.equal("ok", t:status())
    assert.equal(3, t.value)
  end)

  it("retries only the statuses listed in `on`", function()
    local t
    spec_helper.run(function()
      t = tide.spawn{ run = function() tide.sleep(1000) end, timeout = 5, retry = { max_attempts = 3, base = 1, on = { "error" } } }
      t:await()
    end)
    assert.equal("timeout", t:status())
    assert.equal(1, t.attempts)
  end)

  it("never retries a cancel, even during backoff", function()
    local t
    spec_helper.run(function()
      t = tide.spawn{ run = function() error("x") end, retry = { max_attempts = 5, base = 50 } }
      tide.sleep(10)
      assert.equal("retrying", t:status())
      t:cancel("stop")
    end)
    assert.equal("cancelled", t:status())
    assert.equal(1, t.attempts)
  end)

  it("contains errors in on_retry", function()
    local seen = 0
    tide.configure{ on_error = function() seen = seen + 1 end }
    local t
    spec_helper.run(function()
      t = tide.spawn{ run = function() error("x") end, retry = { max_attempts = 2, base = 1 },
                      on_retry = function() error("hook broke") end }
      t:await()                                 -- heard: only the hook's error is reported
    end)
    tide.configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err)) end }
    assert.equal(1, seen)
    assert.equal("error", t:status())
    assert.equal(2, t.attempts)
  end)
end)
