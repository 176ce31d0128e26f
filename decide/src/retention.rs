//! Which snapshots go: the recorded ones a dataset's retention prunes (the primary proposes
//! [`Command::PruneSnapshots`](flock_scheduler::Command::PruneSnapshots)), and the local copies
//! of snapshots that Raft no longer records (every holder destroys them).
//!
//! The policy ([`flock_scheduler::Retention`]) applies to automatic snapshots only: the `last`
//! newest, then the newest of each of the `hourly` most recent clock hours and of the `daily`
//! most recent days (UTC), counted back from the newest snapshot's time; hours and days are
//! whole clock buckets, so what a bucket keeps does not change as time passes. Whatever the
//! policy says, nothing is pruned that [`Dataset::must_keep`] names (the newest, a replica's
//! base, anything while the dataset moves), and nothing at all while a replica's base is not
//! confirmed ([`unconfirmed_replica`]): apply refuses those, so proposing them would only fail.

use std::collections::BTreeSet;

use flock_scheduler::dataset::unconfirmed_replica;
use flock_scheduler::limits::MAX_PRUNE_NAMES;
use flock_scheduler::retention::is_automatic;
use flock_scheduler::Dataset;

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// The recorded snapshots of `ds` its retention prunes now, oldest first (at most
/// [`MAX_PRUNE_NAMES`]: the rest go in the next round).
pub fn to_prune(ds: &Dataset) -> Vec<String> {
    if ds.moving.is_some() || unconfirmed_replica(ds).is_some() {
        return Vec::new();
    }
    let Some(newest) = ds.latest_snapshot() else {
        return Vec::new();
    };
    let policy = ds.retention();
    let now = newest.created_unix;
    let mut keep = BTreeSet::new();
    let (mut hours, mut days) = (BTreeSet::new(), BTreeSet::new());
    let autos = ds.snapshots.iter().filter(|s| is_automatic(&s.name));
    for (i, s) in autos.clone().rev().enumerate() {
        let mut kept = i < policy.last as usize;
        let hour = (now / HOUR).saturating_sub(s.created_unix / HOUR);
        if hour < u64::from(policy.hourly) && hours.insert(hour) {
            kept = true;
        }
        let day = (now / DAY).saturating_sub(s.created_unix / DAY);
        if day < u64::from(policy.daily) && days.insert(day) {
            kept = true;
        }
        if kept {
            keep.insert(s.name.as_str());
        }
    }
    autos
        .filter(|s| !keep.contains(s.name.as_str()) && ds.must_keep(&s.name).is_none())
        .map(|s| s.name.clone())
        .take(MAX_PRUNE_NAMES)
        .collect()
}

/// The snapshots of a holder's copy of `ds` (`local`, oldest first) to destroy: those Raft no
/// longer records that come before a snapshot it records. A snapshot newer than every recorded
/// one the copy holds may still be on its way into Raft (taken, not yet recorded) and is kept;
/// so is one in `uncertain` (its recording had an unknown outcome: it may still apply).
pub fn local_to_destroy(
    ds: &Dataset,
    local: &[String],
    uncertain: &BTreeSet<String>,
) -> Vec<String> {
    let recorded = |n: &str| ds.snapshots.iter().any(|s| s.name == n);
    let Some(last) = local.iter().rposition(|n| recorded(n)) else {
        return Vec::new();
    };
    local[..last]
        .iter()
        .filter(|n| !recorded(n) && !uncertain.contains(*n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::{Retention, SnapshotRecord};
    use std::collections::BTreeMap;

    fn ds(snaps: &[(&str, u64)], retention: &str) -> Dataset {
        Dataset {
            id: 1,
            name: "db".into(),
            size_limit: None,
            primary: 1,
            epoch: 1,
            replicas: Default::default(),
            snapshots: snaps
                .iter()
                .map(|(n, t)| SnapshotRecord {
                    name: n.to_string(),
                    guid: 1,
                    created_unix: *t,
                    epoch: 1,
                })
                .collect(),
            moving: None,
            retention: Some(retention.parse::<Retention>().unwrap()),
            bases: BTreeMap::new(),
            hold: None,
        }
    }

    #[test]
    fn keeps_the_last_and_one_per_bucket() {
        // Ten move snapshots a minute apart, within one hour, and a user snapshot.
        let mut snaps: Vec<(String, u64)> = (0..10)
            .map(|i| (format!("move-{i}"), 7200 + i * 60))
            .collect();
        snaps.insert(3, ("nightly".into(), 7200 + 150));
        let named: Vec<(&str, u64)> = snaps.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let d = ds(&named, "last=3,hourly=0,daily=0");
        let pruned = to_prune(&d);
        assert_eq!(
            pruned,
            (0..7).map(|i| format!("move-{i}")).collect::<Vec<_>>(),
            "the user's snapshot stays, the 3 newest stay"
        );
        // With hourly=1 the newest of the hour is kept: it is among the last 3 already.
        let d = ds(&named, "last=1,hourly=1,daily=0");
        assert_eq!(to_prune(&d).len(), 9);
    }

    #[test]
    fn thins_older_snapshots_on_the_grid() {
        // One snapshot every 20 minutes for 3 days.
        let snaps: Vec<(String, u64)> = (0..216)
            .map(|i| (format!("auto-{i}"), 1_000_000 + i * 1200))
            .collect();
        let named: Vec<(&str, u64)> = snaps.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let d = ds(&named, "last=3,hourly=24,daily=7");
        let pruned: BTreeSet<String> = to_prune(&d).into_iter().collect();
        let kept: Vec<&SnapshotRecord> = d
            .snapshots
            .iter()
            .filter(|s| !pruned.contains(&s.name))
            .collect();
        // 3 newest + one per hour for 24 hours (the newest hour's is among the 3) + one per day
        // for the 3 (or 4, by clock days) days the snapshots span.
        assert!(kept.len() <= 3 + 24 + 4, "{}", kept.len());
        assert!(kept.len() >= 3 + 23, "{}", kept.len());
        assert_eq!(kept.last().unwrap().name, "auto-215");
        // Pruning is stable: what is kept, is kept again.
        let mut again = d.clone();
        again.snapshots.retain(|s| !pruned.contains(&s.name));
        assert_eq!(to_prune(&again), Vec::<String>::new());
    }

    #[test]
    fn never_the_newest_a_base_or_while_unsure() {
        let mut d = ds(
            &[("move-a", 10), ("move-b", 20), ("move-c", 30)],
            "last=1,hourly=0,daily=0",
        );
        d.replicas.insert(2);
        assert!(to_prune(&d).is_empty(), "replica 2's base is not known");
        d.bases.insert(2, "move-a".into());
        assert_eq!(to_prune(&d), ["move-b"]);
        d.bases.insert(2, "gone".into());
        assert!(to_prune(&d).is_empty(), "a base that is no longer recorded");
        d.bases.insert(2, "move-c".into());
        assert_eq!(to_prune(&d), ["move-a", "move-b"]);
        d.moving = Some(flock_scheduler::DatasetMove {
            to: 3,
            handoff: false,
        });
        assert!(to_prune(&d).is_empty(), "moving");
    }

    #[test]
    fn local_copies_of_forgotten_snapshots_go_but_not_new_ones() {
        let d = ds(&[("move-b", 2), ("user", 4)], "default");
        let local: Vec<String> = ["move-a", "move-b", "pruned", "user", "fresh"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            local_to_destroy(&d, &local, &BTreeSet::new()),
            ["move-a", "pruned"]
        );
        let uncertain = BTreeSet::from(["pruned".to_string()]);
        assert_eq!(local_to_destroy(&d, &local, &uncertain), ["move-a"]);
        // A copy holding no recorded snapshot keeps everything (a receive in progress).
        assert!(local_to_destroy(&d, &local[..1], &BTreeSet::new()).is_empty());
    }
}
