//! `flock-fuzz`: fuzzes flock's decoders of untrusted bytes on stable Rust.
//!
//! ```text
//! flock-fuzz list
//! flock-fuzz run TARGET|all [--time 60s] [--seed N] [--max-len N]
//! flock-fuzz replay FILE [--target TARGET]
//! flock-fuzz corpus                 # writes the seed corpus to fuzz/corpus/TARGET/
//! ```
//!
//! `run` starts one worker process per target (this binary, `worker`) and restarts it for the
//! time left when an input hangs or runs out of memory, after saving that input.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use flock_fuzz::engine::{self, RunConfig, Slot, Stats, EXIT_HANG, EXIT_MEMORY};
use flock_fuzz::Target;

#[global_allocator]
static ALLOC: engine::CountingAlloc = engine::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "flock-fuzz",
    about = "Fuzzes flock's decoders of untrusted bytes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Limits {
    /// An input that runs longer than this is a hang.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    input_timeout: Duration,
    /// An input for which the process's live heap passes this many MiB is a memory finding.
    #[arg(long, default_value_t = 1024)]
    mem_limit_mb: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the targets.
    List,
    /// Fuzzes one target, or all of them one after another, each for --time.
    Run {
        /// A target's name, or `all`.
        target: String,
        /// How long to fuzz each target.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        time: Duration,
        /// The random seed (the same seed and build give the same inputs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The largest input, in bytes (default: the target's own).
        #[arg(long)]
        max_len: Option<usize>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Runs one saved input (from fuzz/artifacts/TARGET/ or fuzz/regressions/TARGET/).
    Replay {
        file: PathBuf,
        /// The target (default: the name of the file's directory).
        #[arg(long)]
        target: Option<String>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Writes every target's built-in seeds to fuzz/corpus/TARGET/.
    Corpus,
    /// Internal: one worker process of `run`.
    #[command(hide = true)]
    Worker {
        target: String,
        #[arg(long)]
        time_ms: u64,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        max_len: usize,
        #[arg(long)]
        slot: PathBuf,
        #[arg(long)]
        stats: PathBuf,
        #[command(flatten)]
        limits: Limits,
    },
}

/// Becomes `nobody` (uid and gid 65534, no supplementary groups) when running as root, after
/// handing `dir` (where the worker writes) to it. Refuses to go on as root.
fn drop_privileges(dir: &Path) -> Result<(), String> {
    // SAFETY: plain system calls without pointers (setgroups gets an empty list).
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        std::os::unix::fs::chown(dir, Some(65534), Some(65534))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(65534) != 0
            || libc::setuid(65534) != 0
        {
            return Err(format!(
                "cannot become nobody: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::geteuid() == 0 {
            return Err("still root after setuid".into());
        }
    }
    Ok(())
}

/// The fuzz crate's directory: corpus/, artifacts/ and regressions/ live there.
fn home() -> PathBuf {
    std::env::var_os("FLOCK_FUZZ_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn target_or_exit(name: &str) -> Result<Target, ExitCode> {
    flock_fuzz::find(name).ok_or_else(|| {
        eprintln!(
            "flock-fuzz: no target {:?}; `flock-fuzz list` shows them",
            name.chars().take(64).collect::<String>()
        );
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List => {
            for t in flock_fuzz::all() {
                println!("{:<20} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Cmd::Corpus => {
            for t in flock_fuzz::all() {
                let dir = home().join("corpus").join(t.name);
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    eprintln!("flock-fuzz: cannot create {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                let seeds = (t.seeds)();
                for (i, s) in seeds.iter().enumerate() {
                    let path = dir.join(format!("seed-{i:02}"));
                    if let Err(e) = std::fs::write(&path, s) {
                        eprintln!("flock-fuzz: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                println!("{}: {} seeds in {}", t.name, seeds.len(), dir.display());
            }
            ExitCode::SUCCESS
        }
        Cmd::Replay {
            file,
            target,
            limits,
        } => {
            let name = target.or_else(|| {
                file.parent()
                    .and_then(Path::file_name)
                    .map(|n| n.to_string_lossy().into_owned())
            });
            let t = match target_or_exit(name.as_deref().unwrap_or("")) {
                Ok(t) => t,
                Err(c) => return c,
            };
            let input = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("flock-fuzz: cannot read {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            if flock_fuzz::targets::runs_unprivileged(t.name) {
                let dir = std::env::temp_dir();
                if let Err(e) =
                    drop_privileges(&dir.join(format!("flock-fuzz-replay-{}", std::process::id())))
                {
                    eprintln!("flock-fuzz: {e}");
                    return ExitCode::FAILURE;
                }
            }
            engine::start_watchdog(limits.input_timeout);
            engine::set_memory_limit(limits.mem_limit_mb << 20);
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                engine::disarm();
                engine::set_memory_limit(0);
                report(info)
            }));
            let start = Instant::now();
            // No catch_unwind: a panic shows its message and location (and a backtrace with
            // RUST_BACKTRACE=1) and exits with 101.
            let outcome = engine::timed(|| (t.run)(&input));
            flock_fuzz::targets::dir_stream::cleanup();
            println!(
                "{}: {} bytes ran in {:?} without a crash: {}",
                t.name,
                input.len(),
                start.elapsed(),
                outcome.0
            );
            ExitCode::SUCCESS
        }
        Cmd::Worker {
            target,
            time_ms,
            seed,
            max_len,
            slot,
            stats,
            limits,
        } => {
            let t = match target_or_exit(&target) {
                Ok(t) => t,
                Err(c) => return c,
            };
            let slot = match Slot::create(&slot, max_len) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("flock-fuzz: cannot map {}: {e}", slot.display());
                    return ExitCode::FAILURE;
                }
            };
            if flock_fuzz::targets::runs_unprivileged(t.name) {
                if let Err(e) = drop_privileges(&home().join("artifacts").join(t.name)) {
                    eprintln!("flock-fuzz: {e}");
                    return ExitCode::FAILURE;
                }
            }
            let cfg = RunConfig {
                time: Duration::from_millis(time_ms),
                seed,
                max_len,
                corpus_dir: home().join("corpus").join(t.name),
                artifacts: home().join("artifacts").join(t.name),
                slot: Some(slot),
                stats_file: Some(stats),
            };
            engine::start_watchdog(limits.input_timeout);
            // The seeds and corpus are made before the limit applies.
            engine::set_memory_limit(limits.mem_limit_mb << 20);
            engine::run(&t, &cfg);
            flock_fuzz::targets::dir_stream::cleanup();
            ExitCode::SUCCESS
        }
        Cmd::Run {
            target,
            time,
            seed,
            max_len,
            limits,
        } => {
            let targets = if target == "all" {
                flock_fuzz::all()
            } else {
                match target_or_exit(&target) {
                    Ok(t) => vec![t],
                    Err(c) => return c,
                }
            };
            let mut findings = 0;
            let mut rows = Vec::new();
            for t in &targets {
                let r = supervise(t, time, seed, max_len.unwrap_or(t.max_len), &limits);
                findings += r.crashes + r.hangs + r.memory;
                rows.push(r);
            }
            println!(
                "\n{:<20} {:>12} {:>10} {:>8} {:>6} {:>7} {:>8} {:>8}",
                "target",
                "executions",
                "execs/s",
                "crashes",
                "hangs",
                "memory",
                "known",
                "outcomes"
            );
            for r in &rows {
                println!(
                    "{:<20} {:>12} {:>10.0} {:>8} {:>6} {:>7} {:>8} {:>8}",
                    r.name,
                    r.execs,
                    r.execs as f64 / r.elapsed.as_secs_f64().max(1e-9),
                    r.crashes,
                    r.hangs,
                    r.memory,
                    r.known,
                    r.outcomes
                );
            }
            if findings > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// One target's totals over its workers.
struct Row {
    name: &'static str,
    execs: u64,
    elapsed: Duration,
    crashes: usize,
    hangs: usize,
    memory: usize,
    outcomes: usize,
    known: u64,
}

fn supervise(t: &Target, time: Duration, seed: u64, max_len: usize, limits: &Limits) -> Row {
    let start = Instant::now();
    let artifacts = home().join("artifacts").join(t.name);
    let _ = std::fs::create_dir_all(&artifacts);
    let pid = std::process::id();
    let slot = artifacts.join(format!(".slot-{pid}"));
    let stats_path = artifacts.join(format!(".stats-{pid}"));
    let mut row = Row {
        name: t.name,
        execs: 0,
        elapsed: Duration::ZERO,
        crashes: 0,
        hangs: 0,
        memory: 0,
        outcomes: 0,
        known: 0,
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("flock-fuzz"));
    let mut worker = 0u64;
    while start.elapsed() + Duration::from_millis(50) < time {
        let left = time - start.elapsed();
        let _ = std::fs::remove_file(&stats_path);
        let status = Command::new(&exe)
            .arg("worker")
            .arg(t.name)
            .args(["--time-ms", &left.as_millis().to_string()])
            .args(["--seed", &seed.wrapping_add(worker * 7919).to_string()])
            .args(["--max-len", &max_len.to_string()])
            .arg("--slot")
            .arg(&slot)
            .arg("--stats")
            .arg(&stats_path)
            .args([
                "--input-timeout",
                &humantime::format_duration(limits.input_timeout).to_string(),
            ])
            .args(["--mem-limit-mb", &limits.mem_limit_mb.to_string()])
            .status();
        worker += 1;
        let stats = std::fs::read_to_string(&stats_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .map(|v| Stats::from_json(&v))
            .unwrap_or_default();
        row.execs += stats.execs;
        row.crashes += stats.crashes.len();
        row.outcomes = row.outcomes.max(stats.outcomes);
        row.known += stats.known;
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                eprintln!("flock-fuzz: cannot start a worker for {}: {e}", t.name);
                break;
            }
        };
        if status.success() {
            break;
        }
        let kind = match status.code() {
            Some(EXIT_HANG) => {
                row.hangs += 1;
                "hang"
            }
            Some(EXIT_MEMORY) => {
                row.memory += 1;
                "memory"
            }
            _ => {
                row.crashes += 1;
                "crash"
            }
        };
        // The input it was running is in the slot; the executions since the last stats write
        // are lost (at most a second's worth).
        row.execs += 1;
        match Slot::read(&slot) {
            Some(input) => match engine::save_artifact(&artifacts, kind, &input) {
                Ok(path) => eprintln!(
                    "{}: {} ({status})\n  reproducer: {}\n  replay: flock-fuzz replay {}",
                    t.name,
                    kind.to_uppercase(),
                    path.display(),
                    path.display()
                ),
                Err(e) => eprintln!("{}: {kind}, reproducer not saved: {e}", t.name),
            },
            None => eprintln!("{}: {kind} ({status}), its input was not recorded", t.name),
        }
        if worker > 50 {
            eprintln!(
                "{}: more than 50 workers ended early; giving up on it",
                t.name
            );
            break;
        }
    }
    row.elapsed = start.elapsed();
    let _ = std::fs::remove_file(&slot);
    let _ = std::fs::remove_file(&stats_path);
    eprintln!(
        "{}: {} executions in {:.1}s ({:.0}/s), {} crashes, {} hangs, {} over memory, {} known",
        t.name,
        row.execs,
        row.elapsed.as_secs_f64(),
        row.execs as f64 / row.elapsed.as_secs_f64().max(1e-9),
        row.crashes,
        row.hangs,
        row.memory,
        row.known
    );
    row
}
