-- spec/layers_spec.lua — the require graph of lua/tide: imports only go down, no cycles.
local layers = dofile("spec/tools/layers.lua")
local H = spec_helper

describe("the layers of lua/tide", function()
  it("have every import going down, and no cycle", function()
    local problems, edges, n = layers.check("lua/tide")
    assert.same({}, problems)
    assert.is_true(n > 20 and edges > 50)
  end)

  describe("the check", function()
    local root
    after_each(function() os.execute("rm -rf " .. root:gsub("/tide$", "")) end)

    before_each(function()
      root = H.tempdir() .. "/tide"
      for _, dir in ipairs{ "engine", "jobs", "flow", "supervision", "cli" } do os.execute("mkdir -p " .. root .. "/" .. dir) end
      H.write_file(root, "init.lua", 'local task = require "tide.engine.task"\n')
      H.write_file(root, "engine/task.lua", 'local check = require("tide.engine.check")\n')
      H.write_file(root, "engine/check.lua", "return {}\n")
      H.write_file(root, "jobs/queue.lua", 'local task = require "tide.engine.task"\n')
      H.write_file(root, "flow/run.lua", 'local task = require "tide.engine.task"\n')
      H.write_file(root, "supervision/consumer.lua", "return {}\n")
      H.write_file(root, "cli/main.lua", 'local tide = require "tide"\nlocal q = require("tide.jobs.queue")\n')
    end)

    it("passes a tree whose imports go down", function()
      assert.same({}, (layers.check(root)))
    end)

    it("ignores requires inside comments (usage examples)", function()
      H.write_file(root, "engine/check.lua", '-- local tide = require "tide"\n--[[ require("tide.jobs.queue") ]]\nreturn {}\n')
      assert.same({}, (layers.check(root)))
    end)

    it("fails on an import running back up, even a lazy one", function()
      H.write_file(root, "engine/check.lua", 'local function later() return require("tide.jobs.queue") end\n')
      local problems = layers.check(root)
      assert.equal("tide.engine.check (engine) requires tide.jobs.queue (jobs): an import running back up", problems[1])
    end)

    it("fails when the library requires the facade", function()
      H.write_file(root, "jobs/queue.lua", 'local tide = require "tide"\n')
      local problems = layers.check(root)
      assert.equal("tide.jobs.queue (jobs) requires tide (init): an import running back up", problems[1])
    end)

    it("fails on an import between peer layers", function()
      H.write_file(root, "flow/run.lua", "local c = require 'tide.supervision.consumer'\n")
      local problems = layers.check(root)
      assert.equal("tide.flow.run (flow) requires tide.supervision.consumer (supervision): an import between peer layers",
                   problems[1])
    end)

    it("fails on a cycle inside a layer, naming it", function()
      H.write_file(root, "engine/check.lua", 'local t = require "tide.engine.task"\n')
      local problems = layers.check(root)
      assert.equal("cycle: tide.engine.check -> tide.engine.task -> tide.engine.check", problems[#problems])
    end)

    it("fails on a module outside the layers and on an unknown module", function()
      os.execute("mkdir -p " .. root .. "/misc")
      H.write_file(root, "misc/x.lua", 'local y = require "tide.engine.nothing"\n')
      local problems = layers.check(root)
      table.sort(problems)
      assert.equal("tide.misc.x (" .. root .. "/misc/x.lua): not in a layer (folders: engine, flow, supervision, jobs, observe, cli)", problems[1])
      assert.equal("tide.misc.x requires tide.engine.nothing, which is not a module of " .. root, problems[2])
    end)
  end)
end)

describe("the repository's top level", function()
  it("holds only the fixed entries (a stray profile or dump fails here)", function()
    local fixed = { [".ci"] = true, [".gitignore"] = true, Makefile = true, ["README.md"] = true, bench = true,
                    docs = true, examples = true, lua = true, rockspecs = true, spec = true, src = true }
    local p = assert(io.popen("git ls-files 2>/dev/null | cut -d/ -f1 | sort -u"))
    local strays, seen = {}, 0
    for entry in p:lines() do
      seen = seen + 1
      if not fixed[entry] then strays[#strays + 1] = entry end
    end
    p:close()
    if seen == 0 then pending("not a git checkout") return end
    assert.same({}, strays)
  end)
end)
