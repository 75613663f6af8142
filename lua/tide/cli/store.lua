--- tide.cli.store — which job store a command uses, and opening it.
local options = require "tide.cli.options"
local queue = require "tide.jobs.queue"

local tostring, pcall, getenv = tostring, pcall, os.getenv

local M = {}

M.DEFAULT = "sqlite:tide.db"

--- The store URL: --store, else $TIDE_STORE, else sqlite:tide.db; or nil and a message.
function M.url(opts)
  if opts.store then return opts.store end
  local env = getenv("TIDE_STORE")
  if env == nil or env == "" then return M.DEFAULT end
  if not options.is_store_url(env) then
    return nil, ("bad $TIDE_STORE (%s expected, got '%s')"):format(options.STORE_URL, env)
  end
  return env
end

--- The file of a sqlite: URL (nil for other stores and in-memory databases).
local function sqlite_file(url)
  local path = url:match("^[sS][qQ][lL][iI][tT][eE]:(.*)$")
  if not path then return nil end
  path = path:gsub("^//", "")
  if path == "" or path == ":memory:" or path:match("^file:") then return nil end
  return path
end

--- True for a SQLite store that lives in memory (gone when the command ends).
local function in_memory(url)
  local path = url:match("^[sS][qQ][lL][iI][tT][eE]:(.*)$")
  if not path then return false end
  path = path:gsub("^//", "")
  return path == ":memory:" or path:match("^file::memory:") ~= nil or path:match("[?&]mode=memory") ~= nil
end
M.in_memory = in_memory

--- Opens the store; with `must_exist`, a missing SQLite file is an error
--- (reading commands do not create an empty store by mistake).  Returns the
--- queue, or nil and the exit status (the message is written).
function M.open(prog, url, must_exist)
  if in_memory(url) then
    return nil, options.usage_error(prog, ("%s is an in-memory store: it would be gone when this command "
      .. "ends, before anyone could read it (give a file: sqlite:PATH)"):format(url), "")
  end
  local path = must_exist and sqlite_file(url)
  if path then
    local fh = io.open(path, "rb")
    if not fh then return nil, options.fail(prog, ("%s: no such file (check --store or $TIDE_STORE)"):format(url)) end
    fh:close()
  end
  local ok, q = pcall(queue.open, url)
  if not ok then return nil, options.fail(prog, (tostring(q):gsub("^tide%.queue%.open: ", ""))) end
  return q
end

--- Runs a reading command: opens the store that `opts` name (it must
--- exist), calls fn(q, ...) and closes it.  Returns fn's exit status; a
--- bad URL is a usage error, and an error raised by fn is written as the
--- command's failure (exit 1).
function M.with(prog, opts, usage, fn, ...)
  local url, uerr = M.url(opts)
  if not url then return options.usage_error(prog, uerr, usage) end
  local q, status = M.open(prog, url, true)
  if not q then return status end
  local done, code = pcall(fn, q, ...)
  q:close()
  if not done then return options.fail(prog, code) end
  return code
end

return M
