--- tide.observe.sampler — job-store figures read at most every few seconds, shared by the metrics and the dashboard.
--
-- A scrape or a page never waits for the store once a figure exists: it
-- gets the last value, and a stale one is refreshed by a task of its own
-- (stale-while-revalidate).  Only the very first read of a figure waits.
-- A read that took d ms is not repeated for 50·d ms (at least `every`), so
-- sampling takes at most about 2% of the loop, however large the store.
local S = require "tide.engine.sched"
local make_task = require("tide.engine.task").make_task

local pcall, tostring, max = pcall, tostring, math.max

local M = { errors = 0, reads = 0 }

local cache = setmetatable({}, { __mode = "k" })   -- queue -> { [key] = entry }

local function refresh(e, read)
  local t0 = S.now()
  local ok, v, extra = pcall(read)
  local took = S.now() - t0
  M.reads = M.reads + 1
  e.busy, e.took = false, took
  e.next = S.now() + max(e.every, 50 * took)
  if ok then
    e.value, e.extra, e.at, e.error = v, extra, S.now(), nil
  else
    M.errors = M.errors + 1
    e.error = tostring(v)
  end
end

--- The figure `key` of queue q, read by read() -> value, extra at most every
--- `every` ms.  Returns value, extra, its age in ms (nil when never read),
--- and the last read's error, if it failed.
function M.get(q, key, every, read)
  local per = cache[q]
  if not per then per = {}; cache[q] = per end
  local e = per[key]
  if not e then e = { busy = false, next = 0, every = every }; per[key] = e end
  e.every = every
  if not e.busy and S.now() >= e.next then
    e.busy = true
    if e.value == nil and S.in_task() then
      refresh(e, read)                        -- the first read: wait for it
    else
      local t = make_task("tide.observe.sampler", "coroutine",
                          { run = refresh, args = { e, read, n = 2 }, name = "sample " .. key })
      S.start(t)
    end
  end
  return e.value, e.extra, e.at and S.now() - e.at or nil, e.error
end

return M
