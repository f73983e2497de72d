#!/usr/bin/env bash
# Where a routed transaction's CPU goes: the order workload of bench_routed.sh
# through shardgate and, as the baseline, the direct statements through the
# pgbouncer relay (session mode), on one cluster, alternating. Per run: TPS, the
# machine's busy CPU per transaction (/proc/stat), the hop's (proxy or pgbouncer),
# PostgreSQL's (every postgres process) and the rest (pgbench, kernel), the idle
# share, and the hop's involuntary context switches per transaction.
#   [WORKERS=1] [POOL_TOML=...] [EXTRA_TOML=...] [MODE=prepared|simple] [ROUNDS=2] [DURATION=8] scripts/bench_split.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}; T=${DURATION:-8}; MODE=${MODE:-prepared}
DIR=target/bench-split
export SHARDGATE_BIN=${SHARDGATE_BIN:-$PWD/target/release/shardgate} SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR --server-toml "worker_threads = ${WORKERS:-1}" --pool-toml "${POOL_TOML:-}" --extra-toml "${EXTRA_TOML:-}" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
INFO=$DIR/cluster.json
PORT=$(jq .proxy_port $INFO); PID=$(jq .proxy_pid $INFO)
mapfile -t SHARDS < <(jq -r '.shards[]' $INFO)
export PGPASSWORD=postgres
cp scripts/routed_order.pgbench $DIR/routed.sql
source scripts/routed_direct.sh
write_direct_scripts $DIR
start_shard_relay $DIR 16
trap 'kill $PGB_PID 2>/dev/null; ./target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT

busy() { awk '/^cpu / {print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
invol() { cat /proc/$1/task/*/status | awk '/^nonvoluntary_ctxt/ {n+=$2} END {print n}'; }
pg_ticks() { for p in $(pgrep -x postgres); do awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null; done | awk '{s+=$1} END {print s+0}'; }
relay() {
  local pids=() k
  for k in $(seq 0 7); do
    pgbench -n "postgres://postgres@127.0.0.1:$PGB_PORT/db_$k" -c 2 -j 1 -T $T -M $MODE -f $DIR/direct_$k.sql > $DIR/relay_$k.out 2>&1 & pids+=($!)
  done
  wait "${pids[@]}" || true
  cat $DIR/relay_*.out | awk '/actually processed/ {split($NF, a, "/"); s += a[1]} END {print s + 0}'
}
shardgate() {
  PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $PORT -U app -c 16 -j 2 -T $T -M $MODE -f $DIR/routed.sql shardgate > $DIR/shardgate.out 2>&1 || true
  awk '/actually processed/ {split($NF, a, "/"); print a[1] + 0}' $DIR/shardgate.out
}
measure() { # name hop_pid
  local b0 i0 b1 i1 h0 h1 c0 c1 q0 q1 n
  read -r b0 i0 < <(busy); h0=$(ticks $2); c0=$(invol $2); q0=$(pg_ticks)
  n=$($1)
  read -r b1 i1 < <(busy); h1=$(ticks $2); c1=$(invol $2); q1=$(pg_ticks)
  grep -ihE "error|abort" $DIR/*.out | head -3 | sed 's/^/WARNING: /' >&2 || true
  awk -v name=$1 -v n=$n -v T=$T -v b=$((b1 - b0)) -v i=$((i1 - i0)) -v h=$((h1 - h0)) -v q=$((q1 - q0)) -v c=$((c1 - c0)) -v hz=$(getconf CLK_TCK) 'BEGIN {
    us = 1000000 / hz / (n > 0 ? n : 1)
    printf "%-9s %s tps=%7.0f  cpu/tx=%6.1f us  hop=%5.1f  postgres=%6.1f  rest=%5.1f  idle=%4.1f%%  hop preemptions/tx=%.2f\n",
      name, "'$MODE'", n / T, b * us, h * us, q * us, (b - h - q) * us, 100 * i / (b + i), c / (n > 0 ? n : 1) }'
}
# warm-up: month tables, connections, prepared statements
T0=$T; T=2; shardgate >/dev/null; relay >/dev/null; T=$T0
for r in $(seq 1 $ROUNDS); do
  measure relay $PGB_PID
  measure shardgate $PID
done
