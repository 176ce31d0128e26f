//! The client config file (`admin.conf`): what a client needs to reach a cluster.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use flock_tls::pki::{read_private, write_private, PkiError};
use flock_tls::{TlsError, TlsIdentity, SERVER_NAME};

/// The config's format version: [`ClientConfig::load`] reads this one.
pub const CLIENT_CONFIG_FORMAT: u32 = 1;

/// Errors of the client side; messages name the file or address and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Reading or writing the config file (missing, unreadable, readable by others).
    #[error(transparent)]
    File(#[from] PkiError),
    /// The file is not a client config.
    #[error("{path} is not a flock client config: {reason}")]
    NotAConfig { path: String, reason: String },
    /// The config's certificates or key do not make a TLS identity.
    #[error("client config: {0}")]
    Identity(TlsError),
    /// A node cannot be reached (the message names the address), or its address is not
    /// HOST:PORT.
    #[error(transparent)]
    Connect(#[from] TlsError),
}

/// What flockctl needs to reach a cluster: where, whom to trust, and who it is.
/// Written by `flockd init` (DATA_DIR/admin.conf) and `flockctl cluster admin-config`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientConfig {
    /// [`CLIENT_CONFIG_FORMAT`].
    pub format: u32,
    /// The cluster this config belongs to.
    pub cluster_id: String,
    /// API addresses (HOST:PORT) of members; flockctl tries them in order.
    pub addrs: Vec<String>,
    /// The cluster CA's certificate (PEM).
    pub ca_pem: String,
    /// This client's certificate (PEM), signed by the cluster CA.
    pub cert_pem: String,
    /// This client's private key (PEM).
    pub key_pem: String,
}

impl ClientConfig {
    /// Reads a config, refusing one that group or others can read (it holds a private key).
    pub fn load(path: &Path) -> Result<ClientConfig, ClientError> {
        let text = read_private(path)?;
        serde_json::from_str(&text).map_err(|e| ClientError::NotAConfig {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Writes the config with 0600 permissions, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        // Plain strings and numbers: serializing cannot fail.
        let text = serde_json::to_string_pretty(self).map_err(|e| ClientError::NotAConfig {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        write_private(path, &text)?;
        Ok(())
    }

    /// tonic's TLS for this config (jepsen's client); it checks the CA and the server-auth
    /// usage, not that the server is a node: flockctl uses [`identity`](Self::identity).
    pub fn tls(&self) -> ClientTlsConfig {
        client_tls(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)))
    }

    /// The identity flockctl connects with: its admin certificate, and any node of the CA
    /// accepted as the server (never an admin certificate).
    pub fn identity(&self) -> Result<TlsIdentity, ClientError> {
        TlsIdentity::from_pem(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)))
            .map_err(ClientError::Identity)
    }
}

/// tonic's client TLS trusting `ca_pem`, with an optional client identity (cert, key): the CA
/// and the server-auth usage are checked, the node's common name is not.
pub fn client_tls(ca_pem: &str, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(SERVER_NAME);
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> ClientConfig {
        ClientConfig {
            format: CLIENT_CONFIG_FORMAT,
            cluster_id: "c0ffee".into(),
            addrs: vec!["127.0.0.1:7000".into()],
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        }
    }

    #[test]
    fn a_saved_config_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.conf");
        sample().save(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = ClientConfig::load(&p).unwrap();
        assert_eq!(back.addrs, sample().addrs);
        assert_eq!(back.key_pem, "key");
    }

    #[test]
    fn an_open_or_foreign_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.conf");
        sample().save(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClientConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let q = dir.path().join("other.conf");
        write_private(&q, "not json").unwrap();
        let e = ClientConfig::load(&q).unwrap_err().to_string();
        assert!(e.contains("other.conf is not a flock client config"), "{e}");
    }

    #[test]
    fn the_previous_format_still_loads() {
        // The exact JSON `flockd init` wrote before this crate existed.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.conf");
        let old = r#"{
  "format": 1,
  "cluster_id": "abc",
  "addrs": [
    "10.0.0.1:7000"
  ],
  "ca_pem": "A",
  "cert_pem": "B",
  "key_pem": "C"
}"#;
        write_private(&p, old).unwrap();
        let c = ClientConfig::load(&p).unwrap();
        assert_eq!(
            (c.format, c.cluster_id.as_str(), c.key_pem.as_str()),
            (1, "abc", "C")
        );
        assert_eq!(serde_json::to_string_pretty(&c).unwrap(), old);
    }
}
