--- tide.engine.http — an HTTP/1.1 server on tide's loop; each request runs as a task.
--
--   local srv = http.serve{ host = "127.0.0.1", port = 8080,
--     handler = function(req) return 200, { ["content-type"] = "text/plain" }, "hello" end }
--   srv.host, srv.port, srv:url(), srv:stats(), srv:close()
--
-- The sockets and the parsing are C (src/http.c, http-parser); this file
-- turns each request into a table, runs the handler as a tide task (so it
-- may wait: a store query, a sleep), and writes its answer.  The handler
-- returns status, headers (name -> value), body; Content-Length and
-- Connection are added here.  A handler that raises gets a 500 (reported to
-- the error sink with its traceback), one that times out a 503; a bad
-- return value (a header with a line break, a status that is no number) is
-- a 500 too.  Nothing a client sends can reach the loop: what does not
-- parse, or is too large, is answered in C and never becomes a request.
--
-- Servers never keep the loop alive by themselves (a script with a metrics
-- endpoint still ends when its work does) unless opened with keep_loop =
-- true; every server closes when a shutdown begins.
local core = require "tide.core"
local S = require "tide.engine.sched"
local check = require "tide.engine.check"
local log = require "tide.engine.log"
local make_task = require("tide.engine.task").make_task

local type, tostring, tonumber, pairs, pcall, setmetatable, error =
  type, tostring, tonumber, pairs, pcall, setmetatable, error
local concat, char, format = table.concat, string.char, string.format
local opt_error = check.opt_error

local M = {}

local REASONS = {
  [200] = "OK", [201] = "Created", [204] = "No Content", [301] = "Moved Permanently",
  [302] = "Found", [303] = "See Other", [304] = "Not Modified", [400] = "Bad Request",
  [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found", [405] = "Method Not Allowed",
  [409] = "Conflict", [413] = "Payload Too Large", [500] = "Internal Server Error",
  [501] = "Not Implemented", [503] = "Service Unavailable",
}

-- ===== addresses

--- "HOST:PORT", "[V6]:PORT", ":PORT" or "PORT" -> host, port (the host
--- defaults to 127.0.0.1; "localhost" means 127.0.0.1); nil and why not.
function M.parse_address(s)
  if type(s) ~= "string" then return nil, "address expected" end
  local host, port = s:match("^%[([%x:.]+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]*):(%d+)$") end
  if not host then port = s:match("^(%d+)$"); host = "" end
  if not port or tonumber(port) > 65535 then
    return nil, ("bad address '%s' (HOST:PORT expected, like 127.0.0.1:9464)"):format(s)
  end
  if host == "" or host == "localhost" then host = "127.0.0.1" end
  return host, tonumber(port)
end

--- Whether `host` is a loopback address (only this machine can connect).
function M.is_loopback(host)
  return host == "::1" or host == "localhost" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

-- ===== URLs, queries, forms, cookies

local function unhex(h) return char(tonumber(h, 16)) end

--- Percent-decoding; with `plus`, "+" is a space (forms and queries).
function M.unescape(s, plus)
  if plus then s = s:gsub("+", " ") end
  return (s:gsub("%%(%x%x)", unhex))
end

local function hex(c) return format("%%%02X", c:byte()) end

--- Percent-encoding of everything but unreserved characters.
function M.escape(s)
  return (tostring(s):gsub("[^%w%-%._~]", hex))
end

--- "a=1&b=x+y" -> { a = "1", b = "x y" } (the first of repeated keys).
function M.parse_query(s)
  local out = {}
  for pair in s:gmatch("[^&;]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k = M.unescape(k, true)
    if k ~= "" and out[k] == nil then out[k] = M.unescape(v, true) end
  end
  return out
end

--- { a = 1, b = "x y" } -> "a=1&b=x%20y" (keys sorted, for stable URLs).
function M.build_query(t)
  local keys = {}
  for k, v in pairs(t) do if v ~= nil and v ~= "" then keys[#keys + 1] = k end end
  table.sort(keys)
  for i, k in ipairs(keys) do keys[i] = M.escape(k) .. "=" .. M.escape(t[k]) end
  return concat(keys, "&")
end

local Request = {}
local Request_mt = { __index = Request, __tostring = function(r)
  return ("tide.HttpRequest (%s %s)"):format(r.method, r.path)
end }
M.Request_mt = Request_mt

--- The value of cookie `name`, or nil.
function Request:cookie(name)
  local header = self.headers.cookie
  if not header then return nil end
  for k, v in header:gmatch("([^=;%s]+)=([^;]*)") do
    if k == name then return v end
  end
end

--- The body as form fields (application/x-www-form-urlencoded).
function Request:form()
  if not self._form then self._form = M.parse_query(self.body) end
  return self._form
end

-- ===== answering

local TOKEN = "^[!#$%%&'*+%-.^_`|~%w]+$"

--- The response's bytes; raises on a bad status or header.
local function response(req, status, headers, body, keep)
  if not check.is_count(status, 100) or status > 999 then
    error(("handler returned status %s (100..999 expected)"):format(check.describe(status)), 0)
  end
  if body == nil then body = "" end
  if type(body) ~= "string" then error(("handler returned a %s body (string expected)"):format(type(body)), 0) end
  if headers ~= nil and type(headers) ~= "table" then
    error(("handler returned %s headers (table expected)"):format(type(headers)), 0)
  end
  local out = { "HTTP/1.1 ", tostring(status), " ", REASONS[status] or "Status", "\r\n" }
  for k, v in pairs(headers or {}) do
    if type(k) ~= "string" or not k:match(TOKEN) then
      error(("handler returned a bad header name %s"):format(check.describe(k)), 0)
    end
    v = type(v) == "number" and format("%.17g", v) or v
    if type(v) ~= "string" or v:find("[\r\n%z]") then
      error(("handler returned a bad value for header '%s' (a string without line breaks expected)"):format(k), 0)
    end
    local lk = k:lower()
    if lk ~= "content-length" and lk ~= "connection" and lk ~= "transfer-encoding" then
      out[#out + 1] = k .. ": " .. v .. "\r\n"
    end
  end
  out[#out + 1] = "Content-Length: " .. #body .. "\r\n"
  out[#out + 1] = keep and "Connection: keep-alive\r\n\r\n" or "Connection: close\r\n\r\n"
  if req.method ~= "HEAD" then out[#out + 1] = body end
  return concat(out)
end

local function send(req, status, headers, body)
  local ud = req._ud
  if not ud:open() then return false end
  local keep = req._keep and req.server.open and not S.shutting_down()
  local ok, bytes = pcall(response, req, status, headers, body, keep)
  if not ok then
    log.report(("http handler of %s %s %s"):format(req.server.name, req.method, req.path), bytes)
    keep = false
    bytes = response(req, 500, { ["content-type"] = "text/plain; charset=utf-8" }, "internal server error\n", false)
  end
  ud:write(bytes)
  ud:finish(keep)
  return true
end
M.send = send

local PLAIN = { ["content-type"] = "text/plain; charset=utf-8" }

--- handle_result of a request's task: the one place that answers it.
local function answered(status, value, t)
  local req = S.options(t).http_req
  local srv = req.server
  if status == "ok" then
    local _, code, headers, body = S.results(t)
    return send(req, code, headers, body)
  elseif status == "error" then
    srv.errors = srv.errors + 1
    log.report(("http handler of %s %s %s"):format(srv.name, req.method, req.path), value, t.traceback)
    return send(req, 500, PLAIN, "internal server error\n")
  elseif status == "timeout" then
    srv.errors = srv.errors + 1
    return send(req, 503, PLAIN, "the handler timed out\n")
  end
  return send(req, 503, PLAIN, "shutting down\n")
end

-- ===== servers

local Server = {}
local Server_mt = { __index = Server, __tostring = function(s)
  return ("tide.HttpServer '%s' (%s:%d, %s)"):format(s.name, s.host, s.port, s.open and "open" or "closed")
end }

local open_servers = {}         -- every open server, closed when a shutdown begins

local function on_request(srv, ud, method, url, headers, body, remote, keep)
  local path, qs = url:match("^([^?#]*)%??([^#]*)")
  local req = setmetatable({ method = method, url = url, path = M.unescape(path or "/"),
                             query_string = qs or "", headers = headers, body = body,
                             remote = remote, server = srv, _ud = ud, _keep = keep }, Request_mt)
  req.query = M.parse_query(req.query_string)
  local ok, t = pcall(make_task, "http", "coroutine", {
    run = srv.handler, args = { req, n = 1 }, timeout = srv.timeout,
    name = ("http %s %s"):format(method, path),
  })
  if not ok then return send(req, 500, PLAIN, "internal server error\n") end
  local o = S.options(t)
  o.http_req, o.handle_result = req, answered
  S.start(t)
end

local KEYS = { host = true, port = true, handler = true, timeout = true, max_body = true,
               max_conns = true, max_buffered = true, idle = true, keep_loop = true, name = true }

--- Starts a server.  opts: handler (function(req) -> status, headers, body;
--- required), host ("127.0.0.1"), port (0: any free one), timeout (ms per
--- request, 30000), max_body (bytes, 1 MiB), max_conns (256), max_buffered
--- (bytes of request bodies held at once by all connections together, 32
--- MiB and at least max_body: a body past it gets 503), idle (ms a
--- connection may sit idle, 10000), keep_loop (false), name ("http").
--- Returns the server, or nil and why it cannot listen.
function M.serve(opts)
  local fname = "http.serve"
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts) end
  check.known(fname, opts, KEYS)
  if type(opts.handler) ~= "function" then opt_error(fname, "handler", "function", opts.handler) end
  local host = opts.host or "127.0.0.1"
  if type(host) ~= "string" then opt_error(fname, "host", "IP address string", host) end
  if host == "localhost" then host = "127.0.0.1" end
  local port = opts.port or 0
  if not check.is_count(port) or port > 65535 then opt_error(fname, "port", "integer 0..65535", port) end
  for _, k in ipairs{ "timeout", "idle" } do
    if opts[k] ~= nil and not check.is_ms(opts[k], true) then opt_error(fname, k, "positive number of ms", opts[k]) end
  end
  for _, k in ipairs{ "max_body", "max_conns", "max_buffered" } do
    if opts[k] ~= nil and not check.is_count(opts[k], 1) then opt_error(fname, k, "integer >= 1", opts[k]) end
  end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name) end
  if S.shutting_down() then error(fname .. ": the loop is shutting down", 2) end
  local srv = setmetatable({ handler = opts.handler, timeout = opts.timeout or 30000,
                             name = opts.name or "http", open = true, errors = 0 }, Server_mt)
  local ud, err = core.http_listen(host, port, { max_body = opts.max_body, idle_ms = opts.idle,
                                                 max_conns = opts.max_conns, max_buffered = opts.max_buffered },
                                   function(...) return on_request(srv, ...) end)
  if not ud then return nil, err end
  srv._ud = ud
  srv.host, srv.port = ud:address()
  if opts.keep_loop then ud:ref(true) end
  open_servers[srv] = true
  return srv
end

function Server:url(path)
  local host = self.host:find(":", 1, true) and "[" .. self.host .. "]" or self.host
  return ("http://%s:%d%s"):format(host, self.port, path or "/")
end

--- Counters: connections, requests, rejected (answered by the parser),
--- open (connections now), buffered (bytes of request bodies held now),
--- errors (handlers that raised or timed out).
function Server:stats()
  local st = self.open and self._ud:stats() or { connections = 0, requests = 0, rejected = 0, open = 0, buffered = 0 }
  st.errors = self.errors
  return st
end

--- Closes the listener and every connection (idempotent).
function Server:close()
  if not self.open then return false end
  self.open = false
  open_servers[self] = nil
  self._ud:close()
  return true
end

S.on_shutdown(function()
  for srv in pairs(open_servers) do srv:close() end
end)

--- 32 random bytes as hex (for tokens).
function M.random_token(n)
  return (core.random_bytes(n or 16):gsub(".", function(c) return format("%02x", c:byte()) end))
end

return M
