//! The crate's errors: [`DatasetError`] for backend operations, [`StreamError`] for a stream
//! that cannot be trusted (framing or backend stream).
//!
//! Every message names the dataset, snapshot or pool involved and, where there is one, what the
//! operator can do about it.

use std::io;
use std::path::PathBuf;

use crate::backend::BackendKind;

/// An error from a storage backend or from receiving a stream into one.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A dataset or snapshot name failed validation.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// "dataset" or "snapshot".
        what: &'static str,
        /// The name as given.
        name: String,
        /// Why it is invalid.
        reason: String,
    },

    /// The dataset does not exist on this backend.
    #[error("dataset {dataset} does not exist")]
    NotFound {
        /// The dataset.
        dataset: String,
    },

    /// A dataset of that name already exists (or is being received).
    #[error("dataset {dataset} already exists; destroy it first or pick another name")]
    AlreadyExists {
        /// The dataset.
        dataset: String,
    },

    /// The dataset has no snapshot of that name.
    #[error("dataset {dataset} has no snapshot {snapshot}")]
    SnapshotNotFound {
        /// The dataset.
        dataset: String,
        /// The missing snapshot.
        snapshot: String,
    },

    /// The dataset already has a snapshot of that name.
    #[error("dataset {dataset} already has a snapshot {snapshot}; pick another snapshot name")]
    SnapshotExists {
        /// The dataset.
        dataset: String,
        /// The existing snapshot.
        snapshot: String,
    },

    /// An incremental stream does not start from the receiver's latest snapshot.
    #[error(
        "cannot receive an incremental stream from snapshot {base} into dataset {dataset}: \
         its latest snapshot is {latest}; roll it back to {base} or send a full stream"
    )]
    BaseMismatch {
        /// The dataset.
        dataset: String,
        /// The stream's base snapshot.
        base: String,
        /// The receiver's latest snapshot ("none" when it has none).
        latest: String,
    },

    /// The dataset's size limit or the storage under it would be exceeded.
    ///
    /// Distinct from every other failure so that a caller can say "no space on NODE".
    #[error("no space for dataset {dataset}: {detail}")]
    NoSpace {
        /// The dataset.
        dataset: String,
        /// What ran out: the size limit or the pool/filesystem.
        detail: String,
    },

    /// A size limit below the data the dataset holds now.
    #[error(
        "cannot set the size limit of dataset {dataset} to {limit} bytes: it holds {used} bytes \
         of data now; delete data first or set a limit of at least {used} bytes"
    )]
    LimitBelowUse {
        /// The dataset.
        dataset: String,
        /// The limit asked for.
        limit: u64,
        /// The live data it holds now (what the limit applies to).
        used: u64,
    },

    /// The incoming stream was truncated, corrupted, interrupted or malformed; nothing was committed.
    #[error("stream for dataset {dataset} rejected, nothing was changed: {source}")]
    Stream {
        /// The dataset (or "(unknown)" when the header itself was unreadable).
        dataset: String,
        /// What was wrong with the stream.
        #[source]
        source: StreamError,
    },

    /// A stream made by one backend offered to the other.
    #[error(
        "dataset {dataset}: a {stream} stream cannot be received by the {backend} backend; \
         both nodes must use the same backend"
    )]
    KindMismatch {
        /// The dataset.
        dataset: String,
        /// The backend that made the stream.
        stream: BackendKind,
        /// The backend asked to receive it.
        backend: BackendKind,
    },

    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("create directory", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The `zfs` command is missing.
    #[error("zfs is not installed: apt-get install zfs-fuse (then start the zfs-fuse daemon)")]
    ZfsNotInstalled,

    /// The zfs-fuse daemon does not answer.
    #[error(
        "zfs-fuse daemon is not running: start it with `/usr/sbin/zfs-fuse` \
         (or `service zfs-fuse start`) and retry"
    )]
    ZfsDaemonNotRunning,

    /// The configured pool does not exist.
    #[error("pool {pool} does not exist: create it with `zpool create {pool} DEVICE` or configure another pool")]
    PoolNotFound {
        /// The pool.
        pool: String,
    },

    /// The zfs root has no mountpoint, so datasets under it would have no mount path.
    #[error(
        "zfs root {root} has mountpoint={mountpoint}; give it one \
         (`zfs set mountpoint=/srv/flock {root}`) or configure another root"
    )]
    ZfsRootNotMounted {
        /// The root dataset.
        root: String,
        /// Its mountpoint property ("none", "legacy").
        mountpoint: String,
    },

    /// A zfs command failed for a reason this crate does not classify.
    #[error("`{command}` failed: {stderr}")]
    Zfs {
        /// The command line.
        command: String,
        /// What zfs printed.
        stderr: String,
    },

    /// Sending failed: the backend stream broke off or the destination went away.
    #[error("sending dataset {dataset} failed: {source}")]
    SendFailed {
        /// The dataset.
        dataset: String,
        /// What failed.
        #[source]
        source: io::Error,
    },

    /// A blocking task was cancelled because the runtime is shutting down.
    #[error("the operation was cancelled because the runtime is shutting down")]
    Cancelled,

    /// The backend's own on-disk state is not what this build expects.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
}

impl DatasetError {
    /// The error with the dataset it names shown as `name`: a backend names a dataset by its
    /// backend name (`db.3`); people know it by the name they gave it (`db`).
    pub fn naming(mut self, name: &str) -> Self {
        use DatasetError as E;
        match &mut self {
            E::NotFound { dataset, .. }
            | E::AlreadyExists { dataset, .. }
            | E::SnapshotNotFound { dataset, .. }
            | E::SnapshotExists { dataset, .. }
            | E::BaseMismatch { dataset, .. }
            | E::NoSpace { dataset, .. }
            | E::LimitBelowUse { dataset, .. }
            | E::Stream { dataset, .. }
            | E::KindMismatch { dataset, .. }
            | E::SendFailed { dataset, .. } => *dataset = name.to_string(),
            _ => {}
        }
        self
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DatasetError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True for [`DatasetError::NoSpace`].
    pub fn is_no_space(&self) -> bool {
        matches!(self, DatasetError::NoSpace { .. })
    }
}

/// Why an incoming stream was rejected.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The first bytes are not a stream of the expected format.
    #[error("not a {format} stream (bad magic bytes)")]
    BadMagic {
        /// "flock" for the framing, "dir" or "zfs" for the backend stream.
        format: &'static str,
    },

    /// A format version this build cannot read.
    #[error(
        "{format} stream format version {found} is not supported (this build reads version \
         {supported}); run the same flock version on both nodes"
    )]
    UnsupportedVersion {
        /// Which format.
        format: &'static str,
        /// The version in the stream.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },

    /// The stream ended before it was complete.
    #[error("truncated after {offset} bytes: the sender stopped or the connection broke")]
    Truncated {
        /// Bytes read before the end.
        offset: u64,
    },

    /// The checksum did not match: some byte changed on the way.
    #[error("checksum mismatch at byte {offset}: the data was corrupted in transit")]
    ChecksumMismatch {
        /// Where the checksum was checked.
        offset: u64,
    },

    /// A structurally invalid record.
    #[error("corrupt at byte {offset}: {detail}")]
    Corrupt {
        /// Where.
        offset: u64,
        /// What was wrong.
        detail: String,
    },

    /// The stream is fine but not the one the receiver expected.
    #[error("unexpected stream: {0}")]
    Unexpected(String),

    /// The sender gave up and said why.
    #[error("the sender aborted the stream: {0}")]
    SenderAborted(String),

    /// Reading failed (connection reset, peer gone, ...).
    #[error("reading failed: {0}")]
    Io(#[source] io::Error),
}

impl StreamError {
    /// Wraps this error in an `io::Error` so that it can travel through a `Read`.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            StreamError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            StreamError::Io(e) => e.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    /// Recovers a `StreamError` from an `io::Error` read from a stream: the one wrapped by
    /// [`StreamError::into_io`] if there is one, a truncation for an unexpected EOF, otherwise
    /// the IO error itself (an interrupted stream).
    pub fn from_io(err: io::Error, offset: u64) -> Self {
        if err.get_ref().is_some_and(|e| e.is::<StreamError>()) {
            let kind = err.kind();
            return match err.into_inner().map(|e| e.downcast::<StreamError>()) {
                Some(Ok(inner)) => *inner,
                // Not reachable after the check above; keep the kind rather than panic.
                _ => StreamError::Io(io::Error::from(kind)),
            };
        }
        if err.kind() == io::ErrorKind::UnexpectedEof {
            return StreamError::Truncated { offset };
        }
        StreamError::Io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_the_dataset_as_people_know_it() {
        let e = DatasetError::SnapshotNotFound {
            dataset: "db.3".into(),
            snapshot: "before".into(),
        }
        .naming("db");
        assert!(e.to_string().contains("dataset db "), "{e}");
        assert!(!e.to_string().contains("db.3"), "{e}");
    }
}
