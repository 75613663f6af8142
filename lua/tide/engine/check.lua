--- tide.engine.check — argument and option checks with fixed message shapes.
--
-- Every public function fails the same way:
--   `tide.spawn: bad argument #1 (function or table expected, got nil)`
--   `tide.spawn: bad option 'timeout' (positive number of ms expected, got -1)`
--   `tide.spawn: unknown option 'timout'`
-- Errors are raised at `level` (default: the caller of the public function),
-- so the message starts with the user's file and line.
local type, tostring, tonumber, error, pairs, math_huge = type, tostring, tonumber, error, pairs, math.huge
local sort, concat = table.sort, table.concat

local M = {}

local function describe(v)
  local tv = type(v)
  if tv == "number" then
    if v ~= v then return "nan" end
    if v == math_huge or v == -math_huge then return tostring(v) end
    return "number " .. tostring(v)
  elseif tv == "string" then
    return ("string %q"):format(#v > 40 and v:sub(1, 40) .. "..." or v)
  end
  return tv
end
M.describe = describe

--- Raises `fname: bad argument #n (expected, got ...)`.
function M.arg_error(fname, n, expected, v, level)
  error(("%s: bad argument #%d (%s expected, got %s)"):format(fname, n, expected, describe(v)),
        (level or 2) + 1)
end

--- Raises `fname: bad option 'key' (expected, got ...)`.
function M.opt_error(fname, key, expected, v, level)
  error(("%s: bad option '%s' (%s expected, got %s)"):format(fname, key, expected, describe(v)),
        (level or 2) + 1)
end

local function finite(v)
  return type(v) == "number" and v == v and v ~= math_huge and v ~= -math_huge
end
M.finite = finite

--- A duration in ms: finite and >= 0 (> 0 when `positive`).
function M.is_ms(v, positive)
  return finite(v) and (v > 0 or (not positive and v == 0))
end

local UNITS = { ms = 1, s = 1000, m = 60000, h = 3600000, d = 86400000 }

--- A duration: a number of ms, or a string like "500ms", "30s", "15m",
--- "2h", "7d" (or a bare number of ms) -> ms; nil when it is none of these.
function M.duration(v)
  if type(v) == "number" then return M.is_ms(v) and v or nil end
  if type(v) ~= "string" then return nil end
  local n, unit = v:match("^(%d+%.?%d*)(%a*)$")
  if not n then return nil end
  local scale = unit == "" and 1 or UNITS[unit]
  local ms = scale and tonumber(n) * scale
  return ms and M.finite(ms) and ms or nil
end

function M.is_count(v, min)
  return finite(v) and v >= (min or 0) and v % 1 == 0
end

local next = next

--- Reports the first unknown key of `opts`, in sorted order for stable messages.
local function unknown_option(fname, opts, allowed, prefix, level)
  local unknown
  for k in pairs(opts) do
    if not allowed[k] then
      local ks = tostring(k)
      if unknown == nil or ks < unknown then unknown = ks end
    end
  end
  error(("%s: unknown option '%s%s'"):format(fname, prefix or "", unknown), level + 1)
end

--- True when every key of `opts` is in `allowed`.  The first six keys are
--- checked without a loop: a loop here, compiled as a trace of its own,
--- stopped LuaJIT from compiling any loop that spawns tasks with an option
--- table ("inner loop in root trace"), and tide.spawn{...} ran in the
--- interpreter (-jv; callgrind: bench/RESULTS.md, issue 21, branch h21th).
local function all_known(opts, allowed)
  local k = next(opts)
  if k == nil then return true elseif not allowed[k] then return false end
  k = next(opts, k)
  if k == nil then return true elseif not allowed[k] then return false end
  k = next(opts, k)
  if k == nil then return true elseif not allowed[k] then return false end
  k = next(opts, k)
  if k == nil then return true elseif not allowed[k] then return false end
  k = next(opts, k)
  if k == nil then return true elseif not allowed[k] then return false end
  k = next(opts, k)
  if k == nil then return true elseif not allowed[k] then return false end
  for key in next, opts, k do
    if not allowed[key] then return false end
  end
  return true
end

--- Checks that `opts` has only keys listed in `allowed` (a set); the first
--- unknown key, in sorted order for stable messages, is an error.
function M.known(fname, opts, allowed, prefix, level)
  if not all_known(opts, allowed) then unknown_option(fname, opts, allowed, prefix, (level or 2) + 1) end
end

-- ===== the vocabulary: every public option set (README "Vocabulary";
-- spec/vocabulary_spec.lua holds the two together)

--- { [function name] = { set = option set, old = { deprecated = new } } }
M.vocabulary = {}

--- Registers the option names of public function `fname` (a set) and the
--- deprecated ones among them (old name -> new name); returns the set.
function M.options(fname, set, old)
  M.vocabulary[fname] = { set = set, old = old or {} }
  return set
end

-- ===== deprecated names (kept one release; see README "Vocabulary")

local warned = {}            -- call sites already told

--- Says once per call site (the user's file:line at `level`) that `what`
--- is deprecated, through the error sink as a warning (not an error).
function M.deprecate(what, level)
  local info = debug.getinfo((level or 2) + 1, "Sl")
  local site = info and (info.short_src .. ":" .. (info.currentline or 0)) or "?"
  local key = site .. " " .. what
  if warned[key] then return end
  warned[key] = true
  require("tide.engine.log").warn("deprecated at " .. site, what .. " (the old name goes in the next release)")
end

--- The value of option `new` in opts, taking the deprecated name `old`
--- too (with a warning); both at once is an error.
function M.renamed(fname, opts, old, new, level, prefix)
  local v = opts[old]
  if v == nil then return opts[new] end
  prefix = prefix or ""
  if opts[new] ~= nil then
    error(("%s: give '%s%s', not both it and '%s%s' (its old name)"):format(fname, prefix, new, prefix, old), (level or 2) + 1)
  end
  M.deprecate(("%s: option '%s%s' is now called '%s%s'"):format(fname, prefix, old, prefix, new), (level or 2) + 1)
  return v
end

--- True when fn takes two parameters or more: a hook written for the old
--- positional form, which is called that way one release more (with a
--- warning at `level`); a hook of one parameter takes the event table.
local OLD_FORMS = { on_retry = "attempt, ev.status, ev.error, ev.task", on_give_up = "supervisor, ev.reason",
                    on_outcome = "job, ev.outcome, ev.error, ev.traceback" }
function M.positional_hook(fname, key, fn, level)
  local info = debug.getinfo(fn, "u")
  if info.nparams < 2 then return false end
  M.deprecate(("%s: option '%s' now receives one event table (ev.%s); a function of %d parameters is "
               .. "called the old way"):format(fname, key, OLD_FORMS[key] or "...", info.nparams), (level or 2) + 1)
  return true
end

--- "a, b or c" for messages, from a set.
function M.choices(set)
  local t = {}
  for k in pairs(set) do t[#t + 1] = ("'%s'"):format(k) end
  sort(t)
  if #t == 1 then return t[1] end
  return concat(t, ", ", 1, #t - 1) .. " or " .. t[#t]
end

--- Why table t is not a list (keys 1..n, no hole), or nil: "it has a hole
--- at 2", "it has the key string "a"".  For what a caller hands over as
--- a list (a flow's items), which # and ipairs would cut short silently.
--- A loop of next() calls, not pairs(): Debian 12's LuaJIT
--- (2.1.0~beta3+git20220320) compiled the pairs() loop over a 2,000-item
--- list so that now and then its first key was a function the table does
--- not hold, and a good fan-out failed "items must be a list (it has the
--- key function)" (bisected on upstream builds to dad04f17, "Fix trace
--- join to BC_JLOOP originating from BC_ITERN", September 2022).  That bug
--- and #827 are in the compiled ITERN bytecode, which a next() loop does
--- not use: spec/fixtures/list_check.lua failed in 4-7% of fresh processes
--- with pairs() compiled, in none of 180 with next(); and it is compiled,
--- where the pairs() loop had to be interpreted (a 1-3 name `after` list:
--- 27-33 ns against 90-130).  README, "Layout", says what else was tried.
function M.not_a_list(t)
  local n, k = 0, next(t)
  while k ~= nil do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return "it has the key " .. M.describe(k) end
    if k > n then n = k end
    k = next(t, k)
  end
  for i = 1, n do
    if rawget(t, i) == nil then return ("it has a hole at %d"):format(i) end   -- raw, as next: no __index runs
  end
end

return M
