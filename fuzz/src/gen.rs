//! Valid values for the targets: a small cluster state, real commands, and `arbitrary`-driven
//! commands that reuse the state's names and ids (so that generated commands are accepted as
//! often as refused).

use std::collections::BTreeMap;

use arbitrary::Unstructured;
use flock_scheduler::config::{parse_application, parse_deployment, resolve, NodeRef};
use flock_scheduler::fit::Capacity;
use flock_scheduler::{ClusterState, Command, SnapshotRecord};

pub const APPLICATION_YML: &str = include_str!("../../examples/application.yml");
pub const DEPLOYMENT_YML: &str = include_str!("../../examples/deployment.yml");

/// The nodes of [`small_state`], as the config resolver sees them.
pub fn nodes() -> Vec<NodeRef> {
    (1..=3)
        .map(|i| NodeRef {
            id: i,
            name: format!("n{i}"),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
}

/// The examples' apps, resolved against [`nodes`].
pub fn example_deploy() -> Command {
    let apps = parse_application("application.yml", APPLICATION_YML).expect("the example parses");
    let dep = parse_deployment("deployment.yml", DEPLOYMENT_YML).expect("the example parses");
    let plan = resolve(&apps, &dep, &nodes()).expect("the example resolves");
    Command::deploy_all(plan.apps)
}

fn capacity() -> Capacity {
    Capacity {
        memory: 8 << 30,
        cpus: 4,
        docker: false,
    }
}

/// The commands that build [`small_state`], then more of every kind.
pub fn commands() -> Vec<Command> {
    let mut cmds = vec![Command::InitCluster {
        cluster_id: "c1".into(),
        join_secret: "secret".into(),
        node_id: 1,
        name: "n1".into(),
        addr: "127.0.0.1:7001".into(),
    }];
    for i in 2..=3 {
        cmds.push(Command::RegisterNode {
            secret: "secret".into(),
            name: Some(format!("n{i}")),
            addr: format!("127.0.0.1:{}", 7000 + i),
        });
    }
    for id in 1..=3 {
        cmds.push(Command::ReportNode {
            id,
            labels: Some(BTreeMap::from([("zone".into(), format!("z{id}"))])),
            capacity: capacity(),
        });
    }
    cmds.extend([
        Command::KvPut {
            key: "k".into(),
            value: "v".into(),
        },
        Command::CreateDataset {
            name: "db".into(),
            primary: 1,
            size_limit: Some(1 << 30),
        },
        Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: SnapshotRecord {
                name: "s1".into(),
                guid: 42,
                created_unix: 1_700_000_000,
                epoch: 1,
            },
        },
        Command::MountVolume {
            dataset: 1,
            node: 1,
            id: "m1".into(),
        },
        example_deploy(),
    ]);
    cmds
}

/// More commands, applied to [`small_state`] by the seeds (not part of it).
pub fn more_commands() -> Vec<Command> {
    vec![
        Command::KvCas {
            key: "k".into(),
            expect: Some("v".into()),
            value: "w".into(),
        },
        Command::KvDelete { key: "k".into() },
        Command::RotateJoinSecret {
            secret: "other".into(),
        },
        Command::RemoveNode { id: 3 },
        Command::RollbackDataset {
            dataset: 1,
            epoch: 1,
            to: "s1".into(),
        },
        Command::BeginDatasetMove { dataset: 1, to: 2 },
        Command::CommitDatasetMove {
            dataset: 1,
            epoch: 1,
            to: 2,
            snapshot: "s1".into(),
        },
        Command::HandoffDatasetMove {
            dataset: 1,
            epoch: 1,
            to: 2,
        },
        Command::CancelDatasetMove { dataset: 1 },
        Command::DeleteDataset { dataset: 1 },
        Command::MoveApp {
            app: "counter".into(),
            to: 2,
        },
        Command::CancelAppMove {
            app: "counter".into(),
        },
        Command::UnmountVolume {
            dataset: 1,
            node: 1,
            id: "m1".into(),
        },
        Command::ForgetMounts {
            dataset: 1,
            node: None,
        },
        Command::Batch(vec![
            Command::KvPut {
                key: "a".into(),
                value: "1".into(),
            },
            Command::Batch(vec![]),
        ]),
        Command::deploy_all(BTreeMap::new()),
    ]
}

/// Three nodes, a key, a dataset with a snapshot and a mount, the examples' apps deployed.
pub fn small_state() -> ClusterState {
    let mut s = ClusterState::default();
    for c in commands() {
        s.apply(&c);
    }
    s
}

fn string(u: &mut Unstructured, pool: &[&str]) -> String {
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => u.arbitrary().unwrap_or_default(),
        1 => {
            let s: String = u.arbitrary().unwrap_or_default();
            s.repeat(u.int_in_range(1..=64usize).unwrap_or(1))
        }
        _ => pool[u.choose_index(pool.len()).unwrap_or(0)].to_string(),
    }
}

fn id(u: &mut Unstructured) -> u64 {
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => u.arbitrary().unwrap_or(0),
        1 => *u
            .choose(&[0, u64::MAX, u64::MAX - 1, 1 << 63])
            .unwrap_or(&0),
        _ => u.int_in_range(0..=4).unwrap_or(1),
    }
}

const NAMES: &[&str] = &[
    "n1", "n2", "n3", "db", "s1", "counter", "writer", "m1", "k", "", "-x",
];

/// A command of any kind, from `arbitrary` data; `depth` bounds nested batches.
pub fn command(u: &mut Unstructured, depth: u32) -> Command {
    let s = |u: &mut Unstructured| string(u, NAMES);
    match u.int_in_range(0..=24u8).unwrap_or(0) {
        0 => Command::InitCluster {
            cluster_id: s(u),
            join_secret: s(u),
            node_id: id(u),
            name: s(u),
            addr: string(u, &["127.0.0.1:7009", "h:0", ":1", "x:65536"]),
        },
        1 => Command::RegisterNode {
            secret: string(u, &["secret", ""]),
            name: if u.arbitrary().unwrap_or(false) {
                Some(s(u))
            } else {
                None
            },
            addr: string(u, &["127.0.0.1:7009", "h:0"]),
        },
        2 => Command::RemoveNode { id: id(u) },
        3 => Command::RotateJoinSecret { secret: s(u) },
        4 => Command::KvPut {
            key: s(u),
            value: s(u),
        },
        5 => Command::KvCas {
            key: s(u),
            expect: if u.arbitrary().unwrap_or(false) {
                Some(s(u))
            } else {
                None
            },
            value: s(u),
        },
        6 => Command::KvDelete { key: s(u) },
        7 if depth < 3 => {
            let n = u.int_in_range(0..=5usize).unwrap_or(0);
            Command::Batch((0..n).map(|_| command(u, depth + 1)).collect())
        }
        8 => Command::CreateDataset {
            name: s(u),
            primary: id(u),
            size_limit: if u.arbitrary().unwrap_or(false) {
                Some(id(u))
            } else {
                None
            },
        },
        9 => Command::RecordSnapshot {
            dataset: id(u),
            epoch: id(u),
            snapshot: SnapshotRecord {
                name: s(u),
                guid: u.arbitrary().unwrap_or(0),
                created_unix: u.arbitrary().unwrap_or(0),
                epoch: id(u),
            },
        },
        10 => Command::RollbackDataset {
            dataset: id(u),
            epoch: id(u),
            to: s(u),
        },
        11 => Command::DeleteDataset { dataset: id(u) },
        12 => Command::BeginDatasetMove {
            dataset: id(u),
            to: id(u),
        },
        13 => Command::CommitDatasetMove {
            dataset: id(u),
            epoch: id(u),
            to: id(u),
            snapshot: s(u),
        },
        14 => Command::CancelDatasetMove { dataset: id(u) },
        15 => {
            let mut d = example_deploy();
            if let Command::Deploy { apps, .. } = &mut d {
                for app in apps.values_mut() {
                    if u.arbitrary().unwrap_or(false) {
                        app.node = Some(id(u));
                    }
                }
                if u.arbitrary().unwrap_or(false) {
                    apps.clear();
                }
            }
            d
        }
        16 => Command::HandoffDatasetMove {
            dataset: id(u),
            epoch: id(u),
            to: id(u),
        },
        17 => Command::MoveApp {
            app: s(u),
            to: id(u),
        },
        18 => Command::CancelAppMove { app: s(u) },
        19 => Command::ReportNode {
            id: id(u),
            labels: if u.arbitrary().unwrap_or(false) {
                Some(BTreeMap::from([(s(u), s(u))]))
            } else {
                None
            },
            capacity: Capacity {
                memory: u.arbitrary().unwrap_or(0),
                cpus: u.arbitrary().unwrap_or(0),
                docker: u.arbitrary().unwrap_or(false),
            },
        },
        20 => Command::MountVolume {
            dataset: id(u),
            node: id(u),
            id: s(u),
        },
        21 => Command::UnmountVolume {
            dataset: id(u),
            node: id(u),
            id: s(u),
        },
        22 => Command::ForgetMounts {
            dataset: id(u),
            node: if u.arbitrary().unwrap_or(false) {
                Some(id(u))
            } else {
                None
            },
        },
        _ => Command::KvPut {
            key: "k".into(),
            value: s(u),
        },
    }
}
