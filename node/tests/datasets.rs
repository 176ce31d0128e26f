//! Datasets against real flockd processes: the dir backend on temp dirs, the zfs backend on
//! file-backed pools under zfs-fuse, pushes over real QUIC, driven by the real flockctl.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `dataset ls NAME --json`, the one dataset.
fn dataset(c: &TestCluster, addr: &str, name: &str) -> Value {
    let v: Value =
        serde_json::from_str(&c.ctl_ok(addr, &["dataset", "ls", name, "--json"])).unwrap();
    v[0].clone()
}

fn holder<'a>(d: &'a Value, node: &str) -> Option<&'a Value> {
    d["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == node)
}

fn mount_path(d: &Value, node: &str) -> PathBuf {
    let h = holder(d, node).unwrap_or_else(|| panic!("{node} holds no copy: {d:#}"));
    assert_eq!(h["state"], "ready", "{d:#}");
    PathBuf::from(h["mount_path"].as_str().unwrap())
}

/// Every regular file under `dir` with its contents, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that two copies hold the same files. A replica's live files follow its newest
/// snapshot a moment after the snapshot shows up, so this gives them a few seconds.
fn assert_same_tree(a: &Path, b: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree(a) != tree(b) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    for (k, v) in &ta {
        assert!(
            tb[k] == *v,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn snapshot_names(d: &Value) -> Vec<String> {
    d["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `node`'s copy has `snapshot` as its newest.
fn wait_latest(c: &TestCluster, addr: &str, name: &str, node: &str, snapshot: &str) -> Value {
    until(
        &format!("{node} to hold {name}@{snapshot}"),
        Duration::from_secs(30),
        || {
            let d = dataset(c, addr, name);
            (holder(&d, node)?["latest_snapshot"] == snapshot).then_some(d)
        },
    )
}

/// The events of `dataset move --json`, whether it succeeded, and its stderr. Fails the test
/// if the move neither ends nor fails within two minutes.
fn move_json(c: &TestCluster, addr: &str, name: &str, to: &str) -> (Vec<Value>, bool, String) {
    let mut child = Command::new(FLOCKCTL)
        .arg("--config")
        .arg(c.config())
        .args([
            "--addr", addr, "dataset", "move", name, "--to", to, "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "dataset move {name} --to {to} still running after 120 s: {}{}",
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (events, out.status.success(), stderr(&out))
}

// ---------------------------------------------------------------------------------------------

#[test]
fn d01_lifecycle_and_bad_input() {
    let c = TestCluster::start(3, &[]);
    let a1 = c.addr(1).to_string();
    let out = c.ctl_ok(
        &a1,
        &["dataset", "create", "db", "--node", "n2", "--size", "64M"],
    );
    assert_eq!(out, "created dataset db on n2 (limit 64.0 MiB)");
    let d = dataset(&c, c.addr(3), "db");
    assert_eq!(d["primary"], "n2");
    assert_eq!(d["size_limit"], 64 << 20);
    let live = mount_path(&d, "n2");
    assert!(live.starts_with(c.data_dir(2)), "{}", live.display());

    // Bad input: clear errors, documented exit codes.
    let dup = c.ctl(&a1, &["dataset", "create", "db"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    let bad = c.ctl(&a1, &["dataset", "create", "a/b"]);
    assert!(
        stderr(&bad).contains("invalid dataset name \"a/b\""),
        "{}",
        stderr(&bad)
    );
    let node = c.ctl(&a1, &["dataset", "create", "x", "--node", "n9"]);
    assert_eq!(node.status.code(), Some(4), "{}", stderr(&node));
    assert!(stderr(&node).contains("no node named \"n9\""));
    let size = c.ctl(&a1, &["dataset", "create", "x", "--size", "12Q"]);
    assert_eq!(size.status.code(), Some(2));
    assert!(
        stderr(&size).contains("\"12Q\" is not a size"),
        "{}",
        stderr(&size)
    );
    for args in [
        &["dataset", "snapshot", "nope"][..],
        &["dataset", "rm", "nope"],
        &["dataset", "move", "nope", "--to", "n1"],
        &["dataset", "ls", "nope"],
    ] {
        let o = c.ctl(&a1, args);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no dataset named \"nope\""),
            "{}",
            stderr(&o)
        );
    }

    // Snapshots and rollback, asked through a node that is not the primary.
    fs::write(live.join("v"), "one").unwrap();
    assert_eq!(
        c.ctl_ok(&a1, &["dataset", "snapshot", "db", "--tag", "s1"]),
        "db@s1"
    );
    fs::write(live.join("v"), "two").unwrap();
    fs::write(live.join("extra"), "x").unwrap();
    let auto = c.ctl_ok(&a1, &["dataset", "snapshot", "db"]);
    assert!(auto.starts_with("db@20"), "{auto}");
    let again = c.ctl(&a1, &["dataset", "snapshot", "db", "--tag", "s1"]);
    assert!(
        stderr(&again).contains("already has a snapshot named \"s1\""),
        "{}",
        stderr(&again)
    );
    let snaps: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(3), &["dataset", "snapshots", "db", "--json"]))
            .unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    assert_eq!(snaps[0]["name"], "s1");
    let unknown = c.ctl(&a1, &["dataset", "rollback", "db", "s0"]);
    assert_eq!(unknown.status.code(), Some(4), "{}", stderr(&unknown));
    // A rollback keeps every snapshot and the state before it, so it can be undone.
    let out = c.ctl_ok(&a1, &["dataset", "rollback", "db", "s1"]);
    assert!(out.starts_with("rolled db back to s1"), "{out}");
    assert_eq!(fs::read_to_string(live.join("v")).unwrap(), "one");
    assert!(!live.join("extra").exists());
    let names = snapshot_names(&dataset(&c, &a1, "db"));
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(names[0], "s1");
    assert_eq!(names[1], auto.trim_start_matches("db@"));
    let kept = names[2].clone();
    assert!(kept.starts_with("pre-rollback-"), "{names:?}");
    assert!(out.contains(&format!("kept as snapshot {kept}")), "{out}");
    c.ctl_ok(&a1, &["dataset", "rollback", "db", &kept]);
    assert_eq!(fs::read_to_string(live.join("v")).unwrap(), "two");
    assert_eq!(fs::read_to_string(live.join("extra")).unwrap(), "x");
    // flock's own snapshot names are refused as tags; a snapshot the user took is removed
    // on request, the newest is refused (the next push starts from it).
    let own = c.ctl(&a1, &["dataset", "snapshot", "db", "--tag", "move-1"]);
    assert!(stderr(&own).contains("flock's own"), "{}", stderr(&own));
    c.ctl_ok(&a1, &["dataset", "snapshot", "rm", "db", "s1"]);
    let newest = snapshot_names(&dataset(&c, &a1, "db")).pop().unwrap();
    let refused = c.ctl(&a1, &["dataset", "snapshot", "rm", "db", &newest]);
    assert!(
        stderr(&refused).contains("must be kept") && stderr(&refused).contains("newest"),
        "{}",
        stderr(&refused)
    );
    assert!(!snapshot_names(&dataset(&c, &a1, "db")).contains(&"s1".to_string()));

    // rm destroys the copy and frees the name.
    let out = c.ctl_ok(c.addr(3), &["dataset", "rm", "db"]);
    assert_eq!(out, "removed dataset db");
    assert!(!live.exists(), "{} still exists", live.display());
    c.ctl_ok(&a1, &["dataset", "create", "db"]);
    let d = dataset(&c, &a1, "db");
    assert_eq!(d["primary"], "n1");
    assert_eq!(d["snapshots"].as_array().unwrap().len(), 0);
}

/// Create on n1, move to n2 (full), snapshot there (the old primary, now a replica, receives it
/// incrementally), then move to n3: every copy byte-identical, every snapshot carried along.
fn move_around(c: &TestCluster, big: usize) {
    let a = c.addr(2).to_string();
    c.ctl_ok(&a, &["dataset", "create", "data", "--node", "n1"]);
    let live1 = mount_path(&dataset(c, &a, "data"), "n1");
    fs::write(live1.join("big.bin"), pattern(1, big)).unwrap();
    fs::create_dir_all(live1.join("sub/dir")).unwrap();
    fs::write(live1.join("sub/dir/small.txt"), "hello\n").unwrap();
    c.ctl_ok(&a, &["dataset", "snapshot", "data", "--tag", "s1"]);

    let (events, ok, err) = move_json(c, &a, "data", "n2");
    assert!(ok, "move to n2 failed: {err}");
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "{events:?}");
    assert_eq!(done["primary"], "n2");
    assert_eq!(done["epoch"], 2);
    let d = dataset(c, &a, "data");
    assert_eq!(d["primary"], "n2");
    assert_eq!(holder(&d, "n1").unwrap()["role"], "replica");
    let live2 = mount_path(&d, "n2");
    assert_same_tree(&live1, &live2);

    // Writes on the new primary reach the replica as an incremental push.
    fs::write(live2.join("sub/dir/small.txt"), "changed\n").unwrap();
    fs::remove_file(live2.join("big.bin")).unwrap();
    fs::write(live2.join("new.bin"), pattern(2, big / 4)).unwrap();
    c.ctl_ok(&a, &["dataset", "snapshot", "data", "--tag", "s2"]);
    wait_latest(c, &a, "data", "n1", "s2");
    assert_same_tree(&live1, &live2);

    let (events, ok, err) = move_json(c, c.addr(3), "data", "n3");
    assert!(ok, "move to n3 failed: {err}");
    let d = dataset(c, &a, "data");
    assert_eq!(
        (d["primary"].as_str(), d["epoch"].as_u64()),
        (Some("n3"), Some(3))
    );
    let live3 = mount_path(&d, "n3");
    assert_same_tree(&live2, &live3);
    // n3 got the whole history, one stream per snapshot.
    assert_eq!(
        holder(&d, "n3").unwrap()["latest_snapshot"],
        *snapshot_names(&d).last().unwrap()
    );
    assert_eq!(events.last().unwrap()["event"], "done", "{events:?}");
    let names = snapshot_names(&d);
    assert_eq!(&names[0], "s1");
    assert!(names.contains(&"s2".to_string()));
    // Rolling back on n3 to s1 works because n3 received s1 too; the replicas follow with
    // the next snapshot.
    c.ctl_ok(&a, &["dataset", "rollback", "data", "s1"]);
    assert_eq!(fs::read(live3.join("big.bin")).unwrap(), pattern(1, big));
    c.ctl_ok(&a, &["dataset", "snapshot", "data", "--tag", "s3"]);
    for n in ["n1", "n2"] {
        wait_latest(c, &a, "data", n, "s3");
    }
    assert_same_tree(&live3, &live1);
}

#[test]
fn d02_dir_moves_full_then_incremental_and_replicas_follow() {
    let c = TestCluster::start(3, &[]);
    move_around(&c, 24 << 20);
}

#[test]
fn d03_zfs_moves_full_then_incremental_and_replicas_follow() {
    let mut pools = Pools::new();
    let args: Vec<Vec<String>> = (0..3).map(|_| zfs_args(&pools.create(256))).collect();
    let c = TestCluster::start_with(3, &[], args);
    let d: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "--json"])).unwrap();
    assert_eq!(d, Value::Array(vec![]));
    move_around(&c, 8 << 20);
    drop(c);
}

#[test]
fn d04_an_interrupted_push_leaves_no_half_copy_and_resumes_incrementally() {
    let mut c = TestCluster::start(3, &[]);
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["dataset", "create", "vol", "--node", "n1"]);
    let live1 = mount_path(&dataset(&c, &a, "vol"), "n1");
    let size = 200 << 20;
    fs::write(live1.join("a.bin"), pattern(3, size)).unwrap();

    // Kill the target in the middle of a full stream: it comes back without a copy, and the
    // move, still recorded in Raft, completes.
    c.ctl_ok(&a, &["dataset", "move", "vol", "--to", "n2", "--no-wait"]);
    until("the full stream to start", Duration::from_secs(30), || {
        let d = dataset(&c, &a, "vol");
        let t = d["transfers"].as_array()?.first()?.clone();
        (t["phase"] == "full" && t["bytes"].as_u64()? > 0).then_some(())
    });
    c.nodes[1].kill9();
    let storage2 = c.data_dir(2).join("storage/datasets");
    let d = dataset(&c, &a, "vol");
    assert_eq!(d["primary"], "n1", "not committed while n2 was down: {d:#}");
    c.restart(2);
    let d = until(
        "the move to finish after n2 came back",
        Duration::from_secs(60),
        || {
            let d = dataset(&c, &a, "vol");
            (d["primary"] == "n2").then_some(d)
        },
    );
    assert_same_tree(&live1, &mount_path(&d, "n2"));
    assert!(storage2.exists());

    // Now n1 (a replica holding the move's snapshot) gets new data and a move back; killing n1
    // mid-stream and restarting it resumes from the snapshot both hold: incremental, never full.
    let live2 = mount_path(&d, "n2");
    fs::write(live2.join("b.bin"), pattern(4, size)).unwrap();
    let held_before = holder(&d, "n1").unwrap()["latest_snapshot"].clone();
    c.ctl_ok(&a, &["dataset", "move", "vol", "--to", "n1", "--no-wait"]);
    let a2 = c.addr(2).to_string();
    let mut phases = Vec::new();
    until(
        "the incremental stream to start",
        Duration::from_secs(30),
        || {
            let d = dataset(&c, &a2, "vol");
            let t = d["transfers"].as_array()?.first()?.clone();
            phases.push(t["phase"].as_str()?.to_string());
            (t["phase"] == "incremental" && t["bytes"].as_u64()? > 0).then_some(())
        },
    );
    c.nodes[0].kill9();
    thread::sleep(Duration::from_millis(300));
    c.restart(1);
    let d = until("the move back to finish", Duration::from_secs(60), || {
        let d = dataset(&c, &a2, "vol");
        // The move's own transfer (to n1): once it commits, the new primary's push to its new
        // replica (n2) is another transfer.
        if let Some(t) = d["transfers"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["to"] == "n1"))
        {
            phases.push(t["phase"].as_str().unwrap_or("").to_string());
        }
        (d["primary"] == "n1").then_some(d)
    });
    assert!(
        !phases.iter().any(|p| p == "full"),
        "resumed from full: {phases:?}"
    );
    assert_ne!(held_before, Value::Null);
    assert_same_tree(&live2, &mount_path(&d, "n1"));
    assert_eq!(fs::read(live2.join("b.bin")).unwrap().len(), size);
}

#[test]
fn d05_zfs_no_space_on_the_target_fails_the_move_and_keeps_the_source() {
    let mut pools = Pools::new();
    let big = pools.create(512);
    let small = pools.create(64);
    let c = TestCluster::start_with(2, &[], vec![zfs_args(&big), zfs_args(&small)]);
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["dataset", "create", "fat", "--node", "n1"]);
    let live1 = mount_path(&dataset(&c, &a, "fat"), "n1");
    let data = pattern(5, 120 << 20);
    fs::write(live1.join("fat.bin"), &data).unwrap();
    let (_, ok, err) = move_json(&c, &a, "fat", "n2");
    assert!(!ok, "the move should fail");
    assert!(err.contains("no space on n2"), "{err}");
    let d = dataset(&c, &a, "fat");
    assert_eq!(d["primary"], "n1");
    assert_eq!(d["moving_to"], Value::Null, "the move was given up: {d:#}");
    assert!(holder(&d, "n2").is_none(), "{d:#}");
    assert_eq!(fs::read(live1.join("fat.bin")).unwrap(), data);
    // No half-received dataset on n2's pool.
    let out = Command::new("zfs")
        .args(["list", "-H", "-r", "-o", "name", &format!("{small}/flock")])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains("fat"), "{listed}");
    drop(c);
}

#[test]
fn d06_zfs_pool_problems_are_reported_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("n1");
    let out = flockd(&[
        "init",
        "--data-dir",
        d.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "zfs",
        "--zfs-pool",
        "nosuchpool",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use zfs pool nosuchpool"), "{err}");
    assert!(
        !d.exists() || fs::read_dir(&d).unwrap().next().is_none(),
        "data dir was written"
    );
    let out = flockd(&[
        "init",
        "--data-dir",
        d.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "zfs",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend zfs needs --zfs-pool"));
}

#[test]
fn d07_a_stream_with_a_flipped_byte_is_rejected_and_the_receiver_keeps_nothing() {
    // The failpoint makes every sender flip the stream's byte at this offset (past the header).
    // SAFETY: set before any thread of this test process starts; each test is its own process.
    std::env::set_var("FLOCK_FAILPOINT_FLIP_STREAM_BYTE", "300000");
    let c = TestCluster::start(2, &[]);
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["dataset", "create", "x", "--node", "n1"]);
    let live1 = mount_path(&dataset(&c, &a, "x"), "n1");
    let data = pattern(7, 4 << 20);
    fs::write(live1.join("x.bin"), &data).unwrap();
    c.ctl_ok(&a, &["dataset", "move", "x", "--to", "n2", "--no-wait"]);
    let d = until(
        "the corrupt stream to be rejected",
        Duration::from_secs(30),
        || {
            let d = dataset(&c, &a, "x");
            let err = d["transfers"][0]["last_error"].as_str()?.to_string();
            err.contains("n2 failed to receive").then_some(d)
        },
    );
    let err = d["transfers"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("rejected"), "{err}");
    assert_eq!(d["primary"], "n1");
    assert_eq!(holder(&d, "n2").unwrap()["state"], "missing", "{d:#}");
    let staged = c.data_dir(2).join("storage/datasets");
    assert!(
        fs::read_dir(&staged).map_or(true, |mut e| e.next().is_none()),
        "n2 kept something of the rejected stream in {}",
        staged.display()
    );
    let out = c.ctl_ok(&a, &["dataset", "move", "x", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    let d = dataset(&c, &a, "x");
    assert_eq!(
        (d["primary"].as_str(), d["moving_to"].clone()),
        (Some("n1"), Value::Null)
    );
    assert_eq!(fs::read(live1.join("x.bin")).unwrap(), data);
}

#[test]
fn d08_the_source_killed_mid_stream_keeps_its_data_and_finishes_the_move_after_restart() {
    let mut c = TestCluster::start(3, &[]);
    let a3 = c.addr(3).to_string();
    c.ctl_ok(&a3, &["dataset", "create", "src", "--node", "n1"]);
    let live1 = mount_path(&dataset(&c, &a3, "src"), "n1");
    let data = pattern(8, 200 << 20);
    fs::write(live1.join("s.bin"), &data).unwrap();
    c.ctl_ok(&a3, &["dataset", "move", "src", "--to", "n2", "--no-wait"]);
    until("the stream to start", Duration::from_secs(30), || {
        let d = dataset(&c, &a3, "src");
        let t = d["transfers"].as_array()?.first()?.clone();
        (t["phase"] == "full" && t["bytes"].as_u64()? > 0).then_some(())
    });
    c.nodes[0].kill9();
    // Nothing is committed while the source is down, and its data is as it was.
    let d = dataset(&c, &a3, "src");
    assert_eq!(d["primary"], "n1");
    assert_eq!(
        fs::read(live1.join("s.bin")).unwrap(),
        data,
        "the source changed"
    );
    c.restart(1);
    let d = until(
        "the move to finish after n1 came back",
        Duration::from_secs(90),
        || {
            let d = dataset(&c, &a3, "src");
            (d["primary"] == "n2").then_some(d)
        },
    );
    assert_eq!(fs::read(mount_path(&d, "n2").join("s.bin")).unwrap(), data);
    assert_eq!(holder(&d, "n1").unwrap()["role"], "replica");
}

#[test]
fn d09_a_move_and_a_replica_push_start_when_the_state_changes_not_at_the_agents_tick() {
    // Every node's dataset agent polls once an hour: only the wake-up on an applied entry
    // (the move asked for, the snapshot recorded) can start the move and the replica push
    // within this test's time limits (2 min for the move, 30 s for the replica).
    let hour = (3600 * 1000).to_string();
    let c = TestCluster::start_env(
        2,
        &[],
        Vec::new(),
        vec![("FLOCK_TEST_DATASETS_TICK_MS".into(), hour)],
    );
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["dataset", "create", "x", "--node", "n1"]);
    let live1 = mount_path(&dataset(&c, &a, "x"), "n1");
    fs::write(live1.join("a.bin"), pattern(3, 1 << 20)).unwrap();
    c.ctl_ok(&a, &["dataset", "snapshot", "x", "--tag", "s1"]);
    let (events, ok, err) = move_json(&c, &a, "x", "n2");
    assert!(ok, "move to n2 failed: {err}");
    assert_eq!(events.last().unwrap()["event"], "done", "{events:?}");
    let d = dataset(&c, &a, "x");
    assert_eq!(holder(&d, "n1").unwrap()["role"], "replica", "{d:#}");
    let live2 = mount_path(&d, "n2");

    // The primary records s2; the replica receives it without waiting for a poll.
    fs::write(live2.join("b.bin"), pattern(4, 1 << 20)).unwrap();
    c.ctl_ok(&a, &["dataset", "snapshot", "x", "--tag", "s2"]);
    wait_latest(&c, &a, "x", "n1", "s2");
    assert_same_tree(&live1, &live2);
}
