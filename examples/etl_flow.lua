-- etl_flow.lua — a flow: fetch (flaky, retried), fan out over lines in parallel, aggregate, store.
--
-- fetch returns a CSV-like text but fails its first two attempts (a stand-in
-- for a flaky HTTP call), so its retry policy matters.  parse fans out: one
-- child task per line, at most 4 at once, each summing the numbers on its
-- line; one line is malformed, and `exit_on_error = false` lets the task
-- carry on with the others (the report counts the failed child).  aggregate
-- adds the sums up, store writes the total to a file.  The script prints the
-- report and the flow's picture, and exits 1 unless everything is as
-- expected.
--
-- Run: build/tide run examples/etl_flow.lua
local tide = require "tide"

local LINES = 200
local out_path = os.tmpname()

local fetch_attempts = 0
local function fetch()
  fetch_attempts = fetch_attempts + 1
  tide.sleep(5)
  if fetch_attempts < 3 then error("fetch: connection reset (attempt " .. fetch_attempts .. ")") end
  local rows = {}
  for i = 1, LINES do rows[i] = ("%d,%d,%d"):format(i, 2 * i, 3 * i) end   -- sums to 6 * i
  rows[77] = "77,oops,231"                                                 -- the malformed line
  return table.concat(rows, "\n")
end

local function parse_line(line)
  tide.sleep(math.random(0, 2))                    -- pretend each line costs some I/O
  local sum = 0
  for field in line:gmatch("[^,]+") do
    sum = sum + (tonumber(field) or error(("not a number: %q in line %q"):format(field, line)))
  end
  return sum
end

local retries, children_done = 0, 0
local flow = tide.flow{
  name = "etl", fail = "stop", timeout = 10000,
  tasks = {
    fetch = { run = fetch, timeout = 1000, retry = { max_attempts = 5, backoff = "exponential", base = 10 } },
    parse = { after = "fetch", concurrency = 4, exit_on_error = false, each = parse_line,
              items = function(ctx)
                local lines = {}
                for line in ctx.results.fetch:gmatch("[^\n]+") do lines[#lines + 1] = line end
                return lines
              end },
    aggregate = { after = "parse", run = function(ctx)
                    local total, n = 0, 0
                    for _, sum in pairs(ctx.results.parse) do total, n = total + sum, n + 1 end
                    return { total = total, lines = n }
                  end },
    store = { after = "aggregate", run = function(ctx)
                local fh = assert(io.open(out_path, "w"))
                fh:write(ctx.results.aggregate.total, "\n")
                fh:close()
                return out_path
              end },
  },
  on = {
    task_retry = function(ev) retries = retries + 1; print(("  retry: %s attempt %d failed: %s"):format(ev.task, ev.attempt, ev.error)) end,
    child_done = function() children_done = children_done + 1 end,
  },
}

math.randomseed(7)
local status, report = flow:run()

print(("flow etl: %s in %.0f ms"):format(status, report.duration))
for _, name in ipairs{ "fetch", "parse", "aggregate", "store" } do
  local r = report.tasks[name]
  local extra = ""
  if r.children then
    extra = (", children %d ok / %d error of %d"):format(r.children.ok, r.children.error, r.children.total)
  end
  print(("  %-9s %-7s attempts %d, %5.1f ms%s"):format(name, r.status, r.attempts, r.duration or 0, extra))
end
io.write(flow:graph("mermaid"))

-- the checks
local expected = 0
for i = 1, LINES do if i ~= 77 then expected = expected + 6 * i end end
local fh = io.open(out_path)
local stored = fh and tonumber(fh:read("*l"))
if fh then fh:close() end
os.remove(out_path)
local problems = {}
local function want(cond, msg) if not cond then problems[#problems + 1] = msg end end
want(status == "ok", "flow status " .. tostring(status))
want(report.tasks.fetch.attempts == 3 and retries == 2, "fetch should succeed on its 3rd attempt")
want(report.tasks.parse.children.error == 1 and report.tasks.parse.children.ok == LINES - 1,
     "parse should have exactly one failed child")
want(children_done == LINES, "child_done fired " .. children_done .. " times")
want(report.tasks.aggregate.value.total == expected, "aggregate total " .. tostring(report.tasks.aggregate.value.total))
want(stored == expected, "stored total " .. tostring(stored) .. ", expected " .. expected)
if #problems > 0 then
  io.stderr:write("etl_flow: FAILED: ", table.concat(problems, "; "), "\n")
  os.exit(1)
end
print(("ok: total %d stored, malformed line skipped, fetch retried twice"):format(stored))
