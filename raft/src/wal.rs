//! The Raft log's entries on disk: an append-only write-ahead log (issue 20).
//!
//! In redb every write was a copy-on-write transaction: about ten B-tree pages written and a
//! third of flockd's CPU under one client, for a log that only ever grows at its end, loses its
//! tail on a conflict and its head after a snapshot. Here an append is one `write` of a few
//! hundred bytes and, when durable, one `fdatasync`.
//!
//! Layout: a directory (`raft.wal` beside `raft.redb`, 0700) of segment files named by a
//! sequence number (`00000000000000000001.wal`, 0600). A segment starts with a header (the magic
//! `FLOCKWAL`, then the format as u32 LE) followed by records:
//! `body length: u32 LE | crc32 of the body: u32 LE | body`, the body a kind byte then:
//! - [`KIND_APPEND`]: one entry, as a versioned record ([`crate::codec`]);
//! - [`KIND_TRUNCATE`]: an index as u64 LE: entries from it on are gone;
//! - [`KIND_COMMITTED`]: the commit index, a versioned record of `Option<LogId>`.
//!
//! Replaying every segment in order gives the log. An append at an index drops any entry at or
//! after it first, as a truncation would (openraft always truncates first: this only keeps a
//! replay from ever holding two entries at one index).
//!
//! **Crashes.** Bytes not yet fdatasync'ed may be lost or torn. A segment is fdatasync'ed before
//! the next one is started, so only the last segment can end torn. A bad record there (a CRC
//! that does not match, a length past the end of the file) is a torn write when the file holds
//! an all-zero 512-byte sector within the record or the record runs past the end (what a write
//! cut short by a crash leaves: the sectors it did not reach read as zeros); the segment is then
//! cut back to the last whole record, which loses nothing that was acknowledged (an
//! acknowledgement comes after the fdatasync that would have made the record whole). Any other
//! bad record, or one in an earlier segment, is damage: the store refuses to open and says
//! where (fail closed: cutting it would silently drop acknowledged entries).
//!
//! **Purging** deletes whole segments whose entries are all purged, never the one being
//! written. The purge point itself is kept in redb, durably, before the segments go, and a
//! replay drops the entries up to it ([`crate::disk`]). When a new segment starts, the latest
//! commit index is written at its head, so that deleting older segments never loses it.
//!
//! A failed write or fdatasync leaves the file in a state this process cannot know (the page
//! cache may have dropped the pages): every later write fails too, and a restart replays what
//! is really on disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::codec::{decode, encode_into};
use crate::disk::{DiskError, WriteOp};
use crate::types::{Entry, LogId};

/// A segment's first bytes.
const MAGIC: &[u8; 8] = b"FLOCKWAL";
/// The segment format this build writes and reads.
pub const WAL_FORMAT: u32 = 1;
const HEADER_LEN: u64 = 12;
/// A record's length and CRC.
const RECORD_HEAD: usize = 8;
/// A new segment is started once the current one holds this much.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// No record is larger: one entry is bounded well below it by the Raft's command limits, so a
/// larger length read back is a torn or damaged record, not an allocation to make.
const MAX_RECORD: u32 = 256 << 20;
const SECTOR: usize = 512;
/// The write buffer kept between writes, at most.
const KEEP_BUFFER: usize = 4 << 20;

const KIND_APPEND: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_COMMITTED: u8 = 3;

/// The log as the segments on disk give it.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Entries by index, contiguous unless the files were damaged (the caller checks, after
    /// dropping what is purged).
    pub entries: BTreeMap<u64, Entry>,
    /// The last commit index recorded, if any was.
    pub committed: Option<Option<LogId>>,
}

struct Segment {
    seq: u64,
    /// The highest index appended in this segment.
    last_index: Option<u64>,
}

/// The open log: appends go to the last segment.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    len: u64,
    /// Written since the last fdatasync.
    dirty: bool,
    buf: Vec<u8>,
    /// The latest commit index written, copied to the head of each new segment.
    committed: Option<Option<LogId>>,
    /// Set by a failed write: every later write fails with it.
    failed: Option<String>,
    /// A new segment is started once the current one holds this much.
    segment_bytes: u64,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> DiskError + '_ {
    move |source| DiskError::File {
        path: path.display().to_string(),
        source,
    }
}

fn damaged(path: &Path, offset: u64, reason: impl Into<String>) -> DiskError {
    DiskError::Damaged {
        path: path.display().to_string(),
        offset,
        reason: reason.into(),
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// fsyncs a directory, so that the files created or removed in it stay so.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The segments in `dir`, by sequence number. Other names are left alone.
fn list_segments(dir: &Path) -> Result<Vec<u64>, DiskError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(seq) = stem.parse() {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Appends one record to `buf`, its body written by `body`.
fn put_record(buf: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEAD]);
    buf.push(kind);
    body(buf);
    let crc = crc32fast::hash(&buf[start + RECORD_HEAD..]);
    let len = (buf.len() - start - RECORD_HEAD) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_committed(buf: &mut Vec<u8>, committed: &Option<LogId>) {
    put_record(buf, KIND_COMMITTED, |b| encode_into(committed, b));
}

/// True when the bad record at `at` looks like a write cut short: it runs past the end of the
/// file, or an aligned 512-byte sector within it is all zeros.
fn torn(bytes: &[u8], at: usize, record_end: Option<usize>) -> bool {
    let Some(end) = record_end.filter(|e| *e <= bytes.len()) else {
        return true;
    };
    let mut sector = at - at % SECTOR;
    while sector < end {
        let chunk = &bytes[sector.max(at)..(sector + SECTOR).min(end)];
        if chunk.iter().all(|b| *b == 0) {
            return true;
        }
        sector += SECTOR;
    }
    false
}

/// How reading one segment ended.
struct Scanned {
    /// Where its whole records end.
    valid_len: u64,
    /// A torn tail after `valid_len` (only ever accepted in the last segment).
    torn: bool,
    last_index: Option<u64>,
}

/// Replays the segment at `path` into `into`. A torn tail is accepted only when `last`.
fn scan(path: &Path, bytes: &[u8], last: bool, into: &mut Replayed) -> Result<Scanned, DiskError> {
    if (bytes.len() as u64) < HEADER_LEN || bytes[..HEADER_LEN as usize].iter().all(|b| *b == 0) {
        // A segment whose header never reached the disk (or only its first bytes): created
        // just before a crash.
        let header_cut = bytes.len() < HEADER_LEN as usize && MAGIC.starts_with(bytes);
        if last && (header_cut || bytes.iter().all(|b| *b == 0)) {
            return Ok(Scanned {
                valid_len: 0,
                torn: true,
                last_index: None,
            });
        }
        return Err(damaged(path, 0, "no segment header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(damaged(path, 0, "not a flock WAL segment (bad magic)"));
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format > WAL_FORMAT {
        return Err(damaged(
            path,
            8,
            format!("segment format {format} is newer than this build reads ({WAL_FORMAT}); upgrade flockd"),
        ));
    }
    let mut at = HEADER_LEN as usize;
    let mut last_index = None;
    loop {
        if at == bytes.len() {
            return Ok(Scanned {
                valid_len: at as u64,
                torn: false,
                last_index,
            });
        }
        let bad = |why: &str, record_end: Option<usize>| -> Result<Scanned, DiskError> {
            if last && torn(bytes, at, record_end) {
                Ok(Scanned {
                    valid_len: at as u64,
                    torn: true,
                    last_index,
                })
            } else {
                Err(damaged(path, at as u64, why))
            }
        };
        if bytes.len() - at < RECORD_HEAD {
            return bad("a record's head is cut short", None);
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD {
            return bad(&format!("a record of {len} bytes"), Some(at + RECORD_HEAD));
        }
        let end = at + RECORD_HEAD + len as usize;
        if end > bytes.len() {
            return bad("a record runs past the end of the segment", None);
        }
        let body = &bytes[at + RECORD_HEAD..end];
        if crc32fast::hash(body) != crc {
            return bad("a record's checksum does not match", Some(end));
        }
        // From here the record is whole: one that does not decode is damage or a newer build's.
        let undecodable = |e: crate::codec::CodecError| damaged(path, at as u64, e.to_string());
        match body[0] {
            KIND_APPEND => {
                let entry: Entry = decode(&body[1..]).map_err(undecodable)?;
                let index = entry.log_id.index;
                into.entries.split_off(&index);
                into.entries.insert(index, entry);
                last_index = Some(last_index.map_or(index, |l: u64| l.max(index)));
            }
            KIND_TRUNCATE => {
                let Ok(raw) = <[u8; 8]>::try_from(&body[1..]) else {
                    return Err(damaged(path, at as u64, "a truncation of the wrong size"));
                };
                into.entries.split_off(&u64::from_le_bytes(raw));
            }
            KIND_COMMITTED => {
                into.committed = Some(decode(&body[1..]).map_err(undecodable)?);
            }
            kind => {
                return Err(damaged(
                    path,
                    at as u64,
                    format!("a record of unknown kind {kind}; upgrade flockd"),
                ))
            }
        }
        at = end;
    }
}

fn read_segment(path: &Path) -> Result<Vec<u8>, DiskError> {
    fs::read(path).map_err(io_err(path))
}

/// Replays the log in `dir` without changing anything (a torn tail is left as it is).
pub fn replay(dir: &Path) -> Result<Replayed, DiskError> {
    let seqs = list_segments(dir)?;
    let mut out = Replayed::default();
    for (i, seq) in seqs.iter().enumerate() {
        let path = segment_path(dir, *seq);
        scan(&path, &read_segment(&path)?, i + 1 == seqs.len(), &mut out)?;
    }
    Ok(out)
}

fn create_segment(dir: &Path, seq: u64) -> Result<File, DiskError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&WAL_FORMAT.to_le_bytes());
    file.write_all(&header).map_err(io_err(&path))?;
    Ok(file)
}

impl Wal {
    /// Creates an empty log in `dir`, which must not exist.
    pub fn create(dir: &Path) -> Result<Wal, DiskError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let file = create_segment(dir, 1)?;
        file.sync_data().map_err(io_err(dir))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Wal {
            dir: dir.to_path_buf(),
            segments: vec![Segment {
                seq: 1,
                last_index: None,
            }],
            file,
            len: HEADER_LEN,
            dirty: false,
            buf: Vec::new(),
            committed: None,
            failed: None,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// Opens the log in `dir`, cutting a torn tail off its last segment.
    pub fn open(dir: &Path) -> Result<Wal, DiskError> {
        let seqs = list_segments(dir)?;
        let Some(&last_seq) = seqs.last() else {
            return Err(damaged(dir, 0, "the log directory holds no segment"));
        };
        let mut replayed = Replayed::default();
        let mut segments = Vec::with_capacity(seqs.len());
        let mut last_len = 0;
        for seq in &seqs {
            let path = segment_path(dir, *seq);
            let bytes = read_segment(&path)?;
            let is_last = *seq == last_seq;
            let s = scan(&path, &bytes, is_last, &mut replayed)?;
            if s.torn {
                tracing::warn!(
                    segment = %path.display(),
                    kept = s.valid_len,
                    dropped = bytes.len() as u64 - s.valid_len,
                    "raft log: a write cut short by a crash is dropped (it was never acknowledged)"
                );
            }
            if is_last {
                last_len = if s.torn {
                    s.valid_len
                } else {
                    bytes.len() as u64
                };
            }
            segments.push(Segment {
                seq: *seq,
                last_index: s.last_index,
            });
        }
        let path = segment_path(dir, last_seq);
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if last_len < HEADER_LEN {
            // The header never made it: write it again.
            file.set_len(0).map_err(io_err(&path))?;
            let mut header = MAGIC.to_vec();
            header.extend_from_slice(&WAL_FORMAT.to_le_bytes());
            file.write_all(&header).map_err(io_err(&path))?;
            last_len = HEADER_LEN;
        }
        file.set_len(last_len).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(last_len))
            .map_err(io_err(&path))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            len: last_len,
            dirty: false,
            buf: Vec::new(),
            committed: replayed.committed,
            failed: None,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts new segments at `bytes` instead of [`SEGMENT_BYTES`] (tests: many segments).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    /// How many segment files the log has.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn fail(&mut self, e: DiskError) -> DiskError {
        self.failed = Some(e.to_string());
        e
    }

    /// Appends the log's part of `ops` (appends, truncations, commit indexes; others are
    /// ignored), in order, and fdatasyncs when `durable` (also any earlier write not synced yet).
    pub fn write<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a WriteOp>,
        durable: bool,
    ) -> Result<(), DiskError> {
        if let Some(e) = &self.failed {
            return Err(DiskError::Failed(e.clone()));
        }
        if self.len >= self.segment_bytes {
            self.roll().map_err(|e| self.fail(e))?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if self.len == HEADER_LEN {
            if let Some(c) = &self.committed {
                put_committed(&mut buf, c);
            }
        }
        let current = self.segments.last_mut().expect("a log has a segment");
        for op in ops {
            match op {
                WriteOp::Append(entries) => {
                    for e in entries {
                        put_record(&mut buf, KIND_APPEND, |b| encode_into(e, b));
                        let index = e.log_id.index;
                        current.last_index =
                            Some(current.last_index.map_or(index, |l| l.max(index)));
                    }
                }
                WriteOp::TruncateFrom(index) => {
                    put_record(&mut buf, KIND_TRUNCATE, |b| {
                        b.extend_from_slice(&index.to_le_bytes())
                    });
                }
                WriteOp::Committed(c) => {
                    put_committed(&mut buf, c);
                    self.committed = Some(*c);
                }
                _ => {}
            }
        }
        let result = self.write_buf(&buf, durable);
        // Keep the buffer for the next write, unless one large write (a move of the whole log
        // at an upgrade, a big batch) grew it: then let that memory go.
        if buf.capacity() <= KEEP_BUFFER {
            self.buf = buf;
        }
        result.map_err(|e| self.fail(e))
    }

    fn write_buf(&mut self, buf: &[u8], durable: bool) -> Result<(), DiskError> {
        let path = segment_path(&self.dir, self.segments.last().expect("a segment").seq);
        if !buf.is_empty() {
            self.file.write_all(buf).map_err(io_err(&path))?;
            self.len += buf.len() as u64;
            self.dirty = true;
        }
        if durable && self.dirty {
            self.file.sync_data().map_err(io_err(&path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Starts the next segment, the current one fdatasync'ed first.
    fn roll(&mut self) -> Result<(), DiskError> {
        let seq = self.segments.last().expect("a segment").seq + 1;
        self.file
            .sync_data()
            .map_err(io_err(&segment_path(&self.dir, seq - 1)))?;
        self.file = create_segment(&self.dir, seq)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            seq,
            last_index: None,
        });
        self.len = HEADER_LEN;
        self.dirty = true;
        Ok(())
    }

    /// Deletes the segments, from the first, whose entries are all at or below `index` (the
    /// purge point, already durable), never the one being written.
    pub fn drop_upto(&mut self, index: u64) -> Result<(), DiskError> {
        let mut dropped = false;
        while self.segments.len() > 1 && self.segments[0].last_index.is_none_or(|l| l <= index) {
            let path = segment_path(&self.dir, self.segments[0].seq);
            fs::remove_file(&path).map_err(io_err(&path))?;
            self.segments.remove(0);
            dropped = true;
        }
        if dropped {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_is_a_zero_sector_or_a_record_past_the_end() {
        let mut bytes = vec![7u8; 4096];
        assert!(torn(&bytes, 100, None), "past the end");
        assert!(torn(&bytes, 100, Some(5000)), "past the end");
        assert!(!torn(&bytes, 100, Some(2000)), "no zeros: damage");
        bytes[1024..1536].fill(0);
        assert!(
            torn(&bytes, 100, Some(2000)),
            "a zero sector inside the record"
        );
        assert!(
            !torn(&bytes, 100, Some(1000)),
            "the zeros are after the record"
        );
        // A record starting mid-sector: its part of the first sector counts.
        let mut b = vec![7u8; 2048];
        b[600..1024].fill(0);
        assert!(torn(&b, 600, Some(1500)));
    }
}
