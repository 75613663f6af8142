-- spec/review_rlj_spec.lua — review of the hand-over by LuaJIT's serializer (encode_local,
-- decode_list_local: src/codec_lj.c): what the change under review broke.
local tide = require "tide"
local core = require "tide.core"

-- One thread, 4 MB: the memory test fills its state to the limit.
tide.configure{ threads = 1, thread_memory = 4 }

local echo = function(...) return ... end

--- The message of pcall(fn, ...)'s error, without its "file:line: ".
local function message(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok)
  return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

--- A table whose encoding takes more than codec_lj.c's SMALL (256) bytes.
local function large()
  local t = {}
  for i = 1, 40 do t[i] = "record " .. i end
  return t
end

describe("values crossing to a thread (review of encode_local)", function()
  after_each(function()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().threads.in_flight)
  end)

  -- 64-bit integers and light userdata cross to threads now; the error for
  -- a value the serializer refuses must name what cannot cross, not one of
  -- those met on the way to it.
  it("names what cannot cross, not the 64-bit integer or light userdata beside it", function()
    local function spawn(args) return tide.spawn{ mode = "thread", run = echo, args = args } end
    -- small (tide's codec first), and large
    assert.equal("tide.spawn: args[2]: functions cannot cross to a thread",
                 message(spawn, { n = 2, 1LL, print }))
    local big = large()
    big[10] = 5ULL
    big[30] = coroutine.create(print)
    assert.equal("tide.spawn: args[1][30]: coroutines cannot cross to a thread",
                 message(spawn, { n = 1, big }))
    assert.equal("value.f: functions cannot cross to a thread",
                 message(core.encode_local, { a = 1LL, f = print }))
    spec_helper.run(function()
      -- results: the worker's tide__encode_list_local
      local st, msg = tide.spawn{ mode = "thread", run = function()
        local t = {}
        for i = 1, 40 do t[i] = "record " .. i end
        t[5] = 7LL
        t[35] = print
        return 1LL, t
      end }:await()
      assert.same({ "error", "results[2][35]: functions cannot cross to a thread" }, { st, msg })
    end)
  end)

  -- The list of results is copied on the stack for the serializer's
  -- protected call: past ~4,000 values there is no room for the copies, and
  -- a 64-bit integer among them must still cross.
  it("hands back a 64-bit integer among thousands of results", function()
    spec_helper.run(function()
      for _, n in ipairs{ 3000, 4500, 6900 } do
        local r = { tide.spawn{ mode = "thread", args = { n }, run = function(n)
          local t = {}
          for i = 1, n do t[i] = i end
          t[1] = 5LL
          return unpack(t, 1, n)
        end }:await() }
        assert.equal("ok", r[1], tostring(r[2]))
        assert.equal(n + 1, #r)
        assert.equal("5LL", tostring(r[2]))
        assert.equal(n, r[n + 1])
      end
    end)
  end)

  -- tide's codec encodes results from the stack with malloc'd memory: a job
  -- that returns with its state full to thread_memory still delivered them.
  -- The serializer's way needs the state's memory (the list table, made
  -- outside any protected call): when it has none, the results must still
  -- cross by tide's codec, as they did, not be lost to "not enough memory".
  it("delivers the results of a job that returns with its state full to thread_memory", function()
    local function fill()
      jit.off()
      collectgarbage("restart")
      collectgarbage()
      local pad = ("y"):rep(300)             -- first: the results are over SMALL at once
      local tnew = require "table.new"
      local keep = tnew(5000, 0)
      local big = {}
      for i = 1, 3000 do big[i] = i end
      select("#", unpack(big))               -- the stack grows now, not when the results go
      big = nil
      collectgarbage()
      collectgarbage("stop")                 -- (restarted by the next fill: keep this test last)
      local n, size, pcall = 0, 8192, pcall
      pcall(function()
        while n < 5000 do                    -- ever smaller tables, to the last bytes
          local ok, s = pcall(tnew, size, 0)
          if ok then n = n + 1; keep[n] = s elseif size == 0 then break else size = math.floor(size / 2) end
        end
      end)
      return pad, keep, n
    end
    spec_helper.run(function()
      for _ = 1, 3 do
        local st, pad, keep, n = tide.spawn{ mode = "thread", run = fill }:await()
        assert.equal("ok", st, tostring(pad))
        assert.equal(300, #pad)
        assert.equal(n, #keep)
      end
    end)
  end)

end)
