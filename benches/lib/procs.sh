# Process handling and set-up shared by the whole-system benchmark scripts (sourced, not run).
# Expects the caller to define log(), die(), REPO_DIR, WORK (temp dir), PIDS (servers being
# measured) and FG_PID (the long foreground command) before sourcing.

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

# apt_install PKG...: install Debian packages (as root, or through sudo).
apt_install() {
  local sudo=()
  (( EUID == 0 )) || sudo=(sudo)
  log "installing $* with apt-get"
  timeout 600 "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q \
    --no-install-recommends -o DPkg::Lock::Timeout=300 "$@" >&2
}

# Use $TRELLIS_BIN, or target/release/trellis, building it when missing.
ensure_trellis() {
  if [[ -n ${TRELLIS_BIN:-} ]]; then
    [[ -x $TRELLIS_BIN ]] || die "TRELLIS_BIN=$TRELLIS_BIN is not an executable file"
  else
    TRELLIS_BIN=$REPO_DIR/target/release/trellis
    if [[ ! -x $TRELLIS_BIN ]]; then
      log "$TRELLIS_BIN missing; running cargo build --release"
      run_fg timeout 3600 cargo build --release --bin trellis --manifest-path "$REPO_DIR/Cargo.toml" >&2 \
        || die "cargo build --release failed"
    fi
  fi
  TRELLIS_BIN=$(realpath "$TRELLIS_BIN")
}

# ratio a b: "a/b" as "1.23x", or n/a when b is zero.
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2fx", a / b }'
}
