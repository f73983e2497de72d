# Sourced by the bench scripts: starts a pgbouncer (Debian package) on a free
# loopback port, as the postgres user when run as root.
#   start_pgbouncer DIR POOL_MODE POOL_SIZE AUTH_USER DATABASES_SECTION
# DATABASES_SECTION is the [databases] lines. Sets PGB_PORT and PGB_PID.
start_pgbouncer() {
  local dir=$1 mode=$2 size=$3 user=$4 databases=$5
  PGB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$dir/pgbouncer"
  cat > "$dir/pgbouncer/pgbouncer.ini" <<INI
[databases]
$databases
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
auth_type = trust
auth_file = $PWD/$dir/pgbouncer/users.txt
pool_mode = $mode
default_pool_size = $size
max_client_conn = 2000
logfile = $PWD/$dir/pgbouncer/pgbouncer.log
pidfile = $PWD/$dir/pgbouncer/pgbouncer.pid
INI
  echo "\"$user\" \"\"" > "$dir/pgbouncer/users.txt"
  chown -R postgres:postgres "$dir/pgbouncer" 2>/dev/null || true
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- pgbouncer -d "$PWD/$dir/pgbouncer/pgbouncer.ini"; else pgbouncer -d "$dir/pgbouncer/pgbouncer.ini"; fi
  sleep 0.5
  PGB_PID=$(cat "$dir/pgbouncer/pgbouncer.pid")
}
