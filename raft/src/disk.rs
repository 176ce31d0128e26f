//! The durable part of a node's Raft state, behind a small trait.
//!
//! [`RaftDisk`] is all the log store and state machine need from a disk: load everything at
//! start, and write an ordered batch of changes atomically, durably when asked. [`RedbDisk`]
//! implements it on one redb file, whose `commit` with `Durability::Immediate` is fdatasync'ed
//! before it returns.

use std::path::Path;

use openraft::{LogId, SnapshotMeta, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{decode, encode, CodecError};
use crate::types::{Entry, MemberNode, NodeId};

/// redb's page cache for the file. Everything is read once, at start; after that the file is
/// only written, and redb keeps the pages it wrote in its cache, up to this size (its default
/// is 1 GiB: a node's RSS grew by about 17 MiB an hour of moves, and would have grown to that).
/// Half of it may hold a transaction's pages before they are written; a larger transaction
/// (a big snapshot) is written out as it goes.
const CACHE_BYTES: usize = 32 << 20;

/// The on-disk format this build writes. A data dir with a newer format is refused.
pub const DISK_FORMAT: u64 = 1;

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
}

/// What the log store and the state machine need from a disk.
pub trait RaftDisk: Send + 'static {
    /// Reads everything back, as it was after the last durable write.
    fn load(&self) -> Result<DiskState, DiskError>;
    /// Applies `ops` in order, atomically. When `durable`, the changes are on stable storage when
    /// this returns; otherwise they become durable with the next durable write.
    fn write(&mut self, ops: &[WriteOp], durable: bool) -> Result<(), DiskError>;
}

/// [`RaftDisk`] on one redb file.
pub struct RedbDisk {
    db: Database,
}

fn err<E: Into<redb::Error>>(e: E) -> DiskError {
    DiskError::Io(e.into())
}

impl RedbDisk {
    /// Opens the store at `path`, creating it when absent.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
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
        let disk = RedbDisk { db };
        disk.init_format()?;
        Ok(disk)
    }

    fn init_format(&self) -> Result<(), DiskError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            txn.open_table(LOGS).map_err(err)?;
            let found = match meta.get(K_FORMAT).map_err(err)? {
                Some(v) => Some(decode::<u64>(v.value()).map_err(|e| DiskError::Corrupt {
                    what: K_FORMAT.into(),
                    source: e,
                })?),
                None => None,
            };
            match found {
                Some(f) if f > DISK_FORMAT => return Err(DiskError::TooNew { found: f }),
                Some(_) => {}
                None => {
                    meta.insert(K_FORMAT, encode(&DISK_FORMAT).as_slice())
                        .map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }
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

impl RaftDisk for RedbDisk {
    fn load(&self) -> Result<DiskState, DiskError> {
        let txn = self.db.begin_read().map_err(err)?;
        let meta = txn.open_table(META).map_err(err)?;
        let logs_t = txn.open_table(LOGS).map_err(err)?;
        let mut logs = Vec::new();
        for row in logs_t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let entry: Entry = decode(v.value()).map_err(|e| DiskError::Corrupt {
                what: format!("log entry {}", k.value()),
                source: e,
            })?;
            logs.push(entry);
        }
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
            committed: read_meta::<Option<LogId<NodeId>>>(&meta, K_COMMITTED)?.flatten(),
            last_purged: read_meta(&meta, K_PURGED)?,
            logs,
            snapshot,
        })
    }

    fn write(&mut self, ops: &[WriteOp], durable: bool) -> Result<(), DiskError> {
        let mut txn = self.db.begin_write().map_err(err)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(err)?;
        {
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut logs = txn.open_table(LOGS).map_err(err)?;
            for op in ops {
                match op {
                    WriteOp::SetClusterId(id) => {
                        meta.insert(K_CLUSTER, encode(id).as_slice()).map_err(err)?;
                    }
                    WriteOp::Vote(v) => {
                        meta.insert(K_VOTE, encode(v).as_slice()).map_err(err)?;
                    }
                    WriteOp::Committed(c) => {
                        meta.insert(K_COMMITTED, encode(c).as_slice())
                            .map_err(err)?;
                    }
                    WriteOp::Append(entries) => {
                        for e in entries {
                            logs.insert(e.log_id.index, encode(e).as_slice())
                                .map_err(err)?;
                        }
                    }
                    WriteOp::TruncateFrom(index) => {
                        logs.retain_in(*index.., |_, _| false).map_err(err)?;
                    }
                    WriteOp::PurgeUpto(log_id) => {
                        logs.retain_in(..=log_id.index, |_, _| false).map_err(err)?;
                        meta.insert(K_PURGED, encode(log_id).as_slice())
                            .map_err(err)?;
                    }
                    WriteOp::Snapshot(s) => {
                        meta.insert(K_SNAP_META, encode(&s.meta).as_slice())
                            .map_err(err)?;
                        meta.insert(K_SNAP_DATA, s.data.as_slice()).map_err(err)?;
                    }
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }
}
