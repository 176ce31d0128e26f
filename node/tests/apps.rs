//! Applications with the process driver, against real flockd processes: deploy, self-healing
//! restarts, adoption after a flockd restart, and a redeploy that moves an app with its data.

mod common;

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn app(c: &TestCluster, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "show", name, "--json"])).unwrap()
}

fn write_files(dir: &std::path::Path, port: u16, counter_on: &str) -> (PathBuf, PathBuf) {
    let application = dir.join("application.yml");
    fs::write(
        &application,
        format!(
            r#"version: 1
applications:
{}  crasher:
    command: "sh -c 'echo about to fail; exit 7'"
    restart_policy:
      name: on-failure
      maximum_retry_count: 2
"#,
            counter_app(port, port + 1)
        ),
    )
    .unwrap();
    let deployment = dir.join("deployment.yml");
    let others: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != counter_on)
        .collect();
    fs::write(
        &deployment,
        format!(
            "version: 1\nnodes:\n  {counter_on}: [counter]\n  {}: [crasher]\n  {}: []\n",
            others[0], others[1]
        ),
    )
    .unwrap();
    (deployment, application)
}

#[test]
fn a01_deploy_heal_adopt_and_move_with_the_process_driver() {
    let mut c = TestCluster::start(3, &[]);
    let port = free_port();
    let app_addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let (dep, appl) = write_files(dir.path(), port, "n1");
    let (dep_s, appl_s) = (dep.to_str().unwrap(), appl.to_str().unwrap());

    // An unknown node is refused before anything changes.
    let bad = dir.path().join("bad-deployment.yml");
    fs::write(&bad, "version: 1\nnodes:\n  n9: [counter]\n").unwrap();
    let out = c.ctl(
        c.addr(1),
        &["deploy", bad.to_str().unwrap(), appl_s, "--dry-run"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad-deployment.yml:3"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("n9"), "{}", stderr(&out));

    let dry = c.ctl_ok(c.addr(2), &["deploy", dep_s, appl_s, "--dry-run"]);
    assert!(dry.contains("would start counter on n1"), "{dry}");
    let ls: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    assert_eq!(ls, Value::Array(vec![]), "a dry run changed nothing");
    let out = c.ctl_ok(c.addr(2), &["deploy", dep_s, appl_s]);
    assert!(out.contains("start counter on n1"), "{out}");
    assert_eq!(
        c.ctl_ok(c.addr(3), &["deploy", dep_s, appl_s]),
        "no changes: the cluster already runs this configuration"
    );

    let first = until("counter to run", Duration::from_secs(20), || {
        let a = app(&c, "counter");
        (a["state"] == "running" && ask(&app_addr, "PING").is_some()).then_some(a)
    });
    for i in 1..=5 {
        assert_eq!(
            ask(&app_addr, &format!("APPEND v{i}")).as_deref(),
            Some(format!("OK {i}").as_str())
        );
    }
    // on-failure gives up after its maximum, with the exit status and output to show.
    let crasher = until("crasher to fail for good", Duration::from_secs(30), || {
        let a = app(&c, "crasher");
        (a["state"] == "failed").then_some(a)
    });
    assert_eq!(crasher["restarts"], 2);
    assert_eq!(crasher["last_exit_code"], 7);
    assert_eq!(crasher["last_lines"][0], "about to fail");
    let logs = c.ctl_ok(c.addr(1), &["app", "logs", "crasher"]);
    assert!(logs.starts_with("about to fail"), "{logs}");

    // A crashed app is restarted (always), on its data.
    let pid = first["id"].as_str().unwrap().to_string();
    unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    let healed = until("counter to be restarted", Duration::from_secs(20), || {
        let a = app(&c, "counter");
        (a["state"] == "running" && a["id"] != pid && a["restarts"] == 1).then_some(a)
    });
    let pid = healed["id"].as_str().unwrap().to_string();
    until(
        "the restarted counter to answer",
        Duration::from_secs(10),
        || ask(&app_addr, "COUNT"),
    );
    assert_eq!(ask(&app_addr, "COUNT").as_deref(), Some("COUNT 5"));

    // flockd dies and comes back: it adopts the running app instead of starting another.
    c.nodes[0].kill9();
    thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(&pid), "the app died with flockd");
    c.restart(1);
    thread::sleep(Duration::from_secs(2));
    let adopted = until("n1 to report counter", Duration::from_secs(20), || {
        let a = app(&c, "counter");
        (a["state"] == "running").then_some(a)
    });
    assert_eq!(adopted["id"].as_str(), Some(pid.as_str()), "{adopted}");
    assert_eq!(
        adopted["restarts"], 1,
        "the restart count survives flockd: {adopted}"
    );
    assert_eq!(ask(&app_addr, "COUNT").as_deref(), Some("COUNT 5"));

    // The same on crasher's node (n2): on-failure's maximum holds across a flockd restart, so
    // the app that gave up is not run again.
    assert_eq!(crasher["node"], "n2", "{crasher}");
    c.nodes[1].kill9();
    c.restart(2);
    thread::sleep(Duration::from_secs(3)); // a restart would come after a 1 s backoff
    let crasher = until("n2 to report crasher", Duration::from_secs(20), || {
        let a = app(&c, "crasher");
        (a["state"] != "").then_some(a)
    });
    assert_eq!(crasher["state"], "failed", "{crasher}");
    assert_eq!(crasher["restarts"], 2, "{crasher}");
    let logs = c.ctl_ok(c.addr(1), &["app", "logs", "crasher"]);
    assert_eq!(
        logs.lines().filter(|l| *l == "about to fail").count(),
        3,
        "crasher ran once and was restarted twice, never again: {logs}"
    );

    // Redeployed on n2: stops on n1, the dataset moves, it starts on n2 with every write.
    let (dep2, _) = write_files(dir.path(), port, "n2");
    let out = c.ctl_ok(c.addr(1), &["deploy", dep2.to_str().unwrap(), appl_s]);
    assert!(out.contains("move counter from n1 to n2"), "{out}");
    let moved = until("counter to run on n2", Duration::from_secs(60), || {
        let a = app(&c, "counter");
        (a["node"] == "n2" && a["state"] == "running" && ask(&app_addr, "PING").is_some())
            .then_some(a)
    });
    assert_ne!(moved["id"].as_str(), Some(pid.as_str()));
    assert!(!pid_alive(&pid), "the old instance still runs on n1");
    assert_eq!(ask(&app_addr, "COUNT").as_deref(), Some("COUNT 5"));
    let ds: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(3), &["dataset", "ls", "counter", "--json"]))
            .unwrap();
    assert_eq!(ds[0]["primary"], "n2");
    // A dataset an app uses cannot be removed or moved by hand.
    let rm = c.ctl(c.addr(1), &["dataset", "rm", "counter"]);
    assert!(
        stderr(&rm).contains("volume of app \"counter\""),
        "{}",
        stderr(&rm)
    );

    let out = c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
    assert!(out.contains("removed app counter"), "{out}");
    let new_pid = moved["id"].as_str().unwrap().to_string();
    until("counter to stop", Duration::from_secs(20), || {
        (!pid_alive(&new_pid)).then_some(())
    });
    let missing = c.ctl(c.addr(1), &["app", "show", "counter"]);
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    c.ctl_ok(c.addr(1), &["app", "rm", "crasher"]);
}

/// Where apps may go: labels and constraints, memory and cpu reservations against what nodes
/// report, and a program missing on the node it would run on, each refused before anything is
/// deployed, at --dry-run too.
#[test]
fn a02_placement_fits_apps_to_nodes_and_refuses_what_cannot_run() {
    let c = TestCluster::start_with(3, &[], vec![vec![], vec![], s(&["--label", "disk=ssd"])]);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // Every node reports its capacity shortly after it starts; n3 its label.
    let status = until("the nodes to report", Duration::from_secs(20), || {
        let st = c.status(c.addr(1));
        let nodes = st["members"].as_array()?.clone();
        nodes
            .iter()
            .all(|n| {
                n["memory"].as_u64().is_some_and(|m| m > 0)
                    && n["cpus"].as_u64().is_some_and(|c| c > 0)
            })
            .then_some(nodes)
    });
    let n3 = status.iter().find(|n| n["name"] == "n3").unwrap();
    assert_eq!(n3["labels"]["disk"], "ssd", "{n3}");

    let compose = write(
        "compose.yml",
        "name: t\nservices:\n  fast:\n    command: sleep 600\n    deploy:\n      placement:\n        constraints: [node.labels.disk == ssd]\n  anywhere:\n    command: sleep 600\n    deploy:\n      placement:\n        constraints: [\"node.hostname != n1\", \"node.hostname != n3\"]\n",
    );
    let dry = c.ctl_ok(c.addr(1), &["deploy", &compose, "--dry-run"]);
    assert!(dry.contains("would start t_fast on n3"), "{dry}");
    assert!(dry.contains("would start t_anywhere on n2"), "{dry}");

    // More memory than any node has: refused with each node's reason.
    let greedy = write(
        "greedy.yml",
        "name: t\nservices:\n  greedy:\n    command: sleep 600\n    mem_limit: 100000g\n",
    );
    let out = c.ctl(c.addr(2), &["deploy", &greedy, "--dry-run"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no ready node can run app \"t_greedy\""),
        "{err}"
    );
    assert!(
        err.contains("n1: mem_limit") && err.contains("n3: mem_limit"),
        "{err}"
    );

    // Pinned where its constraint does not hold: refused, naming the constraint.
    let apps = write(
        "application.yml",
        "version: 1\napplications:\n  fast:\n    command: sleep 600\n    constraints: [node.labels.disk == ssd]\n  ghost:\n    command: [/no/such/program]\n",
    );
    let pinned = write("deployment.yml", "version: 1\nnodes:\n  n1: [fast]\n");
    let err = stderr(&c.ctl(c.addr(1), &["deploy", &pinned, &apps]));
    assert!(
        err.contains("app \"fast\" cannot run on node \"n1\"")
            && err.contains("node.labels.disk == ssd"),
        "{err}"
    );

    // A program missing on the node it would run on: refused by that node's preflight, at
    // --dry-run and for real, and nothing is deployed.
    let ghostly = write(
        "ghost-deployment.yml",
        "version: 1\nnodes:\n  n3: [fast]\n  n2: [ghost]\n",
    );
    for extra in [&["--dry-run"][..], &[]] {
        let mut args = vec!["deploy", ghostly.as_str(), apps.as_str()];
        args.extend(extra);
        let out = c.ctl(c.addr(1), &args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("nothing was deployed")
                && err.contains("app ghost on node n2: command /no/such/program does not exist"),
            "{err}"
        );
    }
    let ls: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    assert_eq!(ls, Value::Array(vec![]), "nothing deployed");

    let out = c.ctl_ok(c.addr(3), &["deploy", &compose]);
    assert!(
        out.contains("stack t:") && out.contains("start t_fast on n3"),
        "{out}"
    );
    until("fast to run on n3", Duration::from_secs(20), || {
        let a = app(&c, "t_fast");
        (a["node"] == "n3" && a["state"] == "running").then_some(())
    });
    let stacks = c.ctl_ok(c.addr(2), &["stack", "ls"]);
    assert!(
        stacks.contains("t ") && stacks.contains("anywhere,fast"),
        "{stacks}"
    );
    c.ctl_ok(c.addr(1), &["app", "rm", "t_fast"]);
    let out = c.ctl_ok(c.addr(1), &["stack", "rm", "t"]);
    assert!(out.contains("removed stack t: 1 app(s)"), "{out}");
    let ls: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    assert_eq!(ls, Value::Array(vec![]), "the stack's apps are gone");
    let out = c.ctl(c.addr(1), &["stack", "rm", "t"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a stack that is not there: not found"
    );
}

/// `flockctl app move` of the test app, from n1 to n3, while a client appends to it without
/// pause: every acknowledged append is there after the move, the bulk data too, the app runs
/// once, on n3, and the dataset's primary is n3. Prints the longest gap between two acks.
fn move_under_writes(c: &TestCluster, bulk: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let port = free_port();
    let app_addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let (dep, appl) = write_files(dir.path(), port, "n1");
    c.ctl_ok(
        c.addr(1),
        &["deploy", dep.to_str().unwrap(), appl.to_str().unwrap()],
    );
    until("counter to run", Duration::from_secs(30), || {
        let a = app(c, "counter");
        (a["state"] == "running" && ask(&app_addr, "PING").is_some()).then_some(())
    });
    let d: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]))
            .unwrap();
    let holder = d[0]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == "n1")
        .unwrap_or_else(|| panic!("n1 holds no copy: {d:#}"));
    let live = PathBuf::from(holder["mount_path"].as_str().unwrap());
    let data = pattern(11, bulk);
    fs::write(live.join("bulk.bin"), &data).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (app_addr.clone(), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = c.ctl_ok(
        c.addr(2),
        &["app", "move", "counter", "--to", "n3", "--json"],
    );
    let took = started.elapsed();
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{out}");
    let moved = until("counter to run on n3", Duration::from_secs(30), || {
        let a = app(c, "counter");
        (a["node"] == "n3" && a["state"] == "running").then_some(a)
    });
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(acked.len() > 10, "the writer got {} acks", acked.len());
    let held: std::collections::HashSet<String> = read_all(&app_addr).into_iter().collect();
    let lost: Vec<&String> = acked
        .iter()
        .map(|(v, _)| v)
        .filter(|v| !held.contains(*v))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged appends lost, first {:?}",
        lost.len(),
        lost.first()
    );
    let gap = acked
        .windows(2)
        .map(|p| p[1].1 - p[0].1)
        .max()
        .unwrap_or_default();
    eprintln!(
        "app move of {} MiB: {:.2}s in all, {} appends acknowledged, longest gap between two {:.3}s",
        bulk >> 20,
        took.as_secs_f64(),
        acked.len(),
        gap.as_secs_f64()
    );
    // The rounds after the first, and the last one above all (the app is stopped for it), are
    // incremental: the downtime must not grow with the data.
    let log = fs::read_to_string(c.log(1, "init")).unwrap();
    let pushes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pushed the move's snapshot"))
        .collect();
    assert!(pushes.len() >= 2, "{pushes:#?}");
    assert!(
        pushes[1..].iter().all(|l| l.contains("base=Some")),
        "a later round of the move sent the whole dataset: {pushes:#?}"
    );
    let d: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]))
            .unwrap();
    assert_eq!(d[0]["primary"], "n3", "{d:#}");
    let n3 = d[0]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == "n3")
        .unwrap();
    let moved_bulk =
        fs::read(PathBuf::from(n3["mount_path"].as_str().unwrap()).join("bulk.bin")).unwrap();
    assert!(moved_bulk == data, "bulk.bin differs on n3");
    // One instance, on n3: nothing answers for counter on n1's driver.
    let pid = moved["id"].as_str().unwrap();
    assert!(pid_alive(pid));
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
    c.ctl_ok(c.addr(1), &["app", "rm", "crasher"]);
}

#[test]
fn a03_app_move_under_writes_dir() {
    let c = TestCluster::start(3, &[]);
    move_under_writes(&c, 40 << 20);
}

#[test]
fn a04_app_move_under_writes_zfs() {
    let mut pools = Pools::new();
    // The app works in a pool's mount, not under the cluster's dir: ended before the pools go.
    let _end = EndApps(pools.dir().to_path_buf());
    let args: Vec<Vec<String>> = (0..3).map(|_| zfs_args(&pools.create(256))).collect();
    let c = TestCluster::start_with(3, &[], args);
    move_under_writes(&c, 24 << 20);
    drop(c);
}

/// The flock-testapp processes serving `port` on this machine.
fn instances(port: u16) -> usize {
    let needle = format!("127.0.0.1:{port}");
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("flock-testapp") && c.contains(&needle))
        .count()
}

/// Moves interrupted by killing (kill -9) the source, the target or the leader in each phase,
/// or cancelled in each phase, while a client appends without pause: each ends with the app
/// running once, on the target (on the source when cancelled), with every acknowledged append;
/// while the first phase is interrupted the app keeps serving on the source. A failpoint holds the move 3 s after the step, for the kill to land there.
#[test]
fn a05_moves_interrupted_by_kills_end_in_one_copy_with_every_acked_write() {
    // (step held, the node killed: "source" n2, "target" n3, or "leader"; or "cancel")
    interrupted_moves(
        &[
            ("copied", "target"),
            ("copied", "source"),
            ("handoff", "source"),
            ("handoff", "target"),
            ("handoff", "leader"),
            ("copied", "leader"),
            ("copied", "cancel"),
            ("handoff", "cancel"),
        ],
        false,
    );
}

/// a05's kills on the zfs backend (real zfs-fuse pools), in both phases.
#[test]
fn a06_moves_interrupted_by_kills_on_zfs() {
    interrupted_moves(
        &[
            ("copied", "target"),
            ("copied", "source"),
            ("copied", "leader"),
            ("handoff", "source"),
            ("handoff", "target"),
            ("handoff", "leader"),
        ],
        true,
    );
}

/// For each (step, victim): a move of the test app from n2 to n3 under writes, held at `step`
/// by the failpoint, then the victim killed and restarted (or the move cancelled). Every case
/// ends with the app running once, where it should, with every acknowledged append.
fn interrupted_moves(cases: &[(&str, &str)], zfs: bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for &(step, victim) in cases {
        // SAFETY: nextest runs each test in its own process, and no other thread reads the
        // environment here; the flockd processes inherit it.
        unsafe { std::env::set_var("FLOCK_FAILPOINT_MOVE_HOLD", format!("{step}:3000")) };
        // Fresh pools per case, destroyed after its cluster (dropped first: declared later).
        let mut pools = zfs.then(Pools::new);
        let _end = pools.as_ref().map(|p| EndApps(p.dir().to_path_buf()));
        let args: Vec<Vec<String>> = match pools.as_mut() {
            Some(p) => (0..3).map(|_| zfs_args(&p.create(128))).collect(),
            None => Vec::new(),
        };
        let mut c = TestCluster::start_with(3, &[], args);
        let port = free_port();
        let app_addr = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let (dep, appl) = write_files(dir.path(), port, "n2");
        c.ctl_ok(
            c.addr(1),
            &["deploy", dep.to_str().unwrap(), appl.to_str().unwrap()],
        );
        until("counter to run on n2", Duration::from_secs(30), || {
            let a = app(&c, "counter");
            (a["state"] == "running" && ask(&app_addr, "PING").is_some()).then_some(())
        });
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (addr, stop) = (app_addr.clone(), stop.clone());
            thread::spawn(move || writer(addr, stop))
        };
        thread::sleep(Duration::from_millis(300));
        c.ctl_ok(
            c.addr(1),
            &["app", "move", "counter", "--to", "n3", "--no-wait"],
        );
        let held = "failpoint: holding the move";
        until(
            &format!("the move to reach {step}"),
            Duration::from_secs(30),
            || {
                let log = fs::read_to_string(c.log(2, "join")).unwrap_or_default();
                log.lines()
                    .any(|l| l.contains(held) && l.contains(step))
                    .then_some(())
            },
        );
        // app ls tells where the app is and how far its move got.
        let a = app(&c, "counter");
        let phase = if step == "copied" {
            "copying its data while it runs"
        } else {
            "handing off"
        };
        let detail = a["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&format!("moving to n3: {phase}")), "{a}");
        assert_eq!(a["moving_to"], "n3", "{a}");
        if step == "copied" {
            assert_eq!(
                (&a["node"], &a["state"]),
                (&Value::from("n2"), &Value::from("running")),
                "{a}"
            );
            assert!(detail.contains("MiB"), "{a}");
        }
        // A cancelled move ends on the source, every other one on the target.
        let end = if victim == "cancel" { "n2" } else { "n3" };
        if victim == "cancel" {
            let out = c.ctl_ok(c.addr(3), &["app", "move", "counter", "--cancel"]);
            assert!(out.contains("stays on n2"), "{out}");
        } else {
            let i = match victim {
                "source" => 2,
                "target" => 3,
                _ => c.leader(),
            };
            c.nodes[i - 1].kill9();
            if step == "copied" && i != 2 {
                thread::sleep(Duration::from_millis(300));
                assert!(
                    ask(&app_addr, "PING").is_some_and(|p| p.starts_with("PONG")),
                    "{step}/{victim}: the app stopped on the source during the first phase"
                );
            }
            thread::sleep(Duration::from_secs(1));
            c.restart(i);
        }
        let moved = until(
            &format!("{step}/{victim}: counter to run on {end}"),
            Duration::from_secs(90),
            || {
                let a = app(&c, "counter");
                (a["node"] == end && a["state"] == "running" && ask(&app_addr, "PING").is_some())
                    .then_some(a)
            },
        );
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let acked = w.join().unwrap();
        let all: std::collections::HashSet<String> = read_all(&app_addr).into_iter().collect();
        let lost = acked.iter().filter(|(v, _)| !all.contains(v)).count();
        assert_eq!(
            lost,
            0,
            "{step}/{victim}: {lost} of {} acknowledged appends lost",
            acked.len()
        );
        assert_eq!(
            instances(port),
            1,
            "{step}/{victim}: counter runs more than once: {moved}"
        );
        eprintln!("{step}/{victim}: ok, {} appends acknowledged", acked.len());
        c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
        c.ctl_ok(c.addr(1), &["app", "rm", "crasher"]);
        until("counter to stop", Duration::from_secs(20), || {
            (instances(port) == 0).then_some(())
        });
    }
}
