//! A node's datasets: the storage backend it was configured with, the operations the API and the
//! agent carry out on it, and the pushes it runs.
//!
//! - [`StorageChoice`]: `dir` (the embedded default, under the data dir) or `zfs` on a pool,
//!   recorded in the data dir at creation so a restart uses the same one.
//! - [`Datasets`]: one per node. Work on one dataset takes its lock: shared for what only adds
//!   to it or reads it (snapshots, pushes out), exclusive for what changes or removes what is
//!   there (create, receive, rollback, destroy); backend calls run on `spawn_blocking`. Starting
//!   an app on a dataset and a move's stop check take its start gate
//!   ([`Datasets::start_gate`]).
//! - [`agent`]: the convergence loop that makes the node's backend match the desired state.
//! - [`record`]: snapshot-then-record, the one way a primary takes a snapshot the cluster knows.
//!
//! A dataset's name on the backend is `NAME.ID` ([`flock_scheduler::dataset::local_name`]).

pub mod agent;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use flock_dataset::{Backend, DatasetError, DatasetName, DirBackend, SnapshotName, ZfsBackend};
use flock_decide::moves::MovePhase;
use flock_scheduler::dataset::{parse_aside_name, parse_local_name, DatasetId};
use flock_scheduler::{Dataset, NodeId, SnapshotRecord};

use crate::datadir::DataDir;

const STORAGE_FILE: &str = "storage.json";

/// Where a node keeps its datasets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StorageChoice {
    /// Plain directories under `DATA_DIR/storage`.
    Dir,
    /// File systems under `pool` (`POOL` or `POOL/PATH`), through the zfs CLI.
    Zfs { pool: String },
}

impl StorageChoice {
    /// From flockd's `--backend` and `--zfs-pool`.
    pub fn from_flags(backend: Option<&str>, pool: Option<&str>) -> anyhow::Result<Option<Self>> {
        match (backend, pool) {
            (None, None) => Ok(None),
            (Some("dir"), None) => Ok(Some(StorageChoice::Dir)),
            (Some("dir"), Some(_)) => {
                anyhow::bail!("--zfs-pool goes with --backend zfs, not --backend dir")
            }
            (Some("zfs") | None, Some(p)) => Ok(Some(StorageChoice::Zfs {
                pool: p.to_string(),
            })),
            (Some("zfs"), None) => {
                anyhow::bail!("--backend zfs needs --zfs-pool POOL (a pool `zpool list` shows)")
            }
            (Some(other), _) => {
                anyhow::bail!("unknown --backend {other:?}: use \"dir\" (the default) or \"zfs\"")
            }
        }
    }

    /// The choice recorded in `dd`, if any.
    pub fn load(dd: &DataDir) -> anyhow::Result<Option<Self>> {
        let path = dd.root().join(STORAGE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{} is damaged: {e}; refusing to start", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Records the choice in `dd` (atomically).
    pub fn save(&self, dd: &DataDir) -> anyhow::Result<()> {
        let path = dd.root().join(STORAGE_FILE);
        let text = serde_json::to_string_pretty(self).expect("storage choice serializes");
        crate::datadir::write_private_atomic(&path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The choice to use for a node in `dd`: the recorded one; `asked` must agree with it. A
    /// node without a record (created before datasets existed, or new) records `asked` or `dir`.
    pub fn resolve(dd: &DataDir, asked: Option<&StorageChoice>) -> anyhow::Result<StorageChoice> {
        match (Self::load(dd)?, asked) {
            (Some(saved), Some(asked)) if saved != *asked => anyhow::bail!(
                "{} keeps its datasets in {}, not {}; start it without --backend/--zfs-pool, or give the same ones",
                dd.root().display(),
                saved.describe(),
                asked.describe()
            ),
            (Some(saved), _) => Ok(saved),
            (None, asked) => {
                let choice = asked.cloned().unwrap_or(StorageChoice::Dir);
                choice.save(dd)?;
                Ok(choice)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            StorageChoice::Dir => "directories (--backend dir)".into(),
            StorageChoice::Zfs { pool } => format!("zfs pool {pool} (--backend zfs)"),
        }
    }

    /// Opens the backend: says at start when zfs is missing, its daemon is down or the pool
    /// does not exist.
    pub fn open(&self, dd: &DataDir) -> anyhow::Result<Arc<dyn Backend>> {
        Ok(match self {
            StorageChoice::Dir => {
                let root = dir_root(dd.root());
                Arc::new(DirBackend::open(&root).map_err(|e| {
                    anyhow::anyhow!("cannot open the dataset directory {}: {e}", root.display())
                })?)
            }
            StorageChoice::Zfs { pool } => Arc::new(
                ZfsBackend::open(pool)
                    .map_err(|e| anyhow::anyhow!("cannot use zfs pool {pool}: {e}"))?,
            ),
        })
    }
}

/// Where the `dir` backend of the node in `data_dir` keeps its datasets.
pub fn dir_root(data_dir: &Path) -> PathBuf {
    data_dir.join("storage")
}

/// What a push is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// A move of the dataset's primary to another node.
    Move,
    /// The newest snapshot to a replica.
    Replica,
}

impl TransferKind {
    /// The name clients see (the API's `kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Move => "move",
            TransferKind::Replica => "replica",
        }
    }
}

/// How far back [`TransferState::rate_at`] looks: long enough to smooth a stream's bursts,
/// short enough that a stall shows within seconds.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A rate measured over less time than this is noise: none is shown.
const MIN_RATE_SPAN: Duration = Duration::from_millis(500);

/// A push of a dataset to another node, as the API reports it. The executor updates it: a
/// new job with [`TransferState::new`], every further attempt with
/// [`TransferState::new_attempt`], each stream's start with [`TransferState::start_stream`]
/// and its progress with [`TransferState::set_bytes`] (which keeps the rate's samples).
#[derive(Clone, Debug)]
pub struct TransferState {
    pub dataset: String,
    pub id: DatasetId,
    pub to: NodeId,
    /// A move's push, or a replica's.
    pub kind: TransferKind,
    /// Shown as [`MovePhase::as_str`].
    pub phase: MovePhase,
    /// The current stream's bytes so far.
    pub bytes: u64,
    /// The current stream's expected size, when known.
    pub total: Option<u64>,
    /// When the current stream started (before the attempt's first stream: the attempt). An
    /// ended push is shown for a while after.
    pub started: Instant,
    /// The latest failure (of this attempt, or the one before it while this one runs).
    pub last_error: Option<String>,
    /// Which attempt of the job this is: 1 for the first.
    pub attempt: u32,
    /// When this attempt started: its rate and ETA count from here, not from the first.
    pub attempt_started: Instant,
    /// While waiting to retry after a failure: when the next attempt may start.
    pub retry_at: Option<Instant>,
    /// Set for a replica that has no room, with why: it is not pushed to again until
    /// `retry_at`.
    pub degraded: Option<String>,
    /// The current stream's recent (time, bytes), oldest first: the rate's window.
    samples: VecDeque<(Instant, u64)>,
}

impl TransferState {
    /// The first attempt of a push of `dataset` (`id`) to `to`, starting `now` in `phase`.
    pub fn new(
        kind: TransferKind,
        dataset: String,
        id: DatasetId,
        to: NodeId,
        phase: MovePhase,
        now: Instant,
    ) -> TransferState {
        TransferState {
            dataset,
            id,
            to,
            kind,
            phase,
            bytes: 0,
            total: None,
            started: now,
            last_error: None,
            attempt: 1,
            attempt_started: now,
            retry_at: None,
            degraded: None,
            samples: VecDeque::new(),
        }
    }

    /// Attempt `attempt` starts `now`: nothing of the one before counts in its bytes, rate
    /// or ETA (its failure stays in `last_error`, as the one before's, until replaced).
    pub fn new_attempt(&mut self, attempt: u32, now: Instant) {
        self.attempt = attempt;
        self.attempt_started = now;
        self.retry_at = None;
        self.start_stream(now);
    }

    /// A new stream starts `now`: its own byte count, total and rate.
    pub fn start_stream(&mut self, now: Instant) {
        self.started = now;
        self.bytes = 0;
        self.total = None;
        self.samples.clear();
        self.samples.push_back((now, 0));
    }

    /// The current stream has sent `bytes` by `now`. A count lower than the last is a new
    /// stream's (whose start was not seen: its rate counts from here).
    pub fn set_bytes(&mut self, bytes: u64, now: Instant) {
        if self.samples.back().is_some_and(|&(_, b)| bytes < b) {
            self.start_stream(now);
            self.samples.clear();
        }
        self.bytes = bytes;
        self.samples.push_back((now, bytes));
        // Keep one sample at or before the window's start: the rate's base.
        while self.samples.len() > 2 && self.samples[1].0 + RATE_WINDOW <= now {
            self.samples.pop_front();
        }
    }

    /// Bytes per second of the current stream over about the last [`RATE_WINDOW`] up to
    /// `now` (a stalled stream's rate falls); 0 when nothing streams (between streams, after
    /// the attempt ended) or too little time passed to tell.
    pub fn rate_at(&self, now: Instant) -> f64 {
        let streaming = matches!(
            self.phase,
            MovePhase::Full | MovePhase::Incremental | MovePhase::FinalDelta
        );
        if !streaming {
            return 0.0;
        }
        // The newest sample at or before the window's start, else the oldest of the stream,
        // else the stream's start.
        let base = self
            .samples
            .iter()
            .rev()
            .find(|&&(t, _)| t + RATE_WINDOW <= now)
            .or(self.samples.front())
            .copied()
            .unwrap_or((self.started, 0));
        let span = now.saturating_duration_since(base.0);
        if span < MIN_RATE_SPAN {
            return 0.0;
        }
        self.bytes.saturating_sub(base.1) as f64 / span.as_secs_f64()
    }

    /// [`TransferState::rate_at`] now.
    pub fn rate(&self) -> f64 {
        self.rate_at(Instant::now())
    }

    /// How long the rest of the current stream takes at the current rate: only when its total
    /// is known, not yet exceeded (it is an estimate), and the rate is above zero.
    pub fn eta_at(&self, now: Instant) -> Option<Duration> {
        let total = self.total.filter(|&t| t > self.bytes)?;
        let rate = self.rate_at(now);
        (rate > 0.0).then(|| Duration::from_secs_f64((total - self.bytes) as f64 / rate))
    }

    /// [`TransferState::eta_at`] now.
    pub fn eta(&self) -> Option<Duration> {
        self.eta_at(Instant::now())
    }
}

/// Held while working on a dataset (see [`Datasets::lock`] and [`Datasets::share`]).
pub enum DatasetGuard {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// Held while an app of a dataset may not start behind a check's back: see
/// [`Datasets::start_gate`].
pub struct StartGate {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// Held from taking a snapshot until its record's outcome is known: see
/// [`Datasets::record_order`].
pub struct RecordOrder {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// Marks a dataset held by an operation here (see [`Datasets::holding`]).
pub struct HoldingGuard {
    datasets: Arc<Datasets>,
    id: DatasetId,
}

impl Drop for HoldingGuard {
    fn drop(&mut self) {
        self.datasets
            .holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A dataset as this node's backend holds it.
#[derive(Clone, Debug)]
pub struct LocalCopy {
    pub id: DatasetId,
    pub name: String,
    pub used_bytes: u64,
    /// The live data's size: what the limit applies to.
    pub referenced_bytes: u64,
    pub limit: Option<u64>,
    pub mount_path: PathBuf,
    pub snapshots: Vec<flock_dataset::SnapshotInfo>,
}

/// A copy where this node set aside the diverged writes of a dataset, kept as `snapshot`
/// ([`flock_scheduler::dataset::aside_name`]).
#[derive(Clone, Debug)]
pub struct LocalAside {
    pub id: DatasetId,
    pub name: String,
    pub snapshot: String,
    pub used_bytes: u64,
    /// Where its files are (the diverged writes, as the old primary left them).
    pub mount_path: PathBuf,
}

impl LocalCopy {
    /// Bytes the live data holds over the size limit, if it is over.
    pub fn over_limit(&self) -> Option<u64> {
        self.limit
            .and_then(|l| self.referenced_bytes.checked_sub(l))
            .filter(|&o| o > 0)
    }
}

/// A node's datasets.
pub struct Datasets {
    pub backend: Arc<dyn Backend>,
    pub node_id: NodeId,
    locks: Mutex<HashMap<DatasetId, Arc<tokio::sync::RwLock<()>>>>,
    gates: Mutex<HashMap<DatasetId, Arc<tokio::sync::Mutex<()>>>>,
    /// Per dataset, held from taking a snapshot until the outcome of its record is known:
    /// see [`Datasets::record_order`].
    record_orders: Mutex<HashMap<DatasetId, Arc<tokio::sync::Mutex<()>>>>,
    /// Keyed by (dataset, target node): a move and a replica push of one dataset are shown
    /// side by side.
    transfers: Mutex<BTreeMap<(DatasetId, NodeId), TransferState>>,
    /// Per dataset, snapshots taken here whose recording had an unknown outcome: they may
    /// still be recorded, so they are not destroyed as forgotten ones.
    uncertain: Mutex<BTreeMap<DatasetId, BTreeSet<String>>>,
    /// Datasets an operation here holds (a rollback) and will release.
    holding: Mutex<BTreeSet<DatasetId>>,
    /// The copies here whose data was over their limit at the agent's last look: (bytes
    /// over, the limit).
    over_limit: Mutex<BTreeMap<DatasetId, (u64, u64)>>,
}

/// Runs a blocking backend call off the async threads.
pub async fn blocking<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    f: impl FnOnce(&dyn Backend) -> Result<T, DatasetError> + Send + 'static,
) -> Result<T, DatasetError> {
    let backend = backend.clone();
    match tokio::task::spawn_blocking(move || f(&*backend)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(DatasetError::Cancelled),
    }
}

/// The backend name of `ds`.
pub fn backend_name(ds: &Dataset) -> Result<DatasetName, DatasetError> {
    DatasetName::new(ds.local_name())
}

impl Datasets {
    pub fn new(backend: Arc<dyn Backend>, node_id: NodeId) -> Self {
        Datasets {
            backend,
            node_id,
            locks: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            record_orders: Mutex::new(HashMap::new()),
            transfers: Mutex::new(BTreeMap::new()),
            uncertain: Mutex::new(BTreeMap::new()),
            holding: Mutex::new(BTreeSet::new()),
            over_limit: Mutex::new(BTreeMap::new()),
        }
    }

    /// Remembers that the recording of snapshot `name` of dataset `id` had an unknown outcome.
    pub fn record_uncertain(&self, id: DatasetId, name: &str) {
        self.uncertain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .insert(name.to_string());
    }

    /// The snapshots whose recording had an unknown outcome, per dataset.
    pub fn uncertain(&self) -> BTreeMap<DatasetId, BTreeSet<String>> {
        self.uncertain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks dataset `id` as held by an operation here until the returned guard drops; the
    /// agent releases holds that no operation here marks.
    pub fn holding(self: &Arc<Self>, id: DatasetId) -> HoldingGuard {
        self.holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        HoldingGuard {
            datasets: self.clone(),
            id,
        }
    }

    /// Records which copies here are over their limit (from a listing of them all); the ones
    /// that were not before.
    pub fn note_over_limit(&self, now: BTreeMap<DatasetId, (u64, u64)>) -> Vec<DatasetId> {
        let mut over = self.over_limit.lock().unwrap_or_else(|p| p.into_inner());
        let new = now
            .keys()
            .filter(|id| !over.contains_key(id))
            .copied()
            .collect();
        *over = now;
        new
    }

    /// Bytes this node's copy of `id` was over its limit at the last look, and the limit.
    pub fn over_limit(&self, id: DatasetId) -> Option<(u64, u64)> {
        self.over_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }

    /// The datasets operations here hold.
    pub fn held_here(&self) -> BTreeSet<DatasetId> {
        self.holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn rwlock(&self, id: DatasetId) -> Arc<tokio::sync::RwLock<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Exclusive work on one dataset: create, receive, rollback, destroy.
    pub async fn lock(&self, id: DatasetId) -> DatasetGuard {
        DatasetGuard::Exclusive(self.rwlock(id).write_owned().await)
    }

    /// Work that only adds to a dataset or reads its snapshots: taking a snapshot, sending
    /// one. Several run at once; a push to a slow peer does not hold up a snapshot.
    pub async fn share(&self, id: DatasetId) -> DatasetGuard {
        DatasetGuard::Shared(self.rwlock(id).read_owned().await)
    }

    /// Exclusive work on one dataset, only if no task works on it now.
    pub fn try_lock(&self, id: DatasetId) -> Option<DatasetGuard> {
        self.rwlock(id)
            .try_write_owned()
            .ok()
            .map(DatasetGuard::Exclusive)
    }

    /// The datasets some task works on now.
    pub fn busy_ids(&self) -> BTreeSet<DatasetId> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, m)| m.try_write().is_err())
            .map(|(id, _)| *id)
            .collect()
    }

    /// The dataset's start gate. A move away from this node takes it once its handoff shows
    /// in this node's state and holds it from its check that no app of the dataset runs here
    /// until it ends; the apps agent takes it around its last check of the latest state and
    /// the start of an app of the dataset. So a start either comes before the move's check
    /// (which then sees it run) or sees the handoff (and does not start).
    /// The dataset's record order, held by whoever takes a snapshot of this primary's copy
    /// from before it takes it until its record's outcome is known (an operator's, a
    /// periodic one, a move's). So this copy's snapshots are recorded in the order they were
    /// taken: a snapshot recorded before a move's last one was taken before it too, and the
    /// move's push, which carries the history up to its last snapshot, carries it. (Without
    /// it, an operator's snapshot taken just after the move's last one but recorded before
    /// it was never carried, and the new primary lacked a recorded snapshot for good.)
    pub async fn record_order(&self, id: DatasetId) -> RecordOrder {
        let m = self
            .record_orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        RecordOrder {
            _held: m.lock_owned().await,
        }
    }

    pub async fn start_gate(&self, id: DatasetId) -> StartGate {
        StartGate {
            _held: self.gate(id).lock_owned().await,
        }
    }

    /// The dataset's start gate if no one holds it now: the apps agent does not wait behind a
    /// move's check (which may hold it through the last push); it tries again on its next look.
    pub fn try_start_gate(&self, id: DatasetId) -> Option<StartGate> {
        Some(StartGate {
            _held: self.gate(id).try_lock_owned().ok()?,
        })
    }

    fn gate(&self, id: DatasetId) -> Arc<tokio::sync::Mutex<()>> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Whether some task works on the dataset now.
    pub fn busy(&self, id: DatasetId) -> bool {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|m| m.try_write().is_err())
    }

    /// Every flock dataset the backend holds, with its snapshots.
    pub async fn local(&self) -> Result<Vec<LocalCopy>, DatasetError> {
        Ok(self.local_all().await?.0)
    }

    /// Every flock dataset the backend holds, with its snapshots, and the copies where this
    /// node set aside diverged writes.
    pub async fn local_all(&self) -> Result<(Vec<LocalCopy>, Vec<LocalAside>), DatasetError> {
        blocking(&self.backend, |b| {
            let mut out = Vec::new();
            let mut asides = Vec::new();
            for info in b.list()? {
                if let Some((name, id, snapshot)) = parse_aside_name(info.name.as_str()) {
                    asides.push(LocalAside {
                        id,
                        name: name.to_string(),
                        snapshot: snapshot.to_string(),
                        used_bytes: info.used_bytes,
                        mount_path: info.mount_path,
                    });
                    continue;
                }
                let Some((name, id)) = parse_local_name(info.name.as_str()) else {
                    continue;
                };
                let snapshots = match b.snapshots(&info.name) {
                    Ok(s) => s,
                    // Destroyed between the two calls.
                    Err(DatasetError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                out.push(LocalCopy {
                    id,
                    name: name.to_string(),
                    used_bytes: info.used_bytes,
                    referenced_bytes: info.referenced_bytes,
                    limit: info.limit,
                    mount_path: info.mount_path,
                    snapshots,
                });
            }
            Ok((out, asides))
        })
        .await
    }

    /// This node's copy of `ds`, if it has one.
    pub async fn local_copy(&self, ds: &Dataset) -> Result<Option<LocalCopy>, DatasetError> {
        let name = backend_name(ds)?;
        let id = ds.id;
        let plain = ds.name.clone();
        blocking(&self.backend, move |b| {
            let Some(info) = b.info(&name)? else {
                return Ok(None);
            };
            Ok(Some(LocalCopy {
                id,
                name: plain,
                used_bytes: info.used_bytes,
                referenced_bytes: info.referenced_bytes,
                limit: info.limit,
                mount_path: info.mount_path,
                snapshots: b.snapshots(&name)?,
            }))
        })
        .await
    }

    /// Takes snapshot `tag` (or one named after the time) of the primary's copy of `ds`. The
    /// caller holds the dataset's lock and records it in Raft.
    pub async fn snapshot(
        &self,
        ds: &Dataset,
        tag: Option<&str>,
    ) -> Result<SnapshotRecord, DatasetError> {
        let name = backend_name(ds)?;
        let snap = SnapshotName::new(match tag {
            Some(t) => t.to_string(),
            None => time_name(SystemTime::now()),
        })?;
        let epoch = ds.epoch;
        blocking(&self.backend, move |b| {
            let info = b.snapshot(&name, &snap)?;
            Ok(SnapshotRecord {
                name: info.name.to_string(),
                guid: info.guid,
                created_unix: info.created_unix,
                epoch,
            })
        })
        .await
    }

    /// Puts the record of a push in the table the API reports.
    pub fn set_transfer(
        &self,
        id: DatasetId,
        to: NodeId,
        f: impl FnOnce(&mut Option<TransferState>),
    ) {
        let mut t = self.transfers.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = t.remove(&(id, to));
        f(&mut entry);
        if let Some(e) = entry {
            t.insert((id, to), e);
        }
    }

    /// The pushes this node runs or ran lately.
    pub fn transfers(&self) -> Vec<TransferState> {
        let mut t = self.transfers.lock().unwrap_or_else(|p| p.into_inner());
        // Finished or failed pushes stay visible for a while, so a CLI can tell how they ended.
        t.retain(|_, s| s.phase.is_active() || s.started.elapsed() < Duration::from_secs(600));
        t.values().cloned().collect()
    }
}

/// A snapshot name from a time: `2026-11-23T23-15-49.123Z` (UTC, sortable, valid everywhere).
pub fn time_name(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}-{:02}-{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn streaming(t0: Instant) -> TransferState {
        let mut t = TransferState::new(TransferKind::Move, "db".into(), 1, 2, MovePhase::Full, t0);
        t.start_stream(t0);
        t
    }

    #[test]
    fn the_rate_is_of_the_last_seconds_of_the_current_stream() {
        let t0 = Instant::now();
        let mut t = streaming(t0);
        // Too early to tell.
        t.set_bytes(1000, t0 + ms(100));
        assert_eq!(t.rate_at(t0 + ms(100)), 0.0);
        // 1 MB/s for 10 s, then 5 MB/s: within a window the rate is the new one.
        for s in 1..=10 {
            t.set_bytes(s * 1_000_000, t0 + Duration::from_secs(s));
        }
        assert_eq!(t.rate_at(t0 + Duration::from_secs(10)), 1_000_000.0);
        for s in 11..=20 {
            t.set_bytes(
                10_000_000 + (s - 10) * 5_000_000,
                t0 + Duration::from_secs(s),
            );
        }
        assert_eq!(t.rate_at(t0 + Duration::from_secs(20)), 5_000_000.0);
        // The window keeps only what it needs.
        assert!(t.samples.len() <= 7, "{:?}", t.samples);
        // A stall: the rate falls, and is gone once the window holds no progress.
        let stalled = t.rate_at(t0 + Duration::from_secs(22));
        assert!(stalled < 5_000_000.0 && stalled > 0.0, "{stalled}");
        assert_eq!(t.rate_at(t0 + Duration::from_secs(30)), 0.0);
    }

    #[test]
    fn a_new_stream_or_attempt_starts_its_own_rate() {
        let t0 = Instant::now();
        let mut t = streaming(t0);
        for s in 1..=10 {
            t.set_bytes(s * 10_000_000, t0 + Duration::from_secs(s));
        }
        t.total = Some(200_000_000);
        // A lower count: the next stream's, measured from when it was seen.
        t.set_bytes(1_000_000, t0 + Duration::from_secs(11));
        assert_eq!(t.total, None);
        assert_eq!(t.rate_at(t0 + Duration::from_secs(11)), 0.0);
        t.set_bytes(3_000_000, t0 + Duration::from_secs(12));
        assert_eq!(t.rate_at(t0 + Duration::from_secs(12)), 2_000_000.0);
        // The attempt failed; the next one counts from its own start, not the first's.
        t.phase = MovePhase::Retrying;
        t.last_error = Some("reset".into());
        assert_eq!(t.rate_at(t0 + Duration::from_secs(12)), 0.0);
        let t1 = t0 + Duration::from_secs(60);
        t.new_attempt(2, t1);
        t.phase = MovePhase::Full;
        assert_eq!((t.attempt, t.bytes, t.attempt_started), (2, 0, t1));
        assert_eq!(t.last_error.as_deref(), Some("reset"));
        t.set_bytes(2_000_000, t1 + Duration::from_secs(1));
        assert_eq!(t.rate_at(t1 + Duration::from_secs(1)), 2_000_000.0);
        // Between streams (a snapshot, the app stopping) nothing streams.
        t.phase = MovePhase::StoppingApp;
        assert_eq!(t.rate_at(t1 + Duration::from_secs(1)), 0.0);
    }

    #[test]
    fn without_samples_the_rate_counts_from_the_stream_start() {
        let t0 = Instant::now();
        let mut t = TransferState::new(
            TransferKind::Replica,
            "db".into(),
            1,
            2,
            MovePhase::Full,
            t0,
        );
        t.bytes = 4_000_000;
        assert_eq!(t.rate_at(t0 + Duration::from_secs(2)), 2_000_000.0);
    }

    #[test]
    fn an_eta_needs_a_total_and_a_rate() {
        let t0 = Instant::now();
        let mut t = streaming(t0);
        t.set_bytes(2_000_000, t0 + Duration::from_secs(2));
        let now = t0 + Duration::from_secs(2);
        assert_eq!(t.eta_at(now), None, "no total");
        t.total = Some(10_000_000);
        assert_eq!(t.eta_at(now), Some(Duration::from_secs(8)));
        // The estimate exceeded: no ETA rather than a wrong one.
        t.set_bytes(12_000_000, t0 + Duration::from_secs(3));
        assert_eq!(t.eta_at(t0 + Duration::from_secs(3)), None);
        // No rate (stalled long, or not streaming): none either.
        t.total = Some(20_000_000);
        assert_eq!(t.eta_at(t0 + Duration::from_secs(60)), None);
        t.set_bytes(13_000_000, t0 + Duration::from_secs(4));
        t.phase = MovePhase::Committing;
        assert_eq!(t.eta_at(t0 + Duration::from_secs(4)), None);
    }

    #[test]
    fn time_names_are_utc_and_valid_snapshot_names() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_475_749_123);
        let n = time_name(t);
        assert_eq!(n, "2026-11-23T23-15-49.123Z");
        SnapshotName::new(n).unwrap();
        assert_eq!(time_name(UNIX_EPOCH), "1970-01-01T00-00-00.000Z");
        assert_eq!(
            time_name(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00-00-00.000Z"
        );
    }

    #[test]
    fn storage_flags() {
        assert_eq!(StorageChoice::from_flags(None, None).unwrap(), None);
        assert_eq!(
            StorageChoice::from_flags(None, Some("tank")).unwrap(),
            Some(StorageChoice::Zfs {
                pool: "tank".into()
            })
        );
        for (b, p) in [
            (Some("zfs"), None),
            (Some("dir"), Some("tank")),
            (Some("btrfs"), None),
        ] {
            assert!(StorageChoice::from_flags(b, p).is_err(), "{b:?} {p:?}");
        }
    }

    #[test]
    fn recorded_storage_wins_and_a_conflict_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        assert_eq!(
            StorageChoice::resolve(&dd, None).unwrap(),
            StorageChoice::Dir
        );
        let zfs = StorageChoice::Zfs { pool: "p".into() };
        let e = StorageChoice::resolve(&dd, Some(&zfs))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keeps its datasets in directories"), "{e}");
        assert_eq!(
            StorageChoice::resolve(&dd, Some(&StorageChoice::Dir)).unwrap(),
            StorageChoice::Dir
        );
    }
}
