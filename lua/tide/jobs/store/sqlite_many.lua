--- tide.jobs.store.sqlite_many — the SQLite store's writes of many jobs in one statement.
--
-- A statement's execution has a fixed cost in SQLite (its start and end,
-- and for an INSERT into tide_jobs AUTOINCREMENT's read and write of
-- sqlite_sequence), so jobs go in, and their completions are written, up to
-- MAX to a statement.  A run of n takes one statement per power of two in
-- n (64 + 32 + 4 for 100): at most 7 texts of each kind are prepared per
-- connection, kept in the session's statements (s.stmts, finalized with
-- them).  Callgrind, instructions a job: an insert 28,300 alone, 10,500 by
-- 64; a completion 23,900 alone, 15,900 by 64.  No RETURNING: its
-- temporary table cost more than the statement saved.
local concat, format, unpack = table.concat, string.format, unpack

local M = {}

M.MAX = 64

--- The session's statement `key`, prepared from make(n) on first use.
local function prepared(s, key, n, make)
  local st = s.stmts[key]
  if not st then st = s.db:prepare(make(n)); s.stmts[key] = st end
  return st
end

--- Calls fn(s, from, size, ...) for consecutive runs of list[from .. to],
--- each a power of two, at most M.MAX.
local function by_powers(s, from, to, fn, ...)
  local i = from
  while i <= to do
    local size = M.MAX
    while size > to - i + 1 do size = size / 2 end
    fn(s, i, size, ...)
    i = i + size
  end
end

-- ===== inserting

local COLS = 15
local ROW = "(" .. ("?, "):rep(COLS - 1) .. "?)"

local function insert_text(n)
  local rows = {}
  for i = 1, n do rows[i] = ROW end
  return "INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority, max_attempts, "
    .. "run_at, inserted_at, partition_key, attempt, attempted_at, lease_owner, lease_expires) VALUES "
    .. concat(rows, ", ")
end

--- Inserts list[from .. from + n - 1] (jobs without keys) in one statement;
--- their ids go in ids[from ..].  A job with lease_owner and lease_expires
--- goes in executing, attempt 1, leased (as the store's insert_leased).
--- The rows of one statement get consecutive ids (AUTOINCREMENT gives each
--- the previous one's plus one; nothing else writes meanwhile: the
--- statement holds the write lock), the last one's is last_id.
local function insert_run(s, from, n, list, ids, inserted)
  local p, k = {}, 0
  for i = from, from + n - 1 do
    local j = list[i]
    local leased = j.lease_owner ~= nil
    p[k + 1], p[k + 2], p[k + 3], p[k + 4], p[k + 5] = j.queue, j.target, j.method, j.args, j.args_enc
    p[k + 6], p[k + 7], p[k + 8], p[k + 9] = leased and "executing" or j.status, j.priority, j.max_attempts, j.run_at
    p[k + 10], p[k + 11], p[k + 12] = j.inserted_at, j.partition_key, leased and 1 or 0
    p[k + 13], p[k + 14], p[k + 15] = leased and j.inserted_at or nil, j.lease_owner, leased and j.lease_expires or nil
    k = k + COLS
  end
  prepared(s, "insert_many:" .. n, n, insert_text):run(unpack(p, 1, k))
  if s.db:changes() ~= n then        -- (insert_many sends no run here when tide_jobs has triggers)
    error(("tide_jobs: %d of %d rows went in"):format(s.db:changes(), n), 0)
  end
  local last = s.db:last_id()
  for i = 0, n - 1 do ids[from + i], inserted[from + i] = last - n + 1 + i, true end
end

local function keyless(j) return j.idempotence_key == nil and j.unique_key == nil end

-- A trigger on tide_jobs (the user's: the file is theirs too) can put rows
-- of its own between a statement's rows, or skip some (RAISE(IGNORE)): their
-- ids are then not consecutive.  With one, every job goes in by a statement
-- of its own, whose last_id is its row's.
local function triggers_text() return "SELECT 1 AS x FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'tide_jobs' LIMIT 1" end

--- Inserts `list` (inside the caller's transaction); returns their ids and
--- inserted flags, in order.  Runs of jobs without keys go in by the
--- statements above; a job with a key by insert_one(s, job) -> id, inserted.
function M.insert_many(s, list, insert_one)
  local ids, inserted = {}, {}
  local i, n = 1, #list
  if prepared(s, "tide_jobs_triggers", 0, triggers_text):first() then
    for k = 1, n do ids[k], inserted[k] = insert_one(s, list[k]) end
    return ids, inserted
  end
  while i <= n do
    if keyless(list[i]) then
      local e = i
      while e < n and keyless(list[e + 1]) do e = e + 1 end
      by_powers(s, i, e, insert_run, list, ids, inserted)
      i = e + 1
    else
      ids[i], inserted[i] = insert_one(s, list[i])
      i = i + 1
    end
  end
  return ids, inserted
end

-- ===== completing

local function completed_text(n)
  local terms = {}
  for i = 1, n do terms[i] = format("(id = ?%d AND attempt = ?%d)", 2 * i + 1, 2 * i + 2) end
  return "UPDATE tide_jobs SET status = 'completed', completed_at = ?1, lease_owner = NULL, "
    .. "lease_expires = NULL WHERE status = 'executing' AND lease_owner = ?2 AND (" .. concat(terms, " OR ") .. ")"
end

--- One statement for list[from .. from + n - 1], each job under the guard
--- of the store's `completed` (executing, leased to owner, at its attempt).
--- It changes as many rows as it has jobs, and then each was written;
--- fewer (a lease lost meanwhile), and it is undone to a savepoint and its
--- jobs written one by one by complete_one, which says which.
local function complete_run(s, from, n, list, owner, now, written, complete_one)
  if n == 1 then return complete_one(s, list[from], owner, now, written) end
  local p = { now, owner }
  for k = 0, n - 1 do p[2 * k + 3], p[2 * k + 4] = list[from + k].id, list[from + k].attempt end
  s.db:exec("SAVEPOINT tide_record")
  if prepared(s, "completed_many:" .. n, n, completed_text):run(unpack(p, 1, 2 * n + 2)) == n then
    s.db:exec("RELEASE tide_record")
    for k = from, from + n - 1 do written[list[k].id] = true end
  else
    s.db:exec("ROLLBACK TO tide_record; RELEASE tide_record")
    for k = from, from + n - 1 do complete_one(s, list[k], owner, now, written) end
  end
end

--- Writes the completions `list` (entries { id, attempt }, no job twice)
--- inside the caller's transaction; each written goes in written[id].
--- complete_one(s, entry, owner, now, written): the one-by-one write.
function M.complete_many(s, list, owner, now, written, complete_one)
  by_powers(s, 1, #list, complete_run, list, owner, now, written, complete_one)
end

return M
