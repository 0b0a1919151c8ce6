#!/usr/bin/env bash
# Write latency while the cluster snapshots, against the same cluster not snapshotting.
#
#   benches/snapshot_tail.sh
#
# Runs benches/kv_vs_etcd.sh twice on 3 Trellis servers, each time after
# preloading BENCH_PRELOAD keys (default 1,000,000): once with
# raft_snapshot_threshold = 10,000,000 and raft_snapshot_log_bytes = 64 GiB
# (no snapshot can start: the reference), once with the defaults (8192
# entries: several snapshots of the whole store during the run). Prints both
# and the ratio of their p99s; the aim is a ratio of at most 2.
#
# Environment: BENCH_PRELOAD [1000000], BENCH_DURATION [20s], BENCH_CONNS [16],
# BENCH_VALUE_SIZE [64], plus what benches/kv_vs_etcd.sh reads.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export BENCH_PRELOAD=${BENCH_PRELOAD:-1000000} BENCH_DURATION=${BENCH_DURATION:-20s}
export BENCH_CONNS=${BENCH_CONNS:-16} BENCH_VALUE_SIZE=${BENCH_VALUE_SIZE:-64} BENCH_SYSTEMS=trellis
CFG=$(mktemp --suffix=.hcl)
trap 'rm -f "$CFG"' EXIT
printf 'raft_snapshot_threshold = 10000000\nraft_snapshot_log_bytes = 68719476736\n' >"$CFG"
declare -A P99 RPS
for mode in quiet snapshotting; do
  if [[ $mode == quiet ]]; then export BENCH_TRELLIS_CONFIG=$CFG; else unset BENCH_TRELLIS_CONFIG; fi
  out=$(benches/kv_vs_etcd.sh 2>/dev/null)
  row=$(awk '$1 == "trellis" {print $2, $4}' <<<"$out")
  RPS[$mode]=${row% *}
  P99[$mode]=${row#* }
  echo "$mode: ${RPS[$mode]} req/s, p99 ${P99[$mode]} ms (after preloading $BENCH_PRELOAD keys)"
done
echo "p99 while snapshotting / p99 without snapshots: $(awk -v a="${P99[snapshotting]}" -v b="${P99[quiet]}" 'BEGIN {printf "%.2fx", a / b}')"
