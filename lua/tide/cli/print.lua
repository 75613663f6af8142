--- tide.cli.print — what commands write on stdout: aligned tables, JSON, UTC times.
local time = require "tide.jobs.time"
local jobs_json = require "tide.jobs.json"

local tostring, ipairs, select = tostring, ipairs, select
local floor, max, concat = math.floor, math.max, table.concat
local io_stdout = io.stdout

local M = {}

--- UTC seconds -> ISO 8601 with ms ("2026-11-23T15:04:05.250Z"), or nil.
local function iso(ms) return ms and time.iso(floor(ms + 0.5)) end
--- UTC seconds -> ISO 8601 to the second, for tables ("-" for none).
local function iso_s(ms) return ms and time.iso(floor(ms / 1000) * 1000) or "-" end
M.iso, M.iso_s = iso, iso_s

--- A Lua value -> JSON text: tide.jobs.json's (exact numbers, arrays kept
--- arrays); what a store holds is printed whatever it is, so invalid UTF-8
--- (a row written by hand) becomes U+FFFD and what cannot be JSON a string.
local function json(v)
  local s, err = jobs_json.try_encode(v, nil, true)
  return s or jobs_json.try_encode("(" .. err .. ")", nil, true)
end
M.json = json

--- An object with its keys in the given order: fields = { {key, json text}, ... }.
local function json_object(fields)
  local parts = {}
  for i, f in ipairs(fields) do parts[i] = json(f[1]) .. ":" .. f[2] end
  return "{" .. concat(parts, ",") .. "}"
end
M.json_object = json_object

--- A list of JSON texts -> a JSON array (empty: "[]", which cjson cannot say).
local function json_array(items) return "[" .. concat(items, ",") .. "]" end
M.json_array = json_array

--- Display width: UTF-8 code points (continuation bytes do not count).
local function width(s) return #s - select(2, s:gsub("[\128-\191]", "")) end
M.width = width

--- The first line of `s`, control characters blanked, cut to `n` code points.
function M.cell(s, n)
  s = tostring(s):match("^[^\n]*"):gsub("%c", " ")
  if width(s) <= n then return s end
  local out, w = {}, 0
  for ch in s:gmatch("[%z\1-\127\192-\255][\128-\191]*") do
    if w == n - 3 then break end
    out[#out + 1], w = ch, w + 1
  end
  return concat(out) .. "..."
end

--- Writes an aligned table: widths from the content, columns in `right`
--- right-aligned (their headers too), no trailing blanks.
function M.table(headers, rows, right)
  local w = {}
  for c, h in ipairs(headers) do w[c] = width(h) end
  for _, r in ipairs(rows) do
    for c = 1, #headers do w[c] = max(w[c], width(r[c] or "")) end
  end
  local function line(r)
    local cells = {}
    for c = 1, #headers do
      local v = r[c] or ""
      local pad = (" "):rep(w[c] - width(v))
      cells[c] = right[c] and pad .. v or c < #headers and v .. pad or v
    end
    io_stdout:write((concat(cells, "  "):gsub("%s+$", "")), "\n")
  end
  line(headers)
  for _, r in ipairs(rows) do line(r) end
end


return M
