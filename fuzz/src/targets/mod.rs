//! The fuzz targets: one per decoder of untrusted bytes.
//!
//! Each target's `run` takes any bytes and must not panic, hang or use unbounded memory; where
//! the decoder promises more (a sans-IO decoder gives the same answer however its input is
//! split, a config file renders back to the same apps, a receive never writes outside its
//! dataset, an error never echoes unbounded input) `run` asserts that too, so a broken promise
//! is a crash. It returns an [`Outcome`]: a short label of what happened, which the engine
//! uses as its stand-in for coverage.

pub mod config;
pub mod dir_stream;
pub mod frame;
pub mod plugin;
pub mod raft;
pub mod selftest;

use std::fmt::Display;

pub use crate::mutate::Rng;

/// What one input did, as a short label (`ok`, `err: header body ends early`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome(pub String);

impl Outcome {
    pub fn ok(what: impl Display) -> Outcome {
        Outcome(format!("ok: {what}"))
    }
    pub fn err(e: impl Display) -> Outcome {
        let mut s = format!("err: {e}");
        if s.len() > 200 {
            let mut cut = 200;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        Outcome(s)
    }
}

/// A fuzz target.
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&[u8]) -> Outcome,
    /// Valid inputs made by the real encoders (written to `fuzz/corpus/NAME/` by
    /// `flock-fuzz corpus`, and used as they are too).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Repairs what a mutation broke that the decoder checks first (checksums, the version
    /// byte), so that mutated inputs reach deeper; applied to most mutated inputs.
    pub fixup: fn(&mut Vec<u8>, &mut Rng),
    /// Builds a valid value from `arbitrary` data and encodes it.
    pub generate: Option<fn(&mut arbitrary::Unstructured) -> Vec<u8>>,
    /// Tokens of the input's format, for insertions.
    pub dict: &'static [&'static [u8]],
    /// The default largest input.
    pub max_len: usize,
    /// Crashes already found and routed to the helper that owns the code, not fixed on this
    /// branch: (text in the panic message, finding). The engine counts them as known instead of
    /// failing the run; remove an entry when its fix lands.
    pub known: &'static [(&'static str, &'static str)],
}

/// Every target, in the order `run all` runs them.
pub fn all() -> Vec<Target> {
    vec![
        frame::target(),
        dir_stream::target(),
        raft::raft_target(),
        raft::propose_target(),
        config::application_target(),
        config::compose_target(),
        config::deployment_target(),
        plugin::target(),
    ]
}

/// The target named `name` (the self-test targets included).
pub fn find(name: &str) -> Option<Target> {
    all()
        .into_iter()
        .chain(selftest::targets())
        .find(|t| t.name == name)
}

/// Targets that write files: their worker drops root privileges first (to `nobody`), so that
/// a bug that follows a planted symlink out of the sandbox cannot damage the machine.
pub fn runs_unprivileged(name: &str) -> bool {
    name == "dir_stream"
}

/// `s` cut to at most `max` bytes (on a character boundary), for assertion messages.
pub(crate) fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}
