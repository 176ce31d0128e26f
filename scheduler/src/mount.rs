//! Docker volume mounts of datasets: which Docker containers (by the mount `ID` Docker sends)
//! have a dataset mounted on which node, replicated so every node knows where a volume is in
//! use.
//!
//! The rule that keeps one writer per dataset: a dataset is mounted only on its primary, and
//! only while no move of it is under way. [`Command::MountVolume`] is refused elsewhere (the
//! plugin moves the dataset to the node first, then records the mount), and a move, a delete or
//! a deploy that would take the dataset is refused while any mount is recorded. The dataset is
//! free to move again once the last container using it has unmounted.
//!
//! A node that dies with mounts recorded keeps them (its containers may still run: only a
//! missed heartbeat says otherwise). When its flockd starts again it unmounts, with
//! [`Command::UnmountVolume`], the volumes no running container of its engine uses; for a node
//! that does not come back, the operator drops them with [`Command::ForgetMounts`] (`flockctl
//! dataset unmount NAME --force`) once the containers are known to be gone. A node removed from
//! the cluster loses its mounts with it.
//!
//! [`Command::MountVolume`]: crate::Command::MountVolume
//! [`Command::ForgetMounts`]: crate::Command::ForgetMounts
//! [`Command::UnmountVolume`]: crate::Command::UnmountVolume

use std::collections::{BTreeMap, BTreeSet};

use crate::config::PlannedApp;
use crate::dataset::DatasetId;
use crate::state::{ApplyError, ClusterState, CommandResult, NodeId};

/// The longest mount id accepted, in bytes (Docker's are 64 hex digits).
pub use crate::limits::MAX_MOUNT_ID_LEN;

/// The mounts of one dataset: (node, Docker's mount id).
pub type Mounts = BTreeSet<(NodeId, String)>;

impl ClusterState {
    /// The recorded mounts of dataset `id`.
    pub fn mounts_of(&self, id: DatasetId) -> impl Iterator<Item = &(NodeId, String)> {
        self.mounts.get(&id).into_iter().flatten()
    }

    /// The node where dataset `id` is mounted, if anywhere, with how many mounts it has there.
    pub fn mounted_on(&self, id: DatasetId) -> Option<(NodeId, usize)> {
        let mut by_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (node, _) in self.mounts_of(id) {
            *by_node.entry(*node).or_default() += 1;
        }
        by_node.into_iter().next()
    }

    pub(crate) fn node_label(&self, id: NodeId) -> String {
        self.nodes
            .get(&id)
            .map_or_else(|| format!("node-{id}"), |n| n.name.clone())
    }

    /// Refuses a change that would take dataset `id` away from where it is mounted.
    pub(crate) fn not_mounted(&self, id: DatasetId) -> Result<(), ApplyError> {
        match (self.mounted_on(id), self.datasets.get(&id)) {
            (Some((node, containers)), Some(ds)) => Err(ApplyError::VolumeMounted {
                dataset: ds.name.clone(),
                node: self.node_label(node),
                containers,
            }),
            _ => Ok(()),
        }
    }

    /// Refuses a deploy whose apps would take a dataset that Docker containers have mounted.
    pub(crate) fn deploy_not_mounted(
        &self,
        apps: &BTreeMap<String, PlannedApp>,
    ) -> Result<(), ApplyError> {
        for name in apps.values().filter_map(|a| a.spec.dataset_name()) {
            if let Some(ds) = self.dataset_by_name(name) {
                self.not_mounted(ds.id)?;
            }
        }
        Ok(())
    }

    pub(crate) fn mount_volume(
        &mut self,
        id: DatasetId,
        node: NodeId,
        mount_id: &str,
    ) -> Result<CommandResult, ApplyError> {
        if mount_id.is_empty() || mount_id.len() > MAX_MOUNT_ID_LEN {
            return Err(ApplyError::InvalidMountId {
                id: mount_id.chars().take(MAX_MOUNT_ID_LEN).collect(),
            });
        }
        self.usable_node(node)?;
        let ds = self
            .datasets
            .get(&id)
            .ok_or(ApplyError::UnknownDataset { id })?;
        if let Some((app, _)) = self.apps_of_dataset(id).next() {
            return Err(ApplyError::DatasetInUse {
                dataset: ds.name.clone(),
                app: app.clone(),
            });
        }
        // Mounts are only ever on one node, the primary.
        if let Some((other, containers)) = self.mounted_on(id).filter(|(n, _)| *n != node) {
            return Err(ApplyError::VolumeMounted {
                dataset: ds.name.clone(),
                node: self.node_label(other),
                containers,
            });
        }
        if ds.primary != node {
            return Err(ApplyError::NotOnNode {
                dataset: ds.name.clone(),
                node: self.node_label(node),
                primary: self.node_label(ds.primary),
            });
        }
        if let Some(m) = &ds.moving {
            return Err(ApplyError::VolumeMoving {
                dataset: ds.name.clone(),
                to: self.node_label(m.to),
            });
        }
        let mounts = self.mounts.entry(id).or_default();
        mounts.insert((node, mount_id.to_string()));
        let here = mounts.iter().filter(|(n, _)| *n == node).count();
        Ok(CommandResult::VolumeMounted { mounts: here })
    }

    /// Drops one mount. Unknown datasets and mounts are fine: Docker may repeat an unmount.
    pub(crate) fn unmount_volume(&mut self, id: DatasetId, node: NodeId, mount_id: &str) -> usize {
        let Some(mounts) = self.mounts.get_mut(&id) else {
            return 0;
        };
        mounts.remove(&(node, mount_id.to_string()));
        let left = mounts.iter().filter(|(n, _)| *n == node).count();
        if mounts.is_empty() {
            self.mounts.remove(&id);
        }
        left
    }

    /// Drops the mounts of dataset `id` (on `node` only, if given); how many it dropped.
    pub(crate) fn forget_mounts(
        &mut self,
        id: DatasetId,
        node: Option<NodeId>,
    ) -> Result<CommandResult, ApplyError> {
        if !self.datasets.contains_key(&id) {
            return Err(ApplyError::UnknownDataset { id });
        }
        let Some(mounts) = self.mounts.get_mut(&id) else {
            return Ok(CommandResult::MountsForgotten { dropped: 0 });
        };
        let before = mounts.len();
        mounts.retain(|(n, _)| node.is_some_and(|only| *n != only));
        let dropped = before - mounts.len();
        if mounts.is_empty() {
            self.mounts.remove(&id);
        }
        Ok(CommandResult::MountsForgotten { dropped })
    }

    /// Forgets the mounts of a removed node and of datasets that no longer exist.
    pub(crate) fn prune_mounts(&mut self, removed: Option<NodeId>) {
        let datasets = &self.datasets;
        self.mounts.retain(|id, mounts| {
            mounts.retain(|(n, _)| Some(*n) != removed);
            datasets.contains_key(id) && !mounts.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use proptest::prelude::*;

    fn cluster(nodes: u64) -> ClusterState {
        let mut s = crate::testutil::cluster(nodes);
        for name in ["demo", "other"] {
            s.apply(&Command::CreateDataset {
                name: name.into(),
                primary: 1,
                size_limit: None,
            });
        }
        s
    }

    fn mount(s: &mut ClusterState, dataset: DatasetId, node: NodeId, id: &str) -> CommandResult {
        s.apply(&Command::MountVolume {
            dataset,
            node,
            id: id.into(),
        })
    }

    fn unmount(s: &mut ClusterState, dataset: DatasetId, node: NodeId, id: &str) -> CommandResult {
        s.apply(&Command::UnmountVolume {
            dataset,
            node,
            id: id.into(),
        })
    }

    fn move_to(s: &mut ClusterState, dataset: DatasetId, to: NodeId) -> CommandResult {
        s.apply(&Command::BeginDatasetMove { dataset, to })
    }

    fn rejected(r: &CommandResult) -> Option<&ApplyError> {
        match r {
            CommandResult::Rejected(e) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn mounts_count_per_node_and_last_unmount_frees_the_move() {
        let mut s = cluster(2);
        assert_eq!(
            mount(&mut s, 1, 1, "a"),
            CommandResult::VolumeMounted { mounts: 1 }
        );
        // The same id again changes nothing.
        assert_eq!(
            mount(&mut s, 1, 1, "a"),
            CommandResult::VolumeMounted { mounts: 1 }
        );
        assert_eq!(
            mount(&mut s, 1, 1, "b"),
            CommandResult::VolumeMounted { mounts: 2 }
        );
        assert_eq!(s.mounted_on(1), Some((1, 2)));
        let r = move_to(&mut s, 1, 2);
        assert_eq!(
            rejected(&r),
            Some(&ApplyError::VolumeMounted {
                dataset: "demo".into(),
                node: "n1".into(),
                containers: 2
            })
        );
        assert!(rejected(&s.apply(&Command::DeleteDataset { dataset: 1 })).is_some());
        assert_eq!(
            unmount(&mut s, 1, 1, "a"),
            CommandResult::VolumeUnmounted { mounts: 1 }
        );
        assert!(rejected(&move_to(&mut s, 1, 2)).is_some());
        // An unknown id, or one from another node, is no mount of this node's.
        assert_eq!(
            unmount(&mut s, 1, 2, "b"),
            CommandResult::VolumeUnmounted { mounts: 0 }
        );
        assert_eq!(s.mounted_on(1), Some((1, 1)));
        assert_eq!(
            unmount(&mut s, 1, 1, "b"),
            CommandResult::VolumeUnmounted { mounts: 0 }
        );
        assert!(s.mounts.is_empty());
        assert_eq!(move_to(&mut s, 1, 2), CommandResult::MoveBegun { epoch: 1 });
    }

    #[test]
    fn a_mount_elsewhere_than_the_primary_or_during_a_move_is_refused() {
        let mut s = cluster(3);
        let before = s.clone();
        let r = mount(&mut s, 1, 2, "a");
        assert_eq!(
            rejected(&r),
            Some(&ApplyError::NotOnNode {
                dataset: "demo".into(),
                node: "n2".into(),
                primary: "n1".into()
            })
        );
        assert!(matches!(
            rejected(&mount(&mut s, 9, 1, "a")),
            Some(ApplyError::UnknownDataset { id: 9 })
        ));
        assert!(matches!(
            rejected(&mount(&mut s, 1, 1, "")),
            Some(ApplyError::InvalidMountId { .. })
        ));
        assert_eq!(s, before);
        move_to(&mut s, 1, 2);
        assert_eq!(
            rejected(&mount(&mut s, 1, 1, "a")),
            Some(&ApplyError::VolumeMoving {
                dataset: "demo".into(),
                to: "n2".into()
            })
        );
        // Mounted on n2 after the move: n1 and n3 are refused, naming n2.
        s.apply(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: crate::SnapshotRecord {
                name: "s1".into(),
                guid: 1,
                created_unix: 0,
                epoch: 1,
            },
        });
        s.apply(&Command::CommitDatasetMove {
            dataset: 1,
            epoch: 1,
            to: 2,
            snapshot: "s1".into(),
        });
        assert_eq!(
            mount(&mut s, 1, 2, "x"),
            CommandResult::VolumeMounted { mounts: 1 }
        );
        for node in [1, 3] {
            assert_eq!(
                rejected(&mount(&mut s, 1, node, "y")),
                Some(&ApplyError::VolumeMounted {
                    dataset: "demo".into(),
                    node: "n2".into(),
                    containers: 1
                })
            );
        }
    }

    #[test]
    fn forget_mounts_and_node_removal_drop_them() {
        let mut s = cluster(2);
        mount(&mut s, 1, 1, "a");
        mount(&mut s, 2, 1, "b");
        assert_eq!(
            s.apply(&Command::ForgetMounts {
                dataset: 1,
                node: Some(2)
            }),
            CommandResult::MountsForgotten { dropped: 0 }
        );
        assert_eq!(
            s.apply(&Command::ForgetMounts {
                dataset: 1,
                node: None
            }),
            CommandResult::MountsForgotten { dropped: 1 }
        );
        assert_eq!(s.mounted_on(1), None);
        assert!(rejected(&s.apply(&Command::ForgetMounts {
            dataset: 7,
            node: None
        }))
        .is_some());
        s.prune_mounts(Some(1));
        assert!(s.mounts.is_empty());
    }

    #[test]
    fn an_app_dataset_cannot_be_mounted_nor_a_mounted_one_deployed() {
        let mut s = cluster(2);
        let spec = crate::testutil::spec("demo", None, true);
        let apps: BTreeMap<String, PlannedApp> =
            [("demo".to_string(), PlannedApp { spec, node: None })].into();
        mount(&mut s, 1, 1, "a");
        let r = s.apply(&Command::deploy_all(apps.clone()));
        assert!(matches!(
            rejected(&r),
            Some(ApplyError::VolumeMounted { .. })
        ));
        unmount(&mut s, 1, 1, "a");
        assert!(matches!(
            s.apply(&Command::deploy_all(apps)),
            CommandResult::Deployed { .. }
        ));
        assert!(matches!(
            rejected(&mount(&mut s, 1, 1, "a")),
            Some(ApplyError::DatasetInUse { .. })
        ));
    }

    #[test]
    fn moving_an_apps_dataset_alone_points_to_app_move() {
        let mut s = cluster(2);
        let spec = crate::testutil::spec("demo", None, true);
        let apps: BTreeMap<String, PlannedApp> =
            [("demo".to_string(), PlannedApp { spec, node: None })].into();
        s.apply(&Command::deploy_all(apps));
        let dataset = s.apps["demo"].dataset.expect("demo has a volume");
        let r = s.apply(&Command::BeginDatasetMove { dataset, to: 2 });
        let e = rejected(&r).expect("refused").to_string();
        assert!(e.contains("`flockctl app move demo --to NODE`"), "{e}");
    }

    fn op() -> impl Strategy<Value = Command> {
        let ds = 1..=2u64;
        let node = 1..=3u64;
        let id = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        prop_oneof![
            (ds.clone(), node.clone(), id.clone())
                .prop_map(|(dataset, node, id)| { Command::MountVolume { dataset, node, id } }),
            (ds.clone(), node.clone(), id)
                .prop_map(|(dataset, node, id)| { Command::UnmountVolume { dataset, node, id } }),
            (ds.clone(), node.clone())
                .prop_map(|(dataset, to)| Command::BeginDatasetMove { dataset, to }),
            (ds.clone(), node.clone()).prop_map(|(dataset, to)| Command::CommitDatasetMove {
                dataset,
                epoch: 0,
                to,
                snapshot: String::new()
            }),
            ds.clone()
                .prop_map(|dataset| Command::CancelDatasetMove { dataset }),
            (ds.clone(), prop::option::of(node.clone()))
                .prop_map(|(dataset, node)| Command::ForgetMounts { dataset, node }),
            ds.prop_map(|dataset| Command::DeleteDataset { dataset }),
            Just(Command::RemoveNode { id: 3 }),
        ]
    }

    proptest! {
        /// Whatever Docker, users and moves do, a dataset is mounted only on its primary and
        /// never while it moves; mounts of a removed dataset or node are gone.
        #[test]
        fn mounts_only_on_an_unmoving_primary(ops in prop::collection::vec(op(), 0..60)) {
            let mut s = cluster(3);
            for mut cmd in ops {
                // Commits need the current epoch and a recorded snapshot to be meaningful.
                if let Command::CommitDatasetMove { dataset, epoch, snapshot, .. } = &mut cmd {
                    if let Some(ds) = s.datasets.get(dataset) {
                        *epoch = ds.epoch;
                        *snapshot = format!("s{}", ds.epoch);
                        s.apply(&Command::RecordSnapshot {
                            dataset: *dataset,
                            epoch: ds.epoch,
                            snapshot: crate::SnapshotRecord {
                                name: snapshot.clone(),
                                guid: 1,
                                created_unix: 0,
                                epoch: ds.epoch,
                            },
                        });
                    }
                }
                s.apply(&cmd);
                for (id, mounts) in &s.mounts {
                    prop_assert!(!mounts.is_empty());
                    let ds = s.datasets.get(id);
                    prop_assert!(ds.is_some(), "mounts of removed dataset {}", id);
                    let ds = ds.unwrap();
                    prop_assert!(ds.moving.is_none(), "{} mounted while it moves", ds.name);
                    for (node, _) in mounts {
                        prop_assert_eq!(*node, ds.primary);
                        prop_assert!(s.nodes.contains_key(node));
                    }
                }
            }
        }
    }
}
