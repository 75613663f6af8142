--- tide.supervision.consumer — takes deliveries from a source and runs each as a supervised task, acking or nacking every one exactly once.
--
-- A source is a small interface (tide.sources.memory is one; a RabbitMQ
-- source fits the same):
--   source:fetch(n)          -> a list of at most n deliveries { tag =, body = } (may wait)
--   source:ack(tag)          the delivery is done
--   source:nack(tag, requeue) the delivery failed; requeue it or not
--
-- The promise: every delivery the consumer took is acked or nacked exactly
-- once.  A handler's outcome settles its delivery (ok: ack; anything else:
-- nack); a consumer that ends for any reason (an error, a cancel, its
-- supervisor stopping it) first nacks, with requeue, every delivery it still
-- holds, and cancels their handlers, so a restarted consumer begins with its
-- prefetch window empty and the broker never counts a dead node as busy.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local spawn = require("tide.engine.task").spawn

local type, pairs, pcall, tostring, setmetatable, getmetatable, error =
  type, pairs, pcall, tostring, setmetatable, getmetatable, error
local opt_error = check.opt_error

local M = {}
-- For metrics: consumers not yet collected, and process-wide counts by
-- consumer name (they outlive the consumers): deliveries taken, acks, nacks.
M.live = setmetatable({}, { __mode = "k" })
M.totals = {}
local function totals_of(name)
  local t = M.totals[name]
  if not t then t = { delivered = 0, acked = 0, nacked = 0 }; M.totals[name] = t end
  return t
end
local Consumer = {}
local Consumer_mt = { __index = Consumer, __tostring = function(c)
  return ("tide.Consumer '%s' (%d in flight)"):format(c.name, c.in_flight)
end }

local KEYS = { source = true, prefetch = true, handler = true, name = true, requeue = true, poll = true }
local HANDLER_KEYS = { run = true, handle_result = true, timeout = true, retry = true, mode = true }

--- tide.consumer{ source =, prefetch = 10, handler = { run =, handle_result =, timeout =, retry = },
---                requeue = true, poll = 50, name = "consumer" }
function M.new(opts)
  local fname = "tide.consumer"
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  local src = opts.source
  if type(src) ~= "table" or type(src.fetch) ~= "function" or type(src.ack) ~= "function"
     or type(src.nack) ~= "function" then
    opt_error(fname, "source", "source with fetch, ack and nack", src)
  end
  local prefetch = opts.prefetch or 10
  if not check.is_count(prefetch, 1) then opt_error(fname, "prefetch", "integer >= 1", opts.prefetch) end
  local h = opts.handler
  if type(h) ~= "table" then opt_error(fname, "handler", "table", h) end
  check.known(fname, h, HANDLER_KEYS, "handler.")
  if type(h.run) ~= "function" then opt_error(fname, "handler.run", "function", h.run) end
  if h.handle_result ~= nil and type(h.handle_result) ~= "function" then
    opt_error(fname, "handler.handle_result", "function", h.handle_result)
  end
  if opts.poll ~= nil and not check.is_ms(opts.poll, true) then opt_error(fname, "poll", "positive number of ms", opts.poll) end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name) end
  local c = setmetatable({ source = src, prefetch = prefetch, handler = h, name = opts.name or "consumer",
                           requeue = opts.requeue ~= false, poll = opts.poll or 50,
                           held = {}, in_flight = 0, waiting = false }, Consumer_mt)
  c.totals = totals_of(c.name)
  M.live[c] = true
  return c
end


--- Settles a delivery once: ack after ok, nack otherwise.  A broker error
--- here is logged; the delivery counts as settled (the broker redelivers
--- what it never heard of once the channel is gone).
local function settle(c, d, status, requeue)
  if c.held[d.tag] ~= d then return end     -- settled already
  c.held[d.tag] = nil
  c.in_flight = c.in_flight - 1
  if requeue == nil then requeue = c.requeue end
  local ok, err
  local tot = c.totals
  if status == "ok" then ok, err = pcall(c.source.ack, c.source, d.tag); tot.acked = tot.acked + 1
  else ok, err = pcall(c.source.nack, c.source, d.tag, requeue); tot.nacked = tot.nacked + 1 end
  if not ok then log.report(c.name .. " settling delivery " .. tostring(d.tag), err) end
  S.notify(c)
end

local function run_delivery(c, d)
  local h = c.handler
  d.task = spawn{
    run = h.run, args = { d.body, d }, timeout = h.timeout, retry = h.retry, mode = h.mode,
    name = c.name .. " #" .. tostring(d.tag),
    handle_result = function(status, value, task)
      settle(c, d, status)
      if h.handle_result then h.handle_result(status, value, task, d) end
    end,
  }
end

--- Holds every delivery of a batch first, then starts their handlers; a
--- handler that cannot start (say, a body that cannot cross to a thread)
--- fails its delivery alone, which is nacked without requeue: it would
--- never start (a poison message).
local function run_batch(c, batch)
  for i = 1, #batch do
    local d = batch[i]
    c.held[d.tag] = d
    c.in_flight = c.in_flight + 1
  end
  c.totals.delivered = c.totals.delivered + #batch
  for i = 1, #batch do
    local ok, err = pcall(run_delivery, c, batch[i])
    if not ok then
      log.report(c.name .. " starting delivery " .. tostring(batch[i].tag), err)
      settle(c, batch[i], "error", false)
    end
  end
end

--- Nacks (requeue) everything still held and cancels its handlers.
local function release_all(c, why)
  for _, d in pairs(c.held) do
    settle(c, d, "cancelled")
    if d.task and not S.TERMINAL[d.task:status()] then d.task:cancel(why) end
  end
end

--- The consumer loop; run it as a task or as a supervisor child
--- (`start = function(ctx) return consumer:run(ctx) end`).  Returns when
--- ctx:stopping() (after its deliveries are settled), raises when the
--- source fails.
function Consumer.run(c, ctx)
  if getmetatable(c) ~= Consumer_mt then error("consumer:run: bad self (consumer expected)", 2) end
  local me = S.current()
  if me == nil then error("consumer:run: called outside a task", 2) end
  -- What an earlier run left (an attempt of a task with retry ends without
  -- its on_finish) is given back first: nothing is ever orphaned.
  release_all(c, "consumer " .. c.name .. " restarted")
  c.held, c.in_flight = {}, 0
  local o = S.options(me)
  if o.consumer ~= c then                        -- once per task, not per attempt
    o.consumer = c
    S.on_finish(me, function()                   -- however the consumer ends
      release_all(c, "consumer " .. c.name .. " ended")
    end)
  end
  while not ((ctx and ctx.stopping and ctx:stopping()) or S.shutting_down()) do
    if c.in_flight < c.prefetch then
      local batch = c.source:fetch(c.prefetch - c.in_flight)
      run_batch(c, batch)
      if #batch == 0 then
        S.sleep(c.poll)
      elseif c.in_flight < c.prefetch then
        S.sleep(0)                           -- settled at once: let the others run before the next fetch
      end
    else
      S.wait_for(c, "consumer", c.poll)      -- until a delivery settles
    end
  end
  while c.in_flight > 0 do                        -- stopping: let the handlers finish
    S.wait_for(c, "consumer", c.poll)
  end
  return "stopped"
end

return M
