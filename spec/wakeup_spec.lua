-- spec/wakeup_spec.lua — SQLite: a worker hears other processes' commits (a watch on the -wal file, then PRAGMA data_version).
--
-- The latency itself is a benchmark (bench/queue.lua, "cross-process"), not
-- a timed test: here a worker polls only every 10 s, and a job enqueued by
-- another process must start well before that (within 2 s), which only the
-- wake-up can do.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

local WORKER = [[
local tide = require "tide"
local core = require "tide.core"
local db, dir = ...
tide.run(function()
  local q = tide.queue.open("sqlite:" .. db)
  local w = tide.worker{ queue = q, poll = 10000, targets = { probe = { go = function()
    local f = io.open(dir .. "/started", "w"); f:write(string.format("%.3f", core.now())); f:close()
    tide.after(0, function() tide.shutdown(1000) end)
  end } } }
  local f = io.open(dir .. "/ready", "w")
  f:write(tostring(q._store:wake_stats().watching)); f:close()
  tide.sleep(30000)
end)
]]

local function read(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

describe("the SQLite store's wake-up", function()
  local dir, db
  before_each(function()
    dir = H.tempdir()
    db = dir .. "/jobs.db"
  end)
  after_each(function()
    os.execute("rm -rf " .. dir)
    H.assert_idle()
  end)

  it("starts a job enqueued by another process long before the worker's 10 s poll", function()
    local q = tide.queue.open("sqlite:" .. db)          -- the tables exist before the worker opens them
    H.write_file(dir, "worker.lua", WORKER)
    os.execute(("cd %s && LUA_CPATH='%s/?.so;;' timeout 40 luajit %s/worker.lua %s %s > %s/log 2>&1 &")
      :format(os.getenv("PWD") or ".", H.build, dir, db, dir, dir))
    H.run(function()
      local t0 = core.now()
      while not read(dir .. "/ready") do
        assert(core.now() - t0 < 20000, "the worker process did not start: " .. tostring(read(dir .. "/log")))
        tide.sleep(20)
      end
      assert.equal("true", read(dir .. "/ready"))       -- it watches the -wal file
      tide.sleep(200)                                   -- its first claim is over: it waits on its poll
      local at = core.now()
      q:enqueue{ target = "probe", method = "go" }
      while not read(dir .. "/started") and core.now() - at < 5000 do tide.sleep(10) end
      local started = tonumber(read(dir .. "/started"))
      assert(started, "the job did not start within 5 s (the worker polls every 10 s)")
      assert.is_true(started - at < 2000, ("started %.1f ms after the enqueue"):format(started - at))
    end)
    q:close()
  end)

  it("wakes its listeners for other connections' commits only, not its own", function()
    local q = tide.queue.open("sqlite:" .. db)
    local other = tide.queue.open("sqlite:" .. db)      -- another connection, as another process has
    local store = q._store
    local heard = 0
    H.run(function()
      local function fn(name) assert.is_nil(name); heard = heard + 1 end
      assert.is_true(store:listen(fn))
      for i = 1, 20 do q:enqueue{ target = "t", method = "m", args = { i = i } } end
      tide.sleep(50)
      assert.is_true(store:wake_stats().events > 0)     -- its own commits wrote the -wal file
      assert.equal(0, heard)                            -- and were recognised as its own
      other:enqueue{ target = "t", method = "m" }
      local t0 = core.now()
      while heard == 0 and core.now() - t0 < 2000 do tide.sleep(1) end
      assert.equal(1, heard)
      store:unlisten(fn)
      assert.is_false(store:wake_stats().watching)      -- the last listener gone, the watch goes
      other:enqueue{ target = "t", method = "m" }
      tide.sleep(50)
      assert.equal(1, heard)
    end)
    other:close()
    q:close()
  end)

  it("watches the -wal file again when it went for a while (moved away and back)", function()
    local q = tide.queue.open("sqlite:" .. db)
    local other = tide.queue.open("sqlite:" .. db)
    local store = q._store
    local heard = 0
    H.run(function()
      local function fn() heard = heard + 1 end
      assert.is_true(store:listen(fn))
      assert.is_true(os.rename(db .. "-wal", db .. "-wal.away"))
      tide.sleep(50)
      assert.is_false(store:wake_stats().watching)      -- gone: nothing to watch
      assert.is_true(os.rename(db .. "-wal.away", db .. "-wal"))
      local t0 = core.now()
      while not store:wake_stats().watching and core.now() - t0 < 3000 do tide.sleep(10) end
      assert.is_true(store:wake_stats().watching, "the -wal file is back, and watched again")
      heard = 0
      other:enqueue{ target = "t", method = "m" }
      t0 = core.now()
      while heard == 0 and core.now() - t0 < 2000 do tide.sleep(1) end
      assert.equal(1, heard)
      store:unlisten(fn)
    end)
    other:close()
    q:close()
  end)

  it("says why when the file cannot be watched, and the worker still polls", function()
    local q = tide.queue.open("sqlite::memory:")
    local function fn() end
    local ok, err = q._store:listen(fn)
    assert.is_nil(ok)
    assert.matches("cannot watch :memory:%-wal: ", err)
    q._store:unlisten(fn)
    H.run(function()
      local ran = 0
      q:enqueue{ target = "t", method = "m" }
      tide.worker{ queue = q, poll = 20, targets = { t = { m = function() ran = ran + 1 end } } }:drain{ stop = true }
      assert.equal(1, ran)
    end)
    q:close()
  end)
end)
