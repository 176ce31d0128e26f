//! Fixtures for the decisions' unit tests: states built with the real `ClusterState::apply`.

use std::collections::BTreeMap;

use flock_scheduler::config::{AppSpec, PlannedApp, RestartPolicy, Volume};
use flock_scheduler::{ClusterState, Command, CommandResult, SnapshotRecord};

/// A cluster of `nodes` nodes: ids 1..=nodes, named n1, n2, ..., at `h:<id>`.
pub(crate) fn cluster(nodes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    ok(
        &mut s,
        Command::InitCluster {
            cluster_id: "c".into(),
            join_secret: "s".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "h:1".into(),
        },
    );
    for id in 2..=nodes {
        ok(
            &mut s,
            Command::RegisterNode {
                secret: "s".into(),
                name: None,
                addr: format!("h:{id}"),
            },
        );
    }
    s
}

/// Applies `cmd`, which must not be rejected.
pub(crate) fn ok(s: &mut ClusterState, cmd: Command) -> CommandResult {
    let r = s.apply(&cmd);
    assert!(
        !matches!(r, CommandResult::Rejected(_)),
        "{cmd:?} was rejected: {r:?}"
    );
    r
}

/// An app with a volume (its dataset is named after it), of the docker driver if `image`.
pub(crate) fn spec(name: &str, image: bool) -> AppSpec {
    AppSpec {
        name: name.into(),
        image: image.then(|| "busybox".to_string()),
        command: (!image).then(|| vec!["run".to_string()]),
        ports: vec![],
        links: vec![],
        volume: Some(Volume {
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

/// Deploys `apps` (name, docker?, node), each with a volume: their datasets are created.
pub(crate) fn deploy(s: &mut ClusterState, apps: &[(&str, bool, u64)]) {
    let apps = apps
        .iter()
        .map(|(name, image, node)| {
            (
                name.to_string(),
                PlannedApp {
                    spec: spec(name, *image),
                    node: Some(*node),
                },
            )
        })
        .collect();
    ok(s, Command::deploy_all(apps));
}

/// A snapshot record.
pub(crate) fn snap(name: &str, guid: u64, epoch: u64) -> SnapshotRecord {
    SnapshotRecord {
        name: name.into(),
        guid,
        created_unix: 0,
        epoch,
    }
}
