//! Raw transports on loopback: the same payload from one runtime to another over plain TCP,
//! TLS 1.3 over TCP (tokio-rustls, the cluster's certificates, mutual TLS) and QUIC (quinn, the
//! same certificates) with a given tuning and number of parallel streams.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use flock_tls::pki::NodeTls;
use flock_transport::quic::QuicTuning;

/// The writes the sender makes, as the dataset sender's frames.
pub const WRITE_LEN: usize = 256 << 10;

/// One way of carrying bytes.
#[derive(Clone, Debug)]
pub enum Transport {
    Tcp,
    Tls,
    Quic {
        tuning: Box<QuicTuning>,
        /// 0: one plain stream (quinn's own `AsyncWrite`/`AsyncRead`); 1 or more: that many lanes
        /// ([`flock_transport::lanes`]).
        lanes: usize,
    },
}

/// Two runtimes, as two nodes: the receiver's and the sender's.
pub struct Pair {
    pub receiver: tokio::runtime::Runtime,
    pub sender: tokio::runtime::Runtime,
}

impl Pair {
    pub fn new(workers: usize) -> Result<Pair> {
        let rt = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(name)
                .enable_all()
                .build()
        };
        Ok(Pair {
            receiver: rt("receiver")?,
            sender: rt("sender")?,
        })
    }
}

/// One measured transfer.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    pub bytes: u64,
    /// From the sender's first write to the receiver's last read.
    pub secs: f64,
    /// CPU time (user + system) of the whole process over the transfer, in seconds.
    pub cpu_secs: f64,
    /// UDP datagrams the kernel dropped for want of receive buffer space during the transfer
    /// (the system-wide RcvbufErrors counter).
    pub udp_drops: u64,
}

impl Measure {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }

    /// CPU seconds (both sides together) per GB moved.
    pub fn cpu_per_gb(&self) -> f64 {
        self.cpu_secs / (self.bytes as f64 / 1e9)
    }
}

/// The system-wide count of UDP datagrams dropped because a receive buffer was full.
pub fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of this process so far.
pub fn cpu_time() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// A payload block of pseudo-random bytes (incompressible, as real data mostly is).
pub fn payload_block() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; 1 << 20];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

async fn write_payload<W: AsyncWrite + Unpin>(w: &mut W, block: &[u8], bytes: u64) -> Result<()> {
    let mut left = bytes;
    while left > 0 {
        for piece in block.chunks(WRITE_LEN) {
            let n = (piece.len() as u64).min(left) as usize;
            w.write_all(&piece[..n]).await?;
            left -= n as u64;
            if left == 0 {
                break;
            }
        }
    }
    w.flush().await?;
    Ok(())
}

/// Reads to the end; returns the byte count and when the last byte arrived.
async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u64, Instant)> {
    let mut buf = vec![0u8; WRITE_LEN];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, Instant::now()));
        }
        total += n as u64;
    }
}

/// Waits for the receiver to close: a socket closed with unread data (TLS 1.3's session
/// tickets) resets the connection, and the receiver would lose what it had not read yet.
async fn drain<R: AsyncRead + Unpin>(r: &mut R) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = r.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

/// Sends `bytes` from the sender runtime to the receiver runtime over `t`.
pub fn measure(pair: &Pair, tls: &NodeTls, t: &Transport, bytes: u64) -> Result<Measure> {
    let block = Arc::new(payload_block());
    match t {
        Transport::Tcp => {
            let listener = pair
                .receiver
                .block_on(TcpListener::bind(loopback()))
                .context("bind")?;
            let addr = listener.local_addr()?;
            let rx = pair.receiver.spawn(async move {
                let (mut s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                read_all(&mut s).await
            });
            pair.sender.block_on(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                timed(rx, async move {
                    write_payload(&mut s, &block, bytes).await?;
                    s.shutdown().await?;
                    drain(&mut s).await;
                    Ok(())
                })
                .await
            })
        }
        Transport::Tls => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.tls13_server()?));
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.tls13_client()?));
            let listener = pair.receiver.block_on(TcpListener::bind(loopback()))?;
            let addr = listener.local_addr()?;
            let rx = pair.receiver.spawn(async move {
                let (s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                let mut s = acceptor.accept(s).await?;
                read_all(&mut s).await
            });
            pair.sender.block_on(async move {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(flock_tls::SERVER_NAME)?;
                let mut s = connector.connect(name, s).await?;
                timed(rx, async move {
                    write_payload(&mut s, &block, bytes).await?;
                    s.shutdown().await?;
                    drain(&mut s).await;
                    Ok(())
                })
                .await
            })
        }
        Transport::Quic { tuning, lanes } => {
            let server = {
                let _g = pair.receiver.enter();
                tuning.open(loopback(), tls, true)?.endpoint
            };
            let client = {
                let _g = pair.sender.enter();
                tuning.open(loopback(), tls, false)?.endpoint
            };
            let addr = server.local_addr()?;
            let lanes = *lanes;
            let srv = server.clone();
            let rx = pair.receiver.spawn(async move {
                let conn = srv
                    .accept()
                    .await
                    .ok_or_else(|| anyhow!("endpoint closed"))?
                    .await?;
                let r = if lanes == 0 {
                    let mut s = conn.accept_uni().await?;
                    read_all(&mut s).await
                } else {
                    let mut r = flock_transport::lanes::accept(&conn).await?;
                    read_all(&mut r).await
                };
                // Let the sender see its data acknowledged before the connection goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                conn.close(0u32.into(), b"done");
                r
            });
            let m = pair.sender.block_on(async {
                let conn = client.connect(addr, flock_tls::SERVER_NAME)?.await?;
                let m = timed(rx, async {
                    if lanes == 0 {
                        let mut s = conn.open_uni().await?;
                        write_payload(&mut s, &block, bytes).await?;
                        s.finish()?;
                        let _ = s.stopped().await;
                    } else {
                        let mut w = flock_transport::lanes::open(&conn, 1, lanes as u16).await?;
                        write_payload(&mut w, &block, bytes).await?;
                        w.shutdown().await?;
                    }
                    Ok(())
                })
                .await;
                tracing_stats(&conn.stats());
                conn.close(0u32.into(), b"done");
                m
            });
            pair.sender.block_on(client.wait_idle());
            server.close(0u32.into(), b"done");
            pair.receiver.block_on(server.wait_idle());
            m
        }
    }
}

/// The sender's connection statistics, at debug level (RUST_LOG=flock_streams=debug).
fn tracing_stats(s: &quinn::ConnectionStats) {
    tracing::debug!(
        datagrams = s.udp_tx.datagrams,
        ios = s.udp_tx.ios,
        bytes = s.udp_tx.bytes,
        mtu = s.path.current_mtu,
        cwnd = s.path.cwnd,
        rtt = ?s.path.rtt,
        lost = s.path.lost_packets,
        congestion_events = s.path.congestion_events,
        "QUIC sender"
    );
}

/// Runs `send` and waits for the receiver; the time runs from the start of `send` to the
/// receiver's last read.
async fn timed(
    rx: tokio::task::JoinHandle<Result<(u64, Instant)>>,
    send: impl std::future::Future<Output = Result<()>>,
) -> Result<Measure> {
    let cpu0 = cpu_time();
    let drops0 = udp_rcvbuf_errors();
    let start = Instant::now();
    send.await.context("sender")?;
    let (bytes, end) = rx.await.context("receiver task")?.context("receiver")?;
    let cpu = cpu_time() - cpu0;
    if end < start {
        bail!("receiver finished before the sender started");
    }
    Ok(Measure {
        bytes,
        secs: (end - start).as_secs_f64(),
        cpu_secs: cpu,
        udp_drops: udp_rcvbuf_errors() - drops0,
    })
}
