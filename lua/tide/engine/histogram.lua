--- tide.histogram — fixed-bucket histograms for durations (read by tide.observe.metrics).
--
-- A histogram counts observations per bucket (upper bounds, ascending, in
-- seconds), their sum and their number.  Observing is a short scan of the
-- bounds: cheap enough for every job, and no allocation.
local M = {}

--- Bounds for how long a job runs, and for how long a due job waits to start.
M.DURATION = { 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300 }
M.WAIT = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300 }

function M.new(bounds)
  local counts = {}
  for i = 1, #bounds + 1 do counts[i] = 0 end    -- the last: above every bound (+Inf)
  return { bounds = bounds, counts = counts, sum = 0, count = 0 }
end

function M.observe(h, v)
  if v ~= v then return end                      -- NaN: not an observation
  local b = h.bounds
  local i = 1
  while b[i] and v > b[i] do i = i + 1 end
  h.counts[i] = h.counts[i] + 1
  h.sum = h.sum + v
  h.count = h.count + 1
end

return M
