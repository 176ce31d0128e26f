//! The dataset convergence loop every node runs: it makes the node's backend match the desired
//! state. It only observes and acts; the decisions are flock-decide's:
//! [`DatasetsCore`] says which copies to create and destroy, which moves and replica pushes to
//! start and when to retry them; [`Move`] says each next step of a move away from this node.
//!
//! - A dataset whose primary is this node and that has no copy yet is created.
//! - A move away from this node runs here: snapshot, record it, push it to the target
//!   (resuming from the newest snapshot both hold), hand off, wait for the app to stop, the
//!   last round, commit the new primary. A push that fails for lack of space cancels the
//!   move; other failures are retried with backoff.
//! - The newest recorded snapshot is pushed to every replica that lacks it, and the replica's
//!   new base recorded ([`Command::ReplicaHolds`]); a replica without room waits minutes.
//! - Retention: the primary proposes to forget what its dataset's policy prunes; every holder
//!   destroys its copies of snapshots Raft no longer records. A copy's size limit follows the
//!   recorded one; a copy whose data is over its limit is reported loudly.
//! - A hold that no operation here holds any more is released.
//! - A copy this node should not hold (removed dataset, finished move elsewhere) is destroyed,
//!   unless a receive or push holds it right now.
//!
//! The loop looks again when the datasets' desired state changes (it wakes as soon as an entry
//! is applied: a replica push starts right after the snapshot is recorded, a move right after
//! it was asked for), when a task ends, and every few seconds; the backend is listed only then
//! (zfs listings are child processes).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use flock_dataset::{DatasetError, SetAside, SnapshotName};
use flock_decide::datasets::{
    diverged_snapshot, replica_source, AsideSeen, CopiesSeen, CopySeen, DatasetAction,
    DatasetsCore, Job, JobOutcome,
};
use flock_decide::moves::{
    InstanceSeen, InstancesSeen, Move, MoveInput, MovePhase, MoveStep, Progress, PushFailure,
    RunSeen,
};
use flock_scheduler::dataset::{aside_name, local_name, DatasetId};
use flock_scheduler::{Command, CommandResult, NodeId};

use super::{blocking, time_name, Datasets, RecordOrder, StartGate, TransferState};
use crate::cluster::Cluster;
use crate::driver::{Drivers, Listing, RunState};
use crate::lease::unix_ms;
use crate::transfer::push::{push, PushError, Pushed};
use crate::transfer::Peers;

/// How often the loop asks whether a look is due when nothing wakes it earlier (periodic
/// snapshots, retries and the full look every [`flock_decide::datasets::FULL_LOOK`] wait for
/// it; applied entries and finished tasks wake the loop at once).
const TICK: Duration = Duration::from_millis(300);

/// For tests: the environment variable that replaces [`TICK`] (milliseconds), so that a test
/// can show that a replica push or a move does not wait for the tick.
pub const TICK_ENV: &str = "FLOCK_TEST_DATASETS_TICK_MS";

/// The least time between two wake-ups for applied entries.
const MIN_GAP: Duration = Duration::from_millis(5);

fn tick() -> Duration {
    std::env::var(TICK_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(TICK, Duration::from_millis)
}

/// Resolves once Raft's metrics show an applied entry other than `seen` (what the loop looked
/// at last); never when the metrics go away (shutdown).
async fn entry_applied(
    changes: &mut watch::Receiver<flock_raft::types::RaftMetrics>,
    seen: Option<flock_raft::types::LogId>,
) {
    loop {
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if changes.borrow_and_update().last_applied != seen {
            return;
        }
    }
}

/// This node's monotonic clock as the decisions see it: milliseconds since first asked.
fn now() -> flock_decide::Instant {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    flock_decide::Instant::from_millis(
        u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX),
    )
}

/// What the agent and its tasks work with.
struct Executor {
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    peers: Arc<Peers>,
    drivers: Drivers,
}

/// Runs until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    peers: Arc<Peers>,
    drivers: Drivers,
    mut shutdown: watch::Receiver<bool>,
    status: crate::worker::WorkerStatus,
) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Job, JobOutcome)>();
    let ex = Arc::new(Executor {
        cluster,
        datasets,
        peers,
        drivers,
    });
    let mut core = DatasetsCore::new();
    status.idle("catching up with the cluster's log");
    if !ex.cluster.caught_up(&mut shutdown).await {
        return;
    }
    let tick = tick();
    // Every applied entry changes Raft's metrics after the state it applied is readable: the
    // loop wakes on it, and `due` tells whether the datasets' state changed.
    let mut applied = ex.cluster.metrics_watch();
    loop {
        let seen = applied.borrow_and_update().last_applied;
        let due = core.due(&ex.cluster.view.read().cluster, now());
        if due {
            status.running();
            ex.converge(&mut core, &done_tx).await;
            let jobs = core.running().count();
            status.idle(if jobs == 0 {
                "no move or replica push running".to_string()
            } else {
                format!("{jobs} move(s) or replica push(es) running")
            });
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(tick) => {}
            _ = entry_applied(&mut applied, seen) => {
                // At most one look per MIN_GAP under a busy log (most entries are not about
                // datasets: `due` answers those without listing anything).
                tokio::time::sleep(MIN_GAP).await;
            }
            Some((job, outcome)) = done_rx.recv() => {
                let error = match &outcome {
                    JobOutcome::Failed(e) | JobOutcome::NoSpace(e) => e.clone(),
                    _ => String::new(),
                };
                let no_space = matches!(outcome, JobOutcome::NoSpace(_));
                if let Some(backoff) = core.finished(job, outcome, now()) {
                    let failures = core.failures(job).map_or(1, |(n, _)| n);
                    tracing::warn!(?job, error = %error, failures, retry_in = ?backoff, "dataset job failed");
                    status.error(format!("{job:?}: {error}"));
                    ex.show_retry(job, &error, no_space, failures, backoff);
                }
            }
        }
    }
}

impl Executor {
    /// One look: list this node's copies, ask the core, carry out what it says.
    async fn converge(
        self: &Arc<Self>,
        core: &mut DatasetsCore,
        done: &mpsc::UnboundedSender<(Job, JobOutcome)>,
    ) {
        let me = self.cluster.node_id;
        let mut asides = Vec::new();
        let copies = match self.datasets.local_all().await {
            Ok((l, a)) => {
                self.note_over_limit(&l);
                asides = a
                    .into_iter()
                    .map(|a| AsideSeen {
                        id: a.id,
                        name: a.name,
                        snapshot: a.snapshot,
                    })
                    .collect();
                Ok(l.into_iter()
                    .map(|c| CopySeen {
                        id: c.id,
                        name: c.name,
                        snapshots: c.snapshots.iter().map(|s| s.name.to_string()).collect(),
                        limit: c.limit,
                    })
                    .collect())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this node's datasets");
                Err(e.to_string())
            }
        };
        let seen = CopiesSeen {
            copies,
            busy: self.datasets.busy_ids(),
            uncertain: self.datasets.uncertain(),
            holding: self.datasets.held_here(),
            asides,
        };
        let actions = {
            let s = self.cluster.view.read();
            core.decide(&s.cluster, me, &seen, now())
        };
        if !actions.is_empty() {
            tracing::debug!(?actions, "datasets: a look decided");
        }
        for action in actions {
            match action {
                DatasetAction::Destroy { id, name } => self.destroy(id, &name).await,
                DatasetAction::Create {
                    id,
                    name,
                    size_limit,
                } => self.create(id, &name, size_limit).await,
                DatasetAction::StartMove { dataset, to } => {
                    let (ex, done) = (self.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = match ex.run_move(dataset, to).await {
                            Ok(()) => JobOutcome::Done,
                            Err(e) => JobOutcome::Failed(e),
                        };
                        let _ = done.send((Job::Move { dataset, to }, outcome));
                    });
                }
                DatasetAction::Replicate {
                    dataset,
                    to,
                    snapshot,
                    epoch,
                } => {
                    let (ex, done) = (self.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = ex.replicate(dataset, to, &snapshot, epoch).await;
                        let _ = done.send((Job::Replicate { dataset, to }, outcome));
                    });
                }
                DatasetAction::ReportMissing { name, .. } => {
                    tracing::error!(dataset = %name, "this node is the primary but holds no copy");
                }
                DatasetAction::Prune {
                    dataset,
                    epoch,
                    names,
                } => {
                    let cmd = Command::PruneSnapshots {
                        dataset,
                        epoch,
                        names,
                    };
                    self.spawn_proposal(Job::Prune { dataset }, cmd, done);
                }
                DatasetAction::Release { dataset } => {
                    tracing::warn!(dataset, "releasing a hold no operation here holds (flockd restarted during a rollback?)");
                    let cmd = Command::ReleaseDataset { dataset };
                    self.spawn_proposal(Job::Release { dataset }, cmd, done);
                }
                DatasetAction::DestroySnapshots { id, name, .. } => {
                    self.destroy_forgotten(id, &name).await
                }
                DatasetAction::Snapshot { dataset, epoch } => {
                    let (ex, done) = (self.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = ex.periodic_snapshot(dataset, epoch).await;
                        let _ = done.send((Job::Snapshot { dataset }, outcome));
                    });
                }
                DatasetAction::AddReplica {
                    dataset,
                    epoch,
                    node,
                } => {
                    tracing::info!(dataset, node, "adding a replica");
                    let cmd = Command::AddReplica {
                        dataset,
                        epoch,
                        node,
                    };
                    self.spawn_proposal(Job::AddReplica { dataset }, cmd, done);
                }
                DatasetAction::KeepDiverged {
                    dataset,
                    name,
                    epoch,
                    common,
                } => {
                    let (ex, done) = (self.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = ex.keep_diverged(dataset, &name, epoch, common).await;
                        let _ = done.send((Job::KeepDiverged { dataset }, outcome));
                    });
                }
                DatasetAction::DestroyAside { id, name, snapshot } => {
                    self.destroy_aside(id, &name, &snapshot).await
                }
                DatasetAction::SetLimit { id, name, limit } => {
                    let (ex, done) = (self.clone(), done.clone());
                    tokio::spawn(async move {
                        let outcome = ex.set_limit(id, &name, limit).await;
                        let _ = done.send((Job::SetLimit { dataset: id }, outcome));
                    });
                }
            }
        }
    }

    /// Takes and records a periodic snapshot (`auto-TIME`) of `dataset`, under its lock, if
    /// this node is still its primary at `epoch`; the replica pushes carry it on.
    async fn periodic_snapshot(&self, dataset: DatasetId, epoch: u64) -> JobOutcome {
        let Some(_guard) = self.datasets.try_lock(dataset) else {
            return JobOutcome::Skipped;
        };
        let ds = self
            .cluster
            .view
            .read()
            .cluster
            .datasets
            .get(&dataset)
            .cloned();
        let Some(ds) = ds.filter(|d| d.primary == self.cluster.node_id && d.epoch == epoch) else {
            return JobOutcome::Skipped;
        };
        let tag = format!("auto-{}", time_name(SystemTime::now()));
        match self
            .datasets
            .snapshot_and_record(&self.cluster, &ds, Some(&tag))
            .await
        {
            Ok(_) => JobOutcome::Done,
            Err(e) => JobOutcome::Failed(e.to_string()),
        }
    }

    /// Proposes `cmd` as `job`: done if it applied, failed (and retried) otherwise.
    fn spawn_proposal(
        self: &Arc<Self>,
        job: Job,
        cmd: Command,
        done: &mpsc::UnboundedSender<(Job, JobOutcome)>,
    ) {
        let (ex, done) = (self.clone(), done.clone());
        tokio::spawn(async move {
            let outcome = match ex.cluster.propose(cmd).await {
                Ok(CommandResult::Rejected(e)) => JobOutcome::Failed(e.to_string()),
                Ok(_) => JobOutcome::Done,
                Err(e) => JobOutcome::Failed(e.to_string()),
            };
            let _ = done.send((job, outcome));
        });
    }

    /// Destroys this node's copies of snapshots of dataset `id` that Raft no longer records:
    /// under the dataset's exclusive lock (nothing pushes or snapshots it meanwhile), and only
    /// those the decision still names against the copy and state as they are then.
    async fn destroy_forgotten(&self, id: DatasetId, name: &str) {
        let Some(_guard) = self.datasets.try_lock(id) else {
            return;
        };
        let Some(ds) = self.cluster.view.read().cluster.datasets.get(&id).cloned() else {
            return;
        };
        let copy = match self.datasets.local_copy(&ds).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(dataset = %name, error = %e, "cannot list the copy's snapshots");
                return;
            }
        };
        let local: Vec<String> = copy.snapshots.iter().map(|s| s.name.to_string()).collect();
        let uncertain = self.datasets.uncertain().remove(&id).unwrap_or_default();
        let forgotten = flock_decide::retention::local_to_destroy(&ds, &local, &uncertain);
        if forgotten.is_empty() {
            return;
        }
        let backend_name = local_name(name, id);
        let count = forgotten.len();
        let r = blocking(&self.datasets.backend, move |b| {
            let ds = flock_dataset::DatasetName::new(backend_name)?;
            for snap in forgotten {
                b.destroy_snapshot(&ds, &flock_dataset::SnapshotName::new(snap)?)?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(()) => {
                tracing::info!(dataset = %name, count, "destroyed snapshots the cluster no longer records")
            }
            Err(e) => {
                tracing::warn!(dataset = %name, error = %e, "destroying forgotten snapshots failed")
            }
        }
    }

    /// Gives this node's copy of dataset `id` the size limit `limit`.
    async fn set_limit(&self, id: DatasetId, name: &str, limit: Option<u64>) -> JobOutcome {
        let _guard = self.datasets.lock(id).await;
        let backend_name = local_name(name, id);
        let r = blocking(&self.datasets.backend, move |b| {
            b.set_limit(&flock_dataset::DatasetName::new(backend_name)?, limit)
        })
        .await;
        match r {
            Ok(()) => {
                tracing::info!(dataset = %name, ?limit, "size limit set");
                JobOutcome::Done
            }
            Err(e) => {
                tracing::error!(dataset = %name, ?limit, error = %e, "cannot set the size limit");
                JobOutcome::Failed(e.to_string())
            }
        }
    }

    /// Says loudly (once, when it happens) that a copy's data went over its limit (the dir
    /// backend cannot stop writes), and when it is back under.
    fn note_over_limit(&self, copies: &[super::LocalCopy]) {
        let over: std::collections::BTreeMap<DatasetId, (u64, u64)> = copies
            .iter()
            .filter_map(|c| Some((c.id, (c.over_limit()?, c.limit?))))
            .collect();
        let before: Vec<DatasetId> = copies
            .iter()
            .filter(|c| self.datasets.over_limit(c.id).is_some() && !over.contains_key(&c.id))
            .map(|c| c.id)
            .collect();
        for id in self.datasets.note_over_limit(over.clone()) {
            let c = copies.iter().find(|c| c.id == id);
            let name = c.map_or("", |c| c.name.as_str());
            let (bytes, limit) = over[&id];
            tracing::warn!(dataset = %name, over_bytes = bytes, limit,
                "dataset is over its size limit: its app wrote past it (free space in it, or raise it with `flockctl dataset set NAME --size`)");
        }
        for id in before {
            let name = copies
                .iter()
                .find(|c| c.id == id)
                .map_or("", |c| c.name.as_str());
            tracing::info!(dataset = %name, "dataset is within its size limit again");
        }
    }

    /// Shows a failed move or replica push in the transfers the API reports: why, when it is
    /// tried again, and for a receiver without room, that it is degraded.
    fn show_retry(&self, job: Job, error: &str, no_space: bool, failures: u32, backoff: Duration) {
        let (dataset, to, kind) = match job {
            Job::Replicate { dataset, to } => (dataset, to, super::TransferKind::Replica),
            Job::Move { dataset, to } => (dataset, to, super::TransferKind::Move),
            _ => return,
        };
        let name = self
            .cluster
            .view
            .read()
            .cluster
            .datasets
            .get(&dataset)
            .map_or_else(String::new, |d| d.name.clone());
        let now = std::time::Instant::now();
        self.datasets.set_transfer(dataset, to, |t| {
            let t = t.get_or_insert_with(|| {
                TransferState::new(kind, name, dataset, to, MovePhase::Retrying, now)
            });
            t.phase = MovePhase::Retrying;
            t.retry_at = Some(now + backoff);
            t.degraded = no_space.then(|| error.to_string());
            t.last_error = Some(format!(
                "{} failed {failures} time(s) in a row; next try in {}s: {error}",
                match kind {
                    super::TransferKind::Move => "the move",
                    super::TransferKind::Replica => "the replica push",
                },
                backoff.as_secs()
            ));
        });
    }

    async fn destroy(&self, id: DatasetId, name: &str) {
        // A task that took the dataset since the look keeps it.
        let Some(_guard) = self.datasets.try_lock(id) else {
            return;
        };
        tracing::info!(dataset = %name, id, "destroying a copy this node no longer holds");
        let local = local_name(name, id);
        let r = blocking(&self.datasets.backend, move |b| {
            b.destroy(&flock_dataset::DatasetName::new(local)?)
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(dataset = %name, error = %e, "destroy failed");
        }
    }

    /// Sets this node's diverged copy of `dataset` aside under snapshot `diverged-EPOCH` and
    /// restarts it from `common` ([`flock_dataset::set_aside`]), then records that: the node
    /// is a replica again and the writes only it has are kept. Under the dataset's lock, and
    /// only while Raft still says the copy diverged under `epoch`. Repeated until recorded:
    /// every step is idempotent.
    async fn keep_diverged(
        &self,
        dataset: DatasetId,
        name: &str,
        epoch: u64,
        common: Option<String>,
    ) -> JobOutcome {
        let me = self.cluster.node_id;
        let Some(_guard) = self.datasets.try_lock(dataset) else {
            return JobOutcome::Skipped;
        };
        let still = self
            .cluster
            .view
            .read()
            .cluster
            .failover
            .diverged
            .get(&dataset)
            .and_then(|m| m.get(&me))
            .is_some_and(|d| d.epoch == epoch);
        if !still {
            return JobOutcome::Skipped;
        }
        let snapshot = diverged_snapshot(epoch);
        let names = (|| {
            Ok::<_, DatasetError>((
                flock_dataset::DatasetName::new(local_name(name, dataset))?,
                flock_dataset::DatasetName::new(aside_name(name, dataset, &snapshot))?,
                SnapshotName::new(snapshot.clone())?,
                common.map(SnapshotName::new).transpose()?,
            ))
        })();
        let (local, aside, keep, common) = match names {
            Ok(n) => n,
            Err(e) => return JobOutcome::Failed(e.to_string()),
        };
        let set = blocking(&self.datasets.backend, move |b| {
            flock_dataset::set_aside(b, &local, &aside, &keep, common.as_ref())
        })
        .await;
        let kept = match set {
            Ok(SetAside::Nothing) => None,
            Ok(SetAside::Kept { restarted }) => {
                tracing::warn!(
                    dataset = %name,
                    snapshot = %snapshot,
                    restarted,
                    "kept the writes this node made as primary before a failover (they are not on the new primary); `flockctl dataset snapshot rm` removes them"
                );
                Some(snapshot.clone())
            }
            Err(e) => return JobOutcome::Failed(format!("setting the diverged copy aside: {e}")),
        };
        let cmd = Command::KeepDiverged {
            dataset,
            node: me,
            snapshot: kept.clone(),
            at_unix_ms: unix_ms(),
        };
        match self.cluster.propose(cmd).await {
            Ok(CommandResult::DivergedKept) => JobOutcome::Done,
            // An operator gave the copy up meanwhile (`dataset drop-diverged`), or an earlier
            // proposal of ours applied: either way nothing is left to do here.
            Ok(CommandResult::Rejected(e)) => {
                let s = self.cluster.view.read();
                if s.cluster.failover.is_diverged(dataset, me) {
                    JobOutcome::Failed(e.to_string())
                } else {
                    JobOutcome::Skipped
                }
            }
            Ok(other) => JobOutcome::Failed(format!("unexpected result {other:?}")),
            Err(e) => JobOutcome::Failed(e.to_string()),
        }
    }

    /// Destroys the copy where this node set aside the diverged writes of dataset `id`, once
    /// its kept snapshot is no longer recorded (an operator removed it, or the dataset).
    async fn destroy_aside(&self, id: DatasetId, name: &str, snapshot: &str) {
        let Some(_guard) = self.datasets.try_lock(id) else {
            return;
        };
        tracing::info!(dataset = %name, snapshot, "destroying the diverged writes an operator removed");
        let aside = aside_name(name, id, snapshot);
        let r = blocking(&self.datasets.backend, move |b| {
            b.destroy(&flock_dataset::DatasetName::new(aside)?)
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(dataset = %name, snapshot, error = %e, "destroying the kept diverged copy failed");
        }
    }

    async fn create(&self, id: DatasetId, name: &str, limit: Option<u64>) {
        let _guard = self.datasets.lock(id).await;
        let backend_name = match flock_dataset::DatasetName::new(local_name(name, id)) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(dataset = %name, error = %e, "unusable dataset name");
                return;
            }
        };
        let r = blocking(&self.datasets.backend, move |b| {
            if b.info(&backend_name)?.is_none() {
                b.create(&backend_name, limit)?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(()) => tracing::info!(dataset = %name, id, "created"),
            Err(e) => tracing::warn!(dataset = %name, error = %e, "create failed"),
        }
    }

    fn node(&self, id: NodeId) -> Result<(String, String), String> {
        let s = self.cluster.view.read();
        s.cluster
            .nodes
            .get(&id)
            .map(|n| (n.name.clone(), n.addr.clone()))
            .ok_or_else(|| format!("node {id} is no longer a member"))
    }

    /// Counts a push of `dataset` (`kind`: move or replica) that ended as `pushed`.
    fn count_push(&self, dataset: &str, kind: &str, pushed: &Result<Pushed, PushError>) {
        let d = &self.cluster.prometheus.datasets;
        let labels = [("dataset", dataset.to_string()), ("kind", kind.to_string())];
        match pushed {
            Ok(p) => {
                d.pushes.get_or_create(&labels).inc();
                d.push_bytes.get_or_create(&labels).inc_by(p.bytes);
            }
            Err(_) => {
                d.push_failures.get_or_create(&labels).inc();
            }
        }
    }

    /// Pushes recorded `snapshot` of dataset `id` to replica `to`, if the dataset is still at
    /// `epoch`.
    async fn replicate(&self, id: DatasetId, to: NodeId, snapshot: &str, epoch: u64) -> JobOutcome {
        let (to_name, addr) = match self.node(to) {
            Ok(n) => n,
            Err(e) => return JobOutcome::Failed(e),
        };
        let _guard = self.datasets.share(id).await;
        let ds = replica_source(&self.cluster.view.read().cluster, id, epoch).cloned();
        let Some(ds) = ds else {
            return JobOutcome::Skipped;
        };
        let conn = match self.peers.connect(to, &addr).await {
            Ok(c) => c,
            Err(e) => return JobOutcome::Failed(format!("{e:#}")),
        };
        let report = PushReport {
            datasets: &self.datasets,
            kind: super::TransferKind::Replica,
            name: ds.name.clone(),
            id,
            to,
        };
        report.begin(MovePhase::Full);
        let pushed = push(
            &conn,
            &self.datasets,
            &self.cluster.view,
            &ds,
            snapshot,
            &to_name,
            |phase, bytes, total| report.show_push(phase, bytes, total),
        )
        .await;
        if pushed.is_ok() {
            report.done();
        }
        self.count_push(&ds.name, "replica", &pushed);
        match pushed {
            Ok(_) => {}
            Err(e @ PushError::NoSpace { .. }) => return JobOutcome::NoSpace(e.to_string()),
            Err(e) => {
                if matches!(e, PushError::Connection { .. }) {
                    self.peers.forget(to).await;
                }
                return JobOutcome::Failed(e.to_string());
            }
        }
        // The replica holds `snapshot` now: record it as the base of its next push, which
        // retention keeps.
        if ds.bases.get(&to).map(String::as_str) == Some(snapshot) {
            return JobOutcome::Done;
        }
        tracing::debug!(dataset = %ds.name, to = %to_name, snapshot, "replica push done, recording the replica's base");
        let cmd = Command::ReplicaHolds {
            dataset: id,
            epoch,
            node: to,
            snapshot: snapshot.to_string(),
        };
        match self.cluster.propose(cmd).await {
            Ok(CommandResult::ReplicaRecorded) => JobOutcome::Done,
            // The state moved on (a new epoch, a pruned snapshot): the next look decides anew.
            Ok(CommandResult::Rejected(_)) => JobOutcome::Skipped,
            Ok(other) => JobOutcome::Failed(format!("recording the replica's base: {other:?}")),
            Err(e) => JobOutcome::Failed(format!("recording the replica's base: {e}")),
        }
    }

    /// Runs one attempt of the move of `id` to `to` that Raft recorded, step by step as
    /// [`Move`] says, until it is committed, cancelled, or fails (the core starts another
    /// attempt after a backoff; every attempt starts from what Raft recorded, so a restarted
    /// node resumes where the move was).
    async fn run_move(&self, id: DatasetId, to: NodeId) -> Result<(), String> {
        let _share = self.datasets.share(id).await;
        let name = self
            .cluster
            .view
            .read()
            .cluster
            .datasets
            .get(&id)
            .map_or_else(String::new, |d| d.name.clone());
        let report = PushReport {
            datasets: &self.datasets,
            kind: super::TransferKind::Move,
            name,
            id,
            to,
        };
        report.begin(MovePhase::Snapshot);
        let mut timer = MoveTimer::new(&self.cluster.prometheus);
        let r = self.move_steps(id, to, &report, &mut timer).await;
        timer.ended(r.is_ok());
        r
    }

    /// The steps of one attempt of a move ([`run_move`](Self::run_move)).
    async fn move_steps(
        &self,
        id: DatasetId,
        to: NodeId,
        report: &PushReport<'_>,
        timer: &mut MoveTimer<'_>,
    ) -> Result<(), String> {
        let me = self.cluster.node_id;
        let mut mv = Move::new(id, to);
        let mut conn: Option<(quinn::Connection, String)> = None;
        // Held from the stop check until the attempt ends.
        let mut _gate: Option<StartGate> = None;
        // Held from taking a snapshot until its record's outcome is known.
        let mut _order: Option<RecordOrder> = None;
        loop {
            let step = {
                let s = self.cluster.view.read();
                mv.next(&s.cluster, me, now())
            };
            if !matches!(step, MoveStep::ProposeRecord { .. }) {
                _order = None;
            }
            if matches!(step, MoveStep::ProposeHandoff { .. }) {
                failpoint_hold("copied").await;
            }
            while let Some(p) = mv.poll_progress() {
                timer.phase(p.phase);
                report.show_progress(p);
            }
            match step {
                MoveStep::Connect { name, addr, .. } => {
                    let r = match self.peers.connect(to, &addr).await {
                        Ok(c) => {
                            conn = Some((c, name));
                            Ok(())
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    mv.observe(MoveInput::Connected(r));
                }
                MoveStep::TakeSnapshot { dataset } => {
                    _order = Some(self.datasets.record_order(id).await);
                    let tag = format!("move-{}", time_name(SystemTime::now()));
                    let r = self.datasets.snapshot(&dataset, Some(&tag)).await;
                    let handed_off = self
                        .cluster
                        .view
                        .read()
                        .cluster
                        .datasets
                        .get(&id)
                        .and_then(|d| d.moving.as_ref())
                        .is_some_and(|m| m.handoff);
                    if handed_off {
                        // The last snapshot is taken, not recorded yet.
                        failpoint_hold("final-snapshot").await;
                    }
                    mv.observe(MoveInput::Snapshot(r.map_err(|e| e.to_string())));
                }
                MoveStep::Push { dataset, snapshot } => {
                    let Some((conn, to_name)) = &conn else {
                        // Next never asks for a push before the connect succeeded.
                        return Err("internal: a push before connecting".into());
                    };
                    timer.push_started();
                    let pushed = push(
                        conn,
                        &self.datasets,
                        &self.cluster.view,
                        &dataset,
                        &snapshot,
                        to_name,
                        {
                            let report = &report;
                            move |phase, n, total| report.show_push(phase, n, total)
                        },
                    )
                    .await;
                    self.count_push(&dataset.name, "move", &pushed);
                    let r = match pushed {
                        Ok(p) => {
                            tracing::info!(dataset = %dataset.name, to = %to_name, base = ?p.base, bytes = p.bytes, "pushed the move's snapshot");
                            if p.base.is_some() {
                                timer.push_was_incremental();
                            }
                            Ok(p.bytes)
                        }
                        Err(e @ PushError::NoSpace { .. }) => {
                            Err(PushFailure::NoSpace(e.to_string()))
                        }
                        Err(e) => {
                            if matches!(e, PushError::Connection { .. }) {
                                self.peers.forget(to).await;
                            }
                            Err(PushFailure::Other(e.to_string()))
                        }
                    };
                    mv.observe(MoveInput::Pushed(r));
                }
                MoveStep::ProposeRecord { .. }
                | MoveStep::ProposeCancel { .. }
                | MoveStep::ProposeHandoff { .. }
                | MoveStep::ProposeCommit { .. } => {
                    let Some(cmd) = step.command() else {
                        return Err("internal: a proposal without a command".into());
                    };
                    if matches!(step, MoveStep::ProposeHandoff { .. }) {
                        timer.handing_off();
                    }
                    let r = self.cluster.propose(cmd).await.map_err(|e| e.to_string());
                    if let (Err(_), MoveStep::ProposeRecord { snapshot, .. }) = (&r, &step) {
                        self.datasets.record_uncertain(id, &snapshot.name);
                    }
                    if let Ok(CommandResult::MoveCommitted { epoch }) = &r {
                        tracing::info!(dataset = %report.name, to, epoch, "move committed");
                        timer.committed();
                    }
                    mv.observe(MoveInput::Proposed(r));
                }
                MoveStep::AwaitHandoffApplied { until }
                | MoveStep::AwaitApplied { until, .. }
                | MoveStep::Wait(until) => {
                    tokio::time::sleep(until.saturating_since(now())).await;
                }
                MoveStep::TakeStartGate { dataset } => {
                    failpoint_hold("handoff").await;
                    _gate = Some(self.datasets.start_gate(dataset).await);
                    mv.observe(MoveInput::GateHeld);
                }
                MoveStep::ObserveUsers { .. } => {
                    let seen = instances_seen(self.drivers.list().await);
                    mv.observe(MoveInput::Users(seen));
                }
                MoveStep::Done => return Ok(()),
                MoveStep::Failed(e) => return Err(e),
            }
        }
    }
}

/// Times one attempt of a move for the metrics: each phase, the downtime (from proposing the
/// handoff, when the app is told to stop, to the commit, when the target may start it), and
/// how the attempt ended.
struct MoveTimer<'a> {
    metrics: &'a crate::metrics::Metrics,
    phase: Option<(MovePhase, std::time::Instant)>,
    handoff: Option<std::time::Instant>,
    committed: bool,
}

impl<'a> MoveTimer<'a> {
    fn new(metrics: &'a crate::metrics::Metrics) -> Self {
        MoveTimer {
            metrics,
            phase: Some((MovePhase::Snapshot, std::time::Instant::now())),
            handoff: None,
            committed: false,
        }
    }

    /// The move reports `phase`: the one before it, if another, ended now.
    fn phase(&mut self, phase: MovePhase) {
        if self.phase.is_some_and(|(p, _)| p == phase) {
            return;
        }
        self.close_phase();
        if phase.is_active() {
            self.phase = Some((phase, std::time::Instant::now()));
        }
    }

    /// A push of the first phase starts (the last round's push counts as the final delta):
    /// timed as a full one until [`push_was_incremental`](Self::push_was_incremental).
    fn push_started(&mut self) {
        let first_phase = matches!(
            self.phase,
            Some((
                MovePhase::Snapshot | MovePhase::Full | MovePhase::Incremental,
                _
            ))
        );
        if first_phase {
            self.close_phase();
            self.phase = Some((MovePhase::Full, std::time::Instant::now()));
        }
    }

    fn push_was_incremental(&mut self) {
        if let Some((p @ MovePhase::Full, _)) = &mut self.phase {
            *p = MovePhase::Incremental;
        }
    }

    fn close_phase(&mut self) {
        if let Some((p, since)) = self.phase.take() {
            self.metrics
                .moves
                .phase_seconds
                .get_or_create(&[("phase", p.as_str().to_string())])
                .observe(since.elapsed().as_secs_f64());
        }
    }

    fn handing_off(&mut self) {
        self.handoff.get_or_insert_with(std::time::Instant::now);
    }

    fn committed(&mut self) {
        self.committed = true;
        if let Some(at) = self.handoff {
            self.metrics
                .moves
                .downtime_seconds
                .observe(at.elapsed().as_secs_f64());
        }
    }

    /// The attempt ended: committed, failed, or (neither) it found the move done elsewhere.
    fn ended(&mut self, ok: bool) {
        self.close_phase();
        let result = match (self.committed, ok) {
            (true, _) => "committed",
            (false, false) => "failed",
            (false, true) => return,
        };
        self.metrics
            .moves
            .moves
            .get_or_create(&[("result", result.to_string())])
            .inc();
    }
}

/// What the API reports about one push job, a move's or a replica's
/// ([`Datasets::set_transfer`]).
struct PushReport<'a> {
    datasets: &'a Datasets,
    kind: super::TransferKind,
    name: String,
    id: DatasetId,
    to: NodeId,
}

impl PushReport<'_> {
    /// An attempt starts in `phase`: the job's first (or the first after one that ended well),
    /// or the next after a failed one, whose bytes, rate and ETA no longer count.
    fn begin(&self, phase: MovePhase) {
        let now = std::time::Instant::now();
        self.datasets.set_transfer(self.id, self.to, |t| match t {
            Some(t) if t.kind == self.kind && t.phase != MovePhase::Done => {
                t.new_attempt(t.attempt + 1, now);
                t.phase = phase;
            }
            _ => {
                *t = Some(TransferState::new(
                    self.kind,
                    self.name.clone(),
                    self.id,
                    self.to,
                    phase,
                    now,
                ))
            }
        })
    }

    /// Shows a move's progress `p`.
    fn show_progress(&self, p: Progress) {
        let now = std::time::Instant::now();
        self.datasets.set_transfer(self.id, self.to, |t| {
            let Some(t) = t else { return };
            t.phase = p.phase;
            if let Some(b) = p.bytes {
                t.set_bytes(b, now);
            }
            if p.error.is_some() {
                t.last_error = p.error;
            }
            if p.phase == MovePhase::Done {
                t.degraded = None;
                t.retry_at = None;
            }
        })
    }

    /// The job ended well (a replica push; a move shows its own end).
    fn done(&self) {
        self.show_progress(Progress {
            phase: MovePhase::Done,
            bytes: None,
            error: None,
        });
    }

    /// A push's progress: its stream's kind by name, the push's bytes so far and the expected
    /// total (both counted over the whole push, so its rate spans its streams).
    fn show_push(&self, stream: &str, bytes: u64, total: Option<u64>) {
        let now = std::time::Instant::now();
        self.datasets.set_transfer(self.id, self.to, |t| {
            let Some(t) = t else { return };
            t.phase = t.phase.streaming(stream);
            t.set_bytes(bytes, now);
            if total.is_some() {
                t.total = total;
            }
        })
    }
}

/// The drivers' instances as the decisions read them.
pub(crate) fn instances_seen(listing: Listing) -> InstancesSeen {
    InstancesSeen {
        instances: listing
            .instances
            .into_iter()
            .map(|(i, k)| InstanceSeen {
                driver: k,
                run: match i.state {
                    RunState::Running { .. } => RunSeen::Running,
                    RunState::Exited { .. } => RunSeen::Exited,
                    RunState::Unknown { reason } => RunSeen::Unknown { reason },
                },
                app: i.app,
            })
            .collect(),
        failed: listing.failed,
    }
}

/// The environment variable of a fault-injection point for tests: `STEP:MS` makes a move wait
/// MS milliseconds after STEP, `copied` (the first phase's last round), `handoff` (the handoff
/// recorded, before the app is waited for) or `final-snapshot` (the last snapshot taken, not yet
/// recorded), so a test can kill a node in that phase or act beside it.
pub const MOVE_HOLD_FAILPOINT: &str = "FLOCK_FAILPOINT_MOVE_HOLD";

async fn failpoint_hold(step: &str) {
    let Ok(v) = std::env::var(MOVE_HOLD_FAILPOINT) else {
        return;
    };
    let ms = v
        .split_once(':')
        .filter(|(s, _)| *s == step)
        .and_then(|(_, ms)| ms.parse::<u64>().ok());
    if let Some(ms) = ms {
        tracing::warn!(step, ms, "failpoint: holding the move");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
