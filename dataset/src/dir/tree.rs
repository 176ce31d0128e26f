//! File tree operations for the `dir` backend: walk, copy with metadata, link-copy against a
//! previous snapshot, make one tree identical to another, count used bytes.
//!
//! "Unchanged" is decided rsync-style on size, mode, owner and mtime, made safe against
//! same-tick modifications the way git handles "racy" index entries: a live file is trusted to
//! equal a snapshot's copy only if its ctime is older than the moment that snapshot began. ctime
//! cannot be set from user space and changes on every write, chmod, chown, rename and link.
//!
//! Nothing here follows a symlink inside a tree: trees are opened at their root and every path
//! below is resolved from that descriptor one name at a time (see [`super::dirfd`]), so a live
//! tree whose directories an application swaps for symlinks (to `/etc`, to flockd's `tls/`)
//! while it is copied, walked or written yields nothing from outside it and receives nothing
//! outside it. Symlinks are copied as symlinks: their target text.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dirfd::{self, vanished, Dir};
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
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub allocated: u64,
}

/// `root/rel`, with "" meaning `root` itself (for messages and flockd's own paths).
pub(crate) fn at(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn stamp(sec: i64, nsec: i64) -> Stamp {
    Stamp {
        sec,
        nsec: nsec as u32,
    }
}

fn meta_of(st: &libc::stat) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: stamp(st.st_mtime, st.st_mtime_nsec),
    }
}

fn timespec(s: Stamp) -> libc::timespec {
    libc::timespec {
        tv_sec: s.sec as libc::time_t,
        tv_nsec: s.nsec as libc::c_long,
    }
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

fn entry_of(rel: PathBuf, st: &libc::stat, kind: Kind) -> Entry {
    Entry {
        rel,
        kind,
        meta: meta_of(st),
        ino: (st.st_dev, st.st_ino),
        ctime: stamp(st.st_ctime, st.st_ctime_nsec),
        allocated: (st.st_blocks as u64).saturating_mul(512),
    }
}

/// The parent of a non-empty relative path and its last name.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the tree's root has no parent",
        )),
    }
}

/// A tree opened at its root: every path below it is resolved from the root's descriptor
/// without following a symlink (see [`dirfd`](super::dirfd)). Keeps the last directory it
/// opened, as walks and copies visit siblings one after another.
pub(crate) struct Tree {
    path: PathBuf,
    root: Dir,
    last: Option<(PathBuf, Dir)>,
}

impl Tree {
    /// Opens the tree at `path` (which must be a directory, not a symlink).
    pub(crate) fn open(path: &Path) -> Result<Tree, DatasetError> {
        let root = Dir::open(path).map_err(|e| DatasetError::io("open directory", path, e))?;
        Ok(Tree {
            path: path.to_path_buf(),
            root,
            last: None,
        })
    }

    /// `root/rel`, for messages.
    pub(crate) fn show(&self, rel: &Path) -> PathBuf {
        at(&self.path, rel)
    }

    /// The directory `rel` of the tree.
    pub(crate) fn dir(&mut self, rel: &Path) -> io::Result<&Dir> {
        if rel.as_os_str().is_empty() {
            return Ok(&self.root);
        }
        if !matches!(&self.last, Some((p, _)) if p == rel) {
            self.last = None;
            let d = self.root.open_rel(rel)?;
            self.last = Some((rel.to_path_buf(), d));
        }
        match &self.last {
            Some((_, d)) => Ok(d),
            None => Err(io::Error::other("no directory open")),
        }
    }

    /// The directory holding `rel` (non-empty) and `rel`'s last name.
    pub(crate) fn parent<'a>(&mut self, rel: &'a Path) -> io::Result<(&Dir, &'a OsStr)> {
        let (parent, name) = split(rel)?;
        Ok((self.dir(parent)?, name))
    }

    /// Forgets the directory kept open (after a removal, which may have removed it).
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }

    /// The entry at `rel`, `None` if it does not exist, is not a supported type, or a
    /// directory on the way is gone or no longer a directory.
    pub(crate) fn stat(&mut self, rel: &Path) -> Result<Option<Entry>, DatasetError> {
        let shown = self.show(rel);
        let res = if rel.as_os_str().is_empty() {
            self.root
                .fstat()
                .map(|st| Some(entry_of(PathBuf::new(), &st, Kind::Dir)))
        } else {
            self.parent(rel)
                .and_then(|(dir, name)| lookup(dir, rel, name))
        };
        match res {
            Ok(e) => Ok(e),
            Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(DatasetError::io("stat", &shown, e)),
        }
    }

    /// Removes whatever is at `rel` (non-empty; a directory recursively); missing is fine.
    pub(crate) fn remove(&mut self, rel: &Path) -> Result<(), DatasetError> {
        let shown = self.show(rel);
        let res = self
            .parent(rel)
            .and_then(|(dir, name)| dir.remove_all(name));
        self.forget();
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(DatasetError::io("remove", &shown, e)),
        }
    }

    /// Applies a directory's metadata to the directory `rel`.
    pub(crate) fn set_dir_meta(&mut self, rel: &Path, meta: &Meta) -> Result<(), DatasetError> {
        let shown = self.show(rel);
        self.dir(rel)
            .and_then(|d| set_fd_meta(d.fd(), meta))
            .map_err(|e| DatasetError::io("set metadata of", &shown, e))
    }
}

/// The entry `name` of `dir` (at `rel` in its tree); a symlink is read, never followed.
fn lookup(dir: &Dir, rel: &Path, name: &OsStr) -> io::Result<Option<Entry>> {
    let st = dir.stat_at(name)?;
    let kind = if is_type(&st, libc::S_IFDIR) {
        Kind::Dir
    } else if is_type(&st, libc::S_IFREG) {
        Kind::File {
            size: st.st_size as u64,
        }
    } else if is_type(&st, libc::S_IFLNK) {
        Kind::Symlink {
            target: dir.read_link(name)?,
        }
    } else {
        return Ok(None);
    };
    Ok(Some(entry_of(rel.to_path_buf(), &st, kind)))
}

/// Applies owner, mode and mtime to an open file or directory.
pub(crate) fn set_fd_meta(fd: BorrowedFd<'_>, meta: &Meta) -> io::Result<()> {
    dirfd::set_fd_meta(fd, meta.uid, meta.gid, meta.mode, timespec(meta.mtime))
}

/// Applies owner and mtime to the symlink `name` of `dir`.
pub(crate) fn set_link_meta(dir: &Dir, name: &OsStr, meta: &Meta) -> io::Result<()> {
    dir.set_link_meta(name, meta.uid, meta.gid, timespec(meta.mtime))
}

/// Every entry under `root`, parents before children, siblings sorted by name. Directories
/// are opened without following symlinks and described by `fstat` of the opened directory.
///
/// Entries that vanish or change type during the walk (a live tree in use) are left out.
pub(crate) fn walk(root: &Path) -> Result<Vec<Entry>, DatasetError> {
    let mut tree = Tree::open(root)?;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let shown = tree.show(&rel);
        let listed = if rel.as_os_str().is_empty() {
            tree.root
                .fstat()
                .and_then(|st| Ok((st, tree.root.names()?)))
                .map(Some)
        } else {
            walk_one(&mut tree, &rel, &mut out)
        };
        let (st, names) = match listed {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(DatasetError::io("read directory", &shown, e)),
        };
        out.push(entry_of(rel.clone(), &st, Kind::Dir));
        // Reverse so that the stack pops them in name order.
        for name in names.into_iter().rev() {
            stack.push(rel.join(name));
        }
    }
    Ok(out)
}

/// Visits `rel` (non-empty) in a walk: a file or symlink goes to `out`; a directory is opened
/// (kept as the tree's open directory, its children come next) and returned with its names.
fn walk_one(
    tree: &mut Tree,
    rel: &Path,
    out: &mut Vec<Entry>,
) -> io::Result<Option<(libc::stat, Vec<OsString>)>> {
    let (parent, name) = tree.parent(rel)?;
    let st = parent.stat_at(name)?;
    if !is_type(&st, libc::S_IFDIR) {
        match lookup(parent, rel, name)? {
            Some(e) => out.push(e),
            None => {
                tracing::warn!(path = %tree.show(rel).display(), "skipping a socket, fifo or device: the dir backend stores only files, directories and symlinks")
            }
        }
        return Ok(None);
    }
    let sub = parent.open_dir(name)?;
    let st = sub.fstat()?;
    let names = sub.names()?;
    tree.last = Some((rel.to_path_buf(), sub));
    Ok(Some((st, names)))
}

/// Removes whatever is at `path` (a directory recursively); a missing path is fine. For
/// flockd's own paths (staging, trash, markers, a whole live directory).
pub(crate) fn remove_any(path: &Path) -> Result<(), DatasetError> {
    let remove = || match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    let res = match remove() {
        // A directory a stream left without permissions for its owner (mode 0 on a received
        // tree): an unprivileged flockd cannot enter it. Ours to remove: open it up and retry.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up(path);
            remove()
        }
        other => other,
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatasetError::io("remove", path, e)),
    }
}

/// Gives every directory under `path` (symlinks not followed) its owner's full permissions,
/// as far as this process may, so that it can be removed.
fn open_up(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = fs::symlink_metadata(path) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            open_up(&e.path());
        }
    }
}

/// What became of one entry to copy.
#[derive(PartialEq, Eq)]
enum Copied {
    Done,
    /// It vanished or changed type in the source since the walk (a live tree in use).
    Vanished,
}

/// Creates `e` of the tree `src` in the tree `dst` (directories empty, their metadata applied
/// later by the caller). A file's content and metadata are what the opened source file holds.
fn copy_entry(src: &mut Tree, e: &Entry, dst: &mut Tree) -> Result<Copied, DatasetError> {
    let target = dst.show(&e.rel);
    let source = src.show(&e.rel);
    let dst_err = |action: &'static str| {
        let target = target.clone();
        move |err: io::Error| DatasetError::io(action, &target, err)
    };
    match &e.kind {
        Kind::Dir => {
            let (d, name) = dst.parent(&e.rel).map_err(dst_err("open directory of"))?;
            match d.mkdir(name) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                    let st = d.stat_at(name).map_err(dst_err("stat"))?;
                    if !is_type(&st, libc::S_IFDIR) {
                        return Err(DatasetError::io("create directory", &target, err));
                    }
                }
                Err(err) => return Err(DatasetError::io("create directory", &target, err)),
            }
        }
        Kind::File { .. } => {
            let opened = match src.parent(&e.rel).and_then(|(d, name)| d.open_file(name)) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(Copied::Vanished),
                Err(err) if vanished(&err) => return Ok(Copied::Vanished),
                Err(err) => return Err(DatasetError::io("open", &source, err)),
            };
            let (mut from, st) = opened;
            let (d, name) = dst.parent(&e.rel).map_err(dst_err("open directory of"))?;
            d.remove_all(name).map_err(dst_err("remove"))?;
            let mut to = d.create_file(name).map_err(dst_err("create file"))?;
            // A reflink where the file system has them (the copy shares the data until either
            // side is rewritten), a byte copy where it does not.
            if !clone_file(&from, &to).map_err(dst_err("clone file"))? {
                io::copy(&mut from, &mut to).map_err(|err| {
                    if is_full(&err) {
                        DatasetError::io("write file", &target, err)
                    } else {
                        DatasetError::io("copy file", &source, err)
                    }
                })?;
            }
            set_fd_meta(to.as_fd(), &meta_of(&st)).map_err(dst_err("set metadata of"))?;
        }
        Kind::Symlink { .. } => {
            let link = src
                .parent(&e.rel)
                .and_then(|(d, name)| Ok((d.read_link(name)?, d.stat_at(name)?)));
            let (text, st) = match link {
                Ok(x) => x,
                Err(err) if vanished(&err) || err.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Copied::Vanished)
                }
                Err(err) => return Err(DatasetError::io("read symlink", &source, err)),
            };
            let (d, name) = dst.parent(&e.rel).map_err(dst_err("open directory of"))?;
            d.remove_all(name).map_err(dst_err("remove"))?;
            d.symlink(&text, name).map_err(dst_err("create symlink"))?;
            set_link_meta(d, name, &meta_of(&st)).map_err(dst_err("set metadata of"))?;
        }
    }
    Ok(Copied::Done)
}

/// Makes `to` (new, empty, open for writing) a reflink of `from` with `ioctl(FICLONE)`: true if
/// it did, false if the file system cannot (ext4, tmpfs, zfs-fuse; or two file systems), so
/// the caller copies the bytes instead. Any other failure (a full disk) is an error.
pub(crate) fn clone_file(from: &fs::File, to: &fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: both are open descriptors for the duration of the call; FICLONE takes the source
    // descriptor as its argument.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP)
        | Some(libc::ENOTTY)
        | Some(libc::EXDEV)
        | Some(libc::EINVAL)
        | Some(libc::ENOSYS)
        | Some(libc::EPERM)
        | Some(libc::EBADF) => Ok(false),
        _ => Err(err),
    }
}

/// True if the file system holding the directory `dir` makes reflinks (`FICLONE`): probed
/// with two scratch files in `dir`, removed afterwards.
pub(crate) fn reflinks_work(dir: &Path) -> Result<bool, DatasetError> {
    let a = dir.join(format!(".reflink-probe-{:016x}", rand::random::<u64>()));
    let b = a.with_extension("clone");
    let result = (|| {
        fs::write(&a, b"flock reflink probe").map_err(|e| DatasetError::io("write", &a, e))?;
        let from = fs::File::open(&a).map_err(|e| DatasetError::io("open", &a, e))?;
        let to = fs::File::create(&b).map_err(|e| DatasetError::io("create", &b, e))?;
        clone_file(&from, &to).map_err(|e| DatasetError::io("clone file", &b, e))
    })();
    remove_any(&a)?;
    remove_any(&b)?;
    result
}

/// Copies `e` from a tree that does not change (a snapshot): vanishing is an error there.
fn copy_stable(src: &mut Tree, e: &Entry, dst: &mut Tree) -> Result<(), DatasetError> {
    match copy_entry(src, e, dst)? {
        Copied::Done => Ok(()),
        Copied::Vanished => Err(DatasetError::io(
            "copy",
            src.show(&e.rel),
            io::Error::other("changed while it was being copied (snapshot trees never change)"),
        )),
    }
}

/// Hard-links `rel` of `from` to the same place in `to` (the entry itself, never followed).
fn link_entry(from: &mut Tree, rel: &Path, to: &mut Tree) -> Result<(), DatasetError> {
    let target = to.show(rel);
    let (td, name) = to
        .parent(rel)
        .map_err(|err| DatasetError::io("open directory of", &target, err))?;
    let (fd, from_name) = from
        .parent(rel)
        .map_err(|err| DatasetError::io("open directory of", &target, err))?;
    fd.link_to(from_name, td, name)
        .map_err(|err| DatasetError::io("hard-link file", &target, err))
}

fn set_dir_metas(dst: &mut Tree, entries: &[Entry]) -> Result<(), DatasetError> {
    // Children before parents: writing into a directory changes its mtime.
    for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        dst.set_dir_meta(&e.rel, &e.meta)?;
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

/// Copies the tree `src` into the new directory `dst` (which must not exist), hard-linking
/// files that are unchanged since `prev` instead of copying them. `src` may be in use: what
/// vanishes or turns into something else during the copy is left out, and nothing outside
/// `src` is ever read (no symlink is followed).
pub(crate) fn snapshot_copy(
    src: &Path,
    dst: &Path,
    prev: Option<TrustedTree<'_>>,
) -> Result<(), DatasetError> {
    let entries = walk(src)?;
    fs::create_dir(dst).map_err(|e| DatasetError::io("create directory", dst, e))?;
    let mut s = Tree::open(src)?;
    let mut d = Tree::open(dst)?;
    let mut p = prev.map(|p| Tree::open(p.root)).transpose()?;
    let mut dirs = Vec::new();
    for e in &entries {
        if e.rel.as_os_str().is_empty() {
            dirs.push(e.clone());
            continue;
        }
        if let (Kind::File { .. }, Some(prev), Some(p)) = (&e.kind, prev, p.as_mut()) {
            if let Some(old) = p.stat(&e.rel)? {
                if unchanged(e, &old, prev.taken_at) {
                    link_entry(p, &e.rel, &mut d)?;
                    continue;
                }
            }
        }
        if copy_entry(&mut s, e, &mut d)? == Copied::Done && e.kind == Kind::Dir {
            dirs.push(e.clone());
        }
    }
    set_dir_metas(&mut d, &dirs)
}

/// Clones the tree `src` into the new path `dst`: directories recreated, files hard-linked,
/// symlinks recreated, metadata kept. The start of an incremental receive.
pub(crate) fn link_clone(src: &Path, dst: &Path) -> Result<(), DatasetError> {
    let entries = walk(src)?;
    fs::create_dir(dst).map_err(|e| DatasetError::io("create directory", dst, e))?;
    let mut s = Tree::open(src)?;
    let mut d = Tree::open(dst)?;
    for e in entries.iter().filter(|e| !e.rel.as_os_str().is_empty()) {
        match &e.kind {
            Kind::File { .. } => link_entry(&mut s, &e.rel, &mut d)?,
            _ => copy_stable(&mut s, e, &mut d)?,
        }
    }
    set_dir_metas(&mut d, &entries)
}

/// Which files of the destination [`sync_to`] may keep instead of copying them again.
#[derive(Clone, Copy)]
pub(crate) enum Keep<'a> {
    /// None: every file is copied.
    Nothing,
    /// Files [`unchanged`] against the source with `taken_at` of this tree (see [`sync_to`]).
    Trusted(TrustedTree<'a>),
    /// Files with the same size, mode, owner and mtime whose bytes compare equal (for trees
    /// with no trusted clock, such as a zfs snapshot's clone).
    SameContent,
}

/// Makes the tree `dst` identical to the snapshot tree `src`: removes what `src` lacks, copies
/// what differs. With [`Keep::Trusted`], a file is kept when [`unchanged`] against `src` (with
/// `trust.taken_at`) and, if `trust.root` differs from `src`, when `src`'s file is the very
/// inode of `trust.root`'s file at the same path (it did not change between those two
/// snapshots). `dst` may be a live tree in use: nothing is written through a symlink in it,
/// and `dst` itself stays the same directory (only its contents and metadata change).
pub(crate) fn sync_to(src: &Path, dst: &Path, keep_rule: Keep<'_>) -> Result<(), DatasetError> {
    let trust = match keep_rule {
        Keep::Trusted(t) => Some(t),
        _ => None,
    };
    let entries = walk(src)?;
    let wanted: HashMap<&Path, &Kind> =
        entries.iter().map(|e| (e.rel.as_path(), &e.kind)).collect();
    if fs::symlink_metadata(dst).is_err() {
        fs::create_dir_all(dst).map_err(|e| DatasetError::io("create directory", dst, e))?;
    }
    let mut d = Tree::open(dst)?;
    // Remove what src lacks (and whatever changed type); removing a directory removes its
    // subtree, later misses are ignored.
    for cur in walk(dst)? {
        let keep = wanted
            .get(cur.rel.as_path())
            .is_some_and(|k| std::mem::discriminant(*k) == std::mem::discriminant(&cur.kind));
        if !keep {
            d.remove(&cur.rel)?;
        }
    }
    let mut s = Tree::open(src)?;
    let mut t = match trust {
        Some(t) if t.root != src => Some(Tree::open(t.root)?),
        _ => None,
    };
    for e in entries.iter().filter(|e| !e.rel.as_os_str().is_empty()) {
        let current = d.stat(&e.rel)?;
        let keep = match (&e.kind, &current, trust) {
            (Kind::File { .. }, Some(cur), Some(tr)) => {
                unchanged(cur, e, tr.taken_at)
                    && match t.as_mut() {
                        None => true,
                        Some(t) => t.stat(&e.rel)?.is_some_and(|base| base.ino == e.ino),
                    }
            }
            (Kind::File { .. }, Some(cur), None) if matches!(keep_rule, Keep::SameContent) => {
                cur.kind == e.kind && cur.meta == e.meta && same_bytes(&mut s, &mut d, &e.rel)?
            }
            (Kind::Symlink { .. }, Some(cur), _) => cur.kind == e.kind && cur.meta == e.meta,
            (Kind::Dir, Some(_), _) => true,
            _ => false,
        };
        if !keep {
            copy_stable(&mut s, e, &mut d)?;
        }
    }
    set_dir_metas(&mut d, &entries)
}

/// True if the regular files `rel` of `a` and of `b` hold the same bytes (false if either is
/// gone or no longer a regular file).
fn same_bytes(a: &mut Tree, b: &mut Tree, rel: &Path) -> Result<bool, DatasetError> {
    let open = |t: &mut Tree| -> Result<Option<fs::File>, DatasetError> {
        let shown = t.show(rel);
        match t.parent(rel).and_then(|(d, name)| d.open_file(name)) {
            Ok(f) => Ok(f.map(|(f, _)| f)),
            Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::ELOOP) => Ok(None),
            Err(e) => Err(DatasetError::io("open", &shown, e)),
        }
    };
    let (Some(mut fa), Some(mut fb)) = (open(a)?, open(b)?) else {
        return Ok(false);
    };
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = crate::frame::read_full(&mut fa, &mut ba)
            .map_err(|e| DatasetError::io("read", a.show(rel), e))?;
        let m = crate::frame::read_full(&mut fb, &mut bb)
            .map_err(|e| DatasetError::io("read", b.show(rel), e))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        // read_full comes back short only at the end of the file.
        if n < ba.len() {
            return Ok(true);
        }
    }
}

/// The space of a dir dataset, see [`super::DirBackend`]'s docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Space {
    /// Allocated bytes of every distinct inode (files, directories, symlinks) across the
    /// snapshot trees and the live tree.
    pub used: u64,
    /// Apparent size of the live tree's regular files, each name counted (as a stream carries
    /// each name as its own file).
    pub referenced: u64,
}

/// Measures [`Space`] over `snapshot_trees` and `live`.
pub(crate) fn space(snapshot_trees: &[PathBuf], live: &Path) -> Result<Space, DatasetError> {
    let mut seen = HashSet::new();
    let mut out = Space::default();
    for tree in snapshot_trees {
        for e in walk(tree)? {
            if seen.insert(e.ino) {
                out.used += e.allocated;
            }
        }
    }
    for e in walk(live)? {
        if seen.insert(e.ino) {
            out.used += e.allocated;
        }
        if let Kind::File { size } = e.kind {
            out.referenced += size;
        }
    }
    Ok(out)
}

/// Apparent size of the regular files in the tree at `root`, each name counted.
pub(crate) fn tree_size(root: &Path) -> Result<u64, DatasetError> {
    Ok(walk(root)?
        .iter()
        .map(|e| match e.kind {
            Kind::File { size } => size,
            _ => 0,
        })
        .sum())
}

/// Apparent size of the regular files at `name` of `dir` (the file itself, or everything
/// under a directory), without following a symlink; 0 if it does not exist.
pub(crate) fn size_at(dir: &Dir, name: &OsStr) -> io::Result<u64> {
    let st = match dir.stat_at(name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    if is_type(&st, libc::S_IFREG) {
        return Ok(st.st_size as u64);
    }
    if !is_type(&st, libc::S_IFDIR) {
        return Ok(0);
    }
    let sub = dir.open_dir(name)?;
    let mut total = 0u64;
    for n in sub.names()? {
        total = total.saturating_add(size_at(&sub, &n)?);
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

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
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
