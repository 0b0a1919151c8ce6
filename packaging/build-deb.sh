#!/usr/bin/env bash
# Build the trellis .deb with dpkg-deb: the binary to /usr/bin/trellis, the systemd units to
# /lib/systemd/system, the commented example configuration to /etc/trellis.d (as *.example, so
# nothing starts configured), and maintainer scripts that create the trellis user and
# /var/lib/trellis and start nothing.
#
#   packaging/build-deb.sh [--binary PATH] [--version V] [--out DIR] [--no-strip] [--fast]
#
# --binary   the trellis binary to package (default: target/release/trellis)
# --version  the package version (default: the version in Cargo.toml)
# --out      where to write trellis_<version>_<arch>.deb (default: target/deb)
# --no-strip keep debug symbols
# --fast     gzip -1 instead of xz (tests)
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/trellis
version=""
out=target/deb
strip=1
compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-strip) strip=0; shift ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture; do
  command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg-dev)" >&2; exit 1; }
done
[ -x "$binary" ] || { echo "build-deb.sh: no executable at $binary (cargo build --release, or pass --binary)" >&2; exit 1; }
if [ -z "$version" ]; then
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
fi
arch=$(dpkg-architecture -qDEB_HOST_ARCH)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg="$work/pkg"

install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/usr/share/doc/trellis" \
  "$pkg/etc/trellis.d/gateway"
install -m 0755 "$binary" "$pkg/usr/bin/trellis"
if [ "$strip" = 1 ]; then
  strip --strip-unneeded "$pkg/usr/bin/trellis"
fi
install -m 0644 systemd/trellis-server.service systemd/trellis-client.service \
  systemd/trellis-gateway.service "$pkg/lib/systemd/system/"
install -m 0644 packaging/config/server.hcl.example packaging/config/client.hcl.example "$pkg/etc/trellis.d/"
install -m 0644 packaging/config/gateway/gateway.hcl.example "$pkg/etc/trellis.d/gateway/"
install -m 0644 docs/deploy-vms.md docs/configuration.md "$pkg/usr/share/doc/trellis/"
cat > "$pkg/usr/share/doc/trellis/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: trellis

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$pkg/DEBIAN/"

# Shared-library dependencies, as dh_shlibdeps would compute them.
mkdir -p "$work/debian"
printf 'Source: trellis\n\nPackage: trellis\nArchitecture: any\n' > "$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e"pkg/usr/bin/trellis" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies for $binary" >&2; exit 1; }

(cd "$pkg" && find etc -type f | sed 's|^|/|' | sort) > "$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: trellis
Version: $version
Architecture: $arch
Maintainer: Trellis maintainers <trellis@localhost>
Installed-Size: $size
Depends: $shlibs, passwd
Section: net
Priority: optional
Description: multi-datacenter service mesh speaking Consul's HTTP API
 One binary: servers (Raft per datacenter; catalog, KV, health, sessions), client agents,
 DNS, WAN federation and the mesh gateway. Installs systemd units (trellis-server,
 trellis-client, trellis-gateway) that start nothing until /etc/trellis.d is configured.
CONTROL

mkdir -p "$out"
deb="$out/trellis_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$pkg" "$deb" >/dev/null
echo "$deb"
