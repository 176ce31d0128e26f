//! flock's node decisions, with no IO, no clock and no async: each is a function of the
//! replicated state ([`flock_scheduler::ClusterState`]), this node's observations and the time
//! ([`Instant`], handed in), returning typed actions for the node's executors (flock-node's
//! agents) to carry out. A deterministic simulation (flock-sim) drives them for many nodes
//! against the real `ClusterState::apply`.
//!
//! Why a crate beside flock-scheduler rather than inside it: flock-scheduler is the replicated
//! model, whose `apply` every node must compute identically from the log forever (its types are
//! stored); the decisions here are one node's, change with what a node observes, and may change
//! freely between releases. They depend on the model, never the other way round.
//!
//! - [`time`]: [`Instant`], a point on a node's monotonic clock as the executor or the
//!   simulation hands it in.
//! - [`apps`]: which app instances to start, stop, update or restart here ([`apps::AppsCore`]),
//!   restart backoff, the start guard re-checked against the latest state ([`apps::may_start`]),
//!   the spec an instance runs ([`apps::RunSpec`]) and its link variables.
//! - [`health`]: which health reports a node proposes ([`health::reports`]): its instances'
//!   verdicts against what the replicated state records, so only transitions go through Raft.
//! - [`lease`]: a node's lease ([`lease::Lease`]: it runs stateful apps only while it holds),
//!   and the leader's [`lease::Liveness`]: when a silent node is declared down, when it is back.
//! - [`push`]: pushes of snapshots between holders: who may push ([`push::admit`]), each
//!   step's plan ([`push::plan_step`]), and the receiver's guard that no push rolls a copy back
//!   past a snapshot recorded in Raft ([`push::guard_rollback`]).
//! - [`copies`]: whether a node's copy may be used (started on, mounted):
//!   [`copies::copy_is_current`].
//! - [`datasets`]: [`datasets::DatasetsCore`], which copies a node creates and destroys, which
//!   moves and replica pushes it starts, and the retry backoff of those jobs.
//! - [`moves`]: [`moves::Move`], one attempt of a dataset's move away from a node as a state
//!   machine (copy rounds, handoff, the wait for the users to stop, the last delta, commit).
//! - [`upgrade`]: whether every member's build applies a command a leader would propose on its
//!   own ([`upgrade::cannot_apply`]).
//! - [`retention`]: which recorded snapshots a dataset's retention prunes
//!   ([`retention::to_prune`]) and which local copies of forgotten ones a holder destroys.

pub mod apps;
pub mod copies;
pub mod datasets;
pub mod health;
pub mod lease;
pub mod moves;
pub mod push;
pub mod retention;
pub mod rollback;
#[cfg(test)]
mod testutil;
pub mod time;
pub mod upgrade;

pub use time::Instant;
