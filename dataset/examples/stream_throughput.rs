//! Times a full and an incremental snapshot stream between two backends in one process,
//! framed and verified as over the network, through an in-memory pipe.
//!
//! ```text
//! cargo run --release -p flock-dataset --example stream_throughput -- dir  /tmp/a /tmp/b 1024 100
//! cargo run --release -p flock-dataset --example stream_throughput -- zfs  poolA/x poolB/x 1024 100
//! ```
//! Arguments: backend, sender root, receiver root, full size in MiB, incremental size in MiB.

use std::io::{self, BufReader, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use flock_dataset::frame::{Decoder, Encoder, StreamHeader};
use flock_dataset::transfer::{receive_framed, send_framed};
use flock_dataset::{
    Backend, BackendKind, DatasetName, DirBackend, SnapshotName, StreamSpec, ZfsBackend,
};

struct PipeWriter(SyncSender<Vec<u8>>);
impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct PipeReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}
impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn open(kind: &str, root: &str) -> Result<Box<dyn Backend>, Box<dyn std::error::Error>> {
    Ok(match kind {
        "dir" => Box::new(DirBackend::open(root)?),
        "zfs" => Box::new(ZfsBackend::open(root)?),
        other => return Err(format!("unknown backend {other}").into()),
    })
}

fn fill(dir: &std::path::Path, name: &str, mib: usize, seed: u64) -> io::Result<()> {
    let mut f = io::BufWriter::new(std::fs::File::create(dir.join(name))?);
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()
}

fn transfer(
    a: &dyn Backend,
    b: &dyn Backend,
    spec: &StreamSpec,
) -> Result<(u64, f64), Box<dyn std::error::Error>> {
    let (tx, rx) = sync_channel(16);
    let start = Instant::now();
    let received = std::thread::scope(|s| {
        let recv = s.spawn(move || {
            let mut src = BufReader::with_capacity(
                1 << 20,
                PipeReader {
                    rx,
                    buf: Vec::new(),
                    pos: 0,
                },
            );
            receive_framed(b, &mut src, &mut |_| Ok(()))
        });
        let sent = send_framed(a, spec, &mut PipeWriter(tx), &mut |_| {});
        let received = recv.join().map_err(|_| "receiver panicked")?;
        sent?;
        Ok::<_, Box<dyn std::error::Error>>(received?)
    })?;
    Ok((received.wire_bytes, start.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, ra, rb, full_mib, inc_mib] = args.as_slice() else {
        return Err(
            "usage: stream_throughput dir|zfs SENDER_ROOT RECEIVER_ROOT FULL_MIB INC_MIB".into(),
        );
    };
    let (full_mib, inc_mib): (usize, usize) = (full_mib.parse()?, inc_mib.parse()?);

    // The framing alone, in memory: encode + decode (with BLAKE3 both ways).
    let payload = vec![7u8; 256 << 10];
    let header = StreamHeader {
        kind: BackendKind::Dir,
        spec: StreamSpec::full(DatasetName::new("x")?, SnapshotName::new("s")?),
        limit: None,
        size_hint: None,
    };
    let frames = 4096; // 1 GiB
    let start = Instant::now();
    let (mut enc, head) = Encoder::new(&header);
    let mut dec = Decoder::new();
    dec.feed(&head)?;
    for _ in 0..frames {
        let prefix = enc.frame_prefix(&payload);
        let mut fed = 0;
        while fed < 5 {
            fed += dec.feed(&prefix[fed..])?;
            dec.take();
        }
        let mut fed = 0;
        while fed < payload.len() {
            fed += dec.feed(&payload[fed..])?;
            dec.take();
        }
    }
    let (trailer, _) = enc.trailer();
    dec.feed(&trailer)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "framing only: 1024 MiB encoded+decoded+verified in {secs:.2}s = {:.0} MiB/s",
        1024.0 / secs
    );

    let (a, b) = (open(kind, ra)?, open(kind, rb)?);
    let ds = DatasetName::new("bench")?;
    for backend in [&a, &b] {
        if backend.info(&ds)?.is_some() {
            backend.destroy(&ds)?;
        }
    }
    a.create(&ds, None)?;
    let mount = a.mount_path(&ds)?;
    fill(&mount, "full.bin", full_mib, 1)?;
    // A dir snapshot copies again, next time, a file changed within the clock tick it began
    // in (see the dir backend's "unchanged" rule); leave that tick for a steady-state figure.
    std::thread::sleep(std::time::Duration::from_millis(50));
    a.snapshot(&ds, &SnapshotName::new("s1")?)?;
    fill(&mount, "inc.bin", inc_mib, 2)?;
    a.snapshot(&ds, &SnapshotName::new("s2")?)?;

    let b: &dyn Backend = &*b;
    let (bytes, secs) = transfer(
        &*a,
        b,
        &StreamSpec::full(ds.clone(), SnapshotName::new("s1")?),
    )?;
    println!(
        "{kind} full {full_mib} MiB: {} MiB on the wire in {secs:.2}s = {:.0} MiB/s",
        bytes >> 20,
        bytes as f64 / (1 << 20) as f64 / secs
    );
    let spec = StreamSpec::incremental(
        ds.clone(),
        SnapshotName::new("s1")?,
        SnapshotName::new("s2")?,
    );
    let (bytes, secs) = transfer(&*a, b, &spec)?;
    println!(
        "{kind} incremental {inc_mib} MiB: {} MiB on the wire in {secs:.2}s = {:.0} MiB/s",
        bytes >> 20,
        bytes as f64 / (1 << 20) as f64 / secs
    );
    a.destroy(&ds)?;
    b.destroy(&ds)?;
    Ok(())
}
