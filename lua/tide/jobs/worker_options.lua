--- tide.jobs.worker_options — tide.worker's options and its targets, checked.
--
-- check_opts takes what tide.worker was given and returns what the worker
-- keeps (queues, targets, hooks, schedules), or raises naming the option;
-- check_target does the same for one target, whether given in `targets` or
-- found by require.  Nothing is kept here.
local check = require "tide.engine.check"
local retry = require "tide.engine.retry"
local task = require "tide.engine.task"
local queue = require "tide.jobs.queue"
local job = require "tide.jobs.job"
local schedules = require "tide.jobs.schedules"

local type, error, pairs, ipairs, tostring, next = type, error, pairs, ipairs, tostring, next
local getupvalue, getinfo = debug.getupvalue, debug.getinfo
local opt_error = check.opt_error

local M = {}

-- handle_error is the old name of on_error (README: Vocabulary).
local KEYS = check.options("tide.worker", {
  queue = true, queues = true, concurrency = true, targets = true, lease = true, heartbeat = true,
  poll = true, rescue_every = true, batch = true, timeout = true, retry = true, on_error = true,
  handle_error = true, grace = true, on_outcome = true, give_up = true, schedules = true, on_discard = true
}, { handle_error = "on_error" })
-- A target is a table of methods, or { methods = {...}, timeout =, mode =,
-- retry =, on_error = }: its options beside its methods, so that any name
-- can be a method.  The old mixed form (these option names among the
-- methods, the hook called handle_error) still works, with a warning.
local TARGET_KEYS = check.options("worker target", {
  methods = true, timeout = true, mode = true, retry = true, on_error = true, handle_error = true
}, { handle_error = "on_error" })
-- Also taken, from tide's own targets only (tide.jobs.flowstep: durable
-- flows), not part of the public vocabulary: after_record and retry_for.
local TARGET_KEYS_ALL = { after_record = true, retry_for = true }
for k in pairs(TARGET_KEYS) do TARGET_KEYS_ALL[k] = true end
local MIXED_OPTS = { timeout = true, mode = true, handle_error = true, retry = true }
local DEFAULT_RETRY = { backoff = "exponential", base = 1000, max = 3600000, jitter = true }

-- ===== options

local function check_retry(fname, key, r, level)
  if type(r) ~= "table" then opt_error(fname, key, "table", r, level + 1) end
  for _, k in ipairs{ "max_attempts", "attempts" } do
    if r[k] ~= nil then
      error(("%s: %s.%s is not used here (each job's own max_attempts, given at enqueue, counts its attempts)")
        :format(fname, key, k), level + 1)
    end
  end
  local full = { max_attempts = 1 }
  for k, v in pairs(DEFAULT_RETRY) do full[k] = v end
  for k, v in pairs(r) do full[k] = v end
  local policy = retry.policy(fname, full, level + 1)   -- not a tail call: errors blame the caller
  return policy
end

--- The hook `on_error` as given (or its old name, handle_error, whose
--- function takes job, err, traceback): returns it and whether it is old.
local function error_hook(fname, opts, prefix, level)
  local old = opts.handle_error ~= nil
  local fn = check.renamed(fname, opts, "handle_error", "on_error", level + 1, prefix)
  if fn ~= nil and type(fn) ~= "function" then
    opt_error(fname, prefix .. (old and "handle_error" or "on_error"), "function", fn, level + 1)
  end
  return fn, old
end

--- Checks target `name` as given and returns it as the worker keeps it:
--- { methods, timeout, mode, policy (retry), on_error, old_hook, inline }.
--- `inline`: given in `targets` (its thread-mode methods then cross to
--- threads as bytecode, so they must have no upvalues).
local function check_target(fname, name, t, level, inline)
  local key = "targets." .. tostring(name)
  if type(name) ~= "string" or type(t) ~= "table" then
    opt_error(fname, key, "table of methods, or { methods = {...}, options }", t, level + 1)
  end
  local methods = t
  if t.methods ~= nil then
    check.known(fname, t, TARGET_KEYS_ALL, key .. ".", level + 1)
    methods = t.methods
    if type(methods) ~= "table" then opt_error(fname, key .. ".methods", "table of functions", methods, level + 1) end
  else
    for k in pairs(MIXED_OPTS) do
      if t[k] ~= nil then
        check.deprecate(("%s: %s: options among the methods are deprecated (a method cannot then be called "
                         .. "'%s'): give { methods = {...}, %s = ... }"):format(fname, key, k, k), level + 1)
        break
      end
    end
  end
  if t.timeout ~= nil and not check.is_ms(t.timeout, true) then
    opt_error(fname, key .. ".timeout", "positive number of ms", t.timeout, level + 1)
  end
  task.check_mode(fname, t.mode, level + 1)
  local hook, old_hook
  if methods == t then                        -- the mixed form: on_error would be a method
    hook, old_hook = t.handle_error, true
    if hook ~= nil and type(hook) ~= "function" then opt_error(fname, key .. ".handle_error", "function", hook, level + 1) end
  else
    hook, old_hook = error_hook(fname, t, key .. ".", level + 1)
  end
  local policy = t.retry ~= nil and check_retry(fname, key .. ".retry", t.retry, level + 1) or nil
  local target = { methods = methods, timeout = t.timeout, mode = t.mode, policy = policy, on_error = hook,
                   old_hook = old_hook, inline = inline, mixed = methods == t }
  if methods ~= t then
    for _, k in ipairs{ "after_record", "retry_for" } do
      if t[k] ~= nil and type(t[k]) ~= "function" then opt_error(fname, key .. "." .. k, "function", t[k], level + 1) end
      target[k] = t[k]
    end
  end
  if inline and (t.mode == "thread" or t.mode == "process") then
    for m, fn in pairs(methods) do
      if type(fn) == "function" and not (target.mixed and MIXED_OPTS[m]) then
        if getinfo(fn, "S").what == "C" then
          error(("%s: %s.%s: a C function cannot cross to a %s (name a module's function instead)")
            :format(fname, key, tostring(m), t.mode), level + 1)
        end
        local up = getupvalue(fn, 1)
        if up then
          error(("%s: %s.%s: a %s-mode method crosses to a %s as bytecode, so it cannot have "
                 .. "upvalues (it has '%s'); make it self-contained, or put the target in a module"):format(
                 fname, key, tostring(m), t.mode, t.mode, up), level + 1)
        end
      end
    end
  end
  return target
end

local function check_queues(fname, opts, level)
  if opts.queues ~= nil and opts.concurrency ~= nil then
    error(fname .. ": give queues or concurrency, not both", level + 1)
  end
  if opts.concurrency ~= nil and not check.is_count(opts.concurrency, 1) then
    opt_error(fname, "concurrency", "integer >= 1", opts.concurrency, level + 1)
  end
  local queues = opts.queues or { default = opts.concurrency or 10 }
  if type(queues) ~= "table" or next(queues) == nil then
    opt_error(fname, "queues", "table of queue name = concurrency", queues, level + 1)
  end
  for name, n in pairs(queues) do
    -- (a name no job can have: on PostgreSQL one with a NUL or invalid
    -- UTF-8 failed every claim, and the worker backed off for ever)
    if type(name) == "string" and not job.is_name(name) then
      error(("%s: bad option 'queues' (queue names (letters, digits, _ . -, at most %d bytes) expected, got %s)")
        :format(fname, job.MAX_NAME, check.describe(name)), level + 1)
    end
    if type(name) ~= "string" or not check.is_count(n, 1) then
      opt_error(fname, "queues." .. tostring(name), "integer >= 1", n, level + 1)
    end
  end
  return queues
end

local function check_opts(fname, opts)
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts, 3) end
  check.known(fname, opts, KEYS, nil, 3)
  if not queue.is_queue(opts.queue) then
    opt_error(fname, "queue", "queue (from tide.queue.open)", opts.queue, 3)
  end
  if not queue.is_open(opts.queue) then error(fname .. ": bad option 'queue' (the queue is closed)", 3) end
  for _, k in ipairs{ "lease", "heartbeat", "poll", "rescue_every", "timeout", "grace" } do
    if opts[k] ~= nil and not check.is_ms(opts[k], true) then
      opt_error(fname, k, "positive number of ms", opts[k], 3)
    end
  end
  -- A lease's end is stored (PostgreSQL's bigint refused now + 1e300, and
  -- every claim failed); 1e12 ms is about 31 years.
  if opts.lease ~= nil and opts.lease > 1e12 then
    opt_error(fname, "lease", "positive number of ms up to 1e12 (a lease's end must be a time every store holds)", opts.lease, 3)
  end
  -- (PostgreSQL's bigint refused now + 0.5, and every claim failed; SQLite
  -- stored a fraction, which a job's lease_expires never is)
  if opts.lease ~= nil and opts.lease % 1 ~= 0 then
    opt_error(fname, "lease", "whole number of ms (a lease's end is stored in whole ms)", opts.lease, 3)
  end
  if opts.batch ~= nil and not check.is_count(opts.batch, 1) then
    opt_error(fname, "batch", "integer >= 1", opts.batch, 3)
  end
  local targets = {}
  if opts.targets ~= nil then
    if type(opts.targets) ~= "table" then opt_error(fname, "targets", "table of targets", opts.targets, 3) end
    for name, t in pairs(opts.targets) do targets[name] = check_target(fname, name, t, 3, true) end
  end
  local on_error, old_hook = error_hook(fname, opts, "", 3)
  local on_outcome, old_outcome = opts.on_outcome, false
  if on_outcome ~= nil then
    if type(on_outcome) ~= "function" then opt_error(fname, "on_outcome", "function", on_outcome, 3) end
    old_outcome = check.positional_hook(fname, "on_outcome", on_outcome, 3)
  end
  if opts.on_discard ~= nil and type(opts.on_discard) ~= "function" then
    opt_error(fname, "on_discard", "function", opts.on_discard, 3)
  end
  if opts.give_up ~= nil and not check.is_ms(opts.give_up, true) then
    opt_error(fname, "give_up", "positive number of ms", opts.give_up, 3)
  end
  local queues = check_queues(fname, opts, 3)   -- not a tail call: errors blame the caller
  local scheds = opts.schedules ~= nil and schedules.check(fname, opts.schedules, 3) or nil
  return { queues = queues, targets = targets, on_error = on_error, old_hook = old_hook,
           on_outcome = on_outcome, old_outcome = old_outcome, schedules = scheds }
end


M.check_opts, M.check_target, M.check_retry, M.MIXED_OPTS = check_opts, check_target, check_retry, MIXED_OPTS

return M
