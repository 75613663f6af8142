-- spec/rabbitmq_zombie_spec.lua — the zombie-node scenario on a real broker: faults everywhere, every message handled, no node left busy.
--
-- 5,000 persistent messages with ids go into a durable queue (published
-- with confirms: 2,000 at the start, 1,500 just before the broker restart
-- and the last 1,500 just before the last fault, so that each of these
-- faults falls on work however fast the consumers are and however slow
-- rabbitmqctl is on a loaded machine).  Two consumer processes (spec/fixtures/rabbit_consumer.lua:
-- a supervised tide.consumer, prefetch 20, handlers that succeed, raise,
-- hang past their timeout or run a runaway thread task, and the consumer
-- task killed every second or so and restarted by its supervisor) work
-- through them while this spec, in order:
--   1. closes one process's connection from the broker (rabbitmqctl close_connection);
--   2. SIGKILLs the other process and starts a new one in its place;
--   3. stops the broker and starts it again (data kept);
--   4. closes every connection at once (rabbitmqctl close_all_connections: the last fault).
-- Each success writes "id, pid, handler start, time" into a SQLite file just
-- before its handler returns.  At the end:
--   * every id was handled successfully, the queue is empty and
--     messages_unacknowledged is 0 (rabbitmqctl list_queues): the broker
--     holds nothing for a dead or busy node;
--   * an id was handled successfully more than once only where one of this
--     spec's faults (1-4), on that first success's process, ended after its
--     handler started and began before the next success (the fault took
--     the delivery's channel while its handler ran, or before its ack
--     reached the broker);
--     kills of the consumer task inside a process cause no second success,
--     because a success's ack is queued before the run can end;
--   * from the moment the last fault begins, messages never waited in the
--     queue for more than 2 s while no success was recorded (sampled every
--     50 ms; the consumers' reconnection counts);
--   * the processes that exited normally saw no channel closed for a bad
--     delivery tag (precondition_failed=0).
-- ZOMBIE_SEED=n replays the handlers' random choices (not the timing).
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

local URL, DIR = os.getenv("TIDE_AMQP_URL"), os.getenv("TIDE_AMQP_DIR")
local TIDE = H.build .. "/tide"
local FIXTURE = "spec/fixtures/rabbit_consumer.lua"
local N = 5000
local GAP_MS = 2000

--- spec_helper.wait_for, polling every 20 ms unless told.
local function wait_for(cond, ms, step) return H.wait_for(cond, ms, step or 20) end

--- Runs a shell command on a thread (the loop goes on); returns its output.
local function shell(cmd)
  local out = H.sh_on_thread(cmd .. " 2>&1; echo \"__status=$?\"")
  local status = tonumber(out:match("__status=(%d+)%s*$"))
  out = out:gsub("__status=%d+%s*$", "")
  assert(status == 0, cmd .. " failed: " .. out)
  return out
end

local function ctl(args) return shell("sh spec/rabbitmq.sh ctl " .. DIR .. " " .. args) end

-- ===== the consumer processes

local procs = {}

--- Starts a consumer process whose shell parent waits for it: closing the
--- pipe reaps both, so a killed process never lingers as a zombie.
local function start_proc(dir, queue, seed)
  local p = { log = ("%s/consumer-%d.log"):format(dir, #procs + 1) }
  p.pipe = assert(io.popen(("%s run %s %s %s %s/done.db %d > %s 2>&1 & echo $!; exec 2>/dev/null; wait $!")
    :format(TIDE, FIXTURE, URL, queue, dir, seed, p.log)))
  p.pid = tonumber(p.pipe:read("*l"))
  assert(p.pid, "no pid for a consumer process")
  procs[#procs + 1] = p
  return p
end

local function kill(p, signal)
  local status, out = H.sh("kill -" .. signal .. " " .. p.pid)
  assert(status == 0, ("process %d was gone before its %s (%s):\n%s"):format(p.pid, signal, out, H.file_bytes(p.log)))
  p.pipe:close()
  p.ended = signal
end

describe("the zombie-node scenario on RabbitMQ", function()
  it("handles every message, leaves nothing unacked, and keeps making progress through every fault", function()
    H.amqp_node(true)
    local seed = tonumber(os.getenv("ZOMBIE_SEED")) or os.time() % 100000
    math.randomseed(seed)
    local dir = H.tempdir()
    local queue = ("zombie-%d"):format(os.time())
    local faults = {}                    -- { what, start, finish, pids = { [pid] = true } | nil (all) }
    local max_gap, last_fault_end, finished, samples = 0, nil, false, 0
    local db = assert(core.sqlite_open(dir .. "/done.db", "done.db", 5000))
    db:exec("PRAGMA journal_mode = WAL; CREATE TABLE done (id INTEGER NOT NULL, pid INTEGER NOT NULL, started INTEGER NOT NULL, at INTEGER NOT NULL)")
    local count_rows = db:prepare("SELECT count(*) AS n, count(DISTINCT id) AS ids FROM done")
    local ok, err = pcall(spec_helper.run, function()
      local src = tide.sources.rabbitmq{ url = URL, queue = queue, declare = { durable = true }, connect_timeout = 1000 }
      -- Persistent messages with ids first..last, confirmed.
      local function publish(source, first, last)
        local pubs = {}
        for k = 0, 9 do
          pubs[#pubs + 1] = tide.spawn(function()
            for i = first + k, last, 10 do source:publish(tostring(i)) end
          end)
        end
        for _, t in ipairs(pubs) do local st, e = t:await(); assert(st == "ok", tostring(e)) end
      end
      -- The next 1,500 wait for the broker restart and the last 1,500 for
      -- the last fault, so that however fast the consumers are (and however
      -- long rabbitmqctl takes), work is left for each to fall on.
      local FIRST, SECOND = N - 3000, N - 1500
      publish(src, 1, FIRST)
      local a = start_proc(dir, queue, seed)
      local b = start_proc(dir, queue, seed + 1)

      -- The monitor: progress (rows in done) and messages waiting (ready).
      local monitor = tide.spawn(function()
        local last_rows, last_progress = 0, tide.now()
        while not finished do
          tide.sleep(50)
          local rows = count_rows:first().n
          local now = tide.now()
          if rows > last_rows then last_rows, last_progress = rows, now end
          local okq, info = pcall(src.queue_info, src)
          if okq and info.messages > 0 and last_fault_end then
            samples = samples + 1
            local gap = now - math.max(last_progress, last_fault_end)
            if gap > max_gap then max_gap = gap end
          end
        end
      end)

      local function fault(what, pids, fn)
        local f = { what = what, start = core.wallclock(), pids = pids }
        fn()
        f.finish = core.wallclock()
        faults[#faults + 1] = f
        return f
      end
      local function connections_of(pids)
        local list = {}
        for line in ctl("list_connections --no-table-headers pid client_properties"):gmatch("[^\n]+") do
          local cpid, name = line:match('^(%S+)%s.*{"connection_name","zombie%-(%d+)"}')
          if cpid and (pids == nil or pids[tonumber(name)]) then list[#list + 1] = cpid end
        end
        return list
      end
      local function close_connections(pids)
        local closed = 0
        for _, cpid in ipairs(connections_of(pids)) do
          ctl(("close_connection '%s' 'zombie scenario'"):format(cpid))
          closed = closed + 1
        end
        return closed
      end

      assert.is_true(wait_for(function() return count_rows:first().n >= 300 end, 15000), "the consumers never started")
      -- 1. the broker closes process a's connection
      fault("close_connection of process a", { [a.pid] = true }, function()
        assert.is_true(close_connections({ [a.pid] = true }) >= 1, "process a had no connection to close")
      end)
      tide.sleep(700)
      -- 2. process b is SIGKILLed, a new one takes its place
      local c
      fault("SIGKILL of process b", { [b.pid] = true }, function()
        kill(b, "KILL")
        c = start_proc(dir, queue, seed + 2)
      end)
      tide.sleep(800)
      publish(src, FIRST + 1, SECOND)
      local before_restart = count_rows:first().ids
      -- 3. the broker stops and starts again
      fault("broker stop and start", nil, function()
        shell("sh spec/rabbitmq.sh down " .. DIR)
        tide.sleep(300)
        shell("sh spec/rabbitmq.sh up " .. DIR)
      end)
      assert.is_true(before_restart < SECOND - 200, "too little work was left for the broker restart: " .. before_restart)
      -- 4. once the consumers are back, the broker closes every connection at once
      assert.is_true(wait_for(function() return #connections_of(nil) >= 2 end, 10000, 200), "the consumers did not reconnect")
      local late = tide.sources.rabbitmq{ url = URL, queue = queue, declare = { durable = true }, connect_timeout = 1000 }
      publish(late, SECOND + 1, N)
      late:close()
      -- Measured from the moment this last fault begins: the consumers'
      -- reconnection counts in the longest wait.
      last_fault_end = tide.now()
      fault("close_all_connections", nil, function() ctl("close_all_connections 'zombie scenario: the last fault'") end)
      assert.is_true(count_rows:first().ids < N, "no work was left after the last fault")

      assert.is_true(wait_for(function() return count_rows:first().ids == N end, 60000, 100),
        ("only %d of %d ids handled"):format(count_rows:first().ids, N))
      assert.is_true(wait_for(function()
        local out = ctl("list_queues name messages_ready messages_unacknowledged")
        local ready, unacked = out:match(queue:gsub("%p", "%%%0") .. "%s+(%d+)%s+(%d+)")
        return ready == "0" and unacked == "0"
      end, 10000, 300), "the broker still holds messages: " .. ctl("list_queues name messages_ready messages_unacknowledged"))
      finished = true
      monitor:await()
      for _, p in ipairs{ a, c } do kill(p, "TERM") end
      src:delete_queue()
      src:close()
    end)
    finished = true
    for _, p in ipairs(procs) do if not p.ended then pcall(kill, p, "KILL") end end
    assert(ok, tostring(err) .. " (seed " .. seed .. ", files in " .. dir .. ")")

    -- Every id handled; a second success only where a fault fell in between.
    local rows = db:prepare("SELECT id, pid, started, at FROM done ORDER BY id, at"):rows()
    local by_id, dups, explained = {}, 0, 0
    for _, r in ipairs(rows) do
      local list = by_id[r.id] or {}
      by_id[r.id] = list
      list[#list + 1] = r
    end
    for i = 1, N do assert(by_id[i], ("id %d was never handled (seed %d)"):format(i, seed)) end
    for id, list in pairs(by_id) do
      for k = 2, #list do
        dups = dups + 1
        local first, again = list[k - 1], list[k]
        local why
        for _, f in ipairs(faults) do
          if first.started <= f.finish and f.start <= again.at and (f.pids == nil or f.pids[first.pid]) then why = f.what end
        end
        if not why then
          local fl = {}
          for _, f in ipairs(faults) do
            local pids = {}
            for p in pairs(f.pids or {}) do pids[#pids + 1] = p end
            fl[#fl + 1] = ("%s [%d, %d] pids %s"):format(f.what, f.start, f.finish, table.concat(pids, ","))
          end
          error(("id %d succeeded at %d (pid %d) and again at %d (pid %d) with no fault in between (seed %d, files in %s); faults:\n%s")
            :format(id, first.at, first.pid, again.at, again.pid, seed, dir, table.concat(fl, "\n")))
        end
        explained = explained + 1
      end
    end
    -- Processes that exited normally saw no channel closed for a bad tag.
    local graceful = 0
    for _, p in ipairs(procs) do
      local log = H.file_bytes(p.log)
      if p.ended == "TERM" then
        local pf = log:match("precondition_failed=(%d+)")
        assert(pf, ("process %d printed no stats:\n%s"):format(p.pid, log))
        assert.equal("0", pf)
        graceful = graceful + 1
      end
    end
    assert.equal(2, graceful)
    assert.is_true(max_gap <= GAP_MS, ("messages waited %.0f ms with no progress after the last fault (seed %d)"):format(max_gap, seed))
    assert.is_true(samples >= 10, "too few samples of the queue after the last fault: " .. samples)
    print(("\n# zombie scenario: %d ids, %d faults, %d second successes (each after a fault), longest wait without progress since the last fault began %.0f ms (%d samples with messages waiting), seed %d")
      :format(N, #faults, dups, max_gap, samples, seed))
    os.execute("rm -rf " .. dir)
  end)
end)
