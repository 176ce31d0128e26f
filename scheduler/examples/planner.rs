//! How the deploy planner's time grows with apps and nodes (pure, in-process): plans a fresh
//! deploy of N apps (10% with a volume, half of them pinned, each with a memory and cpu
//! reservation, one in twenty unpinned constrained to the tenth of the nodes labelled
//! disk=ssd) on M nodes that report their capacity, then the same configuration again (the
//! converged case), and prints the medians of 5 runs.
//!
//! `cargo run --release -p flock-scheduler --example planner`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flock_scheduler::app::plan_deploy;
use flock_scheduler::config::{AppSpec, PlannedApp, PortMap, RestartPolicy, Volume};
use flock_scheduler::fit::Capacity;
use flock_scheduler::{ClusterState, Command, CommandResult};

fn cluster(nodes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(&Command::InitCluster {
        cluster_id: "c".into(),
        join_secret: "s".into(),
        node_id: 1,
        name: "n1".into(),
        addr: "10.0.0.1:7801".into(),
    });
    for i in 2..=nodes {
        s.apply(&Command::RegisterNode {
            secret: "s".into(),
            name: None,
            addr: format!("10.0.{}.{}:7801", i / 250, i % 250),
        });
    }
    // Every node reports 64 GiB and 16 cpus, and every tenth a label the constrained apps want.
    for id in 1..=nodes {
        let labels = if id % 10 == 0 {
            [("disk".to_string(), "ssd".to_string())].into()
        } else {
            BTreeMap::new()
        };
        s.apply(&Command::ReportNode {
            id,
            labels: Some(labels),
            capacity: Capacity {
                memory: 64 << 30,
                cpus: 16,
                docker: true,
            },
        });
    }
    s
}

fn apps(n: usize, nodes: u64) -> BTreeMap<String, PlannedApp> {
    (0..n)
        .map(|i| {
            let name = format!("app{i}");
            let spec = AppSpec {
                name: name.clone(),
                image: None,
                command: Some(vec!["run".into()]),
                ports: if i % 4 == 0 {
                    vec![PortMap {
                        internal: 8080,
                        external: 10_000 + i as u16,
                    }]
                } else {
                    vec![]
                },
                links: vec![],
                volume: (i % 10 == 0).then(|| Volume {
                    mountpoint: "/data".into(),
                    maximum_size: None,
                    dataset: None,
                }),
                environment: BTreeMap::new(),
                restart_policy: RestartPolicy::Always,
                mem_limit: Some(256 << 20),
                cpu_shares: Some(64),
                // One app in twenty (all unpinned) wants an ssd node.
                constraints: if i % 20 == 1 {
                    vec!["node.labels.disk == ssd".parse().expect("valid")]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let node = (i % 2 == 0).then_some(1 + (i as u64 * 7919) % nodes);
            (name, PlannedApp { spec, node })
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    println!("| apps | nodes | plan, fresh | apply (plan + datasets), fresh | plan, converged |");
    println!("|---:|---:|---:|---:|---:|");
    for (n, m) in [
        (100, 10),
        (1_000, 100),
        (10_000, 1_000),
        (10_000, 100),
        (1_000, 1_000),
    ] {
        let state = cluster(m);
        let config = apps(n, m);
        let mut fresh = Vec::new();
        let mut apply = Vec::new();
        let mut converged = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let (_, changes) = plan_deploy(&state, &config).expect("plans");
            fresh.push(t.elapsed());
            assert_eq!(changes.len(), n);
            let mut s = state.clone();
            let t = Instant::now();
            let r = s.apply(&Command::deploy_all(config.clone()));
            apply.push(t.elapsed());
            assert!(matches!(r, CommandResult::Deployed { .. }), "{r:?}");
            let t = Instant::now();
            let (_, changes) = plan_deploy(&s, &config).expect("plans");
            converged.push(t.elapsed());
            assert!(changes.is_empty());
        }
        println!(
            "| {n} | {m} | {:.1} ms | {:.1} ms | {:.1} ms |",
            median(fresh).as_secs_f64() * 1e3,
            median(apply).as_secs_f64() * 1e3,
            median(converged).as_secs_f64() * 1e3
        );
    }
}
