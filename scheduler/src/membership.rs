//! Raft membership decisions, as plain functions.
//!
//! flock keeps up to [`MAX_VOTERS`] voters and an odd voter count: an even count tolerates no
//! more failures than the odd count below it, and needs one more node for every commit. Every
//! other member is a learner that holds the full state and is promoted when a voter leaves.

use std::collections::BTreeSet;

use crate::NodeId;

/// The most voters a cluster gets; further nodes stay learners.
pub const MAX_VOTERS: usize = 5;

/// Which learners to promote, given the current voters and the learners that are caught up and
/// healthy (in order of preference). Promotes so the voter count becomes the largest odd number
/// not above [`MAX_VOTERS`] that the candidates allow; never demotes.
pub fn voters_to_promote(voters: &BTreeSet<NodeId>, ready_learners: &[NodeId]) -> Vec<NodeId> {
    let candidates: Vec<NodeId> = ready_learners
        .iter()
        .copied()
        .filter(|id| !voters.contains(id))
        .collect();
    let mut target = (voters.len() + candidates.len()).min(MAX_VOTERS);
    if target.is_multiple_of(2) {
        target -= 1;
    }
    if target <= voters.len() {
        return Vec::new();
    }
    candidates.into_iter().take(target - voters.len()).collect()
}

/// Why removing a node was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemovalRefused {
    #[error("it is the last voter; a cluster cannot run without one")]
    LastVoter,
    #[error(
        "the remaining {voters_after} voters would have only {healthy_after} healthy, fewer than the {needed} a quorum needs; use --force to remove it anyway"
    )]
    QuorumLost {
        voters_after: usize,
        healthy_after: usize,
        needed: usize,
    },
}

/// Checks that removing `target` leaves a voter set whose healthy members still form a quorum.
/// Removing a learner is always fine. `force` skips the quorum check but never allows removing
/// the last voter.
pub fn check_removal(
    voters: &BTreeSet<NodeId>,
    healthy: &BTreeSet<NodeId>,
    target: NodeId,
    force: bool,
) -> Result<(), RemovalRefused> {
    if !voters.contains(&target) {
        return Ok(());
    }
    if voters.len() == 1 {
        return Err(RemovalRefused::LastVoter);
    }
    if force {
        return Ok(());
    }
    let remaining: BTreeSet<NodeId> = voters.iter().copied().filter(|&v| v != target).collect();
    let healthy_after = remaining.intersection(healthy).count();
    let needed = remaining.len() / 2 + 1;
    if healthy_after < needed {
        return Err(RemovalRefused::QuorumLost {
            voters_after: remaining.len(),
            healthy_after,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn one_voter_waits_for_two_learners() {
        assert!(voters_to_promote(&set(&[1]), &[2]).is_empty());
        assert_eq!(voters_to_promote(&set(&[1]), &[2, 3]), vec![2, 3]);
        assert_eq!(voters_to_promote(&set(&[1]), &[2, 3, 4]), vec![2, 3]);
        assert_eq!(
            voters_to_promote(&set(&[1]), &[2, 3, 4, 5]),
            vec![2, 3, 4, 5]
        );
        assert_eq!(
            voters_to_promote(&set(&[1, 2, 3]), &[4, 5, 6, 7]),
            vec![4, 5]
        );
        assert!(voters_to_promote(&set(&[1, 2, 3, 4, 5]), &[6, 7]).is_empty());
    }

    #[test]
    fn even_voter_count_is_restored_to_odd() {
        // A voter of three was removed: one learner brings it back to three.
        assert_eq!(voters_to_promote(&set(&[1, 2]), &[7]), vec![7]);
        // Nothing to promote: stays at two, never demotes.
        assert!(voters_to_promote(&set(&[1, 2]), &[]).is_empty());
        assert!(voters_to_promote(&set(&[1, 2, 3, 4]), &[]).is_empty());
        assert_eq!(voters_to_promote(&set(&[1, 2, 3, 4]), &[9]), vec![9]);
    }

    #[test]
    fn removal_rules() {
        let voters = set(&[1, 2, 3]);
        assert_eq!(
            check_removal(&set(&[1]), &set(&[1]), 1, true),
            Err(RemovalRefused::LastVoter)
        );
        assert_eq!(check_removal(&voters, &set(&[1, 2, 3]), 3, false), Ok(()));
        // Node 2 is down; removing healthy node 3 leaves {1, 2} with one healthy: no quorum.
        assert_eq!(
            check_removal(&voters, &set(&[1, 3]), 3, false),
            Err(RemovalRefused::QuorumLost {
                voters_after: 2,
                healthy_after: 1,
                needed: 2
            })
        );
        assert_eq!(check_removal(&voters, &set(&[1, 3]), 3, true), Ok(()));
        // Removing the dead node itself is what an operator wants, and keeps quorum.
        assert_eq!(check_removal(&voters, &set(&[1, 3]), 2, false), Ok(()));
        // Learners are always removable.
        assert_eq!(check_removal(&voters, &set(&[]), 9, false), Ok(()));
    }

    proptest! {
        #[test]
        fn promotion_keeps_voters_odd_and_bounded(
            voters in prop::collection::btree_set(1u64..20, 1..6),
            learners in prop::collection::btree_set(20u64..40, 0..8),
        ) {
            let learners: Vec<_> = learners.into_iter().collect();
            let promoted = voters_to_promote(&voters, &learners);
            let after = voters.len() + promoted.len();
            prop_assert!(promoted.iter().all(|p| learners.contains(p)));
            if !promoted.is_empty() {
                prop_assert!(after % 2 == 1, "{} voters after promotion", after);
                prop_assert!(after <= MAX_VOTERS);
            }
            // Promotion stops only when no more can be done within the rules.
            let possible = (voters.len() + learners.len()).min(MAX_VOTERS);
            let best_odd = if possible % 2 == 0 { possible - 1 } else { possible };
            prop_assert_eq!(after, best_odd.max(voters.len()));
        }

        #[test]
        fn removal_never_leaves_an_unhealthy_majority(
            voters in prop::collection::btree_set(1u64..8, 1..6),
            healthy in prop::collection::btree_set(1u64..8, 0..8),
            target in 1u64..8,
        ) {
            if check_removal(&voters, &healthy, target, false).is_ok() && voters.contains(&target) {
                let rest: BTreeSet<_> = voters.iter().copied().filter(|&v| v != target).collect();
                prop_assert!(!rest.is_empty());
                prop_assert!(rest.intersection(&healthy).count() * 2 > rest.len());
            }
        }
    }
}
