--- tide.engine.pool — bounded concurrency: submit never blocks, at most `concurrency` tasks run at once.
--
-- Tasks beyond `concurrency` wait in a FIFO queue of at most `queue_limit`; past it,
-- submit returns nil and a "queue full" message (the caller decides: drop,
-- retry later, or slow down).  A task keeps its slot through retries and
-- their backoff; the slot is freed when the task reaches its outcome.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local task = require "tide.engine.task"
local make_task = task.make_task
local OPT = require("tide.engine.fields").OPT

local type, getmetatable, setmetatable, error = type, getmetatable, setmetatable, error
local arg_error, opt_error = check.arg_error, check.opt_error

local M = {}
M.live = setmetatable({}, { __mode = "k" })   -- every pool not yet collected (for metrics)
local Pool = {}
local Pool_mt = { __index = Pool, __tostring = function(p)
  return ("tide.Pool%s (%d/%d running, %d waiting)")
    :format(p.name and (" '" .. p.name .. "'") or "", p.running, p.concurrency, p.waiting)
end }

local KEYS = check.options("tide.pool", {
  concurrency = true, size = true, queue_limit = true, mode = true, name = true
}, { size = "concurrency" })

--- tide.pool{ concurrency = 10, queue_limit = 10000, mode = "coroutine", name = "..." }
--- (`size` is the deprecated name of concurrency.)
function M.new(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then arg_error("tide.pool", 1, "table", opts) end
  check.known("tide.pool", opts, KEYS)
  local given = check.renamed("tide.pool", opts, "size", "concurrency")
  local size, limit = given or 10, opts.queue_limit or 10000
  if not check.is_count(size, 1) then opt_error("tide.pool", "concurrency", "integer >= 1", given) end
  if not check.is_count(limit) then opt_error("tide.pool", "queue_limit", "integer >= 0", opts.queue_limit) end
  task.check_mode("tide.pool", opts.mode, 2)
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error("tide.pool", "name", "string", opts.name) end
  local p = setmetatable({
    concurrency = size, queue_limit = limit, name = opts.name, mode = opts.mode or "coroutine",
    running = 0, waiting = 0, outstanding = 0, submitted = 0,
    queue = {}, qhead = 1, qtail = 0, filling = false, drainers = {},
    ok = 0, error = 0, timeout = 0, cancelled = 0,
  }, Pool_mt)
  M.live[p] = true
  return p
end

local function check_pool(fname, p)
  if getmetatable(p) ~= Pool_mt then
    error(("%s: bad self (pool expected, got %s); call it as pool:%s(...)")
      :format(fname, check.describe(p), fname:match(":(%w+)$")), 3)
  end
end

local function start_in_slot(p, t)
  p.running = p.running + 1
  S.options(t).pool_slot = true
  S.start(t)
end

--- Gives free slots to queued tasks, oldest first.  Not re-entered: a task
--- that finishes at once (during a shutdown) frees its slot for this loop.
local function fill(p)
  if p.filling then return end
  p.filling = true
  local q = p.queue
  while p.running < p.concurrency and p.qhead <= p.qtail do
    local t = q[p.qhead]
    q[p.qhead], p.qhead = nil, p.qhead + 1
    if S.state(t) == "pending" then
      p.waiting = p.waiting - 1
      start_in_slot(p, t)
    end
  end
  if p.qhead > p.qtail then p.qhead, p.qtail = 1, 0 end
  p.filling = false
end

--- Drops the queue's entries of tasks that ended while queued (cancelled),
--- keeping the order of the rest: a pool whose slots stay busy while tasks
--- are submitted and cancelled would otherwise hold every one of them.
local function compact(p)
  local q, j = p.queue, 0
  for i = p.qhead, p.qtail do
    local t = q[i]
    q[i] = nil
    if S.state(t) == "pending" then j = j + 1; q[j] = t end
  end
  p.qhead, p.qtail = 1, j
end

local function release(t)
  local o = S.options(t)
  local p = o.pool
  p.outstanding = p.outstanding - 1
  local status = S.state(t)
  p[status] = p[status] + 1
  if o.pool_slot then
    p.running = p.running - 1
  else
    p.waiting = p.waiting - 1            -- cancelled while queued
    if not p.filling and p.qtail - p.qhead + 1 > 2 * p.waiting + 64 then compact(p) end
  end
  fill(p)
  if p.outstanding == 0 and #p.drainers > 0 then
    local d = p.drainers
    p.drainers = {}
    S.wake_all(d)
  end
end

--- Submits fn(...) or a task spec; returns the task at once, or nil and
--- "pool:submit: queue full ..." when `queue_limit` tasks already wait.
function Pool.submit(p, spec, ...)
  check_pool("pool:submit", p)
  if p.running >= p.concurrency and p.waiting >= p.queue_limit then
    task.check_spec("pool:submit", p.mode, spec, ...)      -- misuse raises, full or not
    return nil, ("pool:submit: queue full (%d waiting, queue_limit %d)"):format(p.waiting, p.queue_limit)
  end
  local t = make_task("pool:submit", p.mode, spec, ...)
  local o = S.options(t)
  o.pool = p
  S.on_finish(t, release)
  p.outstanding, p.submitted = p.outstanding + 1, p.submitted + 1
  if p.running < p.concurrency then
    start_in_slot(p, t)
  else
    p.waiting = p.waiting + 1
    p.qtail = p.qtail + 1
    p.queue[p.qtail] = t
  end
  return t
end

--- Waits (inside a task) until every task submitted so far has its outcome.
--- Returns the pool's stats, or nil, "timeout" after `timeout_ms`.
function Pool.drain(p, timeout_ms)
  check_pool("pool:drain", p)
  if timeout_ms ~= nil and not check.is_ms(timeout_ms) then
    arg_error("pool:drain", 1, "non-negative number of ms", timeout_ms)
  end
  local me = S.current()
  local o = me and me[OPT]
  if o and o.pool == p and p.outstanding > 0 then
    error("pool:drain: called from a task of this pool (it would wait for itself)", 2)
  end
  local deadline = timeout_ms and S.now() + timeout_ms
  while p.outstanding > 0 do
    local t, tok = S.wait_begin("pool:drain", 2)
    S.add_waiter(p.drainers, t, tok)
    S.wait_end(t, tok, deadline and math.max(0, deadline - S.now()))
    if p.outstanding > 0 and deadline and S.now() >= deadline then
      S.remove_waiter(p.drainers, t)
      return nil, "timeout"
    end
  end
  return p:stats()
end

--- Counters: concurrency, running, waiting, submitted, and outcomes so far
--- (`size`: the same as concurrency, under its deprecated name).
function Pool.stats(p)
  check_pool("pool:stats", p)
  return { concurrency = p.concurrency, size = p.concurrency, running = p.running, waiting = p.waiting, submitted = p.submitted,
           ok = p.ok, error = p.error, timeout = p.timeout, cancelled = p.cancelled }
end

return M
