# Start a throw-away PostgreSQL cluster on a free local port; sets COLLABBUS_TEST_POSTGRES_URL
# and stops the cluster when the calling script exits.
start_postgres() {
  local bindir pgdata port
  bindir=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n1)")
  [ -x "$bindir/pg_ctl" ] || bindir=$(dirname "$(command -v pg_ctl)")
  pgdata=$(mktemp -d /tmp/collabbus-pg.XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  PG_AS=""
  if [ "$(id -u)" = "0" ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$pgdata"
    PG_AS="runuser -u postgres --"
  fi
  $PG_AS "$bindir/initdb" -D "$pgdata" -U postgres -A trust >/dev/null
  $PG_AS "$bindir/pg_ctl" -D "$pgdata" -o "-p $port -k $pgdata -c listen_addresses=127.0.0.1 -c fsync=off" \
    -l "$pgdata/log" -w start >/dev/null
  COLLABBUS_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  PG_STOP="$PG_AS $bindir/pg_ctl -D $pgdata -m fast stop"
  trap '$PG_STOP >/dev/null 2>&1 || true' EXIT
}
