-- spec/vocabulary_spec.lua — one name per idea: every public option set against the README's
-- Vocabulary table, every public function and method named in the README, and every old name
-- still working, with one warning, for one release.
local tide = require "tide"
require "tide.observe.web"
require "tide.observe.metrics"
local check = require "tide.engine.check"

local README = assert(io.open("README.md")):read("*a")

--- The README's table: { [function] = { options = set, old = { old = new } } }.
local function readme_table()
  local section = README:match("\n### Vocabulary\n(.-)\n## ")
  assert(section, "README.md has a '### Vocabulary' section")
  local out = {}
  for name, opts, old in section:gmatch("\n| `([^`]+)` | ([^|]*) | ([^|\n]*) |") do
    local o = { options = {}, old = {} }
    for k in opts:gmatch("`([%w_]+)`") do o.options[k] = true end
    for a, b in old:gmatch("`([%w_]+)` → `([%w_]+)`") do o.old[a] = b end
    out[name] = o
  end
  return out
end

local function keys(t)
  local list = {}
  for k in pairs(t) do list[#list + 1] = k end
  table.sort(list)
  return list
end

--- Runs fn in a loop with the error sink captured; returns what the sink heard.
local function warnings_of(fn)
  local heard = {}
  tide.configure{ on_error = function(where, err) heard[#heard + 1] = tostring(where) .. ": " .. tostring(err) end }
  local ok, err = pcall(tide.run, fn)
  tide.configure{ on_error = require("tide.engine.log").default_sink }
  assert(ok, err)
  return heard
end

local function one_warning(heard, pattern)
  local n = 0
  for _, w in ipairs(heard) do if w:find(pattern) then n = n + 1 end end
  assert.equal(1, n, ("one warning matching %q expected, heard:\n  %s"):format(pattern, table.concat(heard, "\n  ")))
end

describe("the vocabulary", function()
  it("lists every option of every public function in the README, with its old names, and nothing else", function()
    local doc = readme_table()
    for _, fname in ipairs(keys(check.vocabulary)) do
      local v = check.vocabulary[fname]
      local d = doc[fname]
      assert(d, ("README's Vocabulary table has no row for '%s'"):format(fname))
      local current = {}
      for k in pairs(v.set) do if not v.old[k] then current[k] = true end end
      assert.same(keys(current), keys(d.options), fname .. ": options")
      assert.same(v.old, d.old, fname .. ": old names")
      for old, new in pairs(v.old) do
        assert(v.set[old] and v.set[new], ("%s: both '%s' and '%s' are taken"):format(fname, old, new))
      end
    end
    for fname in pairs(doc) do
      assert(check.vocabulary[fname], ("README lists '%s', which the code does not register"):format(fname))
    end
  end)

  it("follows its own rules: lower-case names, and no old name left in a current option set", function()
    local OLD = { size = true, max_concurrency = true, attempts = true, idempotence_key = true,
                  handle_error = true, exit_on_failed = true, task_failed = true }
    for fname, v in pairs(check.vocabulary) do
      for k in pairs(v.set) do
        assert(type(k) == "string" and k:match("^[a-z][a-z0-9_]*$"), fname .. ": option name " .. tostring(k))
        if OLD[k] then assert(v.old[k], ("%s: '%s' is an old name, yet current"):format(fname, k)) end
      end
      if fname ~= "tide.sources.rabbitmq" then          -- the broker's window keeps AMQP's name
        assert(not v.set.prefetch or v.old.prefetch, fname .. ": 'prefetch' is concurrency")
      end
    end
  end)

  it("names every public function and method in the README", function()
    local missing = {}
    local function walk(t, prefix, depth)
      for k, v in pairs(t) do
        local name = prefix .. "." .. k
        if type(v) == "function" and not k:match("^_") then
          if not README:find(name, 1, true) then missing[#missing + 1] = name end
        elseif type(v) == "table" and depth < 2 and k ~= "testing" then
          walk(v, name, depth + 1)
        end
      end
    end
    walk(tide, "tide", 1)
    local dir = os.tmpname()
    os.remove(dir)
    spec_helper.run(function()
      local objects = {
        task = tide.spawn(function() end), pool = tide.pool{ concurrency = 1 },
        timer = tide.after(1, function() end), flow = tide.flow{ tasks = { a = { run = function() end } } },
        supervisor = tide.supervisor{ children = {} }, queue = tide.queue.open("sqlite:" .. dir .. ".db"),
      }
      objects.worker = tide.worker{ queue = objects.queue }
      for what, obj in pairs(objects) do
        local mt = getmetatable(obj)            -- a timer is an FFI struct: its metatable says "ffi"
        local index = type(mt) == "table" and mt.__index or require("tide.engine.timer").Timer
        if type(index) == "table" then
          for k, v in pairs(index) do
            if type(v) == "function" and not k:match("^_") and not README:find(":" .. k .. "(", 1, true)
               and not README:find(":" .. k .. "{", 1, true) then
              missing[#missing + 1] = what .. ":" .. k
            end
          end
        end
      end
      objects.worker:stop()
      objects.worker:wait()
      objects.supervisor:stop()
      objects.queue:close()
    end)
    os.remove(dir .. ".db")
    table.sort(missing)
    assert.same({}, missing)
  end)
end)

describe("old names", function()
  local f = function() end

  it("keep working for pools, retries, flows and consumers, each with one warning", function()
    local heard = warnings_of(function()
      assert.equal(3, tide.pool{ size = 3 }.concurrency)
      local t = tide.spawn{ run = function() error("x") end, retry = { attempts = 2, base = 1 } }
      t:await()
      assert.equal(2, t.attempts)
      local seen = {}
      local fl = tide.flow{ max_concurrency = 1, tasks = {
        a = { items = function() return { 1, 2 } end, each = function(x) return x end, max_concurrency = 1,
              exit_on_failed = false },
        b = { run = function() error("no") end } },
        fail = "continue", on = { task_failed = function(ev) seen[#seen + 1] = ev.task end } }
      local status, report = fl:run()
      assert.equal("error", status)
      assert.equal("ok", report.tasks.a.status)
      assert.same({ "b" }, seen)
      local src = tide.sources.memory{}
      local c = tide.consumer{ source = src, prefetch = 2, handler = { run = f } }
      assert.equal(2, c.prefetch)
    end)
    one_warning(heard, "tide.pool: option 'size' is now called 'concurrency'")
    one_warning(heard, "option 'retry.attempts' is now called 'retry.max_attempts'")
    one_warning(heard, "tide.flow: option 'max_concurrency' is now called 'concurrency'")
    one_warning(heard, "option 'tasks.a.max_concurrency' is now called 'tasks.a.concurrency'")
    one_warning(heard, "option 'tasks.a.exit_on_failed' is now called 'tasks.a.exit_on_error'")
    one_warning(heard, "option 'on.task_failed' is now called 'on.task_error'")
    one_warning(heard, "tide.consumer: option 'prefetch' is now called 'concurrency'")
  end)

  it("refuse an old name given together with its new one", function()
    assert.has_error(function() tide.pool{ size = 1, concurrency = 2 } end)
    assert.has_error(function() tide.flow{ max_concurrency = 1, concurrency = 2, tasks = { a = { run = f } } } end)
  end)

  for i, store in ipairs(spec_helper.stores()) do
    -- (a call site is warned once per process: the second store hears nothing new)
    it("keep working for jobs and workers on " .. store.name .. (i == 1 and ", each with one warning" or ""), function()
      local q
      local calls = {}
      local path = os.tmpname()
      local heard = warnings_of(function()
        q = tide.queue.open(store.fresh(path))
        local id = q:enqueue{ target = "t", method = "m", idempotence_key = "k1", run_at = 1000 }
        assert.equal(1000000, q:job(id).run_at)                  -- 1000 s, taken for seconds
        assert.equal("k1", q:job(id).idempotency_key)
        local again, new = q:enqueue{ target = "t", method = "m", idempotency_key = "k1" }
        assert.same({ id, false }, { again, new })
        q:enqueue{ target = "mixed", method = "boom", max_attempts = 1 }
        local w = tide.worker{ queue = q, handle_error = function(job, err) calls[#calls + 1] = "worker " .. job.method end,
          on_outcome = function(job, outcome) calls[#calls + 1] = outcome .. " " .. job.method end,
          targets = { t = { m = f },
                      mixed = { timeout = 1000, boom = function() error("boom") end,
                                handle_error = function(job, err) calls[#calls + 1] = "target " .. tostring(err):match("boom") end } } }
        local st = w:drain()
        assert.equal("stopped", w.state)
        assert.same({ 1, 1 }, { st.completed, st.discarded })
      end)
      table.sort(calls)
      assert.same({ "completed m", "discarded boom", "target boom" }, calls)
      store.reset(path)
      if i > 1 then return end
      one_warning(heard, "q:enqueue: option 'idempotence_key' is now called 'idempotency_key'")
      one_warning(heard, "q:enqueue: option 'run_at' is in ms since the epoch now; 1000 was taken for seconds")
      one_warning(heard, "tide.worker: option 'handle_error' is now called 'on_error'")
      one_warning(heard, "tide.worker: option 'on_outcome' now receives one event table")
      one_warning(heard, "tide.worker: targets.mixed: options among the methods are deprecated")
      one_warning(heard, "worker:drain: without { stop = ... } the worker stops once drained")
    end)
  end
end)
