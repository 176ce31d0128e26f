//! What the dir backend's incremental snapshot and stream cost against what changed (issue 20):
//! a dataset of TOTAL MiB in FILES files, a full snapshot and stream, then CYCLES rounds of
//! the middle 1 MiB of one file rewritten in place (round i changes file (i * FILES / CYCLES + FILES /
//! 2) % FILES, the same file when FILES is 1), each followed by a snapshot and an incremental
//! stream, sent to a sink and (with `--receive`) received into a second backend root, as a
//! replica does. Prints, for every step, the wall time and what the process read and wrote
//! (`/proc/self/io`: rchar/wchar are bytes through read/write-like calls, page cache included;
//! read_bytes/write_bytes what reached the block layer).
//!
//! ```text
//! cargo run --release -p flock-dataset --example dir_incremental -- /var/tmp/dirinc 4096 4096 2 --receive
//! cargo run --release -p flock-dataset --example dir_incremental -- /var/tmp/dirinc 4096 1 2 --receive
//! ```
//! Arguments: work directory (made, and emptied at the end), total MiB, files, cycles,
//! `--receive` to also receive every stream into a second root, `--keep` to keep the data,
//! `--deltas` to let incremental streams carry a changed file as its changed ranges (version 2,
//! on a file system with reflinks).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use flock_dataset::{Backend, DatasetName, DirBackend, SnapshotName, StreamSpec};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Default)]
struct Io {
    rchar: u64,
    wchar: u64,
    read_bytes: u64,
    write_bytes: u64,
}

fn io_now() -> Io {
    let text = fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    let mut io = Io::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(": ") else {
            continue;
        };
        let v: u64 = v.trim().parse().unwrap_or(0);
        match k {
            "rchar" => io.rchar = v,
            "wchar" => io.wchar = v,
            "read_bytes" => io.read_bytes = v,
            "write_bytes" => io.write_bytes = v,
            _ => {}
        }
    }
    io
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB as f64)
}

/// Runs `f`, printing its wall time and I/O next to `name`.
fn measure<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let (t, before) = (Instant::now(), io_now());
    let out = f();
    let (d, after) = (t.elapsed(), io_now());
    println!(
        "| {name} | {:.3} | {} | {} | {} | {} |",
        d.as_secs_f64(),
        mib(after.rchar - before.rchar),
        mib(after.wchar - before.wchar),
        mib(after.read_bytes - before.read_bytes),
        mib(after.write_bytes - before.write_bytes),
    );
    out
}

/// Pseudo-random bytes (xorshift), different for each seed.
fn noise(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn fill(live: &Path, files: u64, file_mib: u64) -> io::Result<()> {
    let mut block = vec![0u8; MIB as usize];
    for i in 0..files {
        let sub = live.join(format!("d{:03}", i / 256));
        fs::create_dir_all(&sub)?;
        let mut f = io::BufWriter::new(fs::File::create(sub.join(format!("f{i:05}.bin")))?);
        for j in 0..file_mib {
            noise(&mut block, i * 1_000_003 + j + 1);
            f.write_all(&block)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(())
}

fn file_path(live: &Path, i: u64) -> std::path::PathBuf {
    live.join(format!("d{:03}", i / 256))
        .join(format!("f{i:05}.bin"))
}

/// Sends `spec` from `a` into a sink; returns the stream's length.
fn send_to_sink(a: &DirBackend, spec: &StreamSpec) -> u64 {
    let mut s = a.send(spec).expect("send");
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("send: {e}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let receive = args.iter().any(|a| a == "--receive");
    let keep = args.iter().any(|a| a == "--keep");
    let deltas = args.iter().any(|a| a == "--deltas");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [work, total, files, cycles] = pos[..] else {
        eprintln!(
            "usage: dir_incremental WORK_DIR TOTAL_MIB FILES CYCLES [--receive] [--keep] [--deltas]"
        );
        std::process::exit(2);
    };
    let work = Path::new(work);
    let (total, files, cycles): (u64, u64, u64) = (
        total.parse().expect("total MiB"),
        files.parse().expect("files"),
        cycles.parse().expect("cycles"),
    );
    assert!(
        files > 0 && total % files == 0,
        "TOTAL must be a multiple of FILES"
    );
    let file_mib = total / files;
    fs::create_dir_all(work).expect("work dir");
    let a = DirBackend::open(work.join("a")).expect("open sender");
    let b = receive.then(|| DirBackend::open(work.join("b")).expect("open receiver"));
    let ds = DatasetName::new("bench").expect("name");
    let _ = a.destroy(&ds);
    if let Some(b) = &b {
        let _ = b.destroy(&ds);
    }
    a.create(&ds, None).expect("create");
    let live = a.mount_path(&ds).expect("mount path");
    println!(
        "dataset: {total} MiB in {files} file(s) of {file_mib} MiB; sharing {:?}; receive {receive}",
        a.space_sharing().expect("space sharing")
    );
    println!();
    println!("| step | seconds | rchar MiB | wchar MiB | read_bytes MiB | write_bytes MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    measure("fill the live tree", || {
        fill(&live, files, file_mib).expect("fill")
    });
    let snap = |i: u64| SnapshotName::new(format!("s{i}")).expect("snapshot name");
    measure("snapshot 1 (full)", || {
        a.snapshot(&ds, &snap(1)).expect("snapshot")
    });
    let full = StreamSpec::full(ds.clone(), snap(1));
    let len = measure("send full to a sink", || send_to_sink(&a, &full));
    println!("| (full stream: {} MiB) | | | | | |", mib(len));
    if let Some(b) = &b {
        measure("send full + receive", || {
            let mut s = a.send(&full).expect("send");
            b.receive(&full, None, &mut s).expect("receive")
        });
    }
    let mut block = vec![0u8; MIB as usize];
    for c in 1..=cycles {
        let i = (c * files / cycles.max(1) + files / 2) % files;
        let path = file_path(&live, i);
        noise(&mut block, 0xC0FFEE + c);
        measure(&format!("cycle {c}: rewrite 1 MiB of file {i}"), || {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open");
            f.write_all_at(&block, (file_mib - 1) * MIB / 2)
                .expect("write");
            f.sync_all().expect("fsync");
        });
        measure(&format!("cycle {c}: snapshot {}", c + 1), || {
            a.snapshot(&ds, &snap(c + 1)).expect("snapshot")
        });
        let inc = StreamSpec::incremental(ds.clone(), snap(c), snap(c + 1)).with_deltas(deltas);
        let len = measure(&format!("cycle {c}: send incremental to a sink"), || {
            send_to_sink(&a, &inc)
        });
        println!(
            "| (cycle {c}: incremental stream {} MiB) | | | | | |",
            mib(len)
        );
        if let Some(b) = &b {
            measure(&format!("cycle {c}: send incremental + receive"), || {
                let mut s = a.send(&inc).expect("send");
                b.receive(&inc, None, &mut s).expect("receive")
            });
        }
    }
    if let Some(b) = &b {
        // The replica's live tree and newest snapshot hold what the sender's newest does.
        let got = b.mount_path(&ds).expect("mount path");
        let changed: Vec<u64> = (1..=cycles)
            .map(|c| (c * files / cycles.max(1) + files / 2) % files)
            .collect();
        for i in 0..files {
            let (x, y) = (file_path(&live, i), file_path(&got, i));
            let len = |p: &Path| fs::metadata(p).map(|m| m.len()).ok();
            assert_eq!(len(&x), len(&y), "file {i} differs on the receiver");
            if changed.contains(&i) {
                assert!(
                    fs::read(&x).ok() == fs::read(&y).ok(),
                    "file {i} differs on the receiver"
                );
            }
        }
    }
    if !keep {
        let _ = a.destroy(&ds);
        if let Some(b) = &b {
            let _ = b.destroy(&ds);
        }
        let _ = fs::remove_dir_all(work);
    }
}
