--- tide.jobs.store.pool — a store's connections, each held by one owner at a time, first come first served.
--
-- A store driver opens its connections through a pool (PostgreSQL: up to
-- `size` sockets; SQLite: its one connection, size 1).  Whoever runs SQL
-- checks a connection out, runs its statements, and gives it back; a
-- transaction keeps it from BEGIN to COMMIT, so the statements of two
-- transactions never share a connection.
--
-- Invariants kept here:
--   - Every connection the pool opened is in exactly one place: `free`, or
--     held (c._owner is its holder: a task, or OUTSIDE for code outside
--     tasks).  `nopen` counts them.
--   - Ownership is given without a wait in between: acquire takes a free
--     connection at once; release hands it straight to the first waiter
--     (entry.conn, c._owner) before waking it, so no third task can take it
--     while the waiter is not yet running.  Waiters are served in arrival
--     order; one that waited `timeout` ms gets "pool exhausted".
--   - A holder whose attempt ends while it holds (cancelled, timed out)
--     gives the connection back through its attempt-end hook, marked broken:
--     the driver's `reset` undoes what it left (PostgreSQL closes the
--     socket, so the server rolls back; SQLite rolls back).  A waiter whose
--     attempt ends leaves the queue, and gives back what it was handed.
local S = require "tide.engine.sched"

local error, format, setmetatable, pairs = error, string.format, setmetatable, pairs
local in_task, current, attempt_of = S.in_task, S.current, S.attempt_of

local M = {}

local OUTSIDE = setmetatable({}, { __tostring = function() return "code outside tasks" end })
M.OUTSIDE = OUTSIDE

local Pool = {}
Pool.__index = Pool

--- opts: name (the store's, for messages), size, timeout (ms a waiter
--- waits, or nil: for ever), open() -> a new connection, reset(c) (undo
--- what an abandoned holder left), close(c).
function M.new(opts)
  return setmetatable({ name = opts.name, size = opts.size, timeout = opts.timeout,
                        open = opts.open, reset = opts.reset, close_conn = opts.close,
                        free = {}, nfree = 0, nopen = 0, all = {},
                        waiting = {}, whead = 1, wtail = 0, closed = false }, Pool)
end

--- The holder that a call from here would be: the current task, or OUTSIDE.
local function holder()
  if in_task() then return current() end
  return OUTSIDE
end
M.holder = holder

--- Gives c to `owner`; inside a task, c goes back (broken) if the task's
--- attempt ends before it releases c.
local function take(pool, c, owner)
  c._owner = owner
  if owner ~= OUTSIDE then
    local abandon = c._abandon
    if not abandon then
      abandon = function(t) pool:release(c, true, t) end
      c._abandon = abandon
    end
    c._attempt = attempt_of(owner)
    S.on_attempt_end(owner, abandon)
  end
  return c
end

local function busy_text(pool)
  return format("%d connection%s busy", pool.size, pool.size == 1 and "" or "s")
end

--- Checks a connection out for the current task (or code outside tasks);
--- waits, first come first served, for one to be free.  Raises "NAME: pool
--- exhausted: N connections busy for T ms" after `timeout` ms (the pool's
--- unless given; false: for ever).  `fname` names the caller in errors.
function Pool:acquire(fname, timeout)
  if self.closed then error(format("%s: %s: the store is closed", fname, self.name), 0) end
  local owner = holder()
  if self.whead > self.wtail then             -- nobody waits: take one now
    local n = self.nfree
    if n > 0 then
      local c = self.free[n]
      self.free[n], self.nfree = nil, n - 1
      return take(self, c, owner)
    end
    if self.nopen < self.size then
      local c = self.open()
      self.nopen = self.nopen + 1
      self.all[c] = true
      return take(self, c, owner)
    end
  end
  if owner == OUTSIDE then
    error(format("%s: %s: %s, and this call is outside a task, where it cannot wait for one "
                 .. "(call it from a task)", fname, self.name, busy_text(self)), 0)
  end
  if timeout == nil then timeout = self.timeout end
  local t, tok = S.wait_begin(fname, 3)
  local entry = { t = t, tok = tok, conn = false, gone = false }
  entry.hook = function()                    -- its attempt ended while it waited
    entry.gone = true
    local c = entry.conn                     -- handed over, never taken: back it goes
    if c then entry.conn = false; self:release(c, false, t) end
  end
  self.wtail = self.wtail + 1
  self.waiting[self.wtail] = entry
  S.on_attempt_end(t, entry.hook)
  S.wait_end(t, tok, timeout or nil)
  S.off_attempt_end(t, entry.hook)
  local c = entry.conn
  if c then
    c._owner = nil
    return take(self, c, t)
  end
  entry.gone = true                          -- timed out: release() skips it
  if self.closed then error(format("%s: %s: the store is closed", fname, self.name), 0) end
  error(format("%s: %s: pool exhausted: %s for %d ms", fname, self.name, busy_text(self), timeout), 0)
end

--- Gives c back: to the first waiter still waiting, else to the free list.
--- `broken`: the holder left it mid-transaction or mid-statement; the
--- driver's reset undoes that first (a connection that is gone reconnects
--- when next used).  `holder`, when given, must be c's holder: a holder
--- that gave c back already (its attempt-end hook did) gives back nothing,
--- least of all the connection the pool has handed to someone else since.
function Pool:release(c, broken, holder)
  local owner = c._owner
  if owner == nil then return end            -- given back already
  if holder ~= nil and owner ~= holder then return end
  if owner ~= OUTSIDE and c._abandon then S.off_attempt_end(owner, c._abandon) end
  c._owner, c._attempt = nil, nil
  if broken and self.reset then self.reset(c) end
  if self.closed then
    self.all[c], self.nopen = nil, self.nopen - 1
    if self.close_conn then self.close_conn(c) end
    return
  end
  local waiting = self.waiting
  while self.whead <= self.wtail do
    local e = waiting[self.whead]
    waiting[self.whead], self.whead = nil, self.whead + 1
    if not e.gone and attempt_of(e.t) then
      e.conn, c._owner = c, e.t               -- theirs from now on
      S.wake(e.t, e.tok)
      return
    end
  end
  self.whead, self.wtail = 1, 0
  local n = self.nfree + 1
  self.free[n], self.nfree = c, n
end

--- Takes the free connection c out of this pool for good (true), unless
--- it is held or a holder waits (false): the pool may open another in its
--- place.  (A worker's store of its own adopts the connection the store's
--- opening used, rather than opening one more: see the PostgreSQL store.)
function Pool:remove_free(c)
  if self.closed or self.whead <= self.wtail or not self.all[c] then return false end
  local free, n = self.free, self.nfree
  for i = 1, n do
    if free[i] == c then
      free[i] = free[n]                       -- (the last one fills its place)
      free[n] = nil
      self.nfree, self.nopen, self.all[c] = n - 1, self.nopen - 1, nil
      c._abandon = nil                        -- (its hook gave it back to this pool)
      return true
    end
  end
  return false
end

--- Adds c, an open connection another pool gave up (remove_free), as free.
function Pool:adopt(c)
  if self.closed or self.nopen >= self.size then
    error(format("pool:adopt: %s: no room for one more connection (%d open of %d)", self.name, self.nopen, self.size), 2)
  end
  self.all[c], self.nopen = true, self.nopen + 1
  self.nfree = self.nfree + 1
  self.free[self.nfree] = c
end

--- True when a call outside tasks would get a connection at once.
function Pool:available()
  return not self.closed and self.whead > self.wtail and (self.nfree > 0 or self.nopen < self.size)
end

--- { size, open, busy, waiting }: what `tide jobs stats` and q:stats() show.
function Pool:stats()
  local waiting = 0
  for i = self.whead, self.wtail do
    local e = self.waiting[i]
    if e and not e.gone then waiting = waiting + 1 end
  end
  return { size = self.size, open = self.nopen, busy = self.nopen - self.nfree, waiting = waiting }
end

--- Every connection, held or not (for closing and for tests).
function Pool:each(fn)
  for c in pairs(self.all) do fn(c) end
end

--- Closes the free connections now and the held ones when they come back.
function Pool:close()
  if self.closed then return end
  self.closed = true
  for i = 1, self.nfree do
    local c = self.free[i]
    self.free[i] = nil
    self.all[c], self.nopen = nil, self.nopen - 1
    if self.close_conn then self.close_conn(c) end
  end
  self.nfree = 0
  for i = self.whead, self.wtail do
    local e = self.waiting[i]
    if e and not e.gone then e.gone = true; S.wake(e.t, e.tok) end
  end
end

return M
