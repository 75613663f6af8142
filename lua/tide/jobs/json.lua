--- tide.jobs.json — what jobs carry as JSON: args, errors; what cannot be JSON is named by its path.
local check = require "tide.engine.check"
local cjson = require("cjson").new()

local type, pairs, pcall, error, tostring = type, pairs, pcall, error, tostring
local describe = check.describe

cjson.encode_sparse_array(false)
cjson.encode_invalid_numbers(false)
cjson.decode_invalid_numbers(false)

local M = {}

--- true for an array (keys 1..n), false for an object; for positive
--- integer keys with holes: nil and the highest key.
local function is_array(t)
  local n, max = 0, 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
    n = n + 1
    if k > max then max = k end
  end
  if n == max then return true end
  return nil, max, n
end

--- Why `v` cannot be JSON, with its path ("args.items[2].cb: function"), or nil.
local function json_problem(v, path, depth)
  local tv = type(v)
  if tv == "number" then
    if not check.finite(v) then return path .. ": " .. describe(v) .. " is not a JSON number" end
  elseif tv == "table" then
    if depth > 100 then return path .. ": nested too deep (a cycle?)" end
    local array, max, n = is_array(v)
    if array == nil then
      local p = ("%s: sparse array (keys 1..n expected, got %d values up to key %d)"):format(path, n, max)
      if max > 10 and max > 2 * n then return p end     -- what cjson refuses
      array = true
    end
    for k, x in pairs(v) do
      local sub
      if array then
        sub = ("%s[%d]"):format(path, k)
      elseif type(k) == "string" then
        sub = k:match("^[%a_][%w_]*$") and path .. "." .. k or ("%s[%q]"):format(path, k)
      else
        return ("%s: key %s in a table with other keys (JSON objects have string keys, "
                .. "arrays keys 1..n)"):format(path, describe(k))
      end
      local p = json_problem(x, sub, depth + 1)
      if p then return p end
    end
  elseif tv ~= "string" and tv ~= "boolean" and tv ~= "nil" and v ~= cjson.null then
    return ("%s: %s cannot be encoded as JSON"):format(path, tv)
  end
end

--- Encodes `v` (nil: null); raises `fname: bad option 'key' (path: why)`
--- at `level` when it cannot be JSON.
function M.encode_option(fname, key, v, level)
  local ok, json = pcall(cjson.encode, v == nil and cjson.null or v)
  if ok then return json end
  error(("%s: bad option '%s' (%s)"):format(fname, key, json_problem(v, key, 0) or json), level + 1)
end

--- Decodes JSON text; null becomes nil.  Returns the value, or nil and why not.
function M.decode(text)
  local ok, v = pcall(cjson.decode, text)
  if not ok then return nil, tostring(v) end
  if v == cjson.null then v = nil end
  return v
end

M.encode = cjson.encode
M.null = cjson.null


return M
