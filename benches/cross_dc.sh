#!/usr/bin/env bash
# Federation benchmark: how long `trellis dev --datacenters 2` takes to be ready, and what a
# cross-datacenter request costs against the same request answered in its own datacenter.
#
#   benches/cross_dc.sh
#
# Starts `trellis dev --datacenters 2 --servers $BENCH_SERVERS --clients 0` on 127.0.$PREFIX.x,
# reads the ready time from its banner, then runs wrk against dc1's server with
#   local:  GET /v1/catalog/nodes            (dc1 answers from its own state)
#   remote: GET /v1/catalog/nodes?dc=dc2     (dc1 relays to a dc2 server over internal RPC)
# one after the other, same load, and prints requests/s and p50/p99 latency of both and their
# ratio (remote / local). Both datacenters share this machine, so the ratio is the cost of the
# extra hop (RPC framing, TLS, the remote's HTTP handling), not of a WAN link.
#
# Environment (defaults in brackets):
#   BENCH_SERVERS      servers per datacenter [3]
#   BENCH_DURATION     wrk duration per run [10s]
#   BENCH_CONNS        wrk connections [4]
#   BENCH_PREFIX       third octet of the agents' addresses [230]
#   TRELLIS_BIN        [target/release/trellis, built with cargo if missing]
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SERVERS=${BENCH_SERVERS:-3}
DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNS:-4}
PREFIX=127.0.${BENCH_PREFIX:-230}

log() { echo "[cross-dc-bench $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/trellis-cross-dc.XXXXXX")
mkdir -p "$WORK/logs"
PIDS=()
FG_PID=""
# shellcheck source=benches/lib/procs.sh
source "$SCRIPT_DIR/lib/procs.sh"

command -v wrk >/dev/null || apt_install wrk
command -v curl >/dev/null || apt_install curl
ensure_trellis

log "starting trellis dev --datacenters 2 --servers $SERVERS on $PREFIX.x"
"$TRELLIS_BIN" dev --datacenters 2 --servers "$SERVERS" --clients 0 --address-prefix "$PREFIX" \
  --data-dir "$WORK/data" >"$WORK/logs/dev.log" 2>&1 &
PIDS+=($!)
deadline=$(( SECONDS + 120 ))
until grep -q "Press Ctrl-C" "$WORK/logs/dev.log"; do
  kill -0 "${PIDS[0]}" 2>/dev/null || die "trellis dev exited: $(tail -5 "$WORK/logs/dev.log")"
  (( SECONDS < deadline )) || die "trellis dev not ready within 120s"
  sleep 0.2
done
READY=$(grep -o "ready in [0-9.]*s" "$WORK/logs/dev.log" | head -1)

DC1=http://$PREFIX.21:8500
curl -sf "$DC1/v1/catalog/nodes?dc=dc2" >/dev/null || die "dc1 cannot reach dc2"

# to_ms "1.23ms" -> 1.23
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

declare -A RPS P50 P99
for kind in local remote; do
  url=$DC1/v1/catalog/nodes
  [[ $kind == remote ]] && url="$url?dc=dc2"
  out=$WORK/logs/wrk-$kind.txt
  log "wrk -t1 -c$CONNS -d$DURATION $url"
  run_fg wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$url" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
  grep -q "Non-2xx" "$out" && die "errors in the $kind run: $(grep Non-2xx "$out")"
  RPS[$kind]=$(awk '/Requests\/sec/ {print $2}' "$out")
  P50[$kind]=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  P99[$kind]=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
done

echo
echo "trellis dev --datacenters 2 --servers $SERVERS: $READY"
printf '%-8s %12s %10s %10s\n' request req/s "p50 ms" "p99 ms"
for kind in local remote; do
  printf '%-8s %12s %10s %10s\n' "$kind" "${RPS[$kind]}" "${P50[$kind]}" "${P99[$kind]}"
done
printf '%-8s %12s %10s %10s\n' rem/loc "$(ratio "${RPS[remote]}" "${RPS[local]}")" \
  "$(ratio "${P50[remote]}" "${P50[local]}")" "$(ratio "${P99[remote]}" "${P99[local]}")"
