#!/usr/bin/env bash
# The Docker volume plugin (issue 9): the time of a `docker run` with a flock volume against one
# with a plain local volume, and of a mount that has to move the data to the mounting node.
#
#   bench/plugin-bench.sh [--reps N] [--mib M]      defaults: 10 runs, 256 MiB moved
#
# Starts a two-node cluster on loopback (release flockd, dir backend) whose nodes serve the
# plugin as flock-test-n1 and flock-test-n2 (the names node/tests/docker_plugin.rs uses, under
# the same lock file), on the local Docker engine, with the image flock-test-busybox (built from
# local files if missing; nothing is pulled).
#
# - `docker run --rm -v VOL:/data IMAGE true`, with VOL a local volume, and with VOL a flock
#   volume whose data is on the node (the plugin's Mount and Unmount: two Raft commits).
# - A mount that moves: M MiB of new data written on the holder, then VolumeDriver.Mount on the
#   other node's socket (what that node's engine sends for `docker run`; one engine cannot use
#   two drivers for one volume name): the move's snapshot, incremental push and commit, then
#   the mount's commit. Alternates between the nodes.
# Prints the figures; add them to bench/RESULTS.md ("Docker volume plugin").
set -euo pipefail

reps=10
mib=256
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --mib) mib="$2"; shift 2 ;;
    *) echo "usage: $0 [--reps N] [--mib M]" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v docker >/dev/null && docker version >/dev/null 2>&1 || {
  echo "plugin-bench.sh: needs the docker CLI and a running Docker engine (apt-get install docker.io)" >&2
  exit 1
}
command -v curl >/dev/null || { echo "plugin-bench.sh: needs curl (apt-get install curl)" >&2; exit 1; }

cargo build --release -q -p flock-node
image=flock-test-busybox:latest
docker image inspect "$image" >/dev/null 2>&1 || sh docker/build-testapp-image.sh
flockd="$root/target/release/flockd"
flockctl="$root/target/release/flockctl"
p1=flock-test-n1
p2=flock-test-n2
sock() { echo "/run/docker/plugins/$1.sock"; }

# One user of the fixed plugin names at a time (the docker_plugin test takes the same lock).
exec 9>"${TMPDIR:-/tmp}/flock-docker-plugin-test.lock"
flock 9

dir=$(mktemp -d)
tag=$$
fvol="bench-flock-$tag"
lvol="bench-local-$tag"
pids=()
cleanup() {
  docker volume rm -f "$lvol" >/dev/null 2>&1 || true
  [ -S "$(sock $p1)" ] && docker volume rm -f "$fvol" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

"$flockd" init --data-dir "$dir/n1" --listen 127.0.0.1:0 --name n1 \
  --plugin-name "$p1" >"$dir/n1.out" 2>"$dir/n1.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "flockd: ready" "$dir/n1.out" && break; sleep 0.1; done
token=$(grep -o 'FLOCK-[^ ]*' "$dir/n1.out" | head -1)
addr1=$(grep -o 'serving on [^ ]*' "$dir/n1.out" | awk '{print $3}')
"$flockd" join "$addr1" --token "$token" --data-dir "$dir/n2" --listen 127.0.0.1:0 --name n2 \
  --plugin-name "$p2" >"$dir/n2.out" 2>"$dir/n2.log" &
pids+=($!)
for _ in $(seq 300); do grep -q "flockd: ready" "$dir/n2.out" && break; sleep 0.1; done
grep -q "flockd: ready" "$dir/n2.out" || { cat "$dir/n2.log" >&2; exit 1; }
for p in $p1 $p2; do
  for _ in $(seq 100); do [ -S "$(sock $p)" ] && break; sleep 0.1; done
  curl -sf --unix-socket "$(sock $p)" -XPOST http://plugin/VolumeDriver.Capabilities | grep -q global || {
    echo "plugin-bench.sh: $(sock $p) is not served by this cluster's flockd" >&2; exit 1; }
done
export FLOCK_CONFIG="$dir/n1/admin.conf"

now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
# median and min of the numbers on stdin
stats() { sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "median %.0f ms, min %.0f ms, max %.0f ms (%d runs)", m, v[1], v[NR], NR }'; }
call() { # socket path json
  curl -sS --max-time 120 --unix-socket "$(sock "$1")" -XPOST "http://plugin/VolumeDriver.$2" \
    -H 'Content-Type: application/vnd.docker.plugins.v1+json' -d "$3"
}

docker volume create "$lvol" >/dev/null
docker volume create -d "$p1" "$fvol" >/dev/null
# Warm up both (the engine's first look at a volume, the dataset's creation).
docker run --rm -v "$lvol:/data" "$image" true
docker run --rm -v "$fvol:/data" --volume-driver "$p1" "$image" true

local_ms=()
flock_ms=()
for _ in $(seq "$reps"); do
  t0=$(now); docker run --rm -v "$lvol:/data" "$image" true; t1=$(now)
  local_ms+=("$(ms "$t0" "$t1")")
  t0=$(now); docker run --rm -v "$fvol:/data" --volume-driver "$p1" "$image" true; t1=$(now)
  flock_ms+=("$(ms "$t0" "$t1")")
done

# Moves: write M MiB of new data where the volume is, then mount it on the other node.
move_reps=$(( reps < 3 ? reps : 3 ))
holder=$p1
other=$p2
move_ms=()
for i in $(seq "$move_reps"); do
  mp=$(call "$holder" Mount "{\"Name\":\"$fvol\",\"ID\":\"bench-w$i\"}" | sed -n 's/.*"Mountpoint":"\([^"]*\)".*/\1/p')
  [ -n "$mp" ] || { echo "plugin-bench.sh: mount on $holder failed" >&2; exit 1; }
  dd if=/dev/urandom of="$mp/blob-$i" bs=1M count="$mib" status=none
  sync
  call "$holder" Unmount "{\"Name\":\"$fvol\",\"ID\":\"bench-w$i\"}" >/dev/null
  t0=$(now)
  out=$(call "$other" Mount "{\"Name\":\"$fvol\",\"ID\":\"bench-m$i\"}")
  t1=$(now)
  echo "$out" | grep -q '"Mountpoint":"/' || { echo "plugin-bench.sh: moving mount failed: $out" >&2; exit 1; }
  move_ms+=("$(ms "$t0" "$t1")")
  call "$other" Unmount "{\"Name\":\"$fvol\",\"ID\":\"bench-m$i\"}" >/dev/null
  tmp=$holder; holder=$other; other=$tmp
done

echo
echo "Docker volume plugin, $(nproc) cpus, $(docker version --format '{{.Server.Version}}') engine, dir backend, loopback"
echo "  docker run --rm -v VOL:/data busybox true, local volume:           $(printf '%s\n' "${local_ms[@]}" | stats)"
echo "  docker run --rm -v VOL:/data busybox true, flock volume (on node): $(printf '%s\n' "${flock_ms[@]}" | stats)"
echo "  VolumeDriver.Mount on the other node, $mib MiB new data to move:   $(printf '%s\n' "${move_ms[@]}" | stats)"
echo "  (moves: $(printf '%s ' "${move_ms[@]}")ms)"
