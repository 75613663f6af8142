-- gen_task.lua — a broker consumer whose acks survive errors and timeouts.
--
-- The "zombie node" problem: a worker takes deliveries from a broker under a
-- prefetch limit and must ack or nack each one.  If a job crashes or hangs and
-- its ack is lost, the broker counts that delivery as in flight forever; once
-- `prefetch` of them are lost, the node gets no more work.
--
-- Here a small in-process broker hands out 500 jobs under prefetch 20 and
-- refills only when an ack or nack frees a slot.  Each delivery runs as a tide
-- task with a timeout; its handle_result acks on "ok" and nacks otherwise.
-- The jobs misbehave on purpose: some raise an error, some hang far past
-- their timeout, most succeed after a short sleep.  Because tide delivers
-- every task's outcome to handle_result exactly once (README.md, "Promises"),
-- the broker never stalls: at the end every tag was acked or nacked exactly
-- once, nothing is in flight, and the hung jobs were stopped (no timer of
-- theirs is left).  Any broken check exits 1.
--
-- Run: build/tide run examples/gen_task.lua      (about 0.7 s)
local tide = require "tide"

local JOBS, PREFETCH, TIMEOUT = 500, 20, 100     -- jobs, deliveries in flight, ms per job
local STALL_MS = 1000                            -- no ack/nack this long: the broker stalled

math.randomseed(20261123)

-- ===== the broker stand-in

-- Each job's behaviour is drawn up front, so the tally is the same on every
-- run whatever order the tasks finish in.
local function make_jobs(n)
  local jobs = {}
  for i = 1, n do
    local r = math.random()
    local job = { id = i }
    if r < 0.15 then
      job.kind, job.ms = "fails", math.random(0, 10)          -- raises after a moment
    elseif r < 0.30 then
      job.kind, job.ms = "hangs", 10 * TIMEOUT                -- sleeps well past its timeout
    else
      job.kind, job.ms = "works", math.random(1, 20)          -- done well within its timeout
    end
    jobs[i] = job
  end
  return jobs
end

local Broker = {}
Broker.__index = Broker

local function new_broker(jobs, prefetch)
  return setmetatable({
    jobs = jobs, next_job = 1, prefetch = prefetch,
    next_tag = 0, in_flight = 0, max_in_flight = 0,
    unsettled = {},          -- tag -> job, for deliveries not yet acked or nacked
    settled = {},            -- tag -> "ack" | "nack" (the first settlement)
    duplicates = 0, unknown = 0, acked = 0, nacked = 0,
    consumer = nil,
  }, Broker)
end

--- Hands deliveries to the consumer while prefetch slots are free.
function Broker:refill()
  while self.in_flight < self.prefetch and self.next_job <= #self.jobs do
    local job = self.jobs[self.next_job]
    self.next_job = self.next_job + 1
    self.next_tag = self.next_tag + 1
    local tag = self.next_tag
    self.unsettled[tag] = job
    self.in_flight = self.in_flight + 1
    if self.in_flight > self.max_in_flight then self.max_in_flight = self.in_flight end
    self.consumer(tag, job)
  end
end

function Broker:consume(fn)
  self.consumer = fn
  self:refill()
end

local function settle(self, tag, how)
  if self.settled[tag] then
    self.duplicates = self.duplicates + 1          -- a real broker would close the channel
    return
  elseif not self.unsettled[tag] then
    self.unknown = self.unknown + 1
    return
  end
  self.unsettled[tag] = nil
  self.settled[tag] = how
  self.in_flight = self.in_flight - 1
  self[how .. "ed"] = self[how .. "ed"] + 1
  self:refill()
end

function Broker:ack(tag) settle(self, tag, "ack") end
function Broker:nack(tag) settle(self, tag, "nack") end   -- requeue = false: dead-lettered

function Broker:done()
  return self.next_job > #self.jobs and self.in_flight == 0
end

-- ===== the consumer: one supervised task per delivery

local jobs = make_jobs(JOBS)
local broker = new_broker(jobs, PREFETCH)
local by_status = { ok = 0, error = 0, timeout = 0, cancelled = 0 }
local mismatched = {}        -- jobs whose outcome is not the one their kind implies
local EXPECTED = { works = "ok", fails = "error", hangs = "timeout" }

local function run_job(job)
  tide.sleep(job.ms)
  if job.kind == "fails" then error(("job %d: upstream said no"):format(job.id)) end
  return job.id * 2
end

local t0 = tide.now()
broker:consume(function(tag, job)
  tide.spawn{
    name = "delivery " .. tag, run = run_job, args = { job }, timeout = TIMEOUT,
    handle_result = function(status, value)
      by_status[status] = by_status[status] + 1
      if status ~= EXPECTED[job.kind] or (status == "ok" and value ~= job.id * 2) then
        mismatched[#mismatched + 1] = ("tag %d (%s): %s %s"):format(tag, job.kind, status, tostring(value))
      end
      if status == "ok" then broker:ack(tag) else broker:nack(tag) end
    end,
  }
end)

-- Wait for the broker to run dry; a lost ack would show up as a stall.
local last_progress, last_count = tide.now(), 0
while not broker:done() do
  tide.sleep(10)
  local count = broker.acked + broker.nacked
  if count ~= last_count then
    last_progress, last_count = tide.now(), count
  elseif tide.now() - last_progress > STALL_MS then
    break
  end
end
local elapsed = tide.now() - t0

-- ===== tally and checks

local want = { works = 0, fails = 0, hangs = 0 }
for _, job in ipairs(jobs) do want[job.kind] = want[job.kind] + 1 end

print(("broker: %d jobs, prefetch %d, timeout %d ms, done in %.0f ms (max in flight %d)")
  :format(JOBS, PREFETCH, TIMEOUT, elapsed, broker.max_in_flight))
print(("acked %d, nacked %d"):format(broker.acked, broker.nacked))
print(("by outcome: ok %d, error %d, timeout %d, cancelled %d")
  :format(by_status.ok, by_status.error, by_status.timeout, by_status.cancelled))
print(("jobs drawn: %d work, %d fail, %d hang"):format(want.works, want.fails, want.hangs))

local failures = {}
local function check(cond, msg, ...)
  if not cond then failures[#failures + 1] = msg:format(...) end
end

local settled_once = 0
for tag = 1, broker.next_tag do
  if broker.settled[tag] then settled_once = settled_once + 1 end
end
check(broker.next_tag == JOBS, "broker delivered %d of %d jobs", broker.next_tag, JOBS)
check(settled_once == JOBS, "%d of %d tags were acked or nacked", settled_once, JOBS)
check(broker.duplicates == 0, "%d tags were settled twice", broker.duplicates)
check(broker.unknown == 0, "%d settlements named unknown tags", broker.unknown)
check(broker.in_flight == 0, "broker still has %d deliveries in flight (stalled)", broker.in_flight)
check(broker.max_in_flight <= PREFETCH, "prefetch exceeded: %d in flight", broker.max_in_flight)
check(broker.acked == want.works, "acked %d, expected %d", broker.acked, want.works)
check(broker.nacked == want.fails + want.hangs, "nacked %d, expected %d",
      broker.nacked, want.fails + want.hangs)
check(#mismatched == 0, "%d unexpected outcomes, first: %s", #mismatched, tostring(mismatched[1]))
local st = tide.stats()
check(st.live == 1, "%d tasks still live besides this script", st.live - 1)
check(st.timers == 0, "%d timers still pending (a hung job was not stopped)", st.timers)
check(st.callback_errors == 0, "%d errors in callbacks", st.callback_errors)

if #failures > 0 then
  io.stderr:write("gen_task: FAILED\n  ", table.concat(failures, "\n  "), "\n")
  os.exit(1)
end
print("ok: every tag acked or nacked exactly once, nothing in flight, hung jobs stopped")
