//! flock-transport: how snapshot streams travel between nodes, below the push protocol
//! (flock-node's `transfer`). A crate of its own so the stream benchmarks (bench's
//! `flock-streams`) measure exactly what flockd uses without depending on the daemon.
//!
//! - [`quic`]: the QUIC tuning (transport parameters, the endpoint's UDP socket) and the QUIC
//!   client/server configurations over the cluster's mutual TLS ([`flock_tls`]).
//! - [`lanes`]: one transfer's byte stream over N unidirectional QUIC streams of a connection,
//!   a stream cut short always an error.

pub mod lanes;
pub mod quic;
