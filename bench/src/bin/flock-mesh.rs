//! flock-mesh: throughput and added latency of a TCP connection through the routing mesh
//! against a direct connection to the app (issue 8), in one run, on a release `flockd dev`
//! cluster (3 nodes, process driver).
//!
//! This binary is also the app: `flock-mesh --serve PORT` listens on 127.0.0.1:PORT, a thread
//! per connection; the first byte of a connection picks what it does:
//! - `E`: echo every byte back (latency);
//! - `S`: sink: read to the end of stream, then answer the count as 8 bytes, little-endian
//!   (throughput);
//! - `V`: verify: an 8-byte seed, then the xorshift pattern of that seed, checked as it
//!   arrives; answers the count and the offset of the first wrong byte (`u64::MAX`: none).
//!
//! The benchmark deploys itself that way with flockctl, pinned to n1, with its port published
//! (internal PORT, external EXT), waits until `flockctl app ls --json` shows it running and
//! served by every node's mesh (on `flockd dev` node I's mesh listens on 127.0.0.I), then
//! measures four paths, interleaved over `--reps` repetitions so drifting load hits all
//! alike:
//! - **direct**: 127.0.0.1:PORT;
//! - **mesh on n1**, the node that runs the app: 127.0.0.1:EXT;
//! - **mesh on n2**, another node: 127.0.0.2:EXT. n2 forwards to n1's address (127.0.0.1) at
//!   PORT: on one machine that is loopback too, so this path is the same work as the one
//!   before; between machines it adds a network hop.
//! - **reference relay** (unless `--no-reference`): this binary as `--relay`, a blocking thread
//!   per direction moving bytes with splice(2) through a 1 MiB pipe (the mesh's algorithm
//!   without tokio or flockd), in front of the app: what any forwarder costs on this machine.
//!
//! For each: the bytes of a `V` stream (`--verify-bytes`) arrive intact; round trips of a
//! `--size`-byte message on one connection (`--rounds`, after a warm-up); fresh connections,
//! each timed from connect to its first round trip (`--connects`); one connection streaming
//! `--bytes` one way, and `--parallel` connections streaming `--bytes` in all, with the CPU
//! time of the forwarder (flockd, all three nodes in one process; or the relay), the app,
//! this client and the whole machine. The sink's count must equal the bytes sent, every echo
//! must equal its message, the app must be the same process at the end: otherwise it exits
//! non-zero.
//!
//! Prints a markdown table and the commands used; stops the cluster (SIGINT to `flockd dev`,
//! which stops its apps) and removes its data dir at the end, also on error (`--keep` keeps
//! it, with flockd's log). Every wait is bounded.

#[path = "../devcluster.rs"]
mod devcluster;
#[path = "../sysinfo.rs"]
mod sysinfo;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::Value;

use devcluster::{
    bin_dir, catch_sigint, check_interrupted, command_line, commands_block, human, load_average,
    machine, note, start_clock, until, write_pattern, Dev, Pattern,
};

/// Throughput and added latency of connections through flock's routing mesh against direct
/// connections to the app, on a `flockd dev` cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Run as the benchmark's app: serve on 127.0.0.1:PORT (how flockd runs this binary).
    #[arg(long, value_name = "PORT")]
    serve: Option<u16>,
    /// API port of the dev cluster's first node; the other two take the next ports.
    #[arg(long, default_value_t = 7981)]
    port: u16,
    /// Where flockd and flockctl are (default: this binary's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Bytes one throughput measurement streams (one connection; the parallel one splits
    /// them), with a unit (K, M, G: powers of 1024).
    #[arg(long, default_value = "4G", value_parser = flock_client::parse_size)]
    bytes: u64,
    /// Bytes of the integrity check on each path, before the measurements.
    #[arg(long, default_value = "256M", value_parser = flock_client::parse_size)]
    verify_bytes: u64,
    /// Round trips per path on one connection (split over the repetitions).
    #[arg(long, default_value_t = 30_000)]
    rounds: u64,
    /// Fresh connections per path, each with one round trip (split over the repetitions).
    #[arg(long, default_value_t = 1_500)]
    connects: u64,
    /// The message of a round trip, in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Parallel connections of the second throughput measurement (below 2: not measured).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Repetitions, the paths interleaved in each; throughput is the median of them.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The app's port, internal (default: a free one).
    #[arg(long)]
    app_port: Option<u16>,
    /// The app's published port, external (default: a free one).
    #[arg(long)]
    ext_port: Option<u16>,
    /// Leave out the reference path: a minimal relay (this binary, `--relay`: a blocking
    /// thread per direction, splice(2) through a 1 MiB pipe, as the mesh does) in front of the
    /// app, which tells the cost of any forwarder on this machine from the mesh's own.
    #[arg(long)]
    no_reference: bool,
    /// Run as the reference relay: listen on 127.0.0.1:PORT, forward to 127.0.0.1:TARGET.
    #[arg(long, num_args = 2, value_names = ["PORT", "TARGET"], hide = true)]
    relay: Option<Vec<u16>>,
    /// Keep the cluster's data dir and flockd's log at the end (default: removed).
    #[arg(long)]
    keep: bool,
}

/// The app's name.
const APP: &str = "meshbench";
/// Round trips before the measured ones on each latency connection.
const WARM_ROUNDS: u64 = 500;
/// The most any read or write of the client may wait.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes of the throughput client and reads of the sink.
const CHUNK: usize = 1 << 20;
/// Throughput below this share of the direct path is called out in the report.
const POOR: f64 = 0.7;

// ---------------------------------------------------------------------------------------------
// The app.

fn serve(port: u16) -> Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    println!("flock-mesh: serving on 127.0.0.1:{port}");
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                thread::spawn(move || {
                    if let Err(e) = handle(s) {
                        if e.kind() != io::ErrorKind::UnexpectedEof {
                            eprintln!("flock-mesh: connection: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("flock-mesh: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

fn handle(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        b'E' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        }
        b'S' => {
            let mut buf = vec![0u8; CHUNK];
            let mut count = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => count += n as u64,
                }
            }
            s.write_all(&count.to_le_bytes())
        }
        b'V' => {
            let mut seed = [0u8; 8];
            s.read_exact(&mut seed)?;
            let mut p = Pattern::new(u64::from_le_bytes(seed));
            let (mut got, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
            let (mut count, mut bad) = (0u64, u64::MAX);
            loop {
                let n = read_full(&mut s, &mut got)?;
                if n == 0 {
                    break;
                }
                p.fill(&mut want[..n]);
                if bad == u64::MAX {
                    if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                        bad = count + i as u64;
                    }
                }
                count += n as u64;
                if n < got.len() {
                    break;
                }
            }
            let mut reply = [0u8; 16];
            reply[..8].copy_from_slice(&count.to_le_bytes());
            reply[8..].copy_from_slice(&bad.to_le_bytes());
            s.write_all(&reply)
        }
        m => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {m}"),
        )),
    }
}

/// Reads until `buf` is full or the stream ends; the bytes read.
fn read_full(s: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The reference forwarder: 127.0.0.1:`port` to 127.0.0.1:`target`, a thread per direction
/// moving bytes with splice(2) through a pipe, blocking.
fn relay(port: u16, target: u16) -> Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    for conn in l.incoming() {
        let Ok(client) = conn else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        thread::spawn(move || {
            let Ok(app) = TcpStream::connect(("127.0.0.1", target)) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = app.set_nodelay(true);
            let (Ok(c2), Ok(a2)) = (client.try_clone(), app.try_clone()) else {
                return;
            };
            let back = thread::spawn(move || relay_half(&a2, &c2));
            let _ = relay_half(&client, &app);
            let _ = back.join();
        });
    }
    Ok(())
}

/// One direction of the relay, until `from` ends; then ends `to`'s writing side.
fn relay_half(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is an array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: two open descriptors, now owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let size = if got > 0 { got as usize } else { 64 * 1024 };
    let splice = |a: libc::c_int, b: libc::c_int, len: usize| -> io::Result<usize> {
        // SAFETY: open descriptors; null offsets, as sockets and pipes require.
        let n = unsafe {
            libc::splice(
                a,
                std::ptr::null_mut(),
                b,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    };
    loop {
        let n = splice(from.as_raw_fd(), w.as_raw_fd(), size)?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            left -= splice(r.as_raw_fd(), to.as_raw_fd(), left)?;
        }
    }
    to.shutdown(Shutdown::Write)
}

/// The reference relay as a child process, killed on drop.
struct Relay(Child);

impl Relay {
    fn start(me: &Path, port: u16, target: u16) -> Result<Relay> {
        let child = Command::new(me)
            .args(["--relay", &port.to_string(), &target.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the reference relay")?;
        Ok(Relay(child))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster.

/// What flock-mesh asks of the cluster.
impl Dev {
    /// flockd's log lines after byte `from` that speak of the routing mesh.
    fn mesh_log(&self, from: u64) -> Vec<String> {
        self.log_since(from)
            .lines()
            .filter(|l| l.contains("routing mesh") || l.contains("mesh::"))
            .map(str::to_string)
            .collect()
    }
    /// The app in `flockctl app ls --json`, if listed.
    fn app(&self) -> Result<Option<Value>> {
        let text = self.ctl(&["app", "ls", "--json"], Duration::from_secs(30))?;
        let apps: Value =
            serde_json::from_str(&text).with_context(|| format!("flockctl app ls: {text}"))?;
        let app = apps
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"] == APP))
            .cloned();
        if let Some(a) = &app {
            self.saw_app(a);
        }
        Ok(app)
    }
}

/// Writes the app's configuration, pinned to n1; deploys it and waits until it runs and
/// every node's mesh serves its external port. The app's process id.
fn deploy(dev: &Dev, me: &Path, app_port: u16, ext_port: u16) -> Result<u32> {
    let conf = dev.dir.join("conf");
    fs::create_dir_all(&conf)?;
    let application = conf.join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n  {APP}:\n    command: [\"{}\", \"--serve\", \"{app_port}\"]\n    ports:\n      - internal: {app_port}\n        external: {ext_port}\n    restart_policy:\n      name: never\n",
            me.display()
        ),
    )?;
    let deployment = conf.join("deployment.yml");
    fs::write(
        &deployment,
        format!("version: 1\nnodes:\n  n1: [{APP}]\n  n2: []\n  n3: []\n"),
    )?;
    dev.deploy(&deployment, &application, APP, "n1")?;
    let want: Vec<String> = (1..=3).map(|i| format!("127.0.0.{i}:{ext_port}")).collect();
    let mut last = Value::Null;
    let waited = until(
        "the app to run on n1 and every node's mesh to serve its port",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let Some(a) = dev.app()? else {
                return Ok(None);
            };
            ensure!(
                a["state"] != "exited" && a["state"] != "failed",
                "the app ended: {a}"
            );
            let endpoints: Vec<&str> = a["endpoints"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let ready = a["node"] == "n1"
                && a["state"] == "running"
                && want.iter().all(|w| endpoints.contains(&w.as_str()));
            let pid = a["id"].as_str().and_then(|i| i.parse().ok());
            last = a;
            Ok(ready.then_some(pid).flatten())
        },
    );
    waited.with_context(|| format!("last `app ls`: {last}"))
}

// ---------------------------------------------------------------------------------------------
// The client.

/// One way to reach the app.
struct Route {
    name: &'static str,
    addr: SocketAddr,
    /// The process that forwards (flockd; for the direct path too, where it only idles).
    fwd: u32,
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// `rounds` round trips of `size` bytes on one connection, after a warm-up, into `hist` (ns).
fn latency(addr: SocketAddr, rounds: u64, size: usize, hist: &mut Histogram<u64>) -> Result<()> {
    let mut s = connect(addr)?;
    s.write_all(b"E")?;
    let (mut msg, mut back) = (vec![0u8; size], vec![0u8; size]);
    for i in 0..WARM_ROUNDS + rounds {
        for (j, b) in msg.iter_mut().enumerate() {
            *b = (i as usize).wrapping_add(j) as u8;
        }
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("reading echo {i} from {addr}"))?;
        let ns = t.elapsed().as_nanos() as u64;
        ensure!(back == msg, "echo {i} from {addr} differs from its message");
        if i >= WARM_ROUNDS {
            hist.saturating_record(ns.max(1));
        }
    }
    Ok(())
}

/// `n` fresh connections, each timed from connect to the end of its first round trip.
fn setups(addr: SocketAddr, n: u64, size: usize, hist: &mut Histogram<u64>) -> Result<()> {
    let mut msg = vec![b'E'; size + 1];
    let mut back = vec![0u8; size];
    for i in 0..n {
        for (j, b) in msg[1..].iter_mut().enumerate() {
            *b = (i as usize).wrapping_mul(7).wrapping_add(j) as u8;
        }
        let t = Instant::now();
        let mut s = connect(addr)?;
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("reading the first echo of connection {i} to {addr}"))?;
        let ns = t.elapsed().as_nanos() as u64;
        ensure!(
            back == msg[1..],
            "the echo of fresh connection {i} to {addr} differs from its message"
        );
        hist.saturating_record(ns.max(1));
    }
    Ok(())
}

/// Streams `bytes` to the sink on one connection; the time from the first byte to the
/// sink's count, which must equal `bytes`.
fn stream(addr: SocketAddr, bytes: u64, buf: &[u8]) -> Result<Duration> {
    let mut s = connect(addr)?;
    let t = Instant::now();
    s.write_all(b"S")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])
            .with_context(|| format!("streaming to {addr}, {} bytes sent", bytes - left))?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply)
        .with_context(|| format!("reading the sink's count from {addr}"))?;
    let took = t.elapsed();
    let counted = u64::from_le_bytes(reply);
    ensure!(
        counted == bytes,
        "the sink behind {addr} counted {counted} bytes, {bytes} were sent"
    );
    Ok(took)
}

/// `bytes` over `n` parallel connections (split evenly); the time until the last count.
fn streams(addr: SocketAddr, bytes: u64, n: usize, buf: &[u8]) -> Result<Duration> {
    let t = Instant::now();
    let each = bytes / n as u64;
    thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let b = if i == 0 {
                    bytes - each * (n as u64 - 1)
                } else {
                    each
                };
                sc.spawn(move || stream(addr, b, buf))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("a streaming thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(t.elapsed())
}

/// Sends `bytes` of the pattern to the verifying sink; fails unless all arrived intact.
fn verify(addr: SocketAddr, bytes: u64, seed: u64) -> Result<()> {
    let mut s = connect(addr)?;
    s.write_all(b"V")?;
    s.write_all(&seed.to_le_bytes())?;
    write_pattern(&mut s, bytes, seed)?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .with_context(|| format!("reading the verifier's answer from {addr}"))?;
    let count = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    let bad = u64::from_le_bytes(reply[8..].try_into().expect("8 bytes"));
    ensure!(
        count == bytes,
        "the verifier behind {addr} received {count} bytes, {bytes} were sent"
    );
    ensure!(
        bad == u64::MAX,
        "the bytes through {addr} changed on the way: the first wrong one at offset {bad}"
    );
    Ok(())
}

/// CPU seconds (user + system) of process `pid` so far; 0 when it is gone.
fn cpu_of(pid: &str) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) as f64 / hz
}

/// CPU seconds of the forwarder (flockd, or the reference relay), the app, this process, and
/// the whole machine (busy time of all CPUs, softirq included, other work too).
#[derive(Clone, Copy, Default)]
struct Cpu {
    fwd: f64,
    app: f64,
    client: f64,
    machine: f64,
}

impl Cpu {
    fn now(fwd: u32, app: u32) -> Cpu {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Cpu {
            fwd: cpu_of(&fwd.to_string()),
            app: cpu_of(&app.to_string()),
            client: cpu_of("self"),
            machine: sysinfo::busy_counters().map_or(0.0, |(t, i)| t.saturating_sub(i) as f64 / hz),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            fwd: self.fwd - before.fwd,
            app: self.app - before.app,
            client: self.client - before.client,
            machine: self.machine - before.machine,
        }
    }

    fn add(&mut self, o: Cpu) {
        self.fwd += o.fwd;
        self.app += o.app;
        self.client += o.client;
        self.machine += o.machine;
    }
}

/// One path's figures.
struct Figures {
    rtt: Histogram<u64>,
    setup: Histogram<u64>,
    /// Seconds of each one-connection stream, and the CPU they took in all.
    single: Vec<f64>,
    single_cpu: Cpu,
    parallel: Vec<f64>,
    parallel_cpu: Cpu,
}

impl Figures {
    /// Nanoseconds, up to a minute.
    fn histogram() -> Result<Histogram<u64>> {
        Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?)
    }

    fn new() -> Result<Figures> {
        Ok(Figures {
            rtt: Self::histogram()?,
            setup: Self::histogram()?,
            single: Vec::new(),
            single_cpu: Cpu::default(),
            parallel: Vec::new(),
            parallel_cpu: Cpu::default(),
        })
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// GB/s (10^9) of `bytes` in each of `secs`: the median, the min and the max.
fn rates(bytes: u64, secs: &[f64]) -> (f64, f64, f64) {
    let r: Vec<f64> = secs.iter().map(|s| bytes as f64 / s / 1e9).collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(0.0, f64::max);
    (median(&r), min, max)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

// ---------------------------------------------------------------------------------------------
// The machine and the report.

struct Run<'a> {
    args: &'a Args,
    paths: &'a [Route],
    figs: &'a [Figures],
    date: String,
    machine: String,
    busy_during: f64,
    elapsed: f64,
    commands: Vec<String>,
    mesh_log: Vec<String>,
}

fn report(r: &Run) -> String {
    let a = r.args;
    let mut s = String::new();
    s.push_str(&format!(
        "- date: {}\n- machine: {}; CPUs {:.0}% busy on average over the run ({:.0} s), 1-minute load average {} at its end\n",
        r.date,
        r.machine,
        r.busy_during * 100.0,
        r.elapsed,
        load_average()
    ));
    s.push_str(&command_line());
    s.push_str(&format!(
        "- setup: `flockd dev` (3 nodes, one process; node I's mesh on 127.0.0.I); the app is this binary (`flock-mesh --serve {}`: a thread per connection, echo or sink), process driver, pinned to n1, port {} published as {}; {} repetitions, the paths interleaved in each; round trips: {} x {} bytes on one connection per path after {} warm-up; setup: {} fresh connections per path, connect to the end of the first {}-byte round trip; throughput: {} one way, one connection{}, timed from the first byte to the sink's count; integrity: {} of a pattern checked by the app on each path, every echo compared, every count checked\n\n",
        r.paths[0].addr.port(),
        r.paths[0].addr.port(),
        r.paths.get(1).map_or(0, |p| p.addr.port()),
        a.reps,
        a.rounds,
        a.size,
        WARM_ROUNDS,
        a.connects,
        a.size,
        human(a.bytes),
        if a.parallel >= 2 {
            format!(
                ", then {} connections of {} each",
                a.parallel,
                human(a.bytes / a.parallel as u64)
            )
        } else {
            String::new()
        },
        human(a.verify_bytes),
    ));
    let d = &r.figs[0];
    s.push_str("| measure |");
    for p in r.paths {
        s.push_str(&format!(" {} `{}` |", p.name, p.addr));
    }
    s.push_str("\n|---|");
    for _ in r.paths {
        s.push_str("---:|");
    }
    s.push('\n');
    let lat_row = |s: &mut String, label: &str, f: &dyn Fn(&Histogram<u64>) -> f64, which: u8| {
        s.push_str(&format!("| {label} |"));
        for (i, fg) in r.figs.iter().enumerate() {
            let h = if which == 0 { &fg.rtt } else { &fg.setup };
            let hd = if which == 0 { &d.rtt } else { &d.setup };
            let v = f(h);
            if i == 0 {
                s.push_str(&format!(" {v:.1} |"));
            } else {
                s.push_str(&format!(" {v:.1} ({:+.1}) |", v - f(hd)));
            }
        }
        s.push('\n');
    };
    let b = a.size;
    lat_row(
        &mut s,
        &format!("round trip {b} B, p50 (µs)"),
        &|h| us(h.value_at_quantile(0.5)),
        0,
    );
    lat_row(
        &mut s,
        &format!("round trip {b} B, p99 (µs)"),
        &|h| us(h.value_at_quantile(0.99)),
        0,
    );
    lat_row(
        &mut s,
        &format!("round trip {b} B, mean (µs)"),
        &|h| h.mean() / 1e3,
        0,
    );
    lat_row(
        &mut s,
        "connect + first round trip, p50 (µs)",
        &|h| us(h.value_at_quantile(0.5)),
        1,
    );
    lat_row(
        &mut s,
        "connect + first round trip, p99 (µs)",
        &|h| us(h.value_at_quantile(0.99)),
        1,
    );
    // Mesh paths below POOR of direct; each mesh path against the reference relay.
    let (mut poor, mut vs_ref) = (Vec::new(), Vec::new());
    let reference = r.paths.iter().position(|p| p.name == "reference relay");
    let tput_row = |s: &mut String,
                    poor: &mut Vec<String>,
                    vs_ref: &mut Vec<String>,
                    label: &str,
                    short: &str,
                    secs: &dyn Fn(&Figures) -> &Vec<f64>| {
        s.push_str(&format!("| {label} |"));
        let (dm, _, _) = rates(a.bytes, secs(d));
        let rm = reference.map(|i| rates(a.bytes, secs(&r.figs[i])).0);
        for (i, fg) in r.figs.iter().enumerate() {
            let (m, lo, hi) = rates(a.bytes, secs(fg));
            if i == 0 {
                s.push_str(&format!(" {m:.2} ({lo:.2}-{hi:.2}) |"));
                continue;
            }
            let ratio = m / dm;
            s.push_str(&format!(" {m:.2} ({lo:.2}-{hi:.2}), {ratio:.2}x |"));
            if Some(i) != reference {
                if ratio < POOR {
                    poor.push(format!("{} {short}: {ratio:.2}x", r.paths[i].name));
                }
                if let Some(rm) = rm {
                    vs_ref.push(format!("{} {short}: {:.2}x", r.paths[i].name, m / rm));
                }
            }
        }
        s.push('\n');
    };
    tput_row(
        &mut s,
        &mut poor,
        &mut vs_ref,
        "throughput, 1 connection, GB/s median (min-max)",
        "1 connection",
        &|f| &f.single,
    );
    if a.parallel >= 2 {
        tput_row(
            &mut s,
            &mut poor,
            &mut vs_ref,
            &format!(
                "throughput, {} connections, GB/s median (min-max)",
                a.parallel
            ),
            &format!("{} connections", a.parallel),
            &|f| &f.parallel,
        );
    }
    let gb = (a.bytes as f64 * a.reps as f64) / 1e9;
    let cpu_row = |s: &mut String, label: &str, cpu: &dyn Fn(&Figures) -> Cpu| {
        s.push_str(&format!("| {label} |"));
        for fg in r.figs {
            let c = cpu(fg);
            s.push_str(&format!(
                " {:.2} / {:.2} / {:.2} / {:.2} |",
                c.fwd / gb,
                c.app / gb,
                c.client / gb,
                c.machine / gb
            ));
        }
        s.push('\n');
    };
    cpu_row(
        &mut s,
        "CPU s/GB, 1 connection: forwarder / app / client / machine",
        &|f| f.single_cpu,
    );
    if a.parallel >= 2 {
        cpu_row(
            &mut s,
            &format!(
                "CPU s/GB, {} connections: forwarder / app / client / machine",
                a.parallel
            ),
            &|f| f.parallel_cpu,
        );
    }
    s.push_str("\nIn parentheses: latency added over the direct path (µs); for throughput the min-max over the repetitions and the ratio of the medians to the direct path's. CPU: forwarder is flockd (all three nodes: one process; on the direct path it only idles) or the reference relay; machine is the busy time of all CPUs (softirq included, which the processes' own figures leave out; other work on the machine too).");
    if let Some(i) = reference {
        s.push_str(&format!(
            " The reference relay (`{}`) is this binary's `--relay`: a blocking thread per direction moving bytes with splice(2) through a 1 MiB pipe, what the mesh does in tokio tasks; it tells what any forwarder costs on this machine (its fresh connections include spawning two threads).",
            r.paths[i].addr
        ));
    }
    s.push('\n');
    if poor.is_empty() {
        s.push_str(&format!(
            "\nThroughput through the mesh at or above {POOR}x of the direct path on every path.\n"
        ));
    } else {
        s.push_str(&format!(
            "\n**Throughput through the mesh below {POOR}x of the direct path**: {}.\n",
            poor.join("; ")
        ));
    }
    if !vs_ref.is_empty() {
        s.push_str(&format!(
            "\nMesh throughput against the reference relay's (medians): {}.\n",
            vs_ref.join("; ")
        ));
    }
    if !r.mesh_log.is_empty() {
        s.push_str(&format!(
            "\nflockd logged about the mesh during the measurements ({} lines), e.g.:\n\n```\n{}\n```\n",
            r.mesh_log.len(),
            r.mesh_log
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    s.push_str(&commands_block(a.port, &r.commands));
    s
}

/// A port free on every loopback address (bound on 0.0.0.0), other than `not`.
fn free_port(not: u16) -> Result<u16> {
    for _ in 0..20 {
        let p = TcpListener::bind("0.0.0.0:0")?.local_addr()?.port();
        if p != not {
            return Ok(p);
        }
    }
    bail!("found no free port")
}

fn run(args: &Args) -> Result<()> {
    ensure!(args.reps >= 1, "--reps must be at least 1");
    ensure!(args.size >= 1, "--size must be at least 1");
    ensure!(args.bytes >= 1, "--bytes must be at least 1");
    let bin = bin_dir(
        args.bin.as_deref(),
        &["flockd", "flockctl"],
        "cargo build --release -p flock-node -p flock-bench",
    )?;
    let me = std::env::current_exe()?.canonicalize()?;
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let busy = sysinfo::cpu_busy(Duration::from_secs(1));
    let machine = machine(busy);
    note(format!("machine: {machine}"));
    let app_port = match args.app_port {
        Some(p) => p,
        None => free_port(0)?,
    };
    let ext_port = match args.ext_port {
        Some(p) => p,
        None => free_port(app_port)?,
    };
    ensure!(
        app_port != ext_port,
        "the app's port and its published port must differ (an app serving its own published port keeps the mesh off it on its node)"
    );

    let dev = Dev::start(&bin, args.port, args.keep, "flock-mesh", "--serve")?;
    let mut relay: Option<Relay> = None;
    let mut paths = Vec::new();
    let result = (|| -> Result<(Vec<Figures>, f64, f64, Vec<String>)> {
        note(format!(
            "deploying {APP} ({} --serve {app_port}) on n1, port {app_port} published as {ext_port}",
            me.display()
        ));
        let app_pid = deploy(&dev, &me, app_port, ext_port)?;
        let flockd = dev.child.id();
        paths.push(Route {
            name: "direct",
            addr: ([127, 0, 0, 1], app_port).into(),
            fwd: flockd,
        });
        paths.push(Route {
            name: "mesh on n1 (runs the app)",
            addr: ([127, 0, 0, 1], ext_port).into(),
            fwd: flockd,
        });
        paths.push(Route {
            name: "mesh on n2 (forwards to n1)",
            addr: ([127, 0, 0, 2], ext_port).into(),
            fwd: flockd,
        });
        if !args.no_reference {
            let port = free_port(ext_port)?;
            let r = Relay::start(&me, port, app_port)?;
            paths.push(Route {
                name: "reference relay",
                addr: ([127, 0, 0, 1], port).into(),
                fwd: r.0.id(),
            });
            relay = Some(r);
        }
        for p in &paths {
            until(
                &format!("an echo through {}", p.addr),
                Duration::from_secs(30),
                Duration::from_millis(100),
                || {
                    let mut h = Histogram::new(3)?;
                    Ok(latency(p.addr, 1, args.size, &mut h).ok())
                },
            )?;
        }
        let log_at = dev.log_len();
        let mut figs = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            note(format!(
                "{}: checking {} through {}",
                p.name,
                human(args.verify_bytes),
                p.addr
            ));
            verify(p.addr, args.verify_bytes, 11 + i as u64)?;
            figs.push(Figures::new()?);
        }
        let buf: Vec<u8> = {
            let mut b = vec![0u8; CHUNK];
            Pattern::new(5).fill(&mut b);
            b
        };
        let per = |total: u64, rep: usize| {
            total / args.reps as u64 + u64::from((rep as u64) < total % args.reps as u64)
        };
        let t0 = Instant::now();
        let busy0 = sysinfo::busy_counters();
        for rep in 0..args.reps {
            for (i, p) in paths.iter().enumerate() {
                check_interrupted()?;
                let f = &mut figs[i];
                let mut rtt = Figures::histogram()?;
                latency(p.addr, per(args.rounds, rep), args.size, &mut rtt)
                    .with_context(|| format!("{}: round trips", p.name))?;
                let mut setup = Figures::histogram()?;
                setups(p.addr, per(args.connects, rep), args.size, &mut setup)
                    .with_context(|| format!("{}: fresh connections", p.name))?;
                f.rtt.add(&rtt)?;
                f.setup.add(&setup)?;
                let c0 = Cpu::now(p.fwd, app_pid);
                let took = stream(p.addr, args.bytes, &buf)
                    .with_context(|| format!("{}: one-connection stream", p.name))?;
                f.single_cpu.add(Cpu::now(p.fwd, app_pid).since(c0));
                f.single.push(took.as_secs_f64());
                let mut line = format!(
                    "rep {}/{} {}: round trip p50 {:.1} µs, setup p50 {:.1} µs, 1 connection {:.2} GB/s",
                    rep + 1,
                    args.reps,
                    p.name,
                    us(rtt.value_at_quantile(0.5)),
                    us(setup.value_at_quantile(0.5)),
                    args.bytes as f64 / took.as_secs_f64() / 1e9
                );
                if args.parallel >= 2 {
                    let c0 = Cpu::now(p.fwd, app_pid);
                    let took = streams(p.addr, args.bytes, args.parallel, &buf)
                        .with_context(|| format!("{}: parallel streams", p.name))?;
                    f.parallel_cpu.add(Cpu::now(p.fwd, app_pid).since(c0));
                    f.parallel.push(took.as_secs_f64());
                    line.push_str(&format!(
                        ", {} connections {:.2} GB/s",
                        args.parallel,
                        args.bytes as f64 / took.as_secs_f64() / 1e9
                    ));
                }
                note(line);
            }
        }
        let busy_during = sysinfo::busy_since(busy0);
        let elapsed = t0.elapsed().as_secs_f64();
        // The app must still be the same process, alive and running.
        let a = dev
            .app()?
            .ok_or_else(|| anyhow!("{APP} is gone from app ls"))?;
        ensure!(
            a["state"] == "running" && a["id"].as_str() == Some(&app_pid.to_string()),
            "the app is not the same running process after the measurements: {a}"
        );
        Ok((figs, busy_during, elapsed, dev.mesh_log(log_at)))
    })();
    let (figs, busy_during, elapsed, mesh_log) = match result {
        Ok(r) => r,
        Err(e) => {
            dev.print_failure(&e);
            return Err(e);
        }
    };
    let commands = dev.commands();
    drop(relay);
    drop(dev);
    println!(
        "{}",
        report(&Run {
            args,
            paths: &paths,
            figs: &figs,
            date,
            machine,
            busy_during,
            elapsed,
            commands,
            mesh_log,
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    start_clock();
    let args = Args::parse();
    if let Some(port) = args.serve {
        return match serve(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flock-mesh --serve: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(ports) = &args.relay {
        return match relay(ports[0], ports[1]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flock-mesh --relay: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    catch_sigint();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flock-mesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
