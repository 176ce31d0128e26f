//! The QUIC endpoint that snapshot streams between nodes travel on, with the cluster's mutual
//! TLS (see [`crate::pki::NodeTls::quic_server`]).
//!
//! For now the endpoint admits members and holds their connections; the dataset streams that use
//! it are built on top (issue 5).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::pki::Authorizer;

/// Accepts QUIC connections until `shutdown`: completes the handshake (which already requires a
/// certificate of this cluster's CA), then refuses removed nodes and non-node certificates.
pub async fn serve(
    endpoint: quinn::Endpoint,
    auth: Authorizer,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let auth = auth.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            let certs = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|v| Arc::new(*v));
            match auth.check_node(&certs) {
                Ok(node) => {
                    tracing::debug!(node, remote = %conn.remote_address(), "QUIC peer connected");
                    let _ = conn.closed().await;
                }
                Err(status) => {
                    conn.close(1u32.into(), status.message().as_bytes());
                }
            }
        });
    }
}
