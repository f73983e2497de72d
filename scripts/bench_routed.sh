#!/usr/bin/env bash
# make bench, part 2: sharded execution.
# 1. Routed order workload (pgbench custom script: insert a new order, point
#    select by merchant and id, update pay_status) through shardgate over all
#    8 shards, vs the same statements run directly on the physical month
#    tables (one pgbench per shard database, merchants of that shard).
# 2. 8-shard aggregate `SELECT pay_status, count(*), sum(order_amount) FROM
#    t_order GROUP BY 1` over AGG_ROWS rows: through shardgate vs the same
#    query on one plain table holding all rows.
# Ratios are measured in the same run, interleaved, ROUNDS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
AGG_ROWS=${AGG_ROWS:-1000000}
AGG_RUNS=${AGG_RUNS:-5}
DIR=target/bench-routed
# SHARDGATE_BIN: the proxy binary to measure (scripts/bench_compare.sh passes an older build)
export SHARDGATE_BIN=${SHARDGATE_BIN:-$PWD/target/release/shardgate} SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
# WORKERS: the proxy's runtime threads (0 = one per core, the default; 1 = one thread);
# EXTRA_TOML: whole config sections added (e.g. ids.route_by_id, the t_order rule without lookups)
./target/release/devcluster --dir $DIR --server-toml "worker_threads = ${WORKERS:-0}" --extra-toml "${EXTRA_TOML:-}" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
INFO=$DIR/cluster.json
PROXY_PORT=$(jq .proxy_port $INFO)
PROXY_PID=$(jq .proxy_pid $INFO)
mapfile -t SHARDS < <(jq -r '.shards[]' $INFO)
DEFAULT_DSN=$(jq -r .default_dsn $INFO)
MONTH=$(date -u +%Y%m)
export PGPASSWORD=postgres

# --- 1. routed order workload
# the workload (one file for bench_routed.sh and bench_routed_quick.sh)
cp scripts/routed_order.pgbench $DIR/routed.sql
# the floor any proxy hop costs here: pgbouncer (session mode, so prepared
# statements work; a pure relay) passing the direct statements to the right shard
source scripts/routed_direct.sh
write_direct_scripts $DIR
start_shard_relay $DIR $CLIENTS
trap 'kill $PGB_PID 2>/dev/null; cp $DIR/shardgate.log target/bench-routed.shardgate.log 2>/dev/null; ./target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT

tps_of() { awk '/^tps/ {print $3}'; }
# a client that got an error is reported (it also lowers the TPS), never hidden
loud() { grep -iE "error|abort" "$1" | head -5 | sed "s|^|WARNING ($2): |" >&2 || true; }
routed_shardgate() {
  PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $PROXY_PORT -U app -c $CLIENTS -j 2 -T $DURATION -M $1 -f $DIR/routed.sql shardgate > $DIR/shardgate.out 2>&1 || true
  loud $DIR/shardgate.out "shardgate $1"
  tps_of < $DIR/shardgate.out
}
routed_direct() { # mode [via]: one pgbench per shard database, CLIENTS/8 clients each; total TPS
  local per=$(( CLIENTS / 8 )); [ $per -lt 1 ] && per=1
  local pids=() k
  for k in $(seq 0 7); do
    local dsn=${SHARDS[$k]}
    [ "${2:-}" = pgbouncer ] && dsn="postgres://postgres@127.0.0.1:$PGB_PORT/db_$k"
    pgbench -n "$dsn" -c $per -j 1 -T $DURATION -M $1 -f $DIR/direct_$k.sql > $DIR/direct_$k.out 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  for k in $(seq 0 7); do loud $DIR/direct_$k.out "direct${2:+ via $2} $1 db_$k"; done
  cat $DIR/direct_*.out | tps_of | paste -sd+ | bc -l
}
declare -A SUM
for round in $(seq 1 $ROUNDS); do
  for mode in simple prepared; do
    d=$(routed_direct $mode); t0=$(awk '{print $14 + $15}' /proc/$PROXY_PID/stat); s=$(routed_shardgate $mode); t1=$(awk '{print $14 + $15}' /proc/$PROXY_PID/stat)
    b=$(routed_direct $mode pgbouncer)
    SUM[d.$mode]=$(echo "${SUM[d.$mode]:-0} + ${d:-0}" | bc -l)
    SUM[s.$mode]=$(echo "${SUM[s.$mode]:-0} + ${s:-0}" | bc -l)
    SUM[b.$mode]=$(echo "${SUM[b.$mode]:-0} + ${b:-0}" | bc -l)
    # proxy CPU per routed transaction (clock ticks over the run's transactions)
    SUM[c.$mode]=$(echo "${SUM[c.$mode]:-0} + ($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / (${s:-1} * $DURATION)" | bc -l)
    printf 'round %d  routed %-9s direct tps=%9.1f  shardgate tps=%9.1f  pgbouncer relay tps=%9.1f\n' $round $mode ${d:-0} ${s:-0} ${b:-0}
  done
done

# --- 2. aggregate over AGG_ROWS rows: 8 shards vs one plain table
PLAIN_DSN=${DEFAULT_DSN%/*}/bench_plain
psql -X -q "$DEFAULT_DSN" -c "DROP DATABASE IF EXISTS bench_plain" -c "CREATE DATABASE bench_plain" 2>/dev/null
psql -X -q "$PLAIN_DSN" -f tests/sql/t_order_template.sql
load() { # dsn table shard(-1 = all)
  local filter="true"; [ "$3" -ge 0 ] && filter="g % 8 = $3"
  psql -X -q "$1" -c "INSERT INTO $2 (id, order_no, merchant_id, order_amount, pay_status, create_time)
    SELECT g, 'A' || g, g, (g % 10000) / 100.0, (ARRAY['NEW','PAID','REFUND','CLOSED'])[1 + g % 4], date_trunc('month', now()) + (g % 86400) * interval '1 second'
    FROM generate_series(1, $AGG_ROWS) g WHERE $filter" -c "VACUUM ANALYZE $2"
}
load "$PLAIN_DSN" t_order -1
# the order workload above left rows in this month's tables: start both sides equal
for k in $(seq 0 7); do psql -X -q "${SHARDS[$k]}" -c "TRUNCATE t_order_$MONTH"; done
for k in $(seq 0 7); do load "${SHARDS[$k]}" t_order_$MONTH $k & done
wait
AGG="SELECT pay_status, count(*), sum(order_amount) FROM t_order GROUP BY 1"
echo "$AGG;" > $DIR/agg.sql
lat_of() { awk '/latency average/ {print $4}'; }
for round in $(seq 1 $ROUNDS); do
  p=$(pgbench -n "$PLAIN_DSN" -c 1 -t $AGG_RUNS -f $DIR/agg.sql 2>&1 | lat_of)
  s=$(PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $PROXY_PORT -U app -c 1 -t $AGG_RUNS -f $DIR/agg.sql shardgate 2>&1 | lat_of)
  SUM[agg.p]=$(echo "${SUM[agg.p]:-0} + ${p:-0}" | bc -l); SUM[agg.s]=$(echo "${SUM[agg.s]:-0} + ${s:-0}" | bc -l)
  printf 'round %d  aggregate  plain table %8.1f ms  shardgate %8.1f ms\n' $round ${p:-0} ${s:-0}
done
# the answers must agree, or the timing means nothing
diff <(psql -X -At "$PLAIN_DSN" -c "$AGG ORDER BY 1") <(PGPASSWORD=app-secret psql -X -At "host=127.0.0.1 port=$PROXY_PORT user=app dbname=shardgate" -c "$AGG ORDER BY 1") >/dev/null \
  || { echo "aggregate answers differ between the plain table and shardgate" >&2; exit 1; }

echo
echo "== routed order workload: insert + point select + update, $CLIENTS clients, ${DURATION}s x $ROUNDS (mean TPS) =="
echo "(pgbouncer relay: the direct statements through pgbouncer in session mode, a pure relay: what one proxy hop costs on this machine)"
printf '%-9s %12s %12s %8s %16s %8s %16s\n' mode direct shardgate ratio "pgbouncer relay" ratio "proxy_cpu_us/tx"
for mode in simple prepared; do
  d=$(echo "${SUM[d.$mode]} / $ROUNDS" | bc -l); s=$(echo "${SUM[s.$mode]} / $ROUNDS" | bc -l); b=$(echo "${SUM[b.$mode]} / $ROUNDS" | bc -l)
  c=$(echo "${SUM[c.$mode]} / $ROUNDS" | bc -l)
  printf '%-9s %12.1f %12.1f %8.2f %16.1f %8.2f %16.1f\n' $mode $d $s $(echo "$s / $d" | bc -l) $b $(echo "$b / $d" | bc -l) $c
done
p=$(echo "${SUM[agg.p]} / $ROUNDS" | bc -l); s=$(echo "${SUM[agg.s]} / $ROUNDS" | bc -l)
echo
echo "== 8-shard aggregate over $AGG_ROWS rows: '$AGG' (mean latency) =="
printf 'plain table %.1f ms, shardgate over 8 shards %.1f ms, ratio (shardgate/plain) %.2f\n' $p $s $(echo "$s / $p" | bc -l)
