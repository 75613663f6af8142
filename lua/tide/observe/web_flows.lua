--- tide.observe.web_flows — the dashboard's pages for durable flow runs: the runs, a run with its graph, cancel and retry.
--
-- A run's graph is drawn here, on the server, as SVG: steps in columns by
-- depth (the longest chain of dependencies before them), coloured by
-- status with tide.flow.graph's colours, every name escaped.  A run of
-- more than SVG_MAX steps is shown as its table only.
local graph = require "tide.flow.graph"
local core = require "tide.core"
local html = require "tide.observe.html"
local json = require "tide.jobs.json"

local h, link, num, badge, iso, when, field = html.h, html.link, html.num, html.badge, html.iso, html.when, html.field
local as_id = html.id
local tostring, tonumber, ipairs, pcall = tostring, tonumber, ipairs, pcall
local concat, format, floor, max = table.concat, string.format, math.floor, math.max

local PAGE = 50
local SVG_MAX = 400
local STATUSES = { "running", "ok", "error", "cancelled" }


local function dur(n)
  if not n then return '<span class="muted">-</span>' end
  if n < 1000 then return h(format("%d ms", n)) end
  return h(format("%.1f s", n / 1000))
end

-- ===== the graph as SVG

local NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150, 30, 50, 12, 10

--- Columns by depth (iteratively: a chain may be long).
local function layout(steps)
  local by, depth, order = {}, {}, {}
  for _, s in ipairs(steps) do by[s.name] = s end
  local left, queue, head, dependents = {}, {}, 1, {}
  for _, s in ipairs(steps) do
    left[s.name] = #s.after
    for _, d in ipairs(s.after) do
      dependents[d] = dependents[d] or {}
      dependents[d][#dependents[d] + 1] = s.name
    end
    if #s.after == 0 then queue[#queue + 1] = s.name; depth[s.name] = 0 end
  end
  while head <= #queue do
    local name = queue[head]
    head = head + 1
    order[#order + 1] = name
    for _, d in ipairs(dependents[name] or {}) do
      depth[d] = max(depth[d] or 0, depth[name] + 1)
      left[d] = left[d] - 1
      if left[d] == 0 then queue[#queue + 1] = d end
    end
  end
  local cols, pos = {}, {}
  for _, name in ipairs(order) do
    local c = depth[name] + 1
    cols[c] = cols[c] or {}
    local col = cols[c]
    col[#col + 1] = name
    pos[name] = { x = PAD + (c - 1) * (NODE_W + GAP_X), y = PAD + (#col - 1) * (NODE_H + GAP_Y) }
  end
  local rows = 0
  for _, col in ipairs(cols) do rows = max(rows, #col) end
  return pos, by, #cols, rows
end

local function short(name)
  if #name <= 20 then return name end
  return name:sub(1, 18) .. "…"
end

--- The run's graph as an <svg> element.
local function svg(run)
  local pos, by, ncols, nrows = layout(run.steps)
  local width = PAD * 2 + ncols * NODE_W + max(ncols - 1, 0) * GAP_X
  local height = PAD * 2 + nrows * NODE_H + max(nrows - 1, 0) * GAP_Y
  local out = { ('<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
    .. 'role="img" aria-label="%s">'):format(width, height, width, height, h("graph of run " .. run.id)) }
  for _, s in ipairs(run.steps) do                          -- edges first, under the nodes
    local to = pos[s.name]
    for _, d in ipairs(s.after) do
      local from = pos[d]
      if from and to then
        out[#out + 1] = ('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#98a2b3" stroke-width="1"/>'):format(
          from.x + NODE_W, from.y + NODE_H / 2, to.x, to.y + NODE_H / 2)
      end
    end
  end
  for _, s in ipairs(run.steps) do
    local p = pos[s.name]
    if p then
      local fill = graph.COLORS[s.status] or "#ffffff"
      out[#out + 1] = concat{
        '<g class="step" data-step="', h(s.name), '" data-status="', h(s.status), '"><title>', h(s.name), ": ",
        h(s.status), s.error and (" — " .. h(s.error)) or "", "</title>",
        ('<rect x="%d" y="%d" width="%d" height="%d" rx="6" fill="%s" stroke="#667085"%s/>'):format(
          p.x, p.y, NODE_W, NODE_H, h(fill), by[s.name].each and ' stroke-dasharray="4 2"' or ""),
        ('<text x="%d" y="%d" font-size="12" font-family="sans-serif" fill="#1c2430">'):format(p.x + 8, p.y + 19),
        h(short(s.name)), "</text></g>" }
    end
  end
  out[#out + 1] = "</svg>"
  return concat(out)
end

-- ===== the runs

local function runs_page(ctx)
  local req, q = ctx.req, ctx.q
  local status = req.query.status
  local known = false
  for _, st in ipairs(STATUSES) do if st == status then known = true end end
  if not known then status = nil end
  local before = as_id(req.query.before)
  local ok, runs = pcall(q.flow_runs, q, { status = status, limit = PAGE + 1, before = before })
  if not ok then return ctx:fail(503, "the store could not be read: " .. tostring(runs)) end
  local opts = { '<option value="">all statuses</option>' }
  for _, st in ipairs(STATUSES) do
    opts[#opts + 1] = ('<option value="%s"%s>%s</option>'):format(h(st), st == status and " selected" or "", h(st))
  end
  local rows = {}
  for i = 1, math.min(#runs, PAGE) do
    local r = runs[i]
    local c = r.steps or {}
    rows[#rows + 1] = concat{
      '<tr><td class="num"><a href="/flows/', format("%d", r.id), '">', format("%d", r.id), "</a></td>",
      "<td>", h(r.flow), "</td><td>", badge(r.status), '</td><td class="num">',
      h(format("%d/%d", (c.ok or 0) + (c.skipped or 0), c.total or 0)), "</td><td>", when(r.inserted_at, ctx.now), "</td>",
      '<td class="num">', dur(r.duration), "</td><td>", h(r.key or ""), '</td><td class="err" title="', h(r.error),
      '">', h(r.error), "</td></tr>" }
  end
  local body = {
    "<h1>Flow runs</h1>",
    '<form class="filters" method="get" action="/flows"><label>Status <select name="status">', concat(opts),
    '</select></label><button type="submit">Filter</button></form>',
    '<table id="runs"><thead><tr><th class="num">ID</th><th>Flow</th><th>Status</th><th class="num">Done</th>',
    '<th>Started</th><th class="num">Duration</th><th>Key</th><th>Error</th></tr></thead><tbody>',
    #rows > 0 and concat(rows) or '<tr><td colspan="8" class="muted">No run matches.</td></tr>',
    "</tbody></table>" }
  if #runs > PAGE then
    body[#body + 1] = ('<p class="pager"><a href="%s">Older runs &rarr;</a></p>')
      :format(h(link("/flows", { status = status, before = runs[PAGE].id })))
  end
  return ctx:page("Flow runs", concat(body))
end

-- ===== one run

local function run_page(ctx, id)
  local q = ctx.q
  if not as_id(id) then return ctx:fail(404, "run " .. id .. " not found") end
  local ok, run = pcall(q.flow_run, q, as_id(id))
  if not ok then return ctx:fail(503, "the store could not be read: " .. tostring(run)) end
  if not run then return ctx:fail(404, "run " .. id .. " not found") end
  local back = "/flows/" .. format("%d", run.id)
  local actions = {}
  if run.status == "running" then
    actions[#actions + 1] = ctx:button(back .. "/cancel", "Cancel run", { back = back }, "danger")
  elseif run.status ~= "ok" then
    actions[#actions + 1] = ctx:button(back .. "/retry", "Retry failed and skipped steps", { back = back })
  end
  local rows, errors = {}, {}
  for _, s in ipairs(run.steps) do
    local note = s.error or s.reason or (s.items and format("%d/%d items", s.items.done, s.items.total)) or ""
    rows[#rows + 1] = concat{
      "<tr><td>", h(s.name), "</td><td>", badge(s.status), '</td><td class="num">', h(s.attempts), "</td>",
      '<td class="num">', dur(s.duration), "</td><td>", h(#s.after > 0 and concat(s.after, ", ") or "-"), "</td>",
      "<td>", s.job and ('<a href="/jobs/' .. format("%d", s.job) .. '">' .. format("%d", s.job) .. "</a>") or "", "</td>",
      '<td class="err" title="', h(note), '">', h(note), "</td></tr>" }
    if s.error then
      errors[#errors + 1] = concat{ "<h2>", h(s.name), " ", badge(s.status), '</h2><pre class="err-text">', h(s.error),
        s.traceback and ("\n\n" .. h(s.traceback)) or "", "</pre>" }
    end
  end
  local picture = #run.steps <= SVG_MAX and ('<div class="graph">' .. svg(run) .. "</div>")
    or ('<p class="muted">%d steps: too many to draw here (<code>tide flows graph %d</code> prints DOT or Mermaid).</p>')
       :format(#run.steps, run.id)
  local body = concat{
    "<h1>Run ", format("%d", run.id), " ", badge(run.status), "</h1>",
    #actions > 0 and ("<p>" .. concat(actions, " ") .. "</p>") or "",
    "<dl>", field("Flow", h(run.flow)), field("Key", run.key and h(run.key) or '<span class="muted">none</span>'),
    field("Queue", h(run.queue)), field("Input", '<code id="input">' .. h(json.encode(run.input)) .. "</code>"),
    field("Started", when(run.inserted_at, ctx.now)), field("Finished", when(run.completed_at, ctx.now)),
    field("Duration", dur(run.duration)), field("Error", run.error and ('<span class="err">' .. h(run.error) .. "</span>")
      or '<span class="muted">none</span>'),
    "</dl><h2>Graph</h2>", picture,
    '<h2>Steps</h2><table id="steps"><thead><tr><th>Step</th><th>Status</th><th class="num">Attempts</th>',
    '<th class="num">Duration</th><th>After</th><th>Job</th><th>Note</th></tr></thead><tbody>', concat(rows),
    "</tbody></table>", #errors > 0 and ("<h2>Errors</h2>" .. concat(errors)) or "" }
  return ctx:page("Run " .. run.id, body)
end

-- ===== actions (POST, CSRF checked by tide.observe.web)

local OPS = { cancel = "cancel_flow", retry = "retry_flow" }

local function run_action(ctx, id, op)
  local method = OPS[op]
  if not method or not as_id(id) then return ctx:fail(404, "404 not found") end
  local q = ctx.q
  local ok, changed, why = pcall(q[method], q, as_id(id))
  if not ok then return ctx:fail(503, "the store could not be changed: " .. tostring(changed)) end
  if not changed then return ctx:fail(409, "409 conflict: " .. tostring(why)) end
  return ctx:redirect(ctx:back())
end

return {
  svg = svg,
  nav = { { path = "/flows", title = "Flows" } },
  routes = {
    { method = "GET", pattern = "^/flows$", fn = runs_page },
    { method = "GET", pattern = "^/flows/(%d+)$", fn = run_page },
    { method = "POST", pattern = "^/flows/(%d+)/(%a+)$", fn = run_action },
  },
}
