//! Snapshot-then-record: the one way a primary takes a snapshot that the cluster knows of. The
//! snapshot is taken here, then recorded through Raft under the dataset's epoch; a snapshot the
//! cluster definitely refused is destroyed again, so the copy holds only what Raft says, and
//! one whose recording has an unknown outcome is kept (it may be recorded: destroying it would
//! lose a snapshot Raft names).

use flock_dataset::{DatasetError, SnapshotName};
use flock_scheduler::{ApplyError, Command, CommandResult, Dataset, SnapshotRecord};

use super::{backend_name, blocking, Datasets};
use crate::cluster::{Cluster, ClusterError};

/// Why a snapshot was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The snapshot could not be taken; nothing was proposed.
    #[error("taking the snapshot: {0}")]
    Snapshot(#[source] DatasetError),
    /// The cluster refused the record (a stale epoch, a name taken meanwhile...); the snapshot
    /// was destroyed again.
    #[error("recording the snapshot: {0}")]
    Refused(#[source] ApplyError),
    /// The cluster answered with something other than a record or a refusal; the snapshot was
    /// destroyed again, as for a refusal.
    #[error("recording the snapshot: unexpected result {0:?}")]
    Unexpected(CommandResult),
    /// The proposal failed with an unknown outcome (no leader, a timeout): it may still be
    /// recorded, so the snapshot is kept.
    #[error("recording the snapshot: {0}")]
    Unknown(#[source] ClusterError),
}

impl Datasets {
    /// Takes snapshot `tag` (or one named after the time) of this primary's copy of `ds` and
    /// records it under `ds.epoch`, in the dataset's record order ([`Datasets::record_order`]).
    /// The caller holds the dataset's lock. See the module doc for what happens to the
    /// snapshot when recording fails.
    pub async fn snapshot_and_record(
        &self,
        cluster: &Cluster,
        ds: &Dataset,
        tag: Option<&str>,
    ) -> Result<SnapshotRecord, RecordError> {
        let _order = self.record_order(ds.id).await;
        let record = self
            .snapshot(ds, tag)
            .await
            .map_err(RecordError::Snapshot)?;
        tracing::debug!(dataset = %ds.name, snapshot = %record.name, "snapshot taken, recording it");
        let cmd = Command::RecordSnapshot {
            dataset: ds.id,
            epoch: ds.epoch,
            snapshot: record.clone(),
        };
        let refused = match cluster.propose(cmd).await {
            Ok(CommandResult::SnapshotRecorded) => {
                tracing::debug!(dataset = %ds.name, snapshot = %record.name, "snapshot recorded");
                return Ok(record);
            }
            Err(e) => {
                self.record_uncertain(ds.id, &record.name);
                return Err(RecordError::Unknown(e));
            }
            Ok(CommandResult::Rejected(e)) => RecordError::Refused(e),
            Ok(other) => RecordError::Unexpected(other),
        };
        // Definitely not recorded: take it back, so the copy matches what Raft says.
        let destroyed = match (backend_name(ds), SnapshotName::new(record.name.clone())) {
            (Ok(name), Ok(snap)) => {
                blocking(&self.backend, move |b| b.destroy_snapshot(&name, &snap)).await
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        if let Err(e) = destroyed {
            tracing::warn!(dataset = %ds.name, snapshot = %record.name, error = %e,
                "cannot destroy a snapshot the cluster did not record");
        }
        Err(refused)
    }
}
