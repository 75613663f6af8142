--- tide.jobs.queue — durable jobs: enqueue inside the caller's transaction, inspect, retry, cancel.
--
--   local q = tide.queue.open("sqlite:jobs.db", { encryptor = ... })
--   q:transaction(function(tx)
--     tx:exec("INSERT INTO orders (id, total) VALUES (?, ?)", 7, 120)
--     tx:enqueue{ target = "orders", method = "fulfill", args = { id = 7 } }
--   end)
--
-- The SQL lives in a store driver (tide.jobs.store.*); this file checks
-- arguments, encodes args (JSON, optionally encrypted), gives each
-- transaction a connection of its own for its whole life, and tells workers
-- in this process when a job was committed.  Misuse raises; a store failure
-- raises an error that names the store and the SQLite code or SQLSTATE.
-- Times given and returned are UTC ms since the Unix epoch (integers); a
-- run_at below 1e11 is taken for seconds, the old unit, with a warning.
-- Transactions, and the connections they hold: tide.jobs.transaction.
local check = require "tide.engine.check"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local time = require "tide.jobs.time"
local pool = require "tide.jobs.store.pool"
local transaction_mod = require "tide.jobs.transaction"

local type, error, pairs, ipairs, tostring, tonumber = type, error, pairs, ipairs, tostring, tonumber
local setmetatable, getmetatable, pcall, floor = setmetatable, getmetatable, pcall, math.floor
local arg_error, opt_error, describe = check.arg_error, check.opt_error, check.describe
local holder = pool.holder

local with_session, transaction, tx_state = transaction_mod.with_session, transaction_mod.transaction,
                                            transaction_mod.tx_state
local notify, inserted_into, Tx = transaction_mod.notify, transaction_mod.inserted_into, transaction_mod.Tx
local not_in_finalizer, not_in_c_call = transaction_mod.not_in_finalizer, transaction_mod.not_in_c_call

local M = {}
M.with_session = with_session

local Queue = {}
local Queue_mt = { __index = Queue, __tostring = function(q)
  return ("tide.Queue (%s%s)"):format(q.name, q._store and "" or ", closed")
end }

-- ===== opening

local DRIVERS = { sqlite = "tide.jobs.store.sqlite" }
local SYNC = { normal = true, full = true, off = true }
local OPEN_KEYS = check.options("tide.queue.open", {
  encryptor = true, busy_timeout = true, synchronous = true, pool = true, pool_timeout = true, prepare = true
})

--- "sqlite:PATH" (or "sqlite://PATH") -> driver module, path.
local function parse_url(url)
  local scheme, rest = url:match("^(%a[%w+.-]*):(.*)$")
  if not scheme then
    error(("tide.queue.open: bad store URL %q (expected sqlite:PATH or postgres://...)"):format(url), 3)
  end
  scheme = scheme:lower()
  if scheme == "postgres" or scheme == "postgresql" then
    if not rest:match("^//.") then
      error(("tide.queue.open: bad store URL %q (expected postgres://[user[:password]@]host[:port]/database)")
        :format(url), 3)
    end
    return "tide.jobs.store.postgres", url
  end
  if not DRIVERS[scheme] then
    error(("tide.queue.open: unknown store '%s' in %q (expected sqlite:PATH or postgres://...)"):format(scheme, url), 3)
  end
  rest = rest:gsub("^//", "")
  if rest == "" then error(("tide.queue.open: bad store URL %q (the file path is missing)"):format(url), 3) end
  return DRIVERS[scheme], rest
end

--- Takes tide's own parameters (pool, pool_timeout, prepare) out of a
--- PostgreSQL URL's query string (libpq would refuse them); returns the URL
--- left and them.
local function url_options(url)
  local base, query = url:match("^([^?]*)%?(.*)$")
  if not base then return url, {} end
  local keep, found = {}, {}
  for pair in query:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if k == "prepare" then
      if v ~= "true" and v ~= "false" then
        error(("tide.queue.open: bad store URL %q (prepare=%s: true or false expected)"):format(url, v), 3)
      end
      found.prepare = v == "true"
    elseif k == "pool" or k == "pool_timeout" then
      local n = tonumber(v)
      if not n then
        error(("tide.queue.open: bad store URL %q (%s=%s: a number expected)"):format(url, k, v), 3)
      end
      found[k] = n
    else
      keep[#keep + 1] = pair
    end
  end
  return #keep > 0 and base .. "?" .. table.concat(keep, "&") or base, found
end

--- Opens a job store: `url` is "sqlite:PATH" or "postgres://user@host/db"
--- (tables created and migrated as needed).  opts: encryptor = { encrypt
--- = fn, decrypt = fn } (args are stored only encrypted); pool (PostgreSQL:
--- connections for the application's statements and transactions, default
--- 10; also ?pool=N in the URL); pool_timeout (ms a statement waits for a
--- free connection before "pool exhausted", default 5000); busy_timeout
--- (SQLite: ms to wait for another process's write lock, default 5000);
--- prepare (PostgreSQL: false sends every statement unprepared, for a
--- pooler in transaction mode that cannot keep a session's prepared
--- statements; default true; also ?prepare=false in the URL);
--- synchronous (SQLite: "normal", the default in WAL mode: a crash of the
--- process loses nothing, a power cut may lose the last commits; "full":
--- nothing is lost on power cut either).
function M.open(url, opts)
  not_in_finalizer("tide.queue.open", 2)
  if type(url) ~= "string" then arg_error("tide.queue.open", 1, "store URL string", url) end
  -- (a C string ends at a NUL: "sqlite:a.db\0x" opened a.db, another file)
  local nul = url:find("\0", 1, true)
  if nul then
    error(("tide.queue.open: bad argument #1 (store URL expected, got a string with a NUL byte at byte %d)"):format(nul), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then arg_error("tide.queue.open", 2, "table or nil", opts) end
  opts = opts or {}
  check.known("tide.queue.open", opts, OPEN_KEYS)
  local enc = opts.encryptor
  if enc ~= nil and (type(enc) ~= "table" or type(enc.encrypt) ~= "function"
                     or type(enc.decrypt) ~= "function") then
    opt_error("tide.queue.open", "encryptor", "table with encrypt and decrypt functions", enc)
  end
  if opts.busy_timeout ~= nil and not check.is_ms(opts.busy_timeout) then
    opt_error("tide.queue.open", "busy_timeout", "non-negative number of ms", opts.busy_timeout)
  end
  if opts.synchronous ~= nil and not SYNC[opts.synchronous] then
    opt_error("tide.queue.open", "synchronous", check.choices(SYNC), opts.synchronous)
  end
  local driver, path = parse_url(url)
  if opts.prepare ~= nil and type(opts.prepare) ~= "boolean" then
    opt_error("tide.queue.open", "prepare", "boolean", opts.prepare)
  end
  local o = { busy_timeout = opts.busy_timeout, synchronous = opts.synchronous, pool = opts.pool,
              pool_timeout = opts.pool_timeout, prepare = opts.prepare }
  if driver == "tide.jobs.store.postgres" then
    local from_url
    path, from_url = url_options(path)
    o.pool = o.pool or from_url.pool
    o.pool_timeout = o.pool_timeout or from_url.pool_timeout
    if o.prepare == nil then o.prepare = from_url.prepare end
  elseif o.prepare ~= nil then
    error("tide.queue.open: bad option 'prepare' (PostgreSQL only: SQLite keeps its statements in the process)", 2)
  elseif o.pool ~= nil and o.pool ~= 1 then
    error("tide.queue.open: bad option 'pool' (SQLite has one connection: a transaction holds the store "
          .. "while it is open)", 2)
  end
  if o.pool ~= nil and not check.is_count(o.pool, 1) then
    opt_error("tide.queue.open", "pool", "integer >= 1 (connections)", o.pool)
  end
  if o.pool_timeout ~= nil and not check.is_ms(o.pool_timeout, true) then
    opt_error("tide.queue.open", "pool_timeout", "positive number of ms", o.pool_timeout)
  end
  local ok, store = pcall(require(driver).open, path, url, o)
  if not ok then error("tide.queue.open: " .. tostring(store), 2) end
  return setmetatable({ name = store.name, durability = store.durability, _store = store, _enc = enc,
                        _txs = {}, _listeners = {}, _decl = {} }, Queue_mt)
end

--- Every q method but close starts here: refused inside a __gc finalizer
--- (tide.jobs.transaction, not_in_finalizer), then q must be an open queue,
--- and on PostgreSQL a task's code must not be inside a C call (not_in_c_call).
local function check_q(fname, q)
  not_in_finalizer(fname, 3)
  if type(q) ~= "table" or getmetatable(q) ~= Queue_mt then
    error(("%s: bad self (queue expected, got %s); call it as q:%s(...)")
      :format(fname, describe(q), fname:match("[:.](%w+)$")), 3)
  end
  if not q._store then error(fname .. ": the queue is closed", 3) end
  not_in_c_call(fname, q._store, 3)
end

--- Runs fn(tx, ...) inside one database transaction: tx:exec and tx:query
--- run your own SQL, tx:enqueue adds jobs; all commit together, or an error
--- rolls all back and is raised again.  Returns what fn returns.
function Queue:transaction(fn, ...)
  check_q("q:transaction", self)
  if type(fn) ~= "function" then arg_error("q:transaction", 1, "function", fn) end
  return transaction(self, "q:transaction", fn, ...)
end

-- ===== enqueue

-- idempotence_key is the old name of idempotency_key (README: Vocabulary).
local JOB_KEYS = check.options("q:enqueue", {
  target = true, method = true, args = true, queue = true, run_at = true, delay = true,
  priority = true, max_attempts = true, idempotency_key = true, idempotence_key = true,
  unique = true
}, { idempotence_key = "idempotency_key" })

-- ===== per-key limits: the partition key of a job (see q:declare)

--- The partition key of a job of a declared queue (text), or nil.
local function partition_key(fname, q, queue_name, args, level)
  local decl = q._decl[queue_name]
  local part = decl and decl.partition
  if not part then return nil end
  local v
  if type(part) == "function" then
    local ok, r = pcall(part, args)
    if not ok then error(("%s: the partition function of queue '%s' failed: %s"):format(fname, queue_name,
                         tostring(r)), level + 1) end
    v = r
  else
    v = job.at_path(args, part)
  end
  local text, what = job.key_text(v)
  if what then
    error(("%s: the partition of queue '%s' gave %s (string, number, boolean or nil expected)")
      :format(fname, queue_name, what), level + 1)
  end
  local why = text and job.key_problem(text)
  if why then error(("%s: the partition key of queue '%s' is bad (%s)"):format(fname, queue_name, why), level + 1) end
  return text
end

-- ===== uniqueness over time: the unique key of a job

local UNIQUE_KEYS = check.options("unique", { period = true, states = true, keys = true })
local UNIQUE_STATES = { "available", "scheduled", "executing", "retryable", "completed" }

--- JSON with object keys sorted: the same value gives the same text.
local function canonical(v)
  if type(v) ~= "table" or v == json.null then return json.encode(v == nil and json.null or v) end
  local n = #v
  if n > 0 or getmetatable(v) == json.array_mt then
    local out = {}
    for i = 1, n do out[i] = canonical(v[i]) end
    return "[" .. table.concat(out, ",") .. "]"
  end
  local ks = {}
  for k in pairs(v) do ks[#ks + 1] = tostring(k) end
  table.sort(ks)
  for i, k in ipairs(ks) do ks[i] = json.encode(k) .. ":" .. canonical(v[k]) end
  return "{" .. table.concat(ks, ",") .. "}"
end

local MAX_PERIOD = 8000 * 365.25 * 86400000

--- Raises unless `list` has keys 1..#list only: ipairs stopped at a hole,
--- and what came after it ({ "available", nil, "bogus" }) went unchecked
--- and unused.
local function list_only(fname, key, list, level)
  local n = #list
  for k in pairs(list) do
    if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 or list[k] == nil then
      error(("%s: bad option '%s' (a list expected, got a table with key %s past its %d entries)")
        :format(fname, key, describe(k), n), level + 1)
    end
  end
  for i = 1, n do
    if list[i] == nil then
      error(("%s: bad option '%s' (a list expected, got a hole at %d)"):format(fname, key, i), level + 1)
    end
  end
end

--- Checks the unique option; returns key text, period (ms), sorted states.
local function unique_of(fname, j, level)
  local u = j.unique
  level = level + 1
  if type(u) ~= "table" then opt_error(fname, "unique", "table { period =, states =, keys = }", u, level) end
  check.known(fname, u, UNIQUE_KEYS, "unique.", level)
  local period = check.duration(u.period)
  -- (at least 1 ms: 0.5 was taken, and the period kept in whole ms was 0,
  -- under which no job is ever a duplicate)
  if not period or period < 1 or period > MAX_PERIOD then   -- (a store's bigint holds inserted_at - period)
    opt_error(fname, "unique.period", "positive duration below 8000 years (ms, or like \"1h\", \"30s\")", u.period,
              level)
  end
  local states = u.states or UNIQUE_STATES
  if type(states) ~= "table" or #states == 0 then
    opt_error(fname, "unique.states", "non-empty list of statuses", states, level)
  end
  list_only(fname, "unique.states", states, level)
  local sorted, seen = {}, {}
  for i, st in ipairs(states) do
    if not job.is_status[st] then
      opt_error(fname, "unique.states[" .. i .. "]", check.choices(job.is_status), st, level)
    end
    if not seen[st] then seen[st] = true; sorted[#sorted + 1] = st end
  end
  table.sort(sorted)
  local keys = u.keys or { "args" }
  if type(keys) ~= "table" or #keys == 0 then
    opt_error(fname, "unique.keys", 'non-empty list of "args" or paths like "args.account"', keys, level)
  end
  list_only(fname, "unique.keys", keys, level)
  local parts = { j.queue or "default", j.target, j.method }
  for i, k in ipairs(keys) do
    local v
    if k == "args" then v = j.args
    else
      local steps = job.parse_path(k)
      if not steps then opt_error(fname, "unique.keys[" .. i .. "]", '"args" or ' .. job.PATH_EXPECTED, k, level) end
      v = job.at_path(j.args, steps)
    end
    parts[#parts + 1] = k
    parts[#parts + 1] = v == nil and json.null or v
  end
  local ok, text = pcall(canonical, parts)
  if not ok then error(("%s: bad option 'unique.keys' (%s)"):format(fname, tostring(text)), level) end
  if #text > job.MAX_KEY then      -- (indexed: see tide.jobs.job's bounds)
    error(("%s: bad option 'unique.keys' (the job's unique key is %d bytes of JSON, at most %d: name the args "
      .. "that make a job unique, like keys = { \"args.account\" })"):format(fname, #text, job.MAX_KEY), level)
  end
  return text, floor(period), sorted
end

--- Checks an enqueue spec; returns the row to insert.
--- Idempotency keys with this prefix are the ticks of schedules
--- (tide.jobs.schedules.key): a user's job with one took the tick, and the
--- schedule's own job for it was never enqueued.
local TICK_PREFIX = "schedule:"
M.TICK_PREFIX = TICK_PREFIX

local NAME_OPTIONS = { "target", "method", "queue" }

local function job_row(fname, q, j, now, level, tick)
  level = level + 1
  if type(j) ~= "table" then arg_error(fname, 1, "job table", j, level) end
  check.known(fname, j, JOB_KEYS, nil, level)
  for _, k in ipairs(NAME_OPTIONS) do
    local why = job.name_length_problem(j[k])
    if why then error(("%s: bad option '%s' (%s)"):format(fname, k, why), level) end
  end
  if not job.is_name(j.target) then
    opt_error(fname, "target", "module name (like \"orders\" or \"app.mail\")", j.target, level)
  end
  if not job.is_method(j.method) then
    opt_error(fname, "method", "function name", j.method, level)
  end
  if j.queue ~= nil and not job.is_name(j.queue) then
    opt_error(fname, "queue", "queue " .. job.NAME_EXPECTED, j.queue, level)
  end
  if j.priority ~= nil and not job.is_priority(j.priority) then
    opt_error(fname, "priority", job.PRIORITY_EXPECTED, j.priority, level)
  end
  if j.max_attempts ~= nil and not job.is_max_attempts(j.max_attempts) then
    opt_error(fname, "max_attempts", job.MAX_ATTEMPTS_EXPECTED, j.max_attempts, level)
  end
  local key = check.renamed(fname, j, "idempotence_key", "idempotency_key", level)
  if key ~= nil then
    if type(key) ~= "string" or key == "" then
      opt_error(fname, "idempotency_key", "non-empty string", key, level)
    end
    local why = job.key_problem(key)
    if why then error(("%s: bad option 'idempotency_key' (%s)"):format(fname, why), level) end
    if not tick and key:sub(1, #TICK_PREFIX) == TICK_PREFIX then
      error(("%s: bad option 'idempotency_key' (keys beginning '%s' are the ticks of schedules)")
        :format(fname, TICK_PREFIX), level)
    end
  end
  if j.delay ~= nil and not (check.is_ms(j.delay) and now + j.delay <= time.MAX_MS) then
    opt_error(fname, "delay", "non-negative number of ms, due before the year 10000", j.delay, level)
  end
  if j.delay ~= nil and j.run_at ~= nil then error(fname .. ": give run_at or delay, not both", level) end
  if j.unique ~= nil and (j.idempotency_key ~= nil or j.idempotence_key ~= nil) then
    error(fname .. ": give idempotency_key or unique, not both", level)
  end
  local run_at = now + floor(j.delay or 0)
  if j.run_at ~= nil then
    local secs
    run_at, secs = time.run_at_ms(j.run_at)
    if not run_at then opt_error(fname, "run_at", time.EXPECTED, j.run_at, level) end
    if secs then
      check.deprecate(("%s: option 'run_at' is in ms since the epoch now; %s was taken for seconds")
                      :format(fname, tostring(j.run_at)), level)
    end
  end
  local args_json = json.encode_option(fname, "args", j.args, level)
  local queue_name = j.queue or "default"
  local pkey = partition_key(fname, q, queue_name, j.args, level)
  local ukey, uperiod, ustates
  if j.unique ~= nil then ukey, uperiod, ustates = unique_of(fname, j, level) end
  local args, args_enc = args_json, nil
  if q._enc then
    local ok, blob = pcall(q._enc.encrypt, args_json)
    if not ok or type(blob) ~= "string" then
      error(("%s: encryptor.encrypt failed: %s"):format(fname, ok and ("returned " .. describe(blob)
            .. ", not a string") or tostring(blob)), level)
    end
    args, args_enc = nil, blob
  end
  return { queue = queue_name, target = j.target, method = j.method, args = args,
           args_enc = args_enc, status = run_at > now and "scheduled" or "available",
           priority = j.priority or 0, max_attempts = j.max_attempts or 20, run_at = run_at,
           idempotence_key = key, inserted_at = now, partition_key = pkey,
           unique_key = ukey, unique_period = uperiod, unique_states = ustates }
end

local function insert_one(session, row) return session:insert(row) end

--- Adds one job; returns its id and true, or the id of the job that already
--- has this idempotency_key (or, with `unique`, the job that is its
--- duplicate inside the period) and false (nothing inserted).
function Queue:enqueue(j)
  check_q("q:enqueue", self)
  local row = job_row("q:enqueue", self, j, self._store:now(), 2)
  local id, inserted = with_session(self, "q:enqueue", insert_one, row)
  if inserted then inserted_into(self, self._txs[holder()], row.queue) end
  return id, inserted
end

--- Checks a list of jobs; returns their rows.
local function job_rows(fname, q, list)
  if type(list) ~= "table" then arg_error(fname, 1, "list of job tables", list, 3) end
  -- Keys 1..n only: a job under another key (a name, a key past a hole)
  -- was left out without a word, as a table of them gave 0 jobs inserted.
  local n = #list
  for k in pairs(list) do
    if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then
      error(("%s: bad argument #1 (list of job tables expected, got a table with key %s, past its %d jobs)")
        :format(fname, type(k) == "string" and ("%q"):format(#k > 40 and k:sub(1, 40) .. "..." or k)
                       or describe(k), n), 3)
    end
  end
  local now, rows = q._store:now(), {}
  for i = 1, #list do
    local ok, row = pcall(job_row, fname, q, list[i], now, 1)
    if not ok then error((tostring(row):gsub("^" .. fname:gsub("%p", "%%%0") .. ": ", fname .. ": job " .. i .. ": ")), 3) end
    rows[i] = row
  end
  return rows
end

--- Inserts checked rows in one transaction (a savepoint inside the
--- caller's); returns ids in order and how many were inserted.
local function insert_rows(q, fname, rows)
  return transaction(q, fname, function(tx)
    local st = tx._st
    local ids, flags = st.session:insert_many(rows)
    local n = 0
    for i = 1, #rows do
      if flags[i] then n = n + 1; st.touched[rows[i].queue] = true end
    end
    return ids, n
  end)
end

--- Adds a list of jobs in one transaction (one statement per batch on
--- PostgreSQL); returns their ids (in order) and how many were inserted
--- (the rest had idempotency keys that existed, in the store or earlier in
--- the list: their ids are the existing jobs').
function Queue:enqueue_many(list)
  check_q("q:enqueue_many", self)
  return insert_rows(self, "q:enqueue_many", job_rows("q:enqueue_many", self, list))
end

local function tx_enqueue(tx, j, tick)
  local st = tx_state("tx:enqueue", tx)
  local q = tx._q
  local row = job_row("tx:enqueue", q, j, q._store:now(), 2, tick)
  local id, inserted = st.session:insert(row)
  if inserted then st.touched[row.queue] = true end
  return id, inserted
end

function Tx:enqueue(j) return tx_enqueue(self, j) end

--- tx:enqueue for a schedule's tick, whose key begins TICK_PREFIX
--- (tide.jobs.schedules only).
function M.enqueue_tick(tx, j) return tx_enqueue(tx, j, true) end

function Tx:enqueue_many(list)
  tx_state("tx:enqueue_many", self)
  return insert_rows(self._q, "tx:enqueue_many", job_rows("tx:enqueue_many", self._q, list))
end


local DECLARE_KEYS = check.options("q:declare", { concurrency = true, partition = true, per_key = true })
local PER_KEY_KEYS = check.options("per_key", { concurrency = true, rate = true })

--- Declares queue `name`'s limits, for every worker on this store:
---   concurrency = n     at most n of its jobs executing at once, across all
---                       workers and machines (each worker's own limit holds too)
---   partition = fn | "args.path"   the key of a job: fn(args) or the value at
---                       a path into args, computed at enqueue and stored
---                       with the job (nil: a job without a key, limited by
---                       `concurrency` only)
---   per_key = { concurrency = n, rate = "100/min" }   per partition key: at
---                       most n executing at once, at most so many started
---                       in any window of the period
--- The limits go into the store's tide_queues table (the claim statement
--- reads them there, so all workers agree); the partition is kept by this
--- queue object too: every process that enqueues into the queue declares
--- it (a function cannot be read from a table).  Declaring again replaces
--- the limits; omitted options are no limit.  Returns true.
function Queue:declare(name, opts)
  check_q("q:declare", self)
  local long = job.name_length_problem(name)
  if long then error("q:declare: bad argument #1 (queue name: " .. long .. ")", 2) end
  if not job.is_name(name) then arg_error("q:declare", 1, "queue " .. job.NAME_EXPECTED, name) end
  if type(opts) ~= "table" then arg_error("q:declare", 2, "table of queue options", opts) end
  check.known("q:declare", opts, DECLARE_KEYS)
  if opts.concurrency ~= nil and not job.is_max_attempts(opts.concurrency) then
    opt_error("q:declare", "concurrency", "integer from 1 to 2147483647", opts.concurrency)
  end
  local part, part_text = opts.partition, nil
  if type(part) == "string" then
    local steps = job.parse_path(part)
    if not steps then opt_error("q:declare", "partition", "function(args) or " .. job.PATH_EXPECTED, part) end
    part, part_text = steps, opts.partition
  elseif type(part) == "function" then
    part_text = "function"
  elseif part ~= nil then
    opt_error("q:declare", "partition", "function(args) or " .. job.PATH_EXPECTED, part)
  end
  local pk = opts.per_key
  local key_conc, rate_n, rate_ms
  if pk ~= nil then
    if type(pk) ~= "table" then opt_error("q:declare", "per_key", "table { concurrency =, rate = }", pk) end
    check.known("q:declare", pk, PER_KEY_KEYS, "per_key.")
    if part == nil then
      error("q:declare: per_key needs a partition (a function(args) or a path into args, like \"args.account\")", 2)
    end
    if pk.concurrency ~= nil and not job.is_max_attempts(pk.concurrency) then
      opt_error("q:declare", "per_key.concurrency", "integer from 1 to 2147483647", pk.concurrency)
    end
    key_conc = pk.concurrency
    if pk.rate ~= nil then
      rate_n, rate_ms = job.parse_rate(pk.rate, check.duration)
      if not rate_n then opt_error("q:declare", "per_key.rate", job.RATE_EXPECTED, pk.rate) end
    end
  end
  local row = { name = name, concurrency = opts.concurrency, partition = part_text, key_concurrency = key_conc,
                rate_limit = rate_n, rate_period = rate_ms, updated_at = self._store:now() }
  with_session(self, "q:declare", function(session) session:declare(row) end)
  self._decl[name] = { partition = part }
  return true
end

--- The limits stored for queue `name` (as every worker reads them), or nil:
--- { concurrency, partition ("function" or the path), per_key = {
--- concurrency, rate = { limit, period } } }.
function Queue:limits(name)
  check_q("q:limits", self)
  -- (a name q:declare refuses: PostgreSQL refused one with a NUL or invalid
  -- UTF-8 with its own error, where SQLite answered nil)
  if not job.is_name(name) then arg_error("q:limits", 1, "queue " .. job.NAME_EXPECTED, name) end
  local r = with_session(self, "q:limits", function(session) return session:queue_limits(name) end)
  if not r then return nil end
  return { concurrency = r.concurrency, partition = r.partition,
           per_key = (r.key_concurrency or r.rate_limit) and {
             concurrency = r.key_concurrency,
             rate = r.rate_limit and { limit = r.rate_limit, period = r.rate_period } or nil } or nil }
end

-- ===== reading jobs

local function decode_args(q, row)
  local text = row.args
  if row.args_enc ~= nil then
    if not q._enc then return nil, "args are encrypted and this queue has no encryptor" end
    local ok, plain = pcall(q._enc.decrypt, row.args_enc)
    if not ok then return nil, "encryptor.decrypt failed: " .. tostring(plain) end
    if type(plain) ~= "string" then return nil, "encryptor.decrypt returned " .. describe(plain) end
    text = plain
  end
  if text == nil then return nil end
  if type(text) ~= "string" then return nil, "args are " .. describe(text) .. ", not JSON text" end
  local v, err = json.decode(text)
  if err then return nil, "args are not valid JSON: " .. err end
  return v
end
M.decode_args = decode_args

local function ms(v) return time.is_ms(v) and v or nil end

--- A stored row -> the job table users see (times in UTC ms).  A row
--- that no tide wrote (edited by hand) is shown with `corrupt` saying why,
--- and its bad fields left out.
local function job_of(q, row)
  local args, err = decode_args(q, row)
  local errors = {}
  if type(row.errors) == "string" then
    local list = json.decode(row.errors)
    if type(list) == "table" then
      for i = 1, #list do
        local e = list[i]
        if type(e) == "table" and e ~= json.null then
          errors[i] = { attempt = e.attempt, at = ms(e.at),
                        error = type(e.error) == "string" and e.error or json.encode(e),
                        traceback = e.traceback ~= json.null and e.traceback or nil }
        else                                   -- not one tide wrote (the errors text a hand left, kept first)
          errors[i] = { error = type(e) == "string" and e or json.encode(e) }
        end
      end
    end
  end
  local corrupt = job.row_problem(row)
  local function num(v) return type(v) == "number" and v or nil end
  local function str(v) return type(v) == "string" and v or nil end
  return {
    id = row.id, queue = str(row.queue), target = str(row.target), method = str(row.method),
    args = args, args_error = err, encrypted = row.args_enc ~= nil or nil,
    status = str(row.status), priority = num(row.priority), attempt = num(row.attempt),
    max_attempts = num(row.max_attempts), run_at = ms(row.run_at),
    attempted_at = ms(row.attempted_at), completed_at = ms(row.completed_at),
    inserted_at = ms(row.inserted_at), errors = errors,
    idempotency_key = str(row.idempotence_key), partition_key = str(row.partition_key),
    lease_owner = str(row.lease_owner),
    idempotence_key = str(row.idempotence_key),      -- the old name, one release more
    lease_expires = ms(row.lease_expires), corrupt = corrupt,
  }
end
M.job_of = job_of

--- A job id: an integer a double holds exactly (a store's bigint took
--- 1e300 as text and refused it, where SQLite compared it as a real).
local function is_id(id) return check.is_count(id, 1) and id <= 2 ^ 53 end
local ID_EXPECTED = "job id (integer from 1 to 2^53)"

local function check_id(fname, id)
  if not is_id(id) then arg_error(fname, 1, ID_EXPECTED, id, 3) end
end

--- The UTC ms `ms` ago, as a whole number no earlier than the epoch (a
--- span of 1e300 ms gave -1e300, which PostgreSQL's bigint refused).
local function ago(q, ms)
  local t = floor(q._store:now() - ms)
  return t > 0 and t or 0
end

local function get_row(session, id) return session:get(id) end

--- The job with this id, or nil.
function Queue:job(id)
  check_q("q:job", self)
  check_id("q:job", id)
  local row = with_session(self, "q:job", get_row, id)
  return row and job_of(self, row)
end

local MAX_LIMIT = 2147483647      -- a LIMIT every store takes as an integer (1e300 reached SQLite as a real)
local LIST_KEYS = check.options("q:list", {
  status = true, queue = true, target = true, limit = true, before = true
})

local function list_rows(session, f) return session:list(f) end
local LIST_TEXT = { "queue", "target" }

--- Jobs, newest first: filter by status, queue and target; limit (default
--- 100); before = id for the next page.
function Queue:list(f)
  check_q("q:list", self)
  if f ~= nil and type(f) ~= "table" then arg_error("q:list", 1, "table or nil", f) end
  f = f or {}
  check.known("q:list", f, LIST_KEYS)
  if f.status ~= nil and not job.is_status[f.status] then
    opt_error("q:list", "status", check.choices(job.is_status), f.status)
  end
  -- (text: PostgreSQL refused a NUL or invalid UTF-8 with its own error,
  -- and aborted the caller's transaction; SQLite found nothing)
  for _, k in ipairs(LIST_TEXT) do
    local v = f[k]
    if v ~= nil and (type(v) ~= "string" or v:find("\0", 1, true) or json.utf8_error(v)) then
      opt_error("q:list", k, "string (valid UTF-8, no NUL)", v)
    end
  end
  if f.limit ~= nil and not (check.is_count(f.limit, 1) and f.limit <= MAX_LIMIT) then
    opt_error("q:list", "limit", "integer from 1 to 2147483647", f.limit)
  end
  if f.before ~= nil and not is_id(f.before) then opt_error("q:list", "before", ID_EXPECTED, f.before) end
  local rows = with_session(self, "q:list", list_rows, { status = f.status, queue = f.queue, target = f.target,
                                                         limit = f.limit or 100, before = f.before })
  for i, row in ipairs(rows) do rows[i] = job_of(self, row) end
  return rows
end

local function stats_rows(session) return session:stats() end

--- Counts: { total =, <status> = n, queues = { [name] = { <status> = n } },
--- pool = { size, open, busy, waiting } (this process's connections) }.
function Queue:stats()
  check_q("q:stats", self)
  local by_queue = with_session(self, "q:stats", stats_rows)
  local out = { total = 0, queues = by_queue, pool = self._store:stats_pool() }
  for _, status in ipairs(job.STATUSES) do out[status] = 0 end
  for _, counts in pairs(by_queue) do
    for status, n in pairs(counts) do
      out[status] = (out[status] or 0) + n
      out.total = out.total + n
    end
  end
  return out
end

--- Counts of the waiting and executing jobs only: { [queue] = { [status] = n } }.
--- Read through the partial indexes, so the cost follows the backlog and
--- not the table (finished jobs are never scanned): cheap enough to sample.
local function backlog_rows(session) return session:backlog() end
local function recent_rows(session, since, limit) return session:recent(since, limit) end
local function lease_rows(session) return session:leases() end

function Queue:backlog()
  check_q("q:backlog", self)
  return (with_session(self, "q:backlog", backlog_rows))
end

--- Over the newest `limit` jobs (by id; default 10000, a bounded read):
--- { [queue] = { [status] = { n =, recent = } } }, `recent` counting jobs
--- that finished within the last `within` ms (default 60000); and true when
--- the store holds more jobs than were read.
function Queue:recent(limit, within)
  check_q("q:recent", self)
  if limit ~= nil and not (check.is_count(limit, 1) and limit <= MAX_LIMIT) then
    arg_error("q:recent", 1, "integer from 1 to 2147483647", limit)
  end
  if within ~= nil and not check.is_ms(within) then arg_error("q:recent", 2, "non-negative number of ms", within) end
  limit = limit or 10000
  local rows = with_session(self, "q:recent", recent_rows, ago(self, within or 60000), limit)
  local out, total = {}, 0
  for _, r in ipairs(rows) do
    local qt = out[r.queue]
    if not qt then qt = {}; out[r.queue] = qt end
    qt[r.status] = { n = r.n, recent = r.recent or 0 }
    total = total + r.n
  end
  return out, total >= limit
end

--- The store's time now, in UTC ms: the server's on PostgreSQL (as this
--- process can tell it: tide.jobs.store.pg_clock), this machine's on
--- SQLite.  A job's times (run_at, lease_expires, ...) are on it.
function Queue:now()
  check_q("q:now", self)
  return self._store:now()
end

--- Who holds leases now: a list of { owner, queue, n, stopping,
--- lease_expires, attempted_at } (times in UTC ms), one per worker and
--- queue: n jobs running, and `stopping` jobs cancelled, expired or failed
--- by hand that the worker has not yet stopped (they hold their slots).
function Queue:leases()
  check_q("q:leases", self)
  local rows = with_session(self, "q:leases", lease_rows)
  for _, r in ipairs(rows) do
    r.lease_expires, r.attempted_at = ms(r.lease_expires), ms(r.attempted_at)
  end
  return rows
end

local function schedule_rows(session) return session:schedules() end

--- The schedules workers registered (tide.worker's `schedules`), by name:
--- { name, cron, timezone, target, method, queue, last_tick (the latest
--- tick enqueued), seen_at (when a worker last registered or advanced it),
--- seen_by (which) }, times in UTC ms.
function Queue:schedules()
  check_q("q:schedules", self)
  local rows = with_session(self, "q:schedules", schedule_rows)
  for _, r in ipairs(rows) do r.last_tick, r.seen_at = ms(r.last_tick), ms(r.seen_at) end
  return rows
end

--- Closes the store (idempotent); sessions held by tasks close when given
--- back (a transaction under way may still commit; its tx methods raise).
function Queue:close()
  if self._store then self._store:close(); self._store = nil end
end

-- ===== changing jobs by hand, in batches, and pruning: tide.jobs.queue_changes adds
-- q:retry, q:cancel, q:expire, q:fail, q:retry_all, q:cancel_all and q:prune

require("tide.jobs.queue_changes").install(Queue, { check_q = check_q, check_id = check_id, ago = ago })

-- ===== durable flows: tide.jobs.queue_flows adds q:enqueue_flow, tx:enqueue_flow,
-- q:flow_run, q:flow_runs, q:cancel_flow and q:retry_flow

local queue_flows = require "tide.jobs.queue_flows"
queue_flows.install(Queue, check_q, partition_key)

--- For workers: fails the steps of durable flows whose jobs finished
--- outside an outcome write (see tide.jobs.flows), in a transaction on `store`.
function M.sweep_flows(q, store)
  local post = M.worker_call(q, store, "tide.worker", queue_flows.sweep)
  if post then notify(q, post.queues) end
end

-- ===== for tide.worker

function M.is_queue(v) return getmetatable(v) == Queue_mt end
function M.is_open(q) return q._store ~= nil end
--- A store for a worker's own statements: connections of its own where
--- the store has them (PostgreSQL), else the queue's (SQLite).
function M.worker_store(q, purpose) return q._store:worker_store(purpose) end
--- True when `store` is the queue's own (shared with its transactions).
function M.shares_store(q, store) return store == q._store end

--- Runs fn(session, ...) for the worker on `store`: the queue's own goes
--- through with_session (the caller's transaction, or the pool, waiting
--- as long as it takes); a store of the worker's own, through its pool.
function M.worker_call(q, store, fname, fn, ...)
  if store == q._store then
    local st = q._txs[holder()]
    if st then return fn(st.session, ...) end
  end
  local session = store:acquire(fname, false)
  local ok, a, b, c = pcall(fn, session, ...)
  store:release(session, false, holder())
  if not ok then error(a, 0) end
  return a, b, c
end

M.notify = notify

--- The store session of a live transaction handle (for tide.jobs.schedules,
--- whose own statements join the transaction); raises as tx methods do.
function M.tx_session(tx) return tx_state("tx_session", tx).session end

--- fn(queue_name) runs after a commit that made a job of that queue due.
function M.listen(q, fn) q._listeners[#q._listeners + 1] = fn end
function M.unlisten(q, fn)
  for i, f in ipairs(q._listeners) do
    if f == fn then table.remove(q._listeners, i); return end
  end
end

return M
