#!/bin/sh
# bench/run.sh — prints the machine, then runs every bench/*.lua against $BUILD/tide.so.
# Run from the repository root (`make bench` does): BUILD=build sh bench/run.sh
BUILD=${BUILD:-build}
LUAJIT=${LUAJIT:-luajit}

if [ ! -f "$BUILD/tide.so" ]; then
  echo "bench: $BUILD/tide.so not found (run make first, from the repository root)" >&2
  exit 2
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
for f in bench/*.lua; do
  [ -f "$f" ] || continue
  echo
  echo "== $f"
  LUA_CPATH="$BUILD/?.so;;" "$LUAJIT" "$f" || { echo "bench: $f failed (exit $?)" >&2; status=1; }
done
exit $status
