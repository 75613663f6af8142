-- spec/embed_spec.lua — tide in a C host that runs its own libuv loop (examples/embed/host.c).
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

local function host(script)
  local path = H.write_file(dir, "script.lua", script)
  return H.sh(("timeout 30 %s/embed-host %s"):format(H.build, path))
end

describe("an embedding host that runs the loop", function()
  it("refuses tide.run inside a task, and the script's root task goes on", function()
    local status, out = host([[
      local tide = require "tide"
      local ok, err = pcall(tide.run, function() return 1 end)
      print("nested", ok, err)
      local t = tide.spawn(function() tide.sleep(20) return "later" end)
      print("outer", t:await())
      assert(not ok, "tide.run nested in the host's loop must fail")
    ]])
    assert.equal(0, status, out)
    assert.matches("nested\tfalse\t[^\n]*tide.run: the loop is already running", out)
    assert.matches("outer\tok\tlater", out)
    assert.matches("script status 0", out)
  end)

  it("runs the script's tasks on the host's loop", function()
    local status, out = H.sh(("timeout 30 %s/embed-host examples/embed/script.lua"):format(H.build))
    assert.equal(0, status, out)
    assert.matches("host timer ticked 3 times; script status 0", out)
  end)
end)
