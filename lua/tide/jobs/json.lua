--- tide.jobs.json — the JSON of jobs: exact numbers, arrays kept arrays, strict input, valid UTF-8.
--
-- Everything a job carries as JSON (args, the errors of its attempts, what
-- `tide jobs --json` prints) goes through here, so that what goes into a
-- job comes back exactly (Promise 7):
--
--   numbers   integers of magnitude below 2^53 print as integers
--             (1700000000123456, not 1.7000000001235e+15); every other
--             finite double prints in the shortest form that reads back as
--             the same double (0.30000000000000004, 1e+300); -0 stays -0.
--             inf and nan are refused, with their path.
--   arrays    a decoded array carries M.array_mt, so `[]` and `{"a":[]}`
--             encode back as arrays; M.array(t) marks a table of your own
--             (an empty table without it is an object, `{}`).
--   strings   must be valid UTF-8 (keys too): anything else is refused with
--             its path and byte ("args.name: invalid UTF-8 at byte 3").
--   input     exactly RFC 8259: no trailing commas, no `.5`, `1.` or `-2.`,
--             no raw control characters in strings, no lone surrogates, no
--             invalid UTF-8, no bytes after the value; the first error is
--             named with its position ("... at character 10").  Nesting is
--             bounded (MAX_DEPTH) on both sides.
--
-- null: top-level null is nil; inside a table it is M.null (a sentinel that
-- encodes as null), since a Lua table cannot hold nil.  Objects need string
-- keys, arrays keys 1..n (holes become null, as long as the array is not
-- excessively sparse: more than 10 slots and more than half of them holes).
--
-- Why hand-written: lua-cjson prints 14 significant digits (17 at most with
-- encode_number_precision, which still prints 1e+15 for an integer and
-- 0.10000000000000001 for 0.1), turns `[]` into `{}`, and accepts `-2.`, `.5`
-- and raw tabs.  bench/queue.lua measures this module against it.
local type, pairs, error, tostring, tonumber = type, pairs, error, tostring, tonumber
local byte, char, find, format, sub = string.byte, string.char, string.find, string.format, string.sub
local concat, floor, huge = table.concat, math.floor, math.huge
local setmetatable, getmetatable, pcall = setmetatable, getmetatable, pcall

local M = {}

M.MAX_DEPTH = 1000

-- null and the arrays' metatable are the core's (src/codec_marks.c), so
-- that they cross to thread and process tasks as themselves.
M.null, M.array_mt = require("tide.core").json_marks()
local null = M.null
local array_mt = M.array_mt

--- Marks `t` (or a new table) as a JSON array, so that it encodes as one even
--- when empty; returns it.
function M.array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then require("tide.engine.check").arg_error("tide.json.array", 1, "table or nil", t) end
  return setmetatable(t, array_mt)
end

-- ===== UTF-8

--- The byte (1-based) where `s` stops being valid UTF-8 in [i, j], or nil.
--- Refuses overlong forms, surrogates (U+D800..U+DFFF) and code points past U+10FFFF.
local function utf8_error(s, i, j)
  while true do
    i = find(s, "[\128-\255]", i)
    if not i or i > j then return nil end
    local c = byte(s, i)
    local n, lo, hi = 0, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then n = 1
    elseif c == 0xE0 then n, lo = 2, 0xA0
    elseif c >= 0xE1 and c <= 0xEC then n = 2
    elseif c == 0xED then n, hi = 2, 0x9F
    elseif c >= 0xEE and c <= 0xEF then n = 2
    elseif c == 0xF0 then n, lo = 3, 0x90
    elseif c >= 0xF1 and c <= 0xF3 then n = 3
    elseif c == 0xF4 then n, hi = 3, 0x8F
    else return i end
    if i + n > j then return i end
    local c2 = byte(s, i + 1)
    if c2 < lo or c2 > hi then return i end
    for k = i + 2, i + n do
      local ck = byte(s, k)
      if ck < 0x80 or ck > 0xBF then return i end
    end
    i = i + n + 1
  end
end

--- The byte where `s` stops being valid UTF-8, or nil.
function M.utf8_error(s) return utf8_error(s, 1, #s) end

--- `s` with every byte that is not part of valid UTF-8 replaced by U+FFFD
--- (for free text that must be stored and printed: error messages).
function M.sanitize(s)
  local at = utf8_error(s, 1, #s)
  if not at then return s end
  local out, from = {}, 1
  while at do
    out[#out + 1] = sub(s, from, at - 1)
    out[#out + 1] = "\239\191\189"
    from = at + 1
    at = utf8_error(s, from, #s)
  end
  out[#out + 1] = sub(s, from)
  return concat(out)
end

--- Free text as every store keeps it (error messages and tracebacks of
--- attempts and of flows' steps): sanitized, and NUL bytes, which
--- PostgreSQL's text and jsonb refuse, become U+FFFD too (a message with
--- one made the store refuse the whole outcome batch, at every try).
function M.text(s)
  s = M.sanitize(s)
  if find(s, "\0", 1, true) then s = s:gsub("%z", "\239\191\189") end
  return s
end

-- ===== encoding

local ESCAPE = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
                 ["\r"] = "\\r", ["\t"] = "\\t" }
for c = 0, 31 do
  local ch = char(c)
  if not ESCAPE[ch] then ESCAPE[ch] = format("\\u%04x", c) end
end

local TWO53 = 2 ^ 53
local MIN_NORMAL = 2.2250738585072014e-308

--- The shortest text that reads back as the double x (finite).
local function number_text(x)
  if x % 1 == 0 and x > -TWO53 and x < TWO53 then
    if x == 0 and 1 / x < 0 then return "-0" end
    return format("%d", x)
  end
  if x > -MIN_NORMAL and x < MIN_NORMAL then     -- subnormals have fewer digits
    for p = 1, 17 do
      local s = format("%." .. p .. "g", x)
      if tonumber(s) == x then return s end
    end
  end
  local s = format("%.15g", x)                    -- 15 digits always read back as written
  if tonumber(s) == x then return s end
  s = format("%.16g", x)
  if tonumber(s) == x then return s end
  return format("%.17g", x)
end
M.number_text = number_text

--- A path and one more step: args.items[2], args.name, args["a key"].
local function sub_path(path, k)
  if type(k) == "number" then return format("%s[%d]", path, k) end
  if find(k, "^[%a_][%w_]*$") then return path .. "." .. k end
  return format("%s[%q]", path, k)
end

local function describe(v)
  if v ~= v then return "nan" end
  return tostring(v)
end

-- The encoder appends to `buf` (n: its length so far) and returns the new
-- length, or raises { path = ..., why = ... } (a table: the caller adds the
-- function's name).  `lossy`: invalid UTF-8 becomes U+FFFD instead of an error.
local encode_value

local function fail(path, why) error({ path = path, why = why }, 0) end

--- False when `s` holds a byte the encoder must look at: a control
--- character, a quote, a backslash, or one >= 0x80 (UTF-8 to check).  A
--- byte loop, which LuaJIT compiles; a pattern find cost more than the rest
--- of a short string's encoding.
local function plain_ascii(s)
  for k = 1, #s do
    local c = byte(s, k)
    if c < 32 or c == 34 or c == 92 or c >= 128 then return false end
  end
  return true
end

local function encode_string(buf, n, s, path, key, lossy)
  if not plain_ascii(s) then
    local bad = utf8_error(s, 1, #s)
    if bad then
      if not lossy then
        if key == false then fail(path, format("a key: invalid UTF-8 at byte %d", bad)) end
        fail(key ~= nil and sub_path(path, key) or path, format("invalid UTF-8 at byte %d", bad))
      end
      s = M.sanitize(s)
    end
    s = s:gsub('[%z\1-\31"\\]', ESCAPE)
  end
  buf[n + 1], buf[n + 2], buf[n + 3] = '"', s, '"'
  return n + 3
end

--- true for an array (keys 1..n, or marked), false for an object; nil,
--- max, count for positive integer keys with holes.
local function array_shape(t)
  local count, max = 0, 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
    count = count + 1
    if k > max then max = k end
  end
  if count == max then return count > 0 or getmetatable(t) == array_mt, max end
  return nil, max, count
end

local function encode_table(buf, n, t, path, depth, lossy)
  if depth > M.MAX_DEPTH then         -- (its path, 1000 steps long, was a message of kilobytes)
    fail(#path > 80 and sub(path, 1, 80) .. "..." or path, "nested too deep (more than " .. M.MAX_DEPTH
         .. " levels: a cycle?)")
  end
  local array, max, count = array_shape(t)
  if array == nil then
    if max > 10 and max > 2 * count then
      fail(path, format("sparse array (keys 1..n expected, got %d values up to key %d)", count, max))
    end
    array = true
  end
  if array then
    n = n + 1; buf[n] = "["
    for i = 1, max do
      if i > 1 then n = n + 1; buf[n] = "," end
      local v = t[i]
      if v == nil then n = n + 1; buf[n] = "null"
      else n = encode_value(buf, n, v, path, i, depth + 1, lossy) end
    end
    n = n + 1; buf[n] = "]"
    return n
  end
  n = n + 1; buf[n] = "{"
  local first = true
  for k, v in pairs(t) do
    if type(k) ~= "string" then
      fail(path, format("key %s in a table with other keys (JSON objects have string keys, arrays keys 1..n)",
        type(k) == "number" and "number " .. describe(k) or type(k)))
    end
    if not first then n = n + 1; buf[n] = "," end
    first = false
    n = encode_string(buf, n, k, path, false, lossy)
    n = n + 1; buf[n] = ":"
    n = encode_value(buf, n, v, path, k, depth + 1, lossy)
  end
  n = n + 1; buf[n] = "}"
  return n
end

function encode_value(buf, n, v, path, key, depth, lossy)
  local tv = type(v)
  if tv == "string" then
    return encode_string(buf, n, v, path, key, lossy)
  elseif tv == "number" then
    if v ~= v or v == huge or v == -huge then
      fail(key ~= nil and sub_path(path, key) or path, describe(v) .. " is not a JSON number")
    end
    n = n + 1; buf[n] = number_text(v)
    return n
  elseif tv == "boolean" then
    n = n + 1; buf[n] = v and "true" or "false"
    return n
  elseif tv == "table" then
    if v == null then n = n + 1; buf[n] = "null"; return n end
    return encode_table(buf, n, v, key ~= nil and sub_path(path, key) or path, depth, lossy)
  elseif v == nil then
    n = n + 1; buf[n] = "null"
    return n
  end
  fail(key ~= nil and sub_path(path, key) or path, tv .. " cannot be encoded as JSON")
end

--- v -> JSON text; nil and "path: why" when it cannot be JSON (`path`
--- names v, default "value").  With `lossy`, invalid UTF-8 in strings
--- becomes U+FFFD instead (for printing what a store holds).
-- One buffer, reused (encoding calls no user code, so it never re-enters):
-- a fresh table per job was a third of the cost of encoding small args.
-- Slots past the current length may hold old strings; a buffer that grew
-- past BUF_KEEP is dropped rather than kept.
local shared_buf, BUF_KEEP = {}, 4096

function M.try_encode(v, path, lossy)
  path = path or "value"
  local tv = type(v)
  if tv == "number" and v == v and v ~= huge and v ~= -huge then return number_text(v) end
  local buf = shared_buf
  shared_buf = nil                            -- (taken: a nested call, should one happen, gets its own)
  if not buf then buf = {} end
  local ok, err = pcall(encode_value, buf, 0, v, path, nil, 0, lossy)
  local text = ok and concat(buf, "", 1, err)
  if not ok or err <= BUF_KEEP then shared_buf = buf end
  if ok then return text end
  if type(err) == "table" then return nil, err.path .. ": " .. err.why end
  error(err, 0)
end
local try_encode = M.try_encode

--- v -> JSON text; raises "tide.json.encode: path: why".
function M.encode(v)
  local s, err = try_encode(v)
  if not s then error("tide.json.encode: " .. err, 2) end
  return s
end

--- Encodes `v` (nil: null); raises `fname: bad option 'key' (path: why)`
--- at `level` when it cannot be JSON.
function M.encode_option(fname, key, v, level)
  local s, err = try_encode(v, key)
  if s then return s end
  error(format("%s: bad option '%s' (%s)", fname, key, err), level + 1)
end

-- ===== decoding

local WS = "^[ \t\n\r]*"

--- The first byte at or after `j` that is not whitespace.  Compact JSON
--- (what tide writes) has none between tokens: one byte compared, no
--- pattern match (string.find is not compiled by LuaJIT: a find at each
--- token kept the decoder in the interpreter; a worker decodes each job's
--- args, so this is per job).
local function skip(s, j)
  local c = byte(s, j)
  if c ~= 32 and c ~= 9 and c ~= 10 and c ~= 13 then return j end
  local _, e = find(s, WS, j)
  return e + 1
end

--- A parse error at byte `pos`: raised as a string the caller returns.
local function perr(what, pos) error(format("%s at character %d", what, pos), 0) end

local function what_at(s, i)
  if i > #s then return "unexpected end" end
  local c = sub(s, i, i)
  if find(c, "[%w%p ]") then return format("unexpected character '%s'", c) end
  return format("unexpected byte 0x%02X", byte(c))
end

local decode_value

local function hex4(s, i)
  local h = sub(s, i, i + 3)
  if not find(h, "^%x%x%x%x$") then perr("bad \\u escape (4 hex digits expected)", i - 2) end
  return tonumber(h, 16)
end

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + floor(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64, 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

-- Strings: returns the string and the position after its closing quote.
local UNESCAPE = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- Where the next byte >= 0x80 is, at or after the point the decoder
-- checked up to (math.huge: none left); reset by each decode.  A string
-- before it needs no UTF-8 check, and no byte is searched twice (searching
-- from each string to the end of the text made a long document's decode
-- quadratic).
local next_high = 0

--- The first byte >= 0x80 at or after `i`, or math.huge.  A byte loop, which
--- LuaJIT compiles: a pattern find cost 0.84 us of a durable flow step's
--- 2.4 us args decode (100 bytes), most of it the pattern machinery.
local function find_high(s, i)
  for k = i, #s do
    if byte(s, k) >= 128 then return k end
  end
  return huge
end

local function check_utf8(s, i, j)
  if next_high < i then next_high = find_high(s, i) end
  if next_high > j then return end
  local bad = utf8_error(s, i, j)
  if bad then perr("invalid UTF-8", bad) end
  next_high = j                             -- (searched again from the next string)
end

--- The first byte at or after `i` that ends a run of plain characters
--- (a quote, a backslash, a control character), or nil.  Short runs (keys,
--- names) are scanned byte by byte, which LuaJIT compiles; a long one goes
--- on with a pattern find.
local function plain_end(s, i)
  for k = i, i + 31 do
    local c = byte(s, k)
    if c == nil then return nil end
    if c == 34 or c == 92 or c < 32 then return k end
  end
  return (find(s, '[%z\1-\31"\\]', i + 32))
end

local function decode_string(s, i)          -- s[i] is the opening quote
  local j = plain_end(s, i + 1)
  if j and byte(s, j) == 34 then            -- the common case: no escape
    check_utf8(s, i + 1, j - 1)
    return sub(s, i + 1, j - 1), j + 1
  end
  local parts, n, from = {}, 0, i + 1
  while true do
    if not j then perr("unterminated string", i) end
    local c = byte(s, j)
    check_utf8(s, from, j - 1)
    n = n + 1; parts[n] = sub(s, from, j - 1)
    if c == 34 then return concat(parts, "", 1, n), j + 1 end
    if c ~= 92 then perr("raw control character in a string (escape it)", j) end
    local e = sub(s, j + 1, j + 1)
    local plain = UNESCAPE[e]
    if plain then
      n = n + 1; parts[n] = plain
      from = j + 2
    elseif e == "u" then
      local cp = hex4(s, j + 2)
      from = j + 6
      if cp >= 0xD800 and cp <= 0xDBFF then
        if sub(s, j + 6, j + 7) ~= "\\u" then perr(format("lone surrogate \\u%04X", cp), j) end
        local lo = hex4(s, j + 8)
        if lo < 0xDC00 or lo > 0xDFFF then perr(format("lone surrogate \\u%04X", cp), j) end
        cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
        from = j + 12
      elseif cp >= 0xDC00 and cp <= 0xDFFF then
        perr(format("lone surrogate \\u%04X", cp), j)
      end
      n = n + 1; parts[n] = utf8_char(cp)
    else
      perr("bad escape", j)
    end
    j = plain_end(s, from)
  end
end

local function decode_number(s, i)
  local j = i
  if byte(s, j) == 45 then j = j + 1 end    -- -
  local c = byte(s, j)
  if c == 48 then j = j + 1                 -- 0
  elseif c and c >= 49 and c <= 57 then
    local _, e = find(s, "^%d+", j)
    j = e + 1
  else
    perr("bad number (a digit expected)", j)
  end
  if byte(s, j) == 46 then                  -- .
    local _, e = find(s, "^%d+", j + 1)
    if not e then perr("bad number (a digit expected after '.')", j + 1) end
    j = e + 1
  end
  c = byte(s, j)
  if c == 101 or c == 69 then               -- e E
    j = j + 1
    c = byte(s, j)
    if c == 43 or c == 45 then j = j + 1 end
    local _, e = find(s, "^%d+", j)
    if not e then perr("bad number (a digit expected in the exponent)", j) end
    j = e + 1
  end
  local x = tonumber(sub(s, i, j - 1))
  if x == nil then                          -- an exponent too long for the scanner
    local mantissa, sign = sub(s, i, j - 1):match("^(-?[%d.]+)[eE]([-+]?)")
    if tonumber(mantissa) == 0 or sign == "-" then
      x = byte(s, i) == 45 and -0.0 or 0    -- underflow, as 1e-400 reads
    else
      x = huge
    end
  end
  if x == huge or x == -huge then perr("number out of range", i) end
  return x, j
end

local function decode_array(s, i, depth)
  if depth > M.MAX_DEPTH then perr("nested too deep (more than " .. M.MAX_DEPTH .. " levels)", i) end
  local t, n = setmetatable({}, array_mt), 0
  local j = skip(s, i + 1)
  if byte(s, j) == 93 then return t, j + 1 end
  while true do
    local v
    v, j = decode_value(s, j, depth)
    n = n + 1
    t[n] = v == nil and null or v
    j = skip(s, j)
    local c = byte(s, j)
    if c == 93 then return t, j + 1 end
    if c ~= 44 then perr(what_at(s, j) .. " (',' or ']' expected)", j) end
    j = skip(s, j + 1)
  end
end

local function decode_object(s, i, depth)
  if depth > M.MAX_DEPTH then perr("nested too deep (more than " .. M.MAX_DEPTH .. " levels)", i) end
  local t = {}
  local j = skip(s, i + 1)
  if byte(s, j) == 125 then return t, j + 1 end
  while true do
    if byte(s, j) ~= 34 then perr(what_at(s, j) .. " (a string key expected)", j) end
    local k
    k, j = decode_string(s, j)
    j = skip(s, j)
    if byte(s, j) ~= 58 then perr(what_at(s, j) .. " (':' expected)", j) end
    local v
    v, j = decode_value(s, skip(s, j + 1), depth)
    t[k] = v == nil and null or v
    j = skip(s, j)
    local c = byte(s, j)
    if c == 125 then return t, j + 1 end
    if c ~= 44 then perr(what_at(s, j) .. " (',' or '}' expected)", j) end
    j = skip(s, j + 1)
  end
end

local LITERALS = { [116] = { "true", true }, [102] = { "false", false }, [110] = { "null", nil } }

function decode_value(s, i, depth)
  local c = byte(s, i)
  if c == 34 then return decode_string(s, i) end
  if c == 123 then return decode_object(s, i, depth + 1) end
  if c == 91 then return decode_array(s, i, depth + 1) end
  if c == 45 or (c and c >= 48 and c <= 57) then return decode_number(s, i) end
  local lit = LITERALS[c]
  if lit and sub(s, i, i + #lit[1] - 1) == lit[1] then return lit[2], i + #lit[1] end
  perr(what_at(s, i) .. " (a value expected)", i)
end

local function decode(s)
  next_high = 0
  local v, j = decode_value(s, skip(s, 1), 0)
  j = skip(s, j)
  if j <= #s then perr(what_at(s, j) .. " after the value", j) end
  return v
end

--- JSON text -> value (top-level null: nil).  Returns the value, or nil and
--- why not ("unexpected character 'x' (a value expected) at character 3").
function M.decode(text)
  if type(text) ~= "string" then return nil, "JSON text expected, got " .. type(text) end
  local ok, v = pcall(decode, text)
  if ok then return v end
  return nil, tostring(v)
end

return M
