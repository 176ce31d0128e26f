//! A CLI that explains itself (issue 21), tried as a new user would: a missing config named once
//! with what to do, exit codes as the README says, Flocker's two files given the wrong way
//! round or one without the other, and the test app's `--help`.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn c01_a_missing_config_is_named_once_with_what_to_do() {
    let o = Command::new(FLOCKCTL)
        .args(["--config", "/nonexistent/admin.conf", "status"])
        .env_remove("FLOCK_CONFIG")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot read the client config /nonexistent/admin.conf: no such file"),
        "{err}"
    );
    assert!(err.contains("FLOCK_CONFIG"), "{err}");
    assert!(
        !err.contains("os error"),
        "the OS error, once or twice: {err}"
    );
}

#[test]
fn c02_the_test_apps_help_goes_to_stdout_and_exits_0() {
    let o = Command::new(testapp()).arg("--help").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("usage: flock-testapp"), "{out}");
    assert!(out.contains("--ask"), "{out}");
}

#[test]
fn c03_deploy_says_which_flocker_file_is_which_and_rm_of_an_unknown_node_exits_4() {
    let c = TestCluster::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("application.yml");
    let dep = dir.path().join("deployment.yml");
    fs::write(
        &app,
        "version: 1\napplications:\n  web:\n    command: [\"sleep\", \"1000\"]\n",
    )
    .unwrap();
    fs::write(&dep, "version: 1\nnodes:\n  n1: [web]\n").unwrap();
    let (app, dep) = (app.to_str().unwrap(), dep.to_str().unwrap());

    let o = c.ctl(c.addr(1), &["deploy", "--dry-run", app, dep]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the files are the wrong way round")
            && err.contains(&format!("flockctl deploy {dep} {app}")),
        "{err}"
    );

    let o = c.ctl(c.addr(1), &["deploy", "--dry-run", dep]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("looks like Flocker's deployment.yml") && err.contains("application.yml"),
        "{err}"
    );

    // The right way round is accepted.
    let out = c.ctl_ok(c.addr(1), &["deploy", "--dry-run", dep, app]);
    assert!(out.contains("web"), "{out}");

    let o = c.ctl(c.addr(1), &["node", "rm", "n9"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
}

/// The whole cluster stopped (SIGTERM) and started again, one node after the other, as after a
/// power cut or an upgrade: while the others are still down, nothing is logged as an ERROR (a
/// voter that does not answer yet is no error of the node's).
#[test]
fn c04_a_healthy_restart_logs_no_error() {
    let mut c = TestCluster::start(3, &[]);
    c.ctl_ok(c.addr(1), &["kv", "put", "k", "before"]);
    for i in 1..=3 {
        let code = c.nodes[i - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
        assert_eq!(code, Some(0), "n{i} stops");
    }
    for i in 1..=3 {
        c.restart(i);
        std::thread::sleep(Duration::from_millis(500));
    }
    until("a write after the restart", Duration::from_secs(30), || {
        c.ctl(c.addr(1), &["kv", "put", "k", "after"])
            .status
            .success()
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    for i in 1..=3 {
        let log = fs::read_to_string(c.log(i, "run")).unwrap();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "n{i} logged errors: {errors:#?}");
    }
}

/// `app move APP --to NODE` back to the node its data is on, while it moves away, cancels that
/// move and says so, instead of reporting a move "to NODE in 0.0s" that did not happen.
#[test]
fn c05_moving_an_app_back_while_it_moves_away_says_the_move_is_cancelled() {
    // SAFETY: nextest runs each test in its own process, and no other thread reads the
    // environment here; the flockd processes inherit it.
    unsafe { std::env::set_var("FLOCK_FAILPOINT_MOVE_HOLD", "copied:20000") };
    let c = TestCluster::start(2, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let port = free_port();
    deploy_flocker(
        &c,
        c.dir.path(),
        &counter_app(port, port + 1),
        "n1",
        "counter",
    );
    let addr = format!("127.0.0.1:{port}");
    until("counter to answer", Duration::from_secs(30), || {
        ask(&addr, "PING")
    });
    c.ctl_ok(
        c.addr(1),
        &["app", "move", "counter", "--to", "n2", "--no-wait"],
    );
    until("the move to hold", Duration::from_secs(30), || {
        let log = fs::read_to_string(c.log(1, "init")).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("failpoint: holding the move") && l.contains("copied"))
            .then_some(())
    });
    let out = c.ctl_ok(c.addr(1), &["app", "move", "counter", "--to", "n1"]);
    assert!(
        out.contains("counter stays on n1, where its data is: the move it was making is cancelled"),
        "{out}"
    );
    let ds = c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]);
    let ds: serde_json::Value = serde_json::from_str(&ds).unwrap();
    assert_eq!(ds[0]["primary"], "n1", "{ds}");
    assert_eq!(ds[0]["epoch"], 1, "{ds}");
    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);
}
