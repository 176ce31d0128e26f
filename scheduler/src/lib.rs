//! flock's cluster model, with no IO, no clock and no async.
//!
//! - [`state`]: [`ClusterState`], the desired state every node replicates through Raft, the
//!   [`Command`]s that change it and [`ClusterState::apply`], a pure function that validates a
//!   command against the state and returns a typed [`CommandResult`].
//! - [`config`]: Flocker's application.yml/deployment.yml and compose files, parsed and resolved
//!   against the cluster's nodes, with errors that name file, line and field.
//! - [`app`]: deployed applications and the deploy planner (placement, changes).
//! - [`fit`]: whether an app fits a node (driver, labels, memory and cpu).
//! - [`dataset`]: datasets in the desired state (primary, epoch, replicas, snapshots, moves)
//!   and the rules that keep one writer per dataset.
//! - [`membership`]: decisions about Raft membership (which learners to promote to voters,
//!   whether removing a voter keeps a quorum), as plain functions over plain values.
//! - [`limits`]: every size limit in one place, [`Command::check_limits`] (run before a command
//!   is proposed) and [`shown`], how errors quote user input.
//! - [`retention`]: which snapshots are kept: the policy, and automatic vs. users' snapshots.
//! - [`failover`]: replication settings, nodes declared down, the failover of their datasets
//!   and apps, and the diverged copies a failover leaves on the old primary.
//! - [`scale`]: instances of scaled stateless apps that wait, and the leader's decision to
//!   place them once room appears ([`Command::PlaceInstances`]).
//! - [`mount`]: Docker containers' mounts of datasets (the volume plugin), and the rule that a
//!   dataset is mounted only on its primary and never moves while mounted.
//!
//! The Raft layer (`flock-raft`) stores commands and calls `apply`; the node (`flock-node`)
//! asks the planners what to do and carries it out.

pub mod app;
pub mod config;
pub mod dataset;
pub mod failover;
pub mod fit;
pub mod json_field;
pub mod legacy;
pub mod limits;
pub mod membership;
pub mod mount;
pub mod retention;
pub mod scale;
pub mod state;
#[cfg(test)]
mod testutil;

pub use app::{App, Change, Health};
pub use dataset::{Dataset, DatasetId, DatasetMove, SnapshotRecord};
pub use limits::{shown, MAX_COMMAND_BYTES};
pub use retention::Retention;
pub use state::{
    hash_join_secret, is_secret_hash, ApplyError, ClusterState, Command, CommandResult, KvEntry,
    Node, NodeId, NodeState, APPLY_LEVEL, MAX_KEY_LEN, MAX_VALUE_LEN,
};
