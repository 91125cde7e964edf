#!/usr/bin/env bash
# Old and new agents on one prefix (issue 21): builds two earlier depro
# releases from this repository's history and runs the test that mixes them
# with this build (tests/artifacts.rs old_and_new_agents_share_a_prefix_...,
# ignored in the default run: building two more depros takes minutes).
#   1913b17  before artifacts (its deploy hook runs without $ARTIFACT)
#   5a0c533  artifacts and peers, before -origin-hosts and the fan-out tree
# Usage: scripts/old-agents.sh   (needs CONSUL_BIN, or runs scripts/get-consul.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CONSUL_BIN=${CONSUL_BIN:-$(scripts/get-consul.sh)}
export CONSUL_BIN
old=target/old
mkdir -p "$old"
build() {
  local commit=$1 src=$old/src-$1
  if [ ! -x "$old/depro-$commit" ]; then
    rm -rf "$src"
    git worktree prune
    git worktree add --detach --force "$src" "$commit" >&2
    CARGO_TARGET_DIR=$PWD/$old/target cargo build --locked --quiet --manifest-path "$src/Cargo.toml" >&2
    cp "$old/target/debug/depro" "$old/depro-$commit"
    git worktree remove --force "$src"
  fi
  echo "$PWD/$old/depro-$commit"
}
DEPRO_BEFORE_ARTIFACTS=$(build 1913b17)
DEPRO_BEFORE_FAN_OUT=$(build 5a0c533)
export DEPRO_BEFORE_ARTIFACTS DEPRO_BEFORE_FAN_OUT
exec cargo test --locked --test artifacts -- --ignored old_and_new_agents
