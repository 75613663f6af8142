-- spec/http_spec.lua — tide.engine.http: requests as tasks under load, what the parser
-- refuses, handlers that raise, time out or answer badly, servers closed mid-request,
-- the loop's lifetime, idle connections, options.
local H = spec_helper
local tide = require "tide"
local http = require "tide.engine.http"
local cjson = require "cjson"

local PY = "env -u LD_PRELOAD /usr/bin/python3 spec/tools/httpc.py "

local shell = H.sh_on_thread

local function raw(srv, text, seconds)
  return shell(PY .. ("raw %d '%s' %s"):format(srv.port, text, seconds or 2))
end

local function echo(req)
  local a, b = req.path:match("^/echo/(%d+)/(%d+)$")
  if a then tide.sleep((a * 7 + b * 13) % 11) end   -- answers finish out of order across connections
  return 200, { ["content-type"] = "text/plain" }, "echo " .. req.path
end

describe("tide.engine.http", function()
  after_each(function() H.assert_idle() end)

  it("answers many interleaved and pipelined requests, each with its own answer, in order", function()
    local seed = os.time()
    local report
    H.run(function()
      local srv = assert(http.serve{ handler = echo })
      report = cjson.decode(shell(PY .. ("load %d 16 40 %d"):format(srv.port, seed)))
      local st = srv:stats()
      assert.equal(16 * 40, st.requests, "seed " .. seed)
      srv:close()
    end)
    assert.same({}, report.bad, "seed " .. seed)
    assert.equal(16 * 40, report.ok)
  end)

  it("gives the handler the method, path, query, headers, cookies and body", function()
    local seen, out
    H.run(function()
      local srv = assert(http.serve{ handler = function(req)
        seen = { method = req.method, path = req.path, q = req.query.q, ua = req.headers["x-thing"],
                 cookie = req:cookie("b"), body = req.body, name = req:form().name }
        return 201, { ["x-answer"] = 42 }, "made"
      end })
      out = shell(("env -u LD_PRELOAD curl -s -i -X POST -H 'X-Thing: one' -H 'Cookie: a=1; b=two' --data 'name=A+b%%26c' '%s'")
        :format(srv:url("/a%20b?q=x%2By&q=second")))
      srv:close()
    end)
    assert.same({ method = "POST", path = "/a b", q = "x+y", ua = "one", cookie = "two", body = "name=A+b%26c",
                  name = "A b&c" }, seen)
    assert.matches("^HTTP/1.1 201 Created\r\n", out)
    assert.matches("x%-answer: 42\r\n", out)
    assert.matches("\r\n\r\nmade$", out)
  end)

  it("answers what does not parse or is too large itself; the handler never sees it", function()
    local calls, out = 0, {}
    H.run(function()
      local srv = assert(http.serve{ max_body = 100, handler = function() calls = calls + 1; return 200, {}, "" end })
      out.garbage = raw(srv, "HELLO THERE\\r\\n\\r\\n")
      out.body = raw(srv, "POST / HTTP/1.1\\r\\nContent-Length: 101\\r\\n\\r\\n")
      out.chunked = raw(srv, "POST / HTTP/1.1\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n80\\r\\n"
                        .. ("x"):rep(128) .. "\\r\\n0\\r\\n\\r\\n")
      out.url = raw(srv, "GET /" .. ("a"):rep(9000) .. " HTTP/1.1\\r\\n\\r\\n")
      out.header = raw(srv, "GET / HTTP/1.1\\r\\nX: " .. ("b"):rep(90000) .. "\\r\\n\\r\\n")
      out.connect = raw(srv, "CONNECT example.com:443 HTTP/1.1\\r\\n\\r\\n")
      out.smuggle = raw(srv, "POST / HTTP/1.1\\r\\nContent-Length: 3\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n")
      assert.equal(0, calls)
      out.fine = raw(srv, "GET / HTTP/1.1\\r\\nConnection: close\\r\\n\\r\\n")
      -- an Upgrade is ignored (HTTP allows it): answered, then the connection closes
      out.upgrade = raw(srv, "GET / HTTP/1.1\\r\\nConnection: Upgrade\\r\\nUpgrade: websocket\\r\\n\\r\\nGARBAGE")
      assert.equal(2, calls)
      srv:close()
    end)
    assert.matches("^HTTP/1.1 400 Bad Request", out.garbage)
    assert.matches("^HTTP/1.1 413 Payload Too Large", out.body)
    assert.matches("^HTTP/1.1 413 Payload Too Large", out.chunked)
    assert.matches("^HTTP/1.1 414 URI Too Long", out.url)
    assert.matches("^HTTP/1.1 431 Request Header Fields Too Large", out.header)
    assert.matches("^HTTP/1.1 501 Not Implemented", out.connect)
    assert.matches("^HTTP/1.1 200 OK\r\n.*Connection: close\r\n\r\n$", out.upgrade)
    assert.matches("^HTTP/1.1 400 Bad Request", out.smuggle)
    assert.matches("^HTTP/1.1 200 OK", out.fine)
  end)

  -- 256 connections (max_conns) each sending a 1 MiB body (max_body) held
  -- 256 MiB until their requests timed out, and a body's buffer stayed with
  -- its keep-alive connection after the answer.  Bodies are now bounded
  -- all together (max_buffered): a body past the bound gets 503, and what
  -- the others sent is kept whole.
  it("bounds the bodies of all connections together: 503 past max_buffered, the others whole", function()
    local out, sizes, st
    H.run(function()
      sizes = {}
      local srv = assert(http.serve{ max_body = 10000, max_buffered = 25000, handler = function(req)
        sizes[#sizes + 1] = #req.body
        return 200, {}, "ok"
      end })
      out = shell(PY .. ("bodies %d 10000"):format(srv.port))
      tide.sleep(50)
      st = srv:stats()
      srv:close()
    end)
    -- held 9,900 + 9,900, then 10,000 more is past 25,000: 503; the first
    -- finishes, and the fourth fits beside the second
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.same({ "HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "HTTP/1.1 200 OK" }, lines)
    assert.same({ 10000, 10000, 10000 }, sizes)
    assert.equal(0, st.buffered)
  end)

  it("answers 500 for a handler that raises or answers badly, 503 for one that times out, and goes on", function()
    H.quiet_errors()
    local out
    H.run(function()
      local srv = assert(http.serve{ timeout = 50, handler = function(req)
        if req.path == "/raise" then error("handler bug") end
        if req.path == "/slow" then tide.sleep(5000) end
        if req.path == "/crlf" then return 200, { ["x-bad"] = "a\r\nSet-Cookie: evil=1" }, "" end
        if req.path == "/status" then return "200", {}, "" end
        if req.path == "/body" then return 200, {}, { "table" } end
        return 200, {}, "fine"
      end })
      local code = "env -u LD_PRELOAD curl -s -o /dev/null -w '%%{http_code} ' %s; "
      out = shell(code:format(srv:url("/raise")) .. code:format(srv:url("/slow")) .. code:format(srv:url("/crlf"))
                  .. code:format(srv:url("/status")) .. code:format(srv:url("/body")) .. code:format(srv:url("/")))
      assert.equal(2, srv:stats().errors)                -- the raise and the timeout
      srv:close()
    end)
    H.loud_errors()
    assert.equal("500 503 500 500 500 200 ", out)
    assert.equal(4, H.reported)                           -- the raise and three bad answers
  end)

  it("survives its server closing while handlers wait, and clients that leave early", function()
    local answered, entered = 0, 0
    H.run(function()
      local srv
      local closed = false
      srv = assert(http.serve{ handler = function()
        entered = entered + 1
        while not closed do tide.sleep(5) end              -- held until the server closed
        answered = answered + 1
        return 200, {}, "late"
      end })
      local t = tide.spawn{ mode = "thread", args = { srv:url("/") }, run = function(url)
        local f = io.popen("for i in 1 2 3 4 5; do env -u LD_PRELOAD curl -s --max-time 2 " .. url .. " & done; wait")
        local s = f:read("*a")
        f:close()
        return s
      end }
      local leaver = shell(PY .. ("raw %d 'GET / HTTP/1.1\\r\\n\\r\\n' 0.01"):format(srv.port))
      assert.matches("%[timeout%]", leaver)                 -- left before the answer
      local deadline = tide.now() + 10000                  -- (curl starts slowly on a loaded machine)
      while entered < 6 and tide.now() < deadline do tide.sleep(1) end
      assert.equal(6, entered)
      srv:close()                                          -- every handler is still held
      closed = true
      local status, body = t:await()
      assert.equal("ok", status)
      assert.equal("", body)                               -- each connection closed, unanswered
      tide.sleep(50)                                       -- the handlers finish and answer nobody
    end)
    assert.equal(6, answered)
  end)

  it("never keeps the loop alive by itself; keep_loop does, until a shutdown", function()
    local t0 = tide.now()
    H.run(function()
      assert(http.serve{ handler = echo })               -- left open: the run still ends
    end)
    assert.is_true(tide.now() - t0 < 1000)
    local srv
    H.run(function()
      srv = assert(http.serve{ handler = echo, keep_loop = true })
      tide.after(50, function() tide.shutdown(0) end)
    end)
    assert.is_false(srv.open)                            -- closed by the shutdown
    assert.is_true(tide.now() - t0 >= 50)
  end)

  it("closes idle connections after `idle` ms, and connections past max_conns at once", function()
    local idle, extra
    H.run(function()
      local srv = assert(http.serve{ idle = 100, max_conns = 1, handler = echo })
      local t = tide.spawn{ mode = "thread", args = { srv.port }, run = function(port)
        local f = io.popen(("env -u LD_PRELOAD /usr/bin/python3 -c \"import socket,time\n"
          .. "s=socket.create_connection(('127.0.0.1',%d)); t=time.time(); s.settimeout(5); r=s.recv(10)\n"
          .. "print('%%.1f %%r' %% (time.time()-t, r))\""):format(port))
        local out = f:read("*a")
        f:close()
        return out
      end }
      tide.sleep(50)                                       -- the first holds the only slot
      extra = shell(PY .. ("raw %d '' 1"):format(srv.port))
      local _, out = t:await()
      idle = out
      srv:close()
    end)
    local secs = tonumber(idle:match("^(%S+)"))
    assert.is_true(secs >= 0.09 and secs < 3, idle)      -- the sweep runs once a second
    assert.matches("b''", idle)
    assert.equal("", extra)
  end)

  it("closes a connection whose request trickles in for longer than `idle` ms", function()
    local out
    H.run(function()
      local srv = assert(http.serve{ idle = 300, handler = echo })
      out = shell(PY .. ("trickle %d 6"):format(srv.port))
      srv:close()
    end)
    local secs = tonumber(out:match("^closed after (%S+)"))
    assert.is_truthy(secs, out)
    assert.is_true(secs >= 0.3 and secs < 3, out)
  end)

  it("rejects bad options, and says why it cannot listen", function()
    H.error_cases("spec/http_spec.lua", {
      { function() http.serve{} end, "http.serve: bad option 'handler' (function expected, got nil)" },
      { function() http.serve{ handler = echo, port = 70000 } end,
        "http.serve: bad option 'port' (integer 0..65535 expected, got number 70000)" },
      { function() http.serve{ handler = echo, timeout = 0 } end,
        "http.serve: bad option 'timeout' (positive number of ms expected, got number 0)" },
      { function() http.serve{ handler = echo, max_body = 1.5 } end,
        "http.serve: bad option 'max_body' (integer >= 1 expected, got number 1.5)" },
      { function() http.serve{ handler = echo, max_buffered = 0 } end,
        "http.serve: bad option 'max_buffered' (integer >= 1 expected, got number 0)" },
      { function() http.serve{ handler = echo, hots = "x" } end, "http.serve: unknown option 'hots'" },
    })
    local srv, err = http.serve{ handler = echo, host = "not-an-ip" }
    assert.is_nil(srv)
    assert.equal("cannot listen on not-an-ip port 0: invalid argument", err)
    assert.same({ "127.0.0.1", 9464 }, { http.parse_address("9464") })
    assert.same({ "::1", 80 }, { http.parse_address("[::1]:80") })
    assert.same({ "0.0.0.0", 8080 }, { http.parse_address("0.0.0.0:8080") })
    assert.is_nil((http.parse_address("127.0.0.1:99999")))
    assert.is_true(http.is_loopback("127.0.0.2"))
    assert.is_false(http.is_loopback("0.0.0.0"))
  end)
end)
