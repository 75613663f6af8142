--- tide.supervision.sources.amqp — AMQP connections and channels for the RabbitMQ source, over tide.core's amqp_* binding.
--
-- A connection is opened on a thread of its own (connect and login block
-- there, never the loop); the task that asked waits, the others run; its
-- wait's timer, not the connect, keeps the loop alive (src/lua_amqp.c).  After
-- that every frame is read and written by the loop without blocking
-- (src/amqp_conn.c).  This module keeps what belongs to a connection: its
-- channels, the one synchronous call a channel may have under way, and what
-- happens when something is lost.
--
-- Invariants:
--   - A Channel object is one channel's life: opened once, lost once.  The
--     number may be reused by a later Channel, never the object; whatever
--     belongs to a channel (delivery tags, publish sequence numbers) is
--     judged by the object, so nothing from an old life reaches a new one.
--   - Loss is final and reported once: a lost connection (closed by the
--     broker, a socket error, missed heartbeats) loses every channel on it;
--     a lost channel wakes what waits on it and calls its `lost` handler.
--   - Nothing here reconnects: the owner's next call opens a new connection.
local core = require "tide.core"
local S = require "tide.engine.sched"

local setmetatable, pairs, error, tostring, format = setmetatable, pairs, error, tostring, string.format
local remove = table.remove

local M = {}
M.CALL_TIMEOUT = 10000       -- ms a synchronous method waits for its reply

local Conn = {}
Conn.__index = Conn
local Channel = {}
Channel.__index = Channel

local conns = {}             -- id -> Conn, while open
local opening = {}           -- id -> the opener's wait
local next_id = 0

core.amqp_on_ready(function(id, kind, raw, err)
  if kind == "open" then
    local o = opening[id]
    opening[id] = nil
    if o and o.waiting and S.attempt_of(o.t) == o.co then   -- the opener still waits for it
      o.raw, o.err = raw, err
      S.wake(o.t, o.tok)
    elseif raw then
      raw:close()                              -- nobody wants it any more
    end
    return
  end
  local c = conns[id]
  if c then c:pump() end
end)

--- Opens a connection (waits, in a task).  cfg: host, port, vhost, user,
--- password, name (shown by the broker), heartbeat (s), timeout (ms), label
--- (names the connection in errors).  Raises with the reason.
function M.connect(cfg)
  next_id = next_id + 1
  local id = next_id
  local t, tok = S.wait_begin("rabbitmq: connect", 2)
  local o = { t = t, tok = tok, co = S.attempt_of(t), waiting = true, raw = false, err = false }
  opening[id] = o
  core.amqp_connect(id, cfg)
  S.wait_end(t, tok, 2 * cfg.timeout + 1000)
  o.waiting = false
  opening[id] = nil                            -- a late answer is closed on arrival
  if not o.raw then
    error(format("%s: %s", cfg.label, o.err or ("no answer from the broker within " .. cfg.timeout .. " ms")), 0)
  end
  local c = setmetatable({ id = id, raw = o.raw, name = cfg.label, channels = {}, free = {}, next_ch = 1,
                           lost = false, blocked = false }, Conn)
  conns[id] = c
  c:pump()                                     -- frames the handshake may have left behind
  return c
end

-- ===== connections

--- Reads every event available now and hands each to its channel.
local function pump(self)
  while self.raw do
    local m, num, a, b, c, d, e, f = self.raw:next()
    if m == nil then return end
    if m == false then return self:lose(num) end
    if m == "basic.deliver" then                 -- tag, redelivered, exchange, routing_key, body, properties
      local ch = self.channels[num]
      local on = ch and ch.on.deliver
      if on then on(ch, a, b, c, d, e, f) end
    elseif num == 0 then
      self:on_event(a, m)
    else
      local ch = self.channels[num]
      if ch then ch:on_event(a, m) end
    end
  end
end

--- pump, protected: an event that cannot be read or handled (the binding
--- raises while it makes a delivery into Lua values: out of memory) loses
--- the connection, so the broker takes back what it delivered; otherwise
--- the event would vanish, and a delivery with it, never settled, its slot
--- of the prefetch window held.
function Conn:pump()
  local ok, err = pcall(pump, self)
  if not ok then self:lose("connection lost: an event could not be read: " .. tostring(err)) end
end

function Conn:on_event(ev, m)
  if m == "connection.close" then
    self:lose(format("connection closed by the broker: %d %s", ev.reply_code, ev.reply_text))
  elseif m == "connection.blocked" then
    self.blocked = ev.reason ~= "" and ev.reason or "blocked"
  elseif m == "connection.unblocked" then
    self.blocked = false
  end
end

--- Loses the connection and every channel on it (once).
function Conn:lose(reason)
  if self.lost then return end
  self.lost = reason
  conns[self.id] = nil
  local raw = self.raw
  self.raw = false
  if raw then raw:close() end
  for _, ch in pairs(self.channels) do ch:lose(reason) end
end

--- Closes the connection (connection.close when healthy).
function Conn:close()
  self:lose("connection closed")
end

--- Sends through the binding; a failure loses the connection and raises,
--- but for a method or properties that cannot be encoded (too big for a
--- frame): nothing was sent, the connection goes on.
function Conn:send(method, ...)
  if not self.raw then error(self.name .. ": " .. tostring(self.lost), 0) end
  local ok, err, why = self.raw[method](self.raw, ...)
  if ok then return end
  if why == "encode" then error(self.name .. ": " .. tostring(err), 0) end
  self:lose(err)
  error(self.name .. ": " .. tostring(err), 0)
end

--- Opens a channel (waits).  `on` holds its handlers: created(ch) (called
--- before the first wait, so an owner whose task dies while the channel
--- opens can still close it), deliver(ch, tag, redelivered, exchange,
--- routing_key, body, properties), confirm(ch, ev, method),
--- lost(ch, reason); all optional.
function Conn:channel(on)
  if self.lost then error(self.name .. ": " .. self.lost, 0) end
  local n = remove(self.free)
  if not n then
    n = self.next_ch
    self.next_ch = n + 1
  end
  local ch = setmetatable({ conn = self, num = n, lost = false, closing = false, waiter = false, on = on or {} }, Channel)
  self.channels[n] = ch
  if ch.on.created then ch.on.created(ch) end
  ch:call("channel_open", "channel.open-ok")
  return ch
end

-- ===== channels

--- Sends a synchronous method and waits for its reply (an event table).
--- Raises when the channel is lost meanwhile or no reply comes in time
--- (then the channel is given up).
function Channel:call(method, expect, ...)
  if self.lost then error(self.conn.name .. ": " .. self.lost, 0) end
  self.conn:send(method, self.num, ...)
  local t, tok = S.wait_begin("rabbitmq", 2)
  local w = { t = t, tok = tok, expect = expect, reply = false }
  self.waiter = w
  S.wait_end(t, tok, M.CALL_TIMEOUT)
  if self.waiter == w then self.waiter = false end
  if w.reply then return w.reply end
  if self.lost then error(self.conn.name .. ": " .. self.lost, 0) end
  self:close(format("no reply to %s within %d ms", method, M.CALL_TIMEOUT))
  error(format("%s: no reply to %s within %d ms", self.conn.name, method, M.CALL_TIMEOUT), 0)
end

--- Sends an asynchronous method on the channel: true, or false when the
--- channel is lost (nothing is sent then).  Raises when the connection fails.
function Channel:send(method, ...)
  if self.lost then return false end
  self.conn:send(method, self.num, ...)
  return true
end

function Channel:on_event(ev, m)
  local on = self.on
  if m == "basic.ack" or m == "basic.nack" then
    if on.confirm then on.confirm(self, ev, m) end
  elseif m == "channel.close" then               -- closed by the broker: say close-ok, free the number
    if self.conn.raw then self.conn.raw:channel_close_ok(self.num) end
    self:release()
    self:lose(format("channel closed by the broker: %d %s", ev.reply_code, ev.reply_text))
  elseif m == "channel.close-ok" then
    self:release()
  elseif m == "basic.cancel" then                -- the queue was deleted, or the node lost it
    self:close("consumer cancelled by the broker (queue deleted?)")
  else
    local w = self.waiter
    if w and m == w.expect then
      self.waiter = false
      w.reply = ev
      S.wake(w.t, w.tok)
    end
  end
end

--- The channel's number may serve again (its close is complete).
function Channel:release()
  local conn = self.conn
  if conn.channels[self.num] == self then
    conn.channels[self.num] = nil
    conn.free[#conn.free + 1] = self.num
  end
end

--- Marks the channel lost (once): wakes its caller, tells its owner.
function Channel:lose(reason)
  if self.lost then return end
  self.lost = reason
  local w = self.waiter
  if w then self.waiter = false; S.wake(w.t, w.tok) end
  if self.on.lost then self.on.lost(self, reason) end
end

--- Closes the channel (the broker requeues what it delivered and nobody
--- acked).  Never waits; idempotent.
function Channel:close(reason)
  if self.lost then return end
  local raw = self.conn.raw
  if raw then raw:channel_close(self.num, 200, "closed by tide") end
  self:lose(reason or "channel closed")
end

return M
