#!/usr/bin/env bash
# Catalog registrations into one dev server, and the server memory each instance costs.
#
#   benches/catalog_scale.sh
#
# Starts `trellis agent --dev` on 127.0.0.21, measures its RSS, then drives
# PUT /v1/catalog/register (a new node with one service and one node check
# each; benches/kv/trellis_catalog.lua) with wrk for BENCH_DURATION at
# BENCH_CONNS connections, and reports registrations per second, latency, and
# (RSS after - RSS before) / instances registered. The reference for the rate
# is etcd's KV put rate at the same concurrency, measured by
# benches/kv_vs_etcd.sh (BENCH_SYSTEMS="etcd trellis catalog") in one run.
#
# Environment: BENCH_CONNS [64], BENCH_DURATION [20s], BENCH_THREADS [2],
# TRELLIS_BIN [target/release/trellis].
set -Eeuo pipefail
cd "$(dirname "$0")/.."
CONNS=${BENCH_CONNS:-64}
DURATION=${BENCH_DURATION:-20s}
THREADS=${BENCH_THREADS:-2}
IP=127.0.0.21
# shellcheck source=benches/lib/dev_agent.sh
source benches/lib/dev_agent.sh
dev_bench_init "$IP"
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$DEV_PID/status"; }
before=$(rss_kb)
out=$(KV_BENCH_PREFIX=bench/ wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 10s --latency \
        -s benches/kv/trellis_catalog.lua "http://$IP:8500")
line=$(grep '^BENCH_RESULT' <<<"$out")
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
after=$(rss_kb)
nodes=$(curl -s --max-time 120 "http://$IP:8500/v1/catalog/nodes" | jq 'length')
instances=$(( nodes - 1 ))
echo "catalog registrations into one dev server: wrk -t$THREADS -c$CONNS -d$DURATION"
echo "registrations/s $(field rps)  p50 $(field p50_ms) ms  p99 $(field p99_ms) ms  non-2xx $(field non2xx)"
echo "instances $instances  RSS before $((before / 1024)) MiB  after $((after / 1024)) MiB  per instance $(( (after - before) * 1024 / (instances > 0 ? instances : 1) )) bytes"
