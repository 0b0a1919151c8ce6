# A one-server `trellis agent --dev` for the single-server benchmark scripts (sourced, not run).

# dev_bench_init IP: what every such script needs first. Installs wrk when missing, builds the
# release binary when TRELLIS_BIN (default target/release/trellis) is absent, makes WORK (removed
# on exit, with the agent stopped), and starts the agent on IP. Sets BIN, WORK and DEV_PID.
dev_bench_init() {
  local ip=$1
  BIN=${TRELLIS_BIN:-target/release/trellis}
  command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
  [[ -x $BIN ]] || cargo build --release
  WORK=$(mktemp -d)
  DEV_PID=
  trap '[[ -n $DEV_PID ]] && kill "$DEV_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
  start_dev_agent "$BIN" "$ip" "$WORK/data" "$WORK/agent.log" || exit 2
}

# start_dev_agent BIN IP DATA_DIR LOG: start it on IP's default ports and wait (60 s at most)
# until it leads. Sets DEV_PID; the caller stops it.
start_dev_agent() {
  local bin=$1 ip=$2 dir=$3 log=$4 deadline
  "$bin" agent --dev --bind "$ip" --client "$ip" --data-dir "$dir" >"$log" 2>&1 &
  DEV_PID=$!
  deadline=$(( SECONDS + 60 ))
  until [[ $(curl -s --max-time 2 "http://$ip:8500/v1/status/leader" || true) =~ ^\"[^\"]+\"$ ]]; do
    if (( SECONDS >= deadline )) || ! kill -0 "$DEV_PID" 2>/dev/null; then
      cat "$log" >&2
      echo "trellis agent --dev on $ip did not elect itself within 60 s" >&2
      return 2
    fi
    sleep 0.2
  done
}
