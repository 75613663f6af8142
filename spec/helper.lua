-- spec/helper.lua — loaded by busted before every spec: finds build/tide.so
-- and gives specs a few shared tools.
local build = os.getenv("BUILD") or "build"
package.cpath = build .. "/?.so;" .. package.cpath

local H = {}
_G.spec_helper = H

-- A spec's task may hold the loop for a second on a loaded machine (or
-- under the sanitizers) without anything being wrong: the watchdog's own
-- specs run it at its default in processes of their own.
require("tide").configure{ watchdog = 30000 }

H.build = build

--- The start of a script whose code holds the loop: tide with a watchdog of
--- 300 ms, and spin(ms), kept interpreted so that the watchdog's hook
--- reaches it (watchdog_spec, review_engine_spec).
H.SPIN_SCRIPT = [[
      local tide = require "tide"
      tide.configure{ watchdog = 300 }
      local function spin(ms)          -- interpreted: the hook reaches it
        local t0 = tide.now()
        while tide.now() - t0 < ms do end
      end
      jit.off(spin)
]]

--- Asserts that fn(...) raises an error whose message ends with `msg`
--- (the start is the caller's file:line).
function H.error_like(msg, fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error: " .. msg)
  err = tostring(err)
  if err:sub(-#msg) ~= msg then
    error(("expected error ending in\n  %s\ngot\n  %s"):format(msg, err), 2)
  end
  return err
end

--- Checks a list of { fn, message } cases: each fn must raise `message`,
--- prefixed by its own line in `file` (the spec's path), as every public
--- function blames its caller's line.
function H.error_cases(file, cases)
  local pattern = "^" .. file:gsub("%p", "%%%0") .. ":%d+: (.*)$"
  for i, case in ipairs(cases) do
    local ok, err = pcall(case[1])
    assert(not ok, ("case %d did not fail: %s"):format(i, case[2]))
    local msg = tostring(err):match(pattern)
    if msg ~= case[2] then
      error(("case %d:\n expected: %s:N: %s\n      got: %s"):format(i, file, case[2], tostring(err)), 2)
    end
  end
end

--- Makes the error sink count instead of print (for specs that make
--- callbacks fail on purpose); loud_errors() restores printing.
function H.quiet_errors()
  H.reported = 0
  require("tide").configure{ on_error = function() H.reported = H.reported + 1 end }
end

function H.loud_errors()
  require("tide").configure{ on_error = function(where, err, tb) io.stderr:write(tb or tostring(err), "\n") end }
end

--- What every spec checks after each test: no task left live, no libuv
--- handle of tide's left active (the loop would not have ended).
function H.assert_idle()
  local assert = require "luassert"         -- the helper loads before busted's globals
  local st = require("tide").stats()
  assert.equal(0, st.live, "tasks left live")
  assert.equal(0, st.active_handles, "handles left active")
end

--- For tests whose callbacks fail on purpose: quiet_start() before each
--- makes the error sink count and notes the pending timers; quiet_end()
--- after each prints errors again and checks that nothing is left live and
--- no timer the test made is left pending.
function H.quiet_start()
  H.quiet_errors()
  H.timers0 = require("tide").stats().timers
end

function H.quiet_end()
  H.loud_errors()
  H.assert_idle()
  require("luassert").equal(H.timers0, require("tide").stats().timers, "timers left pending")
end

--- tide.run(fn) for specs: an error (a failed assertion) inside fn fails
--- the spec, and shuts the loop down at once, so tasks fn left behind
--- (a ticker waiting for a flag fn never set) cannot keep it running.
--- Returns what fn returned.
function H.run(fn, ...)
  local tide = require "tide"
  local results = { tide.run(function(...)
    local r = { xpcall(fn, debug.traceback, ...) }
    if not r[1] then tide.shutdown(0); error(r[2], 0) end
    return unpack(r, 2, table.maxn(r))
  end, ...) }
  if results[1] ~= "ok" then error(tostring(results[2]), 0) end
  return unpack(results, 2, table.maxn(results))
end

--- Waits (inside a task) until cond() holds, polling every `step` ms (5
--- unless given); true, or false once more than `ms` have passed.
function H.wait_for(cond, ms, step)
  local tide = require "tide"
  local t0 = tide.now()
  while not cond() do
    if tide.now() - t0 > ms then return false end
    tide.sleep(step or 5)
  end
  return true
end

--- For the store specs' describe blocks (call it inside one): before each
--- test, a queue on an empty `store` (an entry of H.stores()), handed to
--- set(q), and the error sink counting; after each, errors printed again,
--- the queue closed, the store removed, and nothing left live.
function H.fresh_queue_each(store, set)
  local busted = getfenv(2)     -- (before_each and after_each live in the spec's environment, not this file's)
  local path, q
  busted.before_each(function()
    path = os.tmpname()
    q = require("tide").queue.open(store.fresh(path))
    set(q)
    H.quiet_errors()
  end)
  busted.after_each(function()
    H.loud_errors()
    q:close()
    store.reset(path)
    os.remove(path)
    H.assert_idle()
  end)
end

--- The throwaway RabbitMQ node spec/run.sh starts: its URL and its
--- directory (TIDE_AMQP_URL, TIDE_AMQP_DIR).  Raises when the URL (and,
--- with need_dir, the directory) is not set: a broker spec fails without
--- its broker, it is never skipped.
function H.amqp_node(need_dir)
  local url, dir = os.getenv("TIDE_AMQP_URL"), os.getenv("TIDE_AMQP_DIR")
  if need_dir then
    assert(url and dir, "TIDE_AMQP_URL / TIDE_AMQP_DIR are not set: spec/run.sh starts a RabbitMQ node for this spec")
  else
    assert(url, "TIDE_AMQP_URL is not set: spec/run.sh starts a RabbitMQ node for this spec")
  end
  return url, dir
end

--- A broker queue name no other test (nor an earlier run) has used:
--- WHAT-TIME-N.
local queues_named = 0
function H.qname(what)
  queues_named = queues_named + 1
  return ("%s-%d-%d"):format(what, os.time(), queues_named)
end

--- Checks tide.sources.memory's own log of `src`: every tag it delivered
--- settled exactly once, nothing left unacked; returns { [tag] = how }.
function H.settled_once(src)
  local assert = require "luassert"         -- the helper loads before busted's globals
  local seen = {}
  for _, e in ipairs(src.log) do
    assert(not seen[e[1]], "tag " .. e[1] .. " settled twice")
    seen[e[1]] = e[2]
  end
  for tag = 1, src.next_tag do assert(seen[tag], "tag " .. tag .. " never settled") end
  assert.equal(0, src.violations)
  assert.equal(0, src:stats().unacked)
  return seen
end

--- A TCP socket on 127.0.0.1 that listens and never accepts (a broker that
--- never answers: the kernel completes the handshake, nobody speaks);
--- returns its fd and port.  ffi.C.close(fd) when done.
function H.silent_listener()
  local ffi = require "ffi"
  pcall(ffi.cdef, [[
    int socket(int domain, int type, int protocol);
    int listen(int fd, int backlog);
    int close(int fd);
    struct tide_spec_sockaddr_in { uint16_t family; uint16_t port; uint32_t addr; char zero[8]; };
    int bind(int fd, const struct tide_spec_sockaddr_in *a, unsigned len);
    int getsockname(int fd, struct tide_spec_sockaddr_in *a, unsigned *len);
  ]])
  local fd = ffi.C.socket(2, 1, 0)                     -- AF_INET, SOCK_STREAM
  local a = ffi.new("struct tide_spec_sockaddr_in", { family = 2, port = 0, addr = 0x0100007f })
  assert(fd >= 0 and ffi.C.bind(fd, a, 16) == 0 and ffi.C.listen(fd, 8) == 0, "cannot listen")
  local len = ffi.new("unsigned[1]", 16)
  assert(ffi.C.getsockname(fd, a, len) == 0)
  return fd, bit.bor(bit.lshift(bit.band(a.port, 0xff), 8), bit.rshift(a.port, 8))
end

--- Runs a shell command; returns its exit status and output.
function H.sh(cmd)
  local f = io.popen(cmd .. " 2>&1; echo \"__status=$?\"")
  local out = f:read("*a")
  f:close()
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  return status, (out:gsub("__status=%d+%s*$", ""))
end

--- Runs a shell command that must exit 0; returns its output.
function H.sh_ok(cmd)
  local status, out = H.sh(cmd)
  assert(status == 0, cmd .. " failed: " .. out)
  return out
end

--- Runs a shell command; returns its exit status, its stdout and its
--- stderr, kept apart (through the file dir/stderr).
function H.sh_split(cmd, dir)
  local errfile = dir .. "/stderr"
  local f = io.popen(("%s 2>%s; echo \"__status=$?\""):format(cmd, errfile))
  local out = f:read("*a")
  f:close()
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  return status, (out:gsub("__status=%d+%s*$", "")), H.file_bytes(errfile)
end

--- The command line of this build (H.build/tide), for the CLI specs: returns
--- tide(cmd, store, rest), which runs `tide CMD [--store STORE] REST` with
--- TIDE_STORE empty (taken as unset) and returns its exit status, stdout and stderr (through
--- dir/stderr), and tide_json(cmd, store, rest), which runs it with --json,
--- checks that it exits 0 and returns what it printed, decoded.
function H.cli(dir)
  local exe = H.build .. "/tide"
  local function tide(cmd, store, rest)
    return H.sh_split(("TIDE_STORE= %s %s%s %s"):format(exe, cmd, store and " --store " .. store or "", rest or ""), dir)
  end
  local function tide_json(cmd, store, rest)
    local status, out, err = tide(cmd, store, rest .. " --json")
    assert(status == 0, ("exit %s: %s"):format(tostring(status), err))
    return require("cjson").decode(out)
  end
  return tide, tide_json
end

--- Starts `tide web --store STORE` on a free port, its output in
--- dir/web.out; returns { pid, url (with its ?token=), base, token }.
function H.start_web(dir, store)
  local out = dir .. "/web.out"
  local _, pid = H.sh(("%s/tide web --store %s --listen 127.0.0.1:0 > %s 2>&1 & echo $!"):format(H.build, store, out))
  for _ = 1, 200 do
    local url = H.file_bytes(out):match("(http://127%.0%.0%.1:%d+/%?token=%x+)")
    if url then
      return { pid = tonumber(pid), url = url, base = url:match("^(http://[^/]+)"), token = url:match("token=(%x+)") }
    end
    os.execute("sleep 0.05")
  end
  error("tide web did not start: " .. H.file_bytes(out))
end

--- Stops what H.start_web started (nil: nothing): SIGTERM, then SIGKILL
--- when it has not exited within 5 s.
function H.stop_web(w)
  if not w then return end
  H.sh("kill -TERM " .. w.pid)
  for _ = 1, 100 do
    if H.sh("kill -0 " .. w.pid) ~= 0 then return end
    os.execute("sleep 0.05")
  end
  H.sh("kill -KILL " .. w.pid)
end

--- Runs curl (without the sanitizers' preload) with `args`; returns the
--- HTTP status code and the body.
function H.curl(args)
  local _, out = H.sh("env -u LD_PRELOAD curl -s -w '\\n%{http_code}' " .. args)
  local body, code = out:match("^(.*)\n(%d+)$")
  return tonumber(code), body
end

--- Runs a shell command on a thread task, so that the loop goes on meanwhile (a
--- client talking to a server of this process); its output.  Inside a task.
function H.sh_on_thread(cmd)
  local t = require("tide").spawn{ mode = "thread", args = { cmd }, run = function(c)
    local f = io.popen(c)
    local s = f:read("*a")
    f:close()
    return s
  end }
  local status, out = t:await()
  assert(status == "ok", tostring(out))
  return out
end

--- A fresh directory under /tmp (the spec removes it when done).
function H.tempdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir) == 0)
  return dir
end

--- Writes `text` to dir/name; returns the path.
function H.write_file(dir, name, text)
  local path = dir .. "/" .. name
  local fh = assert(io.open(path, "w"))
  fh:write(text)
  fh:close()
  return path
end

--- Runs Lua code in a fresh process (stock luajit, this build's tide.so;
--- spec/fixtures on package.path), for what may take a process down.
--- Returns its exit status and output (stdout and stderr together).
function H.run_lua(dir, name, text, timeout_s, env)
  local path = H.write_file(dir, name, text)
  return H.sh(("cd %s && timeout %d env %s LUA_CPATH='%s/?.so;;' LUA_PATH='spec/fixtures/?.lua;;' luajit %s")
    :format(os.getenv("PWD") or ".", timeout_s or 60, env or "", H.build, path))
end

--- Bytes the C heap holds now (malloc'd and not freed): the sanitizer's
--- count under AddressSanitizer, glibc's mallinfo2 otherwise.
function H.heap_in_use()
  local ffi = require "ffi"
  if not H._heap then
    pcall(ffi.cdef, "size_t __sanitizer_get_current_allocated_bytes(void);")
    pcall(ffi.cdef, "struct tide_mallinfo2 { size_t arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost; };" ..
                    "struct tide_mallinfo2 mallinfo2(void);")
    local asan = pcall(function() return ffi.C.__sanitizer_get_current_allocated_bytes end)
    H._heap = asan and function() return tonumber(ffi.C.__sanitizer_get_current_allocated_bytes()) end
      or function() local m = ffi.C.mallinfo2(); return tonumber(m.uordblks) + tonumber(m.hblkhd) end
  end
  return H._heap()
end

--- This process's minor page faults so far (getrusage).
function H.faults()
  local ffi = require "ffi"
  if not H._rusage then
    pcall(ffi.cdef, "struct tide_spec_rusage { long tv[4]; long maxrss, ixrss, idrss, isrss, minflt, majflt, rest[8]; };" ..
                    "int getrusage(int who, struct tide_spec_rusage *usage);")
    H._rusage = ffi.new("struct tide_spec_rusage")
  end
  assert(ffi.C.getrusage(0, H._rusage) == 0)
  return tonumber(H._rusage.minflt)
end

--- The bytes of a file ("" when it does not exist).
function H.file_bytes(file)
  local f = io.open(file, "rb")
  if not f then return "" end
  local bytes = f:read("*a")
  f:close()
  return bytes
end

local function remove_db(path)
  for _, suffix in ipairs{ "", "-wal", "-shm", "-journal" } do os.remove(path .. suffix) end
end

--- The path of libfaketime (the thread-safe build: tide processes run
--- threads), for LD_PRELOAD, on whatever architecture; nil when the
--- faketime package is not installed.
function H.libfaketime()
  local p = io.popen("ls /usr/lib/*/faketime/libfaketimeMT.so.1 2>/dev/null")
  local path = p:read("*l")
  p:close()
  return path
end

--- A test bed for `tide worker` processes whose wall clocks are set off,
--- on spec/run.sh's PostgreSQL (spec/pg_clock_spec.lua,
--- spec/review_rclock_spec.lua): bed.q (a queue on a fresh store), bed.dir,
--- bed.stamps (the file spec/fixtures/skew_*.lua append their starts to).
--- bed:worker(env, args) starts `env tide worker ... args` on
--- spec/fixtures/skew_targets.lua (env: libfaketime's variables);
--- bed:lines(what) counts the stamps `what`; bed:close() stops the workers
--- and removes what the test made.
function H.skew_bed()
  local tide, ffi = require "tide", require "ffi"
  pcall(ffi.cdef, "int kill(int pid, int sig);")
  local bed = { dir = H.tempdir(), procs = {} }
  bed.stamps = bed.dir .. "/stamps"
  bed.q = tide.queue.open(H.stores()[2].fresh())
  function bed:worker(env, args)
    local log = ("%s/worker-%d.log"):format(self.dir, #self.procs + 1)
    local p = assert(io.popen(("SKEW_STAMPS=%s %s %s/tide worker --store '%s' --quiet --poll 20 %s "
      .. "spec/fixtures/skew_targets.lua > %s 2>&1 & echo $!; exec 2>/dev/null; wait $!")
      :format(self.stamps, env, H.build, os.getenv("TIDE_PG_URL"), args, log)))
    self.procs[#self.procs + 1] = { pipe = p, pid = assert(tonumber(p:read("*l"))), log = log }
  end
  function bed:lines(what)
    local n, f = 0, io.open(self.stamps)
    if f then
      for l in f:lines() do if l == what then n = n + 1 end end
      f:close()
    end
    return n
  end
  function bed:close()
    for _, p in ipairs(self.procs) do
      ffi.C.kill(p.pid, 15)
      p.pipe:close()
    end
    self.q:close()
    H.stores()[2].reset()
    os.execute("rm -rf " .. self.dir)
  end
  return bed
end

--- The job stores under test: SQLite always; PostgreSQL when spec/run.sh
--- started a server (TIDE_PG_URL).  Store specs run once per store:
--- fresh(path) returns the URL of an empty store, reset(path) removes what
--- a test made.
function H.stores()
  local list = {
    { name = "sqlite",
      fresh = function(path) remove_db(path); return "sqlite:" .. path end,
      reset = function(path) remove_db(path) end },
  }
  local pg = os.getenv("TIDE_PG_URL")
  if pg then
    local function reset()
      local c = require("tide.jobs.store.postgres").connect(pg)
      c:query("DROP TABLE IF EXISTS tide_jobs, tide_schema, tide_queues, tide_schedules, orders, tide_flow_runs, tide_flow_steps, tide_flow_items CASCADE")
      c:query("DROP FUNCTION IF EXISTS tide_jobs_notify(), tide_jobs_notify_inserted() CASCADE")
      c:close()
    end
    list[2] = { name = "postgres", fresh = function() reset(); return pg end, reset = reset }
  end
  return list
end

--- The result of one statement run in its own transaction of queue q (a
--- store spec's look at the rows behind the API).
function H.sql(q, stmt, ...)
  local n, args = select("#", ...), { ... }
  return q:transaction(function(tx) return tx:query(stmt, unpack(args, 1, n)) end)
end

--- Compares two values exactly: numbers bit for bit (-0 is not 0), arrays
--- must stay arrays (tide.jobs.json's array_mt on `b`, an empty one too).
--- Returns true, or false and the path where they differ.
local function exact(a, b, path)
  local J = require "tide.jobs.json"
  path = path or "value"
  if type(a) ~= type(b) then return false, ("%s: %s against %s"):format(path, type(a), type(b)) end
  if type(a) == "number" then
    if a ~= a and b ~= b then return true end
    if a ~= b or (a == 0 and 1 / a ~= 1 / b) then
      return false, ("%s: %.17g against %.17g"):format(path, a, b)
    end
    return true
  end
  if type(a) ~= "table" or a == J.null or b == J.null then
    if a ~= b then return false, ("%s: %s against %s"):format(path, tostring(a), tostring(b)) end
    return true
  end
  local a_array = getmetatable(a) == J.array_mt or (next(a) ~= nil and #a > 0)
  local b_array = getmetatable(b) == J.array_mt
  if a_array ~= b_array then return false, path .. ": array against object (or the other way)" end
  for k, v in pairs(a) do
    local ok, why = exact(v, b[k], path .. "." .. tostring(k))
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": extra key" end
  end
  return true
end
H.exact = exact

--- The first n ticks of cron expression `expr` after the ISO time `from`
--- (in `zone`, default UTC), as ISO strings.
function H.cron_ticks(expr, from, n, zone)
  local cron, time = require "tide.jobs.cron", require "tide.jobs.time"
  local c = cron.parse(expr, zone)
  local t, out = time.parse_iso(from), {}
  for i = 1, n do t = c:next(t); out[i] = time.iso(t) end
  return out
end

return H
