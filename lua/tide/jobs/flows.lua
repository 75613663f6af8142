--- tide.jobs.flows — durable flows: a DAG whose every step is a job, kept in the job store.
--
--   -- etl/daily.lua, a module every worker can require:
--   return { name = "etl.daily", fail = "stop", tasks = {
--     fetch = { run = function(ctx) return fetch(ctx.input.day) end, retry = { max_attempts = 3 } },
--     parse = { after = "fetch", each = parse_one, items = function(ctx) return ctx.results.fetch end,
--               concurrency = 20 },
--     store = { after = "parse", run = function(ctx) store(ctx.results.parse) end },
--   } }
--
--   q:transaction(function(tx) tx:enqueue_flow("etl.daily", { day = d }, { key = "etl-" .. d }) end)
--
-- The definition language is tide.flow's (tide.flow.define checks it); the
-- module returns the flow's options, or a tide.flow.  A run is rows of the
-- store (tide_flow_runs, tide_flow_steps, tide_flow_items) and jobs of
-- tide_jobs whose target is tide.jobs.flowstep: nothing about a run lives
-- in a process.
--
-- How a run moves (every change below happens inside one transaction):
--
--   start     the run row, one row per step (status waiting, `waiting` =
--             its dependencies), and a job for each root (status queued);
--             inside the caller's transaction, so all commit or none does.
--   complete  a step's job completes: in the transaction that records the
--             job completed (the worker's outcome write, see
--             tide.jobs.outcomes), the step becomes ok with its JSON result
--             and each dependent's `waiting` goes down by one; the one that
--             reaches 0 gets its job, whose args carry the input and the
--             results of its dependencies (ctx.results).  A dependent is
--             released by exactly one completion: the record's guard
--             (lease owner, attempt) applies a completion once, and the
--             step row's guard (status queued, job_id) once more.  The
--             successes of one outcome batch go together, in a few
--             statements for the whole batch (tide.jobs.flow_complete), and the
--             worker that writes them leases as many released steps to
--             itself as it has free slots (it starts them after the commit).
--   each      the parent's job returns the items; its completion writes
--             one item row each and queues the first `concurrency` of them
--             as jobs; each item's completion queues the next one, so at
--             most `concurrency` items of a step are queued or running,
--             across all workers.  The last completion makes the parent ok
--             with the items' results in item order.
--   failure   a failed attempt counts in the step (or item) row; the last
--             one allowed by its retry policy fails the step: fail =
--             "continue" skips what depends on it, fail = "stop" cancels
--             every job of the run not yet finished and ends the run.
--             `when` false skips the step and what depends on it.
--   sweep     a step job that finished outside a worker's outcome write
--             (discarded by the rescuer after its lease ran out on its
--             last attempt, cancelled or expired by hand) is found by the
--             sweep each worker runs after its rescues, and fails its step.
--
-- Lock order on PostgreSQL.  Every transaction that changes a run locks
-- the run's row first (runs in id order), then jobs (id order: the outcome
-- write's own), then steps.  Two modes:
--
--   shared (FOR KEY SHARE)  an outcome batch whose flow entries are only
--             steps' successes or fan-outs (and hooks' ends): they decide
--             nothing for the run as a whole.  Such batches of one run
--             proceed together.  Each touches its own steps' rows, its
--             dependents' rows (locked in one statement, in (run, name)
--             order: DECREMENT_PG; two batches sharing a dependent wait for
--             each other, in that order, never in a cycle), rows it
--             inserts, and last the run's row (its counters: an UPDATE,
--             which does not conflict with the others' KEY SHARE; a second
--             batch's UPDATE waits for the first's commit, and PostgreSQL
--             lets a holder of the shared lock upgrade without queueing
--             behind a waiting FOR UPDATE, so there is no cycle there).
--   exclusive (FOR UPDATE)  everything else: failures, `when` skips,
--             items, the sweep, cancel and retry by hand.  Waits for the
--             shared batches under way, and they for it: a cancel never
--             interleaves with a release, so nothing is released after it.
--
-- Changes stamp their times after the waits they may meet (a release is
-- never stamped before the completion it follows).
local json = require "tide.jobs.json"
local job = require "tide.jobs.job"
local complete = require "tide.jobs.flow_complete"
local definitions = require "tide.flow.define"
local define, dependents_of, dependencies_of = definitions.define, definitions.dependents, definitions.dependencies
local flow_run = require "tide.flow.run"
local STOPPING = require("tide.jobs.store.common").STOPPING

local type, pairs, ipairs, error, tostring, pcall, require, setmetatable, getmetatable =
  type, pairs, ipairs, error, tostring, pcall, require, setmetatable, getmetatable
local concat, sort, format, floor, max = table.concat, table.sort, string.format, math.floor, math.max

local M = {}

M.TARGET = complete.TARGET
M.LOST_ATTEMPTS = complete.LOST_ATTEMPTS

-- The set-based completion (tide.jobs.flow_complete): steps that succeeded,
-- the release of those whose dependencies all completed, and the memos of
-- the JSON of step names.
local names_of, remember, batch, batch_stmt = complete.names_of, complete.remember, complete.batch, complete.batch_stmt
local steps_closed, release, steps_ok, taken = complete.steps_closed, complete.release, complete.steps_ok, complete.taken

-- ===== definitions

local defs = {}

--- The definition of the durable flow in module `name` (required once per
--- process): { name, module, nodes, order, fail, on }.  Raises, naming
--- `fname`, when the module cannot be required or is not a flow.
function M.definition(name, fname, level)
  local d = defs[name]
  if d then return d end
  fname, level = fname or "tide.flows", (level or 1) + 1
  if type(name) ~= "string" or not job.is_name(name) then
    error(("%s: bad flow name (module name like \"etl.daily\" expected, got %s)")
      :format(fname, type(name) == "string" and format("%q", name) or type(name)), level)
  end
  local ok, mod = pcall(require, name)
  if not ok then
    error(("%s: flow '%s': require failed: %s"):format(fname, name,
      (tostring(mod):match("^[^\n]*"):gsub(":$", ""))), level)
  end
  if getmetatable(mod) ~= flow_run.Flow_mt then
    if type(mod) ~= "table" then
      error(("%s: flow '%s': the module returned %s, not a flow definition (a table with tasks, or a tide.flow)")
        :format(fname, name, type(mod)), level)
    end
    local dok, def = pcall(define, fname .. ": flow module '" .. name .. "'", mod, function() return false end)
    if not dok then error((tostring(def):gsub("^[^:]*:%d+: ", "")), level) end
    mod = def
  end
  for _, tname in ipairs(mod.order) do
    local node = mod.nodes[tname]
    local remote = node.mode == "thread" or node.mode == "process"   -- (an each named "mod.fn" runs there)
    if node.flow or (node.each and type(node.each) ~= "function" and not remote) then
      error(("%s: flow '%s': task '%s': a nested flow cannot run durably (make it a step of its own)")
        :format(fname, name, tname), level)
    end
  end
  d = { name = mod.name, module = name, nodes = mod.nodes, order = mod.order, fail = mod.fail or "stop",
        on = mod.on or {}, list = mod.list, dep_first = mod.dep_first, dep_idx = mod.dep_idx,
        dep_of = mod.dep_of, dep_of_first = mod.dep_of_first }
  defs[name] = d
  return d
end

--- How many failed attempts end a step (its retry policy's max_attempts, else 1).
local function max_failures(node) return node.policy and node.policy.attempts or 1 end

-- ===== a change: the session and what to do after the commit

--- F: { s = session, now = ms, owner = worker id or nil, lease = ms,
--- runs = { [id] = run row }, post = { queues = {}, rows = {} } }.
local function change(session, now, owner, lease)
  return { s = session, now = now, owner = owner, lease = lease, runs = {}, closed = {}, closed_order = {},
           post = { queues = {}, rows = {} } }
end
M.change = change

local function q1(F, sql, ...) return F.s:query(sql, ...)[1] end
local function exec(F, sql, ...) return F.s:exec(sql, ...) end

local function run_of(F, id)
  local r = F.runs[id]
  if r == nil then
    r = q1(F, "SELECT id, flow, status, fail, queue, priority, input, partition_key FROM tide_flow_runs WHERE id = ?",
           id) or false
    F.runs[id] = r
  end
  return r or nil
end

local function jstr(s) return json.encode(s) end

--- Inserts a job for the flow (target tide.jobs.flowstep); returns its id.
local function insert_job(F, run, method, args_json, max_attempts)
  local id = F.s:insert{ queue = run.queue, target = M.TARGET, method = method, args = args_json,
                         status = "available", priority = run.priority, max_attempts = max_attempts,
                         run_at = F.now, inserted_at = F.now, partition_key = run.partition_key }
  F.post.queues[run.queue] = true
  return id
end

--- A hook event to run as a job (flow_done, task_error) when the flow
--- defines that hook (or when this process cannot tell: a cancel from a
--- process without the flow's module; the job then finds out): leased to
--- this worker when a worker makes the change and has a free slot of the
--- queue (as released steps are: see release; it starts the job after the
--- commit), else left for any worker's claim (and its queue's limits).
local function hook_job(F, run, hook, event_json)
  local ok, def = pcall(M.definition, run.flow)
  if ok and not def.on[hook] then return end
  local args = format('{"flow":%s,"run":%d,"hook":%s,"event":%s}', jstr(run.flow), run.id, jstr(hook), event_json)
  local id = insert_job(F, run, "hook", args, 3)
  if F.owner and taken(F, run.queue) then
    exec(F, "UPDATE tide_jobs SET status = 'executing', attempt = 1, attempted_at = ?, lease_owner = ?, "
      .. "lease_expires = ? WHERE id = ?", F.now, F.owner, F.now + F.lease, id)
    -- (started after the commit as the released steps are, from this row:
    -- a read of it there let the claimer fill the slot meanwhile)
    F.post.rows[#F.post.rows + 1] = { id = id, queue = run.queue, target = M.TARGET, method = "hook", args = args,
                                      priority = run.priority, max_attempts = 3, run_at = F.now,
                                      inserted_at = F.now, attempt = 1, partition_key = run.partition_key }
  end
end

-- ===== queuing items

local function enqueue_item(F, run, name, idx, item, max_fail)
  local args = format('{"flow":%s,"run":%d,"step":%s,"index":%d,"item":%s,"input":%s}', jstr(run.flow), run.id,
                      jstr(name), idx, item, run.input)
  local id = insert_job(F, run, "item", args, max_fail + M.LOST_ATTEMPTS)
  exec(F, "UPDATE tide_flow_items SET status = 'queued', job_id = ? WHERE run_id = ? AND step = ? AND idx = ?",
       id, run.id, name, idx)
end

-- ===== the end of steps and runs

local function finish_run(F, run, status, err)
  local n = exec(F, "UPDATE tide_flow_runs SET status = ?, error = ?, completed_at = ?, open_steps = 0 "
    .. "WHERE id = ? AND status = 'running'", status, err, F.now, run.id)
  if n > 0 then
    run.status = status
    hook_job(F, run, "flow_done", format('{"run":%d,"status":%s,"error":%s}', run.id, jstr(status),
                                         err and jstr(err) or "null"))
  end
end


local function flush(F)
  for _, c in ipairs(F.closed_order) do
    local r = q1(F, "UPDATE tide_flow_runs SET open_steps = open_steps - ?, failed_steps = failed_steps + ? "
      .. "WHERE id = ? AND status = 'running' RETURNING open_steps, failed_steps", c.closed, c.failed, c.run.id)
    if r and r.open_steps <= 0 then
      F.now = max(F.now, floor(F.s:now()))  -- (after any wait for the run's row)
      local n = r.failed_steps
      finish_run(F, c.run, n > 0 and "error" or "ok", n > 0 and format("%d step%s failed", n, n == 1 and "" or "s") or nil)
    end
  end
  F.closed, F.closed_order = {}, {}
  return F.post
end

--- Skips the waiting dependents of `name`, and theirs (iteratively: graphs can be deep).
--- Returns how many steps were skipped.
local function skip_dependents(F, run, name, reason)
  local stack, n = { { name, reason } }, 0
  while #stack > 0 do
    local top = stack[#stack]
    stack[#stack] = nil
    local row = q1(F, "SELECT dependents FROM tide_flow_steps WHERE run_id = ? AND name = ?", run.id, top[1])
    for _, d in ipairs(names_of(row.dependents)) do
      local changed = exec(F, "UPDATE tide_flow_steps SET status = 'skipped', reason = ?, completed_at = ? "
        .. "WHERE run_id = ? AND name = ? AND status = 'waiting'", top[2], F.now, run.id, d)
      if changed > 0 then
        n = n + 1
        stack[#stack + 1] = { d, "dependency '" .. d .. "' skipped" }
      end
    end
  end
  return n
end

local FINISHED_JOBS = "('completed', 'discarded', 'cancelled', 'expired')"

--- Cancels every job of the run not yet finished, and every step and item
--- not yet finished; the run ends with `status`.  (A running job keeps its
--- lease until its worker stops it: tide.jobs.store.common's STOPPING.)
local function stop_run(F, run, status, why)
  exec(F, "UPDATE tide_jobs SET status = 'cancelled', completed_at = ? "
    .. "WHERE id IN (SELECT job_id FROM tide_flow_steps WHERE run_id = ? AND status IN ('queued', 'fanout')) "
    .. "AND status NOT IN " .. FINISHED_JOBS, F.now, run.id)
  exec(F, "UPDATE tide_jobs SET status = 'cancelled', completed_at = ? "
    .. "WHERE id IN (SELECT job_id FROM tide_flow_items WHERE run_id = ? AND status = 'queued') "
    .. "AND status NOT IN " .. FINISHED_JOBS, F.now, run.id)
  exec(F, "UPDATE tide_flow_items SET status = 'cancelled', completed_at = ? WHERE run_id = ? "
    .. "AND status IN ('waiting', 'queued')", F.now, run.id)
  exec(F, "UPDATE tide_flow_steps SET status = 'cancelled', reason = ?, completed_at = ? WHERE run_id = ? "
    .. "AND status IN ('waiting', 'queued', 'fanout')", why, F.now, run.id)
  finish_run(F, run, status, why)
end

-- ===== one step at a time: ok, skipped, failed

local function step_ok(F, run, name, job_id, result)
  steps_ok(F, { { run = run, name = name, job_id = job_id, result = result } })
end

local function step_skipped(F, run, name, job_id, reason)
  local n = exec(F, "UPDATE tide_flow_steps SET status = 'skipped', reason = ?, completed_at = ? WHERE run_id = ? "
    .. "AND name = ? AND status = 'queued' AND job_id = ?", reason, F.now, run.id, name, job_id)
  if n == 0 then return end
  steps_closed(F, run, 1 + skip_dependents(F, run, name, "dependency '" .. name .. "' skipped"), 0)
end

--- "timeout" for an attempt that timed out, else "error".
local function failed_status(err)
  return type(err) == "string" and err:match("^timeout:") and "timeout" or "error"
end

--- The step failed for good (status error, timeout or cancelled).
local function step_failed(F, run, name, status, err, trace)
  local n = exec(F, "UPDATE tide_flow_steps SET status = ?, error = ?, traceback = ?, completed_at = ? "
    .. "WHERE run_id = ? AND name = ? AND status IN ('queued', 'fanout')", status, err, trace, F.now, run.id, name)
  if n == 0 then return end
  hook_job(F, run, "task_error", format('{"run":%d,"task":%s,"status":%s,"error":%s}', run.id, jstr(name),
                                        jstr(status), jstr(tostring(err))))
  if run.fail == "stop" then
    exec(F, "UPDATE tide_flow_runs SET failed_steps = failed_steps + 1 WHERE id = ?", run.id)
    return stop_run(F, run, "error", format("step '%s' %s: %s", name, status, tostring(err)))
  end
  local skipped = skip_dependents(F, run, name, format("dependency '%s' %s", name, status))
  steps_closed(F, run, 1 + skipped, 1)
end

--- A failed attempt of a step's job (`final`: the job was discarded):
--- counts it, and fails the step once its retry policy allows no more.
local function step_attempt_failed(F, run, name, job_id, final, err, trace)
  local r = q1(F, "UPDATE tide_flow_steps SET failures = failures + 1 WHERE run_id = ? AND name = ? "
    .. "AND status = 'queued' AND job_id = ? RETURNING failures, max_failures", run.id, name, job_id)
  if not r then return end
  if r.failures < r.max_failures and not final then return end       -- the job retries, with backoff
  exec(F, "UPDATE tide_jobs SET status = 'discarded', completed_at = ? WHERE id = ? AND status = 'retryable'",
       F.now, job_id)
  step_failed(F, run, name, failed_status(err), err, trace)
  return true
end

-- ===== each: items

local function fan_out(F, run, name, job_id, items)
  if #items == 0 then return step_ok(F, run, name, job_id, "[]") end
  local row = q1(F, "UPDATE tide_flow_steps SET status = 'fanout', items_total = ?, items_done = 0 WHERE run_id = ? "
    .. "AND name = ? AND status = 'queued' AND job_id = ? RETURNING concurrency, max_failures",
    #items, run.id, name, job_id)
  if not row then return end
  for i, item in ipairs(items) do
    exec(F, "INSERT INTO tide_flow_items (run_id, step, idx, status, item) VALUES (?, ?, ?, 'waiting', ?)",
         run.id, name, i, item)
  end
  for i = 1, math.min(#items, row.concurrency or #items) do
    enqueue_item(F, run, name, i, items[i], row.max_failures)
  end
end

--- One more item of step `name` finished: queue the next, or finish the step.
local function item_settled(F, run, name)
  local r = q1(F, "UPDATE tide_flow_steps SET items_done = items_done + 1 WHERE run_id = ? AND name = ? "
    .. "AND status = 'fanout' RETURNING items_done, items_total, job_id, max_failures", run.id, name)
  if not r then return end
  if r.items_done >= r.items_total then
    local parts = {}
    for i, it in ipairs(F.s:query("SELECT result FROM tide_flow_items WHERE run_id = ? AND step = ? ORDER BY idx",
                                  run.id, name)) do
      parts[i] = it.result or "null"
    end
    return step_ok(F, run, name, r.job_id, "[" .. concat(parts, ",") .. "]")
  end
  local nxt = q1(F, "SELECT idx, item FROM tide_flow_items WHERE run_id = ? AND step = ? AND status = 'waiting' "
    .. "ORDER BY idx LIMIT 1", run.id, name)
  if nxt then enqueue_item(F, run, name, nxt.idx, nxt.item, r.max_failures) end
end

local function item_ok(F, run, name, idx, job_id, result)
  local n = exec(F, "UPDATE tide_flow_items SET status = 'ok', result = ?, completed_at = ? WHERE run_id = ? "
    .. "AND step = ? AND idx = ? AND status = 'queued' AND job_id = ?", result, F.now, run.id, name, idx, job_id)
  if n > 0 then item_settled(F, run, name) end
end

--- An item failed for good: the step fails (unless exit_on_error = false:
--- then its result is null and the others go on).
local function item_failed(F, run, name, idx, status, err, trace)
  local n = exec(F, "UPDATE tide_flow_items SET status = ?, error = ?, traceback = ?, completed_at = ? "
    .. "WHERE run_id = ? AND step = ? AND idx = ? AND status = 'queued'", status, err, trace, F.now, run.id, name, idx)
  if n == 0 then return end
  local step = q1(F, "SELECT each FROM tide_flow_steps WHERE run_id = ? AND name = ?", run.id, name)
  if step and step.each == 2 then return item_settled(F, run, name) end
  exec(F, "UPDATE tide_jobs SET status = 'cancelled', completed_at = ? "
    .. "WHERE id IN (SELECT job_id FROM tide_flow_items WHERE run_id = ? AND step = ? AND status = 'queued') "
    .. "AND status NOT IN " .. FINISHED_JOBS, F.now, run.id, name)
  exec(F, "UPDATE tide_flow_items SET status = 'cancelled', completed_at = ? WHERE run_id = ? AND step = ? "
    .. "AND status IN ('waiting', 'queued')", F.now, run.id, name)
  step_failed(F, run, name, status, format("item %d %s: %s", idx, status, tostring(err)), trace)
end

local function item_attempt_failed(F, run, name, idx, job_id, final, err, trace)
  local r = q1(F, "UPDATE tide_flow_items SET failures = failures + 1 WHERE run_id = ? AND step = ? AND idx = ? "
    .. "AND status = 'queued' AND job_id = ? RETURNING failures", run.id, name, idx, job_id)
  if not r then return end
  local step = q1(F, "SELECT max_failures FROM tide_flow_steps WHERE run_id = ? AND name = ?", run.id, name)
  if r.failures < step.max_failures and not final then return end
  exec(F, "UPDATE tide_jobs SET status = 'discarded', completed_at = ? WHERE id = ? AND status = 'retryable'",
       F.now, job_id)
  item_failed(F, run, name, idx, failed_status(err), err, trace)
  return true
end

-- ===== outcomes of the flow's jobs, inside the worker's outcome write

local function by_run(a, b)
  local ra, rb = a.args.run, b.args.run
  if ra ~= rb then return ra < rb end
  return a.id < b.id
end

local function is_int(v) return type(v) == "number" and v >= 1 and v <= 2 ^ 53 and v % 1 == 0 end

--- The run id in an entry's args, or nil when they are not a flow job's
--- as tide.jobs.flows writes them (a run id; a step's name; an item's
--- index): a job of this target written by hand (args.run = 1.5, args.step
--- = {}) made the store refuse the whole outcome batch, at every try.
local function run_id(e)
  local a = e.args
  if type(a) ~= "table" or not is_int(a.run) then return nil end
  if e.method ~= "hook" and type(a.step) ~= "string" then return nil end
  if e.method == "item" and not is_int(a.index) then return nil end
  return a.run
end

--- The run ids of the entries, in order (for the store to lock first).
function M.runs_of(entries)
  local seen, ids = {}, {}
  for _, e in ipairs(entries) do
    local id = run_id(e)
    if id and not seen[id] then seen[id] = true; ids[#ids + 1] = id end
  end
  sort(ids)
  return ids
end

--- True when an entry's change decides nothing for its run as a whole (a
--- step's success or fan-out, a hook's end): on PostgreSQL such changes
--- share the run's lock (see the header).
local function shares_run(e)
  local v = e.value
  if e.method == "hook" then return true end
  return e.kind == "completed" and e.method == "step" and type(v) == "table"
    and (v.kind == "ok" or v.kind == "items")
end

--- Before the outcome write touches jobs, on PostgreSQL: locks the runs of
--- `entries` in id order (shared when every entry shares, see shares_run)
--- and returns their rows by id, for M.apply.  nil on SQLite, whose one
--- writer at a time needs no lock of ours.
function M.lock_runs(session, entries)
  if not session.lock_flow_runs then return nil end
  local ids = M.runs_of(entries)
  if #ids == 0 then return nil end
  local shared = true
  for _, e in ipairs(entries) do
    if not shares_run(e) then shared = false; break end
  end
  local runs = {}
  for _, r in ipairs(session:lock_flow_runs(ids, shared)) do runs[r.id] = r end
  return runs
end

--- Applies the written outcomes of flow jobs (entries of tide.jobs.outcomes
--- with .args, .value, .err, .trace) inside the transaction that wrote them
--- (`runs`: what M.lock_runs returned; `take`: { [queue] = n }, how many
--- released steps and hook jobs to lease to `owner` at once, see release).
--- The steps that succeeded go through steps_ok together; the rest one by
--- one.  Returns what to do after the commit: { queues = { [name] = true }
--- that got available jobs, rows = { job rows leased to `owner` } }.
function M.apply(session, entries, now, owner, lease, runs, take)
  -- The time is read here, inside the transaction (after its locks), not
  -- taken from the caller: a write that waited for another process's lock
  -- must not stamp its changes earlier than the ones it waited for.
  local F = change(session, floor(session:now()), owner, lease)
  F.take = take
  for id, r in pairs(runs or {}) do F.runs[id] = r end
  local list = {}
  for _, e in ipairs(entries) do
    if run_id(e) then list[#list + 1] = e end
  end
  sort(list, by_run)
  local oks, rest = {}, {}
  for _, e in ipairs(list) do
    local run, v = run_of(F, e.args.run), e.value
    if run and run.status == "running" then
      if e.kind == "completed" and e.method == "step" and type(v) == "table"
          and (v.kind == "ok" or (v.kind == "items" and #v.items == 0)) then
        oks[#oks + 1] = { run = run, name = e.args.step, job_id = e.id, result = v.kind == "ok" and v.json or "[]" }
      else
        rest[#rest + 1] = e
      end
    end
  end
  steps_ok(F, oks)
  for _, e in ipairs(rest) do
    local a, run = e.args, F.runs[e.args.run]
    if run.status == "running" then
      local method, kind, v = e.method, e.kind, e.value
      if kind == "completed" and type(v) == "table" then
        if method == "step" then
          if v.kind == "skipped" then step_skipped(F, run, a.step, e.id, v.reason or "condition false")
          elseif v.kind == "items" then fan_out(F, run, a.step, e.id, v.items) end
        elseif method == "item" and v.kind == "ok" then
          item_ok(F, run, a.step, a.index, e.id, v.json)
        end
      elseif kind == "retry" or kind == "discard" then
        -- (free text: as the job's own error entry, json.text; a NUL or
        -- invalid UTF-8 made the write fail at every try)
        local err, trace, final = json.text(tostring(e.err)), type(e.trace) == "string" and json.text(e.trace) or nil
        if method == "step" then final = step_attempt_failed(F, run, a.step, e.id, kind == "discard", err, trace)
        elseif method == "item" then final = item_attempt_failed(F, run, a.step, a.index, e.id, kind == "discard", err, trace) end
        -- The step's retry policy allowed no more: the job was discarded
        -- here, and the worker's counts and hooks hear that.
        if final then e.outcome = "discarded" end
      end
    end
  end
  return flush(F)
end

local SWEEP_NEEDED = "SELECT EXISTS (SELECT 1 FROM tide_flow_steps s JOIN tide_jobs j ON j.id = s.job_id "
  .. "WHERE s.status = 'queued' AND j.status IN ('discarded', 'cancelled', 'expired')) "
  .. "OR EXISTS (SELECT 1 FROM tide_flow_items i JOIN tide_jobs j ON j.id = i.job_id "
  .. "WHERE i.status = 'queued' AND j.status IN ('discarded', 'cancelled', 'expired')) AS n"

--- True when M.sweep has something to do (read outside a transaction; the
--- sweep reads again inside its own).
function M.sweep_needed(session)
  local r = session:query(SWEEP_NEEDED)[1]
  return r ~= nil and (r.n == true or r.n == 1)
end

--- Steps and items whose job finished outside an outcome write (the
--- rescuer discarded it on its last attempt; cancelled or expired by
--- hand): their steps fail.  Runs in a transaction of the caller's; returns
--- what to do after the commit (as M.apply), and how many it settled.
function M.sweep(session)
  local F = change(session, floor(session:now()))
  local rows = session:query("SELECT s.run_id, s.name, j.id, j.status, j.errors FROM tide_flow_steps s "
    .. "JOIN tide_jobs j ON j.id = s.job_id WHERE s.status = 'queued' AND j.status IN ('discarded', 'cancelled', 'expired')")
  local items = session:query("SELECT i.run_id, i.step, i.idx, j.id, j.status, j.errors FROM tide_flow_items i "
    .. "JOIN tide_jobs j ON j.id = i.job_id WHERE i.status = 'queued' AND j.status IN ('discarded', 'cancelled', 'expired')")
  if session.lock_flow_runs and #rows + #items > 0 then
    local seen, ids = {}, {}
    for _, list in ipairs{ rows, items } do
      for _, r in ipairs(list) do
        if not seen[r.run_id] then seen[r.run_id] = true; ids[#ids + 1] = r.run_id end
      end
    end
    sort(ids)
    session:lock_flow_runs(ids)
  end
  local function why(r)
    local list = type(r.errors) == "string" and json.decode(r.errors)
    local last = type(list) == "table" and list[#list]
    local text = type(last) == "table" and last.error or nil
    if r.status ~= "discarded" then return "cancelled", "its job was " .. r.status .. (text and ": " .. text or "") end
    return "error", text or "its job was discarded"
  end
  for _, r in ipairs(rows) do
    local run = run_of(F, r.run_id)
    if run and run.status == "running" then
      local status, err = why(r)
      step_failed(F, run, r.name, status, err, nil)
    end
  end
  for _, r in ipairs(items) do
    local run = run_of(F, r.run_id)
    if run and run.status == "running" then
      local status, err = why(r)
      item_failed(F, run, r.step, r.idx, status, err, nil)
    end
  end
  return flush(F), #rows + #items
end

-- ===== starting a run (inside the caller's transaction)

local INSERT_STEPS = batch_stmt("b_run, b_name, b_waiting, b_deps, b_dependents, b_each, b_concurrency, b_max",
  { "BIGINT", "TEXT", "INTEGER", "TEXT", "TEXT", "INTEGER", "INTEGER", "INTEGER" },
  "INSERT INTO tide_flow_steps (run_id, name, status, waiting, deps, dependents, each, concurrency, max_failures) "
  .. "SELECT b_run, b_name, 'waiting', b_waiting, b_deps, b_dependents, b_each, b_concurrency, b_max FROM b "
  .. "WHERE b_run IS NOT NULL")

--- Starts a run of `def` (M.definition) with `input` (JSON text): returns
--- its id and true, or the id of the run that has this key and false; and
--- the queue that got jobs.  opts: key, queue, priority.  A key held by a
--- run of another flow is refused (`fname` names the caller): returning
--- that run would tell the caller its flow had started when it never will.
function M.start(session, def, input, opts, now, fname)
  local F = change(session, now)
  local queue, priority = opts.queue or "default", opts.priority or 0
  local row = q1(F, "INSERT INTO tide_flow_runs (flow, status, fail, queue, priority, input, idempotency_key, "
    .. "open_steps, inserted_at, partition_key) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?) "
    .. "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    def.module, def.fail, queue, priority, input, opts.key, #def.order, now, opts.partition_key)
  if not row then
    local held = q1(F, "SELECT id, flow FROM tide_flow_runs WHERE idempotency_key = ?", opts.key)
    if held.flow ~= def.module then
      error(("%s: key %q is held by run %d of flow '%s', not of '%s'"):format(fname, opts.key, held.id,
        held.flow, def.module), 0)
    end
    return held.id, false
  end
  local run = { id = row.id, flow = def.module, status = "running", fail = def.fail, queue = queue,
                priority = priority, input = input, partition_key = opts.partition_key }
  F.runs[run.id] = run
  local rows, roots = {}, {}
  for i, name in ipairs(def.order) do
    local node = def.nodes[name]
    local deps = {}
    for k, d in ipairs(dependencies_of(def, node)) do deps[k] = d end
    sort(deps)
    local dependents = {}
    for k, d in ipairs(dependents_of(def, node)) do dependents[k] = d.name end
    sort(dependents)
    local deps_json, dependents_json = json.encode(json.array(deps)), json.encode(json.array(dependents))
    remember(deps_json, deps)
    remember(dependents_json, dependents)
    rows[i] = { run.id, name, #deps, deps_json, dependents_json,
                node.each and (node.exit_on_error and 1 or 2) or 0, node.each and node.concurrency or nil,
                max_failures(node) }
    if #deps == 0 then roots[#roots + 1] = { run = run, name = name, deps = deps, max_failures = max_failures(node) } end
  end
  batch(F, INSERT_STEPS, rows)
  release(F, roots)
  return run.id, true, queue
end

-- ===== by hand: cancel and retry

--- Cancels run `id`: true, or nil and why not.
function M.cancel(session, id, now)
  local F = change(session, now)
  local run = run_of(F, id)
  if not run then return nil, format("run %d not found", id) end
  if run.status ~= "running" then return nil, format("run %d is %s", id, run.status) end
  stop_run(F, run, "cancelled", "cancelled by hand")
  return true, F.post
end

--- Runs the failed, timed out, cancelled and skipped steps of finished run
--- `id` again (completed steps keep their results): true, or nil and why not.
function M.retry(session, id, now)
  local F = change(session, now)
  local run = run_of(F, id)
  if not run then return nil, format("run %d not found", id) end
  if run.status == "running" then return nil, format("run %d is running", id) end
  if run.status == "ok" then return nil, format("run %d is ok: nothing to retry", id) end
  -- A step or item cancelled while it ran keeps its lease until its worker
  -- has stopped it (tide.jobs.store.common's STOPPING): run again now, it
  -- would run beside itself (q:retry refuses such a job too).
  local stopping = q1(F, "SELECT id, status, lease_owner FROM tide_jobs WHERE id IN ("
    .. "SELECT job_id FROM tide_flow_steps WHERE run_id = ? UNION ALL "
    .. "SELECT job_id FROM tide_flow_items WHERE run_id = ?) AND " .. STOPPING .. " ORDER BY id LIMIT 1", id, id)
  if stopping then
    return nil, format("run %d: its %s", id, job.stopping_why(stopping))
  end
  local again = session:query("SELECT name, deps, max_failures FROM tide_flow_steps WHERE run_id = ? AND status <> 'ok' ORDER BY name", id)
  exec(F, "DELETE FROM tide_flow_items WHERE run_id = ? AND step IN (SELECT name FROM tide_flow_steps "
    .. "WHERE run_id = ? AND status <> 'ok')", id, id)
  exec(F, "UPDATE tide_flow_steps SET status = 'waiting', job_id = NULL, failures = 0, items_total = NULL, "
    .. "items_done = NULL, result = NULL, error = NULL, traceback = NULL, reason = NULL, queued_at = NULL, "
    .. "completed_at = NULL WHERE run_id = ? AND status <> 'ok'", id)
  local ok = {}
  for _, r in ipairs(session:query("SELECT name FROM tide_flow_steps WHERE run_id = ? AND status = 'ok'", id)) do
    ok[r.name] = true
  end
  exec(F, "UPDATE tide_flow_runs SET status = 'running', error = NULL, completed_at = NULL, open_steps = ?, "
    .. "failed_steps = 0 WHERE id = ?", #again, id)
  run.status = "running"
  local ready = {}
  for _, r in ipairs(again) do
    local n = 0
    local deps = names_of(r.deps)
    for _, d in ipairs(deps) do if not ok[d] then n = n + 1 end end
    exec(F, "UPDATE tide_flow_steps SET waiting = ? WHERE run_id = ? AND name = ?", n, id, r.name)
    if n == 0 then ready[#ready + 1] = { run = run, name = r.name, deps = deps, max_failures = r.max_failures } end
  end
  release(F, ready)
  return true, F.post
end

-- ===== reading runs

local RUN_STATUSES = { running = true, ok = true, error = true, cancelled = true }
M.RUN_STATUSES = RUN_STATUSES

local function ms(v) return type(v) == "number" and v or nil end

local function decoded(text)
  if type(text) ~= "string" then return nil end
  local v = json.decode(text)
  return v
end

--- A step row (with its job's status, attempt and attempted_at) -> what users see.
local function step_of(r)
  local status = r.status
  if status == "waiting" then status = "pending"
  elseif status == "fanout" then status = "running"
  elseif status == "queued" then status = r.job_status == "executing" and "running" or "queued" end
  local started = ms(r.attempted_at) or ms(r.queued_at)
  local s = {
    name = r.name, status = status, after = decoded(r.deps) or {}, job = r.job_id, attempts = r.attempt or 0,
    failures = r.failures, result = decoded(r.result), result_json = r.result, error = r.error,
    traceback = r.traceback, reason = r.reason, queued_at = ms(r.queued_at), started_at = started,
    completed_at = ms(r.completed_at), each = r.each ~= 0 or nil,
  }
  -- (at least 0: on PostgreSQL a step's start is the server's clock, its
  -- end the worker's reading of it, which may be a few ms behind)
  if s.completed_at and started then s.duration = max(0, r.completed_at - (r.attempted_at or r.queued_at)) end
  if r.items_total then s.items = { total = r.items_total, done = r.items_done or 0 } end
  return s
end

local function run_row_of(r)
  return { id = r.id, flow = r.flow, status = r.status, fail = r.fail, queue = r.queue, key = r.idempotency_key,
           partition_key = r.partition_key,
           input = decoded(r.input), open = r.open_steps, failed = r.failed_steps, error = r.error,
           inserted_at = ms(r.inserted_at), completed_at = ms(r.completed_at),
           duration = r.completed_at and (r.completed_at - r.inserted_at) or nil }
end

--- Run `id` with its steps (in name order), or nil.
function M.get(session, id)
  local r = session:query("SELECT * FROM tide_flow_runs WHERE id = ?", id)[1]
  if not r then return nil end
  local run = run_row_of(r)
  run.steps = {}
  for i, s in ipairs(session:query("SELECT s.*, j.status AS job_status, j.attempt, j.attempted_at "
      .. "FROM tide_flow_steps s LEFT JOIN tide_jobs j ON j.id = s.job_id WHERE s.run_id = ? ORDER BY s.name", id)) do
    run.steps[i] = step_of(s)
  end
  return run
end

--- Runs, newest first: filter { status, flow, limit, before }.
function M.list(session, f)
  local where, params = {}, {}
  if f.status then where[#where + 1] = "status = ?"; params[#params + 1] = f.status end
  if f.flow then where[#where + 1] = "flow = ?"; params[#params + 1] = f.flow end
  if f.before then where[#where + 1] = "id < ?"; params[#params + 1] = f.before end
  local sql = "SELECT * FROM tide_flow_runs" .. (#where > 0 and " WHERE " .. concat(where, " AND ") or "")
    .. " ORDER BY id DESC LIMIT " .. format("%d", f.limit or 100)
  local out = {}
  for i, r in ipairs(session:query(sql, unpack(params))) do
    out[i] = run_row_of(r)
    out[i].steps_total = nil
  end
  return out
end

--- Counts of steps by status for each run id given: { [id] = { [status] = n, total = n } }.
function M.step_counts(session, ids)
  local out = {}
  for _, id in ipairs(ids) do
    local c = { total = 0 }
    for _, r in ipairs(session:query("SELECT status, count(*) AS n FROM tide_flow_steps WHERE run_id = ? "
        .. "GROUP BY status", id)) do
      local st = r.status == "waiting" and "pending" or r.status == "fanout" and "running" or r.status
      c[st] = (c[st] or 0) + r.n
      c.total = c.total + r.n
    end
    out[id] = c
  end
  return out
end

return M
