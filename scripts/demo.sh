#!/usr/bin/env bash
# A self-contained local demo: a dev Consul on loopback, an HTTP origin of
# signed builds, three agents that trust only the release key, a first
# version, a canary rollout in batches, a rollout policy kept in the
# tree with a manual promotion, a restart in waves paused and resumed from
# another command, a broken build whose canary fails its health hook (halted
# and rolled back on its own, with the reason shown), a rollback and a
# removal; the tree and the directories shown along the way. Cleans up after
# itself (Consul, agents, files).
set -euo pipefail
cd "$(dirname "$0")/.."

CONSUL=$(scripts/get-consul.sh)
echo "==> building depro"
cargo build --quiet --locked
DEPRO=$PWD/target/debug/depro

work=$(mktemp -d /tmp/depro-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(free_port)
export CONSUL_HTTP_ADDR=127.0.0.1:$HTTP
export DEPRO_PREFIX=demo/version

echo "==> starting a dev Consul on $CONSUL_HTTP_ADDR"
"$CONSUL" agent -dev -node demo -bind 127.0.0.1 -client 127.0.0.1 -http-port "$HTTP" \
  -dns-port -1 -grpc-port -1 -serf-lan-port "$(free_port)" -serf-wan-port "$(free_port)" \
  -server-port "$(free_port)" >"$work/consul.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  "$CONSUL" info >/dev/null 2>&1 && break
  sleep 0.1
done

echo "==> making three builds (tarballs) of a tiny web site; v3 is broken"
for v in v1 v2 v3; do
  mkdir -p "$work/build/$v"
  echo "<h1>demo $v</h1>" >"$work/build/$v/index.html"
  tar czf "$work/$v.tar.gz" -C "$work/build/$v" .
done
echo "<h1>500 internal server error</h1>" >"$work/build/v3/index.html"
tar czf "$work/v3.tar.gz" -C "$work/build/v3" .

ORIGIN=$(free_port)
echo "==> serving the builds over http://127.0.0.1:$ORIGIN/ and making a release key"
python3 -m http.server --bind 127.0.0.1 --directory "$work" "$ORIGIN" >"$work/origin.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$ORIGIN/v1.tar.gz')" 2>/dev/null && break
  sleep 0.1
done
"$DEPRO" keygen "$work/release.key"
TRUSTED=$(cat "$work/release.key.pub")
# Each build: its artifact (digest and size from the local copy), signed.
build() { echo "-artifact=http://127.0.0.1:$ORIGIN/$1.tar.gz" "-artifact-file=$work/$1.tar.gz" "-sign=$work/release.key"; }

echo "==> starting three agents (node1..node3)"
for n in 1 2 3; do
  mkdir -p "$work/node$n/conf"
  cat >"$work/node$n/conf/depro.json" <<JSON
{ "name": "node$n",
  "deployments": [
    { "id": "web", "path": "$work/node$n/web", "prefix": "demo/version", "shell": "bash",
      "deploy":  ["tar xzf \"\$ARTIFACT\""],
      "trusted_keys": ["$TRUSTED"],
      "rollout": ["ln -sfn \"\$VERSION_PATH\" \"\$DEPLOYMENT_PATH/live\""],
      "health":  ["if ! grep -q demo \"\$DEPLOYMENT_PATH/live/index.html\"; then echo \"GET / on node$n: \$(cat \$DEPLOYMENT_PATH/live/index.html)\"; exit 22; fi"],
      "health_timeout": "3s",
      "clean":   ["echo \"node$n cleans \$VERSION\""] } ] }
JSON
  "$DEPRO" agent -config-dir="$work/node$n/conf" >"$work/node$n/agent.log" 2>&1 &
  pids+=($!)
done

show() {
  echo "--- the tree in Consul:"
  "$CONSUL" kv get -recurse demo/version/ | sed 's/^/    /'
  echo "--- the hosts:"
  for n in 1 2 3; do
    printf '    node%s: versions [%s], live -> %s\n' "$n" \
      "$(cd "$work/node$n/web" && ls -d v* 2>/dev/null | tr '\n' ' ')" \
      "$(readlink "$work/node$n/web/live" 2>/dev/null | xargs -r basename)"
  done
}

echo; echo "==> depro deploy v1 -nodes=all $(build v1)"
echo "    (every live agent of the prefix fetches the build, checks its digest and signature)"
# shellcheck disable=SC2046
"$DEPRO" deploy v1 -nodes=all $(build v1)
echo; echo "==> depro deploy v2 -nodes=all -canary=1 -batch=1        (a canary, then one node at a time)"
"$DEPRO" deploy v2 -nodes=all -canary=1 -batch=1 $(build v2)
show
echo; echo "==> depro deploy v9 -nodes=all        (a build that names no signed artifact: refused by every agent)"
if "$DEPRO" deploy v9 -nodes=all -timeout=10s; then
  echo "demo: an unsigned version was deployed; that should not happen" >&2
  exit 1
else
  echo "    (exit $?: the agents refused it before fetching anything)"
fi
"$DEPRO" remove v9
echo; echo "==> depro policy -nodes=all -canary=1 -batch=1 -pause=2s -promote=manual        (every switch follows it, whoever runs it)"
"$DEPRO" policy -nodes=all -canary=1 -batch=1 -pause=2s -promote=manual -message="a person promotes each canary"
echo; echo "==> depro restart -message=\"new TLS certificate\"        (v2's rollout hook again, in the policy's waves: stops after the canary)"
"$DEPRO" restart -message="new TLS certificate"
echo; echo "==> depro status        (the restart waits for its promotion)"
"$DEPRO" status
echo; echo "==> depro promote v2 &        (the other waves, 2 s apart), and from here meanwhile: depro pause, depro status, depro resume"
"$DEPRO" promote v2 >"$work/promote.log" 2>&1 &
promote=$!
sleep 0.5
"$DEPRO" pause
"$DEPRO" status | grep -E 'under way|paused' | sed 's/^/    status: /'
"$DEPRO" resume
wait "$promote"
sed 's/^/    promote: /' "$work/promote.log"
echo; echo "==> depro history"
"$DEPRO" history
echo; echo "==> depro policy -clear"
"$DEPRO" policy -clear
echo; echo "==> depro deploy v3 -nodes=all -canary=1 -batch=1 -rollback-on-failure        (v3 is broken)"
if "$DEPRO" deploy v3 -nodes=all -canary=1 -batch=1 -rollback-on-failure $(build v3); then
  echo "demo: the broken v3 was rolled out; that should not happen" >&2
  exit 1
else
  echo "    (exit $?: the canary failed its health hook; the rollout halted and was rolled back)"
fi
show
echo; echo "==> depro status        (v3 failed on the canary, and why)"
"$DEPRO" status
echo; echo "==> depro rollback -nodes=all"
"$DEPRO" rollback -nodes=all
echo; echo "==> depro remove v2 v3 -wait"
"$DEPRO" remove v2 v3 -wait
show
echo; echo "==> demo done: stopping the agents and Consul, removing $work"
