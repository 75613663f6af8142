-- spec/web_flows_spec.lua — the dashboard's durable flow pages under curl: the runs, a run with
-- its SVG graph coloured by status, names and errors holding markup shown as text, the token,
-- and cancel/retry only through a POST with the CSRF token.
local H = spec_helper

package.path = "spec/fixtures/?.lua;" .. package.path

local start_web, curl = H.start_web, H.curl

describe("tide web: durable flow runs", function()
  local dir, store, w, failed_id, running_id
  local function get(path) return curl(("-H 'Authorization: Bearer %s' '%s%s'"):format(w.token, w.base, path)) end
  local function post(path, form)
    return curl(("-H 'Authorization: Bearer %s' -X POST --data '%s' '%s%s'"):format(w.token, form, w.base, path))
  end

  setup(function()
    dir = H.tempdir()
    store = "sqlite:" .. dir .. "/flows.db"
    local tide = require "tide"
    H.run(function()
      local q = tide.queue.open(store)
      failed_id = q:enqueue_flow("dflow_web", { note = "<script>alert(2)</script>" })
      tide.worker{ queue = q, poll = 20 }:drain{ stop = true, within = 1000 }
      running_id = q:enqueue_flow("dflow_web", {}, { key = "still-running" })   -- no worker: stays running
      q:close()
    end)
    w = start_web(dir, store)
  end)

  teardown(function()
    if w then H.sh("kill -TERM " .. w.pid) end
    os.execute("rm -rf " .. dir)
  end)

  it("needs the token", function()
    local code = curl(("'%s/flows'"):format(w.base))
    assert.equal(401, code)
    code = curl(("'%s/flows/%d'"):format(w.base, failed_id))
    assert.equal(401, code)
  end)

  it("lists the runs with their status, newest first, and filters by status", function()
    local code, body = get("/flows")
    assert.equal(200, code)
    local first = body:find('<a href="/flows/' .. running_id .. '">', 1, true)
    local second = body:find('<a href="/flows/' .. failed_id .. '">', 1, true)
    assert.truthy(first and second and first < second, body)
    assert.truthy(body:find('<span class="badge s-error">error</span>', 1, true))
    assert.truthy(body:find('<span class="badge s-running">running</span>', 1, true))
    assert.truthy(body:find('<a href="/flows" class="on">Flows</a>', 1, true))
    code, body = get("/flows?status=error")
    assert.equal(200, code)
    assert.falsy(body:find('<a href="/flows/' .. running_id .. '">', 1, true))
  end)

  it("shows a run with its graph drawn as SVG, coloured by status, every name and error escaped", function()
    local code, body = get("/flows/" .. failed_id)
    assert.equal(200, code)
    local svg = body:match('<svg id="graph".-</svg>')
    assert.truthy(svg, body)
    assert.truthy(svg:find('data-step="&lt;b&gt;fetch&lt;/b&gt;" data-status="ok"', 1, true), svg)
    assert.truthy(svg:find('data-step="parse&amp;&lt;script&gt;" data-status="error"', 1, true), svg)
    assert.truthy(svg:find('data-step="after_parse" data-status="skipped"', 1, true), svg)
    assert.truthy(svg:find('fill="#f4a6a6"', 1, true))                  -- error's colour
    assert.truthy(svg:find('fill="#b7e4c7"', 1, true))                  -- ok's
    assert.equal(2, select(2, svg:gsub("<line ", "")))                  -- its two edges
    assert.falsy(body:find("<script>", 1, true))
    assert.falsy(body:find("<img", 1, true))
    assert.falsy(body:find("<b>", 1, true))
    assert.truthy(body:find("&lt;img src=x onerror=alert(1)&gt;", 1, true))
    assert.truthy(body:find("&lt;script&gt;alert(2)&lt;/script&gt;", 1, true))
    code = get("/flows/99999")
    assert.equal(404, code)
  end)

  it("cancels and retries only through a POST carrying the CSRF token", function()
    local _, page = get("/flows/" .. running_id)
    local csrf = page:match('name="csrf" value="(%x+)"')
    assert.truthy(csrf, page)
    assert.truthy(page:find('action="/flows/' .. running_id .. '/cancel"', 1, true))
    local code = post(("/flows/%d/cancel"):format(running_id), "back=/flows")
    assert.equal(403, code)
    code = post(("/flows/%d/cancel"):format(running_id), "csrf=" .. csrf .. "&back=/flows/" .. running_id)
    assert.equal(303, code)
    local _, body = get("/flows/" .. running_id)
    assert.truthy(body:find('<h1>Run ' .. running_id .. ' <span class="badge s-cancelled">cancelled</span>', 1, true), body)
    code, body = post(("/flows/%d/cancel"):format(running_id), "csrf=" .. csrf)
    assert.equal(409, code)
    assert.truthy(body:find("run " .. running_id .. " is cancelled", 1, true))
    code = post(("/flows/%d/retry"):format(failed_id), "csrf=" .. csrf)
    assert.equal(303, code)
    _, body = get("/flows/" .. failed_id)
    assert.truthy(body:find('<span class="badge s-running">running</span>', 1, true), body)
    code = post(("/flows/%d/explode"):format(failed_id), "csrf=" .. csrf)
    assert.equal(404, code)
  end)
end)
