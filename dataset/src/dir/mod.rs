//! The `dir` backend: datasets as plain directories, the embedded default (no setup).
//!
//! ```text
//! ROOT/FORMAT                          "flock-dir 1": the layout version
//! ROOT/datasets/NAME/dataset.json      {"format":1,"limit":BYTES|null}
//! ROOT/datasets/NAME/live/             the mount path: what the application sees
//! ROOT/datasets/NAME/snapshots/SEQ/    one snapshot: info.json + tree/ (SEQ orders them)
//! ROOT/datasets/NAME/resync            marker: make live/ match the latest snapshot again
//! ROOT/staging/RANDOM/                 work in progress (new datasets, snapshots, receives)
//! ROOT/trash/RANDOM/                   destroyed datasets and snapshots being deleted
//! ```
//!
//! Every change is prepared under `staging/` and committed by one `rename` (`RENAME_NOREPLACE`
//! for new names), with a `syncfs` before and after; `open` clears `staging/` and `trash/` and
//! finishes any live-tree resync a crash interrupted. So a dataset or snapshot either exists
//! complete or not at all.
//!
//! A snapshot copies the live tree, hard-linking each file that is unchanged since the previous
//! snapshot. "Unchanged" is decided rsync-style (same size, mode, owner, mtime) and made safe
//! against same-tick rewrites the way git treats "racy" index entries: the live file's ctime
//! (which user space cannot set) must also be older than the moment the previous snapshot
//! began. A file written in the very clock tick a snapshot began is therefore copied again by
//! the next snapshot, once; to make that rare, a snapshot's clock is read as the first tick after
//! the one it was asked in (see `fs_clock`). Snapshot trees are never modified, so equal inodes
//! in two snapshots mean an unchanged file, which makes incremental streams exact.
//!
//! A received snapshot's `taken_at` is read after live/ was made equal to it (the full receive
//! always did this; an incremental one makes live/ follow the staged tree before its commit),
//! so the files a receive copies into live/ are trusted by the next receive and the next local
//! snapshot rather than copied again by each of them: a replica's cost per receive is what
//! changed, not what ever changed. What this trusts is that nothing writes a replica's live/
//! while it receives (its app is stopped); a write there after the receive is caught by its
//! ctime like any other. Only the files a stream carries are read or written; the rest of a
//! receive, snapshot or send is one `stat` per name (a dataset of many files still pays for
//! their number, not their size).
//!
//! Where the file system makes reflinks (btrfs, XFS), a file a snapshot copies, and a file a
//! rollback, restore or receive copies back into live/, is a reflink (`FICLONE`) that shares
//! its data until either side is rewritten; elsewhere (ext4, tmpfs) it is a byte copy, so the
//! live tree and its first snapshot take twice the data's size ([`DirBackend::space_sharing`]).
//!
//! Space: `used_bytes` is what the dataset takes on disk, the allocated blocks of every distinct
//! inode under live/ and snapshots/ (a file hard-linked into several snapshots counts once; a
//! reflinked file counts in full, as `st_blocks` cannot tell shared blocks). `referenced_bytes`
//! is the apparent size of the live files, what the size limit applies to and what a stream of
//! them carries. The limit is enforced when a stream is received (on the size of the snapshot
//! it makes), not while an application writes: plain directories have no quota (project
//! quotas would need a file system mounted with them), so [`DatasetInfo::over_limit`] reports
//! a dataset that grew past it.
//!
//! No link is followed out of a dataset: live trees belong to applications, which may swap a
//! directory for a symlink (to `/etc`, to flockd's `tls/`) at any moment, so every tree is
//! opened at its root and walked, copied, sized, sent and written one name at a time relative
//! to directory descriptors, never following a symlink (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, else `openat` with `O_NOFOLLOW` per component; see `dirfd`). A symlink
//! is stored as a symlink (its target text). A received stream that names `..`, an absolute
//! path, or a path through a symlink is refused, and the dataset stays at its last snapshot.
//!
//! Not carried: extended attributes, ACLs, hard links inside the live tree (each name becomes its
//! own file), sockets, fifos and device nodes (skipped with a warning). A snapshot of a tree
//! that is being written is not atomic (zfs's are); stop or quiesce the app for a consistent one.

mod delta;
mod dirfd;
mod stream;
pub(crate) mod tree;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{
    Backend, BackendKind, DatasetInfo, SendStream, SnapshotInfo, SpaceSharing, StreamSpec,
};
use crate::error::DatasetError;
use crate::name::{DatasetName, SnapshotName};
use stream::{ApplyError, DirSendReader, Expect, Limit, SnapRef, StreamStart};
use tree::{Keep, Stamp, TrustedTree};

const FORMAT_LINE: &str = "flock-dir 1\n";

#[derive(Serialize, Deserialize)]
struct DatasetMeta {
    format: u32,
    limit: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    format: u32,
    name: String,
    guid: u64,
    created_unix: u64,
    /// The file system time when the snapshot began (see `tree::unchanged`).
    taken_at: Stamp,
}

/// A snapshot on disk.
struct Snap {
    seq: u64,
    dir: PathBuf,
    meta: SnapshotMeta,
    info: SnapshotInfo,
}

impl Snap {
    fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }
    fn snap_ref(&self) -> SnapRef {
        SnapRef {
            name: self.meta.name.clone(),
            guid: self.meta.guid,
        }
    }
}

/// Datasets as plain directories under one root directory.
pub struct DirBackend {
    root: PathBuf,
    locks: Mutex<HashMap<DatasetName, Arc<Mutex<()>>>>,
    /// Whether the root's file system makes reflinks, once probed.
    sharing: OnceLock<SpaceSharing>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-done on disk that `open` would not
    // also recover from, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), DatasetError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| DatasetError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("cannot encode: {e}"),
    })?;
    fs::write(path, bytes).map_err(|e| DatasetError::io("write", path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DatasetError> {
    let bytes = fs::read(path).map_err(|e| DatasetError::io("read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| DatasetError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("unreadable ({e}); restore it or destroy the dataset"),
    })
}

fn create_dir(path: &Path) -> Result<(), DatasetError> {
    fs::create_dir(path).map_err(|e| DatasetError::io("create directory", path, e))
}

/// A new dataset's empty live tree: 0755 whatever the process's umask (flockd keeps its own
/// files private with umask 077; the dataset's root belongs to the application).
fn create_live(path: &Path) -> Result<(), DatasetError> {
    use std::os::unix::fs::PermissionsExt;
    create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| DatasetError::io("set the mode of", path, e))
}

fn clear_dir(path: &Path) -> Result<(), DatasetError> {
    let rd = fs::read_dir(path).map_err(|e| DatasetError::io("read directory", path, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| DatasetError::io("read directory", path, e))?;
        tree::remove_any(&entry.path())?;
    }
    Ok(())
}

impl DirBackend {
    /// Opens (creating if needed) a dir backend rooted at `root`, and recovers from a crash:
    /// unfinished work in `staging/` and `trash/` is removed, interrupted live resyncs redone.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, DatasetError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| DatasetError::io("create directory", &root, e))?;
        let format = root.join("FORMAT");
        match fs::read_to_string(&format) {
            Ok(s) if s == FORMAT_LINE => {}
            Ok(s) => {
                return Err(DatasetError::Corrupt {
                    path: format,
                    detail: format!(
                        "layout {:?} is not the one this build reads ({:?}); use a matching flock version",
                        s.trim(),
                        FORMAT_LINE.trim()
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&format, FORMAT_LINE).map_err(|e| DatasetError::io("write", &format, e))?
            }
            Err(e) => return Err(DatasetError::io("read", &format, e)),
        }
        for sub in ["datasets", "staging", "trash"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| DatasetError::io("create directory", &p, e))?;
        }
        clear_dir(&root.join("staging"))?;
        clear_dir(&root.join("trash"))?;
        let backend = DirBackend {
            root,
            locks: Mutex::new(HashMap::new()),
            sharing: OnceLock::new(),
        };
        for info in backend.list_names()? {
            let dir = backend.dataset_dir(&info);
            if dir.join("resync").exists() {
                tracing::warn!(dataset = %info, "finishing an interrupted rollback or receive");
                backend.resync_live(&info)?;
            }
        }
        Ok(backend)
    }

    /// The directory this backend keeps its datasets under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True if `rel` (relative to a backend root) is an application's data or inside it: a
    /// dataset's `live/` tree, a snapshot's `tree/`, or anything in `staging/` or `trash/`
    /// (trees in transit). Their modes belong to the application and travel with snapshots, so
    /// whoever tightens flockd's files leaves them alone; what keeps others out of them is the
    /// private directories above.
    pub fn holds_app_data(rel: &Path) -> bool {
        let parts: Vec<&std::ffi::OsStr> = rel.components().map(|c| c.as_os_str()).collect();
        match parts.as_slice() {
            [top, _, ..] if *top == "staging" || *top == "trash" => true,
            [top, _, live, ..] if *top == "datasets" && *live == "live" => true,
            [top, _, snaps, _, tree, ..]
                if *top == "datasets" && *snaps == "snapshots" && *tree == "tree" =>
            {
                true
            }
            _ => false,
        }
    }

    fn dataset_dir(&self, ds: &DatasetName) -> PathBuf {
        self.root.join("datasets").join(ds.as_str())
    }

    fn live_dir(&self, ds: &DatasetName) -> PathBuf {
        self.dataset_dir(ds).join("live")
    }

    fn lock_dataset(&self, ds: &DatasetName) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(ds.clone()).or_default().clone()
    }

    fn staging(&self) -> Result<PathBuf, DatasetError> {
        let p = self
            .root
            .join("staging")
            .join(format!("{:016x}", rand::random::<u64>()));
        create_dir(&p)?;
        Ok(p)
    }

    /// Moves `path` into trash/ (atomically out of sight) and deletes it.
    fn discard(&self, path: &Path) -> Result<(), DatasetError> {
        let trash = self
            .root
            .join("trash")
            .join(format!("{:016x}", rand::random::<u64>()));
        fs::rename(path, &trash).map_err(|e| DatasetError::io("move to trash", path, e))?;
        tree::remove_any(&trash)
    }

    /// Reads the clock of the file system holding `dir` (a directory of ours) as a stamp later
    /// than every ctime the file system gave out before this call: the ctime of a scratch file,
    /// touched again until the clock has moved on from its first tick (a few milliseconds at
    /// most; after a second of a stuck clock the first tick is returned, which only makes the
    /// next snapshot copy more than it must). A file changed before the call is trusted
    /// against a snapshot with this stamp (its ctime is older), one changed after is not (its
    /// ctime is this stamp or later), so a file written in the tick just before a snapshot or
    /// by a receive's copy into live/ is not copied again by the next one for being "racy".
    fn fs_clock(&self, dir: &Path) -> Result<Stamp, DatasetError> {
        let probe = dir.join(format!(".clock-{:016x}", rand::random::<u64>()));
        let result = (|| {
            let f =
                fs::File::create(&probe).map_err(|e| self.full_or_io(None, "write", &probe, e))?;
            let first = tree::fs_now(&probe)?;
            let give_up = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut now = first;
            while now <= first && std::time::Instant::now() < give_up {
                std::thread::sleep(std::time::Duration::from_millis(1));
                // Setting the mtime sets the ctime to the file system's current time.
                f.set_modified(SystemTime::now())
                    .map_err(|e| DatasetError::io("touch", &probe, e))?;
                now = tree::fs_now(&probe)?;
            }
            Ok(now.max(first))
        })();
        tree::remove_any(&probe)?;
        result
    }

    fn full_or_io(
        &self,
        ds: Option<&DatasetName>,
        action: &'static str,
        path: &Path,
        e: io::Error,
    ) -> DatasetError {
        if tree::is_full(&e) {
            self.no_space(ds.map_or("(none)", |d| d.as_str()))
        } else {
            DatasetError::io(action, path, e)
        }
    }

    fn no_space(&self, ds: &str) -> DatasetError {
        DatasetError::NoSpace {
            dataset: ds.to_string(),
            detail: format!(
                "the file system holding {} is full; free space there",
                self.root.display()
            ),
        }
    }

    /// Maps a full file system, wherever it surfaced, to `NoSpace` for `ds`.
    fn classify(&self, ds: &DatasetName, e: DatasetError) -> DatasetError {
        match e {
            DatasetError::Io { ref source, .. } if tree::is_full(source) => {
                self.no_space(ds.as_str())
            }
            other => other,
        }
    }

    fn list_names(&self) -> Result<Vec<DatasetName>, DatasetError> {
        let dir = self.root.join("datasets");
        let rd = fs::read_dir(&dir).map_err(|e| DatasetError::io("read directory", &dir, e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| DatasetError::io("read directory", &dir, e))?;
            match entry.file_name().to_str().map(DatasetName::new) {
                Some(Ok(name)) => names.push(name),
                _ => tracing::warn!(path = %entry.path().display(), "ignoring a stray entry"),
            }
        }
        names.sort();
        Ok(names)
    }

    fn require(&self, ds: &DatasetName) -> Result<PathBuf, DatasetError> {
        let dir = self.dataset_dir(ds);
        if dir.join("dataset.json").is_file() {
            Ok(dir)
        } else {
            Err(DatasetError::NotFound {
                dataset: ds.to_string(),
            })
        }
    }

    fn snaps(&self, ds: &DatasetName) -> Result<Vec<Snap>, DatasetError> {
        let dir = self.require(ds)?.join("snapshots");
        let rd = fs::read_dir(&dir).map_err(|e| DatasetError::io("read directory", &dir, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| DatasetError::io("read directory", &dir, e))?;
            let Some(seq) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
            else {
                tracing::warn!(path = %entry.path().display(), "ignoring a stray entry");
                continue;
            };
            let meta: SnapshotMeta = read_json(&entry.path().join("info.json"))?;
            let name = SnapshotName::new(&meta.name).map_err(|e| DatasetError::Corrupt {
                path: entry.path(),
                detail: e.to_string(),
            })?;
            out.push(Snap {
                seq,
                dir: entry.path(),
                info: SnapshotInfo {
                    name,
                    guid: meta.guid,
                    created_unix: meta.created_unix,
                },
                meta,
            });
        }
        out.sort_by_key(|s| s.seq);
        Ok(out)
    }

    fn find_snap(
        &self,
        ds: &DatasetName,
        snaps: &[Snap],
        name: &SnapshotName,
    ) -> Result<usize, DatasetError> {
        snaps
            .iter()
            .position(|s| &s.info.name == name)
            .ok_or_else(|| DatasetError::SnapshotNotFound {
                dataset: ds.to_string(),
                snapshot: name.to_string(),
            })
    }

    fn dataset_info(&self, ds: &DatasetName) -> Result<DatasetInfo, DatasetError> {
        let dir = self.require(ds)?;
        let meta: DatasetMeta = read_json(&dir.join("dataset.json"))?;
        let snaps = self.snaps(ds)?;
        let trees: Vec<PathBuf> = snaps.iter().map(Snap::tree).collect();
        let live = self.live_dir(ds);
        let space = tree::space(&trees, &live)?;
        Ok(DatasetInfo {
            name: ds.clone(),
            used_bytes: space.used,
            referenced_bytes: space.referenced,
            limit: meta.limit,
            mount_path: live,
        })
    }

    /// Writes `dataset.json` anew: prepared in staging/, renamed over the old one.
    fn write_meta(&self, dir: &Path, meta: &DatasetMeta) -> Result<(), DatasetError> {
        let staging = self.staging()?;
        let result = (|| {
            let tmp = staging.join("dataset.json");
            write_json(&tmp, meta)?;
            tree::sync_fs(&self.root)?;
            let path = dir.join("dataset.json");
            fs::rename(&tmp, &path).map_err(|e| DatasetError::io("replace", &path, e))?;
            tree::sync_fs(&self.root)
        })();
        if let Err(e) = tree::remove_any(&staging) {
            tracing::warn!(error = %e, "could not clean up a staging area");
        }
        result
    }

    /// Makes live/ match the latest snapshot and clears the resync marker.
    fn resync_live(&self, ds: &DatasetName) -> Result<(), DatasetError> {
        let dir = self.require(ds)?;
        let live = self.live_dir(ds);
        match self.snaps(ds)?.last() {
            Some(s) => {
                let t = s.tree();
                tree::sync_to(
                    &t,
                    &live,
                    Keep::Trusted(TrustedTree {
                        root: &t,
                        taken_at: s.meta.taken_at,
                    }),
                )?;
            }
            None => {
                tree::remove_any(&live)?;
                create_live(&live)?;
            }
        }
        tree::sync_fs(&self.root)?;
        tree::remove_any(&dir.join("resync"))
    }

    fn mark_resync(&self, dir: &Path) -> Result<(), DatasetError> {
        let marker = dir.join("resync");
        fs::write(&marker, b"").map_err(|e| DatasetError::io("write", &marker, e))?;
        tree::sync_fs(&self.root)
    }

    fn next_seq(snaps: &[Snap]) -> u64 {
        snaps.last().map_or(1, |s| s.seq + 1)
    }

    fn snap_path(dir: &Path, seq: u64) -> PathBuf {
        dir.join("snapshots").join(format!("{seq:020}"))
    }

    fn receive_full(
        &self,
        spec: &StreamSpec,
        limit: Option<u64>,
        stream: &mut dyn Read,
    ) -> Result<SnapshotInfo, DatasetError> {
        let ds = &spec.dataset;
        let final_dir = self.dataset_dir(ds);
        if final_dir.exists() {
            return Err(DatasetError::AlreadyExists {
                dataset: ds.to_string(),
            });
        }
        let staging = self.staging()?;
        let result = (|| {
            create_dir(&staging.join("live"))?;
            create_dir(&staging.join("snapshots"))?;
            write_json(
                &staging.join("dataset.json"),
                &DatasetMeta { format: 1, limit },
            )?;
            let snap_dir = Self::snap_path(&staging, 1);
            create_dir(&snap_dir)?;
            let tree_dir = snap_dir.join("tree");
            create_dir(&tree_dir)?;
            let started = std::time::Instant::now();
            let applied = stream::apply(
                stream,
                &tree_dir,
                None,
                &Expect {
                    base: None,
                    target_name: spec.target.as_str(),
                },
                limit.map(|limit| Limit { limit, start: 0 }),
            )
            .map_err(|e| self.apply_error(ds, e))?;
            let applied_at = started.elapsed();
            tree::sync_to(&tree_dir, &staging.join("live"), Keep::Nothing)?;
            let live_at = started.elapsed();
            let meta = SnapshotMeta {
                format: 1,
                name: spec.target.to_string(),
                guid: applied.start.target.guid,
                created_unix: applied.start.created_unix,
                taken_at: self.fs_clock(&staging)?,
            };
            write_json(&snap_dir.join("info.json"), &meta)?;
            tree::sync_fs(&self.root)?;
            tracing::debug!(dataset = %ds, stream = ?applied_at, live = ?(live_at - applied_at),
                sync = ?(started.elapsed() - live_at), "full receive: stream applied, live/ made, synced");
            match tree::rename_noreplace(&staging, &final_dir) {
                Ok(()) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) =>
                {
                    return Err(DatasetError::AlreadyExists {
                        dataset: ds.to_string(),
                    })
                }
                Err(e) => return Err(DatasetError::io("commit dataset", &final_dir, e)),
            }
            tree::sync_fs(&self.root)?;
            Ok(SnapshotInfo {
                name: spec.target.clone(),
                guid: meta.guid,
                created_unix: meta.created_unix,
            })
        })();
        if result.is_err() {
            // Leaves no half-written dataset behind (staging is also cleared at open).
            if let Err(e) = tree::remove_any(&staging) {
                tracing::warn!(error = %e, "could not clean up a failed receive");
            }
        }
        result.map_err(|e| self.classify(ds, e))
    }

    fn receive_incremental(
        &self,
        spec: &StreamSpec,
        base: &SnapshotName,
        stream: &mut dyn Read,
    ) -> Result<SnapshotInfo, DatasetError> {
        let ds = &spec.dataset;
        let dir = self.require(ds)?;
        let meta: DatasetMeta = read_json(&dir.join("dataset.json"))?;
        let snaps = self.snaps(ds)?;
        let Some(latest) = snaps.last().filter(|s| &s.info.name == base) else {
            return Err(DatasetError::BaseMismatch {
                dataset: ds.to_string(),
                base: base.to_string(),
                latest: snaps
                    .last()
                    .map_or("none".to_string(), |s| s.info.name.to_string()),
            });
        };
        if snaps.iter().any(|s| s.info.name == spec.target) {
            return Err(DatasetError::SnapshotExists {
                dataset: ds.to_string(),
                snapshot: spec.target.to_string(),
            });
        }
        // The limit applies to the snapshot the stream makes, which starts as the base.
        let limit = match meta.limit {
            Some(limit) => Some(Limit {
                limit,
                start: tree::tree_size(&latest.tree())?,
            }),
            None => None,
        };
        let staging = self.staging()?;
        let result = (|| {
            let snap_dir = staging.join("snap");
            create_dir(&snap_dir)?;
            let tree_dir = snap_dir.join("tree");
            let base_tree = latest.tree();
            let started = std::time::Instant::now();
            tree::link_clone(&base_tree, &tree_dir)?;
            let applied = stream::apply(
                stream,
                &tree_dir,
                Some(&base_tree),
                &Expect {
                    base: Some(&latest.snap_ref()),
                    target_name: spec.target.as_str(),
                },
                limit,
            )
            .map_err(|e| self.apply_error(ds, e))?;
            // live/ follows the staged tree before the commit, so that the snapshot's
            // `taken_at` can be read after it: the files this copies into live/ then count as
            // unchanged against the snapshot, and the next receive keeps them instead of
            // copying them again (with `taken_at` read before, every file a receive ever
            // copied was copied again by every later receive). A crash in between leaves the
            // resync marker, and `open` puts live/ back to the base, the latest snapshot.
            let applied_at = started.elapsed();
            self.mark_resync(&dir)?;
            tree::sync_to(
                &tree_dir,
                &self.live_dir(ds),
                Keep::Trusted(TrustedTree {
                    root: &base_tree,
                    taken_at: latest.meta.taken_at,
                }),
            )?;
            let info = SnapshotMeta {
                format: 1,
                name: spec.target.to_string(),
                guid: applied.start.target.guid,
                created_unix: applied.start.created_unix,
                taken_at: self.fs_clock(&staging)?,
            };
            write_json(&snap_dir.join("info.json"), &info)?;
            let live_at = started.elapsed();
            tree::sync_fs(&self.root)?;
            tracing::debug!(dataset = %ds, stream = ?applied_at, live = ?(live_at - applied_at),
                sync = ?(started.elapsed() - live_at), "incremental receive: stream applied, live/ updated, synced");
            let final_snap = Self::snap_path(&dir, Self::next_seq(&snaps));
            tree::rename_noreplace(&snap_dir, &final_snap)
                .map_err(|e| DatasetError::io("commit snapshot", &final_snap, e))?;
            tree::sync_fs(&self.root)?;
            tree::remove_any(&dir.join("resync"))?;
            Ok(SnapshotInfo {
                name: spec.target.clone(),
                guid: info.guid,
                created_unix: info.created_unix,
            })
        })();
        if let Err(e) = tree::remove_any(&staging) {
            tracing::warn!(error = %e, "could not clean up a receive's staging area");
        }
        if result.is_err() && dir.join("resync").exists() {
            // live/ was partly made the new tree: back to the latest snapshot now (else `open`).
            if let Err(e) = self.resync_live(ds) {
                tracing::warn!(error = %e, "could not put live/ back after a failed receive; the next open will");
            }
        }
        result.map_err(|e| self.classify(ds, e))
    }

    fn apply_error(&self, ds: &DatasetName, e: ApplyError) -> DatasetError {
        match e {
            ApplyError::Stream(source) => DatasetError::Stream {
                dataset: ds.to_string(),
                source,
            },
            ApplyError::OverLimit { limit, at_least } => DatasetError::NoSpace {
                dataset: ds.to_string(),
                detail: format!(
                    "the snapshot the stream makes holds at least {at_least} bytes of data, more \
                     than its size limit of {limit} bytes; raise the limit"
                ),
            },
            ApplyError::Full => self.no_space(ds.as_str()),
            ApplyError::Local(e) => self.classify(ds, e),
        }
    }
}

impl Backend for DirBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn create(&self, ds: &DatasetName, limit: Option<u64>) -> Result<DatasetInfo, DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let final_dir = self.dataset_dir(ds);
        if final_dir.exists() {
            return Err(DatasetError::AlreadyExists {
                dataset: ds.to_string(),
            });
        }
        let staging = self.staging()?;
        let result = (|| {
            create_live(&staging.join("live"))?;
            create_dir(&staging.join("snapshots"))?;
            write_json(
                &staging.join("dataset.json"),
                &DatasetMeta { format: 1, limit },
            )?;
            tree::sync_fs(&self.root)?;
            tree::rename_noreplace(&staging, &final_dir).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) {
                    DatasetError::AlreadyExists {
                        dataset: ds.to_string(),
                    }
                } else {
                    DatasetError::io("commit dataset", &final_dir, e)
                }
            })?;
            tree::sync_fs(&self.root)
        })();
        if result.is_err() {
            let _ = tree::remove_any(&staging);
        }
        result.map_err(|e| self.classify(ds, e))?;
        self.dataset_info(ds)
    }

    fn destroy(&self, ds: &DatasetName) -> Result<(), DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let dir = self.require(ds)?;
        self.discard(&dir)?;
        tree::sync_fs(&self.root)
    }

    fn info(&self, ds: &DatasetName) -> Result<Option<DatasetInfo>, DatasetError> {
        match self.dataset_info(ds) {
            Ok(info) => Ok(Some(info)),
            Err(DatasetError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> Result<Vec<DatasetInfo>, DatasetError> {
        let mut out = Vec::new();
        for ds in self.list_names()? {
            // A dataset destroyed while we list is simply not listed.
            if let Some(info) = self.info(&ds)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn snapshot(
        &self,
        ds: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<SnapshotInfo, DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let dir = self.require(ds)?;
        let snaps = self.snaps(ds)?;
        if snaps.iter().any(|s| &s.info.name == snapshot) {
            return Err(DatasetError::SnapshotExists {
                dataset: ds.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        let staging = self.staging()?;
        let result = (|| {
            // The file system's "now" as the copy begins: a file changed since has a ctime at
            // least this, and is not trusted against this snapshot by the next one.
            let taken_at = self.fs_clock(&staging)?;
            let snap_dir = staging.join("snap");
            create_dir(&snap_dir)?;
            let prev_tree = snaps.last().map(Snap::tree);
            let prev = snaps
                .last()
                .zip(prev_tree.as_deref())
                .map(|(s, root)| TrustedTree {
                    root,
                    taken_at: s.meta.taken_at,
                });
            tree::snapshot_copy(&self.live_dir(ds), &snap_dir.join("tree"), prev)?;
            let meta = SnapshotMeta {
                format: 1,
                name: snapshot.to_string(),
                guid: rand::random::<u64>() | 1,
                created_unix: now_unix(),
                taken_at,
            };
            write_json(&snap_dir.join("info.json"), &meta)?;
            tree::sync_fs(&self.root)?;
            let final_snap = Self::snap_path(&dir, Self::next_seq(&snaps));
            tree::rename_noreplace(&snap_dir, &final_snap)
                .map_err(|e| DatasetError::io("commit snapshot", &final_snap, e))?;
            tree::sync_fs(&self.root)?;
            Ok(SnapshotInfo {
                name: snapshot.clone(),
                guid: meta.guid,
                created_unix: meta.created_unix,
            })
        })();
        if let Err(e) = tree::remove_any(&staging) {
            tracing::warn!(error = %e, "could not clean up a snapshot's staging area");
        }
        result.map_err(|e| self.classify(ds, e))
    }

    fn snapshots(&self, ds: &DatasetName) -> Result<Vec<SnapshotInfo>, DatasetError> {
        Ok(self.snaps(ds)?.into_iter().map(|s| s.info).collect())
    }

    fn destroy_snapshot(
        &self,
        ds: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<(), DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let snaps = self.snaps(ds)?;
        let i = self.find_snap(ds, &snaps, snapshot)?;
        self.discard(&snaps[i].dir)?;
        tree::sync_fs(&self.root)
    }

    fn rollback(&self, ds: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let dir = self.require(ds)?;
        let snaps = self.snaps(ds)?;
        let i = self.find_snap(ds, &snaps, snapshot)?;
        self.mark_resync(&dir)?;
        // Newest first, so an interruption leaves a prefix of the history, never a gap.
        for later in snaps[i + 1..].iter().rev() {
            self.discard(&later.dir)?;
        }
        self.resync_live(ds).map_err(|e| self.classify(ds, e))
    }

    fn restore(&self, ds: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        self.require(ds)?;
        let snaps = self.snaps(ds)?;
        let s = &snaps[self.find_snap(ds, &snaps, snapshot)?];
        let t = s.tree();
        // No resync marker: a crash midway leaves live/ partly restored, which `open` must not
        // "finish" by syncing it to the latest snapshot instead.
        tree::sync_to(
            &t,
            &self.live_dir(ds),
            Keep::Trusted(TrustedTree {
                root: &t,
                taken_at: s.meta.taken_at,
            }),
        )
        .and_then(|()| tree::sync_fs(&self.root))
        .map_err(|e| self.classify(ds, e))
    }

    fn set_limit(&self, ds: &DatasetName, limit: Option<u64>) -> Result<(), DatasetError> {
        let guard = self.lock_dataset(ds);
        let _held = lock(&guard);
        let dir = self.require(ds)?;
        let mut meta: DatasetMeta = read_json(&dir.join("dataset.json"))?;
        if let Some(limit) = limit {
            let used = tree::tree_size(&self.live_dir(ds))?;
            if limit < used {
                return Err(DatasetError::LimitBelowUse {
                    dataset: ds.to_string(),
                    limit,
                    used,
                });
            }
        }
        meta.limit = limit;
        self.write_meta(&dir, &meta)
            .map_err(|e| self.classify(ds, e))
    }

    fn space_sharing(&self) -> Result<SpaceSharing, DatasetError> {
        if let Some(s) = self.sharing.get() {
            return Ok(*s);
        }
        let probed = if tree::reflinks_work(&self.root.join("staging"))? {
            SpaceSharing::Reflink
        } else {
            SpaceSharing::Copy
        };
        Ok(*self.sharing.get_or_init(|| probed))
    }

    fn mount_path(&self, ds: &DatasetName) -> Result<PathBuf, DatasetError> {
        self.require(ds)?;
        Ok(self.live_dir(ds))
    }

    fn send(&self, spec: &StreamSpec) -> Result<SendStream, DatasetError> {
        let ds = &spec.dataset;
        let snaps = self.snaps(ds)?;
        let t = self.find_snap(ds, &snaps, &spec.target)?;
        let target = &snaps[t];
        let base = match &spec.base {
            Some(b) => {
                let i = self.find_snap(ds, &snaps, b)?;
                if i >= t {
                    return Err(DatasetError::BaseMismatch {
                        dataset: ds.to_string(),
                        base: b.to_string(),
                        latest: format!("{} (the base must be older than the target)", spec.target),
                    });
                }
                Some(&snaps[i])
            }
            None => None,
        };
        let start = StreamStart {
            base: base.map(Snap::snap_ref),
            target: target.snap_ref(),
            created_unix: target.meta.created_unix,
        };
        let base_tree = base.map(Snap::tree);
        let (reader, len) =
            DirSendReader::open(start, base_tree.as_deref(), &target.tree(), spec.deltas)?;
        Ok(SendStream::new(Box::new(reader), Some(len)))
    }

    fn receive(
        &self,
        spec: &StreamSpec,
        limit: Option<u64>,
        stream: &mut dyn Read,
    ) -> Result<SnapshotInfo, DatasetError> {
        let guard = self.lock_dataset(&spec.dataset);
        let _held = lock(&guard);
        match &spec.base {
            None => self.receive_full(spec, limit, stream),
            Some(base) => self.receive_incremental(spec, base, stream),
        }
    }
}
