//! Failover with real flockd processes (issue 17): a stateful app with a replica serves again
//! on the replica when its node dies (flockd, its watchdog and the app killed), when flockd
//! alone dies (the watchdog fences the app) and when flockd is stopped (SIGSTOP); never two
//! instances at once, and every write acknowledged before the last replicated snapshot kept.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn app(c: &TestCluster, at: usize, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(at), &["app", "show", name, "--json"])).unwrap()
}

/// Deploys counter (replicas: 1, a snapshot every 500 ms) on n1; returns the app's address.
fn deploy_replicated(c: &TestCluster, dir: &Path) -> String {
    let port = free_port();
    let entry = replicated_counter_app(port, port + 1);
    deploy_flocker(c, dir, &entry, "n1", "counter");
    let addr = format!("127.0.0.1:{port}");
    until("counter to run on n1", Duration::from_secs(30), || {
        let a = app(c, 1, "counter");
        (a["state"] == "running" && ask(&addr, "PING").is_some()).then_some(())
    });
    wait_for_replica(c);
    addr
}

/// The pids of the flock-testapp processes working under `dir`.
fn testapps(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cwd = fs::read_link(e.path().join("cwd")).ok();
        if String::from_utf8_lossy(&cmd).contains("flock-testapp")
            && cwd.is_some_and(|c| c.starts_with(dir))
            && pid_alive(&pid.to_string())
        {
            out.push(pid);
        }
    }
    out
}

/// The fencing watchdog of node `i`'s data dir.
fn watchdog(c: &TestCluster, i: usize) -> Option<i32> {
    let lock = c.data_dir(i).join("fence").join("watch.lock");
    fs::read_to_string(lock).ok()?.trim().parse().ok()
}

/// Node `i`'s machine dies: its flockd, its fencing watchdog and the app's process group
/// (`app_pid`), at once.
fn kill_machine(c: &mut TestCluster, i: usize, app_pid: i32) {
    let dog = watchdog(c, i).unwrap_or_else(|| panic!("n{i}'s watchdog runs"));
    c.nodes[i - 1].kill9();
    // SAFETY: kill(2) of this test's own processes.
    unsafe {
        libc::kill(dog, libc::SIGKILL);
        libc::kill(-app_pid, libc::SIGKILL);
    }
}

/// Samples the instances every 20 ms until `stop`: the most ever alive at once.
fn count_instances(dir: std::path::PathBuf, stop: Arc<AtomicBool>) -> usize {
    let mut most = 0;
    while !stop.load(Ordering::Relaxed) {
        most = most.max(testapps(&dir).len());
        thread::sleep(Duration::from_millis(20));
    }
    most
}

enum Fault {
    /// The machine dies: flockd, its watchdog and the app, at once.
    Node,
    /// flockd alone (kill -9); the app keeps running until the watchdog fences it.
    Flockd,
    /// flockd is stopped (SIGSTOP) and continued after the failover.
    Pause,
}

fn fail_over(fault: Fault) {
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let addr = deploy_replicated(&c, files.path());
    let old_pid: i32 = app(&c, 1, "counter")["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    let counter = {
        let (dir, stop) = (c.dir.path().to_path_buf(), stop.clone());
        thread::spawn(move || count_instances(dir, stop))
    };
    thread::sleep(Duration::from_secs(3));

    let flockd_pid = c.nodes[0].pid();
    let fault_at = Instant::now();
    match fault {
        Fault::Node => {
            kill_machine(&mut c, 1, old_pid);
        }
        Fault::Flockd => c.nodes[0].kill9(),
        Fault::Pause => unsafe {
            libc::kill(flockd_pid, libc::SIGSTOP);
        },
    }
    // The old instance ends within the lease (2.5 s) plus the watchdog's tick.
    let old_gone = until("the old instance to end", Duration::from_secs(6), || {
        (!pid_alive(&old_pid.to_string())).then(Instant::now)
    });
    let moved = until(
        "counter to run on another node",
        Duration::from_secs(30),
        || {
            let a = app(&c, 2, "counter");
            (a["node"] != "n1" && a["state"] == "running").then_some(a)
        },
    );
    // The first write acknowledged after the fault.
    let served = until(
        "a write acknowledged on the new primary",
        Duration::from_secs(15),
        || {
            ask(&addr, "APPEND probe")
                .filter(|r| r.starts_with("OK "))
                .map(|_| Instant::now())
        },
    );
    eprintln!(
        "failover: old instance gone after {:?}, a write acknowledged after {:?} on {}",
        old_gone - fault_at,
        served - fault_at,
        moved["node"]
    );
    assert!(
        served - fault_at < Duration::from_secs(12),
        "serving again took {:?}",
        served - fault_at
    );
    thread::sleep(Duration::from_secs(1));
    if let Fault::Pause = fault {
        // Back: it sees the newer epoch and serves nothing.
        unsafe { libc::kill(flockd_pid, libc::SIGCONT) };
        thread::sleep(Duration::from_secs(4));
    }
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    let most = counter.join().unwrap();
    assert_eq!(most, 1, "two instances of counter ran at once");
    assert_eq!(testapps(c.dir.path()).len(), 1);

    // What the new primary holds: every write acknowledged before the newest snapshot it
    // started from (older than the fault by at most the interval and a push) is there.
    let held: std::collections::BTreeSet<String> = read_all(&addr).into_iter().collect();
    let before = fault_at - Duration::from_secs(3);
    let lost_early: Vec<&String> = acked
        .iter()
        .filter(|(_, at)| *at < before)
        .map(|(v, _)| v)
        .filter(|v| !held.contains(*v))
        .collect();
    assert!(
        lost_early.is_empty(),
        "writes acknowledged more than 3 s before the fault were lost: {:?} (of {})",
        &lost_early[..lost_early.len().min(5)],
        acked.len()
    );
    let lost = acked.iter().filter(|(v, _)| !held.contains(v)).count();
    eprintln!(
        "failover: {} writes acknowledged, {lost} lost (all after the last replicated snapshot)",
        acked.len()
    );
    assert!(held.contains("probe"));
    // The down node is reported, and the failover is in the record.
    let nodes = c.ctl_ok(c.addr(2), &["node", "ls"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.contains("n1") && l.contains("down")),
        "{nodes}"
    );
    c.ctl_ok(c.addr(2), &["app", "rm", "counter"]);
}

#[test]
fn fo01_a_dead_node_fails_over_to_its_replica() {
    fail_over(Fault::Node);
}

#[test]
fn fo02_flockd_killed_alone_its_app_is_fenced_then_fails_over() {
    fail_over(Fault::Flockd);
}

#[test]
fn fo03_flockd_paused_its_app_is_fenced_and_it_serves_nothing_when_continued() {
    fail_over(Fault::Pause);
}

/// An operator's tools: `node drain` moves the app to its replica with a live move (no
/// acknowledged write lost) and nothing lands on the draining node; `node down` of a node that
/// is in fact alive fails its app over only once its lease ran out (never two instances); the
/// events say what happened.
#[test]
fn fo04_drain_then_an_operator_declares_a_live_node_down() {
    let c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let addr = deploy_replicated(&c, files.path());
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    let counter = {
        let (dir, stop) = (c.dir.path().to_path_buf(), stop.clone());
        thread::spawn(move || count_instances(dir, stop))
    };
    thread::sleep(Duration::from_secs(1));
    let out = c.ctl_ok(c.addr(2), &["node", "drain", "n1"]);
    assert!(out.contains("counter: moving to"), "{out}");
    assert!(out.contains("node n1 is drained"), "{out}");
    let on = app(&c, 2, "counter")["node"].as_str().unwrap().to_string();
    assert_ne!(on, "n1");
    let nodes = c.ctl_ok(c.addr(2), &["node", "ls"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.contains("n1") && l.contains("draining")),
        "{nodes}"
    );
    let moved_away = c.ctl(c.addr(2), &["app", "move", "counter", "--to", "n1"]);
    assert!(
        stderr(&moved_away).contains("draining"),
        "{}",
        stderr(&moved_away)
    );
    c.ctl_ok(c.addr(2), &["node", "drain", "n1", "--undo"]);
    // A planned move loses nothing.
    thread::sleep(Duration::from_secs(1));
    let acked_now = {
        let held: std::collections::BTreeSet<String> = read_all(&addr).into_iter().collect();
        held.len()
    };
    assert!(acked_now > 0);

    // The node it runs on now is alive, but an operator says it is dead.
    let idx: usize = on[1..].parse().unwrap();
    wait_for_replica(&c);
    let out = c.ctl_ok(c.addr(1), &["node", "down", &on]);
    assert!(out.contains("renewed no more"), "{out}");
    let moved = until("counter to fail over", Duration::from_secs(30), || {
        let a = app(&c, if idx == 1 { 2 } else { 1 }, "counter");
        (a["node"] != on.as_str() && a["state"] == "running").then_some(a)
    });
    until("the new primary to answer", Duration::from_secs(15), || {
        ask(&addr, "APPEND probe").filter(|r| r.starts_with("OK "))
    });
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert_eq!(
        counter.join().unwrap(),
        1,
        "two instances of counter ran at once"
    );
    assert!(!acked.is_empty());
    let events = c.ctl_ok(c.addr(1), &["events"]);
    assert!(
        events.contains(&format!("node {on} declared down by an operator")),
        "{events}"
    );
    assert!(
        events.contains(&format!(
            "failed over from {on} to {}",
            moved["node"].as_str().unwrap()
        )),
        "{events}"
    );
    let show = c.ctl_ok(c.addr(1), &["app", "show", "counter"]);
    assert!(show.contains("failed over"), "{show}");
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}

/// Without replicas asked for nothing fails over: the app waits for its node, and `app ls`
/// says why.
#[test]
fn fo05_without_a_replica_the_app_waits_and_says_why() {
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let application = files.path().join("application.yml");
    fs::write(
        &application,
        format!("version: 1\napplications:\n{}", counter_app(port, port + 1)),
    )
    .unwrap();
    let deployment = files.path().join("deployment.yml");
    fs::write(&deployment, "version: 1\nnodes:\n  n2: [counter]\n").unwrap();
    c.ctl_ok(
        c.addr(1),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    until("counter to run on n2", Duration::from_secs(30), || {
        (app(&c, 1, "counter")["state"] == "running").then_some(())
    });
    let pid: i32 = app(&c, 1, "counter")["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    kill_machine(&mut c, 2, pid);
    let a = until("n2 to be declared down", Duration::from_secs(20), || {
        let a = app(&c, 1, "counter");
        (a["state"] == "waiting").then_some(a)
    });
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains("node n2 is down") && detail.contains("does not ask for replicas"),
        "{a}"
    );
    assert_eq!(a["node"], "n2");
    let events = c.ctl_ok(c.addr(1), &["events"]);
    assert!(events.contains("cannot fail over"), "{events}");
    assert!(testapps(c.dir.path()).is_empty());
}

/// The files under `root` whose contents include `needle`.
fn files_with(root: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t)
                    if t.is_file()
                        && fs::read(&p)
                            .is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) =>
                {
                    out.push(p)
                }
                _ => {}
            }
        }
    }
    out
}

/// The node that comes back after a failover serves nothing; it sets its diverged copy aside
/// by itself, keeping the writes the new primary lacks as snapshot `diverged-EPOCH` (listed,
/// removable), and is a replica again, so the dataset can fail over again.
#[test]
fn fo06_a_returning_node_keeps_its_diverged_writes_and_is_a_replica_again() {
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let addr = deploy_replicated(&c, files.path());
    for i in 0..10 {
        assert!(ask(&addr, &format!("APPEND x{i}")).is_some_and(|r| r.starts_with("OK ")));
    }
    // The replica catches up with x0..x9, then no snapshot is taken for an hour: what is
    // appended next is on n1 alone.
    until("the replica to hold x9", Duration::from_secs(30), || {
        let ds: Value =
            serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]))
                .unwrap();
        let base = ds[0]["bases"]
            .as_object()?
            .values()
            .next()?
            .as_str()?
            .to_string();
        let snaps: Value = serde_json::from_str(
            &c.ctl_ok(c.addr(1), &["dataset", "snapshots", "counter", "--json"]),
        )
        .unwrap();
        let newest = snaps.as_array()?.last()?["name"].as_str()?.to_string();
        (base == newest && !files_with(&c.data_dir(2), "x9").is_empty()).then_some(())
    });
    c.ctl_ok(
        c.addr(1),
        &["dataset", "set", "counter", "--interval", "1h"],
    );
    thread::sleep(Duration::from_millis(700));
    for i in 0..5 {
        assert!(ask(&addr, &format!("APPEND only-n1-{i}")).is_some_and(|r| r.starts_with("OK ")));
    }
    let pid: i32 = app(&c, 1, "counter")["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    kill_machine(&mut c, 1, pid);
    until("counter to fail over", Duration::from_secs(30), || {
        let a = app(&c, 2, "counter");
        (a["node"] != "n1" && a["state"] == "running").then_some(())
    });
    let new_addr = addr.clone();
    until(
        "counter to serve on its new node",
        Duration::from_secs(30),
        || ask(&new_addr, "PING"),
    );
    // The new primary started from the last replicated snapshot: n1's last writes are not there.
    let read = ask(&addr, "READ").unwrap_or_default();
    assert!(!read.contains("only-n1-"), "{read}");
    c.restart(1);
    let ls = |c: &TestCluster| -> Value {
        serde_json::from_str(&c.ctl_ok(c.addr(2), &["dataset", "ls", "counter", "--json"])).unwrap()
    };
    until(
        "n1 to keep its diverged writes and be a replica again",
        Duration::from_secs(60),
        || {
            let d = ls(&c);
            (d[0]["diverged"] == serde_json::json!([])
                && d[0]["replicas"].as_array()?.iter().any(|r| r == "n1")
                && d[0]["bases"].get("n1").is_some())
            .then_some(())
        },
    );
    // Back, it serves nothing.
    assert_eq!(testapps(c.dir.path()).len(), 1);
    let kept = kept_diverged(&c, 2, "counter");
    assert_eq!(kept.len(), 1, "{kept:?}");
    let (name, on) = kept[0].clone();
    assert_eq!(on, "n1");
    assert!(name.starts_with("diverged-"), "{name}");
    // The writes only n1 had are in its kept copy, in full.
    let holding: Vec<_> = files_with(&c.data_dir(1), "only-n1-4")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&name))
        .collect();
    assert!(
        !holding.is_empty(),
        "no file under n1's {name} holds only-n1-4"
    );
    let events = c.ctl_ok(c.addr(2), &["events"]);
    assert!(
        events.contains(&format!(
            "n1 kept its diverged writes of counter in snapshot {name}"
        )),
        "{events}"
    );
    let table = c.ctl_ok(c.addr(2), &["dataset", "snapshots", "counter"]);
    assert!(table.contains("n1: diverged writes, kept"), "{table}");
    // Given up by an operator's command, not by anything else.
    let no = c.ctl(
        c.addr(2),
        &["dataset", "drop-diverged", "counter", "--node", "n1"],
    );
    assert_eq!(no.status.code(), Some(2), "{}", stderr(&no));
    assert!(stderr(&no).contains("--force"), "{}", stderr(&no));
    let bad = c.ctl(
        c.addr(2),
        &[
            "dataset",
            "drop-diverged",
            "counter",
            "--node",
            "n1",
            "--force",
        ],
    );
    assert!(
        stderr(&bad).contains("holds no diverged copy"),
        "{}",
        stderr(&bad)
    );
    c.ctl_ok(c.addr(2), &["dataset", "snapshot", "rm", "counter", &name]);
    until(
        "n1 to destroy its kept copy",
        Duration::from_secs(30),
        || {
            files_with(&c.data_dir(1), "only-n1-4")
                .is_empty()
                .then_some(())
        },
    );
    let snaps = c.ctl_ok(c.addr(2), &["dataset", "snapshots", "counter", "--json"]);
    assert!(!snaps.contains("diverged-"), "{snaps}");
    c.ctl_ok(c.addr(2), &["app", "rm", "counter"]);
}

/// Two nodes lost at once, with 5 nodes: the apps of both fail over, each to its replica,
/// and the three left (a quorum) serve them.
#[test]
fn fo07_two_nodes_lost_at_once_both_fail_over() {
    let mut c = TestCluster::start(5, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let entry = |name: &str, port: u16| {
        replicated_counter_app(port, port + 1).replace("  counter:\n", &format!("  {name}:\n"))
    };
    let application = files.path().join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n{}{}",
            entry("alpha", pa),
            entry("beta", pb)
        ),
    )
    .unwrap();
    let deployment = files.path().join("deployment.yml");
    fs::write(
        &deployment,
        "version: 1\nnodes:\n  n1: [alpha]\n  n2: [beta]\n",
    )
    .unwrap();
    c.ctl_ok(
        c.addr(3),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    let addrs = [format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}")];
    for (name, addr) in ["alpha", "beta"].iter().zip(&addrs) {
        until(
            &format!("{name} to run with a replica holding a snapshot"),
            Duration::from_secs(40),
            || {
                let ds: Value =
                    serde_json::from_str(&c.ctl_ok(c.addr(3), &["dataset", "ls", name, "--json"]))
                        .unwrap();
                (ask(addr, "APPEND before").is_some_and(|r| r.starts_with("OK "))
                    && ds[0]["bases"].as_object().is_some_and(|b| !b.is_empty()))
                .then_some(())
            },
        );
    }
    thread::sleep(Duration::from_millis(1200));
    let pid = |name: &str| -> i32 { app(&c, 3, name)["id"].as_str().unwrap().parse().unwrap() };
    let (alpha, beta) = (pid("alpha"), pid("beta"));
    kill_machine(&mut c, 1, alpha);
    kill_machine(&mut c, 2, beta);
    let killed = std::time::Instant::now();
    for (name, addr) in ["alpha", "beta"].iter().zip(&addrs) {
        let a = until(
            &format!("{name} to fail over"),
            Duration::from_secs(40),
            || {
                let a = app(&c, 3, name);
                (a["node"] != "n1"
                    && a["node"] != "n2"
                    && a["state"] == "running"
                    && ask(addr, "READ").is_some_and(|r| r.contains("before")))
                .then_some(a)
            },
        );
        eprintln!(
            "fo07: {name} serves on {} {:?} after the kill",
            a["node"],
            killed.elapsed()
        );
    }
    let events = c.ctl_ok(c.addr(3), &["events"]);
    for (name, from) in [("alpha", "n1"), ("beta", "n2")] {
        assert!(
            events
                .lines()
                .any(|l| l.contains(&format!("dataset {name}"))
                    && l.contains(&format!("failed over from {from} to"))),
            "{events}"
        );
    }
    c.ctl_ok(c.addr(3), &["app", "rm", "alpha"]);
    c.ctl_ok(c.addr(3), &["app", "rm", "beta"]);
}

/// A leader slow to stop (a failpoint holds its shutdown 4 s once its agents stopped, as a
/// push in flight would) does not fence another node's stateful app: the API, through which
/// every node renews its lease, stops only just before Raft. Before, it stopped first, the
/// leader went on heartbeating without answering renewals, and the app was fenced after 2.5 s.
#[test]
fn fo08_a_leader_slow_to_stop_fences_no_other_nodes_app() {
    let mut c = TestCluster::start_env(
        3,
        &[],
        Vec::new(),
        vec![("FLOCK_FAILPOINT_SHUTDOWN_HOLD".into(), "4000".into())],
    );
    let _end = EndApps(c.dir.path().to_path_buf());
    let leader = c.leader();
    let on = if leader == 2 { 3 } else { 2 };
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let entry = replicated_counter_app(port, port + 1);
    deploy_flocker(&c, files.path(), &entry, &format!("n{on}"), "counter");
    let addr = format!("127.0.0.1:{port}");
    until(
        &format!("counter to run on n{on}"),
        Duration::from_secs(30),
        || {
            let a = app(&c, on, "counter");
            (a["state"] == "running" && ask(&addr, "PING").is_some()).then_some(())
        },
    );
    wait_for_replica(&c);
    let pid = app(&c, on, "counter")["id"].as_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let code = c.nodes[leader - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(code, Some(0), "the leader n{leader} stops cleanly");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "the failpoint held the shutdown: {:?}",
        t0.elapsed()
    );
    // Longer than a lease after the leader stopped: a fenced app would be gone by now.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(
        pid_alive(&pid),
        "counter ({pid}) on n{on} was fenced while the leader n{leader} stopped"
    );
    let held = read_all(&addr);
    let missing = acked.iter().filter(|(v, _)| !held.contains(v)).count();
    assert_eq!(missing, 0, "acknowledged appends lost");
}
