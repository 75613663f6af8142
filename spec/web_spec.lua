-- spec/web_spec.lua — `tide web` in a real headless Chromium (spec/browser/cdp.py) and
-- under curl: the job list, the status filter, a retry clicked in the page, the token,
-- the CSRF check, and args holding a script shown as text.
local H = spec_helper
local cjson = require "cjson"

local NO_PRELOAD = "env -u LD_PRELOAD "       -- chromium and python are not built with the sanitizers

local start_web, stop_web = H.start_web, H.stop_web

--- Runs the steps in Chromium; returns cdp.py's report.
local function browse(dir, steps)
  local path = H.write_file(dir, "steps.json", cjson.encode(steps))
  local status, out = H.sh(NO_PRELOAD .. "timeout 90 /usr/bin/python3 spec/browser/cdp.py " .. path)
  assert(status == 0, "cdp.py failed: " .. out)
  local report = cjson.decode(out:match("(%b{})%s*$"))
  assert(report.error == cjson.null, "in the browser: " .. tostring(report.error))
  return report
end

local curl = H.curl                   -- curl(args): the status code and the body

local function job_status(store, id)
  local tide = require "tide"
  local q = tide.queue.open(store)
  local job = q:job(id)
  q:close()
  return job and job.status
end

describe("tide web", function()
  local dir, store, w
  local ids = {}

  setup(function()
    dir = H.tempdir()
    store = "sqlite:" .. dir .. "/jobs.db"
    local tide = require "tide"
    local q = tide.queue.open(store)
    for i = 1, 4 do
      ids["order" .. i] = q:enqueue{ target = "orders", method = "fulfill", args = { order = i } }
    end
    ids.mail = q:enqueue{ target = "mail", method = "send", queue = "mail", args = { to = "ann@example.com" } }
    ids.discarded = q:enqueue{ target = "orders", method = "refund", args = { order = 9 } }
    assert.is_true(q:fail(ids.discarded, "card declined"))
    ids.xss = q:enqueue{ target = "orders", method = "note", args = { note = "<script>alert(1)</script>" } }
    ids.cancel_me = q:enqueue{ target = "orders", method = "fulfill", args = { order = 10 } }
    -- cancelled while it ran, its worker not yet told: it holds its lease
    ids.stopping = q:enqueue{ target = "orders", method = "fulfill", args = { order = 11 } }
    q:transaction(function(tx)
      tx:exec("UPDATE tide_jobs SET status = 'cancelled', attempt = 1, lease_owner = 'host:7:1', "
        .. "lease_expires = 9999999999999 WHERE id = ?", ids.stopping)
    end)
    q:close()
    w = start_web(dir, store)
  end)

  teardown(function()
    stop_web(w)
    os.execute("rm -rf " .. dir)
  end)

  describe("in headless Chromium", function()
    local report
    setup(function()
      local rows = "Array.from(document.querySelectorAll('#jobs tbody tr td:first-child a')).map(function (a) { return +a.textContent })"
      report = browse(dir, {
        { ["goto"] = w.base .. "/jobs" },
        { eval = "document.title", as = "no_token_title" },
        { ["goto"] = w.url },                                         -- the token once: then the cookie
        { eval = "location.pathname", as = "landed" },
        { ["goto"] = w.base .. "/jobs" },
        { eval = rows, as = "all" },
        { ["goto"] = w.base .. "/jobs?status=discarded" },
        { eval = rows, as = "discarded" },
        { click = ("form[action='/jobs/%d/retry'] button"):format(ids.discarded) },
        { eval = "location.pathname + location.search", as = "after_retry" },
        { eval = rows, as = "discarded_after" },
        { ["goto"] = w.base .. "/jobs/" .. ids.xss },
        { eval = "document.getElementById('args').textContent", as = "args_text" },
        { eval = "document.getElementById('args').innerHTML", as = "args_html" },
        { eval = "document.querySelectorAll('main script').length", as = "scripts_in_main" },
        { sleep = 500 },                                              -- a dialog would open by now
        { ["goto"] = w.base .. "/jobs" },
        { sleep = 300 },
      })
    end)

    it("asks for the token before anything else", function()
      assert.equal("tide: token needed", report.results.no_token_title)
      assert.equal("/", report.results.landed)
    end)

    it("lists the jobs the test enqueued, newest first", function()
      local want = {}
      for _, id in pairs(ids) do want[#want + 1] = id end
      table.sort(want, function(a, b) return a > b end)
      assert.same(want, report.results.all)
    end)

    it("narrows the list to the status filtered on", function()
      assert.same({ ids.discarded }, report.results.discarded)
    end)

    it("makes a discarded job available when its Retry button is clicked", function()
      assert.equal("/jobs?status=discarded", report.results.after_retry)
      assert.same({}, report.results.discarded_after)
      assert.equal("available", job_status(store, ids.discarded))
    end)

    it("shows args holding <script> as text, and no dialog fires", function()
      assert.matches('"note": "<script>alert(1)</script>"', report.results.args_text, 1, true)
      assert.matches("&lt;script&gt;alert(1)&lt;/script&gt;", report.results.args_html, 1, true)
      assert.equal(0, report.results.scripts_in_main)
      assert.same({}, report.dialogs)
      assert.same({}, report.console)
    end)
  end)

  describe("under curl", function()
    it("answers 401 without the token, or with a wrong one", function()
      assert.equal(401, (curl(w.base .. "/jobs")))
      assert.equal(401, (curl(w.base .. "/jobs?token=0123456789abcdef")))
      assert.equal(401, (curl("-H 'Authorization: Bearer nope-nope-nope' " .. w.base .. "/jobs")))
      assert.equal(401, (curl("-X POST -d back=/ " .. w.base .. "/jobs/" .. ids.cancel_me .. "/cancel")))
      assert.equal(200, (curl("-H 'Authorization: Bearer " .. w.token .. "' " .. w.base .. "/jobs")))
    end)

    it("refuses a POST without the CSRF token, or from another origin", function()
      local auth = "-H 'Authorization: Bearer " .. w.token .. "' "
      local action = w.base .. "/jobs/" .. ids.cancel_me .. "/cancel"
      local code, body = curl(auth .. "-X POST -d back=/ " .. action)
      assert.equal(403, code)
      assert.matches("CSRF", body)
      assert.equal(403, (curl(auth .. "-X POST -d csrf=0123456789abcdef0123456789abcdef " .. action)))
      local _, page = curl(auth .. w.base .. "/jobs")
      local csrf = page:match('name="csrf" value="(%x+)"')
      assert.is_truthy(csrf)
      assert.equal(403, (curl(auth .. "-H 'Origin: http://evil.example' -X POST -d csrf=" .. csrf .. " " .. action)))
      assert.equal(403, (curl(auth .. "-H 'Sec-Fetch-Site: cross-site' -X POST -d csrf=" .. csrf .. " " .. action)))
      assert.equal(405, (curl(auth .. "-X DELETE " .. action)))
      assert.equal("available", job_status(store, ids.cancel_me))   -- nothing changed so far
      -- the same request with the page's token does change it: the check can pass
      assert.equal(303, (curl(auth .. "-X POST -d csrf=" .. csrf .. " " .. action)))
      assert.equal("cancelled", job_status(store, ids.cancel_me))
      -- a GET never changes anything
      assert.equal(404, (curl(auth .. action)))
    end)

    it("offers no Retry for a job still stopping, and says it is stopping", function()
      local auth = "-H 'Authorization: Bearer " .. w.token .. "' "
      local stop_id = ("%d"):format(ids.stopping)
      for _, path in ipairs{ "/jobs?status=cancelled", "/jobs/" .. stop_id } do
        local code, page = curl(auth .. w.base .. path)
        assert.equal(200, code)
        assert.is_nil(page:find("/jobs/" .. stop_id .. "/retry", 1, true), path)
        assert.truthy(page:find('<span class="muted">stopping</span>', 1, true), path)
      end
      local _, list = curl(auth .. w.base .. "/jobs?status=discarded")
      assert.is_nil(list:find('<span class="muted">stopping</span>', 1, true))
    end)

    it("applies an action in bulk to what the filter matches", function()
      local auth = "-H 'Authorization: Bearer " .. w.token .. "' "
      local _, page = curl(auth .. w.base .. "/jobs")
      local csrf = page:match('name="csrf" value="(%x+)"')
      local code = curl(auth .. "-X POST -d csrf=" .. csrf .. " -d action=cancel -d status=available -d queue=mail "
                        .. w.base .. "/jobs/bulk")
      assert.equal(303, code)
      assert.equal("cancelled", job_status(store, ids.mail))
      assert.equal("available", job_status(store, ids.order1))       -- another queue: untouched
      -- a status the action cannot change is refused, saying so
      local code2, body = curl(auth .. "-X POST -d csrf=" .. csrf .. " -d action=retry -d status=available "
                               .. w.base .. "/jobs/bulk")
      assert.equal(400, code2)
      assert.matches("available jobs cannot be retried", body, 1, true)
      -- a queue or target the filter cannot take is refused, not dropped (which would change every queue's)
      for _, field in ipairs{ "queue=a%20b", "target=%3Cx%3E" } do
        local code3, body3 = curl(auth .. "-X POST -d csrf=" .. csrf .. " -d action=cancel -d status=available -d "
                                  .. field .. " " .. w.base .. "/jobs/bulk")
        assert.equal(400, code3, field)
        assert.matches("bad " .. field:match("^%a+"), body3, 1, true)
      end
      assert.equal("available", job_status(store, ids.order1))       -- still untouched
    end)

    it("survives requests that do not parse, and garbage in every field", function()
      local auth = "-H 'Authorization: Bearer " .. w.token .. "' "
      assert.equal(404, (curl(auth .. w.base .. "/jobs/99999999")))
      assert.equal(200, (curl(auth .. "'" .. w.base .. "/jobs?status=%3Cscript%3E&queue=%00&before=-1&target=a%22b'")))
      local _, raw = H.sh("printf 'GET /\\r\\nBROKEN\\r\\n\\r\\n' | env -u LD_PRELOAD curl -s --max-time 2 telnet://" .. w.base:match("//(.*)$"))
      assert.matches("400 Bad Request", raw)
      assert.equal(200, (curl(auth .. w.base .. "/")))                -- still serving
    end)
  end)
end)

describe("tide.web from Lua", function()
  local tide = require "tide"
  local dir
  setup(function() dir = H.tempdir() end)
  teardown(function() os.execute("rm -rf " .. dir) end)
  after_each(function() H.assert_idle() end)

  local function fetch(url)
    local t = tide.spawn{ mode = "thread", args = { url }, run = function(u)
      local f = io.popen("env -u LD_PRELOAD curl -s -H 'Authorization: Bearer the-lua-token' '" .. u .. "'")
      local s = f:read("*a")
      f:close()
      return s
    end }
    local _, out = t:await()
    return out
  end

  it("shows encrypted args decrypted only where the process has the encryptor", function()
    local enc = { encrypt = function(s) return (s:reverse()) end, decrypt = function(s) return (s:reverse()) end }
    local with, without
    H.run(function()
      local q = tide.queue.open("sqlite:" .. dir .. "/enc.db", { encryptor = enc })
      local id = q:enqueue{ target = "cards", method = "charge", args = { card = "4242-SECRET" } }
      local srv = assert(tide.web.serve{ queue = q, port = 0, token = "the-lua-token" })
      with = fetch(srv:url("/jobs/" .. id))
      srv:close()
      local plain = tide.queue.open("sqlite:" .. dir .. "/enc.db")
      srv = assert(tide.web.serve{ queue = plain, port = 0, token = "the-lua-token" })
      without = fetch(srv:url("/jobs/" .. id))
      srv:close()
      q:close()
      plain:close()
    end)
    assert.matches("4242-SECRET", with, 1, true)
    assert.matches("Decrypted with this process", with, 1, true)
    assert.not_matches("4242", without, 1, true)
    assert.matches("Encrypted: this process has no encryptor", without, 1, true)
  end)

  it("rejects bad options with messages that name them", function()
    local q = tide.queue.open("sqlite:" .. dir .. "/opts.db")
    H.error_cases("spec/web_spec.lua", {
      { function() tide.web.serve{} end,
        "tide.web.serve: bad option 'queue' (queue (from tide.queue.open) expected, got nil)" },
      { function() tide.web.serve{ queue = q, token = "short" } end,
        "tide.web.serve: bad option 'token' (string of at least 8 letters, digits or -_.~ expected, got string \"short\")" },
      { function() tide.web.serve{ queue = q, port = "80" } end,
        "tide.web.serve: bad option 'port' (integer 0..65535 expected, got string \"80\")" },
      { function() tide.web.handler{ queue = q, prot = 1 } end, "tide.web.handler: unknown option 'prot'" },
    })
    q:close()
  end)
end)
