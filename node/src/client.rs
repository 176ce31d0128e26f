//! Connecting to a node's API over mutual TLS, as flockctl and a joining node do, and the client
//! config file (`admin.conf`) that holds what flockctl needs to do it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, ClientTlsConfig};

use flock_proto::v1::api_client::ApiClient;

use crate::pki::{client_tls, read_private, write_private, Peer, PkiError, TlsIdentity};

/// What flockctl needs to reach a cluster: where, whom to trust, and who it is.
/// Written by `flockd init` (DATA_DIR/admin.conf) and `flockctl cluster admin-config`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientConfig {
    pub format: u32,
    pub cluster_id: String,
    /// API addresses (HOST:PORT) of members; flockctl tries them in order.
    pub addrs: Vec<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientConfig {
    /// Reads a config, refusing one that group or others can read (it holds a private key).
    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = read_private(path)?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a flock client config: {e}", path.display()))
    }

    /// Writes the config with 0600 permissions.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
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
    pub fn identity(&self) -> anyhow::Result<TlsIdentity> {
        Ok(
            TlsIdentity::from_pem(&self.ca_pem, Some((&self.cert_pem, &self.key_pem))).map_err(
                |e| PkiError::Bad {
                    what: "client config".into(),
                    reason: e.to_string(),
                },
            )?,
        )
    }
}

/// Connects to the API at `addr` (HOST:PORT) over TLS, presenting `tls`, and accepting any node
/// of its CA as the server; fails with a message naming the address.
pub async fn connect(
    addr: &str,
    tls: &TlsIdentity,
    timeout: Duration,
) -> anyhow::Result<ApiClient<Channel>> {
    let channel = flock_raft::tls::connect_peer(addr, tls, Peer::AnyNode, timeout).await?;
    Ok(ApiClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Runs `attempt` until it succeeds or `total` has passed, with exponential backoff (100 ms
/// doubling to 2 s); then fails with the last error and how long it tried. `retry` says which
/// errors are worth another attempt.
pub async fn with_backoff<T, F, Fut>(
    what: &str,
    total: Duration,
    retry: impl Fn(&anyhow::Error) -> bool,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + total;
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !retry(&e) => return Err(e),
            Err(e) if Instant::now() + delay >= deadline => {
                anyhow::bail!("{e:#} (gave up after {attempts} attempts over {total:?}); check {what} and that flockd runs there")
            }
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), "retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An error and its sources, joined: tonic's top-level transport error says little alone.
pub use flock_raft::tls::error_chain;
