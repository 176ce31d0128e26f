//! Which members' builds can apply a command that a leader proposes on its own.
//!
//! A command added to [`flock_scheduler::Command`] is undecodable for builds older than it:
//! an entry that carries one stops those members' log until they are upgraded, and a
//! quorum of them stops the cluster. What an operator asks for is their call; what a leader
//! proposes by itself ([`flock_scheduler::Command::PlaceInstances`]) waits instead until every
//! member that is not down said, in a recent lease renewal, that its build applies it
//! ([`flock_scheduler::APPLY_LEVEL`]). A member that never says (a build before levels) counts
//! as unable.

use std::collections::BTreeMap;

use flock_scheduler::{ClusterState, NodeId, NodeState};

/// The members other than `me` and not down that are not known to apply commands of `need`:
/// their build's level in `levels` (as recently heard) is lower, or was not heard. Their names,
/// in id order; empty when every one can.
pub fn cannot_apply(
    state: &ClusterState,
    me: NodeId,
    levels: &BTreeMap<NodeId, u32>,
    need: u32,
) -> Vec<String> {
    state
        .nodes
        .values()
        .filter(|n| n.id != me && n.state != NodeState::Down)
        .filter(|n| levels.get(&n.id).is_none_or(|l| *l < need))
        .map(|n| n.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_not_down_must_have_said_it_applies_the_level() {
        let mut s = crate::testutil::cluster(3);
        let levels = BTreeMap::from([(2, 1)]);
        // Node 3 said nothing (an older build, or not heard lately); node 1 is the leader.
        assert_eq!(cannot_apply(&s, 1, &levels, 1), vec!["n3".to_string()]);
        assert!(cannot_apply(&s, 1, &BTreeMap::from([(2, 1), (3, 2)]), 1).is_empty());
        assert_eq!(
            cannot_apply(&s, 1, &BTreeMap::from([(2, 1), (3, 0)]), 1),
            vec!["n3".to_string()]
        );
        // A node that is down is not waited for (it catches up once upgraded).
        s.nodes.get_mut(&3).unwrap().state = NodeState::Down;
        assert!(cannot_apply(&s, 1, &levels, 1).is_empty());
    }
}
