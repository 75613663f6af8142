-- spec/binding_spec.lua — the SQLite and libpq bindings under signals, socket switches and errors that interrupt them.
--
-- Errors raised inside a binding while it holds C memory (a statement, a
-- result) used to leak it; the scenarios run in child processes, where
-- finalizers that raise (set with debug.setmetatable, so not wrapped) can
-- interrupt any allocation, with the JIT off (LuaJIT 2.1 of 2022 crashes on
-- such an error at a trace exit).
local H = spec_helper
local PG = os.getenv("TIDE_PG_URL")

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

-- Defines bomb(n): n unreachable objects whose finalizers raise; and heap().
local PRELUDE = [[
  jit.off()
  local tide = require "tide"
  local core = require "tide.core"
  local ffi = require "ffi"
  pcall(ffi.cdef, "size_t __sanitizer_get_current_allocated_bytes(void);")
  pcall(ffi.cdef, "struct mi2 { size_t arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost; }; struct mi2 mallinfo2(void);")
  local function heap()
    collectgarbage(); collectgarbage()
    local ok, n = pcall(function() return tonumber(ffi.C.__sanitizer_get_current_allocated_bytes()) end)
    if ok then return n end
    local m = ffi.C.mallinfo2()
    return tonumber(m.uordblks) + tonumber(m.hblkhd)
  end
  local mt = { __gc = function() error("boom in gc") end }
  local function bomb(n) for _ = 1, n do debug.setmetatable(newproxy(false), mt) end end
  -- Each raising finalizer stops a collection: collect until one completes.
  local function settle() while not pcall(collectgarbage) do end end
  -- A new cycle as soon as one ends: steps run at nearly every allocation,
  -- so a finalizer runs (and raises) inside the binding's own allocations.
  local function collect_always() collectgarbage("setpause", 0) end
]]

--- Connects with the raw binding, without the loop (blocking waits).
local CONNECT = [[
  local function connect(info)
    local pg = assert(core.pg_connect(info, "pg"))
    while true do
      local st, err = pg:connect_poll()
      if st == "ok" then return pg end
      assert(st, err)
      assert(pg:wait(st == "read", st == "write", 5000), "connect timed out")
    end
  end
]]

describe("the bindings", function()
  it("SQLite: open and prepare interrupted by an error keep no memory", function()
    local status, out = H.run_lua(dir, "sqlite.lua", PRELUDE .. ([[
      local path = %q
      local db = assert(core.sqlite_open(path, "db"))
      db:exec("CREATE TABLE IF NOT EXISTS t (a, b, c)")
      local raised = 0
      collect_always()
      local function round()
        for _ = 1, 400 do
          pcall(bomb, 20)
          local ok, st = pcall(db.prepare, db, "SELECT a, b, c FROM t WHERE a = ?1 AND b > ?2 ORDER BY c")
          if ok then st:finalize() else raised = raised + 1 end
          pcall(bomb, 20)
          local ok2, db2 = pcall(core.sqlite_open, path, "db2")
          if ok2 and db2 then db2:close() else raised = raised + 1 end
        end
        settle()
      end
      round()                                  -- warm up: caches, the page cache
      local before = heap()
      for _ = 1, 5 do round() end
      local grew = heap() - before
      print("grew", grew, "raised", raised)
      db:close()
    ]]):format(dir .. "/leak.db"), 240)
    assert.equal(0, status, out)
    local grew, raised = out:match("grew\t(%-?%d+)\traised\t(%d+)")
    assert.is_true(tonumber(raised) > 100, "calls interrupted: " .. tostring(raised))
    assert.is_true(tonumber(grew) < 256 * 1024, "the heap grew by " .. tostring(grew) .. " bytes")
  end)

  describe("PostgreSQL", function()
    it("conn:wait waits its whole timeout when a signal interrupts poll", function()
      if not PG then return pending("no PostgreSQL server (spec/run.sh starts one)") end
      local status, out = H.run_lua(dir, "eintr.lua", PRELUDE .. CONNECT .. [[
        local st, err = tide.run(function()
          local pg = connect(os.getenv("TIDE_PG_URL"))
          os.execute(("(sleep 0.2; kill -INT %d) &"):format(core.pid()))
          local t0 = tide.now()
          local ready = pg:wait(true, false, 1500)   -- an idle connection: nothing to read
          print("wait", tostring(ready), ("%.0f"):format(tide.now() - t0))
          pg:close()
        end)
        assert(st == "ok", tostring(err))
      ]], 60)
      assert.equal(0, status, out)
      local ready, ms = out:match("wait\t(%a+)\t(%d+)")
      assert.equal("false", ready, out)
      assert.is_true(tonumber(ms) >= 1400, "waited " .. tostring(ms) .. " ms")
    end)

    it("follows the socket libpq switches to while it connects (multi-host)", function()
      if not PG then return pending("no PostgreSQL server (spec/run.sh starts one)") end
      local fake = H.write_file(dir, "starting_up.pl", [[
        use IO::Socket::INET;
        alarm 60;                                  # never outlives the spec
        $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 5, ReuseAddr => 1) or die;
        $| = 1; print "port ", $s->sockport, "\n";
        while ($c = $s->accept) {
          sysread($c, $buf, 4096);
          $body = "SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
          syswrite($c, "E" . pack("N", 4 + length $body) . $body);
          close $c;
        }
      ]])
      local host, port = PG:match("@([%d.]+):(%d+)/")
      local user, db = PG:match("://([^@:]+)@"), PG:match("/([^/?]+)$")
      local status, out = H.run_lua(dir, "switch.lua", PRELUDE .. ([[
        -- host1 answers "the database system is starting up" (57P03): libpq
        -- drops that socket and connects to host2 with a new one -- another
        -- number, as a lower one was freed meanwhile.
        local p = io.popen("perl " .. %q .. " 2>/dev/null & echo pid $!")
        local got = p:read("*l") .. " " .. p:read("*l")
        local bad_port, perl_pid = tonumber(got:match("port (%%d+)")), tonumber(got:match("pid (%%d+)"))
        local S = require "tide.engine.sched"
        local waiting
        core.pg_on_ready(function() local w = waiting; waiting = nil; if w then S.wake(w[1], w[2]) end end)
        local _, ok, err = tide.run(function()
          return pcall(function()
            local low = assert(io.open("/dev/null"))     -- a low descriptor, freed below
            local info = ("host=127.0.0.1,%s port=%%d,%s user=%s dbname=%s connect_timeout=5 " ..
                          "sslmode=disable gssencmode=disable"):format(bad_port)
            local pg = assert(core.pg_connect(info, "pg"))
            local steps = 0
            while true do
              local st, e = pg:connect_poll()
              if st == "ok" then break end
              assert(st, e)
              steps = steps + 1
              if steps == 1 then low:close() end        -- the next socket takes the freed number
              local t, tok = S.wait_begin("spec", 1)
              waiting = { t, tok }
              pg:watch(1, st == "read", st == "write", true)
              S.wait_end(t, tok, 5000)
              pg:unwatch()
              assert(not waiting, "no readiness in 5 s: the watch is on the wrong socket")
            end
            print("connected after", steps, "steps")
            pg:close()
          end)
        end)
        os.execute("kill " .. perl_pid)
        p:close()
        print("result", ok, err)
      ]]):format(fake, host, port, user, db), 60)
      assert.equal(0, status, out)
      assert.matches("result\ttrue", out)
      assert.matches("connected after\t%d+\tsteps", out)
    end)

    it("conn:result interrupted by an error while it makes rows keeps no result", function()
      if not PG then return pending("no PostgreSQL server (spec/run.sh starts one)") end
      local status, out = H.run_lua(dir, "result.lua", PRELUDE .. CONNECT .. [[
        local pg = connect(os.getenv("TIDE_PG_URL"))
        local sql = "SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 2000) g"
        local raised = 0
        collect_always()
        local function query()
          assert(pg:send(sql))
          while pg:flush() == 1 do pg:wait(false, true, 5000) end
          while pg:busy() do pg:wait(true, false, 5000); assert(pg:consume()) end
          while true do
            pcall(bomb, 20)
            local ok, r = pcall(pg.result, pg)
            if not ok then raised = raised + 1
            elseif r == nil then break end
          end
          settle()
        end
        for _ = 1, 5 do query() end
        local before = heap()
        for _ = 1, 40 do query() end
        print("grew", heap() - before, "raised", raised)
        pg:close()
      ]], 240)
      assert.equal(0, status, out)
      local grew, raised = out:match("grew\t(%-?%d+)\traised\t(%d+)")
      assert.is_true(tonumber(raised) > 10, "results interrupted: " .. tostring(raised))
      assert.is_true(tonumber(grew) < 1024 * 1024, "the heap grew by " .. tostring(grew) .. " bytes")
    end)
  end)
end)
