--- tide.jobs.store.common — what the store drivers share apart from their SQL.
local error, ipairs, type, tostring, sort, concat, format = error, ipairs, type, tostring, table.sort, table.concat, string.format

local M = {}

--- Raises when the job tables cannot be migrated from `version` (0: none
--- yet) to `latest`; `foreign` is true when a tide_jobs table exists anyway.
function M.check_version(name, version, latest, foreign)
  if version > latest then
    error(format("%s: the job tables are at schema version %d, newer than this tide knows (%d); "
                 .. "upgrade tide", name, version, latest), 0)
  end
  if version == 0 and foreign then
    error(name .. ": a table tide_jobs exists that tide did not create (no tide_schema version)", 0)
  end
end

-- ===== a transaction aborted by a failed statement
--
-- Both stores behave as PostgreSQL does: once a statement of a transaction
-- fails, the transaction is aborted.  Later statements are refused (not
-- run), its COMMIT is refused (the caller rolls back), and a ROLLBACK TO a
-- savepoint (a nested q:transaction that raised) makes it usable again.
-- The stores keep the first failure's message, to name it.

--- The error for a statement sent to an aborted transaction of store `name`.
function M.aborted(name, first)
  return format("%s: current transaction is aborted, commands ignored until end of transaction block "
    .. "(SQLSTATE 25P02; the statement that failed first: %s)", name, tostring(first))
end

--- The error for the COMMIT of an aborted transaction of store `name`.
function M.rolled_back(name, first)
  return format("%s: rolled back, not committed: a statement in the transaction failed (%s); to go on "
    .. "after a statement that may fail, run it in a nested q:transaction (a savepoint)", name, tostring(first))
end

-- (a corrupt row may hold a string where a number belongs: it sorts last,
-- and the worker fails it)
local function num(v) return type(v) == "number" and v or math.huge end

local function by_priority(a, b)
  local pa, pb = num(a.priority), num(b.priority)
  if pa ~= pb then return pa < pb end
  local ra, rb = num(a.run_at), num(b.run_at)
  if ra ~= rb then return ra < rb end
  return num(a.id) < num(b.id)
end

--- Claimed rows in the order they should start (a statement that updates
--- and returns rows gives no order of its own).
function M.start_order(rows)
  if #rows > 1 then sort(rows, by_priority) end
  return rows
end

--- Rows { queue, status, n } -> { [queue] = { [status] = n } }.
function M.group_stats(rows)
  local out = {}
  for _, r in ipairs(rows) do
    local q = out[r.queue]
    if not q then q = {}; out[r.queue] = q end
    q[r.status] = r.n
  end
  return out
end

--- "(status = 'a' OR status = 'b')": SQLite's form of a status set (an IN
--- list in a partial index costs SQLite a temporary table per row tested).
function M.any_of(statuses)
  local terms = {}
  for i, st in ipairs(statuses) do terms[i] = format("status = '%s'", st) end
  return "(" .. concat(terms, " OR ") .. ")"
end

--- A job stopping: cancelled, expired or failed by hand while it ran, and
--- still leased to its worker until that worker has stopped it and said so
--- (session:unlease), or its lease ran out (session:rescue).  The predicate
--- of the index tide_jobs_stopping, in both stores.
M.STOPPING = "lease_owner IS NOT NULL AND status <> 'executing'"

--- "status <> 'a' AND status <> 'b'".
function M.none_of(statuses)
  local terms = {}
  for i, st in ipairs(statuses) do terms[i] = format("status <> '%s'", st) end
  return concat(terms, " AND ")
end

--- The statuses (from tide.jobs.job's lists, or checked against them) as an SQL list.
function M.status_list(statuses)
  local marks = {}
  for i, st in ipairs(statuses) do marks[i] = format("'%s'", st) end
  return "(" .. concat(marks, ", ") .. ")"
end

--- The predicate of a unique look-up: a job in one of the states, and,
--- when `executing` is one of them, a job still stopping (its worker runs
--- it until it notices: counted as not executing, its twin went in and ran
--- beside it).
function M.unique_match(states)
  for _, st in ipairs(states) do
    if st == "executing" then return "(status IN " .. M.status_list(states) .. " OR " .. M.STOPPING .. ")" end
  end
  return "status IN " .. M.status_list(states)
end

return M
