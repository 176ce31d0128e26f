#!/usr/bin/env bash
# Snapshot stream throughput on loopback (issue 5): TCP, TLS over TCP and QUIC (quinn's defaults
# and flock's tuning, one stream and lanes), a QUIC tuning study, and dataset streams on the dir
# backend and a zfs-fuse pool against a local pipe.
#
#   bench/run-streams.sh [flock-streams options]   e.g. bench/run-streams.sh --reps 3 --backends dir
#
# Installs and starts zfs-fuse when the zfs comparison is asked for and zfs is missing (as
# test.sh does), builds flock-streams in release mode and runs it; `--help` lists the options.
# Results are printed and written to bench/RESULTS.md ("Snapshot streams"). Run it as root:
# flock forces its QUIC socket buffers past net.core.rmem_max when it may, as flockd does.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

[ "$(id -u)" -eq 0 ] || echo "run-streams.sh: not root: QUIC socket buffers stay capped by net.core.rmem_max" >&2

# The zfs comparison runs unless --backends leaves zfs out.
backends="dir,zfs"
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --backends=*) backends="${args[$i]#--backends=}" ;;
    --backends) backends="${args[$((i + 1))]:-}" ;;
  esac
done
case "$backends" in *zfs*) wants_zfs=1 ;; *) wants_zfs=0 ;; esac

if [ "$wants_zfs" = 1 ]; then
  if ! command -v zfs >/dev/null 2>&1 && [ ! -x /usr/sbin/zfs ]; then
    echo "run-streams.sh: installing zfs-fuse for the zfs comparison" >&2
    apt-get update -qq && apt-get install -y -qq zfs-fuse >/dev/null
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
  if ! zpool list >/dev/null 2>&1; then
    echo "run-streams.sh: starting the zfs-fuse daemon" >&2
    zfs_pid=/var/run/zfs-fuse.pid
    if [ -f "$zfs_pid" ] && ! kill -0 "$(cat "$zfs_pid")" 2>/dev/null; then rm -f "$zfs_pid"; fi
    /usr/sbin/zfs-fuse --pidfile "$zfs_pid" || true
    for _ in $(seq 1 60); do zpool list >/dev/null 2>&1 && break; sleep 0.5; done
    zpool list >/dev/null 2>&1 || { echo "run-streams.sh: zfs-fuse does not answer" >&2; exit 1; }
  fi
fi

cargo build --release -p flock-node -p flock-bench

# flock-streams records the command line in its results.
export FLOCK_BENCH_COMMAND="bench/run-streams.sh${*:+ $*}"
exec "$root/target/release/flock-streams" "$@"
