#!/usr/bin/env bash
# Fetch a `consul` binary for the test suite and the demo, without touching the
# system's apt configuration.
#
# Debian bookworm has no consul package; bullseye's (1.8.7) runs on bookworm.
# We build a one-suite apt source from the mirror this machine's own apt
# sources already name, download the .deb into a scratch dir and unpack the
# binary into $DEPRO_CONSUL_DIR (default: target/consul). Prints the path of
# the binary on stdout. A consul already on PATH (or cached) is reused.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=${DEPRO_CONSUL_DIR:-$here/target/consul}
bin=$dest/usr/bin/consul

if [ -n "${CONSUL_BIN:-}" ] && [ -x "$CONSUL_BIN" ]; then echo "$CONSUL_BIN"; exit 0; fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi

die() { echo "get-consul: $*" >&2; exit 1; }

sources=/etc/apt/sources.list.d/debian.sources
uri="" keyring=""
if [ -f "$sources" ]; then
  uri=$(awk '/^URIs:/ { print $2; exit }' "$sources")
  keyring=$(awk '/^Signed-By:/ { print $2; exit }' "$sources")
elif [ -f /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $2 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$uri" ] || die "cannot find a Debian mirror in $sources or /etc/apt/sources.list; install consul yourself and put it on PATH (or set CONSUL_BIN)"
[ -n "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/sources.d" "$scratch/lists/partial" "$scratch/archives/partial"
cat > "$scratch/sources.d/bullseye.sources" <<SRC
Types: deb
URIs: $uri
Suites: bullseye
Components: main
Signed-By: $keyring
SRC
touch "$scratch/none"
apt_opts=(-o "Dir::Etc::SourceList=$scratch/none" -o "Dir::Etc::SourceParts=$scratch/sources.d"
          -o "Dir::State::Lists=$scratch/lists" -o "Dir::Cache::Archives=$scratch/archives"
          -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
echo "get-consul: fetching consul from the bullseye suite of $(echo "$uri" | sed 's#^\([a-z]*://\).*#\1<this machine'"'"'s mirror>#')" >&2
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update of the bullseye suite failed"
(cd "$scratch" && apt-get "${apt_opts[@]}" -qq download consul >&2) || die "apt-get download consul failed"
deb=$(ls "$scratch"/consul_*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || die "no consul .deb was downloaded"
mkdir -p "$dest"
dpkg-deb -x "$deb" "$dest"
[ -x "$bin" ] || die "the consul .deb did not contain usr/bin/consul"
"$bin" version >&2
echo "$bin"
