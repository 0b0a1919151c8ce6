#!/usr/bin/env bash
# The sidecar data plane against a direct connection and an HAProxy mTLS pair in the same run
# (see benches/mesh_proxy.rs). Installs HAProxy and wrk when missing, builds, runs.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in haproxy wrk; do
  if ! command -v "$tool" >/dev/null; then
    (( EUID == 0 )) && { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool"; }
  fi
done
cargo build --release
cargo bench --bench mesh_proxy -- "$@"
