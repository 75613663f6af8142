-- spec/review_cli_spec.lua — a hostile review of the command line: bad input to `tide enqueue`, `tide jobs`,
-- `tide flows` and `tide worker`, through the real binary against temporary SQLite stores.  The promise: a
-- clear error naming the command, the option and what was expected; never a traceback for a user's mistake;
-- no job row changed by a command that is refused (or by one that names another job than the one it was given).
require "tide"
local H = spec_helper
local cjson = require "cjson"
local TIDE = H.build .. "/tide"

local dir = H.tempdir()
local nstores = 0
local function fresh_store()
  nstores = nstores + 1
  return ("sqlite:%s/cli%d.db"):format(dir, nstores)
end

local read = H.file_bytes

--- tide(cmd, store, rest): the exit status, stdout and stderr of `tide CMD --store STORE REST`;
--- tide_json(...): that command's JSON output (it must exit 0).
local tide, tide_json = H.cli(dir)

--- Every job of the store as JSON text, to compare before and after a refused command.
local function rows(store)
  local q = require("tide").queue.open(store)
  local out = q:transaction(function(tx)
    return tx:query("SELECT id, status, queue, attempt, errors FROM tide_jobs ORDER BY id")
  end)
  q:close()
  return cjson.encode(out)
end

--- Checks one refused command line: exit 2, stderr starts with `pattern`, no traceback, nothing on stdout.
local function refused(cmd, store, rest, pattern)
  local status, out, err = tide(cmd, store, rest)
  local what = ("tide %s %s: exit %s, stderr:\n%s"):format(cmd, rest, tostring(status), err)
  assert(status == 2, what)
  assert(err:match("^" .. pattern), what)
  assert(not err:match("stack traceback") and not err:match("%.lua:%d+:"), what)
  assert.equal("", out)
end

teardown(function() os.execute("rm -rf " .. dir) end)

describe("the command line under bad input", function()
  it("refuses a job id above 2^53 instead of acting on the job it rounds to", function()
    local store = fresh_store()
    tide("enqueue", store, "orders fulfill")
    tide("enqueue", store, "orders fulfill")
    -- job 2 becomes 2^53, the last id a double holds exactly; 2^53 + 1 reads as 2^53
    local q = require("tide").queue.open(store)
    q:transaction(function(tx) tx:exec("UPDATE tide_jobs SET id = 9007199254740992 WHERE id = 2") end)
    q:close()
    local before = rows(store)
    for _, c in ipairs{ "cancel", "expire", "fail", "retry", "show" } do
      refused("jobs", store, c .. " 9007199254740993",
              ("tide jobs: %s: bad ID %%(job id, an integer >= 1 expected, got '9007199254740993'%%)"):format(c))
    end
    refused("flows", store, "show 9007199254740993", "tide flows: show: bad RUN")
    assert.equal(before, rows(store))
    -- 2^53 itself is exact, and still works
    assert.equal(9007199254740992, tide_json("jobs", store, "show 9007199254740992").id)
  end)

  it("refuses a --limit the store cannot take, as a usage error naming --limit", function()
    local store = fresh_store()
    tide("enqueue", store, "orders fulfill")
    for _, n in ipairs{ "2147483647", "9007199254740992" } do
      refused("jobs", store, "list --limit " .. n, "tide jobs: bad %-%-limit %(integer from 1 to 2147483646 expected, got '" .. n .. "'%)")
    end
    assert.equal(1, #tide_json("jobs", store, "list --limit 2147483646"))
  end)

  it("refuses a --queue NAME=N whose N --concurrency would refuse", function()
    local store = fresh_store()
    refused("worker", store, "--drain --queue a=99999999999999999999",
            "tide worker: bad %-%-queue %(NAME or NAME=N %(a queue name, N an integer >= 1%) expected, got 'a=99999999999999999999'%)")
    refused("worker", store, "--drain --queue a=0", "tide worker: bad %-%-queue")
    refused("worker", store, "--drain --queue a=", "tide worker: bad %-%-queue")
    refused("worker", store, "--drain --queue a=1=2", "tide worker: bad %-%-queue")
  end)

  it("refuses an option that takes one value given twice, rather than acting on the last", function()
    local store = fresh_store()
    tide("enqueue", store, "--queue a orders fulfill")
    tide("enqueue", store, "--queue b orders fulfill")
    local before = rows(store)
    -- the user meant both queues (or one): cancelling only b's jobs is not what either line says
    refused("jobs", store, "cancel --status available --queue a --queue b",
            "tide jobs: %-%-queue given twice %(one value expected%)")
    refused("jobs", store, "--store sqlite:" .. dir .. "/other.db stats", "tide jobs: %-%-store given twice")
    refused("enqueue", store, "--delay 1s --delay 2s orders fulfill", "tide enqueue: %-%-delay given twice")
    refused("worker", store, "--drain --concurrency 3 --concurrency 4", "tide worker: %-%-concurrency given twice")
    refused("flows", store, "list --limit 1 --limit 2", "tide flows: %-%-limit given twice")
    assert.equal(before, rows(store))
    -- a flag given twice is harmless, and options that repeat (--queue of tide worker) still do
    assert.equal(2, tide_json("jobs", store, "--json stats").total)
    local status, _, err = tide("worker", store, "--drain --quiet --queue a --queue b")
    assert(status ~= 2, err)               -- (no target "orders": the jobs fail, but the line is taken)
  end)

  it("refuses a --lease its own heartbeat cannot keep (a bare 30 is 30 ms, not 30 s)", function()
    local store = fresh_store()
    local script = H.write_file(dir, "slow.lua", [[
      local tide = require "tide"
      return { t = { m = function() tide.sleep(200) end } } ]])
    tide("enqueue", store, "t m")
    local before = rows(store)
    -- taken, the job (200 ms, never failing) ran 20 times, each attempt lost to its own worker's rescuer, and
    -- was discarded
    for _, v in ipairs{ "1", "30", "99ms" } do
      refused("worker", store, "--drain --lease " .. v .. " " .. script,
              "tide worker: bad %-%-lease %(duration of at least 100 ms %(a number is ms: 30s for 30 seconds%) expected, got '" .. v .. "'%)")
    end
    assert.equal(before, rows(store))
    local status, _, err = tide("worker", fresh_store(), "--drain --quiet --lease 100ms " .. script)
    assert.equal(0, status, err)                 -- (the least taken)
    status, _, err = tide("worker", store, "--drain --quiet --lease 1s " .. script)
    assert.equal(0, status, err)
    assert.equal(1, tide_json("jobs", store, "stats").completed)
  end)

  it("exits 143 (or 0 once started) without a traceback on a SIGTERM at any instant of a worker's start", function()
    local store = fresh_store()
    local script = H.write_file(dir, "targets.lua", "return { t = { m = function() end } }")
    for _, delay in ipairs{ "0", "0.01", "0.03", "0.1" } do
      local errfile = dir .. "/sig.err"
      local line = ("{ TIDE_STORE= %s worker --store %s %s 2>%s & p=$!; sleep %s; kill -TERM $p; wait $p; echo $?; } 2>/dev/null")
        :format(TIDE, store, script, errfile, delay)
      local f = io.popen(line)
      local out = f:read("*a")
      f:close()
      local status = tonumber(out:match("(%d+)%s*$"))
      local err = read(errfile)
      assert(status == 143 or status == 0, ("after %s s: exit %s: %s"):format(delay, tostring(status), err))
      assert(not err:match("stack traceback"), err)
    end
  end)
end)

describe("the command line's bulk changes", function()
  it("discard, cancel and retry by target in batches, refusing what cannot be done", function()
    local store = fresh_store()
    for _, t in ipairs{ "pay", "pay", "mail" } do tide("enqueue", store, "--delay 1h " .. t .. " m") end
    local before = rows(store)
    refused("jobs", store, "fail --status completed", "tide jobs: fail: a job that is completed cannot be discarded")
    refused("jobs", store, "retry --target pay", "tide jobs: retry: %-%-queue, %-%-target and %-%-since choose")
    refused("jobs", store, "cancel --status scheduled 3", "tide jobs: cancel: give an ID or %-%-status, not both")
    assert.equal(before, rows(store))
    local status, out, err = tide("jobs", store, "fail --status scheduled --target pay card expired")
    assert.equal(0, status, err)
    assert.equal("2 scheduled jobs with target pay discarded\n", out)
    local jobs = cjson.decode(rows(store))
    assert.matches("card expired", jobs[2].errors)
    assert.same({ retried = 2 }, tide_json("jobs", store, "retry --status discarded --target pay --json"))
    assert.same({ cancelled = 1 }, tide_json("jobs", store, "cancel --status scheduled --json"))
    local got = {}
    for i, j in ipairs(cjson.decode(rows(store))) do got[i] = j.status end
    assert.same({ "available", "available", "cancelled" }, got)
  end)
end)
