#!/bin/sh
# spec/run.sh — runs every suite (busted specs, C tests, examples, the embedding host)
# and ends with the line "N passed, N failed".  Used by `make test` and `make sanitize`.
BUILD=${BUILD:-build}
export BUILD
LOG=$BUILD/test-logs
mkdir -p "$LOG"
pass=0
fail=0
failed_names=""

if [ -n "$SANITIZE" ]; then
  # Stock luajit is not instrumented: the sanitizer runtimes must load first.
  PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # busted ends with os.exit, skipping lua_close: leaks are checked by the C
  # tests and the embedding host, which close everything.
  LUA_ASAN=detect_leaks=0
else
  PRELOAD=""
  LUA_ASAN=""
fi

# Counts TAP lines from a log; a suite that exits non-zero without a
# "not ok" line counts as one failure of its own.
tally() {  # name status log
  p=$(grep -c '^ok ' "$3")
  f=$(grep -c '^not ok ' "$3")
  if [ "$2" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  pass=$((pass + p)); fail=$((fail + f))
  if [ "$f" -ne 0 ]; then
    failed_names="$failed_names $1"
    echo "FAIL $1 (exit $2): see $3"
    grep -A12 '^not ok ' "$3" | head -60
  else
    echo "pass $1: $p"
  fi
}

one() {  # name status log: a single check that passes on exit 0
  if [ "$2" -eq 0 ]; then echo "ok - $1" >> "$3"; else echo "not ok - $1" >> "$3"; fi
  tally "$1" "$2" "$3"
}

# 0. a throwaway RabbitMQ node (it boots in the background while PostgreSQL
#    starts) and a throwaway PostgreSQL server for the store specs; both are
#    stopped on exit.  Either failing to start is a failure, never a skip.
#    Their ports are below 32768: the kernel takes the local ports of
#    outgoing connections from 32768-60999 (ip_local_port_range), so a
#    port there may be held by any client's connection at that moment (a
#    node failed to start with dist_port_already_used, not_erlang).  The
#    node uses PORT, PORT+1 and PORT+2.
AMQPDIR=$(mktemp -d /tmp/tide-amqp.XXXXXX)
AMQPPORT=$((10000 + ($$ % 3000) * 3))
sh spec/rabbitmq.sh start "$AMQPDIR/node" "$AMQPPORT" > "$AMQPDIR/url" 2> "$LOG/rabbitmq.log" &
AMQPPID=$!
PGDIR=$(mktemp -d /tmp/tide-pg.XXXXXX)
chmod 755 "$PGDIR"                    # the server runs as user postgres
PGPORT=$((20000 + $$ % 6000))
if TIDE_PG_URL=$(sh spec/pg.sh start "$PGDIR/cluster" "$PGPORT" -c fsync=off -c max_connections=200 2>"$LOG/postgres.log"); then
  export TIDE_PG_URL TIDE_PG_DIR="$PGDIR/cluster"
  echo "postgres: $TIDE_PG_URL"
else
  echo "FAIL postgres: cannot start a server (see $LOG/postgres.log)"
  cat "$LOG/postgres.log"
  fail=$((fail + 1)); failed_names="$failed_names postgres"
fi
trap 'sh spec/pg.sh stop "$PGDIR/cluster"; rm -rf "$PGDIR"; wait $AMQPPID 2>/dev/null; sh spec/rabbitmq.sh stop "$AMQPDIR/node"; rm -rf "$AMQPDIR"' EXIT
if wait $AMQPPID && TIDE_AMQP_URL=$(cat "$AMQPDIR/url") && [ -n "$TIDE_AMQP_URL" ]; then
  export TIDE_AMQP_URL TIDE_AMQP_DIR="$AMQPDIR/node"
  echo "rabbitmq: $TIDE_AMQP_URL"
else
  echo "FAIL rabbitmq: cannot start a node (see $LOG/rabbitmq.log)"
  cat "$LOG/rabbitmq.log"
  fail=$((fail + 1)); failed_names="$failed_names rabbitmq"
fi

# 1. the require graph of lua/tide: imports only go down (spec/tools/layers.lua)
luajit spec/tools/layers.lua > "$LOG/layers.log" 2>&1
one layers $? "$LOG/layers.log"

# 2. busted specs, under stock luajit with build/tide.so
for spec in spec/*_spec.lua; do
  name=$(basename "$spec" .lua)
  # The zombie-node scenario (consumer processes SIGKILLed, the broker
  # stopped and started, 5,000 messages) runs once, in the plain build: the
  # C paths it drives (connections lost, channels closed by the broker, a
  # broker restart) run under the sanitizers in rabbitmq_spec and
  # consumer_spec, and ASan would only slow its processes past the 2 s
  # progress bound it checks.
  if [ -n "$SANITIZE" ] && [ "$name" = rabbitmq_zombie_spec ]; then
    echo "skip $name under SANITIZE (runs in the plain build; see spec/run.sh)"
    continue
  fi
  # A spec file that hangs fails after SPEC_TIMEOUT s (default 900) and
  # names itself, instead of holding the whole run until CI's own limit.
  timeout -k 10 "${SPEC_TIMEOUT:-900}" env ASAN_OPTIONS="$LUA_ASAN" LD_PRELOAD="$PRELOAD" \
    luajit /usr/bin/busted --helper=spec/helper.lua -o TAP "$spec" > "$LOG/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "not ok - $name: timed out after ${SPEC_TIMEOUT:-900} s (spec/run.sh), the last test above it hung" >> "$LOG/$name.log"
  fi
  tally "$name" $rc "$LOG/$name.log"
done

# 2b. the allocator cache again without the arena (TIDE_ARENA=off): its
#     anchors and free lists serve states whose small blocks are not in one
#     (a host's allocator, a thread whose memory is bounded: src/arena.h)
timeout -k 10 "${SPEC_TIMEOUT:-900}" env TIDE_ARENA=off ASAN_OPTIONS="$LUA_ASAN" LD_PRELOAD="$PRELOAD" \
  luajit /usr/bin/busted --helper=spec/helper.lua -o TAP spec/alloc_cache_spec.lua > "$LOG/alloc_cache_spec_off.log" 2>&1
tally alloc_cache_spec_arena_off $? "$LOG/alloc_cache_spec_off.log"

# 3. installing: make install + pkg-config + a C host, and the luarocks rock
#    (once, outside the sanitizer pass: it builds and uses its own copies)
if [ -z "$SANITIZE" ]; then
  BUILD="$BUILD" sh spec/install.sh > "$LOG/install.log" 2>&1
  tally install $? "$LOG/install.log"
fi

# 4. C tests
for t in "$BUILD"/test_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  "$t" > "$LOG/$name.log" 2>&1
  tally "$name" $? "$LOG/$name.log"
done

# 5. examples check their own results
for e in examples/*.lua; do
  name=example_$(basename "$e" .lua)
  ASAN_OPTIONS=$LUA_ASAN "$BUILD/tide" run --quiet "$e" > "$LOG/$name.log" 2>&1
  one "$name" $? "$LOG/$name.log"
done
# examples that need the broker get its URL (make demo, without a broker, skips them)
for e in examples/rabbitmq/*.lua; do
  name=example_rabbitmq_$(basename "$e" .lua)
  ASAN_OPTIONS=$LUA_ASAN "$BUILD/tide" run --quiet "$e" "${TIDE_AMQP_URL:-}" > "$LOG/$name.log" 2>&1
  one "$name" $? "$LOG/$name.log"
done
"$BUILD/embed-host" examples/embed/script.lua > "$LOG/embed-host.log" 2>&1
one embed-host $? "$LOG/embed-host.log"

# 4. the finalizer storm (spec/fuzz/gc_storm.lua) for a few seconds; `make fuzz` runs it longer
ASAN_OPTIONS=$LUA_ASAN LD_PRELOAD=$PRELOAD LUA_CPATH="$BUILD/?.so;;" \
  luajit spec/fuzz/gc_storm.lua "${STORM_SECONDS:-5}" > "$LOG/gc_storm.log" 2>&1
one gc_storm $? "$LOG/gc_storm.log"

[ -z "$failed_names" ] || echo "failed:$failed_names"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
