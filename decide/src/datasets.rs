//! What a node does to make its datasets match the desired state: [`DatasetsCore::decide`]
//! turns the replicated state, this node's listing of its copies and the time into
//! [`DatasetAction`]s; the executor (flock-node's datasets agent) carries them out and reports
//! each job's end with [`DatasetsCore::finished`].
//!
//! - A dataset whose primary is this node and that has no copy yet (new: epoch 1, no
//!   snapshots) is created; a primary that lost its copy is reported once.
//! - A move away from this node is started as a job ([`crate::moves::Move`] carries it out).
//! - The newest recorded snapshot is pushed to every replica not known to hold it (a move's
//!   target gets the move's pushes instead).
//! - A copy this node should not hold (removed dataset, finished move elsewhere) is destroyed,
//!   unless some task works on it now or its id is newer than this node's state.
//! - A failed job is retried after a backoff (from [`FIRST_BACKOFF`], doubling, at most
//!   [`MAX_BACKOFF`]); a push that failed for want of room on the receiver waits longer (from
//!   [`NO_SPACE_BACKOFF`], at most [`MAX_NO_SPACE_BACKOFF`]): sending the whole stream again
//!   every few seconds cannot help.
//! - Retention: the primary proposes to forget the recorded snapshots its dataset's retention
//!   prunes ([`crate::retention::to_prune`]); every holder destroys its copies of snapshots
//!   Raft no longer records ([`crate::retention::local_to_destroy`]).
//! - A copy whose size limit is not the recorded one gets the recorded one.
//! - A hold ([`Dataset::hold`]) of a dataset this node is primary of, and that no operation
//!   here holds any more (flockd restarted in the middle of a rollback), is released.
//!
//! - A copy a failover left on this node (its old primary, [`flock_scheduler::failover`]) is
//!   never changed or destroyed as it is: it may hold the only copy of writes made after the
//!   last replicated snapshot. It is set aside whole, its writes kept under snapshot
//!   `diverged-EPOCH` ([`DatasetAction::KeepDiverged`]), and the copy restarts from the
//!   newest snapshot it shares with the new primary, as a replica. A set-aside copy goes when
//!   an operator removes its snapshot, or the dataset.
//!
//! Fail closed: a listing of the copies that failed decides nothing (no destroy, no create).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flock_scheduler::dataset::DatasetId;
use flock_scheduler::{ClusterState, Dataset, NodeId};

use crate::retention::{local_to_destroy, to_prune};
use crate::Instant;

/// How often the node looks at its datasets when nothing changed.
pub const FULL_LOOK: Duration = Duration::from_secs(5);
/// The wait after a job's first failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before a failed job is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The wait after a push's first failure for want of room on the receiver.
pub const NO_SPACE_BACKOFF: Duration = Duration::from_secs(30);
/// The longest wait before a push that found no room is tried again.
pub const MAX_NO_SPACE_BACKOFF: Duration = Duration::from_secs(600);

/// A task the executor runs for a while: a move or a replica push.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Job {
    Move {
        dataset: DatasetId,
        to: NodeId,
    },
    Replicate {
        dataset: DatasetId,
        to: NodeId,
    },
    /// Proposing to forget snapshots the retention prunes.
    Prune {
        dataset: DatasetId,
    },
    /// Setting the copy's size limit.
    SetLimit {
        dataset: DatasetId,
    },
    /// Releasing a hold no operation here holds.
    Release {
        dataset: DatasetId,
    },
    /// A periodic snapshot of a replicated dataset.
    Snapshot {
        dataset: DatasetId,
    },
    /// Proposing another replica.
    AddReplica {
        dataset: DatasetId,
    },
    /// Setting aside the diverged writes of a copy a failover left here.
    KeepDiverged {
        dataset: DatasetId,
    },
}

/// A dataset this node's backend holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySeen {
    pub id: DatasetId,
    /// The dataset's name (the backend's name without the id).
    pub name: String,
    /// The copy's snapshots, oldest first.
    pub snapshots: Vec<String>,
    /// The copy's size limit.
    pub limit: Option<u64>,
}

/// What the node saw of its datasets on one look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiesSeen {
    /// Every copy the backend holds, or why listing them failed.
    pub copies: Result<Vec<CopySeen>, String>,
    /// Datasets some task works on now (holds their lock).
    pub busy: BTreeSet<DatasetId>,
    /// Per dataset, snapshots this node took whose recording had an unknown outcome.
    pub uncertain: BTreeMap<DatasetId, BTreeSet<String>>,
    /// Datasets an operation here holds ([`Dataset::hold`]) and will release.
    pub holding: BTreeSet<DatasetId>,
    /// The copies where this node set aside diverged writes, from the same listing as
    /// `copies` (empty when it failed).
    pub asides: Vec<AsideSeen>,
}

/// A copy where this node set aside the diverged writes of a dataset
/// ([`flock_scheduler::dataset::aside_name`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsideSeen {
    pub id: DatasetId,
    pub name: String,
    /// The kept snapshot it holds the writes in (`diverged-EPOCH`).
    pub snapshot: String,
}

/// What the executor should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetAction {
    /// Destroy this node's copy of dataset `id` named `name` (unless a task took it since).
    Destroy { id: DatasetId, name: String },
    /// Create the primary's first copy of a new dataset.
    Create {
        id: DatasetId,
        name: String,
        size_limit: Option<u64>,
    },
    /// Run an attempt of the move of `dataset` to `to` ([`crate::moves::Move`]); report its
    /// end as [`Job::Move`].
    StartMove { dataset: DatasetId, to: NodeId },
    /// Push recorded `snapshot` of `dataset` to replica `to`, if the dataset is still at
    /// `epoch` then (else report [`JobOutcome::Skipped`]); report its end as
    /// [`Job::Replicate`].
    Replicate {
        dataset: DatasetId,
        to: NodeId,
        snapshot: String,
        epoch: u64,
    },
    /// This node is the primary of `dataset` and holds no copy: say so (once).
    ReportMissing { dataset: DatasetId, name: String },
    /// Propose to forget recorded `names` of `dataset` under `epoch`; report its end as
    /// [`Job::Prune`].
    Prune {
        dataset: DatasetId,
        epoch: u64,
        names: Vec<String>,
    },
    /// Destroy this node's copies of `snapshots` of dataset `id` named `name`, which Raft no
    /// longer records; under the dataset's lock, only those that
    /// [`crate::retention::local_to_destroy`] still names then.
    DestroySnapshots {
        id: DatasetId,
        name: String,
        snapshots: Vec<String>,
    },
    /// Give this node's copy of dataset `id` named `name` the size limit `limit`; report its
    /// end as [`Job::SetLimit`].
    SetLimit {
        id: DatasetId,
        name: String,
        limit: Option<u64>,
    },
    /// Propose [`flock_scheduler::Command::ReleaseDataset`]; report its end as
    /// [`Job::Release`].
    Release { dataset: DatasetId },
    /// Take and record a periodic (`auto-...`) snapshot of `dataset`, if it is still primary
    /// here at `epoch`; report its end as [`Job::Snapshot`].
    Snapshot { dataset: DatasetId, epoch: u64 },
    /// Propose [`flock_scheduler::Command::AddReplica`]; report its end as [`Job::AddReplica`].
    AddReplica {
        dataset: DatasetId,
        epoch: u64,
        node: NodeId,
    },
    /// This node's copy of `dataset` diverged (it was primary under `epoch` when a failover
    /// took it away): set it aside whole under snapshot `diverged-EPOCH`
    /// ([`flock_dataset::set_aside`]), restart the copy from `common`, then propose
    /// [`flock_scheduler::Command::KeepDiverged`]; report its end as [`Job::KeepDiverged`].
    KeepDiverged {
        dataset: DatasetId,
        name: String,
        epoch: u64,
        common: Option<String>,
    },
    /// Destroy the set-aside copy `aside` of dataset `id` named `name`: its kept snapshot was
    /// removed by an operator, or the dataset was.
    DestroyAside {
        id: DatasetId,
        name: String,
        snapshot: String,
    },
}

/// The name of the snapshot a node keeps the diverged writes it made as primary under `epoch`
/// in.
pub fn diverged_snapshot(epoch: u64) -> String {
    format!("{}{epoch}", flock_scheduler::failover::DIVERGED_PREFIX)
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// It did what it was started for (a replica push: the replica holds the snapshot).
    Done,
    /// It found nothing to do (the state moved on).
    Skipped,
    /// It failed; it is tried again after a backoff.
    Failed(String),
    /// A push failed because the receiver has no room: tried again after a longer backoff.
    NoSpace(String),
}

/// One node's dataset decisions and what they remember between looks.
#[derive(Clone, Debug, Default)]
pub struct DatasetsCore {
    /// Jobs started and not yet finished; for a replica push, the guid the replica holds
    /// once it succeeds.
    running: BTreeMap<Job, Option<u64>>,
    /// Per failed job: when it may start again, the backoff that was, and how many times in a
    /// row it failed.
    retry: BTreeMap<Job, (Instant, Duration, u32)>,
    /// Per replica: the guid of the newest snapshot it is known to hold.
    replicated: BTreeMap<(DatasetId, NodeId), u64>,
    /// Datasets whose missing primary copy was reported.
    reported_missing: BTreeSet<DatasetId>,
    /// The datasets' desired state at the last look, and when that was (`None`: look now).
    seen: Option<(BTreeMap<DatasetId, Dataset>, DatasetId)>,
    last_look: Option<Instant>,
    /// Per replicated dataset, when its last periodic snapshot was started.
    last_auto: BTreeMap<DatasetId, Instant>,
    /// When the next periodic snapshot is due (`None`: none is).
    next_auto: Option<Instant>,
}

impl DatasetsCore {
    pub fn new() -> DatasetsCore {
        DatasetsCore::default()
    }

    /// Whether to look (list the copies and [`decide`](Self::decide)) now: the datasets'
    /// desired state changed, a job ended, or [`FULL_LOOK`] passed. Other changes (a busy
    /// key-value workload) do not make the node list its backend (zfs: child processes).
    pub fn due(&self, state: &ClusterState, now: Instant) -> bool {
        let changed = self
            .seen
            .as_ref()
            .is_none_or(|(d, next)| *d != state.datasets || *next != state.next_dataset_id);
        changed
            || self.next_auto.is_some_and(|at| now >= at)
            || self
                .last_look
                .is_none_or(|at| now.saturating_since(at) >= FULL_LOOK)
    }

    /// The jobs started and not yet finished.
    pub fn running(&self) -> impl Iterator<Item = &Job> {
        self.running.keys()
    }

    /// How many times in a row `job` failed, and when it may start again; `None` if its last
    /// run did not fail.
    pub fn failures(&self, job: Job) -> Option<(u32, Instant)> {
        self.retry.get(&job).map(|(at, _, n)| (*n, *at))
    }

    /// What to do now, given the state this node applied, the copies it holds and the time.
    /// Jobs it starts count as running until [`finished`](Self::finished).
    pub fn decide(
        &mut self,
        state: &ClusterState,
        me: NodeId,
        copies: &CopiesSeen,
        now: Instant,
    ) -> Vec<DatasetAction> {
        self.seen = Some((state.datasets.clone(), state.next_dataset_id));
        self.last_look = Some(now);
        self.next_auto = None;
        self.last_auto
            .retain(|id, _| state.datasets.get(id).is_some_and(|d| d.primary == me));
        // Without a listing nothing is known about what this node holds: nothing is
        // destroyed, created or pushed from it.
        let Ok(listed) = &copies.copies else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        let held: BTreeSet<DatasetId> = listed.iter().map(|c| c.id).collect();
        for copy in listed {
            // A copy a failover took the primary from may hold writes no other node has: it is
            // neither served nor changed nor destroyed until it is kept (crate::failover).
            if state.failover.is_diverged(copy.id, me) {
                continue;
            }
            let keep = state
                .datasets
                .get(&copy.id)
                .is_some_and(|d| d.name == copy.name && d.holders().contains(&me));
            if keep && !copies.busy.contains(&copy.id) {
                let ds = &state.datasets[&copy.id];
                let none = BTreeSet::new();
                let uncertain = copies.uncertain.get(&copy.id).unwrap_or(&none);
                let forgotten = local_to_destroy(ds, &copy.snapshots, uncertain);
                if !forgotten.is_empty() {
                    actions.push(DatasetAction::DestroySnapshots {
                        id: copy.id,
                        name: copy.name.clone(),
                        snapshots: forgotten,
                    });
                }
                let job = Job::SetLimit { dataset: copy.id };
                if copy.limit != ds.size_limit && self.may_start(job, now) {
                    self.running.insert(job, None);
                    actions.push(DatasetAction::SetLimit {
                        id: copy.id,
                        name: copy.name.clone(),
                        limit: ds.size_limit,
                    });
                }
            }
            // An id this node has not seen created yet is left alone until it has.
            if keep || copy.id >= state.next_dataset_id || copies.busy.contains(&copy.id) {
                continue;
            }
            actions.push(DatasetAction::Destroy {
                id: copy.id,
                name: copy.name.clone(),
            });
        }
        self.keep_diverged(state, me, copies, now, &mut actions);
        for ds in state.datasets.values().filter(|d| d.primary == me) {
            if !held.contains(&ds.id) {
                if ds.snapshots.is_empty() && ds.epoch == 1 {
                    if !copies.busy.contains(&ds.id) {
                        actions.push(DatasetAction::Create {
                            id: ds.id,
                            name: ds.name.clone(),
                            size_limit: ds.size_limit,
                        });
                    }
                } else if self.reported_missing.insert(ds.id) {
                    actions.push(DatasetAction::ReportMissing {
                        dataset: ds.id,
                        name: ds.name.clone(),
                    });
                }
                continue;
            }
            // Reported again if it goes missing again.
            self.reported_missing.remove(&ds.id);
            let job = Job::Release { dataset: ds.id };
            if ds.hold.is_some() && !copies.holding.contains(&ds.id) && self.may_start(job, now) {
                self.running.insert(job, None);
                actions.push(DatasetAction::Release { dataset: ds.id });
            }
            let job = Job::Prune { dataset: ds.id };
            if self.may_start(job, now) {
                let names = to_prune(ds);
                if !names.is_empty() {
                    self.running.insert(job, None);
                    actions.push(DatasetAction::Prune {
                        dataset: ds.id,
                        epoch: ds.epoch,
                        names,
                    });
                }
            }
            if let Some(rep) = state.failover.replication_of(ds.id) {
                let job = Job::AddReplica { dataset: ds.id };
                if self.may_start(job, now) {
                    if let Some(node) = flock_scheduler::failover::replica_wanted(state, ds.id) {
                        self.running.insert(job, None);
                        actions.push(DatasetAction::AddReplica {
                            dataset: ds.id,
                            epoch: ds.epoch,
                            node,
                        });
                    }
                }
                // Every interval a snapshot, which the pushes below carry to the replicas;
                // not while it moves (the move's rounds snapshot) or is held (a rollback).
                let interval = Duration::from_millis(rep.interval_ms);
                let due_at = self.last_auto.get(&ds.id).map_or(now, |t| *t + interval);
                let job = Job::Snapshot { dataset: ds.id };
                if ds.moving.is_none() && ds.hold.is_none() {
                    if now >= due_at && self.may_start(job, now) && !copies.busy.contains(&ds.id) {
                        self.running.insert(job, None);
                        self.last_auto.insert(ds.id, now);
                        actions.push(DatasetAction::Snapshot {
                            dataset: ds.id,
                            epoch: ds.epoch,
                        });
                    }
                    let next = self.last_auto.get(&ds.id).map_or(now, |t| *t + interval);
                    self.next_auto = Some(self.next_auto.map_or(next, |n| n.min(next)));
                }
            }
            if let Some(m) = &ds.moving {
                let job = Job::Move {
                    dataset: ds.id,
                    to: m.to,
                };
                if self.may_start(job, now) {
                    self.running.insert(job, None);
                    actions.push(DatasetAction::StartMove {
                        dataset: ds.id,
                        to: m.to,
                    });
                }
            }
            let Some(latest) = ds.latest_snapshot() else {
                continue;
            };
            // A replica that is the move's target gets the move's push instead.
            let target = ds.moving.as_ref().map(|m| m.to);
            for &r in ds.replicas.iter().filter(|&&r| Some(r) != target) {
                let job = Job::Replicate {
                    dataset: ds.id,
                    to: r,
                };
                if self.replicated.get(&(ds.id, r)) == Some(&latest.guid)
                    || !self.may_start(job, now)
                {
                    continue;
                }
                self.running.insert(job, Some(latest.guid));
                actions.push(DatasetAction::Replicate {
                    dataset: ds.id,
                    to: r,
                    snapshot: latest.name.clone(),
                    epoch: ds.epoch,
                });
            }
        }
        actions
    }

    /// A job ended. The backoff before it may start again, if it failed. The next
    /// [`due`](Self::due) says to look.
    pub fn finished(&mut self, job: Job, outcome: JobOutcome, now: Instant) -> Option<Duration> {
        let guid = self.running.remove(&job).flatten();
        self.last_look = None;
        match outcome {
            JobOutcome::Done | JobOutcome::Skipped => {
                self.retry.remove(&job);
                if let (Job::Replicate { dataset, to }, JobOutcome::Done, Some(guid)) =
                    (job, &outcome, guid)
                {
                    self.replicated.insert((dataset, to), guid);
                }
                None
            }
            JobOutcome::Failed(_) | JobOutcome::NoSpace(_) => {
                let (first, max) = match outcome {
                    JobOutcome::NoSpace(_) => (NO_SPACE_BACKOFF, MAX_NO_SPACE_BACKOFF),
                    _ => (FIRST_BACKOFF, MAX_BACKOFF),
                };
                let (backoff, failures) = match self.retry.get(&job) {
                    Some((_, b, n)) => ((*b * 2).clamp(first, max), n + 1),
                    None => (first, 1),
                };
                self.retry.insert(job, (now + backoff, backoff, failures));
                Some(backoff)
            }
        }
    }

    /// The copies a failover left here are set aside (their writes kept under a snapshot)
    /// and become replicas; set-aside copies whose kept snapshot is no longer recorded go.
    fn keep_diverged(
        &mut self,
        state: &ClusterState,
        me: NodeId,
        copies: &CopiesSeen,
        now: Instant,
        actions: &mut Vec<DatasetAction>,
    ) {
        let busy = |id| copies.busy.contains(id) || copies.holding.contains(id);
        for (id, div) in state
            .failover
            .diverged
            .iter()
            .filter_map(|(id, m)| Some((id, m.get(&me)?)))
        {
            let job = Job::KeepDiverged { dataset: *id };
            let Some(ds) = state.datasets.get(id) else {
                continue;
            };
            if ds.primary == me || busy(id) || !self.may_start(job, now) {
                continue;
            }
            self.running.insert(job, None);
            actions.push(DatasetAction::KeepDiverged {
                dataset: *id,
                name: ds.name.clone(),
                epoch: div.epoch,
                common: div.common.clone(),
            });
        }
        for aside in &copies.asides {
            let gone = aside.id < state.next_dataset_id
                && state
                    .datasets
                    .get(&aside.id)
                    .is_none_or(|d| d.name != aside.name);
            let dropped = !state.failover.is_diverged(aside.id, me)
                && !state.failover.keeps(aside.id, me, &aside.snapshot)
                && state.datasets.contains_key(&aside.id);
            if (gone || dropped) && !busy(&aside.id) {
                actions.push(DatasetAction::DestroyAside {
                    id: aside.id,
                    name: aside.name.clone(),
                    snapshot: aside.snapshot.clone(),
                });
            }
        }
    }

    fn may_start(&self, job: Job, now: Instant) -> bool {
        !self.running.contains_key(&job) && self.retry.get(&job).is_none_or(|(at, _, _)| now >= *at)
    }
}

/// The dataset a replica push started by [`DatasetAction::Replicate`] pushes from, if the
/// state still has it at the epoch the push was decided under (else the push has nothing to
/// do: a new primary pushes from its copy).
pub fn replica_source(state: &ClusterState, dataset: DatasetId, epoch: u64) -> Option<&Dataset> {
    state.datasets.get(&dataset).filter(|d| d.epoch == epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cluster, ok, snap};
    use flock_scheduler::Command;

    const ME: NodeId = 1;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn copies(held: &[(DatasetId, &str)]) -> CopiesSeen {
        CopiesSeen {
            copies: Ok(held
                .iter()
                .map(|(id, name)| CopySeen {
                    id: *id,
                    name: name.to_string(),
                    snapshots: Vec::new(),
                    limit: Some(100),
                })
                .collect()),
            busy: BTreeSet::new(),
            uncertain: BTreeMap::new(),
            holding: BTreeSet::new(),
            asides: Vec::new(),
        }
    }

    fn create(s: &mut ClusterState, name: &str, primary: NodeId) {
        ok(
            s,
            Command::CreateDataset {
                name: name.into(),
                primary,
                size_limit: Some(100),
            },
        );
    }

    /// Three nodes; dataset db (1) on n1 with snapshot s1 recorded, replicas on n2 and n3.
    fn replicated() -> ClusterState {
        let mut s = cluster(3);
        create(&mut s, "db", ME);
        ok(
            &mut s,
            Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: snap("s1", 11, 1),
            },
        );
        let ds = s.datasets.get_mut(&1).unwrap();
        ds.replicas.extend([2, 3]);
        s
    }

    #[test]
    fn a_failed_listing_decides_nothing() {
        let mut s = cluster(3);
        create(&mut s, "new", ME);
        let mut s2 = replicated();
        ok(&mut s2, Command::BeginDatasetMove { dataset: 1, to: 2 });
        for state in [s, s2] {
            let mut core = DatasetsCore::new();
            let failed = CopiesSeen {
                copies: Err("zfs list: timeout".into()),
                busy: BTreeSet::new(),
                uncertain: BTreeMap::new(),
                holding: BTreeSet::new(),
                asides: Vec::new(),
            };
            assert_eq!(core.decide(&state, ME, &failed, t(0)), vec![]);
            assert_eq!(core.running().count(), 0);
        }
    }

    #[test]
    fn the_primary_creates_a_new_dataset_once_nothing_works_on_it() {
        let mut s = cluster(2);
        create(&mut s, "new", ME);
        create(&mut s, "theirs", 2);
        let mut core = DatasetsCore::new();
        let mut busy = copies(&[]);
        busy.busy.insert(1);
        assert_eq!(core.decide(&s, ME, &busy, t(0)), vec![]);
        assert_eq!(
            core.decide(&s, ME, &copies(&[]), t(0)),
            vec![DatasetAction::Create {
                id: 1,
                name: "new".into(),
                size_limit: Some(100)
            }]
        );
        assert_eq!(core.decide(&s, ME, &copies(&[(1, "new")]), t(0)), vec![]);
    }

    #[test]
    fn a_primary_without_its_copy_is_reported_once_and_never_created_empty() {
        let s = replicated();
        let mut core = DatasetsCore::new();
        let missing = DatasetAction::ReportMissing {
            dataset: 1,
            name: "db".into(),
        };
        assert_eq!(
            core.decide(&s, ME, &copies(&[]), t(0)),
            vec![missing.clone()]
        );
        assert_eq!(core.decide(&s, ME, &copies(&[]), t(1)), vec![]);
        // Found again, then lost again: reported again.
        let found = core.decide(&s, ME, &copies(&[(1, "db")]), t(2));
        assert!(!found.contains(&missing), "{found:?}");
        assert_eq!(core.decide(&s, ME, &copies(&[]), t(3)), vec![missing]);
        // A moved-in dataset (epoch 2, no snapshots) is not new either.
        let mut s = cluster(2);
        create(&mut s, "moved", ME);
        s.datasets.get_mut(&1).unwrap().epoch = 2;
        let mut core = DatasetsCore::new();
        assert_eq!(
            core.decide(&s, ME, &copies(&[]), t(0)),
            vec![DatasetAction::ReportMissing {
                dataset: 1,
                name: "moved".into()
            }]
        );
    }

    /// A replicated dataset: its primary asks for the missing replicas and snapshots every
    /// interval, not while it moves, and says when the next one is due.
    #[test]
    fn a_replicated_dataset_gets_its_replicas_and_periodic_snapshots() {
        let mut s = cluster(3);
        create(&mut s, "db", ME);
        ok(
            &mut s,
            Command::SetReplication {
                dataset: 1,
                replication: Some(flock_scheduler::failover::Replication {
                    replicas: 1,
                    interval_ms: 1000,
                }),
            },
        );
        let mut core = DatasetsCore::new();
        let held = copies(&[(1, "db")]);
        let acts = core.decide(&s, ME, &held, t(0));
        assert_eq!(
            acts,
            vec![
                DatasetAction::AddReplica {
                    dataset: 1,
                    epoch: 1,
                    node: 2
                },
                DatasetAction::Snapshot {
                    dataset: 1,
                    epoch: 1
                },
            ]
        );
        core.finished(Job::Snapshot { dataset: 1 }, JobOutcome::Done, t(10));
        assert!(!core.due(&s, t(999)) || core.decide(&s, ME, &held, t(999)).is_empty());
        assert!(core.due(&s, t(1000)));
        assert!(core
            .decide(&s, ME, &held, t(1000))
            .contains(&DatasetAction::Snapshot {
                dataset: 1,
                epoch: 1
            }));
        // Not while it moves.
        core.finished(Job::Snapshot { dataset: 1 }, JobOutcome::Done, t(1010));
        ok(&mut s, Command::BeginDatasetMove { dataset: 1, to: 3 });
        assert!(!core
            .decide(&s, ME, &held, t(5000))
            .iter()
            .any(|a| matches!(a, DatasetAction::Snapshot { .. })));
    }

    /// Dataset 1 (replicated, n2 holding s1) failed over from this node to n2.
    fn failed_over_from_me() -> ClusterState {
        let mut s = replicated();
        ok(
            &mut s,
            Command::ReplicaHolds {
                dataset: 1,
                epoch: 1,
                node: 2,
                snapshot: "s1".into(),
            },
        );
        ok(
            &mut s,
            Command::SetReplication {
                dataset: 1,
                replication: Some(flock_scheduler::failover::Replication {
                    replicas: 1,
                    interval_ms: 1000,
                }),
            },
        );
        ok(
            &mut s,
            Command::DeclareNodeDown {
                node: ME,
                last_heard_unix_ms: 0,
                at_unix_ms: 0,
                by_operator: true,
            },
        );
        s
    }

    /// The old primary's copy after a failover holds writes no one else has: this node
    /// neither destroys it nor any of its snapshots, nor pushes from it.
    #[test]
    fn a_diverged_copy_is_left_alone() {
        let s = failed_over_from_me();
        assert_eq!(s.datasets[&1].primary, 2);
        let mut held = copies(&[(1, "db")]);
        if let Ok(c) = held.copies.as_mut() {
            c[0].snapshots = vec!["old".into(), "s1".into(), "late".into()];
        }
        let mut core = DatasetsCore::new();
        // Set aside (never destroyed, never pushed over), once at a time, not while busy.
        let keep = DatasetAction::KeepDiverged {
            dataset: 1,
            name: "db".into(),
            epoch: 1,
            common: Some("s1".into()),
        };
        let mut busy = held.clone();
        busy.busy.insert(1);
        assert_eq!(core.decide(&s, ME, &busy, t(0)), vec![]);
        assert_eq!(core.decide(&s, ME, &held, t(0)), vec![keep.clone()]);
        assert_eq!(core.decide(&s, ME, &held, t(1)), vec![]);
        let job = Job::KeepDiverged { dataset: 1 };
        let backoff = core.finished(job, JobOutcome::Failed("zfs: busy".into()), t(2));
        assert_eq!(core.decide(&s, ME, &held, t(3)), vec![]);
        assert_eq!(
            core.decide(&s, ME, &held, t(2) + backoff.unwrap()),
            vec![keep]
        );
        // The same copy where no failover left it is destroyed (the reintroduced bug).
        let mut core = DatasetsCore::new();
        let mut lost = s.clone();
        lost.failover.diverged.clear();
        assert_eq!(
            core.decide(&lost, ME, &held, t(1)),
            vec![DatasetAction::Destroy {
                id: 1,
                name: "db".into()
            }]
        );
    }

    #[test]
    fn a_set_aside_copy_stays_while_kept_or_diverged_and_goes_when_dropped() {
        let mut s = failed_over_from_me();
        let mut seen = copies(&[]);
        seen.asides.push(AsideSeen {
            id: 1,
            name: "db".into(),
            snapshot: diverged_snapshot(1),
        });
        let destroy = DatasetAction::DestroyAside {
            id: 1,
            name: "db".into(),
            snapshot: "diverged-1".into(),
        };
        let only_destroys = |a: Vec<DatasetAction>| {
            a.into_iter()
                .filter(|a| matches!(a, DatasetAction::DestroyAside { .. }))
                .collect::<Vec<_>>()
        };
        let mut core = DatasetsCore::new();
        // Diverged still (the keep is being recorded): stays.
        assert_eq!(only_destroys(core.decide(&s, ME, &seen, t(0))), vec![]);
        ok(
            &mut s,
            Command::KeepDiverged {
                dataset: 1,
                node: ME,
                snapshot: Some("diverged-1".into()),
                at_unix_ms: 1,
            },
        );
        // Kept: stays, and nothing more is set aside.
        assert_eq!(core.decide(&s, ME, &seen, t(1)), vec![]);
        // Another node's kept snapshot of that name is not this one's.
        let mut other = s.clone();
        let kept = other
            .failover
            .kept
            .get_mut(&1)
            .unwrap()
            .remove(&ME)
            .unwrap();
        other.failover.kept.get_mut(&1).unwrap().insert(3, kept);
        assert_eq!(
            only_destroys(core.decide(&other, ME, &seen, t(2))),
            vec![destroy.clone()]
        );
        // Dropped by an operator: goes (unless busy; and not from a failed listing).
        ok(
            &mut s,
            Command::DropKept {
                dataset: 1,
                node: ME,
                snapshot: "diverged-1".into(),
            },
        );
        let mut busy = seen.clone();
        busy.busy.insert(1);
        assert_eq!(only_destroys(core.decide(&s, ME, &busy, t(3))), vec![]);
        let mut failed = seen.clone();
        failed.copies = Err("zfs list: timeout".into());
        assert_eq!(core.decide(&s, ME, &failed, t(3)), vec![]);
        assert_eq!(
            only_destroys(core.decide(&s, ME, &seen, t(3))),
            vec![destroy.clone()]
        );
        // The dataset removed: goes even though its record is kept.
        let mut removed = other.clone();
        let mut keeps = removed.failover.kept.clone();
        keeps
            .get_mut(&1)
            .unwrap()
            .insert(ME, ["diverged-1".to_string()].into());
        removed.failover.kept = keeps;
        removed.datasets.remove(&1);
        assert_eq!(
            only_destroys(core.decide(&removed, ME, &seen, t(4))),
            vec![destroy]
        );
    }

    #[test]
    fn copies_this_node_should_not_hold_are_destroyed_unless_busy_or_unknown_yet() {
        let mut s = cluster(3);
        create(&mut s, "gone", ME); // 1
        create(&mut s, "kept", ME); // 2
        create(&mut s, "elsewhere", 2); // 3
        ok(&mut s, Command::DeleteDataset { dataset: 1 });
        let held = [
            (1, "gone"),
            (2, "kept"),
            (3, "elsewhere"),
            // Same id, another name: a leftover of an older dataset.
            (2, "old"),
            // Newer than this node's state: created while it lagged.
            (4, "future"),
        ];
        let mut core = DatasetsCore::new();
        assert_eq!(
            core.decide(&s, ME, &copies(&held), t(0)),
            vec![
                DatasetAction::Destroy {
                    id: 1,
                    name: "gone".into()
                },
                DatasetAction::Destroy {
                    id: 3,
                    name: "elsewhere".into()
                },
                DatasetAction::Destroy {
                    id: 2,
                    name: "old".into()
                },
            ]
        );
        let mut busy = copies(&held);
        busy.busy.extend([1, 2]);
        assert_eq!(
            core.decide(&s, ME, &busy, t(0)),
            vec![DatasetAction::Destroy {
                id: 3,
                name: "elsewhere".into()
            }]
        );
        // A replica or a move's target keeps its copy.
        s.datasets.get_mut(&3).unwrap().replicas.insert(ME);
        assert_eq!(
            core.decide(&s, ME, &copies(&[(2, "kept"), (3, "elsewhere")]), t(0)),
            vec![]
        );
        s.datasets.get_mut(&3).unwrap().replicas.clear();
        ok(&mut s, Command::BeginDatasetMove { dataset: 3, to: ME });
        assert_eq!(
            core.decide(&s, ME, &copies(&[(2, "kept"), (3, "elsewhere")]), t(0)),
            vec![]
        );
    }

    #[test]
    fn a_move_starts_once_and_after_a_failure_waits_a_growing_backoff() {
        let mut s = replicated();
        ok(&mut s, Command::BeginDatasetMove { dataset: 1, to: 2 });
        let held = copies(&[(1, "db")]);
        let job = Job::Move { dataset: 1, to: 2 };
        let start = DatasetAction::StartMove { dataset: 1, to: 2 };
        let mut core = DatasetsCore::new();
        // Replica 2 is the move's target: only n3 gets a replica push.
        let first = core.decide(&s, ME, &held, t(0));
        assert_eq!(
            first,
            vec![
                start.clone(),
                DatasetAction::Replicate {
                    dataset: 1,
                    to: 3,
                    snapshot: "s1".into(),
                    epoch: 1
                }
            ]
        );
        assert!(!core.decide(&s, ME, &held, t(1)).contains(&start));
        let mut now = 1000;
        let mut backoffs = Vec::new();
        for _ in 0..12 {
            let b = core
                .finished(job, JobOutcome::Failed("unreachable".into()), t(now))
                .unwrap();
            backoffs.push(b.as_millis() as u64);
            let until = now + b.as_millis() as u64;
            assert!(!core.decide(&s, ME, &held, t(until - 1)).contains(&start));
            assert!(core.decide(&s, ME, &held, t(until)).contains(&start));
            now = until;
        }
        assert_eq!(
            backoffs,
            [
                500, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000
            ]
        );
        assert_eq!(core.failures(job).map(|(n, _)| n), Some(12));
        // No room on the receiver: a long wait from the first failure on.
        let b = core.finished(job, JobOutcome::NoSpace("full".into()), t(now));
        assert_eq!(b, Some(MAX_NO_SPACE_BACKOFF));
        // A success forgets the backoff.
        assert_eq!(core.finished(job, JobOutcome::Done, t(now)), None);
        assert!(core.decide(&s, ME, &held, t(now)).contains(&start));
        core.finished(job, JobOutcome::Failed("again".into()), t(now));
        assert!(core.decide(&s, ME, &held, t(now + 500)).contains(&start));
    }

    #[test]
    fn retention_limits_and_stale_holds_are_decided_per_copy() {
        let mut s = replicated();
        for (i, n) in ["move-1", "move-2", "move-3", "move-4"].iter().enumerate() {
            ok(
                &mut s,
                Command::RecordSnapshot {
                    dataset: 1,
                    epoch: 1,
                    snapshot: snap(n, 20 + i as u64, 1),
                },
            );
        }
        ok(
            &mut s,
            Command::SetRetention {
                dataset: 1,
                retention: Some("last=2,hourly=0,daily=0".parse().unwrap()),
            },
        );
        let mut seen = copies(&[(1, "db")]);
        let listed = |snaps: &[&str], limit| {
            Ok(vec![CopySeen {
                id: 1,
                name: "db".into(),
                snapshots: snaps.iter().map(|s| s.to_string()).collect(),
                limit,
            }])
        };
        seen.copies = listed(&["s1", "move-1", "move-2", "move-3", "move-4"], Some(100));
        let mut core = DatasetsCore::new();
        let prunes = |a: &[DatasetAction]| {
            a.iter()
                .filter(|a| matches!(a, DatasetAction::Prune { .. }))
                .count()
        };
        // The replicas have not confirmed their bases: nothing is pruned yet.
        assert_eq!(prunes(&core.decide(&s, ME, &seen, t(0))), 0);
        for r in [2, 3] {
            ok(
                &mut s,
                Command::ReplicaHolds {
                    dataset: 1,
                    epoch: 1,
                    node: r,
                    snapshot: "move-4".into(),
                },
            );
        }
        let actions = core.decide(&s, ME, &seen, t(1));
        assert!(actions.contains(&DatasetAction::Prune {
            dataset: 1,
            epoch: 1,
            names: vec!["move-1".into(), "move-2".into()],
        }));
        // Once: the job runs until it is reported.
        assert_eq!(prunes(&core.decide(&s, ME, &seen, t(2))), 0);
        ok(
            &mut s,
            Command::PruneSnapshots {
                dataset: 1,
                epoch: 1,
                names: vec!["move-1".into(), "move-2".into()],
            },
        );
        core.finished(Job::Prune { dataset: 1 }, JobOutcome::Done, t(3));
        // The copy still holds them: destroyed here, as is nothing newer than the recorded.
        seen.copies = listed(
            &["s1", "move-1", "move-2", "move-3", "move-4", "new"],
            Some(100),
        );
        let actions = core.decide(&s, ME, &seen, t(4));
        assert!(actions.contains(&DatasetAction::DestroySnapshots {
            id: 1,
            name: "db".into(),
            snapshots: vec!["move-1".into(), "move-2".into()],
        }));
        assert_eq!(prunes(&actions), 0);
        // A busy copy is left alone.
        seen.busy.insert(1);
        assert!(!core
            .decide(&s, ME, &seen, t(5))
            .iter()
            .any(|a| matches!(a, DatasetAction::DestroySnapshots { .. })));
        seen.busy.clear();
        // A limit that differs from the recorded one is set, once at a time.
        seen.copies = listed(&["s1", "move-3", "move-4"], Some(50));
        let set = DatasetAction::SetLimit {
            id: 1,
            name: "db".into(),
            limit: Some(100),
        };
        assert!(core.decide(&s, ME, &seen, t(6)).contains(&set));
        assert!(!core.decide(&s, ME, &seen, t(7)).contains(&set));
        // A hold nothing here holds is released; one an operation holds is not.
        ok(
            &mut s,
            Command::HoldDataset {
                dataset: 1,
                epoch: 1,
                reason: "rollback".into(),
            },
        );
        seen.holding.insert(1);
        let release = DatasetAction::Release { dataset: 1 };
        assert!(!core.decide(&s, ME, &seen, t(8)).contains(&release));
        seen.holding.clear();
        assert!(core.decide(&s, ME, &seen, t(9)).contains(&release));
    }

    #[test]
    fn replicas_get_the_newest_snapshot_once() {
        let mut s = replicated();
        let held = copies(&[(1, "db")]);
        let push = |to, snapshot: &str| DatasetAction::Replicate {
            dataset: 1,
            to,
            snapshot: snapshot.into(),
            epoch: 1,
        };
        let mut core = DatasetsCore::new();
        assert_eq!(
            core.decide(&s, ME, &held, t(0)),
            vec![push(2, "s1"), push(3, "s1")]
        );
        // Running: not again.
        assert_eq!(core.decide(&s, ME, &held, t(0)), vec![]);
        let to2 = Job::Replicate { dataset: 1, to: 2 };
        let to3 = Job::Replicate { dataset: 1, to: 3 };
        core.finished(to2, JobOutcome::Done, t(1));
        // Skipped (the state moved on): not known to hold it, so tried again.
        core.finished(to3, JobOutcome::Skipped, t(1));
        assert_eq!(core.decide(&s, ME, &held, t(2)), vec![push(3, "s1")]);
        core.finished(to3, JobOutcome::Failed("reset".into()), t(2));
        assert_eq!(core.decide(&s, ME, &held, t(3)), vec![]);
        assert_eq!(core.decide(&s, ME, &held, t(502)), vec![push(3, "s1")]);
        core.finished(to3, JobOutcome::Done, t(502));
        assert_eq!(core.decide(&s, ME, &held, t(503)), vec![]);
        // A newer snapshot goes to both.
        ok(
            &mut s,
            Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: snap("s2", 12, 1),
            },
        );
        assert_eq!(
            core.decide(&s, ME, &held, t(504)),
            vec![push(2, "s2"), push(3, "s2")]
        );
        // Only the primary pushes.
        let mut core = DatasetsCore::new();
        assert_eq!(core.decide(&s, 2, &copies(&[(1, "db")]), t(0)), vec![]);
    }

    #[test]
    fn it_looks_when_datasets_change_a_job_ends_or_a_while_passed() {
        let mut s = replicated();
        let held = copies(&[(1, "db")]);
        let mut core = DatasetsCore::new();
        assert!(core.due(&s, t(0)));
        core.decide(&s, ME, &held, t(0));
        assert!(!core.due(&s, t(0) + (FULL_LOOK - Duration::from_millis(1))));
        assert!(core.due(&s, t(0) + FULL_LOOK));
        // Key-value writes do not make it look.
        ok(
            &mut s,
            Command::KvPut {
                key: "k".into(),
                value: "v".into(),
            },
        );
        assert!(!core.due(&s, t(1)));
        ok(
            &mut s,
            Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: snap("s2", 12, 1),
            },
        );
        assert!(core.due(&s, t(1)));
        core.decide(&s, ME, &held, t(1));
        assert!(!core.due(&s, t(2)));
        create(&mut s, "other", 2);
        assert!(core.due(&s, t(2)));
        core.decide(&s, ME, &held, t(2));
        assert!(!core.due(&s, t(3)));
        core.finished(Job::Replicate { dataset: 1, to: 2 }, JobOutcome::Done, t(3));
        assert!(core.due(&s, t(3)));
        // A failed listing counts as a look.
        let failed = CopiesSeen {
            copies: Err("x".into()),
            busy: BTreeSet::new(),
            uncertain: BTreeMap::new(),
            holding: BTreeSet::new(),
            asides: Vec::new(),
        };
        core.decide(&s, ME, &failed, t(4));
        assert!(!core.due(&s, t(5)));
    }

    #[test]
    fn a_replica_push_goes_only_from_the_epoch_it_was_decided_under() {
        let mut s = replicated();
        assert!(replica_source(&s, 1, 1).is_some());
        assert!(replica_source(&s, 1, 2).is_none());
        assert!(replica_source(&s, 9, 1).is_none());
        s.datasets.get_mut(&1).unwrap().epoch = 2;
        assert!(replica_source(&s, 1, 1).is_none());
    }
}
