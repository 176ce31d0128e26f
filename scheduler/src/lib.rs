//! flock's cluster model, with no IO, no clock and no async.
//!
//! - [`state`]: [`ClusterState`], the desired state every node replicates through Raft, the
//!   [`Command`]s that change it and [`ClusterState::apply`], a pure function that validates a
//!   command against the state and returns a typed [`CommandResult`].
//! - [`membership`]: decisions about Raft membership (which learners to promote to voters,
//!   whether removing a voter keeps a quorum), as plain functions over plain values.
//!
//! The Raft layer (`flock-raft`) stores commands and calls `apply`; the node (`flock-node`)
//! asks the planners what to do and carries it out.

pub mod membership;
pub mod state;

pub use state::{
    ApplyError, ClusterState, Command, CommandResult, KvEntry, Node, NodeId, NodeState,
    MAX_KEY_LEN, MAX_VALUE_LEN,
};
