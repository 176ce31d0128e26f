//! Whether a node's copy of a dataset may be used: an app starts on it, or Docker mounts it,
//! only when it holds the dataset's newest recorded snapshot. A copy that lacks it was rolled
//! back, or has not received the last push yet; using it would serve older data than the
//! dataset's record says it has.

use flock_scheduler::Dataset;

/// A copy that lacks its dataset's newest recorded snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this node's copy of dataset {dataset} lacks its newest recorded snapshot {snapshot} (guid {guid}); try again once it has arrived")]
pub struct Stale {
    pub dataset: String,
    pub snapshot: String,
    pub guid: u64,
}

/// Whether a copy of `ds` holding the snapshots whose guids are `held` is current: it holds the
/// newest snapshot `ds` records (by guid), or `ds` records none.
pub fn copy_is_current(ds: &Dataset, held: impl IntoIterator<Item = u64>) -> Result<(), Stale> {
    let Some(latest) = ds.latest_snapshot() else {
        return Ok(());
    };
    if held.into_iter().any(|g| g == latest.guid) {
        return Ok(());
    }
    Err(Stale {
        dataset: ds.name.clone(),
        snapshot: latest.name.clone(),
        guid: latest.guid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::SnapshotRecord;
    use std::collections::BTreeSet;

    fn dataset(recorded: &[(&str, u64)]) -> Dataset {
        Dataset {
            id: 1,
            name: "db".into(),
            size_limit: None,
            primary: 1,
            epoch: 2,
            replicas: BTreeSet::new(),
            snapshots: recorded
                .iter()
                .map(|(n, g)| SnapshotRecord {
                    name: n.to_string(),
                    guid: *g,
                    created_unix: 0,
                    epoch: 2,
                })
                .collect(),
            moving: None,
            retention: None,
            bases: Default::default(),
            hold: None,
        }
    }

    #[test]
    fn a_copy_is_current_when_it_holds_the_newest_recorded_snapshot() {
        assert_eq!(copy_is_current(&dataset(&[]), []), Ok(()));
        let ds = dataset(&[("s1", 1), ("m2", 2)]);
        assert_eq!(copy_is_current(&ds, [1, 2]), Ok(()));
        // Later snapshots nobody recorded (yet) do not matter.
        assert_eq!(copy_is_current(&ds, [1, 2, 9]), Ok(()));
        let stale = Stale {
            dataset: "db".into(),
            snapshot: "m2".into(),
            guid: 2,
        };
        assert_eq!(copy_is_current(&ds, [1]), Err(stale.clone()));
        assert_eq!(copy_is_current(&ds, []), Err(stale.clone()));
        // The guid decides, not the name: an m2 of other data is not the recorded one.
        assert_eq!(copy_is_current(&ds, [1, 7]), Err(stale.clone()));
        assert!(stale.to_string().contains("dataset db"));
        assert!(stale.to_string().contains("m2"));
    }
}
