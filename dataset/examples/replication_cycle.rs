//! What one replication cycle costs on a backend: a dataset of F files (S MiB in all), a small
//! change (one file appended 4 KiB), a snapshot, an incremental stream to a second dataset
//! (received, as a replica does), the oldest snapshot destroyed (retention). Prints the
//! median and the 95th percentile of each step over N cycles, so a snapshot interval can be
//! chosen from what the backend sustains (issue 17).
//!
//! ```text
//! cargo run --release -p flock-dataset --example replication_cycle -- dir /tmp/a /tmp/b 10000 100 50
//! cargo run --release -p flock-dataset --example replication_cycle -- zfs poolA/x poolB/x 10000 100 50
//! ```
//! Arguments: backend, sender root, receiver root, files, total MiB, cycles.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use flock_dataset::{
    Backend, BackendKind, DatasetName, DirBackend, SnapshotName, StreamSpec, ZfsBackend,
};

fn open(kind: &str, root: &str) -> Box<dyn Backend> {
    match kind {
        "dir" => Box::new(DirBackend::open(root).expect("open dir backend")),
        "zfs" => Box::new(ZfsBackend::open(root).expect("open zfs backend")),
        other => panic!("backend {other:?}: use dir or zfs"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    println!(
        "  {name:<12} median {:>8.1} ms   p95 {:>8.1} ms   max {:>8.1} ms",
        p(0.5),
        p(0.95),
        p(1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, a_root, b_root, files, mib, cycles] = &args[..] else {
        eprintln!("usage: replication_cycle dir|zfs SENDER_ROOT RECEIVER_ROOT FILES MIB CYCLES");
        std::process::exit(2);
    };
    let (files, mib, cycles): (usize, u64, usize) = (
        files.parse().expect("files"),
        mib.parse().expect("MiB"),
        cycles.parse().expect("cycles"),
    );
    let a = open(kind, a_root);
    let b = open(kind, b_root);
    assert!(matches!(a.kind(), BackendKind::Dir | BackendKind::Zfs));
    let ds = DatasetName::new("cycle").expect("name");
    let _ = a.destroy(&ds);
    let _ = b.destroy(&ds);
    a.create(&ds, None).expect("create");
    let live = a.mount_path(&ds).expect("mount path");
    let per_file = (mib << 20) / files.max(1) as u64;
    let chunk = vec![0x5au8; per_file as usize];
    for i in 0..files {
        let dir = live.join(format!("d{}", i / 1000));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("f{i}")), &chunk).expect("write");
    }
    let snap = |i: usize| SnapshotName::new(format!("auto-{i:06}")).expect("snapshot name");
    a.snapshot(&ds, &snap(0)).expect("first snapshot");
    let mut full = a
        .send(&StreamSpec::full(ds.clone(), snap(0)))
        .expect("send");
    b.receive(&StreamSpec::full(ds.clone(), snap(0)), None, &mut full)
        .expect("full receive");
    println!("{kind}: {files} files, {mib} MiB; each cycle appends 4 KiB to one file, then:");
    let (mut snaps, mut sends, mut prunes, mut totals) = (vec![], vec![], vec![], vec![]);
    for i in 1..=cycles {
        let f = live
            .join(format!("d{}", (i % files) / 1000))
            .join(format!("f{}", i % files));
        let mut h = OpenOptions::new().append(true).open(&f).expect("open");
        h.write_all(&[b'x'; 4096]).expect("append");
        h.sync_all().expect("fsync");
        drop(h);
        let t0 = Instant::now();
        a.snapshot(&ds, &snap(i)).expect("snapshot");
        let t1 = Instant::now();
        let spec = StreamSpec::incremental(ds.clone(), snap(i - 1), snap(i));
        let mut stream = a.send(&spec).expect("send");
        b.receive(&spec, None, &mut stream).expect("receive");
        let t2 = Instant::now();
        if i >= 3 {
            a.destroy_snapshot(&ds, &snap(i - 3)).expect("prune sender");
            b.destroy_snapshot(&ds, &snap(i - 3))
                .expect("prune receiver");
        }
        let t3 = Instant::now();
        snaps.push(t1 - t0);
        sends.push(t2 - t1);
        prunes.push(t3 - t2);
        totals.push(t3 - t0);
    }
    summary("snapshot", snaps);
    summary("send+recv", sends);
    summary("prune", prunes);
    summary("cycle", totals);
    a.destroy(&ds).expect("destroy");
    b.destroy(&ds).expect("destroy");
}
