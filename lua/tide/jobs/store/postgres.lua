--- tide.jobs.store.postgres — the job store on PostgreSQL, for workers on many machines.
--
-- The same methods as tide.jobs.store.sqlite (see the list there), over libpq in
-- non-blocking mode: a query sends, then the task waits for the socket on
-- the loop (no thread blocks).  Code outside tasks (a plain script before
-- tide.run) waits with poll(2) instead.  One query at a time per connection:
-- other tasks wait their turn.  Workers use connections of their own
-- (worker_store), and one more that LISTENs, so that an enqueue on any
-- machine wakes idle workers at once.
--
-- A lost connection fails the statement under way with a clear error and is
-- opened again by the next statement.  Times are client UTC milliseconds,
-- as with SQLite: keep the machines' clocks in sync (leases are 30 s by
-- default; skew well under that is harmless).
local core = require "tide.core"
local common = require "tide.jobs.store.common"
local job = require "tide.jobs.job"
local S = require "tide.engine.sched"
local spawn = require("tide.engine.task").spawn

local type, error, ipairs, pairs, tostring, concat = type, error, ipairs, pairs, tostring, table.concat
local co_running, setmetatable, format = coroutine.running, setmetatable, string.format

local M = {}

-- ===== connections

--- The URL with any password masked, to name the store in messages.
local function safe_name(url)
  return (url:gsub("^(%a+://[^:@/]*):[^@/]*@", "%1:***@"))
end


local Conn = {}
Conn.__index = Conn

local conns = setmetatable({}, { __mode = "v" })   -- id -> Conn, for the ready callback
local next_id = 0
local CONNECT_TIMEOUT = 10000

core.pg_on_ready(function(id)
  local c = conns[id]
  if not c or not c.pg then return end
  c.pg:unwatch()                          -- one-shot: a level-triggered socket would spin
  local w = c.waiter
  if w then
    c.waiter = false
    S.wake(w[1], w[2])
  elseif c.on_notify then
    c:notified()
  end
end)

local in_task = S.in_task

local function new_conn(info, name)
  next_id = next_id + 1
  local c = setmetatable({ info = info, name = name, id = next_id, pg = false, waiter = false,
                           holder = false, waiting = {}, on_notify = false }, Conn)
  conns[next_id] = c
  return c
end

--- Waits until the socket is readable (r) or writable (w); false on timeout.
local function wait_io(c, r, w, ms)
  if in_task() then
    local t, tok = S.wait_begin("postgres", 2)
    c.waiter = { t, tok }
    c.pg:watch(c.id, r, w, true)
    S.wait_end(t, tok, ms)
    local timed_out = c.waiter ~= false
    c.waiter = false
    if c.pg then c.pg:unwatch() end
    return not timed_out
  end
  return c.pg:wait(r, w, ms or -1)
end

local function drop(c)
  if c.pg then c.pg:close(); c.pg = false end
end

local function connect(c)
  local pg, err = core.pg_connect(c.info, c.name)
  if not pg then error(err, 0) end
  c.pg = pg
  while true do
    local st, e = pg:connect_poll()
    if st == "ok" then return end
    if not st then drop(c); error(e, 0) end
    if not wait_io(c, st == "read", st == "write", CONNECT_TIMEOUT) then
      drop(c)
      error(c.name .. ": connection timed out after " .. CONNECT_TIMEOUT .. " ms", 0)
    end
  end
end

--- The holder of a connection: the current task's attempt, or `c` itself
--- for code outside tasks (which never waits, so never interleaves).
local function holder_alive(h)
  return h.task == nil or S.attempt_of(h.task) == h.co
end

local function waiter_alive(e) return S.attempt_of(e.t) == e.co end

--- The first waiter whose attempt is still alive (dead ones are dropped).
local function first_waiter(c)
  local q = c.waiting
  while q[1] and not waiter_alive(q[1]) do table.remove(q, 1) end
  return q[1]
end

--- Takes the connection for the current task; others wait their turn, first
--- come first served (unlock hands the connection to the first waiter, so
--- a task that queries in a loop cannot starve the heartbeat).  A holder
--- whose attempt ended while it waited (cancelled, timed out) never gives
--- the connection back: its statement is abandoned, and the next statement
--- opens a fresh connection (see run).
local function lock(c)
  local co = co_running()
  local h = c.holder
  if h and h.co == co then return h end   -- nested: a transaction's statements
  local t = in_task() and S.current() or nil
  if (h and holder_alive(h)) or first_waiter(c) then
    if not t then
      error(c.name .. ": the connection is busy with another task's statement", 0)
    end
    local entry = { t = t, co = co, tok = false }
    c.waiting[#c.waiting + 1] = entry
    while true do
      local _, tok = S.wait_begin("postgres", 2)
      entry.tok = tok
      S.wait_end(t, tok, 100)               -- and look again: a dead holder hands over to nobody
      h = c.holder
      if h and h.co == co then break end    -- handed over
      if h and not holder_alive(h) then c.holder, h = false, false end
      if not h and first_waiter(c) == entry then break end
    end
    for i = 1, #c.waiting do
      if c.waiting[i] == entry then table.remove(c.waiting, i); break end
    end
  end
  c.holder = { task = t, co = co }
  return false
end

local function unlock(c, outer)
  if outer then c.holder = outer; return end
  local e = first_waiter(c)
  if e then
    c.holder = { task = e.t, co = e.co }
    S.wake(e.t, e.tok)
  else
    c.holder = false
  end
end

local function lost(c, err)
  drop(c)
  err = tostring(err)
  if err:sub(1, #c.name + 2) == c.name .. ": " then err = err:sub(#c.name + 3) end
  error(c.name .. ": connection lost: " .. err, 0)
end

--- Sends one statement and reads its results; returns the last.
local function run(c, sql, ...)
  -- Abandoned mid-statement, or broken; or closed by the server while idle
  -- (a restart): reading what waits on the socket tells, before we send.
  -- (Twice: a server that stopped sent an error, then closed; one read may
  -- return the error alone, the second finds the end of the stream.)
  local pg = c.pg
  if pg and (c.inflight or not pg:consume() or not pg:consume() or not pg:ok() or pg:result()) then
    drop(c)
  end
  if not c.pg then connect(c) end
  pg = c.pg
  local ok, err = pg:send(sql, ...)
  if not ok then lost(c, err) end
  c.inflight = true
  while true do
    local more, ferr = pg:flush()
    if not more then lost(c, ferr) end
    if more == 0 then break end
    wait_io(c, true, true)
  end
  while pg:busy() do
    wait_io(c, true, false)
    if not c.pg then lost(c, "closed while waiting") end
    local cok, cerr = pg:consume()
    if not cok then lost(c, cerr) end
  end
  local last, failure
  while true do
    local r = pg:result()
    if not r then break end
    if not r.ok and not failure then failure = r end
    last = r
  end
  c.inflight = false
  if failure then
    error(format("%s: %s (SQLSTATE %s)", c.name, failure.message or "error", failure.sqlstate or "?????"), 0)
  end
  return last
end

function Conn:query(sql, ...)
  local outer = lock(self)
  local ok, res = pcall(run, self, sql, ...)
  unlock(self, outer)
  if not ok then error(res, 0) end
  return res
end

function Conn:close()
  drop(self)
  conns[self.id] = nil
end

--- A bare connection (for tools and specs): c:query(sql, ...) -> result, c:close().
function M.connect(url)
  return new_conn(url, safe_name(url))
end

-- ===== LISTEN

--- Called on the loop when the listening socket is readable.
function Conn:notified()
  local ok = self.pg:consume()
  if not ok then return self:relisten() end
  local list = self.pg:notifies()
  if list then
    for _, n in ipairs(list) do self.on_notify(n[2]) end
  end
  self.pg:watch(self.id, true, false, false)   -- unref'd: listening keeps no loop alive
end

function Conn:listen(channel)
  self:query("LISTEN " .. channel)
  self.channel = channel
  self.pg:watch(self.id, true, false, false)
end

--- The listening connection broke: open it again with backoff, in a task.
function Conn:relisten()
  drop(self)
  if self.relistening or S.shutting_down() or not self.on_notify then return end
  self.relistening = true
  spawn{ name = "postgres listener reconnect", run = function()
    local delay = 50
    while self.on_notify and not S.shutting_down() do
      if pcall(self.listen, self, self.channel) then
        self.relistening = false
        self.on_notify(nil)                   -- notifications may have been missed: wake all
        return
      end
      drop(self)
      S.sleep(delay)
      delay = math.min(delay * 2, 5000)
    end
    self.relistening = false
  end }
end

-- ===== the store

local Store = {}
Store.__index = Store

local WAITING = "status IN " .. common.status_list(job.WAITING)
local TERMINAL_SQL = common.status_list(job.FINISHED)
-- Leases are timed by the server's clock: one clock for every machine, read
-- when the statement runs (not when it was queued behind a connect).
local NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
local GUARD = "WHERE id = $1 AND status = 'executing' AND lease_owner = $2 AND attempt = $3"
local ADD_ERROR = "coalesce(errors, '[]'::jsonb) || jsonb_build_array($5::jsonb)"

local MIGRATIONS = {
  {
    [[CREATE TABLE tide_jobs (
      id              bigserial PRIMARY KEY,
      queue           text    NOT NULL,
      target          text    NOT NULL,
      method          text    NOT NULL,
      args            text,
      args_enc        bytea,
      status          text    NOT NULL,
      priority        integer NOT NULL DEFAULT 0,
      attempt         integer NOT NULL DEFAULT 0,
      max_attempts    integer NOT NULL,
      run_at          bigint  NOT NULL,
      attempted_at    bigint,
      completed_at    bigint,
      errors          jsonb,
      idempotence_key text,
      lease_owner     text,
      lease_expires   bigint,
      inserted_at     bigint  NOT NULL)]],
    [[CREATE UNIQUE INDEX tide_jobs_key ON tide_jobs (idempotence_key) WHERE idempotence_key IS NOT NULL]],
    [[CREATE INDEX tide_jobs_due ON tide_jobs (queue, priority, run_at, id) WHERE ]] .. WAITING,
    [[CREATE INDEX tide_jobs_leased ON tide_jobs (lease_expires) WHERE status = 'executing']],
    [[CREATE OR REPLACE FUNCTION tide_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM pg_notify('tide_jobs', NEW.queue); RETURN NULL; END $$]],
    [[CREATE TRIGGER tide_jobs_notify AFTER INSERT OR UPDATE OF status ON tide_jobs
      FOR EACH ROW WHEN (NEW.status = 'available') EXECUTE FUNCTION tide_jobs_notify()]],
  },
}
M.VERSION = #MIGRATIONS

local SQL = {
  insert = [[INSERT INTO tide_jobs (queue, target, method, args, args_enc, status, priority,
      max_attempts, run_at, idempotence_key, inserted_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (idempotence_key) WHERE idempotence_key IS NOT NULL DO NOTHING RETURNING id]],
  by_key = "SELECT id FROM tide_jobs WHERE idempotence_key = $1",
  claim = [[WITH due AS (SELECT id FROM tide_jobs WHERE queue = $3 AND ]] .. WAITING .. [[
      AND run_at <= ]] .. NOW .. [[ ORDER BY priority, run_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)
    UPDATE tide_jobs j SET status = 'executing', attempt = j.attempt + 1, attempted_at = ]] .. NOW .. [[,
      lease_owner = $2, lease_expires = ]] .. NOW .. [[ + $1
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.queue, j.target, j.method, j.args, j.args_enc, j.priority, j.attempt,
      j.max_attempts, j.run_at, j.inserted_at, j.idempotence_key]],
  -- Row locks are taken in id order (the CTEs), by every statement that may
  -- meet another's rows (outcomes, heartbeats of the same worker on its
  -- second connection): so they wait for each other, never deadlock.
  lock_ids = "SELECT id FROM tide_jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
  completed_many = [[WITH locked AS (SELECT id FROM tide_jobs WHERE id = ANY($3::bigint[]) ORDER BY id FOR UPDATE)
    UPDATE tide_jobs j SET status = 'completed', completed_at = $1,
      lease_owner = NULL, lease_expires = NULL
    FROM unnest($3::bigint[], $4::integer[]) AS d(id, attempt), locked
    WHERE j.id = d.id AND j.id = locked.id AND j.attempt = d.attempt AND j.status = 'executing'
      AND j.lease_owner = $2]],
  retry = "UPDATE tide_jobs SET status = 'retryable', run_at = $4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  discard = "UPDATE tide_jobs SET status = 'discarded', completed_at = $4, errors = " .. ADD_ERROR
    .. ", lease_owner = NULL, lease_expires = NULL " .. GUARD,
  release = "UPDATE tide_jobs SET status = 'available', attempt = attempt - 1, run_at = $4, "
    .. "errors = CASE WHEN $5::jsonb IS NULL THEN errors ELSE " .. ADD_ERROR .. " END, "
    .. "lease_owner = NULL, lease_expires = NULL " .. GUARD,
  heartbeat = "WITH locked AS (SELECT id FROM tide_jobs WHERE id = ANY($3::bigint[]) AND lease_owner = $1 "
    .. "AND status = 'executing' ORDER BY id FOR UPDATE) "
    .. "UPDATE tide_jobs j SET lease_expires = " .. NOW .. " + $2 FROM locked "
    .. "WHERE j.id = locked.id AND j.lease_owner = $1 AND j.status = 'executing' RETURNING j.id",
  rescue = [[UPDATE tide_jobs SET
      status = CASE WHEN attempt >= max_attempts THEN 'discarded' ELSE 'available' END,
      completed_at = CASE WHEN attempt >= max_attempts THEN ]] .. NOW .. [[ END,
      run_at = ]] .. NOW .. [[, lease_owner = NULL, lease_expires = NULL,
      errors = coalesce(errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object('attempt', attempt,
        'at', ]] .. NOW .. [[, 'error', 'lease expired: worker ' || lease_owner || ' stopped heartbeating'))
    WHERE id IN (SELECT id FROM tide_jobs WHERE status = 'executing' AND lease_expires < ]] .. NOW .. [[
      FOR UPDATE SKIP LOCKED)]],   -- rows a worker is writing now are its own (and no deadlock)
  get = "SELECT * FROM tide_jobs WHERE id = $1",
  cancel = "UPDATE tide_jobs SET status = 'cancelled', completed_at = $2, lease_owner = NULL, "
    .. "lease_expires = NULL WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  expire = "UPDATE tide_jobs SET status = 'expired', completed_at = $2, lease_owner = NULL, "
    .. "lease_expires = NULL WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  fail = "UPDATE tide_jobs SET status = 'discarded', completed_at = $2, lease_owner = NULL, "
    .. "lease_expires = NULL, errors = coalesce(errors, '[]'::jsonb) || jsonb_build_array($3::jsonb) "
    .. "WHERE id = $1 AND status NOT IN " .. TERMINAL_SQL,
  retry_now = "UPDATE tide_jobs SET status = 'available', run_at = $2, completed_at = NULL, "
    .. "max_attempts = greatest(max_attempts, attempt + 1) "
    .. "WHERE id = $1 AND status NOT IN ('executing', 'available')",
  stats = "SELECT queue, status, count(*) AS n FROM tide_jobs GROUP BY queue, status",
  backlog = "SELECT queue, status, count(*) AS n FROM tide_jobs WHERE " .. WAITING .. " GROUP BY queue, status "
    .. "UNION ALL SELECT queue, 'executing', count(*) FROM tide_jobs WHERE status = 'executing' GROUP BY queue",
  recent = "SELECT queue, status, count(*) AS n, count(*) FILTER (WHERE completed_at >= $1) AS recent "
    .. "FROM (SELECT queue, status, completed_at FROM tide_jobs ORDER BY id DESC LIMIT $2) r GROUP BY queue, status",
  leases = "SELECT lease_owner AS owner, queue, count(*) AS n, max(lease_expires) AS lease_expires, "
    .. "max(attempted_at) AS attempted_at FROM tide_jobs WHERE status = 'executing' GROUP BY lease_owner, queue",
  pending = "SELECT count(*) AS n FROM tide_jobs WHERE queue = ANY($1::text[]) AND ((" .. WAITING
    .. " AND run_at <= $2) OR status = 'executing')",
}

local function migrate(s)
  local c = s.conn
  c:query("BEGIN")
  local ok, err = pcall(function()
    c:query("SELECT pg_advisory_xact_lock(7370601)")    -- one migrator at a time
    c:query("CREATE TABLE IF NOT EXISTS tide_schema (version integer NOT NULL)")
    local rows = c:query("SELECT version FROM tide_schema").rows
    local version = rows[1] and rows[1].version or 0
    common.check_version(s.name, version, #MIGRATIONS, version == 0 and
      #c:query("SELECT 1 FROM pg_tables WHERE tablename = 'tide_jobs' AND schemaname = current_schema()").rows > 0)
    for v = version + 1, #MIGRATIONS do
      for _, stmt in ipairs(MIGRATIONS[v]) do c:query(stmt) end
    end
    if not rows[1] then c:query("INSERT INTO tide_schema (version) VALUES ($1)", #MIGRATIONS)
    else c:query("UPDATE tide_schema SET version = $1", #MIGRATIONS) end
  end)
  if not ok then
    pcall(c.query, c, "ROLLBACK")
    error(err, 0)
  end
  c:query("COMMIT")
end

local function new_store(url, name)
  return setmetatable({ url = url, name = name, conn = new_conn(url, name),
                        durability = "PostgreSQL server settings (synchronous_commit)" }, Store)
end

--- Opens the store at `url` (postgres://...), creating or migrating the tables.
function M.open(url, name, opts)
  local _ = opts
  local s = new_store(url, safe_name(name))
  migrate(s)
  local sc = s.conn:query("SHOW synchronous_commit").rows[1].synchronous_commit
  s.durability = "PostgreSQL, synchronous_commit=" .. sc
  return s
end

--- A store on a connection of its own, for a worker.
function Store:worker_store()
  local s = new_store(self.url, self.name)
  s.durability = self.durability
  return s
end

--- Calls fn(queue) when a job becomes available (on any machine); fn(nil)
--- after the listening connection was lost (wake everything).
function Store:listen(fn)
  local c = new_conn(self.url, self.name)
  c.on_notify = fn
  self.listener = c
  local ok, err = pcall(c.listen, c, "tide_jobs")
  if not ok then c:relisten(); return nil, err end
  return true
end

function Store:unlisten()
  local c = self.listener
  if c then c.on_notify = false; c:close(); self.listener = nil end
end

function Store:close()
  self:unlisten()
  self.conn:close()
end

--- Whether a statement can run now without waiting (outside tasks).
function Store:idle()
  local h = self.conn.holder
  return not h or not holder_alive(h)
end

--- The task inside a transaction ended without finishing it: closing the
--- connection makes the server roll it back.
function Store:abandon()
  drop(self.conn)
  self.conn.holder, self.conn.inflight = false, false
end

-- ===== transactions

function Store:begin() self.conn:query("BEGIN") end
function Store:commit() self.conn:query("COMMIT") end
function Store:rollback() self.conn:query("ROLLBACK") end
function Store:savepoint(n) self.conn:query("SAVEPOINT tide_" .. n) end
function Store:release(n) self.conn:query("RELEASE SAVEPOINT tide_" .. n) end
function Store:rollback_to(n)
  self.conn:query("ROLLBACK TO SAVEPOINT tide_" .. n)
  self.conn:query("RELEASE SAVEPOINT tide_" .. n)
end

-- ===== the caller's own SQL: ? placeholders become $1..$n (outside quotes
-- and comments), so the same statements run on SQLite and PostgreSQL.

local placeholders = setmetatable({}, { __mode = "k" })

local function numbered(sql)
  if not sql:find("?", 1, true) then return sql end
  local out, n, i, len = {}, 0, 1, #sql
  while i <= len do
    local ch = sql:sub(i, i)
    if ch == "'" or ch == '"' then
      local j = i + 1
      while j <= len do
        if sql:sub(j, j) == ch then
          if sql:sub(j + 1, j + 1) == ch then j = j + 1 else break end
        end
        j = j + 1
      end
      out[#out + 1] = sql:sub(i, j)
      i = j + 1
    elseif ch == "-" and sql:sub(i + 1, i + 1) == "-" then
      local j = sql:find("\n", i, true) or len
      out[#out + 1] = sql:sub(i, j)
      i = j + 1
    elseif ch == "?" then
      n = n + 1
      out[#out + 1] = "$" .. n
      i = i + 1
    else
      out[#out + 1] = ch
      i = i + 1
    end
  end
  return concat(out)
end
M.numbered = numbered

local cache = {}
local function user_sql(sql)
  local s = cache[sql]
  if not s then s = numbered(sql); cache[sql] = s end
  return s
end

function Store:exec(sql, ...) return self.conn:query(user_sql(sql), ...).changes end
function Store:query(sql, ...) return self.conn:query(user_sql(sql), ...).rows or {} end

-- ===== jobs

local function hex(s)
  if s == nil then return nil end
  return "\\x" .. s:gsub(".", function(ch) return format("%02x", ch:byte()) end)
end

function Store:insert(j)
  local rows = self.conn:query(SQL.insert, j.queue, j.target, j.method, j.args, hex(j.args_enc), j.status,
    j.priority, j.max_attempts, j.run_at, j.idempotence_key, j.inserted_at).rows
  if rows[1] then return rows[1].id, true end
  return self.conn:query(SQL.by_key, j.idempotence_key).rows[1].id, false
end

function Store:claim(queue, n, owner, now, lease_until)
  local rows = self.conn:query(SQL.claim, lease_until - now, owner, queue, n).rows
  return common.start_order(rows)
end

local function by_id(a, b) return a.id < b.id end

function Store:record(entries, owner, now)
  local c = self.conn
  local ids, attempts, others, all = {}, {}, {}, {}
  for i, e in ipairs(entries) do
    all[i] = format("%d", e.id)
    if e.kind == "completed" then
      ids[#ids + 1], attempts[#attempts + 1] = format("%d", e.id), format("%d", e.attempt)
    else
      others[#others + 1] = e
    end
  end
  local function completed()
    if #ids > 0 then
      c:query(SQL.completed_many, now, owner, "{" .. concat(ids, ",") .. "}", "{" .. concat(attempts, ",") .. "}")
    end
  end
  if #others == 0 then return completed() end -- one statement: atomic by itself
  table.sort(others, by_id)
  local outer = lock(c)                       -- the transaction's statements stay together
  local ok, err = pcall(function()
    c:query("BEGIN")
    c:query(SQL.lock_ids, "{" .. concat(all, ",") .. "}")   -- all its rows, in id order, first
    completed()
    for _, e in ipairs(others) do
      local at = e.kind == "discard" and now or e.run_at or now
      c:query(SQL[e.kind], e.id, owner, e.attempt, at, e.error)
    end
    c:query("COMMIT")
  end)
  if not ok then pcall(c.query, c, "ROLLBACK") end
  unlock(c, outer)
  if not ok then error(err, 0) end
end

function Store:heartbeat(owner, lease_until, ids)
  local set, list = {}, {}
  for i, id in ipairs(ids) do list[i] = format("%d", id) end
  local lease = lease_until - core.wallclock()
  for _, r in ipairs(self.conn:query(SQL.heartbeat, owner, lease, "{" .. concat(list, ",") .. "}").rows) do
    set[r.id] = true
  end
  return set
end

function Store:rescue() return self.conn:query(SQL.rescue).changes end

function Store:get(id) return self.conn:query(SQL.get, id).rows[1] end

function Store:list(f)
  local where, params = {}, {}
  if f.status then params[#params + 1] = f.status; where[#where + 1] = "status = $" .. #params end
  if f.queue then params[#params + 1] = f.queue; where[#where + 1] = "queue = $" .. #params end
  if f.target then params[#params + 1] = f.target; where[#where + 1] = "target = $" .. #params end
  if f.before then params[#params + 1] = f.before; where[#where + 1] = "id < $" .. #params end
  local sql = "SELECT * FROM tide_jobs"
    .. (#where > 0 and " WHERE " .. concat(where, " AND ") or "")
    .. " ORDER BY id DESC LIMIT " .. format("%d", f.limit)
  return self.conn:query(sql, unpack(params)).rows
end

function Store:change(op, id, now, err)
  if op == "fail" then return self.conn:query(SQL.fail, id, now, err).changes > 0 end
  return self.conn:query(SQL[op], id, now).changes > 0
end

function Store:stats() return common.group_stats(self.conn:query(SQL.stats).rows) end
function Store:backlog() return common.group_stats(self.conn:query(SQL.backlog).rows) end
function Store:recent(since, limit) return self.conn:query(SQL.recent, since, limit).rows end
function Store:leases() return self.conn:query(SQL.leases).rows end

function Store:prune(before, statuses)
  return self.conn:query("DELETE FROM tide_jobs WHERE status IN " .. common.status_list(statuses)
    .. " AND completed_at <= $1", before).changes
end

local function text_array(list)
  local out = {}
  for i, s in ipairs(list) do out[i] = '"' .. s:gsub('[\\"]', "\\%0") .. '"' end
  return "{" .. concat(out, ",") .. "}"
end

function Store:pending(queues, now)
  return self.conn:query(SQL.pending, text_array(queues), now).rows[1].n
end

return M
