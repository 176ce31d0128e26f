#!/usr/bin/env bash
# Time from `flockctl deploy` to every app running, for N apps (default 100) on a 3-node
# `flockd dev` cluster with the process driver, unpinned (the planner spreads them). Prints the
# figure; stops the cluster (and its apps) at the end.
#   bench/deploy-bench.sh [N]
set -euo pipefail
n=${1:-100}
cd "$(dirname "$0")/.."
cargo build --release -q -p flock-node
bin=$PWD/target/release
dir=$(mktemp -d)
port=7951
"$bin/flockd" dev --port $port --data-dir "$dir/dev" >"$dir/dev.log" 2>&1 &
dev=$!
trap 'kill -INT $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$dir"' EXIT
export FLOCK_CONFIG=$dir/dev/n1/admin.conf
for _ in $(seq 100); do [ -f "$FLOCK_CONFIG" ] && "$bin/flockctl" status >/dev/null 2>&1 && break; sleep 0.2; done
{
  echo "services:"
  for i in $(seq "$n"); do
    echo "  app$i:"
    echo "    command: [\"sleep\", \"3600\"]"
  done
} >"$dir/compose.yml"
start=$(date +%s.%N)
"$bin/flockctl" deploy "$dir/compose.yml" >/dev/null
deployed=$(date +%s.%N)
while :; do
  running=$("$bin/flockctl" app ls --json | python3 -c 'import json,sys; print(sum(a["state"]=="running" for a in json.load(sys.stdin)))')
  [ "$running" -ge "$n" ] && break
  sleep 0.1
done
done_at=$(date +%s.%N)
python3 - "$n" "$start" "$deployed" "$done_at" <<'PY'
import sys
n, s, d, e = int(sys.argv[1]), *map(float, sys.argv[2:])
print(f"{n} apps on 3 nodes: deploy committed in {d - s:.2f} s, all running {e - s:.2f} s after `flockctl deploy` started")
PY
