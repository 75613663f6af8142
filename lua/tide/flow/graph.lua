--- tide.flow.graph — a flow drawn as DOT or Mermaid text, coloured by status after a run.
local ipairs, concat = ipairs, table.concat

local M = {}

local COLORS = { ok = "#b7e4c7", error = "#f4a6a6", timeout = "#f9d78c", skipped = "#dddddd",
                 cancelled = "#cfcfe8", running = "#a9d6f5", queued = "#e3f1fb", pending = "#ffffff" }
M.COLORS = COLORS

local STATUS_ORDER = { "pending", "queued", "running", "ok", "error", "timeout", "skipped", "cancelled" }

local function label(node)
  if node.each then return node.name .. " (each)" end
  if node.flow then return node.name .. " (flow " .. node.flow.name .. ")" end
  return node.name
end

--- The graph as DOT or Mermaid text; with a report (or after a run), nodes
--- are coloured by status.
function M.draw(f, format, report)
  local out = {}
  local function status_of(name) return report and report.tasks[name] and report.tasks[name].status end
  if format == "dot" then
    out[#out + 1] = ("digraph %q {"):format(f.name)
    out[#out + 1] = '  rankdir=LR;\n  node [shape=box, style="rounded,filled", fillcolor="#ffffff"];'
    for _, name in ipairs(f.order) do
      local st = status_of(name)
      out[#out + 1] = ("  %q [label=%q%s];"):format(name, label(f.nodes[name]) .. (st and (" — " .. st) or ""),
        st and (", fillcolor=%q"):format(COLORS[st] or "#ffffff") or "")
    end
    for _, name in ipairs(f.order) do
      for _, dep in ipairs(f.nodes[name].after) do out[#out + 1] = ("  %q -> %q;"):format(dep, name) end
    end
    out[#out + 1] = "}"
  else
    local ids = {}                          -- n1, n2, ...: any name is safe as a label, not as an id
    for i, name in ipairs(f.order) do ids[name] = "n" .. i end
    local function id(name) return ids[name] end
    out[#out + 1] = "flowchart LR"
    for _, name in ipairs(f.order) do
      local node, st = f.nodes[name], status_of(name)
      local text = label(node) .. (st and (" — " .. st) or "")
      local open, close = "[", "]"
      if node.each then open, close = "[[", "]]" end
      out[#out + 1] = ('  %s%s"%s"%s'):format(id(name), open, text:gsub('"', "'"), close)
    end
    for _, name in ipairs(f.order) do
      for _, dep in ipairs(f.nodes[name].after) do out[#out + 1] = ("  %s --> %s"):format(id(dep), id(name)) end
    end
    if report then
      local used = {}
      for _, name in ipairs(f.order) do used[status_of(name) or ""] = true end
      for _, st in ipairs(STATUS_ORDER) do
        if used[st] then out[#out + 1] = ("  classDef %s fill:%s"):format(st, COLORS[st]) end
      end
      for _, name in ipairs(f.order) do
        local st = status_of(name)
        if st then out[#out + 1] = ("  class %s %s"):format(id(name), st) end
      end
    end
  end
  return concat(out, "\n") .. "\n"
end

return M
