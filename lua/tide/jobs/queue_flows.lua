--- tide.jobs.queue_flows — the queue's side of durable flows: starting a run
--- inside a transaction (tx:enqueue_flow, q:enqueue_flow), reading runs
--- (q:flow_run, q:flow_runs), cancelling and retrying them, and the sweep
--- workers run.  The flows themselves (definitions, steps, the statements)
--- are tide.jobs.flows; tide.jobs.queue installs these methods on its
--- queues.
local check = require "tide.engine.check"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local flows = require "tide.jobs.flows"
local transaction_mod = require "tide.jobs.transaction"

local type, error, pairs, ipairs, pcall, floor = type, error, pairs, ipairs, pcall, math.floor
local arg_error, opt_error = check.arg_error, check.opt_error
local with_session, transaction, tx_state = transaction_mod.with_session, transaction_mod.transaction,
                                            transaction_mod.tx_state
local Tx = transaction_mod.Tx

local M = {}

local check_q, key_of         -- (set by install: tide.jobs.queue's check, and a job's partition key)
local Q = {}                  -- the queue's methods, copied onto Queue by install
M.methods = Q


-- key: the short form of idempotency_key (both are current names).
local FLOW_START_KEYS = check.options("q:enqueue_flow", { key = true, idempotency_key = true, queue = true,
                                                         priority = true })

--- Checks enqueue_flow's arguments; returns the definition, the input as
--- JSON, and the options.
local function flow_args(fname, name, input, opts)
  local def = flows.definition(name, fname, 3)
  local input_json = json.encode_option(fname, "input", input, 3)
  if opts ~= nil and type(opts) ~= "table" then arg_error(fname, 3, "table or nil", opts, 3) end
  opts = opts or {}
  check.known(fname, opts, FLOW_START_KEYS, nil, 3)
  if opts.key ~= nil and opts.idempotency_key ~= nil then
    error(fname .. ": give key or idempotency_key, not both", 3)
  end
  local key = opts.key or opts.idempotency_key
  if key ~= nil then
    local why = job.key_problem(key)
    if why then error(("%s: bad option 'key' (%s)"):format(fname, why), 3) end
  end
  if opts.queue ~= nil and not job.is_name(opts.queue) then
    opt_error(fname, "queue", "queue " .. job.NAME_EXPECTED, opts.queue, 3)
  end
  if opts.priority ~= nil and not job.is_priority(opts.priority) then
    opt_error(fname, "priority", job.PRIORITY_EXPECTED, opts.priority, 3)
  end
  return def, input_json, { key = key, queue = opts.queue, priority = opts.priority }
end

--- Starts a run of the durable flow defined by module `name` inside this
--- transaction: the run and its first jobs commit with the caller's data,
--- or not at all.  opts: key (idempotency key: a second start with it
--- returns the existing run; a key held by another flow's run raises),
--- queue (of its jobs, "default"), priority.  When that queue is declared
--- with a partition (q:declare), the run's key is the partition of its
--- input, and every job of the run carries it: the queue's per-key limits
--- hold for the run's steps, items and hooks as for jobs of its own.
--- Returns the run's id and true, or the existing run's id and false.
function Tx:enqueue_flow(name, input, opts)
  local st = tx_state("tx:enqueue_flow", self)
  local def, input_json, o = flow_args("tx:enqueue_flow", name, input, opts)
  o.partition_key = key_of("tx:enqueue_flow", self._q, o.queue or "default", input, 2)
  local id, inserted, qname = flows.start(st.session, def, input_json, o, floor(st.session:now()), "tx:enqueue_flow")
  if inserted then st.touched[qname] = true end
  return id, inserted
end

--- q:enqueue_flow(name, input, opts): tx:enqueue_flow in a transaction of its own
--- (or the caller's, when it is in one).
function Q:enqueue_flow(name, input, opts)
  check_q("q:enqueue_flow", self)
  local def, input_json, o = flow_args("q:enqueue_flow", name, input, opts)
  o.partition_key = key_of("q:enqueue_flow", self, o.queue or "default", input, 2)
  return transaction(self, "q:enqueue_flow", function(tx)
    local st = tx._st
    local id, inserted, qname = flows.start(st.session, def, input_json, o, floor(st.session:now()), "q:enqueue_flow")
    if inserted then st.touched[qname] = true end
    return id, inserted
  end)
end

-- A run id: an integer a double holds exactly (as q:job's: PostgreSQL's
-- bigint refused 1e300 with a store error); a limit every store takes.
local function is_run_id(id) return check.is_count(id, 1) and id <= 2 ^ 53 end
local RUN_ID_EXPECTED = "run id (integer from 1 to 2^53)"
local MAX_LIMIT = 2147483647

local function check_run_id(fname, id)
  if not is_run_id(id) then arg_error(fname, 1, RUN_ID_EXPECTED, id, 3) end
end

local function get_run(session, id) return flows.get(session, id) end

--- Run `id` with its steps (name order): { id, flow, status, input, key,
--- error, inserted_at, completed_at, steps = { { name, status, after,
--- attempts, result, error, traceback, reason, started_at, completed_at,
--- duration (ms), items = { total, done } }, ... } }; or nil.
function Q:flow_run(id)
  check_q("q:flow_run", self)
  check_run_id("q:flow_run", id)
  return (with_session(self, "q:flow_run", get_run, id))
end

local RUNS_KEYS = check.options("q:flow_runs", { status = true, flow = true, limit = true, before = true })

local function list_runs(session, f)
  local runs = flows.list(session, f)
  local ids = {}
  for i, r in ipairs(runs) do ids[i] = r.id end
  local counts = flows.step_counts(session, ids)
  for _, r in ipairs(runs) do r.steps = counts[r.id] end
  return runs
end

--- Runs, newest first: filter by status ("running", "ok", "error",
--- "cancelled") and flow (module name); limit (100); before = id.  Each
--- run has `steps`: counts by status and total.
function Q:flow_runs(f)
  check_q("q:flow_runs", self)
  if f ~= nil and type(f) ~= "table" then arg_error("q:flow_runs", 1, "table or nil", f) end
  f = f or {}
  check.known("q:flow_runs", f, RUNS_KEYS)
  if f.status ~= nil and not flows.RUN_STATUSES[f.status] then
    opt_error("q:flow_runs", "status", check.choices(flows.RUN_STATUSES), f.status)
  end
  if f.flow ~= nil and type(f.flow) ~= "string" then opt_error("q:flow_runs", "flow", "string", f.flow) end
  if f.limit ~= nil and not (check.is_count(f.limit, 1) and f.limit <= MAX_LIMIT) then
    opt_error("q:flow_runs", "limit", "integer from 1 to 2147483647", f.limit)
  end
  if f.before ~= nil and not is_run_id(f.before) then opt_error("q:flow_runs", "before", RUN_ID_EXPECTED, f.before) end
  return (with_session(self, "q:flow_runs", list_runs, { status = f.status, flow = f.flow, limit = f.limit or 100,
                                                         before = f.before }))
end

--- Runs op (flows.cancel or flows.retry) on run id in a transaction, the
--- run's row locked first; true, or nil and why not.
local function change_run(q, fname, op, id)
  check_q(fname, q)
  check_run_id(fname, id)
  return transaction(q, fname, function(tx)
    local st = tx._st
    local s = st.session
    if s.lock_flow_runs then s:lock_flow_runs({ id }) end
    local ok, post = op(s, id, floor(s:now()))
    if not ok then return nil, post end
    for qname in pairs(post.queues) do st.touched[qname] = true end
    return true
  end)
end

--- Cancels a running run: its jobs not yet finished are cancelled (running
--- ones stop at their worker's next heartbeat), its steps not yet finished
--- too.  true, or nil and why not ("run 7 is ok").
function Q:cancel_flow(id) return change_run(self, "q:cancel_flow", flows.cancel, id) end

--- Runs the failed, timed out, cancelled and skipped steps of a finished
--- run again; completed steps keep their results.  true, or nil and why not.
function Q:retry_flow(id) return change_run(self, "q:retry_flow", flows.retry, id) end

function M.sweep(session)
  if not flows.sweep_needed(session) then return nil end   -- (the common case: one read, no transaction)
  session:begin()
  local ok, post = pcall(flows.sweep, session)
  if ok then
    local done, err = pcall(session.commit, session)
    if done then return post end
    post = err
  end
  pcall(session.rollback, session)
  error(post, 0)
end

--- Adds the methods above to tide.jobs.queue's Queue; check_q(fname, q)
--- raises unless q is an open queue.
function M.install(queue_methods, check_queue, partition_key)
  check_q, key_of = check_queue, partition_key
  for name, fn in pairs(Q) do queue_methods[name] = fn end
end

return M
