#!/bin/sh
# spec/pg/server.sh — takes the server of spec/pg.sh down and brings it back up, data kept.
#
#   sh spec/pg/server.sh down DIR      stop it (-m fast), keeping DIR/data
#   sh spec/pg/server.sh up DIR        start it again with the options it last ran
#                                      with (nothing to do when it runs)
#
# DIR is the one given to `spec/pg.sh start` ($TIDE_PG_DIR).  As root the
# server runs as the `postgres` user, like spec/pg.sh.
set -e
cmd=$1 dir=$2
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] && [ -d "$dir/data" ] || { echo "spec/pg/server.sh: no server in '$dir'" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

case $cmd in
  down)
    as_pg "'$bin/pg_ctl' -D '$dir/data' -w -m fast stop" > /dev/null
    ;;
  up)
    # postmaster.opts: the server's last command line, its arguments quoted:
    # /usr/lib/postgresql/N/bin/postgres "-D" "DIR/data" "-p" "PORT" ...
    # (pg_ctl gives -D itself).
    as_pg "'$bin/pg_ctl' -D '$dir/data' status" > /dev/null 2>&1 && exit 0
    opts=$(sed 's/^[^ ]* //; s/"-D" "[^"]*" *//g' "$dir/data/postmaster.opts")
    as_pg "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -o '$opts' start" > /dev/null
    ;;
  *) echo "usage: spec/pg/server.sh down DIR | up DIR" >&2; exit 2 ;;
esac
