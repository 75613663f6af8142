--- tide.observe.logs — structured logs: one JSON object per line on stderr (`--log-format json`).
--
-- Each line has `time` (UTC, ISO 8601 with ms), `level` ("info", "warn",
-- "error"), `event`, and what the event is about: `task`, `job`, `queue`,
-- `attempt`, `error`, `traceback`, ...  The default format stays the
-- human-readable one; the command line switches with use_json().
local core = require "tide.core"
local log = require "tide.engine.log"
local cjson = require("cjson").new()
local utf8 = require "tide.observe.utf8"

local pairs, tostring, tonumber, type, floor = pairs, tostring, tonumber, type, math.floor

cjson.encode_invalid_numbers(true)          -- a NaN in a field must not lose the line
cjson.encode_sparse_array(true)

local M = { json = false, out = io.stderr }

local function now_iso()
  local ms = core.wallclock()
  return ("%s.%03dZ"):format(os.date("!%Y-%m-%dT%H:%M:%S", floor(ms / 1000)), ms % 1000)
end

--- Writes one event as a JSON line.  fields: any plain values.
function M.event(level, event, fields)
  local rec = { time = now_iso(), level = level, event = event }
  for k, v in pairs(fields or {}) do
    if rec[k] == nil then
      local tv = type(v)
      if tv == "string" or tv == "number" or tv == "boolean" or tv == "table" then rec[k] = v
      else rec[k] = tostring(v) end
    end
  end
  local ok, line = pcall(cjson.encode, rec)
  if not ok then line = cjson.encode{ time = rec.time, level = level, event = event, error = tostring(line) } end
  -- cjson copies bytes as they are; JSON is UTF-8 (an error text may hold
  -- any bytes), and outside strings the line is ASCII
  M.out:write(utf8.clean(line), "\n")
end

--- The error sink in JSON: the task or job named in `where` becomes a field.
local function json_sink(where, err, tb)
  local fields = { where = where, error = tostring(err) }
  if type(tb) == "string" then fields.traceback = tb end
  -- an error caught with its traceback: the message alone, then the whole
  local msg = fields.error:match("^(.-)\nstack traceback:\n")
  if msg then fields.error = msg end
  if fields.traceback == nil and msg then fields.traceback = tostring(err) end
  local task = where:match("[Tt]ask (%d+)")
  local job = where:match("job (%d+)")
  fields.task, fields.job = tonumber(task), tonumber(job)
  M.event("error", "callback_error", fields)
end
M.sink = json_sink

--- From now on the error sink and tide's own command lines write JSON.
function M.use_json()
  M.json = true
  log.set_sink(json_sink)
end

return M
