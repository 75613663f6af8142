--- tide.jobs.flow_complete — a durable flow's steps completed as a set: marked ok, dependents released.
--
-- The hot path of durable flows (tide.jobs.flows says how a run moves):
-- the successes of one outcome batch go through steps_ok together, in a
-- few statements for the whole batch whatever its size:
--
--   MARK_OK     the steps still queued under the job that completed become
--               ok with their results (RETURNING their dependents);
--   DECREMENT   each dependent's `waiting` goes down by the number of its
--               dependencies completed here (locked in (run, name) order on
--               PostgreSQL: DECREMENT_PG);
--   release     those at 0 get their jobs, whose args carry the run's input
--               and their dependencies' results (those completed here are
--               known; the others are read in one statement), and the worker
--               that writes the batch leases as many as it has free slots.
--
-- Starting a run and retrying one by hand release their first steps through
-- the same `release`.  Every function takes F, the change of tide.jobs.flows
-- ({ s = session, now, owner, lease, runs, closed, closed_order, post, take }).
local json = require "tide.jobs.json"
local batch_sql = require "tide.jobs.store.batch"
local pg_clock = require "tide.jobs.store.pg_clock"

local ipairs, sort, concat, format, floor, max = ipairs, table.sort, table.concat, string.format, math.floor, math.max

local M = {}

M.TARGET = "tide.jobs.flowstep"
--- Attempts a step's job may lose to workers that died (their leases ran
--- out) on top of the failures its retry policy allows.
M.LOST_ATTEMPTS = 100

local function jstr(s) return json.encode(s) end

--- Per-process memos of the JSON of step names (a step's deps and
--- dependents columns, and a name as a JSON string): each text is decoded
--- or encoded once, not once per step (Lua strings are interned, so a
--- look-up costs a hash).  The lists returned are shared: never changed.
--- A run of n steps needs 3n entries (its deps and dependents texts, filled
--- in by the start that encodes them, and its names): MEMO_MAX holds those
--- of a 20,000-step run (at 20,000 the memos of a 10,000-step run were
--- emptied once during it, and most of its texts decoded again).
local MEMO_MAX = 65536
local names_memo, jname_memo, nmemo = {}, {}, 0

local function memo_room()
  nmemo = nmemo + 1
  if nmemo > MEMO_MAX then names_memo, jname_memo, nmemo = {}, {}, 1 end
end

--- Notes that `text` is the JSON of `list` (a list of names, never changed
--- after), so that names_of finds it without a decode.
local function remember(text, list)
  if names_memo[text] then return end
  memo_room()
  names_memo[text] = list
end

local function names_of(text)
  local list = names_memo[text]
  if not list then
    memo_room()
    list = json.decode(text)
    names_memo[text] = list
  end
  return list
end

local function jname(name)
  local text = jname_memo[name]
  if not text then
    memo_room()
    text = jstr(name)
    jname_memo[name] = text
  end
  return text
end

local batch_stmt = batch_sql.statement
local function batch(F, st, rows, ...) return batch_sql.run(F.s, st, rows, ...) end

--- `closed` more steps finished (`failed` of them failed): counted here,
--- written to the run's row once per change (flush), when the run ends if
--- none is left.
local function steps_closed(F, run, closed, failed)
  local c = F.closed[run.id]
  if not c then c = { run = run, closed = 0, failed = 0 }; F.closed[run.id] = c; F.closed_order[#F.closed_order + 1] = c end
  c.closed, c.failed = c.closed + closed, c.failed + failed
end

-- ===== releasing steps

local READ_RESULTS = batch_stmt("b_run, b_name", { "BIGINT", "TEXT" },
  "SELECT s.run_id, s.name, s.result FROM b CROSS JOIN tide_flow_steps AS s "
  .. "WHERE s.run_id = b_run AND s.name = b_name")
local MARK_QUEUED = batch_stmt("b_run, b_name, b_job", { "BIGINT", "TEXT", "BIGINT" },
  "UPDATE tide_flow_steps AS s SET status = 'queued', job_id = b_job, queued_at = ? FROM b "
  .. "WHERE s.run_id = b_run AND s.name = b_name")

-- On PostgreSQL the jobs and the steps' rows in one statement: each row of
-- b draws its job's id first (a CTE read twice runs once), as the store's
-- insert_many does.
-- A row with b_take 1 is leased at once to worker ? (see release), by the
-- server's clock as every lease on PostgreSQL.
local PG_NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
local RELEASE_PG = batch_stmt("b_run, b_name, b_queue, b_args, b_priority, b_max, b_take, b_key",
  { "BIGINT", "TEXT", "TEXT", "TEXT", "INTEGER", "INTEGER", "INTEGER", "TEXT" },
  ", input AS (SELECT b.*, nextval('tide_jobs_id_seq') AS new_id FROM b WHERE b_run IS NOT NULL), "
  .. "ins AS (INSERT INTO tide_jobs (id, queue, target, method, args, status, priority, max_attempts, run_at, "
  .. "inserted_at, attempt, attempted_at, lease_owner, lease_expires, partition_key) SELECT new_id, b_queue, '"
  .. M.TARGET
  .. "', 'step', b_args, CASE WHEN b_take = 1 THEN 'executing' ELSE 'available' END, b_priority, b_max, "
  .. "CAST(? AS BIGINT), CAST(? AS BIGINT), b_take, CASE WHEN b_take = 1 THEN " .. PG_NOW .. " END, "
  .. "CASE WHEN b_take = 1 THEN CAST(? AS TEXT) END, CASE WHEN b_take = 1 THEN " .. PG_NOW
  .. " + CAST(? AS BIGINT) END, b_key FROM input ORDER BY new_id) "
  .. "UPDATE tide_flow_steps AS s SET status = 'queued', job_id = new_id, queued_at = ? FROM input "
  .. "WHERE s.run_id = b_run AND s.name = b_name RETURNING run_id, name, job_id")
--- The first jobs released for each queue, as many as F.take[queue]
--- allows (the free slots of the worker making the change), are leased to
--- it in the same statement instead of made available: it starts them after
--- the commit (post.rows), with no claim and no wake-up of other workers.
--- The rest are available to any worker.
local function taken(F, queue)
  local n = F.take and F.take[queue]
  if not n or n <= 0 then return false end
  F.take[queue] = n - 1
  return true
end

--- Queues a job for each step of `list` ({ run, name, deps = { names },
--- max_failures }, steps whose dependencies all completed): its args carry
--- the run's input and its dependencies' results, those of `known` ({ [run
--- id] = { [name] = result JSON } }, the steps completed by this change)
--- and the others read in one statement.  One insert for the jobs, one
--- update for the steps (one statement for both on PostgreSQL).
local function release(F, list, known)
  if #list == 0 then return end
  known = known or {}
  local want, asked = {}, {}
  for _, x in ipairs(list) do
    local id = x.run.id
    local k, a = known[id], asked[id]
    for _, d in ipairs(x.deps) do
      if not (k and k[d]) and not (a and a[d]) then
        if not a then a = {}; asked[id] = a end
        a[d] = true
        want[#want + 1] = { id, d }
      end
    end
  end
  for _, r in ipairs(#want > 0 and batch(F, READ_RESULTS, want) or want) do
    local k = known[r.run_id]
    if not k then k = {}; known[r.run_id] = k end
    k[r.name] = r.result
  end
  local jobs = {}
  for i, x in ipairs(list) do
    local run, k, parts = x.run, known[x.run.id] or {}, {}
    for j, d in ipairs(x.deps) do parts[j] = jname(d) .. ":" .. (k[d] or "null") end
    jobs[i] = { queue = run.queue, target = M.TARGET, method = "step", status = "available",
                args = '{"flow":' .. jname(run.flow) .. ',"run":' .. format("%d", run.id) .. ',"step":'
                  .. jname(x.name) .. ',"input":' .. run.input .. ',"results":{' .. concat(parts, ",") .. "}}",
                priority = run.priority, max_attempts = x.max_failures + M.LOST_ATTEMPTS,
                run_at = F.now, inserted_at = F.now, partition_key = run.partition_key }
  end
  local rows, take = {}, {}
  for i, j in ipairs(jobs) do take[i] = F.owner ~= nil and taken(F, j.queue) end
  local ids
  if F.s.dialect == "postgres" then          -- one round trip: the ids drawn first, the jobs, the steps
    for i, x in ipairs(list) do
      local j = jobs[i]
      rows[i] = { x.run.id, x.name, j.queue, j.args, j.priority, j.max_attempts, take[i] and 1 or 0,
                  j.partition_key }
    end
    local by = {}
    for _, r in ipairs(batch(F, RELEASE_PG, rows, F.now, F.now, F.owner, F.lease, F.now)) do
      by[r.run_id .. "\0" .. r.name] = r.job_id
    end
    ids = {}
    for i, x in ipairs(list) do ids[i] = by[x.run.id .. "\0" .. x.name] end
  else                                       -- the taken ones go in leased: one write each
    for i, j in ipairs(jobs) do
      if take[i] then j.lease_owner, j.lease_expires = F.owner, F.now + F.lease end
    end
    ids = F.s:insert_many(jobs)
    for i, x in ipairs(list) do rows[i] = { x.run.id, x.name, ids[i] } end
    batch(F, MARK_QUEUED, rows, F.now)
  end
  for i, j in ipairs(jobs) do
    if take[i] then
      j.id, j.attempt, j.status, j.lease_owner, j.lease_expires = ids[i], 1, nil, nil, nil
      F.post.rows[#F.post.rows + 1] = j
    else
      F.post.queues[j.queue] = true           -- (wakes this worker's claimer after the commit)
    end
  end
end

-- ===== steps that succeeded

local MARK_OK = batch_stmt("b_run, b_job, b_name, b_result", { "BIGINT", "BIGINT", "TEXT", "TEXT" },
  "UPDATE tide_flow_steps AS s SET status = 'ok', result = b_result, completed_at = ? FROM b "
  .. "WHERE s.run_id = b_run AND s.name = b_name AND s.job_id = b_job "
  .. "AND s.status IN ('queued', 'fanout') RETURNING run_id, name, dependents")
local DECREMENT_SQL = "UPDATE tide_flow_steps AS s SET waiting = s.waiting - b_n FROM b%s "
  .. "WHERE s.run_id = b_run AND s.name = b_name AND s.status = 'waiting'%s "
  .. "RETURNING run_id, name, waiting, deps, max_failures%s"
local DECREMENT = batch_stmt("b_run, b_name, b_n", { "BIGINT", "TEXT", "BIGINT" }, DECREMENT_SQL:format("", "", ""))
-- On PostgreSQL the dependents are locked in (run, name) order first, so
-- that two workers' changes wait for each other, never deadlock (the
-- header's lock order); and the server's clock is read after those waits,
-- rounded down (see steps_ok).
local DECREMENT_PG = batch_stmt("b_run, b_name, b_n", { "BIGINT", "TEXT", "BIGINT" },
  ", locked AS (SELECT s.run_id AS l_run, s.name AS l_name FROM b JOIN tide_flow_steps AS s "
  .. "ON s.run_id = b_run AND s.name = b_name WHERE s.status = 'waiting' ORDER BY s.run_id, s.name "
  .. "FOR UPDATE OF s) "
  .. DECREMENT_SQL:format(", locked", " AND l_run = s.run_id AND l_name = s.name",
                          ", " .. pg_clock.SERVER_MS .. " AS server_now"))

local function by_run_name(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end

--- Steps that succeeded: `list` of { run, name, job_id, result } (the
--- whole outcome batch at once).  Each becomes ok with its result when its
--- row is still queued (or fanning out) under that job; the `waiting` of
--- its dependents goes down by one; those that reach 0 are released.
--- Three statements for the batch, and those of release.
local function steps_ok(F, list)
  local rows, byname = {}, {}
  for _, x in ipairs(list) do
    if x.run.status == "running" then
      rows[#rows + 1] = { x.run.id, x.job_id, x.name, x.result }
      local b = byname[x.run.id]
      if not b then b = {}; byname[x.run.id] = b end
      b[x.name] = x.result
    end
  end
  if #rows == 0 then return end
  local known, counts, down = {}, {}, {}
  for _, r in ipairs(batch(F, MARK_OK, rows, F.now)) do
    local id = r.run_id
    steps_closed(F, F.runs[id], 1, 0)
    local k, c = known[id], counts[id]
    if not k then k = {}; known[id] = k; c = {}; counts[id] = c end
    k[r.name] = byname[id][r.name]
    for _, d in ipairs(names_of(r.dependents)) do
      local n = c[d]
      if not n then down[#down + 1] = { id, d } end
      c[d] = (n or 0) + 1
    end
  end
  if #down == 0 then return end
  sort(down, by_run_name)
  for _, x in ipairs(down) do x[3] = counts[x[1]][x[2]] end
  local ready = {}
  local decremented = batch(F, F.s.dialect == "postgres" and DECREMENT_PG or DECREMENT, down)
  -- On PostgreSQL that statement may have waited for another worker's
  -- change to commit (their completion of another dependency): the
  -- releases are stamped after it, never before the completions they
  -- follow.  Each process stamps its reading of the server's clock (never
  -- ahead of it, behind by up to a round trip: tide.jobs.store.pg_clock),
  -- so the server's own clock, read after the wait, is the one that orders
  -- them whatever the two readings' errors.
  F.now = max(F.now, floor(F.s:now()))
  for _, r in ipairs(decremented) do
    if r.server_now then F.now = max(F.now, tonumber(r.server_now)) end
  end
  for _, r in ipairs(decremented) do
    if r.waiting == 0 then
      ready[#ready + 1] = { run = F.runs[r.run_id], name = r.name, deps = names_of(r.deps),
                            max_failures = r.max_failures }
    end
  end
  release(F, ready, known)
end

M.names_of, M.remember, M.jname, M.batch, M.batch_stmt = names_of, remember, jname, batch, batch_stmt
M.steps_closed, M.release, M.steps_ok, M.taken = steps_closed, release, steps_ok, taken

return M
