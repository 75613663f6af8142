-- spec/outcome_spec.lua — promise 1: every task reaches exactly one outcome, seen once by everyone.
local tide = require "tide"

-- One task of a random kind; `plan` says what it will do.
local KINDS = { "ok", "error", "timeout", "cancel", "retry_ok", "retry_fail", "slow_ok" }

local function body(kind, attempt_box)
  return function()
    attempt_box.n = attempt_box.n + 1
    if kind == "ok" then return "v"
    elseif kind == "slow_ok" then tide.sleep(math.random(0, 3)) return "v"
    elseif kind == "error" then tide.sleep(math.random(0, 2)) error("planned")
    elseif kind == "timeout" then tide.sleep(1000)
    elseif kind == "cancel" then tide.sleep(1000)
    elseif kind == "retry_ok" then
      if attempt_box.n < 3 then error("transient") end
      return "v"
    elseif kind == "retry_fail" then error("always")
    end
  end
end

local EXPECT = { ok = "ok", slow_ok = "ok", error = "error", timeout = "timeout", cancel = "cancelled",
                 retry_ok = "ok", retry_fail = "error" }

describe("exactly one outcome", function()
  after_each(function()
    spec_helper.assert_idle()
  end)

  it("holds for 10,000 tasks with a random mix of success, error, timeout, cancel and retry", function()
    math.randomseed(7)
    local N = 10000
    local calls, first_status, awaited, kinds = {}, {}, {}, {}
    local pool = tide.pool{ concurrency = 200, queue_limit = N }
    local status = tide.run(function()
      local tasks = {}
      for i = 1, N do
        local kind = KINDS[math.random(#KINDS)]
        kinds[i] = kind
        local spec = {
          run = body(kind, { n = 0 }),
          timeout = (kind == "timeout") and math.random(1, 5) or nil,
          retry = (kind == "retry_ok" or kind == "retry_fail") and { max_attempts = 3, base = 1, max = 2 } or nil,
          handle_result = function(s)
            calls[i] = (calls[i] or 0) + 1
            first_status[i] = first_status[i] or s
          end,
        }
        tasks[i] = (i % 2 == 0) and pool:submit(spec) or tide.spawn(spec)
      end
      -- cancel the "cancel" ones from several places, some more than once
      for i = 1, N do
        if kinds[i] == "cancel" then
          tide.spawn(function() tide.sleep(math.random(0, 3)); tasks[i]:cancel("planned") end)
          if i % 3 == 0 then tide.spawn(function() tide.sleep(2); tasks[i]:cancel("again") end) end
        end
      end
      -- several awaiters per task, some with their own short timeouts
      local waiters = {}
      for i = 1, N, 7 do
        waiters[#waiters + 1] = tide.spawn(function()
          local s = tasks[i]:await(math.random(0, 1) == 0 and 2 or nil)
          if s == nil then s = tasks[i]:await() end
          awaited[i] = s
        end)
      end
      for i = 1, #waiters do waiters[i]:await() end
      pool:drain()
    end)
    assert.equal("ok", status)
    local wrong = 0
    for i = 1, N do
      if calls[i] ~= 1 then error(("task %d (%s): handle_result called %s times"):format(i, kinds[i], tostring(calls[i]))) end
      if first_status[i] ~= EXPECT[kinds[i]] then wrong = wrong + 1 end
      if awaited[i] and awaited[i] ~= first_status[i] then
        error(("task %d: awaiter saw %s, handle_result %s"):format(i, awaited[i], first_status[i]))
      end
    end
    assert.equal(0, wrong)
  end)
end)
