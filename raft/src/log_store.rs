//! The Raft log store: the log and the vote, durable on a [`RaftDisk`] before openraft is told.
//!
//! All writes go through one writer thread ([`DiskWriter`]). It takes every job queued while the
//! previous commit was running and commits them in one transaction with one fdatasync (group
//! commit), then tells each job's waiter. The entries themselves are also kept in memory (the
//! log is bounded by snapshots and purging), so replication reads never touch the disk and an
//! appended entry is readable at once, as openraft requires, while its fsync is still running.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use tokio::sync::oneshot;

use crate::disk::{DiskError, DiskState, RaftDisk, WriteOp};
use crate::network::{entry_bytes, fitting};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Who waits for a write.
enum Waiter {
    /// openraft's callback for appended entries.
    Flushed(LogFlushed<TypeConfig>),
    Notify(oneshot::Sender<Result<(), String>>),
    Nobody,
}

impl Waiter {
    fn done(self, result: Result<(), String>) {
        match self {
            Waiter::Flushed(cb) => cb.log_io_completed(result.map_err(io::Error::other)),
            Waiter::Notify(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Nobody => {}
        }
    }
}

struct Job {
    ops: Vec<WriteOp>,
    durable: bool,
    waiter: Waiter,
}

/// Told how long each durable write (one commit with its fdatasync) took: the node's metrics.
pub type DurableWriteHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// A handle to the writer thread. Cloned by the log store and the state machine; the thread
/// ends when the last handle is dropped, after finishing every queued job.
#[derive(Clone)]
pub struct DiskWriter {
    tx: mpsc::Sender<Job>,
    hook: Arc<OnceLock<DurableWriteHook>>,
}

impl DiskWriter {
    /// Starts the writer thread that owns `disk`.
    pub fn start<D: RaftDisk>(mut disk: D) -> (Self, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let hook: Arc<OnceLock<DurableWriteHook>> = Arc::default();
        let told = hook.clone();
        let handle = thread::Builder::new()
            .name("raft-disk-writer".into())
            .spawn(move || {
                // The latest commit index not written yet (see below).
                let mut held: Option<WriteOp> = None;
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        jobs.push(more);
                    }
                    let durable = jobs.iter().any(|j| j.durable);
                    let mut ops: Vec<WriteOp> =
                        jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
                    // A commit index alone is not worth a transaction of its own: it is written
                    // with the next write, or when the writer stops. openraft saves one after
                    // every commit, and under a single writer that doubled the node's redb
                    // transactions (issue 20). Nobody waits for it to be durable: it only spares
                    // re-applying entries after a restart.
                    if !durable && ops.iter().all(|op| matches!(op, WriteOp::Committed(_))) {
                        held = ops.pop().or(held);
                        for job in jobs {
                            job.waiter.done(Ok(()));
                        }
                        continue;
                    }
                    if let Some(committed) = held.take() {
                        // Older than any commit index in `ops`, which therefore wins.
                        ops.insert(0, committed);
                    }
                    let began = Instant::now();
                    let result = disk.write(&ops, durable).map_err(|e| e.to_string());
                    if let (true, Ok(()), Some(hook)) = (durable, &result, told.get()) {
                        hook(began.elapsed());
                    }
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "raft store write failed");
                    }
                    for job in jobs {
                        job.waiter.done(result.clone());
                    }
                }
                if let Some(committed) = held {
                    if let Err(e) = disk.write(&[committed], true) {
                        tracing::error!(error = %e, "raft store write failed");
                    }
                }
            })
            .expect("spawning a thread");
        (DiskWriter { tx, hook }, handle)
    }

    /// Has `hook` told the duration of every durable write from now on (the first hook set
    /// stays).
    pub fn on_durable_write(&self, hook: DurableWriteHook) {
        let _ = self.hook.set(hook);
    }

    fn submit(&self, ops: Vec<WriteOp>, durable: bool, waiter: Waiter) -> Result<(), String> {
        self.tx
            .send(Job {
                ops,
                durable,
                waiter,
            })
            .map_err(|_| "raft store writer has stopped".to_string())
    }

    /// Writes `ops` and waits until they are done (durable when `durable`).
    pub async fn write(&self, ops: Vec<WriteOp>, durable: bool) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.submit(ops, durable, Waiter::Notify(tx))?;
        rx.await
            .map_err(|_| "raft store writer has stopped".to_string())?
    }
}

#[derive(Default)]
struct MemLog {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    logs: BTreeMap<u64, Entry>,
}

/// openraft's [`RaftLogStorage`] for flock. Cheap to clone; clones share the same log.
#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<MemLog>>,
    writer: DiskWriter,
}

impl LogStore {
    /// A log store over what was loaded from disk, writing through `writer`.
    pub fn new(loaded: &mut DiskState, writer: DiskWriter) -> Self {
        let logs = std::mem::take(&mut loaded.logs)
            .into_iter()
            .map(|e| (e.log_id.index, e))
            .collect();
        let mem = MemLog {
            vote: loaded.vote,
            committed: loaded.committed,
            last_purged: loaded.last_purged,
            logs,
        };
        LogStore {
            mem: Arc::new(Mutex::new(mem)),
            writer,
        }
    }

    fn mem(&self) -> MutexGuard<'_, MemLog> {
        // A poisoned lock means a panic while holding it; the data is a plain map and stays
        // consistent, so keep going rather than take the node down twice.
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn write_err(e: impl ToString) -> StorageError {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .mem()
            .logs
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    /// For replication: entries from `start`, as many as fit in about
    /// [`MAX_APPEND_BYTES`](crate::network::MAX_APPEND_BYTES) (at least one), so that no
    /// AppendEntries is built beyond what a peer takes in one call.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mem = self.mem();
        let in_range: Vec<&Entry> = mem.logs.range(start..end).map(|(_, e)| e).collect();
        let (n, _) = fitting(in_range.iter().map(|e| entry_bytes(e)));
        Ok(in_range[..n].iter().map(|e| (*e).clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.mem();
        let last = mem.logs.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last.or(mem.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.writer
            .write(vec![WriteOp::Vote(*vote)], true)
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&io::Error::other(e))))?;
        self.mem().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.mem().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not written on its own: it only spares re-applying entries after a restart, and it
        // rides along with the next write (or is written when the writer stops).
        self.mem().committed = committed;
        self.writer
            .submit(vec![WriteOp::Committed(committed)], false, Waiter::Nobody)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.mem().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut mem = self.mem();
            for e in &entries {
                mem.logs.insert(e.log_id.index, e.clone());
            }
        }
        self.writer
            .submit(
                vec![WriteOp::Append(entries)],
                true,
                Waiter::Flushed(callback),
            )
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.mem().logs.split_off(&log_id.index);
        self.writer
            .write(vec![WriteOp::TruncateFrom(log_id.index)], true)
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut mem = self.mem();
            let keep = mem.logs.split_off(&(log_id.index + 1));
            mem.logs = keep;
            mem.last_purged = Some(log_id);
        }
        // Purging is never urgent for safety: the entries are covered by a durable snapshot.
        self.writer
            .write(vec![WriteOp::PurgeUpto(log_id)], false)
            .await
            .map_err(write_err)
    }
}

impl From<DiskError> for StorageError {
    fn from(e: DiskError) -> Self {
        StorageIOError::read(&e).into()
    }
}
