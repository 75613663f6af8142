#!/bin/sh
# spec/rabbitmq.sh — a throwaway RabbitMQ node on loopback ports, for specs and benchmarks.
#
#   sh spec/rabbitmq.sh start DIR PORT   prints the URL to use (amqp://tide:tide@127.0.0.1:PORT/)
#   sh spec/rabbitmq.sh stop DIR         stops the node and removes DIR
#   sh spec/rabbitmq.sh down DIR         stops the node, keeping its data (a broker outage)
#   sh spec/rabbitmq.sh up DIR           starts it again on the same ports and data
#   sh spec/rabbitmq.sh ctl DIR ARGS...  runs rabbitmqctl against it
#
# Everything lives under DIR: data (RABBITMQ_MNESIA_BASE), logs, config, the
# Erlang cookie (HOME).  The node has its own name (tide-PORT@localhost, or
# $TIDE_RABBITMQ_PREFIX-PORT@localhost when that is set), its
# own distribution port (PORT+1) and its own epmd (PORT+2), so it never meets
# the system's service or another session's node.  Uses Debian's
# rabbitmq-server package (make deps installs it); the broker's log goes to
# DIR/log, printed on stderr when it cannot start.
set -e
# Specs under `make sanitize` preload the sanitizer runtimes: not into Erlang.
unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS
cmd=$1 dir=$2
bin=/usr/lib/rabbitmq/bin
if [ ! -x "$bin/rabbitmq-server" ]; then echo "spec/rabbitmq.sh: rabbitmq-server is not installed (make deps)" >&2; exit 1; fi

env_for() {  # exports the node's environment from DIR/env
  [ -f "$dir/env" ] || { echo "spec/rabbitmq.sh: no node in '$dir'" >&2; exit 1; }
  . "$dir/env"
  # a crashing rabbitmqctl writes its dump there, not into the checkout
  export ERL_CRASH_DUMP="$dir/log/erl_crash.dump"
}

ctl() { "$bin/rabbitmqctl" -q "$@"; }

# Stops the node and waits until its process is gone: `rabbitmqctl shutdown`
# (bounded: once in a while it waited forever for a node already halted),
# then SIGKILL to the node's own pid if it is still there after 20 s.
halt() {
  pid=$(cat "$RABBITMQ_PID_FILE" 2>/dev/null)
  timeout 30 "$bin/rabbitmqctl" -q shutdown > /dev/null 2>&1 || true
  [ -n "$pid" ] || return 0
  n=0
  while kill -0 "$pid" 2>/dev/null && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  return 0
}

# Starts the node in the background and waits until it accepts work
# (rabbitmqctl wait: until the pid file appears and the app has started).
# On a loaded machine rabbitmqctl itself sometimes dies at start
# ("escript: Internal error: undef ... noproc"): while the server is still
# alive and the 60 s are not over, it is asked again.
boot() {
  rm -f "$RABBITMQ_PID_FILE"
  nohup "$bin/rabbitmq-server" > "$dir/log/console.log" 2>&1 &
  server=$!
  deadline=$(($(date +%s) + 60))
  : > "$dir/log/wait.log"
  while :; do
    left=$((deadline - $(date +%s)))
    if [ $left -gt 0 ] && timeout "$left" "$bin/rabbitmqctl" -q wait "$RABBITMQ_PID_FILE" \
         --timeout "$left" >> "$dir/log/wait.log" 2>&1; then
      return 0
    fi
    if [ $left -le 0 ] || ! kill -0 "$server" 2>/dev/null; then
      cat "$dir/log/wait.log" "$dir/log/console.log" >&2
      cat "$dir"/log/*.log >&2 2>/dev/null || true
      exit 1
    fi
    sleep 1
  done
}

case $cmd in
  start)
    port=$3
    rm -rf "$dir"; mkdir -p "$dir/data" "$dir/log" "$dir/home"
    cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$port
loopback_users = none
default_user = tide
default_pass = tide
log.file.level = warning
log.console = false
disk_free_limit.absolute = 50MB
EOF
    : > "$dir/enabled_plugins.empty"
    echo "[]." > "$dir/enabled_plugins"
    cat > "$dir/env" <<EOF
export HOME='$dir/home'
export RABBITMQ_NODENAME='${TIDE_RABBITMQ_PREFIX:-tide}-$port@localhost'
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$((port + 1))
export ERL_EPMD_PORT=$((port + 2))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE='$dir/data'
export RABBITMQ_LOG_BASE='$dir/log'
export RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf'
export RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins'
export RABBITMQ_PID_FILE='$dir/node.pid'
export RABBITMQ_CONF_ENV_FILE='$dir/enabled_plugins.empty'
export RABBITMQ_ADVANCED_CONFIG_FILE='$dir/advanced.config'
export RABBITMQ_SERVER_ERL_ARGS='+P 1048576 +t 5000000 +stbt db +zdbbl 128000 +sbwt none +sbwtdcpu none +sbwtdio none'
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
    echo "[]." > "$dir/advanced.config"
    env_for
    boot
    echo "amqp://tide:tide@127.0.0.1:$port/"
    ;;
  down)
    env_for
    halt
    ;;
  up)
    env_for
    boot
    ;;
  ctl)
    env_for
    shift 2
    ctl "$@"
    ;;
  stop)
    if [ -f "$dir/env" ]; then
      env_for
      halt
      # the node's own epmd (started with the node, on its own port)
      epmd -port "$ERL_EPMD_PORT" -kill > /dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
  *) echo "usage: spec/rabbitmq.sh start DIR PORT | stop DIR | down DIR | up DIR | ctl DIR ARGS..." >&2; exit 2 ;;
esac
