//! Scaling a stateless app (issue 19) on real flockd processes, each node on its own loopback
//! address as on separate machines: instances spread one per node, the routing mesh reaches
//! every one of them, a killed instance is restarted, and scaling down stops the extra ones.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn web(c: &TestCluster) -> Value {
    let all: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "web")
        .cloned()
        .expect("web in app ls")
}

/// Each instance as app ls reports it: (node, state, restarts).
fn instances(c: &TestCluster) -> Vec<(String, String, u64)> {
    web(c)["instance_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["node"].as_str().unwrap().to_string(),
                i["state"].as_str().unwrap().to_string(),
                i["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The instances (PONG's process ids) that `tries` new connections to `addr` reach.
fn reached(addr: &str, tries: usize) -> BTreeSet<String> {
    (0..tries)
        .filter_map(|_| ask(addr, "PING"))
        .filter_map(|r| {
            r.strip_prefix("PONG ")
                .map(|i| i.split('-').next().unwrap().to_string())
        })
        .collect()
}

/// application.yml of `web`: flock-testapp listening on its node's host at an internal port,
/// published at an external one, restarted always, `instances` of it: (the external port,
/// the file).
fn web_app(dir: &std::path::Path, instances: u32) -> (u16, std::path::PathBuf) {
    let (port, ext) = (free_on_every_address(), free_on_every_address());
    let application = dir.join("application.yml");
    fs::write(
        &application,
        format!(
            r#"version: 1
applications:
  web:
    command: ["sh", "-c", "exec {} --listen \"$FLOCK_NODE_HOST:{port}\""]
    ports:
      - internal: {port}
        external: {ext}
    restart_policy:
      name: always
    instances: {instances}
"#,
            testapp().display()
        ),
    )
    .unwrap();
    (ext, application)
}

#[test]
fn sc01_instances_spread_over_nodes_the_mesh_reaches_each_and_scale_down_stops_the_rest() {
    let c = TestCluster::start_own_hosts(3);
    let _end = EndApps(c.dir.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let (ext, application) = web_app(dir.path(), 5);
    let out = c.ctl_ok(c.addr(1), &["deploy", application.to_str().unwrap()]);
    assert!(out.contains("web"), "{out}");

    // Five asked, three nodes: one instance on each, each running.
    let placed = until("three running instances", Duration::from_secs(30), || {
        let is = instances(&c);
        (is.len() == 3 && is.iter().all(|(_, s, _)| s == "running")).then_some(is)
    });
    let nodes: BTreeSet<&str> = placed.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one per node: {placed:?}");
    assert_eq!(web(&c)["instances"], 5);
    let table = c.ctl_ok(c.addr(1), &["app", "ls"]);
    assert!(table.contains("running 3/5"), "{table}");
    assert!(table.contains("2 instance(s) wait"), "{table}");

    // Every node's mesh spreads new connections over all three.
    let mut pids = BTreeSet::new();
    for i in 1..=3 {
        let at = format!("{}:{ext}", mesh_ip(i));
        let seen = until(
            "the mesh reaches every instance",
            Duration::from_secs(20),
            || {
                let r = reached(&at, 30);
                (r.len() == 3).then_some(r)
            },
        );
        pids.extend(seen);
    }
    assert_eq!(pids.len(), 3, "{pids:?}");

    // A killed instance is started again by its node, and reached again.
    let victim: i32 = pids.iter().next().unwrap().parse().unwrap();
    // SAFETY: kill(2) of an app process this test's cluster started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let after = until(
        "the killed instance restarted",
        Duration::from_secs(30),
        || {
            let is = instances(&c);
            (is.iter().all(|(_, s, _)| s == "running") && is.iter().any(|(_, _, r)| *r >= 1))
                .then_some(is)
        },
    );
    assert_eq!(after.len(), 3, "{after:?}");
    let at = format!("{}:{ext}", mesh_ip(1));
    let now = until(
        "the new instance is reached",
        Duration::from_secs(20),
        || {
            let r = reached(&at, 30);
            (r.len() == 3).then_some(r)
        },
    );
    assert!(!now.contains(&victim.to_string()), "{now:?}");

    // Scaled to two: the third instance stops, the first two stay as they were.
    let out = c.ctl_ok(c.addr(2), &["app", "scale", "web", "2"]);
    assert!(out.contains("runs 2 instance(s)"), "{out}");
    until("two instances", Duration::from_secs(30), || {
        let is = instances(&c);
        (is.len() == 2 && is.iter().all(|(_, s, _)| s == "running")).then_some(())
    });
    let left = until(
        "only two processes are reached",
        Duration::from_secs(20),
        || {
            let r = reached(&at, 30);
            (r.len() == 2).then_some(r)
        },
    );
    assert!(left.is_subset(&now), "{left:?} not of {now:?}");
    let stopped: Vec<&String> = now.difference(&left).collect();
    assert_eq!(stopped.len(), 1);
    until(
        "the third instance's process is gone",
        Duration::from_secs(20),
        || (!pid_alive(stopped[0])).then_some(()),
    );

    // None is no count; and an unknown app says so.
    let o = c.ctl(c.addr(1), &["app", "scale", "web", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("at least 1"), "{}", stderr(&o));
    let o = c.ctl(c.addr(1), &["app", "scale", "nope", "2"]);
    assert!(stderr(&o).contains("no app named"), "{}", stderr(&o));

    c.ctl_ok(c.addr(1), &["app", "rm", "web"]);
    until("web's processes are gone", Duration::from_secs(20), || {
        left.iter().all(|p| !pid_alive(p)).then_some(())
    });
}

/// The detail app ls gives web.
fn detail(c: &TestCluster) -> String {
    web(c)["detail"].as_str().unwrap_or_default().to_string()
}

#[test]
fn sc02_a_waiting_instance_is_placed_when_a_drain_ends_and_when_a_node_joins() {
    let mut c = TestCluster::start_own_hosts(2);
    let _end = EndApps(c.dir.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let (ext, application) = web_app(dir.path(), 3);
    c.ctl_ok(c.addr(1), &["deploy", application.to_str().unwrap()]);
    let running = |c: &TestCluster, n: usize| {
        let is = instances(c);
        (is.len() == n && is.iter().all(|(_, s, _)| s == "running")).then_some(is)
    };
    until("two running instances", Duration::from_secs(30), || {
        running(&c, 2)
    });
    let why = detail(&c);
    assert!(why.contains("1 instance(s) wait"), "{why}");
    assert!(why.contains("already"), "{why}");
    let at = format!("{}:{ext}", mesh_ip(1));

    // n2 drained: its instance has nowhere else to go, and waits, saying why.
    c.ctl_ok(c.addr(1), &["node", "drain", "n2"]);
    let is = until("n2's instance stopped", Duration::from_secs(30), || {
        running(&c, 1)
    });
    assert_eq!(is[0].0, "n1", "{is:?}");
    let why = detail(&c);
    assert!(why.contains("2 instance(s) wait"), "{why}");
    assert!(why.contains("n2: it is draining"), "{why}");

    // The drain ends: the leader places a waiting instance on n2 again, with no deploy or
    // scale, and it runs and is reached through the mesh.
    c.ctl_ok(c.addr(1), &["node", "drain", "n2", "--undo"]);
    let is = until(
        "an instance placed on n2 after the drain ended",
        Duration::from_secs(20),
        || running(&c, 2),
    );
    let nodes: BTreeSet<&str> = is.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]), "{is:?}");
    until("the mesh reaches both", Duration::from_secs(20), || {
        (reached(&at, 30).len() == 2).then_some(())
    });
    let why = detail(&c);
    assert!(why.contains("1 instance(s) wait"), "{why}");

    // A node joins: the last waiting instance goes there.
    let n3 = c.join(3).expect("n3 joins");
    c.nodes.push(n3);
    let is = until(
        "an instance placed on the node that joined",
        Duration::from_secs(30),
        || running(&c, 3),
    );
    let nodes: BTreeSet<&str> = is.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2", "n3"]), "{is:?}");
    let pids = until(
        "the mesh reaches all three",
        Duration::from_secs(20),
        || {
            let r = reached(&at, 30);
            (r.len() == 3).then_some(r)
        },
    );
    let why = detail(&c);
    assert!(!why.contains("wait"), "{why}");
    let table = c.ctl_ok(c.addr(1), &["app", "ls"]);
    assert!(table.contains("running 3/3"), "{table}");

    c.ctl_ok(c.addr(1), &["app", "rm", "web"]);
    until("web's processes are gone", Duration::from_secs(20), || {
        pids.iter().all(|p| !pid_alive(p)).then_some(())
    });
}
