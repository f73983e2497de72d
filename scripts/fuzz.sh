#!/usr/bin/env bash
# Fuzzes a target for N seconds (default 600):
#   make fuzz SECONDS_TO_RUN=600 [FUZZ_TARGET=frames|plan|sqlbuild]
#   scripts/fuzz.sh 600 plan
# frames: the client frame decoder; plan: router::plan with any bytes as SQL and bind values;
# sqlbuild: the SQL shardgate builds (quoting helper, rewritten statements) stays one statement.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
target=${2:-frames}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p "fuzz/corpus/$target"
if [ "$target" = plan ] && [ -z "$(ls -A fuzz/corpus/plan)" ]; then
  # Seed with the router's golden statements.
  i=0
  grep -h '^SQL ' router/tests/golden/*.txt | sed 's/^SQL //' | while IFS= read -r line; do
    printf '%s\n1\0002026-11-01\000' "$line" > "fuzz/corpus/plan/golden-$i"; i=$((i+1))
  done
fi
cargo fuzz run "$target" --fuzz-dir fuzz -- -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048
