#!/usr/bin/env bash
# Failover (issue 17): kill -9 of the node that runs two stateful apps, the time until each serves
# again on its replica, and the acknowledged writes lost.
#
# Three real flockd processes on 127.0.0.1 (init + 2 joins, each its own --mesh-addr 127.0.0.N,
# dir backend, Raft defaults) in a temp dir. Two apps pinned to one node, each with
# `volume: {mountpoint: /data, replicas: 1, snapshot_interval: S}`:
#   counter: flock-testapp (an append-only log, fsync'ed before each OK)
#   redis:   Debian's redis-server, run by flock (process driver) on its dataset:
#            --appendonly yes --appendfsync always --save "" --dir "$FLOCK_DATASET_PATH"
# Each round: a writer per app (bench/failover_client.py: sequential values, the next as soon as
# one is acknowledged, one connection, a new one after any error) for W s; then the machine dies:
# SIGKILL of flockd, its fencing watchdog (DATA_DIR/fence/watch.lock) and both apps' process
# groups at once. Measured: from the kill to the first acknowledged write on a connection opened
# after it (the new primary); then everything the app holds is read back (READ / LRANGE) and each
# acknowledged write missing is classified against the snapshot the new primary started from
# (`flockctl events --json`: FailedOver's `snapshot`, auto-TIME, UTC, ms; the writers' monotonic
# times go to the wall clock with one offset each, measured at its start): missing although
# acknowledged before that snapshot (less 50 ms), or acknowledged by the new primary (on a
# connection opened after the kill), is a violation; so is an app running twice at once.
# The killed node is restarted (`flockd run`) and, as an operator would once they have copied out
# what they need, its diverged copies (the writes after the last replicated snapshot) are given
# up with `flockctl dataset drop-diverged NAME --node N --force`, so that it is a replica again.
# The next round runs wherever the apps run then (when they failed over to different nodes, redis
# is moved to counter's node with `app move`, a live move, first). A process sampler checks that
# no app ever ran twice at once.
#
#   bench/failover.sh [--rounds R] [--interval S] [--write-secs W] [--keep] [--no-results]
#                     [--redeploy-when-stuck]
#     defaults: 5 rounds, S = 1s (also e.g. 500ms), W = 4
#     --keep                 keep the temp dir (data dirs, flockd logs, writer files) and say where
#     --no-results           do not write bench/RESULTS.md
#     --redeploy-when-stuck  when the apps can get no replica holding a snapshot (a dataset with
#                            diverged copies on every other node, if drop-diverged failed), remove
#                            them and their datasets and deploy them afresh, instead of ending the
#                            run there
#
# Builds target/release/{flockd,flockctl,flock-testapp} first when missing or older than the
# sources, and asks cargo in any case (cargo build --release -p flock-node -p flock-testapp: about
# 10 minutes on 2 cores when it compiles, seconds when they are fresh); a run takes about 2 min;
# installs redis-server with apt-get when it is missing (never uses the system's service).
# Writes a section "Failover (issue 17)" to bench/RESULTS.md, between <!-- failover-bench KEY -->
# and <!-- end failover-bench KEY -->, KEY: the interval and --redeploy-when-stuck if given
# (replaced on the next run with the same KEY, appended otherwise).
# Exits 1 on a violation, a failed round or a setup failure; the figures are printed either way.
# shellcheck disable=SC2317 # cleanup and what it calls run from the EXIT trap
set -euo pipefail

rounds=5
interval=1s
write_secs=4
keep=false
results=true
redeploy=false
tolerance_ms=50
args_given="$*"
usage="usage: $0 [--rounds R] [--interval S] [--write-secs W] [--keep] [--no-results] [--redeploy-when-stuck]"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="${2:-}"; shift 2 ;;
    --interval) interval="${2:-}"; shift 2 ;;
    --write-secs) write_secs="${2:-}"; shift 2 ;;
    --keep) keep=true; shift ;;
    --no-results) results=false; shift ;;
    --redeploy-when-stuck) redeploy=true; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for v in "$rounds" "$write_secs"; do
  case "$v" in '' | *[!0-9]*) echo "$usage" >&2; exit 2 ;; esac
done
[[ "$interval" =~ ^[0-9]+(ms|s)$ ]] || { echo "$usage (S like 1s or 500ms)" >&2; exit 2; }
if [ "$rounds" -lt 1 ] || [ "$write_secs" -lt 1 ]; then
  echo "$usage (R and W at least 1)" >&2
  exit 2
fi

log() { echo "failover.sh: $*" >&2; }
command -v python3 >/dev/null || { log "needs python3"; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
client="$root/bench/failover_client.py"
bin="$root/target/release"
flockd="$bin/flockd"
flockctl="$bin/flockctl"
testapp="$bin/flock-testapp"

# --- binaries --------------------------------------------------------------------------------
# Built when missing or older than the sources. cargo is asked in any case (a no-op taking
# seconds when they are fresh): a binary linked after a source file changed may still have been
# compiled from the file before the change, which only cargo knows.
stale=""
for b in "$flockd" "$flockctl" "$testapp"; do
  if [ ! -x "$b" ]; then
    stale="$b is missing"
    break
  fi
  newer=$(find Cargo.toml Cargo.lock ./*/build.rs {node,proto,raft,scheduler,decide,dataset,tls,client,transport,testapp}/{src,Cargo.toml} \
    proto/proto \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock -o -name '*.proto' \) -newer "$b" -print -quit 2>/dev/null || true)
  if [ -n "$newer" ]; then
    stale="$b is older than $newer"
    break
  fi
done
if [ -n "$stale" ]; then
  log "$stale: building (cargo build --release -p flock-node -p flock-testapp: about 10 minutes on 2 cores when it compiles, seconds when cargo finds them fresh)"
else
  log "asking cargo whether the release binaries are fresh (cargo build --release -p flock-node -p flock-testapp; it says Compiling if they are not)"
fi
cargo build --release -p flock-node -p flock-testapp >&2 || { log "cargo build failed"; exit 1; }
if ! command -v redis-server >/dev/null; then
  log "redis-server is missing: apt-get install -y redis-server (its system service is not used)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2
fi
redis_version=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
started=$SECONDS # the run, without the build

# --- state, and the end ----------------------------------------------------------------------
dir=$(mktemp -d /tmp/flock-failover.XXXXXX)
conf="$dir/n1/admin.conf"
declare -a fpid=("" "" "" "")  # flockd pid of node 1..3 ("" while it is down)
declare -a port=("" "" "" "")
declare -a starts=(0 0 0 0)
writer_pids=()
watch_pid=""
failed=false
notes=()

# The pids of the processes of this run that are not tracked: apps (working directory under
# $dir) and flockd processes whose command line names $dir (fence-watch, a lost flockd).
strays() {
  local p pid cwd cmd
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = "$$" ] && continue
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    case "$cwd/" in
      "$dir"/*) echo "$pid"; continue ;;
    esac
    [ "$(cat "$p/comm" 2>/dev/null)" = flockd ] || continue
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    case "$cmd" in *"$dir"/*) echo "$pid" ;; esac
  done
}

# TERM, then KILL after $2 s, the pids $1 (space-separated) that still live.
term_then_kill() {
  local pids=$1 grace=$2 pid alive
  [ -n "${pids// /}" ] || return 0
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 $((grace * 5))); do
    alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
  for pid in $pids; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) did not end in $grace s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

cleanup() {
  local rc=$? i pids lines
  trap - EXIT INT TERM
  touch "$dir/stop-watch" 2>/dev/null || true
  for i in "${writer_pids[@]}" $watch_pid; do kill -TERM "$i" 2>/dev/null || true; done
  # flockd first (none starts an app again behind us), then the watchdogs and the apps.
  pids=""
  for i in 1 2 3; do [ -n "${fpid[i]}" ] && pids="$pids ${fpid[i]}"; done
  term_then_kill "$pids" 15
  for i in 1 2 3; do [ -n "${fpid[i]}" ] && { wait "${fpid[i]}" 2>/dev/null || true; }; done
  term_then_kill "$(strays | tr '\n' ' ')" 5
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ] || $failed; then
    for f in "$dir"/logs/*.err; do
      lines=$(grep ' ERROR \| WARN ' "$f" 2>/dev/null | grep -v openraft | tail -8 || true)
      [ -n "$lines" ] && printf -- '--- the last warnings and errors in %s:\n%s\n' "$f" "$lines" >&2
    done
  fi
  if $keep; then
    log "kept $dir (data dirs n1..n3, logs/, writer files r*/)"
  else
    rm -rf "$dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$dir/logs"
export FLOCK_NO_PLUGIN=true
export RUST_LOG="warn,flock_node=info,flock_raft=info,flock_client=info"

# A port free on 127.0.0.1 for TCP and UDP (flockd serves QUIC on its port too), below the
# ephemeral range, and not one of ours already.
free_port() {
  local p
  for _ in $(seq 1 50); do
    p=$((10000 + RANDOM % 20000))
    case " ${port[*]} ${used_ports:-} " in *" $p "*) continue ;; esac
    if python3 -c "import socket, sys
p = int(sys.argv[1])
for t in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    s = socket.socket(socket.AF_INET, t); s.bind(('127.0.0.1', p)); s.close()" "$p" 2>/dev/null; then
      used_ports="${used_ports:-} $p"
      echo "$p"
      return 0
    fi
  done
  log "no free port found"
  return 1
}

# start_node I MODE: flockd init|join|run of node I, in the background; waits for "ready".
start_node() {
  local i=$1 mode=$2 d="$dir/n$1" out err
  starts[i]=$((starts[i] + 1))
  out="$dir/logs/n$i.${starts[i]}.$mode.out"
  err="$dir/logs/n$i.${starts[i]}.$mode.err"
  case "$mode" in
    init) "$flockd" init --data-dir "$d" --listen "127.0.0.1:${port[i]}" --name "n$i" \
      --mesh-addr "127.0.0.$((i + 1))" >"$out" 2>"$err" & ;;
    join) "$flockd" join "127.0.0.1:${port[1]}" --token "$token" --data-dir "$d" \
      --listen "127.0.0.1:${port[i]}" --name "n$i" --mesh-addr "127.0.0.$((i + 1))" >"$out" 2>"$err" & ;;
    run) "$flockd" run --data-dir "$d" --mesh-addr "127.0.0.$((i + 1))" >"$out" 2>"$err" & ;;
  esac
  fpid[i]=$!
  for _ in $(seq 1 300); do
    grep -qs "^flockd: ready" "$out" && return 0
    kill -0 "${fpid[i]}" 2>/dev/null || break
    sleep 0.2
  done
  log "n$i ($mode) did not become ready:"
  tail -20 "$err" >&2
  return 1
}

# flockctl ARGS through the first live node that answers (for reads and idempotent commands).
ctl() {
  local i
  for i in 1 2 3; do
    [ -n "${fpid[i]}" ] || continue
    if timeout 30 "$flockctl" --config "$conf" --addr "127.0.0.1:${port[i]}" "$@" 2>"$dir/ctl.err"; then
      return 0
    fi
  done
  return 1
}

# The leader's API address, as a live node reports it ("" if none answers).
leader_addr() {
  ctl status --json 2>/dev/null | pj 'print(d.get("leader_addr") or "")' 2>/dev/null || true
}

# flockctl ARGS once, through the leader (else the first live node). A deploy through a follower
# can miss its volumes' replicas and snapshot_interval (see deploy_on).
ctl_leader() {
  local a
  a=$(leader_addr)
  if [ -n "$a" ]; then
    timeout 300 "$flockctl" --config "$conf" --addr "$a" "$@"
  else
    ctl_once "$@"
  fi
}

# flockctl ARGS once, through the first live node (for commands that must not run twice).
ctl_once() {
  local i
  for i in 1 2 3; do
    [ -n "${fpid[i]}" ] || continue
    timeout 300 "$flockctl" --config "$conf" --addr "127.0.0.1:${port[i]}" "$@"
    return
  done
  return 1
}

# JSON on stdin through a python3 expression on `d`, printed.
pj() { python3 -c "import json, sys
d = json.load(sys.stdin)
$1" "${@:2}"; }

# app_field APP FIELD: the field of app APP in `app ls --json` ("" when unknown).
app_field() {
  ctl app ls --json 2>/dev/null |
    pj 'print(next((str(a.get(sys.argv[2]) or "") for a in d if a["name"] == sys.argv[1]), ""))' "$1" "$2" \
      2>/dev/null || true
}

# has_base DATASET: "yes" if a replica of DATASET holds a recorded snapshot.
has_base() {
  ctl dataset ls "$1" --json 2>/dev/null |
    pj 'print("yes" if d and d[0].get("bases") else "no")' 2>/dev/null || echo no
}

# node_state NAME: its state in `node ls --json`.
node_state() {
  ctl node ls --json 2>/dev/null |
    pj 'print(next((str(n.get("state", "")) for n in d if n.get("name") == sys.argv[1]), ""))' "$1" \
      2>/dev/null || true
}

answers() { # answers APP: the app answers at its address
  case "$1" in
    counter) [ "$("$testapp" --ask "127.0.0.1:$cport" PING 2>/dev/null | cut -c1-4)" = PONG ] ;;
    redis) [ "$(redis-cli -h 127.0.0.1 -p "$rport" PING 2>/dev/null)" = PONG ] ;;
  esac
}

# wait_ready SECS: both apps running on one node, answering, each with a replica holding a
# snapshot; prints the node. Returns 1 (and says why) otherwise.
wait_ready() {
  local end=$((SECONDS + $1)) cn rn
  while [ $SECONDS -lt $end ]; do
    cn=$(app_field counter node)
    rn=$(app_field redis node)
    if [ -n "$cn" ] && [ "$cn" = "$rn" ] && [ "$(app_field counter state)" = running ] &&
      [ "$(app_field redis state)" = running ] && answers counter && answers redis &&
      [ "$(has_base "$cds")" = yes ] && [ "$(has_base "$rds")" = yes ]; then
      echo "$cn"
      return 0
    fi
    # No replica can come: every other node holds a diverged copy of a dataset.
    if [ "$(ctl dataset ls --json 2>/dev/null |
      pj 'print("yes" if any(x["name"] in sys.argv[1:] and not x.get("bases") and len(x.get("diverged") or []) >= 2
                             for x in d) else "no")' "$cds" "$rds" 2>/dev/null)" = yes ]; then
      log "a dataset has no replica and diverged copies on both other nodes: no replica can be added"
      break
    fi
    sleep 0.5
  done
  log "after $(($1 - (end - SECONDS))) s: counter on '${cn:-?}' ($(app_field counter state)), redis on '${rn:-?}' ($(app_field redis state));" \
    "a replica holding a snapshot: counter $(has_base "$cds"), redis $(has_base "$rds")"
  return 1
}

# --- the cluster -----------------------------------------------------------------------------
for i in 1 2 3; do port[i]=$(free_port); done
start_node 1 init || exit 1
token=$(sed -n 's/^flockd: join with token //p' "$dir/logs/n1.1.init.out" | head -1)
[ -n "$token" ] || { log "no join token in n1's output"; exit 1; }
start_node 2 join || exit 1
start_node 3 join || exit 1
for _ in $(seq 1 150); do
  voters=$(ctl status --json 2>/dev/null |
    pj 'print(sum(1 for m in d["members"] if m.get("role") == "voter" and m.get("health") == "healthy"))' \
      2>/dev/null || echo 0)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
[ "$voters" = 3 ] || { log "the cluster has $voters healthy voters, not 3"; ctl status >&2 || true; exit 1; }

# --- the apps --------------------------------------------------------------------------------
cport=$(free_port)
rport=$(free_port)
cat >"$dir/application.yml" <<EOF
version: 1
applications:
  counter:
    command: ["$testapp", "--listen", "127.0.0.1:$cport"]
    volume:
      mountpoint: /data
      replicas: 1
      snapshot_interval: $interval
    restart_policy:
      name: always
  redis:
    command: ["sh", "-c", "exec redis-server --port $rport --bind 127.0.0.1 --dir \"\$FLOCK_DATASET_PATH\" --appendonly yes --appendfsync always --save ''"]
    volume:
      mountpoint: /data
      replicas: 1
      snapshot_interval: $interval
    restart_policy:
      name: always
EOF
gen=1
deploy_on() { # deploy_on NODE: both apps pinned to NODE
  local n
  {
    echo "version: 1"
    echo "nodes:"
    for n in n1 n2 n3; do
      if [ "$n" = "$1" ]; then echo "  $n: [counter, redis]"; else echo "  $n: []"; fi
    done
  } >"$dir/deployment.yml"
  ctl_leader deploy "$dir/deployment.yml" "$dir/application.yml" >"$dir/logs/deploy.$gen.out" 2>&1 ||
    { log "deploy failed:"; cat "$dir/logs/deploy.$gen.out" >&2; return 1; }
  for _ in $(seq 1 100); do
    cds=$(app_field counter dataset)
    rds=$(app_field redis dataset)
    [ -n "$cds" ] && [ -n "$rds" ] && break
    sleep 0.2
  done
  if [ -z "$cds" ] || [ -z "$rds" ]; then
    log "the apps have no datasets after the deploy"
    return 1
  fi
  # flockd applies a volume's replicas and snapshot_interval after the deploy command, on the
  # state the node that took the deploy sees: a follower that has not applied the deploy yet
  # skips them, silently. Said, and applied by hand, if so.
  local ds want
  for ds in "$cds" "$rds"; do
    want=$(ctl dataset ls "$ds" --json 2>/dev/null | pj 'print(d[0].get("replicas_wanted") or 0)' 2>/dev/null || echo "?")
    if [ "$want" != 1 ]; then
      log "flock: after the deploy, dataset $ds asks for $want replicas, not 1: setting it by hand (dataset set --replicas 1 --interval $interval)"
      notes+=("after deploy $gen, dataset $ds asked for $want replicas (the volume's replicas and snapshot_interval were not applied); set by hand with flockctl dataset set")
      ctl_leader dataset set "$ds" --replicas 1 --interval "$interval" >>"$dir/logs/deploy.$gen.out" 2>&1 ||
        { log "dataset set failed: $(tail -2 "$dir/logs/deploy.$gen.out" | tr '\n' ' ')"; return 1; }
    fi
  done
}
deploy_on n1 || exit 1
wait_ready 90 >/dev/null || { log "the apps did not come up with replicas"; ctl app ls >&2 || true; exit 1; }

# A fresh pair of apps (and datasets) when the current ones cannot get a replica any more. The
# apps are first deployed again pinned where they run: a failover leaves an app's pin on the
# node it failed over from, and `app rm` of one app re-plans the other to its pin, which a
# diverged copy refuses.
redeploy() {
  local on ds
  on=$(app_field counter node)
  log "removing counter and redis and their datasets ($cds, $rds), deploying them afresh on $on"
  deploy_on "$on" || return 1
  for app in counter redis; do
    ctl_leader app rm "$app" >>"$dir/logs/redeploy.$gen.out" 2>&1 ||
      { log "app rm $app failed: $(tail -2 "$dir/logs/redeploy.$gen.out" | tr '\n' ' ')"; return 1; }
  done
  for ds in "$cds" "$rds"; do
    for _ in $(seq 1 60); do
      ctl_leader dataset rm "$ds" >>"$dir/logs/redeploy.$gen.out" 2>&1 && break
      sleep 0.5
    done
  done
  gen=$((gen + 1))
  deploy_on "$on" && wait_ready 120 >/dev/null
}

watch_stop="$dir/stop-watch"
python3 "$client" watch "$dir" "$dir/instances" "$watch_stop" &
watch_pid=$!

# --- the rounds ------------------------------------------------------------------------------
rows="$dir/rows.jsonl"
: >"$rows"
done_rounds=0
stuck=""
for r in $(seq 1 "$rounds"); do
  cn=$(app_field counter node)
  rn=$(app_field redis node)
  if [ -n "$cn" ] && [ -n "$rn" ] && [ "$cn" != "$rn" ]; then
    log "round $r: counter runs on $cn, redis on $rn: moving redis to $cn (flockctl app move)"
    ctl_leader app move redis --to "$cn" >"$dir/logs/move.$r.out" 2>&1 ||
      log "app move failed: $(tail -3 "$dir/logs/move.$r.out" | tr '\n' ' ')"
    notes+=("round $r: redis moved to $cn first (the apps had failed over to different nodes)")
  fi
  why=""
  if ! on=$(wait_ready 90); then
    log "round $r: the apps are not ready for a failover:"
    ctl app ls >&2 || true
    ctl dataset ls "$cds" >&2 || true
    ctl dataset ls "$rds" >&2 || true
    why=$(for ds in "$cds" "$rds"; do
      ctl dataset ls "$ds" --json 2>/dev/null | pj 'x = d[0]
if x.get("diverged"):
    print(x["name"] + " (primary " + str(x.get("primary")) + "): diverged copies on "
          + " ".join(map(str, x["diverged"])) + ", replicas " + str(x.get("replicas")))' 2>/dev/null || true
    done)
    if [ -n "$why" ]; then
      why="$(tr '\n' ';' <<<"$why") a node holding a diverged copy is not made a replica until \`dataset drop-diverged\` gives the copy up"
      log "round $r: $why"
    fi
    if $redeploy; then
      notes+=("round $r: the apps have no replica holding a snapshot${why:+ ($why)}; removed with their datasets and deployed afresh on the node they ran on (generation $((gen + 1)))")
      if ! redeploy || ! on=$(wait_ready 90); then
        stuck="round $r: the redeployed apps did not come up with replicas"
        break
      fi
    else
      stuck="round $r: the apps have no replica holding a snapshot${why:+: $why}"
      break
    fi
  fi
  k=${on#n}
  rdir="$dir/r$r"
  mkdir -p "$rdir"
  ctl dataset ls "$cds" >"$rdir/counter.before.txt" 2>&1 || true
  ctl dataset ls "$rds" >"$rdir/redis.before.txt" 2>&1 || true
  leader=$(ctl status --json 2>/dev/null | pj 'print(d.get("leader_addr") or "")' 2>/dev/null || true)
  was_leader=no
  [ "$leader" = "127.0.0.1:${port[k]}" ] && was_leader=yes
  dog=$(tr -dc 0-9 <"$dir/n$k/fence/watch.lock" 2>/dev/null || true)
  if [ -z "$dog" ] || ! tr '\0' ' ' <"/proc/$dog/cmdline" 2>/dev/null | grep -q fence-watch; then
    log "round $r: no fencing watchdog of n$k found (pid '$dog' from n$k/fence/watch.lock)"
    dog=""
  fi
  cpid=$(app_field counter id)
  rpid=$(app_field redis id)
  for p in "$cpid" "$rpid"; do
    case "$(readlink "/proc/$p/cwd" 2>/dev/null)/" in
      "$dir/n$k"/*) ;;
      *) log "round $r: app pid '$p' is not a process working in n$k's data dir"; exit 1 ;;
    esac
  done

  stop="$rdir/stop"
  writer_pids=()
  python3 "$client" write testapp "127.0.0.1:$cport" "$rdir/counter.acked" "$stop" "g${gen}r$r" &
  writer_pids+=($!)
  python3 "$client" write redis "127.0.0.1:$rport" "$rdir/redis.acked" "$stop" "g${gen}r$r" &
  writer_pids+=($!)
  sleep "$write_secs"

  # The machine dies: flockd, its watchdog and the apps' process groups, at once.
  t_kill=$EPOCHREALTIME
  echo "$t_kill" >"$rdir/kill"
  # shellcheck disable=SC2086 # $dog is empty or one pid
  kill -s KILL -- "${fpid[k]}" $dog "-$cpid" "-$rpid" || log "round $r: kill -9 failed for some of: ${fpid[k]} $dog -$cpid -$rpid"
  wait "${fpid[k]}" 2>/dev/null || true
  fpid[k]=""
  log "round $r: killed n$k$([ "$was_leader" = yes ] && echo " (the Raft leader)") with counter and redis after ${write_secs} s of writes"

  served_ok=true
  for app in counter redis; do
    python3 "$client" served "$rdir/$app.acked" "$t_kill" 60 >/dev/null ||
      { served_ok=false; log "round $r: $app did not serve again within 60 s of the kill"; }
  done
  sleep 1
  touch "$stop"
  for p in "${writer_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  writer_pids=()

  ctl events --json >"$rdir/events.json" 2>/dev/null || echo "[]" >"$rdir/events.json"
  ctl node ls --json >"$rdir/nodes.json" 2>/dev/null || echo "[]" >"$rdir/nodes.json"
  ctl events >"$rdir/events.txt" 2>&1 || true
  ctl app ls >"$rdir/apps.txt" 2>&1 || true
  python3 "$client" read testapp "127.0.0.1:$cport" "$rdir/counter.held" 30 || : >"$rdir/counter.held"
  python3 "$client" read redis "127.0.0.1:$rport" "$rdir/redis.held" 30 || : >"$rdir/redis.held"
  for app in counter redis; do
    ds=$cds
    [ "$app" = redis ] && ds=$rds
    # Every writer file of this generation of the app, this round's last.
    echo "$rdir/$app.acked" >>"$dir/acked.$gen.$app"
    mapfile -t acked <"$dir/acked.$gen.$app"
    python3 "$client" round "$app" "$r" "$t_kill" "n$k" "$ds" "$rdir/events.json" "$rdir/nodes.json" \
      "$rdir/$app.held" "$dir/lost.$gen.$app.json" "$rows" "$tolerance_ms" "$was_leader" "${acked[@]}"
  done
  done_rounds=$r
  $served_ok || { stuck="round $r: an app did not serve again within 60 s of the kill"; break; }

  # The dead node comes back.
  start_node "$k" run || { stuck="round $r: n$k did not restart"; break; }
  for _ in $(seq 1 150); do
    st=$(node_state "n$k")
    [ -n "$st" ] && [ "$st" != down ] && break
    sleep 0.2
  done
  log "round $r: n$k restarted ($(node_state "n$k"))"
  # Its copies diverged (the writes after the last replicated snapshot): an operator who has
  # what they need gives them up, and the node is a replica again for the next round.
  for ds in "$cds" "$rds"; do
    if ! ctl_leader dataset drop-diverged "$ds" --node "n$k" --force >>"$dir/logs/drop.$r.out" 2>&1; then
      log "round $r: drop-diverged $ds on n$k failed: $(tail -1 "$dir/logs/drop.$r.out")"
      notes+=("round $r: flockctl dataset drop-diverged $ds --node n$k failed: $(tail -1 "$dir/logs/drop.$r.out")")
    fi
  done
done

touch "$watch_stop"
wait "$watch_pid" 2>/dev/null || true
watch_pid=""

# --- the report ------------------------------------------------------------------------------
most_c=$(awk '$1 == "flock-testapp" { print $2 }' "$dir/instances" 2>/dev/null || true)
most_r=$(awk '$1 == "redis-server" { print $2 }' "$dir/instances" 2>/dev/null || true)
violations=$(grep -c '"violations": \["' "$rows" || true)
[ -n "$stuck" ] && failed=true
[ "${violations:-0}" -gt 0 ] && failed=true
for m in "$most_c" "$most_r"; do [ -n "$m" ] && [ "$m" -gt 1 ] && failed=true; done
dur=$((SECONDS - started))
head_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null | awk '$2 !~ /^bench\// { print $2 }' | tr '\n' ' ')
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
[ -n "$stuck" ] && notes+=("NOT COMPLETED: $stuck; $done_rounds of $rounds rounds measured")
meta="$dir/meta.json"
python3 - "$meta" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$(nproc) CPUs ($cpu), Linux $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end" \
  "$head_rev${dirty:+ (the worktree has uncommitted changes to: ${dirty% })}, release build; redis-server $redis_version (Debian)" \
  "bench/failover.sh${args_given:+ $args_given}" "took $((dur / 60)) min $((dur % 60)) s" "$interval" "$interval$($redeploy && echo " redeploy-when-stuck")" \
  "3 flockd on 127.0.0.1 (init + 2 joins, routing mesh on 127.0.0.2-4), dir backend on ext4, Raft and lease defaults (heartbeat 100 ms, election timeout 300 ms, lease 2.5 s, declared down after lease + 1 s); two apps pinned to one node, each volume {replicas: 1, snapshot_interval: $interval}: counter (flock-testapp, fsync before each OK) and redis (redis-server --appendonly yes --appendfsync always --save '' in its dataset); one writer per app, sequential appends as fast as acknowledged on one connection (a new one after an error, tried every 10 ms), $write_secs s before the kill" \
  "kill -9 of the apps' node (flockd, its fencing watchdog and both apps' process groups at once); declared down / failed over = the NodeDown / FailedOver events' times after the kill; serving again = from the kill to the first write acknowledged on a connection opened after it; lost = acknowledged writes missing when everything the app holds is read back, classified against the time in the name of the snapshot the new primary started from (FailedOver event), $tolerance_ms ms tolerance; the killed node restarted with flockd run between rounds and its diverged copies given up (flockctl dataset drop-diverged --force), so that it is a replica again; most instances at once sampled every 50 ms over the whole run" \
  "$most_c" "$most_r" "${notes[@]}" <<'PY'
import json, sys
(path, date, machine, flock, command, duration, interval, key, setup, measured, most_c, most_r,
 *notes) = sys.argv[1:]
json.dump({
    "date": date, "machine": machine, "flock": flock, "command": command,
    "duration": duration, "interval": interval, "key": key, "setup": setup, "measured": measured,
    "notes": notes,
    "most_instances": {k: int(v) for k, v in (("counter", most_c), ("redis", most_r)) if v},
}, open(path, "w"))
PY
echo
echo "failover: $done_rounds of $rounds rounds, snapshot_interval $interval, $write_secs s of writes before each kill; flock $head_rev, redis $redis_version"
for n in "${notes[@]}"; do echo "note: $n"; done
echo
target="-"
$results && target="$root/bench/RESULTS.md"
python3 "$client" report "$rows" "$meta" "$target"
echo
echo "took $((dur / 60)) min $((dur % 60)) s"
if [ -n "$stuck" ]; then
  echo "!!! FAILED: $stuck"
fi
if [ "${violations:-0}" -gt 0 ]; then
  echo "!!! VIOLATIONS in $violations app-round(s): see the lines marked VIOLATION above"
fi
for m in "$most_c" "$most_r"; do
  if [ -n "$m" ] && [ "$m" -gt 1 ]; then echo "!!! VIOLATION: an app ran $m times at once"; fi
done
$failed && exit 1
exit 0
