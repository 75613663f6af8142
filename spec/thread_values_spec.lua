-- spec/thread_values_spec.lua — what crosses to a thread and back: large values by LuaJIT's
-- serializer, small ones and errors by tide's codec (src/codec.h, "Between the threads").
local tide = require "tide"
local core = require "tide.core"

tide.configure{ threads = 2 }

--- n records like bench/threads.lua's (about 100 bytes each in tide's codec).
local function records(n)
  local users = {}
  for i = 1, n do
    users[i] = { id = i, name = "user" .. i, score = i * 1.5, active = i % 2 == 0,
                 tags = { "alpha", "beta" }, address = { zip = 10000 + i, [2.5] = -0.0 } }
  end
  return { users = users, meta = { count = n, [true] = "yes" } }
end

local echo = function(...) return ... end

describe("values crossing to a thread", function()
  after_each(function()
    spec_helper.assert_idle()
    assert.equal(0, tide.stats().threads.in_flight)
  end)

  it("hands large arguments and results over intact, beside small ones", function()
    local big = records(2000)
    assert.equal(9, core.encode_local(big):byte(1))      -- by LuaJIT's serializer
    assert.equal(6, core.encode_local({ 1, 2 }):byte(1)) -- in tide's codec
    spec_helper.run(function()
      local st, a, b, c, d = tide.spawn{ mode = "thread", run = echo, args = { n = 4, big, "s", nil, { 1 } } }:await()
      assert.equal("ok", st)
      assert.equal(core.encode(big), core.encode(a))     -- canonical bytes: equal contents
      assert.same({ "s", nil, { 1 } }, { b, c, d })
      assert.equal(-math.huge, 1 / a.users[7].address[2.5])
      local st2, made = tide.spawn{ mode = "thread", run = function(n)
        local t = {}
        for i = 1, n do t[i] = { i, tostring(i) } end
        return t
      end, args = { 5000 } }:await()
      assert.equal("ok", st2)
      assert.equal(5000, #made)
      assert.same({ 4321, "4321" }, made[4321])
    end)
  end)

  it("hands 64-bit integers over to threads, which processes refuse with the path", function()
    spec_helper.run(function()
      local st, v, w = tide.spawn{ mode = "thread", run = function(x, t) return x + 1, t end,
                                   args = { n = 2, 41LL, { big = 2ULL ^ 63, small = { 1 } } } }:await()
      assert.equal("ok", st)
      assert.equal("42LL", tostring(v))
      assert.equal("9223372036854775808ULL", tostring(w.big))
      local ok, err = pcall(tide.spawn, { mode = "process", run = echo, args = { n = 1, { x = 41LL } } })
      assert.is_false(ok)
      assert.matches("tide.spawn: args[1].x: cdata cannot cross to a process", err, 1, true)
    end)
  end)

  it("hands an error value over as it hands results: 64-bit integers, large tables", function()
    spec_helper.run(function()
      local st, err = tide.spawn{ mode = "thread", run = function() error({ code = 5LL }) end }:await()
      assert.equal("error", st)
      assert.equal("table", type(err))
      assert.equal("5LL", tostring(err.code))
      local st2, err2 = tide.spawn{ mode = "thread", run = function(n)
        local t = {}
        for i = 1, n do t[i] = { i } end
        error(t)
      end, args = { 3000 } }:await()
      assert.equal("error", st2)
      assert.equal(3000, #err2)
      assert.equal(1234, err2[1234][1])
    end)
  end)

  it("gives each task one outcome, and its own large value, while others time out, fail and are cancelled", function()
    -- Large arguments and results (the serializer's way) in flight while
    -- attempts end at random: a result must reach its own task or nobody.
    math.randomseed(21)
    local calls, expect, want = {}, {}, {}
    spec_helper.run(function()
      local ts = {}
      for i = 1, 200 do
        local kind = math.random(4)
        local v = records(20 + i % 7)
        v.meta.id = i
        want[i] = core.encode(v)
        expect[i] = ({ "ok", "error", "timeout", "cancelled" })[kind]
        ts[i] = tide.spawn{
          mode = "thread", args = { n = 2, v, kind },
          run = function(t, k)
            local tide = require "tide"
            if k == 2 then error(t) end
            if k >= 3 then tide.sleep(2000) end
            tide.sleep(math.random(0, 3))
            return t
          end,
          timeout = kind == 3 and math.random(1, 30) or nil,
          handle_result = function(st) calls[i] = (calls[i] or 0) + 1; assert(st == expect[i], st) end,
        }
        if kind == 4 then tide.spawn(function() tide.sleep(math.random(0, 20)); ts[i]:cancel() end) end
      end
      for i = 1, 200 do
        local st, v = ts[i]:await()
        assert.equal(expect[i], st)
        if st == "ok" or st == "error" then assert.equal(want[i], core.encode(v), "task " .. i) end
      end
    end)
    for i = 1, 200 do assert.equal(1, calls[i]) end
  end)

  it("crosses tide.json's null and arrays both ways, small and large, as each side's own", function()
    local json = tide.json
    spec_helper.run(function()
      for _, n in ipairs{ 1, 300 } do
        local list = {}
        for i = 1, n do list[i] = { id = i, note = json.null, tags = json.array() } end
        local st, back, made = tide.spawn{ mode = "thread", args = { list }, run = function(l)
          local here = require "tide"
          for _, r in ipairs(l) do
            assert(rawequal(r.note, here.null) and getmetatable(r.tags) ~= nil, "not the thread's own")
          end
          return l, { items = here.array(), none = here.null, some = here.array{ 1, here.null } }
        end }:await()
        assert.equal("ok", st, back)
        assert.is_true(rawequal(back[n].note, json.null))
        assert.equal("[]", json.encode(back[n].tags))
        assert.equal('[1,null]', json.encode(made.some))
        assert.equal('[]', json.encode(made.items))
        assert.is_true(rawequal(made.none, json.null))
      end
    end)
  end)

  -- A table with null's metatable and contents is not null: tide's codec sends it as a
  -- plain table.  Past 256 bytes LuaJIT's serializer wrote it as null's metatable on a
  -- table with contents, which the receiving side refused ("bad metatable reference"):
  -- the task failed with "bad arguments".  A key that is null crosses as a plain table.
  it("crosses a table with null's metatable and contents as a plain table, small and large", function()
    local json = tide.json
    local null_mt = getmetatable(json.null)
    spec_helper.run(function()
      for _, n in ipairs{ 1, 40 } do
        local fake = setmetatable({}, null_mt)
        for i = 1, n do rawset(fake, "k" .. i, "value " .. i) end
        local st, back, made = tide.spawn{ mode = "thread", args = { { fake, inner = { f = fake, [json.null] = true } }, n },
          run = function(v, n)
            local here = require "tide"
            assert(getmetatable(v[1]) == nil and v[1].k1 == "value 1", "a fake null reached the thread as such")
            assert(getmetatable(v.inner.f) == nil and not rawequal(v.inner.f, here.null), "not plain")
            for k in pairs(v.inner) do
              if type(k) == "table" then assert(getmetatable(k) == nil, "a key kept null's metatable") end
            end
            local out = setmetatable({}, getmetatable(here.null))
            for i = 1, n do rawset(out, "k" .. i, "value " .. i) end
            return v, { out, here.null }
          end }:await()
        assert.equal("ok", st, back)
        assert.is_nil(getmetatable(back[1]))
        assert.equal("value " .. n, back.inner.f["k" .. n])
        assert.is_nil(getmetatable(made[1]))
        assert.equal("value " .. n, made[1]["k" .. n])
        assert.is_true(rawequal(made[2], json.null))
      end
    end)
  end)

  it("names the path to what cannot cross in a large value, at the caller's line", function()
    local big = records(2000)
    big.users[1500].cb = print
    spec_helper.run(function()
      local ok, err = pcall(tide.spawn, { mode = "thread", run = echo, args = { n = 1, big } })
      assert.is_false(ok)
      assert.equal("tide.spawn: args[1].users[1500].cb: functions cannot cross to a thread",
                   (err:gsub("^[^:]*:%d+: ", "")))
      local st, msg = tide.spawn{ mode = "thread", run = function(n)
        local t = {}
        for i = 1, n do t[i] = { i } end
        t[n][1] = coroutine.create(print)
        return t
      end, args = { 3000 } }:await()
      assert.same({ "error", "results[1][3000][1]: coroutines cannot cross to a thread" }, { st, msg })
    end)
  end)

end)
