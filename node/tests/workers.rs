//! A node's workers: `flockctl status` lists them with their states, and SIGTERM stops them in
//! the fixed order (API, agents, mesh and plugin, membership, Raft, QUIC, store), in time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The workers in `flockctl status --json`, by name: (phase, state, detail).
fn workers(c: &TestCluster) -> Vec<(String, String, String, String)> {
    let st = c.status(c.addr(1));
    st["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in the status: {st}"))
        .iter()
        .map(|w| {
            let f = |k: &str| w[k].as_str().unwrap_or_default().to_string();
            (f("name"), f("phase"), f("state"), f("detail"))
        })
        .collect()
}

#[test]
fn w01_status_lists_the_workers_and_sigterm_stops_them_in_order() {
    let mut c = TestCluster::start(1, &[]);
    // The capacity report is a job: it finishes once the state holds it.
    let list = until("the report worker is done", Duration::from_secs(20), || {
        let l = workers(&c);
        l.iter()
            .any(|(n, _, s, _)| n == "report" && s == "done")
            .then_some(l)
    });
    let expect = [
        ("apps", "agents", &["running", "idle"][..]),
        ("report", "agents", &["done"]),
        ("renewal", "agents", &["idle"]),
        ("datasets", "agents", &["running", "idle"]),
        ("services", "edge", &["idle"]),
        ("mesh", "edge", &["idle"]),
        ("membership", "membership", &["running", "idle"]),
        ("liveness", "membership", &["running", "idle"]),
        ("placement", "membership", &["running", "idle"]),
        ("lease", "membership", &["running", "idle"]),
        ("api", "api", &["running"]),
        ("metrics", "api", &["idle"]),
        ("transfer", "transfer", &["running", "idle"]),
    ];
    let names: Vec<&str> = list.iter().map(|(n, ..)| n.as_str()).collect();
    assert_eq!(
        names,
        expect.iter().map(|(n, ..)| *n).collect::<Vec<_>>(),
        "workers in stop order: {list:?}"
    );
    for ((name, phase, state, detail), (_, want_phase, want_states)) in list.iter().zip(&expect) {
        assert_eq!(phase, want_phase, "{name}'s phase");
        assert!(
            want_states.contains(&state.as_str()),
            "{name} is {state} ({detail}); expected one of {want_states:?}"
        );
    }
    let renewal = &list
        .iter()
        .find(|(n, ..)| n == "renewal")
        .expect("listed")
        .3;
    assert!(renewal.starts_with("next renewal at "), "{renewal}");

    // The table shows the same.
    let text = c.ctl_ok(c.addr(1), &["status"]);
    assert!(text.contains("WORKERS of n1"), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{text}"))
            .to_string()
    };
    assert!(row("report").contains(" done "), "{text}");
    assert!(row("membership").contains(" membership "), "{text}");

    // SIGTERM: exits 0, in time, having stopped every phase in order.
    let t0 = Instant::now();
    let code = c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    let log = std::fs::read_to_string(c.log(1, "init")).unwrap_or_default();
    assert_eq!(code, Some(0), "exit code; log:\n{log}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?} to stop; log:\n{log}",
        t0.elapsed()
    );
    assert!(
        c.nodes[0].drain().iter().any(|l| l == "flockd: stopped"),
        "{log}"
    );
    assert!(
        !log.contains("did not stop within"),
        "a worker was late:\n{log}"
    );
    let steps = [
        "shutdown: stopping agents (apps, report, renewal, datasets)",
        "shutdown: agents stopped",
        "shutdown: stopping edge (services, mesh)",
        "shutdown: edge stopped",
        "shutdown: stopping membership (membership, liveness, placement, lease)",
        "shutdown: membership stopped",
        "shutdown: stopping api (api, metrics)",
        "shutdown: api stopped",
        "shutdown: raft stopped",
        "shutdown: stopping transfer (transfer)",
        "shutdown: transfer stopped",
        "shutdown: QUIC endpoint closed",
        "shutdown: store flushed",
    ];
    let mut at = 0;
    for step in steps {
        match log[at..].find(step) {
            Some(i) => at += i + step.len(),
            None => panic!("no {step:?} after the steps before it; log:\n{log}"),
        }
    }
    // No worker failed on the way (a failure is logged as an error).
    assert!(!log.contains("worker failed"), "{log}");
    assert!(!log.contains("ended on its own"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A follower forwards `flockctl status` to the leader; the workers listed are the leader's,
/// and `reported_by` says so.
#[test]
fn w02_status_through_a_follower_names_whose_workers_it_lists() {
    let mut c = TestCluster::start(2, &[]);
    let leader = c.leader();
    let follower = 3 - leader;
    let st: Value = c.status(c.addr(follower));
    assert_eq!(
        st["reported_by"].as_str(),
        Some(format!("n{leader}").as_str()),
        "{st}"
    );
    let membership = st["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "membership"))
        .unwrap_or_else(|| panic!("no membership worker: {st}"));
    // The leader's membership worker is the one that acts.
    assert_ne!(membership["detail"], "not the leader", "{st}");
    for i in [follower, leader] {
        assert_eq!(
            c.nodes[i - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(20)),
            Some(0),
            "n{i} exit code"
        );
    }
}
