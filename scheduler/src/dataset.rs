//! Datasets in the desired state: which node is each dataset's primary (its one writer), under
//! which epoch, which nodes keep replicas, the snapshots the primary took, and moves in progress.
//!
//! The node that carries a change out (takes the snapshot, streams the data) proposes the
//! command after the fact, with the epoch it acted under; [`ClusterState::apply`] refuses a
//! command from a stale epoch, so a node that lost its primaryship cannot record anything.
//!
//! A dataset's name on a node's backend is [`Dataset::local_name`], `NAME.ID`: a removed
//! dataset's leftovers on a node that was down never collide with a new dataset of that name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::retention::Retention;
use crate::state::{ApplyError, ClusterState, CommandResult, NodeId, NodeState};

/// A dataset's id: assigned at creation, never reused.
pub type DatasetId = u64;

pub use crate::limits::{MAX_DATASET_NAME_LEN, MAX_SNAPSHOT_NAME_LEN};

/// A dataset: a file system with snapshots that lives on one primary node at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub id: DatasetId,
    pub name: String,
    /// Bytes the dataset may hold, if limited.
    pub size_limit: Option<u64>,
    /// The node that holds the live copy; the only one that may write it.
    pub primary: NodeId,
    /// Grows by one every time the primary changes.
    pub epoch: u64,
    /// Nodes that keep a copy, pushed from the primary (never the primary itself).
    pub replicas: BTreeSet<NodeId>,
    /// Snapshots the primary took and recorded, oldest first.
    pub snapshots: Vec<SnapshotRecord>,
    /// A move to another node, while it runs.
    pub moving: Option<DatasetMove>,
    /// How many of its automatic snapshots are kept (`None`: [`Retention::default`]).
    pub retention: Option<Retention>,
    /// Per replica, the newest recorded snapshot it is known to hold: the base of the next
    /// incremental push to it, which no pruning may take away. A replica without an entry is
    /// not known to hold any, and while one is missing nothing of the dataset is pruned.
    pub bases: BTreeMap<NodeId, String>,
    /// Why the dataset's apps must not run now (a rollback in progress), if they must not.
    pub hold: Option<String>,
}

/// A snapshot that the primary took and recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// The backend's identifier of the snapshot's data: equal on every node that holds it.
    pub guid: u64,
    /// Seconds since the Unix epoch, on the primary's clock.
    pub created_unix: u64,
    /// The epoch it was taken under.
    pub epoch: u64,
}

/// A dataset move in progress: the primary streams the data to `to`, then commits.
///
/// A dataset an app uses moves in two phases: while `handoff` is false the app keeps running
/// on the primary and the primary streams snapshots to `to` (full, then incremental rounds);
/// then [`crate::Command::HandoffDatasetMove`] sets `handoff`, the app stops everywhere, the
/// primary streams the last delta and commits. The commit is refused before the handoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetMove {
    pub to: NodeId,
    pub handoff: bool,
}

impl Dataset {
    /// The dataset's name on every node's backend.
    pub fn local_name(&self) -> String {
        local_name(&self.name, self.id)
    }

    /// Every node that should hold a copy: the primary, the replicas and a move's target.
    pub fn holders(&self) -> BTreeSet<NodeId> {
        let mut h = self.replicas.clone();
        h.insert(self.primary);
        if let Some(m) = &self.moving {
            h.insert(m.to);
        }
        h
    }

    /// The newest recorded snapshot.
    pub fn latest_snapshot(&self) -> Option<&SnapshotRecord> {
        self.snapshots.last()
    }

    /// The retention policy in force.
    pub fn retention(&self) -> Retention {
        self.retention.unwrap_or_default()
    }

    /// Why recorded snapshot `name` may not be pruned now, if it may not: it is the newest, the
    /// base of a replica's next push, or a move is under way (its rounds push the snapshots).
    pub fn must_keep(&self, name: &str) -> Option<String> {
        if self.moving.is_some() {
            return Some(format!(
                "{} is moving; prune its snapshots once the move is done",
                self.name
            ));
        }
        if self.latest_snapshot().is_some_and(|s| s.name == name) {
            return Some(format!(
                "{name} is the newest snapshot of {}, which the next push starts from",
                self.name
            ));
        }
        if let Some(node) = self.bases.iter().find(|(_, b)| *b == name).map(|(n, _)| n) {
            return Some(format!(
                "{name} is the newest snapshot replica node {node} shares with the primary: the base of the next push to it"
            ));
        }
        None
    }
}

/// The backend name of dataset `name` with id `id`.
pub fn local_name(name: &str, id: DatasetId) -> String {
    format!("{name}.{id}")
}

/// The id in a backend name made by [`local_name`], if it is one.
pub fn parse_local_name(local: &str) -> Option<(&str, DatasetId)> {
    let (name, id) = local.rsplit_once('.')?;
    if name.is_empty() || id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, id.parse().ok()?))
}

/// The backend name of the copy where a node set aside the diverged writes of dataset `name`
/// with id `id`, kept as snapshot `snapshot` (`NAME.ID.diverged-EPOCH`).
pub fn aside_name(name: &str, id: DatasetId, snapshot: &str) -> String {
    format!("{}.{snapshot}", local_name(name, id))
}

/// The dataset name, id and kept snapshot in a backend name made by [`aside_name`], if it is
/// one.
pub fn parse_aside_name(local: &str) -> Option<(&str, DatasetId, &str)> {
    let (copy, snapshot) = local.rsplit_once('.')?;
    if !snapshot.starts_with(crate::failover::DIVERGED_PREFIX) {
        return None;
    }
    let (name, id) = parse_local_name(copy)?;
    Some((name, id, snapshot))
}

/// A dataset or snapshot name: ASCII letters, digits and `_ . : -`, starting with a letter or
/// digit (what both backends accept in paths and zfs names).
pub fn validate_dataset_name(name: &str) -> Result<(), ApplyError> {
    check_name(name, MAX_DATASET_NAME_LEN).map_err(|reason| ApplyError::InvalidDatasetName {
        name: name.to_string(),
        reason,
    })
}

/// See [`validate_dataset_name`].
pub fn validate_snapshot_name(name: &str) -> Result<(), ApplyError> {
    check_name(name, MAX_SNAPSHOT_NAME_LEN).map_err(|reason| ApplyError::InvalidSnapshotName {
        name: name.to_string(),
        reason,
    })
}

fn check_name(name: &str, max: usize) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("it is empty".into());
    };
    if name.len() > max {
        return Err(format!("it is longer than {max} bytes"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err("it must start with a letter or a digit".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(format!(
            "{bad:?} is not allowed (use letters, digits, '_', '.', ':' and '-')"
        ));
    }
    Ok(())
}

impl ClusterState {
    /// The dataset with this name.
    pub fn dataset_by_name(&self, name: &str) -> Option<&Dataset> {
        self.datasets.values().find(|d| d.name == name)
    }

    fn dataset_mut(&mut self, id: DatasetId) -> Result<&mut Dataset, ApplyError> {
        self.datasets
            .get_mut(&id)
            .ok_or(ApplyError::UnknownDataset { id })
    }

    pub(crate) fn usable_node(&self, id: NodeId) -> Result<(), ApplyError> {
        match self.nodes.get(&id) {
            None => Err(ApplyError::UnknownNode { id }),
            Some(n) if n.state == NodeState::Down => Err(ApplyError::NodeDown {
                name: n.name.clone(),
            }),
            Some(_) => Ok(()),
        }
    }

    pub(crate) fn create_dataset(
        &mut self,
        name: &str,
        primary: NodeId,
        size_limit: Option<u64>,
    ) -> Result<CommandResult, ApplyError> {
        validate_dataset_name(name)?;
        if self.dataset_by_name(name).is_some() {
            return Err(ApplyError::DatasetExists {
                name: name.to_string(),
            });
        }
        if size_limit == Some(0) {
            return Err(ApplyError::ZeroSizeLimit {
                name: name.to_string(),
            });
        }
        self.usable_node(primary)?;
        let id = self.next_dataset_id.max(1);
        self.next_dataset_id = id + 1;
        self.datasets.insert(
            id,
            Dataset {
                id,
                name: name.to_string(),
                size_limit,
                primary,
                epoch: 1,
                replicas: BTreeSet::new(),
                snapshots: Vec::new(),
                moving: None,
                retention: None,
                bases: BTreeMap::new(),
                hold: None,
            },
        );
        Ok(CommandResult::DatasetCreated { id })
    }

    pub(crate) fn record_snapshot(
        &mut self,
        id: DatasetId,
        epoch: u64,
        snapshot: &SnapshotRecord,
    ) -> Result<CommandResult, ApplyError> {
        validate_snapshot_name(&snapshot.name)?;
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        if ds.snapshots.iter().any(|s| s.name == snapshot.name) {
            return Err(ApplyError::SnapshotExists {
                dataset: ds.name.clone(),
                snapshot: snapshot.name.clone(),
            });
        }
        ds.snapshots.push(snapshot.clone());
        Ok(CommandResult::SnapshotRecorded)
    }

    pub(crate) fn rollback_dataset(
        &mut self,
        id: DatasetId,
        epoch: u64,
        to: &str,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        let Some(pos) = ds.snapshots.iter().position(|s| s.name == to) else {
            return Err(ApplyError::UnknownSnapshot {
                dataset: ds.name.clone(),
                snapshot: to.to_string(),
            });
        };
        let dropped = ds.snapshots.len() - pos - 1;
        ds.snapshots.truncate(pos + 1);
        Ok(CommandResult::RolledBack { dropped })
    }

    pub(crate) fn delete_dataset(&mut self, id: DatasetId) -> Result<CommandResult, ApplyError> {
        let ds = self
            .datasets
            .remove(&id)
            .ok_or(ApplyError::UnknownDataset { id })?;
        Ok(CommandResult::DatasetDeleted {
            holders: ds.holders().into_iter().collect(),
        })
    }

    pub(crate) fn begin_dataset_move(
        &mut self,
        id: DatasetId,
        to: NodeId,
    ) -> Result<CommandResult, ApplyError> {
        self.usable_node(to)?;
        // A copy a failover left there holds writes no other node has: a move's push would
        // roll them back.
        if self.failover.is_diverged(id, to) {
            return Err(ApplyError::DivergedCopy {
                dataset: self
                    .datasets
                    .get(&id)
                    .map_or_else(String::new, |d| d.name.clone()),
                node: self
                    .nodes
                    .get(&to)
                    .map_or_else(|| format!("#{to}"), |n| n.name.clone()),
            });
        }
        // Docker containers write it where it is: it moves once the last one unmounted.
        self.not_mounted(id)?;
        let ds = self.dataset_mut(id)?;
        if let Some(reason) = &ds.hold {
            return Err(ApplyError::DatasetHeld {
                dataset: ds.name.clone(),
                reason: reason.clone(),
            });
        }
        if ds.primary == to {
            return Err(ApplyError::AlreadyPrimary {
                dataset: ds.name.clone(),
            });
        }
        match &ds.moving {
            Some(m) if m.to == to => {}
            Some(m) => {
                return Err(ApplyError::MoveInProgress {
                    dataset: ds.name.clone(),
                    to: m.to,
                })
            }
            None => ds.moving = Some(DatasetMove { to, handoff: false }),
        }
        Ok(CommandResult::MoveBegun { epoch: ds.epoch })
    }

    pub(crate) fn commit_dataset_move(
        &mut self,
        id: DatasetId,
        epoch: u64,
        to: NodeId,
        snapshot: &str,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        if ds.moving.as_ref().map(|m| m.to) != Some(to) {
            return Err(ApplyError::NoSuchMove {
                dataset: ds.name.clone(),
                to,
            });
        }
        if ds.latest_snapshot().map(|s| s.name.as_str()) != Some(snapshot) {
            return Err(ApplyError::UnknownSnapshot {
                dataset: ds.name.clone(),
                snapshot: snapshot.to_string(),
            });
        }
        let old = ds.primary;
        ds.replicas.remove(&to);
        ds.replicas.insert(old);
        ds.primary = to;
        ds.epoch += 1;
        ds.moving = None;
        Ok(CommandResult::MoveCommitted { epoch: ds.epoch })
    }

    pub(crate) fn handoff_dataset_move(
        &mut self,
        id: DatasetId,
        epoch: u64,
        to: NodeId,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        match &mut ds.moving {
            Some(m) if m.to == to => {
                m.handoff = true;
                Ok(CommandResult::HandedOff)
            }
            _ => Err(ApplyError::NoSuchMove {
                dataset: ds.name.clone(),
                to,
            }),
        }
    }

    pub(crate) fn cancel_dataset_move(
        &mut self,
        id: DatasetId,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        let was = ds.moving.take().map(|m| m.to);
        Ok(CommandResult::MoveCancelled { to: was })
    }

    pub(crate) fn set_dataset_limit(
        &mut self,
        id: DatasetId,
        size_limit: Option<u64>,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        if size_limit == Some(0) {
            return Err(ApplyError::ZeroSizeLimit {
                name: ds.name.clone(),
            });
        }
        ds.size_limit = size_limit;
        Ok(CommandResult::DatasetLimitSet)
    }

    pub(crate) fn set_retention(
        &mut self,
        id: DatasetId,
        retention: Option<Retention>,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        if let Some(r) = &retention {
            r.validate()
                .map_err(|reason| ApplyError::InvalidRetention { reason })?;
        }
        ds.retention = retention;
        Ok(CommandResult::RetentionSet)
    }

    /// Forgets recorded snapshots: all of `names` or none.
    pub(crate) fn prune_snapshots(
        &mut self,
        id: DatasetId,
        epoch: u64,
        names: &[String],
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        let mut unique = BTreeSet::new();
        for name in names {
            if !unique.insert(name.as_str()) || !ds.snapshots.iter().any(|s| s.name == *name) {
                return Err(ApplyError::UnknownSnapshot {
                    dataset: ds.name.clone(),
                    snapshot: name.clone(),
                });
            }
            if let Some(reason) = ds.must_keep(name) {
                return Err(ApplyError::MustKeepSnapshot {
                    dataset: ds.name.clone(),
                    snapshot: name.clone(),
                    reason,
                });
            }
        }
        if let Some(node) = unconfirmed_replica(ds) {
            return Err(ApplyError::MustKeepSnapshot {
                dataset: ds.name.clone(),
                snapshot: names.first().cloned().unwrap_or_default(),
                reason: format!(
                    "replica node {node} has not confirmed which snapshot it holds (its next push records it); until then any snapshot may be its base"
                ),
            });
        }
        ds.snapshots.retain(|s| !unique.contains(s.name.as_str()));
        Ok(CommandResult::SnapshotsPruned {
            count: unique.len(),
        })
    }

    pub(crate) fn replica_holds(
        &mut self,
        id: DatasetId,
        epoch: u64,
        node: NodeId,
        snapshot: &str,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        if !ds.replicas.contains(&node) {
            return Err(ApplyError::NotAReplica {
                dataset: ds.name.clone(),
                node,
            });
        }
        if !ds.snapshots.iter().any(|s| s.name == snapshot) {
            return Err(ApplyError::UnknownSnapshot {
                dataset: ds.name.clone(),
                snapshot: snapshot.to_string(),
            });
        }
        // Entries of nodes that are no longer replicas (a former replica that became the
        // primary, a removed node) protect nothing any more.
        let replicas = ds.replicas.clone();
        ds.bases.retain(|n, _| replicas.contains(n));
        ds.bases.insert(node, snapshot.to_string());
        Ok(CommandResult::ReplicaRecorded)
    }

    pub(crate) fn hold_dataset(
        &mut self,
        id: DatasetId,
        epoch: u64,
        reason: &str,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        check_epoch(ds, epoch)?;
        if let Some(held) = &ds.hold {
            return Err(ApplyError::DatasetHeld {
                dataset: ds.name.clone(),
                reason: held.clone(),
            });
        }
        if let Some(m) = &ds.moving {
            return Err(ApplyError::MoveInProgress {
                dataset: ds.name.clone(),
                to: m.to,
            });
        }
        ds.hold = Some(reason.to_string());
        Ok(CommandResult::DatasetHeld)
    }

    pub(crate) fn release_dataset(&mut self, id: DatasetId) -> Result<CommandResult, ApplyError> {
        let ds = self.dataset_mut(id)?;
        Ok(CommandResult::DatasetReleased {
            was_held: ds.hold.take().is_some(),
        })
    }

    /// Forgets `node` as a replica or move target of every dataset (the node was removed).
    /// Datasets whose primary it was keep it: only a failover may give them another primary.
    pub(crate) fn forget_dataset_holder(&mut self, node: NodeId) {
        for ds in self.datasets.values_mut() {
            ds.replicas.remove(&node);
            if ds.moving.as_ref().is_some_and(|m| m.to == node) {
                ds.moving = None;
            }
        }
    }
}

/// A replica whose base is not known: no entry in `bases`, or one naming a snapshot that is no
/// longer recorded.
pub fn unconfirmed_replica(ds: &Dataset) -> Option<NodeId> {
    ds.replicas.iter().copied().find(|r| {
        ds.bases
            .get(r)
            .is_none_or(|b| !ds.snapshots.iter().any(|s| s.name == *b))
    })
}

fn check_epoch(ds: &Dataset, epoch: u64) -> Result<(), ApplyError> {
    if ds.epoch != epoch {
        return Err(ApplyError::StaleEpoch {
            dataset: ds.name.clone(),
            epoch,
            current: ds.epoch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::testutil::cluster;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn create(s: &mut ClusterState, name: &str, primary: NodeId) -> CommandResult {
        s.apply(&Command::CreateDataset {
            name: name.into(),
            primary,
            size_limit: None,
        })
    }

    fn snap(name: &str, epoch: u64) -> SnapshotRecord {
        SnapshotRecord {
            name: name.into(),
            guid: 7,
            created_unix: 0,
            epoch,
        }
    }

    fn rejected(r: &CommandResult) -> bool {
        matches!(r, CommandResult::Rejected(_))
    }

    #[test]
    fn local_names_round_trip() {
        assert_eq!(local_name("db.main", 12), "db.main.12");
        assert_eq!(parse_local_name("db.main.12"), Some(("db.main", 12)));
        assert_eq!(parse_local_name("db"), None);
        assert_eq!(parse_local_name("db.x1"), None);
        assert_eq!(parse_local_name(".3"), None);
        assert_eq!(
            aside_name("db.main", 12, "diverged-3"),
            "db.main.12.diverged-3"
        );
        assert_eq!(
            parse_aside_name("db.main.12.diverged-3"),
            Some(("db.main", 12, "diverged-3"))
        );
        // Neither is the other: a copy is not an aside, an aside is not a copy.
        assert_eq!(parse_aside_name("db.main.12"), None);
        assert_eq!(parse_local_name("db.main.12.diverged-3"), None);
        assert_eq!(parse_aside_name("db.diverged-3"), None);
    }

    #[test]
    fn create_validates_and_refuses_duplicates() {
        let mut s = cluster(2);
        assert_eq!(
            create(&mut s, "db", 2),
            CommandResult::DatasetCreated { id: 1 }
        );
        let before = s.clone();
        for (name, node) in [("db", 1), ("bad/name", 1), ("", 1), ("-x", 1), ("ok", 9)] {
            assert!(rejected(&create(&mut s, name, node)), "{name} on {node}");
        }
        let r = s.apply(&Command::CreateDataset {
            name: "zero".into(),
            primary: 1,
            size_limit: Some(0),
        });
        assert!(rejected(&r));
        assert_eq!(s, before);
        let ds = s.dataset_by_name("db").unwrap();
        assert_eq!(
            (ds.primary, ds.epoch, ds.local_name()),
            (2, 1, "db.1".into())
        );
    }

    #[test]
    fn delete_frees_the_name_but_never_the_id() {
        let mut s = cluster(1);
        create(&mut s, "db", 1);
        let r = s.apply(&Command::DeleteDataset { dataset: 1 });
        assert_eq!(r, CommandResult::DatasetDeleted { holders: vec![1] });
        assert_eq!(
            create(&mut s, "db", 1),
            CommandResult::DatasetCreated { id: 2 }
        );
        assert!(rejected(&s.apply(&Command::DeleteDataset { dataset: 1 })));
    }

    #[test]
    fn a_move_hands_the_dataset_over_under_a_new_epoch() {
        let mut s = cluster(3);
        create(&mut s, "db", 1);
        s.apply(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: snap("s1", 1),
        });
        assert_eq!(
            s.apply(&Command::BeginDatasetMove { dataset: 1, to: 3 }),
            CommandResult::MoveBegun { epoch: 1 }
        );
        // Another target while one move runs: refused; the same target: idempotent.
        assert!(rejected(
            &s.apply(&Command::BeginDatasetMove { dataset: 1, to: 2 })
        ));
        assert!(!rejected(
            &s.apply(&Command::BeginDatasetMove { dataset: 1, to: 3 })
        ));
        // Committing a snapshot that is not the newest recorded one is refused.
        let commit = |snapshot: &str, epoch| Command::CommitDatasetMove {
            dataset: 1,
            epoch,
            to: 3,
            snapshot: snapshot.into(),
        };
        assert!(rejected(&s.apply(&commit("s0", 1))));
        assert_eq!(
            s.apply(&commit("s1", 1)),
            CommandResult::MoveCommitted { epoch: 2 }
        );
        let ds = &s.datasets[&1];
        assert_eq!((ds.primary, ds.epoch, ds.moving.clone()), (3, 2, None));
        assert_eq!(ds.replicas, BTreeSet::from([1]));
        // The old primary can record nothing any more.
        let before = s.clone();
        let r = s.apply(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: snap("late", 1),
        });
        assert!(matches!(
            r,
            CommandResult::Rejected(ApplyError::StaleEpoch { current: 2, .. })
        ));
        assert!(rejected(&s.apply(&commit("s1", 1))));
        assert_eq!(s, before);
    }

    #[test]
    fn rollback_drops_later_snapshots() {
        let mut s = cluster(1);
        create(&mut s, "db", 1);
        for n in ["a", "b", "c"] {
            s.apply(&Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: snap(n, 1),
            });
        }
        let dup = s.apply(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: snap("b", 1),
        });
        assert!(rejected(&dup));
        let r = s.apply(&Command::RollbackDataset {
            dataset: 1,
            epoch: 1,
            to: "a".into(),
        });
        assert_eq!(r, CommandResult::RolledBack { dropped: 2 });
        assert_eq!(s.datasets[&1].snapshots.len(), 1);
    }

    #[test]
    fn a_primary_cannot_be_removed_but_a_replica_is_forgotten() {
        let mut s = cluster(3);
        create(&mut s, "db", 2);
        s.apply(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: snap("s", 1),
        });
        s.apply(&Command::BeginDatasetMove { dataset: 1, to: 3 });
        s.apply(&Command::CommitDatasetMove {
            dataset: 1,
            epoch: 1,
            to: 3,
            snapshot: "s".into(),
        });
        assert!(matches!(
            s.apply(&Command::RemoveNode { id: 3 }),
            CommandResult::Rejected(ApplyError::PrimaryOfDataset { .. })
        ));
        s.apply(&Command::RemoveNode { id: 2 });
        assert!(s.datasets[&1].replicas.is_empty());
    }

    /// db on n1 with snapshots a, b, c, d (epoch 1) and replica n2.
    fn with_replica() -> ClusterState {
        let mut s = cluster(2);
        create(&mut s, "db", 1);
        for n in ["a", "b", "c", "d"] {
            s.apply(&Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: snap(n, 1),
            });
        }
        s.datasets.get_mut(&1).unwrap().replicas.insert(2);
        s
    }

    fn prune(names: &[&str]) -> Command {
        Command::PruneSnapshots {
            dataset: 1,
            epoch: 1,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn holds(node: NodeId, snapshot: &str) -> Command {
        Command::ReplicaHolds {
            dataset: 1,
            epoch: 1,
            node,
            snapshot: snapshot.into(),
        }
    }

    fn must_keep(r: &CommandResult) -> String {
        match r {
            CommandResult::Rejected(e @ ApplyError::MustKeepSnapshot { .. }) => e.to_string(),
            other => panic!("expected MustKeepSnapshot, got {other:?}"),
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_each_replicas_base() {
        let mut s = with_replica();
        // The replica has not said what it holds: nothing may go.
        let e = must_keep(&s.apply(&prune(&["a"])));
        assert!(e.contains("has not confirmed"), "{e}");
        assert_eq!(s.apply(&holds(2, "b")), CommandResult::ReplicaRecorded);
        assert!(
            rejected(&s.apply(&holds(1, "b"))),
            "the primary is no replica"
        );
        assert!(rejected(&s.apply(&holds(2, "zz"))), "an unknown snapshot");
        let before = s.clone();
        let e = must_keep(&s.apply(&prune(&["a", "d"])));
        assert!(e.contains("newest"), "{e}");
        let e = must_keep(&s.apply(&prune(&["b"])));
        assert!(e.contains("base of the next push"), "{e}");
        assert!(rejected(&s.apply(&prune(&["a", "a"]))), "a duplicate");
        assert!(
            rejected(&s.apply(&prune(&["a", "nope"]))),
            "an unknown name"
        );
        let stale = Command::PruneSnapshots {
            dataset: 1,
            epoch: 0,
            names: vec!["a".into()],
        };
        assert!(rejected(&s.apply(&stale)));
        assert_eq!(s, before, "refusals change nothing");
        assert_eq!(
            s.apply(&prune(&["a", "c"])),
            CommandResult::SnapshotsPruned { count: 2 }
        );
        let names: Vec<&str> = s.datasets[&1]
            .snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["b", "d"]);
        // Nothing is pruned while the dataset moves.
        s.apply(&Command::BeginDatasetMove { dataset: 1, to: 2 });
        s.apply(&holds(2, "d"));
        let e = must_keep(&s.apply(&prune(&["b"])));
        assert!(e.contains("moving"), "{e}");
    }

    #[test]
    fn a_held_dataset_runs_no_app_and_does_not_move() {
        let mut s = with_replica();
        let hold = Command::HoldDataset {
            dataset: 1,
            epoch: 1,
            reason: "rollback to b".into(),
        };
        assert_eq!(s.apply(&hold), CommandResult::DatasetHeld);
        assert!(matches!(
            s.apply(&hold),
            CommandResult::Rejected(ApplyError::DatasetHeld { .. })
        ));
        assert!(matches!(
            s.apply(&Command::BeginDatasetMove { dataset: 1, to: 2 }),
            CommandResult::Rejected(ApplyError::DatasetHeld { .. })
        ));
        let app = crate::App {
            spec: crate::testutil::spec("db", None, true),
            pinned: None,
            node: 1,
            dataset: Some(1),
            vip: None,
            more: Vec::new(),
            health: Default::default(),
        };
        assert_eq!(s.app_runs_on(&app), None);
        assert_eq!(
            s.apply(&Command::ReleaseDataset { dataset: 1 }),
            CommandResult::DatasetReleased { was_held: true }
        );
        assert_eq!(s.app_runs_on(&app), Some(1));
        // A moving dataset cannot be held.
        s.apply(&Command::BeginDatasetMove { dataset: 1, to: 2 });
        assert!(rejected(&s.apply(&hold)));
    }

    #[test]
    fn limits_and_retention_are_set_and_checked() {
        let mut s = with_replica();
        let set = |l| Command::SetDatasetLimit {
            dataset: 1,
            size_limit: l,
        };
        assert_eq!(s.apply(&set(Some(5 << 20))), CommandResult::DatasetLimitSet);
        assert_eq!(s.datasets[&1].size_limit, Some(5 << 20));
        assert!(rejected(&s.apply(&set(Some(0)))));
        s.apply(&set(None));
        assert_eq!(s.datasets[&1].size_limit, None);
        let bad = crate::Retention {
            last: 0,
            hourly: 1,
            daily: 1,
        };
        assert!(rejected(&s.apply(&Command::SetRetention {
            dataset: 1,
            retention: Some(bad)
        })));
        let good: crate::Retention = "last=1,hourly=0,daily=0".parse().unwrap();
        s.apply(&Command::SetRetention {
            dataset: 1,
            retention: Some(good),
        });
        assert_eq!(s.datasets[&1].retention(), good);
    }

    fn dataset_command() -> impl Strategy<Value = Command> {
        let name = prop::sample::select(vec!["a", "b", "c"]);
        let snap_name = prop::sample::select(vec!["s1", "s2", "s3", "s4"]);
        prop_oneof![
            (name, 1..5u64).prop_map(|(n, p)| Command::CreateDataset {
                name: n.into(),
                primary: p,
                size_limit: None,
            }),
            (1..6u64, 0..4u64, snap_name.clone()).prop_map(|(d, e, n)| {
                Command::RecordSnapshot {
                    dataset: d,
                    epoch: e,
                    snapshot: snap(n, e),
                }
            }),
            (1..6u64, 0..4u64, snap_name.clone()).prop_map(|(d, e, n)| {
                Command::RollbackDataset {
                    dataset: d,
                    epoch: e,
                    to: n.into(),
                }
            }),
            (1..6u64).prop_map(|d| Command::DeleteDataset { dataset: d }),
            (1..6u64, 1..5u64).prop_map(|(d, to)| Command::BeginDatasetMove { dataset: d, to }),
            (1..6u64, 0..4u64, 1..5u64, snap_name.clone()).prop_map(|(d, e, to, n)| {
                Command::CommitDatasetMove {
                    dataset: d,
                    epoch: e,
                    to,
                    snapshot: n.into(),
                }
            }),
            (1..6u64).prop_map(|d| Command::CancelDatasetMove { dataset: d }),
            (2..5u64).prop_map(|id| Command::RemoveNode { id }),
            (1..6u64, 0..4u64, snap_name.clone(), snap_name.clone()).prop_map(|(d, e, a, b)| {
                Command::PruneSnapshots {
                    dataset: d,
                    epoch: e,
                    names: vec![a.into(), b.into()],
                }
            }),
            (1..6u64, 0..4u64, 1..5u64, snap_name.clone()).prop_map(|(d, e, node, n)| {
                Command::ReplicaHolds {
                    dataset: d,
                    epoch: e,
                    node,
                    snapshot: n.into(),
                }
            }),
        ]
    }

    proptest! {
        /// Over any sequence of dataset commands: names are unique, ids are never reused, a
        /// dataset's epoch never goes down and changes only with its primary, the primary is never
        /// its own replica, every holder is a member, and a rejected command changes nothing.
        #[test]
        fn one_writer_per_dataset(cmds in prop::collection::vec(dataset_command(), 0..80)) {
            let mut s = cluster(4);
            let mut seen: BTreeMap<DatasetId, (String, u64, NodeId)> = BTreeMap::new();
            for cmd in &cmds {
                let before = s.clone();
                let r = s.apply(cmd);
                if rejected(&r) {
                    prop_assert_eq!(&s, &before);
                    continue;
                }
                let mut names = BTreeSet::new();
                for ds in s.datasets.values() {
                    prop_assert!(names.insert(ds.name.clone()), "duplicate name {}", ds.name);
                    prop_assert!(!ds.replicas.contains(&ds.primary));
                    // The newest snapshot is never pruned: a prune shrinks the list but
                    // keeps its last element.
                    if let (Command::PruneSnapshots { dataset, .. }, Some(old)) =
                        (cmd, before.datasets.get(&ds.id))
                    {
                        if *dataset == ds.id {
                            prop_assert_eq!(old.latest_snapshot(), ds.latest_snapshot());
                        }
                    }
                    for h in ds.holders() {
                        prop_assert!(s.nodes.contains_key(&h), "holder {} is not a member", h);
                    }
                    match seen.get(&ds.id) {
                        Some((name, epoch, primary)) => {
                            prop_assert_eq!(name, &ds.name, "id {} reused", ds.id);
                            prop_assert!(ds.epoch >= *epoch);
                            prop_assert_eq!(ds.epoch != *epoch, ds.primary != *primary);
                        }
                        None => prop_assert!(ds.id >= seen.keys().next_back().map_or(1, |m| m + 1)),
                    }
                    seen.insert(ds.id, (ds.name.clone(), ds.epoch, ds.primary));
                }
            }
        }
    }
}
