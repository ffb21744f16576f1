#!/usr/bin/env bash
# Runs the audit benchmark with a throwaway PostgreSQL server (Debian
# package postgresql), so that appends on PostgreSQL are measured next to
# SQLite in the same run. Usage: bench/audit-postgres.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_postgres=()
if [ "$(id -u)" = 0 ]; then
  chown postgres:postgres "$data"
  as_postgres=(runuser -u postgres --)
fi
cleanup() {
  "${as_postgres[@]}" "$bin/pg_ctl" -D "$data/db" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap cleanup EXIT
"${as_postgres[@]}" "$bin/initdb" -A trust -U postgres -D "$data/db" >/dev/null
"${as_postgres[@]}" "$bin/pg_ctl" -D "$data/db" -l "$data/log" -w \
  -o "-p $port -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
MESHGATE_BENCH_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres" \
  cargo bench -p meshgate-gateway --bench audit
