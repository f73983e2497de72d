#!/usr/bin/env bash
# The routed order workload of bench_routed.sh through one proxy build only, no
# baselines: for comparing two builds quickly (run it for each, alternating).
#   SHARDGATE_BIN=<shardgate> scripts/bench_routed_quick.sh [clients] [seconds] [simple|prepared]
# SYSCALLS=1 also counts the proxy's sendto/recvfrom per transaction (perf stat);
# PROFILE=<file> records a perf profile of the proxy under the load; WORKERS=n
# sets the proxy's runtime threads (0, the default: one per core); POOL_TOML
# adds lines to the proxy's [pool] section (e.g. "size = 4").
# WORKLOAD=select, update or insert runs only that statement of the order
# workload (a point read or write by merchant and id, no row found), to see
# the cost of one routed statement without the INSERT's two-phase commit.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-16}; T=${2:-8}; MODE=${3:-simple}
DIR=target/bench-routed-quick
export SHARDGATE_BIN=${SHARDGATE_BIN:-$PWD/target/release/shardgate} SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR --server-toml "worker_threads = ${WORKERS:-0}" --pool-toml "${POOL_TOML:-}" --extra-toml "${EXTRA_TOML:-}" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
PORT=$(jq .proxy_port $DIR/cluster.json); PID=$(jq .proxy_pid $DIR/cluster.json)
# the workload (one file for bench_routed.sh and bench_routed_quick.sh)
cp scripts/routed_order.pgbench $DIR/routed.sql
case "${WORKLOAD:-order}" in
  order) ;;
  select|update|insert)
    { echo '\set m random(1, 800000)'; echo '\set r random(1, 1000000000000)'; echo '\set id random(1, 9000000000000000000)'; grep -i "^${WORKLOAD}" $DIR/routed.sql | sed 's/ \\gset$//'; } > $DIR/one.sql
    mv $DIR/one.sql $DIR/routed.sql ;;
  *) echo "WORKLOAD: order, select, update or insert" >&2; exit 2 ;;
esac
export PGPASSWORD=app-secret
# warm-up: month tables, lookup tables, connections
pgbench -n -h 127.0.0.1 -p $PORT -U app -c 4 -T 2 -M $MODE -f $DIR/routed.sql shardgate >/dev/null 2>&1 || true
t0=$(awk '{print $14 + $15}' /proc/$PID/stat); u0=$(awk '{print $14}' /proc/$PID/stat)
if [ -n "${PROFILE:-}" ]; then perf record -F 2000 -g -p $PID -o "$PROFILE" -- sleep $T >/dev/null 2>&1 & PROF=$!; fi
if [ -n "${SYSCALLS:-}" ]; then perf stat -e 'syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_read' -p $PID -o $DIR/perf.txt -- sleep $((T+1)) & STAT=$!; fi
pgbench -n -h 127.0.0.1 -p $PORT -U app -c $C -j 2 -T $T -M $MODE -f $DIR/routed.sql shardgate > $DIR/out 2>&1 || true
t1=$(awk '{print $14 + $15}' /proc/$PID/stat); u1=$(awk '{print $14}' /proc/$PID/stat)
[ -n "${PROFILE:-}" ] && wait $PROF || true
grep -iE "error|abort" $DIR/out | head -3 | sed 's/^/WARNING: /' >&2 || true
tps=$(awk '/^tps/ {print $3}' $DIR/out); n=$(awk '/number of transactions actually processed/ {print $NF}' $DIR/out | cut -d/ -f1)
echo "mode=$MODE clients=$C tps=$tps tx=$n cpu_us_per_tx=$(echo "($t1-$t0)*1000000/$(getconf CLK_TCK)/$n" | bc -l | cut -c1-6) user_us_per_tx=$(echo "($u1-$u0)*1000000/$(getconf CLK_TCK)/$n" | bc -l | cut -c1-6)"
if [ -n "${SYSCALLS:-}" ]; then wait $STAT; awk -v n=$n '/syscalls/ {gsub(",","",$1); printf "  %s per tx: %.2f\n", $2, $1/n}' $DIR/perf.txt; fi
