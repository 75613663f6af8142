#!/bin/sh
# spec/pg.sh — a throwaway PostgreSQL cluster on a loopback port, for specs and benchmarks.
#
#   sh spec/pg.sh start DIR PORT [postgres options...]   prints the URL to use
#   sh spec/pg.sh stop DIR
#   sh spec/pg.sh restart DIR                              (fast: -m fast)
#
# Uses Debian's postgresql package (make deps installs it).  When run as root
# the cluster runs as the `postgres` user, as PostgreSQL refuses root.
set -e
cmd=$1 dir=$2
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ]; then echo "spec/pg.sh: PostgreSQL is not installed (make deps)" >&2; exit 1; fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

case $cmd in
  start)
    port=$3; shift 3
    rm -rf "$dir"; mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_pg "'$bin/initdb' -D '$dir/data' -A trust -U tide --no-sync -E UTF8" > "$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 $*\" start" > /dev/null ||
      { cat "$dir/server.log" >&2; exit 1; }
    echo "postgres://tide@127.0.0.1:$port/postgres"
    ;;
  restart)
    as_pg "'$bin/pg_ctl' -D '$dir/data' -w -m fast restart" > /dev/null
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "'$bin/pg_ctl' -D '$dir/data' -w -m fast stop" > /dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *) echo "usage: spec/pg.sh start DIR PORT [options] | stop DIR | restart DIR" >&2; exit 2 ;;
esac
