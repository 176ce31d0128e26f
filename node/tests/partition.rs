//! Failover under a real network partition (issue 17): three flockd processes on loopback, and
//! iptables cuts the node running a stateful app (with a replica) off from the other two while
//! its flockd, its fencing watchdog and the app keep running. The isolated node fences the app
//! within the lease, the majority fails it over to the replica only after lease + margin, never
//! two instances serve at once (counted through /proc and by which instance acknowledged each
//! write), no write acknowledged before the last replicated snapshot is lost, the isolated node
//! starts nothing while cut off, and once healed it serves nothing, keeps its diverged writes
//! (snapshot `diverged-EPOCH`, holding every write the old instance acknowledged), is a replica
//! again and the cluster works through it.
//!
//! How the partition is made: a flockd uses one port P for gRPC (Raft and the API, TCP) and
//! QUIC (snapshot streams, UDP), and every node and every client share 127.0.0.1, so the node
//! cannot be cut off by address. Its flockd is moved into a cgroup (v2) of this test's own,
//! and a chain of this test's own, hooked into OUTPUT on `lo` (every loopback packet passes
//! OUTPUT), drops
//! - every packet to or from P, TCP and UDP (the others reach it no more; flockctl neither),
//! - packets of that cgroup's sockets to the other nodes' ports (its new connections to them),
//! - both directions of each connection it had open to the other nodes' ports before.
//!
//! The app's own port is not touched: the test's writer still reaches whichever instance runs.
//! The chain and the cgroup are removed when the test ends, even when it panics, and ones a
//! dead test process left behind are removed when a test starts.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;

/// The lease (flock_decide's default): an isolated node fences its apps this long after its
/// last renewal.
const LEASE: Duration = Duration::from_millis(2500);
/// The leader declares a node down after lease + this margin without hearing from it.
const MARGIN: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------------------------------------
// The partition.

/// The prefix of this file's iptables chains and cgroups; the test process's pid follows.
const PREFIX: &str = "flockpart-";
/// The cgroup v2 hierarchy (mounted there beside the v1 controllers on this machine).
const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn iptables(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("iptables {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn iptables_ok(args: &[&str]) {
    iptables(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Cuts one node of a [`TestCluster`] off from the others; healed when dropped.
struct Partition {
    chain: String,
    cgroup: PathBuf,
    healed: bool,
}

impl Partition {
    /// Isolates node `i` (1-based) of `c`.
    fn isolate(c: &TestCluster, i: usize) -> Partition {
        let name = format!("{PREFIX}{}", std::process::id());
        let cgroup = Path::new(CGROUP2).join(&name);
        let mut p = Partition {
            chain: name.clone(),
            cgroup: cgroup.clone(),
            healed: false,
        };
        let port = |j: usize| -> u16 { c.addr(j).rsplit(':').next().unwrap().parse().unwrap() };
        let own = port(i).to_string();
        let others: Vec<u16> = (1..=c.nodes.len()).filter(|&j| j != i).map(port).collect();
        let others_list = others
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let pid = c.nodes[i - 1].pid();
        assert!(pid > 0, "n{i}'s flockd runs");

        // New sockets of its flockd (and of anything it starts from now on) are in the cgroup.
        fs::create_dir_all(&cgroup).expect("create the partition's cgroup");
        fs::write(cgroup.join("cgroup.procs"), pid.to_string())
            .expect("move flockd into the partition's cgroup");

        iptables_ok(&["-N", &name]);
        for proto in ["tcp", "udp"] {
            for dir in ["--dport", "--sport"] {
                iptables_ok(&["-A", &name, "-p", proto, dir, &own, "-j", "DROP"]);
            }
            iptables_ok(&[
                "-A",
                &name,
                "-p",
                proto,
                "-m",
                "multiport",
                "--dports",
                &others_list,
                "-m",
                "cgroup",
                "--path",
                &name,
                "-j",
                "DROP",
            ]);
        }
        iptables_ok(&["-I", "OUTPUT", "-o", "lo", "-j", &name]);
        // Its connections to the others opened before it was moved (listed only now, so that
        // none opened in between is missed).
        let before = connections(pid, &others);
        for (proto, local, remote) in &before {
            let (local, remote) = (local.to_string(), remote.to_string());
            for (s, d) in [(&local, &remote), (&remote, &local)] {
                iptables_ok(&[
                    "-A", &name, "-p", proto, "--sport", s, "--dport", d, "-j", "DROP",
                ]);
            }
        }
        eprintln!(
            "partition: n{i} (port {own}) cut off from ports {others_list}; {} connection(s) it had open to them dropped",
            before.len()
        );
        p.healed = false;
        p
    }

    fn heal(&mut self) {
        if self.healed {
            return;
        }
        self.healed = true;
        remove_chain(&self.chain);
        remove_cgroup(&self.cgroup);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

fn remove_chain(chain: &str) {
    while iptables(&["-D", "OUTPUT", "-o", "lo", "-j", chain]).is_ok() {}
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

/// Moves what runs in `cgroup` back to the root and removes it.
fn remove_cgroup(cgroup: &Path) {
    for _ in 0..50 {
        if !cgroup.exists() {
            return;
        }
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = fs::write(Path::new(CGROUP2).join("cgroup.procs"), pid);
        }
        if fs::remove_dir(cgroup).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("partition: could not remove {}", cgroup.display());
}

/// Removes the chains and cgroups of this file's test processes that are gone.
fn clear_stale() {
    let gone = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| !pid_alive(&p.to_string()))
    };
    let rules = Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&rules.stdout).lines() {
        if let Some(chain) = line.strip_prefix("-N ") {
            if gone(chain) {
                eprintln!("partition: removing the stale chain {chain}");
                remove_chain(chain);
            }
        }
    }
    for e in fs::read_dir(CGROUP2).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if gone(&name) {
            eprintln!("partition: removing the stale cgroup {name}");
            remove_cgroup(&e.path());
        }
    }
}

/// The connections of process `pid` to one of `ports` on loopback: (protocol, its port,
/// the remote port).
fn connections(pid: i32, ports: &[u16]) -> Vec<(&'static str, u16, u16)> {
    let mut inodes = HashSet::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(l) = fs::read_link(e.path()) {
            let l = l.to_string_lossy().to_string();
            if let Some(n) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(n.to_string());
            }
        }
    }
    let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    let mut out = Vec::new();
    for (file, proto) in [
        ("tcp", "tcp"),
        ("tcp6", "tcp"),
        ("udp", "udp"),
        ("udp6", "udp"),
    ] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let (local, remote) = (port_of(f[1]), port_of(f[2]));
            if ports.contains(&remote) {
                out.push((proto, local, remote));
            }
        }
    }
    out
}

/// Keeps the tests of this file one at a time, across test processes: each runs three
/// flockd processes whose timing is what is checked.
fn serial() -> fs::File {
    use std::os::fd::AsRawFd;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("flock-partition-tests.lock"))
        .unwrap();
    // SAFETY: a valid descriptor; released when the file closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    lock
}

// ---------------------------------------------------------------------------------------------
// The app, its instances and its writer.

fn app(c: &TestCluster, at: usize, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(at), &["app", "show", name, "--json"])).unwrap()
}

fn dataset(c: &TestCluster, at: usize) -> Value {
    let ds: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(at), &["dataset", "ls", "counter", "--json"]))
            .unwrap();
    ds[0].clone()
}

/// Deploys counter (replicas: 1, a snapshot every 500 ms) on node `on` through node `via`,
/// and waits until its replica holds a snapshot; the app's port.
fn deploy_replicated(c: &TestCluster, dir: &Path, on: usize, via: usize) -> u16 {
    let port = free_ports(2);
    let application = dir.join("application.yml");
    let entry = replicated_counter_app(port, port + 1);
    fs::write(&application, format!("version: 1\napplications:\n{entry}")).unwrap();
    let deployment = dir.join("deployment.yml");
    fs::write(
        &deployment,
        format!("version: 1\nnodes:\n  n{on}: [counter]\n"),
    )
    .unwrap();
    c.ctl_ok(
        c.addr(via),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    let addr = format!("127.0.0.1:{port}");
    until("counter to run", Duration::from_secs(30), || {
        let a = app(c, via, "counter");
        (a["state"] == "running" && a["node"] == format!("n{on}").as_str() && ping(&addr).is_some())
            .then_some(())
    });
    until(
        "counter's dataset to have a replica holding a snapshot",
        Duration::from_secs(30),
        || {
            dataset(c, via)["bases"]
                .as_object()
                .is_some_and(|b| !b.is_empty())
                .then_some(())
        },
    );
    port
}

/// The instance answering at `addr` (PING's reply).
fn ping(addr: &str) -> Option<String> {
    ask(addr, "PING")?.strip_prefix("PONG ").map(str::to_string)
}

/// A flock-testapp process of the cluster: its pid and the node whose data dir it works in
/// (0: none of them).
fn instances(c_dir: &Path, nodes: &[PathBuf]) -> Vec<(i32, usize)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let Some(cwd) = fs::read_link(e.path().join("cwd")).ok() else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains("flock-testapp")
            && cwd.starts_with(c_dir)
            && pid_alive(&pid.to_string())
        {
            let node = nodes
                .iter()
                .position(|d| cwd.starts_with(d))
                .map_or(0, |i| i + 1);
            out.push((pid, node));
        }
    }
    out
}

/// What the /proc sampler saw of one instance.
#[derive(Debug, Clone, Copy)]
struct Seen {
    node: usize,
    first: Instant,
    last: Instant,
    /// `last` on the wall clock, to compare with flockd's log.
    last_wall: SystemTime,
}

/// Samples the instances every 20 ms until `stop`: the most alive at once, and when each was
/// seen.
fn sample(
    c_dir: PathBuf,
    nodes: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> (usize, BTreeMap<i32, Seen>) {
    let mut most = 0;
    let mut seen: BTreeMap<i32, Seen> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let alive = instances(&c_dir, &nodes);
        most = most.max(alive.len());
        for (pid, node) in alive {
            seen.entry(pid)
                .and_modify(|s| (s.last, s.last_wall) = (now, wall))
                .or_insert(Seen {
                    node,
                    first: now,
                    last: now,
                    last_wall: wall,
                });
        }
        thread::sleep(Duration::from_millis(20));
    }
    (most, seen)
}

/// An acknowledged append: its text, the instance (PING's reply on the same connection) that
/// acknowledged it, and when.
struct Ack {
    text: String,
    instance: String,
    at: Instant,
}

/// Appends `w<i>` to the app at `addr` as fast as it answers until `stop`, asking each new
/// connection which instance it reached first.
fn writer(addr: String, stop: Arc<AtomicBool>) -> Vec<Ack> {
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(s) = TcpStream::connect(&addr) else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if w.write_all(b"PING\n").is_err() || !r.read_line(&mut line).is_ok_and(|n| n > 0) {
            continue;
        }
        let Some(instance) = line.trim().strip_prefix("PONG ").map(str::to_string) else {
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let text = format!("w{i}");
            line.clear();
            let ok = w.write_all(format!("APPEND {text}\n").as_bytes()).is_ok()
                && r.read_line(&mut line).is_ok_and(|n| n > 0)
                && line.starts_with("OK ");
            if !ok {
                break;
            }
            acked.push(Ack {
                text,
                instance: instance.clone(),
                at: Instant::now(),
            });
        }
    }
    acked
}

/// The entries of a flock-testapp log file (`<seq> <text>` lines).
fn log_file(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, t)| t.to_string()))
        .collect()
}

/// The instances of counter flockd said it started, from every node's log: node, pid, when.
/// An instance that could not take the app's port (an older one holds it on this one machine)
/// exits at once, too soon for /proc to be sampled, but flockd's log has it.
fn starts(c: &TestCluster) -> Vec<(usize, i32, SystemTime)> {
    let mut out = Vec::new();
    for e in fs::read_dir(c.dir.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(node) = name
            .strip_prefix('n')
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|_| name.ends_with(".log"))
        else {
            continue;
        };
        for line in fs::read_to_string(e.path()).unwrap_or_default().lines() {
            let Some((_, id)) = line.split_once("flock_node::apps: started app=\"counter\" id=")
            else {
                continue;
            };
            let at = humantime::parse_rfc3339(line.split_whitespace().next().unwrap())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            let pid = id.split_whitespace().next().unwrap().parse().unwrap();
            out.push((node, pid, at));
        }
    }
    out
}

fn node_line(c: &TestCluster, via: usize, node: usize) -> String {
    let nodes = c.ctl_ok(c.addr(via), &["node", "ls"]);
    nodes
        .lines()
        .find(|l| l.starts_with(&format!("n{node} ")))
        .unwrap_or_default()
        .to_string()
}

/// When the test fails, copies the cluster's logs (flockd's, the watchdogs') to
/// /tmp/flock-partition-PID before the cluster's temp dir goes.
struct KeepLogs(PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        let to = std::env::temp_dir().join(format!("flock-partition-{}", std::process::id()));
        let _ = fs::create_dir_all(&to);
        for e in fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".log") {
                let _ = fs::copy(e.path(), to.join(&name));
            }
            let watch = e.path().join("fence").join("watch.log");
            if watch.exists() {
                let _ = fs::copy(&watch, to.join(format!("{name}.watch.log")));
            }
        }
        eprintln!("partition: the cluster's logs are kept in {}", to.display());
    }
}

// ---------------------------------------------------------------------------------------------

/// Cuts off the node running counter (the Raft leader or a follower) under a writer, and
/// checks what the isolated node, the majority and the app's instances do; heals it after.
fn partition_primary(primary_is_leader: bool) {
    let _serial = serial();
    clear_stale();
    let test_start = Instant::now();
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let _logs = KeepLogs(c.dir.path().to_path_buf());
    let leader = c.leader();
    let p = if primary_is_leader {
        leader
    } else {
        leader % 3 + 1
    };
    // The node the test asks: one of the majority.
    let q = p % 3 + 1;
    let files = tempfile::tempdir().unwrap();
    let port = deploy_replicated(&c, files.path(), p, q);
    let addr = format!("127.0.0.1:{port}");
    let old_pid: i32 = app(&c, q, "counter")["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let old_instance = ping(&addr).unwrap();
    let node_dirs: Vec<PathBuf> = (1..=3).map(|i| c.data_dir(i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    let sampler = {
        let (dir, nodes, stop) = (c.dir.path().to_path_buf(), node_dirs.clone(), stop.clone());
        thread::spawn(move || sample(dir, nodes, stop))
    };
    thread::sleep(Duration::from_secs(3));

    let leader_now = c.leader();
    eprintln!(
        "partition: counter runs on n{p} (pid {old_pid}); the leader is n{leader_now}; asking n{q}"
    );
    if primary_is_leader {
        assert_eq!(leader_now, p, "the leader moved before the partition");
    }
    let mut cut = Partition::isolate(&c, p);
    let t0 = Instant::now();

    // The isolated node fences its app within the lease (and the watchdog's tick).
    let fenced = until(
        "the old instance to be fenced",
        Duration::from_secs(10),
        || (!pid_alive(&old_pid.to_string())).then(Instant::now),
    );
    // The majority fails it over.
    let moved = until(
        "counter to run on another node",
        Duration::from_secs(30),
        || {
            let a = app(&c, q, "counter");
            (a["node"] != format!("n{p}").as_str() && a["state"] == "running").then_some(a)
        },
    );
    let served = until(
        "a write acknowledged on the new primary",
        Duration::from_secs(15),
        || {
            ask(&addr, "APPEND probe")
                .filter(|r| r.starts_with("OK "))
                .map(|_| Instant::now())
        },
    );
    let new_instance = ping(&addr).unwrap();
    assert_ne!(new_instance, old_instance);
    eprintln!(
        "partition: old instance fenced after {:?}; counter failed over to {} and a write was acknowledged there after {:?}",
        fenced - t0,
        moved["node"],
        served - t0
    );
    // Cut off a while longer: the isolated node, its flockd running, starts nothing (no lease).
    let kv = c.ctl_ok(c.addr(q), &["kv", "put", "during", "partition"]);
    eprintln!("partition: kv put through n{q} while n{p} is cut off: {kv}");
    until(
        "the majority to report the isolated node down",
        Duration::from_secs(10),
        || node_line(&c, q, p).contains("down").then_some(()),
    );
    thread::sleep(Duration::from_secs(4));
    assert!(
        c.nodes[p - 1].running(),
        "the isolated node's flockd exited; see {}",
        c.dir.path().display()
    );
    assert!(
        !instances(c.dir.path(), &node_dirs)
            .iter()
            .any(|(_, n)| *n == p),
        "the isolated node runs the app"
    );
    let healed_at = Instant::now();
    cut.heal();

    // Back, it serves nothing; the cluster works through it.
    until(
        "the isolated node to be back",
        Duration::from_secs(40),
        || {
            let l = node_line(&c, q, p);
            l.contains("ready").then_some(l)
        },
    );
    let back_at = Instant::now();
    // It keeps its diverged writes as a snapshot of its own and is a replica again.
    let ds = until(
        "the isolated node to keep its diverged writes and be a replica again",
        Duration::from_secs(30),
        || {
            let d = dataset(&c, q);
            (d["diverged"] == serde_json::json!([])
                && d["replicas"]
                    .as_array()?
                    .iter()
                    .any(|r| r == &format!("n{p}")))
            .then_some(d)
        },
    );
    let kept = kept_diverged(&c, q, "counter");
    assert_eq!(kept.len(), 1, "one kept diverged snapshot: {kept:?}");
    assert_eq!(kept[0].1, format!("n{p}"), "{kept:?}");
    let kept_name = kept[0].0.clone();
    c.ctl_ok(c.addr(p), &["kv", "put", "after", "healed"]);
    assert_eq!(
        c.ctl_ok(c.addr(q), &["kv", "get", "after"]),
        "healed",
        "a write through the healed node"
    );
    // The mesh of the node that was cut off routes to the new primary.
    let mesh = format!("{}:{}", mesh_ip(p), port + 1);
    let via_mesh = until(
        "a write through the healed node's mesh",
        Duration::from_secs(15),
        || ask(&mesh, "APPEND via-mesh").filter(|r| r.starts_with("OK ")),
    );
    eprintln!("partition: through n{p}'s mesh: {via_mesh}");
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    let (most, seen) = sampler.join().unwrap();
    eprintln!(
        "partition: healed after {:?}; n{p} back after another {:?}; instances seen: {seen:?}",
        healed_at - t0,
        back_at - healed_at
    );

    // Never two instances at once, through /proc.
    assert_eq!(most, 1, "two instances of counter ran at once: {seen:?}");
    let old = seen[&old_pid];
    assert_eq!(old.node, p, "{seen:?}");
    let others: Vec<(&i32, &Seen)> = seen.iter().filter(|(pid, _)| **pid != old_pid).collect();
    assert!(
        others.iter().all(|(_, s)| s.node != p),
        "the isolated node started the app again: {seen:?}"
    );
    let first_new = others
        .iter()
        .map(|(_, s)| s.first)
        .min()
        .expect("a new instance");
    assert!(
        first_new > old.last,
        "a new instance ran before the old one ended: {seen:?}"
    );
    let started = starts(&c);
    let early: Vec<_> = started
        .iter()
        .filter(|(_, pid, at)| *pid != old_pid && *at <= old.last_wall)
        .collect();
    assert!(
        early.is_empty(),
        "flockd started counter while the old instance (pid {old_pid} on n{p}) was alive, \
         last seen {:?}: {early:?}",
        old.last_wall
    );
    assert!(
        started.iter().all(|(n, pid, _)| *n != p || *pid == old_pid),
        "the isolated node started counter again: {started:?}"
    );
    assert_eq!(
        instances(c.dir.path(), &node_dirs).len(),
        1,
        "one instance runs after the partition healed"
    );

    // Timings: fenced within the lease (after the last renewal, up to one renewal before the
    // cut) and the watchdog's tick; started on the replica only after lease + margin (counted
    // from the last renewal the leader heard, again up to one renewal before the cut).
    eprintln!(
        "partition: the old instance last seen in /proc {:?} after the cut, the new one first {:?} after it",
        old.last - t0,
        first_new - t0
    );
    assert!(
        fenced - t0 <= LEASE + Duration::from_millis(1500),
        "the isolated node fenced its app {:?} after the cut",
        fenced - t0
    );
    assert!(
        first_new - t0 >= LEASE + MARGIN - Duration::from_millis(800),
        "the replica started {:?} after the cut, before lease + margin",
        first_new - t0
    );
    assert!(
        served - t0 < Duration::from_secs(12),
        "serving again took {:?}",
        served - t0
    );

    // Through the app: which instance acknowledged each write. The old one acknowledged
    // nothing once the new one ran, and nothing once the new one acknowledged anything.
    let last_old = acked
        .iter()
        .filter(|a| a.instance == old_instance)
        .map(|a| a.at)
        .max()
        .expect("the old instance acknowledged writes");
    let first_new_ack = acked
        .iter()
        .filter(|a| a.instance != old_instance)
        .map(|a| a.at)
        .min()
        .expect("the new instance acknowledged writes");
    assert!(
        last_old < first_new && last_old < first_new_ack,
        "the old instance acknowledged a write {:?} after the new one started",
        last_old.saturating_duration_since(first_new)
    );
    assert_eq!(
        acked
            .iter()
            .map(|a| a.instance.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([old_instance.as_str(), new_instance.as_str()]),
        "writes were acknowledged by an instance other than the old and the new one"
    );

    // The new primary's log: a prefix of what the old instance acknowledged (the snapshot it
    // started from; no acknowledged write older than it lost), then the new writes.
    let held = read_all(&addr);
    let old_acked: Vec<&Ack> = acked
        .iter()
        .filter(|a| a.instance == old_instance)
        .collect();
    let held_set: BTreeSet<&String> = held.iter().collect();
    let kept = old_acked
        .iter()
        .take_while(|a| held_set.contains(&a.text))
        .count();
    let gaps: Vec<&str> = old_acked[kept..]
        .iter()
        .filter(|a| held_set.contains(&a.text))
        .map(|a| a.text.as_str())
        .take(5)
        .collect();
    assert!(
        gaps.is_empty(),
        "acknowledged writes older than the snapshot the new primary started from were lost: \
         {:?} lost, yet {gaps:?} acknowledged after it are held",
        old_acked.get(kept).map(|a| &a.text)
    );
    let new_acked: Vec<&Ack> = acked
        .iter()
        .filter(|a| a.instance != old_instance)
        .collect();
    let new_lost: Vec<&str> = new_acked
        .iter()
        .filter(|a| !held_set.contains(&a.text))
        .map(|a| a.text.as_str())
        .take(5)
        .collect();
    assert!(
        new_lost.is_empty(),
        "writes the new primary acknowledged were lost: {new_lost:?}"
    );
    assert!(held_set.contains(&"probe".to_string()) && held_set.contains(&"via-mesh".to_string()));
    let lost_from = old_acked.get(kept).map(|a| a.at);
    let window = lost_from.map(|at| fenced.saturating_duration_since(at));
    eprintln!(
        "partition: the old instance acknowledged {} writes ({} kept, the last {:?} before it was fenced lost), the new one {}",
        old_acked.len(),
        kept,
        window,
        new_acked.len()
    );
    // The snapshot was recent: the loss is at most an interval, a push and the lease.
    if let Some(at) = lost_from {
        assert!(
            at >= t0 - Duration::from_secs(3),
            "writes acknowledged {:?} before the cut were lost",
            t0 - at
        );
    }

    // The old instance's log, kept on the isolated node beside its copy (the backend's
    // dataset NAME.ID.diverged-EPOCH), holds every write it acknowledged: where the new
    // primary's copy is, in the isolated node's data dir, with the kept snapshot's suffix.
    let to: usize = moved["node"].as_str().unwrap()[1..].parse().unwrap();
    let live = ds["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["role"] == "primary")
        .and_then(|h| h["mount_path"].as_str())
        .unwrap_or_else(|| panic!("no primary's copy: {ds:#}"))
        .to_string();
    let live = Path::new(&live);
    let local = live.parent().unwrap();
    let aside = local.with_file_name(format!(
        "{}.{kept_name}",
        local.file_name().unwrap().to_string_lossy()
    ));
    let copy = c
        .data_dir(p)
        .join(aside.join("live").strip_prefix(c.data_dir(to)).unwrap());
    let diverged = log_file(&copy.join("log"));
    let diverged: BTreeSet<&String> = diverged.iter().collect();
    let missing: Vec<&str> = old_acked
        .iter()
        .filter(|a| !diverged.contains(&a.text))
        .map(|a| a.text.as_str())
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "n{p}'s diverged copy at {} lacks writes the old instance acknowledged: {missing:?}",
        copy.display()
    );
    assert!(
        !diverged.contains(&"probe".to_string()),
        "n{p}'s diverged copy took writes of the new primary"
    );
    eprintln!(
        "partition: n{p}'s diverged copy at {} holds all {} writes of the old instance",
        copy.display(),
        old_acked.len()
    );
    let events = c.ctl_ok(c.addr(q), &["events"]);
    assert!(
        events.contains(&format!(
            "failed over from n{p} to {}",
            moved["node"].as_str().unwrap()
        )),
        "{events}"
    );
    c.ctl_ok(c.addr(p), &["app", "rm", "counter"]);
    until("counter to end", Duration::from_secs(20), || {
        instances(c.dir.path(), &node_dirs).is_empty().then_some(())
    });
    eprintln!("partition: the test took {:?}", test_start.elapsed());
}

#[test]
fn pt01_the_isolated_primary_is_the_leader() {
    partition_primary(true);
}

#[test]
fn pt02_the_isolated_primary_is_a_follower() {
    partition_primary(false);
}
