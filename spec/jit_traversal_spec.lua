-- spec/jit_traversal_spec.lua — tide's table traversals against the JIT of
-- the LuaJIT it runs on.  Debian 12's LuaJIT (2.1.0~beta3+git20220320)
-- miscompiles some pairs()/next loops now and then, differently in each
-- process (README, "Layout"): a 1,000-step durable flow's edges, encoded
-- as JSON arrays the way a run stores them, lost their last element in 4%
-- of fresh processes once every loop was compiled in the generic form
-- (ITERC), and the run waited for ever.  So each check runs in many fresh
-- processes.  The second check runs check.not_a_list and a flow's definition
-- (spec/fixtures/list_check.lua), whose loops were rewritten with next().
local H = spec_helper

local PROCESSES = (os.getenv("SANITIZE") or "") ~= "" and 10 or 40

describe("table traversals compiled by this LuaJIT", function()
  it("encode a durable flow's edges whole, in every one of " .. PROCESSES .. " fresh processes", function()
    local failing = {}
    for i = 1, PROCESSES do
      local p = assert(io.popen("luajit spec/fixtures/edges_check.lua " .. H.build .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      if out ~= "0\n" then failing[#failing + 1] = ("process %d: %s"):format(i, out) end
    end
    assert.same({}, failing)
  end)

  it("check lists and number a flow's tasks right, in every one of " .. PROCESSES .. " fresh processes", function()
    local failing = {}
    for i = 1, PROCESSES do
      local p = assert(io.popen("luajit spec/fixtures/list_check.lua " .. H.build .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      if out ~= "0\n" then failing[#failing + 1] = ("process %d: %s"):format(i, out) end
    end
    assert.same({}, failing)
  end)
end)
