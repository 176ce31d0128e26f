//! flock's node: the daemon `flockd` and the CLI `flockctl`, both thin over this library.
//!
//! Every decision a node makes lives in flock-decide ([`flock_decide`]), without IO; the agents
//! here observe, ask it and carry out what it says.
//!
//! - [`datadir`]: a node's identity and store on disk, and the rules that keep them from being
//!   overwritten or mixed up.
//! - [`daemon`]: start (`init`, `join`, `run`) and ordered shutdown of a node.
//! - [`cluster`]: proposing and reading through Raft with leader forwarding, status, and the
//!   leader's membership worker.
//! - [`api`]: the gRPC API flockctl talks to; [`edge`]: what a caller must present before a
//!   request's body is read.
//! - [`token`]: join tokens; [`pki`]: who may call what ([`pki::Authorizer`]), over flock-tls's
//!   CA, certificates and private files (re-exported there); [`dev`]: `flockd dev`.
//!   Connecting to a node and the client config are flock-client's ([`flock_client`]).
//! - [`ctl`]: flockctl's commands and their output, one module per command group.
//! - [`apps`]: the apps agent, executor of [`flock_decide::apps`] (start gate, failpoint).
//! - [`driver`]: running apps on this node (the process and docker drivers), failing closed:
//!   what cannot be observed is reported unknown, never absent.
//! - [`lease`]: renewing this node's lease through the leader, and the leader's liveness
//!   worker that declares silent nodes down (failover) and steady ones back up.
//! - [`placement`]: the leader's worker that places the waiting instances of scaled apps once
//!   room appears ([`flock_scheduler::scale`] decides).
//! - [`fence`]: the lease record and the watchdog (`flockd fence-watch`) that kills a node's
//!   stateful apps once its lease has run out, even when flockd is dead or hung.
//! - [`datasets`]: the node's storage backend, dataset operations, and the datasets agent,
//!   executor of [`flock_decide::datasets`] and [`flock_decide::moves`].
//! - [`transfer`]: snapshot streams between nodes over QUIC (the push protocol; the QUIC tuning
//!   and lanes are flock-transport's).
//! - [`mesh`]: the routing mesh, which forwards every app's external port on every node.
//! - [`report`]: the node's capacity and labels, reported to the cluster at start.
//! - [`plugin`]: the Docker volume plugin, on a unix socket.
//! - [`renew`]: a node renews its own certificate before it expires.
//! - [`worker`]: the node's long-lived tasks, their status and their ordered stop.

pub mod api;
pub mod apps;
pub mod cluster;
pub mod ctl;
pub mod daemon;
pub mod datadir;
pub mod datasets;
pub mod dev;
pub mod driver;
pub mod edge;
pub mod fence;
pub mod health;
pub mod lease;
pub mod mesh;
pub mod metrics;
pub mod pki;
pub mod placement;
pub mod plugin;
pub mod renew;
pub mod report;
pub mod token;
pub mod transfer;
pub mod worker;
