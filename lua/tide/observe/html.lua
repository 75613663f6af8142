--- tide.observe.html — escaping and formatting for the dashboard: every value goes through h() or link().
local http = require "tide.engine.http"
local core = require "tide.core"

local tostring, format, floor, abs, date = tostring, string.format, math.floor, math.abs, os.date

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

--- A count from a URL ("0", "42": digits, at most 2^53) as a number; nil for
--- anything else (a negative, a fraction, "1e300", "nan", "0x10").
function M.count(s)
  local n = type(s) == "string" and s:match("^%d+$") and tonumber(s)
  return n and n <= 2 ^ 53 and n or nil
end

--- A job or run id from a URL (1 to 2^53), or nil: a page answers 404 for
--- nil, as for an id the store does not hold (the store refuses the others).
function M.id(s)
  local n = M.count(s)
  return n and n >= 1 and n or nil
end

--- 1234567 -> "1,234,567".
function M.num(n) return (tostring(floor(n)):reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")) end

--- A status as a coloured badge.
function M.badge(status) return ('<span class="badge s-%s">%s</span>'):format(M.h(status), M.h(status)) end

--- One row of a definition list: the name escaped, the value as it is (already HTML).
function M.field(name, value) return "<dt>" .. M.h(name) .. "</dt><dd>" .. value .. "</dd>" end

--- UTC ms -> "2026-12-02 10:30:00" ("" for nil).
function M.iso(ms) return ms and date("!%Y-%m-%d %H:%M:%S", floor(ms / 1000)) or "" end

--- "12 s ago", "in 3 min", with the UTC time as a tooltip (times in UTC ms, as the store gives them),
--- from `now` (the store's time, q:now(): on PostgreSQL the server's; default this machine's).
function M.when(ms, now)
  if not ms then return '<span class="muted">-</span>' end
  local d = ((now or core.wallclock()) - ms) / 1000
  local ad = abs(d)
  local text = ad < 1 and "now" or ad < 120 and format("%d s", ad) or ad < 7200 and format("%d min", ad / 60)
    or ad < 172800 and format("%d h", ad / 3600) or format("%d d", ad / 86400)
  if text ~= "now" then text = d >= 0 and text .. " ago" or "in " .. text end
  return ('<span title="%s UTC">%s</span>'):format(M.h(M.iso(ms)), M.h(text))
end

return M
