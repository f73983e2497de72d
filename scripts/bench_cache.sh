#!/usr/bin/env bash
# make bench, part 4: merchant point reads (`SELECT * FROM t_merchant WHERE
# merchant_id = :m`, MERCHANTS keys, uniform) in simple and prepared mode,
# interleaved, ROUNDS rounds:
#   direct      PostgreSQL (db_default)
#   uncached    a second shardgate with the same config but no cached tables
#   cached      shardgate with the cache (moka L1 + Redis L2)
# Prints TPS, ratios, and the cache hit rate of the measured runs (from
# /metrics). Target: cached >= 3x uncached at >= 95% hit rate.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
MERCHANTS=${MERCHANTS:-10000}
DIR=target/bench-cache
export SHARDGATE_BIN=$PWD/target/release/shardgate SHARDGATE_LOG=warn
./target/release/devcluster --dir $DIR down >/dev/null 2>&1 || true
./target/release/devcluster --dir $DIR up >/dev/null
UNCACHED_PID=
trap './target/release/devcluster --dir $DIR down >/dev/null 2>&1; [ -n "$UNCACHED_PID" ] && kill $UNCACHED_PID 2>/dev/null; true' EXIT
INFO=$DIR/cluster.json
PROXY_PORT=$(jq .proxy_port $INFO)
ADMIN_URL=$(jq -r .admin_url $INFO)
DEFAULT_DSN=$(jq -r .default_dsn $INFO)
export PGPASSWORD=postgres
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# loaded through shardgate: it drops the table from the cache and reloads its bloom filter at once
PGPASSWORD=app-secret psql -X -q "host=127.0.0.1 port=$PROXY_PORT user=app dbname=shardgate" -c "TRUNCATE t_merchant" -c "INSERT INTO t_merchant (merchant_id, merchant_name, status, fee_rate, settle_account)
  SELECT g, 'merchant ' || g, (g % 3)::smallint, 0.0060, 'ACC' || g FROM generate_series(1, $MERCHANTS) g"
psql -X -q "$DEFAULT_DSN" -c "VACUUM ANALYZE t_merchant"

# the uncached proxy: same shards, db_default and Redis, no cached tables
U_PORT=$(free_port); U_ADMIN=$(free_port)
sed -E "s|^listen = .*|listen = \"127.0.0.1:$U_PORT\"|; s|^admin_listen = .*|admin_listen = \"127.0.0.1:$U_ADMIN\"|" $DIR/shardgate.toml > $DIR/uncached.toml
printf '\n[cache]\ntables = []\n' >> $DIR/uncached.toml
$SHARDGATE_BIN --config $DIR/uncached.toml > $DIR/uncached.log 2>&1 &
UNCACHED_PID=$!
for _ in $(seq 1 200); do curl -sf http://127.0.0.1:$U_ADMIN/livez >/dev/null && break; sleep 0.1; done

# the cache's bloom filter has loaded every key
for _ in $(seq 1 300); do
  n=$(curl -s $ADMIN_URL/metrics | awk '/^shardgate_cache_bloom_keys/ {print $2}')
  [ "${n:-0}" = "$MERCHANTS" ] && break; sleep 0.2
done
[ "${n:-0}" = "$MERCHANTS" ] || { echo "the bloom filter did not load $MERCHANTS keys (has ${n:-0})" >&2; exit 1; }

cat > $DIR/merchant.sql <<SQL
\set m random(1, $MERCHANTS)
SELECT * FROM t_merchant WHERE merchant_id = :m;
SQL
tps_of() { awk '/^tps/ {print $3}'; }
direct() { pgbench -n "$DEFAULT_DSN" -c $CLIENTS -j 2 -T $DURATION -M $1 -f $DIR/merchant.sql 2>&1 | tps_of; }
proxy() { PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $1 -U app -c $CLIENTS -j 2 -T $DURATION -M $2 -f $DIR/merchant.sql shardgate 2>&1 | tps_of; }
hits() { curl -s $ADMIN_URL/metrics | awk -v w="$1" '$0 ~ "^shardgate_cache_hits_total" && $0 ~ w {s += $2} END {print s + 0}'; }

# warm the cache: every key once per mode (the measured runs then show steady state)
for mode in simple prepared; do PGPASSWORD=app-secret pgbench -n -h 127.0.0.1 -p $PROXY_PORT -U app -c 4 -j 2 -t $((MERCHANTS / 4 + 1)) -M $mode -f $DIR/merchant.sql shardgate >/dev/null 2>&1; done
# the answers must agree, or the timing means nothing
for m in 1 $((MERCHANTS / 2)) $MERCHANTS $((MERCHANTS + 1)); do
  q="SELECT * FROM t_merchant WHERE merchant_id = $m"
  diff <(psql -X -At "$DEFAULT_DSN" -c "$q") <(PGPASSWORD=app-secret psql -X -At "host=127.0.0.1 port=$PROXY_PORT user=app dbname=shardgate" -c "$q") >/dev/null \
    || { echo "cached answer differs from PostgreSQL for merchant $m" >&2; exit 1; }
done

declare -A SUM
HIT0=$(hits 'level="(l1|l2|bloom)"'); ALL0=$(hits 'level')
for round in $(seq 1 $ROUNDS); do
  for mode in simple prepared; do
    d=$(direct $mode); u=$(proxy $U_PORT $mode); c=$(proxy $PROXY_PORT $mode)
    for k in d u c; do SUM[$k.$mode]=$(echo "${SUM[$k.$mode]:-0} + ${!k:-0}" | bc -l); done
    printf 'round %d  %-9s direct %9.1f  uncached %9.1f  cached %9.1f tps\n' $round $mode ${d:-0} ${u:-0} ${c:-0}
  done
done
HIT=$(echo "$(hits 'level="(l1|l2|bloom)"') - $HIT0" | bc -l); ALL=$(echo "$(hits 'level') - $ALL0" | bc -l)

echo
echo "== merchant point reads: $MERCHANTS keys, $CLIENTS clients, ${DURATION}s x $ROUNDS (mean TPS) =="
printf '%-9s %10s %10s %10s %16s %16s\n' mode direct uncached cached cached/uncached cached/direct
for mode in simple prepared; do
  d=$(echo "${SUM[d.$mode]} / $ROUNDS" | bc -l); u=$(echo "${SUM[u.$mode]} / $ROUNDS" | bc -l); c=$(echo "${SUM[c.$mode]} / $ROUNDS" | bc -l)
  printf '%-9s %10.1f %10.1f %10.1f %16.2f %16.2f\n' $mode $d $u $c $(echo "$c / $u" | bc -l) $(echo "$c / $d" | bc -l)
done
printf 'cache hit rate in the measured runs: %.2f%% (%d of %d lookups)\n' $(echo "100 * $HIT / $ALL" | bc -l) ${HIT%.*} ${ALL%.*}
