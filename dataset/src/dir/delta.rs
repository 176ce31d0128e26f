//! What changed between two versions of a file, told by where their data lies on disk
//! (`FIEMAP`), not by reading them (issue 20).
//!
//! On a file system with reflinks (btrfs, XFS), a snapshot's copy of a file is a reflink of the
//! live file, and a write to the live file puts the written blocks somewhere new (copy on
//! write) while the rest stays shared. So two snapshots' copies of a file map the same
//! physical blocks at the same offsets wherever the file was not rewritten between them. A
//! range counts as unchanged only when both files map it, at the same offset, to the same
//! physical address through extents whose data is plainly there (not delayed, inline, encoded
//! or unwritten), or when both have a hole there; everything else (different blocks, one side
//! a hole, past the end of the older file, an extent whose address means nothing) is changed.
//! Two files that share nothing (ext4, tmpfs: every copy is a byte copy) come out as changed
//! everywhere, and the caller sends them whole.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One extent of a file, as `FIEMAP` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    /// The data is on disk at `physical`, as it reads (see [`UNTRUSTED`]).
    pub plain: bool,
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extent flags whose physical address says nothing about the data that reads back: unknown
/// location, delayed allocation, encoded (compressed), encrypted, not block-aligned, inline in
/// metadata, packed in a tail, unwritten (reads as zeros).
const UNTRUSTED: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;
/// Extents asked for per call.
const BATCH: usize = 256;
/// A file with more extents than this is sent whole.
const MAX_EXTENTS: usize = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawFiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// The extents of `file`, its dirty data written out first; `None` when the file system does
/// not tell (no `FIEMAP`) or the file has too many extents to be worth it.
pub(crate) fn extents(file: &File) -> io::Result<Option<Vec<Extent>>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut req = RawFiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `req` is a struct fiemap followed by room for `extent_count` extents, valid
        // and exclusively borrowed for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut req) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(None),
                _ => Err(err),
            };
        }
        let n = (req.mapped_extents as usize).min(BATCH);
        for raw in &req.extents[..n] {
            out.push(Extent {
                logical: raw.logical,
                physical: raw.physical,
                length: raw.length,
                plain: raw.flags & UNTRUSTED == 0,
            });
        }
        let Some(last) = req.extents[..n].last() else {
            return Ok(Some(out));
        };
        if last.flags & FIEMAP_EXTENT_LAST != 0 || n < BATCH {
            return Ok(Some(out));
        }
        if out.len() > MAX_EXTENTS {
            return Ok(None);
        }
        start = last.logical.saturating_add(last.length);
    }
}

/// The extent of `map` (sorted by offset) holding byte `at`, if any.
fn holding(map: &[Extent], at: u64) -> Option<&Extent> {
    let i = map.partition_point(|e| e.logical <= at);
    let e = map.get(i.checked_sub(1)?)?;
    (at < e.logical.saturating_add(e.length)).then_some(e)
}

/// The ranges `(offset, length)` of the newer file (`new`, `new_size` bytes) that may differ
/// from the older one (`old`, `old_size` bytes), in order, adjacent ones merged.
pub(crate) fn changed_ranges(
    old: &[Extent],
    old_size: u64,
    new: &[Extent],
    new_size: u64,
) -> Vec<(u64, u64)> {
    let mut cuts = vec![0, new_size, old_size.min(new_size)];
    for e in old.iter().chain(new) {
        cuts.push(e.logical);
        cuts.push(e.logical.saturating_add(e.length));
    }
    cuts.retain(|c| *c <= new_size);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let same = b <= old_size
            && match (holding(old, a), holding(new, a)) {
                (None, None) => true,
                (Some(o), Some(n)) => {
                    o.plain
                        && n.plain
                        && o.physical.checked_add(a - o.logical)
                            == n.physical.checked_add(a - n.logical)
                }
                _ => false,
            };
        if same {
            continue;
        }
        match out.last_mut() {
            Some((off, len)) if *off + *len == a => *len += b - a,
            _ => out.push((a, b - a)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            plain: true,
        }
    }

    #[test]
    fn a_rewritten_middle_is_the_only_change() {
        // 8 blocks of 4 KiB shared; blocks 3-4 rewritten to a new place.
        let old = [ext(0, 1 << 20, 32768)];
        let new = [
            ext(0, 1 << 20, 12288),
            ext(12288, 9 << 20, 8192),
            ext(20480, (1 << 20) + 20480, 12288),
        ];
        assert_eq!(
            changed_ranges(&old, 32768, &new, 32768),
            vec![(12288, 8192)]
        );
    }

    #[test]
    fn what_is_not_plainly_shared_is_changed() {
        let old = [ext(0, 1 << 20, 8192)];
        // Same address but delayed allocation: not trusted.
        let mut delayed = ext(0, 1 << 20, 8192);
        delayed.plain = false;
        assert_eq!(
            changed_ranges(&old, 8192, &[delayed], 8192),
            vec![(0, 8192)]
        );
        // Shared at a different offset: not the same data at this offset.
        assert_eq!(
            changed_ranges(&old, 8192, &[ext(0, (1 << 20) + 4096, 8192)], 8192),
            vec![(0, 8192)]
        );
        // Copies that share nothing (ext4): all of it.
        assert_eq!(
            changed_ranges(&old, 8192, &[ext(0, 5 << 20, 8192)], 8192),
            vec![(0, 8192)]
        );
        // A hole on one side only.
        assert_eq!(changed_ranges(&[], 8192, &old, 8192), vec![(0, 8192)]);
        // Holes on both sides are equal.
        assert_eq!(changed_ranges(&[], 8192, &[], 8192), vec![]);
    }

    #[test]
    fn growth_and_shrinking() {
        let old = [ext(0, 1 << 20, 8192)];
        // Grown by 4 KiB in a new block, and the old tail block kept: only the new part.
        let grown = [ext(0, 1 << 20, 8192), ext(8192, 7 << 20, 4096)];
        assert_eq!(
            changed_ranges(&old, 8192, &grown, 12288),
            vec![(8192, 4096)]
        );
        // Appended within the old last block (size 6000 -> 8192, the block shared): the bytes
        // past the old end count as changed even though the block is the same.
        assert_eq!(changed_ranges(&old, 6000, &old, 8192), vec![(6000, 2192)]);
        // Shrunk: nothing to send but the new size.
        assert_eq!(changed_ranges(&old, 8192, &old, 4096), vec![]);
    }
}
