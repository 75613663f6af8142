-- spec/review_rfin_spec.lua — review of the task's fields as array slots
-- (tide.engine.fields) and of the store's refusals inside __gc finalizers.
--
-- t.id, t.attempts and t.value are read through Task_mt's __index now, so a
-- user's write of one of those names onto a task stays in its hash part and
-- shadows the slot for good (before, the engine overwrote it).  The engine's
-- own modules must not read those public names: a job handler that wrote
-- tide.current().attempts made the worker's on_finish raise (the job ran
-- again and again, its outcome lost); a task that wrote t.id and failed
-- unheard was never reported; one that wrote t.value was reported with the
-- user's value in place of its error.
local tide = require "tide"
local H = spec_helper

describe("review rfin: fields a user writes onto a task", function()
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("a job whose handler writes its task's attempts/value completes, and the worker goes on", function()
    local path = os.tmpname()
    local q = tide.queue.open("sqlite:" .. path)
    H.quiet_errors()
    local ran = 0
    local targets = { t = { m = function()
      ran = ran + 1
      local me = tide.current()
      me.attempts, me.value = "mine", "mine"
      return "real"
    end } }
    for _ = 1, 3 do q:enqueue{ target = "t", method = "m" } end
    local status, st = tide.run(function()
      return tide.worker{ queue = q, concurrency = 1, targets = targets }:drain{ stop = true, within = 3000 }
    end)
    local stats = q:stats()
    q:close()
    for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
    assert.equal("ok", status, tostring(st))
    assert.equal(3, ran)
    assert.equal(3, stats.completed)
  end)

  it("a task that writes t.id and fails unheard is reported, and the engine is not interrupted", function()
    local reports = {}
    tide.configure{ on_error = function(where, err) reports[#reports + 1] = where .. ": " .. tostring(err) end }
    local status = tide.run(function()
      tide.spawn(function() tide.current().id = "mine"; error("boom") end)
      tide.sleep(10)
    end)
    assert.equal("ok", status)
    local text = table.concat(reports, "\n")
    assert.truthy(text:find("boom", 1, true), text)
    assert.falsy(text:find("interrupted", 1, true), text)
  end)

  it("a task that writes t.value and fails unheard is reported with its own error", function()
    local reports = {}
    tide.configure{ on_error = function(where, err) reports[#reports + 1] = where .. ": " .. tostring(err) end }
    local status = tide.run(function()
      tide.spawn(function() tide.current().value = "mine"; error("boom") end)
      tide.sleep(10)
    end)
    assert.equal("ok", status)
    local text = table.concat(reports, "\n")
    assert.truthy(text:find("boom", 1, true), text)
  end)

  -- README: "a task's numeric keys are tide's; plain names are yours".  The
  -- engine kept its rarer fields under plain names (_waiters, _values,
  -- _awaiting): a task that wrote _waiters made its own end raise inside the
  -- engine, and its awaiter stalled; one that wrote _values changed its
  -- outcome.
  for _, key in ipairs{ "_waiters", "_values", "_awaiting" } do
    it("a task that writes t." .. key .. " (a plain name, the user's) still ends with its own outcome, heard by its awaiter", function()
      local sink = 0
      tide.configure{ on_error = function() sink = sink + 1 end }
      local status, got = tide.run(function()
        local t = tide.spawn(function()
          tide.current()[key] = { n = 1, "mine" }
          tide.sleep(5)
          return "real"
        end)
        local w = tide.spawn(function() return t:await() end)
        local s1, v1 = t:await()
        local s2, st, v2 = w:await()
        return table.concat({ s1, tostring(v1), s2, tostring(st), tostring(v2) }, ",")
      end)
      assert.equal("ok", status)
      assert.equal("ok,real,ok,ok,real", got)
      assert.equal(0, sink, "errors reported")
    end)
  end
end)

-- pg_conn refuses a statement from a task's code inside a C call (here a
-- table.sort comparator) before sending it: right.  But the message names
-- the store's URL and "cannot wait", neither the method the user called nor
-- the user's line (COMMON: messages name the function); the same call on
-- SQLite works, so the user cannot tell which of their calls it was.
describe("review rfin: the PostgreSQL store's refusal inside a C call", function()
  local url = os.getenv("TIDE_PG_URL")
  if not url then
    pending("needs TIDE_PG_URL (spec/pg.sh start)")
    return
  end
  after_each(function() H.assert_idle() end)

  it("names the q: method called, at the caller's line", function()
    local status, err, stats_ok = tide.run(function()
      local q = tide.queue.open(url)
      local list = { 3, 1, 2 }
      local ok, e = pcall(table.sort, list, function(a, b) q:stats(); return a < b end)
      local after = pcall(q.stats, q)
      q:close()
      return not ok and tostring(e) or "not refused", after
    end)
    assert.equal("ok", status, tostring(err))
    assert.is_true(stats_ok, "the next statement works")
    assert.truthy(err:find("^spec/review_rfin_spec%.lua:%d+: q:stats: "), err)
  end)
end)

-- tide wraps a finalizer stored in newproxy's metatable and counts it as
-- running while it runs.  A library that closes its handle explicitly by
-- calling that same function (getmetatable(p).__gc(p)) from a task, and
-- waits in it, kept the count up across the wait: meanwhile every store call
-- of every task was refused as "inside a __gc finalizer".
describe("review rfin: a finalizer's function called by a task", function()
  after_each(function() H.loud_errors(); H.assert_idle() end)

  it("does not make other tasks' store calls refused while it waits", function()
    local path = os.tmpname()
    local status, ok, err = tide.run(function()
      local q = tide.queue.open("sqlite:" .. path)
      local p = newproxy(true)
      getmetatable(p).__gc = function() tide.sleep(30) end   -- the handle's close, also its finalizer
      local closer = tide.spawn(function() getmetatable(p).__gc(p) end)
      tide.sleep(5)                                          -- closer waits inside it now
      local a, b = pcall(q.enqueue, q, { target = "t", method = "m" })
      closer:await()
      q:close()
      return a, b
    end)
    for _, s in ipairs{ "", "-wal", "-shm" } do os.remove(path .. s) end
    assert.equal("ok", status, tostring(ok))
    assert.is_true(ok, tostring(err))
  end)

  it("raises its error to the task that called it, as the function itself would", function()
    local reports = 0
    tide.configure{ on_error = function() reports = reports + 1 end }
    local status, ok, err = tide.run(function()
      local p = newproxy(true)
      getmetatable(p).__gc = function() error("close failed") end
      return pcall(getmetatable(p).__gc, p)
    end)
    assert.equal("ok", status)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("close failed", 1, true), tostring(err))
    assert.equal(0, reports, "reported to the sink instead")
  end)
end)
