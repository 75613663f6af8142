--- tide.engine.log — the one error sink for failures in user callbacks.
--
-- An error in `handle_result`, an `on_retry` hook or a timer callback never
-- reaches the loop or other tasks: it comes here, is counted, and goes to the
-- sink, which prints to stderr unless `tide.configure{ on_error = fn }` set
-- another one.  A sink that itself fails is reported on stderr, once per
-- failure, and counted too.
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

--- Reports a failure: `where` says what failed ("handle_result of task 7").
function M.report(where, err, tb)
  M.errors = M.errors + 1
  local ok, sink_err = xpcall(M.sink, handler, where, err, tb)
  if not ok then
    M.errors = M.errors + 1
    io_stderr:write("tide: the error sink failed: ", tostring(sink_err), "\n")
  end
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

return M
