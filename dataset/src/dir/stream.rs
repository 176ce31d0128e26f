//! The `dir` backend's stream format, versions 1 and 2.
//!
//! ```text
//! stream  = header record* end
//! header  = "FLKDIR\0\0" version:u16 flags:u8 [base:str base_guid:u64] target:str
//!           target_guid:u64 created_unix:u64           flags bit 0: incremental (base present)
//! record  = 'D' path meta                              directory (created or metadata changed)
//!         | 'F' path meta size:u64 bytes[size]         regular file (new or changed: whole file)
//!         | 'L' path meta target:bytes                 symlink
//!         | 'X' path                                   delete path (recursively) from the base
//!         | 'P' path meta size:u64 n:u32 (offset:u64 len:u64)*n bytes[sum of len]
//!                                                      version 2 only: a file of the base,
//!                                                      these ranges rewritten, cut or grown to size
//! end     = 'E' records:u64 file_bytes:u64 blake3(every byte before this field):[32]
//! path    = len:u32 bytes    relative, no "." / ".." / empty components; "" is the root (D only)
//! meta    = mode:u32 uid:u32 gid:u32 mtime_sec:i64 mtime_nsec:u32
//! str     = len:u16 utf8     bytes = len:u32 bytes      integers big-endian
//! ```
//!
//! A full stream lists every entry of the target snapshot, parents before children. An
//! incremental stream first deletes what the target lacks (`X`, topmost path only), then lists
//! new directories, directories whose metadata changed, files that are not the very same inode
//! as in the base snapshot (snapshots hard-link unchanged files, so that comparison is exact),
//! and new or changed symlinks. Directory metadata is applied after all records, children first.
//!
//! Version 2 adds `P`: a changed file as the ranges that changed (issue 20). The sender tells
//! them from where the two snapshots' copies lie on disk ([`super::delta`]), without reading
//! them, so on a file system with reflinks a 1 MiB write into a 4 GiB file costs about 1 MiB of
//! stream; where the copies share nothing, or most of a file changed, the file goes whole (`F`).
//! A sender writes version 2 only when the stream holds a `P` record, and only for a receiver
//! known to read it ([`crate::StreamSpec::with_deltas`]); a version 1 receiver refuses a
//! version 2 stream at its header. The receiver makes the new file from its copy of the base's
//! (a reflink where it can, else a byte copy), then writes the ranges.
//!
//! The stream checks itself (its own BLAKE3) so that a raw stream, outside the network
//! framing, is verified too.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use super::dirfd::vanished;
use super::tree::{self, Entry, Kind, Meta, Stamp, Tree};
use crate::error::{DatasetError, StreamError};

const MAGIC: [u8; 8] = *b"FLKDIR\0\0";
/// The version of a stream without `P` records (what every receiver reads).
const VERSION: u16 = 1;
/// The version of a stream with `P` records.
const VERSION_DELTAS: u16 = 2;
/// A changed file at least this large is looked at for its changed ranges.
const DELTA_MIN_FILE: u64 = 1 << 20;
/// A file with more changed ranges than this, or changed in more than 3/4 of its size, goes
/// whole.
const MAX_RANGES: usize = 1 << 16;
const FLAG_INCREMENTAL: u8 = 1;
const MAX_PATH: usize = 4096;
const COPY_CHUNK: usize = 256 << 10;
const META_LEN: usize = 4 + 4 + 4 + 8 + 4;

/// A snapshot as a stream names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapRef {
    pub name: String,
    pub guid: u64,
}

/// What a stream's header says.
#[derive(Clone, Debug)]
pub(crate) struct StreamStart {
    pub base: Option<SnapRef>,
    pub target: SnapRef,
    pub created_unix: u64,
}

enum Record {
    Dir(PathBuf, Meta),
    File(PathBuf, Meta, u64),
    Symlink(PathBuf, Meta, PathBuf),
    Delete(PathBuf),
    /// A file of the base with these ranges `(offset, length)` rewritten, at this size.
    Patch(PathBuf, Meta, u64, Vec<(u64, u64)>),
}

impl Record {
    /// The bytes of file data that follow the record's header.
    fn data_len(&self) -> u64 {
        match self {
            Record::File(_, _, size) => *size,
            Record::Patch(_, _, _, ranges) => ranges.iter().map(|(_, len)| len).sum(),
            _ => 0,
        }
    }
}

fn record_for(e: Entry) -> Record {
    match e.kind {
        Kind::Dir => Record::Dir(e.rel, e.meta),
        Kind::File { size } => Record::File(e.rel, e.meta, size),
        Kind::Symlink { target } => Record::Symlink(e.rel, e.meta, target.into()),
    }
}

/// The records of a full stream of the snapshot tree `tree`.
fn plan_full(tree: &Path) -> Result<Vec<Record>, DatasetError> {
    Ok(tree::walk(tree)?.into_iter().map(record_for).collect())
}

/// The ranges of the file `rel` that changed from the snapshot tree `base` (where it has
/// `base_size` bytes) to `target` (`size` bytes), when the file system tells them and they are
/// few enough to be worth sending as ranges; `None`: send the file whole.
fn delta_of(
    base: &mut Tree,
    target: &mut Tree,
    rel: &Path,
    base_size: u64,
    size: u64,
) -> Result<Option<Vec<(u64, u64)>>, DatasetError> {
    let open = |tree: &mut Tree| -> Result<Option<Vec<super::delta::Extent>>, DatasetError> {
        let shown = tree.show(rel);
        let io = |e| DatasetError::io("map the extents of", &shown, e);
        let opened = tree
            .parent(rel)
            .and_then(|(dir, name)| dir.open_file(name))
            .map_err(io)?;
        match opened {
            Some((file, _)) => super::delta::extents(&file).map_err(io),
            None => Ok(None),
        }
    };
    let (Some(old), Some(new)) = (open(base)?, open(target)?) else {
        return Ok(None);
    };
    let ranges = super::delta::changed_ranges(&old, base_size, &new, size);
    let changed: u64 = ranges.iter().map(|(_, len)| len).sum();
    if ranges.len() > MAX_RANGES || changed > size / 4 * 3 {
        return Ok(None);
    }
    Ok(Some(ranges))
}

/// The records that turn the snapshot tree `base` into `target`; with `deltas`, a changed
/// file may be a [`Record::Patch`].
fn plan_incremental(base: &Path, target: &Path, deltas: bool) -> Result<Vec<Record>, DatasetError> {
    let base_entries = tree::walk(base)?;
    let target_entries = tree::walk(target)?;
    let in_target: HashMap<&Path, &Entry> = target_entries
        .iter()
        .map(|e| (e.rel.as_path(), e))
        .collect();
    let same_kind = |a: &Kind, b: &Kind| std::mem::discriminant(a) == std::mem::discriminant(b);

    let mut plan = Vec::new();
    let mut deleted: HashSet<&Path> = HashSet::new();
    for b in &base_entries {
        let gone = match in_target.get(b.rel.as_path()) {
            Some(t) => !same_kind(&t.kind, &b.kind),
            None => true,
        };
        if gone && !b.rel.ancestors().skip(1).any(|a| deleted.contains(a)) {
            deleted.insert(&b.rel);
            plan.push(Record::Delete(b.rel.clone()));
        }
    }
    let in_base: HashMap<&Path, &Entry> =
        base_entries.iter().map(|e| (e.rel.as_path(), e)).collect();
    let mut trees: Option<(Tree, Tree)> = None;
    for t in target_entries.iter() {
        let changed = match in_base.get(t.rel.as_path()) {
            None => true,
            Some(b) if !same_kind(&b.kind, &t.kind) => true,
            Some(b) => match t.kind {
                Kind::Dir => b.meta != t.meta,
                Kind::File { .. } => b.ino != t.ino,
                Kind::Symlink { .. } => b.kind != t.kind || b.meta != t.meta,
            },
        };
        if !changed {
            continue;
        }
        if let (true, Some(b), Kind::File { size }) =
            (deltas, in_base.get(t.rel.as_path()), &t.kind)
        {
            if let (Kind::File { size: base_size }, true) = (&b.kind, *size >= DELTA_MIN_FILE) {
                let trees = match &mut trees {
                    Some(t) => t,
                    None => trees.insert((Tree::open(base)?, Tree::open(target)?)),
                };
                if let Some(ranges) =
                    delta_of(&mut trees.0, &mut trees.1, &t.rel, *base_size, *size)?
                {
                    plan.push(Record::Patch(t.rel.clone(), t.meta, *size, ranges));
                    continue;
                }
            }
        }
        plan.push(record_for(t.clone()));
    }
    Ok(plan)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_meta(out: &mut Vec<u8>, m: &Meta) {
    out.extend_from_slice(&m.mode.to_be_bytes());
    out.extend_from_slice(&m.uid.to_be_bytes());
    out.extend_from_slice(&m.gid.to_be_bytes());
    out.extend_from_slice(&m.mtime.sec.to_be_bytes());
    out.extend_from_slice(&m.mtime.nsec.to_be_bytes());
}

fn encode_start(s: &StreamStart, version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(if s.base.is_some() {
        FLAG_INCREMENTAL
    } else {
        0
    });
    if let Some(b) = &s.base {
        put_str(&mut out, &b.name);
        out.extend_from_slice(&b.guid.to_be_bytes());
    }
    put_str(&mut out, &s.target.name);
    out.extend_from_slice(&s.target.guid.to_be_bytes());
    out.extend_from_slice(&s.created_unix.to_be_bytes());
    out
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    match r {
        Record::Dir(p, m) => {
            out.push(b'D');
            put_bytes(out, p.as_os_str().as_bytes());
            put_meta(out, m);
        }
        Record::File(p, m, size) => {
            out.push(b'F');
            put_bytes(out, p.as_os_str().as_bytes());
            put_meta(out, m);
            out.extend_from_slice(&size.to_be_bytes());
        }
        Record::Symlink(p, m, target) => {
            out.push(b'L');
            put_bytes(out, p.as_os_str().as_bytes());
            put_meta(out, m);
            put_bytes(out, target.as_os_str().as_bytes());
        }
        Record::Delete(p) => {
            out.push(b'X');
            put_bytes(out, p.as_os_str().as_bytes());
        }
        Record::Patch(p, m, size, ranges) => {
            out.push(b'P');
            put_bytes(out, p.as_os_str().as_bytes());
            put_meta(out, m);
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&(ranges.len() as u32).to_be_bytes());
            for (offset, len) in ranges {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
    }
}

struct OpenFile {
    file: fs::File,
    path: PathBuf,
    /// What is left to read, `(offset, length)`, in order.
    ranges: std::collections::VecDeque<(u64, u64)>,
}

/// A `dir` stream, produced lazily as it is read: record headers from a plan made up front,
/// file contents straight from the snapshot's files (opened without following symlinks).
pub(crate) struct DirSendReader {
    tree: Tree,
    plan: std::vec::IntoIter<Record>,
    buf: Vec<u8>,
    pos: usize,
    file: Option<OpenFile>,
    hasher: blake3::Hasher,
    records: u64,
    file_bytes: u64,
    finished: bool,
}

impl DirSendReader {
    /// Plans the stream from `base` (if any) to `target` (snapshot trees); returns the reader
    /// and the stream's exact length.
    pub(crate) fn open(
        start: StreamStart,
        base: Option<&Path>,
        target: &Path,
        deltas: bool,
    ) -> Result<(Self, u64), DatasetError> {
        let plan = match base {
            Some(base) => plan_incremental(base, target, deltas)?,
            None => plan_full(target)?,
        };
        let version = if plan.iter().any(|r| matches!(r, Record::Patch(..))) {
            VERSION_DELTAS
        } else {
            VERSION
        };
        let head = encode_start(&start, version);
        let mut len = head.len() as u64 + 1 + 16 + 32;
        let mut scratch = Vec::new();
        for r in &plan {
            scratch.clear();
            encode_record(r, &mut scratch);
            len += scratch.len() as u64 + r.data_len();
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        let reader = DirSendReader {
            tree: Tree::open(target)?,
            plan: plan.into_iter(),
            buf: head,
            pos: 0,
            file: None,
            hasher,
            records: 0,
            file_bytes: 0,
            finished: false,
        };
        Ok((reader, len))
    }
}

impl Read for DirSendReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(f) = &mut self.file {
                let Some((offset, left)) = f.ranges.front_mut() else {
                    self.file = None;
                    continue;
                };
                if *left == 0 {
                    f.ranges.pop_front();
                    continue;
                }
                let want = out.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = f.file.read_at(&mut out[..want], *offset).map_err(|e| {
                    io::Error::new(e.kind(), format!("reading {}: {e}", f.path.display()))
                })?;
                if n == 0 {
                    return Err(io::Error::other(format!(
                        "snapshot file {} is shorter than when the send began",
                        f.path.display()
                    )));
                }
                self.hasher.update(&out[..n]);
                *offset += n as u64;
                *left -= n as u64;
                self.file_bytes += n as u64;
                return Ok(n);
            }
            self.buf.clear();
            self.pos = 0;
            match self.plan.next() {
                Some(r) => {
                    encode_record(&r, &mut self.buf);
                    self.records += 1;
                    if let Record::File(rel, _, size) | Record::Patch(rel, _, size, _) = &r {
                        let ranges = match &r {
                            Record::Patch(_, _, _, ranges) => ranges.iter().copied().collect(),
                            _ => [(0, *size)].into_iter().collect(),
                        };
                        let path = self.tree.show(rel);
                        let opened = self
                            .tree
                            .parent(rel)
                            .and_then(|(dir, name)| dir.open_file(name))
                            .map_err(|e| {
                                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                            })?;
                        let file = match opened {
                            Some((file, st)) if st.st_size as u64 == *size => file,
                            _ => {
                                return Err(io::Error::other(format!(
                                    "snapshot file {} is no longer the regular file of {size} bytes it was when the send began",
                                    path.display()
                                )))
                            }
                        };
                        self.file = Some(OpenFile { file, path, ranges });
                    }
                    self.hasher.update(&self.buf);
                }
                None if !self.finished => {
                    self.buf.push(b'E');
                    self.buf.extend_from_slice(&self.records.to_be_bytes());
                    self.buf.extend_from_slice(&self.file_bytes.to_be_bytes());
                    self.hasher.update(&self.buf);
                    let hash = self.hasher.finalize();
                    self.buf.extend_from_slice(hash.as_bytes());
                    self.finished = true;
                }
                None => return Ok(0),
            }
        }
    }
}

/// Why receiving into a tree failed.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// The stream was bad (truncated, corrupt, interrupted, unexpected).
    Stream(StreamError),
    /// The tree the stream makes would hold more than the size limit: `at_least` bytes of
    /// file data when the receive stopped.
    OverLimit { limit: u64, at_least: u64 },
    /// The file system is full.
    Full,
    /// A local file system error.
    Local(DatasetError),
}

impl From<DatasetError> for ApplyError {
    fn from(e: DatasetError) -> Self {
        match e {
            DatasetError::Io { ref source, .. } if tree::is_full(source) => ApplyError::Full,
            e => ApplyError::Local(e),
        }
    }
}

/// What the receiver expects of a stream's header.
pub(crate) struct Expect<'a> {
    /// `None` for a full stream; else the receiver's latest snapshot.
    pub base: Option<&'a SnapRef>,
    pub target_name: &'a str,
}

/// Totals of an applied stream.
pub(crate) struct Applied {
    pub start: StreamStart,
}

struct Input<'a> {
    src: &'a mut dyn Read,
    hasher: blake3::Hasher,
    offset: u64,
}

impl Input<'_> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ApplyError> {
        self.src
            .read_exact(buf)
            .map_err(|e| ApplyError::Stream(StreamError::from_io(e, self.offset)))?;
        self.hasher.update(buf);
        self.offset += buf.len() as u64;
        Ok(())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ApplyError> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, ApplyError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, ApplyError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ApplyError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn corrupt(&self, detail: impl Into<String>) -> ApplyError {
        ApplyError::Stream(StreamError::Corrupt {
            offset: self.offset,
            detail: detail.into(),
        })
    }
    fn str(&mut self) -> Result<String, ApplyError> {
        let len = u16::from_be_bytes(self.array()?) as usize;
        let mut b = vec![0u8; len];
        self.exact(&mut b)?;
        String::from_utf8(b).map_err(|_| self.corrupt("snapshot name is not UTF-8"))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ApplyError> {
        let len = self.u32()? as usize;
        if len > MAX_PATH {
            return Err(self.corrupt(format!("path of {len} bytes")));
        }
        let mut b = vec![0u8; len];
        self.exact(&mut b)?;
        Ok(b)
    }
    fn path(&mut self) -> Result<PathBuf, ApplyError> {
        let b = self.bytes()?;
        let p = PathBuf::from(OsStr::from_bytes(&b));
        let valid = !b.contains(&0)
            && !b.starts_with(b"/")
            && !b.ends_with(b"/")
            && !b.windows(2).any(|w| w == b"//")
            && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !valid {
            return Err(self.corrupt(format!(
                "refusing the unsafe path {}: a stream may name only relative paths of plain names inside its dataset (no '..', '.', leading '/' or empty name)",
                bounded(&p)
            )));
        }
        Ok(p)
    }
    fn meta(&mut self) -> Result<Meta, ApplyError> {
        let b: [u8; META_LEN] = self.array()?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut sec = [0u8; 8];
        sec.copy_from_slice(&b[12..20]);
        let meta = Meta {
            mode: u32_at(0),
            uid: u32_at(4),
            gid: u32_at(8),
            mtime: Stamp {
                sec: i64::from_be_bytes(sec),
                nsec: u32_at(20),
            },
        };
        if meta.mode > 0o7777 || meta.mtime.nsec >= 1_000_000_000 {
            return Err(self.corrupt("invalid mode or mtime"));
        }
        Ok(meta)
    }
}

/// A size limit on the tree a stream makes: its regular files' apparent size may not exceed
/// `limit`; `start` is what the tree holds before the stream (the base snapshot's size).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit {
    pub limit: u64,
    pub start: u64,
}

/// Applies a `dir` stream to `tree`: an empty directory for a full stream, a hard-link clone of
/// the base snapshot (`base_tree`) for an incremental one. Stops with
/// [`ApplyError::OverLimit`] before the tree's file data would exceed `limit` (what the stream
/// replaces or deletes is subtracted first, so a rewrite within the limit fits). Returns only
/// after the stream's end record verified and the input reached its end.
pub(crate) fn apply(
    src: &mut dyn Read,
    tree: &Path,
    base_tree: Option<&Path>,
    expect: &Expect<'_>,
    limit: Option<Limit>,
) -> Result<Applied, ApplyError> {
    let mut input = Input {
        src,
        hasher: blake3::Hasher::new(),
        offset: 0,
    };
    let magic: [u8; 8] = input.array()?;
    if magic != MAGIC {
        return Err(ApplyError::Stream(StreamError::BadMagic { format: "dir" }));
    }
    let version = u16::from_be_bytes(input.array()?);
    if version != VERSION && version != VERSION_DELTAS {
        return Err(ApplyError::Stream(StreamError::UnsupportedVersion {
            format: "dir",
            found: version,
            supported: VERSION_DELTAS,
        }));
    }
    let flags = input.u8()?;
    if flags & !FLAG_INCREMENTAL != 0 {
        return Err(input.corrupt(format!("unknown flags {flags:#x}")));
    }
    let base = if flags & FLAG_INCREMENTAL != 0 {
        let name = input.str()?;
        Some(SnapRef {
            name,
            guid: input.u64()?,
        })
    } else {
        None
    };
    let target = SnapRef {
        name: input.str()?,
        guid: input.u64()?,
    };
    let created_unix = input.u64()?;
    let unexpected = |msg: String| ApplyError::Stream(StreamError::Unexpected(msg));
    match (&base, expect.base) {
        (None, None) => {}
        (Some(b), Some(e)) if b == e => {}
        (Some(b), Some(e)) => {
            return Err(unexpected(format!(
                "the stream starts from snapshot {} (guid {:016x}), the receiver holds {} (guid {:016x})",
                b.name, b.guid, e.name, e.guid
            )))
        }
        (Some(b), None) => {
            return Err(unexpected(format!(
                "an incremental stream from {} where a full stream was expected",
                b.name
            )))
        }
        (None, Some(_)) => {
            return Err(unexpected(
                "a full stream where an incremental stream was expected".into(),
            ))
        }
    }
    if target.name != expect.target_name {
        return Err(unexpected(format!(
            "the stream creates snapshot {}, expected {}",
            target.name, expect.target_name
        )));
    }

    let mut out = Tree::open(tree)?;
    let mut dir_meta: HashMap<PathBuf, Meta> = HashMap::new();
    let mut records = 0u64;
    let mut file_bytes = 0u64;
    // The apparent size of the tree's files as the stream changes it (only with a limit).
    let mut referenced = limit.map_or(0, |l| l.start);
    let mut chunk = vec![0u8; COPY_CHUNK];
    loop {
        let tag = input.u8()?;
        if tag == b'E' {
            break;
        }
        records += 1;
        let rel = input.path()?;
        if rel.as_os_str().is_empty() {
            if tag != b'D' {
                return Err(input.corrupt("only a directory record may name the root"));
            }
            dir_meta.insert(rel, input.meta()?);
            continue;
        }
        let shown = out.show(&rel);
        let local = |action: &'static str| {
            let shown = shown.clone();
            move |e: io::Error| ApplyError::from(DatasetError::io(action, &shown, e))
        };
        // The parent is opened from the tree's root one name at a time, never through a
        // symlink: a stream may not write through a link it planted (or one in the base).
        let (dir, name) = match out.parent(&rel) {
            Ok(x) => x,
            Err(e) if vanished(&e) => {
                return Err(input.corrupt(format!(
                    "refusing {}: its parent is not a directory of the stream (missing, a file or a symlink); a stream may write only inside its dataset, never through a link",
                    bounded(&rel)
                )))
            }
            Err(e) => return Err(local("open the directory of")(e)),
        };
        match tag {
            b'D' => {
                let meta = input.meta()?;
                match dir.stat_at(name) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                    Ok(_) => {
                        if limit.is_some() {
                            let gone = tree::size_at(dir, name).map_err(local("measure"))?;
                            referenced = referenced.saturating_sub(gone);
                        }
                        dir.remove_all(name).map_err(local("remove"))?;
                        dir.mkdir(name).map_err(local("create directory"))?;
                        out.forget();
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        dir.mkdir(name).map_err(local("create directory"))?
                    }
                    Err(e) => return Err(local("stat")(e)),
                }
                dir_meta.insert(rel, meta);
            }
            b'F' => {
                let meta = input.meta()?;
                let size = input.u64()?;
                if limit.is_some() {
                    let gone = tree::size_at(dir, name).map_err(local("measure"))?;
                    referenced = referenced.saturating_sub(gone);
                }
                // Unlink first: the old name may be a hard link into the base snapshot.
                dir.remove_all(name).map_err(local("remove"))?;
                let mut file = dir.create_file(name).map_err(local("create file"))?;
                out.forget();
                let mut left = size;
                while left > 0 {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                    if let Some(l) = limit {
                        if referenced.saturating_add(n as u64) > l.limit {
                            return Err(ApplyError::OverLimit {
                                limit: l.limit,
                                at_least: referenced.saturating_add(left),
                            });
                        }
                    }
                    input.exact(&mut chunk[..n])?;
                    file.write_all(&chunk[..n]).map_err(local("write file"))?;
                    left -= n as u64;
                    file_bytes += n as u64;
                    referenced = referenced.saturating_add(n as u64);
                }
                tree::set_fd_meta(file.as_fd(), &meta).map_err(local("set metadata of"))?;
            }
            b'L' => {
                let meta = input.meta()?;
                let target = input.bytes()?;
                if limit.is_some() {
                    let gone = tree::size_at(dir, name).map_err(local("measure"))?;
                    referenced = referenced.saturating_sub(gone);
                }
                dir.remove_all(name).map_err(local("remove"))?;
                dir.symlink(OsStr::from_bytes(&target), name)
                    .map_err(local("create symlink"))?;
                tree::set_link_meta(dir, name, &meta).map_err(local("set metadata of"))?;
                out.forget();
            }
            b'X' => {
                if base_tree.is_none() {
                    return Err(input.corrupt("a delete record in a full stream"));
                }
                if limit.is_some() {
                    let gone = tree::size_at(dir, name).map_err(local("measure"))?;
                    referenced = referenced.saturating_sub(gone);
                }
                dir.remove_all(name).map_err(local("remove"))?;
                out.forget();
            }
            b'P' if version >= VERSION_DELTAS && base_tree.is_some() => {
                let meta = input.meta()?;
                let size = input.u64()?;
                let count = input.u32()? as usize;
                if count > MAX_RANGES {
                    return Err(input.corrupt(format!("a file changed in {count} ranges")));
                }
                let mut ranges = Vec::with_capacity(count);
                let mut end = 0u64;
                for _ in 0..count {
                    let (offset, len) = (input.u64()?, input.u64()?);
                    match offset.checked_add(len) {
                        Some(e) if len > 0 && offset >= end && e <= size => end = e,
                        _ => {
                            return Err(input.corrupt(format!(
                                "changed ranges of {} out of order, empty or past its size",
                                bounded(&rel)
                            )))
                        }
                    }
                    ranges.push((offset, len));
                }
                // The tree is a clone of the base: this name is still the base's file.
                let base_file = match dir.open_file(name) {
                    Ok(Some((file, st))) => (file, st.st_size as u64),
                    Ok(None) => {
                        return Err(input.corrupt(format!(
                            "changed ranges for {}, which the base does not hold as a regular file",
                            bounded(&rel)
                        )))
                    }
                    Err(e) if vanished(&e) => {
                        return Err(input.corrupt(format!(
                            "changed ranges for {}, which the base does not hold",
                            bounded(&rel)
                        )))
                    }
                    Err(e) => return Err(local("open")(e)),
                };
                let (old, old_size) = base_file;
                // Past the base's end, every byte must come with the stream: a record may not
                // make a file (sparse or not) larger than the data it carries.
                if size > old_size && !covers(&ranges, old_size, size) {
                    return Err(input.corrupt(format!(
                        "{} grows past its base without the bytes of its new part",
                        bounded(&rel)
                    )));
                }
                if let Some(l) = limit {
                    referenced = referenced.saturating_sub(old_size);
                    if referenced.saturating_add(size) > l.limit {
                        return Err(ApplyError::OverLimit {
                            limit: l.limit,
                            at_least: referenced.saturating_add(size),
                        });
                    }
                    referenced = referenced.saturating_add(size);
                }
                // A new file: the name is a hard link into the base snapshot.
                dir.remove_all(name).map_err(local("remove"))?;
                let mut file = dir.create_file(name).map_err(local("create file"))?;
                out.forget();
                if !tree::clone_file(&old, &file).map_err(local("reflink"))? {
                    io::copy(&mut &old, &mut file).map_err(local("copy"))?;
                }
                file.set_len(size).map_err(local("resize"))?;
                for (offset, len) in ranges {
                    let mut done = 0u64;
                    while done < len {
                        let n = usize::try_from(len - done)
                            .unwrap_or(usize::MAX)
                            .min(chunk.len());
                        input.exact(&mut chunk[..n])?;
                        file.write_all_at(&chunk[..n], offset + done)
                            .map_err(local("write file"))?;
                        done += n as u64;
                        file_bytes += n as u64;
                    }
                }
                tree::set_fd_meta(file.as_fd(), &meta).map_err(local("set metadata of"))?;
            }
            other => return Err(input.corrupt(format!("unknown record tag 0x{other:02x}"))),
        }
    }
    let counted_records = input.u64()?;
    let counted_bytes = input.u64()?;
    let expected_hash = input.hasher.finalize();
    let mut hash = [0u8; 32];
    input
        .src
        .read_exact(&mut hash)
        .map_err(|e| ApplyError::Stream(StreamError::from_io(e, input.offset)))?;
    if &hash != expected_hash.as_bytes() {
        return Err(ApplyError::Stream(StreamError::ChecksumMismatch {
            offset: input.offset,
        }));
    }
    if counted_records != records || counted_bytes != file_bytes {
        return Err(input.corrupt(format!(
            "end record says {counted_records} records and {counted_bytes} bytes, received {records} and {file_bytes}"
        )));
    }
    // The stream must end here; reading on also makes a framed reader verify its trailer.
    let mut probe = [0u8; 1];
    loop {
        match input.src.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => return Err(input.corrupt("data after the end record")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ApplyError::Stream(StreamError::from_io(e, input.offset))),
        }
    }

    // Directory metadata last, children first; unlisted directories keep the base's.
    let mut base_snap = base_tree.map(Tree::open).transpose()?;
    for e in tree::walk(tree)?.iter().rev() {
        if e.kind != Kind::Dir {
            continue;
        }
        let meta = match dir_meta.get(&e.rel) {
            Some(m) => *m,
            None => match base_snap
                .as_mut()
                .map(|b| b.stat(&e.rel))
                .transpose()?
                .flatten()
            {
                Some(b) if b.kind == Kind::Dir => b.meta,
                _ => {
                    return Err(ApplyError::Stream(StreamError::Corrupt {
                        offset: input.offset,
                        detail: format!("directory {:?} has no metadata record", e.rel),
                    }))
                }
            },
        };
        out.set_dir_meta(&e.rel, &meta)?;
    }
    Ok(Applied {
        start: StreamStart {
            base,
            target,
            created_unix,
        },
    })
}

/// True if the sorted, disjoint `ranges` cover `[from, to)`.
fn covers(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    let mut reached = from;
    for (offset, len) in ranges {
        let end = offset + len;
        if end <= reached {
            continue;
        }
        if *offset > reached {
            return false;
        }
        reached = end;
    }
    reached >= to
}

/// A path from a stream for a message: at most 100 bytes of it, and its length.
fn bounded(p: &Path) -> String {
    let b = p.as_os_str().as_bytes();
    if b.len() <= 100 {
        format!("{:?}", p.display().to_string())
    } else {
        format!(
            "{:?}... ({} bytes)",
            String::from_utf8_lossy(&b[..100]),
            b.len()
        )
    }
}
