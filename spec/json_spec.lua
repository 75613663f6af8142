-- spec/json_spec.lua — tide.jobs.json: exact numbers, arrays kept arrays, strict input
-- (JSONTestSuite's test_parsing cases), UTF-8 refused or repaired with its path.
require "tide"                    -- (loads the embedded modules)
local json = require "tide.jobs.json"

local CASES = dofile("spec/data/json_parsing.lua")

local exact = spec_helper.exact

describe("tide.jobs.json", function()
  describe("against JSONTestSuite's test_parsing cases", function()
    local accepted, refused = {}, {}
    setup(function()
      for _, c in ipairs(CASES) do
        local v, err = json.decode(c[2])
        if err then refused[c[1]] = err else accepted[c[1]] = { v } end
      end
    end)

    it("accepts every y_ case, and encodes it back to JSON that decodes to the same value", function()
      local n = 0
      for _, c in ipairs(CASES) do
        if c[1]:match("^y_") then
          n = n + 1
          assert(accepted[c[1]], c[1] .. " refused: " .. tostring(refused[c[1]]))
          local v = accepted[c[1]][1]
          local text = assert(json.try_encode(v))
          local again, err = json.decode(text)
          assert(not err, c[1] .. ": " .. tostring(err))
          local same, why = exact(v, again)
          assert(same, c[1] .. ": " .. tostring(why))
        end
      end
      assert.equal(95, n)
    end)

    it("refuses every n_ case, naming the position of the first error", function()
      local n = 0
      for _, c in ipairs(CASES) do
        if c[1]:match("^n_") then
          n = n + 1
          local err = refused[c[1]]
          assert(err, c[1] .. " accepted: " .. tostring(accepted[c[1]] and json.try_encode(accepted[c[1]][1], nil, true)))
          assert(err:match(" at character %d+$"), c[1] .. ": " .. err)
        end
      end
      assert.equal(188, n)
    end)

    it("refuses what the issue names, each with a message that says what and where", function()
      local cases = {
        { "-2.", "bad number (a digit expected after '.') at character 4" },
        { "0.e1", "bad number (a digit expected after '.') at character 3" },
        { "2.e3", "bad number (a digit expected after '.') at character 3" },
        { "2.e+3", "bad number (a digit expected after '.') at character 3" },
        { "2.e-3", "bad number (a digit expected after '.') at character 3" },
        { "[.123]", "unexpected character '.' (a value expected) at character 2" },
        { "1.", "bad number (a digit expected after '.') at character 3" },
        { '["a\nb"]', "raw control character in a string (escape it) at character 4" },
        { '["a\tb"]', "raw control character in a string (escape it) at character 4" },
        { '{"order":', "unexpected end (a value expected) at character 10" },
        { "[1,]", "unexpected character ']' (a value expected) at character 4" },
        { '["\\uD800"]', "lone surrogate \\uD800 at character 3" },
        { '["\255"]', "invalid UTF-8 at character 3" },
        { "[1e999]", "number out of range at character 2" },
        { "[1] x", "unexpected character 'x' after the value at character 5" },
        { "", "unexpected end (a value expected) at character 1" },
      }
      for _, c in ipairs(cases) do
        local v, err = json.decode(c[1])
        assert(v == nil and err == c[2], ("%q: expected %q, got %s %s"):format(c[1], c[2], tostring(v), tostring(err)))
      end
    end)

    it("makes its choice on every i_ case: big and tiny numbers kept, invalid UTF-8, lone surrogates and overflow refused", function()
      local choice = {}
      for _, c in ipairs(CASES) do
        if c[1]:match("^i_") then choice[#choice + 1] = c[1] .. (accepted[c[1]] and " accepted" or " refused") end
      end
      table.sort(choice)
      local expect = {}
      for _, c in ipairs(CASES) do
        local name = c[1]
        if name:match("^i_") then
          local keep = name:match("^i_number_") and not name:match("overflow") and not name:match("huge_exp")
                       and not name:match("neg_int_huge") and not name:match("pos_double_huge")
                       or name == "i_structure_500_nested_arrays.json"
          expect[#expect + 1] = name .. (keep and " accepted" or " refused")
        end
      end
      table.sort(expect)
      assert.same(expect, choice)
      assert.equal(35, #choice)
    end)
  end)

  describe("numbers", function()
    it("prints integers below 2^53 as integers and every other double in its shortest exact form", function()
      local cases = {
        { 123456789012345, "123456789012345" }, { 1700000000123456, "1700000000123456" },
        { 2 ^ 53 - 1, "9007199254740991" }, { -(2 ^ 53 - 1), "-9007199254740991" }, { 1e15, "1000000000000000" },
        { 0.1 + 0.2, "0.30000000000000004" }, { 0.1, "0.1" }, { 1 / 3, "0.3333333333333333" },
        { 1e300, "1e+300" }, { 2 ^ 53 + 2, "9007199254740994" }, { 5e-324, "5e-324" }, { -0.0, "-0" },
        { 0, "0" }, { 1.5, "1.5" }, { 2 ^ 63, "9.223372036854776e+18" },
      }
      for _, c in ipairs(cases) do
        assert.equal(c[2], json.encode(c[1]))
        local back = json.decode(c[2])
        assert(exact(c[1], back), c[2])
      end
    end)

    it("round-trips 20,000 random doubles of every exponent bit for bit (seeded)", function()
      local ffi = require "ffi"
      local seed = tonumber(os.getenv("JSON_SEED")) or os.time()
      math.randomseed(seed)
      local u = ffi.new("union { double d; uint32_t w[2]; }")
      for batch = 1, 20 do                       -- 1,000 doubles a document (extreme exponents read back slowly: LuaJIT scans them exactly, with big numbers)
        local xs = {}
        for i = 1, 1000 do
          -- (never the exponent of inf and nan: a NaN with a payload read
          -- through the FFI can crash LuaJIT, which tags values inside NaNs)
          local hi = math.random(0, 2 ^ 32 - 1)
          while bit.band(bit.rshift(hi, 20), 0x7FF) == 0x7FF do hi = math.random(0, 2 ^ 32 - 1) end
          u.w[0], u.w[1] = math.random(0, 2 ^ 32 - 1), hi
          xs[i] = u.d
        end
        local text = json.encode(xs)
        local back = json.decode(text)
        for i = 1, 1000 do
          local x, y = xs[i], back[i]
          assert(x == y and (x ~= 0 or 1 / x == 1 / y),
                 ("seed %d, value %d: %.17g read back as %.17g"):format(seed, (batch - 1) * 1000 + i, x, y))
        end
      end
    end)

    it("refuses inf and nan with their path", function()
      assert.same({ nil, "args.x: inf is not a JSON number" }, { json.try_encode({ x = math.huge }, "args") })
      assert.same({ nil, "args[2]: nan is not a JSON number" }, { json.try_encode({ 1, 0 / 0 }, "args") })
    end)
  end)

  describe("arrays", function()
    it("keeps [] and {\"a\":[]} arrays, and lets Lua code mark an empty array", function()
      assert.equal("[]", json.encode(json.decode("[]")))
      assert.equal('{"a":[]}', json.encode(json.decode('{"a":[]}')))
      assert.equal('[[],{}]', json.encode(json.decode('[[],{}]')))
      assert.equal("{}", json.encode({}))
      assert.equal('{"list":[]}', json.encode({ list = json.array() }))
      assert.equal("[1,2]", json.encode(json.array{ 1, 2 }))
      assert.equal("[1,null,3]", json.encode(json.decode("[1,null,3]")))
      assert.equal(json.null, json.decode("[1,null,3]")[2])
      assert.is_nil(json.decode("null"))
    end)

    -- 65fe5fc moved null into C (src/codec_marks.c), whose __newindex named the
    -- caller of the function that assigned (luaL_where(L, 2)), not that function's
    -- line, as error(msg, 2) did: from a pcall'd function, no place at all.
    it("refuses a write to null at the line that writes it", function()
      local function assign() json.null.x = 1 end
      local line = debug.getinfo(assign, "S").linedefined
      local ok, err = pcall(assign)
      assert.is_false(ok)
      assert.equal(("spec/json_spec.lua:%d: tide.json.null is read-only"):format(line), err)
      assert.equal("null", tostring(json.null))
      assert.is_nil(next(json.null))
    end)
  end)

  describe("strings", function()
    it("refuses invalid UTF-8 in values and keys, naming the path and the byte", function()
      assert.same({ nil, "args.name: invalid UTF-8 at byte 3" }, { json.try_encode({ name = "ab\255cd" }, "args") })
      assert.same({ nil, "args.items[2]: invalid UTF-8 at byte 1" }, { json.try_encode({ items = { "ok", "\192\175" } }, "args") })
      assert.same({ nil, "args: a key: invalid UTF-8 at byte 2" }, { json.try_encode({ ["a\237\160\128"] = 1 }, "args") })
      assert.same({ nil, "args.s: invalid UTF-8 at byte 1" }, { json.try_encode({ s = "\244\144\128\128" }, "args") })   -- past U+10FFFF
    end)

    it("escapes control characters and keeps NUL bytes, every code point and the rest exactly", function()
      local s = "a\0b\1\31\"\\/\127é€😀\226\128\168"
      local text = json.encode({ s = s })
      assert.equal('{"s":"a\\u0000b\\u0001\\u001f\\"\\\\/\127é€😀\226\128\168"}', text)
      assert.equal(s, json.decode(text).s)
      assert.equal("😀", json.decode('"\\ud83d\\ude00"'))
    end)

    it("repairs free text when asked: invalid bytes become U+FFFD", function()
      assert.equal("ab\239\191\189cd", json.sanitize("ab\255cd"))
      assert.equal('"ab\239\191\189"', json.try_encode("ab\255", nil, true))
    end)
  end)

  it("bounds nesting on both sides, without a stack overflow", function()
    local deep = {}
    local t = deep
    for _ = 1, 2000 do t[1] = {}; t = t[1] end
    local s, err = json.try_encode(deep, "args")
    assert.is_nil(s)
    assert.matches("nested too deep", err)
    local cyclic = {}
    cyclic.self = cyclic
    assert.matches("^args%.self%.self.*nested too deep", select(2, json.try_encode(cyclic, "args")))
    assert.matches("nested too deep %(more than 1000 levels%) at character 1001$", select(2, json.decode(("["):rep(100000))))
  end)
end)
