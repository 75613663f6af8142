--- tide.engine.fields — where a task's fields live: numbered slots of its table's array part.
--
-- A task (tide.engine.sched) is one table whose fields are the slots 0..8
-- of its array part.  LuaJIT allocates a small array part together with
-- the table's header, so a task is one block of 136 bytes with no hash
-- part; with its fields as keys it was a header and a hash part of 8
-- nodes, 256 bytes (a sleeping task is mostly this table and its runner:
-- bench/RESULTS.md, issue 21).  Rarer fields stay keys of the hash part,
-- added when needed: t.traceback (public, read-only), and the negative
-- numbers VALUES, WAITERS and AWAITING below: a task's numeric keys are
-- tide's, its plain names the user's (README), so a user's t._waiters
-- cannot break the task's end.
--
-- The engine reads and writes the slots by these names (`t[STATE]`); the
-- public fields t.id, t.attempts and t.value are read through the task's
-- metatable (S.Task_mt's __index, M.index), as before.
--
-- S.new_task makes a task from the constant template
--   { [0] = 0, 0, nil, "pending", false, false, false, false, false }
-- which lists the slots below in order.  Its last slot is false, not nil:
-- a trailing nil is not counted in the template's array size, and the
-- first sleep's timer key then moved the array out of the table's block
-- (72 bytes more a task; wait_spec's bound catches it).
local M = {
  ID = 0,          -- t.id, from 1 in creation order
  ATTEMPTS = 1,    -- t.attempts: attempts started so far
  VALUE = 2,       -- t.value: the first value of the outcome, once ended (nil before)
  STATE = 3,       -- "pending", "running", "retrying", or terminal (sched's header)
  FN = 4,          -- the task's function (false for a thread task)
  CO = 5,          -- the current attempt's runner, its number before the first resume, or false
  OPT = 6,         -- the rarer options (hooks.lua), or false
  WAITING = 7,     -- the token of the wait it is suspended in, true once woken, or false
  WAIT_TIMER = 8,  -- the key of its current wait's timer, or false
  -- keys of the hash part, set when needed:
  VALUES = -1,     -- all the outcome's values, when not one ({ n = n, ... })
  WAITERS = -2,    -- the tasks awaiting it (tide.engine.task, await)
  AWAITING = -3,   -- the task it awaits now
}

local PUBLIC = { id = M.ID, attempts = M.ATTEMPTS, value = M.VALUE }

--- The __index of a task's metatable: a public field from its slot, else
--- the method of that name in `methods`.
function M.index(methods)
  return function(t, k)
    local i = PUBLIC[k]
    if i then return t[i] end
    return methods[k]
  end
end

return M
