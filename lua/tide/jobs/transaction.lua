--- tide.jobs.transaction — a queue's transactions and the connections (sessions) they hold.
--
-- tide.jobs.queue's statements run through here: with_session gives a
-- statement the caller's transaction's session, or one of the store's pool;
-- transaction() opens a transaction (a savepoint inside one), and tx
-- handles (tx:exec, tx:query; tx:enqueue is added by tide.jobs.queue) work
-- only inside it.
--
-- Transactions and their connections (Promise 7):
--   - A transaction checks a session (a connection) out of the store's pool
--     before anything can wait, and keeps it until COMMIT or ROLLBACK: two
--     transactions never share one, whatever their tasks do in between.
--     The pool is the store's: PostgreSQL has `pool` connections, SQLite
--     one (so there a transaction holds the store, and others wait).
--   - The holder of a transaction is the task that opened it (or code
--     outside tasks); q._txs[holder] is its state.  A statement of that
--     holder — q:enqueue, q:job, a nested q:transaction (a savepoint) —
--     runs inside its transaction; anyone else's waits for a free session.
--   - A tx handle works only while its transaction (or savepoint) is open,
--     and only for its holder: otherwise it raises, it never runs elsewhere.
--   - A task that ends inside a transaction (timeout, cancel) leaves it
--     through its attempt-end hook: the pool takes the session back broken
--     (rolled back), and the handles die.
--   - Nothing runs inside a __gc finalizer (refused, first thing: see
--     not_in_finalizer): the collector runs one amid other code, whose
--     holder it would take for its own, joining that code's transaction or
--     its statement under way.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local finalizers = require "tide.engine.finalizers"
local pool = require "tide.jobs.store.pool"
local common = require "tide.jobs.store.common"

local type, error, pairs, ipairs, tostring, find = type, error, pairs, ipairs, tostring, string.find
local setmetatable, getmetatable, pcall, select = setmetatable, getmetatable, pcall, select
local arg_error, describe = check.arg_error, check.describe
local holder, OUTSIDE = pool.holder, pool.OUTSIDE

local M = {}

local Tx = {}
local Tx_mt = { __index = Tx, __tostring = function(tx)
  return ("tide.Transaction (%s%s)"):format(tx._q.name, tx._live and "" or ", ended")
end }
M.Tx, M.Tx_mt = Tx, Tx_mt

local function pack(...) return { n = select("#", ...), ... } end

local in_finalizer = finalizers.running

--- Raises when called inside a __gc finalizer (tide's wrapped ones: see
--- tide.engine.finalizers), naming `fname`, at `level`.  Called first, before
--- any argument is walked: on LuaJIT before 2023-08 a compiled pairs() loop
--- may never end inside a finalizer (the header of tide.engine.finalizers).
local function not_in_finalizer(fname, level)
  if in_finalizer() then
    error(fname .. ": cannot run inside a __gc finalizer (the collector runs it amid other code, which may "
      .. "be using this store's connection or be inside a transaction); spawn a task for it: "
      .. "tide.spawn(function() ... end)", level + 1)
  end
end
M.not_in_finalizer = not_in_finalizer

local in_task, isyieldable, IN_C_CALL = S.in_task, coroutine.isyieldable, S.IN_C_CALL

--- Raises when `store` waits for the network (PostgreSQL) and the caller is
--- a task's code inside a C call (a gsub or sort callback, a hook), where no
--- wait can yield: pg_conn refuses the statement anyway, before sending it,
--- but naming only the store; here the message names `fname`, at `level`.
local function not_in_c_call(fname, store, level)
  if store.waits and in_task() and not isyieldable() then error(fname .. IN_C_CALL, level + 1) end
end
M.not_in_c_call = not_in_c_call

--- Tells the listeners of queue object q (its workers in this process)
--- that jobs of `queues` (a set of names) were committed.
local function notify(q, queues)
  for queue in pairs(queues) do
    for _, fn in ipairs(q._listeners) do fn(queue) end
  end
end
M.notify = notify

-- ===== sessions: the caller's transaction's, or one of the pool's

--- Raises, naming `fname`, when transaction state st was aborted by a
--- failed statement (tide.jobs.store.common): the store would refuse what
--- comes next anyway, naming only itself.
local function refuse_aborted(fname, st, level)
  local first = st.session:failed()
  if first then error(fname .. ": " .. common.aborted(st.store.name, first), level + 1) end
end

--- Runs fn(session, ...) on the caller's transaction's session, or on one
--- checked out for it (waiting for a free one); returns fn's first two results.
local function with_session(q, fname, fn, ...)
  local st = q._txs[holder()]
  if st then
    refuse_aborted(fname, st, 3)
    return fn(st.session, ...)
  end
  local store = q._store
  if not store then error(fname .. ": the queue is closed", 3) end   -- (since check_q: by a finalizer)
  local session = store:acquire(fname)
  local ok, a, b = pcall(fn, session, ...)
  store:release(session, false, holder())
  if not ok then error(a, 0) end
  return a, b
end
M.with_session = with_session

--- After an insert: wake this process's workers now, or at the commit.
local function inserted_into(q, st, queue)
  if st then st.touched[queue] = true else notify(q, { [queue] = true }) end
end
M.inserted_into = inserted_into

-- ===== transactions

local function new_tx(q, st, depth)
  local tx = setmetatable({ _q = q, _st = st, _depth = depth, _live = true }, Tx_mt)
  st.handles[#st.handles + 1] = tx
  return tx
end

--- Ends transaction state st: its handles die, the session goes back to
--- the store it came from (a queue closed meanwhile closes it then).
local function close_state(q, st, broken)
  if st.closed then return end
  st.closed = true
  if q._txs[st.owner] == st then q._txs[st.owner] = nil end
  for _, tx in ipairs(st.handles) do tx._live = false end
  if st.owner ~= OUTSIDE then S.off_attempt_end(st.owner, st.hook) end
  st.store:release(st.session, broken, st.owner)
end

--- The task ended inside the transaction (timed out, cancelled): the store
--- takes the session back broken (rolled back), and tasks waiting go on.
local function abandon(q, st)
  close_state(q, st, true)
end

--- A nested q:transaction: a savepoint on the holder's session.
local function savepoint(q, st, fname, fn, ...)
  refuse_aborted(fname, st, 4)
  local depth = st.depth + 1
  st.session:savepoint(depth)
  st.depth = depth
  local tx = new_tx(q, st, depth)
  local res = pack(pcall(fn, tx, ...))
  tx._live = false
  st.depth = depth - 1
  if st.closed then error(fname .. ": the transaction ended while it ran (its task was stopped)", 3) end
  local session = st.session
  local failed = res[1] and session:failed()   -- (it returned, after a statement failed and aborted all)
  if res[1] and not failed then session:release(depth) else session:rollback_to(depth) end
  if failed then error(fname .. ": commit failed: " .. common.rolled_back(st.store.name, failed), 3) end
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end

--- Runs fn(tx, ...) in a transaction (a savepoint when the caller is in one
--- already); commits when it returns, rolls back and re-raises when it
--- raises.  Returns fn's results.
local function transaction(q, fname, fn, ...)
  local owner = holder()
  local st = q._txs[owner]
  if st then return savepoint(q, st, fname, fn, ...) end
  local store = q._store
  if not store then error(fname .. ": the queue is closed", 3) end   -- (since check_q: by a finalizer)
  -- The session is ours from here: nothing of ours waits between the pool
  -- handing it over and q._txs knowing it (the rule above).  (The
  -- PostgreSQL store's acquire may read the server's clock on it first,
  -- once a minute: a task abandoned then is the pool's to clean up, as any
  -- holder the pool knows: tide.jobs.store.pool.)
  local session = store:acquire(fname)
  st = { session = session, store = store, depth = 1, owner = owner, touched = {}, handles = {}, closed = false }
  q._txs[owner] = st
  if owner ~= OUTSIDE then
    st.hook = function() abandon(q, st) end
    S.on_attempt_end(owner, st.hook)
  end
  local ok, err = pcall(session.begin, session)
  if not ok then
    close_state(q, st, true)
    error(err, 0)
  end
  local tx = new_tx(q, st, 1)
  local res = pack(pcall(fn, tx, ...))
  local clean, commit_err = true, nil
  if res[1] then
    clean, commit_err = pcall(session.commit, session)
    if not clean then pcall(session.rollback, session) end
  else
    clean = pcall(session.rollback, session)
  end
  local committed = res[1] and clean
  close_state(q, st, not clean)
  if committed then notify(q, st.touched) end
  if res[1] and not clean then error(fname .. ": commit failed: " .. tostring(commit_err), 3) end
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end
M.transaction = transaction

--- The transaction state behind a tx handle, if the caller may use it;
--- raises otherwise ("tx:enqueue: this transaction has ended").
local function tx_state(fname, tx)
  not_in_finalizer(fname, 3)
  if getmetatable(tx) ~= Tx_mt then
    error(("%s: bad self (transaction expected, got %s); call it as tx:%s(...)")
      :format(fname, describe(tx), fname:match("[:.](%w+)$")), 3)
  end
  local st = tx._st
  if not tx._live or st.closed then error(fname .. ": this transaction has ended", 3) end
  if st.owner ~= holder() then
    error(("%s: this transaction belongs to %s, not to the caller"):format(fname,
      st.owner == OUTSIDE and "code outside tasks" or tostring(st.owner)), 3)
  end
  if not tx._q._store then error(fname .. ": the queue is closed", 3) end
  not_in_c_call(fname, tx._q._store, 3)
  refuse_aborted(fname, st, 4)
  return st
end
M.tx_state = tx_state

local BINDABLE = { ["nil"] = true, boolean = true, number = true, string = true }

-- Statements that would end, or open, a transaction under q:transaction's
-- feet (the first word, after blanks, comments and empty statements), and
-- PREPARE TRANSACTION (PostgreSQL: the transaction leaves the session).
local CONTROL = { BEGIN = true, START = true, COMMIT = true, END = true, ROLLBACK = true, ABORT = true,
                  SAVEPOINT = true, RELEASE = true }

--- The first two words of `sql` (from byte `at`) in capitals, after blanks,
--- comments and empty statements (";": both stores skip them); "" when
--- nothing else is left.  When
--- `nested` (PostgreSQL) block comments nest and a line comment ends at a
--- CR too; not otherwise (SQLite): the caller asks both ways.  A word is a
--- name's whole run of letters, digits, _ and $ ("end1" is no END).
local function words(sql, nested, at, n)
  n = n or 1
  while true do
    local s = sql:match("^[%s;]*()", at)
    if s > #sql then return "" end            -- (nothing but blanks, comments and semicolons)
    if sql:sub(s, s + 1) == "--" then
      at = (sql:find(nested and "[\n\r]" or "\n", s) or #sql) + 1
    elseif sql:sub(s, s + 1) == "/*" then
      local depth, i = 1, s + 2
      while depth > 0 do
        local open, close = nested and sql:find("/*", i, true), sql:find("*/", i, true)
        if not close then return nil end
        if open and open < close then depth, i = depth + 1, open + 2
        else depth, i = depth - 1, close + 2 end
      end
      at = i
    else
      local word, after = sql:match("^([%a_\128-\255][%w_$\128-\255]*)()", s)
      if not word then return nil end
      word = word:upper()
      if n == 2 then return word end
      return word, words(sql, nested, after, 2)
    end
  end
end

--- The control statement `sql` opens with, if any ("COMMIT", "PREPARE
--- TRANSACTION"), or "" when it holds no statement at all.
local function control(sql)
  local empty = true
  for _, nested in ipairs{ false, true } do
    local first, second = words(sql, nested, 1)
    if CONTROL[first] then return first end
    if first == "PREPARE" and second == "TRANSACTION" then return "PREPARE TRANSACTION" end
    empty = empty and first == ""
  end
  return empty and "" or nil
end

--- Checks a statement of the caller's own before any store sees it: the
--- SQL is a string without NUL (SQLite ran the text up to the NUL and
--- dropped the rest unseen; PostgreSQL's binding refused it half-way
--- through a pipeline and its connection hung), and each parameter is one
--- the stores bind.  Raises naming `fname` and the argument.
local function check_statement(fname, sql, ...)
  if type(sql) ~= "string" then arg_error(fname, 1, "SQL string", sql, 3) end
  local nul = find(sql, "\0", 1, true)
  if nul then
    error(("%s: bad argument #1 (SQL text expected, got a string with a NUL byte at byte %d)"):format(fname, nul), 3)
  end
  local word = control(sql)
  if word == "" then
    -- (PostgreSQL ran it as an empty query; SQLite refused it, aborting the transaction)
    error(fname .. ": bad argument #1 (an SQL statement expected, got only blanks and comments)", 3)
  elseif word then
    error(("%s: bad argument #1 (a statement other than BEGIN, COMMIT, ROLLBACK, SAVEPOINT or RELEASE "
      .. "expected, got %s: q:transaction commits when its function returns and rolls back when it raises; "
      .. "a nested q:transaction is a savepoint)"):format(fname, word), 3)
  end
  local n = select("#", ...)
  if n == 0 then return end
  local args = { ... }
  for i = 1, n do
    if not BINDABLE[type(args[i])] then
      arg_error(fname, i + 1, "nil, boolean, number or string (parameter " .. i .. ")", args[i], 3)
    end
  end
end

--- Runs one statement of your own SQL with ? parameters bound (never
--- interpolated); returns the number of rows changed.
function Tx:exec(sql, ...)
  local st = tx_state("tx:exec", self)
  check_statement("tx:exec", sql, ...)
  return st.session:exec(sql, ...)
end

--- Runs a query of your own; returns its rows as { column = value } tables.
function Tx:query(sql, ...)
  local st = tx_state("tx:query", self)
  check_statement("tx:query", sql, ...)
  return st.session:query(sql, ...)
end

return M
