#!/usr/bin/env bash
# The benchmark harness (scripts/bench.py says what it measures), against Consul
# agents on loopback. Writes docs/benchmarks.md, docs/fleet-scaling.svg and
# docs/benchmarks.json. About 30 minutes on 2 cores. Not part of the tests
# (tests/bench_smoke.rs runs --smoke).
#   scripts/bench.sh            the full run
#   scripts/bench.sh --smoke    a quick run of every part, into target/bench-smoke
#   scripts/bench.sh --parts artifacts --out /tmp/a   one part (section 11), then
#   python3 scripts/bench.py --depro x --consul x --report-only --merge /tmp/a/benchmarks.json
#                               merges it into docs/ (the report names that run)
set -euo pipefail
cd "$(dirname "$0")/.."
CONSUL=$(scripts/get-consul.sh)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
static=dist/depro-$version-x86_64-unknown-linux-musl
# The static binary if no source file is newer (a directory's time does not
# move when a file in it is edited).
if [ -x "$static" ] && [ -z "$(find src Cargo.toml -newer "$static" -print -quit)" ]; then
  depro=$static
else
  echo "bench.sh: $static missing or older than src/; building a release binary (run packaging/build.sh for the static one)" >&2
  cargo build --release --locked --quiet
  depro=target/release/depro
fi
# The Go original, for the back-to-back comparison (section 8), if present.
go=../shared/baselines/depro-go-original
[ -x "$go" ] || go=""
if [ "${1:-}" = --smoke ]; then
  exec python3 scripts/bench.py --depro "$depro" --consul "$CONSUL" --go "$go" --sizes 1,4 --rounds 1 \
    --changes 5 --cycles 4 --idle 2 --version-counts 2,10 --many 12 --many-rounds 1 --cluster-sizes 3 \
    --cost-keys 1000 --cost-samples 20 --b2b-sizes 1,2 --b2b-rounds 3 --b2b-pause 0.2 \
    --plain-sizes 2 --plain-rounds 1 --big-shapes 100x5 \
    --artifact-sizes 1,3 --artifact-mb 2 --origin-mbps 200 --artifact-rounds 1 --artifact-zone-fleet 4 \
    --events-sizes 2 --events-cycles 1 \
    --out target/bench-smoke --command-line "scripts/bench.sh --smoke"
fi
exec python3 scripts/bench.py --depro "$depro" --consul "$CONSUL" --go "$go" --command-line "scripts/bench.sh" "$@"
