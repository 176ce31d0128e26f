//! What a rollback of a dataset does, decided on the cluster's state: refused with the reason
//! and what to do, or carried out with its apps held stopped around the restore.
//!
//! A rollback never loses what the dataset held silently: the primary first takes a snapshot
//! named [`pre_rollback_name`] (kept until the user removes it, so the rollback can be undone),
//! then restores the chosen snapshot's content into the live data, keeping every snapshot. An
//! app that uses the dataset would keep writing into replaced files, so a rollback with users
//! is refused unless the caller asks to stop them; then the dataset is held
//! (`Command::HoldDataset`: no app of it runs anywhere), the primary waits for a positive
//! observation that none runs ([`crate::moves::users_stopped`]), and releases the hold after.

use flock_scheduler::retention::PRE_ROLLBACK_PREFIX;
use flock_scheduler::{ClusterState, Dataset};

use crate::moves::Driver;

/// How a rollback that was not refused goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPlan {
    /// The apps that use the dataset, stopped (held) for the rollback: none, or the caller
    /// asked to stop them.
    pub users: Vec<(String, Driver)>,
}

impl RollbackPlan {
    /// Whether the dataset is held around the restore.
    pub fn holds(&self) -> bool {
        !self.users.is_empty()
    }
}

/// Decides whether dataset `ds` may be rolled back to `snapshot` on `state`, and how: refused
/// (the reason says what to do) or a plan. `stop_app`: the caller allows stopping its apps.
pub fn plan(
    state: &ClusterState,
    ds: &Dataset,
    snapshot: &str,
    stop_app: bool,
) -> Result<RollbackPlan, String> {
    let name = &ds.name;
    if !ds.snapshots.iter().any(|s| s.name == snapshot) {
        return Err(format!(
            "{name} has no snapshot {}; `flockctl dataset snapshots {name}` lists them",
            flock_scheduler::shown(snapshot)
        ));
    }
    if let Some(m) = &ds.moving {
        return Err(format!(
            "{name} is moving to node {}; roll it back once the move is done (or cancel it with `flockctl dataset move {name} --cancel`)",
            m.to
        ));
    }
    if let Some(reason) = &ds.hold {
        return Err(format!(
            "{name} is held ({reason}); try again when that is done"
        ));
    }
    let containers = state.mounts_of(ds.id).count();
    if containers > 0 {
        return Err(format!(
            "{name} is mounted by {containers} Docker container(s), which would keep writing into replaced files; stop them first"
        ));
    }
    let users: Vec<(String, Driver)> = state
        .apps_of_dataset(ds.id)
        .map(|(n, a)| (n.clone(), Driver::of(a.spec.image.as_deref())))
        .collect();
    if !users.is_empty() && !stop_app {
        let names: Vec<&str> = users.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "app(s) {} use {name}: a rollback under a running app loses what it writes after. Give --stop-app to stop them for the rollback and start them again after",
            names.join(", ")
        ));
    }
    Ok(RollbackPlan { users })
}

/// The name of the snapshot that keeps a dataset's state before a rollback, from the time's
/// name (`2026-12-05T01-02-03.456Z`).
pub fn pre_rollback_name(time_name: &str) -> String {
    format!("{PRE_ROLLBACK_PREFIX}{time_name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cluster, deploy, ok, snap};
    use flock_scheduler::{Command, DatasetMove};

    /// A two-node cluster with app `web` (if `app`) or a bare dataset `web`, with one
    /// recorded snapshot `before`.
    fn state_with(app: bool) -> (ClusterState, Dataset) {
        let mut s = cluster(2);
        if app {
            deploy(&mut s, &[("web", false, 1)]);
        } else {
            ok(
                &mut s,
                Command::CreateDataset {
                    name: "web".into(),
                    primary: 1,
                    size_limit: None,
                },
            );
        }
        let ds = s.dataset_by_name("web").expect("created").clone();
        ok(
            &mut s,
            Command::RecordSnapshot {
                dataset: ds.id,
                epoch: ds.epoch,
                snapshot: snap("before", 7, ds.epoch),
            },
        );
        let ds = s.dataset_by_name("web").expect("created").clone();
        (s, ds)
    }

    #[test]
    fn a_dataset_without_apps_rolls_back_without_a_hold() {
        let (s, ds) = state_with(false);
        let p = plan(&s, &ds, "before", false).expect("allowed");
        assert!(!p.holds());
        let e = plan(&s, &ds, "nope", true).expect_err("unknown snapshot");
        assert!(
            e.contains("no snapshot") && e.contains("dataset snapshots web"),
            "{e}"
        );
    }

    #[test]
    fn an_app_in_use_needs_stop_app_and_is_held() {
        let (s, ds) = state_with(true);
        let e = plan(&s, &ds, "before", false).expect_err("refused");
        assert!(e.contains("app(s) web") && e.contains("--stop-app"), "{e}");
        let p = plan(&s, &ds, "before", true).expect("allowed");
        assert!(p.holds());
        assert_eq!(p.users, vec![("web".to_string(), Driver::Process)]);
    }

    #[test]
    fn a_held_or_moving_dataset_is_refused() {
        let (s, mut ds) = state_with(false);
        ds.hold = Some("rollback to x".into());
        let e = plan(&s, &ds, "before", true).expect_err("held");
        assert!(e.contains("held (rollback to x)"), "{e}");
        ds.hold = None;
        ds.moving = Some(DatasetMove {
            to: 2,
            handoff: false,
        });
        let e = plan(&s, &ds, "before", true).expect_err("moving");
        assert!(e.contains("moving") && e.contains("--cancel"), "{e}");
    }

    #[test]
    fn the_pre_rollback_snapshot_is_kept_by_retention() {
        let n = pre_rollback_name("2026-12-05T01-02-03.456Z");
        assert_eq!(n, "pre-rollback-2026-12-05T01-02-03.456Z");
        assert!(!flock_scheduler::retention::is_automatic(&n));
        flock_scheduler::dataset::validate_snapshot_name(&n).expect("a valid name");
    }
}
