#!/bin/sh
# run.sh — builds each spec/fuzz/fuzz_*.c with libFuzzer and runs it for a bounded time, then the
# finalizer storm (spec/fuzz/gc_storm.lua) and the TZif mutator (spec/fuzz/tzif_mutate.lua) as long
# (`make fuzz`).
#
# Run from the repository root.  Environment:
#   BUILD         where binaries, corpora and crash files go (default build/fuzz)
#   FUZZ_SECONDS  how long each target runs (default 60)
#   FUZZ_CC       a clang with libFuzzer (default clang)
#   TIDE_BUILD    where tide.so is, for the storm (default build)
# A target names the src/*.c files it links in a "fuzz-sources:" line of its
# header comment, and the pkg-config packages it needs besides luajit in a
# "fuzz-packages:" line (optional).  Seeds come from spec/fuzz/corpus_<name>/
# when it exists; what the fuzzer finds grows $BUILD/corpus_<name>/, and
# crashing inputs land in $BUILD/crashes_<name>/.  Exits non-zero when any
# target crashed.
set -eu

BUILD=${BUILD:-build/fuzz}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_CC=${FUZZ_CC:-clang}
FLAGS="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1 -Isrc"

[ -d spec/fuzz ] || { echo "run.sh: run me from the repository root" >&2; exit 2; }
mkdir -p "$BUILD"
status=0
for target in spec/fuzz/fuzz_*.c; do
  name=$(basename "$target" .c)
  short=${name#fuzz_}
  sources=$(sed -n 's/^.*fuzz-sources:[[:space:]]*\([^*]*\).*$/\1/p' "$target")
  packages="luajit $(sed -n 's/^.*fuzz-packages:[[:space:]]*\([^*]*\).*$/\1/p' "$target")"
  echo "fuzz: building $name ($sources)"
  # shellcheck disable=SC2046,SC2086  # word splitting of flags, sources and packages is wanted
  $FUZZ_CC $FLAGS $(pkg-config --cflags $packages) "$target" $sources \
    $(pkg-config --libs $packages) -lm -o "$BUILD/$name"
  mkdir -p "$BUILD/corpus_$short" "$BUILD/crashes_$short"
  seeds=""
  [ -d "spec/fuzz/corpus_$short" ] && seeds="spec/fuzz/corpus_$short"
  echo "fuzz: running $name for ${FUZZ_SECONDS}s"
  # shellcheck disable=SC2086  # an empty $seeds must vanish
  if ! "$BUILD/$name" -max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 \
       -artifact_prefix="$BUILD/crashes_$short/" "$BUILD/corpus_$short" $seeds; then
    echo "fuzz: $name crashed; the input is in $BUILD/crashes_$short/" >&2
    status=1
  fi
done
echo "fuzz: running gc_storm.lua for ${FUZZ_SECONDS}s"
if ! LUA_CPATH="${TIDE_BUILD:-build}/?.so;;" luajit spec/fuzz/gc_storm.lua "$FUZZ_SECONDS"; then
  echo "fuzz: gc_storm.lua failed (its seed is printed above)" >&2
  status=1
fi
echo "fuzz: running tzif_mutate.lua for ${FUZZ_SECONDS}s"
if ! luajit spec/fuzz/tzif_mutate.lua "$FUZZ_SECONDS"; then
  echo "fuzz: tzif_mutate.lua failed (its seed and input are named above)" >&2
  status=1
fi
exit $status
