#!/bin/sh
# bench/run.sh — prints the machine, then runs every bench/*.lua against $BUILD/tide.so.
# Run from the repository root (`make bench` does): BUILD=build sh bench/run.sh
# Names run only those files: `sh bench/run.sh queue` runs bench/queue.lua;
# `sh bench/run.sh queue:cross` only its cross-process section
# (`sh bench/run.sh processes threads`: process mode beside thread mode).
# bench/flows_durable.lua (durable flows) starts a throwaway PostgreSQL with
# spec/pg.sh for its PostgreSQL half, unless BENCH_PG_URL names a server.
# bench/peers.lua runs the Node peers of bench/peers/ beside tide (when node or
# nodejs is installed; "not installed" otherwise), with the 2-process control.
# Instruction counts per task: sh bench/cg/run.sh WORKLOAD (callgrind).
BUILD=${BUILD:-build}
LUAJIT=${LUAJIT:-luajit}

if [ ! -f "$BUILD/tide.so" ]; then
  echo "bench: $BUILD/tide.so not found (run make first, from the repository root)" >&2
  exit 2
fi

if [ $# -gt 0 ]; then
  files=""
  for name in "$@"; do
    [ "$name" = http_parsers ] && continue
    # NAME:SECTIONS runs only those sections of bench/NAME.lua (queue:cross)
    file=${name%%:*}
    [ -f "bench/$file.lua" ] || { echo "bench: no bench/$file.lua" >&2; exit 2; }
    files="$files $name"
  done
else
  files=$(ls bench/*.lua)
fi

cpu=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)
if [ -z "$cpu" ] && command -v lscpu >/dev/null 2>&1; then
  cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
fi
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null)
luajit_version=$("$LUAJIT" -v 2>&1 | sed 's/ --.*//')

echo "machine: ${cpu:-unknown CPU}, ${cores:-?} cores, $(uname -sr), $luajit_version"
load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC'), load average ${load:-unknown} (figures need an idle machine)"

status=0
for f in $files; do
  case $f in
    bench/*) file=$f; sections="" ;;
    *:*) file=bench/${f%%:*}.lua; sections=${f#*:} ;;
    *) file=bench/$f.lua; sections="" ;;
  esac
  echo
  echo "== $file${sections:+ ($sections)}"
  LUA_CPATH="$BUILD/?.so;;" "$LUAJIT" "$file" $sections || { echo "bench: $file failed (exit $?)" >&2; status=1; }
done

# ===== HTTP parsers (bench/http_parsers.c) =====
# http-parser (linked by tide) against picohttpparser, which only Debian's
# libh2o ships: with the full set, and only when libh2o-dev is installed.
if [ $# -eq 0 ] || [ "$1" = http_parsers ]; then
  if [ -e /usr/lib/x86_64-linux-gnu/libh2o.so ] || pkg-config --exists libh2o 2>/dev/null; then
    echo
    echo "== bench/http_parsers.c"
    cc -O2 -o "$BUILD/http_parsers" bench/http_parsers.c -lhttp_parser -lh2o && "$BUILD/http_parsers" \
      || { echo "bench: bench/http_parsers.c failed" >&2; status=1; }
  else
    echo; echo "== bench/http_parsers.c: skipped (libh2o-dev is not installed)"
  fi
fi

# ===== Durable jobs on PostgreSQL (bench/pg/) =====
# With the full set only (no names given): bench/pg/run.sh starts a throwaway
# PostgreSQL server (spec/pg.sh, default durability), runs bench/pg/bench.lua
# against it (graphile-worker from the npm registry as the baseline) and stops
# it; it says "skipped" when PostgreSQL is not installed.  BENCH_PG=0 skips it.
if [ $# -eq 0 ] && [ "${BENCH_PG:-1}" != 0 ]; then
  echo
  echo "== bench/pg/bench.lua (PostgreSQL)"
  BUILD="$BUILD" LUAJIT="$LUAJIT" sh bench/pg/run.sh || { echo "bench: bench/pg failed" >&2; status=1; }
fi
# ===== end of bench/pg/
exit $status
