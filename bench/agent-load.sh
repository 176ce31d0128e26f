#!/usr/bin/env bash
# What a busy key-value workload costs the nodes' agents: flockd's CPU per key-value write on a
# `flockd dev` cluster (3 nodes in one process, process driver) with no apps, and with N apps
# deployed. Each node's apps agent looks at its apps (lists its instances: with the docker
# driver, an API call) when the replicated state changes; the difference between the two runs
# is what writes that change only the key-value namespace cost the agents. When a Docker engine
# runs, each node's docker driver is connected, and dockerd's CPU over the run is shown too.
#
#   bench/agent-load.sh [--apps N] [--secs T] [--clients C] [--flockd PATH]
#       defaults: 30 apps, 20 s, 4 clients, target/release/flockd (built first)
#
# Clients are `flockctl kv put` loops (one process per write, so the write rate is modest; the
# figure is flockd's CPU, from /proc, per write). Prints the figures; add them to
# bench/RESULTS.md ("Agents under a key-value load").
set -euo pipefail

apps=30
secs=20
clients=4
flockd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --apps) apps="$2"; shift 2 ;;
    --secs) secs="$2"; shift 2 ;;
    --clients) clients="$2"; shift 2 ;;
    --flockd) flockd="$2"; shift 2 ;;
    *) echo "usage: $0 [--apps N] [--secs T] [--clients C] [--flockd PATH]" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "$flockd" ]; then
  cargo build --release -q -p flock-node
  flockd="$root/target/release/flockd"
fi
flockctl="$(dirname "$flockd")/flockctl"
[ -x "$flockctl" ] || { echo "agent-load.sh: no flockctl beside $flockd" >&2; exit 1; }
hz=$(getconf CLK_TCK)

dir=$(mktemp -d)
dev_pid=""
cleanup() {
  [ -n "$dev_pid" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One measured run with $1 apps; prints a table row.
run() {
  local n=$1 d="$dir/run-$1" port
  # Ports below the ephemeral range; another try on other ports if these are taken.
  for _ in 1 2 3; do
    port=$((10000 + RANDOM % 20000))
    rm -rf "$d" && mkdir -p "$d"
    "$flockd" dev --nodes 3 --port "$port" --data-dir "$d/data" >"$d/dev.log" 2>&1 &
    dev_pid=$!
    for _ in $(seq 1 100); do
      grep -q "flockd: ready" "$d/dev.log" && break
      kill -0 "$dev_pid" 2>/dev/null || break
      sleep 0.2
    done
    grep -q "flockd: ready" "$d/dev.log" && break
    kill -INT "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
    dev_pid=""
  done
  [ -n "$dev_pid" ] || { echo "agent-load.sh: flockd dev did not come up:" >&2; cat "$d/dev.log" >&2; exit 1; }
  export FLOCK_CONFIG="$d/data/n1/admin.conf"
  if [ "$n" -gt 0 ]; then
    {
      echo "version: 1"
      echo "applications:"
      for i in $(seq 1 "$n"); do echo "  a$i: {command: [sleep, '100000']}"; done
    } >"$d/app.yml"
    {
      echo "version: 1"
      echo "nodes:"
      for node in 1 2 3; do
        printf '  n%s: [' "$node"
        seq "$node" 3 "$n" | sed 's/^/a/' | paste -sd, - | tr -d '\n'
        echo "]"
      done
    } >"$d/dep.yml"
    "$flockctl" deploy "$d/dep.yml" "$d/app.yml" >/dev/null
    for _ in $(seq 1 150); do
      [ "$("$flockctl" app ls --json | grep -o '"state": *"running"' | wc -l)" -eq "$n" ] && break
      sleep 0.2
    done
  fi
  sleep 2 # let the agents settle
  local c0 t0 t1 c1 puts=0 dockerd d0=0 d1=0
  dockerd=$(pgrep -x dockerd | head -1 || true)
  [ -n "$dockerd" ] && d0=$(cpu_ticks "$dockerd")
  c0=$(cpu_ticks "$dev_pid")
  t0=$(date +%s.%N)
  local end=$((SECONDS + secs))
  for c in $(seq 1 "$clients"); do
    (
      k=0
      while [ $SECONDS -lt $end ]; do
        "$flockctl" kv put "load-$c-$k" v >/dev/null
        k=$((k + 1))
      done
      echo "$k" >"$d/puts-$c"
    ) &
  done
  wait $(jobs -p | grep -v "^$dev_pid$")
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$dev_pid")
  [ -n "$dockerd" ] && d1=$(cpu_ticks "$dockerd")
  for c in $(seq 1 "$clients"); do puts=$((puts + $(cat "$d/puts-$c"))); done
  awk -v n="$n" -v p="$puts" -v dt="$(echo "$t1 - $t0" | bc -l)" -v cpu="$((c1 - c0))" -v dcpu="$((d1 - d0))" -v hz="$hz" 'BEGIN {
    printf "| %d | %d | %.0f | %.2f | %.2f | %.2f |\n", n, p, p / dt, cpu / hz, 1000 * cpu / hz / p, dcpu / hz
  }'
  kill -INT "$dev_pid"
  wait "$dev_pid" 2>/dev/null || true
  dev_pid=""
}

echo "flockd: $flockd; $clients clients, $secs s each"
echo
echo "| apps | kv writes | writes/s | flockd CPU s | flockd CPU ms per write | dockerd CPU s |"
echo "|---:|---:|---:|---:|---:|---:|"
run 0
run "$apps"
