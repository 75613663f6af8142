--- tide.engine.host — driving the loop: tide.run, the `tide` binary and the C embedding API.
local core = require "tide.core"
local S = require "tide.engine.sched"
local VALUE = require("tide.engine.fields").VALUE   -- (t.value: a user may write that name onto a task)
local log = require "tide.engine.log"
local config = require "tide.engine.config"
local task = require "tide.engine.task"

local tostring, io_stderr = tostring, io.stderr

local H = {
  signal = nil,    -- the signal that started a shutdown during the last run
  root = nil,      -- the root task of a script (tide_spawn_file)
}

local SIGNAMES = { [2] = "SIGINT", [15] = "SIGTERM" }

local function on_signal(signum)
  local name = SIGNAMES[signum] or ("signal " .. signum)
  if H.signal == nil then
    local reason = "shutdown (" .. name .. ")"   -- allocates: before anything changes
    H.signal = signum
    S.shutdown(config.grace, reason)
  else
    S.shutdown(0, "shutdown (" .. name .. ", again)")   -- a second signal: stop now
  end
end

core.set_handlers(S.tick, on_signal)

local function run_until_done()
  while true do
    core.run()
    local ok, n = pcall(S.reap)             -- a finalizer's error may interrupt it: again
    if not ok then log.report("tide's engine (reaping stalled tasks)", n, n) end
    if ok and n == 0 then return end
  end
end

--- Runs the loop until no work is left.  Tasks still live then can never be
--- woken: they are cancelled, which may start new work, so it runs again.
--- Whatever happens, signals are given back and the engine reset.
function H.loop()
  local signals = config.signals
  H.signal = nil
  if signals then core.signals(true, config.grace) end
  local ok, err = pcall(run_until_done)
  if signals then core.signals(false) end
  S.report_unheard()
  S.reset()
  if not ok then error(err, 0) end
end

--- One non-blocking iteration; 1 while work remains, else 0.
function H.step()
  local active = core.run(true)
  if not active and S.live_count() > 0 then
    S.reap()
    active = core.run(true)
  end
  if not active then                         -- the work is done: a later run starts afresh
    S.report_unheard()
    S.reset()
  end
  return active and 1 or 0
end

--- Before tide_close or lua_close: the loop is about to close, so the tasks still live
--- (asleep, waiting on a thread, runnable) can never run again.  Each is
--- cancelled, its outcome delivered; so is a task that a handle_result
--- spawns meanwhile (a bounded number of rounds: a handle_result that
--- always spawns again leaves its last task live, said on stderr).
--- `reason` says which ("tide was closed (tide_close)").  Returns how many
--- were cancelled.
function H.close_tasks(reason)
  local n = 0
  for _ = 1, 100 do
    if S.live_count() == 0 then break end
    local ok, k = pcall(S.reap, reason)
    if ok then n = n + k else log.report("tide's engine (cancelling tasks at tide_close)", k, k) end
  end
  if S.live_count() > 0 then
    io_stderr:write(("tide: %s left %d task(s) live: their handle_result spawned again at every cancel\n")
      :format(reason, S.live_count()))
  end
  S.reset()
  return n
end

function H.shutdown(grace_ms)
  S.shutdown(grace_ms or config.grace)
  return 0
end

--- Loads a script and spawns it as the root task; `args` become `arg[1..]`
--- and the chunk's `...`.  Returns the task, or nil and the load error.
function H.spawn_file(path, args)
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  local a = { [-1] = "tide", [0] = path }
  for i = 1, #args do a[i] = args[i] end
  _G.arg = a
  local t = task.spawn{ run = chunk, args = { n = #args, unpack(args) }, name = path }
  S.options(t).heard = true                     -- its failure is the process's exit status
  H.root = t
  return t
end

--- Runs the loop for the root task and returns the process's exit status:
--- 128 + signal after a shutdown by signal, 1 when the root task failed.
function H.run()
  H.loop()
  local root = H.root
  if H.signal then return 128 + H.signal end
  if root == nil or S.state(root) == "ok" then return 0 end
  local msg = root.traceback or tostring(root[VALUE])
  io_stderr:write("tide: ", msg, "\n")
  return 1
end

return H
