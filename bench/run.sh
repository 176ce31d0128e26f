#!/usr/bin/env bash
# The one command: benchmark flock's replicated store against etcd 3.4 on this machine.
#
#   bench/run.sh [flock-bench options]     e.g. bench/run.sh --clients 1,64 --duration 10 --keep
#
# Installs etcd 3.4 (Debian's etcd-server) if it is missing, builds flockd and flock-bench in
# release mode, and runs the benchmark; `bench/run.sh --help` lists the options. Results are
# printed and written to bench/RESULTS.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v etcd >/dev/null 2>&1; then
    echo "run.sh: etcd not found; installing Debian's etcd-server" >&2
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "run.sh: installing etcd-server needs root; run: apt-get install -y etcd-server" >&2
        exit 1
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server
    # The package may start a system etcd on 2379. The benchmark uses its own members on free
    # ports, but a stray etcd would compete for the CPU and the disk: stop it.
    "${sudo[@]}" systemctl stop etcd 2>/dev/null \
        || "${sudo[@]}" service etcd stop 2>/dev/null \
        || "${sudo[@]}" pkill -x etcd \
        || true
fi

cargo build --release -p flock-node -p flock-bench

# flock-bench records the command line in its results.
export FLOCK_BENCH_COMMAND="bench/run.sh${*:+ $*}"
exec "$root/target/release/flock-bench" "$@"
