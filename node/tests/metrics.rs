//! Metrics: a 3-node cluster scraped over HTTP (`--metrics-addr`) while an app with a dataset
//! moves. The text parses with Prometheus' own Python parser (`prometheus_client`), the series
//! the README lists are there, and their values match what flockctl reports.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `GET path` on `addr`: the status code, the content type and the body.
fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// [`http_get`], or why it failed.
fn try_get(addr: &str, path: &str) -> Result<(u16, String, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((code, ctype, body.to_string()))
}

/// One scrape's samples: name, labels, value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

/// Parses each text with `prometheus_client.parser.text_string_to_metric_families`; per text,
/// every sample as [name, labels, value]. Fails the test when a text does not parse.
fn parse(dir: &Path, texts: &[String]) -> Vec<Samples> {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .expect("python3 runs (install python3)");
    assert!(
        probe.status.success(),
        "Prometheus' Python client is missing: `pip install prometheus-client` (test.sh does): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut files = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let f = dir.join(format!("scrape-{i}.txt"));
        fs::write(&f, t).unwrap();
        files.push(f.display().to_string());
    }
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for path in sys.argv[1:]:
    with open(path) as f:
        text = f.read()
    samples = []
    for fam in text_string_to_metric_families(text):
        if fam.type == "unknown":
            sys.exit(f"{path}: {fam.name} has no TYPE (a sample name that is not its family's)")
        for s in fam.samples:
            samples.append([s.name, s.labels, s.value])
    out.append(samples)
print(json.dumps(out))
"#;
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "a scrape does not parse: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("the parser's json")
}

/// The value of sample `name` with (at least) `labels`.
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

fn must(samples: &Samples, name: &str, labels: &[(&str, &str)], node: usize) -> f64 {
    value(samples, name, labels)
        .unwrap_or_else(|| panic!("n{node}: no sample {name}{labels:?}; it has: {samples:?}"))
}

#[test]
fn m01_a_cluster_scraped_during_a_move_reports_what_flockctl_does() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let node_args = metrics.iter().map(|a| s(&["--metrics-addr", a])).collect();
    // JSON logs too (`--log-format json`): checked at the end.
    let mut c = TestCluster::start_with(3, &["--log-format", "json"], node_args);
    let _end = EndApps(c.dir.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();

    // Only /metrics, with Prometheus' text format's content type.
    let (code, _, _) = http_get(&metrics[0], "/other");
    assert_eq!(code, 404);
    let (code, ctype, _) = http_get(&metrics[0], "/metrics");
    assert_eq!(code, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");

    // A scrape has no body, a small head, and few connections at once: a local user cannot make
    // flockd hold much for it.
    let raw = |req: &[u8]| -> String {
        let mut s = TcpStream::connect(&metrics[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let posted = raw(
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
    );
    assert!(posted.starts_with("HTTP/1.1 405"), "{posted}");
    let body = raw(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(body.starts_with("HTTP/1.1 413"), "{body}");
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 << 10));
    big.extend(b"\r\nConnection: close\r\n\r\n");
    let too_big = raw(&big);
    assert!(
        !too_big.contains(" 200 "),
        "a 64 KiB head was answered: {too_big:.100}"
    );
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(&metrics[0]).unwrap())
        .collect();
    let refused = raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(
        refused, "",
        "a 17th connection at once is closed unanswered"
    );
    drop(idle);
    until(
        "a scrape once the idle connections closed",
        Duration::from_secs(10),
        || {
            try_get(&metrics[0], "/metrics")
                .ok()
                .filter(|r| r.0 == 200)
                .map(|_| ())
        },
    );

    // counter (a dataset with a replica) on n1, published through the mesh.
    let port = free_port();
    let ext = free_port();
    deploy_flocker(
        &c,
        files.path(),
        &replicated_counter_app(port, ext),
        "n1",
        "counter",
    );
    let app_addr = format!("127.0.0.1:{port}");
    until("counter to run on n1", Duration::from_secs(30), || {
        ask(&app_addr, "PING").map(|_| ())
    });
    // Through n2's routing mesh.
    let via_mesh = format!("{}:{ext}", mesh_ip(2));
    until(
        "n2's mesh to reach counter",
        Duration::from_secs(20),
        || ask(&via_mesh, "PING").filter(|r| r.starts_with("PONG")),
    );
    let asked = 3;
    for i in 0..asked {
        let r = ask(&via_mesh, &format!("APPEND m{i}"));
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("OK")),
            "the mesh on n2 reaches counter: {r:?}"
        );
    }

    // Scrape every node without pause while the app moves to n3.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        thread::spawn(move || {
            let mut texts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for a in &metrics {
                    let (code, _, body) = http_get(a, "/metrics");
                    assert_eq!(code, 200, "{a}: {body}");
                    texts.push(body);
                }
                thread::sleep(Duration::from_millis(100));
            }
            texts
        })
    };
    let out = c.ctl_ok(
        c.addr(2),
        &["app", "move", "counter", "--to", "n3", "--json"],
    );
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{out}");
    until("counter to run on n3", Duration::from_secs(30), || {
        let a: Value =
            serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "show", "counter", "--json"]))
                .unwrap();
        (a["node"] == "n3" && a["state"] == "running").then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let during = scraper.join().expect("the scraper");
    assert!(during.len() >= 3, "scraped {} times", during.len());
    parse(files.path(), &during);

    // Every node has every series the README lists (families with labels once they have a
    // value: the ones this test gives one).
    let scrape_all = || -> Vec<Samples> {
        let texts: Vec<String> = metrics.iter().map(|a| http_get(a, "/metrics").2).collect();
        parse(files.path(), &texts)
    };
    let now = scrape_all();
    for (i, m) in now.iter().enumerate() {
        for name in [
            "flock_build_info",
            "flock_raft_has_leader",
            "flock_raft_is_leader",
            "flock_raft_leader_changes_seen_total",
            "flock_raft_term",
            "flock_raft_last_log_index",
            "flock_raft_commit_index",
            "flock_raft_applied_index",
            "flock_raft_proposals_committed_total",
            "flock_raft_proposals_failed_total",
            "flock_raft_fsync_duration_seconds_count",
            "flock_raft_commit_duration_seconds_count",
            "flock_apps",
            "flock_move_downtime_seconds_count",
            "flock_failovers_total",
            "flock_failover_data_at_risk_seconds_count",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            must(m, name, &[], i + 1);
        }
        assert_eq!(must(m, "flock_raft_has_leader", &[], i + 1), 1.0);
        assert!(
            must(m, "flock_raft_fsync_duration_seconds_count", &[], i + 1) > 0.0,
            "n{}: the Raft store wrote durably",
            i + 1
        );
    }

    // n1's apps agent counts the stop when its driver's stop returns, which may be just after
    // the move saw the app gone and committed: wait for it (bounded) before the checks below.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while value(
        &scrape_all()[0],
        "flock_app_stops_total",
        &[("app", "counter")],
    )
    .is_none()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }

    // Raft, against `flockctl status` (the leader's view): one leader, the one status names;
    // its term; its commit and applied indexes between two status calls around the scrape.
    let before = c.status(c.addr(1));
    let now = scrape_all();
    let after = c.status(c.addr(1));
    let leaders: Vec<usize> = (0..3)
        .filter(|i| must(&now[*i], "flock_raft_is_leader", &[], i + 1) == 1.0)
        .collect();
    assert_eq!(leaders.len(), 1, "one leader: {leaders:?}");
    let l = leaders[0];
    assert_eq!(
        after["reported_by"],
        format!("n{}", l + 1),
        "status comes from the leader the metrics name: {after:#}"
    );
    let term = after["term"].as_u64().unwrap() as f64;
    for (i, m) in now.iter().enumerate() {
        assert_eq!(must(m, "flock_raft_term", &[], i + 1), term, "n{}", i + 1);
    }
    for (series, field) in [
        ("flock_raft_commit_index", "commit_index"),
        ("flock_raft_applied_index", "applied_index"),
    ] {
        let v = must(&now[l], series, &[], l + 1);
        let lo = before[field].as_u64().unwrap() as f64;
        let hi = after[field].as_u64().unwrap() as f64;
        assert!(lo <= v && v <= hi, "{series} {v} not in [{lo}, {hi}]");
        for (i, m) in now.iter().enumerate() {
            let f = must(m, series, &[], i + 1);
            assert!(f > 0.0 && f <= hi, "n{}: {series} {f} past {hi}", i + 1);
        }
    }
    assert!(must(&now[l], "flock_raft_proposals_committed_total", &[], l + 1) > 0.0);

    // Apps: the running ones, summed over the nodes, are those `app ls` shows running; n3
    // runs counter, started there once; n1 stopped it for the move.
    let ls: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "ls", "--json"])).unwrap();
    let running = ls
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "running")
        .count() as f64;
    let summed: f64 = (0..3)
        .map(|i| must(&now[i], "flock_apps", &[("state", "running")], i + 1))
        .sum();
    assert_eq!(summed, running, "apps running: {ls:#}");
    assert_eq!(must(&now[2], "flock_apps", &[("state", "running")], 3), 1.0);
    assert!(must(&now[2], "flock_app_starts_total", &[("app", "counter")], 3) >= 1.0);
    assert!(must(&now[0], "flock_app_starts_total", &[("app", "counter")], 1) >= 1.0);
    assert!(must(&now[0], "flock_app_stops_total", &[("app", "counter")], 1) >= 1.0);

    // The move, counted on its source: one committed, its phases timed, its downtime once;
    // its pushes and their bytes.
    let n1 = &now[0];
    assert_eq!(
        must(n1, "flock_moves_total", &[("result", "committed")], 1),
        1.0
    );
    assert_eq!(must(n1, "flock_move_downtime_seconds_count", &[], 1), 1.0);
    for phase in ["snapshot", "full", "handoff", "final-delta", "committing"] {
        assert!(
            must(
                n1,
                "flock_move_phase_duration_seconds_count",
                &[("phase", phase)],
                1
            ) >= 1.0,
            "phase {phase}"
        );
    }
    let mv = [("dataset", "counter"), ("kind", "move")];
    assert!(must(n1, "flock_dataset_pushes_total", &mv, 1) >= 1.0);
    assert!(must(n1, "flock_dataset_push_bytes_total", &mv, 1) > 0.0);

    // The mesh on n2 forwarded what this test sent through it.
    let n2 = &now[1];
    let p = ext.to_string();
    assert!(
        must(n2, "flock_mesh_connections_total", &[("port", &p)], 2) >= asked as f64,
        "n2's mesh"
    );
    for dir in ["to_app", "from_app"] {
        let b = must(
            n2,
            "flock_mesh_bytes_total",
            &[("port", &p), ("direction", dir)],
            2,
        );
        assert!(b > 0.0, "n2's mesh forwarded no bytes {dir}");
    }

    // Datasets, against `dataset ls`: each holder's used bytes, snapshot count, and limit
    // (they settle between snapshots: asked until both agree), and on the primary (n3) the
    // replica's lag.
    until(
        "the dataset series to match dataset ls",
        Duration::from_secs(20),
        || {
            let d: Value =
                serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]))
                    .unwrap();
            let now = scrape_all();
            let d = &d[0];
            let limit = d["size_limit"].as_u64()? as f64;
            for h in d["holders"].as_array()? {
                let node = h["node"].as_str()?;
                let i: usize = node.strip_prefix('n')?.parse().ok()?;
                let m = &now[i - 1];
                let role = h["role"].as_str()?;
                let ds = [("dataset", "counter")];
                if value(m, "flock_dataset_used_bytes", &[ds[0], ("role", role)])?
                    != h["used_bytes"].as_u64()? as f64
                    || value(m, "flock_dataset_referenced_bytes", &ds)?
                        != h["referenced_bytes"].as_u64()? as f64
                    || value(m, "flock_dataset_snapshots", &ds)?
                        != h["snapshot_count"].as_u64()? as f64
                    || value(m, "flock_dataset_limit_bytes", &ds)? != limit
                {
                    return None;
                }
            }
            let replica = d["replicas"][0].as_str()?;
            let lag = value(
                &now[2],
                "flock_dataset_replica_lag_seconds",
                &[("dataset", "counter"), ("replica", replica)],
            )?;
            let lag_ms = d["replica_lag_ms"][replica].as_u64()? as f64;
            // Two clocks read a moment apart; both in seconds of the same base snapshot.
            ((lag - lag_ms / 1000.0).abs() < 3.0).then_some(())
        },
    );

    // The Metrics RPC (what `flockctl ui` reads) returns the same text: n3's, asked of n1.
    let n3_id = after["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n3")
        .and_then(|m| m["id"].as_u64())
        .expect("n3 in the status");
    let reply = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let conf = flock_client::ClientConfig::load(&c.config()).unwrap();
        let mut api =
            flock_client::connect(c.addr(1), &conf.identity().unwrap(), Duration::from_secs(3))
                .await
                .unwrap();
        api.metrics(flock_proto::v1::MetricsRequest { node_id: n3_id })
            .await
            .expect("the Metrics RPC")
            .into_inner()
    });
    assert_eq!((reply.node_id, reply.node_name.as_str()), (n3_id, "n3"));
    let by_rpc = parse(files.path(), &[reply.text]).remove(0);
    assert_eq!(must(&by_rpc, "flock_apps", &[("state", "running")], 3), 1.0);
    assert_eq!(must(&by_rpc, "flock_raft_term", &[], 3), term);
    must(&by_rpc, "process_open_fds", &[], 3);

    // A failover: n3's flockd killed (its watchdog ends counter there), counter serves again
    // on its replica. The other two nodes count it once.
    let was_leader = must(&scrape_all()[2], "flock_raft_is_leader", &[], 3) == 1.0;
    c.nodes[2].kill9();
    until(
        "counter to run on its replica",
        Duration::from_secs(30),
        || {
            let a: Value =
                serde_json::from_str(&c.ctl_ok(c.addr(1), &["app", "show", "counter", "--json"]))
                    .ok()?;
            (a["node"] != "n3" && a["state"] == "running").then_some(())
        },
    );
    let texts: Vec<String> = metrics[..2]
        .iter()
        .map(|a| http_get(a, "/metrics").2)
        .collect();
    let after = parse(files.path(), &texts);
    for (i, m) in after.iter().enumerate() {
        assert_eq!(
            must(m, "flock_failovers_total", &[], i + 1),
            1.0,
            "n{}",
            i + 1
        );
        assert_eq!(
            must(m, "flock_failover_data_at_risk_seconds_count", &[], i + 1),
            1.0
        );
        assert_eq!(
            must(m, "flock_failover_duration_seconds_count", &[], i + 1),
            1.0
        );
        // At least the lease (2.5 s by default) went by before the node was declared down.
        let took = must(m, "flock_failover_duration_seconds_sum", &[], i + 1);
        assert!(
            (1.0..30.0).contains(&took),
            "n{}: failover took {took} s",
            i + 1
        );
        if was_leader {
            assert!(must(m, "flock_raft_leader_changes_seen_total", &[], i + 1) >= 1.0);
        }
    }

    c.ctl_ok(c.addr(1), &["app", "rm", "counter"]);

    // `--log-format json`: every line of n1's log is a JSON object with a level and a message
    // (n1 ran the move).
    let log = fs::read_to_string(c.log(1, "init")).unwrap();
    let mut moved = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        moved |= msg == "pushed the move's snapshot" && v["fields"]["dataset"] == "counter";
    }
    assert!(moved, "no move in n1's JSON log:\n{log}");
}
