-- spec/arena_spec.lua — a state's small blocks in huge pages (src/arena.h), from Lua: values whole
-- across every size the arena and LuaJIT's allocator split, memory reused and given back.
--
-- The arena's own contract (random calls, purges, states closed) is
-- checked by spec/c/test_arena.c; spec/run.sh runs alloc_cache_spec.lua
-- both with the arena and without it (TIDE_ARENA=off).
local tide = require "tide"
local H = spec_helper

local faults = H.faults

local function rss()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+) kB")
    if kb then return tonumber(kb) * 1024 end
  end
end

local DEFAULT = 64 * 1024 * 1024
local arena = tide.stats().alloc_cache.arena

--- n one-slot tables made, dropped and collected; the arena's free bytes after.
local function dropped_tables(n)
  local t = {}
  for i = 1, n do t[i] = { i } end
  t = nil
  collectgarbage(); collectgarbage()
  return tide.stats().alloc_cache.arena.free
end

describe("the arena", function()
  after_each(function()
    tide.configure{ alloc_cache = DEFAULT }
    H.assert_idle()
  end)

  it("holds this state's small blocks, unless TIDE_ARENA=off", function()
    if os.getenv("TIDE_ARENA") == "off" then
      assert.is_nil(arena)
    else
      assert.is_table(arena)
      assert.is_true(arena.small > 0, "no pages of small blocks")
      for _, k in ipairs{ "small", "large", "free", "given_back" } do assert.is_number(arena[k]) end
    end
  end)

  it("refuses a TIDE_ARENA that is not on or off, naming it, before anything runs", function()
    local status, out = H.sh(("TIDE_ARENA=yes LUA_CPATH='%s/?.so;;' luajit -e 'require \"tide\" print(\"ran\")'")
      :format(H.build))
    assert.is_true(status ~= 0)
    assert.matches('TIDE_ARENA must be on or off (got "yes")', out, 1, true)
    assert.is_nil(out:find("ran", 1, true))
    for _, v in ipairs{ "on", "off", "" } do
      assert.equal("ran\n", H.sh_ok(("TIDE_ARENA=%s LUA_CPATH='%s/?.so;;' luajit -e 'require \"tide\" print(\"ran\")'")
        :format(v, H.build)))
    end
  end)

  -- A block moves between the arena and LuaJIT's allocator when it is
  -- resized across 1 KiB or 64 KiB or 2 MiB: a string of each length
  -- around them, a table's array and hash part grown one slot at a time
  -- past them and back, a coroutine's stack grown by deep recursion.
  it("keeps every value whole across the sizes where blocks change hands", function()
    for _, edge in ipairs{ 1024, 65536, 2 * 1024 * 1024 } do
      for len = edge - 40, edge + 40 do
        local s = string.rep("a", len - 1) .. "z"
        assert.equal(len, #s)
        assert.equal("z", s:sub(-1))
      end
    end
    local arr, hash = {}, {}
    for i = 1, 300000 do arr[i] = i * 2; hash["k" .. i] = i end
    for i = 1, 300000, 997 do assert.equal(i * 2, arr[i]); assert.equal(i, hash["k" .. i]) end
    for i = 300000, 11, -1 do arr[i] = nil; hash["k" .. i] = nil end
    collectgarbage()
    for i = 1, 10 do assert.equal(i * 2, arr[i]); assert.equal(i, hash["k" .. i]) end
    local function deep(n) if n == 0 then return 0 end return 1 + deep(n - 1) end
    for depth = 10, 20000, 1999 do
      local co = coroutine.wrap(function() return deep(depth) end)
      assert.equal(depth, co())
    end
  end)

  it("lets tasks run to the right values while blocks of every size come and go", function()
    local status = tide.run(function()
      local ts = {}
      for i = 1, 3000 do
        ts[i] = tide.spawn(function()
          local parts = {}
          for j = 1, i % 50 do parts[j] = string.rep("x", (i * j) % 3000) end
          tide.sleep(0)
          local big = i % 500 == 0 and string.rep("y", 70000 + i) or ""
          return #table.concat(parts) + #big
        end)
      end
      for i = 1, #ts do
        local want = 0
        for j = 1, i % 50 do want = want + (i * j) % 3000 end
        if i % 500 == 0 then want = want + 70000 + i end
        assert.equal("ok", ts[i]:await())
        assert.equal(want, ts[i].value)
      end
    end)
    assert.equal("ok", status)
  end)

  it("gives a burst's pages to the next burst after a full collection, not to the kernel", function()
    if not arena then return end                 -- (without it: alloc_cache_spec's anchors)
    local function burst()
      collectgarbage(); collectgarbage()
      local before = faults()
      assert.equal("ok", (tide.run(function()
        local ts = {}
        for i = 1, 100000 do ts[i] = tide.spawn(function() return i end) end
        for i = 1, 100000 do ts[i]:await() end
      end)))
      return faults() - before
    end
    local first = burst()
    local again = burst()
    assert.is_true(tide.stats().alloc_cache.arena.free >= 0)
    assert.is_true(again * 10 < first + 1000, ("faults: %d, then %d"):format(first, again))
  end)

  -- A process that allocates little after a burst (a worker between jobs)
  -- kept the burst's free pages, over the cap, until 64 MiB more were
  -- handed out: the loop's ticks purge every 5 s too.
  it("gives free pages over the cap back within ~10 s of a burst while the loop ticks", function()
    if not arena then return end
    tide.configure{ alloc_cache = 4 * 1024 * 1024 }
    assert.equal("ok", (tide.run(function()
      local free = dropped_tables(600000)           -- ~50 MB of small blocks
      assert.is_true(free > 20 * 1024 * 1024, "free pages after the burst: " .. free)
      local deadline = tide.now() + 15000
      while tide.stats().alloc_cache.arena.free > 4 * 1024 * 1024 and tide.now() < deadline do tide.sleep(500) end
      local left = tide.stats().alloc_cache.arena.free
      assert.is_true(left <= 4 * 1024 * 1024, ("%d bytes of free pages left after 15 s"):format(left))
    end)))
  end)

  it("gives free pages back to the kernel when the cap is lowered: RSS falls", function()
    if not arena then return end
    local free = dropped_tables(400000)             -- ~30 MB of small blocks
    assert.is_true(free > 16 * 1024 * 1024, "free pages: " .. free)
    local before = rss()
    tide.configure{ alloc_cache = 0 }
    local s = tide.stats().alloc_cache.arena
    assert.equal(0, s.free)
    assert.is_true(s.given_back >= free)
    local fell = before - rss()
    assert.is_true(fell > free / 2, ("RSS fell by %d bytes, %d were free"):format(fell, free))
  end)
end)
