-- spec/review_r1_spec.lua — review r1: embedding (stock luajit, a C host through tide.h,
-- two Lua states in one process, tide loaded twice) and thread mode.  Each case runs in a
-- process of its own: they load tide again, make Lua states, or drive the loop by hand.
local H = spec_helper

-- The start of a script that loads a second copy of tide's engine: clear()
-- drops tide's modules (but tide.core) from package.loaded.
local SECOND_COPY = [[
  local function clear()
    for k in pairs(package.loaded) do
      if k:match("^tide") and k ~= "tide.core" then package.loaded[k] = nil end
    end
  end
]]

local dir
setup(function() dir = H.tempdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

-- A second Lua state of this process, through LuaJIT's C API (the luajit binary exports it).
local SECOND_STATE = [==[
  local ffi = require "ffi"
  ffi.cdef[[
    typedef struct lua_State lua_State;
    lua_State *luaL_newstate(void);
    void luaL_openlibs(lua_State *L);
    int luaL_loadstring(lua_State *L, const char *s);
    int lua_pcall(lua_State *L, int nargs, int nresults, int errfunc);
    const char *lua_tolstring(lua_State *L, int idx, size_t *len);
    void lua_settop(lua_State *L, int idx);
    void lua_close(lua_State *L);
    int tide_open(lua_State *L, void *loop);
    int tide_close(lua_State *L);
    int tide_run(lua_State *L);
    int tide_step(lua_State *L);
    int tide_spawn_file(lua_State *L, const char *path, int argc, char **argv);
  ]]
  local C = ffi.C
  local function new_state()
    local L = C.luaL_newstate()
    C.luaL_openlibs(L)
    return L
  end
  local function top_string(L)
    local s = C.lua_tolstring(L, -1, nil)
    return s ~= nil and ffi.string(s) or nil
  end
  local function run_in(L, src)
    assert(C.luaL_loadstring(L, src) == 0, "cannot load the chunk")
    if C.lua_pcall(L, 0, 0, 0) ~= 0 then error(top_string(L), 0) end
  end
]==]

describe("review r1: embedding", function()
  -- tide.core's virtual clock (tide.testing) was one static of the process: a second Lua
  -- state that turned it on froze tide.now() in the first, whose sleeping tasks then never
  -- woke and were reaped as stalled.  The clock is now each loop's own.
  it("keeps the virtual clock of one Lua state out of another's", function()
    local status, out = H.run_lua(dir, "two_states.lua", SECOND_STATE .. [[
      local tide = require "tide"
      local L2 = new_state()
      run_in(L2, "package.cpath = " .. ("%q"):format(package.cpath) .. [=[
        local tide = require "tide"
        require("tide.core").clock_virtual(true)   -- this state's clock stands still now
        local t0 = tide.now()
        local x = 0
        for i = 1, 2e7 do x = x + i end
        assert(tide.now() == t0, "the second state's virtual clock moved")
      ]=])
      local t0 = tide.now()
      local x = 0
      for i = 1, 2e7 do x = x + i end
      print("moves", tide.now() > t0)
      print(tide.run(function() tide.sleep(20) return "woke" end))
      C.lua_close(L2)
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("moves\ttrue\nok\twoke\n", out)
  end)

  -- tide_step (tide.engine.host.step) asked "is work left?" of tide's own loop handles only
  -- (its timer and idle): thread tasks in flight keep only the pool's async handle alive,
  -- so the first step after their submission found "no work", reaped them as stalled
  -- ("cancelled") while their threads still ran them, and the real results were dropped.
  it("tide_step leaves thread tasks in flight alone and delivers their results", function()
    local status, out = H.run_lua(dir, "step_threads.lua", [[
      local tide = require "tide"
      tide.configure{ threads = 2 }
      local host = require "tide.engine.host"
      local got = {}
      for i = 1, 3 do
        tide.spawn{ mode = "thread", args = { i }, run = function(i) require("tide").sleep(50) return i end,
                    handle_result = function(s, v) got[#got + 1] = s .. ":" .. tostring(v) end }
      end
      local steps = 0
      while host.step() == 1 do steps = steps + 1 end
      table.sort(got)
      print(table.concat(got, " "))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("ok:1 ok:2 ok:3\n", out)
  end)

  -- A second copy of tide's engine (package.loaded cleared of tide's modules, tide required
  -- again) takes the loop over, but the thread pool kept delivering to the first copy's
  -- on_done: every thread task of the second copy lost its result (it timed out, or was
  -- reaped as stalled).  And a first copy with thread tasks in flight could be retired:
  -- their results would then go to the second copy, which does not know them.
  it("gives a second copy of tide the thread pool's deliveries, and refuses it while the first has thread tasks in flight", function()
    local status, out = H.run_lua(dir, "twice_threads.lua", SECOND_COPY .. [[
      local tide1 = require "tide"
      tide1.configure{ threads = 2 }
      print(tide1.run(function()
        local t = tide1.spawn{ mode = "thread", run = function() require("tide").sleep(100) return 1 end }
        tide1.sleep(10)
        clear()
        print(pcall(require, "tide"))
        return t:await()
      end))
      clear()
      local tide2 = require "tide"
      assert(tide2 ~= tide1, "not a second copy: this case attacks nothing")
      print(tide2.run(function()
        return tide2.spawn{ mode = "thread", timeout = 5000, run = function() return 2 end }:await()
      end))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("false\ttide: a second copy of tide's engine was loaded (package.loaded cleared and tide "
      .. "required again) while the first has 1 thread task(s) in flight; keep one copy\n"
      .. "ok\tok\t1\nok\tok\t2\n", out)
  end)

  -- The same with a process task in flight: the second copy took the process events over,
  -- and the first copy's task never got its result (it was reaped as stalled).
  it("refuses a second copy of tide while the first has process tasks in flight", function()
    local status, out = H.run_lua(dir, "twice_processes.lua", SECOND_COPY .. [[
      local tide1 = require "tide"
      tide1.configure{ processes = 1 }
      print(tide1.run(function()
        local t = tide1.spawn{ mode = "process", run = function() require("tide").sleep(100) return 1 end }
        tide1.sleep(10)
        clear()
        print(pcall(require, "tide"))
        return t:await()
      end))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("false\ttide: a second copy of tide's engine was loaded (package.loaded cleared and tide "
      .. "required again) while the first has 1 process task(s) in flight; keep one copy\n"
      .. "ok\tok\t1\n", out)
  end)

  -- And with tasks live that wait for no timer (here two that await each other): the second
  -- copy's tick replaced the first's, so a task of the first copy woken in a later tick (b,
  -- once a is cancelled) sat in a run queue nobody ran, and was reaped as stalled.
  it("refuses a second copy of tide while the first has tasks live", function()
    local status, out = H.run_lua(dir, "twice_live.lua", SECOND_COPY .. [[
      local tide1 = require "tide"
      print(tide1.run(function()
        local a, b
        a = tide1.spawn(function() return b:await() end)
        b = tide1.spawn(function() a:await() return "b" end)
        tide1.sleep(0)
        clear()
        local ok, tide2 = pcall(require, "tide")
        print(ok, ok and "loaded" or tide2)
        local later = ok and tide2.after or tide1.after   -- a wake in a later tick
        later(5, function() a:cancel("unblocked") end)
        return b:await()
      end))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("false\ttide: a second copy of tide's engine was loaded (package.loaded cleared and tide "
      .. "required again) while the first has 3 task(s) live; keep one copy\n"
      .. "ok\tok\tb\n", out)
  end)

  -- With every tide module cleared from package.loaded, tide.core included, require "tide"
  -- failed with "module 'tide.core' not found" (tide.core is made by tide_open, never
  -- preloaded).  It now gives the loaded loop to a second copy, as when tide.core stays.
  it("loads tide again after package.loaded was cleared of tide.core too", function()
    local status, out = H.run_lua(dir, "twice_all.lua", [[
      local tide1 = require "tide"
      local core1 = require "tide.core"
      for k in pairs(package.loaded) do if k:match("^tide") then package.loaded[k] = nil end end
      local tide2 = require "tide"
      print(tide2 ~= tide1, require("tide.core") == core1)
      print(tide2.run(function() tide2.sleep(5) return "ran" end))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("true\ttrue\nok\tran\n", out)
  end)

  -- The C API in the wrong order: before tide_open, tide_run/tide_step/tide_spawn_file
  -- answered "module 'tide.engine.host' not found" and a list of paths; tide_open on a
  -- second loop returned 0 and left tide on the first (the host's loop never ran tide's
  -- work); tide_open after tide_close returned 0 and gave a tide whose every call raised
  -- "the loop is closed".  Each now fails (-1) with a message that says what was wrong.
  it("refuses the C API's calls made in the wrong order, with a message that says so", function()
    local status, out = H.run_lua(dir, "api_order.lua", SECOND_STATE .. [[
      local uv = ffi.load("uv")
      ffi.cdef[=[
        typedef struct uv_loop_s uv_loop_t;
        size_t uv_loop_size(void);
        int uv_loop_init(uv_loop_t *loop);
        int uv_loop_close(uv_loop_t *loop);
      ]=]
      local tide_so = package.searchpath("tide", package.cpath)
      local T = ffi.load(tide_so)
      local function say(what, rc, L)
        print(what, rc, rc ~= 0 and top_string(L) or "")
        C.lua_settop(L, 0)
      end
      local L = new_state()
      run_in(L, "package.cpath = " .. ("%q"):format(package.cpath))
      say("run", T.tide_run(L), L)
      say("step", T.tide_step(L), L)
      say("spawn_file", T.tide_spawn_file(L, "x.lua", 0, nil), L)
      say("close", T.tide_close(L), L)
      say("open", T.tide_open(L, nil), L)
      say("spawn_file NULL", T.tide_spawn_file(L, nil, 0, nil), L)
      say("spawn_file argc -1", T.tide_spawn_file(L, "x.lua", -1, nil), L)
      local argv = ffi.new("char *[2]")           -- (zero-filled: argv[1] stays NULL)
      local arg0 = "a"
      argv[0] = ffi.cast("char *", arg0)
      say("spawn_file argv[1] NULL", T.tide_spawn_file(L, "x.lua", 2, argv), L)
      say("open again", T.tide_open(L, nil), L)
      local other = ffi.cast("uv_loop_t *", ffi.new("char[?]", uv.uv_loop_size()))
      local keep = other
      assert(uv.uv_loop_init(other) == 0)
      say("open other loop", T.tide_open(L, other), L)
      say("close", T.tide_close(L), L)
      say("open after close", T.tide_open(L, nil), L)
      C.lua_close(L)
      assert(uv.uv_loop_close(keep) == 0)
    ]], 30)
    assert.equal(0, status, out)
    local before = "tide: tide_open was not called on this Lua state"
    assert.equal(table.concat({
      "run\t-1\t" .. before,
      "step\t-1\t" .. before,
      "spawn_file\t-1\t" .. before,
      "close\t0\t",
      "open\t0\t",
      "spawn_file NULL\t-1\ttide_spawn_file: bad argument 'path' (a file name expected, got NULL)",
      "spawn_file argc -1\t-1\ttide_spawn_file: bad arguments 'argc', 'argv' (argc >= 0 strings in argv expected)",
      "spawn_file argv[1] NULL\t-1\ttide_spawn_file: bad argument 'argv' (a string expected at argv[1], got NULL)",
      "open again\t0\t",
      "open other loop\t-1\ttide_open: tide is already open on another loop in this Lua state",
      "close\t0\t",
      "open after close\t-1\ttide_open: tide was closed in this Lua state (tide_close); "
        .. "it cannot be opened again in it",
      "" }, "\n"), out)
  end)

  -- tide_close with tasks still live (asleep, waiting on a thread, runnable) closed the loop
  -- under them: none of them ever got an outcome, and their handle_result never ran.  They
  -- are now cancelled first ("tide was closed"), each outcome delivered once, and so is a
  -- task a handle_result spawns meanwhile.
  it("tide_close delivers an outcome to every task still live", function()
    local status, out = H.run_lua(dir, "close_live.lua", SECOND_STATE .. [[
      local T = ffi.load(package.searchpath("tide", package.cpath))
      local L = new_state()
      run_in(L, "package.cpath = " .. ("%q"):format(package.cpath) .. [=[
        local tide = require "tide"
        tide.configure{ threads = 1 }
        got = {}
        local function hr(tag) return function(s, v) got[#got + 1] = tag .. " " .. s .. ": " .. tostring(v) end end
        tide.spawn{ run = function() tide.sleep(100000) end, handle_result = hr("sleeper") }
        tide.spawn{ mode = "thread", run = function() require("tide").sleep(300) return 1 end, handle_result = hr("thread") }
        tide.spawn{ run = function() tide.sleep(100000) end, handle_result = function(s, v)
          hr("spawner")(s, v)
          tide.spawn{ run = function() end, handle_result = hr("spawned") }
        end }
      ]=])
      assert(T.tide_step(L) == 1)
      run_in(L, "local tide = require 'tide' tide.spawn{ run = function() end, handle_result = function(s, v) got[#got + 1] = 'runnable ' .. s .. ': ' .. tostring(v) end }")
      print("close", T.tide_close(L))
      run_in(L, "table.sort(got) print(table.concat(got, '\\n'))")
      C.lua_close(L)
    ]], 30)
    assert.equal(0, status, out)
    assert.equal(table.concat({
      "close\t0",
      "runnable cancelled: tide was closed (tide_close)",
      "sleeper cancelled: tide was closed (tide_close)",
      "spawned cancelled: tide was closed (tide_close)",
      "spawner cancelled: tide was closed (tide_close)",
      "thread cancelled: tide was closed (tide_close)",
      "" }, "\n"), out)
  end)

  -- lua_close without tide_close, tasks still live: none got an outcome either.  The loop's
  -- userdata is collected only by lua_close (the registry anchors it): its __gc cancels them
  -- first ("tide was closed (lua_close)").  The thread pool's __gc may have run before it:
  -- cancelling a thread task then raised "the thread pool is not running" in its hook.
  it("lua_close delivers an outcome to every task still live", function()
    local status, out = H.run_lua(dir, "lua_close_live.lua", SECOND_STATE .. [[
      local T = ffi.load(package.searchpath("tide", package.cpath))
      local L = new_state()
      run_in(L, "package.cpath = " .. ("%q"):format(package.cpath) .. [=[
        local tide = require "tide"
        tide.configure{ threads = 1 }
        local function hr(tag) return function(s, v) print(tag .. " " .. s .. ": " .. tostring(v)) end end
        tide.spawn{ run = function() tide.sleep(100000) end, handle_result = hr("sleeper") }
        tide.spawn{ mode = "thread", run = function() require("tide").sleep(300) return 1 end, handle_result = hr("thread") }
      ]=])
      assert(T.tide_step(L) == 1)
      C.lua_close(L)
      print("closed")
    ]], 30)
    assert.equal(0, status, out)
    assert.equal(table.concat({
      "sleeper cancelled: tide was closed (lua_close)",
      "thread cancelled: tide was closed (lua_close)",
      "closed",
      "" }, "\n"), out)
  end)
end)

describe("review r1: a host that closes every handle on its loop", function()
  -- A common shutdown idiom: uv_walk(loop, close every handle), run the loop, then close the
  -- rest.  tide's handles (its timer, idle, signals, the thread pool's async) went with them,
  -- and tide_run, tide_close or lua_close after it aborted the process on libuv's assertion
  -- "!uv__is_closing(handle)" (uv_close, uv_signal_start of a closed handle).  tide now
  -- closes only what is still open (the memory of what the host closed is kept: its close
  -- callback was the host's), and tide_run says what happened.
  it("survives tide_run, tide_close and lua_close after the host closed tide's handles", function()
    for _, how in ipairs{ "tide_run", "tide_close", "lua_close" } do
      local status, out = H.run_lua(dir, "walk.lua", SECOND_STATE .. [[
        local how = os.getenv("HOW")
        local uv = ffi.load("uv")
        ffi.cdef[=[
          typedef struct uv_loop_s uv_loop_t;
          typedef struct uv_handle_s uv_handle_t;
          typedef void (*uv_walk_cb)(uv_handle_t *h, void *arg);
          typedef void (*uv_close_cb)(uv_handle_t *h);
          size_t uv_loop_size(void);
          int uv_loop_init(uv_loop_t *loop);
          int uv_loop_close(uv_loop_t *loop);
          int uv_run(uv_loop_t *loop, int mode);
          void uv_walk(uv_loop_t *loop, uv_walk_cb cb, void *arg);
          void uv_close(uv_handle_t *h, uv_close_cb cb);
          int uv_is_closing(const uv_handle_t *h);
        ]=]
        local T = ffi.load(package.searchpath("tide", package.cpath))
        local mem = ffi.new("char[?]", uv.uv_loop_size())
        local loop = ffi.cast("uv_loop_t *", mem)
        assert(uv.uv_loop_init(loop) == 0)
        local L = new_state()
        run_in(L, "package.cpath = " .. ("%q"):format(package.cpath))
        assert(T.tide_open(L, loop) == 0)
        C.lua_settop(L, 0)
        run_in(L, [=[
          local tide = require "tide"
          tide.configure{ threads = 1 }
          local function hr(tag) return function(s, v) print(tag, s, v) end end
          tide.spawn{ run = function() tide.sleep(100000) end, handle_result = hr("sleeper") }
          tide.spawn{ mode = "thread", run = function() require("tide").sleep(50) return 1 end, handle_result = hr("thread") }
        ]=])
        uv.uv_run(loop, 2)                                     -- UV_RUN_NOWAIT
        local close_all = ffi.cast("uv_walk_cb", function(h)
          if uv.uv_is_closing(h) == 0 then uv.uv_close(h, nil) end
        end)
        uv.uv_walk(loop, close_all, nil)
        uv.uv_run(loop, 0)                                     -- the close callbacks
        if how == "tide_run" then
          print("tide_run", T.tide_run(L), top_string(L))
          C.lua_settop(L, 0)
        elseif how == "tide_close" then
          print("tide_close", T.tide_close(L))
        end
        C.lua_close(L)
        uv.uv_run(loop, 0)
        print("loop_close", uv.uv_loop_close(loop))
      ]], 30, "HOW=" .. how)
      assert.equal(0, status, how .. ": " .. out)
      if how == "tide_run" then
        assert.matches("tide_run\t%-1\t[^\n]*tide: the host closed tide's handles on its loop "
          .. "%(close tide with tide_close before the loop's other handles%)\n", out)
      elseif how == "tide_close" then
        assert.matches("tide_close\t0\n", out)
      end
      assert.matches("sleeper\tcancelled\ttide was closed %(" .. (how == "tide_close" and "tide_close" or "lua_close")
        .. "%)\n", out)
      assert.matches("loop_close\t0\n$", out)
    end
  end)
end)

describe("review r1: thread mode", function()
  -- A script run twice in one Lua state (a host that runs it again, or two tide.run in a row)
  -- that configures its thread pool failed the second time at its first line: once the pool
  -- ran, tide.configure refused threads, thread_init and thread_memory even when given the
  -- values the pool already runs with.  Only a change is refused now.
  it("takes the thread pool's own settings again once it runs, and refuses a change", function()
    local status, out = H.run_lua(dir, "configure_again.lua", [[
      local tide = require "tide"
      for round = 1, 2 do
        tide.configure{ threads = 2, thread_memory = 64 }
        print(round, tide.run(function() return tide.spawn{ mode = "thread", run = function() return 7 end }:await() end))
      end
      print(pcall(tide.configure, { threads = 3 }))
      print(pcall(tide.configure, { thread_memory = 32 }))
      print(pcall(tide.configure, { thread_init = "thread_init" }))
    ]], 30)
    assert.equal(0, status, out)
    local refused = "false\ttide.configure: threads, thread_init and thread_memory must be set before the first thread task\n"
    assert.equal("1\tok\tok\t7\n2\tok\tok\t7\n" .. refused .. refused .. refused, out)
  end)

  -- os.exit called by a thread task ended the whole process (the loop, every other task,
  -- with the thread's status): "nothing a thread task does takes the process down".  On a
  -- worker thread it now raises, and the task ends with an error outcome.
  it("gives a thread task that calls os.exit an error outcome, and the process goes on", function()
    local status, out = H.run_lua(dir, "thread_exit.lua", [[
      local tide = require "tide"
      tide.configure{ threads = 1 }
      print(tide.run(function()
        local other = tide.spawn(function() tide.sleep(20) return "other" end)
        local s, v = tide.spawn{ mode = "thread", run = function() os.exit(3) end }:await()
        print(s, (tostring(v):gsub("^[^:]*:%d+: ", "")))
        print(tide.spawn{ mode = "thread", run = function() return "next" end }:await())
        return other:await()
      end))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("error\tos.exit cannot be called in a thread task: it would end the whole process "
      .. "(return, or raise an error, instead)\nok\tnext\nok\tok\tother\n", out)
  end)

  -- Bad input that got no clear error: thread_init = "" (and process_init) was taken, and
  -- every thread task then failed with "thread_init '' failed: module '' not found" and a
  -- list of paths; run = "a..b" was taken as a "module.function" name; args.n = 1e9 (or an
  -- args table whose largest index is that) raised "task.lua:76: too many results to
  -- unpack", naming neither the function nor the option.
  it("refuses an empty init module, a run name with an empty part, and more arguments than a call can take", function()
    local tide = require "tide"
    H.error_cases("spec/review_r1_spec.lua", {
      { function() tide.configure{ thread_init = "" } end,
        "tide.configure: bad option 'thread_init' (module name expected, got string \"\")" },
      { function() tide.configure{ process_init = "" } end,
        "tide.configure: bad option 'process_init' (module name expected, got string \"\")" },
      { function() tide.spawn{ mode = "thread", run = "a..b" } end,
        "tide.spawn: bad option 'run' (\"module.function\" expected, got string \"a..b\")" },
      { function() tide.spawn{ run = print, args = { n = 1e9 } } end,
        "tide.spawn: bad option 'args.n' (at most 7000 expected, got number 1000000000)" },
      { function() tide.spawn{ mode = "thread", run = "a.b", args = { [1e6] = 1 } } end,
        "tide.spawn: bad option 'args' (at most 7000 arguments expected, got 1000000)" },
    })
  end)

  -- A thread task runs no code on the loop ("direct": its job is submitted, later settled,
  -- from the run queue), but the scheduler left it as the current task after it: once the
  -- loop stopped, code outside any task (the main chunk after tide.run, a C host between
  -- steps) had tide.current() give that ended task, t:await() say "a task cannot await
  -- itself" and tide.sleep "task 2 has ended (ok); its code stops here".
  it("leaves no thread task current once its job is submitted or settled", function()
    local status, out = H.run_lua(dir, "current_after.lua", [[
      local tide = require "tide"
      tide.configure{ threads = 1 }
      local t
      print(tide.run(function() t = tide.spawn{ mode = "thread", run = function() return 1 end } return "root" end))
      print("current", tide.current())
      print(pcall(t.await, t))
      print(pcall(tide.sleep, 1))
    ]], 30)
    assert.equal(0, status, out)
    assert.equal("ok\troot\ncurrent\tnil\n"
      .. "false\ttask:await: called outside a task (start one with tide.run or tide.spawn)\n"
      .. "false\ttide.sleep: called outside a task (start one with tide.run or tide.spawn)\n", out)
  end)
end)
