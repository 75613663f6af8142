-- tzif_mutate.lua — mutation fuzzing of the TZif reader (tide.jobs.tz) and the cron ticks in what it reads.
--
--   luajit spec/fuzz/tzif_mutate.lua [seconds] [seed]      (from the repository root)
--
-- Takes real zone files from $TZDIR (or /usr/share/zoneinfo), flips, cuts,
-- inserts and saturates bytes, and hands the result to tz.parse.  A file
-- that parses must answer offset, instants, gap_end and civil at random
-- instants, and give a cron schedule's next ticks, each within an
-- instruction budget (a zone with offsets of months once made a per-second
-- schedule walk months of wall seconds per tick); a file that does not
-- parse must say why in a string.  Any failure writes the input beside the
-- seed and exits 1.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local tz = require "tide.jobs.tz"
local cron = require "tide.jobs.cron"

local SECONDS = tonumber(arg[1]) or 60
local SEED = tonumber(arg[2]) or os.time()
local BUDGET = 2e8                         -- VM instructions per input (a sane zone needs far fewer)
local ZONES = { "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "America/Sao_Paulo",
                "Pacific/Chatham", "Africa/Casablanca", "Europe/Dublin" }
local EXPRS = { "* * * * * *", "30 2 * * *", "0 0 1 1 *", "*/7 * * * *", "0 0 29 2 *" }

jit.off()                                  -- count hooks see every instruction only in the interpreter
io.stdout:setvbuf("no")
math.randomseed(SEED)
print(("tzif_mutate: seed %d, %d s"):format(SEED, SECONDS))

local files = {}
for _, name in ipairs(ZONES) do
  local f = io.open(tz.dir() .. "/" .. name, "rb")
  if f then files[#files + 1] = f:read("*a"); f:close() end
end
if #files == 0 then print("tzif_mutate: no zone files under " .. tz.dir()); os.exit(1) end

local function mutate(s)
  local b = { s:byte(1, -1) }
  for _ = 1, math.random(1, 8) do
    local r, i = math.random(), math.random(1, #b)
    if r < 0.5 then b[i] = math.random(0, 255)
    elseif r < 0.7 then for j = i, math.min(#b, i + 3) do b[j] = math.random() < 0.5 and 255 or 0 end
    elseif r < 0.85 then for j = #b, i, -1 do b[j] = nil end
    else table.insert(b, i, math.random(0, 255)) end
    if #b == 0 then break end
  end
  local parts = {}
  for i = 1, #b, 4000 do parts[#parts + 1] = string.char(unpack(b, i, math.min(#b, i + 3999))) end
  return table.concat(parts)
end

local function exercise(s)
  local z, why = tz.parse("fuzz", s)
  if not z then assert(type(why) == "string", "a refusal without a reason"); return end
  for _ = 1, 20 do
    local t = math.random(-2e9, 4e9)
    z:offset(t); z:instants(t); z:gap_end(t); z:civil(t)
  end
  local c = assert(cron.try_parse(EXPRS[math.random(#EXPRS)]))
  c.zone = z
  local t = math.random(0, 4e12)
  for _ = 1, 3 do t = c:next(t); if not t then break end end
end

local t0, n = os.clock(), 0
while os.clock() - t0 < SECONDS do
  n = n + 1
  local s = mutate(files[math.random(#files)])
  local used = 0
  debug.sethook(function() used = used + 1e5; if used > BUDGET then error("over its instruction budget", 0) end end,
                "", 1e5)
  local ok, err = pcall(exercise, s)
  debug.sethook()
  if not ok then
    local path = ("tzif_mutate-%d-%d.tzif"):format(SEED, n)
    local f = io.open(path, "wb"); f:write(s); f:close()
    print(("tzif_mutate: input %d failed (%s); it is in %s"):format(n, tostring(err), path))
    os.exit(1)
  end
end
print(("tzif_mutate: %d inputs, none failed"):format(n))
