-- spec/finalizer_spec.lua — __gc finalizers that raise, encode and spawn while tide runs.
--
-- A finalizer runs at any allocation, so one that calls back into tide (a
-- library wrapping connections or FFI handles does) reaches the C core at
-- points where no Lua code was expected: inside core.encode, inside a
-- libuv callback before its protected call, inside the engine between two
-- resumes.  Scenarios that used to take the process down run in a child
-- process of their own.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

describe("finalizers", function()
  after_each(function() H.assert_idle() end)

  it("core.encode called again from a finalizer, while it makes its result, keeps both results exact", function()
    local big, small = {}, {}
    for i = 1, 3000 do big[i] = { id = i, name = "record " .. i, tags = { "a", "b", i } } end
    for i = 1, 500 do small[i] = "item " .. i end
    local want_big, want_small = core.encode(big), core.encode(small)
    local inner, inner_bad = 0, 0
    local function bomb()
      local p = newproxy(true)
      getmetatable(p).__gc = function()
        inner = inner + 1
        if core.encode(small) ~= want_small then inner_bad = inner_bad + 1 end
      end
    end
    local bad = 0
    for _ = 1, 300 do
      for _ = 1, 50 do bomb() end
      if core.encode(big) ~= want_big then bad = bad + 1 end
    end
    collectgarbage()
    assert.is_true(inner > 1000, "finalizers ran: " .. inner)
    assert.equal(0, bad, "outer encodings that came out wrong")
    assert.equal(0, inner_bad, "nested encodings that came out wrong")
  end)

  it("thread tasks spawned by finalizers, with large arguments, get their arguments exactly", function()
    -- The same reentry, by the path a program takes: a finalizer spawns a
    -- thread task while a spawn encodes its arguments.
    tide.configure{ threads = 2 }
    local payloads, wanted = {}, {}
    for i = 1, 50 do
      local t = { i = i }
      for k = 1, 4000 do t[k] = ("%d:%d"):format(i, k) end
      payloads[i], wanted[i] = t, core.encode(t)
    end
    local echo = function(t) return t end
    local tasks = {}                           -- { task, its payload's index }
    local function spawn_one(i)
      local t = tide.spawn{ mode = "thread", run = echo, args = { payloads[i] } }
      tasks[#tasks + 1] = { t, i }             -- one entry: a nested spawn_one cannot split it
    end
    local n = 0
    local function bomb()
      local p = newproxy(true)
      getmetatable(p).__gc = function() n = n + 1; spawn_one(n % 50 + 1) end
    end
    -- The collector starts each cycle at once: with the pause at its default,
    -- after the test before (a big heap, collected) no cycle came due in
    -- the loop, and no finalizer ran.
    -- A spawn allocates little (a thread task is one table and its job):
    -- each round also makes some garbage (~13 KB), and the collector does
    -- 20 times the usual work per step, so that cycles through the 10 MB of
    -- payloads end several times while the spawns run (about 80 MB of
    -- collector work over the loop), and the finalizers run among them.
    local pause = collectgarbage("setpause", 50)
    local stepmul = collectgarbage("setstepmul", 2000)
    local status, bad = tide.run(function()
      for i = 1, 300 do
        for _ = 1, 10 do bomb() end
        local garbage = {}
        for j = 1, 200 do garbage[j] = { j } end
        spawn_one(i % 50 + 1)
      end
      collectgarbage("setpause", pause)
      collectgarbage("setstepmul", stepmul)
      local k, wrong = 1, 0
      while k <= #tasks do                     -- finalizers may still add tasks meanwhile
        local s, v = tasks[k][1]:await()
        if s ~= "ok" or core.encode(v) ~= wanted[tasks[k][2]] then wrong = wrong + 1 end
        k = k + 1
      end
      return wrong
    end)
    assert.equal("ok", status, bad)
    assert.is_true(#tasks > 300, "finalizers spawned thread tasks: " .. (#tasks - 300))
    assert.equal(0, bad, "thread tasks whose arguments came back wrong")
  end)

  it("coroutine and thread tasks survive finalizers that raise; the errors go to the sink", function()
    local status, out = H.run_lua(dir, "raising.lua", [[
      local tide = require "tide"
      local reported = 0
      tide.configure{ threads = 2, on_error = function(where) if where == "a __gc finalizer" then reported = reported + 1 end end }
      local function bomb() local p = newproxy(true); getmetatable(p).__gc = function() error("boom in gc") end; return p end
      local outcomes = {}
      local function count(s) outcomes[s] = (outcomes[s] or 0) + 1 end
      local _, n = tide.run(function()
        local ts = {}
        for i = 1, 2000 do
          ts[#ts + 1] = tide.spawn{ run = function(k) for _ = 1, 20 do bomb(); tide.sleep(0) end return k end,
                                    args = { i }, handle_result = count }
          if i % 10 == 0 then
            ts[#ts + 1] = tide.spawn{ mode = "thread", run = function(x) return x end, args = { i }, handle_result = count }
          end
        end
        for _, t in ipairs(ts) do t:await() end
        return #ts
      end)
      print(("tasks %d ok %d other %d reported %d live %d"):format(n, outcomes.ok or 0,
        n - (outcomes.ok or 0), reported, tide.stats().live))
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("tasks 2200 ok 2200 other 0 reported %d+ live 0", out)
    assert.is_nil(out:match("reported 0 "), "the finalizers' errors were reported")
  end)

  it("every task gets one outcome when raising finalizers interrupt the engine itself", function()
    -- Finalizers set with debug.setmetatable are not wrapped: their errors
    -- reach the engine (with the JIT off: LuaJIT 2.1 of 2022 itself crashes
    -- on one raised at the exit of a compiled trace).
    local status, out = H.run_lua(dir, "engine.lua", [[
      jit.off()
      local tide = require "tide"
      local sink = 0
      tide.configure{ threads = 2, on_error = function() sink = sink + 1 end }
      local function raise() error("boom in gc") end
      local mt = { __gc = raise }
      local function bomb() return debug.setmetatable(newproxy(false), mt) end
      local seen, wrong = {}, 0
      local function record(t)
        return function(s, v)
          seen[t] = (seen[t] or 0) + 1
          local fine = s == "ok" or (s == "error" and tostring(v):find("boom in gc", 1, true))
          if not fine then wrong = wrong + 1; io.stderr:write("unexpected outcome ", s, " ", tostring(v), "\n") end
        end
      end
      local total = 0
      for round = 1, 3 do
        mt.__gc = raise
        local _, n = tide.run(function()
          local ts = {}
          for i = 1, 2000 do
            local key = round * 10000 + i
            ts[#ts + 1] = tide.spawn{ run = function(k) for _ = 1, 10 do bomb(); tide.sleep(0) end return k end,
                                      args = { key }, handle_result = record(key) }
            if i % 10 == 0 then
              ts[#ts + 1] = tide.spawn{ mode = "thread", run = function(x) return x end, args = { i },
                                        handle_result = record(-key) }
            end
          end
          for _, t in ipairs(ts) do t:await() end
          -- Disarm the finalizers still pending (LuaJIT looks __gc up when it
          -- finalizes) and run them here: out in the main chunk (outside
          -- tide), the next allocation would raise one and end the script.
          -- (Running them armed, one full collection per error, took minutes
          -- on a loaded machine.)
          mt.__gc = function() end
          collectgarbage()
          collectgarbage()
          return #ts
        end)
        total = total + (n or 0)
      end
      local once = 0
      for _, c in pairs(seen) do if c == 1 then once = once + 1 end end
      print(("tasks %d once %d wrong %d live %d"):format(total, once, wrong, tide.stats().live))
    ]], 240)
    assert.equal(0, status, out)
    assert.matches("tasks 6600 once 6600 wrong 0 live 0", out)
  end)

  it("reports the error of an ffi.metatype __gc, in the main state and in a thread", function()
    local status, out = H.run_lua(dir, "metatype.lua", [[
      local tide = require "tide"
      local ffi = require "ffi"
      local reported = 0
      tide.configure{ threads = 1, on_error = function(where, err)
        if where == "a __gc finalizer" and tostring(err):find("boom in metatype gc", 1, true) then
          reported = reported + 1
        end
      end }
      ffi.cdef "struct fin_boom { int n; };"
      local boom = ffi.metatype("struct fin_boom", { __gc = function() error("boom in metatype gc") end })
      local function work(n) local s = 0 for i = 1, n do local t = { i, i } s = s + t[1] end return s end
      for i = 1, 50 do boom(i); work(1e4) end
      collectgarbage()
      collectgarbage()
      local _, st, v = tide.run(function()
        return tide.spawn{ mode = "thread", run = function()
          local ffi = require "ffi"
          ffi.cdef "struct fin_boom_t { int n; };"
          local b = ffi.metatype("struct fin_boom_t", { __gc = function() error("boom in a thread") end })
          for i = 1, 50 do b(i) end
          collectgarbage()
          collectgarbage()
          return "thread survived"
        end }:await()
      end)
      print(("reported %d %s %s"):format(reported, tostring(st), tostring(v)))
    ]], 60)
    assert.equal(0, status, out)
    assert.matches("reported 50 ok thread survived", out, 1, true)
  end)

  it("a finalizer that raises at the exit of a compiled trace does not crash LuaJIT under tide", function()
    -- Without `require "tide"` this script ends in a segmentation fault on
    -- LuaJIT 2.1 of 2022 (Debian 12): the error is rethrown from the trace
    -- exit, where nothing can unwind it.
    local status, out = H.run_lua(dir, "trace_exit.lua", [[
      local tide = require "tide"
      local reported = 0
      tide.configure{ on_error = function() reported = reported + 1 end }
      local function bomb() local p = newproxy(true); getmetatable(p).__gc = function() error("boom in gc") end; return p end
      local function work(n) local s = 0 for i = 1, n do local t = { i, i } s = s + t[1] end return s end
      for _ = 1, 200 do
        for _ = 1, 50 do bomb() end
        work(1e5)
      end
      collectgarbage()
      print("survived, reported " .. reported)
    ]], 120)
    assert.equal(0, status, out)
    assert.matches("survived, reported 10000", out)
  end)
end)

-- ===== finalizers that call the job store
--
-- A store call inside a __gc finalizer is refused, first thing, with an
-- error that names it (tide.jobs.transaction, not_in_finalizer): the
-- collector runs the finalizer amid other code, which may be in the middle
-- of a statement on the store's connection or inside its own transaction.
-- And before the refusal came first, such a call hung the process on
-- LuaJIT before 2023-08: encoding the job's args walked them with pairs(),
-- a loop compiled for other args, whose trace exits back to its own head
-- for ever inside a finalizer (tide.engine.finalizers' header).  Each case
-- runs in a child process with a deadline: a hang is an exit status 124.
-- The first finalizers warm that loop on one shape of args and hand it
-- another; the pause of 10 makes the collector run its cycles (and the
-- finalizers) while the store call under test runs.

local REFUSED = "cannot run inside a __gc finalizer (the collector runs it amid other code, which may be using "
  .. "this store's connection or be inside a transaction); spawn a task for it: tide.spawn(function() ... end)"

-- The child's prelude: q (pool 1), bombs(n, fn) leaves n proxies whose
-- finalizer runs pcall(fn) and counts the outcome, report() prints the counts.
local PRELUDE = [[
local tide = require "tide"
local q = tide.queue.open(os.getenv("URL"), { pool = 1 })
local REFUSED = "cannot run inside a __gc finalizer"
local fired, refused, other, first, names = 0, 0, {}, nil, {}
local function outcome(ok, err)
  fired = fired + 1
  if ok then other[#other + 1] = "succeeded"
  elseif tostring(err):find(REFUSED, 1, true) then
    refused = refused + 1
    first = first or tostring(err)
    names[tostring(err):match("([%a_]+:[%a_]+): cannot run inside") or "?"] = true
  else other[#other + 1] = tostring(err) end
end
local function bombs(n, fn)
  for _ = 1, n do
    local p = newproxy(true)
    getmetatable(p).__gc = function() outcome(pcall(fn)) end
  end
end
local function report(extra)
  print(("fired %d refused %d other %d %s"):format(fired, refused, #other, extra or ""))
  print("first: " .. tostring(first))
  local list = {}
  for name in pairs(names) do list[#list + 1] = name end
  table.sort(list)
  print("names: " .. table.concat(list, " "))
  for i = 1, math.min(#other, 5) do print("other: " .. other[i]) end
end
local function new_shape() return { target = "t", method = "m", args = { from = "gc", list = { 1, 2 } } } end
collectgarbage("setpause", 10)
]]

for _, store in ipairs(H.stores()) do
  describe("finalizers and the job store (" .. store.name .. ")", function()
    local db

    before_each(function() db = dir .. "/fin.db" end)
    after_each(function() store.reset(db) end)

    --- Runs `body` after the prelude in a child; returns the child's output
    --- and its counts (fired, refused, other, extra).
    local function child(name, body)
      local url = store.fresh(db)
      local status, out = H.run_lua(dir, name, PRELUDE .. body, 90, "URL='" .. url .. "'")
      assert.equal(0, status, "exit " .. status .. " (124: hung): " .. out)
      local fired, refused, other, extra = out:match("fired (%d+) refused (%d+) other (%d+) ([^\n]*)")
      assert.is_not_nil(fired, out)
      return out, tonumber(fired), tonumber(refused), tonumber(other), extra
    end

    --- Every finalizer ran into the refusal, and some ran; the first refusal
    --- has its exact words, from a function that `names` (a pattern) matches.
    local function all_refused(out, fired, refused, other, names)
      assert.is_true(fired > 0, "no finalizer ran while the call under test did: " .. out)
      assert.equal(0, other, out)
      assert.equal(fired, refused, out)
      assert.is_truthy(out:find("first: [^\n]-" .. names .. ": " .. REFUSED:gsub("%p", "%%%0") .. "\n"), out)
    end

    it("refuses q:enqueue in finalizers that run while q:enqueue_many sends a batch, and never hangs", function()
      local out, fired, refused, other, extra = child("many.lua", [[
        local status, n = tide.run(function()
          local list = {}
          for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, round = 1 } } end
          bombs(200, function() return q:enqueue(new_shape()) end)
          return #q:enqueue_many(list)
        end)
        report(("%s %s total %d"):format(status, tostring(n), q:stats().total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "q:enqueue")
      assert.equal("ok 6000 total 6000", extra)
    end)

    it("refuses q:enqueue, q:job, q:transaction and q:stats in finalizers that run between and inside single enqueues", function()
      local out, fired, refused, other, extra = child("single.lua", [[
        local calls = {
          function() return q:enqueue(new_shape()) end,
          function() return q:job(1) end,
          function() return q:transaction(function(tx) return tx:enqueue(new_shape()) end) end,
          function() return q:stats() end,
        }
        local status, n = tide.run(function()
          local n = 0
          for i = 1, 3000 do
            if i % 50 == 0 then for k = 1, 8 do bombs(1, calls[k % #calls + 1]) end end
            local _, inserted = q:enqueue{ target = "t", method = "m", args = { i = i, round = 1 } }
            if inserted then n = n + 1 end
          end
          return n
        end)
        report(("%s %s total %d"):format(status, tostring(n), q:stats().total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "q:%a+")
      assert.equal("ok 3000 total 3000", extra)
      assert.is_truthy(out:find("\nnames: q:enqueue q:job q:stats q:transaction\n", 1, true), out)
    end)

    it("refuses store calls and the transaction's own tx handle in finalizers that run inside a transaction", function()
      local out, fired, refused, other, extra = child("tx.lua", [[
        local status, n = tide.run(function()
          return q:transaction(function(tx)
            local calls = {
              function() return q:enqueue(new_shape()) end,
              function() return q:transaction(function(tx2) return tx2:enqueue(new_shape()) end) end,
              function() return q:job(1) end,
              function() return tx:enqueue(new_shape()) end,
              function() return tx:exec("SELECT 1") end,
            }
            for i = 1, 2000 do
              if i % 40 == 0 then for k = 1, 10 do bombs(1, calls[k % #calls + 1]) end end
              tx:enqueue{ target = "t", method = "m", args = { i = i, round = 1 } }
            end
            return 2000
          end)
        end)
        report(("%s %s total %d"):format(status, tostring(n), q:stats().total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "t?[qx]:%a+")
      -- the transaction holds its 2000 jobs and nothing else; the finalizers' calls did nothing
      assert.equal("ok 2000 total 2000", extra)
      assert.is_truthy(out:find("\nnames: q:enqueue q:job q:transaction tx:enqueue tx:exec\n", 1, true), out)
    end)

    it("refuses store calls in finalizers that run while a worker claims, runs and records jobs", function()
      local out, fired, refused, other, extra = child("worker.lua", [[
        for i = 1, 400 do q:enqueue{ target = "fin_t", method = "m", args = { i = i, round = 1 } } end
        local calls = {
          function() return q:enqueue(new_shape()) end,
          function() return q:job(1) end,
          function() return q:transaction(function(tx) return tx:enqueue(new_shape()) end) end,
        }
        local k = 0
        local status, stats = tide.run(function()
          local t = { m = function()
            k = k + 1
            bombs(1, calls[k % #calls + 1])
            local garbage = {}
            for j = 1, 200 do garbage[j] = { j } end
          end }
          local w = tide.worker{ queue = q, concurrency = 20, targets = { fin_t = t } }
          return w:drain{ stop = true }
        end)
        local st = q:stats()
        report(("%s completed %d total %d"):format(status, stats.completed, st.total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "q:%a+")
      assert.equal("ok completed 400 total 400", extra)
      assert.is_truthy(out:find("\nnames: q:enqueue q:job q:transaction\n", 1, true), out)
    end)

    it("lets a finalizer hand its enqueue to a task (tide.spawn), which enqueues it", function()
      local out, fired, refused, other, extra = child("spawn.lua", [[
        local spawned, done = {}, 0
        local status, n = tide.run(function()
          local list = {}
          for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, round = 1 } } end
          for _ = 1, 200 do
            local p = newproxy(true)
            getmetatable(p).__gc = function()
              fired = fired + 1
              spawned[#spawned + 1] = tide.spawn(function() q:enqueue(new_shape()); done = done + 1 end)
            end
          end
          local n = #q:enqueue_many(list)
          collectgarbage()
          for _, t in ipairs(spawned) do t:await() end
          return n
        end)
        report(("%s %s spawned %d done %d total %d"):format(status, tostring(n), #spawned, done, q:stats().total))
        q:close()
      ]])
      assert.equal(0, refused, out)
      assert.equal(0, other, out)
      assert.equal(200, fired, out)
      assert.equal("ok 6000 spawned 200 done 200 total 6200", extra)
    end)

    it("lets a finalizer close the queue while q:enqueue_many runs: the batch is in whole, or refused as closed", function()
      -- q:close is the one queue method a finalizer may call (it waits for
      -- nothing: a connection in use closes when given back).  Each round
      -- closes at another point of the batch: while its jobs are checked,
      -- inside its transaction, or after it.
      local out = child("close.lua", [[
        local url = os.getenv("URL")
        local seen, where = {}, "never"
        for round = 1, 12 do
          where = "never"
          local qr = tide.queue.open(url, { pool = 1 })
          local status, res = tide.run(function()
            local list = {}
            for i = 1, 3000 do list[i] = { target = "t", method = "m", args = { i = i, round = round } } end
            -- a chain: each collection cycle finalizes one link, which
            -- leaves the next; the last one closes, 2 * (round - 1) cycles on
            local function link(k)
              local p = newproxy(true)
              getmetatable(p).__gc = function()
                if k > 0 then return link(k - 1) end
                where = next(qr._txs) and "inside" or "outside"       -- (the queue's own: see q:transaction)
                qr:close()
              end
            end
            link(round * 2 - 2)
            local before = q:stats().total
            local ok, err = pcall(qr.enqueue_many, qr, list)
            collectgarbage()
            local added = q:stats().total - before
            if ok then return ("whole %d"):format(added) end
            return ("refused %d %s"):format(added, tostring(err):match("q:enqueue_many: .*") or tostring(err))
          end)
          qr:close()
          seen[#seen + 1] = status .. " " .. tostring(res) .. " (closed " .. where .. " its transaction)"
        end
        report(table.concat(seen, "|"))
        q:close()
      ]])
      local extra = out:match("fired %d+ refused %d+ other %d+ ([^\n]*)")
      local n = 0
      for outcome in extra:gmatch("[^|]+") do
        n = n + 1
        assert.is_truthy(outcome:match("^ok whole 3000 %(closed %a+ its transaction%)$")
          or outcome == "ok refused 0 q:enqueue_many: the queue is closed (closed outside its transaction)",
          outcome .. " in " .. out)
      end
      assert.equal(12, n, out)
    end)

    it("refuses q:enqueue in an ffi.metatype __gc that runs while q:enqueue_many sends a batch", function()
      -- (the usual way a library owns C resources: wrapped as newproxy's)
      local out, fired, refused, other, extra = child("metatype.lua", [[
        local ffi = require "ffi"
        ffi.cdef "struct fin_handle { int fd; };"
        local handle = ffi.metatype("struct fin_handle", { __gc = function()
          outcome(pcall(function() return q:enqueue(new_shape()) end))
        end })
        local status, n = tide.run(function()
          local list = {}
          for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, round = 1 } } end
          for i = 1, 200 do handle(i) end
          return #q:enqueue_many(list)
        end)
        report(("%s %s total %d"):format(status, tostring(n), q:stats().total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "q:enqueue")
      assert.equal("ok 6000 total 6000", extra)
    end)

    it("refuses q:enqueue in finalizers that run while code outside tasks sends a batch", function()
      local out, fired, refused, other, extra = child("outside.lua", [[
        local list = {}
        for i = 1, 6000 do list[i] = { target = "t", method = "m", args = { i = i, round = 1 } } end
        bombs(200, function() return q:enqueue(new_shape()) end)
        local n = #q:enqueue_many(list)
        report(("%d total %d"):format(n, q:stats().total))
        q:close()
      ]])
      all_refused(out, fired, refused, other, "q:enqueue")
      assert.equal("6000 total 6000", extra)
    end)
  end)
end
