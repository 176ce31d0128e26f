//! Tests of what only one backend has: the dir backend's crash recovery, its "unchanged file"
//! rule and its defences against hostile streams and against applications that swap a
//! directory for a symlink out of the dataset; the zfs backend's start-up checks.

mod support;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flock_dataset::{Backend, DatasetError, DirBackend, StreamSpec, ZfsBackend};
use support::*;

#[test]
fn dir_open_recovers_from_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("node");
    let d = ds("db");
    {
        let b = DirBackend::open(&root).expect("open");
        b.create(&d, None).expect("create");
        let m = b.mount_path(&d).expect("mount");
        write(&m, "f.txt", b"committed");
        b.snapshot(&d, &snap("s1")).expect("s1");
        write(&m, "f.txt", b"half-rolled-back");
        write(&m, "extra.txt", b"x");
        // A crash in the middle of a rollback or receive leaves the marker; a crash in the
        // middle of any operation leaves work in staging/ and trash/.
        fs::write(root.join("datasets/db/resync"), b"").expect("marker");
        write(&root.join("staging"), "0123/snap/tree/junk", b"junk");
        write(&root.join("trash"), "4567/x", b"junk");
    }
    let b = DirBackend::open(&root).expect("reopen");
    let m = b.mount_path(&d).expect("mount");
    assert_eq!(fs::read(m.join("f.txt")).expect("read"), b"committed");
    assert!(!m.join("extra.txt").exists());
    assert!(!root.join("datasets/db/resync").exists());
    assert_eq!(fs::read_dir(root.join("staging")).expect("ls").count(), 0);
    assert_eq!(fs::read_dir(root.join("trash")).expect("ls").count(), 0);
    assert_eq!(snapshot_names(&b, &d), ["s1"]);
}

#[test]
fn dir_snapshot_catches_a_same_size_rewrite_with_the_same_mtime() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = DirBackend::open(tmp.path()).expect("open");
    let d = ds("racy");
    b.create(&d, None).expect("create");
    let m = b.mount_path(&d).expect("mount");
    write(&m, "f", b"aaaa");
    set_mtime(&m.join("f"), 1_600_000_000);
    b.snapshot(&d, &snap("s1")).expect("s1");
    // Same size, mtime put back: only the ctime tells the file changed.
    write(&m, "f", b"bbbb");
    set_mtime(&m.join("f"), 1_600_000_000);
    b.snapshot(&d, &snap("s2")).expect("s2");
    write(&m, "f", b"cccc");
    b.rollback(&d, &snap("s2")).expect("rollback");
    assert_eq!(fs::read(m.join("f")).expect("read"), b"bbbb");
    b.rollback(&d, &snap("s1")).expect("rollback");
    assert_eq!(fs::read(m.join("f")).expect("read"), b"aaaa");
}

#[test]
fn dir_unchanged_files_are_shared_between_snapshots() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = DirBackend::open(tmp.path()).expect("open");
    let d = ds("shared");
    b.create(&d, None).expect("create");
    let m = b.mount_path(&d).expect("mount");
    write(&m, "big.bin", &noise(4 * MIB as usize, 1));
    set_mtime(&m.join("big.bin"), 1_600_000_000);
    // The file's ctime must be older than the snapshot's start for it to be trusted.
    std::thread::sleep(std::time::Duration::from_millis(20));
    b.snapshot(&d, &snap("s1")).expect("s1");
    let at_s1 = b.info(&d).expect("info").expect("exists");
    // The live file and s1's copy are two inodes: 8 MiB on disk (a reflink would share the
    // data, but st_blocks counts it in full either way), 4 MiB of data.
    assert!(
        (8 * MIB..9 * MIB).contains(&at_s1.used_bytes),
        "live + s1 of a 4 MiB file take 8 MiB, got {}",
        at_s1.used_bytes
    );
    assert_eq!(at_s1.referenced_bytes, 4 * MIB);
    write(&m, "small.txt", b"new");
    b.snapshot(&d, &snap("s2")).expect("s2");
    let at_s2 = b.info(&d).expect("info").expect("exists");
    assert!(
        at_s2.used_bytes < at_s1.used_bytes + MIB / 4,
        "s2 hard-links the unchanged 4 MiB file: used went from {} to {}",
        at_s1.used_bytes,
        at_s2.used_bytes
    );
    assert_eq!(at_s2.referenced_bytes, 4 * MIB + 3);
    let inc = framed(
        &b,
        &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
    );
    assert!(
        inc.len() < 4096,
        "the unchanged 4 MiB file was sent again ({} bytes)",
        inc.len()
    );
}

/// Bytes this thread read and wrote through read/write-like calls (`rchar`, `wchar` of
/// `/proc/thread-self/io`; page cache included, `copy_file_range` included, reflinks not).
fn thread_io() -> (u64, u64) {
    let text = fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("an io counter")
    };
    (field("rchar"), field("wchar"))
}

/// What an operation on the calling thread read and wrote.
fn io_of<T>(f: impl FnOnce() -> T) -> (T, u64, u64) {
    let (r0, w0) = thread_io();
    let out = f();
    let (r1, w1) = thread_io();
    (out, r1 - r0, w1 - w0)
}

#[test]
fn dir_incremental_snapshot_send_and_receive_cost_what_changed() {
    // 64 MiB in 64 files; each round rewrites a different 1 MiB file. A snapshot copies that
    // file, the stream carries it, the receiver writes it into its snapshot and its live/,
    // and nothing else's data is read or written, however many rounds came before (a receive
    // used to copy into live/ again every file any earlier receive had copied).
    let tmp = tempfile::tempdir().expect("tmp");
    let a = DirBackend::open(tmp.path().join("a")).expect("open");
    let b = DirBackend::open(tmp.path().join("b")).expect("open");
    let d = ds("prop");
    a.create(&d, None).expect("create");
    let m = a.mount_path(&d).expect("mount");
    for i in 0..64 {
        write(&m, &format!("d{}/f{i}.bin", i % 4), &noise(MIB as usize, i));
    }
    a.snapshot(&d, &snap("s0")).expect("s0");
    let full = StreamSpec::full(d.clone(), snap("s0"));
    b.receive(&full, None, &mut a.send(&full).expect("send"))
        .expect("receive");
    let slack = 256 * 1024;
    for round in 1..=5u64 {
        let i = (round * 13) % 64;
        let rel = format!("d{}/f{i}.bin", i % 4);
        write(&m, &rel, &noise(MIB as usize, 1000 + round));
        let (base, target) = (snap(&format!("s{}", round - 1)), snap(&format!("s{round}")));
        let (_, read, written) = io_of(|| a.snapshot(&d, &target).expect("snapshot"));
        assert!(
            read < MIB + slack && written < MIB + slack,
            "round {round}: the snapshot read {read} and wrote {written} bytes for 1 MiB changed"
        );
        let spec = StreamSpec::incremental(d.clone(), base, target);
        let (len, read, _) = io_of(|| {
            let mut s = a.send(&spec).expect("send");
            let hint = s
                .size_hint()
                .expect("the dir backend knows its stream's length");
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("read the stream");
            assert_eq!(sink.len() as u64, hint);
            hint
        });
        assert!(
            (MIB..MIB + 64 * 1024).contains(&len) && read < MIB + slack,
            "round {round}: a 1 MiB change made a stream of {len} bytes, reading {read}"
        );
        let (_, read, written) = io_of(|| {
            b.receive(&spec, None, &mut a.send(&spec).expect("send"))
                .expect("receive")
        });
        // Sent (read) once, then written into the new snapshot and copied into live/.
        assert!(
            read < 2 * MIB + slack && written < 2 * MIB + slack,
            "round {round}: send + receive read {read} and wrote {written} bytes for 1 MiB changed"
        );
    }
    let got = b.mount_path(&d).expect("mount");
    for i in 0..64 {
        let rel = format!("d{}/f{i}.bin", i % 4);
        assert_eq!(
            fs::read(got.join(&rel)).expect("read"),
            fs::read(m.join(&rel)).expect("read"),
            "{rel}"
        );
    }
}

/// A hand-made full `dir` stream (format v1, see `dir::stream`) creating snapshot s1.
fn dir_stream(records: &[Vec<u8>], file_bytes: u64) -> Vec<u8> {
    dir_stream_from(None, "s1", records, file_bytes)
}

/// A hand-made `dir` stream from `base` (name, guid) to snapshot `target`.
fn dir_stream_from(
    base: Option<(&str, u64)>,
    target: &str,
    records: &[Vec<u8>],
    file_bytes: u64,
) -> Vec<u8> {
    dir_stream_v(1, base, target, records, file_bytes)
}

/// As [`dir_stream_from`], with the header's `version`.
fn dir_stream_v(
    version: u16,
    base: Option<(&str, u64)>,
    target: &str,
    records: &[Vec<u8>],
    file_bytes: u64,
) -> Vec<u8> {
    let mut out = b"FLKDIR\0\0".to_vec();
    out.extend_from_slice(&version.to_be_bytes());
    out.push(u8::from(base.is_some()));
    if let Some((name, guid)) = base {
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&guid.to_be_bytes());
    }
    out.extend_from_slice(&(target.len() as u16).to_be_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(&42u64.to_be_bytes());
    out.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    for r in records {
        out.extend_from_slice(r);
    }
    out.push(b'E');
    out.extend_from_slice(&(records.len() as u64).to_be_bytes());
    out.extend_from_slice(&file_bytes.to_be_bytes());
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

fn record(tag: u8, path: &str, mode: u32, tail: &[u8]) -> Vec<u8> {
    let mut r = vec![tag];
    r.extend_from_slice(&(path.len() as u32).to_be_bytes());
    r.extend_from_slice(path.as_bytes());
    r.extend_from_slice(&mode.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(&1_700_000_000i64.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(tail);
    r
}

fn file_record(path: &str, data: &[u8]) -> Vec<u8> {
    let mut tail = (data.len() as u64).to_be_bytes().to_vec();
    tail.extend_from_slice(data);
    record(b'F', path, 0o644, &tail)
}

#[test]
fn dir_receive_refuses_streams_that_write_outside_the_dataset() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let b = DirBackend::open(tmp.path().join("node")).expect("open");
    let d = ds("victim");
    let spec = StreamSpec::full(d.clone(), snap("s1"));
    let root = record(b'D', "", 0o755, &[]);

    let good = dir_stream(&[root.clone(), file_record("ok.txt", b"fine")], 4);
    b.receive(&spec, None, &mut &good[..])
        .expect("a well-formed hand-made stream");
    b.destroy(&d).expect("destroy");

    let target = outside.to_str().expect("utf-8 path").as_bytes();
    let mut link_tail = (target.len() as u32).to_be_bytes().to_vec();
    link_tail.extend_from_slice(target);
    let hostile = [
        // A symlink planted first, then a file written "through" it.
        dir_stream(
            &[
                root.clone(),
                record(b'L', "a", 0, &link_tail),
                file_record("a/evil", b"evil"),
            ],
            4,
        ),
        dir_stream(&[root.clone(), file_record("../evil", b"evil")], 4),
        dir_stream(&[root.clone(), file_record("/tmp/evil", b"evil")], 4),
        dir_stream(&[root.clone(), file_record("x/./evil", b"evil")], 4),
        dir_stream(&[root.clone(), file_record("", b"evil")], 4),
    ];
    for (i, stream) in hostile.iter().enumerate() {
        match b.receive(&spec, None, &mut &stream[..]) {
            Err(DatasetError::Stream { .. }) => {}
            other => panic!("hostile stream {i} was not rejected: {other:?}"),
        }
        assert!(
            b.info(&d).expect("info").is_none(),
            "stream {i} left a dataset"
        );
    }
    assert_eq!(
        fs::read_dir(&outside).expect("ls").count(),
        0,
        "something escaped"
    );
}

fn symlink_record(path: &str, target: &Path) -> Vec<u8> {
    let target = target.to_str().expect("utf-8 path").as_bytes();
    let mut tail = (target.len() as u32).to_be_bytes().to_vec();
    tail.extend_from_slice(target);
    record(b'L', path, 0, &tail)
}

fn stream_error_text(res: Result<flock_dataset::SnapshotInfo, DatasetError>) -> String {
    match res {
        Err(e @ DatasetError::Stream { .. }) => e.to_string(),
        other => panic!("a hostile stream was not rejected as a bad stream: {other:?}"),
    }
}

#[test]
fn dir_receive_refuses_escaping_streams_with_a_clear_error_and_keeps_the_last_snapshot() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let b = DirBackend::open(tmp.path().join("node")).expect("open");
    let d = ds("victim");
    let root = record(b'D', "", 0o755, &[]);

    let escape = dir_stream(&[root.clone(), file_record("../escape", b"evil")], 4);
    let msg = stream_error_text(b.receive(
        &StreamSpec::full(d.clone(), snap("s1")),
        None,
        &mut &escape[..],
    ));
    assert!(
        msg.contains("../escape") && msg.contains("unsafe path"),
        "{msg}"
    );
    let long = format!("{}/../escape", "x".repeat(3000));
    let escape = dir_stream(&[root.clone(), file_record(&long, b"evil")], 4);
    let msg = stream_error_text(b.receive(
        &StreamSpec::full(d.clone(), snap("s1")),
        None,
        &mut &escape[..],
    ));
    assert!(
        msg.len() < 600 && msg.contains("(3010 bytes)"),
        "the error must show a bounded prefix and the length: {} bytes: {msg:.300}",
        msg.len()
    );

    // A good first snapshot, with a symlink of the app's own pointing outside.
    let good = dir_stream(
        &[
            root.clone(),
            file_record("ok.txt", b"fine"),
            symlink_record("app-link", &outside),
        ],
        4,
    );
    let s1 = b
        .receive(
            &StreamSpec::full(d.clone(), snap("s1")),
            None,
            &mut &good[..],
        )
        .expect("a well-formed stream");
    let live = b.mount_path(&d).expect("mount");
    assert_eq!(
        fs::read_link(live.join("app-link")).expect("a symlink stays a symlink"),
        outside
    );

    let inc = StreamSpec::incremental(d.clone(), snap("s1"), snap("s2"));
    let base = Some(("s1", s1.guid));
    let hostile = [
        // A symlink the stream plants, then a file under it.
        dir_stream_from(
            base,
            "s2",
            &[
                symlink_record("a", &outside),
                file_record("a/evil", b"evil"),
            ],
            4,
        ),
        // A directory under it.
        dir_stream_from(
            base,
            "s2",
            &[
                symlink_record("a", &outside),
                record(b'D', "a/sub", 0o755, &[]),
            ],
            0,
        ),
        // A file under the base's own symlink.
        dir_stream_from(base, "s2", &[file_record("app-link/evil", b"evil")], 4),
        // A symlink replacing a directory the stream made, then a file under it.
        dir_stream_from(
            base,
            "s2",
            &[
                record(b'D', "d", 0o755, &[]),
                file_record("d/fine", b"fine"),
                symlink_record("d", &outside),
                file_record("d/evil", b"evil"),
            ],
            8,
        ),
        // A delete through the symlink.
        dir_stream_from(base, "s2", &[record_x("app-link/x")], 0),
        dir_stream_from(base, "s2", &[file_record("../escape", b"evil")], 4),
    ];
    fs::write(outside.join("x"), b"keep me").expect("write");
    for (i, stream) in hostile.iter().enumerate() {
        let msg = stream_error_text(b.receive(&inc, None, &mut &stream[..]));
        assert!(
            msg.contains("never through a link") || msg.contains("unsafe path"),
            "stream {i}: {msg}"
        );
        assert_eq!(snapshot_names(&b, &d), ["s1"], "stream {i}");
        assert_eq!(fs::read(live.join("ok.txt")).expect("read"), b"fine");
    }
    let left: Vec<_> = fs::read_dir(&outside)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["x"], "something was written or removed outside");
    assert_eq!(fs::read(outside.join("x")).expect("read"), b"keep me");
    assert!(!tmp.path().join("escape").exists());
}

fn record_x(path: &str) -> Vec<u8> {
    let mut r = vec![b'X'];
    r.extend_from_slice(&(path.len() as u32).to_be_bytes());
    r.extend_from_slice(path.as_bytes());
    r
}

/// The symlink-swap race: while the dir backend snapshots, sends and sizes a dataset, an
/// "application" keeps swapping a directory of its live tree for a symlink to a directory
/// outside (a stand-in for /etc, and for flockd's own tls/). No byte of what is outside may
/// reach a snapshot, a stream or the used-bytes count.
#[test]
fn dir_snapshots_sends_and_sizes_never_follow_a_swapped_symlink() {
    let tmp = tempfile::tempdir().expect("tmp");
    let marker: Vec<u8> = format!("OUTSIDE-MARKER-{:016x}", std::process::id() as u64 * 0x9e37)
        .into_bytes()
        .repeat(4096);
    // Same names outside as inside, so a walk that crosses the link finds what it expects.
    let etc = tmp.path().join("etc");
    let tls = tmp.path().join("tls");
    write(&etc, "passwd", &marker);
    write(&etc, "deeper/node.key", &marker);
    write(&tls, "passwd", &marker);
    write(&tls, "node.key", &marker);
    let b = DirBackend::open(tmp.path().join("node")).expect("open");
    let d = ds("app");
    b.create(&d, None).expect("create");
    let live = b.mount_path(&d).expect("mount");
    write(&live, "top.txt", b"top");
    write(&live, "sub/passwd", b"inside");
    write(&live, "sub/deeper/node.key", b"inside");

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, live, etc, tls) = (stop.clone(), live.clone(), etc.clone(), tls.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Errors are fine: the backend may be looking at the same names.
                let (dir, parked, to) = if swaps.is_multiple_of(2) {
                    (live.join("sub"), live.join("sub.parked"), &etc)
                } else {
                    (
                        live.join("sub/deeper"),
                        live.join("sub/deeper.parked"),
                        &tls,
                    )
                };
                if fs::rename(&dir, &parked).is_ok() {
                    let _ = std::os::unix::fs::symlink(to, &dir);
                    std::thread::yield_now();
                    let _ = fs::remove_file(&dir);
                    let _ = fs::rename(&parked, &dir);
                }
                swaps += 1;
            }
            swaps
        })
    };
    let contains_marker = |bytes: &[u8]| bytes.windows(32).any(|w| w == &marker[..32]);
    let started = Instant::now();
    let mut done = 0;
    let mut failure = None;
    for i in 0..400 {
        if started.elapsed() > Duration::from_secs(15) {
            break;
        }
        let name = snap(&format!("s{i}"));
        b.snapshot(&d, &name).expect("snapshot");
        let mut full = Vec::new();
        b.send(&StreamSpec::full(d.clone(), name.clone()))
            .expect("send")
            .read_to_end(&mut full)
            .expect("read full stream");
        let mut inc = Vec::new();
        if i > 0 {
            b.send(&StreamSpec::incremental(
                d.clone(),
                snap(&format!("s{}", i - 1)),
                name.clone(),
            ))
            .expect("send incremental")
            .read_to_end(&mut inc)
            .expect("read incremental stream");
        }
        let used = b.info(&d).expect("info").expect("exists").used_bytes;
        if contains_marker(&full) || contains_marker(&inc) {
            failure = Some(format!("iteration {i}: a stream holds the outside marker"));
            break;
        }
        if used >= marker.len() as u64 {
            failure = Some(format!(
                "iteration {i}: used bytes {used} count a file outside the dataset"
            ));
            break;
        }
        if i >= 2 {
            b.destroy_snapshot(&d, &snap(&format!("s{}", i - 2)))
                .expect("destroy an old snapshot");
        }
        done += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    if let Some(f) = failure {
        panic!("{f} (after {swaps} swaps)");
    }
    // The snapshots on disk, read without following anything.
    for entry in walkdir(&tmp.path().join("node/datasets/app/snapshots")) {
        if entry.1 {
            let bytes = fs::read(&entry.0).expect("read snapshot file");
            assert!(
                !contains_marker(&bytes),
                "{} holds the marker",
                entry.0.display()
            );
        }
    }
    assert!(done >= 100 && swaps >= 100, "{done} rounds, {swaps} swaps");
    eprintln!(
        "{done} snapshot rounds against {swaps} swaps in {:?}",
        started.elapsed()
    );
}

/// Every path under `root` with whether it is a regular file (symlinks not followed).
fn walkdir(root: &Path) -> Vec<(std::path::PathBuf, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).expect("lstat");
        if md.is_dir() {
            for e in fs::read_dir(&p).expect("ls") {
                stack.push(e.expect("entry").path());
            }
        }
        out.push((p, md.is_file()));
    }
    out
}

/// A rollback or receive writes into the live tree while the application swaps one of its
/// directories for a symlink to a directory outside: nothing outside is written or removed.
#[test]
fn dir_rollback_never_writes_through_a_swapped_symlink() {
    let tmp = tempfile::tempdir().expect("tmp");
    let etc = tmp.path().join("etc");
    write(&etc, "passwd", b"root:x:0:0");
    let b = DirBackend::open(tmp.path().join("node")).expect("open");
    let d = ds("app");
    b.create(&d, None).expect("create");
    let live = b.mount_path(&d).expect("mount");
    write(&live, "sub/passwd", b"the app's own");
    write(&live, "sub/new-file", b"rolled back into place");
    b.snapshot(&d, &snap("s1")).expect("s1");
    let stop = Arc::new(AtomicBool::new(false));
    // Held by the test while it changes the live tree itself (its own writes follow links).
    let quiet = Arc::new(std::sync::Mutex::new(()));
    let swapper = {
        let (stop, live, etc, quiet) = (stop.clone(), live.clone(), etc.clone(), quiet.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _swapping = quiet.lock().expect("lock");
                let (dir, parked) = (live.join("sub"), live.join("sub.parked"));
                if fs::rename(&dir, &parked).is_ok() {
                    let _ = std::os::unix::fs::symlink(&etc, &dir);
                    std::thread::yield_now();
                    let _ = fs::remove_file(&dir);
                    let _ = fs::rename(&parked, &dir);
                    let _ = fs::remove_dir_all(&parked);
                }
            }
        })
    };
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(4) {
        {
            let _still = quiet.lock().expect("lock");
            let _ = fs::remove_file(live.join("sub/new-file"));
            let _ = fs::write(live.join("sub/passwd"), b"changed");
        }
        // A rollback that meets a symlink where a directory was fails (and is redone at the
        // next open); what matters is where it wrote.
        let _ = b.rollback(&d, &snap("s1"));
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("swapper");
    let names: Vec<_> = fs::read_dir(&etc)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        ["passwd"],
        "a file was written outside ({rounds} rollbacks)"
    );
    assert_eq!(fs::read(etc.join("passwd")).expect("read"), b"root:x:0:0");
    b.rollback(&d, &snap("s1")).expect("a quiet rollback works");
    assert_eq!(
        fs::read(live.join("sub/passwd")).expect("read"),
        b"the app's own"
    );
    eprintln!("{rounds} rollbacks");
}

#[test]
fn zfs_open_names_a_missing_pool_and_a_bad_root() {
    let _zfs = ZfsFixture::new(); // fails with what to install when zfs is missing
    match ZfsBackend::open("flktnosuchpool") {
        Err(e @ DatasetError::PoolNotFound { .. }) => {
            assert!(e.to_string().contains("flktnosuchpool"), "{e}")
        }
        other => panic!("expected PoolNotFound, got {other:?}"),
    }
    for bad in ["", "/tank", "tank/", "tank//x", "tank/a b"] {
        assert!(
            matches!(ZfsBackend::open(bad), Err(DatasetError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn zfs_open_removes_a_dataset_left_half_received() {
    let mut f = ZfsFixture::new();
    let a = f.node();
    let d = ds("keep");
    a.create(&d, None).expect("create");
    drop(a);
    // What a crash in the middle of a full receive leaves: a container marked receiving.
    let root = f.last_root();
    let out = std::process::Command::new("zfs")
        .args(["create", "-o", "flock:state=receiving"])
        .arg(format!("{root}/half"))
        .output()
        .expect("zfs create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = ZfsBackend::open(&root).expect("reopen");
    assert_eq!(dataset_names(&b), ["keep"]);
    let out = std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name", "-r", &root])
        .output()
        .expect("zfs list");
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(!names.contains("half"), "{names}");
}

/// Runs `zfs ARGS...` and returns its stdout, failing the test with zfs's message.
fn zfs(args: &[&str]) -> String {
    let out = std::process::Command::new("zfs")
        .args(args)
        .output()
        .expect("run zfs");
    assert!(
        out.status.success(),
        "zfs {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Appends 256 KiB blocks to `path` until the file system refuses one; returns the bytes
/// written and the error that stopped it.
fn write_until_refused(path: &Path, limit: u64) -> (u64, std::io::Error) {
    use std::io::Write;
    let mut file = fs::File::create(path).expect("create");
    let block = noise(256 << 10, 77);
    let mut written = 0u64;
    let err = loop {
        if let Err(e) = file.write_all(&block).and_then(|()| file.sync_all()) {
            break e;
        }
        written += block.len() as u64;
        assert!(
            written <= 4 * limit,
            "wrote {written} bytes into a dataset limited to {limit}: the limit does not hold"
        );
    };
    (written, err)
}

#[test]
fn zfs_refquota_stops_writes_past_the_limit_and_snapshots_do_not_count() {
    let mut f = ZfsFixture::new();
    let a = f.node();
    let d = ds("capped");
    let limit = 4 * MIB;
    a.create(&d, Some(limit)).expect("create");
    let m = a.mount_path(&d).expect("mount");
    let (written, err) = write_until_refused(&m.join("fill.bin"), limit);
    assert!(
        matches!(err.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)),
        "stopped by the limit, not by {err}"
    );
    assert!(
        (limit / 2..=limit + MIB).contains(&written),
        "{written} bytes written under a {limit} byte limit"
    );
    let info = a.info(&d).expect("info").expect("exists");
    assert!(info.referenced_bytes <= limit + MIB, "{info:?}");

    // The snapshot keeps the full file; deleting it frees the live data, and the limit lets
    // as much be written again, as it counts the live data only.
    a.snapshot(&d, &snap("full")).expect("snapshot");
    fs::remove_file(m.join("fill.bin")).expect("rm");
    let (again, _) = write_until_refused(&m.join("refill.bin"), limit);
    assert!(
        again >= written / 2,
        "after deleting the data a snapshot still holds, only {again} bytes could be written \
         (first time {written}): the snapshot counts against the limit"
    );
    let info = a.info(&d).expect("info").expect("exists");
    assert!(
        info.used_bytes > limit + limit / 4,
        "live + snapshot take more than the limit on disk: {info:?}"
    );
}

#[test]
fn zfs_reads_and_moves_the_old_quota_layout() {
    let mut f = ZfsFixture::new();
    let a = f.node();
    let root = f.last_root();
    // A dataset as older flock made it: the limit is the container's quota.
    let container = format!("{root}/legacy");
    zfs(&[
        "create",
        "-o",
        "canmount=off",
        "-o",
        "quota=20971520",
        "-o",
        "flock:state=ready",
        &container,
    ]);
    zfs(&["create", &format!("{container}/data")]);
    let d = ds("legacy");
    let info = a.info(&d).expect("info").expect("the old layout is read");
    assert_eq!(info.limit, Some(20 * MIB));
    write(
        &a.mount_path(&d).expect("mount"),
        "old.bin",
        &noise(MIB as usize, 5),
    );
    a.snapshot(&d, &snap("s1")).expect("snapshot");
    drop(a);

    // Opening moves the limit to the data's refquota and clears the container's quota.
    let b = ZfsBackend::open(&root).expect("reopen");
    let get = |prop: &str, name: &str| zfs(&["get", "-H", "-p", "-o", "value", prop, name]);
    assert_eq!(get("quota", &container), "0");
    assert_eq!(get("refquota", &format!("{container}/data")), "20971520");
    assert_eq!(get("flock:layout", &container), "refquota");
    let info = b.info(&d).expect("info").expect("exists");
    assert_eq!(info.limit, Some(20 * MIB));
    assert!((MIB..2 * MIB).contains(&info.referenced_bytes), "{info:?}");
    b.set_limit(&d, Some(2 * MIB)).expect("set limit");
    assert_eq!(get("refquota", &format!("{container}/data")), "2097152");
    assert_eq!(get("quota", &container), "0");
    assert_eq!(snapshot_names(&b, &d), ["s1"]);
}

#[test]
fn zfs_open_clears_what_a_crashed_restore_or_receive_left() {
    let mut f = ZfsFixture::new();
    let a = f.node();
    let d = ds("crashed");
    a.create(&d, Some(8 * MIB)).expect("create");
    a.snapshot(&d, &snap("s1")).expect("s1");
    drop(a);
    let root = f.last_root();
    let container = format!("{root}/crashed");
    // A restore clone and a temporary receive quota, as a crash mid-way leaves them.
    zfs(&[
        "clone",
        &format!("{container}/data@s1"),
        &format!("{container}/restore"),
    ]);
    zfs(&["set", "quota=99999999", &container]);
    let b = ZfsBackend::open(&root).expect("reopen");
    let names = zfs(&["list", "-H", "-o", "name", "-r", &root]);
    assert!(!names.contains("restore"), "{names}");
    assert_eq!(
        zfs(&["get", "-H", "-p", "-o", "value", "quota", &container]),
        "0"
    );
    assert_eq!(
        b.info(&d).expect("info").expect("exists").limit,
        Some(8 * MIB)
    );
    b.destroy_snapshot(&d, &snap("s1"))
        .expect("no clone pins s1 any more");
}

/// A loop-mounted btrfs file system, unmounted on drop.
struct Btrfs {
    mnt: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl Btrfs {
    fn mount() -> Btrfs {
        let tmp = tempfile::tempdir().expect("tmp");
        let img = tmp.path().join("btrfs.img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(256 * MIB))
            .expect("image file");
        let out = std::process::Command::new("mkfs.btrfs")
            .arg("-q")
            .arg(&img)
            .output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "the dir backend's reflink test needs mkfs.btrfs: apt-get install -y btrfs-progs ({:?})",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir");
        let out = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the dir backend's reflink test loop-mounts a btrfs image and needs root and loop \
             devices: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Btrfs { mnt, _tmp: tmp }
    }

    /// Bytes free on the file system, after flushing it.
    fn free(&self) -> u64 {
        let f = fs::File::open(&self.mnt).expect("open mount");
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; statvfs is plain integers.
        unsafe { libc::syncfs(f.as_raw_fd()) };
        let out = std::process::Command::new("btrfs")
            .args(["filesystem", "sync"])
            .arg(&self.mnt)
            .output()
            .expect("btrfs filesystem sync");
        assert!(out.status.success());
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a NUL-terminated path and a valid out pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn dir_snapshots_and_restores_reflink_on_btrfs_and_copy_elsewhere() {
    use flock_dataset::SpaceSharing;
    // ext4 (the temp dir here) and tmpfs make no reflinks: the copy fallback.
    let tmp = tempfile::tempdir().expect("tmp");
    let plain = DirBackend::open(tmp.path().join("root")).expect("open");
    let on_plain = plain.space_sharing().expect("probe");

    let fs_ = Btrfs::mount();
    let b = DirBackend::open(fs_.mnt.join("root")).expect("open on btrfs");
    assert_eq!(b.space_sharing().expect("probe"), SpaceSharing::Reflink);
    let d = ds("cloned");
    b.create(&d, None).expect("create");
    let m = b.mount_path(&d).expect("mount");
    write(&m, "big.bin", &noise(32 * MIB as usize, 3));
    let before = fs_.free();
    b.snapshot(&d, &snap("s1")).expect("s1");
    let after = fs_.free();
    assert!(
        before.saturating_sub(after) < 8 * MIB,
        "a snapshot of 32 MiB on btrfs took {} bytes: not a reflink",
        before.saturating_sub(after)
    );
    write(&m, "big.bin", b"rewritten");
    let before = fs_.free();
    b.restore(&d, &snap("s1")).expect("restore");
    let after = fs_.free();
    assert_eq!(
        fs::read(m.join("big.bin")).expect("read"),
        noise(32 * MIB as usize, 3)
    );
    assert!(
        before.saturating_sub(after) < 8 * MIB,
        "restoring 32 MiB on btrfs took {} bytes: not a reflink",
        before.saturating_sub(after)
    );

    // The fallback copies, and says so. Both snapshots read back the same.
    let d2 = ds("copied");
    plain.create(&d2, None).expect("create");
    let m2 = plain.mount_path(&d2).expect("mount");
    write(&m2, "f.bin", &noise(MIB as usize, 4));
    plain.snapshot(&d2, &snap("s1")).expect("s1");
    write(&m2, "f.bin", b"changed");
    plain.restore(&d2, &snap("s1")).expect("restore");
    assert_eq!(
        fs::read(m2.join("f.bin")).expect("read"),
        noise(MIB as usize, 4)
    );
    let reflinks_here = std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(m2.join("f.bin"))
        .arg(tmp.path().join("probe"))
        .status()
        .expect("run cp")
        .success();
    assert_eq!(
        on_plain,
        if reflinks_here {
            SpaceSharing::Reflink
        } else {
            SpaceSharing::Copy
        },
        "space_sharing agrees with cp --reflink=always on {}",
        tmp.path().display()
    );
}

/// The raw `dir` stream of `spec` (version at bytes 8-9), received by `to` when given.
fn raw_dir_stream(from: &DirBackend, spec: &StreamSpec) -> (u16, Vec<u8>) {
    let mut bytes = Vec::new();
    from.send(spec)
        .expect("send")
        .read_to_end(&mut bytes)
        .expect("read the stream");
    (u16::from_be_bytes([bytes[8], bytes[9]]), bytes)
}

/// Issue 20: on a file system with reflinks, a 1 MiB rewrite in the middle of a 32 MiB file
/// costs about 1 MiB of incremental stream when the receiver reads changed ranges (version 2),
/// and the replica ends up byte for byte the same, whether it makes reflinks (btrfs) or copies
/// (ext4). Without deltas, or where the snapshots share nothing (ext4), the file goes whole
/// (version 1, what older receivers read).
#[test]
fn dir_incremental_streams_carry_only_the_changed_ranges_on_btrfs() {
    use std::os::unix::fs::FileExt;
    let fs_ = Btrfs::mount();
    let a = DirBackend::open(fs_.mnt.join("a")).expect("open on btrfs");
    let b = DirBackend::open(fs_.mnt.join("b")).expect("open on btrfs");
    let tmp = tempfile::tempdir().expect("tmp");
    let plain = DirBackend::open(tmp.path().join("root")).expect("open on the temp dir");
    let d = ds("db");
    a.create(&d, None).expect("create");
    let live = a.mount_path(&d).expect("mount");
    write(&live, "data/table.db", &noise(32 * MIB as usize, 7));
    write(&live, "data/shrinks.db", &noise(4 * MIB as usize, 8));
    write(&live, "small.conf", b"port = 1");
    a.snapshot(&d, &snap("s1")).expect("s1");
    let full = StreamSpec::full(d.clone(), snap("s1"));
    for to in [&b, &plain] {
        let (_, bytes) = raw_dir_stream(&a, &full);
        to.receive(&full, None, &mut &bytes[..])
            .expect("full receive");
    }

    // Rewrite 1 MiB in the middle (as a database does), cut one file, change a small one.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(live.join("data/table.db"))
        .expect("open");
    f.write_all_at(&noise(MIB as usize, 9), 12 * MIB + 4096)
        .expect("write");
    f.sync_all().expect("fsync");
    fs::OpenOptions::new()
        .write(true)
        .open(live.join("data/shrinks.db"))
        .and_then(|f| f.set_len(3 * MIB))
        .expect("truncate");
    write(&live, "small.conf", b"port = 2");
    a.snapshot(&d, &snap("s2")).expect("s2");

    let inc = StreamSpec::incremental(d.clone(), snap("s1"), snap("s2"));
    let (v1, whole) = raw_dir_stream(&a, &inc);
    assert_eq!(v1, 1, "without deltas: version 1");
    assert!(whole.len() as u64 > 35 * MIB, "{} bytes", whole.len());
    let (v2, delta) = raw_dir_stream(&a, &inc.clone().with_deltas(true));
    assert_eq!(
        v2, 2,
        "with deltas, a stream with changed ranges is version 2"
    );
    assert!(
        (delta.len() as u64) < MIB + MIB / 4,
        "a 1 MiB rewrite made a {} byte stream",
        delta.len()
    );
    let want = manifest(&live);
    for to in [&b, &plain] {
        to.receive(&inc, None, &mut &delta[..])
            .expect("incremental receive of changed ranges");
        assert_same(&want, &manifest(&to.mount_path(&d).expect("mount")));
    }
    // The next incremental from there on goes on as usual.
    write(&live, "small.conf", b"port = 3");
    a.snapshot(&d, &snap("s3")).expect("s3");
    let next = StreamSpec::incremental(d.clone(), snap("s2"), snap("s3")).with_deltas(true);
    let (_, bytes) = raw_dir_stream(&a, &next);
    b.receive(&next, None, &mut &bytes[..]).expect("receive s3");
    assert_same(
        &manifest(&live),
        &manifest(&b.mount_path(&d).expect("mount")),
    );

    // A version 1 stream may not carry changed ranges: an older sender never makes one, and
    // a receiver takes `P` only where the header says version 2.
    let (_, mut forged) = raw_dir_stream(&a, &inc.clone().with_deltas(true));
    forged[9] = 1;
    let c = DirBackend::open(fs_.mnt.join("c")).expect("open");
    let (_, base) = raw_dir_stream(&a, &full);
    c.receive(&full, None, &mut &base[..]).expect("full");
    let e = c
        .receive(&inc, None, &mut &forged[..])
        .expect_err("changed ranges in a version 1 stream");
    assert!(e.to_string().contains("unknown record tag 0x50"), "{e}");

    // Where the snapshots share nothing (the temp dir: ext4 or tmpfs), deltas change nothing.
    let pl = plain.mount_path(&d).expect("mount");
    let g = fs::OpenOptions::new()
        .write(true)
        .open(pl.join("data/table.db"))
        .expect("open");
    g.write_all_at(&noise(MIB as usize, 10), 4 * MIB)
        .expect("write");
    g.sync_all().expect("fsync");
    plain.snapshot(&d, &snap("s9")).expect("s9");
    let on_plain = StreamSpec::incremental(d.clone(), snap("s2"), snap("s9")).with_deltas(true);
    let (v, bytes) = raw_dir_stream(&plain, &on_plain);
    let shares = plain.space_sharing().expect("probe") == flock_dataset::SpaceSharing::Reflink;
    if !shares {
        assert_eq!(v, 1, "copies that share nothing go whole");
        assert!(bytes.len() as u64 > 32 * MIB, "{} bytes", bytes.len());
    }
}

/// A changed-ranges record (`P`, stream version 2) of `path` at `size`, with `ranges` and their
/// bytes.
fn patch_record(path: &str, size: u64, ranges: &[(u64, &[u8])]) -> Vec<u8> {
    let mut tail = size.to_be_bytes().to_vec();
    tail.extend_from_slice(&(ranges.len() as u32).to_be_bytes());
    for (offset, data) in ranges {
        tail.extend_from_slice(&offset.to_be_bytes());
        tail.extend_from_slice(&(data.len() as u64).to_be_bytes());
    }
    for (_, data) in ranges {
        tail.extend_from_slice(data);
    }
    record(b'P', path, 0o644, &tail)
}

/// Changed-ranges records are checked like every other input: ranges in order, inside the
/// file, a file the base holds, and no growth without the bytes (a tiny record may not make a
/// huge sparse file). A good one writes a new file, never through the base snapshot's copy.
#[test]
fn dir_receive_checks_changed_ranges_and_keeps_the_base_intact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = DirBackend::open(tmp.path().join("node")).expect("open");
    let d = ds("ranges");
    let full = StreamSpec::full(d.clone(), snap("s1"));
    let s1 = dir_stream(
        &[
            record(b'D', "", 0o755, &[]),
            record(b'D', "sub", 0o755, &[]),
            file_record("f", b"0123456789"),
        ],
        10,
    );
    b.receive(&full, None, &mut &s1[..]).expect("full");
    let inc = StreamSpec::incremental(d.clone(), snap("s1"), snap("s2"));
    let refused = |records: Vec<Vec<u8>>, bytes: u64, why: &str| {
        let stream = dir_stream_v(2, Some(("s1", 42)), "s2", &records, bytes);
        let e = b
            .receive(&inc, None, &mut &stream[..])
            .expect_err("a bad changed-ranges record");
        assert!(e.to_string().contains(why), "{why}: {e}");
        assert_eq!(snapshot_names(&b, &d), vec!["s1"]);
    };
    refused(
        vec![patch_record("f", 1 << 40, &[])],
        0,
        "grows past its base without the bytes",
    );
    refused(
        vec![patch_record("f", 20, &[(0, b"ab"), (12, b"cd")])],
        4,
        "grows past its base without the bytes",
    );
    refused(
        vec![patch_record("f", 10, &[(4, b"ab"), (0, b"cd")])],
        4,
        "out of order",
    );
    refused(
        vec![patch_record("f", 10, &[(9, b"ab")])],
        2,
        "past its size",
    );
    refused(
        vec![patch_record("sub", 10, &[(0, b"ab")])],
        2,
        "does not hold as a regular file",
    );
    refused(
        vec![patch_record("nothere", 10, &[(0, b"ab")])],
        2,
        "which the base does not hold",
    );
    // In a version 1 stream, no `P` at all.
    let v1 = dir_stream_from(
        Some(("s1", 42)),
        "s2",
        &[patch_record("f", 10, &[(0, b"ab")])],
        2,
    );
    let e = b.receive(&inc, None, &mut &v1[..]).expect_err("P in v1");
    assert!(e.to_string().contains("unknown record tag 0x50"), "{e}");

    // A good one: two bytes rewritten, two appended.
    let good = dir_stream_v(
        2,
        Some(("s1", 42)),
        "s2",
        &[patch_record("f", 12, &[(2, b"ab"), (10, b"XY")])],
        4,
    );
    b.receive(&inc, None, &mut &good[..])
        .expect("changed ranges");
    let live = b.mount_path(&d).expect("mount");
    assert_eq!(fs::read(live.join("f")).expect("read"), b"01ab456789XY");
    // s1 still holds what it held: restore it and look.
    b.restore(&d, &snap("s1")).expect("restore s1");
    assert_eq!(fs::read(live.join("f")).expect("read"), b"0123456789");
}
