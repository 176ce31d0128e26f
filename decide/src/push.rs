//! Pushes of a dataset's snapshots from its primary to another holder (a replica, a move's
//! target): who may push ([`admit`]), what each step of a push does ([`plan_step`]), and what a
//! receiver refuses to destroy ([`guard_rollback`]).
//!
//! A push goes in steps, one snapshot a step: the receiver says what it holds, the sender
//! answers with a [`Plan`] (go back to the newest snapshot both hold, then receive the next one
//! of the sender's recorded history). Both sides decide from what they know at that step,
//! never from a list taken when the push began: another push (a move's) may have landed a
//! newer snapshot on the receiver meanwhile.
//!
//! The rule both sides keep: a push never rolls a receiver back past a snapshot recorded in
//! Raft (by guid). A copy holding snapshots nobody recorded after a recorded one (a former
//! primary's divergent writes, a stream's leftovers) may still go back to that recorded one.

use flock_scheduler::{ClusterState, Dataset, DatasetId, NodeId};

/// A snapshot a copy holds, as its backend lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeldSnapshot {
    pub name: String,
    /// The backend's identifier of the snapshot's data: equal on every node that holds it.
    pub guid: u64,
}

impl HeldSnapshot {
    /// `name` with `guid`.
    pub fn new(name: impl Into<String>, guid: u64) -> Self {
        HeldSnapshot {
            name: name.into(),
            guid,
        }
    }
}

/// What one step of a push has the receiver do: go back to `base` (destroy its copy when
/// `None`), then receive `target` if set (incremental from `base`, or full). Both `None`:
/// nothing, the receiver keeps everything as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub base: Option<String>,
    pub target: Option<String>,
}

impl Plan {
    /// The plan that leaves the receiver as it is.
    pub const NOTHING: Plan = Plan {
        base: None,
        target: None,
    };

    /// Whether the receiver keeps everything as it is.
    pub fn is_nothing(&self) -> bool {
        self.base.is_none() && self.target.is_none()
    }
}

/// Why a receiver does not take a push from a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node does not know dataset {name} (id {id}): removed, or not caught up yet")]
    UnknownDataset { id: DatasetId, name: String },
    #[error("dataset {id} is {actual:?}, not {pushed:?}")]
    OtherName {
        id: DatasetId,
        actual: String,
        pushed: String,
    },
    #[error("dataset {name} is at epoch {epoch} with primary node {primary} here; the push came from node {peer} under epoch {pushed_epoch} (retry once both agree)")]
    NotThePrimary {
        name: String,
        epoch: u64,
        primary: NodeId,
        peer: NodeId,
        pushed_epoch: u64,
    },
    #[error("this node is the primary of {name}")]
    OwnPrimary { name: String },
    #[error("this node is neither a replica nor a move target of {name}")]
    NotAHolder { name: String },
}

/// Whether `peer` may push dataset `id` (named `name`, under `epoch`) to node `me` in `state`;
/// the dataset's record if so. Only the current primary pushes, under the current epoch, only
/// to a node that should hold a copy, and never onto the primary's own copy.
pub fn admit<'s>(
    state: &'s ClusterState,
    me: NodeId,
    peer: NodeId,
    id: DatasetId,
    name: &str,
    epoch: u64,
) -> Result<&'s Dataset, Refusal> {
    let Some(ds) = state.datasets.get(&id) else {
        return Err(Refusal::UnknownDataset {
            id,
            name: name.to_string(),
        });
    };
    if ds.name != name {
        return Err(Refusal::OtherName {
            id,
            actual: ds.name.clone(),
            pushed: name.to_string(),
        });
    }
    if ds.epoch != epoch || ds.primary != peer {
        return Err(Refusal::NotThePrimary {
            name: name.to_string(),
            epoch: ds.epoch,
            primary: ds.primary,
            peer,
            pushed_epoch: epoch,
        });
    }
    if ds.primary == me {
        return Err(Refusal::OwnPrimary {
            name: name.to_string(),
        });
    }
    if !ds.holders().contains(&me) {
        return Err(Refusal::NotAHolder {
            name: name.to_string(),
        });
    }
    Ok(ds)
}

/// Why a plan may not be carried out on a receiver.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RollbackRefused {
    #[error("the push would roll the receiving copy of {dataset} back past snapshot {snapshot} (guid {guid}), which is recorded in Raft; refused, so that no recorded snapshot is lost (the sender retries from what both hold then)")]
    Recorded {
        dataset: String,
        snapshot: String,
        guid: u64,
    },
    #[error("the push would roll the receiving copy of {dataset} back to snapshot {base}, which that copy does not hold; refused")]
    BaseNotHeld { dataset: String, base: String },
}

/// Whether a receiver holding `held` (oldest first) may carry `plan` out for dataset `ds`, as
/// the latest applied state records it: never when going back to the plan's base (or
/// destroying the copy, for a full stream) would destroy a snapshot whose guid `ds` records.
pub fn guard_rollback(
    ds: &Dataset,
    held: &[HeldSnapshot],
    plan: &Plan,
) -> Result<(), RollbackRefused> {
    if plan.is_nothing() {
        return Ok(());
    }
    let lost = match &plan.base {
        Some(base) => match held.iter().rposition(|h| &h.name == base) {
            Some(i) => &held[i + 1..],
            None => {
                return Err(RollbackRefused::BaseNotHeld {
                    dataset: ds.name.clone(),
                    base: base.clone(),
                })
            }
        },
        None => held,
    };
    match lost
        .iter()
        .find(|h| ds.snapshots.iter().any(|r| r.guid == h.guid))
    {
        Some(h) => Err(RollbackRefused::Recorded {
            dataset: ds.name.clone(),
            snapshot: h.name.clone(),
            guid: h.guid,
        }),
        None => Ok(()),
    }
}

/// Why the sender cannot plan a step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("this node holds no snapshot {target} of {dataset} to push")]
    TargetMissing { dataset: String, target: String },
    #[error("{0}")]
    Unsafe(RollbackRefused),
}

/// The sender's plan for one step of pushing snapshot `target` of `ds`, from what it holds now
/// (`ours`, oldest first), what the receiver holds now (`theirs`) and the records of `ds` now.
///
/// The receiver should end with the sender's history up to `target`: the step sends
/// the next snapshot of that history after the newest one both hold (same name and guid), or
/// nothing once the receiver holds `target`. A receiver holding a snapshot of the sender's
/// after `target` is ahead of this push (a later push, such as a move's, got there first): it
/// is left alone. Any other plan that would roll the receiver back past a recorded snapshot is
/// refused ([`guard_rollback`], the check the receiver makes too).
pub fn plan_step(
    ds: &Dataset,
    ours: &[HeldSnapshot],
    target: &str,
    theirs: &[HeldSnapshot],
) -> Result<Plan, PlanError> {
    let Some(idx) = ours.iter().position(|s| s.name == target) else {
        return Err(PlanError::TargetMissing {
            dataset: ds.name.clone(),
            target: target.to_string(),
        });
    };
    let later = &ours[idx + 1..];
    if theirs.iter().any(|t| later.contains(t)) {
        return Ok(Plan::NOTHING);
    }
    // The primary's whole history up to the target, not only what this node has applied the
    // records of: a snapshot recorded by a concurrent move attempt whose record this node has
    // not applied yet would otherwise be skipped, and the receiver, once it holds a later one,
    // could never get it (a hole: a recorded snapshot missing on the next primary; found by
    // flock-sim). Every snapshot a primary holds is of its own history: a copy's strays from
    // an older epoch were rolled back when it became a replica.
    let chain: Vec<&HeldSnapshot> = ours[..=idx].iter().collect();
    let common = chain.iter().rposition(|s| theirs.contains(s));
    let next = match common {
        None => Some(0),
        Some(c) if c == chain.len() - 1 => None,
        Some(c) => Some(c + 1),
    };
    let plan = Plan {
        base: common.map(|c| chain[c].name.clone()),
        target: next.map(|n| chain[n].name.clone()),
    };
    guard_rollback(ds, theirs, &plan).map_err(PlanError::Unsafe)?;
    Ok(plan)
}

/// The record a push's step plans from: `now`, the dataset as the latest applied state has it,
/// with the records the pusher knew when it started (`pushed`) that `now` lacks, as long as both
/// are the same epoch; `pushed` when the state moved to another epoch or dropped the dataset
/// (the receiver then refuses the push, which ends it).
///
/// Why merge: a primary that is not the leader records a snapshot through the leader and
/// pushes it at once; its own state may apply that record a moment later. More records only
/// make a plan more careful (the rollback guard protects more, the chain only ever holds
/// snapshots the sender lists).
pub fn step_record(now: Option<&Dataset>, pushed: &Dataset) -> Dataset {
    match now {
        Some(now) if now.epoch == pushed.epoch => {
            let mut ds = now.clone();
            for r in &pushed.snapshots {
                if !ds.snapshots.iter().any(|s| s.guid == r.guid) {
                    ds.snapshots.push(r.clone());
                }
            }
            ds
        }
        _ => pushed.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::{DatasetMove, SnapshotRecord};
    use std::collections::BTreeSet;

    fn held(list: &[(&str, u64)]) -> Vec<HeldSnapshot> {
        list.iter()
            .map(|(n, g)| HeldSnapshot::new(*n, *g))
            .collect()
    }

    /// Dataset 7, "db", primary 1 at epoch 3, replica 2, with these snapshots recorded.
    fn dataset(recorded: &[(&str, u64)]) -> Dataset {
        Dataset {
            id: 7,
            name: "db".into(),
            size_limit: None,
            primary: 1,
            epoch: 3,
            replicas: BTreeSet::from([2]),
            snapshots: recorded
                .iter()
                .map(|(n, g)| SnapshotRecord {
                    name: n.to_string(),
                    guid: *g,
                    created_unix: 0,
                    epoch: 3,
                })
                .collect(),
            moving: None,
            retention: None,
            bases: Default::default(),
            hold: None,
        }
    }

    fn plan(base: Option<&str>, target: Option<&str>) -> Plan {
        Plan {
            base: base.map(str::to_string),
            target: target.map(str::to_string),
        }
    }

    #[test]
    fn sends_the_next_snapshot_after_the_newest_common_one() {
        let ds = dataset(&[("s1", 1), ("s2", 2), ("s3", 3)]);
        // x: taken here, its record not applied here (a concurrent move attempt's): it is
        // part of the history the push carries, or the receiver would miss it for good once it
        // holds s2 (flock-sim seed 228 found that hole).
        let ours = held(&[("s1", 1), ("x", 9), ("s2", 2), ("s3", 3)]);
        let step = |theirs: &[(&str, u64)]| plan_step(&ds, &ours, "s3", &held(theirs));
        assert_eq!(step(&[]), Ok(plan(None, Some("s1"))));
        assert_eq!(step(&[("s1", 1)]), Ok(plan(Some("s1"), Some("x"))));
        assert_eq!(
            step(&[("s1", 1), ("x", 9)]),
            Ok(plan(Some("x"), Some("s2")))
        );
        assert_eq!(
            step(&[("s1", 1), ("s2", 2)]),
            Ok(plan(Some("s2"), Some("s3")))
        );
        assert_eq!(
            step(&[("s1", 1), ("s2", 2), ("s3", 3)]),
            Ok(plan(Some("s3"), None))
        );
    }

    #[test]
    fn the_target_counts_before_its_record_is_applied() {
        // The move recorded m3 through the leader; this node has not applied the record yet.
        let ds = dataset(&[("s1", 1)]);
        let ours = held(&[("s1", 1), ("m3", 3)]);
        assert_eq!(
            plan_step(&ds, &ours, "m3", &held(&[("s1", 1)])),
            Ok(plan(Some("s1"), Some("m3")))
        );
        assert_eq!(
            plan_step(&ds, &ours, "m4", &held(&[])),
            Err(PlanError::TargetMissing {
                dataset: "db".into(),
                target: "m4".into()
            })
        );
    }

    #[test]
    fn a_copy_that_diverged_goes_back_to_the_newest_recorded_common_snapshot() {
        let ds = dataset(&[("s1", 1), ("s2", 2)]);
        let ours = held(&[("s1", 1), ("s2", 2)]);
        // s2 with another guid, and x: a former primary's snapshots nobody recorded.
        let theirs = held(&[("s1", 1), ("s2", 9), ("x", 10)]);
        assert_eq!(
            plan_step(&ds, &ours, "s2", &theirs),
            Ok(plan(Some("s1"), Some("s2")))
        );
        // A stray after the target: back to the target, nothing to send.
        let theirs = held(&[("s1", 1), ("s2", 2), ("x", 10)]);
        assert_eq!(
            plan_step(&ds, &ours, "s2", &theirs),
            Ok(plan(Some("s2"), None))
        );
        // Nothing in common, nothing recorded there: the copy goes, a full stream comes.
        assert_eq!(
            plan_step(&ds, &ours, "s2", &held(&[("x", 10)])),
            Ok(plan(None, Some("s1")))
        );
    }

    /// Issue 15's bug: a replica push of s2 began; a move's push then landed m3 (recorded) on
    /// the same node. The replica push's next step must not take the receiver back to s2.
    #[test]
    fn a_receiver_holding_a_recorded_snapshot_newer_than_the_target_is_never_rolled_back() {
        let theirs = held(&[("s1", 1), ("s2", 2), ("m3", 3)]);
        // The step plans from what the sender lists now (m3 included): the receiver is ahead.
        let ds = dataset(&[("s1", 1), ("s2", 2), ("m3", 3)]);
        let ours = held(&[("s1", 1), ("s2", 2), ("m3", 3)]);
        assert_eq!(plan_step(&ds, &ours, "s2", &theirs), Ok(Plan::NOTHING));
        // Even from the list the push began with (no m3), the record of m3 forbids the
        // rollback: the step fails, the receiver keeps m3.
        let stale = held(&[("s1", 1), ("s2", 2)]);
        let refused = RollbackRefused::Recorded {
            dataset: "db".into(),
            snapshot: "m3".into(),
            guid: 3,
        };
        assert_eq!(
            plan_step(&ds, &stale, "s2", &theirs),
            Err(PlanError::Unsafe(refused.clone()))
        );
        // And the receiver refuses the plan the previous build's sender made there.
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(Some("s2"), None)),
            Err(refused.clone())
        );
        assert!(matches!(
            guard_rollback(&ds, &theirs, &plan(Some("s1"), Some("s2"))),
            Err(RollbackRefused::Recorded { guid: 2, .. })
        ));
        // Without the record (nobody recorded m3), m3 is a stray and goes.
        let unrecorded = dataset(&[("s1", 1), ("s2", 2)]);
        assert_eq!(
            plan_step(&unrecorded, &stale, "s2", &theirs),
            Ok(plan(Some("s2"), None))
        );
    }

    #[test]
    fn the_guard_protects_recorded_snapshots_by_guid_and_lets_strays_go() {
        let ds = dataset(&[("s1", 1), ("s2", 2)]);
        let theirs = held(&[("s1", 1), ("s2", 2), ("x", 10), ("y", 11)]);
        assert_eq!(guard_rollback(&ds, &theirs, &Plan::NOTHING), Ok(()));
        // Back to a recorded base past strays only.
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(Some("s2"), None)),
            Ok(())
        );
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(Some("x"), Some("z"))),
            Ok(())
        );
        // Back past s2, or destroying the copy for a full stream: refused.
        let past_s2 = Err(RollbackRefused::Recorded {
            dataset: "db".into(),
            snapshot: "s2".into(),
            guid: 2,
        });
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(Some("s1"), Some("s2"))),
            past_s2
        );
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(None, Some("s1"))),
            Err(RollbackRefused::Recorded {
                dataset: "db".into(),
                snapshot: "s1".into(),
                guid: 1,
            })
        );
        // The guid decides, whatever the name: a recorded snapshot received under another name.
        let renamed = held(&[("s1", 1), ("other", 2)]);
        assert!(guard_rollback(&ds, &renamed, &plan(Some("s1"), None)).is_err());
        // A base the receiver does not hold: refused, not guessed.
        assert_eq!(
            guard_rollback(&ds, &theirs, &plan(Some("nope"), Some("s3"))),
            Err(RollbackRefused::BaseNotHeld {
                dataset: "db".into(),
                base: "nope".into()
            })
        );
        // An empty copy, or none: a full stream destroys nothing recorded.
        assert_eq!(guard_rollback(&ds, &[], &plan(None, Some("s1"))), Ok(()));
    }

    #[test]
    fn a_rollback_the_primary_recorded_lets_the_replicas_follow() {
        // The primary went back to s1 and recorded it (s2 dropped from the records).
        let ds = dataset(&[("s1", 1)]);
        let theirs = held(&[("s1", 1), ("s2", 2)]);
        let ours = held(&[("s1", 1)]);
        assert_eq!(
            plan_step(&ds, &ours, "s1", &theirs),
            Ok(plan(Some("s1"), None))
        );
        // Until the receiver applies that record, it refuses (and the sender retries).
        let before = dataset(&[("s1", 1), ("s2", 2)]);
        assert!(guard_rollback(&before, &theirs, &plan(Some("s1"), None)).is_err());
    }

    #[test]
    fn only_the_current_primary_pushes_and_only_to_a_holder() {
        let mut state = ClusterState::default();
        let mut ds = dataset(&[]);
        ds.moving = Some(DatasetMove {
            to: 3,
            handoff: false,
        });
        state.datasets.insert(7, ds);
        assert_eq!(admit(&state, 2, 1, 7, "db", 3).map(|d| d.id), Ok(7));
        // The move's target holds it too.
        assert!(admit(&state, 3, 1, 7, "db", 3).is_ok());
        assert_eq!(
            admit(&state, 2, 1, 8, "db", 3),
            Err(Refusal::UnknownDataset {
                id: 8,
                name: "db".into()
            })
        );
        assert!(matches!(
            admit(&state, 2, 1, 7, "web", 3),
            Err(Refusal::OtherName { .. })
        ));
        for (peer, epoch) in [(1, 2), (1, 4), (3, 3)] {
            assert!(matches!(
                admit(&state, 2, peer, 7, "db", epoch),
                Err(Refusal::NotThePrimary { .. })
            ));
        }
        assert_eq!(
            admit(&state, 1, 1, 7, "db", 3),
            Err(Refusal::OwnPrimary { name: "db".into() })
        );
        assert_eq!(
            admit(&state, 4, 1, 7, "db", 3),
            Err(Refusal::NotAHolder { name: "db".into() })
        );
        // The messages the previous build sent on the wire, unchanged.
        assert_eq!(
            admit(&state, 2, 3, 7, "db", 3).unwrap_err().to_string(),
            "dataset db is at epoch 3 with primary node 1 here; the push came from node 3 under epoch 3 (retry once both agree)"
        );
    }

    #[test]
    fn a_step_plans_from_the_latest_records_of_the_same_epoch() {
        let pushed = dataset(&[("s1", 1), ("m2", 2)]);
        // The state has applied m3's record but not yet m2's (recorded through the leader).
        let now = dataset(&[("s1", 1), ("m3", 3)]);
        let merged = step_record(Some(&now), &pushed);
        let guids: Vec<u64> = merged.snapshots.iter().map(|s| s.guid).collect();
        assert_eq!(guids, [1, 3, 2]);
        // Another epoch, or no dataset: the pushed record (the receiver refuses the push).
        let mut moved = now.clone();
        moved.epoch = 4;
        assert_eq!(step_record(Some(&moved), &pushed), pushed);
        assert_eq!(step_record(None, &pushed), pushed);
    }
}
