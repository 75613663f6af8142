--- tide.observe.web — the dashboard's server side: access, CSRF, routing, the page layout.
--
--   local srv, token = tide.web.serve{ queue = q, host = "127.0.0.1", port = 8080 }
--   -- or mount it on a server of your own: http.serve{ handler = tide.web.handler{ queue = q } }
--
-- Access.  Every request needs the token: `?token=T` once (the answer sets
-- a cookie, HttpOnly and SameSite=Strict, and redirects to the same URL
-- without it), then the cookie; or an `Authorization: Bearer T` header.
-- Without it: 401.  The token is random (printed by `tide web`) unless one
-- is given.
--
-- Changes.  Every change of state is a POST carrying the CSRF token that
-- the pages embed in their forms (a page cannot be read from another site,
-- so another site cannot know it); a POST whose Origin is another site is
-- refused too.  GET never changes anything.
--
-- Output.  Every value from the store, the request or the process goes
-- through h() (HTML text and attributes) or http.escape (URLs); the pages
-- carry a Content-Security-Policy that allows scripts and styles from
-- /assets/ only.
--
-- Pages.  Each page module (tide.observe.web_jobs: queues, jobs, a job,
-- workers; tide.observe.web_flows: durable flow runs, a run with its
-- graph) gives nav entries and routes; web.add_page adds one (a page
-- module requires tide.observe.html, never this file).
local http = require "tide.engine.http"
local check = require "tide.engine.check"
local queue = require "tide.jobs.queue"
local assets = require "tide.observe.assets"
local html = require "tide.observe.html"

local type, tostring, ipairs, pairs, error, concat, byte, format =
  type, tostring, ipairs, pairs, error, table.concat, string.byte, string.format
local opt_error = check.opt_error
local h, link = html.h, html.link

local M = {}

-- ===== pages

M.pages = {}

--- Adds a page module: { nav = { { path =, title = } }, routes = { { method =,
--- pattern =, fn = function(ctx, captures...) } } }.  A route's fn answers
--- with ctx:page(title, html), ctx:redirect(path) or ctx:fail(status, text).
function M.add_page(mod)
  M.pages[#M.pages + 1] = mod
end

M.add_page(require "tide.observe.web_jobs")
M.add_page(require "tide.observe.web_flows")

local CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
  .. "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

local function headers(ctype, extra)
  local hd = { ["content-type"] = ctype, ["cache-control"] = "no-store", ["x-content-type-options"] = "nosniff",
               ["x-frame-options"] = "DENY", ["referrer-policy"] = "no-referrer",
               ["content-security-policy"] = CSP }
  for k, v in pairs(extra or {}) do hd[k] = v end
  return hd
end

local Ctx = {}
Ctx.__index = Ctx

--- The answer for a page: the whole document, or only <main>'s content when
--- the script asks for it (?partial=1).
function Ctx:page(title, body, opts)
  local hd = headers("text/html; charset=utf-8")
  if self.partial then return 200, hd, body end
  local nav = {}
  for _, mod in ipairs(M.pages) do
    for _, n in ipairs(mod.nav or {}) do
      local on = (n.path == "/" and self.req.path == "/") or (n.path ~= "/" and self.req.path:sub(1, #n.path) == n.path)
      nav[#nav + 1] = ('<a href="%s"%s>%s</a>'):format(h(n.path), on and ' class="on"' or "", h(n.title))
    end
  end
  return 200, hd, concat{
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    "<title>", h(title), " · tide</title>",
    '<link rel="stylesheet" href="/assets/app.css"><script src="/assets/app.js" defer></script></head>',
    (opts and opts.static) and "<body>" or "<body data-refresh>",
    '<header><span class="brand">tide</span><nav>', concat(nav), '</nav>',
    '<span id="live" class="live ok">live</span>',
    '<span class="store">', h(self.store_name), "</span></header>\n<main>", body, "</main></body></html>\n" }
end

function Ctx:redirect(path)
  return 303, headers("text/plain; charset=utf-8", { location = path }), "see " .. path .. "\n"
end

function Ctx:fail(status, msg)
  return status, headers("text/plain; charset=utf-8"), msg .. "\n"
end

--- A hidden CSRF field for the page's forms.
function Ctx:csrf_field()
  return '<input type="hidden" name="csrf" value="' .. h(self.csrf) .. '">'
end

--- A POST form with one button (an action on the store).
function Ctx:button(action, label, fields, class)
  local out = { '<form class="inline" method="post" action="', h(action), '">', self:csrf_field() }
  for k, v in pairs(fields or {}) do
    out[#out + 1] = ('<input type="hidden" name="%s" value="%s">'):format(h(k), h(v))
  end
  out[#out + 1] = ('<button type="submit"%s>%s</button></form>'):format(class and (' class="' .. class .. '"') or "", h(label))
  return concat(out)
end

--- A local path to go back to after a POST: from the form, checked, or "/".
function Ctx:back()
  local b = self.req:form().back
  if type(b) == "string" and b:match("^/[^/\\]") and not b:find("[%c]") then return b end
  if b == "/" then return b end
  return "/"
end

-- ===== access

--- Equal strings, in time that does not depend on where they differ.
local function same(a, b)
  if type(a) ~= "string" or type(b) ~= "string" or #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do diff = diff + (byte(a, i) ~= byte(b, i) and 1 or 0) end
  return diff == 0
end
M.same = same

local UNAUTHORIZED = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tide: token needed</title></head>
<body><h1>401: this dashboard needs its token</h1>
<p>Open the address that <code>tide web</code> printed when it started (it ends in <code>?token=...</code>),
or send <code>Authorization: Bearer TOKEN</code>.</p></body></html>
]]

local function cookie_name(req) return "tide_token_" .. tostring(req.server.port) end

--- The request's own origin, as a browser would send it.
local function own_origin(req)
  local host = req.headers.host
  return host and "http://" .. host
end

local function csrf_ok(req, csrf)
  if not same(req:form().csrf, csrf) then return false, "missing or wrong CSRF token" end
  local origin = req.headers.origin
  if origin and origin ~= "null" and origin ~= own_origin(req) then return false, "cross-origin request" end
  local site = req.headers["sec-fetch-site"]
  if site and site ~= "same-origin" and site ~= "none" then return false, "cross-site request" end
  return true
end

--- The URL without its token parameter (where the first visit is sent on):
--- the path as the client sent it (still percent-encoded: decoded, "/%2F%2Fx"
--- would be "//x", another host), and "/" for one that a browser would read
--- as another host ("//x", "/\\x").
local function without_token(req)
  local q = {}
  for k, v in pairs(req.query) do if k ~= "token" then q[k] = v end end
  local path = req.url:match("^[^?#]*")
  if not path:match("^/[^/\\]") then path = "/" end
  return link(path, q)
end

-- ===== the handler

local KEYS = check.options("tide.web.serve", {
  queue = true, token = true, host = true, port = true, keep_loop = true, name = true
})

local function check_opts(fname, opts)
  if type(opts) ~= "table" then check.arg_error(fname, 1, "table", opts, 3) end
  check.known(fname, opts, KEYS, nil, 3)
  if not queue.is_queue(opts.queue) then
    opt_error(fname, "queue", "queue (from tide.queue.open)", opts.queue, 3)
  end
  if opts.token ~= nil and (type(opts.token) ~= "string" or #opts.token < 8 or opts.token:find("[^%w%-_.~]")) then
    opt_error(fname, "token", "string of at least 8 letters, digits or -_.~", opts.token, 3)
  end
  if opts.name ~= nil and type(opts.name) ~= "string" then opt_error(fname, "name", "string", opts.name, 3) end
end

--- A handler for tide.engine.http that serves the dashboard of queue
--- opts.queue.  opts.token: the access token (default: a random one).
--- Returns the handler and the token.
function M.handler(opts)
  check_opts("tide.web.handler", opts)
  local token = opts.token or http.random_token(16)
  local csrf = http.random_token(16)
  local q = opts.queue
  local store_name = opts.name or q.name
  local routes = {}
  for _, mod in ipairs(M.pages) do
    for _, r in ipairs(mod.routes) do routes[#routes + 1] = r end
  end
  local function handler(req)
    if req.query.token then
      if not same(req.query.token, token) then
        return 401, headers("text/html; charset=utf-8"), UNAUTHORIZED
      end
      return 303, headers("text/plain; charset=utf-8", {
        location = without_token(req),
        ["set-cookie"] = ("%s=%s; Path=/; HttpOnly; SameSite=Strict"):format(cookie_name(req), token),
      }), "signed in\n"
    end
    local bearer = req.headers.authorization
    if not (same(req:cookie(cookie_name(req)), token) or same(bearer, "Bearer " .. token)) then
      return 401, headers("text/html; charset=utf-8"), UNAUTHORIZED
    end
    if req.path == "/assets/app.css" then return 200, headers("text/css; charset=utf-8"), assets.css end
    if req.path == "/assets/app.js" then return 200, headers("text/javascript; charset=utf-8"), assets.js end
    local has_now, now = pcall(q.now, q)      -- (the store's clock, for "12 s ago")
    local ctx = setmetatable({ req = req, q = q, csrf = csrf, store_name = store_name, now = has_now and now or nil,
                               partial = req.query.partial == "1" }, Ctx)
    if req.method == "POST" then
      local ok, why = csrf_ok(req, csrf)
      if not ok then return ctx:fail(403, "403 forbidden: " .. why) end
    elseif req.method ~= "GET" and req.method ~= "HEAD" then
      return 405, headers("text/plain; charset=utf-8", { allow = "GET, HEAD, POST" }), "method not allowed\n"
    end
    local method = req.method == "HEAD" and "GET" or req.method
    for _, r in ipairs(routes) do
      if r.method == method then
        local caps = { req.path:match(r.pattern) }
        if caps[1] ~= nil then return r.fn(ctx, unpack(caps)) end
      end
    end
    return ctx:fail(404, "404 not found")
  end
  return handler, token
end

--- Serves the dashboard.  opts: queue (required), host ("127.0.0.1"),
--- port (8080; 0: any free), token (default: random), name (shown in the
--- header; default: the store's), keep_loop (the server keeps the loop
--- running until a shutdown).  Returns the server and the token, or nil and
--- why it cannot listen.  A non-loopback host without a given token prints
--- a warning.
function M.serve(opts)
  check_opts("tide.web.serve", opts)
  if opts.host ~= nil and type(opts.host) ~= "string" then opt_error("tide.web.serve", "host", "IP address string", opts.host) end
  if opts.port ~= nil and (not check.is_count(opts.port) or opts.port > 65535) then
    opt_error("tide.web.serve", "port", "integer 0..65535", opts.port)
  end
  local handler, token = M.handler{ queue = opts.queue, token = opts.token, name = opts.name }
  local srv, err = http.serve{ host = opts.host or "127.0.0.1", port = opts.port or 8080, name = "web",
                               handler = handler, keep_loop = opts.keep_loop }
  if not srv then return nil, "tide.web.serve: " .. err end
  M.warn_exposed(srv, opts.token, "the dashboard")
  return srv, token
end

--- Prints a warning when srv listens beyond this machine without a token given.
function M.warn_exposed(srv, token, what)
  if not http.is_loopback(srv.host) and not token then
    io.stderr:write(("tide: warning: %s listens on %s:%d with a generated token and no --token: "
                     .. "anyone who can reach this address and learns the token can change jobs\n")
      :format(what, srv.host, srv.port))
  end
end

return M
