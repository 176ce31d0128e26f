//! Fixtures for the model's unit tests.

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
