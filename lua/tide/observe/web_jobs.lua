--- tide.observe.web_jobs — the dashboard's pages for durable jobs: queues, job lists, a job, workers, and the actions.
--
-- Figures that need more than one page of rows come from the sampler
-- (tide.observe.sampler), so many open browsers cost the store one read
-- every few seconds: waiting and executing jobs exactly (partial indexes),
-- finished ones over the newest RECENT jobs (a bounded read by id).
local core = require "tide.core"
local worker = require "tide.jobs.worker"
local job = require "tide.jobs.job"
local json = require "tide.jobs.json"
local sampler = require "tide.observe.sampler"
local html = require "tide.observe.html"
local utf8 = require "tide.observe.utf8"

local h, link, num, badge, iso, when, field = html.h, html.link, html.num, html.badge, html.iso, html.when, html.field
local as_id, as_count = html.id, html.count
local type, tostring, tonumber, ipairs, pairs, pcall = type, tostring, tonumber, ipairs, pairs, pcall
local concat, sort, format, floor = table.concat, table.sort, string.format, math.floor


local RECENT = 10000          -- finished jobs are counted over the newest this many
local PAGE = 50               -- jobs per page
local BULK_MAX = 100000       -- jobs one bulk action changes at most
local WAITING = { "available", "scheduled", "retryable", "executing" }
local FINISHED = { "completed", "discarded", "cancelled", "expired" }
local ALL = { "available", "scheduled", "executing", "retryable", "completed", "discarded", "cancelled", "expired" }
local TERMINAL = { completed = true, discarded = true, cancelled = true, expired = true }
local SHOWN = 64 * 1024       -- bytes of a job's args or of an error text on its page

-- ===== formatting



--- JSON text of a decoded value, indented, keys sorted: for people to read.
local function pretty(v, indent)
  indent = indent or ""
  local tv = type(v)
  if v == nil or v == json.null then return "null"
  elseif tv == "boolean" then return tostring(v)
  elseif tv == "number" then
    if v == floor(v) and math.abs(v) < 2 ^ 53 then return format("%d", v) end
    return format("%.17g", v)
  elseif tv == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c)
      local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r" }
      return named[c] or format("\\u%04x", c:byte())
    end) .. '"'
  elseif tv ~= "table" then return '"(' .. tv .. ')"' end
  local inner = indent .. "  "
  local n, keys = #v, {}
  for k in pairs(v) do keys[#keys + 1] = k end
  if #keys == 0 then return "{}" end
  if n == #keys then
    local parts = {}
    for i = 1, n do parts[i] = inner .. pretty(v[i], inner) end
    return "[\n" .. concat(parts, ",\n") .. "\n" .. indent .. "]"
  end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = inner .. pretty(tostring(k)) .. ": " .. pretty(v[k], inner) end
  return "{\n" .. concat(parts, ",\n") .. "\n" .. indent .. "}"
end


-- ===== data (sampled)

local function backlog(q)
  local v, _, _, err = sampler.get(q, "backlog", 2000, function() return q:backlog() end)
  return v or {}, err
end

local function recent(q)
  local v, more = sampler.get(q, "recent", 5000, function() return q:recent(RECENT, 60000) end)
  return v or {}, more
end

local function queue_names(q)
  local names, seen = {}, {}
  for _, t in ipairs{ backlog(q), (recent(q)) } do
    for name in pairs(t) do if not seen[name] then seen[name] = true; names[#names + 1] = name end end
  end
  sort(names)
  return names
end

-- ===== the queues (the front page)

local function count_link(n, qname, status)
  if not n or n == 0 then return '<td class="num muted">0</td>' end
  return ('<td class="num"><a href="%s">%s</a></td>'):format(h(link("/jobs", { queue = qname, status = status })), num(n))
end

local function queues_page(ctx)
  local q = ctx.q
  local back, berr = backlog(q)
  local rec, more = recent(q)
  local names = queue_names(q)
  local totals = { waiting = 0, executing = 0, done = 0, failed = 0 }
  local rows = {}
  for _, name in ipairs(names) do
    local b, r = back[name] or {}, rec[name] or {}
    local cells = { "<tr><td><a href=\"", h(link("/jobs", { queue = name })), "\">", h(name), "</a></td>" }
    for _, st in ipairs(WAITING) do cells[#cells + 1] = count_link(b[st], name, st) end
    for _, st in ipairs(FINISHED) do cells[#cells + 1] = count_link(r[st] and r[st].n, name, st) end
    local done, failed = r.completed and r.completed.recent or 0, r.discarded and r.discarded.recent or 0
    cells[#cells + 1] = ('<td class="num">%s</td><td class="num">%s</td></tr>'):format(num(done), num(failed))
    rows[#rows + 1] = concat(cells)
    totals.waiting = totals.waiting + (b.available or 0) + (b.scheduled or 0) + (b.retryable or 0)
    totals.executing = totals.executing + (b.executing or 0)
    totals.done, totals.failed = totals.done + done, totals.failed + failed
  end
  local card = '<div class="card"><div class="v">%s</div><div class="k">%s</div></div>'
  local body = {
    "<h1>Queues</h1>",
    berr and ('<div class="msg">The store could not be read: %s</div>'):format(h(berr)) or "",
    '<div class="cards">', card:format(num(totals.waiting), "jobs waiting"),
    card:format(num(totals.executing), "executing"), card:format(num(totals.done), "completed in the last minute"),
    card:format(num(totals.failed), "discarded in the last minute"), "</div>",
    "<table><thead><tr><th>Queue</th>",
  }
  for _, st in ipairs(WAITING) do body[#body + 1] = '<th class="num">' .. st .. "</th>" end
  for _, st in ipairs(FINISHED) do body[#body + 1] = '<th class="num">' .. st .. "</th>" end
  body[#body + 1] = '<th class="num">completed/min</th><th class="num">discarded/min</th></tr></thead><tbody>'
  body[#body + 1] = #rows > 0 and concat(rows) or '<tr><td colspan="11" class="muted">No jobs yet.</td></tr>'
  body[#body + 1] = "</tbody></table>"
  body[#body + 1] = ('<p class="muted">Waiting and executing jobs: exact. Finished jobs: %s. Sampled every few seconds.</p>')
    :format(more and ("counted over the newest " .. num(RECENT) .. " jobs") or "all of them")
  return ctx:page("Queues", concat(body))
end

-- ===== job lists

local function filter_of(src)
  local f = {}
  if type(src.queue) == "string" and src.queue:match("^[%a_][%w_.%-]*$") then f.queue = src.queue end
  if type(src.status) == "string" and job.is_status[src.status] then f.status = src.status end
  if type(src.target) == "string" and src.target:match("^[%a_][%w_.%-]*$") then f.target = src.target end
  return f
end

local stopping = job.is_stopping   -- (it cannot be retried before its worker has stopped it)

--- The job's status badge, and "stopping" after it when it is.
local function status_of(job)
  return stopping(job) and badge(job.status) .. ' <span class="muted">stopping</span>' or badge(job.status)
end

local function actions_for(ctx, job, back)
  local out = {}
  local url = "/jobs/" .. format("%d", job.id)
  if job.status ~= "executing" and job.status ~= "available" and not stopping(job) then
    out[#out + 1] = ctx:button(url .. "/retry", "Retry", { back = back })
  end
  if not TERMINAL[job.status] then
    out[#out + 1] = ctx:button(url .. "/cancel", "Cancel", { back = back })
    out[#out + 1] = ctx:button(url .. "/discard", "Discard", { back = back }, "danger")
  end
  return concat(out, " ")
end

--- The text cut to SHOWN bytes at a character's edge, escaped, with a
--- note of what is left out and where it is whole (a job's args or error
--- text may be megabytes: the page carried them all).
local function clip(text, id)
  if #text <= SHOWN then return h(text) end
  local shown = utf8.cut(text, SHOWN)
  return h(shown) .. ('\n<span class="muted">… %d bytes more not shown (the whole: tide jobs show %d)</span>')
    :format(#text - #shown, id)
end

--- The first line of the job's last error, at most LINE bytes (cut at a
--- character's edge): a row of the list.
local LINE = 300
local function last_error(job)
  local e = job.errors and job.errors[#job.errors]
  local line = e and tostring(e.error):match("^[^\n]*") or ""
  if #line <= LINE then return line end
  return utf8.cut(line, LINE) .. "…"
end

local function select_box(name, current, choices, all_label)
  local out = { ('<select name="%s"><option value="">%s</option>'):format(h(name), h(all_label)) }
  for _, c in ipairs(choices) do
    out[#out + 1] = ('<option value="%s"%s>%s</option>'):format(h(c), c == current and " selected" or "", h(c))
  end
  out[#out + 1] = "</select>"
  return concat(out)
end

local MESSAGES = { retry = "retried", cancel = "cancelled", discard = "discarded" }

local function jobs_page(ctx)
  local req, q = ctx.req, ctx.q
  local f = filter_of(req.query)
  local before = as_id(req.query.before)
  local ok, jobs = pcall(q.list, q, { status = f.status, queue = f.queue, target = f.target,
                                      limit = PAGE + 1, before = before })
  if not ok then return ctx:fail(503, "the store could not be read: " .. tostring(jobs)) end
  local back = link("/jobs", { queue = f.queue, status = f.status, target = f.target, before = before })
  local body = { "<h1>Jobs</h1>" }
  local done, n = MESSAGES[req.query.done], as_count(req.query.n)
  if done and n then body[#body + 1] = ('<div class="msg">%s %s.</div>'):format(num(n), n == 1 and "job " .. done or "jobs " .. done) end
  body[#body + 1] = concat{
    '<form class="filters" method="get" action="/jobs">',
    "<label>Queue ", select_box("queue", f.queue, queue_names(q), "all queues"), "</label>",
    "<label>Status ", select_box("status", f.status, ALL, "all statuses"), "</label>",
    '<label>Target <input name="target" value="', h(f.target), '" placeholder="any"></label>',
    '<button type="submit">Filter</button></form>' }
  local rows = {}
  for i = 1, math.min(#jobs, PAGE) do
    local j = jobs[i]
    rows[#rows + 1] = concat{
      '<tr><td class="num"><a href="/jobs/', format("%d", j.id), '">', format("%d", j.id), "</a></td>",
      "<td>", h(j.queue), "</td><td>", h(j.target), ".", h(j.method), "</td><td>", status_of(j), "</td>",
      '<td class="num">', format("%d/%d", j.attempt, j.max_attempts), "</td><td>", when(j.run_at, ctx.now), "</td>",
      '<td class="err" title="', h(last_error(j)), '">', h(last_error(j)), "</td><td>", actions_for(ctx, j, back), "</td></tr>" }
  end
  body[#body + 1] = concat{
    '<table id="jobs"><thead><tr><th class="num">ID</th><th>Queue</th><th>Job</th><th>Status</th>',
    '<th class="num">Attempt</th><th>Run at</th><th>Last error</th><th></th></tr></thead><tbody>',
    #rows > 0 and concat(rows) or '<tr><td colspan="8" class="muted">No job matches.</td></tr>',
    "</tbody></table>" }
  if #jobs > PAGE then
    body[#body + 1] = ('<p class="pager"><a href="%s">Older jobs &rarr;</a></p>')
      :format(h(link("/jobs", { queue = f.queue, status = f.status, target = f.target, before = jobs[PAGE].id })))
  end
  if f.status then
    local fields = { queue = f.queue, status = f.status, target = f.target, back = back }
    local what = ("every %s job%s%s"):format(f.status, f.queue and (" of queue " .. f.queue) or "",
                                              f.target and (" with target " .. f.target) or "")
    local buttons = {}
    if f.status ~= "executing" and f.status ~= "available" then
      fields.action = "retry"; buttons[#buttons + 1] = ctx:button("/jobs/bulk", "Retry all", fields)
    end
    if not TERMINAL[f.status] then
      fields.action = "cancel"; buttons[#buttons + 1] = ctx:button("/jobs/bulk", "Cancel all", fields)
      fields.action = "discard"; buttons[#buttons + 1] = ctx:button("/jobs/bulk", "Discard all", fields, "danger")
    end
    if #buttons > 0 then
      body[#body + 1] = ('<div class="bulk">In bulk, %s (at most %s): %s</div>'):format(h(what), num(BULK_MAX), concat(buttons, " "))
    end
  end
  return ctx:page("Jobs", concat(body))
end

-- ===== one job

local function job_page(ctx, id)
  local q = ctx.q
  if not as_id(id) then return ctx:fail(404, "job " .. id .. " not found") end
  local ok, job = pcall(q.job, q, as_id(id))
  if not ok then return ctx:fail(503, "the store could not be read: " .. tostring(job)) end
  if not job then return ctx:fail(404, "job " .. id .. " not found") end
  local back = "/jobs/" .. format("%d", job.id)
  local args
  if job.args_error then
    args = job.encrypted and '<p class="muted">Encrypted: this process has no encryptor to read it.</p>'
      or ('<p class="err">%s</p>'):format(h(job.args_error))
  else
    args = (job.encrypted and '<p class="muted">Decrypted with this process\'s encryptor.</p>' or "")
      .. '<pre id="args">' .. clip(pretty(job.args), job.id) .. "</pre>"
  end
  local errors = {}
  for i = #job.errors, 1, -1 do
    local e = job.errors[i]
    errors[#errors + 1] = concat{
      "<h2>", e.attempt and ("Attempt " .. h(e.attempt)) or "Failure", ' <span class="muted">', h(iso(e.at)), " UTC</span></h2>",
      '<pre class="err-text">', clip(tostring(e.error), job.id), e.traceback and ("\n\n" .. clip(e.traceback, job.id)) or "",
      "</pre>" }
  end
  local body = concat{
    "<h1>Job ", format("%d", job.id), " ", status_of(job), "</h1>",
    "<p>", actions_for(ctx, job, back), "</p>",
    "<dl>",
    field("Job", h(job.target .. "." .. job.method)), field("Queue", h(job.queue)),
    field("Attempt", h(format("%d of %d", job.attempt, job.max_attempts))), field("Priority", h(job.priority)),
    field("Inserted", when(job.inserted_at, ctx.now)), field("Run at", when(job.run_at, ctx.now)),
    field("Attempted", when(job.attempted_at, ctx.now)), field("Finished", when(job.completed_at, ctx.now)),
    field("Idempotency key", job.idempotency_key and h(job.idempotency_key) or '<span class="muted">none</span>'),
    field("Lease", job.lease_owner and (h(job.lease_owner) .. ", expires " .. when(job.lease_expires, ctx.now)) or '<span class="muted">none</span>'),
    "</dl><h2>Arguments</h2>", args,
    #errors > 0 and concat(errors) or '<h2>Errors</h2><p class="muted">None.</p>' }
  return ctx:page("Job " .. job.id, body)
end

-- ===== workers

local function workers_page(ctx)
  local ok, leases = pcall(ctx.q.leases, ctx.q)
  if not ok then return ctx:fail(503, "the store could not be read: " .. tostring(leases)) end
  local by = {}
  for _, l in ipairs(leases) do
    local w = by[l.owner]
    if not w then w = { owner = l.owner, n = 0, queues = {}, attempted = 0, expires = 0 }; by[l.owner] = w end
    w.n = w.n + l.n
    w.queues[#w.queues + 1] = (l.stopping or 0) > 0 and ("%s (%d, %d stopping)"):format(l.queue, l.n, l.stopping)
                              or ("%s (%d)"):format(l.queue, l.n)
    w.attempted = math.max(w.attempted, l.attempted_at or 0)
    w.expires = math.max(w.expires, l.lease_expires or 0)
  end
  local list = {}
  for _, w in pairs(by) do list[#list + 1] = w end
  sort(list, function(a, b) return a.owner < b.owner end)
  local rows = {}
  for _, w in ipairs(list) do
    rows[#rows + 1] = concat{ "<tr><td>", h(w.owner), "</td><td>", h(concat(w.queues, ", ")), '</td><td class="num">',
      num(w.n), "</td><td>", when(w.attempted, ctx.now), "</td><td>", when(w.expires, ctx.now), "</td></tr>" }
  end
  local body = { "<h1>Workers</h1>", "<p class=\"muted\">Workers as the store sees them: those holding leases on "
    .. "running jobs, kept alive by their heartbeats. An idle worker holds no lease and is not listed.</p>",
    '<table><thead><tr><th>Worker</th><th>Queues (jobs)</th><th class="num">Running</th><th>Last claim</th>'
    .. "<th>Lease expires</th></tr></thead><tbody>",
    #rows > 0 and concat(rows) or '<tr><td colspan="5" class="muted">No worker holds a lease now.</td></tr>',
    "</tbody></table>" }
  local here = {}
  for w in pairs(worker.live) do
    local i = w:info()
    here[#here + 1] = concat{ "<tr><td>", h(i.id), "</td><td>", h(i.state), '</td><td class="num">', num(i.running),
      '</td><td class="num">', num(i.completed), '</td><td class="num">', num(i.retried), '</td><td class="num">',
      num(i.discarded), "</td></tr>" }
  end
  if #here > 0 then
    sort(here)
    body[#body + 1] = '<h2>In this process</h2><table><thead><tr><th>Worker</th><th>State</th><th class="num">Running</th>'
      .. '<th class="num">Completed</th><th class="num">Retried</th><th class="num">Discarded</th></tr></thead><tbody>'
      .. concat(here) .. "</tbody></table>"
  end
  return ctx:page("Workers", concat(body))
end

-- ===== actions (POST, CSRF checked by tide.observe.web)

local OPS = {
  retry = function(q, id) return q:retry(id) end,
  cancel = function(q, id) return q:cancel(id) end,
  discard = function(q, id) return q:fail(id, "discarded from the dashboard") end,
}

local function job_action(ctx, id, op)
  local fn = OPS[op]
  if not fn or not as_id(id) then return ctx:fail(404, "404 not found") end
  local ok, changed, why = pcall(fn, ctx.q, as_id(id))
  if not ok then return ctx:fail(503, "the store could not be changed: " .. tostring(changed)) end
  if not changed then return ctx:fail(409, "409 conflict: " .. tostring(why)) end
  return ctx:redirect(ctx:back())
end

local BULK_DONE = { retry = "retried", cancel = "cancelled", discard = "discarded" }
local BULK = {
  retry = function(q, f) return q:retry_all(f) end,
  cancel = function(q, f) return q:cancel_all(f) end,
  discard = function(q, f) return q:fail_all(f, "discarded from the dashboard") end,
}

--- Applies an action to every job the filter matches (BULK_MAX at most),
--- in batches of 1,000 jobs a statement (q:retry_all and its kin): a
--- statement each, not a transaction per job, so that 100,000 jobs take
--- seconds, well inside the handler's time.
local function bulk_action(ctx)
  local form = ctx.req:form()
  local fn = BULK[form.action]
  local f = filter_of(form)
  if not fn or not f.status then return ctx:fail(400, "400 bad request: an action and a status are needed") end
  for _, k in ipairs{ "queue", "target" } do       -- one dropped by filter_of would widen the change to every one
    if form[k] ~= nil and form[k] ~= "" and f[k] == nil then
      return ctx:fail(400, ("400 bad request: bad %s"):format(k))
    end
  end
  local ok, n = pcall(fn, ctx.q, { status = f.status, queue = f.queue, target = f.target, max = BULK_MAX })
  if not ok then
    if tostring(n):find("bad option 'status'", 1, true) then
      return ctx:fail(400, ("400 bad request: %s jobs cannot be %s"):format(f.status, BULK_DONE[form.action]))
    end
    return ctx:fail(503, "the store could not be changed: " .. tostring(n))
  end
  return ctx:redirect(link("/jobs", { queue = f.queue, status = f.status, target = f.target,
                                      done = form.action, n = n }))
end

return {
  pretty = pretty,
  nav = { { path = "/", title = "Queues" }, { path = "/jobs", title = "Jobs" }, { path = "/workers", title = "Workers" } },
  routes = {
    { method = "GET", pattern = "^/$", fn = queues_page },
    { method = "GET", pattern = "^/jobs$", fn = jobs_page },
    { method = "GET", pattern = "^/jobs/(%d+)$", fn = job_page },
    { method = "GET", pattern = "^/workers$", fn = workers_page },
    { method = "POST", pattern = "^/jobs/bulk$", fn = bulk_action },
    { method = "POST", pattern = "^/jobs/(%d+)/(%a+)$", fn = job_action },
  },
}
