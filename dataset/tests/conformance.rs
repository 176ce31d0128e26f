//! The backend conformance suite: the same tests against `dir` and `zfs`.
//!
//! Each test is a function over a [`Fixture`]; `conformance!` instantiates all of them for one
//! backend. The zfs instances run on real file-backed pools under zfs-fuse and fail (never skip)
//! when zfs is missing, saying what to install.

mod support;

use std::io::{self, BufReader, Read};
use std::sync::Arc;

use flock_dataset::transfer::{receive_framed, receive_framed_async, send_framed_async};
use flock_dataset::{Backend, DatasetError, SpaceSharing, StreamSpec};
use support::*;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// datasets

fn create_list_destroy(f: &mut dyn Fixture) {
    let a = f.node();
    let (alpha, beta) = (ds("alpha"), ds("beta"));
    let info = a.create(&alpha, None).expect("create alpha");
    assert_eq!(info.limit, None);
    assert!(info.mount_path.is_dir(), "{}", info.mount_path.display());
    let info = a.create(&beta, Some(10 * MIB)).expect("create beta");
    assert_eq!(info.limit, Some(10 * MIB));
    assert_eq!(dataset_names(&*a), ["alpha", "beta"]);

    let mount = a.mount_path(&alpha).expect("mount path");
    write(&mount, "data.bin", &noise(MIB as usize, 7));
    a.snapshot(&alpha, &snap("s1")).expect("snapshot");
    let used = a.info(&alpha).expect("info").expect("exists").used_bytes;
    assert!(
        (MIB..3 * MIB).contains(&used),
        "1 MiB written and snapshotted once should count about once, got {used}"
    );
    let listed = a.list().expect("list");
    assert_eq!(listed[1].limit, Some(10 * MIB));

    match a.create(&alpha, None) {
        Err(DatasetError::AlreadyExists { dataset }) => assert_eq!(dataset, "alpha"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    a.destroy(&alpha).expect("destroy");
    assert_eq!(dataset_names(&*a), ["beta"]);
    assert!(a.info(&alpha).expect("info").is_none());
    for err in [
        a.destroy(&alpha).err(),
        a.snapshot(&alpha, &snap("s2")).err(),
        a.mount_path(&alpha).err(),
        a.snapshots(&alpha).err(),
    ] {
        assert!(
            matches!(err, Some(DatasetError::NotFound { ref dataset }) if dataset == "alpha"),
            "expected NotFound for alpha, got {err:?}"
        );
    }
}

fn name_reuse_after_destroy(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("reused");
    a.create(&d, Some(20 * MIB)).expect("create");
    write(&a.mount_path(&d).expect("mount"), "old.txt", b"old");
    a.snapshot(&d, &snap("s1")).expect("snapshot");
    a.destroy(&d).expect("destroy");

    let info = a.create(&d, None).expect("create again");
    assert_eq!(info.limit, None, "a reused name starts fresh");
    let mount = a.mount_path(&d).expect("mount");
    assert!(!mount.join("old.txt").exists(), "old data survived destroy");
    assert!(a.snapshots(&d).expect("snapshots").is_empty());
    a.snapshot(&d, &snap("s1"))
        .expect("old snapshot name is free again");
}

// ---------------------------------------------------------------------------------------------
// snapshots

fn snapshot_ordering(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("ordered");
    a.create(&d, None).expect("create");
    let mount = a.mount_path(&d).expect("mount");
    let names = [
        "zeta",
        "alpha",
        "m10",
        "m9",
        "0first",
        "2026-01-01T00:00:00",
    ];
    for (i, n) in names.iter().enumerate() {
        write(&mount, "counter", i.to_string().as_bytes());
        a.snapshot(&d, &snap(n)).expect("snapshot");
    }
    assert_eq!(snapshot_names(&*a, &d), names, "oldest first, by creation");
    let infos = a.snapshots(&d).expect("snapshots");
    let mut guids: Vec<u64> = infos.iter().map(|s| s.guid).collect();
    guids.sort();
    guids.dedup();
    assert_eq!(guids.len(), names.len(), "guids are distinct");
    assert!(infos.iter().all(|s| s.created_unix > 1_600_000_000));
    assert_eq!(
        a.latest_snapshot(&d)
            .expect("latest")
            .map(|s| s.name.to_string())
            .as_deref(),
        Some(names[5])
    );

    match a.snapshot(&d, &snap("m10")) {
        Err(DatasetError::SnapshotExists { dataset, snapshot }) => {
            assert_eq!((dataset.as_str(), snapshot.as_str()), ("ordered", "m10"))
        }
        other => panic!("expected SnapshotExists, got {other:?}"),
    }
    a.destroy_snapshot(&d, &snap("m10"))
        .expect("destroy snapshot");
    assert_eq!(
        snapshot_names(&*a, &d),
        ["zeta", "alpha", "m9", "0first", "2026-01-01T00:00:00"]
    );
    assert!(matches!(
        a.destroy_snapshot(&d, &snap("m10")),
        Err(DatasetError::SnapshotNotFound { .. })
    ));
}

fn rollback_discards_later_snapshots(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("rb");
    a.create(&d, None).expect("create");
    let m = a.mount_path(&d).expect("mount");
    write(&m, "a.txt", b"v1");
    write(&m, "d/b.txt", b"inner");
    a.snapshot(&d, &snap("s1")).expect("s1");
    let at_s1 = manifest(&m);
    write(&m, "a.txt", b"v2, longer");
    std::fs::remove_file(m.join("d/b.txt")).expect("rm");
    write(&m, "c.txt", b"new in s2");
    a.snapshot(&d, &snap("s2")).expect("s2");
    let at_s2 = manifest(&m);
    write(&m, "a.txt", b"v3");
    a.snapshot(&d, &snap("s3")).expect("s3");
    write(&m, "a.txt", b"uncommitted junk");
    write(&m, "junk/file", b"junk");

    a.rollback(&d, &snap("s2")).expect("rollback to s2");
    assert_eq!(snapshot_names(&*a, &d), ["s1", "s2"]);
    let m = a.mount_path(&d).expect("mount");
    assert_same(&manifest(&m), &at_s2);

    a.rollback(&d, &snap("s1")).expect("rollback to s1");
    assert_eq!(snapshot_names(&*a, &d), ["s1"]);
    assert_same(&manifest(&a.mount_path(&d).expect("mount")), &at_s1);

    assert!(matches!(
        a.rollback(&d, &snap("s3")),
        Err(DatasetError::SnapshotNotFound { .. })
    ));
    a.snapshot(&d, &snap("s2"))
        .expect("a rolled-back name is free again");
}

fn send_argument_errors(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("args");
    assert!(matches!(
        a.send(&StreamSpec::full(d.clone(), snap("s1"))),
        Err(DatasetError::NotFound { .. })
    ));
    a.create(&d, None).expect("create");
    a.snapshot(&d, &snap("s1")).expect("s1");
    a.snapshot(&d, &snap("s2")).expect("s2");
    assert!(matches!(
        a.send(&StreamSpec::full(d.clone(), snap("nope"))),
        Err(DatasetError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        a.send(&StreamSpec::incremental(d.clone(), snap("s2"), snap("s1"))),
        Err(DatasetError::BaseMismatch { .. })
    ));
    assert!(matches!(
        a.send(&StreamSpec::incremental(d.clone(), snap("s1"), snap("s1"))),
        Err(DatasetError::BaseMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// streams

/// Node `a` with dataset "db" holding the rich tree at snapshot s1, node `b` with a copy of s1.
fn two_nodes_at_s1(f: &mut dyn Fixture) -> (Arc<dyn Backend>, Arc<dyn Backend>) {
    let (a, b) = (f.node(), f.node());
    let d = ds("db");
    a.create(&d, Some(64 * MIB)).expect("create");
    populate(&a.mount_path(&d).expect("mount"));
    a.snapshot(&d, &snap("s1")).expect("s1");
    let got =
        receive(&*b, &framed(&*a, &StreamSpec::full(d.clone(), snap("s1")))).expect("full receive");
    assert_eq!(got.snapshot.name.as_str(), "s1");
    (a, b)
}

/// Changes every kind of thing an incremental stream must carry.
fn change_everything(root: &std::path::Path) {
    // Same size, different bytes: only the content changed.
    let big = std::fs::read(root.join("big.bin")).expect("read");
    let mut changed = big.clone();
    changed[1000] ^= 0xff;
    std::fs::write(root.join("big.bin"), &changed).expect("write");
    write(root, "hello.txt", b"hello, flock, appended\n");
    std::fs::remove_file(root.join("empty.txt")).expect("rm file");
    std::fs::remove_dir_all(root.join("a/b")).expect("rm subtree");
    write(root, "new/dir/file.bin", &noise(300_000, 9));
    std::fs::remove_file(root.join("link")).expect("rm link");
    std::os::unix::fs::symlink("hello.txt", root.join("link")).expect("relink");
    chmod(&root.join("secret.key"), 0o640);
    std::fs::remove_file(root.join("private/note")).expect("rm");
    std::fs::remove_dir(root.join("private")).expect("rmdir");
    write(root, "private", b"now a file, was a directory");
    std::fs::remove_dir(root.join("empty-dir")).expect("rmdir");
    write(root, "empty-dir/now-a-dir-with-a-file", b"x");
    set_mtime(&root.join("bin/run.sh"), 1_700_000_000);
}

fn full_send_receive_is_identical(f: &mut dyn Fixture) {
    let (a, b) = two_nodes_at_s1(f);
    let d = ds("db");
    assert_same(
        &manifest(&a.mount_path(&d).expect("mount")),
        &manifest(&b.mount_path(&d).expect("mount")),
    );
    let (sa, sb) = (a.snapshots(&d).expect("a"), b.snapshots(&d).expect("b"));
    assert_eq!(sb.len(), 1);
    assert_eq!(
        sa[0].guid, sb[0].guid,
        "a received snapshot keeps the sender's guid"
    );
    assert_eq!(
        b.info(&d).expect("info").expect("exists").limit,
        Some(64 * MIB),
        "the size limit travels in the header"
    );
    // A full stream into a dataset that exists is refused and changes nothing.
    let again = receive(&*b, &framed(&*a, &StreamSpec::full(d.clone(), snap("s1"))));
    assert!(
        matches!(again, Err(DatasetError::AlreadyExists { .. })),
        "{again:?}"
    );
    assert_eq!(snapshot_names(&*b, &d), ["s1"]);
}

fn incremental_send_receive(f: &mut dyn Fixture) {
    let (a, b) = two_nodes_at_s1(f);
    let d = ds("db");
    let ma = a.mount_path(&d).expect("mount");
    change_everything(&ma);
    a.snapshot(&d, &snap("s2")).expect("s2");
    let inc = framed(
        &*a,
        &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
    );
    let full_len = framed(&*a, &StreamSpec::full(d.clone(), snap("s2"))).len();
    assert!(
        inc.len() < full_len,
        "incremental {} >= full {full_len}",
        inc.len()
    );
    receive(&*b, &inc).expect("incremental receive");
    assert_eq!(snapshot_names(&*b, &d), ["s1", "s2"]);
    assert_same(&manifest(&ma), &manifest(&b.mount_path(&d).expect("mount")));

    // Another round, and the receiver's guids follow the sender's.
    write(&ma, "round3.txt", b"three");
    a.snapshot(&d, &snap("s3")).expect("s3");
    receive(
        &*b,
        &framed(
            &*a,
            &StreamSpec::incremental(d.clone(), snap("s2"), snap("s3")),
        ),
    )
    .expect("second incremental");
    assert_same(&manifest(&ma), &manifest(&b.mount_path(&d).expect("mount")));
    let guids = |n: &Arc<dyn Backend>| -> Vec<u64> {
        n.snapshots(&d)
            .expect("snapshots")
            .iter()
            .map(|s| s.guid)
            .collect()
    };
    assert_eq!(guids(&a), guids(&b));

    // A stream whose base is not the receiver's latest snapshot is refused, changing nothing.
    let stale = framed(
        &*a,
        &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
    );
    match receive(&*b, &stale) {
        Err(DatasetError::BaseMismatch {
            dataset,
            base,
            latest,
        }) => {
            assert_eq!(
                (dataset.as_str(), base.as_str(), latest.as_str()),
                ("db", "s1", "s3")
            )
        }
        other => panic!("expected BaseMismatch, got {other:?}"),
    }
    assert_eq!(snapshot_names(&*b, &d), ["s1", "s2", "s3"]);
    // An incremental stream for a dataset the receiver does not have.
    let c = f.node();
    assert!(matches!(
        receive(&*c, &stale),
        Err(DatasetError::NotFound { .. })
    ));
}

/// Node `b` at s1 (as received), node `a` with s2 that adds > 1 MiB so the incremental stream
/// spans several frames; returns the incremental stream and b's state at s1.
fn incremental_case(
    f: &mut dyn Fixture,
) -> (Arc<dyn Backend>, Arc<dyn Backend>, Vec<u8>, Manifest) {
    let (a, b) = two_nodes_at_s1(f);
    let d = ds("db");
    let ma = a.mount_path(&d).expect("mount");
    change_everything(&ma);
    write(&ma, "more.bin", &noise(3 * MIB as usize / 2, 11));
    a.snapshot(&d, &snap("s2")).expect("s2");
    let inc = framed(
        &*a,
        &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
    );
    assert!(frame_boundaries(&inc).len() > 6, "want several frames");
    let at_s1 = manifest(&b.mount_path(&d).expect("mount"));
    (a, b, inc, at_s1)
}

#[track_caller]
fn assert_still_at_s1(b: &dyn Backend, at_s1: &Manifest, what: &str) {
    let d = ds("db");
    assert_eq!(snapshot_names(b, &d), ["s1"], "after {what}");
    assert_same(&manifest(&b.mount_path(&d).expect("mount")), at_s1);
}

fn truncated_stream_keeps_last_good_snapshot(f: &mut dyn Fixture) {
    let (a, b, inc, at_s1) = incremental_case(f);
    let mut cuts = frame_boundaries(&inc);
    cuts.extend([1, 13, inc.len() / 2, inc.len() - 1]);
    cuts.retain(|&c| c < inc.len());
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        let err = receive(&*b, &inc[..cut]).expect_err("a truncated stream was accepted");
        assert!(
            matches!(err, DatasetError::Stream { .. }),
            "cut at {cut}: {err}"
        );
        assert_still_at_s1(&*b, &at_s1, &format!("truncation at {cut}"));
    }
    receive(&*b, &inc).expect("the whole stream still applies");
    assert_same(
        &manifest(&a.mount_path(&ds("db")).expect("mount")),
        &manifest(&b.mount_path(&ds("db")).expect("mount")),
    );
}

fn corrupted_stream_is_rejected(f: &mut dyn Fixture) {
    let (_a, b, inc, at_s1) = incremental_case(f);
    let bounds = frame_boundaries(&inc);
    let header_end = bounds[1];
    let spots = [
        20,                           // header body
        header_end + 2,               // first frame's length
        header_end + 5,               // first payload byte
        header_end + 300,             // inside the first frame
        inc.len() / 2,                // middle
        bounds[bounds.len() - 2] - 1, // last payload byte
        inc.len() - 40,               // trailer counts
        inc.len() - 1,                // trailer checksum
    ];
    for at in spots {
        let mut bad = inc.clone();
        bad[at] ^= 0x20;
        let err = receive(&*b, &bad).expect_err("a corrupted stream was accepted");
        assert!(
            matches!(err, DatasetError::Stream { .. }),
            "flip at {at}: {err}"
        );
        assert_still_at_s1(&*b, &at_s1, &format!("a flipped byte at {at}"));
    }
}

fn corrupted_raw_backend_stream_is_rejected(f: &mut dyn Fixture) {
    // Without the framing, each backend's own stream still verifies itself.
    let (a, b, _inc, at_s1) = incremental_case(f);
    let d = ds("db");
    let spec = StreamSpec::incremental(d.clone(), snap("s1"), snap("s2"));
    let mut raw = Vec::new();
    a.send(&spec)
        .expect("send")
        .read_to_end(&mut raw)
        .expect("read");
    // Inside the data (a zfs stream's trailing record has padding its checksum does not
    // cover; the framing's checksum does, see corrupted_stream_is_rejected).
    for at in [raw.len() / 3, raw.len() / 2, raw.len() * 2 / 3] {
        let mut bad = raw.clone();
        bad[at] ^= 0x01;
        let err = b
            .receive(&spec, None, &mut &bad[..])
            .map(|_| ())
            .expect_err(&format!(
                "corrupt raw stream accepted (flip at {at} of {})",
                raw.len()
            ));
        assert!(
            matches!(err, DatasetError::Stream { .. }),
            "flip at {at}: {err}"
        );
        assert_still_at_s1(&*b, &at_s1, &format!("a flipped raw byte at {at}"));
    }
    let err = b
        .receive(&spec, None, &mut &raw[..raw.len() / 2])
        .expect_err("truncated raw");
    assert!(matches!(err, DatasetError::Stream { .. }), "{err}");
    assert_still_at_s1(&*b, &at_s1, "a truncated raw stream");
}

/// Yields `limit` bytes of `data`, then fails like a connection reset.
struct Interrupted<'a> {
    data: &'a [u8],
    limit: usize,
}

impl Read for Interrupted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.limit == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer reset the stream",
            ));
        }
        let n = buf.len().min(self.limit).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.limit -= n;
        Ok(n)
    }
}

fn interrupted_stream_keeps_last_good_snapshot(f: &mut dyn Fixture) {
    let (_a, b, inc, at_s1) = incremental_case(f);
    for limit in [0, 100, inc.len() / 3, inc.len() - 33, inc.len() - 1] {
        let mut src = BufReader::new(Interrupted { data: &inc, limit });
        let err = receive_framed(&*b, &mut src, &mut |_| Ok(())).expect_err("interrupted accepted");
        match &err {
            DatasetError::Stream { source, .. } => assert!(
                source.to_string().contains("reset"),
                "limit {limit}: the interruption should be named: {err}"
            ),
            other => panic!("limit {limit}: expected a stream error, got {other}"),
        }
        assert_still_at_s1(&*b, &at_s1, &format!("an interruption after {limit} bytes"));
    }
}

fn async_transfer_over_a_pipe(f: &mut dyn Fixture) {
    let (a, b, _inc, at_s1) = incremental_case(f);
    let d = ds("db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Interrupted: the sender's pipe closes after 200 KiB.
        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let inc = framed(
            &*a,
            &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
        );
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = tx.write_all(&inc[..200 << 10]).await;
        });
        let err = receive_framed_async(b.clone(), rx, |_| Ok(()), CancellationToken::new()).await;
        writer.await.expect("writer");
        assert!(matches!(err, Err(DatasetError::Stream { .. })), "{err:?}");
        assert_still_at_s1(&*b, &at_s1, "an async interruption");

        // Stalled: the sender goes quiet without closing; the receiver gives up on cancel.
        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let inc = framed(
            &*a,
            &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
        );
        let stalled = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = tx.write_all(&inc[..200 << 10]).await;
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            drop(tx);
        });
        let cancel = CancellationToken::new();
        let receiving = tokio::spawn(receive_framed_async(
            b.clone(),
            rx,
            |_| Ok(()),
            cancel.clone(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        cancel.cancel();
        let err = receiving.await.expect("receive task");
        stalled.abort();
        match err {
            Err(DatasetError::Stream { source, .. }) => {
                assert!(source.to_string().contains("cancelled"), "{source}")
            }
            other => panic!("expected a cancelled stream, got {other:?}"),
        }
        assert_still_at_s1(&*b, &at_s1, "a cancelled receive");

        // Complete: sender and receiver connected by a pipe, with progress.
        let (mut tx, rx) = tokio::io::duplex(256 << 10);
        let spec = StreamSpec::incremental(d.clone(), snap("s1"), snap("s2"));
        let sender = tokio::spawn({
            let a = a.clone();
            async move {
                let mut last = 0;
                let sent = send_framed_async(a, spec, &mut tx, |n, _| last = n).await;
                (sent, last)
            }
        });
        let want = d.clone();
        let got = receive_framed_async(
            b.clone(),
            rx,
            move |h| {
                assert_eq!(h.spec.dataset, want);
                Ok(())
            },
            CancellationToken::new(),
        )
        .await
        .expect("async receive");
        let (sent, last) = sender.await.expect("sender task");
        let sent = sent.expect("async send");
        assert_eq!(sent.totals.payload_bytes, last);
        assert_eq!(sent.totals.wire_bytes, got.wire_bytes);
    });
    assert_same(
        &manifest(&a.mount_path(&d).expect("mount")),
        &manifest(&b.mount_path(&d).expect("mount")),
    );
}

fn failed_full_receive_leaves_no_dataset(f: &mut dyn Fixture) {
    let a = f.node();
    let b = f.node();
    let d = ds("fresh");
    a.create(&d, None).expect("create");
    populate(&a.mount_path(&d).expect("mount"));
    a.snapshot(&d, &snap("s1")).expect("s1");
    let full = framed(&*a, &StreamSpec::full(d.clone(), snap("s1")));
    let bounds = frame_boundaries(&full);
    let mut cuts = vec![
        bounds[1],
        bounds[2],
        full.len() / 2,
        full.len() - 32,
        full.len() - 1,
    ];
    cuts.dedup();
    for cut in cuts {
        assert!(receive(&*b, &full[..cut]).is_err(), "cut at {cut} accepted");
        assert!(
            b.info(&d).expect("info").is_none(),
            "cut at {cut} left a dataset"
        );
        assert!(
            dataset_names(&*b).is_empty(),
            "cut at {cut} left a dataset in the list"
        );
        assert!(matches!(
            b.mount_path(&d),
            Err(DatasetError::NotFound { .. })
        ));
    }
    let mut bad = full.clone();
    let mid = full.len() / 2;
    bad[mid] ^= 0x40;
    assert!(receive(&*b, &bad).is_err());
    assert!(
        dataset_names(&*b).is_empty(),
        "a corrupt full stream left a dataset"
    );
    // The name is free: a good stream lands.
    receive(&*b, &full).expect("the good stream");
    assert_same(
        &manifest(&a.mount_path(&d).expect("mount")),
        &manifest(&b.mount_path(&d).expect("mount")),
    );
}

// ---------------------------------------------------------------------------------------------
// space

fn size_limit_is_enforced_at_receive(f: &mut dyn Fixture) {
    let (a, b) = (f.node(), f.node());
    let d = ds("limited");
    a.create(&d, None).expect("create");
    let ma = a.mount_path(&d).expect("mount");
    write(&ma, "small.bin", &noise(200_000, 3));
    a.snapshot(&d, &snap("s1")).expect("s1");
    write(&ma, "large.bin", &noise(6 * MIB as usize, 4));
    a.snapshot(&d, &snap("s2")).expect("s2");

    // Full: the receiving side's limit (carried in the header) is too small.
    let full = framed_with_limit(&*a, &StreamSpec::full(d.clone(), snap("s2")), Some(2 * MIB));
    match receive(&*b, &full) {
        Err(e @ DatasetError::NoSpace { .. }) => {
            assert!(e.to_string().contains("limited"), "names the dataset: {e}");
            assert!(e.is_no_space());
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(b.info(&d).expect("info").is_none(), "no partial dataset");
    assert!(dataset_names(&*b).is_empty());

    // Incremental: s1 fits in 3 MiB, s2 does not.
    let s1 = framed_with_limit(&*a, &StreamSpec::full(d.clone(), snap("s1")), Some(3 * MIB));
    receive(&*b, &s1).expect("s1 fits");
    let at_s1 = manifest(&b.mount_path(&d).expect("mount"));
    let inc = framed(
        &*a,
        &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
    );
    match receive(&*b, &inc) {
        Err(e @ DatasetError::NoSpace { .. }) => assert!(e.to_string().contains("limited"), "{e}"),
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(snapshot_names(&*b, &d), ["s1"]);
    assert_same(&manifest(&b.mount_path(&d).expect("mount")), &at_s1);
    assert_eq!(
        b.info(&d).expect("info").expect("exists").limit,
        Some(3 * MIB)
    );
}

fn pool_filling_up_mid_stream(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("huge");
    a.create(&d, None).expect("create");
    let ma = a.mount_path(&d).expect("mount");
    for i in 0..5 {
        write(
            &ma,
            &format!("part{i}.bin"),
            &noise(8 * MIB as usize, 100 + i),
        );
    }
    a.snapshot(&d, &snap("s1")).expect("s1");
    let stream = framed(&*a, &StreamSpec::full(d.clone(), snap("s1")));
    assert!(stream.len() as u64 > 40 * MIB);

    // 64 MiB of pool file leaves zfs-fuse about 27 MiB; the dir node gets a 24 MiB tmpfs.
    let small = f.small_node(if a.kind() == flock_dataset::BackendKind::Zfs {
        64
    } else {
        24
    });
    match receive(&*small, &stream) {
        Err(e @ DatasetError::NoSpace { .. }) => {
            assert!(e.to_string().contains("huge"), "names the dataset: {e}")
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(
        small.info(&d).expect("info").is_none(),
        "no half-written dataset"
    );
    assert!(dataset_names(&*small).is_empty());

    // The space came back: a small dataset still lands there.
    let s = ds("small");
    a.create(&s, None).expect("create");
    write(
        &a.mount_path(&s).expect("mount"),
        "x.bin",
        &noise(2 * MIB as usize, 5),
    );
    a.snapshot(&s, &snap("s1")).expect("s1");
    receive(
        &*small,
        &framed(&*a, &StreamSpec::full(s.clone(), snap("s1"))),
    )
    .expect("a small dataset fits after the failed one was cleaned up");
}

fn set_limit_up_down_and_below_use(f: &mut dyn Fixture) {
    let a = f.node();
    let d = ds("resized");
    a.create(&d, Some(10 * MIB)).expect("create");
    write(
        &a.mount_path(&d).expect("mount"),
        "data.bin",
        &noise(3 * MIB as usize, 11),
    );
    let limit = |b: &dyn Backend| b.info(&d).expect("info").expect("exists").limit;

    a.set_limit(&d, Some(20 * MIB)).expect("raise");
    assert_eq!(limit(&*a), Some(20 * MIB));
    a.set_limit(&d, Some(4 * MIB))
        .expect("lower, still above the data");
    assert_eq!(limit(&*a), Some(4 * MIB));
    match a.set_limit(&d, Some(MIB)) {
        Err(e @ DatasetError::LimitBelowUse { .. }) => {
            let DatasetError::LimitBelowUse {
                ref dataset,
                limit,
                used,
            } = e
            else {
                unreachable!()
            };
            assert_eq!((dataset.as_str(), limit), ("resized", MIB));
            assert!((3 * MIB..4 * MIB).contains(&used), "used {used}");
            let text = e.to_string();
            assert!(
                text.contains("resized") && text.contains(&used.to_string()),
                "names the dataset and what it holds: {text}"
            );
        }
        other => panic!("expected LimitBelowUse, got {other:?}"),
    }
    assert_eq!(limit(&*a), Some(4 * MIB), "a refused limit changes nothing");
    a.set_limit(&d, None).expect("no limit");
    assert_eq!(limit(&*a), None);
    let info = a.info(&d).expect("info").expect("exists");
    assert_eq!(info.over_limit(), None);
    match a.set_limit(&ds("missing"), Some(MIB)) {
        Err(DatasetError::NotFound { dataset }) => assert_eq!(dataset, "missing"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn limit_counts_live_data_not_snapshots(f: &mut dyn Fixture) {
    let (a, b) = (f.node(), f.node());
    let d = ds("moved");
    a.create(&d, None).expect("create");
    let ma = a.mount_path(&d).expect("mount");
    write(&ma, "big.bin", &noise(5 * MIB as usize, 21));
    // Past the clock tick of the write: a file changed in the tick a snapshot began is copied
    // again by the next one (the dir backend's "racy" rule), which is not what this measures.
    std::thread::sleep(std::time::Duration::from_millis(50));
    a.snapshot(&d, &snap("s1")).expect("s1");
    let s1 = a.info(&d).expect("info").expect("exists");
    assert!(
        (5 * MIB..5 * MIB + MIB / 2).contains(&s1.referenced_bytes),
        "5 MiB of live data, got {}",
        s1.referenced_bytes
    );
    // What a snapshot of unchanged data costs depends on how the backend shares storage.
    let sharing = a.space_sharing().expect("space sharing");
    match sharing {
        SpaceSharing::CopyOnWrite => assert!(
            s1.used_bytes < s1.referenced_bytes + MIB / 2,
            "zfs: s1 shares every block with the live data, used {}",
            s1.used_bytes
        ),
        SpaceSharing::Copy | SpaceSharing::Reflink => assert!(
            (2 * s1.referenced_bytes..2 * s1.referenced_bytes + MIB / 2).contains(&s1.used_bytes),
            "dir: live and s1 are two files of 5 MiB each ({sharing}), used {}",
            s1.used_bytes
        ),
    }
    a.snapshot(&d, &snap("s1b")).expect("s1b");
    let s1b = a.info(&d).expect("info").expect("exists");
    assert!(
        s1b.used_bytes < s1.used_bytes + MIB / 4,
        "a snapshot of unchanged data costs (almost) nothing: {} -> {}",
        s1.used_bytes,
        s1b.used_bytes
    );
    assert_eq!(s1b.referenced_bytes, s1.referenced_bytes);
    a.set_limit(&d, Some(6 * MIB))
        .expect("6 MiB holds the 5 MiB of data, whatever the snapshots take");

    // Moved to b with an 8 MiB limit, then the big file is rewritten: b holds the old copy in
    // s1 and the new one live, 10 MiB, and its 5 MiB of data are within the limit.
    receive(
        &*b,
        &framed_with_limit(&*a, &StreamSpec::full(d.clone(), snap("s1")), Some(8 * MIB)),
    )
    .expect("s1 fits in 8 MiB");
    write(&ma, "big.bin", &noise(5 * MIB as usize, 22));
    a.snapshot(&d, &snap("s2")).expect("s2");
    receive(
        &*b,
        &framed(
            &*a,
            &StreamSpec::incremental(d.clone(), snap("s1"), snap("s2")),
        ),
    )
    .expect("the rewritten 5 MiB file fits in an 8 MiB limit next to its old snapshot");
    let on_b = b.info(&d).expect("info").expect("exists");
    assert_eq!(on_b.limit, Some(8 * MIB));
    assert!(
        on_b.used_bytes >= 10 * MIB && on_b.referenced_bytes < 6 * MIB,
        "b holds two versions on disk but 5 MiB of data: {on_b:?}"
    );
    assert_eq!(on_b.over_limit(), None);
    assert_same(&manifest(&ma), &manifest(&b.mount_path(&d).expect("mount")));
}

fn restore_keeps_every_snapshot_and_the_directory(f: &mut dyn Fixture) {
    use std::os::unix::fs::MetadataExt;
    let a = f.node();
    let d = ds("restored");
    a.create(&d, None).expect("create");
    let m = a.mount_path(&d).expect("mount");
    populate(&m);
    a.snapshot(&d, &snap("s1")).expect("s1");
    let at_s1 = manifest(&m);
    change_everything(&m);
    write(&m, "big.bin", &noise(MIB as usize, 33));
    a.snapshot(&d, &snap("s2")).expect("s2");
    let at_s2 = manifest(&m);
    write(&m, "unsaved.txt", b"written after s2");
    let root_id = |p: &std::path::Path| {
        let md = std::fs::metadata(p).expect("stat mount");
        (md.dev(), md.ino())
    };
    let before = root_id(&m);

    a.restore(&d, &snap("s1")).expect("restore s1");
    assert_same(&manifest(&m), &at_s1);
    assert_eq!(snapshot_names(&*a, &d), ["s1", "s2"], "no snapshot lost");
    assert_eq!(
        root_id(&m),
        before,
        "the live directory is the same directory"
    );
    assert_eq!(a.mount_path(&d).expect("mount"), m);

    a.restore(&d, &snap("s2"))
        .expect("restore s2, the newer one");
    assert_same(&manifest(&m), &at_s2);
    assert_eq!(root_id(&m), before);

    // A directory swapped for a symlink to outside is replaced, never written through.
    let outside = tempfile::tempdir().expect("tmp");
    write(outside.path(), "keep.txt", b"not the dataset's");
    let outside_before = manifest(outside.path());
    std::fs::remove_dir_all(m.join("a")).expect("remove a/");
    std::os::unix::fs::symlink(outside.path(), m.join("a")).expect("symlink");
    a.restore(&d, &snap("s1")).expect("restore s1 again");
    assert_same(&manifest(&m), &at_s1);
    assert_same(&manifest(outside.path()), &outside_before);

    match a.restore(&d, &snap("nope")) {
        Err(DatasetError::SnapshotNotFound { snapshot, .. }) => assert_eq!(snapshot, "nope"),
        other => panic!("expected SnapshotNotFound, got {other:?}"),
    }
    // Nothing pins a snapshot after a restore (zfs: the clone it read from is gone).
    a.destroy_snapshot(&d, &snap("s1"))
        .expect("nothing pins s1 after a restore");
    assert_eq!(snapshot_names(&*a, &d), ["s2"]);
}

/// A copy that diverged is copied aside under the kept snapshot (its live data as it was)
/// and goes back to the common snapshot with the same guid; a second call (a crash and a
/// retry) changes nothing; without a common snapshot the copy goes.
fn set_aside_keeps_everything_and_restarts_from_common(f: &mut dyn Fixture) {
    use flock_dataset::{set_aside, SetAside};
    let a = f.node();
    let d = ds("div");
    let aside = ds("div.diverged-2");
    a.create(&d, Some(64 * MIB)).expect("create");
    let m = a.mount_path(&d).expect("mount");
    write(&m, "log", b"1\n");
    let s1 = a.snapshot(&d, &snap("s1")).expect("s1");
    let at_s1 = manifest(&m);
    write(&m, "log", b"1\n2\n");
    a.snapshot(&d, &snap("s2")).expect("s2");
    write(&m, "log", b"1\n2\n3 only here\n");
    let diverged = manifest(&m);

    let kept =
        set_aside(&*a, &d, &aside, &snap("diverged-2"), Some(&snap("s1"))).expect("set aside");
    assert_eq!(kept, SetAside::Kept { restarted: true });
    assert_eq!(snapshot_names(&*a, &aside), ["diverged-2"]);
    let am = a.mount_path(&aside).expect("aside mount");
    assert_same(&manifest(&am), &diverged);
    assert_eq!(snapshot_names(&*a, &d), ["s1"]);
    let back = a.snapshots(&d).expect("snapshots");
    assert_eq!(back[0].guid, s1.guid, "the common snapshot itself");
    let m = a.mount_path(&d).expect("mount");
    assert_same(&manifest(&m), &at_s1);
    assert_eq!(
        a.info(&d).expect("info").expect("exists").limit,
        Some(64 * MIB)
    );

    // Again (a retry after a crash): nothing changes.
    let again = set_aside(&*a, &d, &aside, &snap("diverged-2"), Some(&snap("s1")))
        .expect("set aside again");
    assert_eq!(again, SetAside::Kept { restarted: true });
    assert_eq!(snapshot_names(&*a, &aside), ["diverged-2"]);
    assert_same(&manifest(&a.mount_path(&aside).expect("mount")), &diverged);
    assert_eq!(snapshot_names(&*a, &d), ["s1"]);

    // No common snapshot: the copy is kept aside and goes; nothing at all: nothing to do.
    let e = ds("lone");
    a.create(&e, None).expect("create");
    write(&a.mount_path(&e).expect("mount"), "x", b"x");
    let lone_aside = ds("lone.diverged-5");
    assert_eq!(
        set_aside(&*a, &e, &lone_aside, &snap("diverged-5"), None).expect("set aside"),
        SetAside::Kept { restarted: false }
    );
    assert!(a.info(&e).expect("info").is_none());
    assert_eq!(snapshot_names(&*a, &lone_aside), ["diverged-5"]);
    let none = ds("none");
    assert_eq!(
        set_aside(
            &*a,
            &none,
            &ds("none.diverged-1"),
            &snap("diverged-1"),
            None
        )
        .expect("nothing"),
        SetAside::Nothing
    );
    a.destroy(&aside).expect("the aside copy is removable");
    assert_eq!(snapshot_names(&*a, &d), ["s1"]);
}

// ---------------------------------------------------------------------------------------------

macro_rules! conformance {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $fixture;
                create_list_destroy,
                name_reuse_after_destroy,
                snapshot_ordering,
                rollback_discards_later_snapshots,
                send_argument_errors,
                full_send_receive_is_identical,
                incremental_send_receive,
                truncated_stream_keeps_last_good_snapshot,
                corrupted_stream_is_rejected,
                corrupted_raw_backend_stream_is_rejected,
                interrupted_stream_keeps_last_good_snapshot,
                async_transfer_over_a_pipe,
                failed_full_receive_leaves_no_dataset,
                size_limit_is_enforced_at_receive,
                pool_filling_up_mid_stream,
                set_limit_up_down_and_below_use,
                limit_counts_live_data_not_snapshots,
                restore_keeps_every_snapshot_and_the_directory,
                set_aside_keeps_everything_and_restarts_from_common,
            );
        }
    };
    (@tests $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let mut fixture = $fixture;
                super::$name(&mut fixture);
            }
        )*
    };
}

conformance!(dir, DirFixture::new());
conformance!(zfs, ZfsFixture::new());

#[test]
fn a_stream_only_goes_to_its_own_backend_kind() {
    let mut dirs = DirFixture::new();
    let mut zfs = ZfsFixture::new();
    let (d, z) = (dirs.node(), zfs.node());
    let name = ds("kinds");
    d.create(&name, None).expect("create");
    d.snapshot(&name, &snap("s1")).expect("s1");
    match receive(
        &*z,
        &framed(&*d, &StreamSpec::full(name.clone(), snap("s1"))),
    ) {
        Err(DatasetError::KindMismatch {
            stream, backend, ..
        }) => {
            assert_eq!(
                (stream.to_string(), backend.to_string()),
                ("dir".into(), "zfs".into())
            )
        }
        other => panic!("expected KindMismatch, got {other:?}"),
    }
    assert!(z.info(&name).expect("info").is_none());
}
