#!/usr/bin/env bash
# Before/after in one run: the pass-through (bench.sh) and routed (bench_routed.sh)
# benchmarks for an older build of the proxy and for this tree's, one after the
# other on the same machine, each with its own baselines (direct, pgbouncer,
# floor) measured in the same run. Usage:
#   scripts/bench_compare.sh <git-rev>      # builds <git-rev> in target/bench-before
#   BEFORE_BIN=/path/to/shardgate scripts/bench_compare.sh
# ROUNDS and DURATION are passed to both benchmarks (default 2 and 8).
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS=${ROUNDS:-2} DURATION=${DURATION:-8}
if [ -z "${BEFORE_BIN:-}" ]; then
  rev=${1:?usage: scripts/bench_compare.sh <git-rev> (or BEFORE_BIN=...)}
  dir=target/bench-before
  rm -rf $dir/src && mkdir -p $dir/src
  git archive "$rev" | tar -x -C $dir/src
  CARGO_TARGET_DIR=$PWD/$dir/target cargo build -q --release -p shardgate --bin shardgate --manifest-path $dir/src/Cargo.toml
  BEFORE_BIN=$PWD/$dir/target/release/shardgate
fi
cargo build -q --release --workspace --bins
cargo build -q --release -p shardgate --example relay_floor
for which in before after; do
  bin=$BEFORE_BIN; [ $which = after ] && bin=$PWD/target/release/shardgate
  echo "######## $which: $bin"
  SHARDGATE_BIN=$bin bash scripts/bench.sh 2>&1 | sed -n '/^== pgbench/,$p'
  SHARDGATE_BIN=$bin bash scripts/bench_routed.sh 2>&1 | sed -n '/^==/,$p'
done
