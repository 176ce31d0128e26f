//! `flock-sim`: runs seeds of the deterministic simulation and prints the first violation with
//! the events before it.
//!
//! ```text
//! flock-sim --seed 42                 # replay one seed
//! flock-sim --seeds 0..1000           # a range; prints throughput
//! flock-sim --seeds 0..200 --bug start-without-recheck   # show a reintroduced bug is caught
//! flock-sim --seeds 0..300 --without-retention   # the world before issue 16: nothing pruned
//! flock-sim --seed 42 --verbose       # every traced event as it happens
//! ```

use std::process::ExitCode;
use std::time::Instant;

use flock_sim::{replay_command, Bugs, Config};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 0..100u64;
    let mut cfg = Config::default();
    let mut bug = None;
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        if args[i] == "--without-retention" {
            cfg.retention = false;
            i += 1;
            continue;
        }
        if args[i] == "--verbose" {
            cfg.verbose = true;
            i += 1;
            continue;
        }
        match args[i].as_str() {
            "--seed" => match value.parse::<u64>() {
                Ok(s) => seeds = s..s + 1,
                Err(_) => return usage(&format!("--seed {value:?} is not a number")),
            },
            "--seeds" => {
                let parsed = value
                    .split_once("..")
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                match parsed {
                    Some((a, b)) => seeds = a..b,
                    None => return usage(&format!("--seeds {value:?} is not A..B")),
                }
            }
            "--bug" => match Bugs::named(&value) {
                Some(b) => {
                    cfg.bugs = b;
                    bug = Some(value.clone());
                }
                None => {
                    return usage(&format!(
                        "--bug {value:?} is not one of {}",
                        Bugs::NAMES.join(", ")
                    ))
                }
            },
            "--nodes" => match value.parse() {
                Ok(n) if n >= 2 => cfg.nodes = n,
                _ => return usage(&format!("--nodes {value:?}: give 2 or more")),
            },
            other => return usage(&format!("unknown argument {other:?}")),
        }
        i += 2;
    }
    let started = Instant::now();
    let (mut runs, mut sim_ms, mut pruned, mut moves) = (0u64, 0u64, 0u64, 0u64);
    let mut total = flock_sim::Outcome::default();
    for seed in seeds {
        match flock_sim::run(seed, &cfg) {
            Ok(o) => {
                runs += 1;
                sim_ms += o.sim_ms;
                pruned += o.snapshots_pruned;
                moves += o.moves_committed;
                total.declared_down += o.declared_down;
                total.failovers += o.failovers;
                total.backed_up += o.backed_up;
                total.fenced += o.fenced;
                total.writes_acked += o.writes_acked;
                total.writes_lost_in_failover += o.writes_lost_in_failover;
            }
            Err(v) => {
                eprintln!("{v}");
                eprintln!("replay: {}", replay_command(seed, bug.as_deref(), &cfg));
                return ExitCode::FAILURE;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{runs} seeds passed in {secs:.1} s: {:.0} seeds/min, {:.0} simulated node-seconds per second",
        runs as f64 * 60.0 / secs,
        (sim_ms as f64 / 1000.0) * cfg.nodes as f64 / secs
    );
    println!("{moves} moves committed; {pruned} local snapshot copies pruned by retention");
    println!(
        "{} nodes declared down, {} datasets failed over, {} nodes back up; the watchdog killed {} instances",
        total.declared_down, total.failovers, total.backed_up, total.fenced
    );
    println!(
        "{} of {} acknowledged writes lost in failovers (taken after the snapshot the new primary started from)",
        total.writes_lost_in_failover, total.writes_acked
    );
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "flock-sim: {why}\nusage: flock-sim [--seed N | --seeds A..B] [--bug NAME] [--nodes N] [--without-retention] [--verbose]"
    );
    ExitCode::from(2)
}
