-- runaway_tasks.lua — process mode: work that a timeout really stops, and crashes that stay in their box.
--
-- A tide.pool of 2 slots sends 40 tasks to 2 child processes.  Most
-- square a number; some never end (a JIT-compiled loop, or a C call that
-- blocks: os.execute("sleep 1000")), some crash in native code (an FFI write
-- to address 0), some allocate without end under process_memory = 64.
-- Each gets its own outcome — ok, timeout, or an error naming the signal or
-- the memory limit — while the orchestrator's loop keeps ticking, and the
-- pool of children keeps its size: a killed or crashed child is replaced.
--
-- Checks (exit 1 when one fails): every outcome is the one its kind must
-- give, exactly once; the loop ticked throughout; the pool is whole at the
-- end and no `sleep 1000` is left behind.
--
-- Run: build/tide run examples/runaway_tasks.lua      (a few seconds)
local tide = require "tide"

tide.configure{ processes = 2, process_memory = 64, process_stop_wait = 50 }

local N = 40
local function kind_of(i)
  if i % 10 == 3 then return "loop" end
  if i % 10 == 5 then return "blocked" end
  if i % 10 == 7 then return "segv" end
  if i == 9 or i == 29 then return "hog" end
  return "square"
end

-- What runs in the child: a function without upvalues (it crosses as bytecode).
local function work(kind, n, sleep)
  if kind == "loop" then while true do end end
  if kind == "blocked" then os.execute(sleep) end
  if kind == "segv" then require("ffi").cast("int *", 0)[0] = 1 end
  if kind == "hog" then local t = {} for i = 1, 1e9 do t[i] = { i } end end
  return n * n
end

local expected = {
  square = function(status, value, i) return status == "ok" and value == i * i end,
  loop = function(status) return status == "timeout" end,
  blocked = function(status) return status == "timeout" end,
  segv = function(status, value)
    return status == "error" and (tostring(value):match("^process %d+ killed by SIGSEGV")
      or tostring(value):match("AddressSanitizer"))       -- `make sanitize`: ASan reports, then exits
  end,
  hog = function(status, value) return status == "error" and value == "not enough memory" end,
}

-- The stuck kinds get a short timeout; the others a long one (a timeout
-- counts from the task's start, including a wait for a child that is being
-- replaced).
local TIMEOUT = { loop = 200, blocked = 200, square = 5000, segv = 5000, hog = 5000 }

-- The blocked kind's `sleep` carries this process's pid in its duration, so
-- that the count of leftovers below never counts another program's.
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local SLEEP = ("sleep 1000.%d"):format(ffi.C.getpid())

tide.spawn{ mode = "process", run = function() end }:await()   -- the children start with the first task

local seen, wrong, ticks = {}, {}, 0
local ticker = tide.every(10, function() ticks = ticks + 1 end)
local pool = tide.pool{ concurrency = 2, mode = "process" }
local t0 = tide.now()
for i = 1, N do
  local kind = kind_of(i)
  pool:submit{ run = work, args = { kind, i, SLEEP }, timeout = TIMEOUT[kind],
               handle_result = function(status, value)
                 seen[i] = (seen[i] or 0) + 1
                 if not expected[kind](status, value, i) then
                   wrong[#wrong + 1] = ("task %d (%s): %s %s"):format(i, kind, status, tostring(value))
                 end
                 if i % 10 == 0 or kind ~= "square" then
                   print(("%-8s %2d  %-7s %s"):format(kind, i, status, tostring(value):match("[^\n]*")))
                 end
               end }
end
pool:drain()
ticker:stop()
local took = tide.now() - t0

-- A stuck child is killed process_stop_wait ms after its task gave up on
-- it (its outcome came at the deadline): look for a leftover `sleep` after
-- that, for up to a second.
local function leftovers()
  local p = io.popen("pgrep -f '[s]" .. SLEEP:sub(2):gsub("%.", "[.]") .. "' | wc -l")
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end
local leftover = leftovers()
local waited = tide.now()
while leftover ~= 0 and tide.now() - waited < 1000 do
  tide.sleep(20)
  leftover = leftovers()
end
local st = tide.stats().processes
print(("%d tasks in %.0f ms; the loop ticked %d times; children killed %d, died %d, replaced %d; pool size %d")
  :format(N, took, ticks, st.killed, st.died, st.replaced, st.size))

local ok = #wrong == 0
for i = 1, N do if seen[i] ~= 1 then ok = false; print(("task %d: %s outcomes"):format(i, tostring(seen[i]))) end end
for _, w in ipairs(wrong) do print("unexpected: " .. w) end
if ticks < took / 10 / 3 then ok = false; print("the loop did not keep ticking") end
if st.size ~= 2 then ok = false; print("the pool lost children") end
if leftover ~= 0 then ok = false; print("a `sleep 1000` was left behind") end
if not ok then os.exit(1) end
print("every outcome as expected")
