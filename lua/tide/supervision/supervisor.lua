--- tide.supervision.supervisor — OTP-style supervision trees for long-running children.
--
-- A supervisor is itself a task.  It starts its children (tasks) in order,
-- and reacts, one event at a time, to their exits and to the commands of its
-- API: a mailbox serializes both, so a restart never races a terminate.
--
--   restart types    permanent: always restarted; transient: restarted after
--                    an abnormal exit (error, timeout, or a cancel that the
--                    supervisor did not ask for); temporary: never.
--   strategies       one_for_one: the child alone; one_for_all: every child
--                    (the others are stopped in reverse order first);
--                    rest_for_one: the child and those started after it.
--   intensity        more than `intensity` restarts within `period` ms and
--                    the supervisor gives up: it stops its children and ends
--                    with an error, which its parent sees as a child's crash.
--   the top          a supervisor without a parent that gives up does not
--                    leave a dead node: it logs, waits a cool-down (backoff)
--                    and starts again, unless `on_give_up` returns "stop".
--
-- Stopping a child: it is asked to stop (ctx:stopping() becomes true), given
-- its `shutdown` ms to end by itself, then cancelled.  Outcomes are always
-- delivered.
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local retry = require "tide.engine.retry"
local spawn, check_await = require("tide.engine.task").spawn, require("tide.engine.task").check_await

local type, error, ipairs, pairs, pcall, tostring = type, error, ipairs, pairs, pcall, tostring
local setmetatable, getmetatable = setmetatable, getmetatable
local arg_error, opt_error = check.arg_error, check.opt_error

local M = {}
local Sup = {}
local Sup_mt = { __index = Sup, __tostring = function(s)
  return ("tide.Supervisor '%s' (%s)"):format(s.name, s.state)
end }
M.Supervisor_mt = Sup_mt

local STRATEGIES = { one_for_one = true, one_for_all = true, rest_for_one = true }
local RESTARTS = { permanent = true, transient = true, temporary = true }
local KEYS = check.options("tide.supervisor", {
  strategy = true, intensity = true, period = true, children = true, name = true,
  on_give_up = true, cooldown = true
})
local CHILD_KEYS = check.options("supervisor child", {
  id = true, start = true, restart = true, shutdown = true, args = true
})

local running = {}          -- supervisors whose task is alive

-- ===== validation

--- A child's id: a string, or a number other than NaN (a table key).
local function is_id(v)
  return type(v) == "string" or (type(v) == "number" and v == v)
end

local function check_child(fname, spec, where, level)
  level = level + 1
  if type(spec) ~= "table" then opt_error(fname, where, "child spec table", spec, level) end
  check.known(fname, spec, CHILD_KEYS, where .. ".", level)
  if not is_id(spec.id) then opt_error(fname, where .. ".id", "string or number", spec.id, level) end
  local start = spec.start
  if type(start) ~= "function" and getmetatable(start) ~= Sup_mt then
    opt_error(fname, where .. ".start", "function or supervisor", start, level)
  end
  if spec.restart ~= nil and not RESTARTS[spec.restart] then
    opt_error(fname, where .. ".restart", check.choices(RESTARTS), spec.restart, level)
  end
  if spec.shutdown ~= nil and not check.is_ms(spec.shutdown) then
    opt_error(fname, where .. ".shutdown", "non-negative number of ms", spec.shutdown, level)
  end
  if spec.args ~= nil and type(spec.args) ~= "table" then
    opt_error(fname, where .. ".args", "table", spec.args, level)
  end
  if spec.args ~= nil and spec.args.n ~= nil and not check.is_count(spec.args.n) then   -- (as tide.spawn)
    opt_error(fname, where .. ".args.n", "non-negative integer", spec.args.n, level)
  end
  return { id = spec.id, start = start, restart = spec.restart or "permanent",
           shutdown = spec.shutdown or 5000, args = spec.args }
end

local COOLDOWN_KEYS = check.options("cooldown", { base = true, max = true })

--- The cool-down between two runs of a top supervisor that gave up: an
--- exponential backoff from base to max ms (defaults 1000 and 30000).
local function check_cooldown(fname, c)
  if c == nil then c = {} end
  if type(c) ~= "table" then opt_error(fname, "cooldown", "table { base = ms, max = ms }", c, 3) end
  check.known(fname, c, COOLDOWN_KEYS, "cooldown.", 3)
  local base, max = c.base or 1000, c.max or 30000
  if not check.is_ms(base) then opt_error(fname, "cooldown.base", "non-negative number of ms", c.base, 3) end
  if not check.is_ms(max) or max < base then opt_error(fname, "cooldown.max", "number of ms >= base", c.max, 3) end
  return { attempts = 1, backoff = "exponential", base = base, max = max, jitter = false }
end

--- tide.supervisor{ strategy =, intensity =, period =, children = {...}, name =,
---                  on_give_up = fn(sup, reason) -> "restart" | "stop",
---                  cooldown = { base = ms, max = ms } }
function M.new(opts)
  local fname = "tide.supervisor"
  if type(opts) ~= "table" then arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  local strategy = opts.strategy or "one_for_one"
  if not STRATEGIES[strategy] then opt_error(fname, "strategy", check.choices(STRATEGIES), opts.strategy) end
  local intensity, period = opts.intensity or 3, opts.period or 5000
  if not check.is_count(intensity) then opt_error(fname, "intensity", "integer >= 0", opts.intensity) end
  if not check.is_ms(period, true) then opt_error(fname, "period", "positive number of ms", opts.period) end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name) end
  if opts.on_give_up ~= nil and type(opts.on_give_up) ~= "function" then
    opt_error(fname, "on_give_up", "function", opts.on_give_up)
  end
  local cooldown = check_cooldown(fname, opts.cooldown)
  local children, ids = {}, {}
  local list = opts.children or {}
  if type(list) ~= "table" then opt_error(fname, "children", "list of child specs", opts.children) end
  local n = 0                                    -- (not ipairs: a map or a hole would drop children silently)
  for k in pairs(list) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
      error(("%s: bad option 'children' (a list expected, it has the key %s)"):format(fname, tostring(k)), 2)
    end
    if k > n then n = k end
  end
  for i = 1, n do
    local c = check_child(fname, list[i], "children[" .. i .. "]", 2)
    if ids[c.id] then error(("%s: duplicate child id '%s'"):format(fname, tostring(c.id)), 2) end
    ids[c.id] = true
    children[i] = c
  end
  return setmetatable({
    name = opts.name or "supervisor", strategy = strategy, intensity = intensity, period = period,
    on_give_up = opts.on_give_up, cooldown = cooldown, specs = children, ids = ids,
    on_give_up_positional = opts.on_give_up and check.positional_hook(fname, "on_give_up", opts.on_give_up, 2) or nil,
    state = "stopped", children = {}, restarts = { head = 1, tail = 0 }, mailbox = { head = 1, tail = 0 }, waiting = false,
    task = nil, parent = nil, gave_up = 0,
  }, Sup_mt)
end

-- ===== the mailbox: events handled one at a time by the supervisor's task

-- A queue: { head, tail, [head..tail] = events }.  (A list popped from its
-- front cost each event a move of every event behind it: 20,000 children
-- crashing at once took 80 us each to restart, against 19 for 2,000.)
local function new_box() return { head = 1, tail = 0 } end

local function post(sup, event)
  local box = sup.mailbox
  local tail = box.tail + 1
  box[tail], box.tail = event, tail
  S.notify(sup)
end

--- The next event; with `ms`, nil once that much time passed without one.
local function receive(sup, ms)
  local deadline = ms and S.now() + ms
  while sup.mailbox.head > sup.mailbox.tail do
    local left = deadline and deadline - S.now()
    if left and left <= 0 then return nil end
    S.wait_for(sup, "supervisor", left)
  end
  local box = sup.mailbox
  local head = box.head
  local ev = box[head]
  box[head], box.head = nil, head + 1
  return ev
end

--- Drops the exits of children from an earlier run (commands stay).
local function drop_stale_exits(sup)
  local box, keep = sup.mailbox, new_box()
  for i = box.head, box.tail do
    local ev = box[i]
    if ev[1] ~= "exit" then keep.tail = keep.tail + 1; keep[keep.tail] = ev end
  end
  sup.mailbox = keep
end

-- ===== children

--- The handle a child's start function receives.
local Ctx = {}
local Ctx_mt = { __index = Ctx }
function Ctx.stopping(ctx) return ctx.stop_requested end

local run_supervisor -- forward

--- Why child spec c cannot start now, or nil: a supervisor runs once at a
--- time (a second run would share its children, mailbox and task with the first).
local function busy(fname, c)
  local nested = getmetatable(c.start) == Sup_mt and c.start
  if nested and nested.task and not S.TERMINAL[nested.task:status()] then
    return ("%s: child '%s' is supervisor '%s', which is already running (a supervisor runs once at a time)")
      :format(fname, tostring(c.id), nested.name)
  end
end

--- The state of a supervisor whose task t was just spawned: "starting"
--- (its task starts the children on the next tick), or "stopped" when t
--- ended at once (spawned during a shutdown: it never runs).
local function starting_state(t)
  return S.TERMINAL[t:status()] and "stopped" or "starting"
end

local function start_child(sup, c)
  local ctx = setmetatable({ id = c.id, supervisor = sup, stop_requested = false }, Ctx_mt)
  local run, args
  local nested = getmetatable(c.start) == Sup_mt and c.start
  if nested then
    local why = busy("supervisor '" .. sup.name .. "'", c)
    if why then error(why, 0) end
    nested.parent, nested.mailbox = sup, new_box()   -- its commands count from now on
    run, args = run_supervisor, { n = 1, nested }
  else
    run = c.start
    args = { n = 1 + (c.args and (c.args.n or table.maxn(c.args)) or 0), ctx }   -- (nils too, as tide.spawn)
    if c.args then for i = 1, args.n - 1 do args[i + 1] = c.args[i] end end
  end
  local rec = { spec = c, ctx = ctx, stopping = false }
  rec.task = spawn{ run = run, args = args, name = sup.name .. "/" .. tostring(c.id),
    handle_result = function(status, value, t) post(sup, { "exit", rec, status, value, t.traceback }) end }
  if nested then nested.task, nested.state = rec.task, starting_state(rec.task) end
  sup.children[c.id] = rec
  return rec
end

--- Asks a child to stop, waits up to its shutdown, then cancels it; the
--- exit that follows is expected (it restarts nothing).
local function stop_child(sup, rec)
  rec.stopping = true
  rec.ctx.stop_requested = true
  if getmetatable(rec.spec.start) == Sup_mt then post(rec.spec.start, { "stop" }) end  -- in order, below
  local t = rec.task
  if not S.TERMINAL[t:status()] and rec.spec.shutdown > 0 then t:await(rec.spec.shutdown) end
  if not S.TERMINAL[t:status()] then t:cancel("shutdown by " .. sup.name) end
  if sup.children[rec.spec.id] == rec then sup.children[rec.spec.id] = nil end
end

--- The index of child `id` in sup.specs, or nil.  Through a map of ids,
--- checked at each use and made anew when the specs changed (a child
--- added, deleted): a scan per exit made 20,000 children that crashed at
--- once cost 3x as much each as 2,000 (bench/supervisor.lua).
local function index_of(sup, id)
  local specs, map = sup.specs, sup.spec_index
  local i = map and map[id]
  if i and specs[i] and specs[i].id == id then return i end
  map = {}
  for k, c in ipairs(specs) do map[c.id] = k end
  sup.spec_index = map
  return map[id]
end

--- Stops the children from index `from` on, last started first; returns
--- the set of ids it stopped.
local function stop_from(sup, from)
  local stopped = {}
  for i = #sup.specs, from, -1 do
    local rec = sup.children[sup.specs[i].id]
    if rec then stop_child(sup, rec); stopped[rec.spec.id] = true end
  end
  return stopped
end

-- ===== restarts

--- Counts a restart; false when that exceeds the intensity within the period.
--- The times of the restarts within the period are a queue, oldest first
--- (list[head .. tail]): those that left the period go from its front, so
--- a restart costs the same however many the period holds (copying the
--- list made each cost one step per restart kept: with intensity and period
--- huge, the 60,000th restart of a crashing child took 3.6 ms, not 14 us).
local function count_restart(sup)
  local now, list, period = S.now(), sup.restarts, sup.period
  local head, tail = list.head, list.tail
  while head <= tail and now - list[head] >= period do list[head] = nil; head = head + 1 end
  if head > 64 and 2 * head > tail then       -- half of the slots are gone: move the rest down
    local n = tail - head + 1
    for i = 1, n do list[i], list[head + i - 1] = list[head + i - 1], nil end
    head, tail = 1, n
  end
  tail = tail + 1
  list[tail], list.head, list.tail = now, head, tail
  return tail - head + 1 <= sup.intensity
end

local function wants_restart(rec, status)
  local kind = rec.spec.restart
  if kind == "permanent" then return true end
  if kind == "temporary" then return false end
  return status ~= "ok"                        -- transient: abnormal exits only
end

--- Tells the error sink of a child that ended other than ok, and what
--- follows (a warning: supervision handles it, and the restarts are
--- counted).  As an Erlang supervisor's crash report: without it a child
--- that fails and is restarted, again and again within the intensity, is
--- never seen.
local function report_exit(sup, rec, status, value, tb, next_step)
  log.warn(("supervisor '%s': child '%s' ended %s (%s)"):format(sup.name, tostring(rec.spec.id), status, next_step),
    value, tb)
end

local function on_exit(sup, rec, status, value, tb)
  if rec.stopping then return end            -- we stopped it
  if sup.children[rec.spec.id] == rec then sup.children[rec.spec.id] = nil end
  if S.shutting_down() then return end       -- every task is ending: nothing to say of each
  local restart = wants_restart(rec, status)
  local gave_up = restart and not count_restart(sup)
  if status ~= "ok" then
    report_exit(sup, rec, status, value, tb, gave_up and "restarts exhausted: giving up"
      or restart and "restarting" or rec.spec.restart .. ": not restarted")
  end
  if not restart then return end
  if gave_up then
    error(("supervisor '%s' gave up: more than %d restarts in %g ms (last: child '%s' %s: %s)")
      :format(sup.name, sup.intensity, sup.period, tostring(rec.spec.id), status, tostring(value)), 0)
  end
  local i = index_of(sup, rec.spec.id)
  if sup.strategy == "one_for_one" then
    start_child(sup, rec.spec)
    return
  end
  local from = sup.strategy == "one_for_all" and 1 or i
  local stopped = stop_from(sup, from)
  for j = from, #sup.specs do                  -- what ran before, in order; temporary ones stay down
    local c = sup.specs[j]
    if c == rec.spec or (stopped[c.id] and c.restart ~= "temporary") then start_child(sup, c) end
  end
end

-- ===== commands (run by the supervisor's task)

local COMMANDS = {}

function COMMANDS.terminate_child(sup, id)
  local rec = sup.children[id]
  if rec then stop_child(sup, rec) end
end

function COMMANDS.restart_child(sup, id)
  local rec = sup.children[id]
  if rec then stop_child(sup, rec) end
  local i = index_of(sup, id)
  if i then start_child(sup, sup.specs[i]) end
end

function COMMANDS.start_child(sup, spec)
  -- A nested supervisor started elsewhere since the call: refused here,
  -- reported, its id free again.  Raised, it made this supervisor give up
  -- and stop every child, and the spec kept failing every run after.
  local why = busy("supervisor '" .. sup.name .. "'", spec)
  if why then
    sup.ids[spec.id] = nil
    log.report("supervisor " .. sup.name, why .. " (start_child refused)")
    return
  end
  sup.specs[#sup.specs + 1] = spec
  start_child(sup, spec)
end

function COMMANDS.delete_child(sup, id)
  local rec = sup.children[id]
  if rec then stop_child(sup, rec) end
  local i = index_of(sup, id)
  if i then table.remove(sup.specs, i) end
end

function COMMANDS.stop(sup)
  stop_from(sup, 1)
  return true
end

--- The supervisor's life: start the children, then handle events until
--- stopped (returns) or over intensity (raises, children stopped).
local function supervise(sup)
  sup.children, sup.restarts = {}, { head = 1, tail = 0 }
  drop_stale_exits(sup)
  for _, c in ipairs(sup.specs) do start_child(sup, c) end
  sup.state = "running"
  while true do
    local ev = receive(sup)
    local ok, done = pcall(function()
      if ev[1] == "exit" then return on_exit(sup, ev[2], ev[3], ev[4], ev[5]) end
      return COMMANDS[ev[1]](sup, ev[2])
    end)
    if not ok then
      sup.state = "giving up"
      stop_from(sup, 1)
      error(done, 0)
    end
    if done then return "stopped" end
  end
end

--- Applies event `ev` to the specs alone, for a supervisor whose children
--- are down: a child added starts with the others at its next run, one
--- deleted is gone; terminate and restart have nothing to do.
local function keep_spec_change(sup, ev)
  if ev[1] == "start_child" then sup.specs[#sup.specs + 1] = ev[2] end
  if ev[1] == "delete_child" then
    local i = index_of(sup, ev[2])
    if i then table.remove(sup.specs, i) end
  end
end

--- Waits out a cool-down while still answering commands: true when told
--- to stop.
local function cool_down(sup, ms)
  local deadline = S.now() + ms
  while true do
    local ev = receive(sup, deadline - S.now())
    if ev == nil then return false end
    if ev[1] == "stop" then return true end
    keep_spec_change(sup, ev)
  end
end

--- Runs a supervisor as a task: nested ones escalate; the top one cools
--- down and starts again after giving up, unless on_give_up says "stop".
function run_supervisor(sup)
  sup.task = S.current()
  running[sup] = true
  -- However it ends, no child outlives it, and the commands it did not
  -- handle (given after a stop, or while it gave up) still change its
  -- specs: each answered true and took or freed an id.
  S.on_finish(sup.task, function()
    running[sup] = nil
    local box = sup.mailbox
    for i = box.head, box.tail do keep_spec_change(sup, box[i]) end
    sup.mailbox = new_box()
    for _, rec in pairs(sup.children) do
      rec.stopping = true
      if not S.TERMINAL[rec.task:status()] then rec.task:cancel("supervisor " .. sup.name .. " ended") end
    end
    sup.children = {}
    sup.state = "stopped"
  end)
  local streak = 0
  while true do
    local started = S.now()
    local ok, err = pcall(supervise, sup)
    if ok then sup.state = "stopped"; return "stopped" end
    sup.gave_up = sup.gave_up + 1
    if sup.parent then
      log.report("supervisor " .. sup.name, err .. " (escalating to '" .. sup.parent.name .. "')")
      error(err, 0)
    end
    local decision = "restart"
    if sup.on_give_up then
      local hook_ok, d
      if sup.on_give_up_positional then hook_ok, d = pcall(sup.on_give_up, sup, err)
      else hook_ok, d = pcall(sup.on_give_up, { supervisor = sup, reason = err }) end
      if not hook_ok then log.report("on_give_up of " .. tostring(sup), d, d) end
      if hook_ok and d == "stop" then decision = "stop" end
    end
    if decision == "stop" then sup.state = "stopped"; error(err, 0) end
    -- consecutive give-ups back off; a run that lasted longer than the
    -- longest cool-down counts as healthy and starts the backoff over
    if S.now() - started > sup.cooldown.max then streak = 0 end
    streak = streak + 1
    local wait = retry.delay(sup.cooldown, streak)
    log.report("supervisor " .. sup.name, err .. (" (starting again in %g ms)"):format(wait))
    sup.state = "cooling down"
    if cool_down(sup, wait) then sup.state = "stopped"; return "stopped" end
  end
end

-- A shutdown stops every running supervisor in order (children last
-- started first), instead of letting them restart what the shutdown ends.
S.on_shutdown(function()
  for sup in pairs(running) do post(sup, { "stop" }) end
end)

-- ===== the API

local function check_sup(fname, sup)
  if getmetatable(sup) ~= Sup_mt then
    error(("%s: bad self (supervisor expected, got %s)"):format(fname, check.describe(sup)), 3)
  end
end

--- Starts the supervisor (as a task); returns it.
function Sup.start(sup)
  check_sup("supervisor:start", sup)
  if sup.task and not S.TERMINAL[sup.task:status()] then
    error("supervisor:start: '" .. sup.name .. "' is already running", 2)
  end
  local seen = {}
  for _, c in ipairs(sup.specs) do
    local why = busy("supervisor:start", c)
    if why then error(why, 2) end
    if getmetatable(c.start) == Sup_mt then
      if seen[c.start] ~= nil then
        error(("supervisor:start: children '%s' and '%s' are both supervisor '%s' (a supervisor runs once at a time)")
          :format(tostring(seen[c.start]), tostring(c.id), c.start.name), 2)
      end
      seen[c.start] = c.id
    end
  end
  sup.gave_up = 0
  sup.stop_asked = nil
  sup.mailbox = new_box()                       -- commands count from now on, in order
  sup.task = spawn{ run = run_supervisor, args = { sup }, name = sup.name }
  sup.state = starting_state(sup.task)
  return sup
end

--- Waits (inside a task) for the supervisor's end: its task's status and
--- value ("ok", "stopped" after sup:stop()), or nil, "timeout" after `ms`.
function Sup.await(sup, ms)
  check_sup("supervisor:await", sup)
  if ms ~= nil and not check.is_ms(ms) then arg_error("supervisor:await", 1, "non-negative number of ms", ms) end
  if not sup.task then return nil, ("supervisor:await: '%s' was never started"):format(sup.name) end
  check_await("supervisor:await", sup.task, 2)
  return sup.task:await(ms)
end

--- Posts a command: true, or nil and why not.  Commands are handled one at
--- a time, in the order given, from the moment start() returns.
local function command(fname, sup, name, arg)
  if not sup.task or S.TERMINAL[sup.task:status()] then
    return nil, ("%s: '%s' is not running"):format(fname, sup.name)
  end
  post(sup, { name, arg })
  return true
end

--- Checks self and a child id, raising at the line that called the method
--- (which tail-calls child_command, so that line is two levels up).
local function check_child_call(fname, sup, id)
  if getmetatable(sup) ~= Sup_mt then
    error(("%s: bad self (supervisor expected, got %s)"):format(fname, check.describe(sup)), 3)
  end
  if not is_id(id) then arg_error(fname, 1, "child id (string or number)", id, 3) end
end

--- A command about child `id`: nil and a message when it has no such child.
--- Tail-called by the methods: its errors blame their caller's line.
--- Once stop was asked, a restart or a termination is refused: the stop
--- goes first, and the child would never run again (it answered true); so
--- are they while it cools down (they would change nothing).
local function child_command(fname, sup, name, id)
  check_child_call(fname, sup, id)
  if not sup.ids[id] then return nil, ("%s: no child '%s'"):format(fname, tostring(id)) end
  if sup.stop_asked and name ~= "delete_child" and sup.task and not S.TERMINAL[sup.task:status()] then
    return nil, ("%s: '%s' is stopping"):format(fname, sup.name)
  end
  -- Cooling down, its children are down and all start again with it: a
  -- termination would be undone then, and a restart is what comes anyway.
  -- So while it gives up, stopping them (each given its shutdown time):
  -- the command would wait for the cool-down, which drops it.
  if sup.state == "cooling down" and name ~= "delete_child" then
    return nil, ("%s: '%s' is cooling down (its children are down until it starts them again)"):format(fname, sup.name)
  end
  if sup.state == "giving up" and name ~= "delete_child" then
    return nil, ("%s: '%s' is giving up (its children are stopping, and all start again with it)"):format(fname, sup.name)
  end
  return command(fname, sup, name, id)
end

--- Stops every child (last started first) and the supervisor; sup:await() waits for it.
function Sup.stop(sup)
  check_sup("supervisor:stop", sup)
  local ok, err = command("supervisor:stop", sup, "stop")
  if ok then sup.stop_asked = true end
  return ok, err
end

--- Stops a child; its spec stays (restart_child starts it again).
function Sup.terminate_child(sup, id) return child_command("supervisor:terminate_child", sup, "terminate_child", id) end

--- Starts a child again: one that runs is stopped first (OTP refuses a
--- running child with {error, running}; here a restart is always a restart).
function Sup.restart_child(sup, id) return child_command("supervisor:restart_child", sup, "restart_child", id) end

--- Removes a child's spec, stopping the child first if it runs (OTP
--- requires terminate_child first); its id is free again at once.
function Sup.delete_child(sup, id)
  check_sup("supervisor:delete_child", sup)
  if not is_id(id) then arg_error("supervisor:delete_child", 1, "child id (string or number)", id) end
  local ok, err = child_command("supervisor:delete_child", sup, "delete_child", id)
  if ok then sup.ids[id] = nil end
  return ok, err
end

--- Adds a child and starts it.  A duplicate id is refused at the call.
function Sup.start_child(sup, spec)
  check_sup("supervisor:start_child", sup)
  local c = check_child("supervisor:start_child", spec, "child", 2)
  if sup.ids[c.id] then error(("supervisor:start_child: duplicate child id '%s'"):format(tostring(c.id)), 2) end
  local why = busy("supervisor:start_child", c)
  if why then error(why, 2) end
  local ok, err = command("supervisor:start_child", sup, "start_child", c)
  if ok then sup.ids[c.id] = true end
  return ok, err
end

--- { { id =, task =, status =, restart = }, ... } in start order.
function Sup.which_children(sup)
  check_sup("supervisor:which_children", sup)
  local list = {}
  for _, c in ipairs(sup.specs) do
    local rec = sup.children[c.id]
    local status = rec and rec.task:status() or (sup.state == "starting" and "pending" or "stopped")
    list[#list + 1] = { id = c.id, restart = c.restart, task = rec and rec.task, status = status }
  end
  return list
end

return M
