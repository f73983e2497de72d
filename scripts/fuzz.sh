#!/usr/bin/env bash
# Fuzzes the client frame decoder for N seconds (default 600): make fuzz SECONDS_TO_RUN=600
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/frames
cargo fuzz run frames --fuzz-dir fuzz -- -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048
