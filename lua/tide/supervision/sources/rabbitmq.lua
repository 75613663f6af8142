--- tide.supervision.sources.rabbitmq — tide.sources.rabbitmq, a RabbitMQ queue as a source for tide.consumer, and publishing with confirms.
--
--   local src = tide.sources.rabbitmq{ url = "amqp://user:pass@host:5672/vhost", queue = "orders",
--                                      prefetch = 20, declare = { type = "quorum" }, max_redeliveries = 5 }
--   tide.consumer{ source = src, handler = { run = fn, timeout = 5000 } }
--   src:publish(body, { routing_key = "orders", persistent = true, headers = {} })   -- waits for the confirm
--
-- The consumer's interface: start() opens a channel (and the connection if
-- needed), sets basic.qos to the prefetch, declares the queue when asked
-- and calls basic.consume; the broker then pushes deliveries, which wait in
-- the source until fetch(n, wait_ms) hands them out (a fetch that finds
-- none waits for the next push, no polling); ack(d) and nack(d, requeue)
-- settle one; stop() closes the channel, so the broker requeues whatever
-- was delivered and not settled.
--
-- Delivery tags belong to a channel.  A delivery remembers the channel (the
-- object, one per channel's life) it came on; settling it after that
-- channel was lost sends nothing: the broker has already given it back and
-- will redeliver it with `redelivered` set.  So a late outcome never reaches
-- a new channel, where its tag would close the channel (PRECONDITION_FAILED).
--
-- Acks with `multiple`.  The broker numbers a channel's deliveries 1, 2, 3
-- ...; the channel keeps `low`, the lowest tag whose outcome is not known
-- yet, and the tags above it that are settled already.  An ack of the
-- delivery at `low` is sent with `multiple` (it settles nothing else: every
-- tag below it is settled, and was sent), and the binding merges
-- consecutive ones that are still queued into one frame: a window of
-- deliveries acked in order costs the broker one ack per write instead of
-- one per delivery.  Any other ack, and every nack, settles its one tag.
-- A tag whose outcome is not known yet is never covered, so a handler that
-- runs long only stops the merging, never delays an ack.
--
-- A lost connection or channel makes fetch raise, so the consumer fails and
-- its supervisor restarts it; the next start connects again.  The source
-- never reconnects by itself: a dead node shows as a failing consumer.
local amqp = require "tide.supervision.sources.amqp"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"

local type, error, tostring, pairs, ipairs, setmetatable, getmetatable, format, tonumber =
  type, error, tostring, pairs, ipairs, setmetatable, getmetatable, string.format, tonumber
local opt_error = check.opt_error

local M = {}
local Source = {}
local Source_mt = { __index = Source, __tostring = function(s)
  return ("tide.sources.rabbitmq '%s' (%s)"):format(s.queue, s.consume_ch and "consuming" or "idle")
end }

local KEYS = check.options("tide.sources.rabbitmq", {
  url = true, queue = true, prefetch = true, declare = true, heartbeat = true, name = true,
  connect_timeout = true, max_redeliveries = true, confirm_timeout = true
})
local DECLARE_KEYS = check.options("rabbitmq declare", {
  durable = true, type = true, arguments = true, exclusive = true, auto_delete = true
})
local QUEUE_TYPES = { classic = true, quorum = true }
local PUBLISH_KEYS = check.options("source:publish", {
  exchange = true, routing_key = true, persistent = true, headers = true, content_type = true,
  content_encoding = true, message_id = true, correlation_id = true, reply_to = true,
  expiration = true, priority = true, type = true, app_id = true, timestamp = true, timeout = true
})
local MAX_BODY = 128 * 1024 * 1024   -- RabbitMQ's default max_message_size
local SEEN_MAX = 10000       -- keys of redelivered messages remembered for the consumer-side count
local ABOVE_MAX = 100000     -- deliveries settled above a channel's lowest unsettled one, counted at most

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- amqp://user:pass@host:port/vhost -> a connection config, or nil, reason.
local function parse_url(url)
  if url:match("^amqps://") then return nil, "amqps:// (TLS) is not supported; use amqp:// on a trusted network" end
  local rest = url:match("^amqp://(.*)$")
  if not rest then return nil, "amqp://user:pass@host:port/vhost expected" end
  local auth, hostport, path = rest:match("^([^@/]*)@([^/]*)(.*)$")
  if not auth then auth, hostport, path = nil, rest:match("^([^/]*)(.*)$") end
  local user, pass = "guest", "guest"
  if auth then
    user, pass = auth:match("^([^:]*):(.*)$")
    if not user then user, pass = auth, "" end
    user, pass = unescape(user), unescape(pass)
  end
  local host, port = hostport:match("^%[(.*)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
  if not host or host == "" then return nil, "no host" end
  port = tonumber(port) or 5672
  if port < 1 or port > 65535 then return nil, "bad port" end
  local vhost = "/"
  if path ~= "" and path ~= "/" then vhost = unescape(path:sub(2)) end
  return { host = host, port = port, vhost = vhost, user = user, password = pass }
end

local FIELD_DEPTH = 32      -- field tables nested deeper are refused by the binding (src/lua_amqp.c)

--- Whether v can be sent as an AMQP field table (as src/lua_amqp.c builds
--- one): nil, or the option's path, what was expected and what came.
local function bad_field_table(t, path, depth)
  if depth > FIELD_DEPTH then return path, "tables nested at most " .. FIELD_DEPTH .. " deep", "deeper" end
  local array = #t > 0
  for k, v in pairs(t) do
    local at
    if array then
      if type(k) ~= "number" then return path, "array or table with string keys", "a mixed table" end
      at = ("%s[%s]"):format(path, tostring(k))
    else
      if type(k) ~= "string" then return path, "table with string keys", type(k) .. " key" end
      at = path .. "." .. k
    end
    local tv = type(v)
    if tv == "table" then
      local p, want, got = bad_field_table(v, at, depth + 1)
      if p then return p, want, got end
    elseif tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
      return at, "string, number, boolean or table", tv
    end
  end
end

local function check_declare(fname, d)
  if d == nil or d == false then return false end
  if d == true then d = {} end
  if type(d) ~= "table" then opt_error(fname, "declare", "boolean or table", d, 3) end
  check.known(fname, d, DECLARE_KEYS, "declare.", 3)
  if d.type ~= nil and not QUEUE_TYPES[d.type] then opt_error(fname, "declare.type", check.choices(QUEUE_TYPES), d.type, 3) end
  if d.arguments ~= nil and type(d.arguments) ~= "table" then opt_error(fname, "declare.arguments", "table", d.arguments, 3) end
  if d.arguments ~= nil then
    local path, want, got = bad_field_table(d.arguments, "declare.arguments", 1)
    if path then error(("%s: bad option '%s' (%s expected, got %s)"):format(fname, path, want, got), 3) end
  end
  for _, k in ipairs{ "durable", "exclusive", "auto_delete" } do
    if d[k] ~= nil and type(d[k]) ~= "boolean" then opt_error(fname, "declare." .. k, "boolean", d[k], 3) end
  end
  local args = {}
  for k, v in pairs(d.arguments or {}) do args[k] = v end
  if d.type then args["x-queue-type"] = d.type end
  return { durable = d.durable ~= false, exclusive = d.exclusive == true, auto_delete = d.auto_delete == true,
           arguments = args }
end

--- tide.sources.rabbitmq{ url =, queue =, prefetch = 10, declare = false | true | { durable =, type =,
---   arguments =, exclusive =, auto_delete = }, heartbeat = 30, name = "tide", connect_timeout = 10000,
---   max_redeliveries = nil, confirm_timeout = 30000 }
function M.new(opts)
  local fname = "tide.sources.rabbitmq"
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  if type(opts.url) ~= "string" then opt_error(fname, "url", "string", opts.url) end
  local cfg, why = parse_url(opts.url)
  if not cfg then error(("%s: bad option 'url' (%s)"):format(fname, why), 2) end
  if opts.queue ~= nil and (type(opts.queue) ~= "string" or #opts.queue > 255) then
    opt_error(fname, "queue", "string of at most 255 bytes", opts.queue)
  end
  local prefetch = opts.prefetch or 10
  if not check.is_count(prefetch, 1) or prefetch > 65535 then opt_error(fname, "prefetch", "integer from 1 to 65535", opts.prefetch) end
  local heartbeat = opts.heartbeat or 30
  if not check.is_count(heartbeat) or heartbeat > 65535 then opt_error(fname, "heartbeat", "integer number of seconds (0: none)", opts.heartbeat) end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name) end
  local timeout = opts.connect_timeout or 10000
  if not check.is_ms(timeout, true) then opt_error(fname, "connect_timeout", "positive number of ms", opts.connect_timeout) end
  local max = opts.max_redeliveries
  if max ~= nil and not check.is_count(max) then opt_error(fname, "max_redeliveries", "integer >= 0", max) end
  local confirm_timeout = opts.confirm_timeout or 30000
  if not check.is_ms(confirm_timeout, true) then opt_error(fname, "confirm_timeout", "positive number of ms", opts.confirm_timeout) end
  local declare = check_declare(fname, opts.declare)
  cfg.name = opts.name or "tide"
  cfg.label = cfg.host:find(":", 1, true) and ("rabbitmq [%s]:%d"):format(cfg.host, cfg.port)
              or ("rabbitmq %s:%d"):format(cfg.host, cfg.port)
  cfg.heartbeat = heartbeat
  cfg.timeout = math.floor(timeout)
  return setmetatable({
    cfg = cfg, queue = opts.queue, prefetch = prefetch, declare = declare, max_redeliveries = max,
    confirm_timeout = confirm_timeout, name = "rabbitmq " .. (opts.queue or cfg.host),
    conn = false, consume_ch = false, pub_ch = false, pub_opening = false, opening = {}, waiting = false,
    seen = {}, seen_old = {}, seen_n = 0,
    stats = { delivered = 0, acked = 0, acked_multiple = 0, nacked = 0, stale = 0, dead_lettered = 0, published = 0,
              broker_closes = 0, precondition_failed = 0, last_close = false },
  }, Source_mt)
end

local function check_self(s, fname)
  if getmetatable(s) ~= Source_mt then
    error(("%s: bad self (rabbitmq source expected, got %s)"):format(fname, check.describe(s)), 3)
  end
end

-- ===== connection and channels, opened on demand

--- Runs open() for `key` once at a time: a second caller waits for the
--- first one's result (and opens itself when that opener died meanwhile).
local function once(s, key, open)
  while true do
    local p = s.opening[key]
    if not p then break end
    if not p.t or S.attempt_of(p.t) ~= p.co then    -- its opener was cancelled or timed out
      s.opening[key] = nil
      break
    end
    local t, tok = S.wait_begin("rabbitmq source", 3)
    S.add_waiter(p.waiters, t, tok)
    S.wait_end(t, tok, 1000)
    S.remove_waiter(p.waiters, t)
  end
  local me = S.current()
  local p = { t = me, co = me and S.attempt_of(me), waiters = {} }
  s.opening[key] = p
  local ok, res = pcall(open)
  if s.opening[key] == p then s.opening[key] = nil end
  S.wake_all(p.waiters)
  if not ok then error(res, 0) end
  return res
end

--- The source's connection, opened when there is none or it was lost.
function Source:connection()
  local c = self.conn
  if c and not c.lost then return c end
  return once(self, "conn", function()
    c = self.conn
    if c and not c.lost then return c end
    c = amqp.connect(self.cfg)
    self.conn = c
    return c
  end)
end

local function declare_queue(s, ch)
  local d = s.declare
  return ch:call("declare", "queue.declare-ok", s.queue, false, d.durable, d.exclusive, d.auto_delete, d.arguments)
end

-- ===== consuming

--- How many times this message was delivered before: the quorum queue's
--- x-delivery-count, or, for other queues, how often this source saw it
--- come back (keyed by message_id, else by body).
local function delivery_count(s, d)
  local n = d.headers["x-delivery-count"]
  if type(n) == "number" then return n end
  if not d.redelivered then return 0 end
  local key = d.properties.message_id or d.body
  local seen = (s.seen[key] or s.seen_old[key] or 0) + 1
  if s.seen[key] == nil then
    s.seen_n = s.seen_n + 1
    if s.seen_n > SEEN_MAX then s.seen_old, s.seen, s.seen_n = s.seen, {}, 1 end
  end
  s.seen[key] = seen
  d._key = key
  return seen
end

local NONE = setmetatable({}, { __newindex = function() error("a delivery's headers and properties are read-only", 2) end })

--- Notes that the delivery `tag` of channel ch is settled (its ack or nack
--- was sent); true when it was the lowest one not settled (then every tag
--- up to it is settled).  A channel whose lowest unsettled delivery stays
--- unsettled while ABOVE_MAX later ones are settled (a handler that hangs
--- without a timeout) stops counting: its acks settle one tag each from
--- then on, and the memory of the count is bounded.
local function settled(ch, tag)
  local low = ch.low
  if tag ~= low then
    if low then
      ch.above[tag] = true
      ch.n_above = ch.n_above + 1
      if ch.n_above > ABOVE_MAX then ch.low, ch.above = false, false end
    end
    return false
  end
  local above, n = ch.above, ch.n_above
  low = low + 1
  while above[low] do
    above[low] = nil
    low, n = low + 1, n - 1
  end
  ch.low, ch.n_above = low, n
  return true
end

-- A delivery's delivery_count is stored only when it is not 0: eight
-- fields fill a table's eight hash slots exactly, and a ninth would double
-- them (448 bytes instead of 256, for every delivery: the collector's work).
local Delivery_mt = { __index = { delivery_count = 0 } }

--- A delivery: tag, body, redelivered, exchange, routing_key, properties,
--- headers, delivery_count, and the channel it came on (one constructor:
--- the table is allocated once, at its final size).
local function on_deliver(s, ch, tag, redelivered, exchange, routing_key, body, props)
  if ch.lost then return end                         -- closing: the broker requeues it
  props = props or NONE
  local d = setmetatable({ tag = tag, body = body, redelivered = redelivered, exchange = exchange,
                           routing_key = routing_key, properties = props, headers = props.headers or NONE,
                           _ch = ch }, Delivery_mt)
  s.stats.delivered = s.stats.delivered + 1
  local count = delivery_count(s, d)
  if count ~= 0 then d.delivery_count = count end
  local max = s.max_redeliveries
  if max and d.delivery_count > max then
    s.stats.dead_lettered = s.stats.dead_lettered + 1
    ch:send("nack", d.tag, false, false)
    settled(ch, d.tag)
    log.report(s.name, format("delivery %s was delivered %d times, more than max_redeliveries (%d): "
      .. "rejected without requeue (to the queue's dead-letter exchange, if it has one)",
      tostring(d.tag), d.delivery_count + 1, max))
    return
  end
  local buf = ch.buffer
  buf.n = buf.n + 1
  buf[buf.n] = d
  S.notify(s)
end

--- Opens the consuming channel: qos, the queue's declaration, consume.
--- Called by tide.consumer when a run starts; waits.
function Source:start()
  check_self(self, "source:start")
  if not self.queue then error(self.name .. ": no queue to consume from (option 'queue')", 2) end
  self:stop()
  local conn = self:connection()
  -- The channel is the source's from its creation, before any wait: a run
  -- cancelled while it opens (or while qos, declare or consume wait) ends
  -- with stop(), which closes it.  Otherwise an orphan channel would hold
  -- a prefetch window of deliveries that nobody reads: a zombie node.
  local ch = conn:channel{
    created = function(c)
      c.buffer = { head = 1, n = 0 }
      c.low, c.above, c.n_above = 1, {}, 0          -- see "Acks with `multiple`" above
      self.consume_ch = c
    end,
    deliver = function(c, tag, re, ex, rk, body, props) on_deliver(self, c, tag, re, ex, rk, body, props) end,
    lost = function(_, reason)
      if reason:find("by the broker", 1, true) then
        self.stats.broker_closes = self.stats.broker_closes + 1
        self.stats.last_close = reason
        if reason:find("PRECONDITION_FAILED", 1, true) then
          self.stats.precondition_failed = self.stats.precondition_failed + 1
        end
      end
      S.notify(self)
    end,
  }
  local ok, err = pcall(function()
    ch:call("qos", "basic.qos-ok", self.prefetch)
    if self.declare then declare_queue(self, ch) end
    ch:call("consume", "basic.consume-ok", self.queue, "", false, nil)
  end)
  if not ok then self:stop(); error(err, 0) end
end

--- Closes the consuming channel: the broker requeues what it delivered and
--- nobody settled.  Never waits.
function Source:stop()
  check_self(self, "source:stop")
  local ch = self.consume_ch
  self.consume_ch = false
  if ch then ch:close("consumer stopped") end
end

--- Up to n deliveries; waits up to wait_ms for the first when none is
--- there.  Raises when the channel or its connection is lost.
function Source:fetch(n, wait_ms)
  check_self(self, "source:fetch")
  local ch = self.consume_ch
  if not ch then error(self.name .. ": not consuming (call source:start first)", 2) end
  local buf = ch.buffer
  if buf.head > buf.n and not ch.lost and wait_ms and wait_ms > 0 then
    S.wait_for(self, "source:fetch", wait_ms)
  end
  if ch.lost then error(self.name .. ": " .. ch.lost, 0) end
  local out, k, head = {}, 0, buf.head
  while k < n and head <= buf.n do
    k = k + 1
    out[k] = buf[head]
    buf[head] = nil
    head = head + 1
  end
  buf.head = head
  if head > buf.n then buf.head, buf.n = 1, 0 end    -- empty: start over at 1
  return out
end

--- Raises when delivery tag `tag` of channel ch was settled already: a
--- second ack or nack of a tag closes the channel (406 PRECONDITION_FAILED),
--- and every delivery in flight on it comes back to be handled again.
--- (Once a channel stopped counting, see settled, it cannot tell.)
local function check_unsettled(s, ch, tag, fname)
  local low = ch.low
  if low and (tag < low or ch.above[tag]) then
    error(format("%s: %s: delivery %s is settled already (an ack or nack was sent for it)", fname, s.name,
                 tostring(tag)), 3)
  end
end

local function check_delivery(d, fname)
  if getmetatable(d) ~= Delivery_mt then check.arg_error(fname, 1, "delivery of a rabbitmq source", d, 3) end
end

--- Settles a delivery on the channel it came on; false when that channel
--- is gone (the broker gave the delivery back: nothing to send).
function Source:ack(d)
  check_self(self, "source:ack")
  check_delivery(d, "source:ack")
  local ch = d._ch
  if ch.lost then
    self.stats.stale = self.stats.stale + 1
    return false
  end
  local tag = d.tag
  check_unsettled(self, ch, tag, "source:ack")
  local multiple = settled(ch, tag)
  local ok, err = ch.conn.raw:ack(ch.num, tag, multiple)
  if not ok then ch.conn:lose(err); error(ch.conn.name .. ": " .. tostring(err), 0) end
  local stats = self.stats
  stats.acked = stats.acked + 1
  if multiple then stats.acked_multiple = stats.acked_multiple + 1 end
  if d._key and self.seen[d._key] then self.seen[d._key] = nil end
  return true
end

function Source:nack(d, requeue)
  check_self(self, "source:nack")
  check_delivery(d, "source:nack")
  local ch = d._ch
  if ch.lost then
    self.stats.stale = self.stats.stale + 1
    return false
  end
  check_unsettled(self, ch, d.tag, "source:nack")
  local ok, err = ch.conn.raw:nack(ch.num, d.tag, false, requeue and true or false)
  settled(ch, d.tag)
  if not ok then ch.conn:lose(err); error(ch.conn.name .. ": " .. tostring(err), 0) end
  self.stats.nacked = self.stats.nacked + 1
  return true
end

-- ===== publishing with confirms

local function on_confirm(ch, ev, method)
  local result = method == "basic.ack" and "ack" or "nack"
  local function resolve(seq)
    local w = ch.unconfirmed[seq]
    if w then
      ch.unconfirmed[seq] = nil
      w.result = result
      S.wake(w.t, w.tok)
    end
  end
  local tag = ev.delivery_tag
  if ev.multiple then
    for seq = ch.low, tag do resolve(seq) end
    if tag >= ch.low then ch.low = tag + 1 end
  else
    resolve(tag)
  end
end

local function on_publisher_lost(ch)
  for seq, w in pairs(ch.unconfirmed) do
    ch.unconfirmed[seq] = nil
    S.wake(w.t, w.tok)
  end
end

--- The channel in confirm mode that publishes, opened on demand.
function Source:publisher()
  local ch = self.pub_ch
  if ch and not ch.lost then return ch end
  return once(self, "pub", function()
    ch = self.pub_ch
    if ch and not ch.lost then return ch end
    local conn = self:connection()
    -- A channel left half-open by an opener that was cancelled is closed.
    if self.pub_opening then self.pub_opening:close() end
    ch = conn:channel{ confirm = on_confirm, lost = on_publisher_lost,
                       created = function(c)
                         c.unconfirmed, c.seq, c.low = {}, 0, 1
                         self.pub_opening = c
                       end }
    ch:call("confirm", "confirm.select-ok")
    self.pub_opening = false
    if self.declare then declare_queue(self, ch) end
    self.pub_ch = ch
    return ch
  end)
end

local function publish_props(fname, o)
  local p = { headers = o.headers, content_type = o.content_type, content_encoding = o.content_encoding,
              message_id = o.message_id, correlation_id = o.correlation_id, reply_to = o.reply_to,
              expiration = o.expiration, type = o.type, app_id = o.app_id, priority = o.priority,
              timestamp = o.timestamp, delivery_mode = o.persistent == false and 1 or 2 }
  for _, k in ipairs{ "content_type", "content_encoding", "message_id", "correlation_id", "reply_to",
                      "expiration", "type", "app_id", "exchange", "routing_key" } do
    if o[k] ~= nil and (type(o[k]) ~= "string" or #o[k] > 255) then
      opt_error(fname, k, "string of at most 255 bytes", o[k], 3)
    end
  end
  if o.headers ~= nil and type(o.headers) ~= "table" then opt_error(fname, "headers", "table", o.headers, 3) end
  if o.persistent ~= nil and type(o.persistent) ~= "boolean" then opt_error(fname, "persistent", "boolean", o.persistent, 3) end
  if o.priority ~= nil and not (check.is_count(o.priority) and o.priority <= 255) then
    opt_error(fname, "priority", "integer from 0 to 255", o.priority, 3)
  end
  if o.timestamp ~= nil and not (check.is_count(o.timestamp) and o.timestamp <= 2 ^ 53) then   -- C casts it to uint64_t
    opt_error(fname, "timestamp", "integer from 0 to 2^53 (seconds since the epoch)", o.timestamp, 3)
  end
  if o.timeout ~= nil and not check.is_ms(o.timeout, true) then opt_error(fname, "timeout", "positive number of ms", o.timeout, 3) end
  return p
end

--- Publishes `body` and waits until the broker confirms it holds it (a
--- persistent message to a durable queue: on disk).  Raises when the broker
--- refuses it (basic.nack), when the connection or channel is lost before
--- the confirm (the message may or may not be held: publish again, and
--- let consumers be idempotent), or when no confirm comes in time.
--- Options: exchange ("" by default), routing_key (the source's queue by
--- default), persistent (true), headers, the AMQP properties, timeout (ms).
function Source:publish(body, opts)
  local fname = "source:publish"
  check_self(self, fname)
  if type(body) ~= "string" then check.arg_error(fname, 1, "string", body) end
  if #body > MAX_BODY then
    error(("%s: bad argument #1 (a body of %d bytes is larger than RabbitMQ's default max_message_size, %d)")
      :format(fname, #body, MAX_BODY), 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then check.arg_error(fname, 2, "table", opts) end
  check.known(fname, opts, PUBLISH_KEYS)
  local props = publish_props(fname, opts)
  local rk = opts.routing_key or self.queue
  if rk == nil then error(fname .. ": no routing_key (and the source has no queue)", 2) end
  -- Where the confirm cannot be waited for (outside a task, in a callback),
  -- refuse before anything is sent: wait_begin raises the reason.
  if not S.in_task() then S.wait_begin(fname, 2) end
  local ch = self:publisher()
  -- The broker numbers the messages it took on this channel: a message
  -- counts only once it was sent (headers that cannot be encoded raise
  -- before any byte goes out, and a seq counted for them would pair every
  -- later confirm with the message before it).
  local seq = ch.seq + 1
  local ok, err = pcall(ch.conn.send, ch.conn, "publish", ch.num, opts.exchange or "", rk, body, props)
  if not ok then
    if ch.lost or ch.conn.lost then error(err, 0) end
    error(fname .. ": " .. tostring(err):gsub("^[^:]*:%d+: ", ""), 2)   -- headers that cannot be sent
  end
  ch.seq = seq
  local t, tok = S.wait_begin(fname, 2)
  local w = { t = t, tok = tok, result = false }
  ch.unconfirmed[seq] = w
  local timeout = opts.timeout or self.confirm_timeout
  S.wait_end(t, tok, timeout)
  ch.unconfirmed[seq] = nil
  if w.result == "ack" then
    self.stats.published = self.stats.published + 1
    return true
  elseif w.result == "nack" then
    error(self.name .. ": the broker refused the message (basic.nack)", 2)
  elseif ch.lost then
    error(format("%s: %s before the broker confirmed the message (it may or may not be held)", self.name, ch.lost), 2)
  end
  error(format("%s: no confirm within %g ms (the message may or may not be held)", self.name, timeout), 2)
end

-- ===== the queue itself

--- Facts about the queue: { messages = ready count, consumers = count }
--- (a passive declare; raises when the queue does not exist).
function Source:queue_info()
  check_self(self, "source:queue_info")
  local conn = self:connection()
  local ch = conn:channel()
  local ok, r = pcall(ch.call, ch, "declare", "queue.declare-ok", self.queue, true, false, false, false, nil)
  ch:close()
  if not ok then error(r, 0) end
  return { messages = r.message_count, consumers = r.consumer_count }
end

--- Declares the queue as the `declare` option says (done by start and the
--- publisher too); returns the queue.declare-ok reply's counts.
function Source:declare_queue()
  check_self(self, "source:declare_queue")
  if not self.declare then error("source:declare_queue: the source has no 'declare' option", 2) end
  local ch = self:connection():channel()
  local ok, r = pcall(declare_queue, self, ch)
  ch:close()
  if not ok then error(r, 0) end
  return { messages = r.message_count, consumers = r.consumer_count }
end

--- Deletes the queue (for tests and tools); returns how many messages it held.
function Source:delete_queue()
  check_self(self, "source:delete_queue")
  local ch = self:connection():channel()
  local ok, r = pcall(ch.call, ch, "delete", "queue.delete-ok", self.queue)
  ch:close()
  if not ok then error(r, 0) end
  return r.message_count
end

--- Closes the connection (the broker requeues every unsettled delivery).
function Source:close()
  check_self(self, "source:close")
  self.consume_ch, self.pub_ch = false, false
  if self.conn then self.conn:close() end
  self.conn = false
end

return M
