-- gc_storm.lua — a stress target: finalizers that raise, spawn and encode during collections while tasks run.
--
--   LUA_CPATH='build/?.so;;' luajit spec/fuzz/gc_storm.lua [SECONDS [SEED]]
--
-- (A plain host: each round is a tide.run of its own.)
--
-- Rounds run until SECONDS (default 5) are spent.  Each round spawns a
-- random mix of coroutine and thread tasks (that return, raise, sleep, time
-- out, get cancelled) while objects with finalizers die by the thousand:
-- finalizers that raise, that spawn thread tasks with large arguments, that
-- encode and check the bytes.  Every other round runs with the JIT off and
-- adds finalizers set with debug.setmetatable (not wrapped by tide: their
-- errors interrupt whatever allocates, tide's engine included; with the JIT
-- on, LuaJIT 2.1 of 2022 itself crashes on one raised at a trace exit).
-- Checked after each round: every task that was spawned got exactly one
-- outcome, and the outcome it may have; thread tasks got their arguments
-- exactly; nested encodes were exact; nothing is left live.  On a failure
-- it prints the seed and exits 1.  spec/run.sh runs it for a few seconds,
-- `make fuzz` for FUZZ_SECONDS.
local tide = require "tide"
local core = require "tide.core"

local SECONDS = tonumber(arg[1]) or 5
local SEED = tonumber(arg[2]) or os.time()
math.randomseed(SEED)
print(("gc_storm: %g s, seed %d"):format(SECONDS, SEED))

local reported = 0
tide.configure{ threads = 2, thread_stop_wait = 50, watchdog = 0,
                on_error = function() reported = reported + 1 end }

local failures = {}
local function fail(msg)
  if #failures < 20 then failures[#failures + 1] = msg end
end

-- ===== payloads: the same bytes must come back from a thread

local payloads, encoded = {}, {}
for i = 1, 40 do
  local t = { i = i, nested = { list = {} } }
  for k = 1, math.random(1, 1500) do t[k] = ("%d/%d"):format(i, k) end
  for k = 1, 20 do t.nested.list[k] = k * i end
  payloads[i], encoded[i] = t, core.encode(t)
end

local echo = function(t) return t end
local function thread_fail() error("thread task failed on purpose") end

-- ===== tasks and what each may end as

local records = {}          -- record: { kind, outcomes = n, status, value, spawned }

local function expect_ok(rec, value) rec.want = value end

local function finished(rec)
  return function(status, value)
    rec.outcomes = rec.outcomes + 1
    rec.status, rec.value = status, value
  end
end

--- Spawns one random task; the record exists before the spawn, so that an
--- error interrupting the spawn leaves a record that may have 0 outcomes.
local function spawn_random(raw)
  local rec = { outcomes = 0, spawned = false }
  records[#records + 1] = rec
  local r = math.random()
  local spec
  if r < 0.35 then
    local n = math.random(1, 1e6)
    rec.kind, rec.want = "co ok", n
    spec = { run = function(k)
      for _ = 1, math.random(0, 3) do tide.sleep(math.random(0, 3)) end
      return k
    end, args = { n } }
  elseif r < 0.45 then
    rec.kind = "co error"
    spec = { run = function() tide.sleep(math.random(0, 2)) error("coroutine task failed on purpose") end }
  elseif r < 0.5 then
    rec.kind = "co timeout"
    spec = { run = function() tide.sleep(1000) end, timeout = math.random(1, 5) }
  elseif r < 0.75 then
    local i = math.random(#payloads)
    rec.kind, rec.want = "thread echo", i
    spec = { mode = "thread", run = echo, args = { payloads[i] } }
  elseif r < 0.85 then
    rec.kind = "thread error"
    spec = { mode = "thread", run = thread_fail }
  else
    rec.kind = "thread cancel"
    spec = { mode = "thread", run = function() require("tide").sleep(200) end }
  end
  spec.handle_result = finished(rec)
  local t = tide.spawn(spec)
  rec.spawned, rec.task = true, t
  if rec.kind == "thread cancel" then tide.after(math.random(0, 5), function() t:cancel("storm") end) end
  return rec
end

local function acceptable(rec)
  local s, v = rec.status, rec.value
  local interrupted = s == "error" and tostring(v):find("boom", 1, true)   -- a finalizer's error landed in it
  if rec.kind == "co ok" then return (s == "ok" and v == rec.want) or interrupted end
  if rec.kind == "co error" then return s == "error" end
  if rec.kind == "co timeout" then return s == "timeout" or interrupted end
  if rec.kind == "thread echo" then
    return (s == "ok" and core.encode(v) == encoded[rec.want]) or interrupted
  end
  if rec.kind == "thread error" then return s == "error" end
  if rec.kind == "thread cancel" then return s == "cancelled" or interrupted end
  return false
end

-- ===== finalizers

local nested_bad = 0
local storming = false      -- finalizers spawn only while the round's tasks are awaited after
local raw_mt = { __gc = function() error("boom from a raw finalizer") end }

local function bombs(n, raw)
  for _ = 1, n do
    local r = math.random()
    if raw and r < 0.3 then
      debug.setmetatable(newproxy(false), raw_mt)
    else
      local p = newproxy(true)
      if r < 0.5 then
        getmetatable(p).__gc = function() error("boom from a finalizer") end
      elseif r < 0.75 then
        getmetatable(p).__gc = function()
          local i = math.random(#payloads)
          if core.encode(payloads[i]) ~= encoded[i] then nested_bad = nested_bad + 1 end
        end
      else
        getmetatable(p).__gc = function() if storming then spawn_random(false) end end
      end
    end
  end
end

-- ===== rounds

local function settle()
  while not pcall(collectgarbage) do end
end

local function round(raw)
  records = {}
  local _, status = pcall(tide.run, function()
    storming = false
    local step = function()
      bombs(math.random(5, 40), raw)
      for _ = 1, math.random(1, 30) do spawn_random(raw) end
      tide.sleep(math.random(0, 2))
    end
    storming = true
    for _ = 1, 40 do pcall(step) end
    storming = false
    -- Wait for every spawned task.
    local function all_done()
      for i = 1, #records do
        local rec = records[i]
        if rec.spawned and rec.outcomes == 0 then return false end
      end
      return true
    end
    local deadline = tide.now() + 20000
    while tide.now() < deadline do
      local ok, done = pcall(all_done)
      if ok and done then return "done" end
      pcall(tide.sleep, 5)
    end
    return "deadline"
  end)
  settle()
  if status ~= "ok" and status ~= nil then fail("the round's root task ended " .. tostring(status)) end
  local spawned, counted = 0, {}
  for _, rec in ipairs(records) do
    if rec.spawned then
      spawned = spawned + 1
      if rec.outcomes ~= 1 then
        fail(("%s task: %d outcomes (status %s)"):format(rec.kind, rec.outcomes, tostring(rec.status)))
      elseif not acceptable(rec) then
        fail(("%s task: outcome %s %s"):format(rec.kind, tostring(rec.status), tostring(rec.value)))
      end
    elseif rec.outcomes > 1 then
      fail(("%s task (its spawn was interrupted): %d outcomes"):format(rec.kind, rec.outcomes))
    end
    if rec.status then counted[rec.status] = (counted[rec.status] or 0) + 1 end
  end
  local live = tide.stats().live
  if live ~= 0 then fail(("%d tasks left live"):format(live)) end
  if nested_bad ~= 0 then fail(("%d nested encodes came out wrong"):format(nested_bad)) end
  return spawned, counted
end

local t0, rounds, tasks = os.clock(), 0, 0
local start = tide.now()
while tide.now() - start < SECONDS * 1000 and #failures == 0 do
  local raw = rounds % 2 == 1
  if raw then jit.off() else jit.on() end
  local n = round(raw)
  rounds, tasks = rounds + 1, tasks + n
end
jit.on()
print(("gc_storm: %d rounds, %d tasks, %d errors reported, %.1f s of CPU"):format(rounds, tasks, reported, os.clock() - t0))
if #failures > 0 then
  for _, f in ipairs(failures) do io.stderr:write("gc_storm: ", f, "\n") end
  io.stderr:write(("gc_storm: FAILED with seed %d (rerun: luajit spec/fuzz/gc_storm.lua %g %d)\n")
    :format(SEED, SECONDS, SEED))
  os.exit(1)
end
print("gc_storm: ok")
