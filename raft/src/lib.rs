//! flock's Raft layer, on openraft 0.9 (storage v2).
//!
//! - [`types`]: the openraft type configuration (commands and results are the scheduler's).
//! - [`codec`]: versioned postcard records, used on disk and on the wire.
//! - [`disk`]: the small [`RaftDisk`](disk::RaftDisk) trait and its implementation: the log's
//!   entries in an append-only log ([`wal`]), the rest in redb.
//! - [`log_store`]: the durable log with group commit; [`state_machine`]: the applied
//!   [`ClusterState`](flock_scheduler::ClusterState) and snapshots; [`store`] opens both.
//! - [`recover`]: `flockd run --force-new-cluster`, a survivor made the only voter when a
//!   majority of voters is lost for good.
//! - [`network`]: openraft's network over gRPC; [`server`]: the gRPC service that receives it.
//! - [`tls`]: flock-tls, re-exported (TLS identities, the client that checks a peer is the node
//!   it meant to reach, the server's accept loop); it lives in its own crate so the client and
//!   the snapshot transport share it without this one.

pub mod codec;
pub mod disk;
pub mod log_store;
pub mod network;
pub mod recover;
pub mod server;
pub mod state_machine;
pub mod store;
pub mod types;
pub mod wal;

pub use flock_tls as tls;
pub use store::Store;
pub use types::{MemberNode, NodeId, Raft, TypeConfig};
