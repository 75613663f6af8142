--- tide.supervision.consumer — takes deliveries from a source and runs each as a supervised task, acking or nacking every one exactly once.
--
-- A source is a small interface (tide.sources.memory and
-- tide.sources.rabbitmq fit it):
--   source:start()            optional: begin taking deliveries (may wait; raises when it cannot)
--   source:fetch(n, wait_ms)  -> a list of at most n deliveries { tag =, body =, ... }; may
--                             wait up to wait_ms for the first; raises when the source is lost
--   source:ack(d)             the delivery is done
--   source:nack(d, requeue)   the delivery failed; requeue it or not
--   source:stop()             optional: stop taking deliveries; whatever the source
--                             delivered and nobody settled goes back to the broker
--
-- The promise: every delivery the consumer took is acked or nacked exactly
-- once, or given back by the broker when its channel died.  A handler's
-- outcome settles its delivery (ok: ack; anything else: nack; the handler's
-- handle_result may choose per delivery by returning "ack", "requeue" or
-- "drop").  A consumer run that ends for any reason (an error, a cancel, its
-- supervisor stopping it, the end of a retried attempt) first nacks, with
-- requeue, every delivery it still holds, cancels their handlers and stops
-- its source, so a restarted consumer begins with its prefetch window empty
-- and the broker never counts a dead node as busy.
--
-- One consumer object is run by one task at a time: a second concurrent
-- run raises (it would release the first run's healthy handlers).
local S = require "tide.engine.sched"
local fields = require "tide.engine.fields"
local ATTEMPTS, VALUE = fields.ATTEMPTS, fields.VALUE   -- (not t.attempts, t.value: a user may write those names)
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local retry = require "tide.engine.retry"
local thread = require "tide.engine.thread"
local make_task = require("tide.engine.task").make_task

local type, pairs, pcall, tostring, setmetatable, getmetatable, error =
  type, pairs, pcall, tostring, setmetatable, getmetatable, error
local co_yield = coroutine.yield
local opt_error = check.opt_error

local M = {}
-- For metrics: consumers not yet collected, and process-wide counts by
-- consumer name (they outlive the consumers): deliveries taken, acks, nacks.
M.live = setmetatable({}, { __mode = "k" })
M.totals = {}
-- A source that starts (a consuming channel: tide.sources.rabbitmq) -> the
-- consumer whose run consumes it: one run at a time, as a second run's
-- start would close the first one's channel and the first one's end the
-- second's.
local consumed_by = setmetatable({}, { __mode = "k" })
local function totals_of(name)
  local t = M.totals[name]
  if not t then t = { delivered = 0, acked = 0, nacked = 0, settle_errors = 0 }; M.totals[name] = t end
  return t
end
local Consumer = {}
local Consumer_mt = { __index = Consumer, __tostring = function(c)
  return ("tide.Consumer '%s' (%d in flight)"):format(c.name, c.in_flight)
end }

-- `prefetch` is the old name of concurrency (README: Vocabulary); a
-- source's own prefetch is the broker's window, and stays so named.
local KEYS = check.options("tide.consumer", {
  source = true, concurrency = true, prefetch = true, handler = true, name = true, requeue = true,
  poll = true
}, { prefetch = "concurrency" })
local HANDLER_KEYS = check.options("consumer handler", {
  run = true, handle_result = true, timeout = true, retry = true, mode = true
})
local CHOICES = { ack = true, requeue = true, drop = true }

--- Checks the handler as tide.spawn checks a task spec, so a wrong option
--- raises here, at the caller's line, and not for every delivery later.
local function check_handler(fname, h)
  local L = 3                                  -- the user's line: new's caller
  if type(h) ~= "table" then opt_error(fname, "handler", "table", h, L) end
  check.known(fname, h, HANDLER_KEYS, "handler.", L)
  if h.mode ~= nil and h.mode ~= "coroutine" and h.mode ~= "thread" and h.mode ~= "process" then
    opt_error(fname, "handler.mode", "'coroutine', 'thread' or 'process'", h.mode, L)
  end
  if h.mode == "thread" or h.mode == "process" then
    if type(h.run) ~= "function" and type(h.run) ~= "string" then
      opt_error(fname, "handler.run", "function or \"module.function\"", h.run, L)
    end
    local ok, err = pcall(thread.payload, fname, h.run, nil, 1, "a " .. h.mode)
    if not ok then error((tostring(err):gsub("^[^:]*:%d+: ", ""):gsub("bad option 'run'", "bad option 'handler.run'")), L) end
  elseif type(h.run) ~= "function" then
    opt_error(fname, "handler.run", "function", h.run, L)
  end
  if h.timeout ~= nil and not check.is_ms(h.timeout, true) then
    opt_error(fname, "handler.timeout", "positive number of ms", h.timeout, L)
  end
  if h.retry ~= nil then retry.policy(fname, h.retry, L, "handler.") end
  if h.handle_result ~= nil and type(h.handle_result) ~= "function" then
    opt_error(fname, "handler.handle_result", "function", h.handle_result, L)
  end
end

--- tide.consumer{ source =, concurrency = source.prefetch or 10, handler = { run =, handle_result =,
---                timeout =, retry =, mode = }, requeue = true, poll = 50, name = "consumer" }
function M.new(opts)
  local fname = "tide.consumer"
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  local src = opts.source
  if type(src) ~= "table" or type(src.fetch) ~= "function" or type(src.ack) ~= "function"
     or type(src.nack) ~= "function" then
    opt_error(fname, "source", "source with fetch, ack and nack", src)
  end
  local given = check.renamed(fname, opts, "prefetch", "concurrency")
  local prefetch = given or (check.is_count(src.prefetch, 1) and src.prefetch) or 10
  if not check.is_count(prefetch, 1) then opt_error(fname, "concurrency", "integer >= 1", given) end
  check_handler(fname, opts.handler)
  if opts.poll ~= nil and not check.is_ms(opts.poll, true) then opt_error(fname, "poll", "positive number of ms", opts.poll) end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name) end
  if opts.requeue ~= nil and type(opts.requeue) ~= "boolean" then opt_error(fname, "requeue", "boolean", opts.requeue) end
  local h = opts.handler
  local c = setmetatable({ source = src, prefetch = prefetch, handler = h, name = opts.name or "consumer",
                           policy = h.retry ~= nil and retry.policy(fname, h.retry) or nil,
                           requeue = opts.requeue ~= false, poll = opts.poll or 50,
                           held = {}, in_flight = 0, waiting = false, runner = false }, Consumer_mt)
  c.totals = totals_of(c.name)
  M.live[c] = true
  return c
end

-- ===== settling

--- Settles a delivery once: ack after ok, nack otherwise, unless `choice`
--- ("ack", "requeue", "drop") says how.  A broker error here is logged and
--- counted as a settle error, not as an ack or nack; the delivery counts as
--- settled (the broker redelivers what it never heard of once the channel
--- is gone).
local function settle(c, d, status, choice)
  if not c.held[d] then return end           -- settled already
  c.held[d] = nil
  c.in_flight = c.in_flight - 1
  local src, tot, ok, err, counter = c.source, c.totals
  if choice == "ack" or (choice == nil and status == "ok") then
    ok, err = pcall(src.ack, src, d)
    counter = "acked"
  else
    local requeue = c.requeue
    if choice == "requeue" then requeue = true elseif choice == "drop" then requeue = false end
    ok, err = pcall(src.nack, src, d, requeue)
    counter = "nacked"
  end
  if not ok then
    counter = "settle_errors"
    log.report(c.name .. " settling delivery " .. tostring(d.tag), err)
  end
  tot[counter] = tot[counter] + 1
  S.notify(c)
end

--- The user's handle_result, protected; returns its choice, if valid.
local function choose(c, h, status, value, task, d)
  local ok, r = S.protected("handle_result", h.handle_result, status, value, task, d)
  if not ok then
    log.report("handle_result of " .. c.name .. " delivery " .. tostring(d.tag), r, r)
  elseif r ~= nil then
    if CHOICES[r] then return r end
    log.report("handle_result of " .. c.name .. " delivery " .. tostring(d.tag),
      ("returned %s ('ack', 'requeue', 'drop' or nothing expected): settled as its status says"):format(check.describe(r)))
  end
  return nil
end

--- What a thread-mode handler receives as its delivery: the plain fields
--- (not the channel), and the delivery_count a source may give through a
--- metatable (tide.sources.rabbitmq stores it only when it is not 0).
local function plain(d)
  local p = {}
  for k, v in pairs(d) do
    if type(k) == "string" and k:sub(1, 1) ~= "_" and k ~= "task" then p[k] = v end
  end
  if p.delivery_count == nil then p.delivery_count = d.delivery_count end
  return p
end

--- The end of a handler's task (the engine's internal hook, inside its one
--- door): the user's handle_result may choose, then the delivery settles.
local function delivery_done(t)
  local o = S.options(t)
  local c, d = o.consumer_of, o.delivery
  local h = c.handler
  local status = S.state(t)
  local choice = h.handle_result and choose(c, h, status, t[VALUE], t, d)
  settle(c, d, status, choice)
end

--- A coroutine handler's task function: handler.run(body, delivery), read
--- from the task's options (no argument table per delivery).
local function handle()
  local o = S.options(S.current())
  local d = o.delivery
  return o.consumer_of.handler.run(d.body, d)
end

--- Starts the handler of a delivery.  Coroutine handlers are built here
--- directly from the options checked once at creation (a delivery costs a
--- task and its argument table, nothing more); thread handlers go through
--- make_task, which encodes their arguments.
local function run_delivery(c, d)
  local h = c.handler
  local t
  if h.mode == "thread" or h.mode == "process" then
    t = make_task("tide.consumer", "coroutine", { run = h.run, args = { d.body, plain(d) }, timeout = h.timeout,
                                                  retry = h.retry, mode = h.mode, name = c.name })
    local o = S.options(t)
    o.consumer_of, o.delivery, o.on_finish = c, d, delivery_done
  elseif c.policy or h.timeout then
    t = S.new_task(handle, { timeout = h.timeout, retry = c.policy, name = c.name,
                             consumer_of = c, delivery = d, on_finish = delivery_done })
  else
    t = S.new_task(handle, { name = c.name, consumer_of = c, delivery = d, on_finish = delivery_done })
  end
  c.held[d] = t
  S.start(t)
end

--- Raises when what source:fetch returned is not a list of delivery tables;
--- the good deliveries of such a list go back first (nacked with requeue:
--- they never ran), so that none is left unsettled.
local function check_batch(c, batch)
  local why
  if type(batch) ~= "table" then
    why = "returned " .. check.describe(batch)
  else
    for i = #batch, 1, -1 do
      if type(batch[i]) ~= "table" then why = ("returned a list whose item %d is %s"):format(i, check.describe(batch[i])) end
    end
  end
  if not why then return end
  if type(batch) == "table" then
    for i = 1, #batch do
      local d = batch[i]
      if type(d) == "table" and not c.held[d] then
        c.held[d] = true
        c.in_flight = c.in_flight + 1
        settle(c, d, "cancelled", "requeue")
      end
    end
  end
  error(("consumer:run: consumer '%s': source:fetch %s (a list of deliveries expected)"):format(c.name, why), 0)
end

--- Holds every delivery of a batch first (c.held maps each to true, then
--- to its handler's task), then starts their handlers; a
--- handler that cannot start (say, a body that cannot cross to a thread)
--- fails its delivery alone: handle_result sees it ("error", the reason,
--- no task) and may choose, else it is nacked without requeue: it would
--- never start (a poison message).
local function run_batch(c, got)
  local batch = {}
  for i = 1, #got do
    local d = got[i]
    if c.held[d] then                        -- a faulty source gave it twice: it runs and settles once
      log.report(c.name .. " fetching", ("its source returned delivery %s again while held: ignored"):format(tostring(d.tag)))
    else
      c.held[d] = true
      c.in_flight = c.in_flight + 1
      batch[#batch + 1] = d
    end
  end
  c.totals.delivered = c.totals.delivered + #batch
  local h = c.handler
  for i = 1, #batch do
    local d = batch[i]
    local ok, err = pcall(run_delivery, c, d)
    if not ok then
      log.report(c.name .. " starting delivery " .. tostring(d.tag), err)
      local choice = h.handle_result and choose(c, h, "error", err, nil, d)
      settle(c, d, "error", choice or "drop")
    end
  end
end

--- Nacks (requeue) everything still held and cancels its handlers.  A
--- delivery whose handler has its outcome already is inside its
--- handle_result, which ended this run (a cancel of the consumer's task):
--- it settles as its outcome says (an ok is acked, not handled again),
--- before the source stops; its handle_result's choice comes too late.
local function release_all(c, why)
  for d, t in pairs(c.held) do
    local status = t ~= true and t:status()
    if status and S.TERMINAL[status] then
      settle(c, d, status)
    else
      settle(c, d, "cancelled", "requeue")     -- (whatever `requeue` says: it never failed)
      if t ~= true then t:cancel(why) end
    end
  end
end

--- The end of a run, however it ends: give back what is held, stop the source.
local function end_run(c, t, why)
  if c.runner ~= t then return end
  release_all(c, why)
  c.held, c.in_flight = {}, 0
  local src = c.source
  if consumed_by[src] == c then consumed_by[src] = nil end
  if src.stop then
    local ok, err = pcall(src.stop, src)
    if not ok then log.report(c.name .. " stopping its source", err) end
  end
  c.runner = false
end

--- Makes the end of the current attempt of t end the run (once per attempt).
local function on_attempt_end(c, t)
  local o = S.options(t)
  if o.consumer_attempt == t[ATTEMPTS] and o.consumer == c then return end
  o.consumer, o.consumer_attempt = c, t[ATTEMPTS]
  S.on_attempt_end(t, function(task)
    o.consumer = nil
    end_run(c, task, "consumer " .. c.name .. " ended")
  end)
end

--- The consumer loop; run it as a task or as a supervisor child
--- (`start = function(ctx) return consumer:run(ctx) end`).  Returns when
--- ctx:stopping() (after its deliveries are settled), raises when the
--- source fails.
function Consumer.run(c, ctx)
  if getmetatable(c) ~= Consumer_mt then error("consumer:run: bad self (consumer expected)", 2) end
  if ctx ~= nil and (type(ctx) ~= "table" or type(ctx.stopping) ~= "function") then
    check.arg_error("consumer:run", 1, "supervisor context (a table with a stopping method) or nil", ctx)
  end
  local me = S.current()
  if me == nil then error("consumer:run: called outside a task", 2) end
  local r = c.runner
  if r and r ~= me and not S.TERMINAL[S.state(r)] then
    error(("consumer:run: consumer '%s' is already running in task %d"):format(c.name, r.id), 2)
  end
  local src = c.source
  local other = src.start and consumed_by[src]
  if other and other ~= c and other.runner and not S.TERMINAL[S.state(other.runner)] then
    error(("consumer:run: %s is consumed by consumer '%s' in task %d (one run at a time per source)")
      :format(tostring(src.name or src), other.name, other.runner.id), 2)
  end
  -- What an earlier attempt of this task left is given back first.
  end_run(c, r, "consumer " .. c.name .. " restarted")
  c.runner = me
  if src.start then consumed_by[src] = c end
  on_attempt_end(c, me)
  local now = S.now
  if src.start then src:start() end
  while not ((ctx and ctx:stopping()) or S.shutting_down()) do
    if c.in_flight < c.prefetch then
      local t0 = now()
      local batch = src:fetch(c.prefetch - c.in_flight, c.poll)
      check_batch(c, batch)
      run_batch(c, batch)
      if #batch == 0 then
        if now() - t0 < 1 then S.sleep(c.poll) end   -- a source that does not wait: poll it
      elseif c.in_flight < c.prefetch then
        co_yield()                           -- let the handlers run before the next fetch (no timer)
      end
    else
      S.wait_for(c, "consumer", c.poll)      -- until a delivery settles
    end
  end
  while c.in_flight > 0 do                        -- stopping: let the handlers finish
    S.wait_for(c, "consumer", c.poll)
  end
  end_run(c, me, "consumer " .. c.name .. " stopped")
  return "stopped"
end

return M
