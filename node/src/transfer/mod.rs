//! Snapshot streams between nodes, over QUIC with the cluster's mutual TLS (see
//! [`quic::quic_server`]).
//!
//! - [`serve`]: the endpoint's accept loop: admits members only, and serves each stream a peer
//!   opens ([`push::receive`]).
//! - [`Peers`]: one connection per peer node, checked to be the node it was dialled as.
//! - [`push`]: the push protocol (header, resume from the newest common snapshot, outcome).
//! - [`quic`] (the transport tuning) and [`lanes`]: flock-transport's, re-exported here where
//!   the push protocol uses them.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use flock_raft::state_machine::StateView;
use flock_scheduler::NodeId;

use crate::datasets::Datasets;
use crate::pki::{Authorizer, Peer, TlsIdentity, SERVER_NAME};

pub mod push;
pub use flock_transport::{lanes, quic};

fn peer_certs(conn: &quinn::Connection) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|v| Arc::new(*v))
}

/// Accepts QUIC connections until `shutdown`: completes the handshake (which already requires a
/// certificate of this cluster's CA), refuses removed nodes and non-node certificates, and
/// serves the streams members open. Receives in progress are cancelled at shutdown (the
/// datasets stay at their last good snapshot).
pub async fn serve(
    endpoint: quinn::Endpoint,
    auth: Authorizer,
    datasets: Arc<Datasets>,
    view: StateView,
    mut shutdown: watch::Receiver<bool>,
) {
    let cancel = CancellationToken::new();
    let _cancel_all = cancel.clone().drop_guard();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let auth = auth.clone();
        let datasets = datasets.clone();
        let view = view.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            let node = match auth.check_node(&peer_certs(&conn)) {
                Ok(node) => node,
                Err(status) => {
                    conn.close(1u32.into(), status.message().as_bytes());
                    return;
                }
            };
            tracing::debug!(node, remote = %conn.remote_address(), "QUIC peer connected");
            loop {
                let (send, recv) = tokio::select! {
                    s = conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(_) => return,
                    },
                    _ = cancel.cancelled() => return,
                };
                tokio::spawn(push::receive(
                    node,
                    send,
                    recv,
                    datasets.clone(),
                    view.clone(),
                    cancel.child_token(),
                ));
            }
        });
    }
}

/// QUIC connections to peer nodes, one per node, made on demand and remade when they close.
pub struct Peers {
    endpoint: quinn::Endpoint,
    identity: TlsIdentity,
    tuning: quic::QuicTuning,
    conns: tokio::sync::Mutex<HashMap<NodeId, quinn::Connection>>,
}

impl Peers {
    /// Connections from `endpoint`, presenting `identity`, with the endpoint's `tuning`.
    pub fn new(endpoint: quinn::Endpoint, identity: TlsIdentity, tuning: quic::QuicTuning) -> Self {
        Peers {
            endpoint,
            identity,
            tuning,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A connection to node `id` at `addr` (HOST:PORT, UDP): the TLS handshake fails unless
    /// the peer's certificate is node `id`'s.
    pub async fn connect(&self, id: NodeId, addr: &str) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.conns.lock().await.get(&id) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        // Connect without holding the map: one unreachable peer must not delay the others.
        let sock = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot resolve node {id}'s address {addr}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("node {id}'s address {addr} resolves to nothing"))?;
        let config = self.tuning.client_config(&self.identity, Peer::Node(id))?;
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.endpoint.connect_with(config, sock, SERVER_NAME)?,
        )
        .await
        .map_err(|_| anyhow::anyhow!("no QUIC answer from node {id} at {addr} within 10 s"))?
        .map_err(|e| anyhow::anyhow!("QUIC connection to node {id} at {addr}: {e}"))?;
        let mut conns = self.conns.lock().await;
        match conns.get(&id) {
            // Another task connected meanwhile: use one connection per peer.
            Some(c) if c.close_reason().is_none() => {
                conn.close(0u32.into(), b"duplicate");
                Ok(c.clone())
            }
            _ => {
                conns.insert(id, conn.clone());
                Ok(conn)
            }
        }
    }

    /// Forgets every connection (after this node's certificate was renewed), so the next
    /// pushes connect with the new one; pushes under way finish on theirs.
    pub async fn forget_all(&self) {
        self.conns.lock().await.clear();
    }

    /// Forgets the connection to `id` (after it failed), so the next push connects afresh.
    pub async fn forget(&self, id: NodeId) {
        if let Some(c) = self.conns.lock().await.remove(&id) {
            c.close(0u32.into(), b"failed");
        }
    }
}
