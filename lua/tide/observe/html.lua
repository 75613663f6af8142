--- tide.observe.html — escaping for the dashboard: every value goes through h() or link().
local http = require "tide.engine.http"

local tostring = tostring

local M = {}

local ENTITIES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

--- Any value as HTML text or attribute value (nil: "").
function M.h(v)
  if v == nil then return "" end
  return (tostring(v):gsub("[&<>\"']", ENTITIES))
end

--- A local URL: path and query (values percent-encoded); for use inside h().
function M.link(path, query)
  local qs = query and http.build_query(query) or ""
  return qs ~= "" and path .. "?" .. qs or path
end

return M
