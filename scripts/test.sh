#!/usr/bin/env bash
# The whole test suite, from a clean checkout on a fresh Debian machine: installs what the
# tests need when it is missing (Chromium for the browser tests, the Python client, the npm
# packages, the Helm SDK and systemd-nspawn for the deploy tests), then runs formatting and
# lint checks, the Rust unit and integration tests, the py-consul tests, the deploy tests
# (run as root: they make network namespaces, chroots and a systemd container) and the
# headless-browser UI tests.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

command -v chromium >/dev/null || apt_install chromium
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
command -v openssl >/dev/null || apt_install openssl
command -v nft >/dev/null || apt_install nftables

echo "==> Python test dependencies"
if [ ! -x target/pyenv/bin/python ]; then python3 -m venv target/pyenv; fi
target/pyenv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt

echo "==> Browser test dependencies"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

echo "==> Formatting, lints and dependency policy"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
if cargo tree -i aws-lc-sys >/dev/null 2>&1; then
  echo "aws-lc-sys is in the dependency tree: keep rustls on ring only" >&2
  exit 1
fi

echo "==> Rust unit, storage-conformance and integration tests"
cargo build
cargo test

echo "==> py-consul against a real agent"
TRELLIS_BIN="$PWD/target/debug/trellis" target/pyenv/bin/python -m pytest -q tests/python

echo "==> Deploy tests: systemd units and the .deb (also under a real systemd), the Helm chart's pods in network namespaces, the Dockerfile without an engine"
command -v systemd-nspawn >/dev/null || apt_install systemd-container
command -v dpkg-shlibdeps >/dev/null || apt_install dpkg-dev
command -v curl >/dev/null || apt_install curl
command -v ip >/dev/null || apt_install iproute2
target/pyenv/bin/pip install -q --disable-pip-version-check -r tests/deploy/requirements.txt
TRELLIS_BIN="$PWD/target/debug/trellis" target/pyenv/bin/python -m pytest -q tests/deploy

echo "==> Browser tests (headless Chromium)"
TRELLIS_BIN="$PWD/target/debug/trellis" node --test tests/browser/
