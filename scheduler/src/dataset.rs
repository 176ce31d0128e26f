//! Datasets in the desired state: which node is each dataset's primary (its one writer), under
//! which epoch, which nodes keep replicas, the snapshots the primary took, and moves in progress.
//!
//! The node that carries a change out (takes the snapshot, streams the data) proposes the
//! command after the fact, with the epoch it acted under; [`ClusterState::apply`] refuses a
//! command from a stale epoch, so a node that lost its primaryship cannot record anything.
//!
//! A dataset's name on a node's backend is [`Dataset::local_name`], `NAME.ID`: a removed
//! dataset's leftovers on a node that was down never collide with a new dataset of that name.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

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
        // Docker containers write it where it is: it moves once the last one unmounted.
        self.not_mounted(id)?;
        let ds = self.dataset_mut(id)?;
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
            (1..6u64, 0..4u64, 1..5u64, snap_name).prop_map(|(d, e, to, n)| {
                Command::CommitDatasetMove {
                    dataset: d,
                    epoch: e,
                    to,
                    snapshot: n.into(),
                }
            }),
            (1..6u64).prop_map(|d| Command::CancelDatasetMove { dataset: d }),
            (2..5u64).prop_map(|id| Command::RemoveNode { id }),
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
