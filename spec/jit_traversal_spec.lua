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

--- The processes (of PROCESSES) in which `fixture` did not print "0" (no wrong answer).
local function failing_in_fresh_processes(fixture)
  local failing = {}
  for i = 1, PROCESSES do
    local p = assert(io.popen("luajit " .. fixture .. " " .. H.build .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    if out ~= "0\n" then failing[#failing + 1] = ("process %d: %s"):format(i, out) end
  end
  return failing
end

describe("table traversals compiled by this LuaJIT", function()
  it("encode a durable flow's edges whole, in every one of " .. PROCESSES .. " fresh processes", function()
    assert.same({}, failing_in_fresh_processes("spec/fixtures/edges_check.lua"))
  end)

  it("check lists and number a flow's tasks right, in every one of " .. PROCESSES .. " fresh processes", function()
    assert.same({}, failing_in_fresh_processes("spec/fixtures/list_check.lua"))
  end)
end)
