--- tide.jobs.store.sqlite_wake — the SQLite store hears other processes' commits.
--
-- SQLite has no LISTEN/NOTIFY.  Every commit, by any process, appends to
-- the -wal file beside the database, so the store watches that file (libuv
-- fs events: inotify on Linux, no polling, no cost while nothing writes)
-- and, on each change, reads PRAGMA data_version on its own connection:
-- that number moves only when *another* connection committed, so this
-- process's own claims and outcomes wake nobody.  A move wakes every
-- listener (fn(nil): "look at every queue"), and the worker's claimers
-- claim again.  Writers need not cooperate: a job inserted by hand, by
-- another tide or by `tide jobs retry` wakes the workers too.
--
-- Why not a socket beside the database: every enqueuer would have to find
-- and tell every worker (a directory of sockets, stale ones after a
-- SIGKILL), and writers that are not tide would wake nobody.
--
-- The window, and the second look: a commit writes its frames to the -wal
-- file (the event) a few microseconds before it publishes them in the
-- shared-memory index (no event: it is a mapped file), which is what
-- data_version reads.  A check that runs inside that window sees nothing
-- new; so a check that saw nothing looks once more SECOND_LOOK ms later.
-- The poll (the worker's `poll` option) remains the backstop.
--
-- A -wal file that goes (moved or deleted: the watch sees no more changes)
-- is watched anew; while it is missing, tried again every REWATCH ms.
--
-- Invariants: at most one watch and one pending check per store; a check
-- runs only when the connection is free (else it is tried again BUSY_LOOK
-- ms later), outside any task, and never waits.
local core = require "tide.core"
local S = require "tide.engine.sched"
local log = require "tide.engine.log"

local pcall, pairs = pcall, pairs
local log_protect = log.protect

local M = {}
local Store = {}              -- the store's methods here, copied onto the SQLite store by M.install

local SECOND_LOOK, BUSY_LOOK = 1, 1
local REWATCH = 500                       -- ms between tries to watch a -wal file that went

local arm_check

local function data_version(s)
  local st = s.stmts.data_version
  if not st then st = s.db:prepare("PRAGMA data_version"); s.stmts.data_version = st end
  return st:first().data_version
end

local function wake_all(store)
  local list = store.listeners
  for i = #list, 1, -1 do
    local fn = list[i]
    if fn then log_protect("a job store listener", fn, nil) end
  end
end

local function check_version(store)
  store.check_at, store.check_timer = nil, nil
  if not store.session or #store.listeners == 0 or not store.watch then return end
  if not store.pool:available() then return arm_check(store, BUSY_LOOK, store.fresh) end
  local fresh = store.fresh
  store.fresh = false
  local s = store.pool:acquire("sqlite wake-up")
  local ok, v = pcall(data_version, s)
  store.pool:release(s, false)
  if ok and v == store.version then
    if fresh then arm_check(store, SECOND_LOOK, false) end
    return
  end
  store.version = ok and v or nil
  store.wakes = store.wakes + 1
  wake_all(store)
end

--- Checks data_version in `ms` (or sooner, if a check is due sooner);
--- `fresh`: for a change just seen (a check that finds nothing looks again).
function arm_check(store, ms, fresh)
  if fresh then store.fresh = true end
  local at = core.now() + ms
  if store.check_timer then
    if store.check_at <= at then return end
    S.untimer(store.check_timer)
  end
  store.check_at = at
  store.check_timer = S.timer(ms, check_version, store)
end

--- Tries to watch the -wal file again, every REWATCH ms until it is there
--- (or nobody listens any more); wakes the listeners once it is watched
--- (commits meanwhile were not heard).
local function rewatch(store)
  store.rewatch_timer = nil
  if store.watch or not store.session or #store.listeners == 0 then return end
  if store:watch_wal() then return wake_all(store) end
  store.rewatch_timer = S.timer(REWATCH, rewatch, store)
end

local function on_wal_event(store, event)
  if event ~= "change" then               -- the file went (or the watch failed): watch it anew
    if store.watch then store.watch:close(); store.watch = nil end
    if not store:watch_wal() and not store.rewatch_timer then
      store.rewatch_timer = S.timer(REWATCH, rewatch, store)
    end
    return wake_all(store)
  end
  store.events = store.events + 1
  arm_check(store, 0, true)
end

--- Starts watching PATH-wal; true, or nil and why not (then only the
--- workers' polls find other processes' jobs).
function Store:watch_wal()
  if self.watch then return true end
  local w, err = core.fs_watch(self.session.path .. "-wal", function(event) on_wal_event(self, event) end)
  if not w then
    self.watch_error = err
    return nil, err
  end
  self.watch, self.watch_error = w, nil
  local s = self.pool:available() and self.pool:acquire("sqlite wake-up")
  if s then
    local ok, v = pcall(data_version, s)
    self.pool:release(s, false)
    self.version = ok and v or nil
  end
  return true
end

--- Calls fn(nil) soon after another connection (another process, or
--- another store on the same file) committed anything: the caller claims
--- again.  Returns true, or nil and why the file cannot be watched (then
--- only polling finds other processes' jobs).
function Store:listen(fn)
  if not self.session then return nil, "the store is closed" end
  self.listeners[#self.listeners + 1] = fn
  return self:watch_wal()
end

--- Stops calling fn (every listener when fn is nil); the watch ends with the last.
function Store:unlisten(fn)
  local list = self.listeners
  for i = #list, 1, -1 do
    if fn == nil or list[i] == fn then table.remove(list, i) end
  end
  if #list == 0 then
    if self.watch then self.watch:close(); self.watch = nil end
    if self.check_timer then S.untimer(self.check_timer); self.check_timer, self.check_at = nil, nil end
    if self.rewatch_timer then S.untimer(self.rewatch_timer); self.rewatch_timer = nil end
  end
end

--- { watching, events, wakes, error }: how the wake-up fares (for specs and tools).
function Store:wake_stats()
  return { watching = self.watch ~= nil, events = self.events, wakes = self.wakes, error = self.watch_error }
end

--- Puts these methods (watch_wal, listen, unlisten, wake_stats) on the store's `methods`.
function M.install(methods)
  for name, fn in pairs(Store) do methods[name] = fn end
end

return M
