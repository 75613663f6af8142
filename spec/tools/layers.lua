--- spec/tools/layers.lua — draws the require graph of lua/tide and checks that imports only go down.
--
--   luajit spec/tools/layers.lua [ROOT]      (ROOT defaults to lua/tide)
--
-- Each folder of lua/tide is a layer, ranked from the bottom:
--
--   engine (1)  <  flow, supervision (2)  <  jobs (3)  <  observe (4)  <  init (5)  <  cli (6)
--
--   engine       the run queue, timers, the task lifecycle, pools, retries, threads
--   flow         DAGs of tasks and their pictures
--   supervision  supervisors, consumers and their message sources
--   jobs         durable jobs: the queue, the worker, the stores
--   observe      what looks at all of the above: metrics, the web dashboard
--
-- A module may require modules of its own folder and of lower layers, and
-- tide.core (the C binding, below everything).  It may not require a higher
-- layer, a peer layer (flow and supervision know nothing of each other), a
-- module that does not exist, or take part in a cycle.  `init.lua` is the
-- public facade "tide": only the command line (above it) may require it.
-- Prints every violation and exits 1, or prints a one-line summary and exits 0.
local RANKS = { engine = 1, flow = 2, supervision = 2, jobs = 3, observe = 4, init = 5, cli = 6 }

local M = {}

--- The layer of a module name ("tide.jobs.store.sqlite" -> "jobs"), or nil.
function M.layer(name)
  if name == "tide" then return "init" end
  return name:match("^tide%.([%w_]+)%.")
end

--- Every lua file under root, as { module name = path }.
function M.modules(root)
  local p = io.popen(("find %q -name '*.lua' | sort"):format(root))
  local mods = {}
  for path in p:lines() do
    local rel = path:sub(#root + 2):gsub("%.lua$", "")
    local name = rel == "init" and "tide" or "tide." .. rel:gsub("/", ".")
    mods[name] = path
  end
  p:close()
  return mods
end

--- The modules a file requires by literal name (lazy requires inside
--- functions count as much as those at the top).
function M.requires(path)
  local f = assert(io.open(path))
  local src = f:read("*a")
  f:close()
  src = src:gsub("%-%-%[(=*)%[.-%]%1%]", "")     -- block comments
            :gsub("%-%-[^\n]*", "")             -- line comments (usage examples in them are not imports)
  local out, seen = {}, {}
  for q, name in src:gmatch("require%s*%(?%s*([\"'])(tide[%w_.]*)%1") do
    if not seen[name] then seen[name] = true; out[#out + 1] = name end
  end
  return out
end

--- A cycle in graph (name -> list of names), as a list of names, or nil.
local function find_cycle(graph, names)
  local state, stack = {}, {}
  local function visit(n)
    state[n] = "open"
    stack[#stack + 1] = n
    for _, d in ipairs(graph[n] or {}) do
      if state[d] == "open" then
        local ring = {}
        for i = #stack, 1, -1 do
          table.insert(ring, 1, stack[i])
          if stack[i] == d then break end
        end
        local first = 1                     -- start at the smallest name: one message per cycle
        for i = 2, #ring do if ring[i] < ring[first] then first = i end end
        local cycle = {}
        for i = 0, #ring do cycle[#cycle + 1] = ring[(first - 1 + i) % #ring + 1] end
        return cycle
      elseif state[d] == nil and graph[d] then
        local c = visit(d)
        if c then return c end
      end
    end
    stack[#stack] = nil
    state[n] = "done"
  end
  for _, n in ipairs(names) do
    if state[n] == nil then
      local c = visit(n)
      if c then return c end
    end
  end
end

--- Checks the tree at root; returns the list of problems and the edge count.
function M.check(root)
  local mods = M.modules(root)
  local names, graph, problems, edges = {}, {}, {}, 0
  for name in pairs(mods) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local layer = M.layer(name)
    if not RANKS[layer or ""] then
      problems[#problems + 1] = ("%s (%s): not in a layer (folders: engine, flow, supervision, jobs, observe, cli)")
        :format(name, mods[name])
    end
    graph[name] = {}
    for _, dep in ipairs(M.requires(mods[name])) do
      if dep ~= "tide.core" and dep ~= name then
        edges = edges + 1
        local dl = M.layer(dep)
        local from, to = RANKS[layer or ""], RANKS[dl or ""]
        if not mods[dep] then
          problems[#problems + 1] = ("%s requires %s, which is not a module of %s"):format(name, dep, root)
        elseif from and to and (to > from or (to == from and dl ~= layer)) then
          problems[#problems + 1] = ("%s (%s) requires %s (%s): an import %s")
            :format(name, layer, dep, dl, to > from and "running back up" or "between peer layers")
        end
        graph[name][#graph[name] + 1] = dep
      end
    end
  end
  local cycle = find_cycle(graph, names)
  if cycle then problems[#problems + 1] = "cycle: " .. table.concat(cycle, " -> ") end
  return problems, edges, #names
end

if arg and arg[0] and arg[0]:match("layers%.lua$") then
  local root = arg[1] or "lua/tide"
  local problems, edges, n = M.check(root)
  if #problems > 0 then
    for _, p in ipairs(problems) do io.stderr:write("layers: ", p, "\n") end
    os.exit(1)
  end
  print(("layers: %d modules, %d imports, all going down"):format(n, edges))
  os.exit(0)
end

return M
