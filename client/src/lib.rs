//! flock-client: what every client of a flock cluster shares (flockctl, a joining flockd, the
//! jepsen harness, the benchmarks), so each reaches a node and reads its config the same way.
//! Depends on the wire API ([`flock_proto`]) and TLS ([`flock_tls`]) only, never on the daemon.
//!
//! - [`config`]: the client config file (`admin.conf`, [`ClientConfig`]): where the cluster is,
//!   whom to trust, who the client is; kept 0600 (it holds a private key).
//! - [`mod@connect`]: connecting to a node's API over mutual TLS, accepting any node of the
//!   cluster's CA as the server ([`connect()`]), retrying with backoff ([`with_backoff`]), and
//!   errors with their sources ([`error_chain`]).
//! - [`size`]: sizes as people write them (`512M`, `1.5T`: [`parse_size`]) and read them
//!   (`1.5 GiB`: [`human`]).

pub mod config;
pub mod connect;
pub mod size;

pub use config::{client_tls, ClientConfig, ClientError, CLIENT_CONFIG_FORMAT};
pub use connect::{connect, error_chain, with_backoff};
pub use size::{human, parse_size, BadSize};
