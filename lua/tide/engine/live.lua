--- tide.engine.live — every task that may still be live, in creation order: what a shutdown ends, oldest first.
--
-- tide.engine.sched adds each task it makes (add) and says when one has
-- ended (remove).  A finished task leaves the list at once when it is the
-- last one, with the finished ones before it (a flow's workers, a burst);
-- the others go when an add finds more than half of the list and SLACK
-- entries finished, and compacts it (at tasks' ends too, it was compacted
-- again and again at the end of a burst: 8% of its time).  A finished task
-- keeps only its value (its function and arguments go at its end): with a
-- slack of 1,024 and those kept, a flow run 400 times inside one task kept
-- every run.  `nlive` counts the tasks really live.
--
-- Code may run amid these writes and spawn (a finalizer: see
-- tide.engine.runq's header), so each is done in steps that such a spawn
-- cannot undo: add takes its slot before it fills it; the list is not
-- compacted nor trimmed while a slot is being filled, nor compacted while
-- its end is trimmed (`busy`): a compaction replaces the array those write
-- into, and an empty slot looks like a hole; a compaction or a trim that
-- finds an entry added meanwhile leaves the count alone (a trim's cleared
-- slots then stay as holes, which both skip).  review_storm_spec spawns at
-- each line of these functions.  What may raise (an allocation) comes
-- before `busy` is taken, but for add's store, whose `busy` the next tick
-- lets go (M.tick).
local STATE = require("tide.engine.fields").STATE
local new_table = require("tide.engine.runq").new_table

local M = {}

local TERMINAL = { ok = true, error = true, timeout = true, cancelled = true }
M.TERMINAL = TERMINAL

local list, n_list, nlive, busy = {}, 0, 0, 0
local SLACK = 64

--- Drops the finished tasks at the end of the list.
local function trim()
  if busy > 0 then return end                 -- (a slot being filled would look like a hole: later)
  busy = 1
  local top = n_list
  local n = top
  while n > 0 do
    local t = list[n]
    if t and not TERMINAL[t[STATE]] then break end
    n = n - 1
  end
  for i = top, n + 1, -1 do list[i] = nil end
  if n_list == top then n_list = n end        -- (else a task was added after them: they stay holes)
  busy = 0
end

--- Drops the finished tasks (and holes) from the list, into a new array;
--- not while the list is being written, nor if a task was added or
--- trimmed meanwhile (then the next add tries again).
local function compact()
  if busy > 0 then return end
  local size = nlive
  local kept = new_table(size, 0)             -- before `busy`: it may raise (out of memory, a finalizer's error)
  if busy > 0 or nlive > size then return end -- (a spawn at that allocation: kept may be too short, later)
  busy = 1
  local n, j = n_list, 0
  for i = 1, n do
    local t = list[i]
    if t and not TERMINAL[t[STATE]] then j = j + 1; kept[j] = t end
  end
  if n_list == n then list, n_list = kept, j end
  busy = 0
end

--- Adds task t, made now.  The list is compacted first: compact may raise
--- (its new array: out of memory, a finalizer's error), and then t is not
--- in the list, nor counted (a task stored there, never started, stayed
--- live for ever).
function M.add(t)
  if n_list > 2 * nlive + SLACK then compact() end
  busy = busy + 1
  -- The slot is ours from here: a spawn nested after this line takes the
  -- next.  (One line: nothing runs between the count's write and its read,
  -- as no allocation nor guard that can fail comes between them, and a line
  -- hook, which review_storm_spec runs a spawn from, comes only at a line.)
  n_list = n_list + 1; local n = n_list
  list[n] = t                                 -- (a store that grows the list may raise: t is then not counted)
  nlive = nlive + 1
  busy = busy - 1
end

--- Task t has just ended (its state is terminal); returns how many are live.
function M.remove(t)
  nlive = nlive - 1
  if list[n_list] == t then trim() end        -- the youngest: it and the finished ones before it leave the list
  return nlive
end

--- The live tasks, oldest first (a copy: ending them changes the list).
function M.tasks()
  compact()
  local copy, j = {}, 0
  for i = 1, n_list do                        -- (holes and finished ones, if it could not compact)
    local t = list[i]
    if t and not TERMINAL[t[STATE]] then j = j + 1; copy[j] = t end
  end
  return copy
end

--- A tick begins.  None of these functions is running then (the loop runs
--- from tide.run, never inside them), so a `busy` still taken was left by
--- an error amid a write (add's store that grows the list, raising: out of
--- memory, a finalizer's error, which LuaJIT passes on): it is let go, or
--- the list would never be compacted nor trimmed again, and would keep
--- every task the process makes.
function M.tick() busy = 0 end

--- How many tasks are live.
function M.count() return nlive end

return M
