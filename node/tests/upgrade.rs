//! A rolling upgrade from the previous build (issue 21): a cluster formed by the baseline's
//! flockd (`.ci/upgrade-baseline`, built by `.ci/build-baseline.sh` into TARGET/baseline) runs
//! a stateful app with a replica under a writer; each node's flockd is then stopped and started
//! again from this build on the same data dir, one node at a time. No acknowledged write is
//! lost, the app is adopted (same process, no restart) and never fenced, the cluster takes
//! writes after each step, and the upgraded nodes keep replicating the app's dataset.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The baseline build's flockd, or a failure saying how to build it.
fn baseline() -> PathBuf {
    let target = Path::new(FLOCKD)
        .parent()
        .and_then(Path::parent)
        .expect("flockd lives in TARGET/debug");
    let bin = target.join("baseline").join("flockd");
    let wanted = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.ci/upgrade-baseline"
    ))
    .expect(".ci/upgrade-baseline")
    .lines()
    .find(|l| !l.starts_with('#') && !l.trim().is_empty())
    .expect(".ci/upgrade-baseline names a commit")
    .trim()
    .to_string();
    let built = fs::read_to_string(target.join("baseline").join("COMMIT")).unwrap_or_default();
    assert!(
        bin.exists() && built.trim() == wanted,
        "no build of the baseline {wanted} at {} (found {:?}): run .ci/build-baseline.sh (./test.sh does)",
        bin.display(),
        built.trim()
    );
    bin
}

fn app(c: &TestCluster, at: usize, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(at), &["app", "show", name, "--json"])).unwrap()
}

/// The newest snapshot recorded for `dataset`, asked of node `at`.
fn newest_snapshot(c: &TestCluster, at: usize, dataset: &str) -> String {
    let ds: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(at), &["dataset", "ls", dataset, "--json"])).unwrap();
    ds[0]["snapshots"]
        .as_array()
        .and_then(|s| s.last())
        .and_then(|s| s["name"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn u01_rolling_upgrade_from_the_baseline_keeps_apps_and_writes() {
    let old = baseline();
    let mut c = TestCluster::start_bin(3, &old);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let entry = replicated_counter_app(port, port + 1);
    deploy_flocker(&c, files.path(), &entry, "n1", "counter");
    let addr = format!("127.0.0.1:{port}");
    until("counter to run on n1", Duration::from_secs(30), || {
        let a = app(&c, 1, "counter");
        (a["state"] == "running" && ask(&addr, "PING").is_some()).then_some(())
    });
    wait_for_replica(&c);
    let before = app(&c, 1, "counter");
    let pid = before["id"].as_str().unwrap().to_string();
    let restarts = before["restarts"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };

    // One node at a time, the app's own node last: stop the old flockd as a service manager
    // would (SIGTERM), start this build's on the same data dir, and check the cluster.
    c.flockd = PathBuf::from(FLOCKD);
    for i in [3, 2, 1] {
        let t0 = std::time::Instant::now();
        let code = c.nodes[i - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        assert_eq!(code, Some(0), "the baseline's n{i} stops cleanly");
        let stopped = t0.elapsed();
        c.restart(i);
        eprintln!(
            "n{i}: stopped in {stopped:?}, this build's flockd ready {:?} after the SIGTERM",
            t0.elapsed()
        );
        c.wait_voters(3, Duration::from_secs(30));
        let key = format!("upgraded-n{i}");
        until(
            &format!("a write through n{i} after its upgrade"),
            Duration::from_secs(15),
            || {
                c.ctl(c.addr(i), &["kv", "put", &key, "yes"])
                    .status
                    .success()
                    .then_some(())
            },
        );
        assert!(
            pid_alive(&pid),
            "counter's process {pid} died while n{i} was upgraded"
        );
    }

    // The upgraded n1 adopted the app: the same process, no restart, and it keeps its dataset
    // replicated (a snapshot newer than the upgrade reaches the replica's record).
    let after = until(
        "n1 to report counter running",
        Duration::from_secs(20),
        || {
            let a = app(&c, 1, "counter");
            (a["state"] == "running").then_some(a)
        },
    );
    assert_eq!(after["id"].as_str(), Some(pid.as_str()), "{after}");
    assert_eq!(after["restarts"], restarts, "{after}");
    let last = newest_snapshot(&c, 1, "counter");
    until(
        "a snapshot taken after the upgrade",
        Duration::from_secs(20),
        || (newest_snapshot(&c, 1, "counter") != last).then_some(()),
    );
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(
        acked.len() > 100,
        "the writer was served through the upgrade: {} appends",
        acked.len()
    );
    let held = read_all(&addr);
    let missing: Vec<&String> = acked
        .iter()
        .map(|(v, _)| v)
        .filter(|v| !held.contains(v))
        .collect();
    assert!(missing.is_empty(), "acknowledged appends lost: {missing:?}");

    // Every node reads what each step wrote, and the new build's commands apply everywhere.
    for i in 1..=3 {
        assert_eq!(
            c.ctl_ok(c.addr(i), &["kv", "get", "upgraded-n3"]).trim(),
            "yes"
        );
    }
    c.ctl_ok(c.addr(2), &["kv", "put", "after", "done"]);
    assert!(
        pid_alive(&pid),
        "counter's process {pid} is still the one serving"
    );
}
