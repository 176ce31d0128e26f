//! The [`Backend`] trait every storage backend implements, and the plain values it speaks.

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::DatasetError;
use crate::name::{DatasetName, SnapshotName};

/// Which backend made a stream (streams of different backends are not interchangeable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Plain directories ([`crate::dir::DirBackend`]).
    Dir,
    /// The zfs CLI ([`crate::zfs::ZfsBackend`]).
    Zfs,
}

impl BackendKind {
    /// The byte that stands for this kind in a stream header.
    pub fn wire(self) -> u8 {
        match self {
            BackendKind::Dir => 1,
            BackendKind::Zfs => 2,
        }
    }

    /// The kind a stream header's byte stands for.
    pub fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(BackendKind::Dir),
            2 => Some(BackendKind::Zfs),
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Dir => "dir",
            BackendKind::Zfs => "zfs",
        })
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dir" => Ok(BackendKind::Dir),
            "zfs" => Ok(BackendKind::Zfs),
            other => Err(format!("unknown backend {other:?}: use \"dir\" or \"zfs\"")),
        }
    }
}

/// A dataset as a backend reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetInfo {
    /// The dataset's name.
    pub name: DatasetName,
    /// Bytes the dataset really takes on disk: its live data and its snapshots, each block
    /// once (zfs: `used`; dir: allocated blocks of every distinct inode under live and
    /// snapshots). What a node's disk pays for it, not what its limit applies to.
    pub used_bytes: u64,
    /// Bytes of the live data alone, what the size limit applies to (zfs: `referenced` of the
    /// file system; dir: the apparent size of the live files, what a stream of them carries).
    pub referenced_bytes: u64,
    /// The size limit in bytes, if one was set.
    pub limit: Option<u64>,
    /// Where an application sees the dataset's files.
    pub mount_path: PathBuf,
}

impl DatasetInfo {
    /// Bytes of live data beyond the size limit, if the dataset is over it (`None` when under,
    /// at, or without a limit). The dir backend cannot stop an application from writing past
    /// its limit, so the node reports this loudly instead.
    pub fn over_limit(&self) -> Option<u64> {
        self.limit
            .and_then(|l| self.referenced_bytes.checked_sub(l))
            .filter(|&over| over > 0)
    }
}

/// How a backend's snapshots share storage with the live data: what a snapshot costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpaceSharing {
    /// Block-level copy-on-write (zfs): a snapshot costs only the blocks changed after it.
    CopyOnWrite,
    /// Snapshot files are reflinks of the live files (dir on btrfs, XFS): a snapshot costs
    /// only what is rewritten after it.
    Reflink,
    /// Each snapshot holds a full copy of every file that changed since the previous one (dir
    /// on ext4, tmpfs): live data plus its first snapshot take twice its size.
    Copy,
}

impl SpaceSharing {
    /// The short name: "cow", "reflink" or "copy".
    pub fn as_str(self) -> &'static str {
        match self {
            SpaceSharing::CopyOnWrite => "cow",
            SpaceSharing::Reflink => "reflink",
            SpaceSharing::Copy => "copy",
        }
    }

    /// What one snapshot costs, in words for `dataset ls`.
    pub fn snapshot_cost(self) -> &'static str {
        match self {
            SpaceSharing::CopyOnWrite => "each snapshot costs only the blocks changed after it",
            SpaceSharing::Reflink => {
                "each snapshot shares its files' data with the live files (reflinks)"
            }
            SpaceSharing::Copy => "each snapshot costs a copy of what changed",
        }
    }
}

impl fmt::Display for SpaceSharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One snapshot of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's name, unique within its dataset.
    pub name: SnapshotName,
    /// An identifier that a stream carries along: a received snapshot has the sender's guid, so
    /// two nodes holding the same guid hold the same data (zfs's own guid on `zfs`).
    pub guid: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// What a stream carries: one dataset, from an optional base snapshot to a target snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    /// The dataset.
    pub dataset: DatasetName,
    /// The snapshot the receiver must already hold as its latest (`None`: a full stream).
    pub base: Option<SnapshotName>,
    /// The snapshot the stream creates on the receiver.
    pub target: SnapshotName,
    /// The receiver reads the `dir` stream's version 2 (a changed file as the ranges that
    /// changed, see `dir/stream.rs`): the sender may use it. Not carried on the wire: the sender
    /// knows it from the connection ([`StreamSpec::with_deltas`]); false by default.
    pub deltas: bool,
}

impl StreamSpec {
    /// A full stream of `target`.
    pub fn full(dataset: DatasetName, target: SnapshotName) -> Self {
        StreamSpec {
            dataset,
            base: None,
            target,
            deltas: false,
        }
    }

    /// An incremental stream from `base` to `target`.
    pub fn incremental(dataset: DatasetName, base: SnapshotName, target: SnapshotName) -> Self {
        StreamSpec {
            dataset,
            base: Some(base),
            target,
            deltas: false,
        }
    }

    /// The same stream, allowed (or not) to send changed files as their changed ranges, where
    /// the backend can tell them without reading the files (the `dir` backend on a file system
    /// with reflinks). Only for a receiver known to read them.
    pub fn with_deltas(mut self, deltas: bool) -> Self {
        self.deltas = deltas;
        self
    }
}

/// The byte stream of a snapshot, as [`Backend::send`] returns it: read it to the end.
///
/// A failure of the producer (zfs send exiting non-zero, a snapshot file vanishing) surfaces as
/// an error from `read`, never as a clean early end of stream.
pub struct SendStream {
    reader: Box<dyn Read + Send>,
    size_hint: Option<u64>,
}

impl SendStream {
    /// Wraps a reader; `size_hint` is the exact or estimated length, for progress reports.
    pub fn new(reader: Box<dyn Read + Send>, size_hint: Option<u64>) -> Self {
        SendStream { reader, size_hint }
    }

    /// The stream's length if the backend knows it (exact for `dir`, estimated for `zfs`).
    pub fn size_hint(&self) -> Option<u64> {
        self.size_hint
    }
}

impl Read for SendStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl fmt::Debug for SendStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendStream")
            .field("size_hint", &self.size_hint)
            .finish_non_exhaustive()
    }
}

/// A storage backend: datasets with ordered snapshots that stream between nodes.
///
/// Calls block (file system work, child processes); async callers run them on
/// `spawn_blocking`, as [`crate::transfer`] does for streams. One backend value owns its root:
/// do not point two live instances at the same directory or zfs root.
pub trait Backend: Send + Sync {
    /// Which backend this is; streams only go between backends of the same kind.
    fn kind(&self) -> BackendKind;

    /// Creates an empty dataset, with a size limit in bytes if given.
    fn create(
        &self,
        dataset: &DatasetName,
        limit: Option<u64>,
    ) -> Result<DatasetInfo, DatasetError>;

    /// Destroys a dataset with all its snapshots; the name is free again at once.
    fn destroy(&self, dataset: &DatasetName) -> Result<(), DatasetError>;

    /// The dataset, or `None` if it does not exist (a half-received dataset does not).
    fn info(&self, dataset: &DatasetName) -> Result<Option<DatasetInfo>, DatasetError>;

    /// Every dataset, sorted by name.
    fn list(&self) -> Result<Vec<DatasetInfo>, DatasetError>;

    /// Takes a snapshot of the dataset's live files.
    fn snapshot(
        &self,
        dataset: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<SnapshotInfo, DatasetError>;

    /// The dataset's snapshots, oldest first.
    fn snapshots(&self, dataset: &DatasetName) -> Result<Vec<SnapshotInfo>, DatasetError>;

    /// Destroys one snapshot.
    fn destroy_snapshot(
        &self,
        dataset: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<(), DatasetError>;

    /// Puts the live files back to `snapshot` and destroys every later snapshot
    /// (`zfs rollback -r`).
    fn rollback(&self, dataset: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError>;

    /// Makes the live data the content of `snapshot` and keeps every snapshot, older and
    /// newer: a rollback that loses nothing.
    ///
    /// The live directory stays the same directory (applications and containers bind-mount
    /// the mount path): its contents are synced in place, removing what the snapshot lacks and
    /// rewriting what differs, without following a symlink. Stop or quiesce the application
    /// first; files it writes meanwhile may survive or be overwritten. Not atomic: a crash or
    /// error midway leaves the live data partly restored, so take a snapshot before restoring
    /// (what to go back to) and restore again to finish.
    fn restore(&self, dataset: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError>;

    /// Changes the dataset's size limit (`None`: no limit). The limit applies to the live data
    /// ([`DatasetInfo::referenced_bytes`]), not to snapshots. A limit below the data the
    /// dataset holds now is refused with [`DatasetError::LimitBelowUse`].
    fn set_limit(&self, dataset: &DatasetName, limit: Option<u64>) -> Result<(), DatasetError>;

    /// How this backend's snapshots share storage with the live data.
    fn space_sharing(&self) -> Result<SpaceSharing, DatasetError>;

    /// Where an application sees the dataset's files.
    fn mount_path(&self, dataset: &DatasetName) -> Result<PathBuf, DatasetError>;

    /// Opens the backend stream of `spec.target` (full) or of the changes from `spec.base`
    /// (incremental). Both snapshots must exist, base older than target.
    fn send(&self, spec: &StreamSpec) -> Result<SendStream, DatasetError>;

    /// Receives a stream made by [`Backend::send`] on another node and commits `spec.target`.
    ///
    /// Reads `stream` to its end. Commits only if the stream ended cleanly and the backend
    /// stream verified; otherwise the dataset stays exactly at its latest snapshot (incremental)
    /// or does not exist (full), and the error is [`DatasetError::Stream`] (truncated, corrupt,
    /// interrupted) or [`DatasetError::NoSpace`]. A full stream needs a dataset that does not
    /// exist and creates it with `limit`; an incremental stream needs `spec.base` to be the
    /// dataset's latest snapshot, and local changes since it are discarded (`zfs receive -F`).
    fn receive(
        &self,
        spec: &StreamSpec,
        limit: Option<u64>,
        stream: &mut dyn Read,
    ) -> Result<SnapshotInfo, DatasetError>;

    /// The dataset's latest snapshot, if it has one.
    fn latest_snapshot(&self, dataset: &DatasetName) -> Result<Option<SnapshotInfo>, DatasetError> {
        Ok(self.snapshots(dataset)?.pop())
    }
}

/// What [`set_aside`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetAside {
    /// Neither the dataset nor an earlier set-aside copy existed: nothing to keep.
    Nothing,
    /// The data is in `aside` under the kept snapshot; the dataset is back at the common
    /// snapshot (`true`) or gone (`false`: it did not hold a common snapshot).
    Kept { restarted: bool },
}

/// Sets a dataset's current data aside and takes the dataset back to an older snapshot,
/// losing nothing: what a node does with a copy that diverged (a failover made another node
/// primary while this one still took writes).
///
/// Snapshot `keep` is taken of the dataset as it is and copied, by a local full stream, into
/// a new dataset `aside` (without a size limit: nothing writes there); then the dataset rolls
/// back to `common` (its guid unchanged, so the new primary's incremental streams apply), or
/// is destroyed when it does not hold `common` (a full stream comes instead). The copy costs
/// the dataset's size once, in time and space; a rename would not, but zfs-fuse cannot rename
/// flock's containers ("dataset is busy").
///
/// Idempotent and resumable: an `aside` that exists was completed (a receive commits whole),
/// so a crash at any point and a repeated call finish the work.
pub fn set_aside(
    backend: &dyn Backend,
    dataset: &DatasetName,
    aside: &DatasetName,
    keep: &SnapshotName,
    common: Option<&SnapshotName>,
) -> Result<SetAside, DatasetError> {
    if backend.info(aside)?.is_none() {
        if backend.info(dataset)?.is_none() {
            return Ok(SetAside::Nothing);
        }
        if !backend.snapshots(dataset)?.iter().any(|s| &s.name == keep) {
            backend.snapshot(dataset, keep)?;
        }
        let mut stream = backend.send(&StreamSpec::full(dataset.clone(), keep.clone()))?;
        backend.receive(
            &StreamSpec::full(aside.clone(), keep.clone()),
            None,
            &mut stream,
        )?;
    }
    if backend.info(dataset)?.is_none() {
        return Ok(SetAside::Kept { restarted: false });
    }
    let snapshots = backend.snapshots(dataset)?;
    match common.filter(|c| snapshots.iter().any(|s| &s.name == *c)) {
        Some(c) => {
            backend.rollback(dataset, c)?;
            Ok(SetAside::Kept { restarted: true })
        }
        None => {
            backend.destroy(dataset)?;
            Ok(SetAside::Kept { restarted: false })
        }
    }
}

/// The newest snapshot of `ours` that `theirs` also holds (same name and guid): where an
/// incremental stream between two holders starts, and where a returning stale primary rolls
/// back to. `None` means a full stream is needed.
pub fn newest_common_snapshot<'a>(
    ours: &'a [SnapshotInfo],
    theirs: &[SnapshotInfo],
) -> Option<&'a SnapshotInfo> {
    ours.iter()
        .rev()
        .find(|s| theirs.iter().any(|t| t.name == s.name && t.guid == s.guid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, guid: u64) -> SnapshotInfo {
        SnapshotInfo {
            name: SnapshotName::new(name).expect("valid"),
            guid,
            created_unix: 0,
        }
    }

    #[test]
    fn newest_common_snapshot_matches_name_and_guid() {
        let ours = [snap("s1", 1), snap("s2", 2), snap("s3", 3)];
        let theirs = [snap("s1", 1), snap("s2", 2), snap("s3", 99)];
        assert_eq!(
            newest_common_snapshot(&ours, &theirs).map(|s| s.guid),
            Some(2)
        );
        assert!(newest_common_snapshot(&ours, &[snap("s1", 7)]).is_none());
        assert!(newest_common_snapshot(&[], &theirs).is_none());
    }

    #[test]
    fn over_limit_counts_live_data_beyond_the_limit() {
        let info = |referenced_bytes, limit| DatasetInfo {
            name: DatasetName::new("d").expect("valid"),
            used_bytes: 10 * referenced_bytes,
            referenced_bytes,
            limit,
            mount_path: PathBuf::new(),
        };
        assert_eq!(info(150, Some(100)).over_limit(), Some(50));
        assert_eq!(info(100, Some(100)).over_limit(), None);
        assert_eq!(info(99, Some(100)).over_limit(), None);
        assert_eq!(info(1 << 40, None).over_limit(), None);
    }
}
