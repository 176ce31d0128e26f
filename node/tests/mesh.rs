//! The routing mesh on real flockd processes: each node's mesh listens on its own loopback
//! address ([`mesh_ip`]), the apps are real processes (flock-testapp), clients real sockets.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A free port on every loopback address the test uses (127.0.0.1 for the apps, 127.0.0.2..4
/// for the meshes).
fn free_everywhere() -> u16 {
    loop {
        let p = free_port();
        if (2..=4).all(|i| TcpListener::bind(format!("127.0.0.{i}:{p}")).is_ok()) {
            return p;
        }
    }
}

/// `counter` (the test app, stateful) with `port` published as `ext`, and `peer`, linked to
/// it, printing its link variables; `extra` is more applications.
fn files(dir: &Path, port: u16, ext: u16, extra: &str) -> (PathBuf, PathBuf) {
    let application = dir.join("application.yml");
    fs::write(
        &application,
        format!(
            r#"version: 1
applications:
{}  peer:
    command: ["sh", "-c", "env | grep ^DB_ | sort; exec sleep 100000"]
    links:
      - local_port: 5432
        remote_port: {ext}
        alias: db
{extra}"#,
            counter_app(port, ext),
        ),
    )
    .unwrap();
    let deployment = dir.join("deployment.yml");
    fs::write(
        &deployment,
        "version: 1\nnodes:\n  n1: [counter]\n  n2: [peer]\n  n3: []\n",
    )
    .unwrap();
    (deployment, application)
}

fn apps(c: &TestCluster) -> Vec<Value> {
    serde_json::from_str::<Value>(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn app_of(c: &TestCluster, name: &str) -> Value {
    apps(c)
        .into_iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no app {name} in app ls"))
}

fn running_on(c: &TestCluster, name: &str, node: &str) -> bool {
    let a = app_of(c, name);
    a["state"] == "running" && a["node"] == node && a["moving_to"].is_null()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The instance (PONG's argument) that answers at `addr`.
fn instance(addr: &str) -> Option<String> {
    ask(addr, "PING")?.strip_prefix("PONG ").map(String::from)
}

#[test]
fn m01_any_node_reaches_the_app_before_during_and_after_a_move_and_links_use_the_mesh() {
    let c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let (port, ext) = (free_port(), free_everywhere());
    let (dep, appl) = files(dir.path(), port, ext, "");
    c.ctl_ok(
        c.addr(1),
        &["deploy", dep.to_str().unwrap(), appl.to_str().unwrap()],
    );
    until("counter and peer running", Duration::from_secs(30), || {
        (running_on(&c, "counter", "n1") && running_on(&c, "peer", "n2")).then_some(())
    });
    let via = |i: usize| format!("{}:{ext}", mesh_ip(i));

    // Every node's address reaches the app, including the nodes it does not run on.
    let first = instance(&format!("127.0.0.1:{port}")).expect("counter answers directly");
    for i in 1..=3 {
        until(
            &format!("node n{i}'s mesh to serve {ext}"),
            Duration::from_secs(10),
            || instance(&via(i)),
        );
        assert_eq!(instance(&via(i)).as_deref(), Some(first.as_str()), "n{i}");
        let r = ask(&via(i), &format!("APPEND via-n{i}")).unwrap();
        assert!(r.starts_with("OK "), "APPEND through n{i}: {r}");
    }

    // app ls shows the endpoints, one per node, and no problem.
    let a = until("three endpoints", Duration::from_secs(10), || {
        let a = app_of(&c, "counter");
        (strings(&a["endpoints"]).len() == 3).then_some(a)
    });
    let mut want: Vec<String> = (1..=3).map(via).collect();
    want.sort();
    let mut got = strings(&a["endpoints"]);
    got.sort();
    assert_eq!(got, want);
    assert!(strings(&a["mesh_problems"]).is_empty(), "{a}");
    let table = c.ctl_ok(c.addr(1), &["app", "ls"]);
    assert!(
        table.contains("ENDPOINTS") && table.contains(&via(1)),
        "{table}"
    );

    // The linked app got the link variables, pointing at its own node's mesh.
    let logs = until("peer's link variables", Duration::from_secs(10), || {
        let l = c.ctl_ok(c.addr(1), &["app", "logs", "peer"]);
        l.contains("DB_PORT_5432_TCP_PROTO").then_some(l)
    });
    let host = mesh_ip(2);
    for line in [
        format!("DB_PORT_5432_TCP=tcp://{host}:{ext}"),
        format!("DB_PORT_5432_TCP_ADDR={host}"),
        format!("DB_PORT_5432_TCP_PORT={ext}"),
        "DB_PORT_5432_TCP_PROTO=tcp".to_string(),
    ] {
        assert!(
            logs.lines().any(|l| l.trim() == line),
            "{line} not in:\n{logs}"
        );
    }

    // A connection through n3's mesh, open across the move: it ends cleanly (end of stream, not
    // a reset) when the app stops on its old node.
    let held = TcpStream::connect(via(3)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut held_w = held.try_clone().unwrap();
    let mut held_r = BufReader::new(held);
    held_w.write_all(b"PING\n").unwrap();
    let mut line = String::new();
    held_r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("PONG {first}"));

    // A client appends through n1's mesh without pause, a new connection after any error,
    // while the app moves from n1 to n2.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addr, stop) = (via(1), stop.clone());
        thread::spawn(move || writer(addr, stop))
    };
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    c.ctl_ok(c.addr(1), &["app", "move", "counter", "--to", "n2"]);
    let moved_in = started.elapsed();
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(running_on(&c, "counter", "n2"), "{}", app_of(&c, "counter"));

    // The held connection: end of stream.
    let mut rest = Vec::new();
    let end = held_r.read_to_end(&mut rest);
    assert!(
        matches!(end, Ok(0)),
        "the connection to the app's old place should end cleanly, got {end:?} ({rest:?})"
    );

    // Through the same node, the moved app (a new instance), with every acknowledged append.
    let moved = instance(&via(1)).expect("the moved app answers through n1's mesh");
    assert_ne!(moved, first, "still the old instance");
    for i in 1..=3 {
        assert_eq!(instance(&via(i)).as_deref(), Some(moved.as_str()), "n{i}");
    }
    let entries = read_all(&via(1));
    let missing: Vec<&String> = acked
        .iter()
        .map(|(v, _)| v)
        .filter(|v| !entries.contains(v))
        .collect();
    assert!(missing.is_empty(), "acknowledged appends lost: {missing:?}");
    let gap = acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    println!(
        "m01: move in {moved_in:?}, {} appends acknowledged through n1's mesh, longest gap {gap:?}",
        acked.len()
    );
    assert!(
        acked.iter().any(|(_, t)| *t > started + moved_in),
        "no append acknowledged after the move"
    );
    // The linked app was not restarted by the move: its variables point at the mesh.
    assert_eq!(app_of(&c, "peer")["restarts"], 0);
}

#[test]
fn m02_a_taken_port_is_reported_by_its_node_and_a_dead_node_is_refused_promptly() {
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let (port, ext) = (free_port(), free_everywhere());
    let other_port = free_port();
    let other_ext = free_everywhere();
    // Something else holds the second app's external port on n2's address.
    let squatter = TcpListener::bind(format!("{}:{other_ext}", mesh_ip(2))).unwrap();
    let extra = format!(
        r#"  other:
    command: ["{}", "--listen", "127.0.0.1:{other_port}"]
    ports:
      - internal: {other_port}
        external: {other_ext}
"#,
        testapp().display()
    );
    let (dep, appl) = files(dir.path(), port, ext, &extra);
    fs::write(
        &dep,
        "version: 1\nnodes:\n  n1: [counter]\n  n2: [peer]\n  n3: [other]\n",
    )
    .unwrap();
    c.ctl_ok(
        c.addr(1),
        &["deploy", dep.to_str().unwrap(), appl.to_str().unwrap()],
    );
    until("the apps running", Duration::from_secs(30), || {
        (running_on(&c, "counter", "n1") && running_on(&c, "other", "n3")).then_some(())
    });

    // n2 reports the port it cannot take; n1 and n3 serve it.
    let a = until(
        "n2 to report the taken port",
        Duration::from_secs(10),
        || {
            let a = app_of(&c, "other");
            (strings(&a["endpoints"]).len() == 2).then_some(a)
        },
    );
    let problems = strings(&a["mesh_problems"]);
    assert!(
        problems.len() == 1
            && problems[0].starts_with("n2: ")
            && problems[0].contains(&format!("{}:{other_ext}", mesh_ip(2))),
        "{a}"
    );
    for i in [1, 3] {
        let via = format!("{}:{other_ext}", mesh_ip(i));
        until(
            &format!("n{i} to serve {other_ext}"),
            Duration::from_secs(10),
            || instance(&via),
        );
    }
    let table = c.ctl_ok(c.addr(1), &["app", "ls"]);
    assert!(table.contains("mesh: n2: cannot listen on"), "{table}");
    // Once the port is free, n2 takes it.
    drop(squatter);
    until(
        "n2 to serve the freed port",
        Duration::from_secs(10),
        || instance(&format!("{}:{other_ext}", mesh_ip(2))),
    );

    // The app's node dies (flockd and the app): a connection through another node is
    // refused within the mesh's retry budget, not hung.
    let pid = app_of(&c, "counter")["id"].as_str().unwrap().to_string();
    c.nodes[0].kill9();
    let pgid: i32 = pid.parse().unwrap();
    assert!(pid_alive(&pid));
    std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    until("the app's process to die", Duration::from_secs(5), || {
        (!pid_alive(&pid)).then_some(())
    });
    let via3 = format!("{}:{ext}", mesh_ip(3));
    let t = Instant::now();
    let s = TcpStream::connect(&via3).expect("the mesh accepts");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let _ = w.write_all(b"PING\n");
    let mut buf = [0u8; 64];
    let r = (&s).read(&mut buf);
    let took = t.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a connection to a dead node's app got {r:?}"
    );
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    println!("m02: refused in {took:?} ({r:?})");
}
