-- bench/lib/common.lua — what the benchmark drivers share: the load average they
-- print beside every figure, a shell command's status and output, and
-- filling a RabbitMQ queue.
--
-- A driver run from the repository's root finds it with
--   package.path = "bench/lib/?.lua;" .. package.path
--   local lib = require "common"
local M = {}

--- The machine's load average ("1.02 0.87 0.80"), or "unknown".
function M.loadavg()
  local f = io.open("/proc/loadavg")
  if not f then return "unknown" end
  local s = f:read("*l"); f:close()
  return s:match("^(%S+ %S+ %S+)")
end

--- Runs `cmd` (blocking the loop: only for what the driver waits on anyway);
--- returns its exit status and its output (stdout and stderr).
function M.sh(cmd)
  local f = io.popen(cmd .. " 2>&1; echo \"__status=$?\"")
  local out = f:read("*a")
  f:close()
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  return status, (out:gsub("__status=%d+%s*$", ""))
end

--- Declares the non-durable queue `queue` and publishes `n` copies of
--- `body` to it with confirms, from 200 tasks; returns the source (open).
--- (Inside a task.)
function M.fill_queue(tide, url, queue, n, body)
  local src = tide.sources.rabbitmq{ url = url, queue = queue, declare = { durable = false } }
  src:declare_queue()
  local tasks = {}
  for k = 1, 200 do
    tasks[k] = tide.spawn(function()
      for _ = k, n, 200 do src:publish(body, { persistent = false }) end
    end)
  end
  for _, t in ipairs(tasks) do
    local s, e = t:await()
    assert(s == "ok", tostring(e))
  end
  assert(src:queue_info().messages >= n, "the queue was not filled")
  return src
end

--- The ~1 MB table of 6,000 user records the codec is measured on
--- (bench/threads.lua against lua-cjson, bench/cg's codec workloads).
function M.records()
  local users = {}
  for i = 1, 6000 do
    users[i] = { id = i, name = "user" .. i, email = "user" .. i .. "@example.com", score = i * 1.5,
                 active = i % 2 == 0, tags = { "alpha", "beta", "gamma" },
                 address = { street = i .. " Main Street", city = "Springfield", zip = 10000 + i } }
  end
  return { users = users, meta = { count = #users, source = "bench" } }
end

return M
