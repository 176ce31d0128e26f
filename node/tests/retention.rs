//! Datasets that live for months (issue 16), against real flockd processes and the real
//! flockctl: retention over many moves of an app under writes, rollback of a running app's
//! dataset, size limits on both backends, and redeploys that change a volume's policy.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `dataset ls NAME --json`, the one dataset.
fn dataset(c: &TestCluster, name: &str) -> Value {
    let v: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", name, "--json"])).unwrap();
    v[0].clone()
}

fn holder<'a>(d: &'a Value, node: &str) -> &'a Value {
    d["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == node)
        .unwrap_or_else(|| panic!("{node} holds no copy: {d:#}"))
}

fn app(c: &TestCluster, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "show", name, "--json"])).unwrap()
}

/// The automatic (`move-`) snapshots Raft records for `d`.
fn automatic(d: &Value) -> usize {
    d["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("move-"))
        .count()
}

/// application.yml and deployment.yml for the counter app on `node`, its volume limited to
/// `size` and kept by `retention`.
fn counter_files(dir: &Path, port: u16, node: &str, size: &str, retention: &str) -> [String; 2] {
    let appl = counter_app(port, port + 1).replace(
        "maximum_size: 64M",
        &format!("maximum_size: {size}\n      retention: \"{retention}\""),
    );
    let a = dir.join("application.yml");
    fs::write(&a, format!("version: 1\napplications:\n{appl}")).unwrap();
    let d = dir.join("deployment.yml");
    let others: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != node)
        .collect();
    fs::write(
        &d,
        format!(
            "version: 1\nnodes:\n  {node}: [counter]\n  {}: []\n  {}: []\n",
            others[0], others[1]
        ),
    )
    .unwrap();
    [a.display().to_string(), d.display().to_string()]
}

/// Deploys the counter app and waits for it to answer on `addr`.
fn deploy_counter(c: &TestCluster, files: &[String; 2], addr: &str) -> Value {
    c.ctl_ok(c.addr(1), &["deploy", &files[1], &files[0]]);
    until("counter to run", Duration::from_secs(30), || {
        let a = app(c, "counter");
        (a["state"] == "running" && ask(addr, "PING").is_some()).then_some(a)
    })
}

/// The acknowledged appends of `acked` that `held` lacks.
fn lost<'a>(acked: &'a [(String, std::time::Instant)], held: &HashSet<String>) -> Vec<&'a str> {
    acked
        .iter()
        .map(|(v, _)| v.as_str())
        .filter(|v| !held.contains(*v))
        .collect()
}

/// FLOCK_TEST_MOVES, or `default`.
fn moves_to_make(default: usize) -> usize {
    std::env::var("FLOCK_TEST_MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes every holder of `name` says its copy takes, together.
fn holders_used(c: &TestCluster, name: &str) -> u64 {
    dataset(c, name)["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["used_bytes"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn r01_dir_many_moves_under_writes_stay_within_retention() {
    let c = TestCluster::start(3, &[]);
    many_moves(&c, moves_to_make(50));
}

#[test]
fn r06_zfs_many_moves_under_writes_stay_within_retention() {
    let mut pools = Pools::new();
    let args: Vec<Vec<String>> = (0..3).map(|_| zfs_args(&pools.create(256))).collect();
    let c = TestCluster::start_with(3, &[], args);
    // Its apps run on the pools' mounts (after the cluster's flockds are ended).
    let _end = EndApps(pools.dir().to_path_buf());
    many_moves(&c, moves_to_make(30));
}

/// Many moves of an app under writes: the automatic snapshots in Raft and on every holder
/// stay within the retention's bound, the holders' disk use does not grow with the moves, and
/// every acknowledged append is kept.
fn many_moves(c: &TestCluster, moves: usize) {
    let _end = EndApps(c.dir.path().to_path_buf());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let files = counter_files(c.dir.path(), port, "n1", "64M", "last=2,hourly=0,daily=0");
    deploy_counter(c, &files, &addr);
    let d = dataset(c, "counter");
    assert_eq!(d["retention"], "last=2,hourly=0,daily=0", "{d:#}");
    // Some bulk, so that a move that sent it whole every time would show on the disk.
    let live = PathBuf::from(holder(&d, "n1")["mount_path"].as_str().unwrap());
    fs::write(live.join("bulk.bin"), pattern(3, 4 << 20)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    // The bound: the policy's 2, the newest, and each replica's base (two replicas).
    let bound = 2 + 1 + 2;
    let mut disk_after_warmup = 0;
    let mut most = 0;
    let mut settle = Duration::ZERO;
    for i in 0..moves {
        let to = ["n2", "n3", "n1"][i % 3];
        let out = c.ctl_ok(
            c.addr(1 + i % 3),
            &["app", "move", "counter", "--to", to, "--json"],
        );
        let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "done", "move {i} to {to}: {out}");
        // Pruning follows the move (once each replica confirmed its base): the count is
        // back within the bound within seconds, before the next move.
        most = most.max(automatic(&dataset(c, "counter")));
        let started = std::time::Instant::now();
        loop {
            let d = dataset(c, "counter");
            if automatic(&d) <= bound {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "20 s after move {i}: {} automatic snapshots recorded, over the bound {bound}: {d:#}",
                automatic(&d)
            );
            thread::sleep(Duration::from_millis(200));
        }
        settle = settle.max(started.elapsed());
        if i == 5 {
            disk_after_warmup = holders_used(c, "counter");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    until(
        "the app to answer after the last move",
        Duration::from_secs(30),
        || ask(&addr, "PING"),
    );
    let held: HashSet<String> = read_all(&addr).into_iter().collect();
    let gone = lost(&acked, &held);
    assert!(
        acked.len() > 50,
        "only {} appends acknowledged",
        acked.len()
    );
    assert!(
        gone.is_empty(),
        "{} acknowledged appends lost: {:?}",
        gone.len(),
        &gone[..gone.len().min(5)]
    );

    // Every holder cleans up what Raft forgot.
    let counts = until("holders within the bound", Duration::from_secs(30), || {
        let d = dataset(c, "counter");
        let counts: Vec<(String, u64)> = d["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["node"].as_str().unwrap().to_string(),
                    h["snapshot_count"].as_u64().unwrap(),
                )
            })
            .collect();
        (counts.len() == 3 && counts.iter().all(|(_, n)| *n as usize <= bound + 1))
            .then_some(counts)
    });
    let disk = holders_used(c, "counter");
    eprintln!(
        "{moves} moves: {} appends acknowledged, at most {most} automatic snapshots recorded right after a move, back within {bound} in at most {:.1}s, holders now {counts:?}, disk {} MiB after move 5, {} MiB at the end",
        acked.len(),
        settle.as_secs_f64(),
        disk_after_warmup >> 20,
        disk >> 20
    );
    if moves > 5 {
        // Flat: the moves' snapshots do not pile up (the writes add a little; logs grow).
        assert!(
            disk <= disk_after_warmup + disk_after_warmup / 2 + (8 << 20),
            "disk grew from {disk_after_warmup} to {disk} bytes over {moves} moves"
        );
    }
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}

/// A rollback of a running app's dataset: refused without --stop-app (nothing changes);
/// with it, the app is stopped, the data goes back, the app starts again, and the state
/// before is a snapshot that restores every acknowledged append. A redeploy then changes the
/// volume's limit and retention.
#[test]
fn r02_dir_rollback_of_a_running_app_stops_it_and_keeps_the_state_before() {
    let c = TestCluster::start(3, &[]);
    rollback_running(&c);
}

#[test]
fn r07_zfs_rollback_of_a_running_app_stops_it_and_keeps_the_state_before() {
    let mut pools = Pools::new();
    let args: Vec<Vec<String>> = (0..3).map(|_| zfs_args(&pools.create(256))).collect();
    let c = TestCluster::start_with(3, &[], args);
    let _end = EndApps(pools.dir().to_path_buf());
    rollback_running(&c);
}

fn rollback_running(c: &TestCluster) {
    let _end = EndApps(c.dir.path().to_path_buf());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let files = counter_files(c.dir.path(), port, "n1", "64M", "default");
    let first = deploy_counter(c, &files, &addr);
    let append = |v: &str| {
        let r = ask(&addr, &format!("APPEND {v}")).unwrap_or_default();
        assert!(r.starts_with("OK "), "APPEND {v}: {r:?}");
    };
    for i in 0..20 {
        append(&format!("before-{i}"));
    }
    c.ctl_ok(
        c.addr(2),
        &["dataset", "snapshot", "counter", "--tag", "s1"],
    );
    for i in 0..20 {
        append(&format!("after-{i}"));
    }
    let all: HashSet<String> = read_all(&addr).into_iter().collect();
    assert_eq!(all.len(), 40);

    // Refused while the app runs: nothing changes, the app keeps running.
    let o = c.ctl(c.addr(2), &["dataset", "rollback", "counter", "s1"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("app(s) counter use counter") && stderr(&o).contains("--stop-app"),
        "{}",
        stderr(&o)
    );
    assert_eq!(read_all(&addr).len(), 40);
    assert_eq!(app(c, "counter")["id"], first["id"]);

    // With --stop-app: stopped, rolled back, started again.
    let out = c.ctl_ok(
        c.addr(2),
        &["dataset", "rollback", "counter", "s1", "--stop-app"],
    );
    assert!(out.contains("stopped counter for the rollback"), "{out}");
    let kept = out
        .split("kept as snapshot ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no kept snapshot in {out:?}"))
        .to_string();
    assert!(kept.starts_with("pre-rollback-"), "{kept}");
    let again = until("counter to run again", Duration::from_secs(30), || {
        let a = app(c, "counter");
        (a["state"] == "running" && a["id"] != first["id"] && ask(&addr, "PING").is_some())
            .then_some(a)
    });
    let now: Vec<String> = read_all(&addr);
    assert_eq!(now.len(), 20, "{now:?}");
    assert!(now.iter().all(|v| v.starts_with("before-")), "{now:?}");
    assert!(dataset(c, "counter")["hold"].is_null());

    // The state before the rollback is restorable: every acknowledged append is back.
    c.ctl_ok(
        c.addr(3),
        &["dataset", "rollback", "counter", &kept, "--stop-app"],
    );
    until(
        "counter to run after the undo",
        Duration::from_secs(30),
        || {
            let a = app(c, "counter");
            (a["state"] == "running" && a["id"] != again["id"] && ask(&addr, "PING").is_some())
                .then_some(())
        },
    );
    let back: HashSet<String> = read_all(&addr).into_iter().collect();
    assert_eq!(back, all);

    // A redeploy with a larger maximum_size and another retention applies both.
    let files = counter_files(c.dir.path(), port, "n1", "128M", "last=5,hourly=2,daily=1");
    c.ctl_ok(c.addr(1), &["deploy", &files[1], &files[0]]);
    let d = dataset(c, "counter");
    assert_eq!(d["size_limit"], 128u64 << 20, "{d:#}");
    assert_eq!(d["retention"], "last=5,hourly=2,daily=1", "{d:#}");
    until(
        "n1's copy to take the new limit",
        Duration::from_secs(20),
        || {
            let d = dataset(c, "counter");
            (d["holders"][0]["state"] == "ready").then_some(())
        },
    );
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}

/// An operator's snapshot asked while a move's last snapshot is taken but not yet recorded
/// (a failpoint holds the move there) waits for that record, so it is recorded after it; the
/// move then carries it to the new primary, where the app can be rolled back to it. Before the
/// record order, it was recorded first, the move committed without it, and the new primary
/// lacked a snapshot the cluster recorded.
#[test]
fn r08_a_snapshot_taken_during_a_moves_last_step_reaches_the_new_primary() {
    // SAFETY: nextest runs each test in its own process, and no other thread reads the
    // environment here; the flockd processes inherit it.
    unsafe { std::env::set_var("FLOCK_FAILPOINT_MOVE_HOLD", "final-snapshot:3000") };
    let c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let files = counter_files(c.dir.path(), port, "n1", "64M", "default");
    deploy_counter(&c, &files, &addr);
    for i in 0..10 {
        let r = ask(&addr, &format!("APPEND before-{i}")).unwrap_or_default();
        assert!(r.starts_with("OK "), "{r:?}");
    }
    c.ctl_ok(
        c.addr(1),
        &["app", "move", "counter", "--to", "n2", "--no-wait"],
    );
    until(
        "the move's last snapshot to be taken",
        Duration::from_secs(60),
        || {
            let log = fs::read_to_string(c.log(1, "init")).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("failpoint: holding the move") && l.contains("final-snapshot"))
                .then_some(())
        },
    );
    c.ctl_ok(
        c.addr(3),
        &["dataset", "snapshot", "counter", "--tag", "during"],
    );
    let moved = until("counter to run on n2", Duration::from_secs(60), || {
        let a = app(&c, "counter");
        (a["node"] == "n2" && a["state"] == "running" && ask(&addr, "PING").is_some()).then_some(a)
    });
    let d = dataset(&c, "counter");
    assert!(
        d["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "during"),
        "{d:#}"
    );
    // The new primary holds it: the app rolls back to it with every append made before.
    let r = ask(&addr, "APPEND after").unwrap_or_default();
    assert!(r.starts_with("OK "), "{r:?}");
    c.ctl_ok(
        c.addr(2),
        &["dataset", "rollback", "counter", "during", "--stop-app"],
    );
    until("counter to run again", Duration::from_secs(30), || {
        let a = app(&c, "counter");
        (a["state"] == "running" && a["id"] != moved["id"] && ask(&addr, "PING").is_some())
            .then_some(())
    });
    let now = read_all(&addr);
    assert_eq!(now.len(), 10, "{now:?}");
    assert!(now.iter().all(|v| v.starts_with("before-")), "{now:?}");
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}

/// The dir backend cannot stop writes past a limit: `dataset ls` says the dataset is over it;
/// a lower limit than the data is refused, a higher one clears it, and the dataset moves.
#[test]
fn r03_dir_a_dataset_over_its_limit_is_reported_raised_and_moved() {
    let c = TestCluster::start(3, &[]);
    c.ctl_ok(
        c.addr(1),
        &["dataset", "create", "lim", "--node", "n1", "--size", "2M"],
    );
    let live = PathBuf::from(
        holder(&dataset(&c, "lim"), "n1")["mount_path"]
            .as_str()
            .unwrap(),
    );
    fs::write(live.join("big.bin"), pattern(5, 5 << 20)).unwrap();
    let ls = c.ctl_ok(c.addr(2), &["dataset", "ls"]);
    assert!(
        ls.contains("OVER ITS LIMIT on n1") && ls.contains("2.0 MiB OVER"),
        "{ls}"
    );
    let d = dataset(&c, "lim");
    assert!(
        holder(&d, "n1")["over_limit_bytes"].as_u64().unwrap() >= 3 << 20,
        "{d:#}"
    );

    let low = c.ctl(c.addr(2), &["dataset", "set", "lim", "--size", "3M"]);
    assert_ne!(low.status.code(), Some(0));
    assert!(
        stderr(&low).contains("lim holds 5.0 MiB of data")
            && stderr(&low).contains("set a limit of at least"),
        "{}",
        stderr(&low)
    );
    assert_eq!(dataset(&c, "lim")["size_limit"], 2u64 << 20);

    let out = c.ctl_ok(
        c.addr(3),
        &["dataset", "set", "lim", "--size", "16M", "--keep", "last=4"],
    );
    assert!(
        out.contains("limit 16.0 MiB") && out.contains("last=4"),
        "{out}"
    );
    let ls = c.ctl_ok(c.addr(2), &["dataset", "ls"]);
    assert!(!ls.contains("OVER"), "{ls}");

    let out = c.ctl_ok(
        c.addr(1),
        &["dataset", "move", "lim", "--to", "n2", "--json"],
    );
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{out}");
    let moved = PathBuf::from(
        holder(&dataset(&c, "lim"), "n2")["mount_path"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        fs::read(moved.join("big.bin")).unwrap(),
        pattern(5, 5 << 20)
    );

    // An app whose volume is over its limit says so in `app ls`.
    let _end = EndApps(c.dir.path().to_path_buf());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let files = counter_files(c.dir.path(), port, "n1", "1M", "default");
    deploy_counter(&c, &files, &addr);
    let live = PathBuf::from(
        holder(&dataset(&c, "counter"), "n1")["mount_path"]
            .as_str()
            .unwrap(),
    );
    fs::write(live.join("big.bin"), pattern(7, 3 << 20)).unwrap();
    until(
        "app ls to say the volume is over its limit",
        Duration::from_secs(20),
        || {
            let ls = c.ctl_ok(c.addr(2), &["app", "ls"]);
            ls.contains("OVER ITS LIMIT").then_some(())
        },
    );
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}

/// zfs enforces the limit as a refquota: a write past it fails; `dataset set --size` raises
/// it, the write goes through, and the dataset moves.
#[test]
fn r04_zfs_a_write_past_the_limit_fails_until_it_is_raised() {
    let mut pools = Pools::new();
    let args: Vec<Vec<String>> = (0..2).map(|_| zfs_args(&pools.create(256))).collect();
    let c = TestCluster::start_with(2, &[], args);
    c.ctl_ok(
        c.addr(1),
        &["dataset", "create", "lim", "--node", "n1", "--size", "4M"],
    );
    let live = PathBuf::from(
        holder(&dataset(&c, "lim"), "n1")["mount_path"]
            .as_str()
            .unwrap(),
    );
    let big = pattern(6, 8 << 20);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = fs::File::create(live.join("big.bin"))?;
        f.write_all(&big)?;
        f.sync_all()
    };
    let e = write().expect_err("a write past the refquota must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EDQUOT), "{e}");
    c.ctl_ok(c.addr(2), &["dataset", "set", "lim", "--size", "32M"]);
    write().expect("the write fits the raised limit");
    let out = c.ctl_ok(
        c.addr(1),
        &["dataset", "move", "lim", "--to", "n2", "--json"],
    );
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{out}");
    let moved = PathBuf::from(
        holder(&dataset(&c, "lim"), "n2")["mount_path"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(fs::read(moved.join("big.bin")).unwrap(), big);
    drop(c);
}

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the no-room test mounts a {mib} MiB tmpfs and needs root (CAP_SYS_ADMIN): {}",
            stderr(&out)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, mib: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount of {} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The push to `node` of dataset `d`, if one is shown.
fn push_to<'a>(d: &'a Value, node: &str) -> Option<&'a Value> {
    d["transfers"].as_array()?.iter().find(|t| t["to"] == node)
}

/// A replica without room: its push fails, it is marked degraded with the reason (in
/// `dataset ls` too), and it is not tried again every few seconds but after a backoff; once
/// space is freed it catches up.
#[test]
fn r05_a_replica_without_room_backs_off_degraded_and_recovers() {
    let mut c = TestCluster::start(3, &[]);
    // n3's dataset storage on a 16 MiB tmpfs (stopped, moved, started again).
    assert_eq!(
        c.nodes[2].signal_and_wait(libc::SIGTERM, Duration::from_secs(20)),
        Some(0)
    );
    let storage = c.data_dir(3).join("storage");
    let orig = c.dir.path().join("n3-storage.orig");
    if storage.exists() {
        fs::rename(&storage, &orig).unwrap();
    }
    let tmpfs = Tmpfs::mount(&storage, 16);
    if orig.exists() {
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", orig.display()))
            .arg(&storage)
            .status();
        assert!(cp.unwrap().success());
    }
    c.restart(3);
    c.wait_voters(3, Duration::from_secs(30));

    // A dataset created on n3 and moved to n1 leaves n3 a replica.
    c.ctl_ok(c.addr(1), &["dataset", "create", "rep", "--node", "n3"]);
    let out = c.ctl_ok(
        c.addr(1),
        &["dataset", "move", "rep", "--to", "n1", "--json"],
    );
    assert!(out.lines().last().unwrap().contains("\"done\""), "{out}");
    let d = dataset(&c, "rep");
    assert_eq!(holder(&d, "n3")["role"], "replica", "{d:#}");
    let live = PathBuf::from(holder(&d, "n1")["mount_path"].as_str().unwrap());
    fs::write(live.join("big.bin"), pattern(9, 24 << 20)).unwrap();
    c.ctl_ok(c.addr(1), &["dataset", "snapshot", "rep", "--tag", "big"]);

    let t = until(
        "the push to n3 to be degraded",
        Duration::from_secs(30),
        || {
            let d = dataset(&c, "rep");
            push_to(&d, "n3")
                .filter(|t| t["degraded"].is_string())
                .cloned()
        },
    );
    assert!(t["degraded"].as_str().unwrap().contains("space"), "{t:#}");
    assert!(
        t["retry_in_ms"].as_u64().unwrap() > 10_000,
        "not backed off: {t:#}"
    );
    let ls = c.ctl_ok(c.addr(2), &["dataset", "ls"]);
    assert!(ls.contains("rep: replica n3 degraded"), "{ls}");
    let status: Value = c.status(c.addr(2));
    assert!(
        status["warnings"].to_string().contains("degraded"),
        "status has no warning: {status:#}"
    );
    // Not re-sent every few seconds: the attempt count holds while it backs off.
    let attempt = t["attempt"].as_u64().unwrap();
    thread::sleep(Duration::from_secs(8));
    let later = push_to(&dataset(&c, "rep"), "n3").cloned().unwrap();
    assert_eq!(later["attempt"].as_u64().unwrap(), attempt, "{later:#}");

    // Space freed: the next try succeeds, and the degradation is gone.
    tmpfs.resize(128);
    until("n3 to hold big", Duration::from_secs(120), || {
        let d = dataset(&c, "rep");
        (holder(&d, "n3")["latest_snapshot"] == "big").then_some(())
    });
    until("the degradation to clear", Duration::from_secs(10), || {
        let d = dataset(&c, "rep");
        push_to(&d, "n3")
            .is_none_or(|t| t["degraded"].is_null())
            .then_some(())
    });
    // The cluster stops before its storage is unmounted.
    drop(c);
    drop(tmpfs);
}
