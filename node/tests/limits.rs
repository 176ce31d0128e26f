//! Size limits against real flockd processes: an oversized command is refused before it is
//! proposed (nothing reaches the log, no election follows), errors quote input bounded, and
//! `kv ls` pages through any namespace.

mod common;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use flock_client::ClientConfig;
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::{DatasetCreateRequest, DeployRequest, KvListRequest, KvPutRequest};
use flock_scheduler::config::PlannedApp;
use serde_json::Value;
use tonic::transport::Channel;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn api(c: &TestCluster, i: usize) -> ApiClient<Channel> {
    let conf = ClientConfig::load(&c.config()).unwrap();
    flock_client::connect(c.addr(i), &conf.identity().unwrap(), Duration::from_secs(3))
        .await
        .unwrap()
}

/// The leader's (term, last_log_index), once the log has not grown for a second (the nodes'
/// own entries at start are in).
fn settled(c: &mut TestCluster) -> (u64, u64) {
    let read = |c: &mut TestCluster| {
        let l = c.leader();
        let v = c.status(c.addr(l));
        (
            v["term"].as_u64().unwrap(),
            v["last_log_index"].as_u64().unwrap(),
        )
    };
    let mut last = read(c);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = read(c);
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the log keeps growing: {now:?}");
        last = now;
    }
}

/// An InvalidArgument status with a short message that says it is a limit, for a refused call.
fn assert_refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> String {
    let s = r.expect_err(what);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
    let m = s.message().to_string();
    assert!(
        m.len() < 300,
        "{what}: a {}-byte message: {m:.400}",
        m.len()
    );
    assert!(m.contains("the limit is"), "{what}: {m}");
    m
}

/// A deploy of one process app whose environment holds `bytes` in variables of 100 KB.
fn deploy_with_env(bytes: usize) -> DeployRequest {
    let mut app: BTreeMap<String, Value> = serde_json::from_value(serde_json::json!({
        "spec": {
            "name": "big", "image": null, "command": ["sleep", "1000"], "ports": [],
            "links": [], "volume": null, "environment": {}, "restart_policy": "Never",
            "mem_limit": null, "cpu_shares": null, "constraints": []
        },
        "node": null
    }))
    .unwrap();
    let env: BTreeMap<String, String> = (0..bytes / 100_000)
        .map(|i| (format!("VAR{i}"), "v".repeat(100_000)))
        .collect();
    app.get_mut("spec").unwrap()["environment"] = serde_json::to_value(env).unwrap();
    // It is a valid plan: the scheduler's own type reads it.
    let planned: PlannedApp = serde_json::from_value(serde_json::to_value(&app).unwrap()).unwrap();
    DeployRequest {
        plan_json: serde_json::to_string(&BTreeMap::from([("big", planned)])).unwrap(),
        dry_run: false,
        volumes_json: String::new(),
        ..Default::default()
    }
}

#[test]
fn l01_oversized_commands_are_refused_before_the_log() {
    let mut c = TestCluster::start(3, &[]);
    let (term, last) = settled(&mut c);
    let leader = c.leader();
    let follower = if leader == 1 { 2 } else { 1 };
    rt().block_on(async {
        for i in [leader, follower] {
            let mut a = api(&c, i).await;
            let m = assert_refused(
                "a 1.6 MB value",
                a.kv_put(KvPutRequest {
                    key: "big".into(),
                    value: "v".repeat(1_600_000),
                })
                .await,
            );
            assert!(m.contains("1600000 bytes"), "{m}");
            let m = assert_refused(
                "a 100,000-character key",
                a.kv_put(KvPutRequest {
                    key: "k".repeat(100_000),
                    value: "v".into(),
                })
                .await,
            );
            assert!(m.contains("(100000 bytes)"), "{m}");
            let m = assert_refused(
                "a 100,000-character dataset name",
                a.dataset_create(DatasetCreateRequest {
                    name: "d".repeat(100_000),
                    node: String::new(),
                    size_limit: None,
                })
                .await,
            );
            assert!(m.contains("dataset name"), "{m}");
            let m = assert_refused(
                "a deploy with a 3.6 MB environment",
                a.deploy(deploy_with_env(3_600_000)).await,
            );
            assert!(m.contains("environment of app \"big\""), "{m}");
        }
    });
    // The same through flockctl: a short, clear error, not `h2 protocol error`.
    let name = "d".repeat(100_000);
    let o = c.ctl(c.addr(follower), &["dataset", "create", &name]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.len() < 300 && err.contains("dataset name"),
        "{err:.400}"
    );
    assert!(!err.contains("h2 protocol error"), "{err:.400}");
    let key = "k".repeat(100_000);
    let o = c.ctl(c.addr(leader), &["kv", "put", &key, "v"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.len() < 300 && err.contains("key"), "{err:.400}");

    let (term_after, last_after) = settled(&mut c);
    assert_eq!(last_after, last, "an oversized command reached the log");
    assert_eq!(term_after, term);
}

#[test]
fn l02_concurrent_rejected_big_puts_cause_no_election() {
    let mut c = TestCluster::start(3, &[]);
    let (term, last) = settled(&mut c);
    let leader = c.leader();
    rt().block_on(async {
        let mut calls = Vec::new();
        for k in 0..10 {
            let mut a = api(&c, 1 + k % 3).await;
            calls.push(tokio::spawn(async move {
                a.kv_put(KvPutRequest {
                    key: format!("big{k}"),
                    value: "v".repeat(3_900_000),
                })
                .await
            }));
        }
        for call in calls {
            assert_refused("a 3.9 MB value", call.await.unwrap());
        }
    });
    // Writes go on at once, on the same leader in the same term.
    c.ctl_ok(c.addr(leader), &["kv", "put", "after", "1"]);
    let (term_after, last_after) = settled(&mut c);
    assert_eq!(term_after, term, "an election followed the refused puts");
    assert_eq!(c.leader(), leader);
    assert_eq!(last_after, last + 1, "only the small put reached the log");
}

#[test]
fn l03_kv_ls_pages_and_never_panics() {
    let c = TestCluster::start(1, &[]);
    let a = c.addr(1);
    // A value over 65,535 characters (the width a format string can pad to).
    let v70k = "w".repeat(70_000);
    c.ctl_ok(a, &["kv", "put", "wide", &v70k]);
    let table = c.ctl_ok(a, &["kv", "ls"]);
    assert!(
        table.contains("wide") && table.contains("(70000 bytes)"),
        "{table:.300}"
    );
    assert!(table.len() < 1000, "{} bytes", table.len());
    let ls: Value = serde_json::from_str(&c.ctl_ok(a, &["kv", "ls", "--json"])).unwrap();
    assert_eq!(
        ls[0]["value"].as_str().unwrap(),
        v70k,
        "--json prints values whole"
    );

    // A namespace larger than one page in bytes (three values of 1.5 MiB: 4.5 MiB) and in
    // entries (1,500 keys: flockctl asks for 1,000 a page).
    let big = |i: usize| format!("{i}").repeat(1536 * 1024);
    rt().block_on(async {
        let mut api = api(&c, 1).await;
        for i in 0..3 {
            api.kv_put(KvPutRequest {
                key: format!("ns/big{i}"),
                value: big(i),
            })
            .await
            .unwrap();
        }
        let mut calls = Vec::new();
        for i in 0..1500 {
            let mut api = api.clone();
            calls.push(tokio::spawn(async move {
                api.kv_put(KvPutRequest {
                    key: format!("ns/k{i:04}"),
                    value: format!("{i}"),
                })
                .await
            }));
        }
        for call in calls {
            call.await.unwrap().unwrap();
        }
        // One paged request gets a page, not everything.
        let page = api
            .kv_list(KvListRequest {
                prefix: "ns/".into(),
                limit: 5000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.more, "4.5 MiB of values in one page");
        assert!(page.entries.len() < 1503);
        // A client that does not page (an older flockctl) still gets the whole list.
        let all = api
            .kv_list(KvListRequest {
                prefix: "ns/".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.entries.len(), 1503);
        assert!(!all.more);
    });
    let ls: Value = serde_json::from_str(&c.ctl_ok(a, &["kv", "ls", "ns/", "--json"])).unwrap();
    let entries = ls.as_array().unwrap();
    assert_eq!(entries.len(), 1503);
    for (i, e) in entries.iter().take(3).enumerate() {
        assert_eq!(e["key"], format!("ns/big{i}"));
        assert_eq!(e["value"].as_str().unwrap(), big(i));
    }
    let keys: Vec<&str> = entries.iter().map(|e| e["key"].as_str().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, keys, "each key once, in order");
    let table = c.ctl_ok(a, &["kv", "ls", "ns/"]);
    assert_eq!(table.lines().count(), 1504);
}

/// Concurrent writes of the largest allowed value: the leader batches concurrent proposals
/// into one entry, and keeps each batch within MAX_COMMAND_BYTES (eight 1.5 MiB values would
/// otherwise make one 12 MiB entry); all succeed, with no election.
#[test]
fn l04_concurrent_largest_values_are_batched_within_the_command_limit() {
    let mut c = TestCluster::start(3, &[]);
    let (term, last) = settled(&mut c);
    let leader = c.leader();
    rt().block_on(async {
        let a = api(&c, leader).await;
        let mut calls = Vec::new();
        for k in 0..8 {
            let mut a = a.clone();
            calls.push(tokio::spawn(async move {
                a.kv_put(KvPutRequest {
                    key: format!("max{k}"),
                    value: "m".repeat(1536 * 1024),
                })
                .await
            }));
        }
        for call in calls {
            call.await.unwrap().expect("a put of the largest value");
        }
    });
    let (term_after, last_after) = settled(&mut c);
    assert_eq!(term_after, term, "an election followed the puts");
    // At most two 1.5 MiB values share an entry.
    assert!(last_after >= last + 4, "{last} -> {last_after}");
}
