//! Health gates the routing mesh (issues 18 and 19), on real flockd processes, each node on
//! its own loopback address as on separate machines: an app with three instances and a health
//! check; the instance whose check fails stops getting new connections through the mesh, and
//! gets them again once its check passes. Each node's apps agent records its instances' health
//! in the replicated state on transitions, and every node's mesh routes by that record.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Each instance of `hc_web` as `app ls` reports it: node name to (state, recorded health).
fn instances(c: &TestCluster) -> BTreeMap<String, (String, String)> {
    let all: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    let web = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "hc_web")
        .cloned()
        .expect("hc_web in app ls");
    web["instance_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["node"].as_str().unwrap().to_string(),
                (
                    i["state"].as_str().unwrap().to_string(),
                    i["routed_health"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// The nodes (1..=3) whose instances `tries` new connections to `addr` reach: each reply
/// names its process, whose working directory is in its node's data dir.
fn reached(c: &TestCluster, addr: &str, tries: usize) -> BTreeSet<usize> {
    (0..tries)
        .filter_map(|_| ask(addr, "PING"))
        .filter_map(|r| {
            let pid = r.strip_prefix("PONG ")?.split('-').next()?.to_string();
            let cwd: PathBuf = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            (1..=3).find(|i| cwd.starts_with(c.data_dir(*i)))
        })
        .collect()
}

#[test]
fn h01_an_unhealthy_instance_gets_no_connection_until_it_is_healthy_again() {
    let c = TestCluster::start_own_hosts(3);
    let _end = EndApps(c.dir.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let flags = dir.path().join("flags");
    fs::create_dir_all(&flags).unwrap();
    let (port, ext) = (free_on_every_address(), free_on_every_address());
    // The check fails while a flag file names the flockd that runs it ($PPID: flockd runs
    // the check itself), so one node's instance can be made unhealthy.
    let compose = dir.path().join("compose.yml");
    fs::write(
        &compose,
        format!(
            r#"name: hc
services:
  web:
    command: ["sh", "-c", "exec {app} --listen \"$$FLOCK_NODE_HOST:{port}\""]
    ports: ["{ext}:{port}"]
    restart: always
    deploy:
      replicas: 3
    healthcheck:
      test: ["CMD-SHELL", "test ! -e {flags}/sick-$$PPID"]
      interval: 200ms
      timeout: 2s
      retries: 2
"#,
            app = testapp().display(),
            flags = flags.display(),
        ),
    )
    .unwrap();
    let out = c.ctl_ok(c.addr(1), &["deploy", compose.to_str().unwrap()]);
    assert!(out.contains("hc_web"), "{out}");

    // One instance per node, each running and recorded healthy.
    until(
        "three running instances recorded healthy",
        Duration::from_secs(40),
        || {
            let is = instances(&c);
            (is.len() == 3 && is.values().all(|(s, h)| s == "running" && h == "healthy"))
                .then_some(())
        },
    );
    let every: BTreeSet<usize> = (1..=3).collect();
    for i in 1..=3 {
        let at = format!("{}:{ext}", mesh_ip(i));
        until(
            "the mesh reaches every instance",
            Duration::from_secs(20),
            || (reached(&c, &at, 30) == every).then_some(()),
        );
    }

    // Node 2's check fails from now on: its instance is recorded unhealthy, and no node's
    // mesh sends it a new connection, within a bounded time.
    let sick = flags.join(format!("sick-{}", c.nodes[1].pid()));
    fs::write(&sick, "").unwrap();
    until(
        "n2's instance recorded unhealthy",
        Duration::from_secs(20),
        || {
            let is = instances(&c);
            (is.get("n2").map(|(_, h)| h.as_str()) == Some("unhealthy")).then_some(())
        },
    );
    let healthy: BTreeSet<usize> = [1, 3].into();
    for i in 1..=3 {
        let at = format!("{}:{ext}", mesh_ip(i));
        until(
            "the mesh reaches only the healthy instances",
            Duration::from_secs(10),
            || (reached(&c, &at, 30) == healthy).then_some(()),
        );
        // And keeps to them.
        assert_eq!(reached(&c, &at, 30), healthy, "through node {i}'s mesh");
    }
    // It still runs (health gates routing; it does not restart the app).
    let show = c.ctl_ok(c.addr(3), &["app", "show", "hc_web"]);
    assert!(show.contains("on n2: unhealthy (not routed)"), "{show}");
    assert_eq!(instances(&c)["n2"].0, "running");

    // Healthy again: it gets connections again.
    fs::remove_file(&sick).unwrap();
    until(
        "n2's instance recorded healthy",
        Duration::from_secs(20),
        || {
            let is = instances(&c);
            (is.get("n2").map(|(_, h)| h.as_str()) == Some("healthy")).then_some(())
        },
    );
    for i in 1..=3 {
        let at = format!("{}:{ext}", mesh_ip(i));
        until(
            "the mesh reaches every instance again",
            Duration::from_secs(10),
            || (reached(&c, &at, 30) == every).then_some(()),
        );
    }

    // Every instance unhealthy: connections are refused, none is forwarded.
    for i in 1..=3 {
        fs::write(flags.join(format!("sick-{}", c.nodes[i - 1].pid())), "").unwrap();
    }
    until(
        "every instance recorded unhealthy",
        Duration::from_secs(20),
        || {
            let is = instances(&c);
            is.values().all(|(_, h)| h == "unhealthy").then_some(())
        },
    );
    let at = format!("{}:{ext}", mesh_ip(1));
    assert!(reached(&c, &at, 10).is_empty());

    c.ctl_ok(c.addr(1), &["stack", "rm", "hc"]);
}
