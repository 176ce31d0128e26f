//! flock's node: the daemon `flockd` and the CLI `flockctl`, both thin over this library.
//!
//! - [`datadir`]: a node's identity and store on disk, and the rules that keep them from being
//!   overwritten or mixed up.
//! - [`daemon`]: start (`init`, `join`, `run`) and ordered shutdown of a node.
//! - [`cluster`]: proposing and reading through Raft with leader forwarding, status, and the
//!   leader's membership worker.
//! - [`api`]: the gRPC API flockctl talks to.
//! - [`client`]: connecting to a node and the client config; [`token`]: join tokens;
//!   [`pki`]: the cluster CA, certificates, TLS and who may call what; [`dev`]: `flockd dev`.
//! - [`ctl`]: flockctl's commands and their output.
//! - [`transfer`]: the QUIC endpoint for snapshot streams between nodes.

pub mod api;
pub mod client;
pub mod cluster;
pub mod ctl;
pub mod daemon;
pub mod datadir;
pub mod dev;
pub mod pki;
pub mod token;
pub mod transfer;
