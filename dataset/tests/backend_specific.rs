//! Tests of what only one backend has: the dir backend's crash recovery, its "unchanged file"
//! rule and its defences against hostile streams; the zfs backend's start-up checks.

mod support;

use std::fs;

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
    write(&m, "small.txt", b"new");
    b.snapshot(&d, &snap("s2")).expect("s2");
    let used = b.info(&d).expect("info").expect("exists").used_bytes;
    assert!(
        used < 5 * MIB,
        "4 MiB in two snapshots and live should be counted once, got {used}"
    );
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

/// A hand-made `dir` stream (format v1, see `dir::stream`).
fn dir_stream(records: &[Vec<u8>], file_bytes: u64) -> Vec<u8> {
    let mut out = b"FLKDIR\0\0".to_vec();
    out.extend_from_slice(&1u16.to_be_bytes());
    out.push(0);
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(b"s1");
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
