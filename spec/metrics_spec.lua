-- spec/metrics_spec.lua — tide.metrics: a strict parse of the exposition, counters against
-- tide.stats() and the other sources, the token, bad options, and a scrape's cost.
local H = spec_helper
local tide = require "tide"
local cjson = require "cjson"

local run_on_thread = H.sh_on_thread

--- The strict check of spec/tools/promcheck.py; the samples, or raises.
local function parse(text, dir)
  local path = H.write_file(dir, "metrics.txt", text)
  local status, out = H.sh("env -u LD_PRELOAD /usr/bin/python3 spec/tools/promcheck.py " .. path)
  assert(status == 0, "promcheck refused the exposition: " .. out)
  return cjson.decode(out)
end

describe("tide.metrics", function()
  local dir
  setup(function() dir = H.tempdir() end)
  teardown(function() os.execute("rm -rf " .. dir) end)
  after_each(function() H.assert_idle() end)

  it("serves an exposition that a strict parser accepts, with counters equal to their sources", function()
    H.quiet_errors()
    local text, st, w, src, q, backlog
    H.run(function()
      q = tide.queue.open("sqlite:" .. dir .. "/jobs.db")
      for i = 1, 12 do
        q:enqueue{ target = "t", method = i % 4 == 0 and "bad" or "ok", queue = i % 3 == 0 and "mail" or "default",
                   max_attempts = i % 8 == 0 and 1 or 2 }
      end
      q:enqueue{ target = "t", method = "ok", queue = "later", delay = 3600000 }
      w = tide.worker{ queue = q, queues = { default = 3, mail = 2 }, poll = 10,
                       retry = { base = 1, jitter = false },
                       targets = { t = { ok = function() tide.sleep(1) end, bad = function() error("nope") end } } }
      -- tasks of every outcome, a retry, a callback error, a thread task
      tide.spawn(function() end)
      tide.spawn(function() error("x") end)
      tide.spawn{ run = function() tide.sleep(1000) end, timeout = 5 }
      tide.spawn(function() tide.sleep(1000) end):cancel()
      tide.spawn{ run = function() error("again") end, retry = { max_attempts = 2, base = 1 } }
      tide.spawn{ run = function() end, handle_result = function() error("callback fails") end }
      assert.equal("ok", (tide.spawn{ mode = "thread", run = function() return 1 end }:await()))
      local p = tide.pool{ concurrency = 2, name = "workers" }
      for _ = 1, 4 do p:submit(function() tide.sleep(1) end) end
      p:drain()
      src = tide.sources.memory{ prefetch = 5, messages = { 1, 2, 3, 4, 5, 6 } }
      local c = tide.consumer{ source = src, name = "orders-in", requeue = false,
                               handler = { run = function(body) if body % 3 == 0 then error("bad body") end end } }
      local ct = tide.spawn(function() c:run() end)
      local f = tide.flow{ name = "etl", tasks = { a = { run = function() return 1 end },
                                                   b = { after = "a", run = function() error("b fails") end },
                                                   c = { after = "b", run = function() end } } }
      f:run()
      w:drain{ stop = true, within = 200 }
      while src.queued > 0 or src.unacked > 0 do tide.sleep(5) end
      ct:cancel()
      tide.sleep(20)                                    -- let the finished tasks settle
      local srv = assert(tide.metrics.serve{ port = 0, queue = q })
      backlog = q:backlog()
      st = tide.stats()
      text = run_on_thread("env -u LD_PRELOAD curl -s " .. srv:url("/metrics"))
      srv:close()
      q:close()
    end)
    H.loud_errors()
    local m = parse(text, dir)
    -- the engine: outcomes by mode add up to tide.stats() (the scrape's own
    -- handler task and the curl thread task were spawned after st, and
    -- were live, not finished, while the text was rendered)
    for _, out in ipairs{ "ok", "error", "timeout", "cancelled" } do
      local sum = m[('tide_tasks_total{mode=coroutine,outcome=%s}'):format(out)]
                  + m[('tide_tasks_total{mode=thread,outcome=%s}'):format(out)]
      assert.equal(st[out], sum, out)
    end
    assert.equal(1, m["tide_tasks_total{mode=thread,outcome=ok}"])
    assert.equal(st.spawned + 2, m["tide_tasks_spawned_total{}"])
    assert.equal(st.live + 2, m["tide_tasks_live{}"])
    assert.equal(st.retries, m["tide_task_retries_total{}"])
    assert.is_true(st.retries >= 1)
    assert.equal(st.callback_errors, m["tide_callback_errors_total{}"])
    assert.is_true(st.callback_errors >= 1)
    assert.equal(st.threads.replaced, m["tide_thread_pool_replaced_total{}"])
    assert.equal(st.threads.size, m["tide_thread_pool_threads{state=busy}"] + m["tide_thread_pool_threads{state=idle}"])
    -- pools, consumers, flows
    assert.equal(2, m["tide_pool_size{pool=workers}"])
    assert.equal(0, m["tide_pool_waiting{pool=workers}"])
    assert.equal(src.delivered, m["tide_consumer_deliveries_total{consumer=orders-in}"])
    assert.equal(src.acked, m["tide_consumer_acks_total{consumer=orders-in}"])
    assert.equal(src.nacked, m["tide_consumer_nacks_total{consumer=orders-in}"])
    assert.equal(0, m["tide_consumer_in_flight{consumer=orders-in}"])
    assert.equal(1, m["tide_flow_runs_total{status=error}"])
    assert.equal(1, m["tide_flow_steps_total{status=ok}"])
    assert.equal(1, m["tide_flow_steps_total{status=error}"])
    assert.equal(1, m["tide_flow_steps_total{status=cancelled}"])   -- stopped by the failure (fail = "stop")
    -- the worker's counters, by queue, against its own stats
    local ws = w.stats
    local function sum(name)
      return (m[name .. "{queue=default}"] or 0) + (m[name .. "{queue=mail}"] or 0)
    end
    assert.equal(ws.claimed, sum("tide_job_claims_total"))
    assert.equal(ws.completed, sum("tide_job_completions_total"))
    assert.equal(ws.retried, sum("tide_job_failures_total"))
    assert.equal(ws.discarded, sum("tide_job_discards_total"))
    assert.is_true(ws.retried > 0 and ws.discarded > 0)
    assert.equal(ws.claimed, sum("tide_job_start_delay_seconds_count"))
    assert.equal(ws.completed + ws.retried + ws.discarded, sum("tide_job_duration_seconds_count"))
    assert.equal(0, m["tide_job_store_errors_total{operation=claim}"])
    -- the sampled gauge against the store: the scheduled job waits
    assert.equal(backlog.later.scheduled, m["tide_jobs{queue=later,status=scheduled}"])
    assert.equal(1, m["tide_jobs{queue=later,status=scheduled}"])
    assert.equal(0, m["tide_jobs{queue=default,status=available}"])
  end)

  it("asks for the bearer token when one is set, and answers only GET /metrics", function()
    local codes
    H.run(function()
      local srv = assert(tide.metrics.serve{ port = 0, token = "s3cret-token" })
      local base = srv:url("/metrics")
      local curl = "env -u LD_PRELOAD curl -s -o /dev/null -w '%{http_code} ' "
      codes = run_on_thread(table.concat({
        curl .. base, curl .. "-H 'Authorization: Bearer wrong' " .. base,
        curl .. "-H 'Authorization: Bearer s3cret-token' " .. base,
        curl .. "-X POST -H 'Authorization: Bearer s3cret-token' " .. base,
        curl .. "-H 'Authorization: Bearer s3cret-token' " .. srv:url("/other") }, "; "))
      srv:close()
    end)
    assert.equal("401 401 200 405 404 ", codes)
  end)

  it("rejects bad options with messages that name them", function()
    local file = "spec/metrics_spec.lua"
    H.error_cases(file, {
      { function() tide.metrics.serve{ port = -1 } end,
        "tide.metrics.serve: bad option 'port' (integer 0..65535 expected, got number -1)" },
      { function() tide.metrics.serve{ prot = 1 } end, "tide.metrics.serve: unknown option 'prot'" },
      { function() tide.metrics.serve{ token = "" } end,
        "tide.metrics.serve: bad option 'token' (non-empty string expected, got string \"\")" },
      { function() tide.metrics.serve{ queue = {} } end,
        "tide.metrics.serve: bad option 'queue' (queue (from tide.queue.open) expected, got table)" },
      { function() tide.metrics.serve(5) end, "tide.metrics.serve: bad argument #1 (table expected, got number 5)" },
    })
  end)

  it("says why it cannot listen (the port is taken)", function()
    local srv = assert(tide.metrics.serve{ port = 0 })
    local again, err = tide.metrics.serve{ port = srv.port }
    srv:close()
    assert.is_nil(again)
    assert.matches("tide.metrics.serve: cannot listen on 127.0.0.1 port %d+: address already in use", err)
  end)

  it("renders in about the same time with 100,000 live tasks (nothing walks the tasks)", function()
    local few, many
    local function timed()
      local t0 = os.clock()
      for _ = 1, 20 do tide.metrics.render() end
      return (os.clock() - t0) / 20
    end
    H.run(function()
      few = timed()
      local tasks = {}
      for i = 1, 100000 do tasks[i] = tide.spawn(function() tide.sleep(60000) end) end
      tide.sleep(0)
      many = timed()
      for i = 1, #tasks do tasks[i]:cancel() end
    end)
    -- orders of magnitude only (the figure is measured in bench/metrics.lua)
    assert.is_true(many < 0.005, ("a render took %.2f ms with 100,000 live tasks"):format(many * 1000))
    assert.is_true(many < few * 5 + 0.001, ("%.3f ms with 100,000 tasks against %.3f ms with few"):format(many * 1e3, few * 1e3))
  end)
end)
