//! A deterministic simulation of a flock cluster's decisions, in the way FoundationDB and
//! TigerBeetle test theirs: many nodes run the real decision cores (flock-decide) against the
//! real `ClusterState::apply`, on one thread, with a seeded clock, network (delays, partitions,
//! lost answers), crashes and hangs of flockd, crashes of whole machines, drivers that fail or
//! lie, and leases, fencing and failover (a leader's liveness, clocks that drift). After
//! every step it checks DESIGN.md's invariants; a failing seed replays exactly:
//! `cargo run -p flock-sim -- --seed N`.
//!
//! - [`world`]: the simulated cluster, its executors, nemesis and invariants.
//! - [`rng`]: the seeded random numbers everything draws from.

pub mod rng;
pub mod world;

pub use world::{Bugs, Config, Outcome, Violation, World};

/// Runs one seed.
pub fn run(seed: u64, cfg: &Config) -> Result<Outcome, Violation> {
    World::new(seed, cfg.clone()).run()
}

/// The command that replays `seed` (with `bug` put back, if any).
pub fn replay_command(seed: u64, bug: Option<&str>, cfg: &Config) -> String {
    let mut cmd = format!("cargo run --release -p flock-sim -- --seed {seed}");
    if let Some(b) = bug {
        cmd += &format!(" --bug {b}");
    }
    if !cfg.retention {
        cmd += " --without-retention";
    }
    cmd
}
