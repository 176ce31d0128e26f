//! The `dir` backend's stream applier (`flock_dataset::dir`, stream.rs), through the public
//! [`Backend::receive`] of a real [`DirBackend`] in a temporary directory.
//!
//! A stream whose header says "incremental" is received on top of dataset `base` (snapshot
//! `s1`), any other as a full stream creating dataset `recv`. So that mutated streams get past
//! the header checks, the base snapshot's guid in the input is set to the receiver's and the
//! expected target is the name the stream carries (a real receiver knows both from the
//! framing's header). After every input:
//! - nothing outside the backend's root changed (a sibling directory `outside/`, with files a
//!   planted symlink could point at, is compared byte for byte);
//! - the base snapshot's tree is unchanged (files are hard-linked into a receive's tree, so a
//!   write through one would change the snapshot);
//! - a failed receive left nothing behind (no `recv` dataset, no new snapshot, empty staging);
//!   a successful one is undone (destroy, rollback) for the next input.

use std::cell::RefCell;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flock_dataset::{Backend, DatasetName, DirBackend, SnapshotName, StreamSpec};

use super::{Outcome, Target};
use crate::mutate::Rng;

const MAGIC: &[u8; 8] = b"FLKDIR\0\0";
const META_LEN: usize = 24;

pub fn target() -> Target {
    Target {
        name: "dir_stream",
        about: "dir backend stream applier into a temporary dataset, never writing outside it (dataset/src/dir/stream.rs)",
        run,
        seeds,
        fixup,
        generate: Some(generate),
        dict: &[
            b"FLKDIR\0\0",
            b"\x00\x01",
            b"D",
            b"F",
            b"L",
            b"X",
            b"E",
            b"..",
            b"../",
            b"/",
            b"../../outside",
            b"@@OUTSIDE@@",
            b"@@OUTSIDE@@/etc",
            b"\x00\x00\x01\xed",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
        ],
        max_len: 64 << 10,
        known: &[],
    }
}

fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).expect("valid dataset name")
}

fn snap(name: &str) -> SnapshotName {
    SnapshotName::new(name).expect("valid snapshot name")
}

/// The receiver: a backend in a temporary directory, with a sibling `outside/`.
struct Receiver {
    _dir: tempfile::TempDir,
    _outside_dir: tempfile::TempDir,
    outside: PathBuf,
    top: PathBuf,
    backend: DirBackend,
    outside_print: Vec<String>,
    base_print: Vec<String>,
    base_tree: PathBuf,
    base_guid: u64,
}

thread_local! {
    static RECEIVER: RefCell<Option<Receiver>> = const { RefCell::new(None) };
}

/// Removes this thread's receiver (its temporary directories). Thread-local values of the
/// main thread are not dropped at exit, so the worker calls this when it is done.
pub fn cleanup() {
    RECEIVER.with(|cell| cell.borrow_mut().take());
}

/// Writes a small tree: files, a nested directory, a symlink, odd modes.
fn populate(root: &Path, round: u32) {
    let w = |p: &str, data: &[u8]| {
        let path = root.join(p);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&path, data).expect("write");
    };
    w("a.txt", b"hello");
    w("dir/b.bin", &[round as u8; 300]);
    w("dir/sub/c", b"");
    if round > 0 {
        w("dir/new", b"added in s2");
        let _ = fs::remove_file(root.join("a.txt"));
        w("z", &vec![7u8; 5000]);
    }
    let _ = std::os::unix::fs::symlink("dir/b.bin", root.join("link"));
}

/// Streams made by the real sender: full s1, full s2, incremental s1 -> s2.
fn sender_streams() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = DirBackend::open(dir.path().join("root")).expect("open backend");
    let name = ds("src");
    b.create(&name, None).expect("create");
    let live = b.mount_path(&name).expect("mount path");
    populate(&live, 0);
    b.snapshot(&name, &snap("s1")).expect("s1");
    populate(&live, 1);
    b.snapshot(&name, &snap("s2")).expect("s2");
    let read = |spec: StreamSpec| {
        let mut out = Vec::new();
        std::io::copy(&mut b.send(&spec).expect("send"), &mut out).expect("read stream");
        out
    };
    vec![
        read(StreamSpec::full(name.clone(), snap("s1"))),
        read(StreamSpec::full(name.clone(), snap("s2"))),
        read(StreamSpec::incremental(
            name.clone(),
            snap("s1"),
            snap("s2"),
        )),
    ]
}

fn seeds() -> Vec<Vec<u8>> {
    sender_streams()
}

/// Every entry under `root` (not following links): path, type, mode, owner, size, mtime,
/// contents' hash or link target.
fn fingerprint(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
        let path = root.join(rel);
        let Ok(md) = fs::symlink_metadata(&path) else {
            out.push(format!("{}: missing", rel.display()));
            return;
        };
        let what = if md.file_type().is_symlink() {
            format!("-> {:?}", fs::read_link(&path).ok())
        } else if md.is_file() {
            blake3::hash(&fs::read(&path).unwrap_or_default()).to_hex()[..16].to_string()
        } else {
            "dir".into()
        };
        out.push(format!(
            "{} {:o} {}:{} {} {} {}",
            rel.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.len(),
            md.mtime(),
            what
        ));
        if md.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
                .unwrap_or_default();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn receiver() -> Receiver {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = dir.path().to_path_buf();
    // `/tmp/XXXXXX`: as long as the placeholder symlink targets carry.
    let outside_dir = tempfile::Builder::new()
        .prefix("")
        .rand_bytes(6)
        .tempdir_in("/tmp")
        .expect("tempdir");
    let outside = outside_dir.path().to_path_buf();
    fs::create_dir_all(outside.join("etc")).expect("mkdir");
    fs::write(outside.join("secret"), b"must not change").expect("write");
    fs::write(outside.join("etc/passwd"), b"root:x:0:0").expect("write");
    let backend = DirBackend::open(top.join("backend")).expect("open backend");
    let full_s1 = sender_streams().swap_remove(0);
    backend
        .receive(
            &StreamSpec::full(ds("base"), snap("s1")),
            None,
            &mut &full_s1[..],
        )
        .expect("receive the base");
    let base_guid = backend.snapshots(&ds("base")).expect("snapshots")[0].guid;
    // The snapshot's tree: the one directory under snapshots/.
    let snaps = top.join("backend/datasets/base/snapshots");
    let seq = fs::read_dir(&snaps)
        .expect("snapshots dir")
        .next()
        .expect("one snapshot")
        .expect("entry")
        .path();
    let base_tree = seq.join("tree");
    Receiver {
        outside_print: fingerprint(&outside),
        outside,
        _outside_dir: outside_dir,
        base_print: fingerprint(&base_tree),
        base_tree,
        base_guid,
        top,
        backend,
        _dir: dir,
    }
}

/// The header's fields the receiver needs: (incremental, target name, offset of base guid).
fn peek_header(data: &[u8]) -> Option<(bool, String, Option<usize>)> {
    if data.len() < 11 || &data[..8] != MAGIC {
        return None;
    }
    let incremental = data[10] & 1 != 0;
    let mut pos = 11;
    let str_at = |pos: &mut usize| -> Option<String> {
        let len = u16::from_be_bytes([*data.get(*pos)?, *data.get(*pos + 1)?]) as usize;
        let s = data.get(*pos + 2..*pos + 2 + len)?;
        *pos += 2 + len;
        Some(String::from_utf8_lossy(s).into_owned())
    };
    let mut guid_at = None;
    if incremental {
        str_at(&mut pos)?;
        guid_at = Some(pos);
        pos += 8;
    }
    let target = str_at(&mut pos)?;
    Some((incremental, target, guid_at))
}

/// The placeholder for the sandbox's `outside/` directory in symlink targets: as long as its
/// path (`/tmp/` and six random characters), so no length field changes.
const MARK: &[u8; 11] = b"@@OUTSIDE@@";

/// `data` with every [`MARK`] replaced by the absolute path of the receiver's outside
/// directory, and the end record's checksum recomputed if there was one: symlinks that point
/// out of the dataset point there, never at the real system, so a receive that follows one
/// damages only the sandbox, and the check after it sees that.
fn with_outside(data: &[u8], outside: &Path) -> Vec<u8> {
    let path = outside.as_os_str().as_encoded_bytes();
    assert_eq!(
        path.len(),
        MARK.len(),
        "the outside directory's path has the mark's length"
    );
    let mut out = data.to_vec();
    let mut found = false;
    let mut i = 0;
    while i + MARK.len() <= out.len() {
        if &out[i..i + MARK.len()] == MARK {
            out[i..i + MARK.len()].copy_from_slice(path);
            found = true;
            i += MARK.len();
        } else {
            i += 1;
        }
    }
    if found {
        if let Some((at, _, _)) = walk_records(&out) {
            if at + 49 <= out.len() {
                let h = blake3::hash(&out[..at + 17]);
                out[at + 17..at + 49].copy_from_slice(h.as_bytes());
            }
        }
    }
    out
}

fn run(data: &[u8]) -> Outcome {
    RECEIVER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let r = slot.get_or_insert_with(receiver);
        let (incremental, target_name, guid_at) =
            peek_header(data).unwrap_or((false, "s2".into(), None));
        let target = SnapshotName::new(&target_name).unwrap_or_else(|_| snap("s2"));
        let mut input = with_outside(data, &r.outside);
        if let Some(at) = guid_at {
            if at + 8 <= input.len() {
                input[at..at + 8].copy_from_slice(&r.base_guid.to_be_bytes());
            }
        }
        let (spec, name) = if incremental {
            (
                StreamSpec::incremental(ds("base"), snap("s1"), target.clone()),
                ds("base"),
            )
        } else {
            (StreamSpec::full(ds("recv"), target.clone()), ds("recv"))
        };
        let result = r.backend.receive(&spec, Some(64 << 20), &mut &input[..]);

        // Undo a success; then the invariants.
        let broken = check(r, &result, incremental, &name);
        if let Some(msg) = broken {
            // The next input gets a fresh receiver.
            *slot = None;
            panic!("{msg}");
        }
        match result {
            Ok(_) => Outcome::ok(if incremental { "incremental" } else { "full" }),
            Err(e) => Outcome::err(e),
        }
    })
}

fn check(
    r: &Receiver,
    result: &Result<flock_dataset::SnapshotInfo, flock_dataset::DatasetError>,
    incremental: bool,
    name: &DatasetName,
) -> Option<String> {
    let b = &r.backend;
    match (result, incremental) {
        (Ok(_), false) => {
            if let Err(e) = b.destroy(name) {
                return Some(format!("cannot destroy a received dataset: {e}"));
            }
        }
        (Ok(_), true) => {
            if let Err(e) = b.rollback(&ds("base"), &snap("s1")) {
                return Some(format!("cannot roll back a received snapshot: {e}"));
            }
        }
        (Err(e), false) => {
            if !matches!(b.info(name), Ok(None)) {
                return Some(format!("a failed full receive ({e}) left dataset {name}"));
            }
        }
        (Err(e), true) => {
            let snaps = b.snapshots(&ds("base")).map(|s| s.len());
            if !matches!(snaps, Ok(1)) {
                return Some(format!(
                    "a failed incremental receive ({e}) left snapshots: {snaps:?}"
                ));
            }
        }
    }
    let mut top: Vec<String> = fs::read_dir(&r.top)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    top.sort();
    if top != ["backend"] {
        return Some(format!(
            "a receive wrote outside the backend's root: {top:?}"
        ));
    }
    if fingerprint(&r.outside) != r.outside_print {
        return Some("a receive changed files outside the backend's root".into());
    }
    if fingerprint(&r.base_tree) != r.base_print {
        return Some("a receive changed the base snapshot's files".into());
    }
    for dir in ["staging", "trash"] {
        let left = fs::read_dir(r.top.join("backend").join(dir)).map(|d| d.count());
        if !matches!(left, Ok(0)) {
            return Some(format!("a receive left {left:?} entries in {dir}/"));
        }
    }
    None
}

/// Fixes the end record's counts (mostly) and checksum, walking the records.
#[allow(clippy::ptr_arg)] // the signature of `Target::fixup`
fn fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    let Some(end) = walk_records(data) else {
        return;
    };
    let (at, records, bytes) = end;
    if at + 1 + 16 + 32 > data.len() {
        return;
    }
    if !rng.one_in(4) {
        data[at + 1..at + 9].copy_from_slice(&records.to_be_bytes());
        data[at + 9..at + 17].copy_from_slice(&bytes.to_be_bytes());
    }
    let h = blake3::hash(&data[..at + 17]);
    data[at + 17..at + 49].copy_from_slice(h.as_bytes());
}

/// The offset of the end record, the records before it and their file bytes.
fn walk_records(d: &[u8]) -> Option<(usize, u64, u64)> {
    let u16_at = |p: usize| Some(u16::from_be_bytes([*d.get(p)?, *d.get(p + 1)?]) as usize);
    let u32_at = |p: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(p..p + 4)?.try_into().ok()?) as usize)
    };
    let u64_at =
        |p: usize| -> Option<u64> { Some(u64::from_be_bytes(d.get(p..p + 8)?.try_into().ok()?)) };
    if d.len() < 11 || &d[..8] != MAGIC {
        return None;
    }
    let mut pos = 11;
    if d[10] & 1 != 0 {
        pos += 2 + u16_at(pos)? + 8;
    }
    pos += 2 + u16_at(pos)? + 16;
    let (mut records, mut bytes) = (0u64, 0u64);
    loop {
        let tag = *d.get(pos)?;
        if tag == b'E' {
            return Some((pos, records, bytes));
        }
        records += 1;
        pos += 1;
        pos = pos.checked_add(4 + u32_at(pos)?)?;
        match tag {
            b'D' => pos += META_LEN,
            b'F' => {
                let size = u64_at(pos + META_LEN)?;
                bytes = bytes.checked_add(size)?;
                pos = pos.checked_add(META_LEN + 8 + usize::try_from(size).ok()?)?;
            }
            b'L' => {
                pos += META_LEN;
                pos = pos.checked_add(4 + u32_at(pos)?)?;
            }
            b'X' => {}
            _ => return None,
        }
    }
}

/// A stream built record by record from `arbitrary` data (paths from a small alphabet with
/// `..`, `/` and links out of the tree), with a correct end record.
fn generate(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    let incremental: bool = u.arbitrary().unwrap_or(false);
    let mut s = Vec::new();
    s.extend_from_slice(MAGIC);
    s.extend_from_slice(&1u16.to_be_bytes());
    s.push(u8::from(incremental));
    let put_str = |s: &mut Vec<u8>, v: &str| {
        s.extend_from_slice(&(v.len() as u16).to_be_bytes());
        s.extend_from_slice(v.as_bytes());
    };
    if incremental {
        put_str(&mut s, "s1");
        s.extend_from_slice(&0u64.to_be_bytes());
    }
    put_str(&mut s, "s2");
    s.extend_from_slice(&7u64.to_be_bytes());
    s.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    const PARTS: [&str; 8] = ["a", "dir", "sub", "link", "..", ".", "x y", "outside"];
    let (mut records, mut bytes) = (0u64, 0u64);
    let n = u.int_in_range(0..=12u32).unwrap_or(0);
    if !incremental {
        // The root first, as a real full stream has it.
        s.push(b'D');
        s.extend_from_slice(&0u32.to_be_bytes());
        meta(&mut s, 0o755);
        records += 1;
    }
    for _ in 0..n {
        let depth = u.int_in_range(1..=3usize).unwrap_or(1);
        let path: Vec<&str> = (0..depth)
            .map(|_| PARTS[u.choose_index(PARTS.len()).unwrap_or(0)])
            .collect();
        let path = path.join("/");
        let tag = *u.choose(b"DFLX").unwrap_or(&b'D');
        s.push(tag);
        s.extend_from_slice(&(path.len() as u32).to_be_bytes());
        s.extend_from_slice(path.as_bytes());
        records += 1;
        match tag {
            b'D' => meta(&mut s, 0o755),
            b'F' => {
                meta(
                    &mut s,
                    *u.choose(&[0o644u32, 0o4755, 0, 0o7777]).unwrap_or(&0o644),
                );
                let len = u.int_in_range(0..=64usize).unwrap_or(0);
                s.extend_from_slice(&(len as u64).to_be_bytes());
                s.extend(std::iter::repeat_n(b'f', len));
                bytes += len as u64;
            }
            b'L' => {
                meta(&mut s, 0o777);
                let t = *u
                    .choose(&[
                        "../../../outside/secret",
                        "@@OUTSIDE@@",
                        "@@OUTSIDE@@/etc",
                        "dir",
                        "../..",
                        "a",
                    ])
                    .unwrap_or(&"a");
                s.extend_from_slice(&(t.len() as u32).to_be_bytes());
                s.extend_from_slice(t.as_bytes());
            }
            _ => {}
        }
    }
    s.push(b'E');
    s.extend_from_slice(&records.to_be_bytes());
    s.extend_from_slice(&bytes.to_be_bytes());
    let h = blake3::hash(&s);
    s.write_all(h.as_bytes()).expect("vec");
    s
}

fn meta(s: &mut Vec<u8>, mode: u32) {
    s.extend_from_slice(&mode.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&1_700_000_000i64.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
}
