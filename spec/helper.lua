-- spec/helper.lua — loaded by busted before every spec: finds build/tide.so
-- and gives specs a few shared tools.
local build = os.getenv("BUILD") or "build"
package.cpath = build .. "/?.so;" .. package.cpath

local H = {}
_G.spec_helper = H

H.build = build

--- Asserts that fn(...) raises an error whose message ends with `msg`
--- (the start is the caller's file:line).
function H.error_like(msg, fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error: " .. msg)
  err = tostring(err)
  if err:sub(-#msg) ~= msg then
    error(("expected error ending in\n  %s\ngot\n  %s"):format(msg, err), 2)
  end
  return err
end

--- Runs a shell command; returns its exit status and output.
function H.sh(cmd)
  local f = io.popen(cmd .. " 2>&1; echo \"__status=$?\"")
  local out = f:read("*a")
  f:close()
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  return status, (out:gsub("__status=%d+%s*$", ""))
end

return H
