-- script.lua — the script examples/embed/host.c runs on its own libuv loop.
local tide = require "tide"

local t0 = tide.now()
local a = tide.spawn(function() tide.sleep(20) return "a" end)
local b = tide.spawn(function() tide.sleep(20) return "b" end)
local _, va = a:await()
local _, vb = b:await()
local elapsed = tide.now() - t0
print(("embedded script: %s%s after %.0f ms (ran concurrently)"):format(va, vb, elapsed))
assert(va == "a" and vb == "b", "wrong results")
assert(elapsed < 200, "tasks did not run concurrently")
