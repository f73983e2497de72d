#!/usr/bin/env bash
# make bench: pgbench select-only (-S, 16 clients) in simple, extended and prepared
# mode against PostgreSQL directly, shardgate and pgbouncer (transaction mode),
# interleaved, ROUNDS rounds; prints TPS, ratio to direct, shardgate's CPU time
# per transaction (from /proc) and its RSS idle and with 1,000 idle clients.
# A third baseline, "floor", is proxy/examples/relay_floor: a tokio relay that
# gives each client its own server connection and copies bytes both ways, with no
# parsing or pooling: what the runtime and the kernel cost before shardgate's own work.
# Ratios are measured in the same run, so a noisy machine shifts all of them alike.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
SCALE=${SCALE:-10}
WORKERS=${WORKERS:-0}
DIR=target/bench
# SHARDGATE_BIN: the proxy binary to measure (scripts/bench_compare.sh passes an older build)
export SHARDGATE_BIN=${SHARDGATE_BIN:-$PWD/target/release/shardgate} SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
# WORKERS: the proxy's runtime threads (0 = one per core)
./target/release/devcluster --dir $DIR --server-toml "worker_threads = ${WORKERS:-0}" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; [ -n "${PGB_PID:-}" ] && kill $PGB_PID 2>/dev/null; [ -n "${FLOOR_PID:-}" ] && kill $FLOOR_PID 2>/dev/null; true' EXIT
INFO=$DIR/cluster.json
PROXY_PID=$(jq .proxy_pid $INFO)
PROXY_PORT=$(jq .proxy_port $INFO)
DEFAULT_DSN=$(jq -r .default_dsn $INFO)
PG_PORT=$(echo "$DEFAULT_DSN" | sed -E 's|.*:([0-9]+)/.*|\1|')

# pgbouncer in transaction mode in front of the same database, same pool size
source scripts/pgbouncer.sh
start_pgbouncer $DIR transaction 20 app "shardgate = host=127.0.0.1 port=$PG_PORT dbname=db_default user=postgres password=postgres"

PGPASSWORD=postgres pgbench -h 127.0.0.1 -p $PG_PORT -U postgres -i -q -s $SCALE db_default >/dev/null 2>&1

# the tokio relay floor, same worker threads as the proxy
[ -x target/release/examples/relay_floor ] || cargo build -q --release -p shardgate --example relay_floor
target/release/examples/relay_floor 127.0.0.1:0 127.0.0.1:$PG_PORT $WORKERS > $DIR/floor.addr &
FLOOR_PID=$!
for _ in $(seq 1 50); do [ -s $DIR/floor.addr ] && break; sleep 0.1; done
FLOOR_PORT=$(sed -E 's/.*:([0-9]+)$/\1/' $DIR/floor.addr)

cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
run() { # target mode -> "tps transactions"
  local target=$1 mode=$2 out
  case $target in
    direct) out=$(PGPASSWORD=postgres pgbench -h 127.0.0.1 -p $PG_PORT -U postgres -S -c $CLIENTS -j 2 -T $DURATION -M $mode db_default 2>&1) ;;
    shardgate) out=$(PGPASSWORD=app-secret pgbench -h 127.0.0.1 -p $PROXY_PORT -U app -S -c $CLIENTS -j 2 -T $DURATION -M $mode shardgate 2>&1) ;;
    floor) out=$(PGPASSWORD=postgres pgbench -h 127.0.0.1 -p $FLOOR_PORT -U postgres -S -c $CLIENTS -j 2 -T $DURATION -M $mode db_default 2>&1) ;;
    pgbouncer) out=$(pgbench -h 127.0.0.1 -p $PGB_PORT -U app -S -c $CLIENTS -j 2 -T $DURATION -M $mode shardgate 2>&1) ;;
  esac
  local tps n
  tps=$(echo "$out" | awk '/^tps/ {print $3}')
  n=$(echo "$out" | awk -F'[:/]' '/actually processed/ {gsub(/ /,"",$2); print $2}')
  echo "${tps:-0} ${n:-0}"
}

declare -A SUM CPU TX
HZ=$(getconf CLK_TCK)
for round in $(seq 1 $ROUNDS); do
  for mode in simple extended prepared; do
    for target in direct shardgate pgbouncer floor; do
      # pgbouncer before 1.21 cannot run protocol-level prepared statements in transaction mode
      if [ $target = pgbouncer ] && [ $mode = prepared ]; then continue; fi
      pid=$PROXY_PID; [ $target = pgbouncer ] && pid=$PGB_PID; [ $target = floor ] && pid=$FLOOR_PID
      c0=$(cpu_ticks $pid)
      read -r tps n < <(run $target $mode)
      c1=$(cpu_ticks $pid)
      SUM[$target.$mode]=$(echo "${SUM[$target.$mode]:-0} + $tps" | bc -l)
      if [ $target != direct ]; then
        CPU[$target.$mode]=$(( ${CPU[$target.$mode]:-0} + c1 - c0 ))
        TX[$target.$mode]=$(( ${TX[$target.$mode]:-0} + n ))
      fi
      printf 'round %d  %-8s %-10s tps=%10.1f\n' $round $mode $target $tps
    done
  done
done

echo
echo "== pgbench -S, $CLIENTS clients, ${DURATION}s x $ROUNDS rounds (mean TPS; ratio to direct) =="
printf '%-9s %10s %10s %6s %10s %6s %10s %6s %9s %9s %9s\n' mode direct shardgate ratio pgbouncer ratio floor ratio "sg_us/tx" "pgb_us/tx" "floor_us/tx"
us_per_tx() { echo "${CPU[$1]} * 1000000 / $HZ / ${TX[$1]}" | bc -l; }
for mode in simple extended prepared; do
  d=$(echo "${SUM[direct.$mode]} / $ROUNDS" | bc -l)
  s=$(echo "${SUM[shardgate.$mode]} / $ROUNDS" | bc -l)
  f=$(echo "${SUM[floor.$mode]} / $ROUNDS" | bc -l)
  if [ -n "${SUM[pgbouncer.$mode]:-}" ]; then
    b=$(echo "${SUM[pgbouncer.$mode]} / $ROUNDS" | bc -l)
    b_cols=$(printf '%10.1f %6.2f' $b $(echo "$b / $d" | bc -l)); b_us=$(printf '%9.1f' $(us_per_tx pgbouncer.$mode))
  else
    b_cols=$(printf '%10s %6s' n/a -); b_us=$(printf '%9s' n/a)
  fi
  printf '%-9s %10.1f %10.1f %6.2f %s %10.1f %6.2f %9.1f %s %9.1f\n' $mode $d $s $(echo "$s / $d" | bc -l) "$b_cols" $f $(echo "$f / $d" | bc -l) \
    $(us_per_tx shardgate.$mode) "$b_us" $(us_per_tx floor.$mode)
done

# memory: idle, then with 1,000 idle clients
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$PROXY_PID/status; }
idle=$(rss_kib)
python3 - "$PROXY_PORT" <<'PY' &
import sys, time, psycopg
conns = [psycopg.connect(f"host=127.0.0.1 port={sys.argv[1]} user=app password=app-secret dbname=shardgate sslmode=disable") for _ in range(1000)]
open("/tmp/shardgate-bench-1000-ready", "w").close()
time.sleep(30)
PY
HOLDER=$!
rm -f /tmp/shardgate-bench-1000-ready
for _ in $(seq 1 600); do [ -f /tmp/shardgate-bench-1000-ready ] && break; sleep 0.1; done
sleep 1
with1000=$(rss_kib)
kill $HOLDER 2>/dev/null || true
echo
echo "== shardgate memory =="
echo "RSS idle: ${idle} KiB; with 1000 idle clients: ${with1000} KiB; per idle client: $(( (with1000 - idle) )) B/1000 = $(echo "($with1000 - $idle) / 1000" | bc -l | xargs printf '%.1f') KiB"
