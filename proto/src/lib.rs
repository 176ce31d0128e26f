//! flock's wire protocol.
//!
//! - `flock.v1.Raft`: node-to-node Raft RPCs. Payloads are openraft's own types encoded with
//!   postcard (see `flock-raft`), so the Raft messages stay exactly what openraft defines.
//! - `flock.v1.Api`: what `flockctl` (and a node forwarding to the leader) calls.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("flock.v1");
}
