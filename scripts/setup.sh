#!/usr/bin/env bash
# Installs what the local system, the tests and the benchmarks need; idempotent.
# PostgreSQL 15 ships on the machine; Redis, pgbouncer and the Python clients may not.
set -euo pipefail
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v pgbouncer >/dev/null || need_apt+=(pgbouncer)
command -v jq >/dev/null || need_apt+=(jq)
command -v bc >/dev/null || need_apt+=(bc)
command -v psql >/dev/null || need_apt+=(postgresql-client-15)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
# the driver matrix (tests/tests/drivers.rs): pgjdbc compiled with javac at test time, node-postgres
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # the Debian packages start their own servers; the project runs its own instances
  for svc in redis-server pgbouncer; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi
if ! python3 -c 'import psycopg, asyncpg' 2>/dev/null; then
  echo "setup: installing psycopg 3 and asyncpg from PyPI"
  python3 -m pip install -q --disable-pip-version-check 'psycopg[binary]==3.2.*' 'asyncpg==0.30.*'
fi
if ! python3 -c 'import sqlalchemy, sys; sys.exit(sqlalchemy.__version__.split(".")[0] != "2")' 2>/dev/null; then
  echo "setup: installing SQLAlchemy 2 from PyPI"
  python3 -m pip install -q --disable-pip-version-check 'SQLAlchemy==2.0.*'
fi
# node-postgres for the driver matrix, into the repo (versions fixed by package-lock.json)
node_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/drivers/node"
if [ ! -f "$node_dir/node_modules/pg/package.json" ] || [ "$node_dir/package-lock.json" -nt "$node_dir/node_modules/.package-lock.json" ]; then
  echo "setup: installing node-postgres from the npm registry"
  npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error >/dev/null
fi
