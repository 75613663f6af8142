-- spec/alloc_cache_spec.lua — tide.configure{ alloc_cache } from Lua: inside tasks that
-- allocate, from finalizers, again and again, with hostile values; tide.stats().alloc_cache.
--
-- The allocator's own contract (sizes, failures, lua_close) is checked by
-- spec/c/test_alloc_cache.c with a host allocator that verifies every call.
local tide = require "tide"
local H = spec_helper

local DEFAULT = 64 * 1024 * 1024
-- Small blocks in huge pages (src/arena.h), unless TIDE_ARENA=off: spec/run.sh
-- runs this file both ways.
local ARENA = tide.stats().alloc_cache.arena ~= nil

local faults = H.faults

--- 100,000 trivial tasks spawned, then awaited.
local function burst()
  assert.equal("ok", (tide.run(function()
    local ts = {}
    for i = 1, 100000 do ts[i] = tide.spawn(function() return i end) end
    for i = 1, 100000 do ts[i]:await() end
  end)))
end

describe("tide.configure{ alloc_cache }", function()
  after_each(function()
    tide.configure{ alloc_cache = DEFAULT, alloc_cache_small = 0 }
    H.assert_idle()
  end)

  it("is taken from inside tasks that allocate, and every task still ends with its value", function()
    local status = tide.run(function()
      local ts = {}
      for i = 1, 2000 do
        ts[i] = tide.spawn(function()
          local t = {}
          for j = 1, 50 do t[j] = { j, tostring(j) } end
          if i % 100 == 0 then tide.configure{ alloc_cache = (i % 300) * 1000 } end
          tide.sleep(0)
          return #t + t[50][1]
        end)
      end
      for i = 1, #ts do
        assert.equal("ok", ts[i]:await())
        assert.equal(100, ts[i].value)
      end
    end)
    assert.equal("ok", status)
    local s = tide.stats().alloc_cache
    assert.equal(200000, s.cap)                       -- the last one set: i = 2000
    assert.is_true(s.kept <= s.cap, s.kept .. " kept over the cap")
  end)

  it("is taken from finalizers, which run at allocations", function()
    local ran = 0
    local function drop(i)                            -- (no proxy left in this frame's slots)
      local u = newproxy(true)
      getmetatable(u).__gc = function()
        local t = {}
        for j = 1, 100 do t[j] = { j } end
        tide.configure{ alloc_cache = i * 4096 }
        ran = ran + 1
      end
    end
    for i = 1, 20 do drop(i) end
    for _ = 1, 3 do collectgarbage() end
    assert.equal(20, ran)
    local s = tide.stats().alloc_cache
    assert.is_true(s.cap >= 4096 and s.cap <= 20 * 4096, "cap " .. s.cap)
    assert.is_true(s.kept <= s.cap, s.kept .. " kept over the cap")
  end)

  it("set again and again, each cap holds at once", function()
    for i = 1, 200 do
      local cap = (i * 7919) % 100000
      local t = {}
      for j = 1, 200 do t[j] = { j, i } end
      t = nil
      collectgarbage()
      tide.configure{ alloc_cache = cap }
      local s = tide.stats().alloc_cache
      assert.equal(cap, s.cap)
      assert.is_true(s.kept <= cap, s.kept .. " kept over " .. cap)
      if ARENA then assert.is_true(s.arena.free <= cap, s.arena.free .. " bytes of free pages over " .. cap) end
    end
  end)

  it("refuses what is not a byte count, naming the option, and changes nothing", function()
    tide.configure{ alloc_cache = 12345 * 8 }
    for _, v in ipairs{ -1, 0.5, 0 / 0, 1 / 0, -1 / 0, "1", true, {} } do
      local ok, err = pcall(tide.configure, { alloc_cache = v })
      assert.is_false(ok)
      assert.matches("tide.configure", err, 1, true)
      assert.matches("alloc_cache", err, 1, true)
    end
    assert.equal(12345 * 8, tide.stats().alloc_cache.cap)
  end)

  it("takes a cap of 2^64 or more as no cap, not as 0", function()
    tide.configure{ alloc_cache = 2 ^ 70 }
    assert.is_true(tide.stats().alloc_cache.cap >= 2 ^ 63)
    local t = {}
    for j = 1, 10000 do t[j] = { j } end
    t = nil
    collectgarbage()
    assert.is_true(tide.stats().alloc_cache.kept > 0)
  end)

  it("keeps small blocks only when asked (alloc_cache_small), within both caps", function()
    local function churn()
      local t = {}
      for j = 1, 20000 do t[j] = { j } end
      t = nil
      collectgarbage(); collectgarbage()
    end
    churn()
    local s = tide.stats().alloc_cache
    assert.equal(0, s.small_cap)
    assert.equal(0, s.small)
    tide.configure{ alloc_cache_small = 65536 }
    churn()
    s = tide.stats().alloc_cache
    assert.equal(65536, s.small_cap)
    if ARENA then                                   -- the arena's pages keep them: never on lists
      assert.equal(0, s.small)
    else
      assert.is_true(s.small > 0 and s.small <= 65536, "small " .. s.small)
    end
    assert.is_true(s.kept >= s.small and s.kept <= s.cap)
    tide.configure{ alloc_cache = 1000 }                -- the cap bounds the small blocks too
    s = tide.stats().alloc_cache
    assert.is_true(s.kept <= 1000 and s.small <= s.kept, s.kept .. " kept, " .. s.small .. " small")
    for _, v in ipairs{ -1, 0.5, 0 / 0, "1", true } do
      local ok, err = pcall(tide.configure, { alloc_cache_small = v })
      assert.is_false(ok)
      assert.matches("alloc_cache_small", err, 1, true)
    end
    assert.equal(65536, tide.stats().alloc_cache.small_cap)
    tide.configure{ alloc_cache_small = 0 }
    assert.equal(0, tide.stats().alloc_cache.small)
  end)

  -- What the cache is for: LuaJIT's allocator gives a segment back to the
  -- kernel once all of it is free, so a burst after a full collection
  -- faulted its memory in again, page by page (10,700 faults for 200,000
  -- tasks).  The anchors keep those segments mapped.  The control (cap 0)
  -- shows the faults the check would see without them.
  it("lets a burst after a full collection reuse the memory of the last one, not fault it in again", function()
    local function collected_burst()
      collectgarbage(); collectgarbage()
      local before = faults()
      burst()
      return faults() - before
    end
    tide.configure{ alloc_cache = 0 }
    collected_burst()
    local without = collected_burst()
    assert.equal(0, tide.stats().alloc_cache.anchors)
    tide.configure{ alloc_cache = DEFAULT }
    collected_burst()
    local s = tide.stats().alloc_cache
    if ARENA then                                 -- small blocks are in the arena: no anchors needed
      assert.equal(0, s.anchors)
    else
      assert.is_true(s.anchors > 0 and s.anchors <= DEFAULT / 524288, "anchors " .. s.anchors)   -- 512 KiB windows
    end
    assert.is_true(s.kept <= s.cap)
    local with = collected_burst()
    if ARENA then                                 -- the arena's free pages wait for a purge, whatever the cap
      assert.is_true(with < 1000 and without < 1000, with .. " faults with the cache, " .. without .. " without")
    else
      assert.is_true(without > 1000, without .. " faults without the cache")
      assert.is_true(with * 10 < without, with .. " faults with the cache, " .. without .. " without")
    end
  end)

  -- The anchors leave LuaJIT's allocator no free chunk larger than a window
  -- in the memory they hold: a block larger than the rings' (a hash part
  -- of 2^17 nodes, 3 MiB: a 100,000-node flow's tables) was mapped afresh
  -- and faulted in (769 pages) each time it was made after a full
  -- collection.  Kept once its size comes back, it is faulted in twice.
  it("keeps a huge table part made again after each full collection, not faulting it in each time", function()
    burst()                                     -- its memory is anchored after
    local function make()                       -- number keys: a hash part alone, 3 MiB at the end
      local t = {}
      for i = 1, 100000 do t[i + 0.5] = true end
      return t
    end
    local t, made = nil, {}
    for r = 1, 6 do
      collectgarbage(); collectgarbage()
      local before = faults()
      t = make()                                -- the one before is freed at the next collection
      made[r] = faults() - before
    end
    assert.is_true(ARENA or tide.stats().alloc_cache.anchors > 0)
    local last = made[4] + made[5] + made[6]
    assert.is_true(last < 200, "faults making the table: " .. table.concat(made, ", "))
    assert.is_true(#t == 0)
  end)

  -- A block larger than an anchor's window, and not of a size the rings
  -- keep (a string of 200 KB, made after each full collection: a message
  -- read, a body decoded), was mapped afresh and faulted in (49 pages)
  -- each time with windows of 64 KiB; windows of 512 KiB leave the
  -- allocator room for it in the memory the anchors hold.
  it("leaves room in the anchored memory for a 200 KB string made after each full collection", function()
    burst()                                     -- its memory is anchored after
    local s, made = nil, {}
    for r = 1, 6 do
      collectgarbage(); collectgarbage()
      local before = faults()
      s = string.rep("x", 200000 - 1) .. r      -- (two strings of 200 KB: the rep, then this one)
      made[r] = faults() - before
    end
    assert.is_true(ARENA or tide.stats().alloc_cache.anchors > 0)
    assert.is_true(made[4] + made[5] + made[6] < 30, "faults making the string: " .. table.concat(made, ", "))
    assert.equal(200000, #s)
  end)
end)
