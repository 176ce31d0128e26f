#!/usr/bin/env python3
"""The clients and the arithmetic of bench/failover.sh (see there). Python 3 standard library only.

  failover_client.py write KIND ADDR OUT STOP PREFIX
      Appends PREFIX-1, PREFIX-2, ... to the app at ADDR (KIND: testapp: `APPEND v` -> `OK n`;
      redis: RPUSH flock v -> `:n`) on one connection, the next as soon as one is acknowledged,
      on a new connection after any error (a new attempt every 10 ms while none can be made),
      until the file STOP exists or SIGTERM. OUT: first `# offset O` (wall clock = monotonic + O,
      measured once at start), then `# conn N T` when connection N opens and `VALUE N T` for
      each acknowledged value (T: time.monotonic() when the acknowledgement was read).
  failover_client.py read KIND ADDR OUT [TIMEOUT]
      Every value the app holds, one a line, in its order (testapp READ; redis LRANGE flock 0 -1);
      retries for TIMEOUT seconds (default 30) while the app does not answer or is loading.
  failover_client.py served FILE KILL [WAIT]
      The ms from KILL (wall clock, s) to the first acknowledgement in FILE on a connection
      opened after KILL, waiting up to WAIT s (default 0) for one; nothing (exit 1) if none.
  failover_client.py watch DIR OUT STOP
      Every 50 ms until STOP exists: the processes whose working directory is under DIR, by
      command name (comm); writes to OUT, when it ends and every second, `COMM MOST` lines: the
      most that were alive at once (zombies aside).
  failover_client.py round ...        one app's figures for one round (see `round_cmd`)
  failover_client.py report ...       the summary and the RESULTS.md section (see `report_cmd`)
"""

import datetime
import json
import os
import re
import signal
import socket
import statistics
import sys
import time

LIST = b"flock"


def offset():
    """wall - monotonic, from the tightest of a few paired readings."""
    best = None
    for _ in range(7):
        a = time.monotonic()
        w = time.time()
        b = time.monotonic()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) / 2)
    return best[1]


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


# --- write ------------------------------------------------------------------------------------
def write_cmd(kind, addr, out_path, stop_path, prefix):
    host, port = split_addr(addr)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    out = open(out_path, "w")
    out.write(f"# offset {offset():.6f}\n")
    out.flush()
    buf = []
    last_flush = time.monotonic()
    sock = rf = None
    conn = i = errors = 0
    while not stopping and not os.path.exists(stop_path):
        if sock is None:
            try:
                sock = socket.create_connection((host, port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rf = sock.makefile("rb")
                conn += 1
                buf.append(f"# conn {conn} {time.monotonic():.6f}\n")
            except OSError:
                sock = None
                time.sleep(0.01)
                continue
        i += 1
        v = f"{prefix}-{i}"
        try:
            if kind == "redis":
                sock.sendall(resp(b"RPUSH", LIST, v))
                line = rf.readline()
                ok = line.startswith(b":")
            else:
                sock.sendall(f"APPEND {v}\n".encode())
                line = rf.readline()
                ok = line.startswith(b"OK ")
        except (OSError, ValueError):
            line, ok = b"", False
        t = time.monotonic()
        if ok:
            buf.append(f"{v} {conn} {t:.6f}\n")
        else:
            errors += 1
            try:
                sock.close()
            except OSError:
                pass
            sock = None
            if line:  # an error reply (redis: LOADING while it reads its AOF): not too fast
                time.sleep(0.01)
        if t - last_flush > 0.2:
            out.write("".join(buf))
            out.flush()
            buf.clear()
            last_flush = t
    buf.append(f"# end {time.monotonic():.6f} errors {errors}\n")
    out.write("".join(buf))
    out.close()


def load_acked(path):
    """(offset, {conn: opened_mono}, [(value, conn, mono)])"""
    off, conns, acks = 0.0, {}, []
    with open(path) as f:
        for line in f:
            p = line.split()
            if not p:
                continue
            if p[0] == "#":
                if p[1] == "offset":
                    off = float(p[2])
                elif p[1] == "conn" and len(p) == 4:
                    conns[int(p[2])] = float(p[3])
                continue
            if len(p) == 3:
                acks.append((p[0], int(p[1]), float(p[2])))
    return off, conns, acks


def first_after(path, kill):
    """(wall time of the first ack on a connection opened after kill, of the last ack before)"""
    off, conns, acks = load_acked(path)
    first = last = None
    for v, c, t in acks:
        w = t + off
        if conns.get(c, 0) + off <= kill:
            last = w  # the old primary (also in the few ms it lives after KILL was read)
        elif first is None:
            first = w
    return first, last


def served_cmd(path, kill, wait="0"):
    kill = float(kill)
    end = time.monotonic() + float(wait)
    while True:
        try:
            first, _ = first_after(path, kill)
        except OSError:
            first = None
        if first is not None:
            print(f"{(first - kill) * 1000:.0f}")
            return
        if time.monotonic() >= end:
            sys.exit(1)
        time.sleep(0.05)


# --- read -------------------------------------------------------------------------------------
def read_testapp(host, port):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"READ\n")
    vals = []
    for line in s.makefile("r"):
        line = line.rstrip("\n")
        if line == "END":
            return vals
        vals.append(line.split(" ", 1)[1] if " " in line else line)
    raise OSError("READ ended without END")


def read_redis(host, port):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(resp(b"LRANGE", LIST, 0, -1))
    f = s.makefile("rb")
    head = f.readline()
    if head.startswith(b"-"):
        raise OSError(head.decode(errors="replace").strip())
    if not head.startswith(b"*"):
        raise OSError(f"unexpected reply {head!r}")
    n = int(head[1:])
    vals = []
    for _ in range(max(n, 0)):
        h = f.readline()
        if not h.startswith(b"$"):
            raise OSError(f"unexpected bulk header {h!r}")
        data = f.read(int(h[1:]) + 2)
        vals.append(data[:-2].decode())
    return vals


def read_cmd(kind, addr, out_path, timeout="30"):
    host, port = split_addr(addr)
    deadline = time.monotonic() + float(timeout)
    err = None
    while time.monotonic() < deadline:
        try:
            vals = (read_redis if kind == "redis" else read_testapp)(host, port)
            with open(out_path, "w") as f:
                f.write("".join(v + "\n" for v in vals))
            return
        except (OSError, ValueError) as e:
            err = e
            time.sleep(0.2)
    print(f"failover_client.py: cannot read {kind} at {addr}: {err}", file=sys.stderr)
    sys.exit(1)


# --- watch ------------------------------------------------------------------------------------
def watch_cmd(root, out_path, stop_path):
    root = os.path.realpath(root).rstrip("/") + "/"
    most = {}
    last_write = 0.0

    def dump():
        with open(out_path + ".tmp", "w") as f:
            for comm, n in sorted(most.items()):
                f.write(f"{comm} {n}\n")
        os.replace(out_path + ".tmp", out_path)

    while not os.path.exists(stop_path):
        now = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
                if not (cwd + "/").startswith(root):
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                if stat[stat.rindex(")") + 2] == "Z":
                    continue
            except (OSError, ValueError):
                continue
            now[comm] = now.get(comm, 0) + 1
        for comm, n in now.items():
            most[comm] = max(most.get(comm, 0), n)
        t = time.monotonic()
        if t - last_write > 1:
            dump()
            last_write = t
        time.sleep(0.05)
    dump()


# --- round ------------------------------------------------------------------------------------
SNAP_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2})-(\d{2})-(\d{2})\.(\d{3})Z")


def snapshot_time(name, unix):
    """(wall time the snapshot was taken, how it is known): from its name (auto-TIME, UTC, ms,
    read just before the snapshot is taken), else from the event's snapshot_unix (s, rounded
    down), else 0."""
    m = SNAP_TIME.search(name or "")
    if m:
        y, mo, d, h, mi, s, ms = map(int, m.groups())
        t = datetime.datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=datetime.timezone.utc)
        return t.timestamp(), "name"
    if unix:
        return float(unix), "snapshot_unix"
    return 0.0, "none"


def round_cmd(args):
    """round APP ROUND KILL FROM DATASET EVENTS HELD LOSTSTATE ROWS TOLERANCE_MS LEADER ACKED...

    KILL: wall time of the kill (s). FROM: the killed node's name. EVENTS: `flockctl events
    --json` after the failover; NODES: `flockctl node ls --json` (id -> name). HELD: what the
    app holds now. LOSTSTATE: JSON of values already counted as lost in earlier rounds (updated).
    ROWS: the round's row is appended (JSON a line). ACKED: the writers' files of this app's
    generation, this round's last. Prints the round's line; violations loudly on stderr."""
    (app, rnd, kill, from_node, dataset, events_p, nodes_p, held_p, lost_p, rows_p, tol, leader,
     *acked_paths) = args
    kill = float(kill)
    tol = float(tol) / 1000
    text = open(events_p).read()
    try:
        events = json.loads(text)
    except ValueError:  # JSON lines
        events = [json.loads(l) for l in text.splitlines() if l.strip()]
    if isinstance(events, dict):
        events = [events]
    try:
        names = {str(n["id"]): n["name"] for n in json.load(open(nodes_p))}
    except (OSError, ValueError, KeyError, TypeError):
        names = {}
    name = lambda i: names.get(str(i), f"#{i}")  # noqa: E731
    fo = down = None
    for e in events:
        if e.get("at_unix_ms", 0) < kill * 1000 - 1:
            continue
        kind, body = next(iter(e["event"].items())) if isinstance(e.get("event"), dict) else (e.get("event"), {})
        if kind == "FailedOver" and body.get("dataset") == dataset and fo is None:
            fo = (e, body)
        if kind == "NodeDown" and name(body.get("node")) == from_node and down is None:
            down = e
    held = set(l.rstrip("\n") for l in open(held_p))
    try:
        lost_before = set(json.load(open(lost_p)))
    except (OSError, ValueError):
        lost_before = set()
    row = {"round": int(rnd), "app": app, "from": from_node, "leader_killed": leader == "yes",
           "violations": []}
    if fo:
        e, body = fo
        snap_t, how = snapshot_time(body.get("snapshot"), body.get("snapshot_unix"))
        row.update(to=name(body.get("to")), snapshot=body.get("snapshot"), snapshot_from=how,
                   failed_over_ms=round(e["at_unix_ms"] - kill * 1000),
                   snapshot_age_ms=round((kill - snap_t) * 1000) if snap_t else None,
                   at_risk_ms=body.get("at_risk_ms"))
    else:
        snap_t, how = 0.0, "none"
        row.update(to=None, snapshot=None, snapshot_from="none", failed_over_ms=None,
                   snapshot_age_ms=None, at_risk_ms=None)
        row["violations"].append(f"no FailedOver event for dataset {dataset} after the kill")
    row["down_ms"] = round(down["at_unix_ms"] - kill * 1000) if down else None
    cur = acked_paths[-1]
    first, last = first_after(cur, kill)
    row["serve_ms"] = round((first - kill) * 1000) if first else None
    row["gap_ms"] = round((first - last) * 1000) if first and last else None
    if first is None:
        row["violations"].append("no write acknowledged after the kill")
    lost_after, lost_early, lost_new, acked_round = [], [], [], 0
    for p in acked_paths:
        off, conns, acks = load_acked(p)
        if p == cur:
            acked_round = len(acks)
        for v, c, t in acks:
            w = t + off
            if v in held or v in lost_before:
                continue
            if p == cur and w > kill and conns.get(c, 0) + off > kill:
                # on a connection opened after the kill: acknowledged by the new primary
                lost_new.append((v, w))
            elif w < snap_t - tol:
                lost_early.append((v, w))
            else:
                lost_after.append((v, w))
    row.update(acked=acked_round, lost_after=len(lost_after), lost_before=len(lost_early),
               lost_after_kill=len(lost_new))
    if lost_after:
        row["lost_after_span_ms"] = [round((lost_after[0][1] - snap_t) * 1000),
                                     round((lost_after[-1][1] - snap_t) * 1000)]
    for what, lst in (("acknowledged BEFORE the snapshot the new primary started from", lost_early),
                      ("acknowledged by the new primary (on a connection opened after the kill)", lost_new)):
        if lst:
            ex = ", ".join(f"{v} ({(w - snap_t) * 1000:+.0f} ms from the snapshot)" for v, w in lst[:5])
            row["violations"].append(f"{len(lst)} lost writes {what}, e.g. {ex}")
    json.dump(sorted(lost_before | {v for v, _ in lost_after + lost_early + lost_new}), open(lost_p, "w"))
    with open(rows_p, "a") as f:
        f.write(json.dumps(row) + "\n")
    fmt = lambda ms: "-" if ms is None else f"{ms / 1000:.2f} s"  # noqa: E731
    print(f"round {rnd}  {app:<8} {from_node} -> {row['to'] or '?'}"
          f"{' (the leader)' if row['leader_killed'] else ''}:"
          f" declared down after {fmt(row['down_ms'])}, failed over after {fmt(row['failed_over_ms'])},"
          f" serving again after {fmt(row['serve_ms'])}"
          f" (last ack before the kill to first after: {fmt(row['gap_ms'])});"
          f" {acked_round} writes acked, lost {len(lost_after)} after the snapshot /"
          f" {len(lost_early)} before it / {len(lost_new)} acked after the kill;"
          f" snapshot {row['snapshot'] or '-'} ({fmt(row['snapshot_age_ms'])} before the kill)")
    for v in row["violations"]:
        print(f"!!! VIOLATION round {rnd} {app}: {v}", file=sys.stderr)
        print(f"!!! VIOLATION round {rnd} {app}: {v}")


# --- report -----------------------------------------------------------------------------------
PEERS = [
    ("Docker Swarm", "after ~15 s", "never: reschedules only stateless tasks", "no fencing"),
    ("Nomad", "marked down after 20-30 s", "by default leaves the old allocations running", "-"),
    ("Kubernetes", "-", "never replaces a StatefulSet pod on an unreachable node; force-detaches its volume after 6 minutes", "-"),
    ("Longhorn", "-", "users report 2-8 minutes", "-"),
    ("Patroni (PostgreSQL)", "-", "about 45 s with its defaults", "-"),
]


def pct(vals, q):
    """nearest-rank percentile (with fewer than 100 values, p99 is the max)"""
    s = sorted(vals)
    k = max(0, min(len(s) - 1, -(-q * len(s) // 100) - 1))
    return s[int(k)]


def report_cmd(args):
    """report ROWS META RESULTS|- : META: JSON with date, machine, command, interval, notes..."""
    rows_p, meta_p, results_p = args
    rows = [json.loads(l) for l in open(rows_p) if l.strip()] if os.path.exists(rows_p) else []
    meta = json.load(open(meta_p))
    apps = []
    for r in rows:
        if r["app"] not in apps:
            apps.append(r["app"])
    out = []
    ms = lambda v: "-" if v is None else f"{v / 1000:.2f}"  # noqa: E731
    out.append("| round | app | killed node | to | killed node was the leader | declared down (s) | serving again (s) | writes acked | lost after the snapshot | lost before it | lost, acked by the new primary | snapshot age at the kill (s) | lost writes acked, from the snapshot (ms) |")
    out.append("|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        span = r.get("lost_after_span_ms")
        out.append(f"| {r['round']} | {r['app']} | {r['from']} | {r['to'] or '?'} | {'yes' if r['leader_killed'] else 'no'}"
                   f" | {ms(r['down_ms'])} | {ms(r['serve_ms'])} | {r['acked']}"
                   f" | {r['lost_after']} | {r['lost_before']} | {r['lost_after_kill']} | {ms(r['snapshot_age_ms'])}"
                   f" | {f'+{span[0]} to +{span[1]}' if span else '-'} |")
    out.append("")
    out.append("| app | rounds | serving again: median (s) | p99 (s) | max (s) | writes acked | lost after the last replicated snapshot | lost before it (violations) | lost, acked by the new primary (violations) | most instances at once | target (median <= 5 s, p99 <= 8 s, no loss before the snapshot) |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    most = meta.get("most_instances", {})
    for app in apps:
        rs = [r for r in rows if r["app"] == app]
        serve = [r["serve_ms"] for r in rs if r["serve_ms"] is not None]
        med = statistics.median(serve) if serve else None
        p99 = pct(serve, 99) if serve else None
        mx = max(serve) if serve else None
        before = sum(r["lost_before"] for r in rs)
        after_kill = sum(r["lost_after_kill"] for r in rs)
        inst = most.get(app)
        met = (serve and len(serve) == len(rs) and med <= 5000 and p99 <= 8000 and before == 0
               and after_kill == 0 and (inst is None or inst <= 1))
        out.append(f"| {app} | {len(rs)} | {ms(med)} | {ms(p99)} | {ms(mx)} | {sum(r['acked'] for r in rs)}"
                   f" | {sum(r['lost_after'] for r in rs)} | {before} | {after_kill} | {inst if inst is not None else '?'}"
                   f" | {'met' if met else 'NOT met'} |")
    out.append("")
    parts = []
    for lead, what in ((True, "the killed node was the Raft leader (a new leader first waits lease + margin from its election)"),
                       (False, "it was not")):
        rs = [r for r in rows if r["leader_killed"] == lead and r.get("serve_ms") is not None]
        if rs:
            parts.append(f"median {ms(statistics.median(r['serve_ms'] for r in rs))} s to serve again"
                         f" ({ms(statistics.median(r['down_ms'] for r in rs if r.get('down_ms') is not None))} s to be declared down)"
                         f" over the {len(rs)} app failovers where {what}")
    if parts:
        out.append("By the kind of node killed: " + "; ".join(parts) + ".")
        out.append("")
    for r in rows:
        for v in r.get("violations", []):
            out.append(f"VIOLATION round {r['round']} {r['app']}: {v}")
    if any(r.get("violations") for r in rows):
        out.append("")
    out.append("flock beside the published figures of its peers (from issue 17; the peers are not measured here):")
    out.append("")
    out.append("| system | a dead node noticed | its stateful workload serving again | fencing |")
    out.append("|---|---|---|---|")
    downs = [r["down_ms"] for r in rows if r.get("down_ms") is not None]
    serves = [r["serve_ms"] for r in rows if r.get("serve_ms") is not None]
    if serves:
        out.append(f"| flock, this run ({len(serves)} app failovers) | declared down after"
                   f" {ms(statistics.median(downs)) if downs else '-'} s (median) | median {ms(statistics.median(serves))} s,"
                   f" max {ms(max(serves))} s, from the last replicated snapshot | lease: the node's stateful apps are"
                   " stopped (by its watchdog if flockd is gone) before a replica may start |")
    for name, notice, back, fence in PEERS:
        out.append(f"| {name} | {notice} | {back} | {fence} |")
    table = "\n".join(out)
    print(table)
    if results_p == "-":
        return
    key = meta.get("key") or meta["interval"]
    begin = f"<!-- failover-bench {key} -->"
    end = f"<!-- end failover-bench {key} -->"
    title = f"snapshot_interval {meta['interval']}" + (", apps redeployed when stuck" if key != meta["interval"] else "")
    sec = [begin, f"## Failover (issue 17): {title}", ""]
    sec.append(f"- date: {meta['date']}")
    sec.append(f"- machine: {meta['machine']}")
    sec.append(f"- flock: {meta['flock']}")
    sec.append(f"- command: `{meta['command']}` ({meta['duration']})")
    sec.append(f"- setup: {meta['setup']}")
    sec.append(f"- measured: {meta['measured']}")
    for n in meta.get("notes", []):
        sec.append(f"- {n}")
    sec += ["", table, ""]
    if meta.get("verdict"):
        sec += [meta["verdict"], ""]
    sec.append(end)
    text = open(results_p).read() if os.path.exists(results_p) else ""
    block = "\n".join(sec) + "\n"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end)
        if text[b:b + 1] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(results_p + ".tmp", "w") as f:
        f.write(text)
    os.replace(results_p + ".tmp", results_p)


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, rest = a[0], a[1:]
    if cmd == "write" and len(rest) == 5:
        write_cmd(*rest)
    elif cmd == "read" and len(rest) in (3, 4):
        read_cmd(*rest)
    elif cmd == "served" and len(rest) in (2, 3):
        served_cmd(*rest)
    elif cmd == "watch" and len(rest) == 3:
        watch_cmd(*rest)
    elif cmd == "round" and len(rest) >= 13:
        round_cmd(rest)
    elif cmd == "report" and len(rest) == 3:
        report_cmd(rest)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
