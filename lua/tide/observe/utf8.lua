--- tide.observe.utf8 — text for readers that require UTF-8 (Prometheus label values, JSON logs, the dashboard's cut texts).
local byte, sub, find, concat = string.byte, string.sub, string.find, table.concat

local M = {}

local REPLACEMENT = "\239\191\189"   -- U+FFFD

--- s with each byte that does not belong to valid UTF-8 (a stray or cut-short
--- sequence, an overlong form, a surrogate, a code point past U+10FFFF)
--- replaced by U+FFFD; valid text comes back as it is.
function M.clean(s)
  if not find(s, "[\128-\255]") then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = byte(s, i)
    local len = c < 0x80 and 1 or (c >= 0xC2 and c <= 0xDF) and 2 or (c >= 0xE0 and c <= 0xEF) and 3
                or (c >= 0xF0 and c <= 0xF4) and 4 or 0
    local ok = len > 0
    for k = 1, len - 1 do
      local b = byte(s, i + k)
      if not b or b < 0x80 or b > 0xBF then ok = false end
    end
    local b = byte(s, i + 1)
    if ok and ((c == 0xE0 and b < 0xA0) or (c == 0xED and b > 0x9F) or (c == 0xF0 and b < 0x90)
               or (c == 0xF4 and b > 0x8F)) then ok = false end
    if ok then out[#out + 1] = sub(s, i, i + len - 1); i = i + len
    else out[#out + 1] = REPLACEMENT; i = i + 1 end
  end
  return concat(out)
end

--- s cut to at most n bytes without splitting a character (s itself when
--- it is no longer).
function M.cut(s, n)
  if #s <= n then return s end
  while n > 0 and byte(s, n + 1) >= 0x80 and byte(s, n + 1) < 0xC0 do n = n - 1 end
  return sub(s, 1, n)
end

return M
