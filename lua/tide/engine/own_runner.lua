--- tide.engine.own_runner — whether code runs on a runner's own stack, asked without a C call there.
local core = require "tide.core"

local co_create, co_resume, co_yield, co_status, co_running =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.status, coroutine.running
local type, pcall, error = type, pcall, error

-- Is the code running now that of runner `co` itself, or of a coroutine
-- it resumed (the task's coroutine.wrap)?  A wait must be in the former:
-- only the runner's yields reach the scheduler.  coroutine.running() would
-- say, but a C function needs 20 free slots above its caller, and a waiting
-- runner's frames (runner, task, wait) leave fewer of LuaJIT's first 47:
-- that one call doubled the stack of every sleeping task (47 -> 94 slots),
-- and a collection shrank it back, leaving ~350 bytes of RSS behind per
-- sleeping task (callgrind and `bench/peers.lua mem`, bench/RESULTS.md).
-- So no wait makes a C call on the task's stack: own_runner() resumes
-- `checker`, a coroutine of tide's own, which looks at `co` from its own
-- stack (core.caller_is): if own_runner is the function that resumed it
-- from `co`, the wait runs in `co` itself; from a nested coroutine, `co` is
-- suspended in the user's resume instead, below the user's code.
local caller_is = core.caller_is
local own_runner

-- The check may allocate (a slot pushed on co's stack may grow it): an
-- allocation may run a finalizer that raises, and that error is the wait's
-- own, raised from it as from any allocation of the task's.
local function check_runner(co)
  while true do
    local ok, yes, can = pcall(caller_is, co, own_runner)
    co = co_yield(ok, yes, can)
  end
end
local checker = co_create(check_runner)

--- True when runner `co` is running this code itself (not a coroutine it
--- resumed) and can yield here.  Else false, and a second value: true when
--- it is co's own code, but inside a C call (a __gc finalizer run by an
--- allocation of the task's, a debug hook, table.sort's comparator), where
--- a yield fails; such a wait must be refused before it takes a token: a
--- finalizer's wait inside the task's own await took the await's token
--- away, and the await was never woken.
function own_runner(co)
  if type(co) ~= "thread" then return false end
  local resumed, checked, yes, can = co_resume(checker, co)
  if not resumed then
    if co_status(checker) == "dead" then     -- a debug hook's error ended it, outside its pcall:
      checker = co_create(check_runner)      -- a new one, and the error is the wait's own
      error(checked, 0)
    end
    return co_running() == co                -- the checker is busy (a finalizer that waits, inside it)
  end
  if not checked then error(yes, 0) end
  return can, yes
end

return own_runner
