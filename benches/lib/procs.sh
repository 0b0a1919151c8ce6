# Process handling shared by the whole-system benchmark scripts (sourced, not run).
# Expects the caller to define log(), WORK (temp dir), PIDS (servers being measured) and
# FG_PID (the long foreground command) before sourcing.

run_fg() {
  local rc=0
  "$@" &
  FG_PID=$!
  wait "$FG_PID" || rc=$?
  FG_PID=""
  return "$rc"
}

stop_pids() {
  (( ${#PIDS[@]} )) || return 0
  local pid deadline
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  deadline=$(( SECONDS + 10 ))
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop on TERM; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n $FG_PID ]]; then
    kill -TERM "$FG_PID" 2>/dev/null
    wait "$FG_PID" 2>/dev/null
  fi
  stop_pids
  if [[ -n $WORK && -d $WORK ]]; then
    if (( rc != 0 && rc != 1 )) && compgen -G "$WORK/logs/*.log" >/dev/null; then
      for f in "$WORK"/logs/*.log; do
        echo "----- last lines of $(basename "$f") -----" >&2
        tail -n 15 "$f" >&2
      done
    fi
    if [[ -n ${BENCH_KEEP_LOGS:-} ]]; then
      mkdir -p "$BENCH_KEEP_LOGS" && cp -r "$WORK/logs/." "$BENCH_KEEP_LOGS/" 2>/dev/null
    fi
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
