--- tide.jobs.store.pg_conn — PostgreSQL connections on tide's loop: one statement at a time, and LISTEN.
--
-- A connection speaks libpq in non-blocking mode: a statement is sent, then
-- the task waits for the socket on the loop (no thread blocks).  Code
-- outside tasks (a plain script before tide.run) waits with poll(2) instead.
--
-- One statement at a time: a store's connections are handed out by its
-- pool (tide.jobs.store.pool), one holder each; a second statement while
-- one is under way is a bug of the caller and raises.  A holder whose
-- attempt ended mid-statement leaves the connection to the pool's reset,
-- which closes it (the server rolls back what it had open).  Its COMMIT,
-- if already sent, cannot be taken back: the server decides, and the
-- transaction is whole or absent; the error sink is told (a warning).
--
-- Losses: a statement on a connection that broke fails with an error that
-- names the store ("connection lost: ...").  An idle connection that the
-- server closed (a restart) is noticed before the next statement is sent,
-- and that statement connects again, unless the connection was inside a
-- transaction: then every statement until the pool takes it back raises
-- "connection lost during a transaction", never runs outside it.
local core = require "tide.core"
local S = require "tide.engine.sched"
local log = require "tide.engine.log"
local common = require "tide.jobs.store.common"
local spawn = require("tide.engine.task").spawn

local error, ipairs, tostring, format = error, ipairs, tostring, string.format
local setmetatable, pcall, type, select, find = setmetatable, pcall, type, select, string.find

local M = {}

local Conn = {}
Conn.__index = Conn
M.Conn = Conn

local conns = setmetatable({}, { __mode = "v" })   -- id -> Conn, for the ready callback
local next_id = 0
M.CONNECT_TIMEOUT = 10000

-- A statement's task waits on the connection's watch; once woken it runs
-- before the loop polls again (the run queue goes first), reads what came,
-- and the socket is quiet: the watch stays armed for the next statement
-- (see conn:watch in src/lua_pg.c: no epoll_ctl per statement).  A
-- callback that finds nobody waiting stops it: the socket is level-
-- triggered, and would be reported again and again.
core.pg_on_ready(function(id)
  local c = conns[id]
  if not c or not c.pg then return end
  local w = c.waiter
  if w then
    c.waiter = false
    S.wake(w[1], w[2])
    return
  end
  c.pg:unwatch()
  if c.on_notify then c:notified() end
end)

local in_task, isyieldable = S.in_task, coroutine.isyieldable

--- The URL with any password masked, to name the store in messages.
function M.safe_name(url)
  return (url:gsub("^(%a+://[^:@/]*):[^@/]*@", "%1:***@"))
end

--- A connection (not yet connected: the first statement connects).
--- `setup`: a statement (no parameters) that runs first on every
--- connection it opens, in a round trip of its own before the first statement.
--- `prepare` false: Conn:prepared sends its statements unprepared.
function M.new(info, name, setup, prepare)
  next_id = next_id + 1
  local c = setmetatable({ info = info, name = name, id = next_id, pg = false, waiter = false,
                           unprepared = prepare == false,
                           running = false, tx = false, begin_next = false, ending = false, on_notify = false,
                           aborted = false,
                           setup = setup or false, setup_next = false, parsed = {},
                           deallocate_next = false, replanned = false }, Conn)
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
    if not c.pg then error(c.name .. ": connection closed while a statement waited on it", 0) end
    if timed_out then c.pg:unwatch()
    else c.pg:watch(c.id, r, w, false) end   -- armed, but keeps no loop alive while idle
    return not timed_out
  end
  return c.pg:wait(r, w, ms or -1)
end

--- Closes the socket; a task waiting on it is woken (and finds it gone),
--- never left waiting for a socket nobody watches.
local function drop(c)
  if c.pg then c.pg:close(); c.pg = false end
  local w = c.waiter
  if w then c.waiter = false; S.wake(w[1], w[2]) end
end
M.drop = drop

--- Forgets whatever the connection was doing (its holder is gone): closed,
--- so the server rolls back; the next statement connects again.
function Conn:reset()
  if self.ending == "COMMIT" and self.pg then
    -- Sent, or about to be: closing the socket cannot take it back, and
    -- the server commits or rolls back the transaction whole, unheard.
    log.warn(self.name, "a transaction's task ended (cancelled or timed out) while its COMMIT was in flight: "
      .. "the server may have committed it")
  end
  drop(self)
  self.running, self.tx, self.waiter, self.begin_next, self.aborted = false, false, false, false, false
end

-- ===== transactions: BEGIN goes with the first statement
--
-- Conn:begin() sends nothing: the transaction's first statement goes out
-- after a BEGIN in one pipeline (one round trip where two were taken), and
-- a transaction that ran no statement ends without any.  The server runs
-- the BEGIN first, so whatever that statement does is inside the
-- transaction; if it fails, the transaction is open and aborted, and the
-- caller's ROLLBACK ends it, as after any failed statement.

--- Opens a transaction (c.tx); its BEGIN waits for the first statement.
function Conn:begin()
  self.tx, self.begin_next, self.aborted = true, true, false
end

--- The first error of a statement that aborted the transaction (see
--- tide.jobs.store.common), or false.  ROLLBACK TO a savepoint clears it:
--- call this first.
--- (Only while the transaction is open: tide's own transactions end with
--- pcall(c.finish, c, "ROLLBACK") and c.tx = false, and a ROLLBACK that was
--- lost with the connection left `aborted` set, which refused every later
--- statement on that connection for ever.)
function Conn:failed() return self.tx and self.aborted or false end
function Conn:recovered() self.aborted = false end

--- Ends the transaction with `sql` (COMMIT or ROLLBACK): a round trip,
--- unless no statement ran in it.  Raises when the statement fails (the
--- transaction is then still open: roll it back).
function Conn:finish(sql)
  if sql == "COMMIT" and self.aborted then error(common.rolled_back(self.name, self.aborted), 0) end
  if self.begin_next then
    self.begin_next, self.tx, self.aborted = false, false, false
    return
  end
  self.ending = sql
  local ok, res = pcall(self.query, self, sql)
  self.ending = false
  if not ok then
    -- A ROLLBACK whose connection is gone happened all the same (the server
    -- rolls back what a closed session had open): the transaction is over,
    -- and the next statement connects again.  Left open, every statement
    -- raised "connection lost during a transaction" until the pool reset
    -- the connection, which a caller ending its own transaction with
    -- pcall(session.rollback, session) never asks for (queue_flows.sweep).
    if sql == "ROLLBACK" and not self.pg then self.tx, self.begin_next, self.aborted = false, false, false end
    error(res, 0)
  end
  -- The server ends an aborted transaction's COMMIT with ROLLBACK, and no
  -- error: never taken for a commit, whatever aborted it.
  if sql == "COMMIT" and res.command == "ROLLBACK" then
    error(common.rolled_back(self.name, "the server rolled it back at COMMIT"), 0)
  end
  self.tx, self.aborted = false, false
end

local function connect(c)
  local pg, err = core.pg_connect(c.info, c.name)
  if not pg then error(err, 0) end
  c.pg = pg
  c.parsed, c.deallocate_next = {}, false     -- (a new session: nothing prepared on it yet)
  while true do
    local st, e = pg:connect_poll()
    if st == "ok" then c.setup_next = c.setup and true; return end
    if not st then drop(c); error(e, 0) end
    -- Each step gets CONNECT_TIMEOUT ms of real time: the loop's timer
    -- counts tide.testing's virtual time when that clock is on, which a
    -- test may move on by minutes while the server answers in a few ms.
    local deadline = core.now(true) + M.CONNECT_TIMEOUT
    repeat
      local left = deadline - core.now(true)
      if left <= 0 then
        drop(c)
        error(c.name .. ": connection timed out after " .. M.CONNECT_TIMEOUT .. " ms", 0)
      end
    until wait_io(c, st == "read", st == "write", left)
  end
end

local function lost(c, err)
  drop(c)
  err = tostring(err)
  if err:sub(1, #c.name + 2) == c.name .. ": " then err = err:sub(#c.name + 3) end
  -- libpq may pile its messages up ("FATAL: terminating connection ...\n
  -- server closed the connection unexpectedly\n\tThis probably means ..."):
  -- one headline, its indented details after
  err = err:gsub("\n([^\t])", "; %1")
  error(c.name .. ": connection lost: " .. err, 0)
end

-- What the server says when the session's prepared statements are not
-- what c.parsed says: 26000, a statement gone (DEALLOCATE ALL or DISCARD
-- ALL run on the connection by the application, or a pooler that gave us
-- another server session); 42P05, a name taken by a statement tide did not
-- prepare on this session (the same pooler); 0A000, "cached plan must not
-- change result type" (a column the statement returns changed type, as a
-- newer release's migration may do under running workers).  Each of them
-- is raised before the statement runs, and would be raised again at every
-- run, for ever, on that connection.
local SESSION_CHANGED = { ["26000"] = true, ["42P05"] = true, ["0A000"] = true }

--- After such an error: every statement is prepared again, after a
--- DEALLOCATE ALL (which never fails, whatever is left on the session) in
--- the same pipeline; c.replanned tells query() that it may run the
--- statement once more.
local function forget_prepared(c)
  c.parsed, c.deallocate_next, c.replanned = {}, true, true
end

--- Sends one statement (after BEGIN, in one pipeline, when a transaction
--- waits to begin: see Conn:begin) and reads its results; returns the last.
--- `name`: the statement is prepared on the connection under that name
--- (the Parse goes in the same pipeline the first time: see Conn:prepared).
--- Makes sure c has a live connection before a statement is sent.
local function live(c)
  -- Broken, or closed by the server while idle (a restart): reading what
  -- waits on the socket tells, before we send.  (Twice: a server that
  -- stopped sent an error, then closed; one read may return the error
  -- alone, the second finds the end of the stream.)  A peek first: when
  -- nothing waits, as before almost every statement, one syscall instead of
  -- two reads that fail with EAGAIN.
  local pg = c.pg
  if pg and (not pg:ok() or pg:input() and (not pg:consume() or not pg:consume() or not pg:ok() or pg:result())) then
    drop(c)
  end
  if not c.pg then
    if c.tx and not c.begin_next then
      error(c.name .. ": connection lost during a transaction (the server rolled it back)", 0)
    end
    connect(c)                                -- (a transaction not begun yet begins on the new one)
  end
  return c.pg
end

--- Sends what libpq holds for the server, waiting for the socket as needed.
local function flush_all(c, pg)
  while true do
    local more, ferr = pg:flush()
    if not more then lost(c, ferr) end
    if more == 0 then return end
    wait_io(c, true, true)
  end
end

--- The next result of the statement under way (waiting for it), or nil.
local function next_result(c, pg)
  while pg:busy() do
    wait_io(c, true, false)
    if not c.pg then lost(c, "closed while waiting") end
    local cok, cerr = pg:consume()
    if not cok then lost(c, cerr) end
  end
  local r, rerr = pg:result()
  if r == nil and rerr then lost(c, rerr) end
  return r
end

local function raise(c, failure)
  error(format("%s: %s (SQLSTATE %s)", c.name, failure.message or "error", failure.sqlstate or "?????"), 0)
end

--- A COPY that a statement of the caller's own started (only Conn:copy
--- sends COPY data): libpq hands its result out again at every call until
--- the COPY ends, so it is ended here.  FROM STDIN: the server is told the
--- data failed, and its error follows as the statement's; TO STDOUT: the
--- data is not read here, so the connection is closed (the server rolls
--- back).  Returns the result to take for the statement.
local function copy_refused(c, pg, r)
  if r.copy_out then
    drop(c)
    error(c.name .. ": COPY ... TO STDOUT is not supported (its connection was closed)", 0)
  end
  local ok, err = pg:copy_end("tide: COPY ... FROM STDIN is sent by enqueue_many only")
  if not ok then lost(c, err) end
  flush_all(c, pg)
  return { ok = false, sqlstate = "0A000", message = "COPY ... FROM STDIN is not supported" }
end

local function run(c, name, sql, ...)
  local pg = live(c)
  -- A new connection's setup (a SET) runs alone, in a round trip of its
  -- own: in one pipeline with what follows it joined that statement's
  -- transaction (a BEGIN's, or the pipeline's implicit one), whose
  -- ROLLBACK or failure undid it for the connection's whole life.
  if c.setup_next then
    local begin = c.begin_next
    c.setup_next, c.begin_next = false, false
    local ok, err = pcall(run, c, nil, c.setup)
    c.begin_next = begin
    if not ok then c.setup_next = c.pg and true; error(err, 0) end
    pg = c.pg
  end
  local ok, err
  local parse = name and not c.parsed[name]
  local dealloc = parse and c.deallocate_next
  local parse_at, dealloc_at = false, false   -- (which results are the Parse's, the DEALLOCATE's)
  if c.begin_next or parse then               -- one pipeline: [BEGIN;] [DEALLOCATE ALL;] [Parse;] the statement
    ok, err = pg:pipeline()
    local before = 0
    if ok and c.begin_next then ok, err = pg:send("BEGIN"); before = before + 1 end
    c.begin_next = false
    if ok and dealloc then ok, err = pg:send("DEALLOCATE ALL"); before = before + 1; dealloc_at = before end
    if ok and parse then ok, err = pg:prepare(name, sql); parse_at = before + 1 end
    if ok then
      if name then ok, err = pg:send_prepared(name, ...) else ok, err = pg:send(sql, ...) end
    end
    if ok then ok, err = pg:sync() end
  elseif name then
    ok, err = pg:send_prepared(name, ...)
  else
    ok, err = pg:send(sql, ...)
  end
  if not ok then lost(c, err) end
  flush_all(c, pg)
  local last, failure, k = nil, nil, 0
  while true do
    local r = next_result(c, pg)            -- (false: a statement of a pipeline ended; more come)
    if r == nil then break end
    if r and (r.copy_in or r.copy_out) then r = copy_refused(c, pg, r) end
    if r then
      k = k + 1
      if k == parse_at and r.ok then c.parsed[name] = true end
      if k == dealloc_at and r.ok then c.deallocate_next = false end
      if not r.ok and not failure then failure = r end
      last = r
    end
  end
  if failure then
    if name and SESSION_CHANGED[failure.sqlstate] then forget_prepared(c) end
    raise(c, failure)
  end
  return last
end

--- Runs `sql`, a COPY ... FROM STDIN, with the data produce(put) gives
--- (it calls put(text) for each piece, in order): each piece is sent as it
--- comes, so the server parses and inserts the first rows while the
--- caller encodes the next.  Not in a pipeline (libpq has no COPY there):
--- a BEGIN or setup still waiting goes first, in a round trip of its own.
--- If produce raises, the COPY fails (nothing of it stays) and the error
--- is raised again once the server has said so.
local function run_copy(c, _, sql, produce)
  live(c)                                     -- (a new connection's setup goes first)
  if c.setup_next or c.begin_next then run(c, nil, "SELECT 1") end
  local pg = c.pg
  local ok, err = pg:send(sql)
  if not ok then lost(c, err) end
  flush_all(c, pg)
  local r = next_result(c, pg)
  if not (r and r.copy_in) then               -- the COPY itself failed (or was not one)
    local failure = r and not r.ok and r
    while r do r = next_result(c, pg) end
    if failure then raise(c, failure) end
    error(c.name .. ": not a COPY ... FROM STDIN statement", 0)
  end
  local produced, perr = pcall(produce, function(text)
    local sent, serr = pg:put_copy(text)
    if not sent then lost(c, serr) end
    if not pg:flush() then lost(c, "could not send") end  -- (what the socket takes now; the rest later)
  end)
  if not c.pg then error(perr, 0) end          -- (the connection was lost while sending)
  ok, err = pg:copy_end(not produced and "tide: the data of the COPY failed" or nil)
  if not ok then lost(c, err) end
  flush_all(c, pg)
  local last, failure = nil, nil
  while true do
    r = next_result(c, pg)
    if r == nil then break end
    if not r.ok and not failure then failure = r end
    last = r
  end
  if not produced then error(perr, 0) end
  if failure then raise(c, failure) end
  return last
end

local COPY = {}                               -- (query's `name` for a COPY: run_copy)

-- What the binding (src/lua_pg.c) refuses, refused here before anything is
-- sent: there it raised half-way through a pipeline (the first statement
-- of a transaction goes with its BEGIN), which left pipeline mode on with
-- a BEGIN queued and no Sync after it, and the connection's next
-- statement waited for ever for results that never came.
local BINDABLE = { ["nil"] = true, boolean = true, number = true, string = true }
local MAX_PARAMS = 4096                       -- (lua_pg.c's)

local function check_statement(c, sql, ...)
  if type(sql) ~= "string" then error(format("%s: SQL string expected, got %s", c.name, type(sql)), 0) end
  if find(sql, "\0", 1, true) then error(c.name .. ": the SQL text holds a NUL byte", 0) end
  local n = select("#", ...)
  if n == 0 then return end
  if n > MAX_PARAMS then error(format("%s: too many parameters (%d)", c.name, n), 0) end
  local args = { ... }
  for i = 1, n do
    if not BINDABLE[type(args[i])] then
      error(format("%s: cannot bind parameter %d (nil, boolean, number or string expected, got %s)",
                   c.name, i, type(args[i])), 0)
    end
  end
end

local function query(self, name, sql, ...)
  local holder = self.running
  if holder then
    -- Only a caller that was cut off mid-statement leaves this set: its
    -- attempt is over (the pool resets its connections; a bare one is
    -- reset here).  Anything else is two statements at once: a bug.
    if holder == true or S.attempt_of(holder[1]) == holder[2] then
      error(self.name .. ": the connection is running another statement", 3)
    end
    self:reset()
  end
  local t = in_task() and S.current()
  -- A task whose code runs inside a C call here (a __gc finalizer, a debug
  -- hook, a gsub callback) could send the statement but not wait for its
  -- result, and would leave that result on the connection for its next
  -- statement to trip on (inside a transaction: losing it): refused before
  -- anything is sent.  (isyieldable, not the wait's own check: a builtin,
  -- where that one costs ~1200 instructions, and the stack is deep here.)
  if t and not isyieldable() then error(self.name .. S.IN_C_CALL, 0) end
  if self.aborted and self.tx and not self.ending then error(common.aborted(self.name, self.aborted), 0) end
  if name ~= COPY then check_statement(self, sql, ...) end
  self.running = t and { t, S.attempt_of(t) } or true
  self.replanned = false
  local ok, res = pcall(name == COPY and run_copy or run, self, name, sql, ...)
  -- The session's prepared statements were not what we thought (see
  -- SESSION_CHANGED): the statement did not run.  Outside a transaction
  -- it runs once more, prepared again; inside one, the transaction is
  -- aborted and the error stands (the next one prepares again).
  if not ok and self.replanned and not self.tx then
    self.replanned = false
    ok, res = pcall(run, self, name, sql, ...)
  end
  self.running = false
  if not ok then
    -- (Lost mid-transaction: live() refuses what follows, saying so.  Not
    -- begun yet, as when the first statement's connect failed: nothing
    -- would refuse the next one, which connected and began the transaction
    -- without this one, and its COMMIT went through.)
    if self.tx and (self.pg or self.begin_next) and not self.ending and not self.aborted then self.aborted = res end
    error(res, 0)
  end
  return res
end

--- Runs one statement ($1..$n bound); returns { ok, rows, changes }.
function Conn:query(sql, ...)
  local res = query(self, nil, sql, ...)
  return res
end

--- Conn:query for a statement of tide's own that runs often (a claim, an
--- outcome, an insert): prepared once per session under `name` (the Parse
--- sent with its first run, in one pipeline), then only bound and run, so
--- the server neither parses it again nor, once its plan is generic,
--- plans it.  A new session (a reconnect) prepares it again; a Parse that
--- failed is not taken for done.  `name` must name this one `sql`.
function Conn:prepared(name, sql, ...)
  local res = query(self, not self.unprepared and name or nil, sql, ...)
  return res
end

--- Runs a COPY ... FROM STDIN with the data produce(put) gives (see
--- run_copy); returns { ok, changes } (changes: the rows copied).
function Conn:copy(sql, produce)
  local res = query(self, COPY, sql, produce)
  return res
end

function Conn:close()
  drop(self)
  conns[self.id] = nil
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

return M
