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

--- Checks a list of { fn, message } cases: each fn must raise `message`,
--- prefixed by its own line in `file` (the spec's path), as every public
--- function blames its caller's line.
function H.error_cases(file, cases)
  local pattern = "^" .. file:gsub("%p", "%%%0") .. ":%d+: (.*)$"
  for i, case in ipairs(cases) do
    local ok, err = pcall(case[1])
    assert(not ok, ("case %d did not fail: %s"):format(i, case[2]))
    local msg = tostring(err):match(pattern)
    if msg ~= case[2] then
      error(("case %d:\n expected: %s:N: %s\n      got: %s"):format(i, file, case[2], tostring(err)), 2)
    end
  end
end

--- Makes the error sink count instead of print (for specs that make
--- callbacks fail on purpose); loud_errors() restores printing.
function H.quiet_errors()
  H.reported = 0
  require("tide").configure{ on_error = function() H.reported = H.reported + 1 end }
end

function H.loud_errors()
  require("tide").configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err), "\n") end }
end

--- What every spec checks after each test: no task left live, no libuv
--- handle of tide's left active (the loop would not have ended).
function H.assert_idle()
  local assert = require "luassert"         -- the helper loads before busted's globals
  local st = require("tide").stats()
  assert.equal(0, st.live, "tasks left live")
  assert.equal(0, st.active_handles, "handles left active")
end

--- Runs a shell command; returns its exit status and output.
function H.sh(cmd)
  local f = io.popen(cmd .. " 2>&1; echo \"__status=$?\"")
  local out = f:read("*a")
  f:close()
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  return status, (out:gsub("__status=%d+%s*$", ""))
end

--- A fresh directory under /tmp (the spec removes it when done).
function H.tempdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir) == 0)
  return dir
end

--- Writes `text` to dir/name; returns the path.
function H.write_file(dir, name, text)
  local path = dir .. "/" .. name
  local fh = assert(io.open(path, "w"))
  fh:write(text)
  fh:close()
  return path
end

--- The bytes of a file ("" when it does not exist).
function H.file_bytes(file)
  local f = io.open(file, "rb")
  if not f then return "" end
  local bytes = f:read("*a")
  f:close()
  return bytes
end

local function remove_db(path)
  for _, suffix in ipairs{ "", "-wal", "-shm", "-journal" } do os.remove(path .. suffix) end
end

--- The job stores under test: SQLite always; PostgreSQL when spec/run.sh
--- started a server (TIDE_PG_URL).  Store specs run once per store:
--- fresh(path) returns the URL of an empty store, reset(path) removes what
--- a test made.
function H.stores()
  local list = {
    { name = "sqlite",
      fresh = function(path) remove_db(path); return "sqlite:" .. path end,
      reset = function(path) remove_db(path) end },
  }
  local pg = os.getenv("TIDE_PG_URL")
  if pg then
    local function reset()
      local c = require("tide.jobs.store.postgres").connect(pg)
      c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, orders CASCADE")
      c:query("DROP FUNCTION IF EXISTS tide_jobs_notify() CASCADE")
      c:close()
    end
    list[2] = { name = "postgres", fresh = function() reset(); return pg end, reset = reset }
  end
  return list
end

--- Compares two values exactly: numbers bit for bit (-0 is not 0), arrays
--- must stay arrays (tide.jobs.json's array_mt on `b`, an empty one too).
--- Returns true, or false and the path where they differ.
local function exact(a, b, path)
  local J = require "tide.jobs.json"
  path = path or "value"
  if type(a) ~= type(b) then return false, ("%s: %s against %s"):format(path, type(a), type(b)) end
  if type(a) == "number" then
    if a ~= a and b ~= b then return true end
    if a ~= b or (a == 0 and 1 / a ~= 1 / b) then
      return false, ("%s: %.17g against %.17g"):format(path, a, b)
    end
    return true
  end
  if type(a) ~= "table" or a == J.null or b == J.null then
    if a ~= b then return false, ("%s: %s against %s"):format(path, tostring(a), tostring(b)) end
    return true
  end
  local a_array = getmetatable(a) == J.array_mt or (next(a) ~= nil and #a > 0)
  local b_array = getmetatable(b) == J.array_mt
  if a_array ~= b_array then return false, path .. ": array against object (or the other way)" end
  for k, v in pairs(a) do
    local ok, why = exact(v, b[k], path .. "." .. tostring(k))
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": extra key" end
  end
  return true
end
H.exact = exact

return H
