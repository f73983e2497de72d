# Sourced by bench_routed.sh and bench_split.sh: the routed order workload as
# direct statements on the physical month table of this month, one pgbench
# script per shard database ($DIR/direct_<k>.sql, that shard's merchants), and
# pgbouncer in session mode (a pure relay, prepared statements work) passing
# them to the right shard. Needs SHARDS (the shard DSNs) set by the caller.

# write_direct_scripts <dir>
write_direct_scripts() {
  local dir=$1 k month
  month=$(date -u +%Y%m)
  for k in $(seq 0 7); do
    cat > "$dir/direct_$k.sql" <<SQL
\set m 8 * random(1, 100000) + $k
\set r random(1, 1000000000000)
\set id random(1, 9000000000000000000)
INSERT INTO t_order_$month (id, order_no, merchant_id, order_amount, pay_status) VALUES (:id, 'b' || :r, :m, 12.34, 'NEW');
SELECT * FROM t_order_$month WHERE merchant_id = :m AND id = :id;
UPDATE t_order_$month SET pay_status = 'PAID' WHERE merchant_id = :m AND id = :id;
SQL
  done
}

# start_shard_relay <dir> <clients>: pgbouncer with db_0 … db_7 (sets PGB_PID, PGB_PORT)
start_shard_relay() {
  local dbs k port
  source scripts/pgbouncer.sh
  dbs=$(for k in $(seq 0 7); do
    port=$(echo "${SHARDS[$k]}" | sed -E 's|.*:([0-9]+)/.*|\1|')
    echo "db_$k = host=127.0.0.1 port=$port dbname=db_$k user=postgres password=postgres"
  done)
  start_pgbouncer "$1" session "$2" postgres "$dbs"
}
