#!/usr/bin/env bash
# The benchmark harness: fleet scaling, reaction latency and footprint, against
# a dev Consul on loopback. Writes docs/benchmarks.md, docs/fleet-scaling.svg
# (and docs/benchmarks.json). About 5 minutes on 2 cores. Not part of the tests.
#   scripts/bench.sh            the full run
#   scripts/bench.sh --smoke    a quick run of every part, into target/bench-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
CONSUL=$(scripts/get-consul.sh)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
static=dist/depro-$version-x86_64-unknown-linux-musl
if [ -x "$static" ] && [ "$static" -nt src ]; then
  depro=$static
else
  echo "bench.sh: $static missing or older than src/; building a release binary (run packaging/build.sh for the static one)" >&2
  cargo build --release --locked --quiet
  depro=target/release/depro
fi
if [ "${1:-}" = --smoke ]; then
  exec python3 scripts/bench.py --depro "$depro" --consul "$CONSUL" --sizes 1,4 --rounds 1 \
    --changes 5 --cycles 4 --idle 2 --out target/bench-smoke --command-line "scripts/bench.sh --smoke"
fi
exec python3 scripts/bench.py --depro "$depro" --consul "$CONSUL" --command-line "scripts/bench.sh" "$@"
