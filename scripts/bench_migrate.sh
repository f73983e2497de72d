#!/usr/bin/env bash
# make bench, part 5: migration throughput on 1M legacy rows (ROWS), 20,000
# merchants over 13 months. Reports shardgate-migrate backfill and verify in
# rows/s, each next to a baseline measured in the same run on the same clusters:
#   backfill — psql piping one binary COPY of legacy into one indexed table on
#              a shard (what a hand-made one-shot copy costs, without batching,
#              locking, splitting or resumability);
#   verify   — one checksum pass over legacy alone (the per-row hashing verify
#              does in every database).
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
DIR=target/bench-migrate
export SHARDGATE_BIN=$PWD/target/release/shardgate SHARDGATE_LOG=warn
MIGRATE=$PWD/target/release/shardgate-migrate
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR --legacy --extra-toml "[ids]\nworker_id = 1\nlegacy_id_max = 1000000000\n" up >/dev/null
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
INFO=$DIR/cluster.json
LEGACY=$(jq -r .legacy_dsn $INFO)
SHARD1=$(jq -r '.shards[1]' $INFO)
CONFIG=$DIR/shardgate.toml
export PGPASSWORD=postgres
now() { date +%s.%N; }
psql -X -q "$LEGACY" -c "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time)
  SELECT g, 'L' || g, (g::bigint * 7919) % 20000 + 1, (g % 10000) / 100.0, CASE WHEN g % 3 = 0 THEN 'PAID' ELSE 'NEW' END,
         timestamptz '2025-01-01 00:00:00+00' + (g % 395) * interval '1 day' + (g % 86400) * interval '1 second'
  FROM generate_series(1, $ROWS) g" -c "VACUUM ANALYZE t_order"
COLS="id, order_no, merchant_id, order_amount, pay_status, create_time"
# baseline 1: one COPY pipe into one indexed table
psql -X -q "$SHARD1" -c "DROP TABLE IF EXISTS bench_copy; CREATE TABLE bench_copy (LIKE t_order INCLUDING ALL)"
t0=$(now)
psql -X -q "$LEGACY" -c "COPY (SELECT $COLS FROM t_order) TO STDOUT (FORMAT binary)" | psql -X -q "$SHARD1" -c "COPY bench_copy ($COLS) FROM STDIN (FORMAT binary)"
t1=$(now)
base_copy=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
psql -X -q "$SHARD1" -c "DROP TABLE bench_copy"
# baseline 2: one checksum pass over legacy
t0=$(now)
psql -X -q -At "$LEGACY" -c "SET TimeZone = 'UTC'; SELECT count(*), sum(hashtextextended(ROW($COLS)::text, 0)) FROM t_order" >/dev/null
t1=$(now)
base_sum=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
$MIGRATE --config $CONFIG prepare >/dev/null
$MIGRATE --config $CONFIG dual-write >/dev/null
t0=$(now)
$MIGRATE --config $CONFIG backfill 2>/dev/null | tail -1
t1=$(now)
backfill=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
t0=$(now)
$MIGRATE --config $CONFIG verify | tail -2
t1=$(now)
# rows/s counts legacy rows verified (each is also read once on its shard)
verify=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
echo
echo "== migration: $ROWS legacy rows, 20000 merchants, 13 months =="
printf 'backfill: %8.0f rows/s (target >= 50000)   baseline one-pipe COPY: %8.0f rows/s   ratio %.2f\n' $backfill $base_copy $(echo "$backfill / $base_copy" | bc -l)
printf 'verify:   %8.0f rows/s (target >= 300000)  baseline one checksum pass: %8.0f rows/s   ratio %.2f\n' $verify $base_sum $(echo "$verify / $base_sum" | bc -l)
