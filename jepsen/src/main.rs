//! flock-jepsen: runs the fault-injection test against the docker-compose cluster, or re-checks
//! a stored history. See jepsen/README.md.
//!
//! Exit codes: 0 valid, 1 invalid (a violation, or the cluster did not recover or converge),
//! 2 bad usage, 3 undecided (the checker ran out of budget), 4 the run could not be made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use flock_jepsen::checker::{self, stats::Stats};
use flock_jepsen::docker::Compose;
use flock_jepsen::history::History;
use flock_jepsen::nemesis::parse_nemeses_for;
use flock_jepsen::runner::{self, RunOptions, Workloads};
use flock_jepsen::workload::app::AppOptions;
use flock_jepsen::workload::dataset::DatasetOptions;
use flock_jepsen::workload::moves::{self, MoveOptions, Via};
use flock_jepsen::workload::register::{ReadMode, Register, RegisterOptions};
use flock_jepsen::workload::Workload;

#[derive(Parser, Debug)]
#[command(name = "flock-jepsen", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a fresh 5-node cluster, run the workloads under faults, check the history.
    Test(Box<TestArgs>),
    /// Check a stored history.jsonl again (and redraw its timeline next to it).
    Check {
        history: PathBuf,
        /// Search steps per key before the key is reported undecided.
        #[arg(long, default_value_t = 20_000_000)]
        max_steps: u64,
        /// The app workload's bound: after the heal, every app must run once on its node
        /// within this.
        #[arg(long, default_value = "60s", value_parser = duration)]
        app_bound: Duration,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 90s, 3m, 1h)"))
}

/// Which workloads a run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadArg {
    /// Key-value reads, writes and compare-and-sets, checked for linearizability.
    Register,
    /// Datasets created, written, snapshotted and moved; snapshots read back.
    Dataset,
    /// Apps deployed and moved between nodes; every node asked what it runs.
    App,
    /// A stateful test app written to while it is moved between nodes; its log read back.
    Move,
    /// The move workload's test app with replicas, failed over by the faults (not moved);
    /// its log read back and the cluster's failover events.
    Failover,
    /// register, dataset, app and move side by side (not failover).
    All,
}

#[derive(Args, Debug)]
struct TestArgs {
    /// The workloads: register, dataset, app, move, failover, or all (register, dataset, app
    /// and move at once).
    #[arg(long, value_enum, default_value_t = WorkloadArg::All)]
    workload: WorkloadArg,
    /// How long the workload runs under faults.
    #[arg(long, default_value = "3m", value_parser = duration)]
    time_limit: Duration,
    /// Seed of the fault schedule and the clients' choices (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults: all, none, kill, pause, partition, or single kinds (kill-leader, pause-leader,
    /// partition-halves, partition-leader, partition-bridge, partition-ring), comma-separated.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Quiet time between faults (drawn between half and one and a half times this).
    #[arg(long, default_value = "8s", value_parser = duration)]
    fault_interval: Duration,
    /// How long a fault lasts (drawn between half and one and a half times this).
    #[arg(long, default_value = "10s", value_parser = duration)]
    fault_hold: Duration,
    /// linearizable (the default, must pass) or stale (`--stale` reads; may be anomalous).
    #[arg(long, value_enum, default_value_t = ReadMode::Linearizable)]
    read_mode: ReadMode,
    /// Concurrent clients, spread over the nodes.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Target ops per second, all clients together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Keys in use at a time.
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// Ops on a key before a fresh key replaces it.
    #[arg(long, default_value_t = 200)]
    ops_per_key: u64,
    /// How long a client waits for an answer before recording the op as unknown.
    #[arg(long, default_value = "7s", value_parser = duration)]
    op_timeout: Duration,
    /// After the faults end, every node must serve a write and a linearizable read within this.
    #[arg(long, default_value = "30s", value_parser = duration)]
    recovery_bound: Duration,
    /// ... and every node's replica must equal the final reads within this.
    #[arg(long, default_value = "30s", value_parser = duration)]
    convergence_bound: Duration,
    /// Search steps per key before the checker gives up on it (undecided).
    #[arg(long, default_value_t = 20_000_000)]
    max_steps: u64,
    /// Dataset writers (each writes, snapshots and moves its own dataset).
    #[arg(long, default_value_t = 3)]
    datasets: usize,
    /// Acknowledged writes before a writer moves on to a fresh dataset.
    #[arg(long, default_value_t = 50)]
    writes_per_dataset: u64,
    /// Chance that a dataset round ends with a move to another node.
    #[arg(long, default_value_t = 0.15)]
    move_probability: f64,
    /// A dataset move still running after this is cancelled.
    #[arg(long, default_value = "20s", value_parser = duration)]
    move_timeout: Duration,
    /// Time limit of each dataset call and file write.
    #[arg(long, default_value = "15s", value_parser = duration)]
    dataset_op_timeout: Duration,
    /// The largest file a dataset write makes, in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    max_file_bytes: u64,
    /// After the heal, every dataset must take a write and a snapshot within this, and then
    /// every holder must have the newest snapshot within this again.
    #[arg(long, default_value = "60s", value_parser = duration)]
    dataset_bound: Duration,
    /// Apps the app workload deploys (half of them, rounded up, with a volume).
    #[arg(long, default_value_t = 6)]
    apps: usize,
    /// Mean time between two deploys of the app workload (each moves one or two apps).
    #[arg(long, default_value = "8s", value_parser = duration)]
    deploy_interval: Duration,
    /// After the heal, every app must run exactly once, on its node, within this.
    #[arg(long, default_value = "60s", value_parser = duration)]
    app_bound: Duration,
    /// How the move workload's clients reach its app: direct (the node that runs it, at the
    /// app's internal port), mesh (a random node, at its external port: the routing mesh), or
    /// mixed (even clients direct, odd ones through the mesh).
    #[arg(long, value_enum, default_value_t = Via::Mixed)]
    move_via: Via,
    /// The move workload's test apps (each with a dataset).
    #[arg(long, default_value_t = 1)]
    move_apps: usize,
    /// The move workload's appending clients (spread over its apps).
    #[arg(long, default_value_t = 4)]
    move_clients: usize,
    /// Target appends per second of the move workload, all clients together.
    #[arg(long, default_value_t = 40.0)]
    move_rate: f64,
    /// Mean time between two moves of the move workload's app.
    #[arg(long, default_value = "10s", value_parser = duration)]
    move_interval: Duration,
    /// Chance that the move workload cancels a move a moment after asking for it.
    #[arg(long, default_value_t = 0.2)]
    move_cancel_probability: f64,
    /// After the heal, the move workload's app must run in one place and its log be read
    /// within this.
    #[arg(long, default_value = "60s", value_parser = duration)]
    move_bound: Duration,
    /// Replicas of the failover workload's app's dataset (besides its primary).
    #[arg(long, default_value_t = 2)]
    failover_replicas: u32,
    /// How often the failover workload's app's primary snapshots for its replicas.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    failover_interval: Duration,
    /// The failover workload's test apps (each with a replicated dataset).
    #[arg(long, default_value_t = 1)]
    failover_apps: usize,
    /// The failover workload's appending clients (spread over its apps; even ones direct, odd
    /// ones through the mesh, as --move-via says).
    #[arg(long, default_value_t = 4)]
    failover_clients: usize,
    /// The compose file of the test cluster.
    #[arg(long, default_value = "docker-compose.test.yml")]
    compose_file: PathBuf,
    /// docker-compose project name.
    #[arg(long, default_value = "flock-jepsen")]
    project: String,
    /// Where runs are stored (a directory per run).
    #[arg(long, default_value = "jepsen/store")]
    store: PathBuf,
    /// Use the flock-test image as it is (do not run docker/build-image.sh).
    #[arg(long)]
    no_build: bool,
    /// Use the cluster that is running instead of starting a fresh one.
    #[arg(long)]
    no_setup: bool,
    /// Leave the cluster running at the end.
    #[arg(long)]
    keep_cluster: bool,
    /// Admin config to connect with (default: copied from n1, which created the cluster).
    #[arg(long)]
    admin_config: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flock-jepsen: cannot start the runtime: {e}");
            std::process::exit(4);
        }
    };
    let code = match cli.command {
        Cmd::Test(args) => rt.block_on(test(*args)),
        Cmd::Check {
            history,
            max_steps,
            app_bound,
        } => check(&history, max_steps, app_bound),
    };
    std::process::exit(code);
}

/// The repository root: where docker/ and the compose file are.
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

async fn test(a: TestArgs) -> i32 {
    let with_failover = matches!(a.workload, WorkloadArg::Failover);
    let nemeses = match parse_nemeses_for(&a.nemesis, with_failover) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("flock-jepsen: --nemesis: {e}");
            return 2;
        }
    };
    let seed = a.seed.unwrap_or_else(rand::random);
    let root = repo_root();
    let at_root = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            root.join(p)
        }
    };
    let with_app = matches!(a.workload, WorkloadArg::App | WorkloadArg::All);
    let move_opts =
        matches!(a.workload, WorkloadArg::Move | WorkloadArg::All).then(|| MoveOptions {
            apps: a.move_apps.max(1),
            via: a.move_via,
            clients: a.move_clients.max(1),
            rate: a.move_rate,
            move_interval: a.move_interval,
            cancel_probability: a.move_cancel_probability,
            bound: a.move_bound,
            // A deploy replaces the whole configuration: with the app workload, its deployer
            // deploys the move workload's apps with its own.
            deploy: !with_app,
            ..MoveOptions::default()
        });
    let extra = match &move_opts {
        Some(m) if with_app => match moves::specs(m) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("flock-jepsen: {e}");
                return 2;
            }
        },
        _ => Vec::new(),
    };
    let mut command_line: Vec<String> = std::env::args().collect();
    if a.seed.is_none() {
        command_line.push(format!("--seed {seed}"));
    }
    let opts = RunOptions {
        compose: Compose {
            file: at_root(&a.compose_file),
            project: a.project.clone(),
        },
        build: !a.no_build,
        setup: !a.no_setup,
        teardown: !a.keep_cluster,
        repo_root: root.clone(),
        store: at_root(&a.store),
        seed,
        time_limit: a.time_limit,
        nemeses,
        fault_interval: a.fault_interval,
        fault_hold: a.fault_hold,
        concurrency: a.concurrency,
        rate: a.rate,
        op_timeout: a.op_timeout,
        recovery_bound: a.recovery_bound,
        convergence_bound: a.convergence_bound,
        register: RegisterOptions {
            prefix: "jepsen/".into(),
            keys: a.keys,
            ops_per_key: a.ops_per_key,
            read_mode: a.read_mode,
            max_steps: a.max_steps,
        },
        workloads: Workloads {
            register: matches!(a.workload, WorkloadArg::Register | WorkloadArg::All),
            app: with_app.then(|| AppOptions {
                apps: a.apps.max(1),
                deploy_interval: a.deploy_interval,
                bound: a.app_bound,
                extra,
                ..AppOptions::default()
            }),
            moves: move_opts,
            failover: with_failover.then(|| MoveOptions {
                apps: a.failover_apps.max(1),
                clients: a.failover_clients.max(1),
                via: a.move_via,
                rate: a.move_rate,
                bound: a.move_bound,
                ..MoveOptions::failover(a.failover_replicas, a.failover_interval)
            }),
            dataset: matches!(a.workload, WorkloadArg::Dataset | WorkloadArg::All).then(|| {
                DatasetOptions {
                    writers: a.datasets.max(1),
                    writes_per_dataset: a.writes_per_dataset.max(1),
                    move_probability: a.move_probability,
                    move_timeout: a.move_timeout,
                    op_timeout: a.dataset_op_timeout,
                    max_file_bytes: a.max_file_bytes,
                    recovery_bound: a.dataset_bound,
                    settle_bound: a.dataset_bound,
                    ..DatasetOptions::default()
                }
            }),
        },
        admin_config: a.admin_config.clone(),
        command_line: command_line.join(" "),
    };
    match runner::run(opts).await {
        Ok((verdict, dir)) => {
            for c in &verdict.checks {
                println!("jepsen: {}: {}", c.checker, c.summary);
                if c.checker == "failover" {
                    for line in checker::failover::describe_failovers(&c.details) {
                        println!("jepsen:   {line}");
                    }
                }
            }
            let s = &verdict.stats;
            println!(
                "jepsen: {} ops ({} ok, {} fail, {} unknown); longest without any ok op {:.2}s, without an ok write {:.2}s",
                s.all.total,
                s.all.ok,
                s.all.fail,
                s.all.unknown,
                s.longest_unavailable.seconds,
                s.longest_without_write.seconds
            );
            if let Some(d) = &verdict.datasets {
                println!(
                    "jepsen: datasets after the heal: {} of {} took a write and a snapshot within {:.0}s; holders {}; disks read: {}",
                    d.recovered.values().filter(|t| t.is_some()).count(),
                    d.recovered.len(),
                    d.recovery_bound_s,
                    match d.settled_after_s {
                        Some(t) => format!("settled after {t:.1}s"),
                        None => format!("NOT settled: {}", d.unsettled.join("; ")),
                    },
                    d.disks_read
                        .iter()
                        .map(|(n, ok)| format!("{n} {}", if *ok { "ok" } else { "FAILED" }))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if let Some(p) = &verdict.apps {
                println!(
                    "jepsen: apps after the heal: {}",
                    match p.converged_after_s {
                        Some(t) => format!(
                            "every app ran once on its node after {t:.1}s (bound {:.0}s)",
                            p.bound_s
                        ),
                        None => format!(
                            "NOT converged within {:.0}s: {}",
                            p.bound_s,
                            p.unconverged.join("; ")
                        ),
                    }
                );
            }
            for (label, phase) in [("move", &verdict.moves), ("failover", &verdict.failover)] {
                let Some(m) = phase else {
                    continue;
                };
                println!(
                    "jepsen: {label} workload after the heal: {}",
                    if m.ok {
                        m.read_after_s
                            .iter()
                            .map(|(app, t)| {
                                format!("{app}'s log read {:.1}s after the heal", t.unwrap_or(0.0))
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    } else {
                        format!("NOT within {:.0}s: {}", m.bound_s, m.problems.join("; "))
                    }
                );
            }
            println!("jepsen: report {}", dir.join("report.md").display());
            match verdict.valid {
                Some(true) => {
                    println!("jepsen: VALID (seed {seed})");
                    0
                }
                Some(false) => {
                    println!("jepsen: INVALID (seed {seed}); see {}", dir.display());
                    1
                }
                None => {
                    println!("jepsen: UNDECIDED (seed {seed}); see {}", dir.display());
                    3
                }
            }
        }
        Err(e) => {
            eprintln!("flock-jepsen: the run could not be made: {e}");
            4
        }
    }
}

fn check(path: &Path, max_steps: u64, app_bound: Duration) -> i32 {
    let history = match History::load(path) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("flock-jepsen: {e}");
            return 4;
        }
    };
    let register = Register::new(RegisterOptions {
        prefix: String::new(),
        keys: 1,
        ops_per_key: 1,
        read_mode: ReadMode::Linearizable,
        max_steps,
    });
    let mut checkers = Vec::new();
    if history.ops.iter().any(|o| o.call.is_register()) {
        checkers.extend(register.checkers());
    }
    if history.ops.iter().any(|o| o.call.is_dataset()) {
        checkers.push(Box::new(checker::dataset::SnapshotsReadBack) as Box<dyn checker::Checker>);
    }
    if history.ops.iter().any(|o| o.call.is_app()) {
        checkers.push(Box::new(checker::app::AppsRunRight { bound: app_bound }));
    }
    let failover_apps = checker::moves::failover_apps(&history);
    if !checker::moves::move_apps(&history).is_empty() {
        checkers.push(Box::new(checker::moves::NoWriteLost));
    }
    if !failover_apps.is_empty() {
        checkers.push(Box::new(checker::failover::FailoverLosesOnlyAtRisk));
    }
    let results: Vec<_> = checkers.iter().map(|c| c.check(&history)).collect();
    for r in &results {
        println!("{}: {}", r.checker, r.summary);
        if let Some(anomalies) = r.details.get("anomalies").and_then(|a| a.as_array()) {
            for a in anomalies {
                print!(
                    "{}",
                    a.get("explanation").and_then(|e| e.as_str()).unwrap_or("")
                );
            }
        }
    }
    // The move workload's moves, with their fates and the downtime around each.
    for r in results.iter().filter(|r| r.checker == "moves") {
        let apps = r.details.get("apps").and_then(|a| a.as_object());
        for (app, f) in apps.into_iter().flatten() {
            for m in f
                .get("moves")
                .and_then(|m| m.as_array())
                .into_iter()
                .flatten()
            {
                let x = |k: &str| m.get(k).and_then(|v| v.as_f64());
                let t = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("");
                println!(
                    "{app}: move at {:.1}s {} -> {} {}; handoff {}; longest without an ack {:.2}s ({})",
                    x("at_s").unwrap_or(0.0),
                    t("from"),
                    t("to"),
                    t("fate"),
                    match (x("handoff_s"), x("handoff_at_s")) {
                        (Some(h), Some(at)) => format!("{h:.2}s (at {at:.1}s)"),
                        _ => "-".into(),
                    },
                    x("gap_s").unwrap_or(0.0),
                    t("faults")
                );
            }
        }
    }
    // The failover workload's failovers: the fault before each, and when the new primary
    // took its first append.
    for r in results.iter().filter(|r| r.checker == "failover") {
        for line in checker::failover::describe_failovers(&r.details) {
            println!("{line}");
        }
    }
    let stats = Stats::of(&history, 0, history.end_ns());
    println!(
        "{} ops ({} ok, {} fail, {} unknown); longest without any ok op {:.2}s",
        stats.all.total,
        stats.all.ok,
        stats.all.fail,
        stats.all.unknown,
        stats.longest_unavailable.seconds
    );
    for (kind, f) in &stats.by_fault {
        println!(
            "{kind}: {} faults, longest without an ok op: median {:.2}s, max {:.2}s",
            f.count, f.median_gap_s, f.max_gap_s
        );
    }
    if let Some(dir) = path.parent() {
        let png = dir.join("timeline.png");
        match flock_jepsen::report::timeline_only(&png, &history) {
            Ok(()) => println!("timeline {}", png.display()),
            Err(e) => eprintln!("flock-jepsen: {e}"),
        }
    }
    match checker::overall(&results) {
        Some(true) => 0,
        Some(false) => 1,
        None => 3,
    }
}
