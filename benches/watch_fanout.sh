#!/usr/bin/env bash
# Blocking-query fan-out and shared reads against references in the same run (see
# benches/watch_fanout.rs). Installs wrk when missing, builds the release binary, runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
  (( EUID == 0 )) && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
# 10,000 parked connections on each side need more than the default 1,024 descriptors.
ulimit -n "$(ulimit -Hn)"
cargo build --release
cargo bench --bench watch_fanout -- "$@"
