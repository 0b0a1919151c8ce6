#!/usr/bin/env bash
# DNS read benchmark: a Trellis dev agent's DNS interface against Knot DNS serving the same
# records from a static zone, both on loopback, driven by the same dnsperf load.
#
#   benches/dns_vs_knot.sh
#
# For each instance count (3 and 100 by default) the service `web` gets that many instances,
# each on its own node with its own address and a passing check: registered in Trellis with
# `PUT /v1/catalog/register`, and written into a zone file for Knot (A and SRV records of
# web.service.consul., an A record per SRV target <node>.node.dc1.consul., SOA and NS) that
# mirrors what Trellis answers. dnsperf then asks `web.service.consul A` and, separately,
# `web.service.consul SRV` of each system with the same settings. The systems run one after
# the other, never both at once, so they do not share the two cores; dnsperf is pinned to
# CPU 0 and the server to the others when taskset and 2+ cores are there (BENCH_PIN=0 to turn
# it off).
#
# Queries carry EDNS0 by default (dnsperf -e): without it Trellis, like Consul, answers at
# most udp_answer_limit (3) records to a classic client while Knot fills 512 bytes, which
# would compare different work.
#
# Environment (defaults in brackets):
#   BENCH_DURATION         measured seconds per run [10]
#   BENCH_WARMUP           unmeasured seconds before each run, 0 to skip [2]
#   BENCH_CLIENTS          dnsperf -c, simulated clients [8]
#   BENCH_OUTSTANDING      dnsperf -q, queries in flight [100]
#   BENCH_MODE             dnsperf -m: udp or tcp [udp]
#   BENCH_EDNS             1: dnsperf -e [1]
#   BENCH_COUNTS           instance counts, in order ["3 100"]
#   BENCH_QTYPES           query types ["A SRV"]
#   BENCH_SYSTEMS          which systems, in order ["knot trellis"]
#   BENCH_PIN              1: pin dnsperf and the server to different CPUs [1]
#   BENCH_STARTUP_TIMEOUT  seconds to wait for each server [60]
#   BENCH_TMPDIR           parent of the temporary directory [${TMPDIR:-/tmp}]
#   BENCH_KEEP_LOGS        directory to copy the logs into before cleanup
#   BENCH_ALLOW_ERRORS     1: exit 0 even when a run lost queries or got error codes [0]
#   TRELLIS_BIN            [target/release/trellis, built with cargo if missing]
#
# Exit status: 0 when every run answered every query with NOERROR, 1 when a run lost queries
# or got other response codes (the table still prints), other non-zero values on setup
# failure. Everything this script started is stopped, and the temporary directory removed,
# on any exit.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
CLIENTS=${BENCH_CLIENTS:-8}
OUTSTANDING=${BENCH_OUTSTANDING:-100}
MODE=${BENCH_MODE:-udp}
EDNS=${BENCH_EDNS:-1}
COUNTS=${BENCH_COUNTS:-3 100}
QTYPES=${BENCH_QTYPES:-A SRV}
SYSTEMS=${BENCH_SYSTEMS:-knot trellis}
PIN=${BENCH_PIN:-1}
STARTUP_TIMEOUT=${BENCH_STARTUP_TIMEOUT:-60}
ALLOW_ERRORS=${BENCH_ALLOW_ERRORS:-0}
# Instances get 10.77.x.y, so at most this many fit the address plan below.
MAX_COUNT=60000

log() { printf '[dns-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

for v in DURATION CLIENTS OUTSTANDING STARTUP_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "BENCH_WARMUP must be a whole number of seconds (got '$WARMUP')"
[[ $MODE == udp || $MODE == tcp ]] || die "BENCH_MODE must be udp or tcp (got '$MODE')"
for c in $COUNTS; do
  [[ $c =~ ^[0-9]+$ && $c -gt 0 && $c -le $MAX_COUNT ]] || die "BENCH_COUNTS entries must be 1..$MAX_COUNT (got '$c')"
done
prev=0
for c in $COUNTS; do
  (( c >= prev )) || die "BENCH_COUNTS must not decrease (instances are only ever added): '$COUNTS'"
  prev=$c
done
for q in $QTYPES; do
  [[ $q == A || $q == SRV ]] || die "BENCH_QTYPES entries must be A or SRV (got '$q')"
done
for s in $SYSTEMS; do
  [[ $s == knot || $s == trellis ]] || die "unknown system '$s' in BENCH_SYSTEMS"
done
want() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- cleanup
WORK=""
PIDS=()   # the server being measured
FG_PID="" # the long foreground command (dnsperf, cargo), waited for so signals reach the trap

# run_fg, stop_pids and the EXIT/INT/TERM cleanup trap, shared by the benchmark scripts.
# shellcheck source=benches/lib/procs.sh
source "$SCRIPT_DIR/lib/procs.sh"

# ---------------------------------------------------------------- tools
ensure_tools() {
  local pkgs=()
  command -v dnsperf >/dev/null || pkgs+=(dnsperf)
  if want knot; then
    command -v knotd >/dev/null || pkgs+=(knot)
  fi
  if want trellis; then
    command -v curl >/dev/null || pkgs+=(curl)
  fi
  (( ${#pkgs[@]} )) || return 0
  apt_install "${pkgs[@]}"
  command -v knotd >/dev/null || PATH=$PATH:/usr/sbin
}


# free_port VAR: set VAR to a port that no TCP or UDP socket uses and that this script has not
# handed out yet (a race with other programs shows up as the server failing to start).
USED_PORTS=()
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$(( 20000 + RANDOM % 30000 ))
    [[ " ${USED_PORTS[*]} " == *" $p "* ]] && continue
    grep -qi ":$(printf '%04X' "$p") " /proc/net/udp /proc/net/tcp /proc/net/udp6 /proc/net/tcp6 2>/dev/null && continue
    USED_PORTS+=("$p")
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "no free port found"
}

check_alive() { # name pid...
  local name=$1; shift
  local pid
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null || die "$name process $pid exited during startup (logs below)"
  done
}

# Pinning: the server on CPUs 1.., dnsperf on CPU 0.
SERVER_PIN=()
CLIENT_PIN=()
if [[ $PIN == 1 ]] && command -v taskset >/dev/null && (( $(nproc) >= 2 )); then
  SERVER_PIN=(taskset -c "1-$(( $(nproc) - 1 ))")
  CLIENT_PIN=(taskset -c 0)
fi

# ---------------------------------------------------------------- dnsperf
DNSPERF_FLAGS=(-m "$MODE" -c "$CLIENTS" -q "$OUTSTANDING" -T 1 -t 5)
EDNS_FLAG=()
if [[ $EDNS == 1 ]]; then
  EDNS_FLAG=(-e)
  DNSPERF_FLAGS+=(-e)
fi

# probe port qtype -> 0 when the server answers NOERROR with at least one record
probe() {
  local port=$1 qtype=$2 out
  out=$(printf 'web.service.consul %s\n' "$qtype" \
    | timeout 10 dnsperf -s 127.0.0.1 -p "$port" -m "$MODE" -n 1 -t 2 "${EDNS_FLAG[@]}" 2>&1) || return 1
  grep -q 'Queries completed: *1 ' <<<"$out" && grep -q 'NOERROR 1 ' <<<"$out"
}

wait_dns() { # name port pid
  local deadline=$(( SECONDS + STARTUP_TIMEOUT ))
  until probe "$2" A; do
    check_alive "$1" "$3"
    (( SECONDS < deadline )) || die "$1 DNS on port $2 does not answer web.service.consul A after ${STARTUP_TIMEOUT}s"
    sleep 0.3
  done
}

declare -A QPS AVG SD MAXL DONE LOST CODES

# run_dnsperf system port count qtype
run_dnsperf() {
  local sys=$1 port=$2 count=$3 qtype=$4 key="$1/$3/$4" data out
  data=$WORK/queries-$qtype.txt
  printf 'web.service.consul %s\n' "$qtype" >"$data"
  if (( WARMUP > 0 )); then
    run_fg timeout $(( WARMUP + 30 )) "${CLIENT_PIN[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$data" \
      -l "$WARMUP" "${DNSPERF_FLAGS[@]}" >/dev/null 2>&1 || true
  fi
  out=$WORK/logs/dnsperf-$sys-$count-$qtype.txt
  log "$sys, $count instances, $qtype: dnsperf ${DNSPERF_FLAGS[*]} -l $DURATION"
  run_fg timeout $(( DURATION + 60 )) "${CLIENT_PIN[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$data" \
    -l "$DURATION" "${DNSPERF_FLAGS[@]}" >"$out" 2>&1 || { cat "$out" >&2; die "dnsperf against $sys failed"; }
  QPS[$key]=$(sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p' "$out")
  local lat
  lat=$(sed -n 's/^ *Average Latency (s): *\([0-9.]*\) (min \([0-9.]*\), max \([0-9.]*\)).*/\1 \3/p' "$out")
  AVG[$key]=$(awk '{ printf "%.3f", $1 * 1000 }' <<<"$lat")
  MAXL[$key]=$(awk '{ printf "%.1f", $2 * 1000 }' <<<"$lat")
  SD[$key]=$(sed -n 's/^ *Latency StdDev (s): *\([0-9.]*\).*/\1/p' "$out" | awk '{ printf "%.3f", $1 * 1000 }')
  DONE[$key]=$(sed -n 's/^ *Queries completed: *\([0-9]*\).*/\1/p' "$out")
  LOST[$key]=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' "$out")
  CODES[$key]=$(sed -n 's/^ *Response codes: *//p' "$out")
  [[ -n ${QPS[$key]} && -n ${DONE[$key]} ]] || { cat "$out" >&2; die "could not read dnsperf's report for $key"; }
}

# ---------------------------------------------------------------- records
# instance i: node web-i, address 10.77.(i / 250).(i % 250 + 1), port 8080
inst_ip() { echo "10.77.$(( $1 / 250 )).$(( $1 % 250 + 1 ))"; }

write_zone() { # file count
  local f=$1 count=$2 i
  {
    echo '$ORIGIN consul.'
    echo '$TTL 0'
    echo '@ SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0'
    echo '@ NS bench.node.dc1.consul.'
    echo 'bench.node.dc1 A 127.0.0.1'
    for (( i = 0; i < count; i++ )); do
      echo "web.service A $(inst_ip "$i")"
      echo "web.service SRV 1 1 8080 web-$i.node.dc1.consul."
      echo "web-$i.node.dc1 A $(inst_ip "$i")"
    done
  } >"$f"
}

# ---------------------------------------------------------------- knot
bench_knot() {
  local D=$WORK/knot port count qtype
  mkdir -p "$D/db"
  free_port port
  cat >"$D/knot.conf" <<EOF
server:
    rundir: "$D"
    listen: 127.0.0.1@$port
log:
  - target: stderr
    any: warning
database:
    storage: "$D/db"
control:
    listen: "$D/knot.sock"
template:
  - id: default
    storage: "$D"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: consul.
    file: "consul.zone"
EOF
  for count in $COUNTS; do
    write_zone "$D/consul.zone" "$count"
    log "starting knotd $(knotd --version | awk '{print $NF}') on 127.0.0.1:$port with $count instances"
    "${SERVER_PIN[@]}" knotd -c "$D/knot.conf" >"$WORK/logs/knot-$count.log" 2>&1 &
    PIDS+=($!)
    wait_dns knot "$port" "${PIDS[0]}"
    for qtype in $QTYPES; do
      probe "$port" "$qtype" || die "knot does not answer web.service.consul $qtype"
      run_dnsperf knot "$port" "$count" "$qtype"
    done
    stop_pids
  done
}

# ---------------------------------------------------------------- trellis
register() { # http from to
  local http=$1 from=$2 to=$3 i body resp
  for (( i = from; i < to; i++ )); do
    body=$(printf '{"Datacenter":"dc1","Node":"web-%d","Address":"%s","Service":{"ID":"web","Service":"web","Port":8080},"Check":{"CheckID":"web-alive","Name":"web alive","Status":"passing","ServiceID":"web"}}' "$i" "$(inst_ip "$i")")
    resp=$(curl -sS --max-time 10 -X PUT -H 'Content-Type: application/json' --data "$body" "$http/v1/catalog/register") \
      || die "registering web-$i failed"
    [[ $resp == true ]] || die "registering web-$i answered: $resp"
  done
}

bench_trellis() {
  local D=$WORK/trellis http_port dns_port server_port http count qtype have=0 l=""
  mkdir -p "$D/data"
  free_port http_port; free_port dns_port; free_port server_port
  http=http://127.0.0.1:$http_port
  log "starting trellis dev agent (HTTP $http_port, DNS $dns_port)"
  # hickory logs every query at info: keep the agent's log to warnings so it measures DNS.
  TRELLIS_LOG=${TRELLIS_LOG:-warn} "${SERVER_PIN[@]}" "$TRELLIS_BIN" agent --dev --node bench \
    --bind 127.0.0.1 --client 127.0.0.1 --http-port "$http_port" --dns-port "$dns_port" \
    --serf-lan-port 0 --server-port "$server_port" --data-dir "$D/data" \
    >"$WORK/logs/trellis.log" 2>&1 &
  PIDS+=($!)
  local deadline=$(( SECONDS + STARTUP_TIMEOUT ))
  until [[ $l =~ ^\"[^\"]+\"$ ]]; do
    check_alive trellis "${PIDS[0]}"
    (( SECONDS < deadline )) || die "no trellis leader after ${STARTUP_TIMEOUT}s (last answer: '$l')"
    sleep 0.2
    l=$(curl -s --max-time 2 "$http/v1/status/leader" || true)
  done
  for count in $COUNTS; do
    log "registering web instances $have..$(( count - 1 )) in trellis"
    register "$http" "$have" "$count"
    have=$count
    local n
    n=$(curl -sS --max-time 10 "$http/v1/health/service/web?passing" | jq 'length') || n="?"
    [[ $n == "$count" ]] || die "trellis lists $n passing web instances, expected $count"
    wait_dns trellis "$dns_port" "${PIDS[0]}"
    for qtype in $QTYPES; do
      probe "$dns_port" "$qtype" || die "trellis does not answer web.service.consul $qtype"
      run_dnsperf trellis "$dns_port" "$count" "$qtype"
    done
  done
  stop_pids
}

# ---------------------------------------------------------------- main
ensure_tools
want trellis && ensure_trellis
want trellis && ! command -v jq >/dev/null && die "jq is needed to check the registrations"
WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/dns-bench.XXXXXX")
mkdir -p "$WORK/logs"
log "work dir $WORK, $(nproc) cores, pinning: ${CLIENT_PIN[*]:-none} (dnsperf) / ${SERVER_PIN[*]:-none} (server)"

for s in $SYSTEMS; do
  "bench_$s"
done

echo
echo "DNS benchmark: dnsperf ${DNSPERF_FLAGS[*]} -l $DURATION, question web.service.consul, one system at a time"
printf '%-9s %5s %-5s %12s %10s %10s %10s %11s %7s  %s\n' system inst qtype "queries/s" "avg ms" "sd ms" "max ms" completed lost "response codes"
errors=0
for count in $COUNTS; do
  for qtype in $QTYPES; do
    for s in $SYSTEMS; do
      k="$s/$count/$qtype"
      printf '%-9s %5s %-5s %12s %10s %10s %10s %11s %7s  %s\n' "$s" "$count" "$qtype" "${QPS[$k]}" "${AVG[$k]}" \
        "${SD[$k]}" "${MAXL[$k]}" "${DONE[$k]}" "${LOST[$k]}" "${CODES[$k]}"
      if (( ${LOST[$k]:-0} > 0 )) || [[ ${CODES[$k]} != "NOERROR ${DONE[$k]} (100.00%)" ]]; then
        errors=1
        echo "WARNING: $k lost ${LOST[$k]} queries or got error codes (${CODES[$k]}); its figures are not a clean measurement."
      fi
    done
    if want knot && want trellis; then
      printf '%-9s %5s %-5s %12s %10s\n' "trel/knot" "$count" "$qtype" "$(ratio "${QPS[trellis/$count/$qtype]}" "${QPS[knot/$count/$qtype]}")" \
        "$(ratio "${AVG[trellis/$count/$qtype]}" "${AVG[knot/$count/$qtype]}")"
    fi
  done
done
if want knot && want trellis; then
  echo "(queries/s ratio > 1: Trellis is faster; latency ratio < 1: Trellis is faster)"
fi

if (( errors )) && [[ $ALLOW_ERRORS != 1 ]]; then
  echo "RESULT: a run had errors (see warnings above)"
  exit 1
fi
exit 0
