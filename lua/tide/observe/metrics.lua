--- tide.observe.metrics — the process's counters in Prometheus's text format, and an endpoint that serves them.
--
--   tide.metrics.serve{ host = "127.0.0.1", port = 9464 }      -- GET /metrics
--   tide.metrics.render() -> text                               -- the same text
--
-- Every name starts with tide_; counters end in _total; every family has
-- its HELP and TYPE lines (text exposition format 0.0.4).  What a scrape
-- reads is kept up to date where it happens (the engine's counters, pools,
-- consumers, flows, workers): nothing here walks the tasks, so a scrape
-- costs the same with 10 or 100,000 live tasks (bench/metrics.lua).  The
-- one figure that needs the store, jobs by queue and status, is sampled
-- (tide.observe.sampler): waiting and executing jobs only, through the
-- store's partial indexes, at most every `every` ms; finished jobs are
-- counted by the workers' counters instead (a count of them would scan the
-- table).
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local http = require "tide.engine.http"
local thread = require "tide.engine.thread"
local process = require "tide.engine.process"
local pool = require "tide.engine.pool"
local consumer = require "tide.supervision.consumer"
local flow = require "tide.flow.run"
local worker = require "tide.jobs.worker"
local queue = require "tide.jobs.queue"
local sampler = require "tide.observe.sampler"
local utf8 = require "tide.observe.utf8"

local type, pairs, ipairs, tostring, tonumber, format, concat, sort, floor, byte =
  type, pairs, ipairs, tostring, tonumber, string.format, table.concat, table.sort, math.floor, string.byte
local opt_error = check.opt_error

local M = {}

M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

-- ===== the text format

local function num(v)
  if v == floor(v) and v > -1e15 and v < 1e15 then return format("%d", v) end
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" elseif v == -math.huge then return "-Inf" end
  local s = format("%.15g", v)
  if tonumber(s) ~= v then s = format("%.17g", v) end   -- the shortest that reads back the same
  return s
end

--- A label value: UTF-8 (Prometheus refuses a whole scrape for one that is
--- not, and a pool or consumer may be named with any bytes), escaped.
local function label_value(v)
  return (utf8.clean(tostring(v)):gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

--- A writer of families: out:family(name, type, help) then out:sample(...).
local Out = {}
Out.__index = Out

function Out:family(name, kind, help)
  local b = self.buf
  b[#b + 1] = "# HELP " .. name .. " " .. help:gsub("\\", "\\\\"):gsub("\n", "\\n") .. "\n"
  b[#b + 1] = "# TYPE " .. name .. " " .. kind .. "\n"
end

--- labels: a flat list { "queue", "default", "status", "available" } or nil.
function Out:sample(name, labels, value)
  local b = self.buf
  if labels and #labels > 0 then
    local parts = {}
    for i = 1, #labels, 2 do parts[#parts + 1] = labels[i] .. '="' .. label_value(labels[i + 1]) .. '"' end
    b[#b + 1] = name .. "{" .. concat(parts, ",") .. "} " .. num(value) .. "\n"
  else
    b[#b + 1] = name .. " " .. num(value) .. "\n"
  end
end

--- A histogram (tide.engine.histogram) as _bucket, _sum and _count samples.
function Out:histogram(name, labels, h)
  local cum = 0
  for i, bound in ipairs(h.bounds) do
    cum = cum + h.counts[i]
    local l = { unpack(labels) }
    l[#l + 1], l[#l + 2] = "le", num(bound)
    self:sample(name .. "_bucket", l, cum)
  end
  local l = { unpack(labels) }
  l[#l + 1], l[#l + 2] = "le", "+Inf"
  self:sample(name .. "_bucket", l, h.count)
  self:sample(name .. "_sum", labels, h.sum)
  self:sample(name .. "_count", labels, h.count)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

local OUTCOMES = { "ok", "error", "timeout", "cancelled" }

-- ===== the families

local function engine(o)
  local st, th, pr = S.stats, S.thread_stats, S.process_stats
  local _, timers = core.stats()
  o:family("tide_tasks_spawned_total", "counter", "Tasks created (tide.spawn, pools, timers, workers, servers).")
  o:sample("tide_tasks_spawned_total", nil, st.spawned)
  o:family("tide_tasks_total", "counter", "Tasks that reached their outcome, by mode and outcome.")
  for _, out in ipairs(OUTCOMES) do
    o:sample("tide_tasks_total", { "mode", "coroutine", "outcome", out }, st[out] - th[out] - pr[out])
    o:sample("tide_tasks_total", { "mode", "thread", "outcome", out }, th[out])
    o:sample("tide_tasks_total", { "mode", "process", "outcome", out }, pr[out])
  end
  o:family("tide_task_retries_total", "counter", "Attempts that ended and were retried after a backoff.")
  o:sample("tide_task_retries_total", nil, st.retries)
  o:family("tide_tasks_live", "gauge", "Tasks not yet finished (pending, running or retrying).")
  o:sample("tide_tasks_live", nil, S.live_count())
  o:family("tide_callback_errors_total", "counter",
           "Errors raised in user callbacks (handle_result, hooks, timer callbacks), sent to the error sink.")
  o:sample("tide_callback_errors_total", nil, log.errors)
  o:family("tide_timers", "gauge", "Timers pending on the loop (sleeps, timeouts, backoffs, tide.after/every).")
  o:sample("tide_timers", nil, timers)
end

local function threads(o)
  local t = thread.stats()
  o:family("tide_thread_pool_threads", "gauge", "Threads of the thread-mode pool, by state.")
  o:sample("tide_thread_pool_threads", { "state", "busy" }, t.busy)
  o:sample("tide_thread_pool_threads", { "state", "idle" }, t.idle)
  o:sample("tide_thread_pool_threads", { "state", "quarantined" }, t.quarantined)
  o:family("tide_thread_pool_replaced_total", "counter",
           "Threads replaced after one was quarantined (stuck past its stop wait).")
  o:sample("tide_thread_pool_replaced_total", nil, t.replaced)
  o:family("tide_thread_pool_queued", "gauge", "Thread-mode jobs waiting for a free thread.")
  o:sample("tide_thread_pool_queued", nil, t.queued)
end

local function processes(o)
  local p = process.stats()
  o:family("tide_process_pool_processes", "gauge", "Child processes of the process-mode pool, by state (the spare apart).")
  o:sample("tide_process_pool_processes", { "state", "busy" }, p.busy)
  o:sample("tide_process_pool_processes", { "state", "idle" }, p.idle)
  o:sample("tide_process_pool_processes", { "state", "starting" }, p.starting)
  o:family("tide_process_pool_exits_total", "counter",
           "Child processes that ended: killed after a timeout or cancel, or died otherwise (crash, exit, memory).")
  o:sample("tide_process_pool_exits_total", { "cause", "killed" }, p.killed)
  o:sample("tide_process_pool_exits_total", { "cause", "died" }, p.died)
  o:family("tide_process_pool_replaced_total", "counter", "Child processes replaced (by the spare, or started afresh).")
  o:sample("tide_process_pool_replaced_total", nil, p.replaced)
  o:family("tide_process_pool_queued", "gauge", "Process-mode jobs waiting for a free child.")
  o:sample("tide_process_pool_queued", nil, p.queued)
end

--- Gauges summed over the pools that share a name (unnamed ones: pool="").
local function pools(o)
  local by = {}
  for p in pairs(pool.live) do
    local name = p.name or ""
    local g = by[name]
    if not g then g = { size = 0, running = 0, waiting = 0 }; by[name] = g end
    g.size, g.running, g.waiting = g.size + p.concurrency, g.running + p.running, g.waiting + p.waiting
  end
  local names = sorted_keys(by)
  for _, f in ipairs{ { "size", "Slots of tide.pool pools (tasks that may run at once)." },
                      { "running", "Tasks running in a slot of tide.pool pools." },
                      { "waiting", "Tasks queued in tide.pool pools for a free slot." } } do
    o:family("tide_pool_" .. f[1], "gauge", f[2])
    for _, name in ipairs(names) do o:sample("tide_pool_" .. f[1], { "pool", name }, by[name][f[1]]) end
  end
end

local function consumers(o)
  local names = sorted_keys(consumer.totals)
  for _, f in ipairs{ { "deliveries", "delivered", "Deliveries a consumer took from its source." },
                      { "acks", "acked", "Deliveries acked (their handler ended ok)." },
                      { "nacks", "nacked", "Deliveries nacked (their handler failed, or the consumer ended)." },
                      { "settle_errors", "settle_errors", "Acks and nacks the source refused (the delivery goes back to the broker with its channel)." } } do
    o:family("tide_consumer_" .. f[1] .. "_total", "counter", f[3])
    for _, name in ipairs(names) do
      o:sample("tide_consumer_" .. f[1] .. "_total", { "consumer", name }, consumer.totals[name][f[2]])
    end
  end
  local in_flight = {}
  for name in pairs(consumer.totals) do in_flight[name] = 0 end
  for c in pairs(consumer.live) do in_flight[c.name] = (in_flight[c.name] or 0) + c.in_flight end
  o:family("tide_consumer_in_flight", "gauge", "Deliveries held by consumers, not yet acked or nacked.")
  for _, name in ipairs(names) do o:sample("tide_consumer_in_flight", { "consumer", name }, in_flight[name]) end
end

local function flows(o)
  o:family("tide_flow_runs_total", "counter", "Flow runs (in memory) that ended, by status.")
  for _, st in ipairs(sorted_keys(flow.counts.runs)) do
    o:sample("tide_flow_runs_total", { "status", st }, flow.counts.runs[st])
  end
  o:family("tide_flow_steps_total", "counter", "Steps of ended flow runs, by their status.")
  for _, st in ipairs(sorted_keys(flow.counts.steps)) do
    o:sample("tide_flow_steps_total", { "status", st }, flow.counts.steps[st])
  end
  o:family("tide_flow_runs_active", "gauge", "Flow runs under way.")
  o:sample("tide_flow_runs_active", nil, #flow.runs())
end

local JOB_COUNTERS = {
  { "claims", "claimed", "Jobs claimed from the store by workers of this process." },
  { "completions", "completed", "Job attempts that completed." },
  { "failures", "retried", "Job attempts that failed and will be retried." },
  { "discards", "discarded", "Jobs discarded (their last attempt failed)." },
  { "releases", "released", "Claimed jobs given back unfinished (a worker stopping)." },
  { "cancels", "cancelled", "Running jobs stopped because they were cancelled or expired in the store." },
}

local function workers(o)
  local tot = worker.totals
  local names = sorted_keys(tot.queues)
  for _, f in ipairs(JOB_COUNTERS) do
    o:family("tide_job_" .. f[1] .. "_total", "counter", f[3])
    for _, name in ipairs(names) do o:sample("tide_job_" .. f[1] .. "_total", { "queue", name }, tot.queues[name][f[2]]) end
  end
  o:family("tide_job_duration_seconds", "histogram", "How long job attempts ran, from start to outcome.")
  for _, name in ipairs(names) do o:histogram("tide_job_duration_seconds", { "queue", name }, tot.queues[name].duration) end
  o:family("tide_job_start_delay_seconds", "histogram",
           "From when a job attempt was due (enqueued, or its run_at or retry time) to its start.")
  for _, name in ipairs(names) do o:histogram("tide_job_start_delay_seconds", { "queue", name }, tot.queues[name].wait) end
  o:family("tide_job_lease_rescues_total", "counter", "Jobs whose lease expired, made available again by a rescuer here.")
  o:sample("tide_job_lease_rescues_total", nil, tot.rescued)
  o:family("tide_job_store_errors_total", "counter", "Store statements of workers that failed, by operation.")
  for _, op in ipairs(sorted_keys(tot.store_errors)) do
    o:sample("tide_job_store_errors_total", { "operation", op }, tot.store_errors[op])
  end
  o:sample("tide_job_store_errors_total", { "operation", "sample" }, sampler.errors)
  local nw, running = 0, 0
  for w in pairs(worker.live) do nw, running = nw + 1, running + w.nrunning end
  o:family("tide_workers", "gauge", "Workers running in this process.")
  o:sample("tide_workers", nil, nw)
  o:family("tide_worker_jobs_running", "gauge", "Jobs running now in the workers of this process.")
  o:sample("tide_worker_jobs_running", nil, running)
end

local STATUS_ORDER = { "available", "scheduled", "retryable", "executing" }
local seen_queues = {}        -- every queue name a sample has shown

--- Jobs by queue and status, from the queues given or the workers' queues.
local function store_gauges(o, queues, every)
  local seen, list = {}, {}
  for _, q in ipairs(queues) do if not seen[q] then seen[q] = true; list[#list + 1] = q end end
  for w in pairs(worker.live) do
    if not seen[w.q] then seen[w.q] = true; list[#list + 1] = w.q end
  end
  local counts, age = {}, nil
  -- A drained queue reads 0, not nothing: the queues seen before, and those
  -- the workers of this process serve or counted.
  for qname in pairs(seen_queues) do counts[qname] = {} end
  if #list > 0 then
    for qname in pairs(worker.totals.queues) do counts[qname] = {} end
    for w in pairs(worker.live) do for qname in pairs(w.queues) do counts[qname] = {} end end
  end
  for _, q in ipairs(list) do
    if queue.is_open(q) then
      local v, _, a = sampler.get(q, "backlog", every, function() return q:backlog() end)
      if v then
        for qname, by in pairs(v) do
          local c = counts[qname] or {}
          counts[qname], seen_queues[qname] = c, true
          for st, n in pairs(by) do c[st] = (c[st] or 0) + n end
        end
        if a and (age == nil or a > age) then age = a end
      end
    end
  end
  o:family("tide_jobs", "gauge",
           "Jobs waiting or executing in the store, by queue and status (sampled; finished jobs are not counted here).")
  for _, qname in ipairs(sorted_keys(counts)) do
    for _, st in ipairs(STATUS_ORDER) do
      o:sample("tide_jobs", { "queue", qname, "status", st }, counts[qname][st] or 0)
    end
  end
  o:family("tide_jobs_sample_age_seconds", "gauge", "Age of the tide_jobs sample.")
  if age then o:sample("tide_jobs_sample_age_seconds", nil, age / 1000) end
end

local function info(o)
  o:family("tide_info", "gauge", "Always 1; the labels say which tide this is.")
  o:sample("tide_info", { "version", M.VERSION, "luajit", jit.version }, 1)
end

--- The exposition text.  opts: queues (a list of tide.queue objects whose
--- job counts to sample; the queues of this process's workers are always
--- included), every (ms between samples, 5000).
local RENDER_KEYS = { queues = true, every = true }

function M.render(opts)
  local fname = "tide.metrics.render"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, RENDER_KEYS)
  if opts.every ~= nil and not check.is_ms(opts.every, true) then opt_error(fname, "every", "positive number of ms", opts.every) end
  if opts.queues ~= nil then
    if type(opts.queues) ~= "table" then opt_error(fname, "queues", "list of queues", opts.queues) end
    for i, q in ipairs(opts.queues) do
      if not queue.is_queue(q) then opt_error(fname, "queues[" .. i .. "]", "queue (from tide.queue.open)", q) end
    end
  end
  local o = setmetatable({ buf = {} }, Out)
  info(o)
  engine(o)
  threads(o)
  processes(o)
  pools(o)
  consumers(o)
  flows(o)
  workers(o)
  store_gauges(o, opts.queues or {}, opts.every or 5000)
  return concat(o.buf)
end

M.VERSION = "0.1.0"

-- ===== the endpoint

local KEYS = check.options("tide.metrics.serve", {
  host = true, port = true, token = true, queue = true, queues = true, every = true, path = true,
  keep_loop = true
})

--- Checks a bearer token: true when `token` is nil or the request carries it
--- (compared in time that does not depend on where they differ).
local function authorized(req, token)
  if token == nil then return true end
  local h, want = req.headers.authorization, "Bearer " .. token
  if type(h) ~= "string" or #h ~= #want then return false end
  local diff = 0
  for i = 1, #h do diff = diff + (byte(h, i) ~= byte(want, i) and 1 or 0) end
  return diff == 0
end

--- Headers of an answer: text a browser must not sniff into HTML (queue,
--- pool and consumer names are label values, and may hold markup).
local function plain(ctype, extra)
  local hd = { ["content-type"] = ctype, ["x-content-type-options"] = "nosniff" }
  for k, v in pairs(extra or {}) do hd[k] = v end
  return hd
end

--- Whether a request's Host names this machine: an IP address, localhost
--- (or a name under it), or this machine's own name; or no Host at all
--- (browsers always send one).  Served on loopback without a token, the
--- metrics answer only such requests: a page whose own name an attacker
--- resolved to 127.0.0.1 (DNS rebinding) sends that name.
local function names_this_machine(host)
  if host == nil then return true end
  host = host:lower()
  if host:match("^%[[%x:.]+%]:?%d*$") then return true end        -- [IPv6]
  local name = host:match("^([^:]*):?%d*$")
  if not name then return false end
  if name:match("^%d+%.%d+%.%d+%.%d+$") then return true end
  if name == "localhost" or name:match("%.localhost$") then return true end
  return name ~= "" and name == core.hostname():lower()
end

--- A handler for tide.engine.http: GET `path` answers with the metrics.
--- opts.local_only: only to requests whose Host names this machine.
function M.handler(opts)
  local path = opts.path or "/metrics"
  local ropts = { queues = opts.queues, every = opts.every }
  local local_only = opts.local_only
  return function(req)
    if local_only and not names_this_machine(req.headers.host) then
      return 403, plain("text/plain"), "forbidden: this endpoint answers on loopback to the names of this machine "
        .. "(give it a token to be reached by other names)\n"
    end
    if req.path ~= path then return 404, plain("text/plain"), "not found; metrics are at " .. path .. "\n" end
    if req.method ~= "GET" and req.method ~= "HEAD" then
      return 405, plain("text/plain", { allow = "GET, HEAD" }), "method not allowed\n"
    end
    if not authorized(req, opts.token) then
      return 401, plain("text/plain", { ["www-authenticate"] = 'Bearer realm="tide metrics"' }), "unauthorized\n"
    end
    return 200, plain(M.CONTENT_TYPE, { ["cache-control"] = "no-store" }), M.render(ropts)
  end
end

--- Serves the metrics at http://host:port/metrics.  opts: host
--- ("127.0.0.1"), port (9464; 0: any free), token (when given, requests
--- need "Authorization: Bearer TOKEN"), queue or queues (tide.queue objects
--- whose job counts to sample), every (ms, 5000), path ("/metrics").
--- Returns the server, or nil and why it cannot listen.  A non-loopback
--- host without a token prints a warning.
function M.serve(opts)
  local fname = "tide.metrics.serve"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  if opts.token ~= nil and (type(opts.token) ~= "string" or opts.token == "") then
    opt_error(fname, "token", "non-empty string", opts.token)
  end
  if opts.host ~= nil and type(opts.host) ~= "string" then opt_error(fname, "host", "IP address string", opts.host) end
  if opts.port ~= nil and (not check.is_count(opts.port) or opts.port > 65535) then
    opt_error(fname, "port", "integer 0..65535", opts.port)
  end
  if opts.every ~= nil and not check.is_ms(opts.every, true) then opt_error(fname, "every", "positive number of ms", opts.every) end
  if opts.path ~= nil and (type(opts.path) ~= "string" or opts.path:sub(1, 1) ~= "/") then
    opt_error(fname, "path", "path starting with /", opts.path)
  end
  local queues = opts.queues or {}
  if opts.queue ~= nil then queues = { opts.queue } end
  if type(queues) ~= "table" then opt_error(fname, "queues", "list of queues", queues) end
  for i, q in ipairs(queues) do
    if not queue.is_queue(q) then opt_error(fname, opts.queue and "queue" or "queues[" .. i .. "]", "queue (from tide.queue.open)", q) end
  end
  local host = opts.host or "127.0.0.1"
  local srv, err = http.serve{ host = host, port = opts.port or 9464, name = "metrics", keep_loop = opts.keep_loop,
                               handler = M.handler{ token = opts.token, queues = queues, every = opts.every,
                                                    path = opts.path,
                                                    local_only = http.is_loopback(host) and not opts.token } }
  if not srv then return nil, fname .. ": " .. err end
  if not http.is_loopback(srv.host) and not opts.token then
    io.stderr:write(("tide: warning: metrics on %s:%d without a token: anyone who can reach this address can read them\n")
      :format(srv.host, srv.port))
  end
  return srv
end

return M
