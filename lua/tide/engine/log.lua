--- tide.engine.log — the one error sink for failures in user callbacks.
--
-- An error in `handle_result`, an `on_retry` hook or a timer callback never
-- reaches the loop or other tasks: it comes here, is counted, and goes to the
-- sink, which prints to stderr unless `tide.configure{ on_error = fn }` set
-- another one.  So do errors the C core catches in its calls into Lua, and
-- the watchdog's reports of a stalled loop.  A sink that itself fails is reported on stderr, once per
-- failure, and counted too.
local core = require "tide.core"

local io_stderr, xpcall, tostring, traceback = io.stderr, xpcall, tostring, debug.traceback

local M = { errors = 0 }

local function default_sink(where, err, tb)
  io_stderr:write(("tide: error in %s: %s\n"):format(where, tb or tostring(err)))
end
M.sink = default_sink
M.default_sink = default_sink

local function handler(e)
  return traceback(tostring(e), 2)
end

local function deliver(where, err, tb)
  local ok, sink_err = xpcall(M.sink, handler, where, err, tb)
  if not ok then
    M.errors = M.errors + 1
    io_stderr:write("tide: the error sink failed: ", tostring(sink_err), "\n")
  end
end

--- Reports a failure: `where` says what failed ("handle_result of task 7").
function M.report(where, err, tb)
  M.errors = M.errors + 1
  deliver(where, err, tb)
end

--- Tells the sink of something wrong that is not a failure (the watchdog's
--- stalls): the same path, not counted in `errors`.
function M.warn(where, msg, tb)
  deliver(where, msg, tb)
end

--- Calls fn(...) protected; a failure is reported as from `where`.
--- Returns true when fn returned normally.
function M.protect(where, fn, ...)
  local ok, err = xpcall(fn, handler, ...)
  if not ok then M.report(where, err, err) end
  return ok
end

function M.set_sink(fn)
  M.sink = fn or default_sink
end

-- The C core reports here what fails in its calls into Lua (the loop's
-- tick, thread deliveries, PostgreSQL callbacks): src/lua_call.c.
core.set_reporter(M.report)

return M
