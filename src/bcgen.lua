-- src/bcgen.lua — build step: a Lua module as a C header of LuaJIT bytecode
-- (what `luajit -b -g -t h -n NAME IN OUT` writes), with every loop over
-- pairs() or next in its generic form: ITERC, never ITERN.
--
--   luajit src/bcgen.lua NAME IN.lua OUT.h
--
-- Why.  For `for k, v in pairs(t)` the parser emits ISNEXT and ITERN, a
-- loop the JIT compiles by table slot; for any other iterator, JMP and
-- ITERC, which call the iterator (next, itself compiled).  The LuaJIT of
-- Debian 12 (2.1.0~beta3+git20220320) miscompiles ITERN loops now and then:
-- once such a loop is blacklisted it may end after its first key (LuaJIT
-- issue #827, fixed upstream in April 2022), and a trace joining a loop
-- that began at an ITERN may see a stale value as its first key (fixed
-- upstream in September 2022, dad04f17).  tide's flows met both: a flow
-- whose definition lost tasks, a good fan-out refused for "the key
-- function".  ITERC loops were never despecialised nor joined that way.
--
-- The rewrite is the interpreter's own: when ISNEXT finds that a loop's
-- iterator is not next, it turns itself into JMP and its ITERN into ITERC
-- for good.  Doing it here, before any code runs, leaves the operands and
-- every other byte as the parser wrote them.

local ffi = require "ffi"
local bit = require "bit"
local vmdef = require "jit.vmdef"

local name, input, output = ...
if not (name and input and output) then
  io.stderr:write("usage: luajit src/bcgen.lua NAME IN.lua OUT.h\n")
  os.exit(2)
end

local function opcode(op)
  local at = vmdef.bcnames:find(op .. (" "):rep(6 - #op), 1, true)
  assert(at and (at - 1) % 6 == 0, op)
  return (at - 1) / 6
end
local ISNEXT, JMP, ITERN, ITERC = opcode "ISNEXT", opcode "JMP", opcode "ITERN", opcode "ITERC"

local DUMP_BE, DUMP_STRIP = 1, 2   -- lj_bcdump.h: BCDUMP_F_BE, BCDUMP_F_STRIP

--- The dump of `s` with its ITERN loops made generic; and how many.
local function generic_loops(s)
  local n = #s
  local buf = ffi.new("uint8_t[?]", n)
  ffi.copy(buf, s, n)
  local function uleb(p)
    local v, scale = 0, 1
    repeat
      assert(p < n, "bytecode dump ends inside a number")
      local c = buf[p]
      v, scale, p = v + bit.band(c, 0x7f) * scale, scale * 128, p + 1
    until c < 0x80
    return v, p
  end
  assert(n > 4 and buf[0] == 0x1b and buf[1] == 0x4c and buf[2] == 0x4a, "not a LuaJIT bytecode dump")
  local flags, p = uleb(4)
  local strip = bit.band(flags, DUMP_STRIP) ~= 0
  local lsb = bit.band(flags, DUMP_BE) ~= 0 and 3 or 0   -- the opcode's byte in an instruction
  if not strip then local len; len, p = uleb(p); p = p + len end
  local patched, isnext = 0, 0
  while true do
    local len; len, p = uleb(p)
    if len == 0 then break end
    local q = p + 4                      -- flags, numparams, framesize, sizeuv
    local _, nbc
    _, q = uleb(q)                       -- sizekgc
    _, q = uleb(q)                       -- sizekn
    nbc, q = uleb(q)                     -- sizebc (without the function header)
    if not strip then
      local sizedbg; sizedbg, q = uleb(q)
      if sizedbg > 0 then _, q = uleb(q); _, q = uleb(q) end   -- firstline, numline
    end
    assert(q + 4 * nbc <= p + len, "bytecode longer than its prototype")
    for i = 0, nbc - 1 do
      local at = q + 4 * i + lsb
      local op = buf[at]
      if op == ISNEXT then buf[at], isnext = JMP, isnext + 1
      elseif op == ITERN then buf[at], patched = ITERC, patched + 1 end
    end
    p = p + len
  end
  assert(p == n, "bytecode dump does not end after its last prototype")
  assert(isnext == patched, "an ITERN without its ISNEXT, or one without the other")
  return ffi.string(buf, n), patched
end

local chunk = assert(loadfile(input))
local s, patched = generic_loops(string.dump(chunk))
assert(loadstring(s, "=" .. input), "rewritten bytecode does not load")

local sym = "luaJIT_BC_" .. name:gsub("%.", "_")
local out = { ("#define %s_SIZE %d\nstatic const unsigned char %s[] = {\n"):format(sym, #s, sym) }
local line, width = {}, 0
for i = 1, #s do
  local b = tostring(s:byte(i))
  if width + #b + 1 > 78 then
    out[#out + 1] = table.concat(line, ",") .. ",\n"
    line, width = {}, 0
  end
  line[#line + 1], width = b, width + #b + 1
end
out[#out + 1] = table.concat(line, ",") .. "\n};\n"
out[#out + 1] = ("/* %d pairs/next loop(s) made generic (ITERN -> ITERC): src/bcgen.lua */\n"):format(patched)
local f = assert(io.open(output, "w"))
f:write(table.concat(out))
assert(f:close())
