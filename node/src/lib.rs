//! flock's node: the daemon `flockd` and the CLI `flockctl`, both thin over this library.
//!
//! - [`datadir`]: a node's identity and store on disk, and the rules that keep them from being
//!   overwritten or mixed up.
//! - [`daemon`]: start (`init`, `join`, `run`) and ordered shutdown of a node.
//! - [`cluster`]: proposing and reading through Raft with leader forwarding, status, and the
//!   leader's membership worker.
//! - [`api`]: the gRPC API flockctl talks to; [`edge`]: what a caller must present before a
//!   request's body is read.
//! - [`client`]: connecting to a node and the client config; [`token`]: join tokens;
//!   [`pki`]: the cluster CA, certificates, TLS and who may call what; [`dev`]: `flockd dev`.
//! - [`ctl`]: flockctl's commands and their output.
//! - [`driver`]: running apps on this node (the process driver).
//! - [`datasets`]: the node's storage backend, dataset operations and the convergence agent.
//! - [`transfer`]: snapshot streams between nodes over QUIC.
//! - [`mesh`]: the routing mesh, which forwards every app's external port on every node.
//! - [`report`]: the node's capacity and labels, reported to the cluster at start.
//! - [`plugin`]: the Docker volume plugin, on a unix socket.
//! - [`renew`]: a node renews its own certificate before it expires.
//! - [`worker`]: the node's long-lived tasks, their status and their ordered stop.

pub mod api;
pub mod apps;
pub mod client;
pub mod cluster;
pub mod ctl;
pub mod ctl_app;
pub mod ctl_dataset;
pub mod daemon;
pub mod datadir;
pub mod datasets;
pub mod dev;
pub mod driver;
pub mod edge;
pub mod mesh;
pub mod pki;
pub mod plugin;
pub mod renew;
pub mod report;
pub mod token;
pub mod transfer;
pub mod worker;
