-- spec/review_r19_spec.lua — review of issue 19's SQLite batch writes (insert_many, record's batched completions).
local tide = require "tide"

describe("review r19: sqlite insert_many / record", function()
  local path, q
  before_each(function()
    path = os.tmpname()
    os.remove(path)
    q = tide.queue.open("sqlite:" .. path)
  end)
  after_each(function()
    q:close()
    os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
  end)

  local function with_session(fn)
    local session = q._store:acquire("spec")
    local ok, err = pcall(fn, session)
    q._store:release(session, not ok)
    assert(ok, err)
  end

  local function job(i, key)
    return { queue = "default", target = "t", method = "m", args = "[" .. i .. "]", status = "available",
             priority = 0, max_attempts = 5, run_at = 1000 + i, inserted_at = 1000, idempotence_key = key }
  end

  local function check(session, list, ids)
    for i = 1, #list do
      local r = session:get(ids[i])
      assert.is_not_nil(r, "job " .. i .. ": no row " .. tostring(ids[i]))
      assert.equal(list[i].args, r.args, "job " .. i .. " has id " .. tostring(ids[i]) .. " of another")
    end
  end

  for _, n in ipairs({ 63, 64, 65, 127, 128, 129 }) do
    it("gives " .. n .. " jobs (a keyed one first and last) their own ids after the max row was deleted", function()
      with_session(function(session)
        session:begin()
        local a = session:insert_many({ job(0), job(-1) })
        session:exec("DELETE FROM tide_jobs WHERE id = ?", a[2])
        local list = { job(1, "k1") }
        for i = 2, n + 1 do list[i] = job(i) end
        list[#list + 1] = job(n + 2, "k2")
        local ids = session:insert_many(list)
        session:commit()
        check(session, list, ids)
      end)
    end)
  end

  it("gives jobs their own ids when a user trigger writes to the user's own table on each insert", function()
    with_session(function(session)
      session:begin()
      session:exec("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, job INTEGER)")
      session:exec("INSERT INTO audit (job) VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10)")
      session:exec("CREATE TRIGGER audit_jobs AFTER INSERT ON tide_jobs BEGIN INSERT INTO audit (job) VALUES (new.id); END")
      local list = {}
      for i = 1, 100 do list[i] = job(i) end
      local ids = session:insert_many(list)
      session:commit()
      check(session, list, ids)
    end)
  end)

  it("gives jobs their own ids when a user trigger on tide_jobs adds a job of its own (a copy to another queue)", function()
    with_session(function(session)
      session:begin()
      session:exec([[CREATE TRIGGER mirror AFTER INSERT ON tide_jobs WHEN new.queue = 'default' BEGIN
        INSERT INTO tide_jobs (queue, target, method, args, status, max_attempts, run_at, inserted_at)
        VALUES ('mirror', new.target, new.method, new.args, 'available', 1, new.run_at, new.inserted_at); END]])
      local list = {}
      for i = 1, 8 do list[i] = job(i) end
      local ids = session:insert_many(list)
      session:commit()
      for i = 1, #list do
        local r = session:get(ids[i])
        assert.equal("default", r.queue, "job " .. i .. " got the id of the trigger's copy")
      end
    end)
  end)

  it("never gives a wrong id when a user trigger skips one row (RAISE(IGNORE)): the batch fails, naming it", function()
    -- A job a trigger dropped does not exist: its enqueue cannot succeed (an
    -- id of an older row, or 0, would name another job or none).
    with_session(function(session)
      session:begin()
      session:exec("CREATE TRIGGER skip BEFORE INSERT ON tide_jobs WHEN new.method = 'skip' BEGIN SELECT RAISE(IGNORE); END")
      local list = {}
      for i = 1, 4 do list[i] = job(i) end
      list[2].method = "skip"
      local ok, err = pcall(session.insert_many, session, list)
      session:rollback()
      assert.is_false(ok, "insert_many returned ids though a row did not go in")
      assert.matches("did not go in", tostring(err))
      -- without the skipped row, every job gets its own row's id
      session:begin()
      list[2].method = "m"
      local ids = session:insert_many(list)
      session:commit()
      for i = 1, 4 do assert.equal("[" .. i .. "]", session:get(ids[i]).args) end
    end)
  end)

  it("completes a batch inside the caller's transaction and leaves no savepoint open", function()
    local list = {}
    for i = 1, 8 do list[i] = { target = "t", method = "m", args = { i } } end
    q:enqueue_many(list)
    with_session(function(session)
      local t = math.floor(require("tide.core").wallclock()) + 1000
      local rows = session:claim("default", 8, "w1", t, t + 60000)
      session:begin()
      local entries = {}
      for i, r in ipairs(rows) do entries[i] = { id = r.id, attempt = r.attempt, kind = "completed" } end
      entries[2].attempt = entries[2].attempt + 1
      local written = session:record(entries, "w1", 2000)
      local n = 0
      for _ in pairs(written) do n = n + 1 end
      assert.equal(7, n)
      session:rollback()
      assert.equal("executing", session:get(rows[1].id).status)
    end)
  end)
end)
