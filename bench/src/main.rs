//! flock-bench: flock's replicated store against etcd 3.4, side by side, in one run.
//!
//! The binary starts both clusters itself on loopback (three members each, fsync on, as their
//! defaults have it), one system at a time so they never compete for the machine, and measures
//! for each:
//! - write throughput and latency: N clients, each with its own gRPC channel to the leader,
//!   putting 64-byte values to distinct keys one at a time (`workload::throughput`);
//! - the write gap across a `kill -9` of the leader (`workload::failover`).
//!
//! flockd speaks mutual TLS (the bench connects with the admin config `flockd init` writes; a
//! flockd from before TLS writes none and is reached in plaintext); etcd runs plaintext, its
//! default, unless `--etcd-tls` gives it mutual TLS too. The report states which ran.
//!
//! Map: `proc` runs daemons and watches their output; `flock` and `etcd` start, kill and restart
//! each system's members behind the `cluster::Cluster` trait; `cluster::KvClient` is the one
//! client both are driven with; `workload` measures; `report` prints the table, updates
//! `bench/RESULTS.md` and renders the JSON.

mod cluster;
mod etcd;
mod flock;
mod proc;
mod report;
mod sysinfo;
mod workload;

/// etcd's v3 API, the part flock-bench calls (see proto/etcd.proto).
#[allow(clippy::all)]
mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::cluster::Cluster;
use crate::etcd::EtcdCluster;
use crate::flock::FlockCluster;
use crate::report::{Machine, Report, Setup, SystemResult};

/// Benchmark flock's replicated store against etcd 3.4 on this machine.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The flockd binary [default: flockd next to this binary].
    #[arg(long, value_name = "PATH")]
    flockd: Option<PathBuf>,
    /// The etcd binary (3.4).
    #[arg(long, value_name = "PATH", default_value = "etcd")]
    etcd: PathBuf,
    /// Run etcd with mutual TLS on client and peer connections, as flockd always runs; without
    /// it etcd runs plaintext (its default), which spares it the cost of TLS that flock pays.
    #[arg(long)]
    etcd_tls: bool,
    /// Concurrent clients for the throughput runs, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Measured seconds per throughput run (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds before each throughput run.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Leader kills per system.
    #[arg(long, default_value_t = 3)]
    failover_rounds: usize,
    /// Systems to run (both by default).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "flock,etcd")]
    systems: Vec<Which>,
    /// Where each run gets its directory (data dirs and logs).
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    out_dir: PathBuf,
    /// Keep the run directory after a successful run (a failed run always keeps it).
    #[arg(long)]
    keep: bool,
    /// The results file whose "latest run" section is rewritten.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    results: PathBuf,
    /// Do not touch the results file.
    #[arg(long)]
    no_results: bool,
    /// Print the results as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Flock,
    Etcd,
}

/// The failover writer starts this long before the leader is killed.
const BEFORE_KILL: Duration = Duration::from_secs(2);

static START: OnceLock<Instant> = OnceLock::new();

/// Prints one progress line on stderr, stamped with the time since the run started.
pub fn progress_line(args: std::fmt::Arguments) {
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[{:>6.1}s] {args}", t.as_secs_f64());
}

/// `progress!("...", ...)`: a progress line on stderr.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => { $crate::progress_line(format_args!($($arg)*)) };
}

#[tokio::main]
async fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flock-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs positive numbers, e.g. --clients 1,64");
    }
    if args.duration == 0 {
        bail!("--duration must be at least 1 second");
    }
    let flockd = match &args.flockd {
        Some(p) => p.clone(),
        None => default_flockd()?,
    };
    // Check both binaries before anything starts, so a missing one fails in a second.
    let mut versions = Vec::new();
    for &which in &args.systems {
        versions.push(match which {
            Which::Flock => flock::version(&flockd).await?,
            Which::Etcd => etcd::version(&args.etcd).await?,
        });
    }
    let flock_settings = if args.systems.contains(&Which::Flock) {
        flock::settings(&flockd).await
    } else {
        String::new()
    };

    let busy_before = report::cpu_busy(Duration::from_secs(1)).await;
    if busy_before > 0.2 {
        progress!(
            "warning: the CPUs were {:.0}% busy just before the benchmark started; other work \
             on this machine will skew the figures",
            busy_before * 100.0
        );
    }
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let run_dir = args.out_dir.join(date.replace(':', ""));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    progress!("run directory {}", run_dir.display());

    let bench = async {
        let mut systems = Vec::new();
        for (&which, version) in args.systems.iter().zip(&versions) {
            systems.push(match which {
                Which::Flock => {
                    let dir = run_dir.join("flock");
                    mkdir(&dir)?;
                    progress!("flock: starting 3 flockd ({})", flockd.display());
                    let cluster = FlockCluster::start(&flockd, &dir).await?;
                    suite(cluster, &args, version, &flock_settings).await?
                }
                Which::Etcd => {
                    let dir = run_dir.join("etcd");
                    mkdir(&dir)?;
                    progress!("etcd: starting 3 etcd ({})", args.etcd.display());
                    let cluster = EtcdCluster::start(&args.etcd, &dir, args.etcd_tls).await?;
                    let settings = format!(
                        "--heartbeat-interval {} --election-timeout {} (etcd's defaults; the \
                         election timeout is drawn from [{1}, 2 x {1}) ms), fsync on",
                        etcd::HEARTBEAT_MS,
                        etcd::ELECTION_TIMEOUT_MS
                    );
                    suite(cluster, &args, version, &settings).await?
                }
            });
        }
        Ok::<_, anyhow::Error>(systems)
    };
    // On Ctrl-C or SIGTERM the clusters are dropped with `bench`, which kills their processes
    // (they are spawned with kill_on_drop); without this a terminated benchmark would leave
    // them running.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let outcome = tokio::select! {
        r = bench => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT)")),
        _ = sigterm.recv() => Err(anyhow!("terminated (SIGTERM)")),
    };
    let systems = match outcome {
        Ok(s) => s,
        Err(e) => {
            return Err(e.context(format!(
                "benchmark failed; logs and data kept in {}",
                run_dir.display()
            )))
        }
    };

    let report = Report {
        date,
        machine: Machine::here(busy_before),
        command: std::env::var("FLOCK_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        setup: Setup {
            members: 3,
            warmup_s: args.warmup,
            duration_s: args.duration,
            clients: args.clients.clone(),
            value_bytes: workload::VALUE.len(),
            failover_rounds: args.failover_rounds,
            failover_put_timeout_ms: workload::FAILOVER_PUT_TIMEOUT.as_millis() as u64,
            schedule: "one system at a time (the other not running)".into(),
            channels: "every client opens its own gRPC channel (one HTTP/2 connection) to the \
                       leader, same tonic client for both systems"
                .into(),
        },
        systems,
    };

    if args.json {
        eprint!("\n{}", report.table());
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot encode the results as JSON")?
        );
    } else {
        print!("\n{}", report.table());
    }
    if !args.no_results {
        report::write_results(&args.results, &report)?;
        progress!("wrote {}", args.results.display());
    }
    if args.keep {
        progress!("kept {}", run_dir.display());
    } else {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("cannot remove {}", run_dir.display()))?;
    }
    Ok(())
}

/// Throughput for each client count, then the failover rounds, then the cluster is shut down.
async fn suite(
    mut cluster: impl Cluster,
    args: &Args,
    version: &str,
    settings: &str,
) -> Result<SystemResult> {
    let name = cluster.system().name();
    let warmup = Duration::from_secs(args.warmup);
    let duration = Duration::from_secs(args.duration);
    let mut throughput = Vec::new();
    for &clients in &args.clients {
        let leader = cluster.leader().await?;
        progress!(
            "{name}: {clients} client(s) writing to leader {} for {} s + {} s warm-up",
            cluster.member_name(leader),
            args.duration,
            args.warmup
        );
        let t = workload::throughput(&cluster, leader, clients, warmup, duration).await?;
        // Figures from a cluster that lost a member on its own would not be comparable.
        cluster.check_running().await?;
        progress!(
            "{name}: {clients} client(s): {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, {} election(s){}",
            t.ops_per_sec,
            t.p50_ms,
            t.p99_ms,
            t.elections,
            if t.errors > 0 {
                format!(", {} failed puts", t.errors)
            } else {
                String::new()
            }
        );
        throughput.push(t);
    }
    let mut failover = Vec::new();
    for round in 1..=args.failover_rounds {
        progress!("{name}: failover round {round} of {}", args.failover_rounds);
        failover.push(workload::failover(&mut cluster, round, BEFORE_KILL).await?);
    }
    let gaps: Vec<f64> = failover.iter().map(|r| r.gap_ms).collect();
    let transport = cluster.transport().to_string();
    progress!("{name}: stopping the cluster");
    cluster.shutdown().await?;
    Ok(SystemResult {
        system: name.to_string(),
        version: version.to_string(),
        settings: settings.to_string(),
        transport,
        throughput,
        failover_median_ms: workload::median(&gaps),
        failover,
    })
}

/// `flockd` in the directory of this binary (both land in target/release).
fn default_flockd() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    Ok(dir.join("flockd"))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
