//! Who may call what: the [`Authorizer`], which reads the caller's certificate against the
//! replicated state (removed nodes, revoked admin labels). The CA, certificates, TLS identities
//! and private files are flock-tls's ([`flock_tls::pki`]), re-exported here so the node names
//! them in one place.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use flock_raft::state_machine::StateView;
use flock_scheduler::NodeId;

pub use flock_tls::pki::*;

/// Decides who may call what, from the caller's certificate and the replicated state.
#[derive(Clone)]
pub struct Authorizer {
    view: StateView,
}

/// The peer certificates of a request, as tonic exposes them.
pub type PeerCerts = Option<Arc<Vec<CertificateDer<'static>>>>;

impl Authorizer {
    pub fn new(view: StateView) -> Self {
        Authorizer { view }
    }

    /// The caller's role: it must present a certificate of this cluster's CA (checked by the TLS
    /// layer, with its expiry), a node must not have been removed, and an admin's label must
    /// not have been revoked. A node id at or past the next id this
    /// node knows of was registered after its last applied entry (or this node is still joining):
    /// the CA signed it, so it is accepted.
    pub fn check(&self, certs: &PeerCerts) -> Result<Role, tonic::Status> {
        let der = certs
            .as_ref()
            .and_then(|c| c.first())
            .ok_or_else(|| tonic::Status::unauthenticated(
                "not a member: this call needs a client certificate of this cluster (flockctl: --config FILE or FLOCK_CONFIG)",
            ))?;
        let role = role_of(der)
            .map_err(|e| tonic::Status::unauthenticated(format!("not a member: {e}")))?;
        let a = self.view.read();
        match &role {
            Role::Node(id) => {
                if *id < a.cluster.next_node_id && !a.cluster.nodes.contains_key(id) {
                    return Err(tonic::Status::permission_denied(format!(
                        "not a member: node {id} was removed from the cluster"
                    )));
                }
            }
            Role::Admin(label) => {
                if a.cluster.admin_revoked(label) {
                    return Err(tonic::Status::permission_denied(format!(
                        "not a member: admin certificates labelled {label:?} were revoked; ask an administrator for a new admin config (flockctl cluster admin-config --label NEW)"
                    )));
                }
            }
        }
        Ok(role)
    }

    /// As [`check`](Self::check), and the caller must be a node.
    pub fn check_node(&self, certs: &PeerCerts) -> Result<NodeId, tonic::Status> {
        match self.check(certs)? {
            Role::Node(id) => Ok(id),
            Role::Admin(_) => Err(tonic::Status::permission_denied("only nodes may call this")),
        }
    }
}
