#!/usr/bin/env bash
# The soak: one stateful app moved round and round while it is written to, for an hour. On a
# `flockd dev` cluster (3 nodes in one process, process driver), `counter` (flock-testapp: an
# append-only log, fsync'ed before each OK, in a 64M dataset with retention
# "last=3,hourly=24,daily=7") takes appends from a writer all along, and is moved
# n1 -> n2 -> n3 -> n1 ... with `flockctl app move` every S seconds (start to start). Every
# minute one row: the moves that succeeded and failed, the data dir's disk use (du), the app's
# live data (the primary's referenced bytes), the snapshots Raft records for the dataset and
# each holder's local count, flockd's RSS and open fds, and the appends acknowledged so far. At
# the end every entry is read back: an acknowledged append that is missing fails the run.
#
#   bench/soak-datasets.sh [--minutes M] [--every S] [--rate R] [--flockd PATH] [--snapshot-logs N]
#       defaults: 60 minutes, a move every 5 s, 20 appends/s (0: as fast as the app answers),
#       target/release/flockd (built first, with flock-testapp beside it); --snapshot-logs is
#       flockd's (default 10000): each node keeps its Raft log in memory until a snapshot, so
#       an hour of moves grows RSS until then
#
# Prints the rows as a markdown table and a one-line verdict: flat or not (the last 3 rows
# against rows 2-4: disk beyond what the growing log explains, snapshot counts, RSS, fds).
# Exits 1 if an acknowledged append was lost (or could not be read back). Needs python3 (the
# writer, the read-back, the verdict); uses jq for flockctl's JSON when it is installed.
set -euo pipefail

minutes=60
every=5
rate=20
flockd=""
snapshot_logs=10000
usage="usage: $0 [--minutes M] [--every S] [--rate R] [--flockd PATH] [--snapshot-logs N]"
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --every) every="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --flockd) flockd="$2"; shift 2 ;;
    --snapshot-logs) snapshot_logs="$2"; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for v in "$minutes" "$every" "$rate" "$snapshot_logs"; do
  case "$v" in '' | *[!0-9]*) echo "$usage" >&2; exit 2 ;; esac
done
[ "$minutes" -ge 1 ] && [ "$every" -ge 1 ] || { echo "$usage (M and S at least 1)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "soak-datasets.sh: needs python3" >&2; exit 1; }
have_jq=false
command -v jq >/dev/null && have_jq=true

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "$flockd" ]; then
  cargo build --release -q -p flock-node -p flock-testapp
  flockd="$root/target/release/flockd"
fi
flockd="$(cd "$(dirname "$flockd")" && pwd)/$(basename "$flockd")"
bin="$(dirname "$flockd")"
flockctl="$bin/flockctl"
testapp="$bin/flock-testapp"
[ -x "$flockctl" ] || { echo "soak-datasets.sh: no flockctl beside $flockd" >&2; exit 1; }
[ -x "$testapp" ] || { echo "soak-datasets.sh: no flock-testapp beside $flockd (cargo build --release -p flock-testapp)" >&2; exit 1; }

dir=$(mktemp -d)
data="$dir/data"
dev_pid=""
writer_pid=""
mover_pid=""

# Kills the flock-testapp processes running in this run's data (the apps flockd started: their
# working directory is their dataset, under $dir), TERM then KILL.
kill_apps() {
  local p pid cwd left sig
  for sig in TERM KILL; do
    left=""
    for p in /proc/[0-9]*; do
      pid=${p#/proc/}
      [ "$(cat "$p/comm" 2>/dev/null)" = flock-testapp ] || continue
      cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
      case "$cwd" in "$dir"/*) kill -"$sig" "$pid" 2>/dev/null && left="$left $pid" ;; esac
    done
    [ -z "$left" ] && return 0
    [ "$sig" = TERM ] && echo "soak-datasets.sh: stopping leftover app process(es):$left" >&2
    for _ in $(seq 1 25); do
      local alive=""
      for pid in $left; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ -z "$alive" ] && return 0
      sleep 0.2
    done
  done
}

# Stops the mover (and the move it runs: its children, `timeout` passes TERM to flockctl).
stop_mover() {
  [ -n "$mover_pid" ] || return 0
  local c
  for c in $(ps -o pid= --ppid "$mover_pid" 2>/dev/null); do kill "$c" 2>/dev/null || true; done
  kill "$mover_pid" 2>/dev/null || true
  wait "$mover_pid" 2>/dev/null || true
  mover_pid=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  touch "$dir/stop" 2>/dev/null || true
  stop_mover
  if [ -n "$writer_pid" ]; then
    kill "$writer_pid" 2>/dev/null || true
    wait "$writer_pid" 2>/dev/null || true
  fi
  if [ -n "$dev_pid" ]; then
    kill -INT "$dev_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$dev_pid" 2>/dev/null; then
      echo "soak-datasets.sh: flockd dev did not stop in 60 s after SIGINT; killing it" >&2
      kill -KILL "$dev_pid" 2>/dev/null || true
    fi
    wait "$dev_pid" 2>/dev/null || true
  fi
  kill_apps || true
  rm -rf "$dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "soak-datasets.sh: $*" >&2; }

# JSON: `jq -r FILTER` when jq is installed, else the equivalent python3 expression on `d`.
json() {
  if $have_jq; then
    jq -r "$1"
  else
    python3 -c "import json, sys
d = json.load(sys.stdin)
$2"
  fi
}

# The node `counter` runs on (or is recorded on), empty if flockctl does not answer.
app_node() {
  "$flockctl" app ls --json 2>/dev/null |
    json '.[] | select(.name == "counter") | .node' \
      'print(next((a["node"] for a in d if a["name"] == "counter"), ""))' 2>/dev/null || true
}

# "STATE MOVING_TO" of counter ("-" when not moving).
app_state() {
  "$flockctl" app ls --json 2>/dev/null |
    json '.[] | select(.name == "counter") | "\(.state) \(.moving_to // "-")"' \
      'print(next((a["state"] + " " + (a.get("moving_to") or "-") for a in d if a["name"] == "counter"), ""))' \
      2>/dev/null || true
}

# flock-testapp's reply to one request at 127.0.0.1:$aport, empty if it does not answer.
ask() { "$testapp" --ask "127.0.0.1:$aport" "$1" 2>/dev/null || true; }

# --- the cluster ---------------------------------------------------------------------------
for _ in 1 2 3; do
  port=$((10000 + RANDOM % 10000))
  rm -rf "$data"
  PATH="$bin:$PATH" "$flockd" dev --nodes 3 --port "$port" --data-dir "$data" \
    --snapshot-logs "$snapshot_logs" --keep-logs $((snapshot_logs / 10)) >"$dir/dev.log" 2>&1 &
  dev_pid=$!
  for _ in $(seq 1 150); do
    grep -q "flockd: ready" "$dir/dev.log" && break
    kill -0 "$dev_pid" 2>/dev/null || break
    sleep 0.2
  done
  grep -q "flockd: ready" "$dir/dev.log" && break
  kill -INT "$dev_pid" 2>/dev/null || true
  wait "$dev_pid" 2>/dev/null || true
  dev_pid=""
done
[ -n "$dev_pid" ] || { log "flockd dev did not come up:"; cat "$dir/dev.log" >&2; exit 1; }
FLOCK_CONFIG=$(sed -n 's/^ *export FLOCK_CONFIG=//p' "$dir/dev.log" | head -1)
export FLOCK_CONFIG="${FLOCK_CONFIG:-$data/n1/admin.conf}"

# --- the app -------------------------------------------------------------------------------
# A free port for the app (below the dev cluster's range's top, above its ports).
for _ in $(seq 1 20); do
  aport=$((20000 + RANDOM % 10000))
  python3 -c "import socket, sys
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$aport" 2>/dev/null && break
done
retention='last=3,hourly=24,daily=7'
write_app() {
  {
    echo "version: 1"
    echo "applications:"
    echo "  counter:"
    echo "    command: [\"$testapp\", \"--listen\", \"127.0.0.1:$aport\"]"
    echo "    volume:"
    echo "      mountpoint: /data"
    echo "      maximum_size: 64M"
    [ -n "$retention" ] && echo "      retention: \"$retention\""
    echo "    restart_policy:"
    echo "      name: always"
  } >"$dir/app.yml"
}
write_app
printf 'version: 1\nnodes:\n  n1: [counter]\n  n2: []\n  n3: []\n' >"$dir/dep.yml"
note=""
if ! out=$("$flockctl" deploy "$dir/dep.yml" "$dir/app.yml" 2>&1); then
  if grep -qi retention <<<"$out"; then
    note="flockctl deploy refused the volume's retention key, run without it: $out"
    log "$note"
    retention=""
    write_app
    out=$("$flockctl" deploy "$dir/dep.yml" "$dir/app.yml" 2>&1) || { log "deploy failed: $out"; exit 1; }
  else
    log "deploy failed: $out"
    exit 1
  fi
fi
for _ in $(seq 1 300); do
  [ "$(app_state)" = "running -" ] && [ -n "$(ask PING)" ] && break
  sleep 0.2
done
[ -n "$(ask PING)" ] || { log "counter is not answering on 127.0.0.1:$aport:"; "$flockctl" app ls >&2 || true; exit 1; }
ds=$("$flockctl" app ls --json | json '.[] | select(.name == "counter") | .dataset // ""' \
  'print(next((a.get("dataset") or "" for a in d if a["name"] == "counter"), ""))')
ds=${ds:-counter}

# --- the writer: APPEND w1, w2, ... on one connection (a new one after an error); each
# acknowledged value goes to acked (a line each, flushed), the pause stats to writer.stats.
cat >"$dir/writer.py" <<'PY'
import os, signal, socket, sys, time

addr, rate, acked_path, stop_path, stats_path = sys.argv[1:6]
host, port = addr.rsplit(":", 1)
rate = int(rate)
interval = 1.0 / rate if rate > 0 else 0.0
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
out = open(acked_path, "a", buffering=1)
i = errors = 0
sock = f = None
last_ack = time.monotonic()
max_gap = 0.0
next_t = time.monotonic()
try:
    while not os.path.exists(stop_path):
        if sock is None:
            try:
                sock = socket.create_connection((host, int(port)), timeout=5)
                f = sock.makefile("rb")
            except OSError:
                sock = None
                time.sleep(0.02)
                continue
        if interval:
            now = time.monotonic()
            if next_t > now:
                time.sleep(next_t - now)
            next_t = max(next_t + interval, time.monotonic())  # no burst after a pause
        i += 1
        v = f"w{i}"
        try:
            sock.sendall(f"APPEND {v}\n".encode())
            line = f.readline()
        except OSError:
            line = b""
        if line.startswith(b"OK "):
            out.write(v + "\n")
            now = time.monotonic()
            max_gap = max(max_gap, now - last_ack)
            last_ack = now
        else:
            errors += 1
            try:
                sock.close()
            except OSError:
                pass
            sock = None
finally:
    with open(stats_path, "w") as s:
        s.write(f"{errors} {max_gap:.2f}\n")
PY
: >"$dir/acked"
python3 "$dir/writer.py" "127.0.0.1:$aport" "$rate" "$dir/acked" "$dir/stop" "$dir/writer.stats" &
writer_pid=$!

# --- the mover: counter to the node after the one it is on, n1 -> n2 -> n3 -> n1, every
# $every s start to start; "ok NODE SECS" or "fail NODE SECS" in moves, failures' output in
# moves.err.
: >"$dir/moves"
mover() {
  local cur next t0 t1 out rc end
  while [ ! -e "$dir/stop" ]; do
    t0=$(date +%s%N)
    cur=$(app_node)
    case "$cur" in n1) next=n2 ;; n2) next=n3 ;; *) next=n1 ;; esac
    rc=0
    out=$(timeout 300 "$flockctl" app move counter --to "$next" 2>&1) || rc=$?
    t1=$(date +%s%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    if [ "$rc" -eq 0 ]; then
      echo "ok $next $secs" >>"$dir/moves"
    else
      echo "fail $next $secs" >>"$dir/moves"
      printf '%s %s -> %s (exit %s, %s s): %s\n' "$(date +%T)" "$cur" "$next" "$rc" "$secs" \
        "$(tail -3 <<<"$out" | tr '\n' ' ')" >>"$dir/moves.err"
    fi
    end=$((t0 / 1000000 + every * 1000))
    while [ ! -e "$dir/stop" ] && [ "$(($(date +%s%N) / 1000000))" -lt "$end" ]; do sleep 0.2; done
  done
}
mover &
mover_pid=$!

# --- the rows ------------------------------------------------------------------------------
# One row: minute, moves ok, failed, disk, data, snapshots (Raft), per holder, max per holder
# (or -), RSS kB, fds, acked; tab-separated in rows.
sample() {
  local m=$1 ok fail disk js stats rss fds acked
  ok=$(grep -c '^ok' "$dir/moves" || true)
  fail=$(grep -c '^fail' "$dir/moves" || true)
  disk=$( (du -sb "$data" 2>/dev/null || true) | tail -1 | cut -f1)
  stats=""
  if js=$("$flockctl" dataset ls "$ds" --json 2>"$dir/ls.err"); then
    stats=$(json '.[0] as $d
      | [ ([$d.holders[] | select(.role == "primary") | .referenced_bytes] | first // "?"),
          ($d.snapshots | length),
          (if any($d.holders[]; has("snapshot_count")) then
             [$d.holders[] | "\(.node)=\(if .state != "ready" then "?" else (.snapshot_count // "-") end)"] | join(" ")
           else "-" end),
          ([$d.holders[] | select(.state == "ready") | .snapshot_count // empty] | max // "-")
        ] | map(tostring) | join("\t")' \
      'd = d[0]
hs = d["holders"]
has = any("snapshot_count" in h for h in hs)
per = " ".join(h["node"] + "=" + (str(h.get("snapshot_count", "-")) if h["state"] == "ready" else "?") for h in hs) if has else "-"
counts = [h["snapshot_count"] for h in hs if h["state"] == "ready" and h.get("snapshot_count") is not None]
prim = next((h["referenced_bytes"] for h in hs if h["role"] == "primary"), "?")
print("\t".join(map(str, [prim, len(d["snapshots"]), per, max(counts) if counts else "-"])))' \
      <<<"$js" 2>>"$dir/ls.err") || stats=""
  fi
  [ -n "$stats" ] || { stats=$'?\t?\t?\t?'; log "minute $m: dataset ls failed: $(tr '\n' ' ' <"$dir/ls.err")"; }
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$dev_pid/status" 2>/dev/null || echo "?")
  fds=$( (ls "/proc/$dev_pid/fd" 2>/dev/null || true) | wc -l)
  acked=$(wc -l <"$dir/acked")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$ok" "$fail" "$disk" "$stats" "$rss" "$fds" "$acked" >>"$dir/rows"
  log "minute $m: moves $ok ok / $fail failed, disk $disk B, data/snapshots/per holder/max: $(tr '\t' ' ' <<<"$stats"), RSS $rss kB, $fds fds, $acked acked"
}

log "flockd: $flockd; 3 nodes on 127.0.0.1:$port.., counter on 127.0.0.1:$aport (dataset $ds)"
log "soak: $minutes min, a move every $every s, writer at $([ "$rate" -gt 0 ] && echo "$rate appends/s" || echo "full speed"); a row a minute"
: >"$dir/rows"
t0=$SECONDS
for m in $(seq 1 "$minutes"); do
  while [ $((SECONDS - t0)) -lt $((m * 60)) ]; do
    kill -0 "$dev_pid" 2>/dev/null || { log "flockd dev exited:"; tail -20 "$dir/dev.log" >&2; dev_pid=""; exit 1; }
    sleep 1
  done
  sample "$m"
done

# --- the end: stop moving and writing, read everything back --------------------------------
touch "$dir/stop"
log "stopping the mover (after its current move) and the writer"
wait "$mover_pid" 2>/dev/null || true
mover_pid=""
wait "$writer_pid" 2>/dev/null || true
writer_pid=""
for _ in $(seq 1 600); do
  [ "$(app_state)" = "running -" ] && [ -n "$(ask PING)" ] && break
  sleep 0.2
done
state=$(app_state)
[ "$state" = "running -" ] || log "counter is not settled after 120 s: $state"
read_ok=true
python3 - "127.0.0.1:$aport" "$dir/acked" "$dir/readback" <<'PY' || read_ok=false
import socket, sys, time
addr, acked_path, result_path = sys.argv[1:4]
host, port = addr.rsplit(":", 1)
err = None
for _ in range(30):
    try:
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"READ\n")
        entries, ended = [], False
        for line in s.makefile("r"):
            line = line.rstrip("\n")
            if line == "END":
                ended = True
                break
            entries.append(line.split(" ", 1)[1] if " " in line else line)
        if ended:
            break
        err = "READ ended without END"
    except OSError as e:
        err = str(e)
    time.sleep(1)
else:
    print(f"soak-datasets.sh: cannot read counter back: {err}", file=sys.stderr)
    sys.exit(1)
acked = [l.strip() for l in open(acked_path) if l.strip()]
have = set(entries)
missing = [v for v in acked if v not in have]
extra = len(have - set(acked))
with open(result_path, "w") as f:
    f.write(f"{len(acked)} {len(entries)} {len(missing)} {extra} {' '.join(missing[:10])}\n")
PY

# --- the report ----------------------------------------------------------------------------
ok=$(grep -c '^ok' "$dir/moves" || true)
fail=$(grep -c '^fail' "$dir/moves" || true)
echo "flockd: $flockd; soak of $minutes min on a 3-node flockd dev cluster: counter (flock-testapp," \
  "volume 64M${retention:+, retention $retention}) moved every $every s round-robin, writer at" \
  "$([ "$rate" -gt 0 ] && echo "$rate appends/s" || echo "full speed")"
[ -n "$note" ] && echo "note: $note"
echo
python3 - "$dir/rows" <<'PY'
import sys

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def num(x):
    try:
        return float(x)
    except ValueError:
        return None
def mib(x, kb=False):
    v = num(x)
    return "?" if v is None else f"{v / (1024 if kb else 1048576):.1f}"
print("| min | moves ok | moves failed | disk MiB | data KiB | snapshots (Raft) | snapshots per holder | flockd RSS MiB | flockd fds | acked appends |")
print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
for m, ok, fail, disk, data, snaps, per, _mx, rss, fds, acked in rows:
    d = num(data)
    print(f"| {m} | {ok} | {fail} | {mib(disk)} | {'?' if d is None else f'{d / 1024:.0f}'} | {snaps} | {per} | {mib(rss, True)} | {fds} | {acked} |")
print()
if len(rows) < 2:
    print("verdict: too short to tell (one row); run at least 6 minutes")
    sys.exit(0)
early, late = rows[1:4], rows[-3:]
def avg(rs, i):
    v = [num(r[i]) for r in rs]
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None
def mx(rs, i):
    v = [num(r[i]) for r in rs]
    v = [x for x in v if x is not None]
    return max(v) if v else None
problems, facts = [], []
# Disk: what grows beyond the live data's growth times the copies of it there can be (each
# holder's live tree and each of its snapshots; on ext4 a snapshot copies a changed file).
de, dl = avg(early, 3), avg(late, 3)
ge, gl = avg(early, 4), avg(late, 4)
per_holder = mx(late, 7)
copies = (per_holder if per_holder is not None else (mx(late, 5) or 0)) + 1
holders = max([len(r[6].split()) for r in rows if "=" in r[6]] or [3])
if de is not None and dl is not None:
    grow = max(0.0, (gl or 0) - (ge or 0)) if ge is not None else 0.0
    allowed = 0.10 * de + 1048576 + holders * copies * grow
    facts.append(f"disk {de / 1048576:.1f}->{dl / 1048576:.1f} MiB (allowed {(de + allowed) / 1048576:.1f}: +10% +1 MiB +{holders}x{copies:.0f} copies of the log's growth)")
    if dl - de > allowed:
        problems.append("disk")
se, sl = mx(early, 5), mx(late, 5)
if se is not None and sl is not None:
    facts.append(f"Raft snapshots {se:.0f}->{sl:.0f}")
    if sl > se + 2:
        problems.append("Raft snapshots")
he, hl = mx(early, 7), mx(late, 7)
if he is not None and hl is not None:
    facts.append(f"per-holder snapshots max {he:.0f}->{hl:.0f}")
    if hl > he + 2:
        problems.append("holder snapshots")
else:
    facts.append("per-holder snapshots: not reported")
re, rl = avg(early, 8), avg(late, 8)
if re is not None and rl is not None:
    facts.append(f"RSS {re / 1024:.0f}->{rl / 1024:.0f} MiB")
    if rl > re * 1.2 + 8 * 1024:
        problems.append("RSS")
fe, fl = avg(early, 9), avg(late, 9)
if fe is not None and fl is not None:
    facts.append(f"fds {fe:.0f}->{fl:.0f}")
    if fl > fe * 1.2 + 5:
        problems.append("fds")
short = " (short run: the windows overlap)" if len(rows) < 7 else ""
head = "flat" if not problems else "NOT flat (" + ", ".join(problems) + ")"
print(f"verdict: {head}, last 3 rows vs rows 2-4{short}: " + "; ".join(facts))
PY
echo
times=$(awk '$1 == "ok" { print $3 }' "$dir/moves" | sort -n)
if [ -n "$times" ]; then
  n=$(wc -l <<<"$times")
  echo "moves: $ok ok, $fail failed; ok moves took median $(sed -n "$(((n + 1) / 2))p" <<<"$times") s, max $(tail -1 <<<"$times") s"
else
  echo "moves: $ok ok, $fail failed"
fi
if [ -s "$dir/moves.err" ]; then
  echo "failed moves (first 5 of $fail):"
  head -5 "$dir/moves.err" | sed 's/^/  /'
fi
if [ -s "$dir/writer.stats" ]; then
  read -r werr wgap <"$dir/writer.stats"
  echo "writer: $werr failed requests (reconnected), longest time between two acks ${wgap} s"
fi
if ! $read_ok || [ ! -s "$dir/readback" ]; then
  echo "read-back: FAILED (counter could not be read)"
  exit 1
fi
read -r acked entries missing extra first <"$dir/readback" || true
echo "read-back: $acked acked appends, $entries entries in the log ($extra never acked), $missing acked missing"
if [ "$missing" -gt 0 ]; then
  echo "LOST acknowledged appends, e.g.: $first"
  exit 1
fi
