-- spec/cli_flows_spec.lua — `tide flows`, driven through the real binary against a SQLite store
-- holding runs of spec/fixtures/dflow_stop.lua made by a `tide run` script.
require "tide"
local H = spec_helper
local TIDE = H.build .. "/tide"

local dir = H.tempdir()
local STORE = "sqlite:" .. dir .. "/flows.db"

local tide, tide_json = H.cli(dir)

--- Runs `tide flows --store STORE REST`; returns the exit status, stdout and stderr.
local function flows(rest, store) return tide("flows", store or STORE, rest) end

--- Runs `tide flows --store STORE REST --json`, which must exit 0; returns its output decoded.
local function flows_json(rest) return tide_json("flows", STORE, rest) end

--- Starts a run of dflow_stop (its `bad` step fails unless FIXED) and
--- drains it with a worker; returns the run id.
local function make_run(fixed, key)
  local script = H.write_file(dir, "run.lua", ([[
    package.path = "spec/fixtures/?.lua;" .. package.path
    local tide = require "tide"
    _G.DFLOW = { calls = {}, fixed = %s, slow = 1 }
    local q = tide.queue.open(%q)
    local id = q:enqueue_flow("dflow_stop", { day = 2 }, { key = %q })
    tide.worker{ queue = q, poll = 20 }:drain{ stop = true, within = 1000 }
    io.write(id)
  ]]):format(tostring(fixed), STORE, key))
  local status, out = H.sh(("%s run %s"):format(TIDE, script))
  assert(status == 0, out)
  return tonumber(out:match("(%d+)$"))
end

teardown(function() os.execute("rm -rf " .. dir) end)

describe("tide flows", function()
  local failed_id

  setup(function() failed_id = make_run(false, "k-1") end)

  it("lists runs newest first as a table and as JSON", function()
    local ok_id = make_run(true, "k-2")
    local status, out = flows("list")
    assert.equal(0, status)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.truthy(lines[1]:find("^ID%s+FLOW%s+STATUS%s+DONE%s+FAILED%s+STARTED%s+DURATION%s+KEY%s+ERROR$"), lines[1])
    assert.truthy(lines[2]:find("^%s*" .. ok_id .. "%s+dflow_stop%s+ok%s+6/6%s+0%s"), lines[2])
    assert.truthy(lines[3]:find("^%s*" .. failed_id .. "%s+dflow_stop%s+error%s+%d/6%s+%d%s.*k%-1%s+step 'bad' error"), lines[3])
    local runs = flows_json("list --status error")
    assert.equal(1, #runs)
    assert.equal(failed_id, runs[1].id)
    assert.equal("error", runs[1].status)
    assert.equal(6, runs[1].steps.total)
    assert.same({}, flows_json("list --flow nothing_like_it"))
  end)

  it("shows a run: its steps with attempts, what they wait for, errors with tracebacks", function()
    local status, out = flows("show " .. failed_id)
    assert.equal(0, status)
    assert.truthy(out:find("status:   error\n", 1, true), out)
    assert.truthy(out:find("\nbad%s+error%s+2%s+%d+ ms%s+a%s+spec/fixtures/dflow_small.lua:%d+: bad: not fixe%.%.%."), out)
    assert.truthy(out:find("\nlater%s+cancelled%s+0%s+%-%s+bad,slow%s+step 'bad' error"), out)
    assert.truthy(out:find("\nstep bad error:\n    spec/fixtures/dflow_small.lua:%d+: bad: not fixed yet\n    stack traceback:"), out)
    local run = flows_json("show " .. failed_id)
    assert.equal("dflow_stop", run.flow)
    assert.same({ day = 2 }, run.input)
    local by = {}
    for _, s in ipairs(run.steps) do by[s.name] = s end
    assert.same({ a = 1 }, by.a.result)
    assert.same({ "bad", "slow" }, by.later.after)
    assert.equal(2, by.bad.attempts)
    assert.truthy(by.bad.traceback:find("stack traceback", 1, true))
  end)

  it("draws a run as DOT and Mermaid, coloured by status", function()
    local status, out = flows("graph " .. failed_id)
    assert.equal(0, status)
    assert.truthy(out:find('^digraph "dflow_stop #' .. failed_id .. '" {'), out)
    assert.truthy(out:find('"bad" [label="bad — error", fillcolor="#f4a6a6"];', 1, true), out)
    assert.truthy(out:find('"a" -> "bad";', 1, true), out)
    status, out = flows("graph " .. failed_id .. " --format mermaid")
    assert.equal(0, status)
    assert.truthy(out:find("^flowchart LR\n"), out)
    assert.truthy(out:find("classDef cancelled fill:#cfcfe8", 1, true), out)
    assert.truthy(out:find('[["fan (each) — ', 1, true), out)
  end)

  it("retries a failed run and cancels a running one, saying why not when it cannot", function()
    local status, out, err = flows("cancel " .. failed_id)
    assert.equal(1, status)
    assert.equal("tide flows: run " .. failed_id .. " is error\n", err)
    status, out = flows("retry " .. failed_id)
    assert.equal(0, status)
    assert.truthy(out:match(("^run %d will run %%d steps again\n$"):format(failed_id)), out)
    assert.same({ id = failed_id, status = "cancelled" }, flows_json("cancel " .. failed_id))
    local run = flows_json("show " .. failed_id)
    assert.equal("cancelled", run.status)
  end)

  it("refuses bad command lines with exit 2, and a missing store with 1", function()
    local cases = {
      { "", "tide flows: missing COMMAND" },
      { "fly", "tide flows: unknown command 'fly'" },
      { "show", "tide flows: show: missing RUN" },
      { "show x", "tide flows: show: bad RUN (run id, an integer >= 1 expected, got 'x')" },
      { "show 1 2", "tide flows: show: unexpected argument '2'" },
      { "list --format dot", "tide flows: --format is not an option of 'list'" },
      { "graph 1 --format png", "tide flows: bad --format (dot or mermaid expected, got 'png')" },
      { "list --status done", "tide flows: bad --status (one of running, ok, error, cancelled expected, got 'done')" },
    }
    for _, c in ipairs(cases) do
      local status, _, err = flows(c[1])
      assert.equal(2, status, c[1])
      assert.equal(c[2], err:match("^[^\n]*"), c[1])
    end
    local status, _, err = flows("list", "sqlite:" .. dir .. "/none.db")
    assert.equal(1, status)
    assert.truthy(err:find("no such file", 1, true))
    status = flows("--help")
    assert.equal(0, status)
  end)
end)
