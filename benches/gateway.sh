#!/usr/bin/env bash
# The mesh gateway hop against HAProxy SNI routing, and QUIC against TCP passthrough over a
# 50 ms WAN, in the same run (see benches/gateway.rs). Installs HAProxy when missing, builds, runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null; then
  (( EUID == 0 )) && { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; }
fi
cargo build --release
cargo bench --bench gateway -- "$@"
