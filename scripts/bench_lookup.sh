#!/usr/bin/env bash
# make bench, part 3: the order_no unique lookup (sharded_tables.unique_lookups).
# 1. INSERT throughput through shardgate with the lookup (every INSERT records its
#    order_no in db_default in the same two-phase commit) against a second proxy on
#    the same databases without it (unique_lookups = []), interleaved.
# 2. A point read by order_no (lookup entry in db_default, then one shard and one
#    month table) against a point read by merchant_id and id (one shard, every
#    month table), same proxy, interleaved. Target: ratio >= 0.8.
# Ratios are measured in the same run, ROUNDS rounds, mean TPS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
ROWS=${ROWS:-200000}
# point reads go to the HOT most recent orders (a payment callback reads an order
# made minutes ago); each read kind gets one warm-up run first, reported apart
HOT=${HOT:-20000}
DIR=target/bench-lookup
export SHARDGATE_BIN=$PWD/target/release/shardgate SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR up >/dev/null
INFO=$DIR/cluster.json
PROXY_PORT=$(jq .proxy_port $INFO)
mapfile -t SHARDS < <(jq -r '.shards[]' $INFO)
DEFAULT_DSN=$(jq -r .default_dsn $INFO)
MONTH=$(date -u +%Y%m)
export PGPASSWORD=postgres

# the second proxy: same config, other ports, no unique lookup
NOLK_PORT=$((PROXY_PORT + 100)); NOLK_ADMIN=$((PROXY_PORT + 101))
sed -E "s|^listen = \"127.0.0.1:[0-9]+\"|listen = \"127.0.0.1:$NOLK_PORT\"|; s|^admin_listen = \"127.0.0.1:[0-9]+\"|admin_listen = \"127.0.0.1:$NOLK_ADMIN\"|" $DIR/shardgate.toml > $DIR/nolookup.toml
cat >> $DIR/nolookup.toml <<'TOML'
[[sharded_tables]]
name = "t_order"
shard_key = "merchant_id"
month_column = "create_time"
table_pattern = "t_order_{yyyyMM}"
unique_lookups = []
TOML
RUST_LOG=warn $SHARDGATE_BIN --config $DIR/nolookup.toml > $DIR/nolookup.log 2>&1 &
NOLK_PID=$!
trap 'kill $NOLK_PID 2>/dev/null; ./target/release/devcluster --dir $DIR down >/dev/null 2>&1; true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$NOLK_ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

tps_of() { awk '/^tps/ {print $3}'; }
loud() { grep -iE "error|abort" "$1" | head -5 | sed "s|^|WARNING ($2): |" >&2 || true; }
run() { # port script name
  PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $1 -U app -c $CLIENTS -j 2 -T $DURATION -M prepared -f $2 shardgate > $DIR/$3.out 2>&1 || true
  loud $DIR/$3.out $3
  tps_of < $DIR/$3.out
}

# --- 1. INSERT with and without the lookup (order_no is a bind value: an expression
# such as 'i' || :r is refused while the lookup is on)
cat > $DIR/insert.sql <<'SQL'
\set m random(1, 800000)
\set r random(1, 9000000000000000000)
INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status) VALUES (:r, :m, 12.34, 'NEW');
SQL

# --- 2. point reads: ROWS orders this month, loaded on the shards with their lookup entries
# (an INSERT through the proxy first: it makes this month's tables and the lookup table)
PGPASSWORD=app-secret psql -X -q -h 127.0.0.1 -p $PROXY_PORT -U app shardgate -c "INSERT INTO t_order (order_no, merchant_id) VALUES ('warmup', 1)" >/dev/null
LOADS=()
for k in $(seq 0 7); do
  psql -X -q "${SHARDS[$k]}" -c "INSERT INTO t_order_$MONTH (id, order_no, merchant_id, order_amount, pay_status, create_time)
    SELECT g, g, g, 1.00, 'NEW', date_trunc('month', now()) + interval '1 hour' FROM generate_series(1, $ROWS) g WHERE g % 8 = $k" -c "VACUUM ANALYZE t_order_$MONTH" &
  LOADS+=($!)
done
wait "${LOADS[@]}"
psql -X -q "$DEFAULT_DSN" -c "INSERT INTO shardgate_lookup_t_order_order_no (value, shard_key, month) SELECT g, g, '$MONTH' FROM generate_series(1, $ROWS) g ON CONFLICT DO NOTHING" -c "VACUUM ANALYZE shardgate_lookup_t_order_order_no"
cat > $DIR/by_order_no.sql <<SQL
\set g random($((ROWS - HOT + 1)), $ROWS)
SELECT * FROM t_order WHERE order_no = :g;
SQL
cat > $DIR/by_id.sql <<SQL
\set g random($((ROWS - HOT + 1)), $ROWS)
SELECT * FROM t_order WHERE merchant_id = :g AND id = :g;
SQL
# both answer the row
[ "$(PGPASSWORD=app-secret psql -X -At -h 127.0.0.1 -p $PROXY_PORT -U app shardgate -c "SELECT merchant_id FROM t_order WHERE order_no = '77'")" = 77 ] || { echo "read by order_no is wrong" >&2; exit 1; }
[ "$(PGPASSWORD=app-secret psql -X -At -h 127.0.0.1 -p $PROXY_PORT -U app shardgate -c "SELECT order_no FROM t_order WHERE merchant_id = 77 AND id = 77")" = 77 ] || { echo "read by id is wrong" >&2; exit 1; }
MONTHS=$(psql -X -At "${SHARDS[1]}" -c "SELECT count(*) FROM pg_tables WHERE tablename ~ '^t_order_[0-9]{6}\$'")

# warm-up: the proxy learns where order_nos live as it reads them (an INSERT through
# it teaches it too); the first run is the cold number
cold_o=$(run $PROXY_PORT $DIR/by_order_no.sql read_order_no_cold); cold_i=$(run $PROXY_PORT $DIR/by_id.sql read_id_cold)
hints() { curl -fs "http://127.0.0.1:$(jq .admin_port $INFO)/metrics" | awk -v r="$1" '$1 ~ "^shardgate_lookup_hints_total" && $1 ~ r {s += $2} END {print s + 0}'; }
H0=$(hints '"confirmed"'); U0=$(hints unconfirmed)
declare -A SUM
for round in $(seq 1 $ROUNDS); do
  w=$(run $PROXY_PORT $DIR/insert.sql insert_lookup); wo=$(run $NOLK_PORT $DIR/insert.sql insert_plain)
  o=$(run $PROXY_PORT $DIR/by_order_no.sql read_order_no); i=$(run $PROXY_PORT $DIR/by_id.sql read_id)
  for k in w wo o i; do SUM[$k]=$(echo "${SUM[$k]:-0} + ${!k:-0}" | bc -l); done
  printf 'round %d  insert: lookup %8.1f tps, no lookup %8.1f tps   point read: by order_no %8.1f tps, by merchant_id+id %8.1f tps\n' $round ${w:-0} ${wo:-0} ${o:-0} ${i:-0}
done
m() { echo "${SUM[$1]} / $ROUNDS" | bc -l; }
echo
echo "== order_no unique lookup, $CLIENTS clients, ${DURATION}s x $ROUNDS, prepared (mean TPS) =="
printf 'INSERT      with lookup %10.1f  without %10.1f  ratio %.2f\n' $(m w) $(m wo) $(echo "$(m w) / $(m wo)" | bc -l)
printf 'point read  by order_no %10.1f  by merchant_id+id %10.1f  ratio %.2f (target >= 0.8; merchant_id+id reads all %s month tables of one shard; %s hot orders)\n' $(m o) $(m i) $(echo "$(m o) / $(m i)" | bc -l) "$MONTHS" $HOT
H1=$(hints '"confirmed"'); U1=$(hints unconfirmed)
printf 'point read  warm-up run (cold): by order_no %10.1f  by merchant_id+id %10.1f  ratio %.2f\n' ${cold_o:-0} ${cold_i:-0} $(echo "${cold_o:-0} / ${cold_i:-1}" | bc -l)
printf 'remembered order_no places in the measured runs: %d confirmed by their row, %d not (asked db_default)\n' $((H1 - H0)) $((U1 - U0))
