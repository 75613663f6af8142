#!/bin/sh
# bench/amqp/cg.sh — instructions per delivery consumed and acked by tide's consumer (bench/amqp/consume.lua), by callgrind.
#   BUILD=build sh bench/amqp/cg.sh URL [N1 N2]
# Fills a queue on the broker at URL (a throwaway node: spec/rabbitmq.sh)
# with N messages and runs bench/amqp/consume.lua under callgrind, at sizes
# N1 and N2 (default 5000 and 25000); prints (Ir(N2) - Ir(N1)) / (N2 - N1)
# for the loop thread: what one more delivery costs, without start-up.
# KEEP=1 keeps the callgrind files (callgrind_annotate them).
BUILD=${BUILD:-build}
url=$1; n1=${2:-5000}; n2=${3:-25000}
[ -n "$url" ] || { echo "usage: sh bench/amqp/cg.sh URL [N1 N2]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "bench/amqp/cg.sh: valgrind not installed" >&2; exit 2; }
dir=$(mktemp -d)
ir() {
  q="cg-$$-$1"
  "$BUILD/tide" run bench/amqp/fill.lua "$url" "$q" "$1" || exit 1
  valgrind --tool=callgrind --separate-threads=yes --fair-sched=yes \
    --callgrind-out-file="$dir/cg.$1" "$BUILD/tide" run bench/amqp/consume.lua "$url" "$q" "$1" 100 \
    >/dev/null 2>"$dir/err.$1" || { cat "$dir/err.$1" >&2; exit 1; }
  # the main thread's file is the one without a -NN suffix, or -01
  f=$(ls "$dir"/cg."$1"-01 2>/dev/null || echo "$dir/cg.$1")
  sed -n 's/^summary: *//p;s/^totals: *//p' "$f" | head -n 1
}
a=$(ir "$n1"); b=$(ir "$n2")
echo "amqp consume+ack: $(( (b - a) / (n2 - n1) )) instructions per delivery on the loop thread (Ir $n1: $a, $n2: $b)"
[ -n "$KEEP" ] && echo "kept in $dir" || rm -rf "$dir"
