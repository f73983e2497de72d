#!/usr/bin/env bash
# make bench, part 3: sync-back throughput. SYNC_ROWS (default 200,000) orders
# for db_0 are committed at once into db_default.t_order_fallback (as the proxy
# writes them while a shard is down), then the time until the sync-back worker
# has moved every one to db_0 is measured; rows are checked on the shard after.
set -euo pipefail
cd "$(dirname "$0")/.."
SYNC_ROWS=${SYNC_ROWS:-200000}
BATCH=${BATCH:-1000}
DIR=target/bench-sync
export SHARDGATE_BIN=$PWD/target/release/shardgate SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR --extra-toml "[fallback]\nsync_interval_ms = 200\nbatch_size = $BATCH\n" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
INFO=$DIR/cluster.json
DEFAULT_DSN=$(jq -r .default_dsn $INFO)
SHARD0=$(jq -r '.shards[0]' $INFO)
MONTH=$(date -u +%Y%m)
export PGPASSWORD=postgres
t0=$(date +%s.%N)
psql -X -q "$DEFAULT_DSN" -c "INSERT INTO t_order_fallback (id, order_no, merchant_id, order_amount, pay_status, create_time, target_db, target_table)
  SELECT g, 'S' || g, 8 * (1 + g % 1000), (g % 10000) / 100.0, 'NEW', date_trunc('month', now()) + (g % 86400) * interval '1 second', 'db_0', 't_order_$MONTH'
  FROM generate_series(1, $SYNC_ROWS) g"
t1=$(date +%s.%N)
# poll cheaply (an index probe, every 0.2 s) so the measurement does not compete with the worker
while :; do
  left=$(psql -X -At "$DEFAULT_DSN" -c "SELECT EXISTS (SELECT 1 FROM t_order_fallback WHERE target_db = 'db_0' AND sync_status <> 'SYNCED')")
  [ "$left" = f ] && break
  sleep 0.2
done
t2=$(date +%s.%N)
on_shard=$(psql -X -At "$SHARD0" -c "SELECT count(*) FROM t_order_$MONTH WHERE order_no LIKE 'S%'")
[ "$on_shard" = "$SYNC_ROWS" ] || { echo "expected $SYNC_ROWS rows on db_0, found $on_shard" >&2; exit 1; }
secs=$(echo "$t2 - $t1" | bc -l)
echo
echo "== sync-back: $SYNC_ROWS pending rows to db_0, batch $BATCH =="
printf 'loaded in %.1f s; synced in %.2f s: %.0f rows/s (all %d on db_0.t_order_%s)\n' $(echo "$t1 - $t0" | bc -l) $secs $(echo "$SYNC_ROWS / $secs" | bc -l) $on_shard $MONTH
