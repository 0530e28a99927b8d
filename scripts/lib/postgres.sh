# shellcheck shell=bash
# ensure_postgres: exports ENGRAM_TEST_PG_URL, an admin URL of a PostgreSQL server on loopback
# where tests may CREATE DATABASE. Order: the caller's ENGRAM_TEST_PG_URL; a server already on
# 127.0.0.1:5432 (trust auth); else a private throwaway cluster, installing the server
# packages first when the machine has none. ENGRAM_PRIVATE_PG=1 forces the private cluster.

ensure_postgres() {
  if [[ -n "${ENGRAM_TEST_PG_URL:-}" ]]; then
    echo "postgres: using ENGRAM_TEST_PG_URL"
    return
  fi
  local shared="postgres://postgres@127.0.0.1:5432/postgres"
  if [[ "${ENGRAM_PRIVATE_PG:-0}" != 1 ]] && command -v psql >/dev/null \
      && psql "$shared" -Atqc 'select 1' >/dev/null 2>&1; then
    echo "postgres: using the server on 127.0.0.1:5432"
    export ENGRAM_TEST_PG_URL="$shared"
    return
  fi
  start_private_postgres
}

postgres_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

start_private_postgres() {
  local bin
  bin=$(postgres_bin_dir)
  if [[ -z "$bin" ]]; then
    echo "postgres: no server packages; installing them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    bin=$(postgres_bin_dir)
  fi
  local dir port
  dir=$(mktemp -d /tmp/engram-pg.XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # initdb refuses to run as root: the cluster belongs to the postgres user the packages create.
  local as_owner=()
  if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
    chown postgres "$dir"
    as_owner=(runuser -u postgres --)
  fi
  "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log"
  "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
  PRIVATE_PG=("${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
  trap 'stop_private_postgres' EXIT
  export ENGRAM_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "postgres: private cluster on 127.0.0.1:$port ($dir)"
}

stop_private_postgres() {
  if [[ -n "${PRIVATE_PG[*]:-}" ]]; then
    "${PRIVATE_PG[@]}" >/dev/null 2>&1 || true
  fi
}
