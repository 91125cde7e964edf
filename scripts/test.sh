#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine with Rust:
# fetches Consul (scripts/get-consul.sh), checks formatting and lints, builds
# the static binaries for x86_64, aarch64 and armv7 and their packages
# (packaging/build.sh), and runs every unit and integration test against a
# real Consul on loopback, including the packaging checks (which install the
# .deb on this machine: run as root) and the ARM binaries under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (command -> package).
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for pair in bash:bash tar:tar gzip:gzip mandoc:mandoc lintian:lintian rpm:rpm man:man-db \
            file:file readelf:binutils systemd-analyze:systemd python3:python3 script:bsdutils \
            curl:curl cmp:diffutils install:coreutils zsh:zsh fish:fish \
            qemu-aarch64-static:qemu-user-static cpio:cpio unshare:util-linux openssl:openssl; do
  need "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; } \
    || { echo "test.sh: could not install ${missing[*]} with apt-get" >&2; exit 1; }
fi

CONSUL_BIN=$(scripts/get-consul.sh)
export CONSUL_BIN
echo "test.sh: using $("$CONSUL_BIN" version | head -n1) at $CONSUL_BIN" >&2

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# What ships (static binary, .deb, .rpm): the packaging tests install and check it.
packaging/build.sh
cargo test --locked
