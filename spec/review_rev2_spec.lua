-- spec/review_rev2_spec.lua — a hostile review of the day's changes (334bb0f..5e37406): bulk job changes, pools,
-- metrics on loopback, the command line: one test per defect found, each failing before its fix.
local tide = require "tide"
local H = spec_helper
local cjson = require "cjson"

describe("review rev2: pool:submit on a full thread or process pool", function()
  before_each(H.quiet_start)
  after_each(H.quiet_end)

  -- Broken: only a plain function was checked before "queue full"; its
  -- arguments, and an option table's run and args, were not: a full pool
  -- answered nil, "queue full" to a call a pool with room raised for.
  it("checks the arguments and an option table's run before answering queue full", function()
    H.run(function()
      local p = tide.pool{ concurrency = 1, queue_limit = 0, mode = "thread" }
      local busy = p:submit(function() local t0 = os.clock() while os.clock() - t0 < 0.2 do end end)
      local up = 1
      H.error_cases("spec/review_rev2_spec.lua", {
        { function() p:submit(function(x) return x end, function() end) end,
          "pool:submit: args[1]: functions cannot cross to a thread" },
        { function() p:submit{ run = function(x) return x end, args = { function() end } } end,
          "pool:submit: args[1]: functions cannot cross to a thread" },
        { function() p:submit{ run = function() return up end } end,
          "pool:submit: bad option 'run' (a function with upvalues cannot cross to a thread: upvalue 'up')" },
      })
      assert.same({ nil, "pool:submit: queue full (0 waiting, queue_limit 0)" },
                  { p:submit(function(x) return x end, 1) })
      assert.equal("ok", (busy:await()))
    end)
  end)
end)
