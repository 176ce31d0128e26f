//! flock-move: the downtime of `flockctl app move` against a naive stop-copy-start move
//! (issue 7), on a release `flockd dev` cluster (3 nodes, dir backend, process driver).
//!
//! For each dataset size (`--sizes`, default 256M,1G,4G):
//!
//! 1. `counter` (flock-testapp, an append-only log that fsyncs before each OK) is deployed
//!    pinned to n1 with a volume; a bulk file of that many incompressible bytes is written into
//!    the dataset's live directory on n1.
//! 2. **Two-phase move**: a writer appends without pause on one TCP connection (a new one after
//!    an error, 2 ms between attempts), recording when each OK arrives; `flockctl app move
//!    counter --to n2` runs to its end; the writer goes on until it has written to the app on
//!    n2 for 1 s. Downtime: from the last append acknowledged by the instance on n1 to the
//!    first acknowledged by the one on n2 (the writer asks each connection's instance with
//!    PING); the longest gap between any two acks is checked to be that one.
//! 3. **Naive move**, the same data, with the same writer: `flockctl app rm counter`, wait for
//!    the process to exit, `flockctl dataset move counter --to n3` (full and incremental copy
//!    with the app stopped), deploy it again pinned to n3; downtime measured the same way.
//!    n3, not n1: after the two-phase move n1 keeps its old copy as a replica, so a move back
//!    to n1 would send only the delta, not the data (`--naive-to n1` measures that case).
//! 4. Every acknowledged append must be in the app's `READ` after each move (the count lost is
//!    reported and must be 0), the bulk file must be intact on the new primary; then the app
//!    and the dataset are removed.
//!
//! Prints a markdown table and the commands used; stops the cluster (SIGINT to `flockd dev`,
//! which stops its apps) and removes its data dir at the end, also on error (`--keep` keeps
//! it, with flockd's log). Every wait is bounded; any check that fails exits non-zero.

#[path = "../devcluster.rs"]
mod devcluster;
#[path = "../sysinfo.rs"]
mod sysinfo;

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use serde_json::Value;

use devcluster::{
    bin_dir, catch_sigint, check_interrupted, command_line, commands_block, human, load_average,
    machine, note, pid_alive, start_clock, until, write_pattern, Dev, Pattern,
};

/// Downtime of `flockctl app move` (two-phase) against a naive stop-copy-start move, per
/// dataset size, on a `flockd dev` cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Dataset sizes: the bulk data written into the app's dataset before the moves, with a
    /// unit (K, M, G: powers of 1024).
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G", value_parser = flock_client::parse_size)]
    sizes: Vec<u64>,
    /// API port of the dev cluster's first node; the other two take the next ports.
    #[arg(long, default_value_t = 7971)]
    port: u16,
    /// The node the naive move goes to. n1 keeps a replica after the two-phase move, so a naive
    /// move back to n1 copies only the delta; n3 holds nothing, so the copy is full.
    #[arg(long, default_value = "n3")]
    naive_to: String,
    /// Where flockd, flockctl and flock-testapp are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the cluster's data dir and flockd's log at the end (default: removed).
    #[arg(long)]
    keep: bool,
}

/// The app's name; its dataset takes the same name.
const APP: &str = "counter";
/// The writer's pause between two failed connection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(2);
/// How long the writer goes on writing before and after a move.
const SETTLE: Duration = Duration::from_secs(1);

/// What flock-move asks of the cluster about its app and the app's dataset.
impl Dev {
    /// What flockd logged about the app and its dataset after byte `from` of its log: each
    /// push of a move's snapshot ("full" or "incremental", and the payload), and a timeline of
    /// pushes, stops, commits and starts in seconds since `t0` (wall clock).
    fn log_events(&self, from: u64, t0: SystemTime) -> LogEvents {
        let text = self.log_since(from);
        let mut ev = LogEvents::default();
        for l in text.lines() {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or("?")
            };
            let what = if l.contains("pushed the move's snapshot") {
                let bytes: u64 = field("bytes=").parse().unwrap_or(0);
                let kind = if field("base=") == "None" {
                    "full"
                } else {
                    "incremental"
                };
                let push = format!("{kind} {:.1} MiB", bytes as f64 / (1 << 20) as f64);
                ev.pushes.push(push.clone());
                format!("pushed {push} to {}", field("to="))
            } else if l.contains("stopping an app that may not run on this node now") {
                "app stopped".to_string()
            } else if l.contains("move committed") {
                format!("move to {} committed", field("to="))
            } else if l.contains("flock_node::apps: started app=") {
                "app started".to_string()
            } else {
                continue;
            };
            let at = l
                .split_whitespace()
                .next()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(t0).ok())
                .map_or_else(|| "?".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
            ev.timeline.push(format!("{what} {at}"));
        }
        ev
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let text = self.ctl(args, Duration::from_secs(30))?;
        serde_json::from_str(&text).with_context(|| format!("flockctl {}: {text}", args.join(" ")))
    }

    fn app(&self) -> Result<Value> {
        let a = self.json(&["app", "show", APP, "--json"])?;
        self.saw_app(&a);
        Ok(a)
    }

    fn dataset(&self) -> Result<Value> {
        let d = self.json(&["dataset", "ls", APP, "--json"])?;
        Ok(d[0].clone())
    }

    /// The live directory of the dataset's copy on `node`.
    fn mount_path(&self, node: &str) -> Result<PathBuf> {
        let d = self.dataset()?;
        let h = d["holders"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["node"] == node))
            .ok_or_else(|| anyhow!("{node} holds no copy of {APP}: {d}"))?;
        h["mount_path"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no mount path for {node}: {d}"))
    }

    /// Waits until `app show` has the app running on `node`; its process id.
    fn wait_running(&self, node: &str, timeout: Duration) -> Result<u32> {
        until(
            &format!("{APP} to run on {node}"),
            timeout,
            Duration::from_millis(100),
            || {
                let a = self.app()?;
                Ok((a["node"] == node && a["state"] == "running")
                    .then(|| a["id"].as_str().and_then(|i| i.parse().ok()))
                    .flatten())
            },
        )
    }

    /// `flockctl app rm`, then waits for the process `pid` to exit.
    fn remove_app(&self, pid: u32) -> Result<()> {
        self.ctl(&["app", "rm", APP], Duration::from_secs(30))?;
        until(
            &format!("{APP} (pid {pid}) to exit"),
            Duration::from_secs(60),
            Duration::from_millis(2),
            || Ok((!pid_alive(pid)).then_some(())),
        )
    }
}

const BLOCK: usize = 1 << 20;

fn write_bulk(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    write_pattern(&mut f, size, seed)?;
    f.sync_all()?;
    Ok(())
}

fn verify_bulk(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    ensure!(
        len == size,
        "{} has {len} bytes, not {size}",
        path.display()
    );
    let mut r = BufReader::with_capacity(BLOCK, f);
    let mut p = Pattern::new(seed);
    let (mut want, mut got) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut at = 0u64;
    while at < size {
        check_interrupted()?;
        let n = (size - at).min(BLOCK as u64) as usize;
        p.fill(&mut want[..n]);
        r.read_exact(&mut got[..n])?;
        ensure!(
            want[..n] == got[..n],
            "{} differs from what was written in the MiB at offset {at}",
            path.display()
        );
        at += n as u64;
    }
    Ok(())
}

/// See [`Dev::log_events`].
#[derive(Default)]
struct LogEvents {
    pushes: Vec<String>,
    timeline: Vec<String>,
}

/// One acknowledged append.
struct Ack {
    value: String,
    at: Instant,
    /// Index into [`Writes::instances`]: the process that acknowledged it.
    instance: usize,
}

/// What a writer did.
#[derive(Default)]
struct Writes {
    acks: Vec<Ack>,
    /// The app instances (PING's answer) it talked to, in order.
    instances: Vec<String>,
    /// Connections made, and ERR replies to appends.
    connections: u64,
    errors: u64,
}

/// Appends `PREFIX<i>` to the app at `addr` as fast as it answers, on one connection (a new
/// one after an error), until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    /// The time and instance of the latest ack, for waiting on it.
    latest: Arc<Mutex<Option<(Instant, String)>>>,
    handle: thread::JoinHandle<Writes>,
}

impl Writer {
    fn start(addr: SocketAddr, prefix: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(None));
        let handle = {
            let (stop, latest) = (stop.clone(), latest.clone());
            thread::spawn(move || write_loop(addr, &prefix, &stop, &latest))
        };
        Writer {
            stop,
            latest,
            handle,
        }
    }

    fn latest(&self) -> Option<(Instant, String)> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for an ack (after `after`, if given) from an instance other than `not`.
    fn wait_ack(
        &self,
        after: Option<Instant>,
        not: Option<&str>,
        timeout: Duration,
    ) -> Result<Instant> {
        until(
            "the app to acknowledge an append",
            timeout,
            Duration::from_millis(1),
            || {
                Ok(self
                    .latest()
                    .filter(|(at, inst)| {
                        after.is_none_or(|t| *at > t) && not != Some(inst.as_str())
                    })
                    .map(|(at, _)| at))
            },
        )
    }

    fn finish(self) -> Result<Writes> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))
    }
}

fn write_loop(
    addr: SocketAddr,
    prefix: &str,
    stop: &AtomicBool,
    latest: &Mutex<Option<(Instant, String)>>,
) -> Writes {
    let mut w = Writes::default();
    let mut i = 0u64;
    let mut failed = false;
    while !stop.load(Ordering::Relaxed) {
        if failed {
            thread::sleep(RECONNECT_PAUSE);
        }
        failed = true;
        let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let Ok(mut out) = s.try_clone() else {
            continue;
        };
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if out.write_all(b"PING\n").is_err() || !r.read_line(&mut line).is_ok_and(|n| n > 0) {
            continue;
        }
        let Some(instance) = line.trim().strip_prefix("PONG ").map(str::to_string) else {
            continue;
        };
        w.connections += 1;
        let idx = match w.instances.iter().position(|x| *x == instance) {
            Some(p) => p,
            None => {
                w.instances.push(instance.clone());
                w.instances.len() - 1
            }
        };
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let value = format!("{prefix}{i}");
            line.clear();
            if out
                .write_all(format!("APPEND {value}\n").as_bytes())
                .is_err()
                || !r.read_line(&mut line).is_ok_and(|n| n > 0)
            {
                break;
            }
            if !line.starts_with("OK ") {
                w.errors += 1;
                break;
            }
            let at = Instant::now();
            w.acks.push(Ack {
                value,
                at,
                instance: idx,
            });
            *latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, instance.clone()));
        }
    }
    w
}

/// Every entry the app at `addr` holds.
fn read_all(addr: SocketAddr) -> Result<HashSet<String>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the app at {addr} to READ"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    w.write_all(b"READ\n")?;
    let mut out = HashSet::new();
    for line in BufReader::new(s).lines() {
        let line = line.context("reading the app's READ")?;
        if line == "END" {
            return Ok(out);
        }
        let (_, text) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("the app answered READ with {line:?}"))?;
        out.insert(text.to_string());
    }
    bail!("the app closed the connection before END")
}

/// A move's downtime as the writer saw it.
struct Gaps {
    /// From the last ack by the source instance to the first by the target's.
    handoff: Duration,
    /// The longest gap between two consecutive acks, and when it began (since `t0`).
    longest: Duration,
    longest_at: f64,
    /// The first ack by the target's instance (since `t0`).
    first_target_at: f64,
    acks: usize,
}

fn gaps(w: &Writes, t0: Instant) -> Result<Gaps> {
    ensure!(
        w.instances.len() == 2,
        "the writer talked to {} app instances ({:?}), not 2 (the source's, then the target's)",
        w.instances.len(),
        w.instances
    );
    let last_src = w
        .acks
        .iter()
        .rev()
        .find(|a| a.instance == 0)
        .ok_or_else(|| anyhow!("no ack from the source"))?;
    let first_dst = w
        .acks
        .iter()
        .find(|a| a.instance == 1)
        .ok_or_else(|| anyhow!("no ack from the target"))?;
    ensure!(
        w.acks.windows(2).all(|p| p[0].instance <= p[1].instance),
        "the writer went back to the source instance after the target answered"
    );
    let (longest, longest_at) = w
        .acks
        .windows(2)
        .map(|p| (p[1].at - p[0].at, p[0].at))
        .max_by_key(|(g, _)| *g)
        .ok_or_else(|| anyhow!("fewer than 2 acks"))?;
    Ok(Gaps {
        handoff: first_dst.at - last_src.at,
        longest,
        longest_at: longest_at.saturating_duration_since(t0).as_secs_f64(),
        first_target_at: first_dst.at.saturating_duration_since(t0).as_secs_f64(),
        acks: w.acks.len(),
    })
}

/// Acked values missing from `held`.
fn missing<'a>(w: &'a Writes, held: &HashSet<String>) -> Vec<&'a str> {
    w.acks
        .iter()
        .map(|a| a.value.as_str())
        .filter(|v| !held.contains(*v))
        .collect()
}

/// One size's figures.
struct Row {
    size: u64,
    two_phase: Gaps,
    move_secs: f64,
    /// What flockd logged during the two-phase move.
    two_phase_log: LogEvents,
    naive: Gaps,
    naive_log: LogEvents,
    naive_total: f64,
    /// Naive: app stopped, dataset moved, redeployed (since `app rm` began).
    naive_steps: [f64; 3],
    lost: usize,
    acked: usize,
    writer_errors: u64,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn write_configs(dir: &Path, testapp: &Path, port: u16, size: u64) -> Result<PathBuf> {
    let application = dir.join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n  {APP}:\n    command: [\"{}\", \"--listen\", \"127.0.0.1:{port}\"]\n    volume:\n      mountpoint: /data\n      maximum_size: {}M\n    restart_policy:\n      name: always\n",
            testapp.display(),
            (size >> 20) + 1024 + 1
        ),
    )?;
    for node in ["n1", "n2", "n3"] {
        let others: Vec<&str> = ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| *n != node)
            .collect();
        fs::write(
            dir.join(format!("deployment-{node}.yml")),
            format!(
                "version: 1\nnodes:\n  {node}: [{APP}]\n  {}: []\n  {}: []\n",
                others[0], others[1]
            ),
        )?;
    }
    Ok(application)
}

/// Deploys the app pinned to `node`; waits until it runs there; its process id.
fn deploy(dev: &Dev, conf: &Path, node: &str) -> Result<u32> {
    dev.deploy(
        &conf.join(format!("deployment-{node}.yml")),
        &conf.join("application.yml"),
        APP,
        node,
    )?;
    dev.wait_running(node, Duration::from_secs(60))
}

fn move_timeout(size: u64) -> Duration {
    // Generous: the slowest path measured so far moves about 200 MB/s, and each copy also
    // snapshots and syncs the data on both sides.
    Duration::from_secs(120 + 60 * size.div_ceil(1 << 30))
}

fn one_size(
    dev: &Dev,
    conf: &Path,
    testapp: &Path,
    addr: SocketAddr,
    naive_to: &str,
    size: u64,
    round: usize,
) -> Result<Row> {
    let seed = 7 + round as u64;
    write_configs(conf, testapp, addr.port(), size)?;
    note(format!("{}: deploying {APP} on n1", human(size)));
    deploy(dev, conf, "n1")?;
    let d = dev.dataset()?;
    ensure!(d["primary"] == "n1", "{APP}'s dataset is not on n1: {d}");
    let live = dev.mount_path("n1")?;
    note(format!(
        "{}: writing {} into {}",
        human(size),
        live.join("bulk.bin").display(),
        human(size)
    ));
    write_bulk(&live.join("bulk.bin"), size, seed)?;
    until(
        "the app to answer PING",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok(ping(addr).then_some(())),
    )?;

    // Two-phase: flockctl app move.
    let w = Writer::start(addr, format!("s{round}a"));
    w.wait_ack(None, None, Duration::from_secs(10))?;
    thread::sleep(SETTLE);
    let source = w.latest().map(|(_, i)| i);
    note(format!("{}: flockctl app move {APP} --to n2", human(size)));
    let log_at = dev.log_len();
    let t0_wall = SystemTime::now();
    let t0 = Instant::now();
    let out = dev.flockctl(
        &["app", "move", APP, "--to", "n2", "--json"],
        move_timeout(size),
    );
    let move_secs = t0.elapsed().as_secs_f64();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = w.finish();
            return Err(e);
        }
    };
    let events: Vec<Value> = out
        .lines
        .iter()
        .filter_map(|(_, l)| serde_json::from_str(l).ok())
        .collect();
    let done = events.last().is_some_and(|e| e["event"] == "done");
    if !out.status.success() || !done {
        let _ = w.finish();
        bail!(
            "flockctl app move failed ({}): {} {}",
            out.status,
            out.stdout(),
            out.stderr.trim()
        );
    }
    let waited = dev
        .wait_running("n2", Duration::from_secs(60))
        .and_then(|_| w.wait_ack(Some(t0), source.as_deref(), Duration::from_secs(60)));
    if let Err(e) = waited {
        let _ = w.finish();
        return Err(e.context("after the two-phase move"));
    }
    thread::sleep(SETTLE);
    let moved = w.finish()?;
    let two_phase = gaps(&moved, t0).context("two-phase move")?;
    let held = read_all(addr)?;
    let lost_two = missing(&moved, &held);
    ensure!(
        lost_two.is_empty(),
        "two-phase move of {}: {} of {} acknowledged appends lost, the first {:?}",
        human(size),
        lost_two.len(),
        moved.acks.len(),
        lost_two.first()
    );
    let d = dev.dataset()?;
    ensure!(
        d["primary"] == "n2",
        "after app move, the primary is not n2: {d}"
    );
    let two_phase_log = dev.log_events(log_at, t0_wall);
    note(format!(
        "{}: two-phase move took {move_secs:.2}s, downtime {} (longest gap {}), {} acks; flockd's pushes: {}; verifying bulk.bin on n2",
        human(size),
        ms(two_phase.handoff),
        ms(two_phase.longest),
        two_phase.acks,
        two_phase_log.pushes.join(", ")
    ));
    verify_bulk(&dev.mount_path("n2")?.join("bulk.bin"), size, seed)?;

    // Naive: stop, move the dataset, start again.
    let w = Writer::start(addr, format!("s{round}b"));
    w.wait_ack(None, None, Duration::from_secs(10))?;
    thread::sleep(SETTLE);
    let source = w.latest().map(|(_, i)| i);
    let pid = dev.wait_running("n2", Duration::from_secs(10))?;
    note(format!(
        "{}: naive: app rm, dataset move --to {naive_to}, deploy on {naive_to}",
        human(size)
    ));
    let log_at = dev.log_len();
    let t0_wall = SystemTime::now();
    let t0 = Instant::now();
    let steps = (|| -> Result<[f64; 3]> {
        dev.remove_app(pid)?;
        let stopped = t0.elapsed().as_secs_f64();
        let out = dev.ctl(
            &["dataset", "move", APP, "--to", naive_to, "--json"],
            move_timeout(size),
        )?;
        ensure!(
            out.lines()
                .last()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .is_some_and(|e| e["event"] == "done"),
            "dataset move did not end with done: {out}"
        );
        let copied = t0.elapsed().as_secs_f64();
        deploy(dev, conf, naive_to)?;
        Ok([stopped, copied, t0.elapsed().as_secs_f64()])
    })();
    let naive_steps = match steps.and_then(|s| {
        w.wait_ack(Some(t0), source.as_deref(), Duration::from_secs(60))
            .map(|_| s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = w.finish();
            return Err(e.context("naive move"));
        }
    };
    thread::sleep(SETTLE);
    let naive_w = w.finish()?;
    let naive = gaps(&naive_w, t0).context("naive move")?;
    let naive_total = naive.first_target_at;
    let held = read_all(addr)?;
    let mut lost: HashSet<&str> = missing(&naive_w, &held).into_iter().collect();
    lost.extend(missing(&moved, &held));
    ensure!(
        lost.is_empty(),
        "naive move of {}: {} acknowledged appends lost, e.g. {:?}",
        human(size),
        lost.len(),
        lost.iter().next()
    );
    let d = dev.dataset()?;
    ensure!(
        d["primary"] == naive_to,
        "after the naive move, the primary is not {naive_to}: {d}"
    );
    let naive_log = dev.log_events(log_at, t0_wall);
    note(format!(
        "{}: naive move: downtime {} (longest gap {}), total {naive_total:.2}s, {} acks; flockd's pushes: {}; verifying bulk.bin on {naive_to}",
        human(size),
        ms(naive.handoff),
        ms(naive.longest),
        naive.acks,
        naive_log.pushes.join(", ")
    ));
    verify_bulk(&dev.mount_path(naive_to)?.join("bulk.bin"), size, seed)?;

    // Clean up for the next size.
    let pid = dev.wait_running(naive_to, Duration::from_secs(10))?;
    dev.remove_app(pid)?;
    dev.ctl(
        &["dataset", "rm", APP, "--wait", "60"],
        Duration::from_secs(90),
    )?;
    until(
        "the dataset to be gone",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let out = dev.flockctl(&["dataset", "ls", APP, "--json"], Duration::from_secs(30))?;
            Ok((out.status.code() == Some(4)
                || serde_json::from_str::<Value>(&out.stdout())
                    .is_ok_and(|v| v.as_array().is_some_and(Vec::is_empty)))
            .then_some(()))
        },
    )?;
    Ok(Row {
        size,
        two_phase,
        move_secs,
        two_phase_log,
        naive,
        naive_log,
        naive_total,
        naive_steps,
        lost: lost.len(),
        acked: moved.acks.len() + naive_w.acks.len(),
        writer_errors: moved.errors + naive_w.errors,
    })
}

fn ping(addr: SocketAddr) -> bool {
    let run = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"PING\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.starts_with("PONG "))
    };
    run().unwrap_or(false)
}

fn report(rows: &[Row], args: &Args, date: &str, machine: &str, commands: &[String]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "- date: {date}\n- machine: {machine}; 1-minute load average {} at its end\n",
        load_average()
    ));
    s.push_str(&command_line());
    s.push_str(&format!(
        "- setup: `flockd dev` (3 nodes on 127.0.0.1, dir backend, process driver); flock-testapp pinned to n1 with a volume holding a bulk file of SIZE incompressible bytes; one writer appending without pause on one connection (fsync before each OK); two-phase = `flockctl app move` n1 -> n2; naive = `app rm`, `dataset move` n2 -> {}, redeploy pinned to {}\n\n",
        args.naive_to, args.naive_to
    ));
    s.push_str("| size | two-phase: downtime | two-phase: move total | naive: downtime | naive: total | acked lost |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} s | {} | {:.2} s | {} of {} |\n",
            human(r.size),
            ms(r.two_phase.handoff),
            r.move_secs,
            ms(r.naive.handoff),
            r.naive_total,
            r.lost,
            r.acked
        ));
    }
    let over: Vec<String> = rows
        .iter()
        .filter(|r| r.two_phase.handoff >= Duration::from_secs(1))
        .map(|r| format!("{} ({})", human(r.size), ms(r.two_phase.handoff)))
        .collect();
    if over.is_empty() {
        s.push_str("\nTwo-phase downtime under the 1 s target at every size.\n");
    } else {
        s.push_str(&format!(
            "\n**Two-phase downtime over the 1 s target** at {}.\n",
            over.join(", ")
        ));
    }
    s.push_str("\nDowntime: from the last append acknowledged by the app on the source to the first acknowledged on the target. Two-phase move total: `flockctl app move` from start to end. Naive total: from `app rm` to the first append acknowledged on the target.\n\nDetails:\n");
    for r in rows {
        s.push_str(&format!(
            "- {}: two-phase: {} acks, longest gap {} at {:.2}s into the move, first ack on the target at {:.2}s; flockd's log: {}. Naive: {} acks, longest gap {}; app gone at {:.2}s, `dataset move` returned at {:.2}s, `app show` running at {:.2}s, first ack at {:.2}s; flockd's log: {}.{}\n",
            human(r.size),
            r.two_phase.acks,
            ms(r.two_phase.longest),
            r.two_phase.longest_at,
            r.two_phase.first_target_at,
            r.two_phase_log.timeline.join(", "),
            r.naive.acks,
            ms(r.naive.longest),
            r.naive_steps[0],
            r.naive_steps[1],
            r.naive_steps[2],
            r.naive_total,
            r.naive_log.timeline.join(", "),
            if r.writer_errors > 0 {
                format!(" {} appends answered ERR.", r.writer_errors)
            } else {
                String::new()
            }
        ));
    }
    s.push_str(&commands_block(args.port, commands));
    s
}

fn run(args: &Args) -> Result<()> {
    ensure!(!args.sizes.is_empty(), "--sizes lists no size");
    ensure!(
        ["n1", "n3"].contains(&args.naive_to.as_str()),
        "--naive-to must be n1 or n3 (the two-phase move goes to n2)"
    );
    let bin = bin_dir(
        args.bin_dir.as_deref(),
        &["flockd", "flockctl", "flock-testapp"],
        "cargo build --release -p flock-node -p flock-testapp -p flock-bench",
    )?;
    let testapp = bin.join("flock-testapp").canonicalize()?;
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let busy = sysinfo::cpu_busy(Duration::from_secs(1));
    let machine = machine(busy);
    note(format!("machine: {machine}"));
    let app_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], app_port).into();

    let dev = Dev::start(&bin, args.port, args.keep, "flock-move", "flock-testapp")?;
    let conf = dev.dir.join("conf");
    fs::create_dir_all(&conf)?;
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        for (round, &size) in args.sizes.iter().enumerate() {
            rows.push(one_size(
                &dev,
                &conf,
                &testapp,
                addr,
                &args.naive_to,
                size,
                round,
            )?);
        }
        Ok(())
    })();
    if let Err(e) = result {
        dev.print_failure(&e);
        return Err(e);
    }
    let commands = dev.commands();
    drop(dev);
    println!("{}", report(&rows, args, &date, &machine, &commands));
    Ok(())
}

fn main() -> ExitCode {
    start_clock();
    let args = Args::parse();
    catch_sigint();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flock-move: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
