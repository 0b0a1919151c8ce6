#!/usr/bin/env bash
# Disk use after many overwrites of the same keys: the data directory should hold the live
# data, a snapshot or two and a bounded log tail, not the history.
#
#   benches/disk_overwrite.sh
#
# Starts `trellis agent --dev` on 127.0.0.22 with a data directory of its own, overwrites
# BENCH_KEYS keys (default 1,000) with BENCH_VALUE_SIZE-byte values (256) until BENCH_WRITES
# writes (1,000,000) have been acknowledged, then lists what the data directory holds. The
# reference is the data itself: the bytes of history written against the bytes kept.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
KEYS=${BENCH_KEYS:-1000}
WRITES=${BENCH_WRITES:-1000000}
export KV_BENCH_VALUE_SIZE=${BENCH_VALUE_SIZE:-256} KV_BENCH_KEYS=$KEYS KV_BENCH_PREFIX=over/
IP=127.0.0.22
# shellcheck source=benches/lib/dev_agent.sh
source benches/lib/dev_agent.sh
dev_bench_init "$IP"
done_writes=0
start=$SECONDS
while (( done_writes < WRITES )); do
  out=$(wrk -t2 -c64 -d10s --timeout 10s -s benches/kv/trellis_overwrite.lua "http://$IP:8500")
  line=$(grep '^BENCH_RESULT' <<<"$out")
  n=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
  bad=$(sed -n 's/.* non2xx=\([0-9]*\).*/\1/p' <<<"$line")
  (( bad == 0 )) || { echo "non-2xx answers: $line" >&2; exit 1; }
  done_writes=$(( done_writes + n ))
  echo "overwrites so far: $done_writes ($(du -sb "$WORK/data" | cut -f1) bytes on disk)" >&2
done
keys=$(curl -s "http://$IP:8500/v1/kv/over/?keys" | jq length)
history=$(( done_writes * KV_BENCH_VALUE_SIZE ))
live=$(( keys * KV_BENCH_VALUE_SIZE ))
echo "$done_writes overwrites of $keys keys in $(( SECONDS - start )) s: $((history >> 20)) MiB of values written, $((live >> 10)) KiB live"
echo "data directory: $(du -sb "$WORK/data" | cut -f1) bytes"
find "$WORK/data" -type f -printf '  %10s  %P\n' | sort -k2
