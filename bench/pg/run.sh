#!/bin/sh
# bench/pg/run.sh — runs bench/pg/bench.lua on a throwaway PostgreSQL server, when one is installed.
#
# The server (spec/pg.sh, in a temporary directory, on a free loopback port)
# keeps PostgreSQL's default durability: fsync on, synchronous_commit on.
# bench/run.sh calls this; alone, from the repository root: sh bench/pg/run.sh
# TIDE_BENCH_PG_PORT: the port(s) to try (default 55491-55495), for a
# session that was given ports of its own.
# Exit status: 0 when the benchmark ran (or PostgreSQL is not installed:
# it says so and skips), 1 when it failed.
BUILD=${BUILD:-build}
LUAJIT=${LUAJIT:-luajit}

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  echo "bench/pg: skipped, PostgreSQL is not installed (make deps installs it)"
  exit 0
fi
if [ ! -x "$BUILD/tide" ] || [ ! -f "$BUILD/tide.so" ]; then
  echo "bench/pg: $BUILD/tide or $BUILD/tide.so not found (run make first, from the repository root)" >&2
  exit 2
fi

top=$(mktemp -d /tmp/tide-bench-pg-server.XXXXXX) || exit 1
chmod 755 "$top"                              # the server runs as postgres when we are root
url=""
for port in ${TIDE_BENCH_PG_PORT:-55491 55492 55493 55494 55495}; do
  url=$(sh spec/pg.sh start "$top/cluster" "$port" -c max_connections=200 2>"$top/start.log") && break
  url=""
done
if [ -z "$url" ]; then
  echo "bench/pg: could not start PostgreSQL:" >&2
  cat "$top/start.log" >&2
  rm -rf "$top"
  exit 1
fi

status=0
BUILD="$BUILD" LUA_CPATH="$BUILD/?.so;;" "$LUAJIT" bench/pg/bench.lua "$url" || status=1
sh spec/pg.sh stop "$top/cluster"
rm -rf "$top"
exit $status
