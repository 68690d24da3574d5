#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for a test run in a new folder under /tmp (data,
# socket, log; named keygate-test-pg.*) on a free port, and prints "FOLDER URL":
#   read -r dir url < <(softhsm-tests/private-pg.sh start)  ...  private-pg.sh stop "$dir"
# initdb and postgres refuse to run as root: as root they run as the postgres user.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:-}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || bin=$(dirname "$(command -v initdb)")
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    dir=$(mktemp -d /tmp/keygate-test-pg.XXXXXX)
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$dir"
    as_pg "$bin/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$dir/data" >/dev/null
    listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      port=$((20000 + RANDOM % 12000))
      listening "$port" && continue
      if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
          -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null; then
        echo "$dir postgres://postgres@127.0.0.1:$port/postgres"
        exit 0
      fi
    done
    echo "could not start PostgreSQL: $(tail -3 "$dir/server.log" 2>/dev/null)" >&2
    exit 1
    ;;
  stop)
    if [ -n "$dir" ] && [ -d "$dir/data" ]; then
      as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ -n "$dir" ]; then rm -rf "$dir"; fi
    ;;
esac
