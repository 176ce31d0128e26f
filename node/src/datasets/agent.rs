//! The dataset convergence loop every node runs: it makes the node's backend match the desired
//! state.
//!
//! - A dataset whose primary is this node and that has no copy yet (new, epoch 1, no
//!   snapshots) is created.
//! - A move away from this node runs here: snapshot, record it, push it to the target
//!   (resuming from the newest snapshot both hold), commit the new primary. A push that fails
//!   for lack of space cancels the move; other failures are retried with backoff.
//! - The newest recorded snapshot is pushed to every replica that lacks it.
//! - A copy this node should not hold (removed dataset, finished move elsewhere) is destroyed,
//!   unless a receive or push holds it right now.
//!
//! The loop looks again when the datasets' desired state changes, when a task ends, and every
//! few seconds; the backend is listed only then (zfs listings are child processes).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use flock_scheduler::dataset::DatasetId;
use flock_scheduler::{ApplyError, Command, CommandResult, Dataset, NodeId};

use super::{backend_name, blocking, time_name, Datasets, TransferState};
use crate::cluster::Cluster;
use crate::driver::{Drivers, Kind, RunState};
use crate::transfer::push::{push, PushError};
use crate::transfer::Peers;

const TICK: Duration = Duration::from_millis(300);
const FULL_LOOK: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The most copy rounds of a move's first phase.
const MAX_ROUNDS: u32 = 8;
/// A delta this small goes in the move's last round, with the app stopped.
const SMALL_DELTA: u64 = 4 << 20;
/// How long the move waits for the app using the dataset to stop after the handoff.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a push task is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Job {
    Move(DatasetId, NodeId),
    Replicate(DatasetId, NodeId),
}

struct Agent {
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    peers: Arc<Peers>,
    drivers: Drivers,
    running: HashSet<Job>,
    /// Per replica: the guid it is known to hold, and when to try again after a failure.
    replicated: HashMap<(DatasetId, NodeId), u64>,
    retry_at: HashMap<Job, (Instant, Duration)>,
    /// Datasets whose missing primary copy was already reported.
    reported_missing: HashSet<DatasetId>,
}

/// Runs until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    peers: Arc<Peers>,
    drivers: Drivers,
    mut shutdown: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Job, Result<Option<u64>, String>)>();
    let mut agent = Agent {
        cluster,
        datasets,
        peers,
        drivers,
        running: HashSet::new(),
        replicated: HashMap::new(),
        retry_at: HashMap::new(),
        reported_missing: HashSet::new(),
    };
    if !agent.cluster.caught_up(&mut shutdown).await {
        return;
    }
    let mut seen = None;
    let mut last_look = Instant::now() - FULL_LOOK;
    loop {
        // Only dataset changes matter here; a busy key-value workload must not make the agent
        // list the backend (zfs: child processes) on every tick.
        let desired = {
            let s = agent.cluster.view.read();
            (s.cluster.datasets.clone(), s.cluster.next_dataset_id)
        };
        if seen.as_ref() != Some(&desired) || last_look.elapsed() >= FULL_LOOK {
            seen = Some(desired);
            last_look = Instant::now();
            agent.converge(&done_tx).await;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(TICK) => {}
            Some((job, result)) = done_rx.recv() => {
                agent.finished(job, result);
                last_look = Instant::now() - FULL_LOOK;
            }
        }
    }
}

impl Agent {
    fn finished(&mut self, job: Job, result: Result<Option<u64>, String>) {
        self.running.remove(&job);
        match result {
            Ok(guid) => {
                self.retry_at.remove(&job);
                if let (Job::Replicate(id, node), Some(guid)) = (job, guid) {
                    self.replicated.insert((id, node), guid);
                }
            }
            Err(e) => {
                let backoff = self
                    .retry_at
                    .get(&job)
                    .map_or(Duration::from_millis(500), |(_, b)| {
                        (*b * 2).min(MAX_BACKOFF)
                    });
                tracing::warn!(?job, error = %e, retry_in = ?backoff, "dataset push failed");
                self.retry_at
                    .insert(job, (Instant::now() + backoff, backoff));
            }
        }
    }

    fn may_start(&self, job: Job) -> bool {
        !self.running.contains(&job)
            && self
                .retry_at
                .get(&job)
                .is_none_or(|(at, _)| Instant::now() >= *at)
    }

    async fn converge(&mut self, done: &mpsc::UnboundedSender<(Job, Result<Option<u64>, String>)>) {
        let me = self.cluster.node_id;
        let (desired, next_id): (BTreeMap<DatasetId, Dataset>, DatasetId) = {
            let s = self.cluster.view.read();
            (s.cluster.datasets.clone(), s.cluster.next_dataset_id)
        };
        let local = match self.datasets.local().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this node's datasets");
                return;
            }
        };
        let held: HashMap<DatasetId, u64> = local
            .iter()
            .map(|c| (c.id, c.snapshots.last().map_or(0, |s| s.guid)))
            .collect();
        // Copies this node should not hold.
        for copy in &local {
            let keep = desired
                .get(&copy.id)
                .is_some_and(|d| d.name == copy.name && d.holders().contains(&me));
            // An id this node has not seen created yet is left alone until it has.
            if keep || copy.id >= next_id || self.datasets.busy(copy.id) {
                continue;
            }
            let name = flock_scheduler::dataset::local_name(&copy.name, copy.id);
            tracing::info!(dataset = %copy.name, id = copy.id, "destroying a copy this node no longer holds");
            let r = blocking(&self.datasets.backend, move |b| {
                b.destroy(&flock_dataset::DatasetName::new(name)?)
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(dataset = %copy.name, error = %e, "destroy failed");
            }
        }
        for ds in desired.values().filter(|d| d.primary == me) {
            if !held.contains_key(&ds.id) {
                if ds.snapshots.is_empty() && ds.epoch == 1 && !self.datasets.busy(ds.id) {
                    self.create(ds).await;
                } else if self.reported_missing.insert(ds.id) {
                    tracing::error!(dataset = %ds.name, "this node is the primary but holds no copy");
                }
                continue;
            }
            if let Some(m) = &ds.moving {
                let job = Job::Move(ds.id, m.to);
                if self.may_start(job) {
                    self.running.insert(job);
                    let task = MoveTask {
                        cluster: self.cluster.clone(),
                        datasets: self.datasets.clone(),
                        peers: self.peers.clone(),
                        drivers: self.drivers.clone(),
                    };
                    let (id, to, done) = (ds.id, m.to, done.clone());
                    tokio::spawn(async move {
                        let r = task.run(id, to).await;
                        let _ = done.send((job, r.map(|_| None)));
                    });
                }
            }
            let Some(latest) = ds.latest_snapshot() else {
                continue;
            };
            // A replica that is the move's target gets the move's push instead.
            let target = ds.moving.as_ref().map(|m| m.to);
            for &r in ds.replicas.iter().filter(|&&r| Some(r) != target) {
                let job = Job::Replicate(ds.id, r);
                if self.replicated.get(&(ds.id, r)) == Some(&latest.guid) || !self.may_start(job) {
                    continue;
                }
                self.running.insert(job);
                let task = MoveTask {
                    cluster: self.cluster.clone(),
                    datasets: self.datasets.clone(),
                    peers: self.peers.clone(),
                    drivers: self.drivers.clone(),
                };
                let (ds, snap, done) = (ds.clone(), latest.name.clone(), done.clone());
                tokio::spawn(async move {
                    let r = task.replicate(&ds, r, &snap).await;
                    let _ = done.send((job, r));
                });
            }
        }
    }

    async fn create(&mut self, ds: &Dataset) {
        let _guard = self.datasets.lock(ds.id).await;
        let (name, limit) = match backend_name(ds) {
            Ok(n) => (n, ds.size_limit),
            Err(e) => {
                tracing::error!(dataset = %ds.name, error = %e, "unusable dataset name");
                return;
            }
        };
        let r = blocking(&self.datasets.backend, move |b| {
            if b.info(&name)?.is_none() {
                b.create(&name, limit)?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(()) => tracing::info!(dataset = %ds.name, id = ds.id, "created"),
            Err(e) => tracing::warn!(dataset = %ds.name, error = %e, "create failed"),
        }
    }
}

/// Pushes and moves, run as tasks of the agent.
struct MoveTask {
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    peers: Arc<Peers>,
    drivers: Drivers,
}

impl MoveTask {
    fn current(&self, id: DatasetId) -> Option<Dataset> {
        self.cluster.view.read().cluster.datasets.get(&id).cloned()
    }

    fn node(&self, id: NodeId) -> Result<(String, String), String> {
        let s = self.cluster.view.read();
        s.cluster
            .nodes
            .get(&id)
            .map(|n| (n.name.clone(), n.addr.clone()))
            .ok_or_else(|| format!("node {id} is no longer a member"))
    }

    /// Pushes `snapshot` of `ds` to replica `to`; the guid the replica then holds.
    async fn replicate(
        &self,
        ds: &Dataset,
        to: NodeId,
        snapshot: &str,
    ) -> Result<Option<u64>, String> {
        let (to_name, addr) = self.node(to)?;
        let _guard = self.datasets.share(ds.id).await;
        let Some(ds) = self.current(ds.id).filter(|d| d.epoch == ds.epoch) else {
            return Ok(None);
        };
        let conn = self
            .peers
            .connect(to, &addr)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let guid = ds
            .snapshots
            .iter()
            .find(|s| s.name == snapshot)
            .map(|s| s.guid);
        if let Err(e) = push(
            &conn,
            &self.datasets,
            &self.cluster.view,
            &ds,
            snapshot,
            &to_name,
            |_, _, _| {},
        )
        .await
        {
            if matches!(e, PushError::Connection { .. }) {
                self.peers.forget(to).await;
            }
            return Err(e.to_string());
        }
        Ok(guid)
    }

    /// Carries out the move of `id` to `to` that Raft recorded, until it is committed,
    /// cancelled, or fails for good (the agent runs it again after a failure; every step
    /// starts from what Raft recorded, so a restarted node resumes where the move was).
    ///
    /// A dataset an app uses moves in two phases. One, while the app runs here: snapshot and
    /// push (full, then incremental) in rounds while the delta shrinks. Then the handoff is
    /// recorded; the app's agent here stops it. Two: once it has stopped, a last snapshot and
    /// push carry the final delta, and the commit makes `to` the primary under epoch + 1,
    /// where the app then starts. The downtime is the last round's, whatever the size.
    async fn run(&self, id: DatasetId, to: NodeId) -> Result<(), String> {
        let me = self.cluster.node_id;
        let (to_name, addr) = self.node(to)?;
        let _guard = self.datasets.share(id).await;
        let Some(mut ds) = self.current(id) else {
            return Ok(());
        };
        let Some(moving) = ds.moving.clone().filter(|m| ds.primary == me && m.to == to) else {
            return Ok(());
        };
        let (users, user_kinds): (Vec<String>, Vec<Kind>) = {
            let s = self.cluster.view.read();
            s.cluster
                .apps_of_dataset(id)
                .map(|(n, a)| (n.clone(), Kind::of(a.spec.image.as_deref())))
                .unzip()
        };
        let name = ds.name.clone();
        let progress =
            |phase: &'static str, bytes: Option<u64>, total: Option<u64>, error: Option<String>| {
                self.progress(&name, id, to, phase, bytes, total, error)
            };
        progress("snapshot", Some(0), None, None);
        let conn = match self.peers.connect(to, &addr).await {
            Ok(c) => c,
            Err(e) => {
                let e = format!("{e:#}");
                progress("snapshot", None, None, Some(e.clone()));
                return Err(e);
            }
        };
        if !users.is_empty() && !moving.handoff {
            // Phase one: the app runs on; each round sends what changed since the last.
            let mut last: Option<u64> = None;
            for round in 1..=MAX_ROUNDS {
                let pushed = self
                    .snapshot_and_push(&mut ds, &conn, &to_name, &progress)
                    .await?;
                tracing::info!(dataset = %ds.name, to = %to_name, round, bytes = pushed.bytes, "copied while the app runs");
                if pushed.bytes <= SMALL_DELTA || last.is_some_and(|l| pushed.bytes >= l) {
                    break;
                }
                last = Some(pushed.bytes);
            }
            failpoint_hold("copied").await;
            progress("handoff", None, None, None);
            let handed = self
                .cluster
                .propose(Command::HandoffDatasetMove {
                    dataset: id,
                    epoch: ds.epoch,
                    to,
                })
                .await
                .map_err(|e| e.to_string())?;
            match handed {
                CommandResult::HandedOff => {}
                CommandResult::Rejected(
                    e @ (ApplyError::NoSuchMove { .. } | ApplyError::StaleEpoch { .. }),
                ) => {
                    progress("failed", None, None, Some(e.to_string()));
                    return Ok(());
                }
                other => return Err(format!("recording the handoff: {other:?}")),
            }
        }
        failpoint_hold("handoff").await;
        // Phase two: the app stops (its agent here sees the handoff), then the last delta.
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            // Only once it is seen stopped: a failed look (a driver's listing, an instance's
            // state) may hide an app that still writes.
            let listing = self.drivers.list().await;
            let blocker = listing
                .failed
                .iter()
                .find(|(k, _)| user_kinds.contains(k))
                .map(|(k, why)| format!("the {} driver cannot be read: {why}", k.name()))
                .or_else(|| {
                    listing
                        .instances
                        .iter()
                        .filter(|(i, _)| users.contains(&i.app))
                        .find_map(|(i, _)| match &i.state {
                            RunState::Running { .. } => Some(format!("{} still runs", i.app)),
                            RunState::Unknown { reason } => {
                                Some(format!("{} is in an unknown state: {reason}", i.app))
                            }
                            RunState::Exited { .. } => None,
                        })
                });
            let Some(blocker) = blocker else {
                break;
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the app using {} did not stop here: {blocker}",
                    ds.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let record = self
            .snapshot_and_push(&mut ds, &conn, &to_name, &progress)
            .await?;
        progress("committing", None, None, None);
        let committed = self
            .cluster
            .propose(Command::CommitDatasetMove {
                dataset: id,
                epoch: ds.epoch,
                to,
                snapshot: record.snapshot.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        match committed {
            CommandResult::MoveCommitted { epoch } => {
                tracing::info!(dataset = %ds.name, to = %to_name, epoch, "move committed");
                // Until this node applies the commit, the agent would see the move still
                // pending and start it again.
                let deadline = Instant::now() + Duration::from_secs(5);
                while self.current(id).is_some_and(|d| d.epoch < epoch) && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                progress("done", None, None, None);
                Ok(())
            }
            CommandResult::Rejected(
                e @ (ApplyError::NoSuchMove { .. } | ApplyError::StaleEpoch { .. }),
            ) => {
                // Cancelled, or someone else finished it: nothing left to do.
                progress("failed", None, None, Some(e.to_string()));
                Ok(())
            }
            other => Err(format!("committing the move: {other:?}")),
        }
    }

    /// Takes a snapshot of `ds` here, records it under the dataset's epoch (and in `ds`, so
    /// the next round's push starts from it), and pushes the target every recorded snapshot it
    /// lacks: incremental from the newest one both hold. A target without room cancels the move.
    async fn snapshot_and_push(
        &self,
        ds: &mut Dataset,
        conn: &quinn::Connection,
        to_name: &str,
        progress: &(impl Fn(&'static str, Option<u64>, Option<u64>, Option<String>) + Sync),
    ) -> Result<MoveRound, String> {
        progress("snapshot", None, None, None);
        let record = self
            .datasets
            .snapshot(ds, Some(&format!("move-{}", time_name(SystemTime::now()))))
            .await
            .map_err(|e| e.to_string())?;
        let recorded = self
            .cluster
            .propose(Command::RecordSnapshot {
                dataset: ds.id,
                epoch: ds.epoch,
                snapshot: record.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        if let CommandResult::Rejected(e) = recorded {
            return Err(format!("recording the move's snapshot: {e}"));
        }
        // The snapshot just recorded is part of the history the push carries.
        ds.snapshots.push(record.clone());
        let ds = &*ds;
        let pushed = push(
            conn,
            &self.datasets,
            &self.cluster.view,
            ds,
            &record.name,
            to_name,
            |phase, n, total| progress(phase, Some(n), total, None),
        )
        .await;
        match pushed {
            Ok(p) => {
                tracing::info!(dataset = %ds.name, to = %to_name, base = ?p.base, bytes = p.bytes, "pushed the move's snapshot");
                Ok(MoveRound {
                    snapshot: record.name,
                    bytes: p.bytes,
                })
            }
            Err(e @ PushError::NoSpace { .. }) => {
                let msg = e.to_string();
                progress("failed", None, None, Some(msg.clone()));
                // Waiting cannot make room: give the move up, the dataset stays here.
                let _ = self
                    .cluster
                    .propose(Command::CancelDatasetMove { dataset: ds.id })
                    .await;
                Err(msg)
            }
            Err(e) => {
                if matches!(e, PushError::Connection { .. }) {
                    self.peers
                        .forget(ds.moving.as_ref().map_or(0, |m| m.to))
                        .await;
                }
                let msg = e.to_string();
                progress("retrying", None, None, Some(msg.clone()));
                Err(msg)
            }
        }
    }

    /// What the API reports about a move (bytes: `None` keeps the count).
    #[allow(clippy::too_many_arguments)]
    fn progress(
        &self,
        name: &str,
        id: DatasetId,
        to: NodeId,
        phase: &'static str,
        bytes: Option<u64>,
        total: Option<u64>,
        error: Option<String>,
    ) {
        self.datasets.set_transfer(id, |t| {
            let fresh = || TransferState {
                dataset: name.to_string(),
                id,
                to,
                phase,
                bytes: 0,
                total: None,
                started: Instant::now(),
                last_error: None,
            };
            let t = t.get_or_insert_with(fresh);
            if t.to != to || (matches!(t.phase, "done" | "failed") && phase == "snapshot") {
                *t = fresh();
            }
            if t.phase != phase && matches!(phase, "full" | "incremental") {
                // A new stream: its own byte count and rate.
                t.started = Instant::now();
                t.total = None;
            }
            t.phase = phase;
            if let Some(b) = bytes {
                t.bytes = b;
            }
            if total.is_some() {
                t.total = total;
            }
            if error.is_some() {
                t.last_error = error;
            }
        })
    }
}

/// The environment variable of a fault-injection point for tests: `STEP:MS` makes a move wait
/// MS milliseconds after STEP, `copied` (the first phase's last round) or `handoff` (the handoff
/// recorded, before the app is waited for), so a test can kill a node in that phase.
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

/// One snapshot a move pushed, and the payload bytes it took.
struct MoveRound {
    snapshot: String,
    bytes: u64,
}
