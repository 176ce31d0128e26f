//! flock-streams: snapshot stream throughput between two nodes on loopback (issue 5), in one
//! run, in three parts:
//!
//! 1. **Transports**: the same payload (1 GiB and 100 MiB by default) from one runtime to
//!    another over plain TCP, TLS 1.3 over TCP (tokio-rustls, the cluster's certificates, mutual
//!    TLS: equal security), QUIC with quinn's defaults, QUIC as flock tunes it
//!    (`flock_transport::quic`) on one stream, and on N lanes (`flock_transport::lanes`).
//! 2. **Tuning**: 1 GiB over QUIC, adding flock's settings one at a time to quinn's defaults,
//!    and a few alternatives (congestion controllers, no forced socket buffers, ...).
//! 3. **Datasets**: a full and an incremental snapshot (1 GiB, 100 MiB) on the dir backend and
//!    on a zfs-fuse pool, through flock's framed stream over tuned QUIC against the backend's
//!    own send piped into its receive with no network (`zfs send | zfs receive` for zfs).
//! 4. **Nodes**: the same snapshots pushed between two real flockd processes by flockd's push
//!    protocol (a `flockctl dataset move`, then a replica following a new snapshot).
//!
//! The two sides run in two tokio runtimes of 2 workers each (as two flockd processes would),
//! in one process so the timing is exact: from the sender's first write to the receiver's
//! last read. Every measurement is repeated `--reps` times, the variants interleaved so that
//! other work on the machine hits them alike; the tables give the median.
//!
//! Map: `raw` moves bytes over each transport; `datasets` moves snapshots; `report` prints the
//! tables and rewrites the "latest run" part of bench/RESULTS.md's "Snapshot streams" section.

mod datasets;
mod nodes;
mod raw;
mod report;
#[path = "../../sysinfo.rs"]
mod sysinfo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use clap::Parser;

use flock_tls::pki::{new_key_and_csr, CertAuthority, NodeTls, Role};
use flock_transport::quic::{Congestion, QuicTuning};

use datasets::{Method, Pool, Sides};
use raw::{measure, Measure, Pair, Transport};
use report::{DatasetRow, Report, Row};

/// Snapshot stream throughput on loopback: TCP, TLS over TCP, QUIC untuned and tuned, and
/// dataset streams against a local pipe.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Payload sizes for the transport comparison, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,100")]
    sizes: Vec<u64>,
    /// Repetitions of every measurement (the tables give the median).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Lane counts for the transport comparison.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    lanes: Vec<u16>,
    /// Skip the tuning study.
    #[arg(long)]
    no_study: bool,
    /// Skip the transport comparison.
    #[arg(long)]
    no_transports: bool,
    /// Only the transports whose name starts with one of these, separated by `;` (e.g.
    /// "TLS;QUIC, flock tuning, 1 stream"), for profiling one at a time.
    #[arg(long, value_delimiter = ';')]
    only: Vec<String>,
    /// Backends for the dataset comparison (dir, zfs); `none` skips it.
    #[arg(long, value_delimiter = ',', default_value = "dir,zfs")]
    backends: Vec<String>,
    /// Full and incremental snapshot sizes for the dataset comparison, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,100")]
    dataset_sizes: Vec<u64>,
    /// Repetitions of the dataset comparison.
    #[arg(long, default_value_t = 3)]
    dataset_reps: usize,
    /// Size of the file-backed zfs pool, in GiB.
    #[arg(long, default_value_t = 4)]
    pool_gib: u64,
    /// Backends for the node-to-node comparison through two real flockd (dir, zfs); `none`
    /// skips it. Uses flockd and flockctl from the directory of this binary.
    #[arg(long, value_delimiter = ',', default_value = "dir,zfs")]
    node_backends: Vec<String>,
    /// Repetitions of the node-to-node comparison (a new cluster each).
    #[arg(long, default_value_t = 2)]
    node_reps: usize,
    /// RUST_LOG of the flockd processes of the node-to-node comparison (e.g.
    /// `warn,flock_node=debug` to see each phase of a push with its time).
    #[arg(long, default_value = "warn,flock_node=info")]
    node_log: String,
    /// Keep the flockd logs of the node-to-node comparison in this directory
    /// (BACKEND-REP-n1.log, ...) instead of removing them with the nodes' data.
    #[arg(long, value_name = "DIR")]
    node_logs: Option<PathBuf>,
    /// Where the dir backends and the zfs pool file go [default: a temporary directory].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Worker threads of each side's runtime.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The results file whose "Snapshot streams: latest run" part is rewritten.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    results: PathBuf,
    /// Do not touch the results file.
    #[arg(long)]
    no_results: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flock-streams: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A CA and one node certificate: both sides present it (mutual TLS), as nodes of one cluster.
fn node_tls() -> Result<NodeTls> {
    let (ca, _) = CertAuthority::create("flock-streams")?;
    let (key_pem, csr) = new_key_and_csr()?;
    let cert_pem = ca.sign_csr(&csr, &Role::Node(1))?;
    Ok(NodeTls {
        ca_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    })
}

fn progress(msg: std::fmt::Arguments) {
    eprintln!("flock-streams: {msg}");
}

/// Measures every (label, transport) `reps` times, interleaved; returns them in order.
fn measure_all(
    pair: &Pair,
    tls: &NodeTls,
    variants: &[(String, Transport)],
    bytes: u64,
    reps: usize,
) -> Result<Vec<Vec<Measure>>> {
    let mut all = vec![Vec::new(); variants.len()];
    for rep in 1..=reps {
        for (i, (label, t)) in variants.iter().enumerate() {
            let m = measure(pair, tls, t, bytes).with_context(|| label.clone())?;
            progress(format_args!(
                "rep {rep}/{reps} {label}, {} MiB: {:.2} GB/s, {:.2} CPU s/GB, {} UDP drops",
                bytes >> 20,
                m.gbps(),
                m.cpu_per_gb(),
                m.udp_drops
            ));
            all[i].push(m);
        }
    }
    Ok(all)
}

fn quic(tuning: QuicTuning, lanes: u16) -> Transport {
    Transport::Quic {
        tuning: Box::new(tuning),
        lanes: lanes as usize,
    }
}

/// flock's settings added one at a time to quinn's defaults, then alternatives to some of them.
fn study_variants() -> Vec<(String, Transport)> {
    let quinn = QuicTuning::quinn_default();
    let flock = QuicTuning::default();
    let mut v = Vec::new();
    v.push(("quinn defaults".to_string(), quic(quinn.clone(), 0)));
    let mut t = quinn.clone();
    t.stream_receive_window = flock.stream_receive_window;
    t.receive_window = flock.receive_window;
    t.send_window = flock.send_window;
    v.push((
        format!(
            "+ windows {}/{} MiB (stream/connection)",
            flock.stream_receive_window >> 20,
            flock.receive_window >> 20
        ),
        quic(t.clone(), 0),
    ));
    t.mtu_discovery_upper_bound = flock.mtu_discovery_upper_bound;
    t.max_udp_payload = flock.max_udp_payload;
    v.push(("+ MTU discovery up to 64 KiB".into(), quic(t.clone(), 0)));
    t.split_gso = true;
    v.push(("+ GSO batches split at 64 KiB".into(), quic(t.clone(), 0)));
    t.socket_buffer = flock.socket_buffer;
    t.force_socket_buffer = true;
    v.push((
        format!(
            "+ {} MiB socket buffers (forced)",
            flock.socket_buffer.unwrap_or(0) >> 20
        ),
        quic(t.clone(), 0),
    ));
    t.fit_windows = true;
    v.push((
        "+ windows fitted to the socket buffer (= flock)".into(),
        quic(t.clone(), 0),
    ));
    let mut a = flock.clone();
    a.force_socket_buffer = false;
    v.push((
        "flock, socket buffers capped by rmem_max".into(),
        quic(a, 0),
    ));
    let mut a = flock.clone();
    a.segmentation_offload = false;
    v.push(("flock without GSO".into(), quic(a, 0)));
    for (name, cc) in [("NewReno", Congestion::NewReno), ("BBR", Congestion::Bbr)] {
        let mut a = flock.clone();
        a.congestion = cc;
        v.push((format!("flock with {name}"), quic(a, 0)));
    }
    for mib in [1u32, 2, 8, 16] {
        let mut a = flock.clone();
        a.stream_receive_window = mib << 20;
        a.receive_window = mib << 20;
        v.push((format!("flock with {mib} MiB windows"), quic(a, 0)));
    }
    for lanes in [1, 2, 4] {
        v.push((format!("flock, {lanes} lanes"), quic(flock.clone(), lanes)));
    }
    v
}

fn run(args: Args) -> Result<()> {
    if args.reps == 0 || args.sizes.is_empty() {
        bail!("--reps and --sizes need positive values");
    }
    let tls = node_tls()?;
    let pair = Pair::new(args.workers)?;
    let busy_before = sysinfo::cpu_busy(std::time::Duration::from_secs(1));
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut report = Report::new(date, busy_before, &args.command_line());
    report.settings = report::settings(&pair, &tls)?;

    // 1. Transports.
    let mut variants = vec![
        ("TCP".to_string(), Transport::Tcp),
        ("TLS 1.3 over TCP".to_string(), Transport::Tls),
        (
            "QUIC, quinn defaults".to_string(),
            quic(QuicTuning::quinn_default(), 0),
        ),
        (
            "QUIC, flock tuning, 1 stream".to_string(),
            quic(QuicTuning::default(), 0),
        ),
    ];
    for &l in &args.lanes {
        variants.push((
            format!(
                "QUIC, flock tuning, {l} lane{}",
                if l == 1 { "" } else { "s" }
            ),
            quic(QuicTuning::default(), l),
        ));
    }
    if !args.only.is_empty() {
        variants.retain(|(label, _)| args.only.iter().any(|p| label.starts_with(p.as_str())));
    }
    for &mib in args.sizes.iter().filter(|_| !args.no_transports) {
        let all = measure_all(&pair, &tls, &variants, mib << 20, args.reps)?;
        for ((label, _), ms) in variants.iter().zip(all) {
            report.transports.push(Row::new(label, mib, ms));
        }
    }

    // 2. Tuning, one setting at a time.
    if !args.no_study {
        let study = study_variants();
        let all = measure_all(&pair, &tls, &study, 1 << 30, args.reps)?;
        for ((label, _), ms) in study.iter().zip(all) {
            report.study.push(Row::new(label, 1024, ms));
        }
    }

    // 3. Datasets.
    let backends: Vec<&str> = args
        .backends
        .iter()
        .map(|s| s.as_str())
        .filter(|s| *s != "none")
        .collect();
    if !backends.is_empty() {
        let [full_mib, inc_mib] = args.dataset_sizes[..] else {
            bail!("--dataset-sizes needs two values: full and incremental, in MiB");
        };
        let tmp;
        let work = match &args.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                d.clone()
            }
            None => {
                tmp = tempdir()?;
                tmp.0.clone()
            }
        };
        for backend in backends {
            let pool;
            let sides = match backend {
                "dir" => Sides::dir(&work)?,
                "zfs" => {
                    progress(format_args!(
                        "creating a {} GiB file-backed zfs pool in {}",
                        args.pool_gib,
                        work.display()
                    ));
                    pool = Pool::create(&work, args.pool_gib)?;
                    Sides::zfs(&pool.name)?
                }
                other => bail!("unknown backend {other:?} (dir, zfs)"),
            };
            progress(format_args!(
                "{backend}: writing {full_mib} MiB + {inc_mib} MiB and taking snapshots s1, s2"
            ));
            sides.prepare(full_mib, inc_mib)?;
            let methods = [
                Method::LocalPipe,
                Method::Quic { lanes: 0 },
                Method::Quic { lanes: 2 },
            ];
            let mut results: Vec<Vec<[datasets::Moved; 2]>> = vec![Vec::new(); methods.len()];
            for rep in 1..=args.dataset_reps {
                for (i, m) in methods.iter().enumerate() {
                    sides.clear_received(m)?;
                    let moved = sides
                        .run(m, &pair, &tls, &QuicTuning::default())
                        .with_context(|| format!("{backend}, {}", m.label()))?;
                    progress(format_args!(
                        "rep {rep}/{} {backend}, {}: full {:.2} s, incremental {:.2} s",
                        args.dataset_reps,
                        m.label(),
                        moved[0].secs,
                        moved[1].secs
                    ));
                    results[i].push(moved);
                }
            }
            sides.clear_received(&Method::Quic { lanes: 0 })?;
            sides.cleanup()?;
            let sizes = report::payloads(&results);
            for (m, runs) in methods.iter().zip(results) {
                for (phase, idx, mib) in [("full", 0, full_mib), ("incremental", 1, inc_mib)] {
                    report.datasets.push(DatasetRow::new(
                        backend,
                        phase,
                        mib,
                        &m.label(),
                        sizes[idx],
                        runs.iter().map(|r| r[idx].clone()).collect(),
                    ));
                }
            }
        }
    }

    // 4. Nodes.
    let node_backends: Vec<&str> = args
        .node_backends
        .iter()
        .map(|s| s.as_str())
        .filter(|s| *s != "none")
        .collect();
    if !node_backends.is_empty() {
        let [full_mib, inc_mib] = args.dataset_sizes[..] else {
            bail!("--dataset-sizes needs two values: full and incremental, in MiB");
        };
        let exe = std::env::current_exe().context("cannot find this binary's path")?;
        let bin_dir = exe
            .parent()
            .context("this binary has no directory")?
            .to_path_buf();
        for backend in node_backends {
            let mut runs: Vec<[nodes::Pushed; 2]> = Vec::new();
            for rep in 1..=args.node_reps {
                let dir = tempdir_named(&format!("nodes-{backend}-{rep}"))?;
                let mut pools = Vec::new();
                let storage: [Vec<String>; 2] = match backend {
                    "dir" => [Vec::new(), Vec::new()],
                    "zfs" => {
                        for i in 0..2 {
                            pools.push(Pool::create_named(
                                &dir.0,
                                3,
                                &format!("flockbenchn{}x{i}", std::process::id()),
                            )?);
                        }
                        let flags = |p: &Pool| {
                            vec![
                                "--backend".to_string(),
                                "zfs".to_string(),
                                "--zfs-pool".to_string(),
                                format!("{}/flock", p.name),
                            ]
                        };
                        [flags(&pools[0]), flags(&pools[1])]
                    }
                    other => bail!("unknown backend {other:?} (dir, zfs)"),
                };
                progress(format_args!(
                    "nodes, {backend}, rep {rep}/{}: starting two flockd",
                    args.node_reps
                ));
                let cluster = nodes::Cluster::start(&bin_dir, &dir.0, storage, &args.node_log)?;
                let r = cluster
                    .run(full_mib, inc_mib)
                    .with_context(|| format!("nodes, {backend}"));
                drop(cluster);
                if let Some(keep) = &args.node_logs {
                    std::fs::create_dir_all(keep)?;
                    for n in ["n1", "n2"] {
                        let from = dir.0.join(format!("{n}.log"));
                        let to = keep.join(format!("{backend}-{rep}-{n}.log"));
                        std::fs::copy(&from, &to)
                            .with_context(|| format!("cannot keep {}", from.display()))?;
                    }
                }
                let r = r?;
                progress(format_args!(
                    "nodes, {backend}, rep {rep}/{}: move (full push) {:.2} s, replica follows \
                     (incremental push) {:.2} s",
                    args.node_reps, r[0].secs, r[1].secs
                ));
                runs.push(r);
                drop(pools);
            }
            for (phase, idx, mib, method) in [
                ("full", 0, full_mib, "flockd: dataset move (push over QUIC)"),
                (
                    "incremental",
                    1,
                    inc_mib,
                    "flockd: replica follows a snapshot (push over QUIC)",
                ),
            ] {
                // The same snapshot's stream as in part 3, when it ran; else what was written.
                let payload = report
                    .datasets
                    .iter()
                    .find(|r| r.backend == backend && r.phase == phase && r.payload > 0)
                    .map(|r| r.payload)
                    .or_else(|| runs.iter().map(|r| r[idx].bytes).max().filter(|b| *b > 0))
                    .unwrap_or(mib << 20);
                let moved = runs
                    .iter()
                    .map(|r| datasets::Moved {
                        payload,
                        secs: r[idx].secs,
                        cpu_secs: f64::NAN,
                    })
                    .collect();
                report
                    .datasets
                    .push(DatasetRow::new(backend, phase, mib, method, payload, moved));
            }
        }
    }

    report.machine.load_end = report::load_average();
    let text = report.markdown();
    println!("{text}");
    if !args.no_results {
        report::write_results(&args.results, &text)?;
        progress(format_args!("wrote {}", args.results.display()));
    }
    Ok(())
}

impl Args {
    /// The command as the user typed it (run-streams.sh passes it on).
    fn command_line(&self) -> String {
        std::env::var("FLOCK_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "))
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> Result<TempDir> {
    tempdir_named("work")
}

fn tempdir_named(what: &str) -> Result<TempDir> {
    let d = std::env::temp_dir().join(format!("flock-streams-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(TempDir(d))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
