--- tide.engine.config — process-wide settings (tide.configure) and their one home.
--
-- Read by the engine's host (grace, signals) and by anything that stops
-- gracefully (the job worker's default grace); written only by configure.
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local thread = require "tide.engine.thread"
local process = require "tide.engine.process"
local watchdog = require "tide.engine.watchdog"
local core = require "tide.core"

local type = type
local opt_error, is_ms = check.opt_error, check.is_ms

local M = {
  grace = 5000,      -- ms running tasks get after SIGINT/SIGTERM or tide.shutdown()
  signals = true,    -- tide.run and the tide binary watch SIGINT/SIGTERM
}

local KEYS = check.options("tide.configure", {
  grace = true, on_error = true, signals = true, threads = true, thread_init = true,
  thread_memory = true, thread_stop_wait = true, watchdog = true, processes = true,
  process_init = true, process_memory = true, process_stop_wait = true, process_prefetch = true,
  alloc_cache = true, alloc_cache_small = true,
})

--- tide.configure{ grace =, on_error =, signals =, threads =, thread_init =,
--- thread_memory =, thread_stop_wait =, processes =, process_init =,
--- process_memory =, process_stop_wait =, process_prefetch =, watchdog =, alloc_cache =,
--- alloc_cache_small = }:
--- everything is checked before anything is applied (watchdog: ms one call
--- may hold the loop before it is reported, 0 turns it off;
--- tide.engine.watchdog; alloc_cache: the most bytes of freed blocks kept
--- for reuse, 0 gives them back and keeps none; alloc_cache_small: of
--- those, the most in blocks of up to 512 bytes, 0 by default:
--- src/alloc_cache.h).
function M.configure(opts)
  local fname = "tide.configure"
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  if opts.grace ~= nil and not is_ms(opts.grace) then
    opt_error(fname, "grace", "non-negative number of ms", opts.grace)
  end
  if opts.on_error ~= nil and type(opts.on_error) ~= "function" then
    opt_error(fname, "on_error", "function", opts.on_error)
  end
  if opts.signals ~= nil and type(opts.signals) ~= "boolean" then
    opt_error(fname, "signals", "boolean", opts.signals)
  end
  if opts.alloc_cache ~= nil and not check.is_count(opts.alloc_cache) then
    opt_error(fname, "alloc_cache", "non-negative integer (bytes)", opts.alloc_cache)
  end
  if opts.alloc_cache_small ~= nil and not check.is_count(opts.alloc_cache_small) then
    opt_error(fname, "alloc_cache_small", "non-negative integer (bytes)", opts.alloc_cache_small)
  end
  watchdog.check(fname, opts, 2)
  thread.configure(fname, opts, 2)
  process.configure(fname, opts, 2)
  watchdog.apply(opts)
  if opts.alloc_cache ~= nil or opts.alloc_cache_small ~= nil then
    core.alloc_cache(opts.alloc_cache, opts.alloc_cache_small)
  end
  if opts.grace ~= nil then M.grace = opts.grace end
  if opts.signals ~= nil then M.signals = opts.signals end
  if opts.on_error ~= nil then log.set_sink(opts.on_error) end
end

return M
