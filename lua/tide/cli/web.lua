--- tide.cli.web — `tide web`: the dashboard of a job store, until SIGINT/SIGTERM; and the
--- --metrics/--web listeners that `tide run` and `tide worker` share.
local options = require "tide.cli.options"
local store = require "tide.cli.store"
local H = require "tide.engine.host"
local http = require "tide.engine.http"
local metrics = require "tide.observe.metrics"
local web = require "tide.observe.web"

local io_stdout, io_stderr = io.stdout, io.stderr

local M = {}

local PROG = "tide web"

M.USAGE = [=[
Usage: tide web [OPTIONS]

Serves the dashboard of a job store (queues, jobs, workers; retry, cancel
and discard) until SIGINT/SIGTERM.  Every request needs the access token:
open the address printed at start (it carries ?token=...; the browser keeps
a cookie afterwards), or send "Authorization: Bearer TOKEN".

Options:
  --store URL          job store: sqlite:PATH or postgres://[USER@]HOST[:PORT]/DB
                       (default $TIDE_STORE, else sqlite:tide.db)
  --listen ADDR        HOST:PORT to listen on (default 127.0.0.1:8080; port 0:
                       any free one); another host than loopback prints a
                       warning unless --token is given
  --token TOKEN        the access token (default: a random one, printed)
  --metrics            also serve Prometheus metrics at /metrics (no token)
  -h, --help           show this help

Exit status: 0 after SIGINT/SIGTERM; 1 when the store cannot be opened or the
address cannot be listened on; 2 for bad options.
]=]

local function address(s) return http.parse_address(s) and s or nil end
local function token(s) return #s >= 8 and not s:find("[^%w%-_.~]") and s or nil end

M.opt = {
  listen = { key = "listen", meta = "ADDR", conv = address, expected = "HOST:PORT like 127.0.0.1:8080" },
  token = { key = "token", meta = "TOKEN", conv = token, expected = "at least 8 letters, digits or -_.~" },
  metrics = { key = "metrics", meta = "ADDR", conv = address, expected = "HOST:PORT like 127.0.0.1:9464" },
  web = { key = "web", meta = "ADDR", conv = address, expected = "HOST:PORT like 127.0.0.1:8080" },
  log_format = { key = "log_format", meta = "FORMAT", conv = function(s) return (s == "json" or s == "human") and s or nil end,
                 expected = "human or json" },
}

local o = options.opt
local OPTS = {
  ["--store"] = o.store, ["--listen"] = M.opt.listen, ["--token"] = M.opt.token,
  ["--metrics"] = { key = "metrics" }, ["--help"] = o.help, ["-h"] = o.help,
}

--- A handler that serves /metrics with `metrics_handler` and the rest with `web_handler`.
local function both(web_handler, metrics_handler)
  return function(req)
    if req.path == "/metrics" then return metrics_handler(req) end
    return web_handler(req)
  end
end

--- Starts what --metrics ADDR and --web ADDR ask for (one server when the
--- addresses are the same).  spec: { metrics = ADDR?, web = ADDR?, token =,
--- queue = (for the dashboard and the job gauges), keep_loop = }.
--- Returns { servers, web_url } or nil and a message.
function M.listen(prog, spec)
  local out = { servers = {} }
  local web_handler, tok
  if spec.web then
    local ok, h, t = pcall(web.handler, { queue = spec.queue, token = spec.token })
    if not ok then return nil, h end
    web_handler, tok = h, t
  end
  -- No token for the metrics here: on loopback they answer only to the
  -- names of this machine (DNS rebinding: see tide.metrics.handler).
  local mhost = spec.metrics and http.parse_address(spec.metrics)
  local metrics_handler = spec.metrics and metrics.handler{ queues = { spec.queue },
                                                            local_only = mhost and http.is_loopback(mhost) or false }
  local function start(addr, handler, name)
    local host, port = http.parse_address(addr)
    local srv, err = http.serve{ host = host, port = port, handler = handler, name = name, keep_loop = spec.keep_loop }
    if not srv then return nil, err end
    out.servers[#out.servers + 1] = srv
    return srv
  end
  local same = spec.web and spec.metrics and select(2, http.parse_address(spec.web)) ~= 0
               and spec.web == spec.metrics
  if same then
    local srv, err = start(spec.web, both(web_handler, metrics_handler), "web")
    if not srv then return nil, err end
    out.web, out.metrics = srv, srv
  else
    if spec.web then
      local srv, err = start(spec.web, web_handler, "web")
      if not srv then return nil, err end
      out.web = srv
    end
    if spec.metrics then
      local srv, err = start(spec.metrics, metrics_handler, "metrics")
      if not srv then for _, s in ipairs(out.servers) do s:close() end; return nil, err end
      out.metrics = srv
    end
  end
  if out.web then
    out.web_url = out.web:url("/?token=" .. tok)
    web.warn_exposed(out.web, spec.token, "the dashboard")
  end
  if out.metrics and not http.is_loopback(out.metrics.host) then
    io_stderr:write(("%s: warning: metrics on %s:%d need no token: anyone who can reach this address can read them\n")
      :format(prog, out.metrics.host, out.metrics.port))
  end
  return out
end

--- tide web [OPTIONS]
function M.main(argv, i)
  local opts, pos = options.parse(argv, i, OPTS, false)
  if not opts then return options.usage_error(PROG, pos, M.USAGE) end
  if opts.help then io_stdout:write(M.USAGE); return 0 end
  if #pos > 0 then return options.usage_error(PROG, "unexpected argument '" .. pos[1] .. "'", M.USAGE) end
  local url, uerr = store.url(opts)
  if not url then return options.usage_error(PROG, uerr, M.USAGE) end
  local q, status = store.open(PROG, url, true)
  if not q then return status end
  local addr = opts.listen or "127.0.0.1:8080"
  local l, err = M.listen(PROG, { web = addr, metrics = opts.metrics and addr or nil, token = opts.token,
                                  queue = q, keep_loop = true })
  if not l then q:close(); return options.fail(PROG, err) end
  io_stdout:write(("%s: %s (store %s)%s\n"):format(PROG, l.web_url, q.name,
                  l.metrics and (", metrics at " .. l.web:url("/metrics")) or ""))
  io_stdout:flush()
  H.loop()
  for _, s in ipairs(l.servers) do s:close() end
  q:close()
  return 0
end

return M
