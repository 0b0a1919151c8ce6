#!/usr/bin/env bash
# Whole-system KV write benchmark: a 3-server Trellis cluster against a
# 3-member etcd cluster, both on loopback, driven by the same wrk load.
#
#   benches/kv_vs_etcd.sh
#
# Each system is started, measured and stopped in turn (never both at once,
# so they do not share the two cores). The load goes to the cluster leader
# of each system: Trellis gets `PUT /v1/kv/<key>` with the raw value, etcd
# gets `POST /v3/kv/put` with the JSON/base64 body of its v3 gateway. Every
# request writes a distinct key (benches/kv/*.lua). etcd runs with its
# defaults (fsync on); all data directories live in one mktemp directory,
# so both systems write to the same filesystem.
#
# Environment (defaults in brackets):
#   BENCH_THREADS          wrk threads [2]
#   BENCH_CONNS            wrk connections [16]
#   BENCH_DURATION         measured run per system, wrk syntax (s/m) [20s]
#   BENCH_WARMUP           unmeasured warm-up per system, 0 to skip [3s]
#   BENCH_VALUE_SIZE       value size in bytes [128]
#   BENCH_SYSTEMS          which systems, in order ["etcd trellis"]; "catalog"
#                          adds catalog registrations (PUT /v1/catalog/register,
#                          a new node with a service and a node check each) on
#                          the same 3-server Trellis cluster, after its KV run
#   BENCH_STARTUP_TIMEOUT  seconds to wait for each cluster to elect a leader [60]
#   BENCH_TMPDIR           parent of the temporary directory [${TMPDIR:-/tmp}]
#   BENCH_ALLOW_ERRORS     1: exit 0 even if a run had errors [0]
#   BENCH_KEEP_LOGS        directory to copy the server logs into before cleanup
#   TRELLIS_BIN            [target/release/trellis, built with cargo if missing]
#   BENCH_TRELLIS_CONFIG   a config file every Trellis server also reads (e.g. raft_snapshot_threshold)
#   BENCH_PRELOAD          keys loaded into Trellis (64 per /v1/txn) before its warm-up [0]
#   BENCH_SLICES           Trellis only: instead of one measured run, this many 1 s runs, each
#                          recorded in logs/slices.txt as "SLICE k start end p99_ms requests
#                          non2xx" (epoch seconds), for benches/snapshot_tail.sh [0]
#
# Exit status: 0 when every run finished without errors, 1 when a run had
# non-2xx responses or socket errors (the table still prints), other
# non-zero values on setup failure. Everything this script started is
# killed, and the temporary directory removed, on any exit.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
KV_DIR=$SCRIPT_DIR/kv

THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-16}
DURATION=${BENCH_DURATION:-20s}
WARMUP=${BENCH_WARMUP:-3s}
VALUE_SIZE=${BENCH_VALUE_SIZE:-128}
SYSTEMS=${BENCH_SYSTEMS:-etcd trellis}
STARTUP_TIMEOUT=${BENCH_STARTUP_TIMEOUT:-60}
ALLOW_ERRORS=${BENCH_ALLOW_ERRORS:-0}
TRELLIS_CONFIG=${BENCH_TRELLIS_CONFIG:-}
PRELOAD=${BENCH_PRELOAD:-0}
SLICES=${BENCH_SLICES:-0}

log() { printf '[kv-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# "20s" / "1m" / "20" -> seconds
to_seconds() {
  local v=$1
  case $v in
    *m) echo $(( ${v%m} * 60 )) ;;
    *s) echo "${v%s}" ;;
    *) echo "$v" ;;
  esac
}

for v in THREADS CONNS VALUE_SIZE STARTUP_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $DURATION =~ ^[0-9]+[sm]?$ ]] || die "BENCH_DURATION must look like 20s or 1m (got '$DURATION')"
[[ $WARMUP =~ ^[0-9]+[sm]?$ ]] || die "BENCH_WARMUP must look like 3s or 0 (got '$WARMUP')"
(( CONNS >= THREADS )) || die "BENCH_CONNS ($CONNS) must be >= BENCH_THREADS ($THREADS)"
DURATION_S=$(to_seconds "$DURATION")
WARMUP_S=$(to_seconds "$WARMUP")
(( DURATION_S > 0 )) || die "BENCH_DURATION must be > 0"
for s in $SYSTEMS; do
  [[ $s == etcd || $s == trellis || $s == catalog ]] || die "unknown system '$s' in BENCH_SYSTEMS"
done
want() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- cleanup
WORK=""
PIDS=()   # servers of the system being measured
FG_PID="" # the long foreground command (wrk, cargo), run in the background
          # and waited for, so that INT/TERM reach the trap at once

# run_fg cmd... : run a long command so that a signal to this script can
# interrupt the wait (bash defers traps until a true foreground child ends).
# run_fg, stop_pids and the EXIT/INT/TERM cleanup trap, shared by the benchmark scripts.
# shellcheck source=benches/lib/procs.sh
source "$SCRIPT_DIR/lib/procs.sh"

# ---------------------------------------------------------------- tools
ensure_tools() {
  local pkgs=()
  command -v curl >/dev/null || pkgs+=(curl)
  command -v jq >/dev/null || pkgs+=(jq)
  command -v wrk >/dev/null || pkgs+=(wrk)
  if want etcd; then
    command -v etcd >/dev/null || pkgs+=(etcd-server)
    command -v etcdctl >/dev/null || pkgs+=(etcd-client)
  fi
  (( ${#pkgs[@]} )) || return 0
  apt_install "${pkgs[@]}"
}


# True when something already accepts connections on ip:port.
port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

check_alive() { # name pid...
  local name=$1; shift
  local pid
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null || die "$name process $pid exited during startup (logs below)"
  done
}

# ---------------------------------------------------------------- wrk
# run_wrk system url lua prefix duration -> sets WRK_RESULT to the BENCH_RESULT line
WRK_RESULT=""
run_wrk() {
  local sys=$1 url=$2 lua=$3 prefix=$4 dur=$5 out
  out=$WORK/logs/wrk-$sys-${prefix%/}.txt
  KV_BENCH_PREFIX=$prefix KV_BENCH_VALUE_SIZE=$VALUE_SIZE \
    run_fg timeout $(( $(to_seconds "$dur") + 60 )) \
    wrk -t"$THREADS" -c"$CONNS" -d"$dur" --timeout 10s --latency -s "$lua" "$url" >"$out" 2>&1 \
    || { cat "$out" >&2; die "wrk against $sys failed"; }
  cat "$out" >&2
  WRK_RESULT=$(grep '^BENCH_RESULT ' "$out" | tail -n 1 || true)
}

field() { # line name
  sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"
}

# The value benches/kv/common.lua writes, for the spot check after each run.
expected_value() {
  local pattern='0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-' v=""
  while (( ${#v} < VALUE_SIZE )); do v+=$pattern; done
  printf '%s' "${v:0:VALUE_SIZE}"
}

declare -A RPS P50 P99 NON2XX SOCKERR STORED REQS

record() { # sys result-line stored
  local sys=$1 line=$2
  [[ -n $line ]] || die "no BENCH_RESULT line from wrk for $sys"
  REQS[$sys]=$(field "$line" requests)
  RPS[$sys]=$(field "$line" rps)
  P50[$sys]=$(field "$line" p50_ms)
  P99[$sys]=$(field "$line" p99_ms)
  NON2XX[$sys]=$(field "$line" non2xx)
  SOCKERR[$sys]=$(( $(field "$line" connect_err) + $(field "$line" read_err) + $(field "$line" write_err) + $(field "$line" timeout_err) ))
  STORED[$sys]=$3
}

# ---------------------------------------------------------------- etcd
bench_etcd() {
  local ips=(127.0.0.31 127.0.0.32 127.0.0.33) cluster="" eps="" i ip
  for i in 0 1 2; do
    ip=${ips[$i]}
    port_busy "$ip" 2379 && die "$ip:2379 is already in use"
    port_busy "$ip" 2380 && die "$ip:2380 is already in use"
    cluster+="e$((i + 1))=http://$ip:2380,"
    eps+="http://$ip:2379,"
  done
  cluster=${cluster%,}; eps=${eps%,}

  log "starting etcd $(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p') x3 on ${ips[*]}"
  for i in 0 1 2; do
    ip=${ips[$i]}
    etcd --name "e$((i + 1))" --data-dir "$WORK/etcd/e$((i + 1))" \
      --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
      --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
      --initial-cluster "$cluster" --initial-cluster-state new \
      --initial-cluster-token "kv-bench-$$" \
      >"$WORK/logs/etcd-e$((i + 1)).log" 2>&1 &
    PIDS+=($!)
  done

  local deadline=$(( SECONDS + STARTUP_TIMEOUT ))
  until etcdctl --endpoints="$eps" --command-timeout=2s endpoint health >/dev/null 2>&1; do
    check_alive etcd "${PIDS[@]}"
    (( SECONDS < deadline )) || die "etcd cluster not healthy after ${STARTUP_TIMEOUT}s"
    sleep 0.2
  done

  local status leader=""
  until [[ -n $leader ]]; do
    status=$(etcdctl --endpoints="$eps" --command-timeout=2s endpoint status -w json 2>/dev/null || true)
    leader=$(jq -r '[.[] | select(.Status.leader != 0 and .Status.header.member_id == .Status.leader) | .Endpoint]
                    | if length == 1 then .[0] else empty end' <<<"${status:-[]}" 2>/dev/null || true)
    if [[ -z $leader ]]; then
      (( SECONDS < deadline )) || die "no single etcd leader after ${STARTUP_TIMEOUT}s: $status"
      sleep 0.2
    fi
  done
  log "etcd leader: $leader"

  local resp
  resp=$(curl -sS --max-time 5 -X POST "$leader/v3/kv/put" -H 'Content-Type: application/json' \
          -d '{"key":"c2FuaXR5","value":"b2s="}') || die "etcd sanity PUT failed"
  jq -e '.header.revision' <<<"$resp" >/dev/null 2>&1 || die "etcd sanity PUT answered: $resp"

  if (( WARMUP_S > 0 )); then
    log "etcd warm-up ${WARMUP}"
    run_wrk etcd "$leader" "$KV_DIR/etcd_put.lua" warm/ "$WARMUP"
  fi
  log "etcd measured run: -t$THREADS -c$CONNS -d$DURATION"
  local line stored
  run_wrk etcd "$leader" "$KV_DIR/etcd_put.lua" bench/ "$DURATION"
  line=$WRK_RESULT
  # A range response's count is the number of keys in the whole range, even with --limit.
  stored=$(etcdctl --endpoints="$leader" --command-timeout=30s get bench/ --prefix --limit 1 -w json \
           | jq -r '.count // 0') || stored="?"
  local got
  got=$(etcdctl --endpoints="$leader" --command-timeout=5s get bench/t1_2 --print-value-only) || got=""
  [[ $got == "$(expected_value)" ]] || die "etcd key bench/t1_2 holds '$got', not the value wrk sent"
  record etcd "$line" "$stored"
  stop_pids
}

# ---------------------------------------------------------------- trellis
bench_trellis() {
  local D=$WORK/trellis i n ip
  mkdir -p "$D"
  for i in 1 2 3; do
    for p in 8500 8300; do
      port_busy "127.0.0.1$i" "$p" && die "127.0.0.1$i:$p is already in use"
    done
  done

  log "creating TLS material with $TRELLIS_BIN tls"
  (
    cd "$D"
    timeout 60 "$TRELLIS_BIN" tls ca create
    for n in 0 1 2; do timeout 60 "$TRELLIS_BIN" tls cert create --server --dc dc1; done
  ) >"$WORK/logs/trellis-tls.log" 2>&1 || { cat "$WORK/logs/trellis-tls.log" >&2; die "trellis tls failed"; }
  for f in trellis-agent-ca.pem dc1-server-trellis-{0,1,2}.pem dc1-server-trellis-{0,1,2}-key.pem; do
    [[ -s $D/$f ]] || die "trellis tls did not create $f (have: $(ls "$D" | tr '\n' ' '))"
  done

  log "starting trellis x3 on 127.0.0.11-13"
  for i in 1 2 3; do
    n=$((i - 1))
    mkdir -p "$D/s$i"
    "$TRELLIS_BIN" agent --server --bootstrap-expect 3 --node "s$i" \
      --bind "127.0.0.1$i" --client "127.0.0.1$i" --data-dir "$D/s$i" \
      --retry-join 127.0.0.11 --retry-join 127.0.0.12 --retry-join 127.0.0.13 \
      --ca-file "$D/trellis-agent-ca.pem" --cert-file "$D/dc1-server-trellis-$n.pem" \
      --key-file "$D/dc1-server-trellis-$n-key.pem" \
      ${TRELLIS_CONFIG:+--config-file "$TRELLIS_CONFIG"} \
      >"$WORK/logs/trellis-s$i.log" 2>&1 &
    PIDS+=($!)
  done

  local deadline=$(( SECONDS + STARTUP_TIMEOUT )) l=""
  until [[ $l =~ ^\"[^\"]+\"$ ]]; do
    check_alive trellis "${PIDS[@]}"
    (( SECONDS < deadline )) || die "no trellis leader after ${STARTUP_TIMEOUT}s (last answer: '$l')"
    sleep 0.2
    l=$(curl -s --max-time 2 http://127.0.0.11:8500/v1/status/leader || true)
  done
  local leader_addr=${l//\"/}
  local leader_ip=${leader_addr%:*}
  [[ $leader_ip =~ ^127\.0\.0\.1[123]$ ]] || die "leader address $leader_addr is none of 127.0.0.11-13"
  # The other servers must agree before the load starts.
  for i in 2 3; do
    until [[ $(curl -s --max-time 2 "http://127.0.0.1$i:8500/v1/status/leader" || true) == "$l" ]]; do
      (( SECONDS < deadline )) || die "127.0.0.1$i does not report leader $l after ${STARTUP_TIMEOUT}s"
      sleep 0.2
    done
  done
  local leader=http://$leader_ip:8500
  log "trellis leader: $leader_addr (HTTP $leader)"

  local resp
  resp=$(curl -sS --max-time 5 -X PUT --data-binary ok "$leader/v1/kv/sanity") || die "trellis sanity PUT failed"
  [[ $resp == true ]] || die "trellis sanity PUT answered: $resp"

  local loaded=0 chunk
  while (( loaded < PRELOAD )); do
    run_wrk trellis "$leader" "$KV_DIR/trellis_txn.lua" "pre$loaded/" 10s
    chunk=$(field "$WRK_RESULT" requests)
    (( $(field "$WRK_RESULT" non2xx) == 0 && chunk > 0 )) || die "preloading failed: $WRK_RESULT"
    loaded=$(( loaded + chunk * 64 ))
    log "preloaded $loaded of $PRELOAD keys"
  done
  if (( WARMUP_S > 0 )); then
    log "trellis warm-up ${WARMUP}"
    run_wrk trellis "$leader" "$KV_DIR/trellis_put.lua" warm/ "$WARMUP"
  fi
  if (( SLICES > 0 )); then
    log "trellis measured run: $SLICES slices of 1s, -t$THREADS -c$CONNS"
    local k start
    for (( k = 0; k < SLICES; k++ )); do
      start=$(date +%s.%N)
      run_wrk trellis "$leader" "$KV_DIR/trellis_put.lua" "slice$k/" 1s 2>/dev/null
      echo "SLICE $k $start $(date +%s.%N) $(field "$WRK_RESULT" p99_ms) $(field "$WRK_RESULT" requests) $(field "$WRK_RESULT" non2xx)" >>"$WORK/logs/slices.txt"
    done
    stop_pids
    return
  fi
  log "trellis measured run: -t$THREADS -c$CONNS -d$DURATION"
  local line stored
  run_wrk trellis "$leader" "$KV_DIR/trellis_put.lua" bench/ "$DURATION"
  line=$WRK_RESULT
  stored=$(curl -sS --max-time 60 "$leader/v1/kv/bench/?keys" | jq -r 'length') || stored="?"
  local got
  got=$(curl -sS --max-time 5 "$leader/v1/kv/bench/t1_2?raw") || got=""
  [[ $got == "$(expected_value)" ]] || die "trellis key bench/t1_2 holds '$got', not the value wrk sent"
  record trellis "$line" "$stored"
  if want catalog; then
    if (( WARMUP_S > 0 )); then
      log "catalog warm-up ${WARMUP}"
      run_wrk catalog "$leader" "$KV_DIR/trellis_catalog.lua" warm/ "$WARMUP"
    fi
    log "catalog measured run: -t$THREADS -c$CONNS -d$DURATION"
    run_wrk catalog "$leader" "$KV_DIR/trellis_catalog.lua" bench/ "$DURATION"
    line=$WRK_RESULT
    stored=$(curl -sS --max-time 60 "$leader/v1/catalog/service/web" | jq -r '[.[] | select(.Node | startswith("bench-"))] | length') || stored="?"
    record catalog "$line" "$stored"
  fi
  stop_pids
}

# ---------------------------------------------------------------- main
ensure_tools
want trellis && ensure_trellis
WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/kv-bench.XXXXXX")
mkdir -p "$WORK/logs"
log "work dir $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}')), $(nproc) cores"

for s in $SYSTEMS; do
  # Catalog registrations run on the KV benchmark's Trellis cluster.
  [[ $s == catalog ]] && { want trellis || die "BENCH_SYSTEMS: catalog needs trellis"; continue; }
  "bench_$s"
done

echo
echo "KV write benchmark: wrk -t$THREADS -c$CONNS -d$DURATION, ${VALUE_SIZE}-byte values, distinct keys, load on the leader"
printf '%-12s %10s %10s %10s %10s %10s %12s %12s\n' system "req/s" "p50 ms" "p99 ms" requests non-2xx "sock errors" "keys stored"
errors=0
for s in $SYSTEMS; do
  [[ -v "RPS[$s]" ]] || continue # BENCH_SLICES: the slices are in logs/slices.txt
  printf '%-12s %10s %10s %10s %10s %10s %12s %12s\n' "$s" "${RPS[$s]}" "${P50[$s]}" "${P99[$s]}" \
    "${REQS[$s]}" "${NON2XX[$s]}" "${SOCKERR[$s]}" "${STORED[$s]}"
  if (( ${NON2XX[$s]} > 0 || ${SOCKERR[$s]} > 0 )); then
    errors=1
    echo "WARNING: the $s run had ${NON2XX[$s]} non-2xx responses and ${SOCKERR[$s]} socket errors;" \
         "its figures are not a clean measurement."
  fi
  if [[ ${STORED[$s]} =~ ^[0-9]+$ ]] && (( ${STORED[$s]} < ${REQS[$s]} - ${NON2XX[$s]} )); then
    errors=1
    echo "WARNING: $s acknowledged $(( REQS[$s] - NON2XX[$s] )) writes but lists only ${STORED[$s]} keys."
  fi
done
if want etcd && want trellis; then
  printf '%-12s %10s %10s %10s\n' "trellis/etcd" "$(ratio "${RPS[trellis]}" "${RPS[etcd]}")" \
    "$(ratio "${P50[trellis]}" "${P50[etcd]}")" "$(ratio "${P99[trellis]}" "${P99[etcd]}")"
  if want catalog; then
    printf '%-12s %10s %10s %10s\n' "catalog/etcd" "$(ratio "${RPS[catalog]}" "${RPS[etcd]}")" \
      "$(ratio "${P50[catalog]}" "${P50[etcd]}")" "$(ratio "${P99[catalog]}" "${P99[etcd]}")"
  fi
  echo "(req/s ratio > 1: Trellis is faster; latency ratios < 1: Trellis is faster)"
fi

if (( errors )) && [[ $ALLOW_ERRORS != 1 ]]; then
  echo "RESULT: a run had errors (see warnings above)"
  exit 1
fi
exit 0
