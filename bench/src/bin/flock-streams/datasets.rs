//! Dataset streams: a full and an incremental snapshot from one backend to another, through
//! flock's framed stream over QUIC between two runtimes (as between two nodes), against the
//! same snapshots through a local pipe with no network and no framing at all.
//!
//! - dir: `Backend::send` into an OS pipe, `Backend::receive` out of it, in two threads.
//! - zfs: `zfs send [-i base] A@snap | zfs receive -F B` in one shell pipeline.
//! - flock: `send_framed_async` into a QUIC stream (one stream, as the push protocol uses, or
//!   lanes), `receive_framed_async` out of it: BLAKE3-checked frames, mutual TLS.

use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use flock_dataset::transfer::{receive_framed_async, send_framed_async};
use flock_dataset::{Backend, DatasetName, DirBackend, SnapshotName, StreamSpec, ZfsBackend};
use flock_tls::pki::NodeTls;
use flock_transport::lanes;
use flock_transport::quic::QuicTuning;

use crate::raw::{cpu_time, Pair};

/// How a snapshot travels.
#[derive(Clone, Debug)]
pub enum Method {
    /// No network: the backend's own send piped into its receive.
    LocalPipe,
    /// flock's framed stream over QUIC, on `lanes` lanes (0: one plain stream, as push does).
    Quic { lanes: u16 },
}

impl Method {
    pub fn label(&self) -> String {
        match self {
            Method::LocalPipe => "local pipe".into(),
            Method::Quic { lanes: 0 } => "flock, QUIC 1 stream".into(),
            Method::Quic { lanes } => format!("flock, QUIC {lanes} lanes"),
        }
    }
}

/// One snapshot moved.
#[derive(Clone, Debug)]
pub struct Moved {
    /// Payload bytes of the backend stream (what `zfs send` or the dir stream produced); 0
    /// when not counted (the zfs pipe).
    pub payload: u64,
    pub secs: f64,
    pub cpu_secs: f64,
}

/// The two sides of a dataset benchmark on one backend kind.
pub struct Sides {
    pub a: Arc<dyn Backend>,
    pub b: Arc<dyn Backend>,
    /// zfs: the dataset path of A's data file system and the pool the pipe receives into.
    zfs: Option<ZfsPaths>,
}

struct ZfsPaths {
    /// e.g. POOL/a
    root_a: String,
    /// e.g. POOL/pipe
    root_pipe: String,
}

pub const DATASET: &str = "bench";

impl Sides {
    pub fn dir(work: &Path) -> Result<Sides> {
        let a = DirBackend::open(work.join("dir-a"))?;
        let b = DirBackend::open(work.join("dir-b"))?;
        Ok(Sides {
            a: Arc::new(a),
            b: Arc::new(b),
            zfs: None,
        })
    }

    /// Both sides in `pool` (which must exist): POOL/a, POOL/b and POOL/pipe.
    pub fn zfs(pool: &str) -> Result<Sides> {
        for child in ["a", "b", "pipe"] {
            zfs(&["create", "-p", &format!("{pool}/{child}")])?;
        }
        let a = ZfsBackend::open(&format!("{pool}/a"))?;
        let b = ZfsBackend::open(&format!("{pool}/b"))?;
        Ok(Sides {
            a: Arc::new(a),
            b: Arc::new(b),
            zfs: Some(ZfsPaths {
                root_a: format!("{pool}/a"),
                root_pipe: format!("{pool}/pipe"),
            }),
        })
    }

    fn ds() -> DatasetName {
        DatasetName::new(DATASET).expect("a valid name")
    }

    /// Creates the source dataset with `full_mib` of data in snapshot s1 and `inc_mib` more in
    /// s2; clears the receiving side.
    pub fn prepare(&self, full_mib: u64, inc_mib: u64) -> Result<()> {
        let ds = Self::ds();
        for side in [&self.a, &self.b] {
            if side.info(&ds)?.is_some() {
                side.destroy(&ds)?;
            }
        }
        self.clear_pipe_target()?;
        self.a.create(&ds, None)?;
        let mount = self.a.mount_path(&ds)?;
        fill(&mount.join("full.bin"), full_mib, 1)?;
        // The dir backend copies again, next time, a file changed within the clock tick its
        // snapshot began in: leave that tick so the incremental carries only the new file.
        std::thread::sleep(Duration::from_millis(50));
        self.a.snapshot(&ds, &snap("s1"))?;
        fill(&mount.join("inc.bin"), inc_mib, 2)?;
        std::thread::sleep(Duration::from_millis(50));
        self.a.snapshot(&ds, &snap("s2"))?;
        Ok(())
    }

    /// Removes what a method received, so the next starts from nothing.
    pub fn clear_received(&self, method: &Method) -> Result<()> {
        match method {
            Method::LocalPipe if self.zfs.is_some() => self.clear_pipe_target(),
            _ => {
                let ds = Self::ds();
                if self.b.info(&ds)?.is_some() {
                    self.b.destroy(&ds)?;
                }
                Ok(())
            }
        }
    }

    fn clear_pipe_target(&self) -> Result<()> {
        if let Some(z) = &self.zfs {
            let target = format!("{}/{DATASET}", z.root_pipe);
            if zfs(&["list", "-H", "-o", "name", &target]).is_ok() {
                // zfs-fuse says "dataset is busy" for a while after a receive: retry.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match zfs(&["destroy", "-r", &target]) {
                        Ok(_) => break,
                        Err(e) if e.to_string().contains("busy") && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(250))
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    pub fn cleanup(&self) -> Result<()> {
        let ds = Self::ds();
        for side in [&self.a, &self.b] {
            if side.info(&ds)?.is_some() {
                side.destroy(&ds)?;
            }
        }
        self.clear_pipe_target()
    }

    /// Moves s1 (full) then s2 (incremental from s1) by `method`.
    pub fn run(
        &self,
        method: &Method,
        pair: &Pair,
        tls: &NodeTls,
        tuning: &QuicTuning,
    ) -> Result<[Moved; 2]> {
        let ds = Self::ds();
        let full = StreamSpec::full(ds.clone(), snap("s1"));
        let inc = StreamSpec::incremental(ds, snap("s1"), snap("s2"));
        let one = |spec: &StreamSpec| -> Result<Moved> {
            let cpu0 = cpu_time();
            let start = Instant::now();
            let (payload, end) = match method {
                Method::LocalPipe => match &self.zfs {
                    Some(z) => (self.zfs_pipe(z, spec)?, Instant::now()),
                    None => (self.dir_pipe(spec)?, Instant::now()),
                },
                Method::Quic { lanes } => self.quic(spec, *lanes, pair, tls, tuning)?,
            };
            Ok(Moved {
                payload,
                secs: (end - start).as_secs_f64(),
                cpu_secs: cpu_time() - cpu0,
            })
        };
        let full = one(&full).context("full stream")?;
        let inc = one(&inc).context("incremental stream")?;
        Ok([full, inc])
    }

    /// `zfs send | zfs receive` in a shell pipeline.
    fn zfs_pipe(&self, z: &ZfsPaths, spec: &StreamSpec) -> Result<u64> {
        let data = format!("{}/{}/data", z.root_a, spec.dataset);
        let target = format!("{data}@{}", spec.target);
        let base = spec
            .base
            .as_ref()
            .map(|b| format!("-i {data}@{b} "))
            .unwrap_or_default();
        let into = format!("{}/{DATASET}", z.root_pipe);
        // The same host-wide lock the zfs backend takes for its commands: zfs-fuse wedges
        // under concurrent zfs commands.
        let _lock = HostLock::acquire();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; zfs send {base}{target} | zfs receive -F {into}"
            ))
            .output()
            .context("cannot run bash for the zfs pipeline")?;
        if !out.status.success() {
            bail!(
                "zfs send | zfs receive failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // The stream's size is not counted here (a counter in the pipe would cost the
        // baseline a copy); it is the same stream flock sends, whose size flock counts.
        Ok(0)
    }

    /// The dir backend's send into an OS pipe and its receive out of it.
    fn dir_pipe(&self, spec: &StreamSpec) -> Result<u64> {
        let (mut r, mut w) = os_pipe()?;
        let a = self.a.clone();
        let b = self.b.clone();
        let sender = {
            let spec = spec.clone();
            std::thread::spawn(move || -> Result<u64> {
                let mut s = a.send(&spec)?;
                let n = io::copy(&mut s, &mut w)?;
                w.flush()?;
                Ok(n)
            })
        };
        let received = b.receive(spec, None, &mut r);
        let sent = sender
            .join()
            .map_err(|_| anyhow!("the sending thread panicked"))?;
        received?;
        sent
    }

    /// flock's framed stream over a fresh tuned QUIC connection between the two runtimes;
    /// the stream's size and when the receiver committed it.
    fn quic(
        &self,
        spec: &StreamSpec,
        lanes: u16,
        pair: &Pair,
        tls: &NodeTls,
        tuning: &QuicTuning,
    ) -> Result<(u64, Instant)> {
        let loopback = "127.0.0.1:0".parse().expect("an address");
        let server = {
            let _g = pair.receiver.enter();
            tuning.open(loopback, tls, true)?.endpoint
        };
        let client = {
            let _g = pair.sender.enter();
            tuning.open(loopback, tls, false)?.endpoint
        };
        let addr = server.local_addr()?;
        let b = self.b.clone();
        let srv = server.clone();
        let rx = pair.receiver.spawn(async move {
            let conn = srv
                .accept()
                .await
                .ok_or_else(|| anyhow!("endpoint closed"))?
                .await?;
            let cancel = CancellationToken::new();
            let got = if lanes == 0 {
                let s = conn.accept_uni().await?;
                receive_framed_async(b, s, |_| Ok(()), cancel).await?
            } else {
                let r = lanes::accept(&conn).await?;
                receive_framed_async(b, r, |_| Ok(()), cancel).await?
            };
            let committed = Instant::now();
            // Let the sender see its data acknowledged before the connection goes.
            tokio::time::sleep(Duration::from_millis(20)).await;
            conn.close(0u32.into(), b"done");
            Ok::<_, anyhow::Error>((got, committed))
        });
        let a = self.a.clone();
        let spec = spec.clone();
        let sent = pair.sender.block_on(async {
            let conn = client.connect(addr, flock_tls::SERVER_NAME)?.await?;
            let sent = if lanes == 0 {
                let mut s = conn.open_uni().await?;
                let sent = send_framed_async(a, spec, &mut s, |_, _| {}).await?;
                s.finish()?;
                let _ = s.stopped().await;
                sent
            } else {
                let mut w = lanes::open(&conn, 1, lanes).await?;
                let sent = send_framed_async(a, spec, &mut w, |_, _| {}).await?;
                w.shutdown().await?;
                sent
            };
            Ok::<_, anyhow::Error>(sent)
        });
        let received = pair
            .receiver
            .block_on(rx)
            .map_err(|e| anyhow!("receiver task: {e}"))?;
        let sent = sent.context("sender")?;
        let (_, committed) = received.context("receiver")?;
        pair.sender.block_on(client.wait_idle());
        server.close(0u32.into(), b"done");
        Ok((sent.totals.payload_bytes, committed))
    }
}

fn snap(name: &str) -> SnapshotName {
    SnapshotName::new(name).expect("a valid snapshot name")
}

/// Writes `mib` MiB of incompressible bytes (xorshift) to `path`.
fn fill(path: &Path, mib: u64, seed: u64) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
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
    f.flush()?;
    f.get_ref().sync_all()
}

fn os_pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the array it is given.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Runs `zfs ARGS`; its stdout, or an error with its stderr.
pub fn zfs(args: &[&str]) -> Result<String> {
    let _lock = HostLock::acquire();
    let out = Command::new("zfs")
        .args(args)
        .output()
        .with_context(|| format!("cannot run zfs {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "zfs {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `zpool ARGS`, under the host lock.
pub fn zpool(args: &[&str]) -> Result<()> {
    let _lock = HostLock::acquire();
    let out = Command::new("zpool")
        .args(args)
        .output()
        .with_context(|| format!("cannot run zpool {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "zpool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A file-backed zfs pool for the benchmark, destroyed on drop.
pub struct Pool {
    pub name: String,
    file: PathBuf,
}

impl Pool {
    pub fn create(dir: &Path, size_gib: u64) -> Result<Pool> {
        Self::create_named(dir, size_gib, &format!("flockbench{}", std::process::id()))
    }

    pub fn create_named(dir: &Path, size_gib: u64, name: &str) -> Result<Pool> {
        let name = name.to_string();
        let file = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&file)?;
        f.set_len(size_gib << 30)?;
        drop(f);
        zpool(&["create", &name, &file.display().to_string()])
            .context("cannot create the benchmark's zfs pool (is zfs-fuse running?)")?;
        Ok(Pool { name, file })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // zfs-fuse can call a pool busy for a while after its last user went away.
        for attempt in 1..=40 {
            match zpool(&["destroy", "-f", &self.name]) {
                Ok(()) => break,
                Err(e) if attempt == 40 => eprintln!("flock-streams: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The zfs backend's host-wide lock (`flock(2)` on a file in the temp dir), held while a zfs
/// command or pipeline of this benchmark runs.
struct HostLock(#[allow(dead_code)] Option<std::fs::File>);

impl HostLock {
    fn acquire() -> Self {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("flock-zfs-commands.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok();
        if let Some(f) = &file {
            // SAFETY: a valid open descriptor; the lock goes with the file.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        HostLock(file)
    }
}
