//! File tree operations for the `dir` backend: walk, copy with metadata, link-copy against a
//! previous snapshot, make one tree identical to another, count used bytes.
//!
//! "Unchanged" is decided rsync-style on size, mode, owner and mtime, made safe against
//! same-tick modifications the way git handles "racy" index entries: a live file is trusted to
//! equal a snapshot's copy only if its ctime is older than the moment that snapshot began. ctime
//! cannot be set from user space and changes on every write, chmod, chown, rename and link.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DatasetError;

/// A file system timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Stamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The metadata a stream carries and a copy preserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Stamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File { size: u64 },
    Symlink { target: OsString },
}

/// One entry of a tree, relative to the tree's root ("" is the root itself).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub rel: PathBuf,
    pub kind: Kind,
    pub meta: Meta,
    /// (device, inode): equal inodes in two snapshots mean an unchanged file.
    pub ino: (u64, u64),
    pub ctime: Stamp,
}

/// `root/rel`, with "" meaning `root` itself.
pub(crate) fn at(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn entry_from(rel: PathBuf, path: &Path, md: &fs::Metadata) -> io::Result<Option<Entry>> {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File { size: md.len() }
    } else if ft.is_symlink() {
        Kind::Symlink {
            target: fs::read_link(path)?.into_os_string(),
        }
    } else {
        tracing::warn!(path = %path.display(), "skipping a socket, fifo or device: the dir backend stores only files, directories and symlinks");
        return Ok(None);
    };
    Ok(Some(Entry {
        rel,
        kind,
        meta: Meta {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: Stamp {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            },
        },
        ino: (md.dev(), md.ino()),
        ctime: Stamp {
            sec: md.ctime(),
            nsec: md.ctime_nsec() as u32,
        },
    }))
}

/// The entry at `root/rel`, `None` if it does not exist or is not a supported type.
pub(crate) fn stat(root: &Path, rel: &Path) -> Result<Option<Entry>, DatasetError> {
    let path = at(root, rel);
    match fs::symlink_metadata(&path) {
        Ok(md) => entry_from(rel.to_path_buf(), &path, &md)
            .map_err(|e| DatasetError::io("read", &path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DatasetError::io("stat", &path, e)),
    }
}

/// Every entry under `root`, parents before children, siblings sorted by name.
///
/// Entries that vanish during the walk (a live tree in use) are left out.
pub(crate) fn walk(root: &Path) -> Result<Vec<Entry>, DatasetError> {
    if stat(root, Path::new(""))?.is_none() {
        return Err(DatasetError::io(
            "walk",
            root,
            io::Error::from(io::ErrorKind::NotFound),
        ));
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Some(entry) = stat(root, &rel)? else {
            continue;
        };
        let is_dir = entry.kind == Kind::Dir;
        out.push(entry);
        if !is_dir {
            continue;
        }
        let dir = at(root, &rel);
        let mut names: Vec<OsString> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()
                .map_err(|e| DatasetError::io("read directory", &dir, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(DatasetError::io("read directory", &dir, e)),
        };
        names.sort();
        // Reverse so that the stack pops them in name order.
        for name in names.into_iter().rev() {
            stack.push(rel.join(name));
        }
    }
    Ok(out)
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Applies owner, mode and mtime to `path` (owner first: chown clears setuid bits).
pub(crate) fn set_meta(path: &Path, kind: &Kind, meta: &Meta) -> Result<(), DatasetError> {
    let c = cpath(path).map_err(|e| DatasetError::io("set metadata of", path, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::lchown(c.as_ptr(), meta.uid, meta.gid) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Unprivileged: keep our own uid/gid rather than fail.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(DatasetError::io("change owner of", path, e));
        }
    }
    if !matches!(kind, Kind::Symlink { .. }) {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .map_err(|e| DatasetError::io("change mode of", path, e))?;
    }
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: meta.mtime.sec as libc::time_t,
            tv_nsec: meta.mtime.nsec as libc::c_long,
        },
    ];
    // SAFETY: `c` is a valid path and `times` points at two timespecs, as utimensat expects.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(DatasetError::io(
            "set mtime of",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Removes whatever is at `path` (a directory recursively); a missing path is fine.
pub(crate) fn remove_any(path: &Path) -> Result<(), DatasetError> {
    let res = match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatasetError::io("remove", path, e)),
    }
}

/// Copies the regular file `src` to the new path `dst` (reflinks where the file system can).
fn copy_file(src: &Path, dst: &Path) -> Result<(), DatasetError> {
    remove_any(dst)?;
    fs::copy(src, dst).map_err(|e| DatasetError::io("copy file to", dst, e))?;
    Ok(())
}

/// Creates `dst` as a copy of one entry of `src_root` (directories empty, metadata applied
/// later by the caller for directories).
fn create_like(src_root: &Path, e: &Entry, dst: &Path) -> Result<(), DatasetError> {
    match &e.kind {
        Kind::Dir => match fs::create_dir(dst) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dst.is_dir() => {}
            Err(err) => return Err(DatasetError::io("create directory", dst, err)),
        },
        Kind::File { .. } => {
            copy_file(&at(src_root, &e.rel), dst)?;
            set_meta(dst, &e.kind, &e.meta)?;
        }
        Kind::Symlink { target } => {
            remove_any(dst)?;
            std::os::unix::fs::symlink(target, dst)
                .map_err(|err| DatasetError::io("create symlink", dst, err))?;
            set_meta(dst, &e.kind, &e.meta)?;
        }
    }
    Ok(())
}

fn set_dir_metas(root: &Path, entries: &[Entry]) -> Result<(), DatasetError> {
    // Children before parents: writing into a directory changes its mtime.
    for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        set_meta(&at(root, &e.rel), &e.kind, &e.meta)?;
    }
    Ok(())
}

/// A snapshot's tree and the moment it began (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct TrustedTree<'a> {
    pub root: &'a Path,
    pub taken_at: Stamp,
}

/// True if the live file `live` may be taken to equal the snapshot file `snap`.
pub(crate) fn unchanged(live: &Entry, snap: &Entry, taken_at: Stamp) -> bool {
    matches!(
        (&live.kind, &snap.kind),
        (Kind::File { size: a }, Kind::File { size: b }) if a == b
    ) && live.meta == snap.meta
        && live.ctime < taken_at
}

/// Copies the tree `src` into the new directory `dst` (which must exist), hard-linking files
/// that are unchanged since `prev` instead of copying them.
pub(crate) fn snapshot_copy(
    src: &Path,
    dst: &Path,
    prev: Option<TrustedTree<'_>>,
) -> Result<(), DatasetError> {
    let entries = walk(src)?;
    for e in &entries {
        let target = at(dst, &e.rel);
        if let (Kind::File { .. }, Some(prev)) = (&e.kind, prev) {
            if let Some(old) = stat(prev.root, &e.rel)? {
                if unchanged(e, &old, prev.taken_at) {
                    let from = at(prev.root, &e.rel);
                    fs::hard_link(&from, &target)
                        .map_err(|err| DatasetError::io("hard-link snapshot file", &target, err))?;
                    continue;
                }
            }
        }
        match create_like(src, e, &target) {
            Ok(()) => {}
            // The live tree is in use: a file deleted since the walk is simply not in the snapshot.
            Err(DatasetError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && !e.rel.as_os_str().is_empty() =>
            {
                continue
            }
            Err(err) => return Err(err),
        }
    }
    set_dir_metas(dst, &entries)
}

/// Clones the tree `src` into the new path `dst`: directories recreated, files hard-linked,
/// symlinks recreated, metadata kept. The start of an incremental receive.
pub(crate) fn link_clone(src: &Path, dst: &Path) -> Result<(), DatasetError> {
    let entries = walk(src)?;
    for e in &entries {
        let target = at(dst, &e.rel);
        match &e.kind {
            Kind::File { .. } => fs::hard_link(at(src, &e.rel), &target)
                .map_err(|err| DatasetError::io("hard-link file", &target, err))?,
            _ => create_like(src, e, &target)?,
        }
    }
    set_dir_metas(dst, &entries)
}

/// Makes the tree `dst` identical to the snapshot tree `src`: removes what `src` lacks, copies
/// what differs. A file is kept when [`unchanged`] against `src` (with `trust.taken_at`) and,
/// if `trust.root` differs from `src`, when `src`'s file is the very inode of `trust.root`'s
/// file at the same path (it did not change between those two snapshots).
pub(crate) fn sync_to(
    src: &Path,
    dst: &Path,
    trust: Option<TrustedTree<'_>>,
) -> Result<(), DatasetError> {
    let entries = walk(src)?;
    let wanted: HashMap<&Path, &Kind> =
        entries.iter().map(|e| (e.rel.as_path(), &e.kind)).collect();
    if fs::symlink_metadata(dst).is_err() {
        fs::create_dir_all(dst).map_err(|e| DatasetError::io("create directory", dst, e))?;
    }
    // Remove what src lacks (and whatever changed type), deepest first is not needed:
    // removing a directory removes its subtree, later misses are ignored.
    for d in walk(dst)? {
        let keep = wanted
            .get(d.rel.as_path())
            .is_some_and(|k| std::mem::discriminant(*k) == std::mem::discriminant(&d.kind));
        if !keep {
            remove_any(&at(dst, &d.rel))?;
        }
    }
    for e in &entries {
        let target = at(dst, &e.rel);
        let current = stat(dst, &e.rel)?;
        let keep = match (&e.kind, &current, trust) {
            (Kind::File { .. }, Some(cur), Some(t)) => {
                unchanged(cur, e, t.taken_at)
                    && (t.root == src
                        || stat(t.root, &e.rel)?.is_some_and(|base| base.ino == e.ino))
            }
            (Kind::Symlink { .. }, Some(cur), _) => cur.kind == e.kind && cur.meta == e.meta,
            (Kind::Dir, Some(_), _) => true,
            _ => false,
        };
        if !keep {
            create_like(src, e, &target)?;
        }
    }
    set_dir_metas(dst, &entries)
}

/// Bytes of the distinct files across `snapshot_trees`, plus the live files that differ from
/// the latest snapshot (what only the live tree holds).
pub(crate) fn used_bytes(
    snapshot_trees: &[PathBuf],
    latest: Option<TrustedTree<'_>>,
    live: Option<&Path>,
) -> Result<u64, DatasetError> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for tree in snapshot_trees {
        for e in walk(tree)? {
            if let Kind::File { size } = e.kind {
                if seen.insert(e.ino) {
                    total += size;
                }
            }
        }
    }
    let Some(live) = live else {
        return Ok(total);
    };
    for e in walk(live)? {
        let Kind::File { size } = e.kind else {
            continue;
        };
        let shared = match latest {
            Some(t) => stat(t.root, &e.rel)?.is_some_and(|s| unchanged(&e, &s, t.taken_at)),
            None => false,
        };
        if !shared {
            total += size;
        }
    }
    Ok(total)
}

/// The file system's current time, read from the ctime of `probe` (which must exist).
pub(crate) fn fs_now(probe: &Path) -> Result<Stamp, DatasetError> {
    let md = fs::symlink_metadata(probe).map_err(|e| DatasetError::io("stat", probe, e))?;
    Ok(Stamp {
        sec: md.ctime(),
        nsec: md.ctime_nsec() as u32,
    })
}

/// Flushes the file system holding `path` (one `syncfs`, before and after commit renames).
pub(crate) fn sync_fs(path: &Path) -> Result<(), DatasetError> {
    let dir = fs::File::open(path).map_err(|e| DatasetError::io("open", path, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: `dir` is an open file descriptor for the duration of the call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(DatasetError::io("sync", path, io::Error::last_os_error()));
    }
    Ok(())
}

/// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: both are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True if `err` means the storage is full (ENOSPC, EDQUOT).
pub(crate) fn is_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
}
