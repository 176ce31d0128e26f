//! The drivers fail closed (issue 15): a failed or slow look is never "nothing runs", a stop is
//! Ok only once nothing of the app runs, and a start never removes what it cannot see.
//!
//! - process: real processes (sh, sleep) in their process groups; what lives is read from /proc.
//! - docker: a fake engine served on a unix socket of the test's own (bollard talks to it as to
//!   dockerd) that answers /_ping and /version but fails or hangs what the test says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use flock_node::driver::docker::{LABEL_APP, LABEL_NODE, LABEL_RESTARTS, LABEL_SPEC};
use flock_node::driver::process::ProcessDriver;
use flock_node::driver::{DriverError, Drivers, Kind, RunSpec, RunState, CALL_TIMEOUT};

const GRACE: Duration = Duration::from_secs(2);

fn spec(app: &str, script: &str) -> RunSpec {
    RunSpec {
        app: app.into(),
        image: None,
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        env: BTreeMap::new(),
        dataset_path: None,
        mountpoint: None,
        ports: Vec::new(),
        mem_limit: None,
        cpu_shares: None,
        more: Default::default(),
    }
}

/// The state and process group of a process: `None` once it is gone. A zombie counts as gone
/// (it runs no code), but is told apart in the state.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f[0].chars().next()?, f[2].parse().ok()?))
}

fn lives(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Every process of group `pgid` that is not a zombie (this machine's pid 1 may reap no
/// orphans, so kill(-pgid, 0) alone would still find the zombies).
fn group_lives(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            stat(*pid).is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X')
        })
        .collect()
}

fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} was not written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills what a failed test left (by pid, the ones it started), so no sleep 1000 outlives it.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if lives(*pid) {
                // SAFETY: kill(2) on a pid this test started.
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                }
            }
        }
    }
}

async fn drivers(root: PathBuf) -> Drivers {
    let process = ProcessDriver::new(root)
        .expect("a driver in a temp dir")
        .with_grace(GRACE);
    Drivers {
        process: Arc::new(process),
        docker: None,
        docker_error: "no engine in this test".into(),
    }
}

fn state_of(listing: &flock_node::driver::Listing, app: &str) -> Option<RunState> {
    listing
        .instances
        .iter()
        .find(|(i, _)| i.app == app)
        .map(|(i, _)| i.state.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d01_a_leader_that_exits_first_leaves_the_app_running_until_its_child_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = drivers(tmp.path().join("apps")).await;
    // The worker ignores SIGTERM, so it outlives the leader by the grace period at least.
    let s = spec(
        "lingers",
        "(trap '' TERM; exec sleep 1000) & echo $! > child; exec sleep 1",
    );
    let started = d.start(Kind::Process, &s, 0).await.unwrap();
    let leader: i32 = started.id.parse().unwrap();
    let child = read_pid(&tmp.path().join("apps/lingers/work/child"));
    let _guard = KillOnDrop(vec![leader, child]);
    assert_eq!(stat(child).map(|(_, g)| g), Some(leader), "same group");

    // The leader exits after 1 s; the child lives on: the app still runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lives(leader) {
        assert!(Instant::now() < deadline, "the leader did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader_gone = Instant::now();
    assert!(lives(child), "the child died with the leader");
    let listing = d.list().await;
    assert!(
        matches!(
            state_of(&listing, "lingers"),
            Some(RunState::Running { .. })
        ),
        "{listing:?}"
    );
    // The docker driver is absent here: its apps are unknown, not absent.
    assert!(
        listing.failure(Kind::Docker).is_some(),
        "{:?}",
        listing.failed
    );
    assert!(listing.failure(Kind::Process).is_none());
    // Running as long as the child lives; Exited only once it is gone, which the driver sees
    // to: SIGTERM (ignored), SIGKILL after the grace.
    let deadline = Instant::now() + GRACE + Duration::from_secs(10);
    loop {
        let st = state_of(&d.list().await, "lingers");
        let child_lives = lives(child);
        match st {
            Some(RunState::Running { .. }) => {}
            Some(RunState::Exited { .. }) => {
                assert!(!child_lives, "Exited while child {child} lives");
                break;
            }
            other => panic!("unexpected state {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the driver did not end the leftover child {child}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        leader_gone.elapsed() >= GRACE - Duration::from_millis(300),
        "the child ignoring SIGTERM was reported gone before the grace ran out"
    );
    assert!(group_lives(leader).is_empty());
    // The leader's own exit is what the instance reports.
    assert_eq!(
        d.process.instance("lingers").unwrap().state,
        RunState::Exited {
            code: Some(0),
            signal: None
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d02_stop_kills_the_whole_group_whatever_the_leader_did() {
    let tmp = tempfile::tempdir().unwrap();
    let d = drivers(tmp.path().join("apps")).await;
    // The leader exits at once; the worker ignores SIGTERM. The old driver, seeing the leader
    // dead, signalled nothing and called it stopped.
    let s = spec(
        "worker",
        "(trap '' TERM; exec sleep 1000) & echo $! > child; exit 0",
    );
    let started = d.start(Kind::Process, &s, 0).await.unwrap();
    let leader: i32 = started.id.parse().unwrap();
    let child = read_pid(&tmp.path().join("apps/worker/work/child"));
    let _guard = KillOnDrop(vec![leader, child]);
    let t = Instant::now();
    d.stop(Kind::Process, "worker").await.unwrap();
    assert!(!lives(child), "stop returned Ok while child {child} lives");
    assert!(group_lives(leader).is_empty(), "{:?}", group_lives(leader));
    assert!(
        t.elapsed() < GRACE + Duration::from_secs(6),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(
        state_of(&d.list().await, "worker"),
        Some(RunState::Exited { .. })
    ));
    // Stopping what is stopped is fine; removing forgets it.
    d.stop(Kind::Process, "worker").await.unwrap();
    d.remove(Kind::Process, "worker").await.unwrap();
    assert_eq!(state_of(&d.list().await, "worker"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d03_an_app_that_traps_sigterm_is_killed_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let d = drivers(tmp.path().join("apps")).await;
    let s = spec(
        "stubborn",
        "trap 'echo got TERM' TERM; sleep 1000 & echo $! > child; \
         while :; do sleep 0.05; done",
    );
    let started = d.start(Kind::Process, &s, 0).await.unwrap();
    let leader: i32 = started.id.parse().unwrap();
    let child = read_pid(&tmp.path().join("apps/stubborn/work/child"));
    let _guard = KillOnDrop(vec![leader, child]);
    let t = Instant::now();
    d.stop(Kind::Process, "stubborn").await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= GRACE,
        "stopped after {took:?}: the trap should hold it"
    );
    assert!(!lives(leader) && !lives(child));
    assert!(group_lives(leader).is_empty());
    let lines = d.logs(Kind::Process, "stubborn", 10).await;
    assert!(lines.contains(&"got TERM".to_string()), "{lines:?}");
    // The leader was killed by SIGKILL: its exit says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = state_of(&d.list().await, "stubborn");
        if st
            == Some(RunState::Exited {
                code: None,
                signal: Some(9),
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d04_an_unreadable_record_is_unknown_and_blocks_a_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = drivers(tmp.path().join("apps")).await;
    let s = spec("quick", "exit 0");
    d.start(Kind::Process, &s, 0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        state_of(&d.list().await, "quick"),
        Some(RunState::Exited { .. })
    ) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A record flockd cannot read names no process it could check: unknown, not exited.
    std::fs::write(tmp.path().join("apps/quick/pid"), "garbage\n").unwrap();
    let st = state_of(&d.list().await, "quick");
    assert!(matches!(st, Some(RunState::Unknown { .. })), "{st:?}");
    let e = d.start(Kind::Process, &s, 0).await.unwrap_err();
    assert!(matches!(e, DriverError::Unknown { .. }), "{e}");
    let e = d.stop(Kind::Process, "quick").await.unwrap_err();
    assert!(matches!(e, DriverError::Unknown { .. }), "{e}");
    // A record of the format the previous commit wrote ("PID START SINCE") still loads.
    std::fs::write(
        tmp.path().join("apps/quick/pid"),
        "999999999 1 1700000000\n",
    )
    .unwrap();
    let st = state_of(&d.list().await, "quick");
    assert!(matches!(st, Some(RunState::Exited { .. })), "{st:?}");
}

// ---- docker, against a fake engine ----

/// What the fake engine does with the container calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// /containers/json answers 500.
    ListFails,
    /// /containers/json never answers.
    ListHangs,
    /// /containers/json lists one container of ours; inspecting it answers 500.
    InspectFails,
}

#[derive(Clone)]
struct Fake {
    fault: Fault,
    node: String,
    /// Every request: "METHOD /path".
    seen: Arc<Mutex<Vec<String>>>,
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn engine(fake: Fake, method: Method, uri: Uri, _body: Body) -> Response {
    let path = uri.path().to_string();
    fake.seen.lock().unwrap().push(format!("{method} {path}"));
    // bollard prefixes the API version (/v1.45/...) once it is negotiated.
    let path = match path.strip_prefix("/v1.") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
        None => path,
    };
    if path == "/_ping" {
        return (StatusCode::OK, "OK").into_response();
    }
    if path == "/version" {
        return json(
            StatusCode::OK,
            serde_json::json!({"ApiVersion": "1.45", "Version": "fake-engine", "Os": "linux"}),
        );
    }
    let boom = || {
        json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"message": "the fake engine fails this"}),
        )
    };
    match (fake.fault, path.as_str()) {
        (Fault::ListFails, "/containers/json") => boom(),
        (Fault::ListHangs, "/containers/json") => std::future::pending().await,
        (Fault::InspectFails, "/containers/json") => json(
            StatusCode::OK,
            serde_json::json!([{
                "Id": "c0ffee",
                "Names": [format!("/flock-{}-web", fake.node)],
                "State": "running",
                "Labels": {
                    LABEL_NODE: fake.node,
                    LABEL_APP: "web",
                    LABEL_SPEC: "fp",
                    LABEL_RESTARTS: "2",
                },
            }]),
        ),
        (Fault::InspectFails, p) if p.starts_with("/containers/") && p.ends_with("/json") => boom(),
        // Anything else (create, start, remove, stop, images) must not be reached in these
        // tests: answer an error the test would see.
        _ => json(
            StatusCode::NOT_IMPLEMENTED,
            serde_json::json!({"message": format!("the fake engine does not do {path}")}),
        ),
    }
}

/// Serves the fake engine on a socket in `dir`; its path.
async fn serve(dir: &Path, fake: Fake) -> String {
    let path = dir.join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind the fake engine's socket");
    let app = axum::Router::new()
        .fallback(move |m: Method, u: Uri, b: Body| engine(fake.clone(), m, u, b));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    path.to_str().expect("a utf-8 temp path").to_string()
}

async fn docker_drivers(tmp: &Path, fault: Fault) -> (Drivers, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        fault,
        node: "n1".into(),
        seen: seen.clone(),
    };
    let socket = serve(tmp, fake).await;
    let d = Drivers::open_at(tmp.join("apps"), "n1", &socket)
        .await
        .expect("drivers");
    assert!(
        d.docker.is_some(),
        "the docker driver did not take the fake engine: {}",
        d.docker_error
    );
    (d, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d05_a_failing_container_list_makes_docker_apps_unknown_not_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, _) = docker_drivers(tmp.path(), Fault::ListFails).await;
    let listing = d.list().await;
    let why = listing
        .failure(Kind::Docker)
        .expect("docker among the failed");
    assert!(why.contains("the fake engine fails this"), "{why}");
    assert!(listing.instances.is_empty());
    assert!(listing.failure(Kind::Process).is_none());
    // The driver itself says so too: an error, not an empty list.
    assert!(d.docker.as_ref().unwrap().list().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d06_a_hanging_container_list_fails_within_the_call_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, _) = docker_drivers(tmp.path(), Fault::ListHangs).await;
    let t = Instant::now();
    let listing = d.list().await;
    let took = t.elapsed();
    let why = listing
        .failure(Kind::Docker)
        .expect("docker among the failed");
    assert!(why.contains("did not list"), "{why}");
    assert!(
        took >= CALL_TIMEOUT && took < CALL_TIMEOUT + Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d07_a_failing_inspect_is_unknown_and_start_refuses_instead_of_removing() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, seen) = docker_drivers(tmp.path(), Fault::InspectFails).await;
    let listing = d.list().await;
    assert!(
        listing.failed.iter().all(|(k, _)| *k != Kind::Docker),
        "{listing:?}"
    );
    let (web, kind) = listing
        .instances
        .iter()
        .find(|(i, _)| i.app == "web")
        .expect("the listed container")
        .clone();
    assert_eq!(kind, Kind::Docker);
    let RunState::Unknown { reason } = &web.state else {
        panic!("{web:?}")
    };
    assert!(reason.contains("the fake engine fails this"), "{reason}");
    // What the listing knew is kept.
    assert_eq!(
        (web.id.as_str(), web.fingerprint.as_str(), web.restarts),
        ("c0ffee", "fp", 2)
    );

    let mut s = spec("web", "true");
    s.image = Some("busybox".into());
    seen.lock().unwrap().clear();
    let e = d.start(Kind::Docker, &s, 0).await.unwrap_err();
    assert!(matches!(e, DriverError::Unknown { .. }), "{e}");
    let calls = seen.lock().unwrap().clone();
    assert!(
        calls.iter().all(|c| c.starts_with("GET ")),
        "start touched the container it could not see: {calls:?}"
    );
    assert!(!calls.is_empty());
}
