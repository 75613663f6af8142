--- tide.jobs.store.batch — one statement over a list of rows, the same on SQLite and PostgreSQL.
--
--   local MARK = batch.statement("b_id, b_note", { "BIGINT", "TEXT" },
--     "UPDATE t SET note = b_note FROM b WHERE t.id = b_id RETURNING id")
--   local rows = batch.run(session, MARK, { { 1, "a" }, { 2, "b" } })
--
-- The rows go in as a VALUES list, a CTE named b (its columns best named
-- apart from the table's: RETURNING names the table's columns unqualified,
-- as SQLite wants, and PostgreSQL then finds no ambiguity), each value in a
-- CAST (PostgreSQL types the parameters by it).  A list of more than CHUNK
-- rows takes one statement per CHUNK; a shorter one is padded with NULL
-- rows, which match nothing (an INSERT ... SELECT skips them itself), to a
-- power of two: so a statement has few texts, each prepared once per
-- SQLite connection.  Used by durable flows (tide.jobs.flows), whose
-- changes touch the steps of a whole outcome batch at once.
local ipairs, select, unpack, concat, min = ipairs, select, unpack, table.concat, math.min

local M = {}

M.CHUNK = 64

--- A statement over b(cols) of `types` (SQL type names, one per column),
--- then `sql` (which may start with ", more AS (...)" to add CTEs).
function M.statement(cols, types, sql)
  return { cols = cols, types = types, sql = sql, texts = {} }
end

local function text_of(st, size)
  local text = st.texts[size]
  if text then return text end
  local one = {}
  for i, t in ipairs(st.types) do one[i] = "CAST(? AS " .. t .. ")" end
  local row, rows = "(" .. concat(one, ", ") .. ")", {}
  for i = 1, size do rows[i] = row end
  text = "WITH b(" .. st.cols .. ") AS (VALUES " .. concat(rows, ", ") .. ") " .. st.sql
  st.texts[size] = text
  return text
end

--- Runs st on `session` over `rows` (each a list of values in b's column
--- order), with `...` as the parameters after b's; returns every row it
--- returned, all chunks together.
function M.run(session, st, rows, ...)
  local out, ncol, nextra = {}, #st.types, select("#", ...)
  for from = 1, #rows, M.CHUNK do
    local n = min(M.CHUNK, #rows - from + 1)
    local size = 1
    while size < n do size = size * 2 end
    local params = {}
    for i = 0, n - 1 do
      local r = rows[from + i]
      for c = 1, ncol do params[i * ncol + c] = r[c] end
    end
    for i = 1, nextra do params[size * ncol + i] = select(i, ...) end
    local got = session:query(text_of(st, size), unpack(params, 1, size * ncol + nextra))
    for i = 1, #got do out[#out + 1] = got[i] end
  end
  return out
end

return M
