//! A node renews its own certificate before it expires, without an operator: at two thirds of
//! its lifetime it asks the CA holder (itself, when it holds the CA) to sign a new certificate
//! for its id over the same key, authenticated by the certificate it still has; saves it to
//! `tls/node.crt` (atomically: the key does not change, so the pair on disk always matches);
//! and presents it on every connection made from then on, client and server alike. Cached peer
//! connections are dropped so new calls use the new certificate. A failed attempt is retried
//! (every tenth of the time left, between 1 s and 1 min) until the certificate expires, with a
//! warning each time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use flock_proto::v1::RenewNodeCertRequest;
use flock_raft::network::GrpcNetwork;
use flock_raft::tls::validity;

use crate::cluster::Cluster;
use crate::pki::{pem_to_der, role_of, write_public, CertAuthority, Role, TlsIdentity, TlsPaths};
use crate::transfer::Peers;
use crate::worker::WorkerStatus;

/// What renewing takes: where the certificate lives, the identity every connection uses, the
/// CA when this node holds it, and the connection caches to drop afterwards.
pub struct Renewal {
    pub paths: TlsPaths,
    pub ca_pem: String,
    pub key_pem: String,
    pub identity: TlsIdentity,
    pub ca: Option<Arc<CertAuthority>>,
    pub cluster: Arc<Cluster>,
    pub network: GrpcNetwork,
    pub peers: Arc<Peers>,
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life * 2 / 3
}

/// Renews this node's certificate whenever it is due, until `shutdown`. Its status: idle until
/// the next renewal (saying when), a failed attempt as its last error, failed when the
/// certificate cannot be read.
pub async fn run(r: Renewal, mut shutdown: watch::Receiver<bool>, status: WorkerStatus) {
    loop {
        let Some((not_before, not_after)) = r
            .identity
            .certificate()
            .and_then(|c| validity(c.as_ref()).ok())
        else {
            tracing::warn!("this node's certificate cannot be read; it will not be renewed");
            status.fail("this node's certificate cannot be read; it will not be renewed");
            return;
        };
        let due = renew_at(not_before, not_after);
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        status.idle(format!(
            "next renewal at {}",
            humantime::format_rfc3339_seconds(due)
        ));
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        status.running();
        match r.renew_once().await {
            Ok(until) => {
                tracing::info!(
                    valid_until = %humantime::format_rfc3339_seconds(until),
                    "renewed this node's certificate"
                );
            }
            Err(e) => {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(
                    error = %format!("{e:#}"),
                    expires_in = ?left,
                    "renewing this node's certificate failed; retrying in {retry:?}"
                );
                status.error(format!("renewing this node's certificate: {e:#}"));
                status.idle(format!("retrying the renewal in {retry:?}"));
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

impl Renewal {
    /// One renewal; returns the new certificate's expiry.
    async fn renew_once(&self) -> anyhow::Result<SystemTime> {
        let me = self.cluster.node_id;
        let csr_pem = csr_for_key(&self.key_pem)?;
        let cert_pem = match &self.ca {
            Some(ca) => ca.sign_csr(&csr_pem, &Role::Node(me))?,
            None => {
                let (holder, addr) = {
                    let a = self.cluster.view.read();
                    let holder = a.cluster.ca_holder;
                    (holder, a.cluster.nodes.get(&holder).map(|n| n.addr.clone()))
                };
                let addr = addr.ok_or_else(|| {
                    anyhow::anyhow!("the cluster CA was on node {holder}, which is no longer a member; no certificate can be renewed")
                })?;
                let mut client = self.cluster.peer(holder, &addr)?;
                let mut req = tonic::Request::new(RenewNodeCertRequest { csr_pem });
                req.set_timeout(Duration::from_secs(10));
                client
                    .renew_node_cert(req)
                    .await
                    .map_err(|s| anyhow::anyhow!("node {holder} at {addr}: {}", s.message()))?
                    .into_inner()
                    .cert_pem
            }
        };
        let der = pem_to_der(&cert_pem, "renewed certificate")?;
        if role_of(&der)? != Role::Node(me) {
            anyhow::bail!("the CA holder answered with a certificate for another identity");
        }
        let (_, not_after) = validity(&der)?;
        // Checks that the certificate is for this node's key before anything is replaced.
        TlsIdentity::from_pem(&self.ca_pem, Some((&cert_pem, &self.key_pem)))?;
        write_public(&self.paths.node_cert(), &cert_pem)?;
        self.identity.replace(&cert_pem, &self.key_pem)?;
        self.cluster.reset_peers();
        self.network.reset_channels();
        self.peers.forget_all().await;
        Ok(not_after)
    }
}

/// A certificate signing request over the key in `key_pem`.
fn csr_for_key(key_pem: &str) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| anyhow::anyhow!("this node's key (tls/node.key): {e}"))?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok(csr.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(90)),
            t0 + Duration::from_secs(60)
        );
        // A certificate that ends before it starts is due at once.
        assert_eq!(renew_at(t0, t0 - Duration::from_secs(5)), t0);
    }
}
