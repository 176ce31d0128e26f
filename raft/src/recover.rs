//! Recovery when a majority of voters is lost for good: `flockd run --force-new-cluster`.
//!
//! Raft cannot commit anything without a quorum of voters, and it cannot change its voters
//! without committing that change; when most voters are gone for good the cluster is stuck.
//! As etcd's `--force-new-cluster` and Consul's `peers.json`, a survivor rewrites its own store
//! before Raft starts: one more log entry, a membership whose only voter is this node, in a
//! term above every term the node has seen, and a committed vote for itself in that term. On
//! start openraft restores a node whose committed vote is its own as the leader of that term
//! (`Engine::startup`), and with itself as the only voter it commits the new entry, and with
//! it everything before it in its log, at once.
//!
//! The caveat is etcd's: entries the lost majority committed beyond this node's log are lost,
//! and entries in this node's log that were never committed become committed.
//!
//! [`plan_force_new_cluster`] is the pure part (what to write, or why not); [`force_new_cluster`]
//! reads and writes the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::{CommittedLeaderId, EntryPayload};

use crate::disk::{DiskError, DiskState, NodeDisk, RaftDisk, WriteOp};
use crate::types::{Entry, LogId, MemberNode, Membership, NodeId, Vote};

/// Why a store cannot be forced into a one-voter cluster.
#[derive(Debug, thiserror::Error)]
pub enum ForceError {
    #[error("the raft store {path} holds no Raft state yet (no vote, no log, no snapshot): there is no cluster to recover; start the node with `flockd run`, or make a new cluster with `flockd init`")]
    NoRaftState { path: String },
    #[error("node {name} (id {id}) is already the only voter of its cluster (log index {index}, term {term}): there is nothing to force; start it with `flockd run` and add nodes with `flockd join`")]
    AlreadyOnlyVoter {
        id: NodeId,
        name: String,
        index: u64,
        term: u64,
    },
    #[error("the raft store {path} belongs to cluster {found}, not to this node's cluster {expected}; refusing to touch it")]
    OtherCluster {
        path: String,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// What forcing a store into a one-voter cluster wrote, for the operator.
#[derive(Debug)]
pub struct Forced {
    /// The ops written, in one durable transaction.
    pub ops: Vec<WriteOp>,
    /// The new membership entry's log id: this node's leadership term and the index every
    /// entry up to which is now committed.
    pub log_id: LogId,
    /// The last log id before the new entry (`None`: the log was empty).
    pub last_before: Option<LogId>,
    /// The voters of the membership this node had, without this node.
    pub dropped_voters: BTreeMap<NodeId, MemberNode>,
    /// The learners of that membership (other than this node): Raft forgets them too; the
    /// leader adds the registered ones back as learners.
    pub dropped_learners: BTreeMap<NodeId, MemberNode>,
    /// Whether this node was a voter (a learner's log may lag what the voters committed).
    pub was_voter: bool,
}

/// The membership this node's store holds in effect: the last one in its log, else its
/// snapshot's (openraft takes the last membership entry as effective, committed or not).
fn effective_membership(disk: &DiskState) -> Option<Membership> {
    disk.logs
        .iter()
        .rev()
        .find_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(m.clone()),
            _ => None,
        })
        .or_else(|| {
            disk.snapshot
                .as_ref()
                .map(|s| s.meta.last_membership.membership().clone())
        })
}

/// The last log id the store knows of: its last entry, else what was purged or snapshotted.
fn last_log_id(disk: &DiskState) -> Option<LogId> {
    let last_entry = disk.logs.last().map(|e| e.log_id);
    let snapshot = disk.snapshot.as_ref().and_then(|s| s.meta.last_log_id);
    [last_entry, disk.last_purged, snapshot]
        .into_iter()
        .max()
        .flatten()
}

/// What to write so that node `me` (reached as `member`) restarts as the only voter and the
/// leader of a new term, keeping everything in its log; or why not.
///
/// - The new entry goes at the index after the last log id (a snapshot newer than the last
///   entry is purged up to first, so the log has no hole before it).
/// - Its term is one above every term seen: the vote's and the last log id's.
/// - The vote is that term's, for `me`, committed: openraft restores a node whose committed
///   vote is its own as leader at start, with no election; the vote is not below the last log
///   id, as openraft requires.
/// - The committed index is the new entry: the state machine applies the whole log up to it
///   at start.
pub fn plan_force_new_cluster(
    disk: &DiskState,
    me: NodeId,
    member: MemberNode,
    path: &str,
) -> Result<Forced, ForceError> {
    let last = last_log_id(disk);
    let Some(membership) = effective_membership(disk).filter(|_| last.is_some()) else {
        return Err(ForceError::NoRaftState {
            path: path.to_string(),
        });
    };
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let joint = membership.get_joint_config().len() > 1;
    if voters == BTreeSet::from([me]) && !joint {
        let last = last.unwrap_or_default();
        return Err(ForceError::AlreadyOnlyVoter {
            id: me,
            name: member.name,
            index: last.index,
            term: last.leader_id.term,
        });
    }
    let vote_term = disk.vote.map_or(0, |v| v.leader_id.term);
    let log_term = last.map_or(0, |l| l.leader_id.term);
    let term = vote_term.max(log_term) + 1;
    let index = last.map_or(0, |l| l.index + 1);
    let log_id = LogId::new(CommittedLeaderId::new(term, me), index);
    let one_voter = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, member)]));
    let entry = Entry {
        log_id,
        payload: EntryPayload::Membership(one_voter),
    };
    let mut ops = Vec::new();
    let last_entry = disk.logs.last().map(|e| e.log_id);
    if let Some(l) = last.filter(|l| Some(*l) != last_entry && Some(*l) != disk.last_purged) {
        // The snapshot is ahead of the log: openraft would purge up to it at start; do it now,
        // so the new entry follows the purged point without a hole.
        ops.push(WriteOp::PurgeUpto(l));
    }
    ops.push(WriteOp::Append(vec![entry]));
    ops.push(WriteOp::Vote(Vote::new_committed(term, me)));
    ops.push(WriteOp::Committed(Some(log_id)));
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let others = |ids: &BTreeSet<NodeId>| -> BTreeMap<NodeId, MemberNode> {
        ids.iter()
            .filter(|id| **id != me)
            .map(|id| (*id, membership.get_node(id).cloned().unwrap_or_default()))
            .collect()
    };
    Ok(Forced {
        ops,
        log_id,
        last_before: last,
        dropped_voters: others(&voters),
        dropped_learners: others(&learners),
        was_voter: voters.contains(&me),
    })
}

/// Forces the store at `path`, of cluster `cluster_id`, into a one-voter cluster led by `me`
/// ([`plan_force_new_cluster`]), with one durable write. The store must exist: a missing one is
/// refused, not created.
pub fn force_new_cluster(
    path: &Path,
    cluster_id: &str,
    me: NodeId,
    member: MemberNode,
) -> Result<Forced, ForceError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(ForceError::NoRaftState { path: shown });
    }
    let mut disk = NodeDisk::open(path)?;
    let state = disk.load()?;
    if let Some(found) = state.cluster_id.as_deref().filter(|c| *c != cluster_id) {
        return Err(ForceError::OtherCluster {
            path: shown,
            found: found.to_string(),
            expected: cluster_id.to_string(),
        });
    }
    let forced = plan_force_new_cluster(&state, me, member, &shown)?;
    disk.write(&forced.ops, true)?;
    Ok(forced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::StoredSnapshot;
    use crate::types::{SnapshotMeta, StoredMembership};
    use flock_scheduler::Command;

    fn node(id: NodeId) -> MemberNode {
        MemberNode {
            name: format!("n{id}"),
            addr: format!("10.0.0.{id}:7800"),
        }
    }

    fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::new(
            vec![voters.iter().copied().collect()],
            voters
                .iter()
                .chain(learners)
                .map(|id| (*id, node(*id)))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn log_id(term: u64, leader: NodeId, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, leader), index)
    }

    fn entry(
        term: u64,
        leader: NodeId,
        index: u64,
        payload: EntryPayload<crate::TypeConfig>,
    ) -> Entry {
        Entry {
            log_id: log_id(term, leader, index),
            payload,
        }
    }

    fn put(k: &str) -> EntryPayload<crate::TypeConfig> {
        EntryPayload::Normal(Command::KvPut {
            key: k.into(),
            value: "v".into(),
        })
    }

    /// Node 1's store in a cluster of voters 1, 2, 3 and learner 4: a membership entry, two
    /// puts, and a vote for node 2 in term 5 (higher than any entry's).
    fn three_voters() -> DiskState {
        DiskState {
            cluster_id: Some("c".into()),
            vote: Some(Vote::new_committed(5, 2)),
            committed: Some(log_id(3, 2, 2)),
            last_purged: None,
            logs: vec![
                entry(1, 1, 0, EntryPayload::Membership(members(&[1, 2, 3], &[4]))),
                entry(3, 2, 1, put("a")),
                entry(3, 2, 2, put("b")),
            ],
            snapshot: None,
        }
    }

    #[test]
    fn a_survivor_becomes_the_only_voter_and_leader_of_a_new_term() {
        let f = plan_force_new_cluster(&three_voters(), 1, node(1), "raft.redb").unwrap();
        // Above the vote's term 5, after the last entry.
        assert_eq!(f.log_id, log_id(6, 1, 3));
        assert_eq!(f.last_before, Some(log_id(3, 2, 2)));
        assert_eq!(f.dropped_voters.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(f.dropped_voters[&2], node(2));
        assert_eq!(f.dropped_learners.keys().copied().collect::<Vec<_>>(), [4]);
        assert!(f.was_voter);
        let [WriteOp::Append(entries), WriteOp::Vote(vote), WriteOp::Committed(committed)] =
            &f.ops[..]
        else {
            panic!("{:?}", f.ops)
        };
        assert_eq!(entries.len(), 1);
        let EntryPayload::Membership(m) = &entries[0].payload else {
            panic!("{:?}", entries[0])
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), [1]);
        assert_eq!(
            m.nodes().map(|(i, n)| (*i, n.clone())).collect::<Vec<_>>(),
            [(1, node(1))]
        );
        // A committed vote of this node in the entry's term: openraft's startup restores it as
        // leader, and the vote is not below the last log id.
        assert!(vote.is_committed());
        assert_eq!(vote.leader_id(), &openraft::LeaderId::new(6, 1));
        assert!(vote.leader_id().term >= entries[0].log_id.leader_id.term);
        assert_eq!(*committed, Some(f.log_id));
    }

    #[test]
    fn the_term_is_above_the_last_entry_when_the_vote_is_older() {
        let mut d = three_voters();
        d.vote = Some(Vote::new(2, 1));
        let f = plan_force_new_cluster(&d, 3, node(3), "raft.redb").unwrap();
        assert_eq!(f.log_id, log_id(4, 3, 3));
        assert_eq!(f.dropped_voters.keys().copied().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_learner_may_be_forced_and_is_said_to_be_one() {
        let f = plan_force_new_cluster(&three_voters(), 4, node(4), "raft.redb").unwrap();
        assert!(!f.was_voter);
        assert_eq!(f.dropped_voters.len(), 3);
        assert!(f.dropped_learners.is_empty());
    }

    #[test]
    fn the_entry_follows_a_snapshot_ahead_of_the_log() {
        let mut d = three_voters();
        d.logs.truncate(1);
        d.last_purged = None;
        d.snapshot = Some(StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(log_id(3, 2, 9)),
                last_membership: StoredMembership::new(
                    Some(log_id(1, 1, 0)),
                    members(&[1, 2, 3], &[]),
                ),
                snapshot_id: "s".into(),
            },
            data: Vec::new(),
        });
        let f = plan_force_new_cluster(&d, 1, node(1), "raft.redb").unwrap();
        assert_eq!(f.log_id, log_id(6, 1, 10));
        assert!(matches!(f.ops[0], WriteOp::PurgeUpto(l) if l == log_id(3, 2, 9)));
        // All purged, the snapshot's membership in effect.
        d.logs.clear();
        d.last_purged = Some(log_id(3, 2, 9));
        let f = plan_force_new_cluster(&d, 2, node(2), "raft.redb").unwrap();
        assert_eq!(f.log_id, log_id(6, 2, 10));
        assert!(matches!(f.ops[0], WriteOp::Append(_)), "{:?}", f.ops);
        assert_eq!(f.dropped_voters.keys().copied().collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn the_last_membership_in_the_log_is_the_one_in_effect() {
        let mut d = three_voters();
        d.logs.push(entry(
            5,
            2,
            3,
            EntryPayload::Membership(members(&[1, 2, 3, 4, 5], &[])),
        ));
        let f = plan_force_new_cluster(&d, 1, node(1), "raft.redb").unwrap();
        assert_eq!(f.dropped_voters.len(), 4);
        assert_eq!(f.log_id, log_id(6, 1, 4));
    }

    #[test]
    fn nothing_to_force_on_an_only_voter_or_an_empty_store() {
        let mut d = three_voters();
        d.logs.push(entry(
            5,
            1,
            3,
            EntryPayload::Membership(members(&[1], &[2])),
        ));
        let e = plan_force_new_cluster(&d, 1, node(1), "raft.redb").unwrap_err();
        assert!(
            matches!(
                e,
                ForceError::AlreadyOnlyVoter {
                    id: 1,
                    index: 3,
                    term: 5,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("already the only voter"), "{e}");
        // In a joint configuration whose other half has more voters, there is something to do.
        let joint = Membership::new(
            vec![BTreeSet::from([1]), BTreeSet::from([1, 2, 3])],
            BTreeMap::from([(1, node(1)), (2, node(2)), (3, node(3))]),
        );
        d.logs.push(entry(5, 1, 4, EntryPayload::Membership(joint)));
        assert!(plan_force_new_cluster(&d, 1, node(1), "raft.redb").is_ok());
        let e =
            plan_force_new_cluster(&DiskState::default(), 1, node(1), "x/raft.redb").unwrap_err();
        assert!(matches!(e, ForceError::NoRaftState { .. }), "{e:?}");
        assert!(e.to_string().contains("x/raft.redb"), "{e}");
    }

    /// Through the real store: forced once, the store loads back with the new entry, the vote
    /// and the committed index; forced again, it is refused.
    #[test]
    fn forcing_writes_durably_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        assert!(matches!(
            force_new_cluster(&path, "c", 1, node(1)),
            Err(ForceError::NoRaftState { .. })
        ));
        assert!(!path.exists(), "a missing store is not created");
        {
            let mut disk = NodeDisk::open(&path).unwrap();
            let d = three_voters();
            disk.write(
                &[
                    WriteOp::SetClusterId("c".into()),
                    WriteOp::Vote(d.vote.unwrap()),
                    WriteOp::Committed(d.committed),
                    WriteOp::Append(d.logs),
                ],
                true,
            )
            .unwrap();
        }
        let e = force_new_cluster(&path, "other", 1, node(1)).unwrap_err();
        assert!(matches!(e, ForceError::OtherCluster { .. }), "{e:?}");
        let f = force_new_cluster(&path, "c", 1, node(1)).unwrap();
        let back = NodeDisk::open(&path).unwrap().load().unwrap();
        assert_eq!(back.logs.len(), 4);
        assert_eq!(back.logs[3].log_id, f.log_id);
        assert_eq!(back.vote, Some(Vote::new_committed(6, 1)));
        assert_eq!(back.committed, Some(f.log_id));
        let e = force_new_cluster(&path, "c", 1, node(1)).unwrap_err();
        assert!(matches!(e, ForceError::AlreadyOnlyVoter { .. }), "{e:?}");
    }
}
