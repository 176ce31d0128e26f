//! Fuzzing of every flock decoder that takes bytes from the network, a file or a user, on the
//! stable toolchain: coverage-free, structure-aware and outcome-guided.
//!
//! - [`targets`]: one [`Target`] per decoder: a `fn(&[u8]) -> Outcome` that must not panic,
//!   hang or use unbounded memory, its seeds (valid inputs made by the real encoders), a
//!   format-aware fix-up (checksums, version bytes) and an `arbitrary`-driven generator of
//!   valid values re-encoded.
//! - [`mutate`]: the mutations (byte flips, splices, length-field tweaks, truncation,
//!   repetition, dictionary tokens) and the deterministic [`mutate::Rng`].
//! - [`engine`]: the loop that runs one target in this process: inputs under `catch_unwind`,
//!   a watchdog thread for inputs over the time limit, a counting allocator for inputs over
//!   the memory limit, panics saved to `fuzz/artifacts/TARGET/`.
//! - `main.rs`: the `flock-fuzz` command: `list`, `run TARGET|all --time 60s`, `replay FILE`,
//!   and `corpus` (writes the seed corpus). `run` supervises one worker process per target,
//!   so that a hang or an out-of-memory input ends only the worker; its input is read back
//!   from a shared mapping and saved.
//!
//! Without coverage feedback the engine keeps an input in its corpus when it produced an
//! outcome not seen before (an error kind, a decoded variant): a cheap stand-in for new edges.

pub mod engine;
pub mod gen;
pub mod mutate;
pub mod targets;

pub use targets::{all, find, Outcome, Target};
