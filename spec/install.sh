#!/bin/sh
# spec/install.sh — installs tide the two ways users do, into throwaway trees, and uses each copy:
#   1. make install PREFIX=...: a C program built with `pkg-config --cflags --libs tide`
#      against the installed header and library runs a script;
#   2. luarocks make (Debian's luarocks, Lua 5.1 ABI): stock luajit requires the installed
#      module and runs a smoke script; the installed `tide` binary runs one too.
# Prints TAP lines; run by spec/run.sh (not under the sanitizers: it builds its own copies).
set -u
BUILD=${BUILD:-build}
TMP=$(mktemp -d /tmp/tide-install.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
n=0
check() {  # description, then a command; prints ok/not ok and the output on failure
  desc=$1; shift
  n=$((n + 1))
  if out=$("$@" 2>&1); then echo "ok $n - $desc"; else echo "not ok $n - $desc"; echo "$out" | sed 's/^/# /'; fi
}

cat > "$TMP/smoke.lua" <<'LUA'
local tide = require "tide"
local got = {}
local status = tide.run(function()
  local a = tide.spawn(function(x) tide.sleep(5) return x * 2 end, 21)
  local q = tide.queue.open("sqlite:" .. os.getenv("SMOKE_DB"))
  q:enqueue{ target = "t", method = "m", args = { n = 1 } }
  got[1] = select(2, a:await())
  got[2] = q:stats().available
  q:close()
end)
assert(status == "ok" and got[1] == 42 and got[2] == 1, "smoke: " .. tostring(status) .. " " .. tostring(got[1]))
print("smoke ok")
LUA
cat > "$TMP/smoke_root.lua" <<'LUA'
local tide = require "tide"                 -- under `tide run` the script is the root task
local t = tide.spawn(function(x) tide.sleep(5) return x + 1 end, 41)
local status, v = t:await()
assert(status == "ok" and v == 42, "smoke: " .. tostring(status) .. " " .. tostring(v))
print("smoke ok")
LUA

# 1. make install, pkg-config, a C host
PREFIX=$TMP/prefix
check "make install PREFIX=... installs binary, module, header, library and tide.pc" \
  make --no-print-directory install BUILD="$BUILD" PREFIX="$PREFIX"
check "a C program compiles and links with pkg-config --cflags --libs tide" sh -c \
  "cc -o '$TMP/host' examples/embed/host.c \$(PKG_CONFIG_PATH='$PREFIX/lib/pkgconfig' pkg-config --cflags --libs tide)"
check "that program runs a script on its own libuv loop" "$TMP/host" examples/embed/script.lua
check "the installed tide runs a script" "$PREFIX/bin/tide" run "$TMP/smoke_root.lua"
check "stock luajit requires the installed module" env SMOKE_DB="$TMP/b.db" \
  LUA_CPATH="$PREFIX/lib/lua/5.1/?.so;;" LUA_PATH="" luajit "$TMP/smoke.lua"

# 2. the rock
if command -v luarocks >/dev/null 2>&1; then
  # A copy of the sources without build/, so that the rock is built from scratch.
  # (--deps-mode=none: lua-cjson comes from Debian's lua-cjson here, with no network.)
  ROCKS=$TMP/rocks SRC=$TMP/src
  mkdir -p "$SRC" && tar -cf - --exclude=./build --exclude=./.git . | tar -xf - -C "$SRC"
  check "luarocks make builds the rock from the sources and installs it" sh -c \
    "cd '$SRC' && luarocks --lua-version=5.1 --tree='$ROCKS' make --deps-mode=none rockspecs/tide-scm-1.rockspec"
  check "stock luajit requires the rock's module" env SMOKE_DB="$TMP/c.db" \
    LUA_CPATH="$ROCKS/lib/lua/5.1/?.so;;" LUA_PATH="" luajit "$TMP/smoke.lua"
  check "the rock's tide binary runs and names its libraries" sh -c \
    "'$ROCKS/bin/tide' --version | grep -q 'built with LuaJIT .*, libuv .*, SQLite .*, libpq '"
else
  n=$((n + 1)); echo "not ok $n - luarocks is not installed (make deps installs it)"
fi
echo "1..$n"
