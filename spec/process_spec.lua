-- spec/process_spec.lua — process mode: child processes that a timeout can really stop.
local tide = require "tide"
local process = require "tide.engine.process"
local ffi = require "ffi"
local core = require "tide.core"

package.path = "spec/fixtures/?.lua;" .. package.path
pcall(ffi.cdef, "int getpid(void);")
tide.configure{ processes = 2, process_init = "thread_init", process_memory = 64, process_stop_wait = 50 }

-- Under `make sanitize` the sanitizers are preloaded; tools this spec runs
-- (ps hangs in the ASan runtime) run without them.
local NOPRELOAD = "env -u LD_PRELOAD "
local SANITIZED = (os.getenv("LD_PRELOAD") or ""):find("asan") ~= nil

-- The `sleep` commands this spec's jobs start carry this process's pid in
-- their duration, so that counting the ones left behind never counts another
-- run's (specs of other checkouts may run on the same machine).
local SLEEP = ("sleep 1000.%d"):format(ffi.C.getpid())
local function sleeps_left()
  local p = io.popen(NOPRELOAD .. "pgrep -f '[s]" .. SLEEP:sub(2):gsub("%.", "[.]") .. "' | wc -l")
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end

--- Runs fn as the root task; a failed check shuts the run down (what it
--- left running is cancelled), then fails the spec.
local run = spec_helper.run

--- Whether process `pid` exists (a zombie counts: it is not reaped yet).
local function exists(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() end
  return f ~= nil
end

--- The children of this process: { pid = state letter }.
local function my_children()
  local list = {}
  local p = io.popen(NOPRELOAD .. "ps -o pid=,stat= --ppid " .. ffi.C.getpid())
  for line in p:lines() do
    local pid, stat = line:match("(%d+)%s+(%S+)")
    if pid then list[tonumber(pid)] = stat end
  end
  p:close()
  return list
end

local function zombies()
  local n = 0
  for _, stat in pairs(my_children()) do if stat:sub(1, 1) == "Z" then n = n + 1 end end
  return n
end

local function pool_ready()
  tide.spawn{ mode = "process", run = function() end }:await()   -- the pool starts with its first task
  return spec_helper.wait_for(function()
    local st = tide.stats().processes
    return st.size == 2 and st.starting == 0
  end, 5000)
end

describe("process mode", function()
  after_each(function()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().processes.busy)
  end)

  it("runs a function without upvalues or a \"module.function\" in a child, with the codec of threads", function()
    run(function()
      local t = tide.spawn{ mode = "process", args = { 20, 22, "s", { deep = { 1, 2 } } },
                            run = function(a, b, s, tbl) return a + b, s:upper(), tbl.deep[2], nil end }
      assert.same({ "ok", 42, "S", 2 }, { t:await() })
      assert.same({ "ok", 5 }, { tide.spawn{ mode = "process", run = "thread_mod.add", args = { 2, 3 } }:await() })
      assert.same({ "ok", 1 }, { tide.spawn{ mode = "process", run = "thread_mod.init_count" }:await() })
      local status, msg = tide.spawn{ mode = "process", run = function() return 1, { f = print } end }:await()
      assert.same({ "error", "results[2].f: functions cannot cross to a thread" }, { status, msg })
    end)
  end)

  it("runs in another process with the parent's package paths and a small tide: now, sleep, check, log", function()
    run(function()
      local s, pid, ppid, path, kinds = tide.spawn{ mode = "process", run = function()
        local tide = require "tide"
        local ffi = require "ffi"
        ffi.cdef "int getpid(void); int getppid(void);"
        local t0 = tide.now()
        tide.sleep(5)
        tide.check()
        tide.log("hello from", tide.process)
        return ffi.C.getpid(), ffi.C.getppid(), package.path,
               type(tide.now) .. type(tide.sleep) .. type(tide.log) .. type(tide.process) .. tostring(tide.now() - t0 >= 5)
      end }:await()
      assert.equal("ok", s)
      assert.not_equal(ffi.C.getpid(), pid)
      assert.equal(ffi.C.getpid(), ppid)
      assert.equal(package.path, path)
      assert.equal("functionfunctionfunctionnumbertrue", kinds)
    end)
  end)

  it("brings back errors with their value and the child's traceback", function()
    run(function()
      local t = tide.spawn{ mode = "process", run = function()
        local function inner() error({ code = 7 }) end
        inner()
      end }
      assert.same({ "error", { code = 7 } }, { t:await() })
      assert.matches("in function 'inner'", t.traceback)
    end)
  end)

  it("stops a JIT-compiled infinite loop at its timeout: outcome within 150 ms, its process killed, the pool kept", function()
    run(function()
      assert.is_true(pool_ready())
      local before = tide.stats().processes
      local t0 = tide.now()
      local t = tide.spawn{ mode = "process", timeout = 100, run = function() while true do end end }
      tide.sleep(20)
      local pid = process.pid_of(t)
      local status, msg = t:await()
      local took = tide.now() - t0
      assert.same({ "timeout", ("task %d timed out after 100 ms"):format(t.id) }, { status, msg })
      assert.is_true(took < 150, ("the outcome came after %.1f ms"):format(took))
      assert.is_truthy(pid, "the loop's process was running")
      assert.is_true(spec_helper.wait_for(function() return not exists(pid) end, 1000), "the process is gone")
      assert.is_true(pool_ready(), "the pool is back to its size")
      local after = tide.stats().processes
      assert.equal(before.killed + 1, after.killed)
      assert.equal(before.replaced + 1, after.replaced)
      local ts = {}
      for i = 1, 100 do ts[i] = tide.spawn{ mode = "process", run = function(x) return x * 2 end, args = { i } } end
      for i = 1, 100 do assert.same({ "ok", 2 * i }, { ts[i]:await() }) end
    end)
  end)

  it("gives no new job to a child it is killing, even when the stopped job's result comes after the kill", function()
    tide.configure{ process_stop_wait = 100 }
    local path = os.tmpname()
    local ok, err = pcall(run, function()
      assert.is_true(pool_ready())
      local other = tide.spawn{ mode = "process", run = function() require("tide").sleep(600) end }
      -- Job a notices its stop request (at 60 ms) when a `sleep 0.15` ends.
      local a = tide.spawn{ mode = "process", timeout = 60, run = function()
        while true do os.execute("sleep 0.15"); require("tide").check() end
      end }
      local b = tide.spawn{ mode = "process", run = function() return "b" end }   -- waits: both children are busy
      -- A callback of the loop's I/O phase (a file watch, its file written
      -- at 90 ms) holds the loop until a's result is written (~150 ms) and
      -- its kill is due (160 ms): the loop's next turn runs the kill's timer
      -- first, then reads a's result.
      local watch = core.fs_watch(path, function()
        local t0 = core.now()
        while core.now() - t0 < 250 do end
      end)
      tide.spawn{ mode = "thread", args = { path }, run = function(p)
        require("tide").sleep(90)
        local f = io.open(p, "w"); f:write("x"); f:close()
      end }:await()
      assert.equal("timeout", (a:await()))
      assert.same({ "ok", "b" }, { b:await() })
      assert.equal("ok", (other:await()))
      watch:close()
    end)
    os.remove(path)
    tide.configure{ process_stop_wait = 50 }
    assert(ok, err)
  end)

  it("stops an interpreted loop without a kill, and keeps where it was as the task's traceback", function()
    run(function()
      assert.is_true(pool_ready())
      local killed = tide.stats().processes.killed
      local t = tide.spawn{ mode = "process", timeout = 50, run = function()
        local tide = require "tide"
        local function wait_forever() while true do tide.sleep(10) end end
        wait_forever()
      end }
      assert.equal("timeout", (t:await()))
      assert.is_true(spec_helper.wait_for(function() return t.traceback ~= nil end, 1000))
      assert.matches("^stopped in process %d+: .*cancelled", t.traceback)
      assert.matches("in function 'wait_forever'", t.traceback)
      assert.equal(killed, tide.stats().processes.killed)
    end)
  end)

  it("gives each runaway its own clear outcome, and nothing else in the node notices", function()
    run(function()
      assert.is_true(pool_ready())
      local ticks = 0
      local ticker = tide.spawn(function() for _ = 1, 2000 do tide.sleep(5); ticks = ticks + 1 end end)
      local blocked = tide.spawn{ mode = "process", timeout = 100, run = function(cmd) os.execute(cmd) end, args = { SLEEP } }
      local segv = tide.spawn{ mode = "process", run = function()
        local ffi = require "ffi"
        ffi.cast("int *", 0)[0] = 1
      end }
      local hog = tide.spawn{ mode = "process", run = function()
        local t = {}
        for i = 1, 1e9 do t[i] = { i } end
      end }
      local exits = tide.spawn{ mode = "process", run = function() io.stderr:write("last words\n"); os.exit(3) end }
      assert.same({ "timeout", ("task %d timed out after 100 ms"):format(blocked.id) }, { blocked:await() })
      local status, msg = segv:await()
      assert.equal("error", status)
      if SANITIZED then                        -- AddressSanitizer's own SIGSEGV handler reports, then exits 1
        assert.matches("^process %d+ exited with status 1; the end of its stderr:\n.*AddressSanitizer: SEGV", msg)
      else
        assert.matches("^process %d+ killed by SIGSEGV$", msg)
      end
      assert.same({ "error", "not enough memory" }, { hog:await() })
      status, msg = exits:await()
      assert.equal("error", status)
      assert.matches("^process %d+ exited with status 3; the end of its stderr:\nlast words\n$", msg)
      assert.is_true(ticks >= 10, "the loop kept ticking: " .. ticks)
      ticker:cancel()
      assert.is_true(spec_helper.wait_for(function() return sleeps_left() == 0 end, 1000), "the blocked child's own child is gone too (its process group was killed)")
      assert.is_true(pool_ready())
      assert.same({ "ok", 3 }, { tide.spawn{ mode = "process", run = "thread_mod.add", args = { 1, 2 } }:await() })
    end)
  end)

  it("gives 1,000 cancelled process tasks exactly one outcome each, and leaves no zombie", function()
    local outcomes, seen = {}, 0
    run(function()
      assert.is_true(pool_ready())
      local ts = {}
      for i = 1, 1000 do
        ts[i] = tide.spawn{ mode = "process", run = function() require("tide").sleep(100000) end,
                            handle_result = function(status)
                              seen = seen + 1
                              outcomes[i] = (outcomes[i] and outcomes[i] .. "," or "") .. status
                            end }
      end
      tide.sleep(50)
      assert.equal(2, tide.stats().processes.busy)
      for i = 1000, 1, -1 do assert.is_true(ts[i]:cancel("enough")) end
      assert.is_true(spec_helper.wait_for(function() return tide.stats().processes.busy == 0 end, 2000))
      tide.sleep(100)
    end)
    assert.equal(1000, seen)
    for i = 1, 1000 do assert.equal("cancelled", outcomes[i]) end
    assert.equal(0, zombies())
    local st = tide.stats().processes
    assert.equal(0, st.queued)
    assert.equal(2, st.size)
  end)

  it("sends jobs ahead with process_prefetch: those given up on are skipped, those behind a killed one run elsewhere", function()
    tide.configure{ process_prefetch = 8 }
    local ok, err = pcall(run, function()
      assert.is_true(pool_ready())
      local ts = {}
      for i = 1, 200 do ts[i] = tide.spawn{ mode = "process", run = function(x) return x + 1 end, args = { i } } end
      for i = 1, 200 do assert.same({ "ok", i + 1 }, { ts[i]:await() }) end
      -- a stuck job first on each child, 8 more sent behind each: the stuck ones time out and are killed,
      -- the ones behind them are sent again to the replacements, and one cancelled while it waited in a
      -- child is skipped there (exactly one outcome: cancelled)
      local killed = tide.stats().processes.killed
      local stuck = {}
      for i = 1, 2 do stuck[i] = tide.spawn{ mode = "process", timeout = 100, run = function() while true do end end } end
      tide.sleep(20)
      local behind, outcomes = {}, {}
      for i = 1, 10 do
        behind[i] = tide.spawn{ mode = "process", run = function(x) return x end, args = { i },
                                handle_result = function(status) outcomes[i] = (outcomes[i] or "") .. status end }
      end
      tide.sleep(5)
      assert.equal(0, tide.stats().processes.queued)   -- all sent ahead, none waiting here
      behind[3]:cancel()
      for i = 1, 2 do assert.equal("timeout", (stuck[i]:await())) end
      for i = 1, 10 do
        if i == 3 then assert.equal("cancelled", (behind[i]:await()))
        else assert.same({ "ok", i }, { behind[i]:await() }) end
      end
      for i = 1, 10 do assert.equal(i == 3 and "cancelled" or "ok", outcomes[i]) end
      assert.is_true(spec_helper.wait_for(function() return tide.stats().processes.killed == killed + 2 end, 1000))
    end)
    tide.configure{ process_prefetch = 1 }
    if not ok then error(err, 0) end
  end)

  it("kills a child whose frames break the protocol (a job that writes on fd 3), failing its task at once", function()
    run(function()
      assert.is_true(pool_ready())
      -- A second "ready" (the parent would take the busy child for idle
      -- and forget its job), then frames that make no sense.
      local frames = {
        "\5\0\0\0R\255\255\255\255",                   -- ready again
        "\1\0\0\0X",                                       -- an unknown type
        "\3\0\0\0D\1\2",                                 -- a done cut short
        "\0\0\0\0",                                        -- an empty frame
      }
      for _, frame in ipairs(frames) do
        local t0 = tide.now()
        local t = tide.spawn{ mode = "process", timeout = 5000, args = { frame }, run = function(bytes)
          local ffi = require "ffi"
          pcall(ffi.cdef, "long write(int, const void *, unsigned long);")
          ffi.C.write(3, bytes, #bytes)
          require("tide").sleep(1000)
          return "not heard"
        end }
        local status, msg = t:await()
        assert.equal("error", status, ("%q"):format(frame))
        assert.matches("^process %d+ killed by SIGKILL", msg)
        assert.is_true(tide.now() - t0 < 900, ("%q: the outcome came after %d ms"):format(frame, tide.now() - t0))
      end
      assert.is_true(pool_ready(), "the pool is back to its size")
    end)
  end)

  it("learns of a child's death when the host took SIGCHLD (its status reaped by someone else)", function()
    local dir = spec_helper.tempdir()
    local script = spec_helper.write_file(dir, "host_sigchld.lua", [[
      local tide = require "tide"
      local ffi = require "ffi"
      ffi.cdef "void *signal(int, void *);"
      tide.configure{ processes = 1 }
      tide.spawn{ mode = "process", run = function() end }:await()       -- the pool is up
      ffi.C.signal(17, ffi.cast("void *", 1))     -- SIGCHLD ignored: the kernel reaps, libuv never hears
      local t0 = tide.now()
      local status, msg = tide.spawn{ mode = "process", timeout = 4000, run = function() os.exit(3) end }:await()
      print(status, ("%d ms"):format(tide.now() - t0))
      print(msg)
      print(tide.spawn{ mode = "process", timeout = 4000, run = function() return 42 end }:await())
    ]])
    local p = io.popen(("%s/tide run %s 2>&1"):format(spec_helper.build, script))
    local out = p:read("*a")
    p:close()
    local status, ms = out:match("^(%a+)\t(%d+) ms\n")
    assert.equal("error", status, out)
    assert.is_true(tonumber(ms) < 1000, out)
    assert.matches("\nprocess %d+ is gone; its exit status was reaped by another waitpid %(a SIGCHLD handler of the host%?%)\n", out)
    assert.matches("\nok\t42\n", out)
  end)

  it("keeps the parent's listening sockets and files out of its children", function()
    pcall(ffi.cdef, [[
      int socket(int, int, int);
      int listen(int, int);
      int close(int);
    ]])
    local fd = ffi.C.socket(2, 1, 0)               -- AF_INET, SOCK_STREAM: no CLOEXEC
    assert.is_true(fd >= 0)
    assert.equal(0, ffi.C.listen(fd, 1))
    local file = assert(io.open(os.tmpname(), "w"))
    run(function()
      local _, pid = tide.spawn{ mode = "process", run = function()
        local ffi = require "ffi"
        pcall(ffi.cdef, "int getpid(void);")
        return ffi.C.getpid()
      end }:await()
      local p = io.popen(NOPRELOAD .. "ls /proc/" .. pid .. "/fd")
      local fds = {}
      for line in p:lines() do fds[#fds + 1] = tonumber(line) end
      p:close()
      table.sort(fds)
      assert.same({ 0, 1, 2, 3 }, fds)
    end)
    file:close()
    ffi.C.close(fd)
  end)

  it("leaves nothing a child started when the parent (tide run) is SIGKILLed", function()
    -- The children die with the parent (PDEATHSIG, and their watch of fd 3),
    -- and take their process group with them: a `sleep` a job ran goes too.
    local dir = spec_helper.tempdir()
    local script = spec_helper.write_file(dir, "killed.lua", [[
      local tide = require "tide"
      tide.configure{ processes = 2 }
      local t = tide.spawn{ mode = "process", run = function() os.execute("]] .. SLEEP .. [[") end }
      tide.sleep(300)
      io.write("started\n")
      io.flush()
      t:await()
    ]])
    local out = dir .. "/out"
    local sh = ([[
      %s/tide run %s > %s 2>&1 & p=$!
      i=0; while [ ! -s %s ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
      kill -KILL $p; wait $p
    ]]):format(spec_helper.build, script, out, out)
    local p = io.popen(sh)
    p:read("*a")
    p:close()
    assert.equal("started\n", spec_helper.file_bytes(out))
    assert.is_true(spec_helper.wait_for(function() return sleeps_left() == 0 end, 2000), "the job's `sleep` outlived the killed parent")
  end)

  it("kills every child when the parent (tide run) gets SIGTERM, within the grace period", function()
    local dir = spec_helper.tempdir()
    local script = spec_helper.write_file(dir, "procs.lua", [[
      local tide = require "tide"
      tide.configure{ processes = 3, process_stop_wait = 5000, grace = 300 }
      local ts = {
        tide.spawn{ mode = "process", run = function() while true do end end },
        tide.spawn{ mode = "process", run = function() os.execute("]] .. SLEEP .. [[") end },
        tide.spawn{ mode = "process", run = function() require("tide").sleep(1e6) end },
      }
      tide.sleep(300)
      io.write(table.concat(require("tide.engine.process").pids(), " "), "\n")
      io.flush()
      for i = 1, 3 do ts[i]:await() end
    ]])
    local out = dir .. "/out"
    -- The time from SIGTERM until every child is gone (reaped: no /proc entry).
    local sh = ([[
      %s/tide run %s > %s 2>&1 & p=$!
      i=0; while [ ! -s %s ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
      pids=$(head -n 1 %s)
      t0=$(date +%%s%%N); kill -TERM $p
      i=0; while [ $i -lt 1000 ]; do
        alive=0; for c in $pids; do [ -d /proc/$c ] && alive=1; done
        [ $alive = 0 ] && break; sleep 0.005; i=$((i+1))
      done
      t1=$(date +%%s%%N); wait $p; echo "exit $? $(( (t1 - t0) / 1000000 ))"
    ]]):format(spec_helper.build, script, out, out, out)
    local p = io.popen(sh)
    local result = p:read("*a")
    p:close()
    local pids = spec_helper.file_bytes(out):match("^([%d ]+)\n")
    assert.is_truthy(pids, spec_helper.file_bytes(out))
    local status, ms = result:match("exit (%d+) (%d+)")
    assert.equal("143", status)
    local margin = SANITIZED and 600 or 250    -- a child's death, its reaping (slower under the sanitizers)
    assert.is_true(tonumber(ms) < 300 + margin, "the children were gone after " .. ms .. " ms (grace: 300 ms)")
    for pid in pids:gmatch("%d+") do assert.is_false(exists(pid), "child " .. pid .. " is gone") end
    assert.equal(0, sleeps_left())
  end)

  it("closes a child whose job ends during a shutdown's grace period, without an error", function()
    local reported = {}
    tide.configure{ on_error = function(where, err) reported[#reported + 1] = tostring(where) .. ": " .. tostring(err) end }
    local pid, outcome
    local ok, err = pcall(run, function()
      assert.is_true(pool_ready())
      local t = tide.spawn{ mode = "process", run = function() require("tide").sleep(150); return 1 end }
      assert.is_true(spec_helper.wait_for(function() return process.pid_of(t) ~= nil end, 2000))
      pid = process.pid_of(t)
      tide.shutdown(5000)
      outcome = { t:await() }
    end)
    spec_helper.loud_errors()
    assert.is_true(ok, err)
    assert.same({ "ok", 1 }, outcome)
    assert.same({}, reported)
    assert.is_false(exists(pid), "the child that finished during the shutdown is gone")
  end)

  it("runs flow nodes in process mode, a killing timeout failing the node", function()
    run(function()
      local f = tide.flow{ tasks = {
        double = { mode = "process", run = function(ctx) return ctx.input * 2 end },
        each = { mode = "process", after = "double", items = function() return { 1, 2, 3 } end,
                 each = function(item) return item + 1 end },
        stuck = { mode = "process", after = "double", timeout = 100, run = function() while true do end end },
      } }
      local killed = tide.stats().processes.killed
      local status, report = f:run(21)
      assert.equal("error", status)            -- the flow failed: its node timed out
      assert.equal(42, report.tasks.double.value)
      assert.same({ 2, 3, 4 }, report.tasks.each.value)
      assert.equal("timeout", report.tasks.stuck.status)
      assert.is_true(spec_helper.wait_for(function() return tide.stats().processes.killed == killed + 1 end, 1000))
    end)
  end)

  it("runs a worker target in process mode, its timeout killing the job's process", function()
    local dir = spec_helper.tempdir()
    local q = tide.queue.open("sqlite:" .. dir .. "/jobs.db")
    q:enqueue{ target = "cpu", method = "spin", max_attempts = 1 }
    q:enqueue{ target = "cpu", method = "square", args = { n = 7 }, max_attempts = 1 }
    local killed = tide.stats().processes.killed
    local st = select(2, assert(tide.run(function()
      return tide.worker{ queue = q, targets = { cpu = {
        mode = "process", timeout = 100, methods = {
          spin = function() while true do end end,
          square = function(args) return args.n * args.n end,
        } } } }:drain{ stop = true }
    end)))
    assert.equal(1, st.completed)
    assert.equal(1, tide.stats().processes.killed - killed)
    q:close()
  end)

  it("runs a consumer's handler in process mode, a killing timeout failing its delivery", function()
    local outcomes = {}
    local src = tide.sources.memory{ prefetch = 4, messages = { "a", "spin", "c" } }
    local c = tide.consumer{ source = src, concurrency = 4, poll = 5, requeue = false, handler = {
      mode = "process", timeout = 100,
      run = function(body)
        if body == "spin" then while true do end end
        return body:upper()
      end,
      handle_result = function(status, value) outcomes[#outcomes + 1] = status .. ":" .. tostring(value) end,
    } }
    run(function()
      assert.is_true(pool_ready())              -- a task's timeout counts its wait for a child too
      local killed = tide.stats().processes.killed
      local t = tide.spawn(function() return c:run() end)
      assert.is_true(spec_helper.wait_for(function() return #outcomes == 3 end, 3000))
      t:cancel()
      table.sort(outcomes)
      assert.same({ "ok:A", "ok:C" }, { outcomes[1], outcomes[2] })
      assert.matches("^timeout:task %d+ timed out after 100 ms$", outcomes[3])
      assert.is_true(spec_helper.wait_for(function() return tide.stats().processes.killed == killed + 1 end, 1000))
    end)
  end)

  it("runs in a C host that links tide in, with tide.so from package.cpath for the children", function()
    local dir = spec_helper.tempdir()
    local script = spec_helper.write_file(dir, "script.lua", [[
      local tide = require "tide"
      tide.configure{ processes = 1 }
      print(tide.spawn{ mode = "process", run = function() return 6 * 7 end }:await())
    ]])
    local function host(cpath)
      return spec_helper.sh(("LUA_CPATH='%s' timeout 30 %s/embed-host %s 2>&1"):format(cpath, spec_helper.build, script))
    end
    local status, out = host(spec_helper.build .. "/?.so;;")
    assert.equal(0, status, out)
    assert.matches("ok\t42\n", out)
    status, out = host("/nonexistent/?.so")
    assert.matches("error\ttide: process mode: tide is linked into [^\n]*embed%-host, which a child cannot load; "
                   .. "it needs tide.so on package.cpath", out)
  end)

  it("counts process tasks by outcome and the pool's children in the metrics", function()
    local text = require("tide.observe.metrics").render()
    local st = tide.stats().processes
    local function sample(name) return tonumber(text:match("\n" .. name:gsub("%p", "%%%0") .. " (%d+)")) end
    assert.equal(st.killed, sample('tide_process_pool_exits_total{cause="killed"}'))
    assert.equal(st.died, sample('tide_process_pool_exits_total{cause="died"}'))
    assert.equal(st.replaced, sample('tide_process_pool_replaced_total'))
    assert.equal(st.idle, sample('tide_process_pool_processes{state="idle"}'))
    assert.is_true(st.killed >= 5 and st.died >= 2)
    assert.is_true(sample('tide_tasks_total{mode="process",outcome="ok"}') >= 300)
    assert.is_true(sample('tide_tasks_total{mode="process",outcome="timeout"}') >= 5)
    assert.is_true(sample('tide_tasks_total{mode="process",outcome="cancelled"}') >= 1000)
  end)

  it("refuses bad options with clear errors", function()
    local up = 1
    spec_helper.error_cases("spec/process_spec.lua", {
      { function() tide.configure{ processes = 0 } end,
        "tide.configure: bad option 'processes' (integer from 1 to 1024 expected, got number 0)" },
      { function() tide.configure{ process_init = 5 } end,
        "tide.configure: bad option 'process_init' (module name expected, got number 5)" },
      { function() tide.configure{ process_memory = -1 } end,
        "tide.configure: bad option 'process_memory' (integer number of MB from 0 (no limit) to 16777216 expected, "
        .. "got number -1)" },
      -- (taken, then every process task failed: "bad argument #1 to 'proc_spawn' (memory_limit out of range)")
      { function() tide.configure{ process_memory = 1e9 } end,
        "tide.configure: bad option 'process_memory' (integer number of MB from 0 (no limit) to 16777216 expected, "
        .. "got number 1000000000)" },
      { function() tide.configure{ process_stop_wait = "1s" } end,
        "tide.configure: bad option 'process_stop_wait' (non-negative number of ms expected, got string \"1s\")" },
      { function() tide.configure{ process_prefetch = 0 } end,
        "tide.configure: bad option 'process_prefetch' (integer from 1 to 64 expected, got number 0)" },
      { function() tide.configure{ processes = 4 } end,
        "tide.configure: processes, process_init and process_memory must be set before the first process task" },
      { function() tide.spawn{ mode = "process", run = function() return up end } end,
        "tide.spawn: bad option 'run' (a function with upvalues cannot cross to a process: upvalue 'up')" },
      { function() tide.spawn{ mode = "process", run = "nodots" } end,
        "tide.spawn: bad option 'run' (\"module.function\" expected, got string \"nodots\")" },
      { function() tide.spawn{ mode = "process", run = print } end,
        "tide.spawn: bad option 'run' (a C function cannot cross to a process; name it as \"module.function\")" },
      { function() tide.spawn{ mode = "process", run = "m.f", args = { print } } end,
        "tide.spawn: args[1]: functions cannot cross to a process" },
      { function() tide.pool{ mode = "process" }:submit(function() return up end) end,
        "pool:submit: bad option 'run' (a function with upvalues cannot cross to a process: upvalue 'up')" },
    })
  end)
end)
