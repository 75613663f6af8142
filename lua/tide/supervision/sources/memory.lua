--- tide.supervision.sources.memory — tide.sources.memory, a broker stand-in for tests and examples, with the interface tide.consumer uses.
--
-- The memory source behaves like a broker channel with a prefetch limit
-- (basic.qos): it never has more than `prefetch` deliveries unacked, each
-- delivery gets a fresh tag, a nacked message with requeue goes back to the
-- queue (and is delivered again with a new tag and `redelivered` set).  It
-- records every ack and nack, and counts what a real broker would reject:
-- settling an unknown tag or settling one twice.  `outage = true` makes fetch fail, like a lost
-- connection.  A fetch that finds nothing waits (up to its wait_ms) until a
-- publish or a settle may let it take something: no polling.
local check = require "tide.engine.check"
local S = require "tide.engine.sched"

local type, setmetatable, getmetatable, error, tostring = type, setmetatable, getmetatable, error, tostring

local M = {}
local Memory = {}
local Memory_mt = { __index = Memory, __tostring = function(m)
  return ("tide.sources.memory (%d queued, %d unacked)"):format(m.queued, m.unacked)
end }

--- tide.sources.memory{ prefetch = N, messages = { ... } }
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then check.arg_error("tide.sources.memory", 1, "table", opts) end
  check.known("tide.sources.memory", opts, { prefetch = true, messages = true })
  local prefetch = opts.prefetch or 10
  if not check.is_count(prefetch, 1) then
    check.opt_error("tide.sources.memory", "prefetch", "integer >= 1", opts.prefetch)
  end
  if opts.messages ~= nil and type(opts.messages) ~= "table" then
    check.opt_error("tide.sources.memory", "messages", "list", opts.messages)
  end
  local m = setmetatable({ prefetch = prefetch, queue = {}, again = {}, qhead = 1, queued = 0,
    unacked = 0, pending = {}, next_tag = 0, outage = false,
    delivered = 0, acked = 0, nacked = 0, violations = 0, log = {} }, Memory_mt)
  for _, body in ipairs(opts.messages or {}) do m:publish(body) end
  return m
end

--- Raises "fname: bad self" at the method's caller unless m is a memory source.
local function check_self(fname, m)
  if getmetatable(m) ~= Memory_mt then
    error(("%s: bad self (memory source expected, got %s)"):format(fname, check.describe(m)), 3)
  end
end

local function check_delivery(fname, d)
  if type(d) ~= "table" then check.arg_error(fname, 1, "delivery", d, 3) end
end

function Memory.publish(m, body, redelivered)
  check_self("source:publish", m)
  local i = m.qhead + m.queued
  m.queue[i], m.again[i] = body, redelivered or nil
  m.queued = m.queued + 1
  S.notify(m)
end

local function can_deliver(m)
  return m.queued > 0 and m.unacked < m.prefetch
end

--- At most n deliveries, within the prefetch window; waits up to wait_ms
--- (optional) when none can be delivered now.
function Memory.fetch(m, n, wait_ms)
  check_self("source:fetch", m)
  if not check.is_count(n) then check.arg_error("source:fetch", 1, "integer >= 0", n) end
  if wait_ms ~= nil and not check.is_ms(wait_ms) then
    check.arg_error("source:fetch", 2, "non-negative number of ms", wait_ms)
  end
  if m.outage then error("memory source: connection refused (outage)", 0) end
  if not can_deliver(m) and wait_ms and wait_ms > 0 then
    local deadline = S.now() + wait_ms
    repeat
      S.wait_for(m, "source:fetch", deadline - S.now())
      if m.outage then error("memory source: connection refused (outage)", 0) end
    until can_deliver(m) or S.now() >= deadline
  end
  local out = {}
  while #out < n and m.queued > 0 and m.unacked < m.prefetch do
    local body, again = m.queue[m.qhead], m.again[m.qhead] or false
    m.queue[m.qhead], m.again[m.qhead], m.qhead, m.queued = nil, nil, m.qhead + 1, m.queued - 1
    m.next_tag = m.next_tag + 1
    local d = { tag = m.next_tag, body = body, redelivered = again }
    m.pending[d.tag] = body
    m.unacked, m.delivered = m.unacked + 1, m.delivered + 1
    out[#out + 1] = d
  end
  return out
end

local function settle(m, d, what)
  local tag = d.tag
  m.log[#m.log + 1] = { tag, what }
  local body = m.pending[tag]
  if body == nil then
    m.violations = m.violations + 1
    error(("memory source: %s of unknown or settled delivery tag %s"):format(what, tostring(tag)), 0)
  end
  m.pending[tag] = nil
  m.unacked = m.unacked - 1
  S.notify(m)
  return body
end

--- Settles delivery d (as fetch returned it).
function Memory.ack(m, d)
  check_self("source:ack", m)
  check_delivery("source:ack", d)
  settle(m, d, "ack")
  m.acked = m.acked + 1
  return true
end

function Memory.nack(m, d, requeue)
  check_self("source:nack", m)
  check_delivery("source:nack", d)
  local body = settle(m, d, "nack")
  m.nacked = m.nacked + 1
  if requeue then m:publish(body, true) end
  return true
end

function Memory.stats(m)
  check_self("source:stats", m)
  return { queued = m.queued, unacked = m.unacked, delivered = m.delivered, acked = m.acked,
           nacked = m.nacked, violations = m.violations }
end

return M
