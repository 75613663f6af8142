-- spec/review_revc_spec.lua — review of the codec's string references
-- (src/codec.c: definitions, tag 7, and references, tag 8, in unordered
-- encodings) through the paths that use them: a thread or process task's
-- arguments { n = N, ... } and its results.
--
-- A task's arguments have array values and one pair, n.  A string defined
-- among the values made the encoder encode the whole table again without
-- references; the references must survive that shape and the values come
-- back equal.  A table whose array value the walk meets after a pair made
-- each level encode its contents twice: 2^depth encodings for nested ones,
-- a spawn that never returned.
local tide = require "tide"
local core = require "tide.core"
local H = spec_helper

--- Records whose keys and values repeat, with array values, table keys
--- and strings met in both parts of mixed tables.
local function records(n)
  local t = {}
  for i = 1, n do
    t[i] = { name = "n" .. i % 5, city = "Springfield", tags = { "a", "name", "a" },
             [{ "name", k = "city" }] = "name", "city", "a" }
  end
  return t
end

--- Nested tables { x = child, [1] = "v" } whose key x the walk meets
--- before [1].
local function late_values(depth)
  local function level(child)
    for _, name in ipairs{ "x", "y", "z", "a", "b", "c", "d", "e", "f", "g" } do
      local t = {}
      t[name] = child
      t[1] = "v"
      if type(next(t)) == "string" then return t end
    end
    error("no key the walk meets before [1]")
  end
  local t = "leaf"
  for _ = 1, depth do t = level(t) end
  return t
end

--- Deep equality; table keys are matched by equal contents.
local function same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= "table" then return a == b or (a ~= a and b ~= b) end
  local na, nb = 0, 0
  for _ in pairs(b) do nb = nb + 1 end
  for k, v in pairs(a) do
    na = na + 1
    if type(k) == "table" then
      local found = false
      for k2, v2 in pairs(b) do
        if type(k2) == "table" and same(k, k2) and same(v, v2) then found = true break end
      end
      if not found then return false end
    elseif not same(v, b[k]) then
      return false
    end
  end
  return na == nb
end

local function echo(...) return ... end

describe("review revc: the codec's string references", function()
  after_each(function() H.assert_idle() end)

  it("a task's arguments { n = N, ... } cross with their references, smaller than sorted", function()
    local recs = records(200)
    local args = { n = 3, recs, "name", { name = "city" } }
    local unordered, sorted = core.encode_unordered(args), core.encode(args)
    assert.is_true(#unordered < #sorted / 2, ("%d bytes unordered, %d sorted"):format(#unordered, #sorted))
    assert.is_true(#unordered <= #core.encode_unordered(recs) + 64)
    assert.is_true(same(args, core.decode(unordered)))
    local a, b, c = core.decode_list(unordered)
    assert.is_true(same(recs, a) and b == "name" and same({ name = "city" }, c))
  end)

  for _, mode in ipairs{ "thread", "process" } do
    it(("a %s task gets arguments full of references and returns them equal"):format(mode), function()
      local recs = records(300)
      local status, a, b, c, d = H.run(function()
        return tide.spawn{ mode = mode, run = echo, args = { recs, "name", late_values(30), "a" } }:await()
      end)
      assert.equal("ok", status)
      assert.is_true(same(recs, a))
      assert.equal("name", b)
      assert.is_true(same(late_values(30), c))
      assert.equal("a", d)
    end)
  end

  it("60 nested tables whose array value comes late encode at once, either way", function()
    local t = late_values(60)
    local t0 = os.clock()
    local unordered, sorted = core.encode_unordered(t), core.encode(t)
    local spent = os.clock() - t0
    assert.is_true(spent < 1, ("%.3f s"):format(spent))
    assert.is_true(same(t, core.decode(unordered)) and same(t, core.decode(sorted)))
    assert.equal(sorted, core.encode(core.decode(unordered)))
  end)

  it("hostile references come back as nil and a message, never a value", function()
    local cases = {
      { "\8\0", "bad encoding at byte 0: reference to string 0, of 0 defined" },
      { "\6\2\0\7\1a\8\1", "bad encoding at byte 6: reference to string 1, of 1 defined" },
      { "\6\2\0\7\1a\9", "bad encoding at byte 6: unknown tag 0x09" },
      { "\6\0\1\7\5ab", "bad encoding at byte 7: truncated" },
    }
    for _, case in ipairs(cases) do
      local v, err = core.decode(case[1])
      assert.is_nil(v)
      assert.equal(case[2], err)
      local ok, lerr = pcall(core.decode_list, case[1])
      assert.is_false(ok)
      assert.equal(case[2], tostring(lerr):match("bad encoding.*$"))
    end
  end)
end)
