-- rockspecs/tide-scm-1.rockspec — builds tide with the system's LuaJIT, libuv, SQLite and libpq.
--
--   luarocks --lua-version=5.1 make rockspecs/tide-scm-1.rockspec
--
-- installs the module (tide.so: the C core and every Lua module as LuaJIT
-- bytecode, so `require "tide"` needs nothing else) and the `tide` binary.
-- tide runs on LuaJIT: use the rock from LuaJIT, not from PUC Lua 5.1.
rockspec_format = "3.0"
package = "tide"
version = "scm-1"
source = { url = "git+file://." }
description = {
  summary = "Supervised Lua tasks on LuaJIT and libuv: timers, retries, pools, supervision trees, flows, durable jobs",
  detailed = [[
tide runs tasks supervised, as coroutines on a libuv loop or on OS threads
with their own LuaJIT states, and delivers exactly one outcome to every task
(ok, error, timeout, cancelled). Around that core: timers, retries with
backoff, bounded pools, supervision trees, flows (DAGs of tasks), and durable
jobs created inside your own database transaction (SQLite or PostgreSQL).
]],
  license = "MIT",
  labels = { "luajit", "libuv", "tasks", "jobs", "supervision" },
}
dependencies = { "lua == 5.1", "lua-cjson >= 2.1" }
external_dependencies = {
  LIBUV = { header = "uv.h" },
  SQLITE = { header = "sqlite3.h" },
  PQ = { header = "postgresql/libpq-fe.h" },
  HTTP_PARSER = { header = "http_parser.h" },
}
build = {
  type = "make",
  build_target = "binaries",
  build_variables = { CC = "$(CC)" },
  install_target = "install-rock",
  install_variables = { INST_LIBDIR = "$(LIBDIR)", INST_BINDIR = "$(BINDIR)" },
}
