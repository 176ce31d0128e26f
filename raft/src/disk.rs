//! The durable part of a node's Raft state, behind a small trait.
//!
//! [`RaftDisk`] is all the log store and state machine need from a disk: load everything at
//! start, and write an ordered batch of changes, durably when asked. [`NodeDisk`] implements it
//! on two files:
//! - the log's entries, truncations and commit index in an append-only log ([`crate::wal`],
//!   `raft.wal/` beside the store file), fdatasync'ed when durable;
//! - everything else (the cluster id, the vote, the purge point, the snapshot) in one redb file
//!   ([`MetaDb`], `raft.redb`), whose `commit` with `Durability::Immediate` is fdatasync'ed
//!   before it returns. These change once per election or snapshot, and are always written
//!   durably, before the log's part of the same batch: a purge point is on disk before the
//!   entries after it, and a vote before the entries it let in.
//!
//! Format 1 (up to 0c093b1) kept the entries in redb too; [`NodeDisk::open`] moves them into a
//! new log the first time (format 2), which older builds then refuse with "upgrade flockd".

use std::fs;
use std::path::{Path, PathBuf};

use openraft::{LogId, SnapshotMeta, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{decode, encode, CodecError};
use crate::types::{Entry, MemberNode, NodeId};
use crate::wal::{replay, Wal};

/// redb's page cache for the file. Everything is read once, at start; after that the file is
/// only written, and redb keeps the pages it wrote in its cache, up to this size (its default
/// is 1 GiB: a node's RSS grew by about 17 MiB an hour of moves, and would have grown to that).
/// Half of it may hold a transaction's pages before they are written; a larger transaction
/// (a big snapshot) is written out as it goes.
const CACHE_BYTES: usize = 32 << 20;

/// The on-disk format this build writes. A data dir with a newer format is refused.
/// 1: everything in redb. 2: the log's entries in the WAL ([`crate::wal`]).
pub const DISK_FORMAT: u64 = 2;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const K_FORMAT: &str = "format";
const K_CLUSTER: &str = "cluster_id";
const K_VOTE: &str = "vote";
const K_COMMITTED: &str = "committed";
const K_PURGED: &str = "last_purged";
const K_SNAP_META: &str = "snapshot_meta";
const K_SNAP_DATA: &str = "snapshot_data";

/// A snapshot as it is kept on disk.
#[derive(Clone, Debug)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, MemberNode>,
    pub data: Vec<u8>,
}

/// Everything on disk, as loaded at start.
#[derive(Debug, Default)]
pub struct DiskState {
    pub cluster_id: Option<String>,
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
    /// Log entries after `last_purged`, in index order.
    pub logs: Vec<Entry>,
    pub snapshot: Option<StoredSnapshot>,
}

/// One change, applied in order with the others of its batch.
#[derive(Debug)]
pub enum WriteOp {
    SetClusterId(String),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    Append(Vec<Entry>),
    /// Delete entries with index >= this.
    TruncateFrom(u64),
    /// Delete entries up to and including this log id, and remember it as purged.
    PurgeUpto(LogId<NodeId>),
    Snapshot(StoredSnapshot),
}

/// Errors of the disk layer.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("raft store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("raft store {path} is used by another running flockd")]
    InUse { path: String },
    #[error("raft store: {0}")]
    Io(#[from] redb::Error),
    #[error("raft store holds a damaged record {what}: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: CodecError,
    },
    #[error("raft store was written by a newer flock (format {found}, this build reads up to {DISK_FORMAT}); upgrade flockd")]
    TooNew { found: u64 },
    #[error("raft log {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path} is damaged at byte {offset}: {reason}; refusing to start (remove the node and join it again, or restore the data dir from a backup)")]
    Damaged {
        path: String,
        offset: u64,
        reason: String,
    },
    #[error("raft log is unusable after an earlier failed write ({0}); restart flockd")]
    Failed(String),
    #[error("raft store {path} does not match its log: {reason}; refusing to start (restore the data dir from a backup, or remove the node and join it again)")]
    Mismatch { path: String, reason: String },
}

/// What the log store and the state machine need from a disk.
pub trait RaftDisk: Send + 'static {
    /// Reads everything back, as it was after the last durable write.
    fn load(&self) -> Result<DiskState, DiskError>;
    /// Applies `ops` in order. When `durable`, the changes are on stable storage when this
    /// returns; otherwise they become durable with the next durable write. A crash during a
    /// write may keep part of it (what is not the log's without the log's part, or the first
    /// of the log's records): nobody was told it was written, and what earlier writes made
    /// durable stays.
    fn write(&mut self, ops: &[WriteOp], durable: bool) -> Result<(), DiskError>;
}

/// The redb half of a [`NodeDisk`]: everything but the log's entries.
pub struct MetaDb {
    db: Database,
}

fn err<E: Into<redb::Error>>(e: E) -> DiskError {
    DiskError::Io(e.into())
}

impl MetaDb {
    /// Opens the store at `path`, creating it when absent, and returns the format it holds
    /// (`None`: none recorded yet, a new store).
    pub fn open(path: &Path) -> Result<(Self, Option<u64>), DiskError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => DiskError::InUse {
                    path: path.display().to_string(),
                },
                e => DiskError::Open {
                    path: path.display().to_string(),
                    source: e.into(),
                },
            })?;
        let disk = MetaDb { db };
        let format = disk.format()?;
        match format {
            Some(f) if f > DISK_FORMAT => Err(DiskError::TooNew { found: f }),
            _ => Ok((disk, format)),
        }
    }

    fn format(&self) -> Result<Option<u64>, DiskError> {
        let txn = self.db.begin_write().map_err(err)?;
        let found = {
            let meta = txn.open_table(META).map_err(err)?;
            read_meta::<u64>(&meta, K_FORMAT)?
        };
        txn.commit().map_err(err)?;
        Ok(found)
    }

    /// Records `format`, durably.
    fn set_format(&self, format: u64) -> Result<(), DiskError> {
        let mut txn = self.db.begin_write().map_err(err)?;
        txn.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(K_FORMAT, encode(&format).as_slice())
                .map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(())
    }

    /// Format 1's log: its entries, in index order, and its commit index.
    fn format1_log(&self) -> Result<(Vec<Entry>, Option<LogId<NodeId>>), DiskError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let committed = read_meta::<Option<LogId<NodeId>>>(&meta, K_COMMITTED)?.flatten();
        let mut logs = Vec::new();
        let logs_t = match txn.open_table(LOGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((logs, committed)),
            Err(e) => return Err(err(e)),
        };
        for row in logs_t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let entry: Entry = decode(v.value()).map_err(|e| DiskError::Corrupt {
                what: format!("log entry {}", k.value()),
                source: e,
            })?;
            logs.push(entry);
        }
        Ok((logs, committed))
    }

    /// Finishes the move to format 2: format 1's entries and commit index go, durably.
    fn drop_format1_log(&self) -> Result<(), DiskError> {
        let mut txn = self.db.begin_write().map_err(err)?;
        txn.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.remove(K_COMMITTED).map_err(err)?;
            meta.insert(K_FORMAT, encode(&DISK_FORMAT).as_slice())
                .map_err(err)?;
        }
        txn.delete_table(LOGS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(())
    }

    /// Everything but the log's entries (and, in format 2, its commit index).
    fn load(&self) -> Result<DiskState, DiskError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let snap_meta: Option<SnapshotMeta<NodeId, MemberNode>> = read_meta(&meta, K_SNAP_META)?;
        let snapshot = match snap_meta {
            Some(m) => {
                let data = meta
                    .get(K_SNAP_DATA)
                    .map_err(err)?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                Some(StoredSnapshot { meta: m, data })
            }
            None => None,
        };
        Ok(DiskState {
            cluster_id: read_meta(&meta, K_CLUSTER)?,
            vote: read_meta(&meta, K_VOTE)?,
            committed: None,
            last_purged: read_meta(&meta, K_PURGED)?,
            logs: Vec::new(),
            snapshot,
        })
    }

    /// Writes the ops that are not the log's, in order, in one durable transaction.
    fn write<'a>(&mut self, ops: impl IntoIterator<Item = &'a WriteOp>) -> Result<(), DiskError> {
        let mut txn = self.db.begin_write().map_err(err)?;
        txn.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            for op in ops {
                match op {
                    WriteOp::SetClusterId(id) => {
                        meta.insert(K_CLUSTER, encode(id).as_slice()).map_err(err)?;
                    }
                    WriteOp::Vote(v) => {
                        meta.insert(K_VOTE, encode(v).as_slice()).map_err(err)?;
                    }
                    WriteOp::PurgeUpto(log_id) => {
                        meta.insert(K_PURGED, encode(log_id).as_slice())
                            .map_err(err)?;
                    }
                    WriteOp::Snapshot(s) => {
                        meta.insert(K_SNAP_META, encode(&s.meta).as_slice())
                            .map_err(err)?;
                        meta.insert(K_SNAP_DATA, s.data.as_slice()).map_err(err)?;
                    }
                    WriteOp::Append(_) | WriteOp::TruncateFrom(_) | WriteOp::Committed(_) => {}
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }
}

/// Where the log of the store at `path` lives: `raft.wal` beside `raft.redb`.
pub fn wal_dir(path: &Path) -> PathBuf {
    path.with_extension("wal")
}

/// [`RaftDisk`] on a redb file and an append-only log (see the module's documentation).
pub struct NodeDisk {
    path: PathBuf,
    meta: MetaDb,
    wal: Wal,
}

impl WriteOp {
    /// True for what goes into the log; the rest goes into redb.
    fn is_log(&self) -> bool {
        matches!(
            self,
            WriteOp::Append(_) | WriteOp::TruncateFrom(_) | WriteOp::Committed(_)
        )
    }
}

impl NodeDisk {
    /// Opens the store at `path` (a redb file) and its log, creating both when neither exists,
    /// and moving a format 1 store's entries into a new log.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let dir = wal_dir(path);
        let mismatch = |reason: String| DiskError::Mismatch {
            path: path.display().to_string(),
            reason,
        };
        let new_store = !path.exists();
        if new_store && dir.exists() {
            // A log without its store: only a new node that stopped between creating the two
            // may leave one, and then the log is empty.
            if !replay(&dir)?.entries.is_empty() {
                return Err(mismatch(format!(
                    "{} holds entries but the store file is missing",
                    dir.display()
                )));
            }
        }
        let (meta, format) = MetaDb::open(path)?;
        let wal = match format {
            None | Some(2) => {
                if !dir.exists() {
                    if format.is_some() {
                        return Err(mismatch(format!("its log {} is missing", dir.display())));
                    }
                    Wal::create(&dir)?;
                }
                if format.is_none() {
                    meta.set_format(DISK_FORMAT)?;
                }
                Wal::open(&dir)?
            }
            Some(_) => migrate(path, &meta, &dir)?,
        };
        Ok(NodeDisk {
            path: path.to_path_buf(),
            meta,
            wal,
        })
    }

    /// The log's directory.
    pub fn wal_dir(&self) -> &Path {
        self.wal.dir()
    }

    /// Starts new log segments at `bytes` (tests: many segments).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.wal.set_segment_bytes(bytes);
    }

    /// How many segment files the log has now.
    pub fn wal_segments(&self) -> usize {
        self.wal.segment_count()
    }
}

/// Moves a format 1 store's entries and commit index into a new log at `dir`. The log is built
/// beside (`raft.wal.tmp`), made durable, renamed into place, and only then is redb's copy
/// dropped and format 2 recorded: a crash at any point leaves format 1 and its entries, and
/// the next start does it again.
fn migrate(path: &Path, meta: &MetaDb, dir: &Path) -> Result<Wal, DiskError> {
    let (entries, committed) = meta.format1_log()?;
    let n = entries.len();
    let tmp = dir.with_extension("wal.tmp");
    let remove = |d: &Path| match fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DiskError::File {
            path: d.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    };
    remove(&tmp)?;
    let mut wal = Wal::create(&tmp)?;
    wal.write(
        &[WriteOp::Committed(committed), WriteOp::Append(entries)],
        true,
    )?;
    drop(wal);
    remove(dir)?;
    fs::rename(&tmp, dir).map_err(|e| DiskError::File {
        path: dir.display().to_string(),
        source: e,
    })?;
    if let Some(parent) = dir.parent() {
        crate::wal::sync_dir(parent)?;
    }
    meta.drop_format1_log()?;
    tracing::info!(
        store = %path.display(),
        log = %dir.display(),
        entries = n,
        "raft store moved to format 2: the log's entries are now in an append-only log"
    );
    Wal::open(dir)
}

fn read_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, DiskError> {
    match table.get(key).map_err(err)? {
        Some(v) => decode(v.value()).map(Some).map_err(|e| DiskError::Corrupt {
            what: key.into(),
            source: e,
        }),
        None => Ok(None),
    }
}

impl RaftDisk for NodeDisk {
    fn load(&self) -> Result<DiskState, DiskError> {
        let mut state = self.meta.load()?;
        let replayed = replay(self.wal.dir())?;
        let purged = state.last_purged.map(|l| l.index);
        state.committed = replayed.committed.flatten();
        state.logs = replayed
            .entries
            .into_values()
            .filter(|e| purged.is_none_or(|p| e.log_id.index > p))
            .collect();
        if let Some(w) = state
            .logs
            .windows(2)
            .find(|w| w[1].log_id.index != w[0].log_id.index + 1)
        {
            return Err(DiskError::Mismatch {
                path: self.path.display().to_string(),
                reason: format!(
                    "the log skips from entry {} to {}",
                    w[0].log_id.index, w[1].log_id.index
                ),
            });
        }
        Ok(state)
    }

    fn write(&mut self, ops: &[WriteOp], durable: bool) -> Result<(), DiskError> {
        let purge = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::PurgeUpto(l) => Some(l.index),
                _ => None,
            })
            .max();
        if ops.iter().any(|op| !op.is_log()) {
            self.meta.write(ops.iter().filter(|op| !op.is_log()))?;
        }
        self.wal
            .write(ops.iter().filter(|op| op.is_log()), durable)?;
        if let Some(index) = purge {
            self.wal.drop_upto(index)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::Command;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: format!("k{index}"),
                value: "v".into(),
            }),
        }
    }

    /// A store as format 1 (0c093b1 and before) wrote it: entries and commit index in redb.
    fn write_format1(path: &Path, entries: &[Entry]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let mut logs = txn.open_table(LOGS).unwrap();
            meta.insert(K_FORMAT, encode(&1u64).as_slice()).unwrap();
            meta.insert(K_CLUSTER, encode(&"c1".to_string()).as_slice())
                .unwrap();
            meta.insert(K_VOTE, encode(&Vote::<NodeId>::new(2, 1)).as_slice())
                .unwrap();
            let committed = Some(entries[2].log_id);
            meta.insert(K_COMMITTED, encode(&committed).as_slice())
                .unwrap();
            let purged = LogId::<NodeId>::new(CommittedLeaderId::new(1, 1), 3);
            meta.insert(K_PURGED, encode(&purged).as_slice()).unwrap();
            for e in entries {
                logs.insert(e.log_id.index, encode(e).as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    fn indexes(s: &DiskState) -> Vec<u64> {
        s.logs.iter().map(|e| e.log_id.index).collect()
    }

    /// The first start of this build moves a format 1 store's entries into the log, records
    /// format 2 and drops redb's copy; what loads is what format 1 held, and it goes on.
    #[test]
    fn a_format1_store_moves_its_entries_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let entries: Vec<Entry> = (4..=9).map(entry).collect();
        write_format1(&path, &entries);
        {
            let mut d = NodeDisk::open(&path).unwrap();
            let s = d.load().unwrap();
            assert_eq!(indexes(&s), vec![4, 5, 6, 7, 8, 9]);
            assert_eq!(s.committed, Some(entries[2].log_id));
            assert_eq!(s.vote, Some(Vote::new(2, 1)));
            assert_eq!(s.cluster_id.as_deref(), Some("c1"));
            assert_eq!(s.last_purged.map(|l| l.index), Some(3));
            d.write(&[WriteOp::Append(vec![entry(10)])], true).unwrap();
        }
        let (meta, format) = MetaDb::open(&path).unwrap();
        assert_eq!(format, Some(2));
        let (left, committed) = meta.format1_log().unwrap();
        assert!(
            left.is_empty() && committed.is_none(),
            "redb's copy is gone"
        );
        drop(meta);
        let s = NodeDisk::open(&path).unwrap().load().unwrap();
        assert_eq!(indexes(&s), vec![4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.committed, Some(entries[2].log_id));
    }

    /// A move cut short by a crash, before format 2 was recorded, leaves format 1 whole (and a
    /// half-built or complete log beside it): the next start does the move again from redb.
    #[test]
    fn a_move_cut_short_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let entries: Vec<Entry> = (4..=9).map(entry).collect();
        write_format1(&path, &entries);
        let wal = wal_dir(&path);
        // A stale log in place (renamed, then the crash), and a half-built one beside it.
        fs::create_dir(&wal).unwrap();
        fs::write(
            wal.join("00000000000000000001.wal"),
            b"FLOCKWAL\x01\0\0\0junk",
        )
        .unwrap();
        fs::create_dir(wal.with_extension("wal.tmp")).unwrap();
        let s = NodeDisk::open(&path).unwrap().load().unwrap();
        assert_eq!(indexes(&s), vec![4, 5, 6, 7, 8, 9]);
        assert!(!wal.with_extension("wal.tmp").exists());
    }
}
