//! Agents that fail closed (issue 15), against real flockd processes and real process-driver
//! apps:
//!
//! - f01: a start decided before a move's handoff, held (FLOCK_FAILPOINT_START_HOLD) until the
//!   move has committed, is not carried out: the apps agent re-checks the latest state under the
//!   dataset's start gate (jepsen seed 4122026 ran two instances before this).
//! - f02: a Docker engine (a fake one on the test's own socket, FLOCK_DOCKER_SOCKET) whose
//!   container list fails: its apps show "unknown" with the reason, nothing is started, and a
//!   move of one waits after the handoff until the engine lists again.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::Value;

fn app(c: &TestCluster, name: &str) -> Value {
    serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "show", name, "--json"])).unwrap()
}

fn dataset(c: &TestCluster, name: &str) -> Value {
    let v: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", name, "--json"])).unwrap();
    v[0].clone()
}

/// The mount path of `node`'s copy of the dataset `ds` (as `dataset ls --json` shows it).
fn mount_path(ds: &Value, node: &str) -> Option<PathBuf> {
    ds["holders"]
        .as_array()?
        .iter()
        .find(|h| h["node"] == node)?["mount_path"]
        .as_str()
        .map(PathBuf::from)
}

/// The lines of `path`; none when it does not exist.
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            (fs::read_link(e.path().join("cwd")).ok()? == dir && pid_alive(&pid.to_string()))
                .then(|| pid.to_string())
        })
        .collect()
}

/// The log lines of `log` that contain `what`, with their index.
fn log_lines(log: &Path, what: &str) -> Vec<(usize, String)> {
    lines(log)
        .into_iter()
        .enumerate()
        .filter(|(_, l)| l.contains(what))
        .collect()
}

/// How long the source's agent holds every start of the app: long enough for the whole move
/// (copy round, handoff, stop check, last round, commit; about a second here) to happen inside.
const HOLD_MS: u64 = 6000;

#[test]
fn f01_a_start_held_across_a_move_never_runs_on_the_source_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let starts_log = dir.path().join("starts.log");
    // Only n1 (the source) holds its starts; n2 (the target) starts at once.
    let mut c = TestCluster::start_env(
        1,
        &[],
        Vec::new(),
        vec![(
            "FLOCK_FAILPOINT_START_HOLD".into(),
            format!("flappy:{HOLD_MS}"),
        )],
    );
    c.env.clear();
    let n2 = c.join(2).expect("n2 joins");
    c.nodes.push(n2);
    until("n2 to be a member", Duration::from_secs(20), || {
        let st = c.status(c.addr(1));
        (st["members"].as_array()?.len() == 2).then_some(())
    });

    // Each instance writes one line to its dataset and one to starts.log (outside any dataset:
    // every start on any node, whatever becomes of the copies), each "PID DIR", then fails
    // soon: the app spends most of its time in restart backoff or in a held start.
    let script = format!(
        "echo \"$$ $PWD\" >> data.txt; echo \"$$ $PWD\" >> {}; sleep 1; exit 1",
        starts_log.display()
    );
    let application = dir.path().join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n  flappy:\n    command: [\"sh\", \"-c\", {}]\n    volume:\n      mountpoint: /data\n      maximum_size: 64M\n    restart_policy:\n      name: always\n",
            serde_json::to_string(&script).unwrap()
        ),
    )
    .unwrap();
    let deployment = dir.path().join("deployment.yml");
    fs::write(
        &deployment,
        "version: 1\nnodes:\n  n1: [flappy]\n  n2: []\n",
    )
    .unwrap();
    let out = c.ctl_ok(
        c.addr(1),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    assert!(out.contains("start flappy on n1"), "{out}");

    // The first start (held too) ran and exited; its restart is decided and held now.
    let n1_log = c.log(1, "init");
    let held = "failpoint: holding the start";
    let held_at = until("the restart to be held", Duration::from_secs(40), || {
        (log_lines(&n1_log, held).len() >= 2).then(Instant::now)
    });
    let before = lines(&starts_log);
    assert_eq!(
        before.len(),
        1,
        "one instance ran before the held restart: {before:?}"
    );
    let source = dataset(&c, "flappy");
    let source_path = mount_path(&source, "n1").expect("n1's copy");
    assert!(
        before[0].ends_with(&format!(" {}", source_path.display())),
        "{before:?}"
    );
    let epoch = source["epoch"].as_u64().unwrap();

    // The move, whole, inside the hold.
    let out = c.ctl_ok(
        c.addr(2),
        &["app", "move", "flappy", "--to", "n2", "--json"],
    );
    let done: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done", "{out}");
    assert_eq!(done["epoch"], epoch + 1, "{out}");
    eprintln!(
        "the move ended {:.2}s into the {HOLD_MS} ms hold",
        held_at.elapsed().as_secs_f64()
    );
    let committed = log_lines(&n1_log, "move committed");
    assert_eq!(committed.len(), 1, "{committed:?}");
    assert!(
        held_at.elapsed() < Duration::from_millis(HOLD_MS - 1000),
        "the move took too long ({:?} of the {HOLD_MS} ms hold): it must commit while the start is held",
        held_at.elapsed()
    );

    // The hold ends; give a start carried out then time to show.
    let hold_end = held_at + Duration::from_millis(HOLD_MS);
    thread::sleep(hold_end.saturating_duration_since(Instant::now()) + Duration::from_secs(2));

    // Nothing ran on the source after the commit: no start there, no process in its copy, no
    // live pid in its driver's record, and no line in its copy the target lacks.
    let after = lines(&starts_log);
    let on_source: Vec<&String> = after
        .iter()
        .filter(|l| l.ends_with(&format!(" {}", source_path.display())))
        .collect();
    assert_eq!(
        on_source.len(),
        1,
        "the held start ran on the source after the move committed: {after:?}"
    );
    assert_eq!(processes_in(&source_path), Vec::<String>::new());
    let record = c.data_dir(1).join("apps/flappy/pid");
    if let Ok(text) = fs::read_to_string(&record) {
        let pid = text.split_whitespace().next().unwrap_or_default();
        assert!(
            !pid_alive(pid),
            "n1's driver record names a live pid: {text}"
        );
    }
    let moved = dataset(&c, "flappy");
    assert_eq!(moved["primary"], "n2", "{moved:#}");
    let target_path = mount_path(&moved, "n2").expect("n2's copy");
    let target_lines = lines(&target_path.join("data.txt"));
    for l in lines(&source_path.join("data.txt")) {
        assert!(
            target_lines.contains(&l),
            "{l:?} landed in the source's copy after the move's last round: target has {target_lines:?}"
        );
    }
    // The source's write before the move is on the target.
    assert!(target_lines.contains(&before[0]), "{target_lines:?}");

    // The source's log says why it did not start.
    let refused = log_lines(&n1_log, "not starting: the state moved on");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].1.contains("flappy"), "{refused:?}");
    eprintln!("n1: {}", refused[0].1);
    let second_hold = log_lines(&n1_log, held)[1].0;
    assert!(
        second_hold < committed[0].0 && committed[0].0 < refused[0].0,
        "expected: start held, move committed, start refused; log lines {second_hold}, {}, {}",
        committed[0].0,
        refused[0].0
    );

    // The app runs on the target, in the target's copy.
    until("flappy to start on n2", Duration::from_secs(20), || {
        lines(&starts_log)
            .iter()
            .any(|l| l.ends_with(&format!(" {}", target_path.display())))
            .then_some(())
    });
    let a = app(&c, "flappy");
    assert_eq!(a["node"], "n2", "{a}");
    c.ctl_ok(c.addr(1), &["app", "rm", "flappy"]);
    // Nothing of the app outlives the test (its processes outlive flockd by design).
    until("flappy's processes to end", Duration::from_secs(20), || {
        (processes_in(&source_path).is_empty() && processes_in(&target_path).is_empty())
            .then_some(())
    });
}

// ---- f02: a Docker engine that errors ----

/// A fake Docker engine on a unix socket: answers /_ping, /version and image inspects; its
/// container list fails with 500 while `list_fails`, else is empty; every other call is
/// answered 501 (the tests assert none is made). Records every request, "METHOD /path".
#[derive(Clone)]
struct FakeEngine {
    list_fails: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
}

fn json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn engine(fake: FakeEngine, method: Method, uri: Uri, _body: Body) -> Response {
    let path = uri.path().to_string();
    fake.seen.lock().unwrap().push(format!("{method} {path}"));
    // bollard prefixes the API version (/v1.45/...) once it is negotiated.
    let path = match path.strip_prefix("/v1.") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
        None => path,
    };
    match (method, path.as_str()) {
        (_, "/_ping") => (StatusCode::OK, "OK").into_response(),
        (_, "/version") => json(
            StatusCode::OK,
            serde_json::json!({"ApiVersion": "1.45", "Version": "fake-engine", "Os": "linux"}),
        ),
        (Method::GET, p) if p.starts_with("/images/") && p.ends_with("/json") => json(
            StatusCode::OK,
            serde_json::json!({"Id": "sha256:fake", "RepoTags": ["flock-fake/web:1"]}),
        ),
        (Method::GET, "/containers/json") if fake.list_fails.load(Ordering::SeqCst) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"message": "the fake engine fails this"}),
        ),
        (Method::GET, "/containers/json") => json(StatusCode::OK, serde_json::json!([])),
        _ => json(
            StatusCode::NOT_IMPLEMENTED,
            serde_json::json!({"message": format!("the fake engine does not do {path}")}),
        ),
    }
}

impl FakeEngine {
    /// Serves a new fake engine at `socket` on `rt`.
    fn serve(rt: &tokio::runtime::Runtime, socket: &Path, list_fails: bool) -> FakeEngine {
        let fake = FakeEngine {
            list_fails: Arc::new(AtomicBool::new(list_fails)),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::UnixListener::bind(socket).expect("bind the fake engine's socket")
        };
        let f = fake.clone();
        let router = axum::Router::new()
            .fallback(move |m: Method, u: Uri, b: Body| engine(f.clone(), m, u, b));
        rt.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        fake
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests that would change something in the engine (anything but a GET or HEAD).
    fn changes(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|r| !r.starts_with("GET ") && !r.starts_with("HEAD "))
            .collect()
    }
}

#[test]
fn f02_an_engine_whose_list_fails_makes_its_apps_unknown_never_started_and_stalls_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sock1 = dir.path().join("engine-n1.sock");
    let sock2 = dir.path().join("engine-n2.sock");
    let source_engine = FakeEngine::serve(&rt, &sock1, true);
    let target_engine = FakeEngine::serve(&rt, &sock2, false);

    let socket_env = |p: &Path| vec![("FLOCK_DOCKER_SOCKET".to_string(), p.display().to_string())];
    let mut c = TestCluster::start_env(1, &[], Vec::new(), socket_env(&sock1));
    c.env = socket_env(&sock2);
    let n2 = c.join(2).expect("n2 joins");
    c.nodes.push(n2);
    until("n2 to be a member", Duration::from_secs(20), || {
        let st = c.status(c.addr(1));
        (st["members"].as_array()?.len() == 2).then_some(())
    });
    // Each flockd took the engine its environment named.
    for (engine, i, log) in [(&source_engine, 1, "init"), (&target_engine, 2, "join")] {
        assert!(
            engine.seen().iter().any(|r| r.ends_with("/_ping")),
            "n{i} did not talk to its fake engine: {:?}",
            engine.seen()
        );
        let text = fs::read_to_string(c.log(i, log)).unwrap();
        assert!(
            text.contains("docker driver: connected to the local engine"),
            "{text}"
        );
    }

    let application = dir.path().join("application.yml");
    fs::write(
        &application,
        "version: 1\napplications:\n  web:\n    image: flock-fake/web:1\n    volume:\n      mountpoint: /data\n      maximum_size: 64M\n    restart_policy:\n      name: always\n",
    )
    .unwrap();
    let deployment = dir.path().join("deployment.yml");
    fs::write(&deployment, "version: 1\nnodes:\n  n1: [web]\n  n2: []\n").unwrap();
    let out = c.ctl_ok(
        c.addr(1),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    assert!(out.contains("start web on n1"), "{out}");

    // app ls: unknown, with the engine's reason; nothing was asked of the engine but looks.
    let row = until("web to show unknown", Duration::from_secs(20), || {
        let ls = c.ctl_ok(c.addr(2), &["app", "ls"]);
        ls.lines()
            .find(|l| l.starts_with("web ") && l.contains("unknown"))
            .map(str::to_string)
    });
    assert!(row.contains("the fake engine fails this"), "{row}");
    let a = app(&c, "web");
    assert_eq!(
        (&a["state"], &a["node"]),
        (&"unknown".into(), &"n1".into()),
        "{a}"
    );
    assert!(
        a["detail"]
            .as_str()
            .is_some_and(|d| d.contains("docker driver could not be listed")),
        "{a}"
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(source_engine.changes(), Vec::<String>::new());
    assert!(
        source_engine
            .seen()
            .iter()
            .filter(|r| r.ends_with("/containers/json"))
            .count()
            >= 3,
        "the agent keeps looking: {:?}",
        source_engine.seen()
    );
    assert_eq!(a["id"], "", "{a}");

    // A move while the list fails: the copy and the handoff go ahead, the commit does not.
    let ds = until("n1's copy of web", Duration::from_secs(20), || {
        let d = dataset(&c, "web");
        mount_path(&d, "n1").map(|p| (d, p))
    });
    let (before, source_path) = ds;
    fs::write(source_path.join("marker"), "written before the move\n").unwrap();
    let epoch = before["epoch"].as_u64().unwrap();
    c.ctl_ok(
        c.addr(1),
        &["app", "move", "web", "--to", "n2", "--no-wait"],
    );
    let n1_log = c.log(1, "init");
    // (Or past it: then the check below says what went wrong.)
    until("the move to hand off", Duration::from_secs(30), || {
        let a = app(&c, "web");
        let handing_off = a["detail"]
            .as_str()
            .is_some_and(|d| d.contains("moving to n2: handing off"));
        (handing_off || !log_lines(&n1_log, "move committed").is_empty()).then_some(())
    });
    thread::sleep(Duration::from_secs(4));
    let waiting = dataset(&c, "web");
    assert_eq!(
        (&waiting["primary"], waiting["epoch"].as_u64()),
        (&"n1".into(), Some(epoch)),
        "the move committed while n1 could not tell whether web runs: {waiting:#}"
    );
    assert!(log_lines(&n1_log, "move committed").is_empty());
    assert_eq!(source_engine.changes(), Vec::<String>::new());

    // The engine lists again (nothing runs): the move commits, with the data.
    source_engine.list_fails.store(false, Ordering::SeqCst);
    let moved = until("the move to commit", Duration::from_secs(30), || {
        let d = dataset(&c, "web");
        (d["primary"] == "n2").then_some(d)
    });
    assert_eq!(moved["epoch"].as_u64(), Some(epoch + 1), "{moved:#}");
    let target_path = mount_path(&moved, "n2").expect("n2's copy");
    assert_eq!(
        fs::read_to_string(target_path.join("marker")).unwrap(),
        "written before the move\n"
    );
    assert_eq!(log_lines(&n1_log, "move committed").len(), 1);
    assert_eq!(
        source_engine.changes(),
        Vec::<String>::new(),
        "n1 never started web"
    );
    drop(c);
    drop(rt);
}
