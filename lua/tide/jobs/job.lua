--- tide.jobs.job — what a job is, in one place: its statuses and the names it carries.
--
-- Statuses, in the order a job meets them:
--   available   due now, waiting for a worker
--   scheduled   due later (run_at in the future)
--   executing   claimed by a worker, under a lease
--   retryable   an attempt failed; due again at run_at
--   completed   finished: its method returned          } finished: never
--   discarded   finished: its last attempt failed      } run again unless
--   cancelled   finished: cancelled by hand            } retried by hand
--   expired     finished: it must no longer run        }
--
-- Names: a queue or a target is "letters, digits, _ . -" starting with a
-- letter or _ ("orders", "app.mail"); a method is a Lua identifier.
local type = type

local M = {}

M.STATUSES = { "available", "scheduled", "executing", "retryable",
               "completed", "discarded", "cancelled", "expired" }
M.FINISHED = { "completed", "discarded", "cancelled", "expired" }
M.WAITING = { "available", "scheduled", "retryable" }     -- not yet claimed

local function set(list)
  local s = {}
  for i = 1, #list do s[list[i]] = true end
  return s
end
M.is_status = set(M.STATUSES)
M.is_finished = set(M.FINISHED)

M.NAME = "^[%a_][%w_.%-]*$"          -- queues and targets
M.METHOD = "^[%a_][%w_]*$"
M.NAME_EXPECTED = "name (letters, digits, _ . -)"

-- Names seen valid (a pattern match per job is slow: it does not compile).
local good, ngood = {}, 0

local function matches(s, pattern)
  if good[s] == pattern then return true end
  if type(s) ~= "string" or not s:match(pattern) then return false end
  if ngood > 10000 then good, ngood = {}, 0 end
  good[s], ngood = pattern, ngood + 1
  return true
end

--- True for a valid queue or target name.
function M.is_name(s) return matches(s, M.NAME) end

--- True for a valid method name.
function M.is_method(s) return matches(s, M.METHOD) end

return M
