//! The Raft state machine: the scheduler's [`ClusterState`], kept in memory and made durable by
//! snapshots on the [`RaftDisk`](crate::disk::RaftDisk).
//!
//! Applying a command is [`ClusterState::apply`], nothing more. The state is not written on every
//! apply: the log is durable, and after a restart openraft re-applies the committed entries that
//! follow the last snapshot. A snapshot is fsync'ed before openraft may purge the log it covers.

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};

use flock_scheduler::{ClusterState, CommandResult};

use crate::codec::{decode, encode};
use crate::disk::{DiskError, StoredSnapshot, WriteOp};
use crate::log_store::DiskWriter;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// What the state machine holds: the cluster state and where in the log it stands.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub cluster: ClusterState,
}

/// A read-only view of the applied state, for serving reads without going through Raft.
#[derive(Clone)]
pub struct StateView(Arc<RwLock<Applied>>);

impl StateView {
    /// Reads the applied state. Hold the guard briefly: applying waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// openraft's [`RaftStateMachine`] for flock.
#[derive(Clone)]
pub struct StateMachine {
    applied: Arc<RwLock<Applied>>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    writer: DiskWriter,
}

fn sm_err(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

impl StateMachine {
    /// A state machine restored from the snapshot on disk, if there is one.
    pub fn new(snapshot: Option<StoredSnapshot>, writer: DiskWriter) -> Result<Self, DiskError> {
        let applied = match &snapshot {
            Some(s) => Applied {
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership.clone(),
                cluster: decode(&s.data).map_err(|e| DiskError::Corrupt {
                    what: "snapshot".into(),
                    source: e,
                })?,
            },
            None => Applied::default(),
        };
        Ok(StateMachine {
            applied: Arc::new(RwLock::new(applied)),
            current: Arc::new(Mutex::new(snapshot)),
            writer,
        })
    }

    /// A view for reads.
    pub fn view(&self) -> StateView {
        StateView(self.applied.clone())
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<StoredSnapshot>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, last_log_id, last_membership) = {
            let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
            (encode(&a.cluster), a.last_applied, a.membership.clone())
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.writer
            .write(vec![WriteOp::Snapshot(stored.clone())], true)
            .await
            .map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(e),
                ))
            })?;
        *self.current() = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut results = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            let r = match &entry.payload {
                EntryPayload::Blank => CommandResult::Nothing,
                EntryPayload::Normal(cmd) => a.cluster.apply(cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    CommandResult::Nothing
                }
            };
            results.push(r);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let cluster: ClusterState = decode(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Durable first: once the state machine moves past the log, the snapshot is the only copy.
        self.writer
            .write(vec![WriteOp::Snapshot(stored.clone())], true)
            .await
            .map_err(sm_err)?;
        {
            let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
            *a = Applied {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                cluster,
            };
        }
        *self.current() = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current().clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
