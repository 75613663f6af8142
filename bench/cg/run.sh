#!/bin/sh
# bench/cg/run.sh — instructions per unit of a workload on the loop thread, by callgrind.
#   BUILD=build sh bench/cg/run.sh WORKLOAD [N1 N2]
# Runs bench/cg/workload.lua at sizes N1 and N2 (default 2000 and 12000) and prints
# (Ir(N2) - Ir(N1)) / (N2 - N1) for the main thread: what one more unit
# costs, without start-up.  Instruction counts are stable on a loaded machine
# where wall-clock times are not.
BUILD=${BUILD:-build}
LUAJIT=${LUAJIT:-luajit}
w=$1; n1=${2:-2000}; n2=${3:-12000}
[ -n "$w" ] || { echo "usage: sh bench/cg/run.sh WORKLOAD [N1 N2]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "bench/cg/run.sh: valgrind not installed" >&2; exit 2; }
dir=$(mktemp -d)
ir() {
  LUA_CPATH="$BUILD/?.so;;" valgrind --tool=callgrind --separate-threads=yes --fair-sched=yes \
    --callgrind-out-file="$dir/cg.$2" "$LUAJIT" bench/cg/workload.lua "$1" "$2" >/dev/null 2>"$dir/err.$2" \
    || { cat "$dir/err.$2" >&2; exit 1; }
  # the main thread's file is the one without a -NN suffix, or -01
  f=$(ls "$dir"/cg."$2"-01 2>/dev/null || echo "$dir/cg.$2")
  sed -n 's/^summary: *//p;s/^totals: *//p' "$f" | head -n 1
}
a=$(ir "$w" "$n1"); b=$(ir "$w" "$n2")
echo "$w: $(( (b - a) / (n2 - n1) )) instructions per unit on the loop thread (Ir $n1: $a, $n2: $b)"
[ -n "$KEEP" ] && echo "kept in $dir" || rm -rf "$dir"
