-- spec/review_r19_sqlite_config_spec.lua — review of issue 19: tide's SQLITE_CONFIG_PAGECACHE call in a host
-- that initialized SQLite first (another binding, a C host with its own error log).
describe("review r19: sqlite3_config in a host that initialized SQLite first", function()
  it("adds nothing to the host's SQLite error log when tide opens its first store", function()
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write([==[
local ffi = require "ffi"
ffi.cdef[[
int sqlite3_config(int, ...);
int sqlite3_initialize(void);
typedef void (*r19_logfn)(void*, int, const char*);
]]
local lib = ffi.load("sqlite3")
local logs = {}
local cb = ffi.cast("r19_logfn", function(_, code, msg) logs[#logs + 1] = code .. ": " .. ffi.string(msg) end)
assert(lib.sqlite3_config(16, cb, nil) == 0)   -- SQLITE_CONFIG_LOG, the host's own
assert(lib.sqlite3_initialize() == 0)
local tide = require "tide"
local path = os.tmpname(); os.remove(path)
local q = tide.queue.open("sqlite:" .. path)
q:enqueue{ target = "t", method = "m" }
q:close()
os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
io.write(table.concat(logs, "\n"))
]==])
    f:close()
    local p = io.popen('LUA_CPATH="build/?.so;;" luajit ' .. script .. " 2>&1")
    local out = p:read("*a")
    p:close()
    os.remove(script)
    assert.equal("", out)
  end)
end)
