//! Fixtures for the model's unit tests.

use std::collections::BTreeMap;

use crate::config::{AppSpec, PortMap, RestartPolicy, Volume};
use crate::state::Command;
use crate::ClusterState;

/// A cluster of `nodes` nodes (ids 1..=nodes; node 1 is "n1", the others unnamed), nothing else.
pub(crate) fn cluster(nodes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(&Command::InitCluster {
        cluster_id: "c".into(),
        join_secret: "s".into(),
        node_id: 1,
        name: "n1".into(),
        addr: "h:1".into(),
    });
    for _ in 1..nodes {
        s.apply(&Command::RegisterNode {
            secret: "s".into(),
            name: None,
            addr: "h:2".into(),
        });
    }
    s
}

/// An app of the process driver, with port 80 published as `port` and a volume at /data if
/// asked, never restarted.
pub(crate) fn spec(name: &str, port: Option<u16>, volume: bool) -> AppSpec {
    AppSpec {
        name: name.into(),
        image: None,
        command: Some(vec!["run".into()]),
        ports: port
            .map(|p| {
                vec![PortMap {
                    internal: 80,
                    external: p,
                }]
            })
            .unwrap_or_default(),
        links: vec![],
        volume: volume.then(|| Volume {
            mountpoint: "/data".into(),
            maximum_size: None,
            dataset: None,
        }),
        environment: BTreeMap::new(),
        restart_policy: RestartPolicy::Never,
        mem_limit: None,
        cpu_shares: None,
        constraints: vec![],
        ..Default::default()
    }
}
